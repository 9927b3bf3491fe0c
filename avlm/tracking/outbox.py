"""A run's tracking writes, queued in order until the tracking store has them, and replayed after an outage.

Every write a training makes (metric points, params, tags, artifact uploads, the final status) is an *entry* in one
ordered queue. A background thread delivers the head of the queue and removes it only once the store accepted it;
a failed delivery stays at the head and is retried with backoff, so the order is kept and nothing is dropped. The
queue lives in memory while the store answers; when it does not (one failed delivery) or the queue outgrows its
bound, it moves to an append-only JSONL file in the run folder (``<run folder>/tracking/outbox.jsonl``) and stays
there until the file is drained. A run that closes with entries undelivered leaves the file, its tracking address
(``run.json``) and a watermark of what was delivered (``delivered``): ``avlm tracking replay <run folder>`` delivers
the rest later, final status included.

No point is written twice: MLflow keeps duplicate metric points, so a retry (the store may have committed a batch
whose answer was lost) and a replay first drop the points the store already holds, by (key, step, timestamp).
Params (same value), tags, artifacts and the status are idempotent writes and are simply sent again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from avlm.errors import TrainingError

logger = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limits
MAX_PARAMS_TAGS_PER_BATCH = 100
TRACKING_DIR = "tracking"  # inside a run folder
OUTBOX_FILE = "outbox.jsonl"
DELIVERED_FILE = "delivered"
RUN_FILE = "run.json"
STAGING_DIR = "staging"

# MLflow error codes that mean "this write is wrong", not "the store is away": retrying cannot make them land.
_PERMANENT_ERROR_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "INVALID_STATE",
        "RESOURCE_DOES_NOT_EXIST",
        "NOT_FOUND",
        "ENDPOINT_NOT_FOUND",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "CUSTOMER_UNAUTHORIZED",
    }
)

Entry = dict[str, Any]
"""One queued write: ``{"seq": n, "kind": "metrics"|"params"|"tags"|"artifact"|"end", ...}`` (see ``deliver``)."""


def is_permanent(err: BaseException) -> bool:
    """True for a store's refusal of the write itself (bad value, deleted run); False for an outage."""
    return getattr(err, "error_code", None) in _PERMANENT_ERROR_CODES


def entry_points(entry: Entry) -> int:
    """How many metric points an entry holds (what "pending points" counts)."""
    return len(entry["points"]) if entry["kind"] == "metrics" else 0


class Outbox:
    """The ordered queue of one run's writes: in memory, or spilled to ``directory/outbox.jsonl``.

    FIFO across both places: once spilled, new entries go to the file behind the spilled ones until the file is
    drained, and only then back to memory. Thread-safe for many producers and one consumer (the delivery thread).

    Args:
        directory: the run's tracking folder (``<run folder>/tracking``); created on first use.
        max_points_in_memory: bound of the in-memory queue, in metric points; past it the queue spills.
    """

    def __init__(self, directory: Path, max_points_in_memory: int):
        self.directory = directory
        self.path = directory / OUTBOX_FILE
        self.max_points_in_memory = max_points_in_memory
        self._memory: deque[Entry] = deque()
        self._memory_points = 0
        self._read_offset: int | None = None  # None: the queue is in memory; else the file's first unread byte
        self._pending_entries = 0
        self._pending_points = 0
        self._next_seq = 1
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)  # notified whenever the queue shrinks

    # -- producers -------------------------------------------------------------------------------------------
    def put(self, kind: str, **fields: Any) -> Entry:
        """Queue one write at the tail; returns the entry (with its sequence number)."""
        with self._lock:
            entry = {"seq": self._next_seq, "kind": kind, **fields}
            self._next_seq += 1
            points = entry_points(entry)
            if self._read_offset is None and self._memory_points + points <= self.max_points_in_memory:
                self._memory.append(entry)
                self._memory_points += points
            else:
                self._spill_locked()
                self._append_locked([entry])
            self._pending_entries += 1
            self._pending_points += points
            return entry

    def spill(self) -> None:
        """Move the in-memory queue to the file (the store is away: keep what a crash would lose on disk)."""
        with self._lock:
            self._spill_locked()

    def _spill_locked(self) -> None:
        if self._read_offset is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._read_offset = self.path.stat().st_size if self.path.exists() else 0
        self._append_locked(list(self._memory))
        self._memory.clear()
        self._memory_points = 0

    def _append_locked(self, entries: list[Entry]) -> None:
        # closed at once: what a crash of this process would lose is then in the OS's hands (no fsync: a training
        # step must not wait for the disk, and a power cut loses the training as well)
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(entry) + "\n" for entry in entries)

    # -- the consumer ----------------------------------------------------------------------------------------
    def head(self, max_points: int = MAX_METRICS_PER_BATCH) -> list[Entry]:
        """The next entries to deliver together: one non-metric entry, or consecutive metric entries holding up
        to ``max_points`` points (more only when a single entry is bigger). Empty when nothing is pending."""
        with self._lock:
            source = self._memory if self._read_offset is None else _read_entries(self.path, self._read_offset)
            return next(_batches(source, max_points), [])

    def pop(self, entries: list[Entry]) -> None:
        """Remove ``entries`` (what :meth:`head` returned, now delivered) from the head of the queue."""
        with self._lock:
            if self._read_offset is None:
                for _ in entries:
                    self._memory_points -= entry_points(self._memory.popleft())
            else:
                # A spill may have happened since head(): the same entries are then the file's first unread lines.
                with self.path.open("rb") as f:
                    f.seek(self._read_offset)
                    for _ in entries:
                        self._read_offset += len(f.readline())
                if self._read_offset >= self.path.stat().st_size:
                    self._read_offset = None
            self._pending_entries -= len(entries)
            self._pending_points -= sum(entry_points(e) for e in entries)
            if self.path.exists():
                _write_atomically(self.directory / DELIVERED_FILE, str(entries[-1]["seq"]))
            self.changed.notify_all()

    def pending(self) -> tuple[int, int]:
        """(entries, metric points) not yet delivered."""
        with self._lock:
            return self._pending_entries, self._pending_points

    def wait_empty(self, timeout_s: float) -> bool:
        """Block until every entry is delivered or ``timeout_s`` passed; True when the queue is empty."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._pending_entries:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.changed.wait(remaining)
            return True

    def discard_files(self) -> None:
        """Everything was delivered: the file, the watermark and the staged uploads are no longer needed."""
        with self._lock:
            for name in (OUTBOX_FILE, DELIVERED_FILE):
                (self.directory / name).unlink(missing_ok=True)
            shutil.rmtree(self.directory / STAGING_DIR, ignore_errors=True)
            self._read_offset = None


def _batches(entries: Iterable[Entry], max_points: int = MAX_METRICS_PER_BATCH) -> Iterator[list[Entry]]:
    """Entries grouped for delivery: each non-metric entry alone, consecutive metric entries together up to
    ``max_points`` points (an entry is never split here)."""
    batch: list[Entry] = []
    points = 0
    for entry in entries:
        fits = points + entry_points(entry) <= max_points
        joins = bool(batch) and entry["kind"] == batch[0]["kind"] == "metrics" and fits
        if batch and not joins:
            yield batch
            batch, points = [], 0
        batch.append(entry)
        points += entry_points(entry)
    if batch:
        yield batch


def _read_entries(path: Path, offset: int = 0) -> Iterable[Entry]:
    with path.open("rb") as f:
        f.seek(offset)
        for line in f:
            if not line.endswith(b"\n"):  # a line cut by a crash mid-write was never acknowledged to anyone
                return
            yield json.loads(line)


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def stage(source: Path, slot: Path) -> Path:
    """Snapshot a file or folder into the empty staging folder ``slot`` for a later upload: hard links (a copy
    across file systems), so that replacing ``source`` (``checkpoints/last`` is renamed over each epoch) cannot change
    or break an upload that has not happened yet."""
    target = slot / source.name
    if source.is_dir():
        shutil.copytree(source, target, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(target))
    return target


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


# ----------------------------------------------------------------------------------------------------------------
# Delivery: one entry (or a metric batch) to an MLflow client
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Delivery:
    """Sends entries of one run to an MLflow client.

    Attributes:
        client: an ``MlflowClient`` (or anything with its ``log_batch``/``log_artifact(s)``/``set_terminated``/
            ``get_metric_history``).
        run_id: the run written to.
        seen: per metric key, the (step, timestamp) pairs known to be in the store; filled from the store on the
            first de-duplicated delivery of a key.
    """

    client: Any
    run_id: str
    seen: dict[str, set[tuple[int, int]]] = dataclasses.field(default_factory=dict)

    def deliver(self, entries: list[Entry], *, deduplicate: bool) -> int:
        """Write ``entries`` to the store; with ``deduplicate``, first drop metric points the store already holds.

        Returns:
            The number of metric points written.
        """
        from mlflow.entities import Metric, Param, RunTag

        kind = entries[0]["kind"]
        if kind == "metrics":
            points = [tuple(p) for e in entries for p in e["points"]]
            if deduplicate:
                points = self._unseen(points)
            for start in range(0, len(points), MAX_METRICS_PER_BATCH):
                chunk = points[start : start + MAX_METRICS_PER_BATCH]
                self.client.log_batch(self.run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in chunk])
                if deduplicate:
                    for key, _, ts, step in chunk:
                        self.seen[key].add((step, ts))
            return len(points)
        (entry,) = entries
        if kind in ("params", "tags"):
            make = Param if kind == "params" else RunTag
            items = [make(k, v) for k, v in entry[kind].items()]
            for start in range(0, len(items), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, **{kind: items[start : start + MAX_PARAMS_TAGS_PER_BATCH]})
        elif kind == "artifact":
            local = Path(entry["local"])
            if not local.exists():  # staged copies are removed only after their upload succeeded
                logger.info("artifact %s was uploaded already (its staged copy is gone)", entry["local"])
                return 0
            # log_artifacts uploads a folder's contents, log_artifact the file or folder itself (MLflow's meanings)
            upload = self.client.log_artifacts if entry.get("contents") else self.client.log_artifact
            upload(self.run_id, str(local), entry["artifact_path"])
            shutil.rmtree(local.parent, ignore_errors=True)
        elif kind == "end":
            self.client.set_terminated(self.run_id, entry["status"])
        else:
            raise TrainingError(f"unknown tracking entry kind '{kind}' (seq {entry['seq']})")
        return 0

    def _unseen(self, points: list[tuple]) -> list[tuple]:
        for key in {p[0] for p in points} - self.seen.keys():
            self.seen[key] = {(m.step, m.timestamp) for m in self.client.get_metric_history(self.run_id, key)}
        fresh, batch_seen = [], set()
        for point in points:
            key, _, ts, step = point
            if (step, ts) not in self.seen[key] and (key, step, ts) not in batch_seen:
                fresh.append(point)
                batch_seen.add((key, step, ts))
        return fresh


# ----------------------------------------------------------------------------------------------------------------
# The record a run leaves, and its replay
# ----------------------------------------------------------------------------------------------------------------
def write_run_record(directory: Path, *, run_id: str, tracking_uri: str) -> None:
    """Remember where a run's writes go, so that a replay in another process can deliver them."""
    directory.mkdir(parents=True, exist_ok=True)
    _write_atomically(directory / RUN_FILE, json.dumps({"run_id": run_id, "tracking_uri": tracking_uri}))


@dataclasses.dataclass
class ReplayReport:
    """What :func:`replay` did for one run's outbox."""

    outbox: Path
    run_id: str
    points_sent: int = 0
    points_already_there: int = 0
    entries: int = 0
    status: str | None = None


def find_outboxes(run_folder: Path) -> list[Path]:
    """Every pending outbox under a run folder (the run's own and its nested runs'), oldest first."""
    if not run_folder.is_dir():
        raise TrainingError(f"run folder {run_folder} does not exist")
    return sorted(run_folder.rglob(OUTBOX_FILE), key=lambda p: p.stat().st_mtime)


def replay(
    tracking_dir: Path, *, final_status: bool = True, client_factory: Callable[[str], Any] | None = None
) -> ReplayReport:
    """Deliver what a closed run left in ``tracking_dir`` (its ``outbox.jsonl``), final status included.

    Idempotent: entries up to the ``delivered`` watermark are skipped and metric points the store already holds are
    not sent again, so replaying twice (or after a replay that was cut short) writes every point once.

    Args:
        tracking_dir: a run's tracking folder (``<run folder>/tracking``).
        final_status: also set the status the run ended with; False when the run goes on (a resume).
        client_factory: tracking URI → MLflow client; default ``MlflowClient(uri)``.

    Raises:
        TrainingError: the folder holds no run record, or a write was refused or the store is still away (the
            outbox is kept, so the replay can be run again).
    """
    record_path = tracking_dir / RUN_FILE
    if not record_path.exists():
        raise TrainingError(f"{tracking_dir} holds no {RUN_FILE}: not a tracking folder written by avlm")
    record = json.loads(record_path.read_text())
    if client_factory is None:
        from mlflow import MlflowClient

        client_factory = MlflowClient
    delivery = Delivery(client_factory(record["tracking_uri"]), record["run_id"])
    report = ReplayReport(outbox=tracking_dir / OUTBOX_FILE, run_id=record["run_id"])
    watermark_path = tracking_dir / DELIVERED_FILE
    delivered = int(watermark_path.read_text()) if watermark_path.exists() else 0
    entries = [e for e in _read_entries(report.outbox) if e["seq"] > delivered] if report.outbox.exists() else []
    if not final_status:
        entries = [e for e in entries if e["kind"] != "end"]
    for batch in _batches(entries):
        try:
            sent = delivery.deliver(batch, deduplicate=True)
        except Exception as err:
            raise TrainingError(
                f"replay of {report.outbox} stopped at entry {batch[0]['seq']} ({batch[0]['kind']}) of run "
                f"{record['run_id']} at {record['tracking_uri']}: {err}; run the replay again once the server is back"
            ) from err
        _write_atomically(watermark_path, str(batch[-1]["seq"]))
        report.entries += len(batch)
        report.points_sent += sent
        report.points_already_there += sum(entry_points(e) for e in batch) - sent
        if batch[0]["kind"] == "end":
            report.status = batch[0]["status"]
    for name in (OUTBOX_FILE, DELIVERED_FILE):
        (tracking_dir / name).unlink(missing_ok=True)
    shutil.rmtree(tracking_dir / STAGING_DIR, ignore_errors=True)
    return report
