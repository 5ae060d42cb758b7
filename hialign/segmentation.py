"""Data-driven partition: split a per-layer profile into K contiguous blocks of similar layers.

Rule (optimal 1-D segmentation, as in Fisher's "natural breaks"): among all ways to cut the L
layers into K contiguous, non-empty blocks of at least ``min_size`` layers, pick the one that
minimises the within-block sum of squared deviations of the profile from each block's mean.
Dynamic programming makes this exact in O(K·L²). Two details:

- The profile is segmented on a log scale by default. Gradient norms vary multiplicatively
  with depth; on a linear scale one large layer dominates the squared error and is cut out
  alone, while a tenfold dip counts for almost nothing.
- Exact ties (a flat profile has zero error under every cut) go to the most equal block sizes,
  then to larger earlier blocks, so a profile without structure yields exactly
  ``partition_layers``'s equal partition rather than an arbitrary one.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import nn

from hialign.partition import Block, PartitionError, check_partition, partition_layers

logger = logging.getLogger(__name__)


def default_min_size(num_layers: int, num_blocks: int) -> int:
    """Half an equal share (at least 1): an outlier layer cannot become a block on its own."""
    return max(1, num_layers // (2 * num_blocks))


def segment_profile(
    values: Sequence[float], num_blocks: int, min_size: int = 1
) -> list[tuple[int, int]]:
    """Optimal contiguous segmentation of ``values`` into ``num_blocks`` blocks.

    Args:
        values: (L,) one number per layer, already on the scale to segment.
        num_blocks: K, the number of blocks.
        min_size: smallest allowed block, in layers.

    Returns:
        K half-open ``(start, end)`` layer ranges covering ``0..L`` in order.
    """
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if x.ndim != 1 or not np.all(np.isfinite(x)):
        raise PartitionError("the profile must be a 1-D sequence of finite numbers")
    if num_blocks < 1 or min_size < 1 or num_blocks * min_size > n:
        raise PartitionError(
            f"cannot cut {n} layers into {num_blocks} blocks of at least {min_size} layers"
        )

    # Prefix sums give the squared error of any range in O(1).
    s1 = np.concatenate([[0.0], np.cumsum(x)])
    s2 = np.concatenate([[0.0], np.cumsum(x * x)])

    def sse(i: int, j: int) -> float:
        total = s1[j] - s1[i]
        return max(0.0, (s2[j] - s2[i]) - total * total / (j - i))

    equal = n / num_blocks
    # Costs closer than this count as tied; ties go to the smaller size imbalance.
    tolerance = 1e-9 * (sse(0, n) + 1e-12)
    inf = (math.inf, math.inf)
    # best[k][j]: (squared error, imbalance) of the best cut of values[:j] into k blocks.
    best = [[inf] * (n + 1) for _ in range(num_blocks + 1)]
    cut = [[0] * (n + 1) for _ in range(num_blocks + 1)]
    best[0][0] = (0.0, 0.0)
    for k in range(1, num_blocks + 1):
        for j in range(k * min_size, n - (num_blocks - k) * min_size + 1):
            for i in range((k - 1) * min_size, j - min_size + 1):
                prev = best[k - 1][i]
                if prev[0] == math.inf:
                    continue
                cost = (prev[0] + sse(i, j), prev[1] + (j - i - equal) ** 2)
                here = best[k][j]
                # Equal error and imbalance: the later cut wins, so earlier blocks are the larger
                # ones, as in partition_layers.
                if cost[0] < here[0] - tolerance or (
                    cost[0] <= here[0] + tolerance and cost[1] <= here[1] + 1e-9
                ):
                    best[k][j], cut[k][j] = cost, i

    bounds, end = [], n
    for k in range(num_blocks, 0, -1):
        start = cut[k][end]
        bounds.append((start, end))
        end = start
    return bounds[::-1]


def within_block_sse(values: Sequence[float], blocks: Sequence[Block]) -> float:
    """Sum over blocks of squared deviations of ``values`` from each block's mean."""
    x = np.asarray(values, dtype=np.float64)
    return float(sum(((x[list(b.layers)] - x[list(b.layers)].mean()) ** 2).sum() for b in blocks))


def explained_variance(values: Sequence[float], blocks: Sequence[Block]) -> float:
    """Share of the profile's variance explained by the block means (R², 0 for a flat profile)."""
    x = np.asarray(values, dtype=np.float64)
    total = float(((x - x.mean()) ** 2).sum())
    return 0.0 if total == 0 else 1.0 - within_block_sse(x, blocks) / total


def profile_blocks(
    profile: Sequence[float],
    num_blocks: int = 3,
    min_size: int | None = None,
    log_scale: bool = True,
) -> list[Block]:
    """Blocks from a per-layer profile by the module's rule, named like ``partition_layers``.

    Args:
        profile: (L,) positive per-layer values (e.g. the mean gradient norm per parameter).
        num_blocks: K; K = 3 gives ``local``, ``mid``, ``global``.
        min_size: smallest block; default ``default_min_size(L, K)``.
        log_scale: segment ``log(profile)`` (needs positive values) instead of the profile.
    """
    x = np.asarray(profile, dtype=np.float64)
    if log_scale:
        if np.any(x <= 0):
            raise PartitionError("a log-scale segmentation needs a positive profile")
        x = np.log(x)
    min_size = default_min_size(len(x), num_blocks) if min_size is None else min_size
    names = [b.name for b in partition_layers(len(x), num_blocks)]
    bounds = segment_profile(x, num_blocks, min_size)
    blocks = [Block(name, tuple(range(i, j))) for name, (i, j) in zip(names, bounds)]
    check_partition(blocks, len(x))
    return blocks


def format_maps_side_by_side(
    left: Sequence[Block], right: Sequence[Block], titles: tuple[str, str] = ("auto", "thirds")
) -> str:
    """Two block maps in columns, one row per block, e.g. ``global  21-29 (9)  20-29 (10)``."""

    def cell(block: Block | None) -> str:
        return "-" if block is None else f"{block.span} ({len(block.layers)})"

    rows = [f"{'block':>8}  {titles[0]:>12}  {titles[1]:>12}"]
    for i in range(max(len(left), len(right))):
        a = left[i] if i < len(left) else None
        b = right[i] if i < len(right) else None
        name = (a or b).name  # type: ignore[union-attr]
        rows.append(f"{name:>8}  {cell(a):>12}  {cell(b):>12}")
    return "\n".join(rows)


def auto_blocks(
    model: nn.Module,
    tokenizer,
    pairs: Sequence,
    num_blocks: int = 3,
    max_pairs: int = 32,
    max_length: int = 256,
    beta: float = 0.1,
    seed: int = 0,
    min_size: int | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> list[Block]:
    """Blocks for ``--blocks auto``: probe up to ``max_pairs`` pairs, segment the layer profile.

    ``pairs`` are ``PreferencePair`` or ``TokenizedPair``. The profile is each layer's mean
    DPO-gradient norm per parameter (``probe.layer_profile``), cut by ``profile_blocks``.
    Returns K blocks covering every layer once, in order (``local``/``mid``/``global`` for
    K = 3), and logs the map beside the equal-size map with the variance each explains.
    """
    from hialign.probe import layer_profile, probe_pairs, sample_tokenized_pairs

    tokenized, skipped = sample_tokenized_pairs(tokenizer, pairs, max_pairs, max_length, seed)
    if not tokenized:
        raise ValueError(f"no pair fits max_length {max_length} for the --blocks auto probe")
    profile = probe_pairs(model, tokenizer, tokenized, beta=beta, autocast=autocast)
    values = layer_profile(profile)
    blocks = profile_blocks(values, num_blocks, min_size)
    equal = partition_layers(len(values), num_blocks)
    logger.info(
        "--blocks auto from the DPO-gradient profile of %d pairs (%d skipped); share of the "
        "log profile's variance explained: %.2f auto, %.2f equal blocks\n%s",
        len(tokenized),
        sum(skipped.values()),
        explained_variance(np.log(values), blocks),
        explained_variance(np.log(values), equal),
        format_maps_side_by_side(blocks, equal, ("auto", "equal")),
    )
    return blocks
