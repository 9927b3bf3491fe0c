"""The registered pyfunc model: its signature and input example, and the answers ``mlflow models serve`` gives."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.error
import urllib.request
import warnings

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.exceptions import MlflowException
from safetensors.torch import save_file

from avlm.config import config_to_dict
from avlm.data import CVS_CRITERIA
from avlm.errors import DataError
from avlm.models import trainable_state_dict
from avlm.recipes import cvs
from avlm.tracking.registry import RegistryConfig, log_and_register

SERVE_START_TIMEOUT_S = 300  # the server imports torch and rebuilds the model before answering /ping
REQUEST_TIMEOUT_S = 60


def tiny_cvs_checkpoint(folder):
    """A CVS checkpoint folder (config.yaml + trainable.safetensors) of a small untrained classifier."""
    cfg = cvs.load_cvs_config(None, ["model.head_hidden=16", "model.head_queries=1", "model.head_heads=2"])
    model = cvs.build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config_to_dict(cfg), "resume": ""}, sort_keys=False))
    save_file(trainable_state_dict(model), str(folder / "trainable.safetensors"))
    return folder


def register_tiny_cvs(tmp_path, name="tiny-cvs"):
    """Register a tiny CVS model as the recipe does; returns its version and two valid clips."""
    checkpoint = tiny_cvs_checkpoint(tmp_path / "best")
    classifier, cfg = cvs.load_classifier(checkpoint)
    size = classifier.backbone.image_size
    clips = np.random.default_rng(0).standard_normal((2, cfg.data.clip_frames, 3, size, size)).astype(np.float32)
    with mlflow.start_run() as run:
        pass
    version = log_and_register(
        RegistryConfig(name=name),
        checkpoint_dir=checkpoint,
        recipe="cvs",
        run_id=run.info.run_id,
        metric_value=0.5,
        input_example=clips[:1],
        output_example=cvs.load_predictor(checkpoint)(clips[:1]),
        metadata={"preprocessing": {"image_size": size, "mean": list(classifier.backbone.mean)}},
    )
    return str(version.version), clips


def test_cvs_model_carries_its_signature_and_example_and_refuses_bad_clips(mlflow_store, tmp_path):
    version, clips = register_tiny_cvs(tmp_path)
    uri = f"models:/tiny-cvs/{version}"
    info = mlflow.models.get_model_info(uri)
    assert info.signature.inputs.to_dict() == [
        {"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": (-1, *clips.shape[1:])}}
    ]
    assert info.signature.outputs.input_names() == [f"prob_{c}" for c in CVS_CRITERIA]
    assert info.saved_input_example_info["type"] == "ndarray"
    assert info.metadata["preprocessing"]["image_size"] == clips.shape[-1]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(uri)
    assert not [w for w in caught if "type hint" in str(w.message).lower()], [str(w.message) for w in caught]
    predicted = model.predict(clips)
    expected = cvs.load_predictor(tmp_path / "best")(clips)
    pd.testing.assert_frame_equal(predicted, expected)

    with pytest.raises(MlflowException, match=r"[Ss]hape"):
        model.predict(clips[:, :2])  # two frames where the model takes four
    nan_clips = clips.copy()
    nan_clips[1, 0, 0, 0, 0] = np.nan
    with pytest.raises(MlflowException, match="1 non-finite value") as raised:
        model.predict(nan_clips)
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def test_avlm_error_of_a_column_predictor_is_an_invalid_parameter(mlflow_store, tmp_path, monkeypatch):
    """A DataFrame-input model (as the caption recipe's) loads without the type-hint warning; its DataError is a
    bad request, with the avlm message."""

    def load_predictor(checkpoint_dir):
        def predict(frame):
            missing = [path for path in frame["audio_path"] if not os.path.exists(path)]
            if missing:
                raise DataError(f"audio file {missing[0]} not found")
            return [f"caption of {os.path.basename(path)}" for path in frame["audio_path"]]

        return predict

    # A recipe module that only this test imports: the pyfunc finds it in sys.modules.
    monkeypatch.setitem(sys.modules, "avlm.recipes.column_echo", types.SimpleNamespace(load_predictor=load_predictor))
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.yaml").write_text("{}")
    audio = tmp_path / "clip.wav"
    audio.write_bytes(b"")
    with mlflow.start_run() as run:
        pass
    example = pd.DataFrame({"audio_path": [str(audio)]})

    def register():
        return log_and_register(
            RegistryConfig(name="column-echo"),
            checkpoint_dir=tmp_path / "checkpoint",
            recipe="column_echo",
            run_id=run.info.run_id,
            metric_value=0.5,
            input_example=example,
            output_example=load_predictor(None)(example),
        )

    version = register()
    assert mlflow.models.get_model_info(f"models:/column-echo/{version.version}").saved_input_example_info
    # An example over the size limit is left out; the signature stays.
    monkeypatch.setattr("avlm.tracking.registry.MAX_STORED_EXAMPLE_VALUES", 0)
    large = mlflow.models.get_model_info(f"models:/column-echo/{register().version}")
    assert large.saved_input_example_info is None and large.signature.inputs.input_names() == ["audio_path"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = mlflow.pyfunc.load_model(f"models:/column-echo/{version.version}")
    assert not [w for w in caught if "type hint" in str(w.message).lower()]
    assert model.metadata.get_input_schema().input_names() == ["audio_path"]
    assert list(model.predict(example)) == ["caption of clip.wav"]
    with pytest.raises(MlflowException, match="audio file /no/such.wav not found") as raised:
        model.predict(pd.DataFrame({"audio_path": ["/no/such.wav"]}))
    assert raised.value.error_code == "INVALID_PARAMETER_VALUE"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_uri, log_path):
    """``mlflow models serve`` on 127.0.0.1 until the block ends (the whole process group is stopped)."""
    port = free_port()
    with open(log_path, "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
            + ["-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # uvicorn's workers go with it
        )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            assert server.poll() is None, log_path.read_text()[-3000:]
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as response:
                    if response.status == 200:
                        break
            assert time.monotonic() < deadline, "mlflow models serve did not answer /ping in time"
            time.sleep(1)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(30)


def post(url, payload):
    """POST JSON to /invocations; returns (status, parsed body)."""
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_served_cvs_model_answers_good_clips_and_explains_bad_ones(mlflow_store, tmp_path):
    version, clips = register_tiny_cvs(tmp_path)
    with serving(f"models:/tiny-cvs/{version}", tmp_path / "serve.log") as url:
        status, body = post(url, {"inputs": clips.tolist()})
        assert status == 200, body
        assert [sorted(row) for row in body["predictions"]] == [[f"prob_{c}" for c in CVS_CRITERIA]] * 2
        assert all(0 < p < 1 for row in body["predictions"] for p in row.values())

        status, body = post(url, {"inputs": clips[:, :2].tolist()})
        assert status == 400
        assert f"{(-1, *clips.shape[1:])}" in body["message"] and "unexpected error" not in body["message"]

        nan_clips = clips.copy()
        nan_clips[0, 0, 0, 0, :3] = np.nan
        status, body = post(url, {"inputs": nan_clips.tolist()})
        assert (status, body["error_code"]) == (400, "INVALID_PARAMETER_VALUE")
        assert "3 non-finite values" in body["message"] and "stack_trace" not in body
