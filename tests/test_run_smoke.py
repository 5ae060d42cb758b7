"""Integration: `hialign run --smoke` on the real SmolLM2 and real hh-rlhf rows, end to end."""

import json
import re
import shutil
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from hialign.cli import main

pytestmark = pytest.mark.slow

STRATEGIES = ["full", "local", "mid", "global"]
GROUPS = ["Base Model", "Full-DPO", "Local-Align", "Mid-Align", "Global-Align"]
COMPARISONS = {
    "Local-Align vs. Full-DPO",
    "Mid-Align vs. Full-DPO",
    "Global-Align vs. Full-DPO",
    "Full-DPO vs. Base Model",
}
DIMENSIONS = {"Grammar Fluency", "Coherence", "Factuality", "Relevance"}


@pytest.fixture(scope="module")
def fresh_reference_cache(tmp_path_factory, smollm2_path):
    """A cache with the converted model but no reference log-probs, for this module's runs."""
    from hialign.modeling import cache_dir

    root = tmp_path_factory.mktemp("cache")
    (root / "models").symlink_to(cache_dir() / "models", target_is_directory=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIALIGN_CACHE", str(root))
        yield root


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, hh_path, fresh_reference_cache):
    out = tmp_path_factory.mktemp("smoke")
    start = time.perf_counter()
    assert main(["run", "--smoke", "--data", str(hh_path), "--out", str(out)]) == 0
    return out, time.perf_counter() - start


def test_smoke_run_writes_every_artifact(smoke_run):
    out, _ = smoke_run
    for name in (
        "report.md",
        "results.json",
        "judgements.jsonl",
        "config.yaml",
        "run.log",
        "figures/nwr_heatmap.png",
        "figures/win_tie_loss.png",
    ):
        assert (out / name).is_file(), name
    for strategy in STRATEGIES:
        assert (out / "strategies" / strategy / "adapter" / "adapter_model.safetensors").is_file()
        assert (out / "strategies" / strategy / "merged" / "model.safetensors").is_file()


def test_reference_pass_feeds_the_frozen_prefix_cache_of_upper_blocks(smoke_run):
    out, _ = smoke_run
    log = (out / "run.log").read_text()
    assert "reference log-probs: reusing" not in log  # this run computed them
    preloaded = re.findall(r"frozen-prefix cache: (\d+) pairs from the reference pass", log)
    train_pairs = json.loads((out / "results.json").read_text())["data"]["train_pairs"]
    # mid and global start above layer 0 (local and full do not): both start from that pass
    assert preloaded == [str(train_pairs)] * 2


def test_every_comparison_and_dimension_counts_each_eval_prompt(smoke_run):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    prompts = results["data"]["eval_prompts"]
    assert prompts == 3
    assert results["generation"]["groups"] == GROUPS
    rows = results["comparisons"]
    assert {(r["comparison"], r["dimension"]) for r in rows} == {
        (c, d) for c in COMPARISONS for d in DIMENSIONS
    }
    for row in rows:
        assert row["wins"] + row["losses"] + row["ties"] + row["invalid"] == prompts
        assert row["invalid"] == 0  # the local judge always yields a verdict
    report = (out / "report.md").read_text()
    for name in COMPARISONS | DIMENSIONS:
        assert name in report


def test_each_strategy_trained_only_its_block(smoke_run):
    out, _ = smoke_run
    training = json.loads((out / "results.json").read_text())["training"]
    assert training["global"]["layers"] == list(range(20, 30))
    assert training["local"]["layers"] == list(range(0, 10))
    assert training["full"]["lora_modules"] == 120
    assert training["mid"]["lora_modules"] == 40
    for strategy in STRATEGIES:
        history = training[strategy]["history"]
        assert len(history) == 2
        assert history[0]["loss"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference


def test_malformed_rows_of_the_real_file_are_counted_and_listed(smoke_run):
    out, _ = smoke_run
    data = json.loads((out / "results.json").read_text())["data"]
    assert data["rows_read"] == 2312
    assert sum(data["skipped"].values()) == 41
    assert data["skipped"]["empty reply"] == 4
    assert "test.jsonl.gz:87" in (out / "report.md").read_text()


def test_generations_and_verdicts_are_recorded(smoke_run):
    out, _ = smoke_run
    for group in GROUPS:
        rows = (out / "generations" / f"{group.replace(' ', '_')}.jsonl").read_text().splitlines()
        assert len(rows) == 3
    verdicts = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(verdicts) == 4 * 3
    assert all(len(v["orders"]) == 2 for v in verdicts)


def test_merged_global_model_reloads_and_differs_from_base_only_in_its_block(
    smoke_run, smollm2_path
):
    out, _ = smoke_run
    merged = AutoModelForCausalLM.from_pretrained(out / "strategies" / "global" / "merged")
    base = AutoModelForCausalLM.from_pretrained(smollm2_path)
    changed = {
        name
        for (name, p), q in zip(merged.named_parameters(), base.parameters())
        if not torch.equal(p, q)
    }
    assert changed  # training moved the weights
    assert all(".self_attn." in n and int(n.split(".")[2]) >= 20 for n in changed)


def test_rerun_resumes_without_retraining(smoke_run, hh_path):
    out, _ = smoke_run
    before = json.loads((out / "results.json").read_text())
    assert main(["run", "--smoke", "--data", str(hh_path), "--out", str(out)]) == 0
    after = json.loads((out / "results.json").read_text())
    assert after["comparisons"] == before["comparisons"]
    assert after["training"] == before["training"]
    assert "train global" not in after["timings"]  # nothing retrained
    assert before["reused"] == []
    assert {"reference log-probs (cache)", "train global", "generate Global-Align"} <= set(
        after["reused"]
    )
    report = (out / "report.md").read_text()
    assert "Reused from an earlier run in this folder" in report
    assert "calls were answered from the judge cache" in report


def test_strict_stops_at_the_first_malformed_row_before_loading_a_model(hh_path, tmp_path, caplog):
    code = main(["run", "--strict", "--data", str(hh_path), "--out", str(tmp_path / "s")])
    assert code == 2
    assert "test.jsonl.gz:30" in caplog.text
    assert "human turn inside reply" in caplog.text
    assert "loaded SmolLM2" not in caplog.text


def test_changed_settings_retrain_instead_of_reusing_stale_adapters(smoke_run, hh_path, tmp_path):
    out, _ = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    old = json.loads((copy / "strategies" / "global" / "training.json").read_text())
    args = ["run", "--smoke", "--data", str(hh_path), "--out", str(copy)]
    assert main([*args, "--strategies", "full,global", "--beta", "0.2", "--max-steps", "1"]) == 0
    new = json.loads((copy / "strategies" / "global" / "training.json").read_text())
    assert new["fingerprint"] != old["fingerprint"]
    assert new["steps"] == 1
    results = json.loads((copy / "results.json").read_text())
    assert results["settings"]["beta"] == 0.2
    assert results["training"]["global"]["steps"] == 1
    rows = (copy / "generations" / "Global-Align.jsonl").read_text().splitlines()
    assert json.loads(rows[0])["model_key"] == new["fingerprint"]
    # The earlier run's outputs were moved aside, not left to contradict the new config.
    previous = json.loads((copy / "results.previous.json").read_text())
    assert previous["settings"]["beta"] == 0.1
    assert (copy / "report.previous.md").is_file() and (copy / "figures.previous").is_dir()
    assert "beta: 0.1" in (copy / "config.previous.yaml").read_text()


def test_a_strategy_retrained_on_resume_repeats_its_first_training(smoke_run, hh_path, tmp_path):
    out, _ = smoke_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    first = json.loads((copy / "strategies" / "local" / "training.json").read_text())
    shutil.rmtree(copy / "strategies" / "local")  # lost; everything before it is reused
    torch.manual_seed(12345)  # whatever state the process happens to be in
    torch.rand(7)
    assert main(["run", "--smoke", "--data", str(hh_path), "--out", str(copy)]) == 0
    again = json.loads((copy / "strategies" / "local" / "training.json").read_text())
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in first["history"]]
    assert again["fingerprint"] == first["fingerprint"]
