"""Reading runs back from MLflow as plain records: what reports (and any other protocol code) compare.

Everything here only reads. A :class:`RunRecord` is a frozen snapshot of one run (its params, latest metric values
and tags as plain dicts), so the code that groups, tests and tabulates runs (``avlm.report``) never touches MLflow
and is tested on records built by hand. :class:`RunReader` binds a tracking URI and also reads what a record does
not hold: a metric's history and a run's JSON artifacts.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from avlm.errors import ConfigError
from avlm.tracking.mlflow_logger import resolve_tracking_uri

_PAGE_SIZE = 1000  # MLflow's largest page for search_runs on every store


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """One MLflow run as plain data.

    Attributes:
        run_id: the run's id.
        run_name: its name (``mlflow.runName``).
        experiment: the name of its experiment.
        status: ``FINISHED``, ``FAILED``, ``KILLED``, ``RUNNING`` or ``SCHEDULED``.
        start_time: milliseconds since the epoch (0 when unknown).
        params: every param, as the strings MLflow stores.
        metrics: each metric's latest value (MLflow's "latest": the highest step, then the latest timestamp).
        tags: every tag, ``mlflow.*`` system tags included.
    """

    run_id: str
    run_name: str
    experiment: str
    status: str
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str]


class RunReader:
    """Reads runs, metric histories and JSON artifacts from one tracking store.

    Args:
        tracking_uri: the store; empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db``.
    """

    def __init__(self, tracking_uri: str = ""):
        from mlflow import MlflowClient

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._client = MlflowClient(self.tracking_uri)

    def find_runs(
        self,
        experiment_names: Sequence[str],
        filter_string: str = "",
        *,
        statuses: Iterable[str] | None = None,
    ) -> list[RunRecord]:
        """The runs of the named experiments that match an MLflow search filter.

        Args:
            experiment_names: one or more experiment names; each must exist.
            filter_string: an MLflow search filter, e.g. ``"tags.recipe = 'cvs' and params.`cfg.seed` != '0'"``.
            statuses: keep only runs with one of these statuses; None = every status.

        Returns:
            The runs ordered by (experiment name, start time, run id), so that callers see a stable order.

        Raises:
            ConfigError: no experiment names, an experiment that does not exist, or a filter MLflow refuses.
        """
        from mlflow.exceptions import MlflowException

        if not experiment_names:
            raise ConfigError("find_runs needs at least one experiment name")
        names = {}
        for name in experiment_names:
            experiment = self._client.get_experiment_by_name(name)
            if experiment is None:
                known = sorted(e.name for e in self._client.search_experiments())
                raise ConfigError(f"no MLflow experiment named {name!r} at {self.tracking_uri} (known: {known})")
            names[experiment.experiment_id] = name
        wanted = None if statuses is None else set(statuses)
        records, token = [], None
        while True:
            try:
                page = self._client.search_runs(list(names), filter_string, max_results=_PAGE_SIZE, page_token=token)
            except MlflowException as err:
                raise ConfigError(f"MLflow refused the run filter {filter_string!r}: {err.message}") from err
            for run in page:
                if wanted is None or run.info.status in wanted:
                    records.append(_record(run, names[run.info.experiment_id]))
            token = page.token
            if not token:
                break
        return sorted(records, key=lambda r: (r.experiment, r.start_time, r.run_id))

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """``(step, value)`` of every point of ``key``, by step; of several points at one step, the last logged.

        A resumed run may log an epoch's point again at the same step (MLflow keeps both); the last one is what
        the run ended with. A key the run never logged gives an empty list.
        """
        points = sorted(self._client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
        return sorted({m.step: float(m.value) for m in points}.items())

    def load_json_artifact(self, run_id: str, artifact_path: str) -> Any | None:
        """The parsed JSON artifact at ``artifact_path`` of the run, or None when the run has no such file."""
        parent = artifact_path.rsplit("/", 1)[0] if "/" in artifact_path else None
        if not any(info.path == artifact_path for info in self._client.list_artifacts(run_id, parent)):
            return None
        with tempfile.TemporaryDirectory() as folder:
            local = self._client.download_artifacts(run_id, artifact_path, folder)
            return json.loads(Path(local).read_text())


def _record(run: Any, experiment: str) -> RunRecord:
    return RunRecord(
        run_id=run.info.run_id,
        run_name=run.info.run_name or run.data.tags.get("mlflow.runName", ""),
        experiment=experiment,
        status=run.info.status,
        start_time=int(run.info.start_time or 0),
        params=dict(run.data.params),
        metrics={key: float(value) for key, value in run.data.metrics.items()},
        tags=dict(run.data.tags),
    )


def find_runs(
    experiment_names: list[str],
    filter_string: str = "",
    *,
    statuses: Iterable[str] | None = None,
    tracking_uri: str = "",
) -> list[RunRecord]:
    """:meth:`RunReader.find_runs` on the default store (or ``tracking_uri``); every status unless ``statuses``."""
    return RunReader(tracking_uri).find_runs(experiment_names, filter_string, statuses=statuses)


def metric_history(run_id: str, key: str, *, tracking_uri: str = "") -> list[tuple[int, float]]:
    """:meth:`RunReader.metric_history` on the default store (or ``tracking_uri``)."""
    return RunReader(tracking_uri).metric_history(run_id, key)
