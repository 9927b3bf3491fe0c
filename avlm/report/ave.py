"""The AVE report: segment accuracy against the visual token budget per clip, uniform and anchored allocation.

One row per configuration (mean ± std over its seeds): allocation, eventness scorer, anchors k, tokens per clip
(``alloc/tokens_per_clip``), val accuracy of the best checkpoint (``final/val_accuracy``), test accuracy when the
runs evaluated test, the fraction of clips whose anchored plan fell back to uniform (``alloc/val_fallback_frac``),
and the budget uniform allocation needs to reach the row's accuracy, read off the uniform line between its two
nearest budgets (log-linear when the axis is log). The figure draws the same numbers: uniform as a line through its
budgets, each anchored configuration as a labelled marker at its budget, error bars the std over seeds.

Runs for it: ``examples/sweeps/ave_budget.yaml`` (uniform at four base resolutions, anchored k=1 and k=2 at one).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from avlm.report import figures
from avlm.report.context import FigureItem, ReportContext, Section
from avlm.report.grouping import MISSING, RunGroup, Summary, summarize
from avlm.report.tables import Cell, Table, count_cell, summary_cell, text_cell

UNIFORM, ANCHORED = "uniform", "anchored"
BUDGET_TAG = "token_budget"
FIGURE_NAME = "ave_accuracy_vs_budget"


def sections(context: ReportContext) -> list[Section]:
    return [budget_section(context)]


def allocation_of(group: RunGroup) -> str:
    """``uniform`` or ``anchored``: the run's ``allocation`` tag, else its ``cfg.allocation.method``."""
    return group.runs[0].tags.get("allocation") or group.get("cfg.allocation.method") or MISSING


def eventness_of(group: RunGroup) -> str:
    """The Stage-1 scorer of an anchored group (its ``eventness`` tag, else the param); uniform uses none."""
    if allocation_of(group) != ANCHORED:
        return "none"
    return group.runs[0].tags.get("eventness") or group.get("cfg.eventness.method") or MISSING


def anchors_of(group: RunGroup) -> str:
    """``allocation.k`` of an anchored group; ``n/a`` for uniform, which places no anchors."""
    return (group.get("cfg.allocation.k") or MISSING) if allocation_of(group) == ANCHORED else MISSING


def budget_of(group: RunGroup, metric: str) -> Summary:
    """Tokens per clip over the group's seeds: the logged metric, else the ``token_budget`` tag."""
    summary = summarize(group, metric)
    if summary.n:
        return summary
    tagged = [float(run.tags[BUDGET_TAG]) for run in group.runs if _is_number(run.tags.get(BUDGET_TAG))]
    return Summary.of_values(tagged, len(group.runs))


def _is_number(text: str | None) -> bool:
    try:
        return text is not None and math.isfinite(float(text))
    except ValueError:
        return False


def budget_to_match(line: Sequence[figures.Point], y: float, *, log_x: bool) -> tuple[float | None, str]:
    """The x at which the line through ``line`` (sorted by x) first reaches ``y``, interpolated between the two
    points around it (geometrically with ``log_x``), with its text; beyond the line's reach, None and ``> x_max``
    (no point reaches y) or ``< x_min`` (the cheapest point already exceeds it)."""
    points = sorted(line, key=lambda p: p.x)
    if not points:
        return None, MISSING
    for a, b in zip(points, points[1:], strict=False):
        if min(a.y, b.y) <= y <= max(a.y, b.y):
            t = 0.0 if a.y == b.y else (y - a.y) / (b.y - a.y)
            x = a.x * (b.x / a.x) ** t if log_x else a.x + t * (b.x - a.x)
            return x, f"{x:,.0f}"
    if len(points) == 1 and points[0].y == y:
        return points[0].x, f"{points[0].x:,.0f}"
    if y > max(p.y for p in points):
        return None, f"> {points[-1].x:,.0f}"
    return None, f"< {points[0].x:,.0f}"


def budget_section(context: ReportContext) -> Section:
    """The table and the accuracy-vs-budget figure."""
    section, digits = context.spec.ave, context.digits
    split, test = section.split, section.test_split
    accuracy_key, fallback_key = f"final/{split}_accuracy", f"alloc/{split}_fallback_frac"
    test_key = f"final/{test}_accuracy" if test else ""
    with_test = bool(test_key) and any(test_key in run.metrics for run in context.runs)

    names = display_names(context.groups)
    rows = []
    for group in context.groups:
        budget, accuracy = budget_of(group, section.budget_metric), summarize(group, accuracy_key)
        point = None
        if budget.n and accuracy.n:
            spread = accuracy.std if accuracy.n > 1 else 0.0
            point = figures.Point(names[group.label], budget.mean, accuracy.mean, spread)
        rows.append((group, budget, accuracy, point))
    order = {UNIFORM: 0, ANCHORED: 1}
    k = {group.label: float(anchors_of(group)) if _is_number(anchors_of(group)) else 0.0 for group in context.groups}
    # uniform by budget, then anchored by budget and k
    rows.sort(key=lambda r: (order.get(allocation_of(r[0]), 2), r[1].mean or 0.0, k[r[0].label], r[0].label))
    line = [p for g, _, _, p in rows if p is not None and allocation_of(g) == UNIFORM]
    markers = [p for g, _, _, p in rows if p is not None and allocation_of(g) != UNIFORM]

    columns = ["configuration", "allocation", "eventness", "k", "tokens per clip", "seeds", f"{split} accuracy"]
    columns += [f"{test} accuracy"] if with_test else []
    columns += [f"{split} fallback", "uniform tokens to match", "group"]
    table = Table(
        name="ave_budget",
        title=f"AVE: {split} accuracy by visual token budget, uniform and anchored",
        columns=columns,
        rows=[],
    )
    for group, budget, accuracy, point in rows:
        row = [text_cell(names[group.label]), text_cell(allocation_of(group)), text_cell(eventness_of(group))]
        row += [text_cell(anchors_of(group)), count_cell(budget.mean), text_cell(", ".join(group.seeds))]
        row.append(summary_cell(accuracy, digits))
        row += [summary_cell(summarize(group, test_key), digits)] if with_test else []
        row.append(summary_cell(summarize(group, fallback_key), digits))
        if point is None or allocation_of(group) == UNIFORM:
            row.append(Cell(MISSING, (("", None),)))
        else:
            value, text = budget_to_match(line, point.y, log_x=section.log_x)
            row.append(Cell(text, (("", value),)))
        row.append(text_cell(group.label))
        table.rows.append(row)
    interpolation = "geometric (log budget)" if section.log_x else "linear"
    table.notes += [
        f"mean ± std over seeds (sample std, ddof=1); one seed: its value. Accuracy: segment accuracy of the best "
        f"checkpoint on {split} ({accuracy_key}); tokens per clip: {section.budget_metric}",
        f"{split} fallback: fraction of {split} clips whose anchored plan fell back to uniform ({fallback_key})",
        f"uniform tokens to match: where the uniform line (mean over seeds) reaches the row's mean accuracy, "
        f"{interpolation} interpolation between its two nearest budgets; '> N': no uniform budget measured reaches "
        "it, '< N': the smallest already exceeds it",
        "group: the configuration's label in targets and the run list",
    ]
    out = Section("Accuracy vs visual token budget", tables=[table])
    if not line and not markers:
        out.text.append(f"No run logs both {section.budget_metric} and {accuracy_key}: nothing to draw.")
        return out
    out.figures.append(
        FigureItem(
            FIGURE_NAME,
            f"{split} accuracy vs visual tokens per clip",
            figures.line_with_markers(
                line,
                markers,
                line_label=UNIFORM,
                xlabel="visual tokens per clip" + (" (log scale)" if section.log_x else ""),
                ylabel=f"{split} accuracy",
                title=f"AVE {split} accuracy vs token budget (mean ± std over seeds)",
                log_x=section.log_x,
            ),
            caption="uniform: a line through its budgets; anchored: a marker at its budget, with a dotted guide at its "
            "accuracy (where it meets the uniform line: the budget uniform needs to match it); error bars: sample std "
            "over seeds (ddof=1)",
        )
    )
    return out


def display_names(groups: Sequence[RunGroup]) -> dict[str, str]:
    """Group label → its name in the table and the figure, ``uniform 112 px`` or ``anchored k=2 (learned)``; the
    group's label where two names coincide (groups that differ in something else)."""
    short = {}
    for g in groups:
        if allocation_of(g) == ANCHORED:
            short[g.label] = f"anchored k={anchors_of(g)} ({eventness_of(g)})"
        elif allocation_of(g) == UNIFORM and g.get("cfg.allocation.base_resolution"):
            short[g.label] = f"uniform {g.get('cfg.allocation.base_resolution')} px"
        else:
            short[g.label] = g.label
    counts = {text: list(short.values()).count(text) for text in short.values()}
    return {label: text if counts[text] == 1 else label for label, text in short.items()}
