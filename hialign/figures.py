"""Stage 8 figures: a net-win-rate heat-map and stacked win/tie/loss bars.

Figures are drawn on a bare ``Figure`` with the Agg canvas, never through ``pyplot``, so nothing
here touches matplotlib's global backend or opens a window, and it is safe from any thread.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from hialign.stats import comparison_order, dimension_order, significance

logger = logging.getLogger(__name__)

WIN_COLOUR, TIE_COLOUR, LOSS_COLOUR = "#2166ac", "#c7c7c7", "#b2182b"  # blue / grey / red
MISSING_COLOUR = "#eeeeee"
DPI = 120


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure


SIGNIFICANT = "* = significant: NWR 95% CI excludes 0 and p < 0.05"


def _excludes_zero(row: dict) -> bool:
    """Significant: NWR 95% CI excludes 0 and exact binomial p < 0.05 (stats.significance)."""
    return bool(significance(row))


def plot_nwr_heatmap(rows: list[dict], path: Path, title: str) -> Path:
    """Heat-map of NWR: rows = comparisons, columns = dimensions, diverging colours centred at 0.

    ``rows`` are stats rows of one model (or the pooled one). A ``*`` marks significant cells
    (NWR 95% interval excludes 0 and binomial p < 0.05); missing comparison x dimension cells
    are grey and say ``n/a``.
    """
    comparisons, dimensions = comparison_order(rows), dimension_order(rows)
    cells = {(r["comparison"], r["dimension"]): r for r in rows}
    values = np.full((len(comparisons), len(dimensions)), np.nan)
    for i, comparison in enumerate(comparisons):
        for j, dimension in enumerate(dimensions):
            if (comparison, dimension) in cells:
                values[i, j] = cells[comparison, dimension]["net_win_rate"]

    # Symmetric limits keep 0 at the neutral colour; a floor stops noise from looking saturated.
    finite = values[np.isfinite(values)]
    limit = max(0.1, float(np.abs(finite).max()) if finite.size else 1.0)
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad=MISSING_COLOUR)
    norm = TwoSlopeNorm(vmin=-limit, vcenter=0.0, vmax=limit)

    figure = _new_figure(2.0 * len(dimensions) + 3.8, 0.75 * len(comparisons) + 1.9)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(values), cmap=cmap, norm=norm, aspect="auto")
    for i, comparison in enumerate(comparisons):
        for j, dimension in enumerate(dimensions):
            value = values[i, j]
            if np.isnan(value):
                axes.text(j, i, "n/a", ha="center", va="center", color="#555555")
                continue
            star = "*" if _excludes_zero(cells[comparison, dimension]) else ""
            colour = "white" if abs(value) > 0.6 * limit else "black"
            axes.text(j, i, f"{value:+.2f}{star}", ha="center", va="center", color=colour)

    axes.set_xticks(range(len(dimensions)), dimensions)
    axes.set_yticks(range(len(comparisons)), comparisons)
    axes.set_title(f"{title}\nnet win rate ({SIGNIFICANT})", fontsize=10)
    figure.colorbar(image, ax=axes, label="NWR = (W - L) / N")
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    logger.info("wrote NWR heat-map (%d x %d cells) to %s", len(comparisons), len(dimensions), path)
    return path


def plot_win_tie_loss(rows: list[dict], path: Path, title: str) -> Path:
    """Stacked horizontal win/tie/loss shares, one bar per comparison x dimension, NWR beside it."""
    comparisons, dimensions = comparison_order(rows), dimension_order(rows)
    cells = {(r["comparison"], r["dimension"]): r for r in rows}
    bars, positions, y = [], [], 0.0
    for comparison in comparisons:
        for dimension in dimensions:
            if (comparison, dimension) in cells:
                bars.append(cells[comparison, dimension])
                positions.append(y)
                y += 1.0
        y += 0.6  # a gap between comparison groups

    wins = np.array([r["win_rate"] for r in bars])
    ties = np.array([r["tie_rate"] for r in bars])
    losses = np.array([r["loss_rate"] for r in bars])

    figure = _new_figure(11.0, 0.34 * len(bars) + 0.25 * len(comparisons) + 1.6)
    axes = figure.add_subplot()
    axes.barh(positions, wins, color=WIN_COLOUR, label="win")
    axes.barh(positions, ties, left=wins, color=TIE_COLOUR, label="tie")
    axes.barh(positions, losses, left=wins + ties, color=LOSS_COLOUR, label="loss")
    for position, row in zip(positions, bars):
        star = "*" if _excludes_zero(row) else ""
        axes.text(1.01, position, f"NWR {row['net_win_rate']:+.2f}{star}", va="center", fontsize=8)

    axes.set_yticks(
        positions, [f"{r['comparison']}  |  {r['dimension']}" for r in bars], fontsize=8
    )
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.16)
    axes.set_xticks(np.linspace(0.0, 1.0, 6))
    axes.set_xlabel("share of judgements (first-named group's view)")
    axes.set_title(f"{title}\nwin / tie / loss ({SIGNIFICANT})", fontsize=10)
    axes.legend(loc="lower right", ncols=3, fontsize=8, bbox_to_anchor=(1.0, 1.0), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    logger.info("wrote win/tie/loss bars (%d bars) to %s", len(bars), path)
    return path
