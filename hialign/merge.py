"""Stage 4 — finalise: keep the LoRA adapter and save a merged, ordinary model.

The merged folder is plain safetensors + config + tokenizer, so
``AutoModelForCausalLM.from_pretrained`` and vLLM load it with no PEFT involved.
"""

from __future__ import annotations

import logging
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def save_adapter(peft_model: PeftModel, out_dir: Path) -> Path:
    """Save the adapter as PEFT does (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def merge_and_save(
    peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path | None
) -> PreTrainedModel:
    """Fold the LoRA weights into the base weights; save the result when ``out_dir`` is given.

    The base model inside ``peft_model`` is modified in place and returned.
    """
    merged = peft_model.merge_and_unload()
    merged.eval()
    if out_dir is not None:
        merged.save_pretrained(out_dir, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        size = sum(f.stat().st_size for f in Path(out_dir).glob("*.safetensors")) / 2**20
        logger.info("merged model saved to %s (%.0f MiB safetensors)", out_dir, size)
    return merged
