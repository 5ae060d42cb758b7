"""Hypothesis-2 probe: per-pair DPO gradient norms, block statistics, verdict and the command."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from hialign.partition import Block, partition_layers
from hialign.probe import (
    GradientProfile,
    attention_weight_modules,
    layer_profile,
    probe_pairs,
    summarise,
    verdict_sentence,
)
from hialign.tokenization import TokenizedPair
from tests.conftest import make_tiny_llama

BETA = 0.1


class PadZero:
    pad_token_id = 0


def random_pairs(count: int, vocab: int = 500, seed: int = 0) -> list[TokenizedPair]:
    """Pairs of random ids with different prompt and response lengths (padding is exercised)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return tuple(torch.randint(1, vocab, (n,), generator=g).tolist())

    return [
        TokenizedPair(ids(4 + i), ids(3 + 2 * i), ids(9 - i), f"pair:{i}") for i in range(count)
    ]


def sequence_logp(model, prompt: tuple[int, ...], response: tuple[int, ...]) -> torch.Tensor:
    """log π(response | prompt) from the model's full logits, independent of hialign's code."""
    ids = torch.tensor([prompt + response])
    logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
    positions = torch.arange(len(prompt) - 1, ids.shape[1] - 1)
    return logps[positions, ids[0, positions + 1]].sum()


def direct_layer_sq_norms(model, pair: TokenizedPair, beta: float = BETA) -> torch.Tensor:
    """(L,) ‖∂ℓ/∂W‖² per layer by plain autograd on one unpadded pair,
    weights as the leaves."""
    chosen = sequence_logp(model, pair.prompt_ids, pair.chosen_ids)
    rejected = sequence_logp(model, pair.prompt_ids, pair.rejected_ids)
    ref_chosen, ref_rejected = chosen.detach(), rejected.detach()
    loss = -torch.nn.functional.logsigmoid(
        beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    ).sum()
    layers = attention_weight_modules(model)
    weights = [module.weight for layer in layers for _, module in layer]
    grads = torch.autograd.grad(loss, weights)
    per_weight = torch.stack([g.double().pow(2).sum() for g in grads])
    return per_weight.view(len(layers), -1).sum(1)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_per_layer_norms_match_direct_autograd_on_the_tiny_model(batch_size):
    model = make_tiny_llama(num_layers=5, vocab_size=500)
    pairs = random_pairs(5)
    profile = probe_pairs(model, PadZero, pairs, beta=BETA, batch_size=batch_size)

    expected = torch.stack([direct_layer_sq_norms(model, p) for p in pairs]).numpy()
    assert profile.sq_norms.shape == (5, 5)
    np.testing.assert_allclose(profile.sq_norms, expected, rtol=1e-4)
    assert profile.sources == [p.source for p in pairs]
    np.testing.assert_allclose(profile.losses, math.log(2), rtol=1e-6)
    # q 32x32, k 16x32, v 16x32, o 32x32 (4 heads of 8, 2 KV heads)
    assert profile.layer_params.tolist() == [3072] * 5
    assert profile.projections == [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
    ]


def test_bf16_autocast_norms_stay_close_to_fp32():
    model = make_tiny_llama(num_layers=4, vocab_size=500)
    pairs = random_pairs(4)
    fp32 = probe_pairs(model, PadZero, pairs, batch_size=2)
    bf16 = probe_pairs(
        model, PadZero, pairs, batch_size=2, autocast=lambda: torch.autocast("cpu", torch.bfloat16)
    )
    np.testing.assert_allclose(np.sqrt(bf16.sq_norms), np.sqrt(fp32.sq_norms), rtol=0.05)


def test_gradient_at_start_is_half_beta_times_the_log_ratio_difference_gradient():
    model = make_tiny_llama(num_layers=3, vocab_size=500)
    pair = random_pairs(1, seed=3)[0]
    profile = probe_pairs(model, PadZero, [pair], beta=0.5)

    chosen = sequence_logp(model, pair.prompt_ids, pair.chosen_ids)
    rejected = sequence_logp(model, pair.prompt_ids, pair.rejected_ids)
    weights = [m.weight for layer in attention_weight_modules(model) for _, m in layer]
    grads = torch.autograd.grad((chosen - rejected).sum(), weights)
    per_layer = torch.stack([g.double().pow(2).sum() for g in grads]).view(3, -1).sum(1)
    np.testing.assert_allclose(profile.sq_norms[0], (0.5 / 2) ** 2 * per_layer.numpy(), rtol=1e-4)


def test_probe_leaves_a_frozen_model_unchanged():
    model = make_tiny_llama(num_layers=3, vocab_size=500)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    profile = probe_pairs(model, PadZero, random_pairs(3), beta=BETA, batch_size=2)

    assert np.all(profile.sq_norms > 0)
    assert model.training
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


def synthetic_profile(block_sq: list[list[float]], layers_per_block: int = 2) -> GradientProfile:
    """Pairs whose squared norm is spread evenly over the layers of each block."""
    rows = [
        [v / layers_per_block for v in pair for _ in range(layers_per_block)] for pair in block_sq
    ]
    n_layers = len(block_sq[0]) * layers_per_block
    return GradientProfile(
        sq_norms=np.array(rows, dtype=np.float64),
        layer_params=np.full(n_layers, 4),
        losses=np.full(len(rows), math.log(2)),
        sources=[f"s{i}" for i in range(len(rows))],
        projections=["q", "k"],
        beta=BETA,
    )


def test_block_norms_raw_and_per_parameter_match_hand_computation():
    # Blocks of 2 layers x 4 params = 8 params; squared norms 2, 8, 18 for every pair.
    profile = synthetic_profile([[2.0, 8.0, 18.0]] * 12)
    blocks = partition_layers(6, 3)
    summary = summarise(profile, blocks, n_boot=200)

    raw = [b["raw"] for b in summary["blocks"]]
    per_param = [b["normalised"] for b in summary["blocks"]]
    assert raw == pytest.approx([math.sqrt(2), math.sqrt(8), math.sqrt(18)])
    assert per_param == pytest.approx([0.5, 1.0, 1.5])
    assert [b["share"] for b in summary["blocks"]] == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert summary["layers"][0]["raw"] == pytest.approx(1.0)
    assert summary["layers"][0]["normalised"] == pytest.approx(0.5)
    assert summary["top_block"] == "global" and summary["runner_up"] == "mid"
    assert summary["concentration_ratio"] == pytest.approx(1.5 / 0.75)
    assert summary["dominance_ratio"] == pytest.approx(1.5)
    # Identical pairs: every resample gives the same means, so the intervals collapse.
    assert summary["dominance_ratio_ci"] == pytest.approx([1.5, 1.5])
    assert summary["blocks"][2]["normalised_ci"] == pytest.approx([1.5, 1.5])
    assert summary["verdict"] is True


def test_normalisation_makes_blocks_of_different_sizes_comparable():
    # Every layer has the same per-parameter gradient; blocks of 1, 2 and 3 layers.
    profile = GradientProfile(
        sq_norms=np.full((20, 6), 4.0 * 9),
        layer_params=np.full(6, 9),
        losses=np.zeros(20),
        sources=[""] * 20,
        projections=["q"],
        beta=BETA,
    )
    blocks = [Block("a", (0,)), Block("b", (1, 2)), Block("c", (3, 4, 5))]
    summary = summarise(profile, blocks, n_boot=100)
    assert [b["raw"] for b in summary["blocks"]] == pytest.approx([6, 6 * 2**0.5, 6 * 3**0.5])
    assert [b["normalised"] for b in summary["blocks"]] == pytest.approx([2.0, 2.0, 2.0])
    assert summary["verdict"] is False


def test_two_equally_strong_blocks_do_not_hold_the_hypothesis():
    rng = np.random.default_rng(0)
    mid_and_global = rng.lognormal(size=(200, 2)) * 10
    profile = synthetic_profile([[1.0, m, g] for m, g in mid_and_global])
    summary = summarise(profile, partition_layers(6, 3), n_boot=1000, seed=1)
    assert summary["concentration_ratio_ci"][0] > 1  # beats the mean of the others...
    assert summary["dominance_ratio_ci"][0] < 1 < summary["dominance_ratio_ci"][1]
    assert summary["verdict"] is False  # ...but not the runner-up
    sentence = verdict_sentence(summary, "tiny", "synthetic", "all")
    assert sentence.startswith("Hypothesis 2 did not hold at 95% confidence on tiny with 200")


def test_clear_concentration_holds_and_is_said_plainly():
    rng = np.random.default_rng(0)
    noise = rng.lognormal(sigma=0.3, size=(60, 3))
    profile = synthetic_profile((noise * [1.0, 1.0, 9.0]).tolist())
    summary = summarise(profile, partition_layers(6, 3), n_boot=1000)
    assert summary["verdict"] is True
    assert summary["dominance_ratio_ci"][0] > 2
    sentence = verdict_sentence(summary, "tiny", "synthetic", "all")
    assert "Hypothesis 2 held on tiny with 60 pairs of synthetic (all)" in sentence
    assert "global (layers 4-5)" in sentence


def test_too_few_pairs_give_no_verdict():
    profile = synthetic_profile([[1.0, 1.0, 9.0]] * 4)
    summary = summarise(profile, partition_layers(6, 3), n_boot=50)
    assert summary["verdict"] is None and summary["top_block"] == "global"
    assert verdict_sentence(summary, "m", "d", "all").startswith("No verdict")


def test_layer_profile_is_mean_norm_per_parameter():
    profile = synthetic_profile([[2.0, 8.0, 18.0], [8.0, 8.0, 18.0]])
    # Layer 0: squared norms 1 and 4, norms 1 and 2, mean 1.5, per parameter 1.5 / sqrt(4).
    assert layer_profile(profile) == pytest.approx([0.75, 0.75, 1.0, 1.0, 1.5, 1.5])


def write_tagged_rows(path, count: int = 24) -> None:
    rows = []
    for i in range(count):
        topic = "fact" if i % 2 else "style"
        rows.append(
            dict(
                prompt=f"Tell me about the capital of country number {i}."
                if topic == "fact"
                else f"Rewrite sentence {i} politely.",
                chosen=f"Here is a careful answer number {i}, stated plainly and kindly.",
                rejected=f"No. Figure out item {i} yourself, I will not help with it.",
                category=topic,
            )
        )
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_probe_command_writes_plot_table_and_sentence(tmp_path, tokenizer):
    from hialign.cli import add_probe_arguments
    from hialign.probe_report import probe_command

    model_dir = tmp_path / "tiny"
    make_tiny_llama(num_layers=6).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = tmp_path / "tagged.jsonl"
    write_tagged_rows(data)
    parser = argparse.ArgumentParser()
    add_probe_arguments(parser)
    out = tmp_path / "probe"
    args = parser.parse_args(
        ["--model", str(model_dir), "--data", str(data), "--pairs", "24", "--out", str(out)]
        + ["--tag-column", "category", "--subset", "capital=capital", "--bootstrap", "300"]
        + ["--precision", "fp32", "--max-length", "96"]
    )

    assert probe_command(args) == 0

    result = json.loads((out / "probe.json").read_text())
    assert set(result["groups"]) == {"all", "tag=fact", "tag=style", "capital"}
    assert result["groups"]["tag=fact"]["n_pairs"] == 12
    assert result["groups"]["capital"]["n_pairs"] == 12
    assert [b["layers"] for b in result["blocks"]] == [[0, 1], [2, 3], [4, 5]]
    summary = result["groups"]["all"]
    assert summary["n_pairs"] == 24 and len(summary["layers"]) == 6
    assert summary["verdict"] in (True, False)
    assert len(result["per_pair"]["layer_sq_norms"]) == 24
    report = (out / "probe.md").read_text()
    assert summary["sentence"] in report
    assert "Rule: Hypothesis 2 holds" in report
    assert "| local | 0-1 |" in report and "Concentration ratio" in report
    assert (out / "per_layer.png").read_bytes()[:4] == b"\x89PNG"


def test_objective_groups_split_pairs_by_tag_column_and_prompt_regex():
    from hialign.data import PreferencePair
    from hialign.probe_report import objective_groups

    def pair(i, text):
        return PreferencePair(({"role": "user", "content": text},), "yes", "no", f"d.jsonl:{i}")

    pairs = [pair(1, "Who wrote Hamlet?"), pair(2, "Make this polite"), pair(3, "Where is Rome?")]
    tags = {"d.jsonl:1": "fact", "d.jsonl:3": "fact", "d.jsonl:2": "style"}
    groups = objective_groups(pairs, tags, ["questions=\\b(who|where)\\b", "none=zebra"])
    assert groups == {
        "all": [0, 1, 2],
        "tag=fact": [0, 2],
        "tag=style": [1],
        "questions": [0, 2],
        "none": [],
    }
    with pytest.raises(ValueError, match="NAME=REGEX"):
        objective_groups(pairs, None, ["no-pattern"])


@pytest.mark.slow
def test_probe_on_smollm2_with_hh_rlhf_rows_writes_the_report(tmp_path, hh_path):
    from hialign.cli import add_probe_arguments
    from hialign.probe_report import probe_command

    parser = argparse.ArgumentParser()
    add_probe_arguments(parser)
    out = tmp_path / "probe"
    args = parser.parse_args(
        ["--data", str(hh_path), "--pairs", "4", "--max-length", "128", "--out", str(out)]
    )
    assert probe_command(args) == 0

    result = json.loads((out / "probe.json").read_text())
    assert result["model"] == "SmolLM2-135M-Instruct"
    assert [b["layers"] for b in result["blocks"]] == [[0, 9], [10, 19], [20, 29]]
    assert len(result["groups"]["all"]["layers"]) == 30
    np.testing.assert_allclose(result["per_pair"]["losses"], math.log(2), rtol=1e-6)
    assert "No verdict" in result["groups"]["all"]["sentence"]  # 4 pairs are too few
    assert (out / "per_layer.png").is_file() and (out / "probe.md").is_file()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pairs", "0"], "--pairs must be >= 2, got 0"),
        (["--bootstrap", "0"], "--bootstrap must be >= 1"),
        (["--beta", "0"], "--beta must be > 0"),
        (["--subset", "x=("], r"--subset 'x=\(': bad regular expression"),
        (["--subset", "foo"], "not of the form NAME=REGEX"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ],
)
def test_bad_probe_flags_are_refused_before_anything_loads(tmp_path, flags, message):
    from hialign.cli import add_probe_arguments
    from hialign.probe_report import run_probe

    parser = argparse.ArgumentParser()
    add_probe_arguments(parser)
    missing = tmp_path / "never-read.jsonl"  # would fail differently if it were read
    args = parser.parse_args(["--data", str(missing), "--out", str(tmp_path / "p"), *flags])
    with pytest.raises(ValueError, match=message):
        run_probe(args)
    assert not (tmp_path / "p").exists()


def test_a_tag_column_no_row_has_is_refused_up_front(tmp_path):
    from hialign.cli import add_probe_arguments
    from hialign.probe_report import run_probe

    data = tmp_path / "tagged.jsonl"
    write_tagged_rows(data)
    parser = argparse.ArgumentParser()
    add_probe_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--out", str(tmp_path / "p")])
    args.tag_column = "categroy"
    with pytest.raises(ValueError, match="--tag-column 'categroy': no row of .* has that column"):
        run_probe(args)


def test_intervals_without_a_bootstrap_read_n_a_not_nan():
    from hialign.probe_report import _fmt

    assert _fmt(0.5, [float("nan"), float("nan")]) == "0.5 [n/a]"
    assert _fmt(0.5, [0.25, 0.75]) == "0.5 [0.25, 0.75]"
