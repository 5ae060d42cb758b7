"""The paper's three predictions, tested on a run's statistics rows with their intervals.

(i) Local-Align improves grammar/fluency over Full-DPO with little effect on coherence and
factuality; (ii) Global-Align is best on factuality and coherence; (iii) Full-DPO pays an
alignment tax against the base model that the hierarchical strategies avoid. Each prediction is
``held`` True/False, or None when the rows cannot decide it.
"""

from __future__ import annotations

from hialign.stats import (
    dimension_order,
    format_interval,
    headline_rows,
    ordered,
    significance,
)

FULL_DPO = "Full-DPO"
GRAMMAR, COHERENCE, FACTUALITY = "Grammar Fluency", "Coherence", "Factuality"
LOCAL, MID, GLOBAL, BASE = "Local-Align", "Mid-Align", "Global-Align", "Base Model"
TAX_COMPARISON = f"{FULL_DPO} vs. {BASE}"
VERDICT = {True: "held", False: "not held", None: "undecided"}
YES_NO = {True: "yes", False: "no", None: "undecided"}


def _versus_full(group: str) -> str:
    return f"{group} vs. {FULL_DPO}"


def _all(parts) -> bool | None:
    """Three-valued AND: False if any part is False, else None if any is undecided, else True."""
    parts = list(parts)
    if False in parts:
        return False
    return None if None in parts else True


# "Significant" = NWR 95% CI excludes 0 and exact binomial p < 0.05 (see stats.significance).


def _significantly_above(row):
    sign = significance(row)
    return None if sign is None else sign == 1


def _significantly_below(row):
    sign = significance(row)
    return None if sign is None else sign == -1


def _not_significant(row):
    sign = significance(row)
    return None if sign is None else sign == 0


def _quote(cells: dict, comparison: str, dimension: str) -> str:
    """``Local-Align vs. Full-DPO, Coherence: NWR +0.030 [-0.028, +0.088]`` (or why not)."""
    row = cells.get((comparison, dimension))
    if row is None:
        return f"{comparison}, {dimension}: no judgements"
    interval = format_interval(row["nwr_ci_low"], row["nwr_ci_high"])
    if row["nwr_ci_low"] is None:
        interval = f"(all {row['total']} judgements tied, no interval)"
    nwr = f"NWR {row['net_win_rate']:+.3f} {interval}"
    return f"{comparison}, {dimension}: {nwr}, p {row['p_value']:.3g}"


def _prediction_local(cells: dict) -> dict:
    local = _versus_full(LOCAL)
    parts = [_significantly_above(cells.get((local, GRAMMAR)))]
    parts += [_not_significant(cells.get((local, dim))) for dim in (COHERENCE, FACTUALITY)]
    return {
        "id": "i",
        "statement": f"{LOCAL} improves {GRAMMAR} over {FULL_DPO} significantly (NWR 95% CI "
        f"above 0 and binomial p < 0.05) with no significant effect on {COHERENCE} or "
        f"{FACTUALITY}.",
        "held": _all(parts),
        "evidence": "; ".join(_quote(cells, local, d) for d in (GRAMMAR, COHERENCE, FACTUALITY)),
    }


def _prediction_global(cells: dict) -> dict:
    parts, evidence = [], []
    for dim in (FACTUALITY, COHERENCE):
        mine = cells.get((_versus_full(GLOBAL), dim))
        rivals = {group: cells.get((_versus_full(group), dim)) for group in (LOCAL, MID)}
        highest = None
        if mine is not None and None not in rivals.values():
            best_rival = max(r["net_win_rate"] for r in rivals.values())
            # A tie for the top (e.g. every row all ties) cannot decide "best": undecided.
            if mine["net_win_rate"] != best_rival:
                highest = mine["net_win_rate"] > best_rival
        above = _significantly_above(mine)
        parts += [highest, above]
        rival_nwr = ", ".join(
            f"{group} {'n/a' if r is None else format(r['net_win_rate'], '+.3f')}"
            for group, r in rivals.items()
        )
        evidence.append(
            f"{_quote(cells, _versus_full(GLOBAL), dim)} (vs. {rival_nwr}): highest "
            f"{YES_NO[highest]}, significantly above 0 {YES_NO[above]}"
        )
    return {
        "id": "ii",
        "statement": f"{GLOBAL} is best on {FACTUALITY} and {COHERENCE}: on both, (a) its NWR vs. "
        f"{FULL_DPO} is the highest of the three hierarchical strategies (point estimates; the "
        "gaps between strategies are not tested) and (b) it is significantly above 0 (NWR 95% "
        "CI above 0 and binomial p < 0.05).",
        "held": _all(parts),
        "evidence": "; ".join(evidence),
    }


def _prediction_tax(cells: dict, dimensions: list[str]) -> dict:
    statement = (
        f"{FULL_DPO} pays an alignment tax (a significant loss vs. {BASE}: NWR 95% CI below 0 "
        "and binomial p < 0.05, on some dimension) and, on each such dimension, every "
        f"hierarchical strategy does significantly better than {FULL_DPO}. Hierarchical "
        f"strategies are judged only against {FULL_DPO}, not {BASE}, so this tests a necessary "
        "consequence of 'avoids the tax', not the claim itself."
    )
    tax = {dim: _significantly_below(cells.get((TAX_COMPARISON, dim))) for dim in dimensions}
    taxed = [dim for dim, paid in tax.items() if paid]
    # Every strategy judged against Full-DPO counts, unions of blocks included.
    rivals = ordered(c for c, _ in cells if c.endswith(f" vs. {FULL_DPO}"))
    if not taxed:
        held = None if None in tax.values() else False
        quotes = "; ".join(_quote(cells, TAX_COMPARISON, d) for d in dimensions)
        evidence = f"no dimension with a significant loss vs. {BASE}: {quotes}"
    elif not rivals:
        held, evidence = None, f"no hierarchical strategy was judged against {FULL_DPO}"
    else:
        held = _all(_significantly_above(cells.get((name, d))) for d in taxed for name in rivals)
        quotes = [_quote(cells, name, d) for d in taxed for name in [TAX_COMPARISON, *rivals]]
        evidence = "; ".join(quotes)
    return {"id": "iii", "statement": statement, "held": held, "evidence": evidence}


def evaluate_predictions(rows: list[dict]) -> list[dict]:
    """Test the three Hierarchical Alignment predictions on the headline (pooled) rows.

    Each result is ``{"id", "statement", "held", "evidence"}``; ``held`` is None when the data
    cannot decide (missing comparisons, or all judgements tied so there is no interval).
    """
    headline = headline_rows(rows)
    cells = {(r["comparison"], r["dimension"]): r for r in headline}
    dimensions = dimension_order(headline) or [GRAMMAR, COHERENCE, FACTUALITY]
    return [_prediction_local(cells), _prediction_global(cells), _prediction_tax(cells, dimensions)]


# --- Markdown ----------------------------------------------------------------------------------
