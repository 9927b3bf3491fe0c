import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from avlm.tracking import NullLogger, PrefixedLogger, TrackingConfig, nested_run, tracked_run


def test_batched_metrics_all_arrive_with_steps_and_scalar_types(mlflow_store):
    cfg = TrackingConfig(experiment="t", system_metrics=False, flush_every_s=60)
    with tracked_run(cfg, recipe="test", run_name="r1", is_main_process=True) as run_logger:
        for step in range(1, 2501):
            run_logger.log_metrics({"train/loss": torch.tensor(1.0 / step), "lr": np.float32(0.5)}, step=step)
        run_logger.log_params({"cfg.a": 1, "cfg.b": [1, 2], "cfg.c": 1e-4})
        run_id = run_logger.run_id
    client = MlflowClient()
    history = client.get_metric_history(run_id, "train/loss")
    assert [m.step for m in history] == list(range(1, 2501))
    assert history[9].value == pytest.approx(0.1)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.runName"] == "r1"
    assert run.data.params == {"cfg.a": "1", "cfg.b": "[1, 2]", "cfg.c": "0.0001"}
    assert client.get_experiment(run.info.experiment_id).name == "t"


def test_exception_marks_run_failed_and_keeps_metrics(mlflow_store):
    cfg = TrackingConfig(system_metrics=False)
    with pytest.raises(RuntimeError, match="boom"):
        with tracked_run(cfg, recipe="test", run_name="r2", is_main_process=True) as run_logger:
            run_logger.log_metrics({"x": 1.0}, step=1)
            run_id = run_logger.run_id
            raise RuntimeError("boom")
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED" and run.data.metrics["x"] == 1.0
    assert MlflowClient().get_experiment(run.info.experiment_id).name == "avlm-test"


def test_attaches_to_the_run_mlflow_run_created(mlflow_store, monkeypatch):
    client = MlflowClient()
    launcher_run = client.create_run(client.create_experiment("launched"))
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher_run.info.run_id)
    with tracked_run(TrackingConfig(system_metrics=False), recipe="test", run_name="cvs-x", is_main_process=True) as lg:
        lg.log_metrics({"y": 2.0}, step=0)
    assert lg.run_id == launcher_run.info.run_id
    assert client.get_run(lg.run_id).data.metrics["y"] == 2.0
    assert len(client.search_runs([launcher_run.info.experiment_id])) == 1


def test_other_ranks_never_touch_mlflow(mlflow_store, monkeypatch):
    import mlflow

    def forbidden(*args, **kwargs):
        raise AssertionError("a non-main rank called MLflow")

    monkeypatch.setattr(mlflow, "start_run", forbidden)
    monkeypatch.setattr(mlflow, "set_tracking_uri", forbidden)
    with tracked_run(TrackingConfig(), recipe="test", run_name="x", is_main_process=False) as run_logger:
        assert isinstance(run_logger, NullLogger)
        run_logger.log_metrics({"a": 1}, step=1)
        run_logger.log_artifact("nonexistent")


def test_nested_runs_sit_under_their_parent_and_end_failed_on_an_error(mlflow_store):
    cfg = TrackingConfig(system_metrics=False)
    with tracked_run(cfg, recipe="t", run_name="parent", is_main_process=True) as parent:
        with nested_run(parent, run_name="child-ok", tags={"seed": 1}) as child:
            PrefixedLogger(child, "pretrained/").log_metrics({"val/mAP": 0.5}, step=3)
        with pytest.raises(RuntimeError), nested_run(parent, run_name="child-bad") as bad:
            bad.log_metrics({"loss": 1.0}, step=0)
            raise RuntimeError("probe diverged")
        assert isinstance(nested_run(NullLogger(), run_name="x").__enter__(), NullLogger)
    client = MlflowClient()
    children = {
        r.info.run_name: r
        for r in client.search_runs(
            [client.get_run(parent.run_id).info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'",
        )
    }
    assert children["child-ok"].info.status == "FINISHED" and children["child-ok"].data.tags["seed"] == "1"
    (point,) = client.get_metric_history(children["child-ok"].info.run_id, "pretrained/val/mAP")
    assert (point.value, point.step) == (0.5, 3)
    assert children["child-bad"].info.status == "FAILED" and children["child-bad"].data.metrics["loss"] == 1.0
    assert client.get_run(parent.run_id).info.status == "FINISHED"


def test_a_resumed_run_logs_each_step_once(mlflow_store, tmp_path, monkeypatch):
    from mlflow.exceptions import MlflowException

    log_batch = MlflowClient.log_batch

    def unreachable(self, *args, **kwargs):
        raise MlflowException("API request to http://127.0.0.1:1 failed with exception ConnectionError")

    cfg = TrackingConfig(system_metrics=False, flush_every_s=60, close_timeout_s=0.5)
    with pytest.raises(RuntimeError, match="crash"):
        with tracked_run(cfg, recipe="t", run_name="r", is_main_process=True, run_dir=lambda _: tmp_path) as first:
            for step in range(1, 11):
                first.log_metrics({"train/step_loss": 1.0 / step}, step=step)
                if step == 2:
                    first.flush()  # steps 1, 2 landed; then the server went away ...
                    monkeypatch.setattr(MlflowClient, "log_batch", unreachable)
            raise RuntimeError("crash")  # ... so 3..10 wait in the run folder (the last checkpoint was at step 5)
    assert (tmp_path / "tracking" / "outbox.jsonl").exists()
    monkeypatch.setattr(MlflowClient, "log_batch", log_batch)
    with tracked_run(
        cfg, recipe="t", run_name="r", is_main_process=True, resume_run_id=first.run_id, run_dir=lambda _: tmp_path
    ) as resumed:
        for step in range(6, 16):  # the resumed run replays the epoch after the checkpoint
            resumed.log_metrics({"train/step_loss": 1.0 / step}, step=step)
    history = MlflowClient().get_metric_history(first.run_id, "train/step_loss")
    assert sorted(m.step for m in history) == list(range(1, 16))
    assert MlflowClient().get_run(first.run_id).info.status == "FINISHED"


def test_a_failing_end_run_leaves_the_status_for_replay(mlflow_store, tmp_path, monkeypatch, caplog):
    import mlflow
    from mlflow.exceptions import MlflowException

    from avlm.__main__ import main as avlm_main

    set_terminated = MlflowClient.set_terminated

    def unreachable(self, run_id, status=None, end_time=None):
        raise MlflowException("API request to http://127.0.0.1:1 failed with exception ConnectionError")

    monkeypatch.setattr(MlflowClient, "set_terminated", unreachable)
    cfg = TrackingConfig(system_metrics=False, close_timeout_s=0.5)
    with tracked_run(cfg, recipe="t", run_name="r", is_main_process=True, run_dir=lambda _: tmp_path) as run_logger:
        run_logger.log_metrics({"x": 1.0}, step=1)
    assert "final status FINISHED" in caplog.text and str(tmp_path / "tracking" / "outbox.jsonl") in caplog.text
    assert MlflowClient().get_run(run_logger.run_id).info.status == "RUNNING"
    assert mlflow.active_run() is None  # the fluent run was left, so the next training can start one

    monkeypatch.setattr(MlflowClient, "set_terminated", set_terminated)
    assert avlm_main(["tracking", "replay", str(tmp_path)]) == 0
    run = MlflowClient().get_run(run_logger.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics == {"x": 1.0}
    assert not (tmp_path / "tracking" / "outbox.jsonl").exists()
