"""Stage 3 — Direct Preference Optimization on the LoRA parameters of the target block.

The reference policy is the frozen base model. With LoRA it needs no second copy of the weights:
the base *is* the policy with its adapters switched off, and since the base never changes its
log-probs are computed once, before training, and shared by every strategy.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    reference_chosen_logps: torch.Tensor,
    reference_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sigmoid DPO loss of Rafailov et al. (2023), per pair.

    The policy is pushed to raise the chosen reply's likelihood relative to the reference more
    than the rejected reply's; beta sets how far it may drift from the reference.

    Args:
        policy_chosen_logps: (B,) summed log-probs of the chosen replies under the policy.
        policy_rejected_logps: (B,) same for the rejected replies.
        reference_chosen_logps: (B,) chosen replies under the frozen reference.
        reference_rejected_logps: (B,) rejected replies under the reference.
        beta: temperature of the implicit reward.

    Returns:
        losses (B,), chosen rewards (B,) and rejected rewards (B,); rewards are
        beta * (policy - reference) log-ratios, detached.
    """
    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def _decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The decoder stack and LM head, or None when logits need more than ``head(hidden)``."""
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    config = causal_lm.config
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # the head is followed by extra maths; use the model's own logits
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    head = causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        return None
    return decoder, head


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    """Summed log-probs of the response tokens of each row.

    Only positions that predict a response token go through the LM head, so the prompt's
    logits over the full vocabulary are never materialised.

    Args:
        input_ids: (R, T) token ids, prompt then response, right-padded.
        attention_mask: (R, T) 1 for real tokens.
        loss_mask: (R, T) True where the token at that position is a response token.

    Returns:
        (R,) float32 sums of log p(token_t | tokens_<t) over response positions t.
    """
    target_mask = loss_mask[:, 1:]  # token t is predicted from position t-1
    targets = input_ids[:, 1:][target_mask]  # (M,)
    parts = _decoder_and_head(model)
    if parts is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        selected = logits[:, :-1][target_mask]  # (M, V)
    else:
        decoder, head = parts
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        selected = head(hidden[:, :-1][target_mask])  # (M, V)
    token_logps = -F.cross_entropy(selected.float(), targets, reduction="none")  # (M,)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    row_of_token = rows[:, None].expand_as(target_mask)[target_mask]
    sums = torch.zeros(input_ids.shape[0], device=input_ids.device, dtype=torch.float32)
    return sums.index_add(0, row_of_token, token_logps)


@dataclass
class TrainSettings:
    beta: float = 0.1
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2
    batch_size: int = 4
    grad_accum: int = 1
    epochs: int = 1
    max_steps: int = 0  # 0 = no limit
    seed: int = 42

    def total_steps(self, num_pairs: int) -> int:
        per_epoch = math.ceil(num_pairs / (self.batch_size * self.grad_accum))
        total = per_epoch * self.epochs
        return min(total, self.max_steps) if self.max_steps else total


def micro_batches(num_pairs: int, settings: TrainSettings) -> Iterator[tuple[int, list[int]]]:
    """(epoch, pair indices) micro-batches in a seeded order, identical for every strategy."""
    for epoch in range(settings.epochs):
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(num_pairs, generator=generator).tolist()
        for start in range(0, num_pairs, settings.batch_size):
            yield epoch, order[start : start + settings.batch_size]


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B,) chosen and (B,) rejected log-probs of a collated batch (chosen rows first)."""
    logps = response_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
    half = logps.shape[0] // 2
    return logps[:half], logps[half:]


@torch.no_grad()
def compute_logps(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    autocast,
    desc: str = "reference log-probs",
) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs for every pair of ``batches``, in order."""
    model.eval()
    out = []
    for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
        with autocast():
            chosen, rejected = pair_logps(model, batch)
        out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, 2)


def train_dpo(
    model: nn.Module,
    make_batch,
    reference: torch.Tensor,
    settings: TrainSettings,
    accelerator,
    autocast,
    desc: str = "DPO",
) -> list[dict]:
    """Train the trainable (LoRA) parameters of ``model`` with DPO; return per-step metrics.

    Args:
        model: a PEFT model whose only trainable parameters are the target block's LoRA.
        make_batch: maps a list of pair indices to a collated batch (see ``data.collate_pairs``).
        reference: (N, 2) reference log-probs of chosen/rejected for every training pair.
        accelerator: an ``accelerate.Accelerator``; it places the model and, across processes,
            each process takes every k-th micro-batch.
        autocast: a zero-argument context-manager factory (bf16 autocast or a no-op).
    """
    from transformers import get_scheduler

    num_pairs = reference.shape[0]
    world, rank = accelerator.num_processes, accelerator.process_index
    total = math.ceil(settings.total_steps(num_pairs) / world)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = get_scheduler(
        "linear",
        optimizer,
        num_warmup_steps=min(settings.warmup_steps, total),
        num_training_steps=total,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    history: list[dict] = []
    step_metrics: list[torch.Tensor] = []
    progress = tqdm(total=total, desc=desc, unit="step", disable=not accelerator.is_main_process)
    own_batches = [b for i, b in enumerate(micro_batches(num_pairs, settings)) if i % world == rank]
    for micro_step, (epoch, indices) in enumerate(own_batches):
        batch = {k: v.to(accelerator.device) for k, v in make_batch(indices).items()}
        ref = reference[indices].to(accelerator.device)
        with autocast():
            chosen, rejected = pair_logps(model, batch)
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            chosen, rejected, ref[:, 0], ref[:, 1], settings.beta
        )
        accelerator.backward(losses.mean() / settings.grad_accum)
        margins = chosen_rewards - rejected_rewards
        step_metrics.append(
            torch.stack(
                [
                    losses.detach().mean(),
                    (margins > 0).float().mean(),
                    margins.mean(),
                    chosen_rewards.mean(),
                    rejected_rewards.mean(),
                ]
            )
        )
        # Step after grad_accum micro-batches, or on the last one (a short final group).
        if (micro_step + 1) % settings.grad_accum and micro_step + 1 < len(own_batches):
            continue

        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        metrics = accelerator.reduce(torch.stack(step_metrics).mean(0), "mean").tolist()
        step_metrics.clear()
        record = dict(
            step=len(history) + 1,
            epoch=epoch,
            loss=metrics[0],
            reward_accuracy=metrics[1],
            reward_margin=metrics[2],
            chosen_reward=metrics[3],
            rejected_reward=metrics[4],
            lr=scheduler.get_last_lr()[0],
        )
        history.append(record)
        progress.update(1)
        progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record['reward_accuracy']:.2f}",
            margin=f"{record['reward_margin']:.3f}",
        )
        if len(history) >= total:
            break
    progress.close()
    model.eval()
    return history
