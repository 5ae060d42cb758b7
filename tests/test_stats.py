"""Statistics stage: every number checked against arithmetic written out here, not the code."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest

from hialign.cli import main
from hialign.stats import (
    STATS_KEYS,
    binomial_p_value,
    comparison_stats,
    nwr_interval,
    pool_over_models,
    read_counts_csv,
    stats_command,
    wilson_interval,
)

Z95 = 1.959963984540054  # two-sided 95% normal quantile, Phi^-1(0.975)
HEADER = "comparison,dimension,model,wins,losses,ties\n"


def hand_wilson(w: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson closed form: (p + z^2/2n +/- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    p = w / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    denominator = 1 + z * z / n
    return (centre - half) / denominator, (centre + half) / denominator


def hand_two_sided_binomial(w: int, l: int) -> float:
    """Exact: 2 * P(X >= max(w, l)) for X ~ Bin(w + l, 1/2), capped at 1 (symmetric null)."""
    n, k = w + l, max(w, l)
    tail = Fraction(sum(math.comb(n, i) for i in range(k, n + 1)), 2**n)
    return min(1.0, float(2 * tail))


def write_csv(tmp_path, body: str, name: str = "judge_counts.csv"):
    path = tmp_path / name
    path.write_text(HEADER + body)
    return path


def test_wilson_interval_matches_hand_computation():
    # 8 of 10: p = 0.8, z^2/n = 0.384146, centre = (0.8 + 0.192073) / 1.384146 = 0.716740,
    # half = 1.959964 / 1.384146 * sqrt(0.016 + 0.0096037) = 0.226578.
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.490162, abs=1e-6)
    assert high == pytest.approx(0.943318, abs=1e-6)


def test_wilson_interval_at_zero_successes_starts_at_zero():
    # p = 0: the bounds are 0 and (z^2/n) / (1 + z^2/n) = 0.384146 / 1.384146.
    low, high = wilson_interval(0, 10)
    assert low == 0.0
    assert high == pytest.approx(0.384146 / 1.384146, abs=1e-6)


def test_wilson_interval_uses_the_requested_confidence():
    # 90%: z = 1.644854, z^2/n = 0.270554 for n = 10.
    low, high = wilson_interval(8, 10, confidence=0.90)
    assert (low, high) == pytest.approx(hand_wilson(8, 10, z=1.6448536269514722), abs=1e-12)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(8, 10, confidence=1.0)


def test_nwr_interval_matches_hand_computation():
    # W=30, L=10, T=10: t = 0.2, p = 0.75, NWR = 0.8 * 0.5 = 0.4,
    # se = 2 * 0.8 * sqrt(0.75 * 0.25 / 40) = 0.109545, half-width = 1.959964 * se = 0.214704.
    low, high = nwr_interval(30, 10, 10)
    assert low == pytest.approx(0.185296, abs=1e-6)
    assert high == pytest.approx(0.614704, abs=1e-6)


def test_nwr_interval_is_not_clipped_to_minus_one_one():
    # W=2, L=1, T=0: NWR = 1/3, se = 2 * sqrt((2/9) / 3) = 0.544331, upper = 1/3 + 1.066869.
    low, high = nwr_interval(2, 1, 0)
    assert high == pytest.approx(1.400203, abs=1e-6)
    assert low == pytest.approx(1 / 3 - 1.066869, abs=1e-6)


def test_nwr_interval_collapses_when_one_side_has_no_judgements():
    # L = 0 makes p = 1 and se = 0: the documented degenerate interval at NWR = 5/10.
    assert nwr_interval(5, 0, 5) == (0.5, 0.5)


def test_nwr_interval_needs_a_decisive_judgement():
    with pytest.raises(ValueError, match="all judgements are ties"):
        nwr_interval(0, 0, 4)


def test_binomial_p_value_matches_exact_sum():
    # 8 wins, 2 losses: P(X >= 8) = (45 + 10 + 1) / 1024, two-sided = 112 / 1024.
    assert binomial_p_value(8, 2) == pytest.approx(112 / 1024, rel=1e-12)
    assert binomial_p_value(2, 8) == pytest.approx(112 / 1024, rel=1e-12)


def test_binomial_p_value_is_one_for_a_draw_or_no_decisive_judgements():
    assert binomial_p_value(5, 5) == pytest.approx(1.0)
    assert binomial_p_value(0, 0) == 1.0


def test_comparison_stats_returns_exactly_the_api_keys():
    stats = comparison_stats("A vs. B", "Coherence", "M", 3, 2, 1)
    assert tuple(stats) == STATS_KEYS
    assert stats["total"] == 6
    assert stats["net_win_rate"] == pytest.approx(1 / 6)


def test_all_ties_give_null_intervals_and_p_value_one():
    stats = comparison_stats("A vs. B", "Relevance", "M", 0, 0, 7)
    for key in ("win_rate_excl_ties", "win_rate_ci_low", "win_rate_ci_high"):
        assert stats[key] is None
    assert stats["nwr_ci_low"] is None and stats["nwr_ci_high"] is None
    assert stats["p_value"] == 1.0
    assert (stats["net_win_rate"], stats["tie_rate"]) == (0.0, 1.0)
    assert '"win_rate_ci_low": null' in json.dumps(stats, allow_nan=False)


def test_no_judgements_is_a_clear_value_error():
    with pytest.raises(ValueError, match="no judgements"):
        comparison_stats("A vs. B", "Coherence", "M", 0, 0, 0)


@pytest.mark.parametrize("bad", [-1, 2.0, 2.5, "3", True, None])
def test_negative_or_non_integer_counts_are_value_errors(bad):
    with pytest.raises(ValueError, match="non-negative integer"):
        comparison_stats("A vs. B", "Coherence", "M", bad, 1, 1)


# Three rows of the paper's published counts, recomputed by hand from W, L, T.
PAPER_ROWS = [
    ("Local-Align vs. Full-DPO", "Grammar Fluency", "All Models", 664, 150, 182),
    ("Local-Align vs. Full-DPO", "Relevance", "Llama3", 54, 47, 397),
    ("Full-DPO vs. Base Model", "Coherence", "All Models", 378, 502, 117),
]


@pytest.mark.parametrize("comparison,dimension,model,w,l,t", PAPER_ROWS)
def test_paper_rows_match_hand_computation(
    paper_counts_path, comparison, dimension, model, w, l, t
):
    rows = read_counts_csv(paper_counts_path)
    (row,) = [
        r
        for r in rows
        if (r["comparison"], r["dimension"], r["model"]) == (comparison, dimension, model)
    ]
    assert (row["wins"], row["losses"], row["ties"]) == (w, l, t)

    stats = comparison_stats(comparison, dimension, model, w, l, t)
    n, decisive = w + l + t, w + l
    p, tie_share = w / decisive, t / n
    nwr = (1 - tie_share) * (2 * p - 1)
    se = 2 * (1 - tie_share) * math.sqrt(p * (1 - p) / decisive)
    expected = {
        "total": n,
        "win_rate": w / n,
        "loss_rate": l / n,
        "tie_rate": t / n,
        "net_win_rate": (w - l) / n,
        "win_rate_excl_ties": p,
        "win_rate_ci_low": hand_wilson(w, decisive)[0],
        "win_rate_ci_high": hand_wilson(w, decisive)[1],
        "nwr_ci_low": nwr - Z95 * se,
        "nwr_ci_high": nwr + Z95 * se,
    }
    for key, value in expected.items():
        assert stats[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
    assert stats["p_value"] == pytest.approx(hand_two_sided_binomial(w, l), rel=1e-9)


def test_paper_grammar_row_matches_rounded_hand_values():
    # 664 / 150 / 182: NWR = 514 / 996; p = 664 / 814; Wilson centre 0.814243, half 0.026613;
    # se = 2 * (814 / 996) * sqrt(p (1 - p) / 814) = 0.022297, half-width 0.043702.
    stats = comparison_stats(
        "Local-Align vs. Full-DPO", "Grammar Fluency", "All Models", 664, 150, 182
    )
    assert stats["net_win_rate"] == pytest.approx(0.516064, abs=1e-6)
    assert stats["win_rate_ci_low"] == pytest.approx(0.787629, abs=1e-6)
    assert stats["win_rate_ci_high"] == pytest.approx(0.840855, abs=1e-6)
    assert stats["nwr_ci_low"] == pytest.approx(0.472529, abs=1e-6)
    assert stats["nwr_ci_high"] == pytest.approx(0.559599, abs=1e-6)


def test_read_counts_csv_reads_all_48_paper_rows_in_order(paper_counts_path):
    rows = read_counts_csv(paper_counts_path)
    assert len(rows) == 48
    assert rows[0] == {
        "comparison": "Local-Align vs. Full-DPO",
        "dimension": "Grammar Fluency",
        "model": "All Models",
        "wins": 664,
        "losses": 150,
        "ties": 182,
    }
    assert {r["model"] for r in rows} == {"All Models", "Llama3", "Qwen1.5"}


def test_read_counts_csv_names_file_line_and_field(tmp_path):
    good = "".join(f"A vs. B,Coherence,model{i},1,2,3\n" for i in range(5))
    path = write_csv(tmp_path, good + "A vs. B,Factuality,M,x,2,3\n")
    with pytest.raises(ValueError) as err:
        read_counts_csv(path)
    assert str(err.value) == "judge_counts.csv:7: field 'wins': 'x' is not a non-negative integer"


@pytest.mark.parametrize("value", ["-1", "2.5", ""])
def test_read_counts_csv_rejects_bad_counts(tmp_path, value):
    path = write_csv(tmp_path, f"A vs. B,Coherence,M,1,{value},3\n")
    with pytest.raises(ValueError, match="judge_counts.csv:2: field 'losses'"):
        read_counts_csv(path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("A vs. B,Coherence,M,1,2,3,4", "judge_counts.csv:2: 1 more field\\(s\\) than the header"),
        (
            "A vs. B,Coherence,M,1,2",
            "judge_counts.csv:2: fewer fields than the header; missing ties",
        ),
    ],
)
def test_read_counts_csv_rejects_rows_with_the_wrong_number_of_fields(tmp_path, line, message):
    with pytest.raises(ValueError, match=message):
        read_counts_csv(write_csv(tmp_path, line + "\n"))


def test_read_counts_csv_names_missing_columns(tmp_path):
    path = tmp_path / "counts.csv"
    path.write_text("comparison,dimension,wins,losses\nA vs. B,Coherence,1,2\n")
    with pytest.raises(ValueError, match=r"counts.csv:1: missing column\(s\): model, ties"):
        read_counts_csv(path)


def test_read_counts_csv_rejects_zero_total_and_duplicate_rows(tmp_path):
    path = write_csv(tmp_path, "A vs. B,Coherence,M,0,0,0\n")
    with pytest.raises(ValueError, match="judge_counts.csv:2: wins \\+ losses \\+ ties is 0"):
        read_counts_csv(path)
    path = write_csv(tmp_path, "A vs. B,Coherence,M,1,2,3\nA vs. B,Coherence,M,4,5,6\n")
    with pytest.raises(ValueError, match="judge_counts.csv:3: duplicate of line 2"):
        read_counts_csv(path)


def test_pool_over_models_reproduces_the_published_all_models_rows(paper_counts_path):
    rows = read_counts_csv(paper_counts_path)
    published = [r for r in rows if r["model"] == "All Models"]
    pooled = pool_over_models(rows)  # the published pooled rows themselves are skipped
    assert pooled == published


def test_pool_over_models_sums_invalid_counts():
    rows = [
        {"comparison": "C", "dimension": "D", "model": "m1", "wins": 1, "losses": 2, "ties": 3},
        {
            "comparison": "C",
            "dimension": "D",
            "model": "m2",
            "wins": 4,
            "losses": 5,
            "ties": 6,
            "invalid": 2,
        },
    ]
    (pooled,) = pool_over_models(rows, pooled_name="Both")
    assert pooled == {
        "comparison": "C",
        "dimension": "D",
        "model": "Both",
        "wins": 5,
        "losses": 7,
        "ties": 9,
        "invalid": 2,
    }


def test_cli_stats_json_prints_48_objects_with_exactly_the_keys(paper_counts_path, capsys):
    assert main(["stats", str(paper_counts_path), "--format", "json"]) == 0
    objects = json.loads(capsys.readouterr().out)
    assert len(objects) == 48
    assert all(list(obj) == list(STATS_KEYS) for obj in objects)
    assert objects[0]["net_win_rate"] == 514 / 996  # unrounded
    assert [o["model"] for o in objects[:16]] == ["All Models"] * 16  # input order kept


def test_cli_stats_csv_and_table_formats(paper_counts_path, capsys, tmp_path):
    assert main(["stats", str(paper_counts_path), "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ",".join(STATS_KEYS) and len(lines) == 49

    out = tmp_path / "stats.txt"
    assert stats_command(paper_counts_path, fmt="table", out=out) == 0
    table = out.read_text().splitlines()
    assert len(table) == 50  # header, rule, 48 rows
    assert "+0.516" in table[2] and "[+0.473, +0.560]" in table[2]


def test_cli_stats_bad_input_exits_2(tmp_path, capsys):
    path = write_csv(tmp_path, "A vs. B,Coherence,M,1,-2,3\n")
    assert main(["stats", str(path), "--format", "json"]) == 2
    assert capsys.readouterr().out == ""
