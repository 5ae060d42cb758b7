"""The ``hialign probe`` command: run the Hypothesis-2 probe and write probe.json/.md/per_layer.png.

Pairs can be split by objective: ``--tag-column COL`` gives one group per value of a raw JSONL
column (e.g. a ``category`` field marking a factuality subset), and ``--subset NAME=REGEX`` one
group of the pairs whose prompt matches REGEX. Every group reuses the same per-pair gradients,
so groups cost no extra model passes.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from hialign.partition import Block, blocks_from_spans, format_block_map, partition_layers
from hialign.probe import (
    MIN_PAIRS_FOR_VERDICT,
    GradientProfile,
    layer_profile,
    probe_pairs,
    sample_tokenized_pairs,
    summarise,
    verdict_sentence,
)
from hialign.segmentation import (
    default_min_size,
    explained_variance,
    format_maps_side_by_side,
    profile_blocks,
)

logger = logging.getLogger(__name__)

# SmolLM2-135M, bf16, max length 256, 2 CPU cores: 160 hh-rlhf pairs took 468 CPU-seconds
# (11 min wall on a machine shared at load ~5), so about 4-5 min unloaded; the headroom covers
# data whose pairs fill the whole max length.
VERDICT_RULE = (
    "Rule: Hypothesis 2 holds for a group when the 95% percentile-bootstrap interval (pairs "
    "resampled with replacement, all blocks from the same resample) of the top block's mean "
    "gradient norm per parameter (‖g‖/√params, the root-mean-square per-parameter gradient) "
    "divided by the largest other block's lies entirely above 1."
)
BLOCK_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")


def read_column(spec: str, column: str) -> dict[str, str]:
    """``{source: str(value)}`` of one raw JSONL column, keyed like ``PreferencePair.source``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.name.endswith((".jsonl", ".jsonl.gz")))
    elif path.is_file():
        files = [path]
    else:
        raise ValueError(f"--tag-column needs local JSONL data; {spec} is not a file or folder")
    values, rows = {}, 0
    for file in files:
        opener = gzip.open if file.name.endswith(".gz") else open
        with opener(file, "rb") as handle:
            for line, raw in enumerate(handle, start=1):
                with contextlib.suppress(ValueError):
                    row = json.loads(raw)
                    rows += isinstance(row, dict)
                    if isinstance(row, dict) and row.get(column) is not None:
                        values[f"{file.name}:{line}"] = str(row[column])
    if rows and not values:
        raise ValueError(f"--tag-column {column!r}: no row of {spec} has that column")
    return values


def objective_groups(
    pairs: Sequence, tag_column_values: dict[str, str] | None, subsets: Sequence[str]
) -> dict[str, list[int]]:
    """Pair indices per group: ``all``, one per tag value, one per ``NAME=REGEX`` subset."""
    from hialign.data import render_prompt

    groups = {"all": list(range(len(pairs)))}
    if tag_column_values is not None:
        for i, pair in enumerate(pairs):
            tag = tag_column_values.get(pair.source)
            if tag is not None:
                groups.setdefault(f"tag={tag}", []).append(i)
        untagged = len(pairs) - sum(len(v) for k, v in groups.items() if k != "all")
        if untagged:
            logger.warning("%d probed pairs have no value in the tag column", untagged)
    for subset in subsets:
        name, regex = parse_subset(subset)
        groups[name] = [i for i, p in enumerate(pairs) if regex.search(render_prompt(p))]
    return groups


def parse_subset(subset: str) -> tuple[str, re.Pattern]:
    """``NAME=REGEX`` -> (name, case-insensitive pattern); errors name the flag."""
    name, sep, pattern = subset.partition("=")
    if not sep or not name or not pattern:
        raise ValueError(f"--subset {subset!r} is not of the form NAME=REGEX")
    try:
        return name, re.compile(pattern, re.IGNORECASE)
    except re.error as err:
        raise ValueError(f"--subset {subset!r}: bad regular expression: {err}") from None


def plot_per_layer(
    profile: GradientProfile,
    summaries: dict[str, dict],
    blocks: Sequence[Block],
    auto: Sequence[Block],
    path: Path,
    title: str,
) -> Path:
    """One panel per group: per-layer gradient norm per parameter with 95% intervals, bars
    coloured by block, block boundaries dashed and the data-driven boundaries dotted."""
    figure = Figure(figsize=(max(7.0, 0.28 * profile.num_layers + 2.5), 2.8 * len(summaries) + 0.6))
    FigureCanvasAgg(figure)
    colour_of = {l: BLOCK_COLOURS[k % 6] for k, b in enumerate(blocks) for l in b.layers}
    layers = np.arange(profile.num_layers)
    for row, (group, summary) in enumerate(summaries.items()):
        axes = figure.add_subplot(len(summaries), 1, row + 1)
        means = np.array([r["normalised"] for r in summary["layers"]])
        ci = np.array([r["normalised_ci"] for r in summary["layers"]], dtype=float)
        errors = np.abs(np.stack([means - ci[:, 0], ci[:, 1] - means]))
        axes.bar(layers, means, color=[colour_of[l] for l in layers], width=0.8)
        if np.all(np.isfinite(errors)):
            axes.errorbar(layers, means, yerr=errors, fmt="none", ecolor="black", lw=0.8)
        top = max(means.max(), np.nanmax(ci[:, 1]) if np.isfinite(ci).any() else 0) * 1.12
        for k, b in enumerate(blocks):
            if k:
                axes.axvline(b.layers[0] - 0.5, color="grey", ls="--", lw=1)
            middle = (b.layers[0] + b.layers[-1]) / 2
            axes.text(middle, top, b.name, ha="center", va="top", fontsize=9)
        for b in auto[1:]:
            axes.axvline(b.layers[0] - 0.5, color="crimson", ls=":", lw=1.6)
        verdict = {True: "held", False: "not held", None: "no verdict"}[summary["verdict"]]
        axes.set_title(f"{group} (n={summary['n_pairs']}): Hypothesis 2 {verdict}", fontsize=10)
        axes.set_ylim(0, top * 1.05)
        axes.set_xlim(-0.7, profile.num_layers - 0.3)
        axes.set_ylabel("‖∂ℓ/∂Θ‖ / √params")
    axes.set_xlabel("decoder layer (dashed: blocks, dotted red: data-driven partition)")
    figure.suptitle(title, fontsize=11)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def _fmt(value: float, ci: Sequence[float] | None) -> str:
    if ci is None or not all(math.isfinite(x) for x in ci):  # one pair: no bootstrap
        return f"{value:.3g} [n/a]"
    return f"{value:.3g} [{ci[0]:.3g}, {ci[1]:.3g}]"


def markdown_report(result: dict) -> str:
    """probe.md: settings, rule, one section per group, and the data-driven partition."""
    s, t = result["settings"], result["timings"]
    lines = [
        f"# Hypothesis-2 probe: {result['model']} on {result['data']}",
        "",
        f"{result['n_pairs']} pairs ({result['skipped_pairs']} skipped while tokenising), "
        f"max length {s['max_length']}, beta {s['beta']}, {s['precision']}, seed {s['seed']}; "
        f"gradient of the DPO loss at the start of training (policy = reference, loss = log 2) "
        f"with respect to the self-attention projection weights ({', '.join(result['projections'])}"
        f").",
        "",
        f"Probe time: {t['probe_s']:.0f} s wall, {t['probe_cpu_s']:.0f} s CPU on {t['device']} "
        f"({t['threads']} threads; load average {t['load_average_before']:.1f} before, "
        f"{t['load_average_after']:.1f} after).",
        "",
        VERDICT_RULE,
        "",
    ]
    for group, summary in result["groups"].items():
        lines += [f"## {group} ({summary['n_pairs']} pairs)", "", summary["sentence"], ""]
        header = "| block | layers | params | E‖g‖ raw [95% CI] "
        header += "| E‖g‖/√params [95% CI] | share |"
        lines += [header, "|---|---|---:|---|---|---:|"]
        for b in summary["blocks"]:
            lines.append(
                f"| {b['name']} | {b['layers'][0]}-{b['layers'][1]} | {b['params']:,} | "
                f"{_fmt(b['raw'], b['raw_ci'])} | {_fmt(b['normalised'], b['normalised_ci'])} | "
                f"{b['share']:.2f} |"
            )
        if summary.get("concentration_ratio_ci"):
            lo, hi = summary["concentration_ratio_ci"]
            dlo, dhi = summary["dominance_ratio_ci"]
            lines += [
                "",
                f"Concentration ratio (top block {summary['top_block']} / mean of the others): "
                f"{summary['concentration_ratio']:.2f} [{lo:.2f}, {hi:.2f}]; "
                f"top / runner-up ({summary['runner_up']}): {summary['dominance_ratio']:.2f} "
                f"[{dlo:.2f}, {dhi:.2f}].",
            ]
        lines.append("")
    if result.get("objectives_sentence"):
        lines += ["## Objectives", "", result["objectives_sentence"], ""]
    auto = result["auto_partition"]
    lines += [
        "## Data-driven partition (`--blocks auto`)",
        "",
        auto["rule"],
        "",
        "```",
        auto["map"],
        "```",
        "",
        f"Share of the log profile's variance explained: {auto['explained_auto']:.2f} (auto) vs "
        f"{auto['explained_equal']:.2f} (equal blocks).",
        "",
        "## Per layer (all pairs)",
        "",
        "| layer | E‖g‖ raw [95% CI] | E‖g‖/√params [95% CI] |",
        "|---:|---|---|",
    ]
    for r in result["groups"]["all"]["layers"]:
        lines.append(
            f"| {r['layer']} | {_fmt(r['raw'], r['raw_ci'])} | "
            f"{_fmt(r['normalised'], r['normalised_ci'])} |"
        )
    return "\n".join(lines) + "\n"


def objectives_sentence(summaries: dict[str, dict]) -> str | None:
    """Whether groups other than ``all`` concentrate in different blocks, each at 95%."""
    judged = {g: s for g, s in summaries.items() if g != "all" and s.get("verdict") is not None}
    if len(judged) < 2:
        return None
    tops = ", ".join(f"{g} -> {s['top_block']}" for g, s in judged.items())
    held = {g: s["top_block"] for g, s in judged.items() if s["verdict"]}
    if len(set(held.values())) >= 2:
        return f"Different objectives concentrate in different blocks, each at 95%: {tops}."
    return (
        f"No two objectives concentrate in different blocks with each concentration held at "
        f"95% ({tops}; held: {', '.join(held) or 'none'})."
    )


def check_probe_arguments(args) -> None:
    """Refuse bad flags before data or model load (and before minutes of gradients)."""
    for flag, value, low in (
        ("--pairs", args.pairs, 2),  # a bootstrap over pairs needs two
        ("--max-length", args.max_length, 2),
        ("--batch-size", args.batch_size, 1),
        ("--num-blocks", args.num_blocks, 1),
        ("--bootstrap", args.bootstrap, 1),
    ):
        if value < low:
            raise ValueError(f"{flag} must be >= {low}, got {value}")
    if not args.beta > 0:
        raise ValueError(f"--beta must be > 0, got {args.beta}")
    if args.min_block_size is not None and args.min_block_size < 1:
        raise ValueError(f"--min-block-size must be >= 1, got {args.min_block_size}")
    for subset in args.subset or []:
        parse_subset(subset)
    if args.tag_column:
        read_column(args.data, args.tag_column)  # a misspelt column fails now, not after minutes
    if args.device != "auto":
        try:
            device = torch.device(args.device)
        except RuntimeError as err:
            raise ValueError(f"--device {args.device!r}: {err}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this torch build sees no CUDA device")


def run_probe(args) -> dict:
    """Load model and data, probe, summarise every group, write the three outputs."""
    from hialign.data import load_preferences
    from hialign.modeling import load_model

    check_probe_arguments(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clock = time.perf_counter()
    data = load_preferences(args.data, strict=args.strict, split=args.data_split)
    model, tokenizer, resolved = load_model(args.model)
    device = torch.device(
        args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    )
    model.to(device)
    tokenized, skipped = sample_tokenized_pairs(
        tokenizer, data.pairs, args.pairs, args.max_length, args.seed
    )
    if len(tokenized) < 2:
        raise ValueError(f"only {len(tokenized)} pairs fit --max-length {args.max_length}")
    logger.info("probing %d pairs (%d skipped as too long)", len(tokenized), sum(skipped.values()))

    autocast = contextlib.nullcontext
    if args.precision == "bf16":
        autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16)  # noqa: E731
    # CPU time and load are recorded because wall time on a shared machine says little alone.
    load_before = os.getloadavg()[0]
    started, started_cpu = time.perf_counter(), time.process_time()
    profile = probe_pairs(model, tokenizer, tokenized, args.beta, args.batch_size, autocast)
    probe_s, probe_cpu_s = time.perf_counter() - started, time.process_time() - started_cpu

    num_layers = profile.num_layers
    values = layer_profile(profile)
    auto = profile_blocks(values, args.num_blocks, args.min_block_size)
    equal = partition_layers(num_layers, args.num_blocks)
    if args.blocks == "auto":
        blocks = auto
        logger.warning("blocks chosen on the same pairs they are tested on: verdicts optimistic")
    else:
        blocks = blocks_from_spans(args.blocks, num_layers) if args.blocks else equal

    by_source = {p.source: p for p in data.pairs}
    probed = [by_source[t.source] for t in tokenized]
    tags = read_column(args.data, args.tag_column) if args.tag_column else None
    groups = objective_groups(probed, tags, args.subset or [])
    summaries = {}
    for name, indices in groups.items():
        if not indices:
            logger.warning("group %s matched none of the %d probed pairs", name, len(probed))
            continue
        summary = summarise(profile, blocks, indices, args.bootstrap, args.seed)
        summary["sentence"] = verdict_sentence(
            summary, resolved.display_name, Path(args.data).name, name
        )
        summaries[name] = summary

    result = dict(
        model=resolved.display_name,
        data=str(args.data),
        n_pairs=len(tokenized),
        skipped_pairs=sum(skipped.values()),
        skipped_reasons=skipped,
        rows_read=data.rows_read,
        rows_skipped=len(data.skipped),
        projections=profile.projections,
        settings={k: v for k, v in vars(args).items() if k != "func"},
        rule=VERDICT_RULE,
        blocks=[dict(name=b.name, layers=[b.layers[0], b.layers[-1]]) for b in blocks],
        groups=summaries,
        objectives_sentence=objectives_sentence(summaries),
        auto_partition=dict(
            rule="Optimal contiguous segmentation of log(per-layer gradient norm per parameter) "
            "minimising the within-block sum of squares, no block under "
            f"{args.min_block_size or default_min_size(num_layers, args.num_blocks)} layers, "
            "ties to the most equal sizes.",
            blocks=[dict(name=b.name, layers=[b.layers[0], b.layers[-1]]) for b in auto],
            map=format_maps_side_by_side(auto, equal, ("auto", "equal")),
            explained_auto=explained_variance(np.log(values), auto),
            explained_equal=explained_variance(np.log(values), equal),
        ),
        per_pair=dict(
            sources=profile.sources,
            losses=profile.losses.tolist(),
            layer_sq_norms=profile.sq_norms.tolist(),
            layer_params=profile.layer_params.tolist(),
        ),
    )
    result["timings"] = dict(
        probe_s=probe_s,
        probe_cpu_s=probe_cpu_s,
        total_s=time.perf_counter() - clock,
        threads=torch.get_num_threads(),
        load_average_before=load_before,
        load_average_after=os.getloadavg()[0],
        device=str(device),
    )
    (out / "probe.json").write_text(json.dumps(result, indent=1, default=str))
    (out / "probe.md").write_text(markdown_report(result))
    shown = {g: s for g, s in summaries.items() if s["n_pairs"] >= MIN_PAIRS_FOR_VERDICT}
    plot_per_layer(
        profile,
        shown or {"all": summaries["all"]},
        blocks,
        auto,
        out / "per_layer.png",
        f"DPO gradient per layer: {resolved.display_name}, {Path(args.data).name}",
    )
    return result


def probe_command(args) -> int:
    """Entry point of ``hialign probe``; prints the blocks, verdicts and where outputs went."""
    result = run_probe(args)
    blocks = [
        Block(b["name"], tuple(range(b["layers"][0], b["layers"][1] + 1))) for b in result["blocks"]
    ]
    print(format_block_map(blocks))
    for summary in result["groups"].values():
        print(summary["sentence"])
    if result["objectives_sentence"]:
        print(result["objectives_sentence"])
    print(VERDICT_RULE)
    print("data-driven partition beside equal blocks:\n" + result["auto_partition"]["map"])
    seconds = result["timings"]["total_s"]
    print(f"wrote {args.out}/probe.json, probe.md, per_layer.png ({seconds:.0f} s)")
    return 0
