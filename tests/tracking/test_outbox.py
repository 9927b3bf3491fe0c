"""The outbox under injected faults: a tracking store that fails, loses answers, refuses writes or stays away."""

import json
import logging
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from avlm.errors import TrainingError
from avlm.tracking import MLflowLogger
from avlm.tracking.outbox import OUTBOX_FILE, replay


class FlakyStore:
    """An in-memory MLflow client for one run whose writes fail on demand.

    ``down``: every write raises as a connection failure does; ``fail_next``: that many writes fail, then the store
    answers; ``lose_answers``: that many writes are committed, then raise (the answer was lost on the way back).
    """

    def __init__(self):
        self.points: list[tuple[str, float, int, int]] = []
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.artifacts: dict[str, str] = {}
        self.status = "RUNNING"
        self.down = False
        self.fail_next = 0
        self.lose_answers = 0
        self.refuse_params = False

    def _write(self, commit) -> None:
        if self.down or self.fail_next:
            self.fail_next = max(0, self.fail_next - 1)
            raise MlflowException("API request to http://127.0.0.1:1/api failed with exception ConnectionError")
        commit()
        if self.lose_answers:
            self.lose_answers -= 1
            raise MlflowException("API request failed with exception ReadTimeout")

    def get_run(self, run_id):
        latest = {}
        for key, _, _, step in self.points:
            latest[key] = max(step, latest.get(key, step))
        metric_objs = [SimpleNamespace(key=k, step=s) for k, s in latest.items()]
        return SimpleNamespace(
            info=SimpleNamespace(artifact_uri="fake://run"), data=SimpleNamespace(_metric_objs=metric_objs)
        )

    def log_batch(self, run_id, metrics=(), params=(), tags=()):
        if params and self.refuse_params:
            raise MlflowException("Changing param values is not allowed", error_code=INVALID_PARAMETER_VALUE)

        def commit():
            self.points.extend((m.key, m.value, m.timestamp, m.step) for m in metrics)
            self.params.update({p.key: p.value for p in params})
            self.tags.update({t.key: t.value for t in tags})

        self._write(commit)

    def get_metric_history(self, run_id, key):
        if self.down:
            raise MlflowException("API request failed with exception ConnectionError")
        return [SimpleNamespace(step=step, timestamp=ts) for k, _, ts, step in self.points if k == key]

    def log_artifacts(self, run_id, local_dir, artifact_path=None):
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            self.log_artifact(
                run_id, str(path), "/".join(filter(None, [artifact_path, *path.relative_to(local_dir).parts[:-1]]))
            )

    def log_artifact(self, run_id, local_path, artifact_path=None):
        name = "/".join(filter(None, [artifact_path, Path(local_path).name]))
        self._write(lambda: self.artifacts.__setitem__(name, Path(local_path).read_text()))

    def set_terminated(self, run_id, status):
        self._write(lambda: setattr(self, "status", status))


def make_logger(store, tmp_path, **kwargs):
    options = {"flush_every_s": 0.05, "close_timeout_s": 10.0, "retry_backoff_s": (0.01, 0.05), **kwargs}
    return MLflowLogger("run1", local_dir=tmp_path / "run", tracking_uri="fake://store", client=store, **options)


def steps_of(store, key):
    return [step for k, _, _, step in store.points if k == key]


def wait_for(condition, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_failed_batches_stay_queued_and_land_in_order_exactly_once(tmp_path):
    store = FlakyStore()
    store.fail_next = 3
    run_logger = make_logger(store, tmp_path)
    run_logger.log_params({"cfg.lr": 0.1})
    for step in range(1, 2501):
        run_logger.log_metrics({"train/loss": 1.0 / step}, step=step)
    assert run_logger.close("FINISHED")
    assert steps_of(store, "train/loss") == list(range(1, 2501))
    assert store.params == {"cfg.lr": "0.1"} and store.status == "FINISHED"
    assert not (tmp_path / "run" / "tracking" / OUTBOX_FILE).exists()


def test_a_batch_whose_answer_was_lost_is_not_written_twice(tmp_path):
    store = FlakyStore()
    store.lose_answers = 1
    run_logger = make_logger(store, tmp_path)
    for step in range(1, 11):
        run_logger.log_metrics({"a": step, "b": -step}, step=step)
    assert run_logger.close("FINISHED")
    assert steps_of(store, "a") == list(range(1, 11)) and steps_of(store, "b") == list(range(1, 11))


def test_the_queue_spills_to_the_run_folder_while_the_server_is_away_and_drains_in_order(tmp_path):
    store = FlakyStore()
    store.down = True
    run_logger = make_logger(store, tmp_path, max_queued_points=50)
    for step in range(1, 201):
        run_logger.log_metrics({"x": step}, step=step)
    run_logger.set_tags({"phase": "outage"})
    outbox = tmp_path / "run" / "tracking" / OUTBOX_FILE
    lines = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert sum(len(e.get("points", [])) for e in lines) == 200 and lines[-1]["tags"] == {"phase": "outage"}
    assert run_logger._outbox._memory_points == 0  # nothing held in memory past the bound
    store.down = False
    run_logger.flush()
    assert steps_of(store, "x") == list(range(1, 201)) and store.tags == {"phase": "outage"}
    run_logger.log_metrics({"x": 201}, step=201)  # back to memory once the file is drained
    assert run_logger.close("FINISHED") and steps_of(store, "x") == list(range(1, 202))
    assert not outbox.exists()


def test_a_run_closed_during_an_outage_is_not_finished_and_replay_delivers_it_once(tmp_path, caplog):
    store = FlakyStore()
    run_logger = make_logger(store, tmp_path, close_timeout_s=0.3)
    run_logger.log_metrics({"x": 0.5}, step=1)
    run_logger.flush()  # step 1 landed before the outage
    store.down = True
    for step in range(2, 8):
        run_logger.log_metrics({"x": step / 10}, step=step)
    run_logger.set_tags({"gate": "PASS"})
    (tmp_path / "report.md").write_text("report")
    run_logger.log_artifact(tmp_path / "report.md", "report")
    with caplog.at_level(logging.WARNING):
        assert not run_logger.close("FINISHED")
    tracking_dir = tmp_path / "run" / "tracking"
    assert "6 metric points" in caplog.text and str(tracking_dir / OUTBOX_FILE) in caplog.text
    assert "avlm tracking replay" in caplog.text and "final status FINISHED" in caplog.text
    assert store.status == "RUNNING" and steps_of(store, "x") == [1]

    with pytest.raises(TrainingError, match="run the replay again"):
        replay(tracking_dir, client_factory=lambda uri: store)  # still away: the outbox stays
    copy = tmp_path / "copy"
    shutil.copytree(tracking_dir, copy)
    store.down = False
    report = replay(tracking_dir, client_factory=lambda uri: store)
    assert (report.points_sent, report.points_already_there, report.status) == (6, 0, "FINISHED")
    assert steps_of(store, "x") == list(range(1, 8)) and store.tags == {"gate": "PASS"}
    assert store.artifacts == {"report/report.md": "report"} and store.status == "FINISHED"
    assert not (tracking_dir / OUTBOX_FILE).exists()

    again = replay(copy, client_factory=lambda uri: store)  # a second replay of the same record adds nothing
    assert (again.points_sent, again.points_already_there) == (0, 6)
    assert steps_of(store, "x") == list(range(1, 8))


def test_an_upload_sends_the_folder_as_it_was_when_queued(tmp_path):
    store = FlakyStore()
    store.down = True
    run_logger = make_logger(store, tmp_path)
    checkpoints = tmp_path / "checkpoints"
    for epoch in (1, 2):
        fresh = checkpoints / "last.tmp"
        fresh.mkdir(parents=True)
        (fresh / "state.json").write_text(f"epoch {epoch}")
        if (checkpoints / "last").exists():
            shutil.rmtree(checkpoints / "last")
        fresh.rename(checkpoints / "last")  # replaced while the previous upload still waits
        run_logger.log_artifacts(checkpoints / "last", f"checkpoints/epoch{epoch}")
    store.down = False
    assert run_logger.close("FINISHED")
    assert store.artifacts == {
        "checkpoints/epoch1/state.json": "epoch 1",
        "checkpoints/epoch2/state.json": "epoch 2",
    }
    assert not (tmp_path / "run" / "tracking" / "staging").exists()


def test_a_refused_write_is_reported_and_does_not_block_the_rest(tmp_path):
    store = FlakyStore()
    store.refuse_params = True
    run_logger = make_logger(store, tmp_path)
    run_logger.log_params({"cfg.lr": 0.2})
    run_logger.log_metrics({"x": 1.0}, step=1)
    with pytest.raises(TrainingError, match="refused .*params #1.*Changing param values"):
        run_logger.flush()
    assert steps_of(store, "x") == [1]
    assert run_logger.close("FINISHED") and store.status == "FINISHED"


def test_long_tag_and_param_values_are_cut_to_mlflow_limits(tmp_path):
    store = FlakyStore()
    run_logger = make_logger(store, tmp_path)
    run_logger.set_tags({"gate.report": "r" * 9000, "short": "s"})
    run_logger.log_params({"cfg.paths": ["p" * 100] * 100})
    assert run_logger.close()
    assert len(store.tags["gate.report"]) == 8000 and store.tags["gate.report"].endswith("...[truncated]")
    assert store.tags["short"] == "s" and len(store.params["cfg.paths"]) == 6000


def test_a_resumed_logger_drops_the_steps_the_run_already_holds(tmp_path):
    store = FlakyStore()
    first = make_logger(store, tmp_path)
    for step in range(1, 11):
        first.log_metrics({"train/step_loss": step, "epoch": step // 5}, step=step)
    first.flush()  # the crash: steps 6..10 were flushed, the last checkpoint is at step 5
    resumed = make_logger(store, tmp_path, drop_logged_steps=True)
    for step in range(6, 16):
        resumed.log_metrics({"train/step_loss": step, "epoch": step // 5}, step=step)
    assert resumed.close("FINISHED")
    assert steps_of(store, "train/step_loss") == list(range(1, 16)) and steps_of(store, "epoch") == list(range(1, 16))
