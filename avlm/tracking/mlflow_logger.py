"""MLflow tracking: one run per training, only the main process talks to MLflow.

Metrics are buffered and written by a background thread with ``log_batch`` (each MLflow write to a sqlite store
costs milliseconds; a batch of a thousand points costs about the same as one point), and flushed when the run
closes, so logging every optimizer step does not slow the loop down.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from avlm.errors import ConfigError
from avlm.tracking.run_logger import NullLogger, RunLogger

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
_MAX_PARAMS_PER_BATCH = 100
_MAX_PARAM_LENGTH = 6000


@dataclasses.dataclass
class TrackingConfig:
    """Where and how a run is tracked.

    Attributes:
        experiment: MLflow experiment; empty = ``avlm-<recipe>``. Ignored when attaching to a run that
            ``mlflow run`` created (that run's experiment is chosen by ``mlflow run --experiment-name``).
        run_name: empty = built from the key settings (e.g. ``cvs-vjepa2-lora_r32-seed1``).
        tracking_uri: empty = ``$MLFLOW_TRACKING_URI`` or ``sqlite:///mlflow.db`` in the working directory.
        system_metrics: log CPU/GPU/memory usage alongside the training metrics.
        flush_every_s: how often the background thread writes buffered metrics.
    """

    experiment: str = ""
    run_name: str = ""
    tracking_uri: str = ""
    system_metrics: bool = True
    flush_every_s: float = 5.0

    def __post_init__(self) -> None:
        if self.flush_every_s <= 0:
            raise ConfigError("config key 'tracking.flush_every_s' must be > 0")


def to_float(value: Any) -> float:
    """Plain float from a Python, numpy or 0-d torch scalar (accelerate's own tracker drops the latter two)."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class MLflowLogger:
    """Buffered MLflow logger bound to one run id (see the module docstring for why it buffers)."""

    def __init__(self, run_id: str, flush_every_s: float = 5.0):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()
        self.artifact_uri = self.client.get_run(run_id).info.artifact_uri
        self._buffer: list[Any] = []
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.flush_every_s = flush_every_s
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._flush_loop, name="avlm-mlflow-flush", daemon=True)
        self._thread.start()

    # -- metrics -------------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue metrics at an optimizer step; non-finite values are kept (MLflow stores NaN/inf)."""
        from mlflow.entities import Metric

        timestamp = int(time.time() * 1000)
        points = [Metric(key, to_float(value), timestamp, int(step)) for key, value in metrics.items()]
        with self._lock:
            self._buffer.extend(points)
            full = len(self._buffer) >= _MAX_METRICS_PER_BATCH
        if full:
            self._wake.set()

    def _write_pending(self) -> None:
        with self._lock:
            pending, self._buffer = self._buffer, []
        with self._write_lock:  # one writer at a time keeps steps in order in the store
            for start in range(0, len(pending), _MAX_METRICS_PER_BATCH):
                self.client.log_batch(self.run_id, metrics=pending[start : start + _MAX_METRICS_PER_BATCH])

    def _flush_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.flush_every_s)
            self._wake.clear()
            try:
                self._write_pending()
            except Exception as err:  # surfaced by flush(); the training must not die in a side thread
                self._error = err
                logger.warning("MLflow metric flush failed (will retry): %s", err)

    def flush(self) -> None:
        """Write every queued metric now (raises if the store rejects them)."""
        self._write_pending()
        self._error = None

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=30)
        self.flush()

    # -- params, tags, artifacts ------------------------------------------------------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _param_str(v)) for k, v in params.items()]
        for start in range(0, len(items), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=items[start : start + _MAX_PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(artifact_file).name
            path.write_text(json.dumps(data, indent=2, default=str))
            parent = str(Path(artifact_file).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)


def _param_str(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return text[:_MAX_PARAM_LENGTH]


def resolve_tracking_uri(configured: str = "") -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig,
    *,
    recipe: str,
    run_name: str,
    is_main_process: bool,
    resume_run_id: str | None = None,
) -> Iterator[RunLogger]:
    """Open (or attach to, or resume) the MLflow run of a training; close it FINISHED, or FAILED on an exception.

    Attaches to ``$MLFLOW_RUN_ID`` when ``mlflow run`` created the run. Ranks other than the main one get a
    :class:`NullLogger` and never import or call MLflow.
    """
    if not is_main_process:
        yield NullLogger()
        return

    import mlflow

    mlflow.set_tracking_uri(resolve_tracking_uri(cfg.tracking_uri))
    launcher_run_id = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=cfg.system_metrics)
    elif launcher_run_id:
        run = mlflow.start_run(run_id=launcher_run_id, log_system_metrics=cfg.system_metrics)
    else:
        mlflow.set_experiment(cfg.experiment or f"avlm-{recipe}")
        run = mlflow.start_run(run_name=run_name, log_system_metrics=cfg.system_metrics)
    run_id = run.info.run_id
    if resume_run_id and launcher_run_id and launcher_run_id != resume_run_id:
        # `mlflow run -P resume=...` made a fresh run; leave a pointer in it to where the training went on.
        mlflow.MlflowClient().set_tag(launcher_run_id, "avlm.resumed_into", resume_run_id)
    run_logger = MLflowLogger(run_id, flush_every_s=cfg.flush_every_s)
    if not resume_run_id:
        run_logger.set_tags({"mlflow.runName": run_name})
    logger.info("MLflow run %s (%s) at %s", run_id, run_name, mlflow.get_tracking_uri())
    with _ended_with_status(lambda status: _close_then(run_logger, lambda: mlflow.end_run(status=status))):
        yield run_logger


@contextlib.contextmanager
def nested_run(parent: RunLogger, *, run_name: str, tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """A child run of ``parent``'s run, in the same experiment (the UI shows it under its parent); ended FINISHED,
    or FAILED on an exception. A :class:`NullLogger` parent (a rank other than the main one) gets a NullLogger.

    The child is made with the client, not ``mlflow.start_run``, so the parent stays the active run.
    """
    if parent.run_id is None:
        yield NullLogger()
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    child_tags = {"mlflow.parentRunId": parent.run_id, **{k: str(v) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=run_name, tags=child_tags)
    child = MLflowLogger(run.info.run_id, flush_every_s=getattr(parent, "flush_every_s", 5.0))
    with _ended_with_status(lambda status: _close_then(child, lambda: client.set_terminated(run.info.run_id, status))):
        yield child


def _close_then(run_logger: MLflowLogger, end: Callable[[], Any]) -> None:
    try:
        run_logger.close()
    finally:
        end()


@contextlib.contextmanager
def _ended_with_status(end: Callable[[str], Any]) -> Iterator[None]:
    """Run the block, then ``end(status)``: FINISHED, KILLED on Ctrl-C, FAILED on any other exception."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        end(status)
