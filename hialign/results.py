"""Judging the groups against each other, counting verdicts, and assembling results.json."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from dataclasses import asdict

from hialign import __version__

logger = logging.getLogger(__name__)

BASE_GROUP = "Base Model"


def group_name(strategy: str) -> str:
    """Report name of a strategy's group: full -> Full-DPO, local+global -> Local+Global-Align."""
    from hialign.partition import FULL

    if strategy == FULL:
        return "Full-DPO"
    return "+".join(part.capitalize() for part in strategy.split("+")) + "-Align"


def judge_groups(
    config, out, base, tokenizer, resolved, eval_pairs, answers, comparisons, timings
) -> dict:
    """Judge every comparison on every eval prompt; save every raw verdict; count W/L/T."""
    from hialign.data import render_prompt
    from hialign.judge import DIMENSIONS, JudgeItem, build_judge
    from hialign.judge.command import parse_prices

    clock = time.perf_counter()
    local_model = None
    if config.judge_url is None and config.judge_model is None:
        local_model = (base, tokenizer, resolved.display_name)  # reuse the loaded base model
    judge = build_judge(
        url=config.judge_url,
        model=config.judge_model,
        api_key_env=config.judge_api_key_env,
        concurrency=config.judge_concurrency,
        cache_path=out / "judge_cache.sqlite",
        max_retries=config.judge_max_retries,
        parse_retries=config.judge_parse_retries,
        timeout=config.judge_timeout,
        max_tokens=config.judge_max_tokens,
        prices=parse_prices(config.judge_prices),
        local_model=local_model,
    )
    items, meta = [], []
    for name, group_a, group_b in comparisons:
        for i, pair in enumerate(eval_pairs):
            items.append(
                JudgeItem(
                    f"{name}#{i}", list(pair.prompt), answers[group_a][i], answers[group_b][i]
                )
            )
            meta.append(
                dict(
                    comparison=name,
                    index=i,
                    group_a=group_a,
                    group_b=group_b,
                    source=pair.source,
                    prompt=render_prompt(pair),
                )
            )
    results = judge.judge(items)

    tallies = {
        (name, d): dict(wins=0, losses=0, ties=0, invalid=0)
        for name, _, _ in comparisons
        for d in DIMENSIONS
    }
    outcome = {"a": "wins", "b": "losses", "tie": "ties", "invalid": "invalid"}
    with open(out / "judgements.jsonl", "w") as f:
        for item, info, result in zip(items, meta, results):
            for dim, verdict in result.verdicts.items():
                tallies[(info["comparison"], dim)][outcome[verdict]] += 1
            row = dict(
                info,
                id=item.id,
                response_a=item.response_a,
                response_b=item.response_b,
                verdicts=result.verdicts,
                orders=result.orders,
                judge=result.judge,
            )
            f.write(json.dumps(row, default=str) + "\n")
    timings["judge"] = time.perf_counter() - clock
    return dict(describe=judge.describe(), summary=judge.summary(), tallies=tallies)


def comparison_rows(tallies: dict, model_name: str) -> list[dict]:
    """One statistics row per comparison x dimension; rows with only invalid verdicts keep their
    counts and get no statistics (None) rather than invented ones."""
    from hialign.stats import DIMENSION_LABELS, comparison_stats

    rows = []
    for (name, dim), counts in tallies.items():
        w, l, t = counts["wins"], counts["losses"], counts["ties"]
        if w + l + t == 0:
            row = dict(
                comparison=name,
                dimension=DIMENSION_LABELS[dim],
                model=model_name,
                wins=0,
                losses=0,
                ties=0,
                total=0,
            )
        else:
            row = comparison_stats(name, DIMENSION_LABELS[dim], model_name, w, l, t)
        row["invalid"] = counts["invalid"]
        rows.append(row)
    return rows


def assemble_results(
    config,
    resolved,
    num_layers,
    projections,
    blocks,
    strategies,
    data,
    train_pairs,
    eval_pairs,
    too_long,
    training,
    decoding,
    judged,
    comparisons,
    timings,
) -> dict:
    judge_info = dict(judged["describe"])
    judge_info.update(judged["summary"])
    skipped = [dict(source=s.source, reason=s.reason) for s in data.skipped]
    return {
        "hialign_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "model": dict(
            spec=resolved.spec,
            name=resolved.display_name,
            num_layers=num_layers,
            attention_projections=projections,
        ),
        "blocks": [dict(name=b.name, layers=list(b.layers)) for b in blocks],
        "strategies": strategies,
        "settings": config.to_dict(),
        "data": dict(
            source=config.data,
            rows_read=data.rows_read,
            pairs_valid=len(data.pairs),
            train_pairs=len(train_pairs) - len(too_long),
            eval_prompts=len(eval_pairs),
            skipped=data.skip_counts(),
            skipped_rows=skipped,
            too_long=len(too_long),
            too_long_rows=[dict(source=s.source, reason=s.reason) for s in too_long],
        ),
        "training": training,
        "generation": dict(
            prompts=len(eval_pairs),
            groups=[BASE_GROUP] + [group_name(s) for s in strategies],
            **asdict(decoding),
        ),
        "judge": judge_info,
        "comparisons": comparison_rows(judged["tallies"], resolved.display_name),
        "timings": timings,
    }
