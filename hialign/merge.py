"""Stage 4 — finalise: keep the LoRA adapter and save a merged, ordinary model.

The merged folder is plain safetensors + config + tokenizer, so
``AutoModelForCausalLM.from_pretrained`` and vLLM load it with no PEFT involved.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def save_adapter(peft_model: PeftModel, out_dir: Path) -> Path:
    """Save the adapter as PEFT does (adapter_config.json + adapter_model.safetensors)."""
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    _usual_modes(Path(out_dir))
    return out_dir


def _usual_modes(folder: Path) -> None:
    """transformers and PEFT write weight files 0600 (and mkdtemp folders 0700); a saved model
    is meant to be shared (vLLM servers, colleagues), so give it the umask's usual modes."""
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def merge_and_save(
    peft_model: PeftModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path | None
) -> PreTrainedModel:
    """Fold the LoRA weights into the base weights; save the result when ``out_dir`` is given.

    The base model inside ``peft_model`` is modified in place and returned. The folder is
    written under a temporary name and renamed when complete, so a crash mid-save never leaves
    an ``out_dir`` that looks finished but lacks its weights.
    """
    merged = peft_model.merge_and_unload()
    merged.eval()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.parent.glob(f"{out_dir.name}.partial-*"):
            shutil.rmtree(stale)  # left by a crashed save
        tmp = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.partial-", dir=out_dir.parent))
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _usual_modes(tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
        size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors")) / 2**20
        logger.info("merged model saved to %s (%.0f MiB safetensors)", out_dir, size)
    return merged
