"""The CVS demo trained against a real ``mlflow server`` over HTTP that crashes after the first epoch and comes back:
every metric point arrives once, the checkpoints are uploaded, and the run ends FINISHED."""

import json
import logging
import sys
import threading
from pathlib import Path

import pytest
from mlflow import MlflowClient

from avlm.recipes.cvs import load_cvs_config, main
from avlm.tracking import MLflowLogger

sys.path.insert(0, str(Path(__file__).parent))
from mlflow_server import MlflowServer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_cvs_training_survives_a_tracking_server_crash(tmp_path, monkeypatch, avlm_cache, caplog):
    # MLflow's own retries give up at once, so the outage (kill + a restart of ~30 s) outlasts them by far
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.chdir(tmp_path)
    server = MlflowServer(tmp_path / "server")
    restart = threading.Thread(target=server.start, name="restart-mlflow-server")
    log_artifacts = MLflowLogger.log_artifacts

    def crash_after_first_checkpoint(self, directory, artifact_path=None):
        log_artifacts(self, directory, artifact_path)
        if artifact_path == "checkpoints/last" and restart.ident is None:
            server.kill()  # the training goes on; the restart takes its time meanwhile
            restart.start()

    monkeypatch.setattr(MLflowLogger, "log_artifacts", crash_after_first_checkpoint)
    try:
        server.start()
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        cfg = load_cvs_config(
            ROOT / "examples/cvs/demo.yaml",
            [
                "train.epochs=3",
                "data.limit_clips=64",
                "registry.register=false",
                "tracking.system_metrics=false",
                "tracking.flush_every_s=0.5",
                "tracking.close_timeout_s=300",
                "model.head_hidden=32",
                "model.head_queries=2",
                "model.head_heads=2",
                "data.entropy_clips=4",
                f"output_dir={tmp_path / 'outputs'}",
            ],
        )
        with caplog.at_level(logging.WARNING, logger="avlm.tracking.mlflow_logger"):
            result = main(cfg)
        restart.join(timeout=300)
        assert restart.ident is not None and not restart.is_alive()
        assert "MLflow write failed; queued and retried" in caplog.text  # the outage really hit the training

        client = MlflowClient(server.url)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        steps = result.state.global_step
        step_loss = client.get_metric_history(result.run_id, "train/step_loss")
        assert sorted(m.step for m in step_loss) == list(range(1, steps + 1))
        for key in run.data.metrics:
            history = client.get_metric_history(result.run_id, key)
            assert len({(m.step, m.timestamp) for m in history}) == len(history), f"{key} has duplicate points"
        for key in ("epoch", "val/mAP", "train/loss"):
            logged = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, key))
            assert [value for _, value in logged] == pytest.approx([row[key] for row in result.state.history])

        artifacts = {f.path for f in client.list_artifacts(result.run_id, "checkpoints/last")}
        assert {"checkpoints/last/state.json", "checkpoints/last/trainable.safetensors"} <= artifacts
        state = json.loads(Path(client.download_artifacts(result.run_id, "checkpoints/last/state.json")).read_text())
        assert state["epoch"] == 3  # the last epoch's checkpoint, not the one uploading when the server died
        assert client.list_artifacts(result.run_id, "checkpoints/best")
        assert {f.path for f in client.list_artifacts(result.run_id, "plots")} >= {"plots/training_curves.png"}
    finally:
        if restart.is_alive():
            restart.join(timeout=300)
        server.stop()
