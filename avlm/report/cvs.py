"""The CVS report: the research log's experiment table and the attention entropy per layer across groups.

The table has one row per configuration (mean ± std over its seeds): val mAP and AP per criterion of the best
checkpoint (``final/<split>_*``), the train–val mAP gap and the attention entropy at the best epoch, the best
epoch, and test mAP when the runs have a test split. One figure draws val mAP per epoch (mean and band over
seeds), another compares the attention entropy of the backbone layers and the pooler (% of its maximum; 100 =
uniform attention) between groups.
"""

from __future__ import annotations

import re

from avlm.report import figures
from avlm.report.context import BAND_TEXT, FigureItem, ReportContext, Section, epoch_curves
from avlm.report.grouping import Summary, summarize
from avlm.report.tables import Table, summary_cell, text_cell

GAP_METRIC = "train_val_gap/mAP"
CURVE_METRIC = "val/mAP"
LAYER_ENTROPY = re.compile(r"entropy/backbone_layer_(\d+)")
ENTROPY_MEAN, ENTROPY_POOLER = "entropy/backbone_mean", "entropy/pooler"


def sections(context: ReportContext) -> list[Section]:
    return [experiment_section(context), curves_section(context), entropy_section(context)]


def curves_section(context: ReportContext) -> Section:
    """Validation mAP (and train mAP) against epoch per group: mean over seeds and a band."""
    band = context.spec.cvs.band
    out = Section("mAP per epoch")
    curves = epoch_curves(context, context.groups, CURVE_METRIC, band)
    if not curves:
        out.text.append(f"No run logs {CURVE_METRIC} per epoch: nothing to draw.")
        return out
    out.text.append(f"Line: mean over seeds; band: {BAND_TEXT[band]}; a group's curve ends where its seeds stopped.")
    out.figures.append(
        FigureItem(
            "cvs_val_curves",
            "val mAP per epoch",
            figures.curves_with_bands(
                curves, ylabel=CURVE_METRIC, title=f"{CURVE_METRIC} per epoch ({BAND_TEXT[band]})"
            ),
        )
    )
    return out


def experiment_section(context: ReportContext) -> Section:
    """The experiment table."""
    section = context.spec.cvs
    split, digits = section.split, context.digits
    test_key = f"final/{section.test_split}_mAP" if section.test_split else ""
    with_test = bool(test_key) and any(test_key in run.metrics for run in context.runs)
    columns = ["configuration", "seeds", f"{split} mAP", *(f"AP {c}" for c in section.criteria)]
    columns += ["train–val gap", "best epoch", "entropy backbone", "entropy pooler"]
    columns += [f"{section.test_split} mAP"] if with_test else []
    table = Table(
        name="cvs_experiments",
        title=f"Experiments: {split} mAP, AP per criterion, gap, best epoch, entropy",
        columns=columns,
        rows=[],
    )
    for group in context.groups:
        row = [text_cell(group.label), text_cell(", ".join(group.seeds))]
        row.append(summary_cell(summarize(group, f"final/{split}_mAP"), digits))
        row += [summary_cell(summarize(group, f"final/{split}_AP_{c}"), digits) for c in section.criteria]
        row.append(summary_cell(context.summary_at_best_epoch(group, GAP_METRIC), digits))
        row.append(summary_cell(summarize(group, "best_epoch"), 1))
        row += [summary_cell(context.summary_at_best_epoch(group, key), 2) for key in (ENTROPY_MEAN, ENTROPY_POOLER)]
        row += [summary_cell(summarize(group, test_key), digits)] if with_test else []
        table.rows.append(row)
    table.notes += [
        f"mean ± std over seeds (sample std, ddof=1); one seed: its value. mAP and AP: the best checkpoint on {split} "
        f"(final/{split}_mAP, final/{split}_AP_*)",
        "train–val gap: train mAP − val mAP at the best epoch (train_val_gap/mAP); entropy: attention entropy in % of "
        "its maximum (100 = uniform) at the best epoch, mean over backbone layers (entropy/backbone_mean) and of the "
        "pooler (entropy/pooler)",
    ]
    return Section("CVS experiments", tables=[table])


def _layers(context: ReportContext) -> list[int]:
    found = {int(m[1]) for run in context.runs for key in run.metrics if (m := LAYER_ENTROPY.fullmatch(key))}
    return sorted(found)


def entropy_section(context: ReportContext) -> Section:
    """Attention entropy per backbone layer (and the pooler) per group: a table and a grouped bar chart."""
    layers = _layers(context)
    keys = [f"entropy/backbone_layer_{n}" for n in layers] + [ENTROPY_POOLER]
    names = [f"layer {n}" for n in layers] + ["pooler"]
    out = Section("Attention entropy per layer")
    if not layers:
        out.text.append("No run logs entropy/backbone_layer_N: nothing to compare.")
        return out
    summaries = {g.label: [context.summary_at_best_epoch(g, key) for key in keys] for g in context.groups}
    table = Table(
        name="cvs_entropy_per_layer",
        title="Attention entropy per layer (% of maximum, at the best epoch)",
        columns=["configuration", *names],
        rows=[],
    )
    for label, row in summaries.items():
        table.rows.append([text_cell(label), *(summary_cell(s, 2) for s in row)])
    table.notes.append("mean ± std over seeds (ddof=1); 100 = uniform attention over the tokens")
    out.tables.append(table)
    series = [
        figures.BarSeries(label, [_or_nan(s.mean) for s in row], [_or_zero(s) for s in row])
        for label, row in summaries.items()
    ]
    out.figures.append(
        FigureItem(
            name="cvs_entropy_per_layer",
            title="Attention entropy per layer",
            figure=figures.grouped_bars(
                names,
                series,
                ylabel="attention entropy (% of max)",
                title="Attention entropy at the best epoch",
                ylim=(0.0, 105.0),
                value_digits=1,
            ),
            caption="bars: mean over seeds, labelled with it; error bars: sample std (ddof=1); 100 = uniform",
        )
    )
    return out


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _or_zero(summary: Summary) -> float:
    return summary.std if summary.std is not None and summary.n > 1 else 0.0
