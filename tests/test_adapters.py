"""Stage 2: LoRA only on the attention of the target block, verified."""

import pytest
import torch

from hialign.adapters import AdapterError, add_block_lora, verify_adapters
from hialign.partition import partition_layers
from tests.conftest import make_tiny_llama


def test_global_strategy_adapts_only_the_last_block_attention():
    model = make_tiny_llama(num_layers=6, vocab_size=64)
    peft_model, summary = add_block_lora(model, "global", partition_layers(6), rank=4, alpha=8)
    assert summary.layers == [4, 5]
    assert len(summary.modules) == 8
    assert all(".self_attn." in m for m in summary.modules)
    assert not any("mlp" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    # q,o: 32x32, k,v: 32x16 (2 KV heads x 8); LoRA r=4 adds r*(in+out) per module.
    per_layer = 4 * (32 + 32) * 2 + 4 * (32 + 16) * 2
    assert summary.trainable_params == 2 * per_layer


def test_union_strategy_and_full_count_params():
    blocks = partition_layers(6)
    _, union = add_block_lora(make_tiny_llama(6, 64), "local+global", blocks, rank=4)
    _, full = add_block_lora(make_tiny_llama(6, 64), "full", blocks, rank=4)
    assert union.layers == [0, 1, 4, 5]
    assert full.trainable_params == 3 * union.trainable_params // 2


def test_base_weights_are_frozen_and_output_unchanged_at_init():
    model = make_tiny_llama(num_layers=6, vocab_size=64)
    ids = torch.randint(0, 64, (2, 10))
    before = model(input_ids=ids).logits
    peft_model, _ = add_block_lora(model, "mid", partition_layers(6))
    assert torch.equal(peft_model(input_ids=ids).logits, before)  # LoRA B starts at zero


def test_verification_rejects_a_wrong_plan():
    model = make_tiny_llama(num_layers=6, vocab_size=64)
    peft_model, summary = add_block_lora(model, "local", partition_layers(6))
    with pytest.raises(AdapterError, match="missing"):
        verify_adapters(
            peft_model,
            [*summary.modules, "model.layers.5.self_attn.q_proj"],
            "local",
            summary.layers,
        )
