"""The generic report, for any recipe: a "metric × group" table, each cell the mean over seeds with its bootstrap
confidence interval over seeds (``avlm.stats.bootstrap_ci``)."""

from __future__ import annotations

from avlm.report.context import ReportContext, Section
from avlm.report.tables import Cell, Table, interval_cell, text_cell
from avlm.stats import bootstrap_ci


def sections(context: ReportContext) -> list[Section]:
    stats, digits = context.spec.stats, context.digits
    metrics = [context.resolve(metric) for metric in context.spec.generic.metrics]
    table = Table(
        name="metrics_by_group",
        title="Metrics by group (mean over seeds, bootstrap CI over seeds)",
        columns=["group", "seeds", *metrics],
        rows=[],
    )
    for group in context.groups:
        row = [text_cell(group.label), Cell(str(len(group.runs)), (("", len(group.runs)),))]
        for metric in metrics:
            values = list(group.values(metric).values())
            if not values:
                row.append(interval_cell(None, None, None, digits))
            elif len(values) < 2:
                row.append(interval_cell(values[0], None, None, digits))
            else:
                ci = bootstrap_ci(
                    values,
                    method=stats.ci_method,
                    confidence=stats.confidence,
                    n_resamples=stats.n_resamples,
                    seed=stats.seed,
                )
                row.append(interval_cell(ci.estimate, ci.low, ci.high, digits))
        table.rows.append(row)
    table.notes.append(
        f"{stats.confidence:.0%} {stats.ci_method} bootstrap interval of the mean over seeds ({stats.n_resamples} "
        f"resamples, seed {stats.seed}); one seed has no interval (n/a). Over a handful of seeds the interval can "
        "only span values the seeds reached: it says how much the seeds disagree, not where a new seed would land"
    )
    return [Section("Metrics by group", tables=[table])]
