"""MLflow tracking: one run per training, only the main process talks to MLflow, and no write is lost to an outage.

Every write (metric points, params, tags, artifact uploads, the final status) goes through the run's
:class:`~avlm.tracking.outbox.Outbox` and a background thread, in order: the training never waits for the tracking
server and never dies of it. Metrics are batched (each MLflow write to a sqlite store costs milliseconds; a batch of
a thousand points costs about the same as one point), so logging every optimizer step does not slow the loop down.
While the server is away the writes wait in the run folder (``tracking/outbox.jsonl``); a run that closes before they
could be delivered says so and leaves them for ``avlm tracking replay <run folder>``, which also sets its status.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from avlm.errors import ConfigError, RunInterrupted, TrainingError
from avlm.tracking.outbox import (
    OUTBOX_FILE,
    STAGING_DIR,
    TRACKING_DIR,
    Delivery,
    Outbox,
    is_permanent,
    replay,
    stage,
    write_run_record,
)
from avlm.tracking.run_logger import NullLogger, RunLogger

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
_MAX_PARAM_LENGTH = 6000  # MLflow's limits on a param's and a tag's value
MAX_TAG_LENGTH = 8000
_TRUNCATED = "...[truncated]"


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
        close_timeout_s: how long the end of a run (and ``flush``) waits for the tracking server to take what is
            queued; what is still pending then stays in the run folder for ``avlm tracking replay``.
        max_queued_points: metric points held in memory while the server is slow; past that the queue moves to the
            run folder's ``tracking/outbox.jsonl``.
    """

    experiment: str = ""
    run_name: str = ""
    tracking_uri: str = ""
    system_metrics: bool = True
    flush_every_s: float = 5.0
    close_timeout_s: float = 120.0
    max_queued_points: int = 100_000

    def __post_init__(self) -> None:
        for key in ("flush_every_s", "close_timeout_s", "max_queued_points"):
            if not getattr(self, key) > 0:
                raise ConfigError(f"config key 'tracking.{key}' must be > 0, got {getattr(self, key)}")


def to_float(value: Any) -> float:
    """Plain float from a Python, numpy or 0-d torch scalar (accelerate's own tracker drops the latter two)."""
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


class MLflowLogger:
    """MLflow logger bound to one run id; writes are queued and delivered in order by a background thread.

    Args:
        run_id: the run written to.
        local_dir: the run's local output folder; its ``tracking/`` sub-folder holds the outbox, the staged uploads
            and the run record for a replay. None = ``<temp dir>/avlm-runs/<run id>``.
        tracking_uri: where the run lives (recorded for a replay); None = MLflow's current tracking URI.
        flush_every_s / close_timeout_s / max_queued_points: see :class:`TrackingConfig`.
        drop_logged_steps: a resumed run: drop points at steps the run already holds (for each key, steps up to its
            latest one), which the replayed epochs log again with the same values.
        client: the MLflow client (tests inject a failing one); None = ``MlflowClient(tracking_uri)``.
        retry_backoff_s: (first, longest) wait between retries of a failed delivery; doubles each failure.
    """

    def __init__(
        self,
        run_id: str,
        *,
        local_dir: str | Path | None = None,
        tracking_uri: str | None = None,
        flush_every_s: float = 5.0,
        close_timeout_s: float = 120.0,
        max_queued_points: int = 100_000,
        drop_logged_steps: bool = False,
        client: Any = None,
        retry_backoff_s: tuple[float, float] = (0.5, 10.0),
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.tracking_uri = absolute_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
        self.client = client if client is not None else MlflowClient(self.tracking_uri)
        run = self.client.get_run(run_id)
        self.artifact_uri = run.info.artifact_uri
        # run.data keeps, per key, the point at the largest step: one call gives every key's latest step
        self._logged_through = {m.key: m.step for m in run.data._metric_objs} if drop_logged_steps else {}
        self.local_dir = Path(local_dir) if local_dir else default_run_dir(run_id)
        self.tracking_dir = self.local_dir / TRACKING_DIR
        write_run_record(self.tracking_dir, run_id=run_id, tracking_uri=self.tracking_uri)
        self.flush_every_s = flush_every_s
        self.close_timeout_s = close_timeout_s
        self.max_queued_points = max_queued_points
        self.retry_backoff_s = retry_backoff_s
        self._outbox = Outbox(self.tracking_dir, max_queued_points)
        self._delivery = Delivery(self.client, run_id)
        self._slots = itertools.count(1)
        self._rejected: list[str] = []
        self._wake = threading.Event()  # a batch is full, or someone waits for the queue
        self._retry_now = threading.Event()  # cuts a retry's backoff short: someone waits for the queue
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._deliver_loop, name="avlm-mlflow-delivery", daemon=True)
        self._thread.start()

    # -- metrics -------------------------------------------------------------------------------------------------
    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Queue metrics at an optimizer step; non-finite values are kept (MLflow stores NaN/inf)."""
        timestamp, step = int(time.time() * 1000), int(step)
        points = [
            (key, to_float(value), timestamp, step)
            for key, value in metrics.items()
            if step > self._logged_through.get(key, -math.inf)
        ]
        if points:
            self._outbox.put("metrics", points=points)
            if self._outbox.pending()[1] >= 1000:  # a full batch: no reason to wait for the timer
                self._wake.set()

    # -- delivery (background thread) ----------------------------------------------------------------------------
    def _deliver_loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if failures:
                first, longest = self.retry_backoff_s
                self._retry_now.wait(min(longest, first * 2 ** (failures - 1)))
                self._retry_now.clear()
            else:
                self._wake.wait(self.flush_every_s)
                self._wake.clear()
            if not self._stop.is_set():
                failures = self._drain(failures)

    def _drain(self, failures: int) -> int:
        """Deliver until the queue is empty (returns 0) or the store is away (returns the new failure count)."""
        while batch := self._outbox.head():
            try:
                if failures:
                    # the failed attempt may have landed before its answer was lost: ask the store what it has
                    self._delivery.seen.clear()
                self._delivery.deliver(batch, deduplicate=failures > 0)
            except Exception as err:
                if not is_permanent(err):
                    if not failures:
                        logger.warning("MLflow write failed; queued and retried until it lands: %s", err)
                    self._outbox.spill()  # kept on disk while the server is away
                    return failures + 1
                message = f"{batch[0]['kind']} #{batch[0]['seq']}: {err}"
                self._rejected.append(message)
                logger.error("MLflow refused a write of run %s (dropped, not retried) %s", self.run_id, message)
            if failures:
                logger.warning("MLflow server reachable again; delivering the queued writes")
                failures = 0
            self._outbox.pop(batch)
        return 0

    def flush(self) -> None:
        """Wait until every queued write is in the store (at most ``close_timeout_s``).

        Raises:
            TrainingError: the store refused writes, or they are still pending after ``close_timeout_s``.
        """
        self._nudge()
        delivered = self._outbox.wait_empty(self.close_timeout_s)
        if self._rejected:
            rejected, self._rejected = self._rejected, []
            raise TrainingError(f"MLflow refused writes to run {self.run_id}: {'; '.join(rejected)}")
        if not delivered:
            entries, points = self._outbox.pending()
            raise TrainingError(
                f"MLflow run {self.run_id}: {points} metric points and {entries} writes still queued after "
                f"{self.close_timeout_s:g} s (tracking.close_timeout_s); is {self.tracking_uri} reachable?"
            )

    def close(self, status: str | None = None) -> bool:
        """Deliver what is queued, then ``status`` (FINISHED, FAILED, KILLED) if given, within ``close_timeout_s``;
        stop the delivery thread.

        Returns:
            True when everything landed. Otherwise the writes stay in ``tracking/outbox.jsonl`` of the run folder,
            a warning says how many and where, and ``avlm tracking replay <run folder>`` delivers them later.
        """
        if self._stop.is_set():  # closed already
            return self._outbox.pending()[0] == 0
        if status:
            self._outbox.put("end", status=status)
        self._nudge()
        delivered = self._outbox.wait_empty(self.close_timeout_s)
        self._stop.set()
        self._nudge()
        self._thread.join(timeout=10)
        for message in self._rejected:
            logger.error("MLflow run %s lost a refused write: %s", self.run_id, message)
        if delivered:
            self._outbox.discard_files()
            return True
        self._outbox.spill()
        entries, points = self._outbox.pending()
        logger.warning(
            "MLflow run %s at %s: %d metric points and %d writes%s could not be delivered within %g s; they are "
            "kept in %s. Once the server is back, run: avlm tracking replay %s",
            self.run_id, self.tracking_uri, points, entries, f" (final status {status})" if status else "",
            self.close_timeout_s, self._outbox.path, self.local_dir,
        )  # fmt: skip
        return False

    def _nudge(self) -> None:
        """Deliver now: wake the thread, and retry at once if it is waiting out a backoff."""
        self._wake.set()
        self._retry_now.set()

    # -- params, tags, artifacts (queued like metrics: an outage must not stop the training) ---------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        self._outbox.put("params", params={k: _param_str(v) for k, v in params.items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Queue tags; values longer than MLflow's limit are cut (here, so that recipes need not)."""
        self._outbox.put("tags", tags={k: truncated_text(str(v), MAX_TAG_LENGTH) for k, v in tags.items()})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Queue the upload of ``path`` (a file, or a folder as a sub-folder) as it is now (a snapshot)."""
        staged = stage(Path(path), self._new_slot())
        self._outbox.put("artifact", local=str(staged), artifact_path=artifact_path, contents=False)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        """Queue the upload of the folder's contents as they are now: a snapshot, because the folder may be
        replaced (``checkpoints/last`` is, each epoch) before the upload runs."""
        staged = stage(Path(directory), self._new_slot())
        self._outbox.put("artifact", local=str(staged), artifact_path=artifact_path, contents=True)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        path = self._new_slot() / Path(artifact_file).name
        path.write_text(json.dumps(data, indent=2, default=str))
        self._queue_generated(path, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        path = self._new_slot() / Path(artifact_file).name
        path.write_text(text)
        self._queue_generated(path, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        path = self._new_slot() / Path(artifact_file).name
        figure.savefig(path)
        plt.close(figure)
        self._queue_generated(path, artifact_file)

    def _new_slot(self) -> Path:
        slot = self.tracking_dir / STAGING_DIR / f"{next(self._slots):08d}"
        slot.mkdir(parents=True, exist_ok=True)
        return slot

    def _queue_generated(self, path: Path, artifact_file: str) -> None:
        parent = str(Path(artifact_file).parent)
        self._outbox.put("artifact", local=str(path), artifact_path=None if parent == "." else parent, contents=False)


def set_run_tags(run_id: str, tags: Mapping[str, str]) -> None:
    """Tag a run that has ended (a link to a later run it started, e.g. ``scst.child_run_id``)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for key, value in tags.items():
        client.set_tag(run_id, key, truncated_text(str(value), MAX_TAG_LENGTH))


def default_run_dir(run_id: str) -> Path:
    """Where a run's tracking files go when the caller names no run folder."""
    return Path(tempfile.gettempdir()) / "avlm-runs" / run_id


def truncated_text(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - len(_TRUNCATED)] + _TRUNCATED


def _param_str(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    return truncated_text(text, _MAX_PARAM_LENGTH)


def absolute_tracking_uri(uri: str) -> str:
    """A relative sqlite path made absolute, so that a replay from another folder finds the same store."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def resolve_tracking_uri(configured: str = "") -> str:
    """The configured URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


RunFolder = str | Path | Callable[[str], Path] | None
"""A run's local output folder, or a function of the run id that names it (recipes name the folder after the run
id, which exists only once the run does)."""


@contextlib.contextmanager
def tracked_run(
    cfg: TrackingConfig,
    *,
    recipe: str,
    run_name: str,
    is_main_process: bool,
    resume_run_id: str | None = None,
    run_dir: RunFolder = None,
) -> Iterator[RunLogger]:
    """Open (or attach to, or resume) the MLflow run of a training; close it FINISHED, FAILED on an exception, or
    KILLED on SIGTERM/SIGINT (which raise :class:`~avlm.errors.RunInterrupted` in the block meanwhile).

    Attaches to ``$MLFLOW_RUN_ID`` when ``mlflow run`` created the run. A resumed run first delivers what its
    crashed process left in ``run_dir`` and then drops the points it already holds (the resumed epochs log them
    again). Ranks other than the main one get a :class:`NullLogger` and never import or call MLflow.

    Args:
        run_dir: the run's local output folder (see :data:`RunFolder`); the outbox of writes waiting for the
            server lives in its ``tracking/`` sub-folder. None = :func:`default_run_dir` (under the temp dir),
            named in the warning a run with undelivered writes ends with.
    """
    if not is_main_process:
        yield NullLogger()
        return

    import mlflow

    tracking_uri = resolve_tracking_uri(cfg.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    launcher_run_id = os.environ.get("MLFLOW_RUN_ID")
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=cfg.system_metrics)
    elif launcher_run_id:
        run = mlflow.start_run(run_id=launcher_run_id, log_system_metrics=cfg.system_metrics)
    else:
        mlflow.set_experiment(cfg.experiment or f"avlm-{recipe}")
        run = mlflow.start_run(run_name=run_name, log_system_metrics=cfg.system_metrics)
    run_id = run.info.run_id
    local_dir = Path(run_dir(run_id) if callable(run_dir) else run_dir or default_run_dir(run_id))
    try:
        if resume_run_id and launcher_run_id and launcher_run_id != resume_run_id:
            # `mlflow run -P resume=...` made a fresh run; leave a pointer in it to where the training went on.
            mlflow.MlflowClient().set_tag(launcher_run_id, "avlm.resumed_into", resume_run_id)
        if resume_run_id and (local_dir / TRACKING_DIR / OUTBOX_FILE).exists():
            report = replay(local_dir / TRACKING_DIR, final_status=False)
            logger.info("delivered %d points the crashed process had left in %s", report.points_sent, report.outbox)
        run_logger = MLflowLogger(
            run_id,
            local_dir=local_dir,
            tracking_uri=tracking_uri,
            flush_every_s=cfg.flush_every_s,
            close_timeout_s=cfg.close_timeout_s,
            max_queued_points=cfg.max_queued_points,
            drop_logged_steps=bool(resume_run_id),
        )
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    if not resume_run_id:
        run_logger.set_tags({"mlflow.runName": run_name})
    logger.info("MLflow run %s (%s) at %s", run_id, run_name, mlflow.get_tracking_uri())

    def end(status: str) -> None:
        delivered = run_logger.close(status)
        _leave_fluent_run(status if delivered else None)

    with _interrupts_raised() as interrupts, _ended_with_status(lambda status: interrupts.deferred(end, status)):
        yield run_logger


def _leave_fluent_run(status: str | None) -> None:
    """Pop the run from MLflow's fluent stack. ``status`` None: the server is away and the status waits in the
    outbox, so do it without ``mlflow.end_run`` (which would spend MLflow's HTTP retries, then fail)."""
    import mlflow

    if status is not None:
        try:
            mlflow.end_run(status)  # the status is already in the store; this ends the fluent run
            return
        except Exception as err:  # the outbox delivered the status; only the fluent bookkeeping is left
            logger.warning("mlflow.end_run failed after the run's status was stored: %s", err)
    # MLflow has no public way to leave a fluent run without a server call
    from mlflow.tracking import fluent

    stack = fluent._active_run_stack.get()
    if stack:
        run = stack.pop()
        os.environ.pop("MLFLOW_RUN_ID", None)
        monitor = fluent.run_id_to_system_metrics_monitor.pop(run.info.run_id, None)
        if monitor is not None:
            monitor.finish()


class _InterruptHandlers:
    """SIGTERM and SIGINT raise :class:`RunInterrupted` in the main thread; while the run closes they are noted and
    ignored (closing is bounded by ``close_timeout_s``; a second Ctrl-C must not lose the queued points)."""

    def __init__(self) -> None:
        self.closing = False
        self.previous: dict[int, Any] = {}

    def handle(self, signum: int, frame: FrameType | None) -> None:
        if self.closing:
            logger.warning("%s received while the run closes; closing continues", signal.Signals(signum).name)
            return
        raise RunInterrupted(signum)

    def deferred(self, end: Callable[[str], None], status: str) -> None:
        self.closing = True
        end(status)


@contextlib.contextmanager
def _interrupts_raised() -> Iterator[_InterruptHandlers]:
    """Install :class:`_InterruptHandlers` for the block and restore the previous handlers after it. Signals reach
    only the main thread: elsewhere (a test's worker thread) nothing is installed."""
    handlers = _InterruptHandlers()
    if threading.current_thread() is not threading.main_thread():
        yield handlers
        return
    for signum in (signal.SIGTERM, signal.SIGINT):
        handlers.previous[signum] = signal.signal(signum, handlers.handle)
    try:
        yield handlers
    finally:
        for signum, previous in handlers.previous.items():
            signal.signal(signum, previous)


@contextlib.contextmanager
def nested_run(parent: RunLogger, *, run_name: str, tags: Mapping[str, Any] | None = None) -> Iterator[RunLogger]:
    """A child run of ``parent``'s run, in the same experiment (the UI shows it under its parent); ended FINISHED,
    or FAILED on an exception. A :class:`NullLogger` parent (a rank other than the main one) gets a NullLogger.

    The child is made with the client, not ``mlflow.start_run``, so the parent stays the active run. Its outbox
    lives in the parent's run folder (``tracking/nested/<child run id>``), where a replay of the parent finds it.
    """
    if parent.run_id is None:
        yield NullLogger()
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent.run_id).info.experiment_id
    child_tags = {"mlflow.parentRunId": parent.run_id, **{k: str(v) for k, v in (tags or {}).items()}}
    run = client.create_run(experiment_id, run_name=run_name, tags=child_tags)
    parent_dir = getattr(parent, "local_dir", None)
    child = MLflowLogger(
        run.info.run_id,
        local_dir=Path(parent_dir) / TRACKING_DIR / "nested" / run.info.run_id if parent_dir else None,
        flush_every_s=getattr(parent, "flush_every_s", 5.0),
        close_timeout_s=getattr(parent, "close_timeout_s", 120.0),
        max_queued_points=getattr(parent, "max_queued_points", 100_000),
    )
    with _ended_with_status(child.close):
        yield child


@contextlib.contextmanager
def _ended_with_status(end: Callable[[str], Any]) -> Iterator[None]:
    """Run the block, then ``end(status)``: FINISHED, KILLED on Ctrl-C or a signal, FAILED on any other exception."""
    status = "FINISHED"
    try:
        yield
    except KeyboardInterrupt:  # RunInterrupted (SIGTERM, SIGINT) is one
        status = "KILLED"
        raise
    except BaseException:
        status = "FAILED"
        raise
    finally:
        end(status)
