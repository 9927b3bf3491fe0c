"""The MLflow side of a sweep: its parent run, one nested child run per (cell, seed), and the summary.

Everything a sweep knows about its runs lives in the tracking store as tags, so a re-run on any machine finds
them (never from local files):

- the parent: ``avlm.sweep.role=parent``, ``avlm.sweep.key`` (the sweep's identity: experiment, spec hash and the
  parent a chain gave), ``avlm.sweep.name``, ``avlm.sweep.spec_sha256``;
- each child: ``mlflow.parentRunId``, ``avlm.sweep.role=child``, ``avlm.sweep.name``, ``avlm.sweep.spec_sha256``,
  ``avlm.sweep.cell``, ``avlm.sweep.seed``; the winner's children get ``avlm.sweep.is_winner=true``;
- a run that ``mlflow run`` made for a process that joined an existing sweep (a re-run, another machine):
  ``avlm.sweep.role=worker`` and ``avlm.sweep.parent_run_id``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from avlm.tracking.mlflow_logger import MAX_TAG_LENGTH, truncated_text

logger = logging.getLogger(__name__)

T = TypeVar("T")

ROLE_TAG = "avlm.sweep.role"
KEY_TAG = "avlm.sweep.key"
NAME_TAG = "avlm.sweep.name"
SPEC_SHA_TAG = "avlm.sweep.spec_sha256"
CELL_TAG = "avlm.sweep.cell"
SEED_TAG = "avlm.sweep.seed"
WINNER_TAG = "avlm.sweep.winner"
IS_WINNER_TAG = "avlm.sweep.is_winner"
PARENT_TAG = "avlm.sweep.parent_run_id"
SUPERSEDED_TAG = "avlm.sweep.superseded_by"
PARENT_ID_TAG = "mlflow.parentRunId"

FINISHED = "FINISHED"
_TERMINAL = ("FINISHED", "FAILED", "KILLED")


@dataclasses.dataclass
class ChildRun:
    """One child run of a sweep as the tracking store holds it.

    Attributes:
        run_id: the MLflow run id.
        cell: its cell's name.
        seed: its seed.
        status: RUNNING, FINISHED, FAILED or KILLED.
        metrics: final metric values (the last value logged of each key).
        start_time: milliseconds since the epoch (orders retries of one (cell, seed)).
        end_time: milliseconds since the epoch; None while running.
    """

    run_id: str
    cell: str
    seed: int
    status: str
    metrics: dict[str, float]
    start_time: int = 0
    end_time: int | None = None


def _child_from_run(run: Any) -> ChildRun:
    return ChildRun(
        run_id=run.info.run_id,
        cell=run.data.tags.get(CELL_TAG, ""),
        seed=int(run.data.tags.get(SEED_TAG, "-1")),
        status=run.info.status,
        metrics=dict(run.data.metrics),
        start_time=run.info.start_time or 0,
        end_time=run.info.end_time,
    )


def _retried(call: Callable[[], T], what: str, attempts: int = 5) -> T:
    """``call()``, retried when sqlite reports a locked database (children write to the same file meanwhile)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception as err:  # MlflowException wraps sqlalchemy's OperationalError
            if "database is locked" not in str(err) or attempt == attempts - 1:
                raise
            logger.debug("%s: sqlite store busy, retrying", what)
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


class SweepRuns:
    """The runs of sweeps in one tracking store (an MLflow client bound to its URI)."""

    tag_limit = MAX_TAG_LENGTH  # MLflow refuses longer tag values

    def __init__(self, tracking_uri: str):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)

    # -- experiments and parents -----------------------------------------------------------------------------------
    def experiment_of(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.experiment_id

    def experiment_id(self, name: str) -> str:
        """The id of experiment ``name``, created if it does not exist (by another worker meanwhile is fine)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name)
        except Exception:  # created by another worker since the look-up
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def find_parent(self, experiment_id: str, key: str) -> str | None:
        """The oldest parent run of sweep ``key`` in the experiment, or None."""
        runs = self.client.search_runs(
            [experiment_id],
            f"tags.`{ROLE_TAG}` = 'parent' AND tags.`{KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def create_run(self, experiment_id: str, run_name: str, tags: Mapping[str, str]) -> str:
        run = _retried(lambda: self.client.create_run(experiment_id, run_name=run_name, tags=dict(tags)), "create run")
        return run.info.run_id

    def tags(self, run_id: str) -> dict[str, str]:
        return dict(self.client.get_run(run_id).data.tags)

    def status(self, run_id: str) -> str:
        return self.client.get_run(run_id).info.status

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        """Set tags on a run, values cut to ``tag_limit`` characters."""
        from mlflow.entities import RunTag

        batch = [RunTag(key, truncated_text(str(value), self.tag_limit)) for key, value in tags.items()]
        for start in range(0, len(batch), 100):  # MLflow takes at most 100 tags per batch
            _retried(lambda start=start: self.client.log_batch(run_id, tags=batch[start : start + 100]), "set tags")

    def set_status(self, run_id: str, status: str) -> None:
        """Mark ``run_id`` RUNNING again, or end it with a terminal status."""
        if status in _TERMINAL:
            _retried(lambda: self.client.set_terminated(run_id, status), "end run")
        else:
            _retried(lambda: self.client.update_run(run_id, status=status), "update run")

    def log_texts(self, run_id: str, files: Mapping[str, str]) -> None:
        """Upload ``{artifact path: text}`` files to the run (each one a file at that path)."""
        with tempfile.TemporaryDirectory(prefix="avlm-sweep-") as tmp:
            for artifact_path, text in files.items():
                local = Path(tmp) / artifact_path
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_text(text)
                parent = str(Path(artifact_path).parent)
                _retried(
                    lambda local=local, parent=parent: self.client.log_artifact(
                        run_id, str(local), None if parent == "." else parent
                    ),
                    "log artifact",
                )

    def log_file(self, run_id: str, path: str | Path, artifact_dir: str) -> None:
        _retried(lambda: self.client.log_artifact(run_id, str(path), artifact_dir), "log artifact")

    def download_file(self, run_id: str, artifact_path: str, destination: str | Path) -> Path | None:
        """Download one artifact file of a run into ``destination``; None when the run has no such file."""
        parent = str(Path(artifact_path).parent)
        listed = _retried(lambda: self.client.list_artifacts(run_id, None if parent == "." else parent), "list")
        if not any(info.path == artifact_path and not info.is_dir for info in listed):
            return None
        target = Path(destination) / run_id
        target.mkdir(parents=True, exist_ok=True)
        local = _retried(lambda: self.client.download_artifacts(run_id, artifact_path, str(target)), "download")
        return Path(local)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        batch = [Metric(key, float(value), stamp, 0) for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):  # MLflow's limit per batch
            _retried(lambda start=start: self.client.log_batch(run_id, metrics=batch[start : start + 1000]), "metrics")

    # -- children ----------------------------------------------------------------------------------------------------
    def create_child(self, parent_run_id: str, *, run_name: str, tags: Mapping[str, str]) -> str:
        """A RUNNING child of ``parent_run_id`` in its experiment; the recipe's process attaches to it."""
        experiment_id = self.experiment_of(parent_run_id)
        return self.create_run(experiment_id, run_name, {PARENT_ID_TAG: parent_run_id, ROLE_TAG: "child", **tags})

    def children(self, parent_run_id: str, spec_sha256: str) -> list[ChildRun]:
        """Every child of the parent made for this spec, oldest first (retries of a (cell, seed) included)."""
        experiment_id = self.experiment_of(parent_run_id)
        query = (
            f"tags.`{PARENT_ID_TAG}` = '{parent_run_id}' AND tags.`{ROLE_TAG}` = 'child' "
            f"AND tags.`{SPEC_SHA_TAG}` = '{spec_sha256}'"
        )
        runs, token = [], None
        while True:
            page = self.client.search_runs(
                [experiment_id], query, order_by=["attributes.start_time ASC"], max_results=1000, page_token=token
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        return [_child_from_run(run) for run in runs]

    def child(self, run_id: str) -> ChildRun:
        return _child_from_run(self.client.get_run(run_id))

    def log_summary(
        self,
        parent_run_id: str,
        *,
        files: Mapping[str, str],
        tags: Mapping[str, Any],
        metrics: Mapping[str, float],
        child_tags: Mapping[str, Mapping[str, Any]],
    ) -> None:
        """Write the sweep's summary: artifacts and tags (and metrics) on the parent, tags on its children."""
        self.log_texts(parent_run_id, files)
        self.set_tags(parent_run_id, tags)
        if metrics:
            self.log_metrics(parent_run_id, metrics)
        for run_id, run_tags in child_tags.items():
            self.set_tags(run_id, run_tags)


def json_text(data: Any) -> str:
    """Stable JSON for artifacts (sorted keys would reorder cells; insertion order is the spec's)."""
    return json.dumps(data, indent=2, default=str) + "\n"
