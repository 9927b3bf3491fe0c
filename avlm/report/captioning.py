"""The captioning report: results tables (T1/T2) and the figures of the additive-fusion study.

- **T1/T2**: one row per system (group; XE and +SCST rows apart, by the runs' ``training`` tag), BLEU-4, METEOR,
  ROUGE-L, CIDEr-D, SPICE and SPIDEr of ``final/<split>_*`` as mean ± std over seeds, trainable parameters and
  their ratio to the additive system (``params/ratio_to_additive``). A metric SPICE could not compute is ``n/a``,
  with the runs' own reason (tag ``spice_unavailable_reason``) in a footnote; it is never estimated.
- **F1**: the primary metric on ``curve_split`` against epoch: mean over seeds and a min–max (or ± std) band.
- **F2**: bootstrap CIs of the primary metric, the candidate system against the best other system, and the paired
  difference with its p-value. With per-item scores (``predictions/<split>_predictions.json``, which the caption
  recipe writes) it is :func:`avlm.stats.paired_bootstrap` over items, each item's score averaged over the
  system's seeds; without them, :func:`avlm.stats.paired_test` over seeds. The figure and table say which.
- **Pareto**: the primary metric against trainable parameters, with the front of systems no other beats on both.
- **Gate heatmap**: mean ``|alpha|`` per fusion layer and epoch (``fusion_gate/layer_N``) per system.
- **Stability frontier**: the primary metric against a retention metric (``retention/*``), when runs log one.

The figures use the runs of the first table (the main dataset).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import numpy as np

from avlm.report import figures
from avlm.report.context import BAND_TEXT, FigureItem, ReportContext, Section, epoch_curves, matches
from avlm.report.grouping import RunGroup, Summary, seed_order, summarize
from avlm.report.spec import CaptionTable
from avlm.report.tables import Cell, Table, count_cell, interval_cell, number_cell, summary_cell, text_cell
from avlm.stats import ConfidenceInterval, bootstrap_ci, paired_bootstrap, paired_test
from avlm.tracking.run_table import RunRecord

DISPLAY_NAMES = {"BLEU_4": "BLEU-4", "ROUGE_L": "ROUGE-L", "CIDEr_D": "CIDEr-D"}
NEEDS_SPICE = ("SPICE", "SPIDEr")
TRAINING = "tags.training"
TRAINABLE, RATIO = "params/trainable", "params/ratio_to_additive"
GATE_METRIC = re.compile(r"fusion_gate/layer_(\d+)")
RETENTION_PREFIX = "retention/"


def display(metric: str) -> str:
    return DISPLAY_NAMES.get(metric, metric)


def sections(context: ReportContext) -> list[Section]:
    settings = context.spec.captioning
    out, main = [], None
    for table_spec in settings.tables:
        runs = [run for run in context.runs if matches(run, table_spec.where, context)]
        groups = context.group(runs)
        context.scopes[table_spec.name] = groups
        primary, why = choose_primary(runs, table_spec.split, settings.primary)
        out.append(results_section(context, table_spec, groups, runs))
        if main is None:
            main = (table_spec, runs, groups, primary, why)
    table_spec, runs, groups, primary, why = main
    chosen = {
        "F1": lambda: curves_section(context, groups, primary, why),
        "F2": lambda: bootstrap_section(context, groups, table_spec.split, primary, why),
        "pareto": lambda: pareto_section(context, groups, table_spec.split, primary, why),
        "gate_heatmap": lambda: gate_section(context, groups),
        "stability": lambda: stability_section(context, runs, groups, table_spec.split, primary, why),
    }
    out += [chosen[name]() for name in settings.figures]
    return out


def spice_reasons(runs: Sequence[RunRecord], *, full: bool = False) -> list[str]:
    """The distinct reasons the runs give for not computing SPICE (tag ``spice_unavailable_reason``): whole, or
    (``full=False``) their first sentence, which says what is missing (the rest says how to install it)."""
    reasons = {run.tags["spice_unavailable_reason"] for run in runs if "spice_unavailable_reason" in run.tags}
    return sorted(reasons if full else {reason.split(". ", 1)[0] for reason in reasons})


def choose_primary(runs: Sequence[RunRecord], split: str, preferences: Sequence[str]) -> tuple[str | None, str]:
    """The first metric of ``preferences`` that every run logs on ``split``, and a sentence saying why."""
    skipped = []
    for metric in preferences:
        if runs and all(f"final/{split}_{metric}" in run.metrics for run in runs):
            if not skipped:
                return metric, f"primary metric: {metric}"
            return metric, f"primary metric: {metric} ({'; '.join(skipped)})"
        reason = f"{metric} is not logged by every run"
        if metric in NEEDS_SPICE and spice_reasons(runs):
            reason += f": SPICE could not run ({' / '.join(spice_reasons(runs))})"
        skipped.append(reason)
    return None, "no primary metric: " + "; ".join(skipped) if skipped else "no runs"


def system_of(context: ReportContext, group: RunGroup) -> str:
    return context.field(group.runs[0], context.spec.captioning.system) or "n/a"


def training_of(context: ReportContext, group: RunGroup) -> str:
    return group.get(TRAINING) or context.field(group.runs[0], TRAINING) or context.spec.captioning.compare_training


def results_section(
    context: ReportContext, table_spec: CaptionTable, groups: Sequence[RunGroup], runs: Sequence[RunRecord]
) -> Section:
    """T1/T2: systems × metrics (mean ± std over seeds), trainable parameters and their ratio."""
    settings, digits, split = context.spec.captioning, context.digits, table_spec.split
    columns = [
        "system",
        "training",
        "seeds",
        *(display(m) for m in settings.metrics),
        "trainable params",
        "param ratio",
    ]
    header = (
        f"{split} split, best checkpoint (final/{split}_*); mean ± std over seeds (sample std, ddof=1), one seed: "
        "its value; rows by system and training (xe; xe+scst from the runs' tag training)"
    )
    table = Table(table_spec.name, table_spec.title or table_spec.name, columns, rows=[], notes=[header])
    for group in groups:
        row = [text_cell(group.label), text_cell(training_of(context, group)), text_cell(", ".join(group.seeds))]
        for metric in settings.metrics:
            summary = summarize(group, f"final/{split}_{metric}")
            marker = ""
            if summary.n == 0:
                marker = table.note(_missing_reason(metric, group.runs))
            row.append(summary_cell(summary, digits, marker))
        row.append(count_cell(summarize(group, TRAINABLE).mean))
        row.append(number_cell(summarize(group, RATIO).mean, 3))
        table.rows.append(row)
    where = ", ".join(f"{k} = {v}" for k, v in sorted(table_spec.where.items()))
    text = [f"{len(runs)} runs{f' with {where}' if where else ''} in {len(groups)} groups."]
    return Section(table.title, text=text, tables=[table])


def _missing_reason(metric: str, runs: Sequence[RunRecord]) -> str:
    reasons = spice_reasons(runs, full=True)
    if metric in NEEDS_SPICE and reasons:
        return f"SPICE and SPIDEr not computed (never estimated): {' / '.join(reasons)}"
    return f"{metric} is not logged by these runs"


def curves_section(context: ReportContext, groups: Sequence[RunGroup], primary: str | None, why: str) -> Section:
    """F1: the primary metric per epoch on the curve split, mean and band over seeds."""
    settings = context.spec.captioning
    out = Section("F1: validation metric per epoch")
    if primary is None:
        out.text.append(f"Not drawn: {why}.")
        return out
    key = f"{settings.curve_split}/{primary}"
    curves = epoch_curves(context, groups, key, settings.band)
    if not curves:
        out.text.append(f"Not drawn: no run logs {key} per epoch.")
        return out
    band = BAND_TEXT[settings.band]
    out.text.append(f"{why}; line: mean over seeds, band: {band}.")
    out.figures.append(
        FigureItem("F1", "F1", figures.curves_with_bands(curves, ylabel=key, title=f"{key} per epoch ({band})"))
    )
    return out


def _per_item_scores(context: ReportContext, run: RunRecord, split: str, metric: str) -> dict[str, float] | None:
    """Item id → the run's per-item score from ``predictions/<split>_predictions.json``; None when absent."""
    items = context.json_artifact(run, f"predictions/{split}_predictions.json")
    if not isinstance(items, list):
        return None
    scores = {}
    for item in items:
        value = (item.get("scores") or {}).get(metric) if isinstance(item, dict) else None
        if value is None or "id" not in item:
            return None
        scores[str(item["id"])] = float(value)
    return scores


def _item_means(per_run: Sequence[dict[str, float]], ids: Sequence[str]) -> np.ndarray:
    return np.array([np.mean([scores[i] for scores in per_run]) for i in ids])


Comparison = tuple[ConfidenceInterval, ConfidenceInterval, ConfidenceInterval, float, str]
"""F2's figures: the candidate's and the baseline's intervals, the difference's, the p-value, the method in words."""


def _compare_over_items(
    context: ReportContext, candidate: RunGroup, baseline: RunGroup, split: str, primary: str
) -> Comparison | None:
    """Paired bootstrap over the items both systems were scored on, each item's score averaged over a system's
    seeds; None when a run has no per-item scores or the runs share fewer than 2 items."""
    stats = context.spec.stats
    per_run = {run.run_id: _per_item_scores(context, run, split, primary) for run in (*candidate.runs, *baseline.runs)}
    if any(scores is None for scores in per_run.values()):
        return None
    ids = sorted(set.intersection(*(set(scores) for scores in per_run.values())))
    if len(ids) < 2:
        return None
    kwargs = {
        "method": stats.ci_method,
        "confidence": stats.confidence,
        "n_resamples": stats.n_resamples,
        "seed": stats.seed,
    }
    cand_items = _item_means([per_run[r.run_id] for r in candidate.runs], ids)
    base_items = _item_means([per_run[r.run_id] for r in baseline.runs], ids)
    paired = paired_bootstrap(cand_items, base_items, **kwargs)
    method = (
        f"paired bootstrap over {len(ids)} {split} items (per-item {primary} from predictions/{split}_predictions"
        f".json, each item averaged over the system's seeds), {stats.n_resamples} resamples, seed {stats.seed}, "
        f"{stats.confidence:.0%} {stats.ci_method} intervals; p: two-sided, H0 Δ = 0"
    )
    return bootstrap_ci(cand_items, **kwargs), bootstrap_ci(base_items, **kwargs), paired.delta, paired.p_value, method


def _compare_over_seeds(
    context: ReportContext, candidate: RunGroup, baseline: RunGroup, split: str, primary: str
) -> Comparison | None:
    """The declared paired test over the seeds both systems ran, with percentile bootstrap intervals over seeds;
    None with fewer than 2 common seeds."""
    stats, metric = context.spec.stats, f"final/{split}_{primary}"
    cand, base = candidate.values(metric), baseline.values(metric)
    seeds = sorted(set(cand) & set(base), key=seed_order)
    if len(seeds) < 2:
        return None
    cand_values, base_values = [cand[s] for s in seeds], [base[s] for s in seeds]
    test = paired_test(
        cand_values,
        base_values,
        test=stats.paired_test,
        alternative="two-sided",
        n_resamples=stats.n_resamples,
        seed=stats.seed,
    )
    kwargs = {
        "method": "percentile",
        "confidence": stats.confidence,
        "n_resamples": stats.n_resamples,
        "seed": stats.seed,
    }
    delta = bootstrap_ci(np.subtract(cand_values, base_values), **kwargs)
    method = (
        f"over {len(seeds)} seeds paired by seed ({', '.join(seeds)}): no per-item {primary} common to every run in "
        f"predictions/{split}_predictions.json; intervals: {stats.confidence:.0%} percentile bootstrap over seeds "
        f"({stats.n_resamples} resamples, seed {stats.seed}); p: {stats.paired_test} test, two-sided"
    )
    return bootstrap_ci(cand_values, **kwargs), bootstrap_ci(base_values, **kwargs), delta, test.p_value, method


def bootstrap_section(
    context: ReportContext, groups: Sequence[RunGroup], split: str, primary: str | None, why: str
) -> Section:
    """F2: the candidate against the best other system, bootstrap CIs and the paired p-value."""
    settings, stats, digits = context.spec.captioning, context.spec.stats, context.digits
    out = Section("F2: bootstrap confidence intervals, candidate vs best baseline")
    if primary is None:
        out.text.append(f"Not drawn: {why}.")
        return out
    metric = f"final/{split}_{primary}"
    compared = [g for g in groups if training_of(context, g) == settings.compare_training and summarize(g, metric).n]
    candidates = [g for g in compared if system_of(context, g) == settings.candidate]
    baselines = [g for g in compared if system_of(context, g) != settings.candidate]
    if not candidates or not baselines:
        out.text.append(
            f"Not drawn: needs the candidate system {settings.candidate!r} and another system, both with training="
            f"{settings.compare_training} and {metric}."
        )
        return out
    candidate, baseline = (
        max(pool, key=lambda g: (summarize(g, metric).mean, g.label)) for pool in (candidates, baselines)
    )
    comparison = _compare_over_items(context, candidate, baseline, split, primary) or _compare_over_seeds(
        context, candidate, baseline, split, primary
    )
    if comparison is None:
        out.text.append(
            f"Not drawn: no per-item scores and fewer than 2 seeds common to {candidate.label} and {baseline.label}."
        )
        return out
    cand_ci, base_ci, delta, p_value, method = comparison
    table = Table(
        name="F2",
        title=f"F2: {split} {primary}, {candidate.label} vs {baseline.label}",
        columns=["", "estimate [CI]", "p"],
        rows=[],
    )
    for label, ci in ((candidate.label, cand_ci), (baseline.label, base_ci)):
        table.rows.append([text_cell(label), interval_cell(ci.estimate, ci.low, ci.high, digits), text_cell("")])
    table.rows.append(
        [
            text_cell(f"Δ ({candidate.label} − {baseline.label})"),
            interval_cell(delta.estimate, delta.low, delta.high, digits),
            Cell(f"{p_value:.4f}", (("", p_value),)),
        ]
    )
    table.notes.append(method)
    out.text.append(f"{why}; best baseline: the other system with the highest mean {metric}.")
    out.tables.append(table)
    systems = [
        figures.Interval(c.label, ci.estimate, ci.low, ci.high) for c, ci in ((candidate, cand_ci), (baseline, base_ci))
    ]
    diff = figures.Interval(f"{candidate.label} − {baseline.label}", delta.estimate, delta.low, delta.high)
    title = f"{split} {primary}: {stats.confidence:.0%} CIs, paired p = {p_value:.4f}"
    out.figures.append(
        FigureItem(
            "F2", "F2", figures.intervals(systems, diff, xlabel=f"{split} {primary}", title=title), caption=method
        )
    )
    return out


def pareto_section(
    context: ReportContext, groups: Sequence[RunGroup], split: str, primary: str | None, why: str
) -> Section:
    """The primary metric against trainable parameters, mean ± std over seeds, with the Pareto front."""
    out = Section("Pareto: metric vs trainable parameters")
    if primary is None:
        out.text.append(f"Not drawn: {why}.")
        return out
    metric = f"final/{split}_{primary}"
    points = []
    for group in groups:
        score, params = summarize(group, metric), summarize(group, TRAINABLE)
        if score.n and params.n:
            points.append(figures.Point(group.label, params.mean, score.mean, _spread(score)))
    if not points:
        out.text.append(f"Not drawn: no group logs both {metric} and {TRAINABLE}.")
        return out
    xs = [p.x for p in points]
    log_x = min(xs) > 0 and max(xs) / min(xs) > 10
    front = ", ".join(p.label for p in figures.pareto_front(points))
    out.text.append(f"{why}; front (no other system has more {primary} with fewer parameters): {front}.")
    out.figures.append(
        FigureItem(
            "pareto",
            "Pareto",
            figures.scatter_with_front(
                points,
                xlabel="trainable parameters",
                ylabel=metric,
                title=f"{split} {primary} vs trainable parameters",
                log_x=log_x,
            ),
        )
    )
    return out


def _spread(summary: Summary) -> float:
    return summary.std if summary.n > 1 and summary.std is not None and math.isfinite(summary.std) else 0.0


def gate_section(context: ReportContext, groups: Sequence[RunGroup]) -> Section:
    """Mean |alpha| per fusion layer × epoch, one panel per system with fusion gates; and the last epoch's table."""
    out = Section("Fusion gate magnitudes per layer and epoch")
    panels, rows = [], []
    for group in groups:
        layers = sorted({int(m[1]) for run in group.runs for key in run.metrics if (m := GATE_METRIC.fullmatch(key))})
        if not layers:
            continue
        per_layer = {n: [context.by_epoch(run, f"fusion_gate/layer_{n}") for run in group.runs] for n in layers}
        epochs = sorted({e for series in per_layer.values() for s in series for e in s})
        values = [[_mean_abs([s[e] for s in per_layer[n] if e in s]) for e in epochs] for n in layers]
        panels.append(figures.Heatmap(group.label, [f"layer {n}" for n in layers], [str(e) for e in epochs], values))
        last = [
            [
                abs(run.metrics[f"fusion_gate/layer_{n}"])
                for run in group.runs
                if f"fusion_gate/layer_{n}" in run.metrics
            ]
            for n in layers
        ]
        rows.append((group.label, layers, [Summary.of_values(v, len(group.runs)) for v in last]))
    if not panels:
        out.text.append("No run logs fusion_gate/layer_N (concat and data_only fusion have no gates).")
        return out
    all_layers = sorted({n for _, layers, _ in rows for n in layers})
    table = Table(
        name="gate_magnitudes",
        title="|alpha| per fusion layer at the last epoch",
        columns=["system", *(f"layer {n}" for n in all_layers)],
        rows=[],
    )
    for label, layers, summaries in rows:
        by_layer = dict(zip(layers, summaries, strict=True))
        table.rows.append(
            [
                text_cell(label),
                *(summary_cell(by_layer.get(n, Summary(None, None, 0, 0)), context.digits) for n in all_layers),
            ]
        )
    table.notes.append("mean ± std over seeds (ddof=1) of |fusion_gate/layer_N| at the run's last epoch")
    out.tables.append(table)
    out.figures.append(
        FigureItem(
            "gate_heatmap",
            "Gate heatmap",
            figures.heatmaps(
                panels,
                xlabel="epoch",
                ylabel="fusion layer",
                colorbar="|alpha| (mean over seeds)",
                title="Fusion gate magnitude |alpha| per layer and epoch",
            ),
        )
    )
    return out


def _mean_abs(values: Sequence[float]) -> float:
    return float(np.mean(np.abs(values))) if values else float("nan")


def retention_metric(context: ReportContext, runs: Sequence[RunRecord]) -> tuple[str | None, str]:
    """The retention metric (declared, or the ``retention/*`` key the runs log) and a sentence about the choice."""
    declared = context.spec.captioning.retention_metric
    if declared:
        return declared, f"retention metric: {declared}"
    found = sorted({key for run in runs for key in run.metrics if key.startswith(RETENTION_PREFIX)})
    if not found:
        return None, "no run logs a retention metric (retention/*)"
    extra = f" (also logged: {', '.join(found[1:])}; set captioning.retention_metric to pick)" if found[1:] else ""
    return found[0], f"retention metric: {found[0]}{extra}"


def stability_section(
    context: ReportContext,
    runs: Sequence[RunRecord],
    groups: Sequence[RunGroup],
    split: str,
    primary: str | None,
    why: str,
) -> Section:
    """The stability frontier: the audio metric against retention, per group (mean ± std over seeds)."""
    out = Section("Stability frontier: audio metric vs retention")
    retention, about = retention_metric(context, runs)
    if primary is None or retention is None:
        out.text.append(f"Not drawn: {why if primary is None else about}.")
        return out
    metric = f"final/{split}_{primary}"
    table = Table(
        name="stability",
        title=f"Stability: {metric} and {retention}",
        columns=["system", "seeds", retention, metric],
        rows=[],
    )
    points = []
    for group in groups:
        kept, score = summarize(group, retention), summarize(group, metric)
        if not (kept.n and score.n):
            continue
        table.rows.append(
            [
                text_cell(group.label),
                text_cell(", ".join(group.seeds)),
                summary_cell(kept, context.digits),
                summary_cell(score, context.digits),
            ]
        )
        points.append(figures.Point(group.label, kept.mean, score.mean, _spread(score)))
    if not points:
        out.text.append(f"Not drawn: no group logs both {retention} and {metric}.")
        return out
    table.notes.append("mean ± std over seeds (ddof=1)")
    front = ", ".join(p.label for p in figures.pareto_front(points, maximize_x=True))
    out.text.append(f"{why}; {about}; frontier (no other system keeps more and scores more): {front}.")
    out.tables.append(table)
    out.figures.append(
        FigureItem(
            "stability",
            "Stability frontier",
            figures.scatter_with_front(
                points, xlabel=retention, ylabel=metric, title=f"{split} {primary} vs {retention}", maximize_x=True
            ),
        )
    )
    return out
