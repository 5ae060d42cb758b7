"""Shared reference log-probs: computed once per (model, data, tokenisation, precision).

Every strategy trains against the same frozen base, so its log-probs of the training pairs are
identical across strategies and re-runs. They are stored as safetensors under a key hashed from
everything they depend on; any change to the model files, the token ids or the precision gives a
new key, so a stale cache can never be read.
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
    """Hash of a model folder's config and weight files (name, size, mtime); hub ids as-is."""
    folder = Path(model_path)
    if not folder.is_dir():
        return model_path
    parts = []
    for file in sorted(folder.glob("*")):
        if file.suffix in (".json", ".safetensors", ".model", ".txt"):
            stat = file.stat()
            parts.append(f"{file.name}:{stat.st_size}:{int(stat.st_mtime)}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def reference_key(model_path: str, token_ids: list, precision: str) -> str:
    digest = hashlib.sha256()
    digest.update(model_fingerprint(model_path).encode())
    digest.update(precision.encode())
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
