"""Entry points as users run them: every example config parses, bad input fails cleanly (exit 2, run FAILED,
nothing registered), `mlflow run . -e train_cvs` works, and 2 processes give the result of 1."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from avlm.errors import ConfigError
from avlm.recipes import caption, cvs, probe

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "tracking": {"system_metrics": False},
    "model": {"head_hidden": 32, "head_queries": 2, "head_heads": 2, "head_dropout": 0.0},
    "data": {"entropy_clips": 4},
    "train": {"epochs": 2, "batch_size": 16},
}


def load_entrypoint(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_config(path, base="examples/cvs/demo.yaml", **sections):
    config = yaml.safe_load((REPO / base).read_text())
    for section, values in {**TINY, **sections}.items():
        config.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("path", sorted((REPO / "examples").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_example_parses_and_opens_with_its_command(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and ("entrypoints/" in first_line or "mlflow run" in first_line), first_line
    if path.parent.name == "cvs":
        cfg = cvs.load_cvs_config(path)
        assert cfg.registry.name == "avlm-cvs"
    elif path.parent.name == "caption":
        cfg = caption.load_caption_config(path)
        assert cfg.registry.name.startswith("avlm-caption") and cfg.train.monitor == "val/SPIDEr"
    elif path.parent.name == "probe":
        cfg = probe.load_probe_config(path)
        assert cfg.registry.name == "avlm-probe-backbone" and cfg.gate.select_on == "val"
    else:
        assert isinstance(yaml.safe_load(path.read_text()), dict)


SHORTCUT_SAMPLES = {
    "data_dir": "/data",
    "dataset": "clotho",
    "backbone": "timm-tiny",
    "encoder": "hf:microsoft/wavlm-base-plus",
    "lm": "hf:gpt2",
    "fusion": "concat",
    "fusion_layers": "[2, 5]",
    "adaptation": "lora",
    "epochs": "2",
    "lr": "0.1",
    "lora_r": "4",
    "seed": "3",
    "register_as": "m",
    "resume": "0123",
    "manifest": "/data/clips.csv",
    "checkpoint": "/ckpt/backbone.safetensors",
    "pretext_steps": "0",
    "seeds": "[1, 2]",
    "required_delta": "0.02",
}


@pytest.mark.parametrize(
    "name, load, required, demo_data",
    [
        ("train_cvs", cvs.load_cvs_config, {"backbone", "lora_r", "data_dir", "seed"}, "data.data_dir"),
        (
            "train_caption",
            caption.load_caption_config,
            {"encoder", "lm", "fusion", "fusion_layers", "data_dir", "seed"},
            "data.data_dir",
        ),
        ("probe", probe.load_probe_config, {"manifest", "backbone", "checkpoint", "seeds"}, "data.manifest"),
    ],
)
def test_mlproject_entry_point_maps_onto_the_config(name, load, required, demo_data):
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(REPO)).get_entry_point(name)
    assert required | {"config", "epochs", "register_as"} <= set(entry.parameters)
    module = load_entrypoint(name)
    assert set(entry.parameters) - {"config"} == set(module.SHORTCUTS)
    for shortcut, key in module.SHORTCUTS.items():
        assert f"--{shortcut} {{{shortcut}}}" in entry.command
        cfg = load(None, [f"{key}={SHORTCUT_SAMPLES[shortcut]}"])  # every shortcut names a real config key
        value = config_value(cfg, key)
        assert value == yaml.safe_load(SHORTCUT_SAMPLES[shortcut]) or str(value) == SHORTCUT_SAMPLES[shortcut]
    cfg = load(REPO / entry.parameters["config"].default)
    assert config_value(cfg, demo_data) == ""  # the default config runs on built-in demo data


def config_value(cfg, dotted_key):
    for part in dotted_key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def failed_run_and_registry(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return runs, client.search_registered_models()


def corrupt_copy_of_demo(tmp_path):
    from avlm.data import ensure_cvs_demo

    root = tmp_path / "endoscapes"
    shutil.copytree(ensure_cvs_demo(), root)
    return root


@pytest.mark.parametrize("fault", ["missing_dir", "corrupt_frame", "bad_annotation", "unknown_backbone", "nan_loss"])
def test_bad_input_fails_with_a_clear_message_a_failed_run_and_nothing_registered(
    fault, tmp_path, mlflow_store, capsys
):
    args = ["--config", str(write_config(tmp_path / "tiny.yaml"))]
    if fault == "missing_dir":
        args += ["--data_dir", str(tmp_path / "no_such_dir")]
        expected = str(tmp_path / "no_such_dir")
    elif fault == "corrupt_frame":
        root = corrupt_copy_of_demo(tmp_path)
        frame = sorted((root / "val").glob("*.jpg"))[7]
        frame.write_bytes(b"\xff\xd8 not a jpeg")
        args += ["--data_dir", str(root)]
        expected = frame.name
    elif fault == "bad_annotation":
        root = corrupt_copy_of_demo(tmp_path)
        annotation = root / "train" / "annotation_ds_coco.json"
        coco = json.loads(annotation.read_text())
        coco["images"][3]["ds"] = [1, "yes", 0]
        annotation.write_text(json.dumps(coco))
        args += ["--data_dir", str(root)]
        expected = coco["images"][3]["file_name"]
    elif fault == "unknown_backbone":
        args += ["--backbone", "resnet9000"]
        expected = "unknown backbone 'resnet9000'"
    else:
        args += ["train.lr=1e30", "train.max_grad_norm=0"]
        expected = "loss is nan at epoch 1"
    assert load_entrypoint("train_cvs").main(args) == 2
    message = capsys.readouterr().err
    assert "train_cvs: error:" in message and expected in message, message
    runs, registered = failed_run_and_registry(mlflow_store)
    assert [r.info.status for r in runs] == ["FAILED"]
    assert registered == []


def test_unknown_config_key_stops_before_any_run(tmp_path, mlflow_store, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert load_entrypoint("train_cvs").main(["--config", str(bad)]) == 2
    assert "unknown config key 'train.epochz'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="'train.epochs': expected an integer"):
        cvs.load_cvs_config(None, ["train.epochs=three"])
    assert failed_run_and_registry(mlflow_store) == ([], [])


def subprocess_env(tmp_path, uri):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT", "PYTEST"))}
    env.update(
        MLFLOW_TRACKING_URI=uri,
        HF_HUB_OFFLINE="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


@pytest.mark.slow
def test_mlflow_run_entry_point_end_to_end(tmp_path, mlflow_store):
    config = write_config(tmp_path / "tiny.yaml")
    config_data = yaml.safe_load(config.read_text())
    config_data["output_dir"] = str(tmp_path / "outputs")
    config.write_text(yaml.safe_dump(config_data))
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "run",
        str(REPO),
        "-e",
        "train_cvs",
        "--env-manager",
        "local",
        "--experiment-name",
        "avlm-cvs",
        "-P",
        f"config={config}",
        "-P",
        "epochs=3",
        "-P",
        "seed=2",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(tmp_path, mlflow_store), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("avlm-cvs").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "cvs-vjepa2-tiny-frozen-seed2"
    assert run.data.params["epochs"] == "3" and run.data.params["cfg.train.epochs"] == "3"
    assert run.data.params["cfg.seed"] == "2" and run.data.tags["mlflow.project.entryPoint"] == "train_cvs"
    assert len(client.get_metric_history(run.info.run_id, "val/mAP")) == 3
    assert {"entropy/backbone_layer_1", "val/AP_C2", "entropy/pooler"} <= set(run.data.metrics)
    version = client.get_model_version_by_alias("avlm-cvs", "champion")
    assert version.run_id == run.info.run_id and "candidate" in version.aliases
    assert "Browse it: mlflow ui" in done.stdout

    # the same command with a config key that does not exist: non-zero exit, the run FAILED, nothing new registered
    config.write_text("train:\n  epochz: 3\n")
    failed = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(tmp_path, mlflow_store), capture_output=True, text=True, timeout=600
    )
    assert failed.returncode != 0 and "unknown config key 'train.epochz'" in failed.stderr
    runs = client.search_runs([client.get_experiment_by_name("avlm-cvs").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    assert len(client.search_model_versions("name='avlm-cvs'")) == 1


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, mlflow_store):
    config = write_config(tmp_path / "tiny.yaml", train={"epochs": 3, "batch_size": 16})
    env = subprocess_env(tmp_path, mlflow_store)
    outputs = {}
    launches = {
        "one": [sys.executable, str(REPO / "entrypoints/train_cvs.py")],
        "two": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(REPO / "entrypoints/train_cvs.py"),
        ],
    }
    for name, launcher in launches.items():
        done = subprocess.run(
            [*launcher, "--config", str(config), f"output_dir={tmp_path / name}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        (run_dir,) = (tmp_path / name).iterdir()
        outputs[name] = run_dir
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("avlm-cvs").experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # one MLflow run per launch
    assert len(client.search_model_versions("name='avlm-cvs'")) == 2  # one version per launch
    by_processes = {
        json.loads(mlflow.artifacts.load_text(f"runs:/{r.info.run_id}/run_card.json"))["hardware"]["num_processes"]: r
        for r in runs
    }
    assert set(by_processes) == {1, 2}
    weights = {name: load_file(str(path / "checkpoints/best/trainable.safetensors")) for name, path in outputs.items()}
    assert weights["one"].keys() == weights["two"].keys()
    for key in weights["one"]:
        torch.testing.assert_close(weights["one"][key], weights["two"][key], rtol=1e-4, atol=1e-5)
    for key in ("val/mAP", "val/loss", "train/loss", "final/test_mAP"):
        one, two = by_processes[1].data.metrics[key], by_processes[2].data.metrics[key]
        assert one == pytest.approx(two, abs=1e-4), key


@pytest.mark.slow
def test_mlflow_run_train_caption_end_to_end(tmp_path, mlflow_store):
    config = tmp_path / "tiny_caption.yaml"
    config_data = yaml.safe_load((REPO / "examples/caption/demo.yaml").read_text())
    config_data["data"].update(limit_clips=24)
    config_data["decoding"].update(num_beams=2, max_new_tokens=12)
    config_data.update(output_dir=str(tmp_path / "outputs"), tracking={"system_metrics": False})
    config.write_text(yaml.safe_dump(config_data))
    env = {**subprocess_env(tmp_path, mlflow_store), "AVLM_CORENLP_DIR": str(tmp_path / "no-corenlp")}
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "train_caption", "--env-manager", "local"]
    command += ["--experiment-name", "avlm-caption", "-P", f"config={config}", "-P", "epochs=2"]
    command += ["-P", "fusion=additive"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_store)
    (run,) = client.search_runs([client.get_experiment_by_name("avlm-caption").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["mlflow.project.entryPoint"] == "train_caption"
    assert run.info.run_name == "caption-audio-tiny-lm-tiny-additive-L1_3-seed1"
    assert len(client.get_metric_history(run.info.run_id, "gate/layer_3")) == 2
    assert "predictions/val_predictions.json" in {a.path for a in client.list_artifacts(run.info.run_id, "predictions")}
    version = client.get_model_version_by_alias("avlm-caption", "champion")
    assert version.run_id == run.info.run_id and "candidate" in version.aliases
    assert "best val/CIDEr_D" in done.stdout and "Registered avlm-caption version 1" in done.stdout


@pytest.mark.slow
def test_mlflow_run_probe_end_to_end(tmp_path, mlflow_store):
    config = tmp_path / "tiny_probe.yaml"
    config_data = yaml.safe_load((REPO / "examples/probe/demo_fail.yaml").read_text())
    config_data["grid"].update(poolings=["mean_visible"], optimizers=["adamw"])
    config_data["sanity"].update(epochs=20)
    config_data.update(output_dir=str(tmp_path / "outputs"), tracking={"system_metrics": False})
    config.write_text(yaml.safe_dump(config_data))
    command = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "probe", "--env-manager", "local"]
    command += ["--experiment-name", "avlm-probe", "-P", f"config={config}", "-P", "epochs=5", "-P", "seeds=[1,2]"]
    done = subprocess.run(
        command, cwd=tmp_path, env=subprocess_env(tmp_path, mlflow_store), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("avlm-probe").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.project.entryPoint"] == "probe"
    assert parent.data.tags["gate"] == "FAIL" and parent.data.params["cfg.train.epochs"] == "5"
    assert sorted(c.info.run_name for c in children) == ["mean_visible-adamw-seed1", "mean_visible-adamw-seed2"]
    assert "probe gate FAIL" in done.stdout and "Nothing registered (the gate failed)." in done.stdout
    assert client.search_registered_models() == []
