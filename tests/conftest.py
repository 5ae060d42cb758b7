"""Shared fixtures: a tiny random Llama for fast unit tests, the real SmolLM2 and hh-rlhf rows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HIALIGN_SHARED", REPO.parent / "shared"))
HH_TEST = SHARED / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
PAPER_COUNTS = SHARED / "data" / "paper" / "judge_counts.csv"


@pytest.fixture(scope="session")
def hh_path() -> Path:
    if not HH_TEST.is_file():
        pytest.fail(f"real hh-rlhf rows not found at {HH_TEST} (set HIALIGN_SHARED)")
    return HH_TEST


@pytest.fixture(scope="session")
def paper_counts_path() -> Path:
    if not PAPER_COUNTS.is_file():
        pytest.fail(f"paper counts not found at {PAPER_COUNTS} (set HIALIGN_SHARED)")
    return PAPER_COUNTS


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the embedded SmolLM2, converted from GGUF to safetensors once per cache."""
    from hialign.modeling import resolve_model

    return resolve_model(None).path


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """The real SmolLM2 tokenizer (ChatML template); small models below share its vocabulary."""
    from hialign.modeling import load_tokenizer

    return load_tokenizer(smollm2_path)


def make_tiny_llama(num_layers: int = 6, vocab_size: int = 49152, seed: int = 0):
    """A randomly initialised Llama small enough for unit tests (fp32, eval mode)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_llama()
