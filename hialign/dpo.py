"""Stage 3 — Direct Preference Optimization on the LoRA parameters of the target block.

The reference policy is the frozen base model. With LoRA it needs no second copy of the weights:
the base *is* the policy with its adapters switched off, and since the base never changes its
log-probs are computed once, before training, and shared by every strategy.

Pairs are scored by ``scoring.PairScorer``: each pair's prompt is computed once for both replies,
the frozen layers below the trained block run once per pair (not once per step), and the LM head
runs on response positions only. Each saving is checked against the plain path on the first
batch and dropped, with a warning, where a model does not allow it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from tqdm.auto import tqdm

from hialign.partition import find_decoder_layers
from hialign.prefix_cache import DEFAULT_MAX_BYTES, FrozenPrefixCache
from hialign.scoring import PairScorer, collated_logps

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


def response_logps(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    loss_mask: torch.Tensor,
) -> torch.Tensor:
    """Summed log-probs of the response tokens of each row (the plain path).

    Only positions that predict a response token go through the LM head, so the prompt's
    logits over the full vocabulary are never materialised (see ``head_logps``).

    Args:
        input_ids: (R, T) token ids, prompt then response, right-padded.
        attention_mask: (R, T) 1 for real tokens.
        loss_mask: (R, T) True where the token at that position is a response token.

    Returns:
        (R,) float32 sums of log p(token_t | tokens_<t) over response positions t.
    """
    return collated_logps(model, input_ids, attention_mask, loss_mask)


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
    share_prompt: bool = True  # score each pair in one row: its prompt computed once
    frozen_prefix: bool = True  # run the frozen layers below the trained block once per pair
    prefix_cache_bytes: int = DEFAULT_MAX_BYTES  # memory for the frozen-prefix cache
    verify_engine: bool = True  # check the two savings against the plain path on batch 1

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
    share_prompt: bool = True,
    prefix_states: dict[int, dict] | None = None,
) -> torch.Tensor:
    """(N, 2) chosen/rejected log-probs for every pair of ``batches``, in order.

    The reference is the base model itself (or the policy with adapters disabled): no copy.

    Args:
        prefix_states: optional {layer: {}}; each dict is filled with the hidden states entering
            that layer for every pair (pairs numbered in order through ``batches``), for
            ``train_dpo(prefix_states=...)`` of strategies whose lowest trained layer it is.
            Costs no compute (this pass runs those layers anyway), only memory.
    """
    model.eval()
    scorer = PairScorer(model, share_prompt=share_prompt)
    if batches and share_prompt:
        scorer.verify(batches[0])
    recording = scorer.record_prefixes(prefix_states or {})
    out, first = [], 0
    with recording as recorded:
        for batch in tqdm(batches, desc=desc, unit="batch", leave=False):
            pairs = batch["input_ids"].shape[0] // 2
            with autocast():
                chosen, rejected = scorer(batch, keys=list(range(first, first + pairs)))
            out.append(torch.stack([chosen, rejected], dim=1).float().cpu())
            first += pairs
    for layer, states in (prefix_states or {}).items():
        states.update(recorded.get(layer, {}))
    return torch.cat(out) if out else torch.zeros(0, 2)


def train_dpo(
    model: nn.Module,
    make_batch,
    reference: torch.Tensor,
    settings: TrainSettings,
    accelerator,
    autocast,
    desc: str = "DPO",
    prefix_states: dict[int, dict] | None = None,
) -> list[dict]:
    """Train the trainable (LoRA) parameters of ``model`` with DPO; return per-step metrics.

    Args:
        model: a PEFT model whose only trainable parameters are the target block's LoRA.
        make_batch: maps a list of pair indices to a collated batch (see ``data.collate_pairs``).
        reference: (N, 2) reference log-probs of chosen/rejected for every training pair.
        accelerator: an ``accelerate.Accelerator``; it places the model and, across processes,
            each process takes every k-th micro-batch.
        autocast: a zero-argument context-manager factory (bf16 autocast or a no-op).
        prefix_states: hidden states recorded by ``compute_logps(prefix_states=...)`` in the same
            precision; the frozen-prefix cache starts from them instead of capturing its own.

    Each record holds the step's mean metrics and ``seconds``, the time since training began.
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
    # The scorer drives the decoder below any DDP wrapper, so DDP's own gradient sync never
    # arms; across processes the LoRA gradients are averaged explicitly before each step.
    # (Only the single-process path is exercised here, on CPU.)
    scorer = _policy_scorer(accelerator.unwrap_model(model), settings, prefix_states)

    history: list[dict] = []
    step_metrics: list[torch.Tensor] = []
    progress = tqdm(total=total, desc=desc, unit="step", disable=not accelerator.is_main_process)
    own_batches = [b for i, b in enumerate(micro_batches(num_pairs, settings)) if i % world == rank]
    clock = time.perf_counter()
    cast_weights = contextlib.ExitStack()
    try:
        for micro_step, (epoch, indices) in enumerate(own_batches):
            batch = {k: v.to(accelerator.device) for k, v in make_batch(indices).items()}
            ref = reference[indices].to(accelerator.device)
            if micro_step == 0:
                if settings.verify_engine:
                    scorer.verify(batch)  # in fp32, so before the weights go to bf16
                first_layer = scorer.prefix.start if scorer.prefix is not None else 0
                cast_weights.enter_context(
                    _frozen_weights_in_autocast_dtype(scorer.model, autocast, first_layer)
                )
            with autocast():
                chosen, rejected = scorer(batch, keys=indices)
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

            if world > 1:
                for param in params:
                    if param.grad is not None:
                        param.grad = accelerator.reduce(param.grad, "mean")
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
                seconds=time.perf_counter() - clock,
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
    finally:
        cast_weights.close()  # the fp32 weights back, even after an error
    progress.close()
    if scorer.prefix is not None:
        logger.info(scorer.prefix.describe())
    model.eval()
    return history


@contextlib.contextmanager
def _frozen_weights_in_autocast_dtype(model: nn.Module, autocast, first_layer: int = 0):
    """Under bf16 autocast, hold the frozen linear weights of decoder layers ``first_layer``
    and up in bf16 while training; put the fp32 weights back after.

    Autocast caches its casts only for weights that require grad, so every forward re-casts
    each frozen weight (35 M parameters per forward of SmolLM2's top third, ~10% of a bf16
    step). Casting once gives bit-identical matmuls, for 2 bytes per parameter of memory.
    """
    with autocast():
        device = next(model.parameters()).device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    causal_lm = model.get_base_model() if isinstance(model, PeftModel) else model
    saved = []
    if dtype is not None:
        for layer in find_decoder_layers(causal_lm)[1][first_layer:]:
            for module in layer.modules():
                weight = getattr(module, "weight", None)
                if isinstance(module, nn.Linear) and not weight.requires_grad:
                    saved.append((weight, weight.data))
                    weight.data = weight.data.to(dtype)
    try:
        yield
    finally:
        for weight, data in saved:
            weight.data = data


def _policy_scorer(model: nn.Module, settings: TrainSettings, prefix_states=None) -> PairScorer:
    """The scorer for training ``model`` with ``settings``' savings switched on or off."""
    prefix = None
    if settings.frozen_prefix:
        prefix = FrozenPrefixCache(model, max_bytes=settings.prefix_cache_bytes)
    scorer = PairScorer(model, share_prompt=settings.share_prompt, prefix_cache=prefix)
    if scorer.prefix is not None and prefix_states and prefix.start in prefix_states:
        taken = prefix.preload(prefix_states[prefix.start])
        logger.info("frozen-prefix cache: %d pairs from the reference pass", taken)
    logger.info("pair scoring: %s", scorer.describe())
    return scorer
