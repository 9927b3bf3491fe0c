"""A training stopped by SIGTERM (a scheduler's preemption), as a user runs it: the real entry point, a real signal."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_with_its_points_and_last_checkpoint(mlflow_store, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, str(REPO / "entrypoints/train_cvs.py"), "--config", str(REPO / "examples/cvs/demo.yaml"),
        "train.epochs=200", "data.limit_clips=64", "train.batch_size=16", "model.head_hidden=32",
        "tracking.system_metrics=false", "tracking.flush_every_s=60", f"output_dir={tmp_path / 'outputs'}",
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        states = []
        while not states and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            states = list((tmp_path / "outputs").glob("*/checkpoints/last/state.json"))
        assert states, "no checkpoint within the time limit"
        time.sleep(1.0)  # into a later epoch, with points buffered (flush_every_s=60)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    assert "interrupted by SIGTERM" in stderr.decode()

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("avlm-cvs").experiment_id])
    assert run.info.status == "KILLED"
    last = json.loads(states[0].read_text())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/step_loss")]
    # every buffered point was flushed: the steps are 1..N without a gap, at least up to the last checkpoint
    assert steps == list(range(1, len(steps) + 1)) and len(steps) >= last["global_step"]
    epochs = client.get_metric_history(run.info.run_id, "epoch")
    assert len(epochs) >= last["epoch"] >= 1
    uploaded = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints/last")}
    assert "checkpoints/last/state.json" in uploaded
