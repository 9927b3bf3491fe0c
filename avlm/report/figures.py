"""Report figures, saved byte-stably: PNG without its ``Software`` metadata, SVG without a date and with a fixed
hash salt (matplotlib otherwise names SVG clip paths and glyphs with random ids), so the same runs give the same
files. Each function takes plain numbers and returns a figure; :func:`save_figure` writes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on training machines and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402

SVG_HASH_SALT = "avlm-report"
DPI = 120


def save_figure(figure: plt.Figure, folder: Path, name: str) -> list[Path]:
    """Write ``<folder>/<name>.png`` and ``.svg`` (byte-stable, see the module docstring) and close the figure."""
    folder.mkdir(parents=True, exist_ok=True)
    png, svg = folder / f"{name}.png", folder / f"{name}.svg"
    with matplotlib.rc_context({"svg.hashsalt": SVG_HASH_SALT, "svg.fonttype": "path"}):
        figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
        figure.savefig(svg, format="svg", metadata={"Date": None})
    plt.close(figure)
    return [png, svg]


def _finish(fig: plt.Figure, ax: plt.Axes, *, xlabel: str, ylabel: str, title: str, legend: bool) -> plt.Figure:
    """The common end of a one-panel figure: axis labels, a small title, a light grid, the legend, a tight layout."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


@dataclasses.dataclass(frozen=True)
class Curve:
    """One group's curve over epochs: the mean over seeds and a band (min–max or ± std)."""

    label: str
    epochs: Sequence[float]
    mean: Sequence[float]
    low: Sequence[float]
    high: Sequence[float]


def curves_with_bands(curves: Sequence[Curve], *, ylabel: str, title: str) -> plt.Figure:
    """F1: a metric against epoch, one line per group with its band over seeds."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, curve in enumerate(curves):
        color = f"C{index % 10}"
        ax.plot(curve.epochs, curve.mean, marker="o", color=color, label=curve.label)
        ax.fill_between(curve.epochs, curve.low, curve.high, color=color, alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    return _finish(fig, ax, xlabel="epoch", ylabel=ylabel, title=title, legend=True)


@dataclasses.dataclass(frozen=True)
class Interval:
    label: str
    estimate: float
    low: float
    high: float


def intervals(systems: Sequence[Interval], delta: Interval | None, *, xlabel: str, title: str) -> plt.Figure:
    """F2: each system's confidence interval, and the paired difference's interval in a second panel."""
    panels = 2 if delta is not None else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 0.6 * len(systems) + 2), squeeze=False)
    ax = axes[0][0]
    positions = np.arange(len(systems))[::-1]
    for position, system, index in zip(positions, systems, range(len(systems)), strict=True):
        ax.errorbar(
            [system.estimate],
            [position],
            xerr=[[system.estimate - system.low], [system.high - system.estimate]],
            fmt="o",
            capsize=4,
            color=f"C{index % 10}",
        )
    ax.set_yticks(positions, [s.label for s in systems], fontsize=8)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3, axis="x")
    if delta is not None:
        dx = axes[0][1]
        dx.errorbar(
            [delta.estimate],
            [0],
            xerr=[[delta.estimate - delta.low], [delta.high - delta.estimate]],
            fmt="o",
            capsize=4,
            color="black",
        )
        dx.axvline(0.0, color="grey", lw=0.8)
        dx.set_yticks([0], [delta.label], fontsize=8)
        dx.set_xlabel(f"Δ {xlabel}")
        dx.grid(alpha=0.3, axis="x")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


@dataclasses.dataclass(frozen=True)
class Point:
    label: str
    x: float
    y: float
    yerr: float = 0.0


def pareto_front(points: Sequence[Point], *, maximize_x: bool = False) -> list[Point]:
    """The points no other point beats on both axes (y higher; x lower, or higher with ``maximize_x``), by x."""

    def dominated(p: Point) -> bool:
        return any(
            (q.y >= p.y and (q.x >= p.x if maximize_x else q.x <= p.x)) and (q.y > p.y or q.x != p.x) for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: (p.x, p.y))


def scatter_with_front(
    points: Sequence[Point], *, xlabel: str, ylabel: str, title: str, maximize_x: bool = False, log_x: bool = False
) -> plt.Figure:
    """Pareto and stability-frontier plots: labelled points with error bars, their front as a dashed line."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for index, point in enumerate(points):
        ax.errorbar([point.x], [point.y], yerr=[point.yerr], fmt="o", capsize=3, color=f"C{index % 10}")
        ax.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(points, maximize_x=maximize_x)
    if len(front) > 1:
        ax.plot([p.x for p in front], [p.y for p in front], "--", color="grey", lw=1, label="front")
    if log_x:
        ax.set_xscale("log")
    return _finish(fig, ax, xlabel=xlabel, ylabel=ylabel, title=title, legend=len(front) > 1)


MARKERS = ("s", "D", "^", "v", "P", "X", "*")


def line_with_markers(
    line: Sequence[Point],
    markers: Sequence[Point],
    *,
    line_label: str,
    xlabel: str,
    ylabel: str,
    title: str,
    log_x: bool = False,
) -> plt.Figure:
    """A reference series as a line through its points (by x) and other configurations as labelled markers, each
    with error bars; a dotted guide at each marker's y shows where the line reaches it (what x the reference needs
    to match it). The x ticks are the points' own x values."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    line = sorted(line, key=lambda p: p.x)
    if line:
        ax.errorbar(
            [p.x for p in line],
            [p.y for p in line],
            yerr=[p.yerr for p in line],
            fmt="-o",
            capsize=3,
            color="C0",
            label=line_label,
        )
    for index, point in enumerate(markers):
        color = f"C{(index + 1) % 10}"
        ax.axhline(point.y, color=color, ls=":", lw=0.8)
        ax.errorbar(
            [point.x],
            [point.y],
            yerr=[point.yerr],
            fmt=MARKERS[index % len(MARKERS)],
            markersize=7,
            capsize=3,
            color=color,
            label=point.label,
        )
        # markers often share an x (one budget): stagger their labels
        ax.annotate(point.label, (point.x, point.y), textcoords="offset points", xytext=(6, 4 + 9 * index), fontsize=7)
    if log_x:
        ax.set_xscale("log")
    ticks = sorted({p.x for p in [*line, *markers]})
    if ticks:
        ax.set_xticks(ticks, [f"{x:,.0f}" for x in ticks], fontsize=8)
        ax.xaxis.set_minor_locator(NullLocator())
    return _finish(fig, ax, xlabel=xlabel, ylabel=ylabel, title=title, legend=True)


@dataclasses.dataclass(frozen=True)
class Heatmap:
    """One panel: ``values[i][j]`` for row ``rows[i]`` and column ``columns[j]`` (NaN = not logged)."""

    label: str
    rows: Sequence[str]
    columns: Sequence[str]
    values: Sequence[Sequence[float]]


def heatmaps(panels: Sequence[Heatmap], *, xlabel: str, ylabel: str, colorbar: str, title: str) -> plt.Figure:
    """The gate heatmap: one panel per group, one shared colour scale, each cell annotated with its value."""
    arrays = [np.asarray(panel.values, dtype=float) for panel in panels]
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays]) if arrays else np.array([])
    vmax = float(finite.max()) if finite.size else 1.0
    width = sum(max(3.5, 0.6 * len(p.columns) + 2.0) for p in panels) + 1.0
    height = 0.45 * max(len(p.rows) for p in panels) + 2.5
    # constrained layout makes room for the shared colour bar, which tight_layout cannot
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False, layout="constrained")
    image = None
    for ax, panel, array in zip(axes[0], panels, arrays, strict=True):
        image = ax.imshow(np.ma.masked_invalid(array), aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax or 1.0)
        ax.set_xticks(range(len(panel.columns)), panel.columns, fontsize=7)
        ax.set_yticks(range(len(panel.rows)), panel.rows, fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(panel.label, fontsize=9)
        for (i, j), value in np.ndenumerate(array):
            if np.isfinite(value):
                color = "black" if value > 0.6 * (vmax or 1.0) else "white"  # readable on viridis' light end
                ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=6, color=color)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label=colorbar)
    fig.suptitle(title, fontsize=10)
    return fig


@dataclasses.dataclass(frozen=True)
class BarSeries:
    label: str
    means: Sequence[float]
    stds: Sequence[float]


def grouped_bars(
    categories: Sequence[str],
    series: Sequence[BarSeries],
    *,
    ylabel: str,
    title: str,
    ylim: tuple[float, float] | None = None,
    value_digits: int | None = None,
) -> plt.Figure:
    """Bars per category (e.g. a backbone layer), one bar per series (a group) with its std over seeds; with
    ``value_digits``, each bar is labelled with its value (differences a bar's height hides stay readable)."""
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) * max(1, len(series)) + 2), 4))
    width = 0.8 / max(1, len(series))
    positions = np.arange(len(categories))
    for index, bars in enumerate(series):
        offset = (index - (len(series) - 1) / 2) * width
        drawn = ax.bar(
            positions + offset, bars.means, width, yerr=bars.stds, capsize=3, label=bars.label, color=f"C{index % 10}"
        )
        if value_digits is not None:
            ax.bar_label(drawn, fmt=f"%.{value_digits}f", fontsize=6, padding=2)
    ax.set_xticks(positions, categories, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: bars reach the top
    fig.tight_layout()
    return fig
