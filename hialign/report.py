"""Stage 8 — the Markdown report: counts, significance, figures, predictions, and the run record.

``write_report`` turns the experiment's ``results`` dict (the same one saved as results.json)
into ``report.md`` plus two figures. Only ``comparisons`` is required; any other missing
section is reported as "not recorded" rather than failing a finished run at its last step.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hialign.figures import plot_nwr_heatmap, plot_win_tie_loss
from hialign.predictions import evaluate_predictions
from hialign.stats import (
    ALPHA,
    COMPARISONS,
    DIMENSION_LABELS,
    POOLED_MODEL,
    comparison_order,
    degenerate_interval,
    dimension_order,
    format_interval,
    format_p_value,
    headline_rows,
    ordered,
    significance,
    with_stats,
)

# The label constants live in hialign.stats; they are re-exported for callers that import them here.
__all__ = [
    "COMPARISONS",
    "DIMENSION_LABELS",
    "evaluate_predictions",
    "render_report",
    "write_report",
]

logger = logging.getLogger(__name__)

MAX_SKIPPED_LISTED = 50
FULL_DPO = "Full-DPO"
NOT_RECORDED = "_Not recorded in results._"
VERDICT = {True: "held", False: "not held", None: "undecided"}
DATA_FIELDS = {
    "rows_read": "Rows read",
    "pairs_valid": "Valid preference pairs",
    "train_pairs": "Training pairs",
    "eval_prompts": "Held-out evaluation prompts",
    "too_long": "Training pairs over the length limit (dropped)",
}


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], body: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in body] + [""]


def _percent(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _layer_span(layers) -> str:
    """[0, 1, 2, 7, 8] -> '0-2, 7-8' (en dash), so union strategies read at a glance."""
    layers, spans = sorted(layers or []), []
    for layer in layers:
        if spans and layer == spans[-1][1] + 1:
            spans[-1][1] = layer
        else:
            spans.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans) or "none"


def _summary(results: dict, headline: list[dict], predictions: list[dict]) -> list[str]:
    model, data, judge = (results.get(key) or {} for key in ("model", "data", "judge"))
    text = (
        f"Hierarchical Alignment trains DPO LoRA adapters in the self-attention of one block of "
        f"layers and compares each strategy with whole-model DPO ({FULL_DPO}). Model: "
        f"{model.get('name', 'not recorded')} ({model.get('num_layers', '?')} layers); strategies: "
        f"{', '.join(results.get('strategies', [])) or 'not recorded'}; "
        f"{data.get('train_pairs', '?')} training pairs, {data.get('eval_prompts', '?')} held-out "
        f"prompts, judged pairwise by {judge.get('name', 'an unrecorded judge')}."
    )
    found = {}
    for r in headline:
        sign = significance(r)
        if sign:
            word = "better" if sign > 0 else "worse"
            found.setdefault(r["comparison"], []).append(
                f"{word} on {r['dimension']} ({r['net_win_rate']:+.2f})"
            )
    found = "; ".join(f"{name}: {', '.join(parts)}" for name, parts in found.items())
    text += (
        " Significant differences (NWR 95% CI excludes 0 and exact binomial p < 0.05): "
        f"{found or 'none'}."
    )
    tally = [sum(p["held"] is v for p in predictions) for v in (True, False, None)]
    text += f" Predictions: {tally[0]} held, {tally[1]} not held, {tally[2]} undecided."
    return [text, ""]


def _judge_section(judge: dict) -> list[str]:
    lines = ["## Judge", ""]
    if not judge:
        return lines + [NOT_RECORDED, ""]
    lines += [f"- Kind: {judge.get('kind', 'n/a')}; name: {judge.get('name', 'n/a')}"]
    lines += [f"- Model: {judge.get('model', 'n/a')}"]
    if judge.get("warning"):
        lines = lines[:2] + [f"> **Warning:** {judge['warning']}", ""] + lines[2:]
    invalid = judge.get("invalid", 0)
    if isinstance(invalid, dict):  # per dimension
        detail = ", ".join(f"{DIMENSION_LABELS.get(k, k)} {v}" for k, v in invalid.items())
        invalid = f"{sum(invalid.values())} ({detail})"
    lines += [f"- Judgements: {judge.get('judgements', 'n/a')}; invalid verdicts: {invalid}"]
    lines += [
        f"- Position disagreement (verdict changed when the order was swapped, counted as a tie): "
        f"{_percent(judge.get('position_disagreement_rate'))}",
        f"- First-shown win rate (50% = no position bias): "
        f"{_percent(judge.get('first_shown_win_rate'))}",
    ]
    if judge.get("prompt_tokens") or judge.get("completion_tokens"):
        tokens = f"{judge.get('prompt_tokens', 0):,} prompt, {judge.get('completion_tokens', 0):,}"
        lines.append(f"- Tokens: {tokens} completion")
    if judge.get("cache_hits"):
        lines.append(
            f"- {judge['cache_hits']:,} calls were answered from the judge cache (an earlier run "
            "or a repeated question): tokens and cost count this invocation's requests only"
        )
    calls = [
        f"{judge[key]:,} {label}"
        for key, label in (
            ("judge_calls", "judge calls"),
            ("http_requests", "HTTP requests"),
            ("cache_hits", "cache hits"),
            ("repeats_shared", "identical calls answered once"),
            ("retries", "retries"),
            ("parse_reasks", "re-asks"),
            ("invalid_orders", "invalid single-order answers"),
        )
        if isinstance(judge.get(key), int)
    ]
    if calls:
        lines.append("- Calls: " + ", ".join(calls))
    if judge.get("cost") is not None:
        lines.append(f"- Cost: {judge['cost']:.4f} (at the prices given)")
    return lines + [""]


def _models(rows: list[dict]) -> list[str]:
    return ordered((r["model"] for r in rows), [POOLED_MODEL])


def _counts_section(rows: list[dict]) -> list[str]:
    dimensions, several = dimension_order(rows), len(_models(rows)) > 1
    cells = {(r["model"], r["comparison"], r["dimension"]): r for r in rows}
    body = []
    for model in _models(rows):
        for comparison in comparison_order(rows):
            counts = []
            for dimension in dimensions:
                row = cells.get((model, comparison, dimension))
                count = "n/a" if row is None else f"{row['wins']} / {row['losses']} / {row['ties']}"
                if row is not None and row.get("invalid", 0) > 0:
                    count += f" (+{row['invalid']} invalid)"
                counts.append(count)
            if any(count != "n/a" for count in counts):
                body.append(([model] if several else []) + [comparison] + counts)
    header = (
        (["Model"] if several else []) + ["Comparison"] + [f"{d} W / L / T" for d in dimensions]
    )
    intro = "Wins / losses / ties of the first-named group (paper Table 3 layout)."
    return ["## Judgement counts", "", intro, "", *_table(header, body)]


def _significance_section(rows: list[dict]) -> list[str]:
    stats = [s for s in map(with_stats, rows) if s is not None]
    several = len(_models(stats)) > 1
    orders = (_models(stats), comparison_order(stats), dimension_order(stats))
    keys = ("model", "comparison", "dimension")
    stats.sort(key=lambda s: tuple(order.index(s[k]) for order, k in zip(orders, keys)))
    body = []
    for s in stats:
        p = s["win_rate_excl_ties"]
        win = (
            "n/a (all ties)"
            if p is None
            else f"{p:.3f} "
            + format_interval(s["win_rate_ci_low"], s["win_rate_ci_high"], signed=False)
        )
        nwr = f"{s['net_win_rate']:+.3f}"
        if s["nwr_ci_low"] is not None:
            nwr += " " + format_interval(s["nwr_ci_low"], s["nwr_ci_high"])
            if degenerate_interval(s):
                nwr += " (zero width: W or L is 0)"
        mark = "**yes**" if significance(s) else "no"
        line = [s["comparison"], s["dimension"], str(s["total"]), nwr, win]
        body.append(([s["model"]] if several else []) + line + [format_p_value(s["p_value"]), mark])
    header = ["Comparison", "Dimension", "N", "NWR [95% CI]", "Win rate excl. ties [Wilson 95% CI]"]
    header = (["Model"] if several else []) + header + ["p (exact binomial)", "significant"]
    note = (
        "NWR = (W − L)/N with a delta-method interval (tie share fixed, "
        "not clipped to [−1, 1]); "
        "win rate excluding ties W/(W + L) with a Wilson interval; two-sided exact binomial test "
        f"of W in W + L at 0.5. The {len(stats)} p-values are not corrected for multiple testing "
        f"(Bonferroni would need p < {ALPHA / max(1, len(stats)):.2g}). A difference counts as "
        f"significant (here, in the summary, the predictions and the * of the figures) only when "
        f"the NWR interval excludes 0 *and* p < {ALPHA}: the interval is a normal approximation "
        "that collapses to a point when W or L is 0, the exact test is valid at any count."
    )
    skipped = len(rows) - len(stats)
    if skipped:
        note += f" {skipped} comparison row(s) had no valid judgements and are left out."
    return ["## Significance", "", note, "", *_table(header, body)]


def _predictions_section(predictions: list[dict]) -> list[str]:
    lines = ["## Predictions", ""]
    for p in predictions:
        lines += [f"- **({p['id']}) {VERDICT[p['held']]}.** {p['statement']}"]
        lines += [f"  Evidence: {p['evidence']}."]
    return lines + [""]


def _blocks_section(results: dict) -> list[str]:
    lines = ["## Block map", ""]
    blocks = results.get("blocks") or []
    if blocks:
        rows = [
            [b.get("name", "?"), _layer_span(b.get("layers")), len(b.get("layers") or [])]
            for b in blocks
        ]
        lines += _table(["Block", "Layers", "Count"], rows)
    training = results.get("training") or {}
    rows = [
        [
            name,
            _layer_span(t.get("layers")),
            t.get("lora_modules", "n/a"),
            _number(t.get("trainable_params"), ","),
        ]
        for name, t in training.items()
    ]
    if rows:
        lines += _table(["Strategy", "LoRA layers", "LoRA modules", "Trainable params"], rows)
    projections = (results.get("model") or {}).get("attention_projections")
    if projections:
        lines += [f"Attention projections adapted per layer: {', '.join(projections)}.", ""]
    return lines if len(lines) > 2 else lines + [NOT_RECORDED, ""]


def _number(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _training_section(training: dict) -> list[str]:
    if not training:
        return ["## Training", "", NOT_RECORDED, ""]
    header = ["Strategy", "Steps", "Loss first → final", "Reward acc."]
    header += ["Reward margin", "Seconds"]
    body = [
        [
            name,
            t.get("steps", "n/a"),
            f"{_number(t.get('first_loss'), '.4f')} → {_number(t.get('final_loss'), '.4f')}",
            _number(t.get("final_reward_accuracy"), ".3f"),
            _number(t.get("final_margin"), "+.4f"),
            _number(t.get("seconds"), ".1f"),
        ]
        for name, t in training.items()
    ]
    return ["## Training", "", *_table(header, body)]


def _settings_section(settings: dict, generation: dict, model: dict) -> list[str]:
    if not settings and not generation:
        return ["## Settings", "", NOT_RECORDED, ""]
    body = [[key, value] for key, value in settings.items()]
    if settings.get("model") is None and model.get("name"):  # no --model: say which one ran
        body = [[k, f"default ({model['name']})" if k == "model" else v] for k, v in body]
    body += [[f"generation.{key}", value] for key, value in generation.items()]
    return ["## Settings", "", *_table(["Setting", "Value"], body)]


def _data_section(data: dict) -> list[str]:
    if not data:
        return ["## Data", "", NOT_RECORDED, ""]
    lines = ["## Data", "", f"- Source: `{data.get('source', 'n/a')}`"]
    lines += [f"- {label}: {data[key]}" for key, label in DATA_FIELDS.items() if key in data]
    lines.append("")
    skipped = [[reason, n] for reason, n in (data.get("skipped") or {}).items()]
    if data.get("too_long"):
        skipped.append(["over the length limit (dropped from training)", data["too_long"]])
    if skipped:
        lines += _table(["Skip reason", "Rows"], skipped)
    listed = (data.get("skipped_rows") or []) + (data.get("too_long_rows") or [])
    for row in listed[:MAX_SKIPPED_LISTED]:
        lines.append(f"- `{row.get('source', '?')}`: {row.get('reason', '?')}")
    if len(listed) > MAX_SKIPPED_LISTED:
        lines.append(
            f"- … and {len(listed) - MAX_SKIPPED_LISTED} more skipped rows (see results.json)"
        )
    return lines + [""] if listed else lines


def _timings_section(timings: dict, reused: list[str]) -> list[str]:
    if not timings:
        return ["## Timings", "", NOT_RECORDED, ""]
    body = [[stage, f"{seconds:.1f}"] for stage, seconds in timings.items()]
    body.append(["**total**", f"{sum(timings.values()):.1f}"])
    lines = ["## Timings", ""]
    if reused:
        lines += [
            "Seconds of this invocation only. Reused from an earlier run in this folder (or the "
            f"cache), so not re-timed: {', '.join(reused)}.",
            "",
        ]
    return lines + _table(["Stage", "Seconds"], body)


def render_report(results: dict, figures: dict[str, str]) -> str:
    """The report as Markdown text; ``figures`` maps a caption to a path relative to the report."""
    rows = results["comparisons"]
    headline, predictions = headline_rows(rows), evaluate_predictions(rows)
    model = results.get("model") or {}
    stamp = f"hialign {results.get('hialign_version', '?')}, {results.get('created', 'undated')}"
    lines = [f"# Hierarchical Alignment report: {model.get('name', 'unnamed model')}", ""]
    lines += [f"_{stamp}; model spec `{model.get('spec', 'n/a')}`._", ""]
    lines += _summary(results, headline, predictions)
    lines += _judge_section(results.get("judge") or {})
    lines += _counts_section(rows) + _significance_section(rows)
    lines += ["## Figures", ""] + [f"![{caption}]({path})\n" for caption, path in figures.items()]
    lines += _predictions_section(predictions) + _blocks_section(results)
    lines += _training_section(results.get("training") or {})
    lines += _settings_section(
        results.get("settings") or {}, results.get("generation") or {}, results.get("model") or {}
    )
    lines += _data_section(results.get("data") or {})
    lines += _timings_section(results.get("timings") or {}, results.get("reused") or [])
    return "\n".join(lines).rstrip() + "\n"


def write_report(results: dict, out_dir: Path) -> Path:
    """Write ``report.md`` and ``figures/{nwr_heatmap,win_tie_loss}.png`` under ``out_dir``."""
    if not results.get("comparisons"):
        raise ValueError("results has no 'comparisons' rows: nothing was judged, so no report")
    out_dir = Path(out_dir)
    (out_dir / "figures").mkdir(parents=True, exist_ok=True)

    headline = headline_rows(results["comparisons"])
    if not headline:
        raise ValueError("every comparison row has zero valid judgements: nothing to plot")
    model_name, rows_model = (results.get("model") or {}).get("name"), headline[0]["model"]
    title = rows_model if model_name in (None, rows_model) else f"{model_name}, {rows_model}"
    plot_nwr_heatmap(headline, out_dir / "figures" / "nwr_heatmap.png", title)
    plot_win_tie_loss(headline, out_dir / "figures" / "win_tie_loss.png", title)

    figures = {
        "Net win rate by comparison and dimension": "figures/nwr_heatmap.png",
        "Win / tie / loss shares by comparison and dimension": "figures/win_tie_loss.png",
    }
    path = out_dir / "report.md"
    path.write_text(render_report(results, figures), encoding="utf-8")
    logger.info("wrote report to %s", path)
    return path
