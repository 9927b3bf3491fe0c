"""The probe report, as Markdown for people and JSON for tools, in the layout of the hand-written probe reports;
and the same evidence as MLflow metrics and tags.

Sections, in order: header (generated, decision), Config Snapshot, Sanity Checks, PASS/FAIL Gate, Ablation
Summary, Run Metrics, Alignment Samples (when given), Decision Reasoning.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import PurePath
from typing import Any

import numpy as np

from avlm.probe.gate import AblationRow, CellResult, GateDecision, RunRow
from avlm.probe.sanity import SanityResult
from avlm.stats import format_mean_std


@dataclasses.dataclass(frozen=True)
class ProbeReport:
    """Everything the probe report shows.

    Attributes:
        generated_at: when the report was made; timezone-aware, so that reports from different machines compare.
        config_snapshot: the resolved run configuration, flat (key → value), shown in insertion order.
        sanity: the sanity suite's results, in the order they ran.
        gate: the gate's decision; the report's headline decision is ``gate.passed``.
        ablation: ``ablation_table(cells)`` rows (one split, normally val).
        runs: ``run_table(cells)`` rows.
        alignment_samples: optional rows (column → value) showing which sample each label row belongs to.
        title: the report's first heading.
    """

    generated_at: datetime
    config_snapshot: Mapping[str, Any]
    sanity: Sequence[SanityResult]
    gate: GateDecision
    ablation: Sequence[AblationRow]
    runs: Sequence[RunRow]
    alignment_samples: Sequence[Mapping[str, Any]] = ()
    title: str = "Probe Report"

    def __post_init__(self) -> None:
        if self.generated_at.tzinfo is None:
            raise ValueError("generated_at must be timezone-aware, e.g. datetime.now(timezone.utc)")

    @property
    def decision(self) -> str:
        """``PASS`` or ``FAIL``: derived from the gate, so that the headline cannot disagree with it."""
        return "PASS" if self.gate.passed else "FAIL"


def _cell(value: Any, digits: int = 4) -> str:
    """A number or value as the report's tables and figure lists show it."""
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.{digits}f}" if math.isfinite(value) else str(float(value))
    return str(value)


def _table(header: Sequence[str], alignments: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(alignments) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _sanity_lines(sanity: Sequence[SanityResult]) -> list[str]:
    all_passed = bool(sanity) and all(r.passed for r in sanity)
    lines = [f"- all_passed: `{all_passed}`"]
    if not sanity:
        lines.append("- no sanity check ran")
    for result in sanity:
        parts = [f"`passed={result.passed}`", *(f"`{key}={_cell(value)}`" for key, value in result.figures.items())]
        lines.append(f"- {result.name}: {' '.join(parts)} — {result.message}")
    return lines


def _gate_lines(gate: GateDecision) -> list[str]:
    return [
        f"Mean ± sample std (ddof=1) over seeds `{gate.seeds}`, on the `{gate.evaluated_on}` split; the "
        f"configuration was selected on `{gate.selected_on}` (largest mean delta).",
        "",
        f"- result: **{'PASS' if gate.passed else 'FAIL'}**",
        f"- pooling: `{gate.gate_pooling}`",
        f"- optimizer: `{gate.gate_optimizer}`",
        f"- selected on: `{gate.selected_on}`",
        f"- evaluated on: `{gate.evaluated_on}`",
        f"- pretrained mean±std {gate.metric}: `{format_mean_std(gate.pre_mean, gate.pre_std)}`",
        f"- random mean±std {gate.metric}: `{format_mean_std(gate.rand_mean, gate.rand_std)}`",
        f"- delta mean±std: `{format_mean_std(gate.delta_mean, gate.delta_std)}`",
        f"- required delta: `{gate.required_delta:.4f}`",
        f"- sanity checks passed: `{gate.sanity_passed}`",
    ]


def _ablation_lines(rows: Sequence[AblationRow], metric: str) -> list[str]:
    splits = sorted({row.split for row in rows})
    intro = (
        f"Mean over seeds of {' / '.join(splits) or 'val'} {metric} per configuration; "
        "delta = pretrained − random, paired by seed."
    )
    table = _table(
        ["pooling", "optimizer", "pre_mean", "rand_mean", "delta_mean"],
        ["---", "---", "---:", "---:", "---:"],
        [[r.pooling, r.optimizer, _cell(r.pre_mean), _cell(r.rand_mean), _cell(r.delta_mean)] for r in rows],
    )
    return [intro, "", *table]


def _run_lines(rows: Sequence[RunRow], metric: str) -> list[str]:
    with_test = any(r.pre_test is not None or r.rand_test is not None for r in rows)
    header = ["pooling", "optimizer", "seed", f"pre_{metric}", f"rand_{metric}", f"delta_{metric}"]
    if with_test:
        header += [f"pre_test_{metric}", f"rand_test_{metric}", f"delta_test_{metric}"]
    header += ["pre_bestF1", "rand_bestF1"]
    table_rows = []
    for r in rows:
        test_values = [r.pre_test, r.rand_test, r.delta_test] if with_test else []
        values = [r.pre_val, r.rand_val, r.delta_val, *test_values, r.pre_best_f1, r.rand_best_f1]
        table_rows.append([r.pooling, r.optimizer, _cell(r.seed), *(_cell(v) for v in values)])
    intro = f"Per seed; {metric} and best F1 on val" + (", test_* on test." if with_test else ".")
    return [intro, "", *_table(header, ["---", "---"] + ["---:"] * (len(header) - 2), table_rows)]


def _alignment_lines(samples: Sequence[Mapping[str, Any]]) -> list[str]:
    first = samples[0]
    columns = list(first)
    numeric = [isinstance(first[c], (int, float, np.number)) and not isinstance(first[c], bool) for c in columns]
    alignments = ["---:" if is_number else "---" for is_number in numeric]
    # Ids and timestamps are shown whole: the 4-decimal number format is for metrics only.
    rows = [[str(sample.get(c, "")) for c in columns] for sample in samples]
    return _table(columns, alignments, rows)


def render_markdown(report: ProbeReport) -> str:
    """The report as Markdown, section by section as in the hand-written probe reports.

    Metrics are shown with 4 decimals, mean ± std as ``0.6015 ± 0.0465``, missing values as ``n/a``.

    Args:
        report: the report.

    Returns:
        The Markdown text, ending with a newline.
    """
    metric = report.gate.metric
    lines = [
        f"# {report.title}",
        "",
        f"- Generated: `{report.generated_at.isoformat()}`",
        f"- Decision: **{report.decision}**",
        "",
        "## Config Snapshot",
        "",
        *[f"- {key}: `{value}`" for key, value in report.config_snapshot.items()],
        "",
        "## Sanity Checks",
        "",
        *_sanity_lines(report.sanity),
        "",
        "## PASS/FAIL Gate",
        "",
        *_gate_lines(report.gate),
        "",
        "## Ablation Summary",
        "",
        *_ablation_lines(report.ablation, metric),
        "",
        "## Run Metrics",
        "",
        *_run_lines(report.runs, metric),
        "",
    ]
    if report.alignment_samples:
        lines += ["## Alignment Samples", "", *_alignment_lines(report.alignment_samples), ""]
    lines += ["## Decision Reasoning", "", *[f"- {reason}" for reason in report.gate.reasons]]
    return "\n".join(lines) + "\n"


def _jsonable(value: Any, where: str) -> Any:
    """``value`` as plain JSON types; non-finite floats become None (strict JSON has no NaN)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (PurePath, datetime)):
        return value.isoformat() if isinstance(value, datetime) else str(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist(), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where)
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item, f"{where}.{key}") for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, f"{where}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, (set, frozenset)):
        return [_jsonable(item, f"{where}[]") for item in sorted(value, key=str)]
    raise TypeError(f"report value at {where} has type {type(value).__name__}, which JSON cannot hold")


def report_json(report: ProbeReport) -> dict[str, Any]:
    """The report as a dict of plain JSON types (``json.dumps(..., allow_nan=False)`` accepts it).

    Non-finite numbers (a NaN mAP, a missing test number) are ``null``; paths are strings; tuples and sets are
    lists; dataclasses are dicts of their fields.

    Args:
        report: the report.

    Returns:
        Keys ``title``, ``generated_at`` (ISO 8601), ``decision``, ``config_snapshot``, ``sanity`` (list of
        name / passed / figures / message), ``gate`` (every ``GateDecision`` field), ``ablation``, ``runs``,
        ``alignment_samples``.

    Raises:
        TypeError: a value (in the config snapshot, say) that has no JSON form; the message says where it is.
    """
    return _jsonable(
        {
            "title": report.title,
            "generated_at": report.generated_at,
            "decision": report.decision,
            "config_snapshot": report.config_snapshot,
            "sanity": list(report.sanity),
            "gate": report.gate,
            "ablation": list(report.ablation),
            "runs": list(report.runs),
            "alignment_samples": list(report.alignment_samples),
        },
        "report",
    )


def cell_metrics(cell: CellResult) -> dict[str, float]:
    """A grid cell's numbers as the metrics of its MLflow run: val mAP and best F1, and test mAP when there is one."""
    metrics = {
        "pre_val_mAP": cell.pre_val,
        "rand_val_mAP": cell.rand_val,
        "delta_val_mAP": cell.pre_val - cell.rand_val,
        "pre_val_best_F1": cell.pre_best_f1,
        "rand_val_best_F1": cell.rand_best_f1,
    }
    if cell.pre_test is not None and cell.rand_test is not None:
        metrics.update(
            pre_test_mAP=cell.pre_test, rand_test_mAP=cell.rand_test, delta_test_mAP=cell.pre_test - cell.rand_test
        )
    return metrics


def gate_metrics(decision: GateDecision) -> dict[str, float]:
    """The gate's figures as ``gate/*`` metrics of the probe's run (``gate/passed`` is 1.0 or 0.0)."""
    return {
        "gate/passed": float(decision.passed),
        "gate/delta_mean": decision.delta_mean,
        "gate/delta_std": decision.delta_std,
        "gate/pre_mean": decision.pre_mean,
        "gate/rand_mean": decision.rand_mean,
        "gate/required_delta": decision.required_delta,
    }


def evidence_tags(decision: GateDecision) -> dict[str, str]:
    """The gate's decision as tags, for the probe's run and a registered version alike.

    ``gate`` is ``PASS`` or ``FAIL``; numbers are ``repr`` strings, so that they read back exactly with ``float``.
    The reasoning is whole: the run logger cuts values longer than MLflow keeps for a run tag.
    """
    return {
        "gate": "PASS" if decision.passed else "FAIL",
        "gate.pooling": decision.gate_pooling,
        "gate.optimizer": decision.gate_optimizer,
        "gate.evaluated_on": decision.evaluated_on,
        "gate.seeds": ",".join(map(str, decision.seeds)),
        "gate.delta_mean": repr(decision.delta_mean),
        "gate.delta_std": repr(decision.delta_std),
        "gate.pre_mean": repr(decision.pre_mean),
        "gate.rand_mean": repr(decision.rand_mean),
        "gate.required_delta": repr(decision.required_delta),
        "gate.reasoning": "\n".join(decision.reasons),
    }
