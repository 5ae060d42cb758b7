"""Stage 2 — targeted LoRA: adapters only on the self-attention of the chosen block(s).

The whole base model is frozen; feed-forward layers never get adapters (they hold most stored
knowledge). Targets are given to PEFT as fully qualified module names, so nothing outside the
intended layers can match, and the result is verified after injection.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from hialign.partition import Block, parse_strategy, target_module_names

logger = logging.getLogger(__name__)


class AdapterError(RuntimeError):
    """The injected adapters differ from the intended ones."""


@dataclass
class AdapterSummary:
    strategy: str
    layers: list[int]
    modules: list[str]  # qualified names of the modules that received LoRA
    trainable_params: int

    def describe(self) -> str:
        span = f"layers {self.layers[0]}-{self.layers[-1]}" if self.layers else "no layers"
        if self.layers and self.layers != list(range(self.layers[0], self.layers[-1] + 1)):
            span = f"layers {self.layers}"
        return (
            f"strategy {self.strategy} = {span}, {len(self.modules)} LoRA modules, "
            f"{self.trainable_params:,} trainable params"
        )


def lora_config(targets: list[str], rank: int, alpha: int, dropout: float) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_block_lora(
    model: PreTrainedModel,
    strategy: str,
    blocks: list[Block],
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.0,
) -> tuple[PeftModel, AdapterSummary]:
    """Freeze ``model`` and put LoRA on the attention projections of ``strategy``'s layers."""
    layers = parse_strategy(strategy, blocks)
    targets = target_module_names(model, layers)
    peft_model = get_peft_model(model, lora_config(targets, rank, alpha, dropout))
    summary = verify_adapters(peft_model, targets, strategy, layers)
    logger.info(summary.describe())
    return peft_model, summary


def lora_module_names(peft_model: PeftModel) -> list[str]:
    """Qualified base-model names of the modules that hold trainable LoRA weights."""
    prefix = "base_model.model."
    names = set()
    for name, param in peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if ".lora_A." not in name and ".lora_B." not in name:
            raise AdapterError(f"parameter {name} is trainable but is not a LoRA weight")
        owner = name.split(".lora_")[0]
        names.add(owner.removeprefix(prefix))
    return sorted(names)


def verify_adapters(
    peft_model: PeftModel, targets: list[str], strategy: str, layers: list[int]
) -> AdapterSummary:
    """Check the trainable modules are exactly ``targets``; raise naming the difference."""
    found = lora_module_names(peft_model)
    missing, extra = sorted(set(targets) - set(found)), sorted(set(found) - set(targets))
    if missing or extra:
        raise AdapterError(
            f"strategy {strategy}: LoRA modules differ from the plan; "
            f"missing {missing[:5]} ({len(missing)}), unexpected {extra[:5]} ({len(extra)})"
        )
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return AdapterSummary(strategy, layers, found, trainable)
