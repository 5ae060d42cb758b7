"""Report stage: report.md content, its two figures, and the three predictions' verdicts."""

from __future__ import annotations

import re

import pytest

from hialign.report import evaluate_predictions, write_report
from hialign.stats import (
    COMPARISONS,
    DIMENSION_LABELS,
    comparison_stats,
    read_counts_csv,
    significance,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DIMENSIONS = list(DIMENSION_LABELS.values())
NAMES = [name for name, _, _ in COMPARISONS]
SECTIONS = [
    "## Judge",
    "## Judgement counts",
    "## Significance",
    "## Figures",
    "## Predictions",
    "## Block map",
    "## Training",
    "## Settings",
    "## Data",
    "## Timings",
]


def stats_row(comparison, dimension, counts, model="All Models", invalid=0) -> dict:
    return {**comparison_stats(comparison, dimension, model, *counts), "invalid": invalid}


def fake_training(layers: list[int], modules: int) -> dict:
    history = [
        {"step": s, "loss": 0.693 - 0.01 * s, "reward_accuracy": 0.5 + 0.02 * s}
        | {"reward_margin": 0.01 * s, "chosen_reward": 0.02 * s, "rejected_reward": -0.01 * s}
        for s in range(1, 9)
    ]
    last = history[-1]
    return {
        "layers": layers,
        "lora_modules": modules,
        "trainable_params": 7680 * modules,
        "steps": 8,
        "seconds": 12.5,
        "first_loss": history[0]["loss"],
        "final_loss": last["loss"],
        "final_reward_accuracy": last["reward_accuracy"],
        "final_margin": last["reward_margin"],
        "history": history,
    }


@pytest.fixture(scope="module")
def llama_rows(paper_counts_path) -> list[dict]:
    """The paper's Llama3 counts as the runner would record them (one model, no pooled rows)."""
    rows = [r for r in read_counts_csv(paper_counts_path) if r["model"] == "Llama3"]
    counts = [(r["wins"], r["losses"], r["ties"]) for r in rows]
    return [
        stats_row(r["comparison"], r["dimension"], c, r["model"], invalid=3 if i == 0 else 0)
        for i, (r, c) in enumerate(zip(rows, counts))
    ]


@pytest.fixture(scope="module")
def results(llama_rows) -> dict:
    thirds = {"local": list(range(10)), "mid": list(range(10, 20)), "global": list(range(20, 30))}
    skipped_rows = [
        {"source": f"test.jsonl.gz:{100 + i}", "reason": "empty reply"} for i in range(60)
    ]
    return {
        "hialign_version": "0.1.0",
        "created": "2026-12-04T17:00:00Z",
        "model": {
            "spec": "embedded:SmolLM2-135M-Instruct",
            "name": "SmolLM2-135M-Instruct",
            "num_layers": 30,
            "attention_projections": [f"self_attn.{p}_proj" for p in "qkvo"],
        },
        "blocks": [{"name": name, "layers": layers} for name, layers in thirds.items()],
        "strategies": ["full", "local", "mid", "global"],
        "settings": {
            "model": None,
            "beta": 0.1,
            "lr": 5e-5,
            "lora_rank": 8,
            "steps": 8,
            "seed": 1234,
        },
        "data": {
            "source": "harmless-base/test.jsonl.gz",
            "rows_read": 2312,
            "pairs_valid": 2252,
            "train_pairs": 128,
            "eval_prompts": 40,
            "skipped": {"empty reply": 60},
            "skipped_rows": skipped_rows,
            "too_long": 2,
        },
        "training": {"full": fake_training(list(range(30)), 120)}
        | {name: fake_training(layers, 40) for name, layers in thirds.items()},
        "generation": {"prompts": 40, "max_new_tokens": 128, "do_sample": False},
        "judge": {
            "kind": "local",
            "name": "local log-prob judge: SmolLM2-135M-Instruct",
            "model": "SmolLM2-135M-Instruct",
            "warning": "a 135M judge is weak; treat its verdicts as a smoke test",
            "judgements": 160,
            "position_disagreement_rate": 0.4,
            "first_shown_win_rate": 0.6,
            "invalid": 3,
        },
        "comparisons": llama_rows,
        "timings": {"train": 900.0, "generate": 200.0, "judge": 100.0},
    }


@pytest.fixture(scope="module")
def written(results, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    path = write_report(results, out)
    return out, path.read_text()


def section(report: str, heading: str) -> str:
    start = report.index(heading + "\n")
    end = report.find("\n## ", start + len(heading))
    return report[start : end if end != -1 else None]


def test_write_report_returns_report_md_with_sections_in_order(written):
    out, report = written
    assert (out / "report.md").read_text() == report
    assert report.startswith("# Hierarchical Alignment report: SmolLM2-135M-Instruct")
    positions = [report.index(heading + "\n") for heading in SECTIONS]
    assert positions == sorted(positions)


def test_report_names_every_comparison_and_dimension(written):
    _, report = written
    for name in NAMES:
        assert name in section(report, "## Judgement counts")
        assert name in section(report, "## Significance")
    for dimension in DIMENSIONS:
        assert dimension in section(report, "## Judgement counts")
        assert report.count(f"| {dimension} |") == len(NAMES)  # one significance row each


def test_report_count_table_equals_input_counts(written, llama_rows):
    _, report = written
    lines = [
        line for line in section(report, "## Judgement counts").splitlines() if line.startswith("|")
    ]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    dimensions = [h.removesuffix(" W / L / T") for h in header[1:]]
    assert dimensions == DIMENSIONS

    table = {}
    for line in lines[2:]:
        comparison, *cells = [cell.strip() for cell in line.strip("|").split("|")]
        for dimension, cell in zip(dimensions, cells):
            w, l, t, *invalid = map(int, re.findall(r"\d+", cell))
            table[comparison, dimension] = (w, l, t, invalid[0] if invalid else 0)
    expected = {
        (r["comparison"], r["dimension"]): (r["wins"], r["losses"], r["ties"], r["invalid"])
        for r in llama_rows
    }
    assert table == expected
    assert "314 / 120 / 64 (+3 invalid)" in report


def test_report_significance_row_quotes_nwr_wilson_and_p(written):
    # Llama3, Full-DPO vs. Base Model, Coherence: 194 / 259 / 45, NWR = -65/498 = -0.131.
    _, report = written
    (line,) = [
        row
        for row in section(report, "## Significance").splitlines()
        if row.startswith("| Full-DPO vs. Base Model | Coherence |")
    ]
    assert "| 498 | -0.131 [-0.213, -0.048] | 0.428 [0.383, 0.474] | 0.003 | **yes** |" in line


def test_report_figures_exist_are_valid_pngs_and_are_embedded(written):
    out, report = written
    for name in ("nwr_heatmap.png", "win_tie_loss.png"):
        data = (out / "figures" / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 10_000
        assert f"](figures/{name})" in section(report, "## Figures")


def test_report_shows_weak_judge_warning_in_a_blockquote(written):
    _, report = written
    judge = section(report, "## Judge")
    assert "> **Warning:** a 135M judge is weak; treat its verdicts as a smoke test" in judge
    assert "40.0%" in judge and "60.0%" in judge and "local log-prob judge" in judge


def test_report_lists_skipped_rows_capped_at_fifty(written):
    _, report = written
    data = section(report, "## Data")
    listed = re.findall(r"^- `test\.jsonl\.gz:(\d+)`: empty reply$", data, flags=re.M)
    assert listed == [str(100 + i) for i in range(50)]
    assert "… and 10 more skipped rows" in data
    assert "| empty reply | 60 |" in data


def test_report_block_map_and_training_summary(written):
    _, report = written
    blocks = section(report, "## Block map")
    assert "| local | 0–9 | 10 |" in blocks and "| global | 20–29 | 10 |" in blocks
    assert "| full | 0–29 | 120 | 921,600 |" in blocks
    assert "| mid | 8 | 0.6830 → 0.6130 | 0.660 | +0.0800 | 12.5 |" in section(
        report, "## Training"
    )
    assert "| **total** | 1200.0 |" in section(report, "## Timings")
    assert "| model | default (SmolLM2-135M-Instruct) |" in section(report, "## Settings")


def test_report_without_comparisons_fails_clearly(results, tmp_path):
    for broken in ({k: v for k, v in results.items() if k != "comparisons"}, {"comparisons": []}):
        with pytest.raises(ValueError, match="no 'comparisons'"):
            write_report(broken, tmp_path)


def test_report_tolerates_missing_optional_sections_and_rows_without_judgements(
    llama_rows, tmp_path
):
    empty = {"comparison": NAMES[0], "dimension": "Relevance", "model": "Llama3"}
    empty |= {"wins": 0, "losses": 0, "ties": 0, "total": 0, "invalid": 5}  # the runner's shape
    rows = [r for r in llama_rows if (r["comparison"], r["dimension"]) != (NAMES[0], "Relevance")]
    report = write_report({"comparisons": [*rows, empty]}, tmp_path).read_text()
    assert report.count("_Not recorded in results._") == 6  # judge, blocks .. timings
    assert "0 / 0 / 0 (+5 invalid)" in report
    assert "1 comparison row(s) had no valid judgements" in report
    assert (tmp_path / "figures" / "win_tie_loss.png").read_bytes()[:8] == PNG_MAGIC


# --- predictions on hand-made counts --------------------------------------------------------
NEUTRAL = (30, 30, 40)  # NWR 0, CI symmetric around 0
STRONG_WIN = (60, 10, 30)  # NWR +0.5, CI about [+0.39, +0.61]
STRONG_LOSS = (10, 60, 30)
ALL_TIES = (0, 0, 50)


def scenario(overrides: dict, drop: tuple = ()) -> list[dict]:
    """All 16 pooled rows, NEUTRAL unless overridden; ``drop`` leaves some out."""
    return [
        stats_row(name, dim, overrides.get((name, dim), NEUTRAL))
        for name in NAMES
        for dim in DIMENSIONS
        if (name, dim) not in drop
    ]


def held(rows) -> dict:
    return {p["id"]: p["held"] for p in evaluate_predictions(rows)}


LOCAL, MID, GLOBAL, TAX = NAMES


@pytest.mark.parametrize(
    "overrides,drop,expected",
    [
        ({(LOCAL, "Grammar Fluency"): STRONG_WIN}, (), True),
        ({(LOCAL, "Grammar Fluency"): STRONG_WIN, (LOCAL, "Coherence"): STRONG_LOSS}, (), False),
        ({}, (), False),  # grammar gain not significant
        ({(LOCAL, "Grammar Fluency"): ALL_TIES}, (), None),
        ({}, ((LOCAL, "Grammar Fluency"),), None),
    ],
)
def test_prediction_i_local_fluency(overrides, drop, expected):
    assert held(scenario(overrides, drop))["i"] is expected


GLOBAL_WINS = {(GLOBAL, "Factuality"): STRONG_WIN, (GLOBAL, "Coherence"): STRONG_WIN}


@pytest.mark.parametrize(
    "overrides,drop,expected",
    [
        (GLOBAL_WINS, (), True),
        (GLOBAL_WINS | {(MID, "Coherence"): (70, 5, 25)}, (), False),  # Mid is higher
        ({(GLOBAL, "Factuality"): STRONG_WIN}, (), False),  # coherence not above 0
        (GLOBAL_WINS, ((MID, "Factuality"),), None),  # ranking undecidable
    ],
)
def test_prediction_ii_global_best_on_facts_and_logic(overrides, drop, expected):
    assert held(scenario(overrides, drop))["ii"] is expected


RECOVERED = {(name, "Coherence"): STRONG_WIN for name in (LOCAL, MID, GLOBAL)}


@pytest.mark.parametrize(
    "overrides,drop,expected",
    [
        (RECOVERED | {(TAX, "Coherence"): STRONG_LOSS}, (), True),
        (RECOVERED | {(TAX, "Coherence"): STRONG_LOSS, (MID, "Coherence"): NEUTRAL}, (), False),
        (RECOVERED, (), False),  # Full-DPO pays no tax
        (RECOVERED, tuple((TAX, d) for d in DIMENSIONS), None),
        (
            RECOVERED | {(TAX, "Coherence"): STRONG_LOSS},
            tuple((n, "Coherence") for n in NAMES[:3]),
            None,
        ),
    ],
)
def test_prediction_iii_alignment_tax(overrides, drop, expected):
    assert held(scenario(overrides, drop))["iii"] is expected


def test_predictions_on_paper_pooled_counts_hold_i_and_ii_but_not_iii(paper_counts_path):
    rows = [
        stats_row(r["comparison"], r["dimension"], (r["wins"], r["losses"], r["ties"]), r["model"])
        for r in read_counts_csv(paper_counts_path)
    ]
    predictions = {p["id"]: p for p in evaluate_predictions(rows)}
    assert {k: p["held"] for k, p in predictions.items()} == {"i": True, "ii": True, "iii": False}
    # Pooled rows are used: NWR 514/996 with the interval worked out in test_stats.py.
    grammar = "Local-Align vs. Full-DPO, Grammar Fluency: NWR +0.516 [+0.473, +0.560]"
    assert grammar in predictions["i"]["evidence"]
    # The tax is on Coherence (-124/997); Local- and Mid-Align do not beat Full-DPO there.
    assert (
        "Full-DPO vs. Base Model, Coherence: NWR -0.124 [-0.182, -0.067]"
        in predictions["iii"]["evidence"]
    )


def test_predictions_pool_several_models_without_pooled_rows(paper_counts_path):
    counts = [r for r in read_counts_csv(paper_counts_path) if r["model"] != "All Models"]
    rows = [
        {k: r[k] for k in ("comparison", "dimension", "model", "wins", "losses", "ties")}
        for r in counts
    ]
    assert held(rows) == {"i": True, "ii": True, "iii": False}


# --- significance: the interval alone is not enough ------------------------------------------
@pytest.mark.parametrize(
    "counts,expected",
    [
        ((0, 1, 2), 0),  # one decisive loss: interval collapses to [-0.33, -0.33], p = 1
        ((5, 0, 35), 0),  # interval [+0.125, +0.125] but p = 0.0625
        ((3, 0, 0), 0),  # [+1, +1], p = 0.25
        ((6, 0, 0), 1),  # p = 0.031: significant, though the interval is still a point
        ((60, 10, 30), 1),
        ((10, 60, 30), -1),
        ((30, 30, 40), 0),
        ((0, 0, 9), None),  # all ties: nothing to test
    ],
)
def test_significance_needs_interval_and_exact_test(counts, expected):
    assert significance(stats_row("A vs. B", "Coherence", counts)) == expected


def test_a_single_decisive_verdict_is_not_reported_as_significant(results, tmp_path):
    rows = [stats_row(name, dim, (0, 1, 2)) for name in NAMES for dim in DIMENSIONS]
    report = write_report({**results, "comparisons": rows}, tmp_path).read_text()
    assert "Significant differences (NWR 95% CI excludes 0 and exact binomial p < 0.05): none." in (
        report
    )
    assert "(zero width: W or L is 0)" in section(report, "## Significance")
    assert "**yes**" not in section(report, "## Significance")
    assert held(rows) == {"i": False, "ii": False, "iii": False}


def test_local_grammar_win_counts_only_when_the_exact_test_agrees():
    small_win = {(LOCAL, "Grammar Fluency"): (5, 0, 35)}  # interval above 0, p = 0.0625
    assert held(scenario(small_win))["i"] is False
    assert held(scenario({(LOCAL, "Grammar Fluency"): (9, 0, 31)}))["i"] is True  # p = 0.004
