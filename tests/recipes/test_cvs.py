"""train_cvs end to end, in-process: what lands in MLflow and the registry, learning, cache and resume equivalence."""

import importlib.metadata
import warnings

import mlflow
import numpy as np
import pytest
import torch
from cvs_runs import run_cvs
from mlflow import MlflowClient
from safetensors.torch import load_file

from avlm.data import CVS_CRITERIA
from avlm.recipes import cvs


def run(*overrides, path="examples/cvs/demo.yaml"):
    return run_cvs(*overrides, path=path)


def artifact_paths(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def version_stage(name, version):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MlflowClient().get_model_version(name, version).current_stage


def test_run_logs_params_metrics_artifacts_and_registers(mlflow_store):
    result = run("train.epochs=3", "seed=3")
    client = MlflowClient()
    mlflow_run = client.get_run(result.run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.info.run_name == "cvs-vjepa2-tiny-frozen-seed3"
    tags = mlflow_run.data.tags
    assert (tags["recipe"], tags["dataset"], tags["backbone"], tags["adaptation"]) == (
        "cvs", "cvs-demo", "vjepa2-tiny", "frozen",
    )  # fmt: skip
    assert tags["feature_cache"] == "True" and tags["avlm.git_commit"]
    assert tags["versions.torch"] == importlib.metadata.version("torch")
    params = mlflow_run.data.params
    assert params["cfg.train.epochs"] == "3" and params["cfg.seed"] == "3"
    assert params["cfg.model.backbone"] == "vjepa2-tiny" and params["cfg.registry.name"] == "avlm-cvs"

    metrics = mlflow_run.data.metrics
    expected = {
        "train/loss",
        "val/loss",
        "train/mAP",
        "val/mAP",
        "train_val_gap/mAP",
        "lr",
        "epoch",
        "entropy/pooler",
        "entropy/backbone_layer_0",
        "entropy/backbone_layer_1",
        "entropy/backbone_mean",
        "final/val_mAP",
        "final/test_mAP",
        "params/trainable",
        "params/total",
        "train/step_loss",
    }
    expected |= {f"val/AP_{c}" for c in CVS_CRITERIA} | {f"train/AP_{c}" for c in CVS_CRITERIA}
    assert expected <= set(metrics), expected - set(metrics)
    assert len(client.get_metric_history(result.run_id, "val/mAP")) == 3
    assert 0 < metrics["entropy/backbone_layer_0"] <= 100 and 0 < metrics["entropy/pooler"] <= 100
    history = result.state.history
    assert metrics["val/mAP"] == pytest.approx(history[-1]["val/mAP"])
    assert metrics["train_val_gap/mAP"] == pytest.approx(history[-1]["train/mAP"] - history[-1]["val/mAP"])
    assert metrics["final/val_mAP"] == pytest.approx(result.state.best_value)

    artifacts = set(artifact_paths(client, result.run_id))
    for path in [
        "config/config.yaml",
        "config/resolved_config.json",
        "run_card.json",
        "plots/training_curves.png",
        "plots/val_pr_curves.png",
        "plots/attention_entropy.png",
        "predictions/val_predictions.csv",
        "checkpoints/best/trainable.safetensors",
        "checkpoints/last/optimizer.safetensors",
        "checkpoints/last/state.json",
    ]:
        assert path in artifacts, path
    card = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/run_card.json")
    assert card["parameters"]["trainable"] < card["parameters"]["total"]
    assert len(card["dataset"]["manifest_sha256"]["train"]) == 64 and card["seed"] == 3
    assert card["backbone"]["name"] == "vjepa2-tiny"

    # registry: candidate + champion (first version), stage Production, evidence on the version
    version = client.get_model_version_by_alias("avlm-cvs", "champion")
    assert str(version.version) == result.model_version == "1" and result.promoted
    assert set(version.aliases) == {"candidate", "champion"}
    assert version_stage("avlm-cvs", "1") == "Production"
    assert version.run_id == result.run_id
    assert float(version.tags["avlm.metric_value"]) == pytest.approx(result.state.best_value)
    assert version.tags["promotion.decision"] == "promoted"

    # the registered pyfunc rebuilds the model from config + trainable weights and predicts like it
    model = mlflow.pyfunc.load_model("models:/avlm-cvs@champion")
    splits, _ = cvs.load_cvs_splits(cvs.CVSDataConfig())
    classifier, cfg = cvs.load_classifier(
        mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/checkpoints/best")
    )
    dataset = cvs.ClipDataset(splits["val"][:3], 32, classifier.backbone.mean, classifier.backbone.std)
    clips = torch.stack([dataset[i]["pixel_values"] for i in range(3)]).numpy()
    predicted = model.predict(clips)
    with torch.no_grad():
        expected_probs = torch.sigmoid(classifier(pixel_values=torch.as_tensor(clips)).logits).numpy()
    np.testing.assert_allclose(predicted[[f"prob_{c}" for c in CVS_CRITERIA]].to_numpy(), expected_probs, atol=1e-6)


def test_demo_model_learns_well_above_prevalence(mlflow_store):
    result = run("registry.register=false")
    splits, _ = cvs.load_cvs_splits(cvs.CVSDataConfig())
    prevalence = np.array([r.labels for r in splits["val"]]).mean(axis=0).mean()
    # a random ranking's AP is the prevalence (~0.14 here); the demo head must beat it by far
    assert result.state.best_value > prevalence + 0.2, (result.state.best_value, prevalence)
    assert result.final_metrics["final/test_mAP"] > prevalence + 0.15


@pytest.mark.slow
def test_feature_cache_gives_the_same_training_as_the_pixel_path(mlflow_store):
    cached = run("train.epochs=2", "registry.register=false", "seed=5")
    uncached = run("train.epochs=2", "registry.register=false", "seed=5", "data.feature_cache=false")
    assert cached.used_feature_cache and not uncached.used_feature_cache
    for a, b in zip(cached.state.history, uncached.state.history, strict=True):
        for key in ("train/loss", "val/loss", "val/mAP", "val/AP_C2", "entropy/pooler"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


@pytest.mark.slow
def test_resume_after_a_crash_reaches_the_same_result(mlflow_store, monkeypatch):
    from avlm.train import loop

    settings = (
        "train.epochs=4",
        "registry.register=false",
        "data.feature_cache=false",
        "model.head_dropout=0.2",
        "data.mixup_alpha=0.4",
        "data.limit_clips=256",
        "seed=7",
    )
    reference = run(*settings)

    real_epoch_seed = loop.epoch_seed

    def crash_at_third_epoch(seed, epoch):
        if epoch == 2:
            raise RuntimeError("simulated crash")
        return real_epoch_seed(seed, epoch)

    monkeypatch.setattr(loop, "epoch_seed", crash_at_third_epoch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*settings)
    client = MlflowClient()
    crashed = client.search_runs(
        client.get_experiment_by_name("avlm-cvs").experiment_id, order_by=["attributes.start_time DESC"]
    )[0]
    assert crashed.info.status == "FAILED"
    monkeypatch.setattr(loop, "epoch_seed", real_epoch_seed)

    resumed = run(f"resume={crashed.info.run_id}")
    assert resumed.run_id == crashed.info.run_id
    assert client.get_run(crashed.info.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(crashed.info.run_id, "val/mAP")) == 4
    assert [r["epoch"] for r in resumed.state.history] == [1, 2, 3, 4]
    for a, b in zip(reference.state.history, resumed.state.history, strict=True):
        for key in ("train/loss", "val/loss", "val/mAP", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    assert resumed.final_metrics == pytest.approx(reference.final_metrics, abs=1e-6)


@pytest.mark.slow
def test_a_run_that_crashed_after_training_resumes_on_a_fresh_machine(mlflow_store, monkeypatch, tmp_path):
    """The resumed run needs checkpoints/best although no epoch is left to train: it must come from the artifacts."""
    import shutil

    from avlm.train.lifecycle import RecipeRun

    settings = ("train.epochs=2", "registry.register=false", "data.limit_clips=128", "seed=4")
    reference = run(*settings)
    real_load_best = RecipeRun.load_best

    def crash_before_the_final_evaluation(self, model):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(RecipeRun, "load_best", crash_before_the_final_evaluation)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*settings)
    monkeypatch.setattr(RecipeRun, "load_best", real_load_best)
    client = MlflowClient()
    crashed = client.search_runs(
        client.get_experiment_by_name("avlm-cvs").experiment_id, order_by=["attributes.start_time DESC"]
    )[0]
    shutil.rmtree(tmp_path / "outputs")  # a fresh machine: nothing local, only what MLflow holds

    resumed = run(f"resume={crashed.info.run_id}")
    assert resumed.run_id == crashed.info.run_id
    assert client.get_run(crashed.info.run_id).info.status == "FINISHED"
    assert resumed.final_metrics == pytest.approx(reference.final_metrics, abs=1e-6)
    assert [m.step for m in client.get_metric_history(crashed.info.run_id, "val/mAP")] == [
        m.step for m in client.get_metric_history(reference.run_id, "val/mAP")
    ]


def test_bad_data_fails_before_an_mlflow_run_exists(mlflow_store, tmp_path):
    from avlm.errors import AvlmError

    (tmp_path / "empty-endoscapes").mkdir()
    with pytest.raises(AvlmError):
        run(f"data.data_dir={tmp_path / 'empty-endoscapes'}")
    client = MlflowClient()
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


@pytest.mark.slow
def test_lora_and_staged_runs_train_only_what_they_should(mlflow_store):
    lora = run(
        "model.adaptation=lora", "model.lora_r=4", "train.epochs=1", "registry.register=false", "data.limit_clips=48"
    )
    assert not lora.used_feature_cache
    lora_keys = set(load_file(str(lora.output_dir / "checkpoints/best/trainable.safetensors")))
    backbone_keys = {k for k in lora_keys if k.startswith("backbone.")}
    assert backbone_keys and all("lora_" in k for k in backbone_keys)
    assert not any("predictor" in k for k in lora_keys) and any(k.startswith("head.") for k in lora_keys)

    staged = run(
        "model.adaptation=staged",
        "model.stage1_epochs=1",
        "train.epochs=2",
        "registry.register=false",
        "data.limit_clips=48",
        "model.unfreeze_last_n=1",
    )
    staged_keys = set(load_file(str(staged.output_dir / "checkpoints/best/trainable.safetensors")))
    assert {k.split(".")[4] for k in staged_keys if k.startswith("backbone.model.encoder.layer.")} == {"1"}
    assert not staged.used_feature_cache


def test_timm_backbone_with_lora_bf16_and_accumulation_trains(mlflow_store):
    result = run(
        "model.backbone=timm-tiny",
        "model.adaptation=lora",
        "model.lora_targets=[qkv]",
        "model.lora_r=4",
        "train.epochs=2",
        "train.grad_accum_steps=2",
        "train.mixed_precision=bf16",
        "registry.register=false",
        "data.limit_clips=64",
    )
    keys = set(load_file(str(result.output_dir / "checkpoints/best/trainable.safetensors")))
    assert any(".attn.qkv.lora_A" in k for k in keys) and not result.used_feature_cache
    assert result.state.global_step == 2 * 2  # 64 clips / batch 16 = 4 micro-batches = 2 optimizer steps per epoch
    metrics = MlflowClient().get_run(result.run_id).data.metrics
    assert "entropy/backbone_layer_1" in metrics and np.isfinite(metrics["val/loss"])
