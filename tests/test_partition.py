"""Stage 1: layer partition and attention discovery."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from hialign.partition import (
    PartitionError,
    attention_modules,
    blocks_from_spans,
    check_partition,
    find_decoder_layers,
    parse_strategy,
    partition_layers,
    target_module_names,
)
from tests.conftest import make_tiny_llama


def spans(blocks):
    return [(b.name, b.layers[0], b.layers[-1]) for b in blocks]


def test_thirds_of_30_layers_are_10_10_10():
    assert spans(partition_layers(30)) == [("local", 0, 9), ("mid", 10, 19), ("global", 20, 29)]


def test_remainder_goes_to_the_first_blocks():
    assert [len(b.layers) for b in partition_layers(32)] == [11, 11, 10]
    assert [len(b.layers) for b in partition_layers(31)] == [11, 10, 10]
    assert spans(partition_layers(32)) == [("local", 0, 10), ("mid", 11, 21), ("global", 22, 31)]


@pytest.mark.parametrize("n,k", [(n, k) for n in range(1, 50) for k in range(1, 7) if k <= n])
def test_blocks_cover_every_layer_once_with_sizes_within_one(n, k):
    blocks = partition_layers(n, k)
    check_partition(blocks, n)
    sizes = [len(b.layers) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_too_many_blocks_is_an_error():
    with pytest.raises(PartitionError, match="cannot split 2 layers into 3"):
        partition_layers(2, 3)


def test_explicit_spans_must_cover_all_layers():
    assert spans(blocks_from_spans("0-4,5-19,20-29", 30))[1] == ("mid", 5, 19)
    with pytest.raises(PartitionError, match="exactly once"):
        blocks_from_spans("0-9,11-29", 30)
    with pytest.raises(PartitionError, match="START-END"):
        blocks_from_spans("0-9,x", 30)


def test_strategies_select_their_layers():
    blocks = partition_layers(30)
    assert parse_strategy("full", blocks) == list(range(30))
    assert parse_strategy("mid", blocks) == list(range(10, 20))
    assert parse_strategy("local+global", blocks) == list(range(10)) + list(range(20, 30))
    with pytest.raises(PartitionError, match="unknown block 'top'"):
        parse_strategy("top", blocks)


def test_llama_layers_and_attention_are_found():
    model = make_tiny_llama(num_layers=6, vocab_size=64)
    path, layers = find_decoder_layers(model)
    assert (path, len(layers)) == ("model.layers", 6)
    names, _ = attention_modules(model)
    assert names == [f"self_attn.{p}_proj" for p in "qkvo"]
    assert target_module_names(model, [5])[0] == "model.layers.5.self_attn.q_proj"


def test_gpt2_attention_is_not_confused_with_its_mlp():
    model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=64))
    names, path = attention_modules(model)
    assert (names, path) == (["attn.c_attn", "attn.c_proj"], "transformer.h")


def test_unknown_attention_names_what_was_found():
    model = make_tiny_llama(num_layers=3, vocab_size=64)
    for layer in model.model.layers:
        layer.self_attn.mixer = layer.self_attn.q_proj
        del layer.self_attn.q_proj
    with pytest.raises(PartitionError, match="found submodules.*self_attn.k_proj"):
        attention_modules(model)
