"""``hialign judge PAIRS --out VERDICTS``: judge a pairs file and write ordered verdict rows."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from hialign.judge.factory import build_judge
from hialign.judge.items import DIMENSIONS, JudgeResult, read_pairs

logger = logging.getLogger(__name__)


def parse_prices(text: str | None) -> dict | None:
    """``"0.55,2.19"`` (prompt, completion per million tokens) -> ``{"prompt": .., ...}``."""
    if not text:
        return None
    try:
        prompt, completion = (float(part) for part in text.split(","))
    except ValueError:
        raise ValueError(
            f"prices must be 'PROMPT,COMPLETION' per million tokens, got {text!r}"
        ) from None
    return {"prompt": prompt, "completion": completion}


def write_verdicts(path: str | Path, results: list[JudgeResult]) -> None:
    """Write all rows, in input order, atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
    os.replace(partial, path)


def _percent(rate: float | None) -> str:
    return "n/a" if rate is None else f"{100 * rate:.1f}%"


def summary_line(summary: dict) -> str:
    """One line for the end of a run: work done, failures, position bias, tokens and cost."""
    invalid = summary["invalid"]
    line = (
        f"judged {summary['judgements']} pairs ({summary['judge_calls']} calls): "
        f"{summary['http_requests']} HTTP requests, {summary['cache_hits']} cache hits, "
        f"{summary.get('repeats_shared', 0)} identical calls shared, "
        f"{summary['retries']} retries, {summary['parse_reasks']} re-asks; "
        f"invalid {sum(invalid.values())} ("
        + ", ".join(f"{dim} {invalid[dim]}" for dim in DIMENSIONS)
        + f"); order disagreement {_percent(summary['position_disagreement_rate'])}, "
        f"first-shown wins {_percent(summary['first_shown_win_rate'])}; "
        f"tokens {summary['prompt_tokens']:,} prompt + {summary['completion_tokens']:,} completion"
    )
    if summary.get("cost") is not None:
        line += f"; cost {summary['cost']:.4f}"
    return line


def judge_command(args) -> int:
    """Entry point of ``hialign judge``; returns the process exit code."""
    items = read_pairs(args.pairs)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        # One INFO line per HTTP request from the client library would drown the progress bar.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    if not items:
        raise ValueError(f"{args.pairs}: no pairs to judge")

    judge = build_judge(
        url=args.judge_url,
        model=args.judge_model,
        api_key_env=args.api_key_env,
        concurrency=args.concurrency,
        cache_path=args.cache or f"{args.out}.cache.sqlite",
        max_retries=args.max_retries,
        parse_retries=args.parse_retries,
        timeout=args.judge_timeout,
        max_tokens=args.judge_max_tokens,
        prices=parse_prices(getattr(args, "judge_prices", None)),
    )
    described = judge.describe()
    logger.info("judge: %s (%s)", described["name"], described["kind"])
    try:
        results = judge.judge(items, progress=True)
    finally:
        judge.close()

    write_verdicts(args.out, results)
    logger.info("wrote %d verdict rows to %s", len(results), args.out)
    if described["warning"]:
        logger.warning("judge warning: %s", described["warning"])
    summary = judge.summary()
    print(summary_line(summary), flush=True)
    if summary["judgements"] and sum(summary["invalid"].values()) == summary["judgements"] * len(
        DIMENSIONS
    ):
        logger.error(
            "every verdict is invalid: the judge's answers could not be read (raw answers are "
            "in %s); check --judge-model and the endpoint",
            args.out,
        )
        return 3
    return 0
