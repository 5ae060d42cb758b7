"""Position debiasing: map each order's verdicts back to the pair, combine, measure the bias.

Judges favour whichever answer they see first, so every pair is judged twice, once per order.
Agreeing verdicts stand, disagreeing ones become a tie, and an invalid order makes the dimension
invalid (a failure is never counted as a tie). How often the orders disagree and how often the
first-shown answer wins are the judge's own position-bias measurements.
"""

from __future__ import annotations

from collections.abc import Iterable

from hialign.judge.items import DIMENSIONS, INVALID, JudgeResult, OrderVerdict


def shown_to_pair(label: str, order: str) -> str:
    """Map a label as shown ("A" | "B" | "tie" | "invalid") to the pair ("a" | "b" | ...)."""
    if label in ("tie", INVALID):
        return label
    if label not in ("A", "B"):
        raise ValueError(f"unknown shown label {label!r}")
    first, second = ("a", "b") if order == "ab" else ("b", "a")
    return first if label == "A" else second


def combine_verdicts(first: str, second: str) -> str:
    """Combine one dimension's pair-verdicts from the two orders."""
    if INVALID in (first, second):
        return INVALID
    return first if first == second else "tie"


def combine_orders(orders: list[OrderVerdict]) -> dict[str, str]:
    """Combined verdict per dimension from the ``ab`` and ``ba`` order verdicts."""
    by_order = {o.order: o for o in orders}
    if set(by_order) != {"ab", "ba"}:
        raise ValueError(f"need one verdict per order ab and ba, got {sorted(by_order)}")
    return {
        dim: combine_verdicts(by_order["ab"].verdicts[dim], by_order["ba"].verdicts[dim])
        for dim in DIMENSIONS
    }


def position_stats(results: Iterable[JudgeResult]) -> dict:
    """Order disagreement and first-shown wins over results (rates are None with no data).

    Disagreement counts dimension-verdicts whose two orders are both valid and differ. The
    first-shown win rate is the share of valid, non-tie single-order verdicts that picked the
    answer shown first (label "A").
    """
    both_valid = disagreements = decisive = first_wins = 0
    for result in results:
        by_order = {o["order"]: o for o in result.orders}
        for dim in DIMENSIONS:
            pair = [by_order[order]["verdicts"][dim] for order in ("ab", "ba")]
            if INVALID not in pair:
                both_valid += 1
                disagreements += pair[0] != pair[1]
            for order in ("ab", "ba"):
                shown = by_order[order]["shown"][dim]
                if shown in ("A", "B"):
                    decisive += 1
                    first_wins += shown == "A"
    return {
        "both_orders_valid": both_valid,
        "order_disagreements": disagreements,
        "position_disagreement_rate": disagreements / both_valid if both_valid else None,
        "decisive_single_order": decisive,
        "first_shown_wins": first_wins,
        "first_shown_win_rate": first_wins / decisive if decisive else None,
    }


def invalid_counts(results: Iterable[JudgeResult]) -> dict[str, int]:
    """Number of invalid combined verdicts per dimension (excluded from W/L/T)."""
    counts = dict.fromkeys(DIMENSIONS, 0)
    for result in results:
        for dim in DIMENSIONS:
            counts[dim] += result.verdicts[dim] == INVALID
    return counts


def win_loss_tie(results: Iterable[JudgeResult]) -> dict[str, dict[str, int]]:
    """Counts per dimension: wins of response_a, losses (b wins), ties and invalid."""
    table = {dim: {"wins": 0, "losses": 0, "ties": 0, "invalid": 0} for dim in DIMENSIONS}
    column = {"a": "wins", "b": "losses", "tie": "ties", INVALID: "invalid"}
    for result in results:
        for dim in DIMENSIONS:
            table[dim][column[result.verdicts[dim]]] += 1
    return table
