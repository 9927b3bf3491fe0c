"""SIGTERM and SIGINT during a tracked run: the run is flushed and ended KILLED, the handlers are restored."""

import os
import signal

import mlflow
import pytest
from mlflow import MlflowClient

from avlm.errors import RunInterrupted
from avlm.tracking import TrackingConfig, tracked_run

CFG = TrackingConfig(system_metrics=False, flush_every_s=60)  # points stay buffered until the run closes


@pytest.fixture
def store(mlflow_store):
    return mlflow_store


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_run_killed_with_its_buffered_points(store, tmp_path, signum):
    before = signal.getsignal(signum)
    with pytest.raises(RunInterrupted) as interrupted:
        with tracked_run(CFG, recipe="t", run_name="r", is_main_process=True, run_dir=tmp_path) as run_logger:
            for step in range(1, 6):
                run_logger.log_metrics({"train/step_loss": step}, step=step)
            os.kill(os.getpid(), signum)
            pytest.fail("the signal did not interrupt the training")
    assert interrupted.value.signum == signum
    client = MlflowClient()
    assert client.get_run(run_logger.run_id).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run_logger.run_id, "train/step_loss")] == [1, 2, 3, 4, 5]
    assert signal.getsignal(signum) is before and mlflow.active_run() is None


def test_a_second_signal_while_closing_does_not_cut_the_close_short(store, tmp_path, monkeypatch):
    set_terminated = MlflowClient.set_terminated

    def impatient_user(self, run_id, status=None, end_time=None):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again while the run is being closed
        return set_terminated(self, run_id, status, end_time)

    monkeypatch.setattr(MlflowClient, "set_terminated", impatient_user)
    with pytest.raises(RunInterrupted):
        with tracked_run(CFG, recipe="t", run_name="r", is_main_process=True, run_dir=tmp_path) as run_logger:
            run_logger.log_metrics({"x": 1.0}, step=1)
            os.kill(os.getpid(), signal.SIGTERM)
    run = MlflowClient().get_run(run_logger.run_id)
    assert run.info.status == "KILLED" and run.data.metrics == {"x": 1.0}
