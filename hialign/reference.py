"""Shared reference log-probs: computed once per (model, data, tokenisation, precision).

Every strategy trains against the same frozen base, so its log-probs of the training pairs are
identical across strategies and re-runs. They are stored as safetensors under a key hashed from
everything they depend on; any change to the model files, the token ids, the maximum length or
the precision gives a new key, so a stale cache can never be read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hialign.modeling import cache_dir

logger = logging.getLogger(__name__)


def model_fingerprint(model_path: str) -> str:
    """Hash of a model folder: its resolved path, the content of its small files (config,
    tokenizer) and the size and nanosecond mtime of its weights; hub ids as they are.

    Weights are not read (513 MiB for SmolLM2): rewriting them changes their mtime, and two
    folders never share a key because the path is part of it.
    """
    folder = Path(model_path)
    if not folder.is_dir():
        return model_path
    digest = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(folder.glob("*")):
        if file.suffix in (".json", ".model", ".txt"):
            digest.update(f"{file.name}:".encode() + file.read_bytes())
        elif file.suffix in (".safetensors", ".bin", ".gguf"):
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def reference_key(
    model_path: str, token_ids: list, precision: str, max_length: int | None = None
) -> str:
    """Cache key of the reference log-probs of ``token_ids`` (per pair: prompt, chosen,
    rejected ids) under the model at ``model_path``, in ``precision``, at ``max_length``."""
    digest = hashlib.sha256()
    digest.update(model_fingerprint(model_path).encode())
    digest.update(precision.encode())
    if max_length is not None:
        digest.update(f"max_length={max_length}".encode())
    digest.update(json.dumps(token_ids, separators=(",", ":")).encode())
    return digest.hexdigest()[:32]


def cached_reference_logps(key: str, compute) -> tuple[torch.Tensor, bool]:
    """Load the (N, 2) log-probs stored under ``key`` or compute and store them.

    Returns the tensor and whether it came from the cache.
    """
    path = cache_dir() / "reference" / f"{key}.safetensors"
    if path.is_file():
        logger.info("reference log-probs: reusing %s", path)
        return load_file(path)["logps"], True
    logps = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({"logps": logps.contiguous()}, tmp)
    tmp.rename(path)  # atomic: a crash never leaves a half-written cache entry
    return logps, False
