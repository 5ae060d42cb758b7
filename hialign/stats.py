"""Stage 7 — statistics on pairwise judge counts: rates, net win rate, intervals, exact test.

For one comparison "A vs. B" on one dimension, with W wins of A, L losses and T ties
(N = W + L + T):

- win/loss/tie rates are W/N, L/N, T/N and the net win rate is NWR = (W - L) / N;
- the win rate excluding ties, p = W / (W + L), gets a Wilson score interval;
- NWR gets a delta-method interval with the tie share t = T/N held fixed:
  NWR = (1 - t)(2p - 1), se = 2(1 - t) sqrt(p(1 - p) / (W + L)), NWR +/- z se;
- the p-value is the two-sided exact binomial test of W successes in W + L trials at 0.5.

Edge-case rules (each has a test):

- N = 0 is an error: a comparison without a single judgement has no rates.
- All ties (W + L = 0): p is undefined, so the win rate excluding ties and *all four* interval
  bounds are ``None`` (JSON ``null``, never NaN); the p-value is 1.0 (no evidence either way).
- The NWR interval is not clipped to [-1, 1]. With few decisive judgements it can overshoot
  (W=2, L=1, T=0 gives an upper bound of about 1.40); we report what the formula gives so the
  overshoot itself warns that the normal approximation is poor there.
- When W or L is 0 the delta-method standard error is 0 and the NWR interval collapses to a
  point; the Wilson interval and the exact p-value stay informative, so read those instead.

A difference is called *significant* (report, figures, predictions: ``significance``) only when
the NWR 95% interval excludes 0 *and* the exact binomial p-value is below 0.05. The interval
alone would call a single decisive verdict significant (W=0, L=1 collapses to [-x, -x]); the
exact test is the one valid at small counts, the interval keeps the NWR scale of the paper.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from numbers import Integral
from pathlib import Path

from scipy.stats import binomtest, norm

logger = logging.getLogger(__name__)

# Judge dimension keys -> labels used in tables (and in the paper's published counts).
DIMENSION_LABELS = {
    "grammar_fluency": "Grammar Fluency",
    "coherence_logic": "Coherence",
    "factuality": "Factuality",
    "relevance_instruction": "Relevance",
}

# (comparison name, group A, group B): a "win" is a judgement that A's answer is better.
COMPARISONS = [
    ("Local-Align vs. Full-DPO", "Local-Align", "Full-DPO"),
    ("Mid-Align vs. Full-DPO", "Mid-Align", "Full-DPO"),
    ("Global-Align vs. Full-DPO", "Global-Align", "Full-DPO"),
    ("Full-DPO vs. Base Model", "Full-DPO", "Base Model"),
]

POOLED_MODEL = "All Models"
COUNT_COLUMNS = ("comparison", "dimension", "model", "wins", "losses", "ties")
STATS_KEYS = (
    "comparison",
    "dimension",
    "model",
    "wins",
    "losses",
    "ties",
    "total",
    "win_rate",
    "loss_rate",
    "tie_rate",
    "net_win_rate",
    "win_rate_excl_ties",
    "win_rate_ci_low",
    "win_rate_ci_high",
    "nwr_ci_low",
    "nwr_ci_high",
    "p_value",
)


def _check_count(name: str, value) -> int:
    """Return ``value`` if it is a non-negative integer (bool excluded), else raise ValueError."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_counts(wins, losses, ties) -> tuple[int, int, int]:
    """Validate the three judgement counts together."""
    return _check_count("wins", wins), _check_count("losses", losses), _check_count("ties", ties)


def _z_score(confidence: float) -> float:
    """Two-sided normal quantile for ``confidence`` (1.959964 for 0.95)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    return float(norm.ppf(0.5 + confidence / 2.0))


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; stays inside [0, 1] even at 0 or n.

    Raises ValueError for ``trials == 0`` (no proportion to bound) or ``successes > trials``.
    """
    successes = _check_count("successes", successes)
    trials = _check_count("trials", trials)
    if trials == 0:
        raise ValueError("Wilson interval needs at least one trial")
    if successes > trials:
        raise ValueError(f"successes ({successes}) exceed trials ({trials})")
    z = _z_score(confidence)

    p = successes / trials
    z2_n = z * z / trials
    centre = (p + z2_n / 2.0) / (1.0 + z2_n)
    half = z / (1.0 + z2_n) * math.sqrt(p * (1.0 - p) / trials + z2_n / (4.0 * trials))
    # The exact bounds lie in [0, 1]; clamping only removes round-off at p = 0 or 1.
    return max(0.0, centre - half), min(1.0, centre + half)


def nwr_interval(
    wins: int, losses: int, ties: int, confidence: float = 0.95
) -> tuple[float, float]:
    """Delta-method interval for the net win rate with the tie share held fixed; not clipped.

    Raises ValueError when there are no decisive judgements (wins + losses == 0).
    """
    wins, losses, ties = _check_counts(wins, losses, ties)
    decisive = wins + losses
    if decisive == 0:
        raise ValueError("NWR interval needs at least one win or loss (all judgements are ties)")
    z = _z_score(confidence)

    tie_share = ties / (decisive + ties)
    p = wins / decisive
    nwr = (1.0 - tie_share) * (2.0 * p - 1.0)
    se = 2.0 * (1.0 - tie_share) * math.sqrt(p * (1.0 - p) / decisive)
    return nwr - z * se, nwr + z * se


def binomial_p_value(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of ``wins`` in ``wins + losses`` at 0.5; 1.0 if none."""
    wins = _check_count("wins", wins)
    losses = _check_count("losses", losses)
    if wins + losses == 0:
        return 1.0
    return float(binomtest(wins, wins + losses, 0.5, alternative="two-sided").pvalue)


ALPHA = 0.05


def significance(row: dict | None, alpha: float = ALPHA) -> int | None:
    """+1 (significantly better) or -1 (worse) when the NWR interval of ``row`` excludes 0 and
    its exact binomial p-value is below ``alpha``; 0 when not significant; None when the row is
    missing or has no interval (all ties)."""
    if row is None or row["nwr_ci_low"] is None:
        return None
    if row["p_value"] >= alpha:
        return 0
    if row["nwr_ci_low"] > 0:
        return 1
    return -1 if row["nwr_ci_high"] < 0 else 0


def degenerate_interval(row: dict) -> bool:
    """True when the NWR interval has zero width because W or L is 0 (but not both)."""
    return row["nwr_ci_low"] is not None and min(row["wins"], row["losses"]) == 0


def comparison_stats(
    comparison: str,
    dimension: str,
    model: str,
    wins: int,
    losses: int,
    ties: int,
    confidence: float = 0.95,
) -> dict:
    """All statistics for one comparison x dimension x model, keyed exactly as ``STATS_KEYS``."""
    wins, losses, ties = _check_counts(wins, losses, ties)
    total = wins + losses + ties
    if total == 0:
        raise ValueError(f"{comparison} / {dimension} / {model}: no judgements (W + L + T = 0)")

    decisive = wins + losses
    if decisive:
        p = wins / decisive
        win_low, win_high = wilson_interval(wins, decisive, confidence)
        nwr_low, nwr_high = nwr_interval(wins, losses, ties, confidence)
    else:
        p = win_low = win_high = nwr_low = nwr_high = None

    return {
        "comparison": comparison,
        "dimension": dimension,
        "model": model,
        "wins": wins,
        "losses": losses,
        "ties": ties,
        "total": total,
        "win_rate": wins / total,
        "loss_rate": losses / total,
        "tie_rate": ties / total,
        "net_win_rate": (wins - losses) / total,
        "win_rate_excl_ties": p,
        "win_rate_ci_low": win_low,
        "win_rate_ci_high": win_high,
        "nwr_ci_low": nwr_low,
        "nwr_ci_high": nwr_high,
        "p_value": binomial_p_value(wins, losses),
    }


def read_counts_csv(path: str | Path) -> list[dict]:
    """Read count rows (comparison, dimension, model, wins, losses, ties) from a CSV file.

    Errors name the file, the line and the field. Extra columns are ignored; a repeated
    (comparison, dimension, model) key is an error because pooling would double count it.
    """
    path = Path(path)
    name = path.name
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"{name}: empty file, expected a header {','.join(COUNT_COLUMNS)}")
        header = [field.strip() for field in reader.fieldnames]
        missing = [column for column in COUNT_COLUMNS if column not in header]
        if missing:
            raise ValueError(f"{name}:1: missing column(s): {', '.join(missing)}")
        reader.fieldnames = header

        rows, seen = [], {}
        for record in reader:
            line = reader.line_num
            row = _parse_count_record(record, f"{name}:{line}")
            key = (row["comparison"], row["dimension"], row["model"])
            if key in seen:
                raise ValueError(f"{name}:{line}: duplicate of line {seen[key]}: {' / '.join(key)}")
            seen[key] = line
            rows.append(row)

    if not rows:
        raise ValueError(f"{name}: no data rows after the header")
    logger.debug("read %d count rows from %s", len(rows), path)
    return rows


def _parse_count_record(record: dict, where: str) -> dict:
    """Validate one CSV record; ``where`` is ``file:line`` for error messages."""
    extra = record.get(None)  # csv.DictReader puts fields beyond the header under None
    if extra:
        raise ValueError(f"{where}: {len(extra)} more field(s) than the header has: {extra}")
    short = [field for field in COUNT_COLUMNS if record.get(field) is None]
    if short:
        raise ValueError(f"{where}: fewer fields than the header; missing {', '.join(short)}")
    row = {}
    for field in COUNT_COLUMNS[:3]:
        text = (record.get(field) or "").strip()
        if not text:
            raise ValueError(f"{where}: field '{field}' is empty")
        row[field] = text
    for field in COUNT_COLUMNS[3:]:
        text = (record.get(field) or "").strip()
        if not (text.isascii() and text.isdigit()):
            raise ValueError(f"{where}: field '{field}': {text!r} is not a non-negative integer")
        row[field] = int(text)
    if row["wins"] + row["losses"] + row["ties"] == 0:
        raise ValueError(f"{where}: wins + losses + ties is 0; a row needs at least one judgement")
    return row


def pool_over_models(rows: list[dict], pooled_name: str = POOLED_MODEL) -> list[dict]:
    """Sum counts over models per (comparison, dimension), in first-seen order.

    Rows whose model already is ``pooled_name`` are left out so that published pooled rows are
    not counted twice. An ``invalid`` count is summed too when any input row carries one.
    """
    pooled: dict[tuple[str, str], dict] = {}
    with_invalid = any("invalid" in row for row in rows)
    for row in rows:
        if row["model"] == pooled_name:
            continue
        key = (row["comparison"], row["dimension"])
        if key not in pooled:
            pooled[key] = {"comparison": key[0], "dimension": key[1], "model": pooled_name}
            pooled[key].update({"wins": 0, "losses": 0, "ties": 0})
            if with_invalid:
                pooled[key]["invalid"] = 0
        for field in ("wins", "losses", "ties") + (("invalid",) if with_invalid else ()):
            pooled[key][field] += _check_count(field, row.get(field, 0))
    return list(pooled.values())


def ordered(values, preferred=()) -> list:
    """Distinct ``values`` in the order of ``preferred``, unknown ones after, first-seen order."""
    distinct = list(dict.fromkeys(values))
    known = [v for v in preferred if v in distinct]
    return known + [v for v in distinct if v not in known]


def comparison_order(rows: list[dict]) -> list[str]:
    return ordered((r["comparison"] for r in rows), [name for name, _, _ in COMPARISONS])


def dimension_order(rows: list[dict]) -> list[str]:
    return ordered((r["dimension"] for r in rows), list(DIMENSION_LABELS.values()))


def with_stats(row: dict) -> dict | None:
    """``row`` with every ``STATS_KEYS`` value, recomputed from its counts when any is missing.

    Returns None for a row without judgements (e.g. every verdict invalid), which has no stats.
    """
    if all(key in row for key in STATS_KEYS):
        return row
    if row["wins"] + row["losses"] + row["ties"] == 0:
        return None
    counts = (row["wins"], row["losses"], row["ties"])
    return {**row, **comparison_stats(row["comparison"], row["dimension"], row["model"], *counts)}


def headline_rows(rows: list[dict]) -> list[dict]:
    """The rows that answer "how did the strategies do": pooled ones, else the only model's.

    With several models and no pooled rows, counts are pooled here by summing over models.
    """
    models = ordered((r["model"] for r in rows), [POOLED_MODEL])
    if POOLED_MODEL in models or len(models) <= 1:
        chosen = [r for r in rows if r["model"] == (models[0] if models else POOLED_MODEL)]
    else:
        chosen = pool_over_models(rows)
    return [s for s in map(with_stats, chosen) if s is not None]


def stats_to_json(stats: list[dict]) -> str:
    """JSON list of stats objects with unrounded floats; NaN is refused, None becomes null."""
    return json.dumps(stats, indent=2, allow_nan=False) + "\n"


def stats_to_csv(stats: list[dict]) -> str:
    """CSV with the ``STATS_KEYS`` columns; undefined values are empty cells."""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=STATS_KEYS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in stats:
        writer.writerow({key: "" if row[key] is None else row[key] for key in STATS_KEYS})
    return buffer.getvalue()


def format_interval(low: float | None, high: float | None, signed: bool = True) -> str:
    """``[+0.123, +0.456]`` (or ``[0.123, 0.456]``); ``n/a`` when the interval is undefined."""
    if low is None or high is None:
        return "n/a"
    spec = "+.3f" if signed else ".3f"
    return f"[{low:{spec}}, {high:{spec}}]"


def format_p_value(p: float) -> str:
    """Three significant digits, switching to scientific notation below 0.001."""
    return f"{p:.3f}" if p >= 0.001 else f"{p:.2e}"


def stats_to_table(stats: list[dict]) -> str:
    """A plain, aligned text table for the terminal (rounded for reading, not for reuse)."""
    header = ("comparison", "dimension", "model", "W", "L", "T", "NWR", "NWR 95% CI")
    header += ("win% excl ties", "Wilson 95% CI", "p")
    lines = [header]
    for row in stats:
        p = row["win_rate_excl_ties"]
        lines.append(
            (
                row["comparison"],
                row["dimension"],
                row["model"],
                str(row["wins"]),
                str(row["losses"]),
                str(row["ties"]),
                f"{row['net_win_rate']:+.3f}",
                format_interval(row["nwr_ci_low"], row["nwr_ci_high"]),
                "n/a" if p is None else f"{p:.3f}",
                format_interval(row["win_rate_ci_low"], row["win_rate_ci_high"], signed=False),
                format_p_value(row["p_value"]),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = set(range(3, len(header)))
    text = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths))
        )
        for line in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in text) + "\n"


FORMATTERS = {"json": stats_to_json, "csv": stats_to_csv, "table": stats_to_table}


def stats_command(path: str | Path, fmt: str = "table", out: str | Path | None = None) -> int:
    """``hialign stats``: one stats object per input row, in input order; returns the exit code."""
    if fmt not in FORMATTERS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATTERS)}")
    rows = read_counts_csv(path)
    stats = [
        comparison_stats(
            r["comparison"], r["dimension"], r["model"], r["wins"], r["losses"], r["ties"]
        )
        for r in rows
    ]
    text = FORMATTERS[fmt](stats)

    if out is None:
        print(text, end="")
    else:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text, encoding="utf-8")
        logger.info("wrote statistics for %d rows to %s (%s)", len(stats), out, fmt)
    return 0
