"""Log-probs of scored tokens through the LM head, without keeping (tokens, vocab) logits.

DPO needs log p(token) only at response positions. The head runs on those hidden states alone,
in chunks of tokens, and never stores a logits tensor for backward: the gradient of a token's
log-prob with respect to its hidden state, (onehot - softmax) @ W, is known as soon as the
chunk's softmax is, so it is formed there and only the (tokens, hidden) result is kept. The
backward is then a per-token scale. Same maths and matmuls as autograd through the head, but
the largest live tensor is one chunk of logits instead of all of them plus their softmax.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

# Tokens per chunk so that one chunk of fp32 logits stays near 64 MiB whatever the vocabulary.
LOGITS_BUDGET = 2**24


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype autocast would run the head matmul in (bf16 under bf16 autocast)."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _chunk_size(vocab: int) -> int:
    return max(1, LOGITS_BUDGET // vocab)


def _chunk_logits(hidden, weight, bias) -> torch.Tensor:
    """(n, V) float32 logits of a chunk; the matmul runs in ``weight``'s (compute) dtype."""
    logits = (hidden.to(weight.dtype) @ weight.t()).float()
    return logits if bias is None else logits + bias.float()


class _HeadLogProbs(torch.autograd.Function):
    """Per-token log-softmax of ``hidden @ weight.T`` at ``targets``; gradient for hidden only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        grad_dir = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        step = _chunk_size(weight.shape[0])
        for start in range(0, hidden.shape[0], step):
            end = min(start + step, hidden.shape[0])
            tgt = targets[start:end]
            logits = _chunk_logits(hidden[start:end], weight, bias)  # (n, V)
            lse = torch.logsumexp(logits, dim=-1)
            rows = torch.arange(end - start, device=hidden.device)
            logps[start:end] = logits[rows, tgt] - lse
            probs = logits.sub_(lse[:, None]).exp_()  # in place: the chunk's softmax
            probs[rows, tgt] -= 1.0  # softmax - onehot = -d logp / d logits
            grad_dir[start:end] = -(probs.to(weight.dtype) @ weight).float()  # (n, H)
        ctx.save_for_backward(grad_dir)
        ctx.hidden_dtype = hidden.dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        (grad_dir,) = ctx.saved_tensors
        grad_hidden = (grad_logps.float()[:, None] * grad_dir).to(ctx.hidden_dtype)
        return grad_hidden, None, None, None


class _CastCache:
    """One cast copy of a frozen head weight, reused while the same tensor is unchanged."""

    source: weakref.ref | None = None
    version: int = -1
    copy: torch.Tensor | None = None


def _weight_in(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight`` cast to ``dtype``; under bf16 autocast the 49k x 576 cast is done once."""
    if weight.dtype == dtype:
        return weight.detach()
    cache = _CastCache
    fresh = (
        cache.source is not None
        and cache.source() is weight  # the same tensor object, not a reused address
        and cache.version == weight._version
        and cache.copy.dtype == dtype
    )
    if not fresh:
        cache.source, cache.version = weakref.ref(weight), weight._version
        cache.copy = weight.detach().to(dtype)
    return cache.copy


def head_logps(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Log-probs of ``targets`` under ``head``'s logits at the given hidden states.

    A frozen head (as here: LoRA never targets it) takes the chunked path; a trainable one falls
    back to autograd through full logits so that its weight still gets a gradient.

    Args:
        hidden: (M, H) final hidden states of the positions that predict a scored token.
        head: the LM head, an ``nn.Linear`` (V, H) with an optional bias.
        targets: (M,) token ids to score.

    Returns:
        (M,) float32 log p(target | position).
    """
    if head.weight.requires_grad:  # a trained head needs its weight gradient: plain autograd
        return -F.cross_entropy(head(hidden).float(), targets, reduction="none")
    weight = _weight_in(head.weight, _compute_dtype(hidden))
    bias = None if head.bias is None else head.bias.detach()
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _HeadLogProbs.apply(hidden, weight, bias, targets)

    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    step = _chunk_size(weight.shape[0])
    for start in range(0, hidden.shape[0], step):
        end = min(start + step, hidden.shape[0])
        logits = _chunk_logits(hidden[start:end], weight, bias)
        rows = torch.arange(end - start, device=hidden.device)
        out[start:end] = logits[rows, targets[start:end]] - torch.logsumexp(logits, dim=-1)
    return out
