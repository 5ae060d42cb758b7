"""Data-driven partition: optimal contiguous segmentation of a per-layer profile."""

import itertools

import numpy as np
import pytest

from hialign.data import PreferencePair
from hialign.partition import PartitionError, check_partition, parse_strategy, partition_layers
from hialign.segmentation import (
    auto_blocks,
    default_min_size,
    explained_variance,
    format_maps_side_by_side,
    profile_blocks,
    segment_profile,
)
from tests.conftest import make_tiny_llama


def sizes(bounds):
    return [j - i for i, j in bounds]


def brute_force_sse(values, k, min_size):
    """Smallest within-block squared error over every contiguous cut, by enumeration."""
    n, best = len(values), np.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        edges = (0, *cuts, n)
        if min(b - a for a, b in zip(edges, edges[1:])) < min_size:
            continue
        sse = sum(((values[a:b] - values[a:b].mean()) ** 2).sum() for a, b in zip(edges, edges[1:]))
        best = min(best, sse)
    return best


def test_step_profile_is_cut_at_its_steps():
    profile = [1.0] * 7 + [5.0] * 13 + [2.0] * 10
    assert segment_profile(profile, 3) == [(0, 7), (7, 20), (20, 30)]
    assert segment_profile(np.log(profile), 3) == [(0, 7), (7, 20), (20, 30)]


def test_flat_profile_gives_the_equal_partition():
    for n in (30, 32, 31):
        bounds = segment_profile([2.5] * n, 3)
        assert sizes(bounds) == [len(b.layers) for b in partition_layers(n, 3)]


@pytest.mark.parametrize("seed", range(8))
def test_segmentation_matches_brute_force_minimum(seed):
    rng = np.random.default_rng(seed)
    values = rng.lognormal(size=11)
    for k, min_size in [(2, 1), (3, 1), (3, 2), (4, 2)]:
        bounds = segment_profile(values, k, min_size)
        sse = sum(((values[a:b] - values[a:b].mean()) ** 2).sum() for a, b in bounds)
        assert sse == pytest.approx(brute_force_sse(values, k, min_size), rel=1e-9, abs=1e-12)
        assert min(sizes(bounds)) >= min_size and bounds[0][0] == 0 and bounds[-1][1] == 11


def test_min_size_stops_a_spike_layer_becoming_a_block():
    profile = [50.0] + [1.0] * 14 + [3.0] * 15
    assert segment_profile(profile, 3, min_size=1)[0] == (0, 1)
    assert segment_profile(profile, 3, min_size=5) == [(0, 5), (5, 15), (15, 30)]
    assert default_min_size(30, 3) == 5
    assert default_min_size(4, 3) == 1


def test_log_scale_cuts_at_the_tenfold_dip_not_at_the_largest_layer():
    profile = [100.0] + [10.0] * 5 + [1.0] * 6
    linear = profile_blocks(profile, 2, min_size=1, log_scale=False)
    logged = profile_blocks(profile, 2, min_size=1, log_scale=True)
    assert [b.layers for b in linear] == [(0,), tuple(range(1, 12))]
    assert [b.layers for b in logged] == [tuple(range(6)), tuple(range(6, 12))]


def test_profile_blocks_are_named_and_cover_every_layer_once():
    blocks = profile_blocks([3.0] * 8 + [1.0] * 12 + [0.5] * 10, 3)
    assert [(b.name, b.span) for b in blocks] == [
        ("local", "0-7"),
        ("mid", "8-19"),
        ("global", "20-29"),
    ]
    check_partition(blocks, 30)
    assert [b.name for b in profile_blocks([1.0, 2.0, 3.0, 4.0], 2)] == ["block0", "block1"]


def test_impossible_segmentations_are_refused():
    with pytest.raises(PartitionError):
        segment_profile([1.0, 2.0], 3)
    with pytest.raises(PartitionError):
        segment_profile([1.0] * 10, 3, min_size=4)
    with pytest.raises(PartitionError):
        profile_blocks([1.0, 0.0, 2.0], 2)  # log of zero
    with pytest.raises(PartitionError):
        segment_profile([1.0, float("nan"), 2.0], 2)


def test_explained_variance_is_one_for_the_true_steps_and_zero_when_flat():
    profile = np.array([1.0] * 7 + [5.0] * 13 + [2.0] * 10)
    exact = profile_blocks(profile, 3, log_scale=False)
    assert explained_variance(profile, exact) == pytest.approx(1.0)
    # Equal thirds mix the 1s and 5s in block 0 and the 5s and 2s in block 1.
    assert explained_variance(profile, partition_layers(30, 3)) < 0.9
    assert explained_variance([2.0] * 6, partition_layers(6, 3)) == 0.0


def test_maps_are_printed_side_by_side():
    auto = profile_blocks([3.0] * 8 + [1.0] * 12 + [0.5] * 10, 3)
    text = format_maps_side_by_side(auto, partition_layers(30, 3))
    assert text.splitlines() == [
        "   block          auto        thirds",
        "   local       0-7 (8)      0-9 (10)",
        "     mid     8-19 (12)    10-19 (10)",
        "  global    20-29 (10)    20-29 (10)",
    ]


def test_blocks_auto_feeds_the_trainer_a_partition_covering_every_layer_once(tokenizer):
    from hialign.adapters import add_block_lora

    model = make_tiny_llama(num_layers=7)
    pairs = [
        PreferencePair(
            ({"role": "user", "content": f"Question {i}: what is {i} plus {i}?"},),
            f"It is {2 * i}, since adding {i} twice doubles it.",
            f"I would rather not say what {i} and {i} make.",
            f"synthetic:{i}",
        )
        for i in range(6)
    ]
    blocks = auto_blocks(model, tokenizer, pairs, num_blocks=3, max_pairs=4, max_length=64)

    check_partition(blocks, 7)
    assert [b.name for b in blocks] == ["local", "mid", "global"]
    assert [layer for b in blocks for layer in b.layers] == list(range(7))
    trained = []
    for block in blocks:
        peft_model, summary = add_block_lora(make_tiny_llama(num_layers=7), block.name, blocks)
        assert summary.layers == list(block.layers)
        trained += summary.layers
    assert sorted(trained) == list(range(7))
    assert parse_strategy("full", blocks) == list(range(7))
