"""Hypothesis-2 probe: where in the layer stack does the DPO loss gradient concentrate?

At the start of LoRA-DPO the policy equals the reference, so every pair's loss is log 2, but
its gradient is not zero: dℓ/dθ = -(β/2)·∇[log π(y_w|x) - log π(y_l|x)]. The probe measures,
per pair, the norm of that gradient over each layer's self-attention projection weights, then
averages over pairs (with a bootstrap over pairs) per layer and per block.

Why the weights and not LoRA's A/B: with LoRA's B = 0 at initialisation, ∂ℓ/∂A = 0 and
∂ℓ/∂B = s·G·Aᵀ, where G = ∂ℓ/∂W is the gradient of the frozen weight and A is random. So the
first LoRA step sees a random rank-r sketch of G, whose expected squared norm is proportional
to ‖G‖² with the same constant for every layer of equal width. G itself is that signal without
the sketch's noise, and does not depend on a rank or a seed. Biases and attention norms are left
out because LoRA never adapts them.

Normalised norms divide by √(parameter count): ‖g‖/√P is the root-mean-square gradient per
parameter, so a block twice as large with the same per-parameter gradient scores the same.

Per-pair gradients come from one batched forward and backward: rows of a batch do not interact
(eval mode, no dropout), so the gradient with respect to a projection's output at a row's
positions is that row's own, and a pair's weight gradient is Σ_t g_t x_tᵀ over its two rows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hialign.dpo import dpo_loss, pair_logps
from hialign.partition import Block, attention_modules, find_decoder_layers

logger = logging.getLogger(__name__)

# A verdict needs enough pairs for the bootstrap to mean something.
MIN_PAIRS_FOR_VERDICT = 10
# Tokens per pair processed at once is bounded by batch_size * 2 rows * max_length.
DEFAULT_BATCH_SIZE = 4


@dataclass
class GradientProfile:
    """Per-pair, per-layer squared gradient norms of the DPO loss over attention weights.

    sq_norms: (N, L) ‖∂ℓ_i/∂Θ_l‖² for pair i and layer l (float64).
    layer_params: (L,) parameters counted per layer (the attention projection weights).
    losses: (N,) each pair's DPO loss (log 2 when policy == reference).
    sources: N pair sources, e.g. ``test.jsonl.gz:17``.
    """

    sq_norms: np.ndarray
    layer_params: np.ndarray
    losses: np.ndarray
    sources: list[str]
    projections: list[str]
    beta: float

    @property
    def num_layers(self) -> int:
        return self.sq_norms.shape[1]


def attention_weight_modules(model: nn.Module) -> list[list[tuple[str, nn.Module]]]:
    """Per decoder layer, the (qualified name, module) of each attention projection."""
    projections, path = attention_modules(model)
    _, layers = find_decoder_layers(model)
    out = []
    for index, layer in enumerate(layers):
        modules = dict(layer.named_modules())
        found = []
        for name in projections:
            module = modules[name]
            weight = getattr(module, "weight", None)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
                # Quantised or fused kernels hide the dense weight the probe differentiates.
                raise TypeError(
                    f"{path}.{index}.{name} ({type(module).__name__}) has no 2-D weight; "
                    "the probe needs plain linear projections"
                )
            found.append((f"{path}.{index}.{name}", module))
        out.append(found)
    return out


class _Capture:
    """Forward hooks keeping each projection's input (detached) and output (in the graph)."""

    def __init__(self, layers: list[list[tuple[str, nn.Module]]]):
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [
            module.register_forward_hook(self._hook(name), with_kwargs=True)
            for layer in layers
            for name, module in layer
        ]

    def _hook(self, name: str) -> Callable:
        def hook(module, args, kwargs, output):
            if name in self.outputs:
                raise RuntimeError(f"{name} ran twice in one forward; the probe cannot split it")
            x = args[0] if args else next(iter(kwargs.values()))
            self.inputs[name] = x.detach()
            self.outputs[name] = output

        return hook

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _pair_sq_norm(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm of each pair's weight gradient Σ_t g_t x_tᵀ.

    Args:
        x: (2B, T, in) projection inputs, chosen rows first, then rejected rows.
        g: (2B, T, out) loss gradients with respect to the projection outputs.

    Returns:
        (B,) float64 squared norms, one per pair (its chosen and rejected rows together).
    """
    half = x.shape[0] // 2
    # Under bf16 autocast the outputs (and so g) are bf16: multiply in bf16, which accumulates
    # in fp32 and is 2-3x faster on CPU; the squared sum is taken in fp32.
    x = torch.cat([x[:half], x[half:]], dim=1).to(g.dtype)  # (B, 2T, in)
    g = torch.cat([g[:half], g[half:]], dim=1)  # (B, 2T, out)
    grad = torch.einsum("bto,bti->boi", g, x)  # (B, out, in), the weight layout of nn.Linear
    return grad.float().pow(2).sum(dim=(1, 2)).double()


@contextlib.contextmanager
def _probe_mode(model: nn.Module):
    """Eval mode (rows must not interact) and a graph that starts at the input embeddings."""
    was_training = model.training
    model.eval()

    # The base may be fully frozen; an embedding output that requires grad still yields a graph
    # through every layer, and autograd.grad then computes no parameter gradient at all.
    def need_grad(module, args, output):
        return output.requires_grad_() if not output.requires_grad else output

    handle = model.get_input_embeddings().register_forward_hook(need_grad)
    try:
        yield
    finally:
        handle.remove()
        model.train(was_training)


def gradient_profile(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    beta: float = 0.1,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    sources: Sequence[str] | None = None,
    desc: str = "probe",
) -> GradientProfile:
    """Per-pair squared gradient norms of the DPO loss at policy == reference, per layer.

    Args:
        model: a causal LM (not PEFT-wrapped); its weights are not changed.
        batches: collated batches (``collate_pairs``): input_ids, attention_mask, loss_mask,
            each (2B, T) with the B chosen rows first.
        beta: DPO temperature; gradients scale with it, ratios do not.
        autocast: zero-argument context-manager factory around the forward (bf16 or no-op).
    """
    layers = attention_weight_modules(model)
    layer_params = np.array([sum(m.weight.numel() for _, m in layer) for layer in layers])
    device = next(model.parameters()).device
    names = [name for layer in layers for name, _ in layer]
    capture = _Capture(layers)
    rows, losses = [], []
    try:
        with _probe_mode(model):
            for batch in tqdm(batches, desc=desc, unit="batch", disable=None, leave=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                capture.clear()
                with autocast():
                    chosen, rejected = pair_logps(model, batch)
                # The reference is the policy itself, detached: the first step of training.
                loss, _, _ = dpo_loss(chosen, rejected, chosen.detach(), rejected.detach(), beta)
                grads = torch.autograd.grad(
                    loss.sum(), [capture.outputs[n] for n in names], allow_unused=True
                )
                per_name = {}
                for name, grad in zip(names, grads):
                    x = capture.inputs[name]
                    grad = torch.zeros(*x.shape[:2], 1, device=device) if grad is None else grad
                    per_name[name] = _pair_sq_norm(x, grad)
                per_layer = [sum(per_name[name] for name, _ in layer) for layer in layers]
                rows.append(torch.stack(per_layer, dim=1).cpu())  # (B, L)
                losses.append(loss.detach().double().cpu())
    finally:
        capture.clear()
        capture.remove()

    sq_norms = torch.cat(rows).numpy() if rows else np.zeros((0, len(layers)))
    return GradientProfile(
        sq_norms=sq_norms,
        layer_params=layer_params,
        losses=torch.cat(losses).numpy() if losses else np.zeros(0),
        sources=list(sources) if sources is not None else [str(i) for i in range(len(sq_norms))],
        projections=attention_modules(model)[0],
        beta=beta,
    )


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, C) column means of ``values`` (N, C) over pairs resampled with replacement."""
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    counts = np.zeros((n_boot, n))
    np.add.at(counts, (np.repeat(np.arange(n_boot), n), draws.ravel()), 1.0)
    return counts @ values / n


def _interval(samples: np.ndarray, level: float = 0.95) -> list[list[float]]:
    """Percentile interval per column of (n_boot, C) samples: C pairs [low, high]."""
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
    return np.stack([np.atleast_1d(low), np.atleast_1d(high)], axis=1).tolist()


def summarise(
    profile: GradientProfile,
    blocks: Sequence[Block],
    pair_indices: Sequence[int] | None = None,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict:
    """Per-layer and per-block mean gradient norms with bootstrap 95% intervals, and a verdict.

    Per pair i, a layer's norm is √s_il and a block's is √Σ_{l∈k} s_il (the norm over all its
    attention weights); means are over pairs, intervals are percentiles of means over pairs
    resampled with replacement. Normalised = norm / √params.

    Verdict rule: the top block (highest normalised mean) holds Hypothesis 2 at 95% confidence
    when the paired-bootstrap 95% interval of (top block ÷ strongest other block in the same
    resample) lies above 1. The concentration ratio (top ÷ mean of the others) is reported with
    its interval too, but it can exceed 1 while a second block is as strong as the top one.
    """
    index = np.arange(len(profile.sq_norms)) if pair_indices is None else np.asarray(pair_indices)
    s = profile.sq_norms[index]  # (n, L)
    n = len(index)
    layer_norms = np.sqrt(s)  # (n, L)
    block_params = np.array([profile.layer_params[list(b.layers)].sum() for b in blocks])
    block_norms = np.stack([np.sqrt(s[:, list(b.layers)].sum(1)) for b in blocks], axis=1)
    raw = np.concatenate([layer_norms, block_norms], axis=1)  # (n, L + K)
    scale = np.sqrt(np.concatenate([profile.layer_params, block_params]).astype(np.float64))
    norm = raw / scale

    num_layers = s.shape[1]
    mean_raw, mean_norm = raw.mean(0), norm.mean(0)
    summary = dict(n_pairs=int(n), n_boot=n_boot, level=0.95)
    boot = _bootstrap_means(norm, n_boot, seed) if n >= 2 else None
    ci_norm = _interval(boot) if boot is not None else [[math.nan] * 2] * len(scale)
    ci_raw = [[lo * c, hi * c] for (lo, hi), c in zip(ci_norm, scale)]
    summary["layers"] = [
        dict(
            layer=i,
            params=int(profile.layer_params[i]),
            raw=float(mean_raw[i]),
            raw_ci=ci_raw[i],
            normalised=float(mean_norm[i]),
            normalised_ci=ci_norm[i],
        )
        for i in range(num_layers)
    ]
    block_mean = mean_norm[num_layers:]
    summary["blocks"] = [
        dict(
            name=b.name,
            layers=[b.layers[0], b.layers[-1]],
            params=int(block_params[k]),
            raw=float(mean_raw[num_layers + k]),
            raw_ci=ci_raw[num_layers + k],
            normalised=float(block_mean[k]),
            normalised_ci=ci_norm[num_layers + k],
            share=float(block_mean[k] / block_mean.sum()) if block_mean.sum() > 0 else math.nan,
        )
        for k, b in enumerate(blocks)
    ]
    if len(blocks) < 2 or n == 0:
        return summary | dict(top_block=None, verdict=None)

    top = int(np.argmax(block_mean))
    others = [k for k in range(len(blocks)) if k != top]
    summary["top_block"] = blocks[top].name
    summary["runner_up"] = blocks[others[int(np.argmax(block_mean[others]))]].name
    summary["concentration_ratio"] = float(block_mean[top] / block_mean[others].mean())
    summary["dominance_ratio"] = float(block_mean[top] / block_mean[others].max())
    if boot is None or n < MIN_PAIRS_FOR_VERDICT:
        summary["verdict"] = None  # too few pairs to judge
        return summary
    boot_blocks = boot[:, num_layers:]
    concentration = boot_blocks[:, top] / boot_blocks[:, others].mean(1)
    dominance = boot_blocks[:, top] / boot_blocks[:, others].max(1)
    summary["concentration_ratio_ci"] = _interval(concentration)[0]
    summary["dominance_ratio_ci"] = _interval(dominance)[0]
    summary["verdict"] = bool(summary["dominance_ratio_ci"][0] > 1.0)
    return summary


def verdict_sentence(summary: dict, model_name: str, data_name: str, group: str) -> str:
    """Plain-language outcome of the rule in ``summarise``, with its numbers."""
    n = summary["n_pairs"]
    where = f"on {model_name} with {n} pairs of {data_name} ({group})"
    if summary.get("top_block") is None:
        return f"No verdict {where}: it needs at least two blocks and one pair."
    top = next(b for b in summary["blocks"] if b["name"] == summary["top_block"])
    span = f"{top['name']} (layers {top['layers'][0]}-{top['layers'][1]})"
    ratio = f"{summary['concentration_ratio']:.2f}x the mean of the other blocks"
    if summary["verdict"] is None:
        return (
            f"No verdict {where}: fewer than {MIN_PAIRS_FOR_VERDICT} pairs. The per-parameter "
            f"gradient is largest in {span}, {ratio}."
        )
    lo, hi = summary["dominance_ratio_ci"]
    clo, chi = summary["concentration_ratio_ci"]
    versus = (
        f"{summary['runner_up']} by {summary['dominance_ratio']:.2f}x (95% CI {lo:.2f}-{hi:.2f})"
    )
    if summary["verdict"]:
        return (
            f"Hypothesis 2 held {where}: the DPO gradient per parameter concentrates in {span}, "
            f"{ratio} (95% CI {clo:.2f}-{chi:.2f}), and exceeds the next block {versus}."
        )
    return (
        f"Hypothesis 2 did not hold at 95% confidence {where}: the per-parameter gradient is "
        f"largest in {span}, {ratio} (95% CI {clo:.2f}-{chi:.2f}), but its lead over the next "
        f"block {versus} does not exclude 1."
    )


def sample_tokenized_pairs(
    tokenizer, pairs: Sequence, num_pairs: int, max_length: int, seed: int = 0
) -> tuple[list, dict[str, int]]:
    """Up to ``num_pairs`` tokenised pairs drawn in a seeded order; skips counted by reason.

    ``pairs`` may hold ``PreferencePair`` (tokenised here, too-long ones skipped and counted)
    or already tokenised ``TokenizedPair``.
    """
    from hialign.tokenization import TokenizedPair, tokenize_pair

    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    kept, skipped = [], {}
    for i in order:
        if len(kept) >= num_pairs:
            break
        pair = pairs[i]
        if not isinstance(pair, TokenizedPair):
            pair = tokenize_pair(tokenizer, pair, max_length)
        if isinstance(pair, str):
            skipped[pair] = skipped.get(pair, 0) + 1
            continue
        kept.append(pair)
    return kept, skipped


def make_batches(tokenized: Sequence, batch_size: int, pad_token_id: int) -> list[dict]:
    """Collate pairs in the given order, ``batch_size`` pairs per batch."""
    from hialign.tokenization import collate_pairs

    return [
        collate_pairs(tokenized[i : i + batch_size], pad_token_id)
        for i in range(0, len(tokenized), batch_size)
    ]


def probe_pairs(
    model: nn.Module,
    tokenizer,
    tokenized: Sequence,
    beta: float = 0.1,
    batch_size: int = DEFAULT_BATCH_SIZE,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> GradientProfile:
    """``gradient_profile`` over tokenised pairs, batched by length to waste little padding."""
    order = sorted(range(len(tokenized)), key=lambda i: _pair_length(tokenized[i]))
    ordered = [tokenized[i] for i in order]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = make_batches(ordered, batch_size, pad)
    profile = gradient_profile(model, batches, beta, autocast, sources=[p.source for p in ordered])
    # Back to the caller's order, so pair i of the profile is tokenized[i].
    inverse = np.argsort(order)
    profile.sq_norms = profile.sq_norms[inverse]
    profile.losses = profile.losses[inverse]
    profile.sources = [p.source for p in tokenized]
    return profile


def _pair_length(pair) -> int:
    return len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids))


def layer_profile(profile: GradientProfile) -> np.ndarray:
    """(L,) mean over pairs of each layer's gradient norm per parameter, √s_il / √P_l."""
    return np.sqrt(profile.sq_norms).mean(0) / np.sqrt(profile.layer_params)
