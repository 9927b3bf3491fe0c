"""The "publishable?" checklist: each target of the spec, met or not met, with the figure measured."""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Literal

from avlm.report.captioning import NEEDS_SPICE, spice_reasons
from avlm.report.context import ReportContext, Section
from avlm.report.grouping import RunGroup, summarize
from avlm.report.spec import Target
from avlm.report.tables import Cell, Table, number_cell, text_cell

_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}
MET, NOT_MET, NOT_AVAILABLE = "met", "not met", "n/a"


@dataclasses.dataclass(frozen=True)
class TargetOutcome:
    """What a target came to.

    Attributes:
        target: the target as declared.
        metric: the logged key it was measured on.
        group: the label of the group measured (None: none could be).
        measured: the group's mean over seeds (None: not measured).
        n: how many seeds the mean is over.
        status: ``met``, ``not met`` or ``n/a`` (the metric is missing, or the named group does not exist).
        reason: why, in words.
    """

    target: Target
    metric: str
    group: str | None
    measured: float | None
    n: int
    status: Literal["met", "not met", "n/a"]
    reason: str

    def to_dict(self) -> dict:
        return {
            "target": self.target.text,
            "metric": self.metric,
            "group": self.group,
            "measured": self.measured,
            "n": self.n,
            "status": self.status,
            "reason": self.reason,
        }


def target_groups(target: Target, context: ReportContext) -> list[RunGroup] | None:
    """The groups a target is measured among: its table's, else the first table's, else all; None: no such table."""
    if target.table:
        return context.scopes.get(target.table)
    return next(iter(context.scopes.values())) if context.scopes else context.groups


def evaluate_target(target: Target, context: ReportContext) -> TargetOutcome:
    """Measure ``target`` on its group (or the best group for its metric) and compare with its threshold."""
    metric = context.resolve(target.metric)
    groups = target_groups(target, context)
    if groups is None:
        reason = f"no table named {target.table!r} ({', '.join(context.scopes) or 'this kind has none'})"
        return TargetOutcome(target, metric, None, None, 0, NOT_AVAILABLE, reason)
    candidates = [g for g in groups if g.label == target.group] if target.group else list(groups)
    if target.group and not candidates:
        labels = ", ".join(repr(g.label) for g in groups)
        return TargetOutcome(
            target, metric, None, None, 0, NOT_AVAILABLE, f"no group labelled {target.group!r} ({labels})"
        )
    measured = [(g, summarize(g, metric)) for g in candidates]
    measured = [(g, s) for g, s in measured if s.n]
    if not measured:
        runs = [run for group in candidates for run in group.runs]
        reason = f"none of the runs measured logs {metric}"
        if metric.endswith(NEEDS_SPICE) and spice_reasons(runs):
            reason += f": SPICE could not run ({' / '.join(spice_reasons(runs))})"
        return TargetOutcome(target, metric, target.group or None, None, 0, NOT_AVAILABLE, reason)
    # Without a named group, the study's best configuration for this metric is what the target asks about.
    higher_is_better = target.op in (">", ">=")
    group, summary = (max if higher_is_better else min)(measured, key=lambda gs: (gs[1].mean, gs[0].label))
    met = _OPS[target.op](summary.mean, target.threshold)
    figure = f"{summary.mean:.{context.digits}f}"
    comparison = f"{target.op} {target.threshold:g}" if met else f"not {target.op} {target.threshold:g}"
    reason = f"mean over {summary.n} seed(s) of {group.label}: {figure}, {comparison}"
    return TargetOutcome(target, metric, group.label, summary.mean, summary.n, MET if met else NOT_MET, reason)


def checklist_section(outcomes: Sequence[TargetOutcome], digits: int) -> Section:
    """The checklist as a section: one row per target."""
    table = Table(
        name="targets",
        title="Publishable? targets",
        columns=["target", "metric", "group", "measured", "seeds", "status"],
        rows=[
            [
                text_cell(o.target.text),
                text_cell(o.metric),
                text_cell(o.group or "n/a"),
                number_cell(o.measured, digits),
                Cell(str(o.n), (("", o.n),)),
                text_cell(o.status if o.status != NOT_AVAILABLE else f"n/a ({o.reason})"),
            ]
            for o in outcomes
        ],
        notes=["measured: the group's mean over seeds; without '@ group' the best group for the metric"],
    )
    met = sum(o.status == MET for o in outcomes)
    return Section("Publishable?", text=[f"{met} of {len(outcomes)} targets met."], tables=[table])
