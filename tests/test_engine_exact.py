"""The DPO engine's savings give the plain path's losses and LoRA gradients (rtol 1e-4)."""

import contextlib

import pytest
import torch
from accelerate import Accelerator

from hialign.adapters import add_block_lora
from hialign.data import load_preferences, tokenize_pairs
from hialign.dpo import TrainSettings, compute_logps, dpo_loss, response_logps, train_dpo
from hialign.head_logps import head_logps
from hialign.partition import find_decoder_layers, partition_layers
from hialign.prefix_cache import FrozenPrefixCache, first_trainable_layer
from hialign.scoring import PairScorer
from hialign.shared_prompt import pair_sequences
from hialign.tokenization import collate_pairs
from tests.conftest import make_tiny_llama

RTOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One thread: the tiny model's many small ops stall on a thread barrier when the two cores
    are shared with other work (measured 1.3 s vs 0.03 s for one forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def hh_pairs(tokenizer, hh_path):
    """Eight real hh-rlhf pairs through SmolLM2's chat template, fitted to 256 tokens."""
    pairs = load_preferences(str(hh_path)).pairs[:10]
    tokenized, _ = tokenize_pairs(tokenizer, pairs, max_length=256)
    return tokenized[:8]


def _lora_model(model, strategy="global", seed=0):
    """``model`` with LoRA on ``strategy``'s layers, B made non-zero so every LoRA weight gets a
    gradient (with B = 0, as initialised, A's gradient is zero)."""
    num_layers = len(find_decoder_layers(model)[1])
    torch.manual_seed(seed)
    peft_model, _ = add_block_lora(model, strategy, partition_layers(num_layers), rank=4, alpha=8)
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    return peft_model


def _loss_and_grads(peft_model, score):
    """DPO loss of ``score()`` (chosen, rejected) against a fixed reference, and LoRA grads."""
    peft_model.zero_grad(set_to_none=True)
    chosen, rejected = score()
    reference = torch.stack([chosen, rejected]).detach() - 0.5  # any fixed reference will do
    losses, _, _ = dpo_loss(chosen, rejected, reference[0], reference[1], beta=0.1)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
    return losses.detach(), torch.cat([chosen, rejected]).detach(), grads


def _assert_same(result, expected):
    losses, logps, grads = result
    torch.testing.assert_close(losses, expected[0], rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(logps, expected[1], rtol=RTOL, atol=1e-4)
    assert grads.keys() == expected[2].keys() and grads
    for name, grad in grads.items():
        scale = expected[2][name].abs().max()
        assert scale > 0, f"{name} got no gradient"
        torch.testing.assert_close(grad, expected[2][name], rtol=RTOL, atol=RTOL * scale)


def _plain(peft_model, batch):
    def score():
        logps = response_logps(
            peft_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        return logps.chunk(2)

    return _loss_and_grads(peft_model, score)


def test_head_logps_and_its_gradient_equal_autograd_through_full_logits():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 1000, bias=False).requires_grad_(False)
    hidden = torch.randn(700, 16, requires_grad=True)  # over one chunk of 16.7 M logits
    targets = torch.randint(0, 1000, (700,))
    weights = torch.randn(700)

    got = head_logps(hidden, head, targets)
    (got * weights).sum().backward()
    got_grad, hidden.grad = hidden.grad, None
    expected = torch.log_softmax(head(hidden), -1).gather(1, targets[:, None])[:, 0]
    (expected * weights).sum().backward()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, hidden.grad, rtol=1e-5, atol=1e-6)


def test_each_pair_is_one_sequence_holding_its_prompt_once(hh_pairs):
    batch = collate_pairs(hh_pairs[:4], pad_token_id=0)
    sequences = pair_sequences(batch)
    assert [s.length for s in sequences] == [
        len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in hh_pairs[:4]
    ]
    assert sum(s.targets.numel() for s in sequences) == int(batch["loss_mask"].sum())
    first, seq = hh_pairs[0], sequences[0]
    p, c = len(first.prompt_ids), len(first.chosen_ids)
    assert seq.input_ids[0].tolist() == [*first.prompt_ids, *first.chosen_ids, *first.rejected_ids]
    assert seq.position_ids[0, p + c].item() == p  # rejected restarts after the prompt
    assert seq.source[c].item() == p - 1  # both replies' first token: the prompt's last position
    allowed = seq.allowed()[0]
    assert not allowed[p + c, p : p + c].any()  # rejected never sees chosen
    assert allowed[p + c, :p].all() and allowed[p + c, p + c]


def test_one_prompt_pass_gives_the_plain_loss_and_lora_gradients(hh_pairs):
    peft_model = _lora_model(make_tiny_llama(num_layers=3), strategy="full")
    batch = collate_pairs(hh_pairs[:4], pad_token_id=0)
    scorer = PairScorer(peft_model, share_prompt=True)
    _assert_same(_loss_and_grads(peft_model, lambda: scorer(batch)), _plain(peft_model, batch))


def test_frozen_prefix_loss_and_lora_gradients_equal_plain_path_on_tiny_llama(hh_pairs):
    peft_model = _lora_model(make_tiny_llama(num_layers=6), strategy="global")
    batch = collate_pairs(hh_pairs[:4], pad_token_id=0)
    expected = _plain(peft_model, batch)
    for share_prompt in (False, True):
        cache = FrozenPrefixCache(peft_model)
        scorer = PairScorer(peft_model, share_prompt=share_prompt, prefix_cache=cache)
        assert cache.start == 4 and scorer.prefix is cache
        for _ in range(2):  # the first call fills the cache, the second reads it
            result = _loss_and_grads(peft_model, lambda s=scorer: s(batch, [0, 1, 2, 3]))
            _assert_same(result, expected)
        assert cache.hits == cache.misses == (4 if share_prompt else 8)


@pytest.mark.slow
def test_frozen_prefix_loss_and_lora_gradients_equal_plain_path_on_smollm2(smollm2_path, hh_pairs):
    from hialign.modeling import load_model

    model, _, _ = load_model(smollm2_path)
    peft_model = _lora_model(model, strategy="global")
    batch = collate_pairs(hh_pairs[4:6], pad_token_id=0)
    expected = _plain(peft_model, batch)
    scorer = PairScorer(peft_model, prefix_cache=FrozenPrefixCache(peft_model))
    assert scorer.share_prompt and scorer.prefix.start == 20
    for _ in range(2):
        _assert_same(_loss_and_grads(peft_model, lambda: scorer(batch, [4, 5])), expected)


def test_frozen_prefix_skips_only_layers_below_every_adapter():
    blocks = partition_layers(6)
    starts = {}
    for strategy in ("full", "local", "mid", "global", "local+global", "mid+global"):
        peft_model, _ = add_block_lora(make_tiny_llama(num_layers=6), strategy, blocks, rank=2)
        starts[strategy] = first_trainable_layer(peft_model)
    assert starts == {
        "full": 0,
        "local": 0,
        "mid": 2,
        "global": 4,
        "local+global": 0,
        "mid+global": 2,
    }
    assert not FrozenPrefixCache(add_block_lora(make_tiny_llama(6), "full", blocks)[0]).active


def test_prefix_cache_keeps_rows_within_its_budget_and_recomputes_the_rest(hh_pairs):
    peft_model = _lora_model(make_tiny_llama(num_layers=6), strategy="global")
    batch = collate_pairs(hh_pairs[:4], pad_token_id=0)
    expected = _plain(peft_model, batch)
    row_bytes = [32 * 4 * s.length for s in pair_sequences(batch)]  # hidden 32, fp32
    budget = sum(row_bytes[:2])
    cache = FrozenPrefixCache(peft_model, max_bytes=budget)
    scorer = PairScorer(peft_model, prefix_cache=cache)
    for _ in range(2):
        _assert_same(_loss_and_grads(peft_model, lambda: scorer(batch, [0, 1, 2, 3])), expected)
    assert sorted(cache.store) == [(0, "pair"), (1, "pair")]
    assert cache.bytes == budget
    assert (cache.hits, cache.misses) == (2, 6)


def test_scorer_falls_back_to_the_plain_path_when_a_saving_disagrees(hh_pairs, monkeypatch):
    peft_model = _lora_model(make_tiny_llama(num_layers=6), strategy="global")
    batch = collate_pairs(hh_pairs[:4], pad_token_id=0)
    scorer = PairScorer(peft_model, prefix_cache=FrozenPrefixCache(peft_model))
    real_replaying = FrozenPrefixCache.replaying

    def broken_replaying(self, hidden):  # an architecture that changes states between layers
        return real_replaying(self, hidden * 2)

    monkeypatch.setattr(FrozenPrefixCache, "replaying", broken_replaying)
    assert scorer.verify(batch) is False
    assert scorer.share_prompt and scorer.prefix is None
    _assert_same(
        _loss_and_grads(peft_model, lambda: scorer(batch, [0, 1, 2, 3])), _plain(peft_model, batch)
    )


def test_one_prompt_pass_works_with_eager_attention(hh_pairs):
    model = make_tiny_llama(num_layers=3)
    model.set_attn_implementation("eager")
    peft_model = _lora_model(model, strategy="full")
    batch = collate_pairs(hh_pairs[:2], pad_token_id=0)
    scorer = PairScorer(peft_model)
    assert scorer.verify(batch) and scorer.share_prompt
    _assert_same(_loss_and_grads(peft_model, lambda: scorer(batch)), _plain(peft_model, batch))


def test_training_with_the_savings_follows_the_plain_trajectory(hh_pairs):
    def train(record=False, **savings):
        peft_model = _lora_model(make_tiny_llama(num_layers=6), strategy="global")
        batches = [collate_pairs(hh_pairs[i : i + 4], 0) for i in range(0, len(hh_pairs), 4)]
        states = {4: {}} if record else None
        with peft_model.disable_adapter():
            reference = compute_logps(
                peft_model, batches, contextlib.nullcontext, prefix_states=states
            )
        settings = TrainSettings(batch_size=4, epochs=2, warmup_steps=0, **savings)
        history = train_dpo(
            peft_model,
            lambda idx: collate_pairs([hh_pairs[i] for i in idx], 0),
            reference,
            settings,
            Accelerator(cpu=True),
            contextlib.nullcontext,
            prefix_states=states,
        )
        return torch.tensor([h["loss"] for h in history]), states

    plain, _ = train(share_prompt=False, frozen_prefix=False)
    fast, _ = train(share_prompt=True, frozen_prefix=True)
    recorded, states = train(record=True, verify_engine=False)  # no capture before replay
    assert len(plain) == 4 and len(set(plain.tolist())) == 4
    torch.testing.assert_close(fast, plain, rtol=RTOL, atol=1e-6)
    torch.testing.assert_close(recorded, plain, rtol=RTOL, atol=1e-6)
    assert sorted(states[4]) == [(i, "pair") for i in range(len(hh_pairs))]


def test_reference_pass_records_the_states_the_prefix_cache_would_capture(hh_pairs):
    peft_model = _lora_model(make_tiny_llama(num_layers=6), strategy="global")
    batch = collate_pairs(hh_pairs[:2], pad_token_id=0)
    states = {4: {}, 2: {}}
    with torch.no_grad():
        compute_logps(peft_model, [batch], contextlib.nullcontext, prefix_states=states)
        cache = FrozenPrefixCache(peft_model)
        scorer = PairScorer(peft_model, prefix_cache=cache)
        scorer(batch, keys=[0, 1])
    assert cache.start == 4 and sorted(states[2]) == sorted(states[4]) == sorted(cache.store)
    for key, row in cache.store.items():
        torch.testing.assert_close(states[4][key], row, rtol=1e-6, atol=1e-6)
    assert states[2][(0, "pair")].shape == cache.store[(0, "pair")].shape


def test_frozen_weights_held_in_bf16_give_identical_autocast_results_and_come_back(hh_pairs):
    from hialign.dpo import _frozen_weights_in_autocast_dtype

    peft_model = _lora_model(make_tiny_llama(num_layers=3), strategy="full")
    batch = collate_pairs(hh_pairs[:2], pad_token_id=0)
    scorer = PairScorer(peft_model)
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    with torch.no_grad(), bf16():
        expected = torch.cat(scorer(batch))
    with _frozen_weights_in_autocast_dtype(peft_model, bf16):
        assert (
            peft_model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
        )
        with torch.no_grad(), bf16():
            got = torch.cat(scorer(batch))
    assert torch.equal(got, expected)
    for name, param in peft_model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name
