"""What every report kind works from: the spec, the runs, their groups, and a source of metric histories and JSON
artifacts (:class:`RunSource`; MLflow's is ``avlm.tracking.run_table.RunReader``, tests may pass their own)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import matplotlib.pyplot as plt
import numpy as np

from avlm.report.figures import Curve
from avlm.report.grouping import RunGroup, Summary, group_runs, run_field
from avlm.report.spec import ReportSpec
from avlm.report.tables import Table
from avlm.tracking.run_table import RunRecord

EPOCH_METRIC = "epoch"
BEST_EPOCH_METRIC = "best_epoch"
_SPLIT_METRIC = re.compile(r"(?P<split>[A-Za-z0-9_]+)/(?P<name>[^/]+)")


class RunSource(Protocol):
    """Reads what a :class:`~avlm.tracking.run_table.RunRecord` does not hold."""

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]: ...

    def load_json_artifact(self, run_id: str, artifact_path: str) -> Any | None: ...


@dataclasses.dataclass
class FigureItem:
    """A figure of a section: written as ``figures/<name>.png`` and ``.svg``."""

    name: str
    title: str
    figure: plt.Figure
    caption: str = ""


@dataclasses.dataclass
class Section:
    """A part of the report: a heading, paragraphs, tables and figures, in that order."""

    title: str
    text: list[str] = dataclasses.field(default_factory=list)
    tables: list[Table] = dataclasses.field(default_factory=list)
    figures: list[FigureItem] = dataclasses.field(default_factory=list)


class ReportContext:
    """The spec, the runs and their groups, with cached reads of metric histories and JSON artifacts.

    Args:
        spec: the report spec.
        runs: the runs the report covers.
        source: where histories and artifacts come from.
        default_label: the kind's group label when the spec sets none (None = the differing entries).
    """

    def __init__(
        self,
        spec: ReportSpec,
        runs: Sequence[RunRecord],
        source: RunSource,
        default_label: Sequence[str] | None = None,
    ):
        self.spec = spec
        self.runs = list(runs)
        self.source = source
        self.label = spec.group.label if spec.group.label is not None else default_label
        self.tag_defaults = spec.group_tag_defaults()
        self.groups = self.group(self.runs)
        # Named subsets of groups that targets may refer to (captioning: each results table's groups), in order.
        self.scopes: dict[str, list[RunGroup]] = {}
        self._histories: dict[tuple[str, str], list[tuple[int, float]]] = {}
        self._artifacts: dict[tuple[str, str], Any] = {}

    @property
    def digits(self) -> int:
        return self.spec.digits

    def group(self, runs: Iterable[RunRecord]) -> list[RunGroup]:
        """Group ``runs`` with the spec's settings."""
        return group_runs(
            runs,
            seed_param=self.spec.group.seed_param,
            ignore=self.spec.group.ignore,
            tag_defaults=self.tag_defaults,
            label=self.label,
        )

    def field(self, run: RunRecord, name: str) -> str | None:
        """A run's param or tag (``tags.X``), with the spec's tag defaults."""
        return run_field(run, name, self.tag_defaults)

    def resolve(self, metric: str) -> str:
        """The logged key of ``metric``: ``<split>/<name>`` is the best checkpoint's ``final/<split>_<name>`` when a
        run logs that (``test/SPIDEr`` → ``final/test_SPIDEr``; ``val/mAP`` → ``final/val_mAP``, not the last
        epoch's ``val/mAP``), any other name is itself."""
        match = _SPLIT_METRIC.fullmatch(metric)
        if match:
            final = f"final/{match['split']}_{match['name']}"
            if any(final in run.metrics for run in self.runs):
                return final
        return metric

    def history(self, run: RunRecord, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` points of ``key`` (read once per run and key)."""
        if (run.run_id, key) not in self._histories:
            self._histories[(run.run_id, key)] = (
                self.source.metric_history(run.run_id, key) if key in run.metrics else []
            )
        return self._histories[(run.run_id, key)]

    def by_epoch(self, run: RunRecord, key: str) -> dict[int, float]:
        """Epoch → value of a per-epoch metric: each point's step is mapped to the ``epoch`` metric logged at the
        same step; a run without an ``epoch`` metric is taken to log at step = epoch."""
        epochs = {step: int(round(value)) for step, value in self.history(run, EPOCH_METRIC)}
        return {epochs.get(step, step): value for step, value in self.history(run, key)}

    def at_best_epoch(self, run: RunRecord, key: str) -> float | None:
        """The metric at the run's best epoch (``best_epoch``), else its latest value, else None."""
        best = run.metrics.get(BEST_EPOCH_METRIC)
        if best is not None:
            series = self.by_epoch(run, key)
            if int(round(best)) in series:
                return series[int(round(best))]
        return run.metrics.get(key)

    def summary_at_best_epoch(self, group: RunGroup, key: str) -> Summary:
        values = [v for v in (self.at_best_epoch(run, key) for run in group.runs) if v is not None]
        return Summary.of_values(values, len(group.runs))

    def json_artifact(self, run: RunRecord, path: str) -> Any | None:
        """A run's JSON artifact, or None (read once per run and path)."""
        if (run.run_id, path) not in self._artifacts:
            self._artifacts[(run.run_id, path)] = self.source.load_json_artifact(run.run_id, path)
        return self._artifacts[(run.run_id, path)]


def matches(run: RunRecord, where: Mapping[str, str], context: ReportContext) -> bool:
    """Whether the run's params/tags have the values ``where`` asks for."""
    return all(context.field(run, name) == value for name, value in where.items())


BAND_TEXT = {"minmax": "min–max over seeds", "std": "mean ± std over seeds (ddof=1)"}


def epoch_curves(context: ReportContext, groups: Sequence[RunGroup], key: str, band: str) -> list[Curve]:
    """Per group, ``key`` against epoch: the mean over the seeds that reached each epoch and a band, ``minmax``
    (lowest to highest seed) or ``std`` (mean ± sample std); groups that never log ``key`` are left out."""
    curves = []
    for group in groups:
        series = [context.by_epoch(run, key) for run in group.runs]
        epochs = sorted({epoch for s in series for epoch in s})
        if not epochs:
            continue
        stacks = [np.array([s[e] for s in series if e in s]) for e in epochs]
        means = [float(v.mean()) for v in stacks]
        if band == "minmax":
            low, high = [float(v.min()) for v in stacks], [float(v.max()) for v in stacks]
        else:
            spread = [float(v.std(ddof=1)) if len(v) > 1 else 0.0 for v in stacks]
            low = [m - s for m, s in zip(means, spread, strict=True)]
            high = [m + s for m, s in zip(means, spread, strict=True)]
        curves.append(Curve(group.label, epochs, means, low, high))
    return curves
