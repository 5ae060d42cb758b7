"""The judge stage's common loop: cache look-ups, both orders per pair, combination, tallies.

A backend (local log-probabilities, or an OpenAI-compatible endpoint) only answers judge calls:
one pair shown in one order. Everything else, including the SQLite cache, the progress bar and
the position-bias statistics, lives here, so both backends report the same numbers.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from tqdm.auto import tqdm

from hialign.judge.cache import JudgeCache, call_key
from hialign.judge.combine import combine_orders, invalid_counts, position_stats, shown_to_pair
from hialign.judge.items import DIMENSIONS, INVALID, ORDERS, JudgeItem, JudgeResult, OrderVerdict
from hialign.judge.prompts import template_fingerprint

logger = logging.getLogger(__name__)

_POSITION_COUNTS = ("both_orders_valid", "order_disagreements", "decisive_single_order")


@dataclass
class JudgeCall:
    """One question to a judge: a pair shown in one order; ``key`` identifies it in the cache."""

    item: JudgeItem
    order: str
    key: str


DoneCallback = Callable[[JudgeCall, OrderVerdict], None]


class Judge:
    """Pairwise judge on four dimensions, both orders, position-debiased; see ``judge``."""

    kind = "base"
    template_version = ""

    def __init__(self, *, name: str, model: str, cache: JudgeCache | None, prices=None):
        self.name = name
        self.model = model
        self.cache = cache
        self.prices = prices
        self._lock = threading.Lock()
        self._counts = {
            "judgements": 0,
            "judge_calls": 0,
            "http_requests": 0,
            "cache_hits": 0,
            "repeats_shared": 0,  # calls identical to another call of the batch, asked once
            "retries": 0,
            "parse_reasks": 0,
            "invalid_orders": 0,
            "judge_directed_removed": 0,
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "first_shown_wins": 0,
            **dict.fromkeys(_POSITION_COUNTS, 0),
        }
        self._invalid = dict.fromkeys(DIMENSIONS, 0)

    # -- backend hooks -------------------------------------------------------------------------

    def decoding(self) -> dict:
        """Decoding settings that change the judge's answers (part of every cache key)."""
        raise NotImplementedError

    def warning(self) -> str | None:
        """A plain statement of a known weakness of this judge, shown in reports."""
        return None

    def _run_calls(self, calls: list[JudgeCall], done: DoneCallback) -> None:
        """Answer every call, invoking ``done`` once per call as soon as it is answered."""
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "name": self.name,
            "model": self.model,
            "warning": self.warning(),
        }

    def judge(self, items: list[JudgeItem], progress: bool = True) -> list[JudgeResult]:
        """Judge every pair in both orders; results come back in the order of ``items``."""
        template = self._template()
        decoding = self.decoding()
        calls = [
            JudgeCall(item, order, call_key(self.model, template, item, order, decoding))
            for item in items
            for order in ORDERS
        ]
        answers: dict[str, OrderVerdict] = {}
        if self.cache is not None:
            for call in calls:
                hit = answers.get(call.key) or self.cache.get(call.key)
                if hit is not None:
                    hit.source = "cache"
                    answers[call.key] = hit
        hits = sum(1 for c in calls if c.key in answers)

        # Identical questions (same pair text and order) are asked once and shared.
        copies = Counter(c.key for c in calls)
        pending = list({c.key: c for c in calls if c.key not in answers}.values())
        bar = tqdm(
            total=len(calls),
            initial=hits,
            desc=f"judge {self.name}",
            unit="call",
            disable=not progress,
            dynamic_ncols=True,
        )

        def done(call: JudgeCall, verdict: OrderVerdict) -> None:
            verdict.verdicts = {d: shown_to_pair(verdict.shown[d], call.order) for d in DIMENSIONS}
            with self._lock:
                answers[call.key] = verdict
                self._counts["prompt_tokens"] += verdict.prompt_tokens
                self._counts["completion_tokens"] += verdict.completion_tokens
                tokens = self._counts["prompt_tokens"] + self._counts["completion_tokens"]
            if self.cache is not None and INVALID not in verdict.shown.values():
                self.cache.put(call.key, verdict, judge_model=self.model, template=template)
            bar.set_postfix(tokens=tokens, refresh=False)
            bar.update(copies[call.key])

        try:
            if pending:
                logger.info(
                    "%s: %d judge calls, %d from cache, %d to ask",
                    self.name,
                    len(calls),
                    hits,
                    len(pending),
                )
                self._run_calls(pending, done)
        finally:
            bar.close()

        results = []
        for index, item in enumerate(items):
            orders = [answers[calls[2 * index + k].key] for k in range(len(ORDERS))]
            results.append(
                JudgeResult(
                    id=item.id,
                    verdicts=combine_orders(orders),
                    orders=[o.to_json() for o in orders],
                    judge=self.name,
                )
            )
        self._tally(results, [answers[c.key] for c in calls], hits)
        with self._lock:
            self._counts["repeats_shared"] += len(calls) - hits - len(pending)
        return results

    def summary(self) -> dict:
        """Totals over every ``judge`` call made on this judge so far."""
        counts = dict(self._counts)
        both, decisive = counts["both_orders_valid"], counts["decisive_single_order"]
        counts["invalid"] = dict(self._invalid)
        counts["position_disagreement_rate"] = (
            counts["order_disagreements"] / both if both else None
        )
        counts["first_shown_win_rate"] = counts["first_shown_wins"] / decisive if decisive else None
        counts["cost"] = self._cost()
        counts["judge"] = self.name
        return counts

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()

    # -- internals -------------------------------------------------------------------------------

    def _template(self) -> str:
        return f"{self.template_version}:{template_fingerprint(self.template_version)}"

    def _tally(self, results: list[JudgeResult], orders: list[OrderVerdict], hits: int) -> None:
        stats = position_stats(results)
        with self._lock:
            self._counts["judgements"] += len(results)
            self._counts["judge_calls"] += len(orders)
            self._counts["cache_hits"] += hits
            for name in (*_POSITION_COUNTS, "first_shown_wins"):
                self._counts[name] += stats[name]
            for dim, count in invalid_counts(results).items():
                self._invalid[dim] += count
            self._counts["invalid_orders"] += sum(INVALID in o.shown.values() for o in orders)
            self._counts["judge_directed_removed"] += sum(
                o.detail.get("judge_directed_removed", 0) for o in orders
            )

    def _cost(self) -> float | None:
        """Cost from prices in currency per million tokens: {"prompt": p, "completion": c}."""
        if not self.prices:
            return None
        per_prompt = float(self.prices.get("prompt", 0.0))
        per_completion = float(self.prices.get("completion", 0.0))
        return (
            self._counts["prompt_tokens"] * per_prompt
            + self._counts["completion_tokens"] * per_completion
        ) / 1e6
