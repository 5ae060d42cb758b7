"""Stage 3: the DPO loss, response log-probs and the training loop."""

import contextlib
import math
import os

import pytest
import torch
from accelerate import Accelerator

from hialign.adapters import add_block_lora
from hialign.dpo import (
    TrainSettings,
    compute_logps,
    dpo_loss,
    micro_batches,
    response_logps,
    train_dpo,
)
from hialign.partition import partition_layers
from hialign.reference import cached_reference_logps, reference_key
from tests.conftest import make_tiny_llama


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: small ops stall on a thread barrier when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dpo_loss_matches_hand_computation():
    # chosen log-ratio = -1 - (-2) = 1; rejected log-ratio = -3 - (-2.5) = -0.5
    # logits = beta * (1 - (-0.5)) = 0.1 * 1.5 = 0.15; loss = -log(sigmoid(0.15))
    losses, chosen, rejected = dpo_loss(
        torch.tensor([-1.0]),
        torch.tensor([-3.0]),
        torch.tensor([-2.0]),
        torch.tensor([-2.5]),
        beta=0.1,
    )
    assert math.isclose(losses.item(), math.log(1 + math.exp(-0.15)), rel_tol=1e-6)
    assert math.isclose(chosen.item(), 0.1, rel_tol=1e-6)
    assert math.isclose(rejected.item(), -0.05, rel_tol=1e-6)


def test_loss_is_log2_when_policy_equals_reference():
    logps = torch.tensor([-5.0, -7.0])
    losses, _, _ = dpo_loss(logps, logps + 1, logps, logps + 1, beta=0.5)
    assert torch.allclose(losses, torch.full((2,), math.log(2)))


def _batch(vocab=64, rows=4, length=12, prompt=5):
    torch.manual_seed(1)
    input_ids = torch.randint(0, vocab, (rows, length))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -3:] = 0  # right padding
    loss_mask = torch.zeros_like(input_ids, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    loss_mask[attention_mask == 0] = False
    return input_ids, attention_mask, loss_mask


def test_response_logps_equal_a_sum_over_full_logits():
    model = make_tiny_llama(num_layers=2, vocab_size=64)
    input_ids, attention_mask, loss_mask = _batch()
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
    token_logps = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    expected = (token_logps * loss_mask[:, 1:]).sum(-1)
    got = response_logps(model, input_ids, attention_mask, loss_mask)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_micro_batches_are_seeded_and_cover_every_pair_each_epoch():
    settings = TrainSettings(batch_size=3, epochs=2, seed=7)
    batches = list(micro_batches(10, settings))
    assert batches == list(micro_batches(10, settings))
    for epoch in (0, 1):
        seen = sorted(i for e, b in batches if e == epoch for i in b)
        assert seen == list(range(10))
    assert settings.total_steps(10) == 8
    assert TrainSettings(batch_size=3, grad_accum=2, max_steps=3).total_steps(10) == 2


def test_training_raises_reward_accuracy_on_a_learnable_preference():
    # Chosen rows end in token 7, rejected in token 9: a preference LoRA on attention can learn.
    torch.manual_seed(0)
    model = make_tiny_llama(num_layers=3, vocab_size=32)
    peft_model, _ = add_block_lora(model, "global", partition_layers(3), rank=4, alpha=8)
    n = 8
    prompts = torch.randint(0, 32, (n, 6))
    chosen = torch.cat([prompts, torch.full((n, 2), 7)], 1)
    rejected = torch.cat([prompts, torch.full((n, 2), 9)], 1)
    loss_mask = torch.zeros(n, 8, dtype=torch.bool)
    loss_mask[:, 6:] = True

    def make_batch(indices):
        return {
            "input_ids": torch.cat([chosen[indices], rejected[indices]]),
            "attention_mask": torch.ones(2 * len(indices), 8, dtype=torch.long),
            "loss_mask": torch.cat([loss_mask[indices], loss_mask[indices]]),
        }

    with torch.no_grad(), peft_model.disable_adapter():
        full = make_batch(list(range(n)))
        logps = response_logps(peft_model, **full)
    reference = torch.stack([logps[:n], logps[n:]], 1)
    settings = TrainSettings(beta=0.5, learning_rate=3e-2, batch_size=4, epochs=10, warmup_steps=0)
    history = train_dpo(
        peft_model, make_batch, reference, settings, Accelerator(cpu=True), contextlib.nullcontext
    )
    assert len(history) == 20
    assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-4)
    assert history[-1]["loss"] < 0.45
    assert history[-1]["reward_accuracy"] == 1.0
    trained = [p for n_, p in peft_model.named_parameters() if "lora_B" in n_]
    assert all(p.abs().sum() > 0 for p in trained)


def _tiny_batches(n_batches=2, pairs=2, vocab=64):
    batches = []
    for b in range(n_batches):
        torch.manual_seed(10 + b)
        prompt = torch.randint(0, vocab, (pairs, 5))
        replies = torch.randint(0, vocab, (2 * pairs, 4))
        batches.append(
            {
                "input_ids": torch.cat([torch.cat([prompt, prompt]), replies], 1),
                "attention_mask": torch.ones(2 * pairs, 9, dtype=torch.long),
                "loss_mask": torch.arange(9).expand(2 * pairs, 9) >= 5,
            }
        )
    return batches


def test_reference_key_changes_when_model_data_or_max_length_changes(tmp_path):
    folder_a, folder_b = tmp_path / "a", tmp_path / "b"
    make_tiny_llama(num_layers=2, vocab_size=64, seed=0).save_pretrained(folder_a)
    make_tiny_llama(num_layers=2, vocab_size=64, seed=1).save_pretrained(folder_b)
    ids = [[[1, 2, 3], [4, 5], [6]], [[7, 8], [9], [10, 11]]]

    key = reference_key(str(folder_a), ids, "fp32", max_length=256)
    assert key == reference_key(str(folder_a), ids, "fp32", max_length=256)
    others = {
        "other model": reference_key(str(folder_b), ids, "fp32", max_length=256),
        "other data": reference_key(str(folder_a), [ids[0], [[7, 8], [9], [10]]], "fp32", 256),
        "fewer pairs": reference_key(str(folder_a), ids[:1], "fp32", max_length=256),
        "other max length": reference_key(str(folder_a), ids, "fp32", max_length=512),
        "other precision": reference_key(str(folder_a), ids, "bf16", max_length=256),
    }
    assert len({key, *others.values()}) == 1 + len(others), others

    weights = folder_a / "model.safetensors"
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # weights rewritten
    assert reference_key(str(folder_a), ids, "fp32", max_length=256) != key


def test_cached_reference_log_probs_are_reused_and_give_the_recomputed_loss(tmp_path, monkeypatch):
    monkeypatch.setenv("HIALIGN_CACHE", str(tmp_path))
    model = make_tiny_llama(num_layers=2, vocab_size=64)
    batches = _tiny_batches()
    calls = []

    def compute():
        calls.append(1)
        return compute_logps(model, batches, contextlib.nullcontext)

    first, cached_first = cached_reference_logps("k" * 32, compute)
    again, cached_again = cached_reference_logps("k" * 32, compute)
    assert (cached_first, cached_again, len(calls)) == (False, True, 1)
    assert first.shape == (4, 2)

    policy = torch.tensor([[-30.0, -31.0], [-29.0, -33.0], [-28.0, -30.0], [-35.0, -32.0]])
    recomputed = compute_logps(model, batches, contextlib.nullcontext)
    cached_loss = dpo_loss(policy[:, 0], policy[:, 1], again[:, 0], again[:, 1], 0.1)[0]
    fresh_loss = dpo_loss(policy[:, 0], policy[:, 1], recomputed[:, 0], recomputed[:, 1], 0.1)[0]
    torch.testing.assert_close(cached_loss, fresh_loss, rtol=0, atol=0)


def test_reference_log_probs_of_the_shared_prompt_pass_equal_the_collated_ones():
    model = make_tiny_llama(num_layers=2, vocab_size=64)
    batches = _tiny_batches()
    shared = compute_logps(model, batches, contextlib.nullcontext, share_prompt=True)
    collated = compute_logps(model, batches, contextlib.nullcontext, share_prompt=False)
    torch.testing.assert_close(shared, collated, rtol=1e-5, atol=1e-5)
