"""SCST on the caption recipe: the objective's parts, and XE → SCST end to end (registry lineage, alias, gate)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from avlm.errors import ConfigError
from avlm.metrics.cider import CiderD
from avlm.recipes import caption
from avlm.scst import ScstConfig, baseline_rewards, sample_labels
from avlm.tracking.model_source import fetch_checkpoint

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "tracking.system_metrics=false",
    "data.limit_clips=32",
    "train.batch_size=16",
    "decoding.num_beams=2",
    "decoding.max_new_tokens=12",
]


@pytest.fixture
def no_corenlp(tmp_path, monkeypatch):
    monkeypatch.setenv("AVLM_CORENLP_DIR", str(tmp_path / "no-corenlp"))


# -- the objective's parts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["greedy", "mean_of_others"])
def test_both_baselines_give_zero_advantage_when_all_samples_are_equal(kind):
    rewards = np.full((3, 5), 0.7)
    greedy = np.full(3, 0.7)
    assert np.array_equal(rewards - baseline_rewards(rewards, kind, greedy), np.zeros((3, 5)))


def test_mean_of_others_is_the_mean_of_the_other_samples():
    rewards = np.array([[1.0, 2.0, 6.0]])
    assert baseline_rewards(rewards, "mean_of_others").tolist() == [[4.0, 3.5, 1.5]]
    assert baseline_rewards(rewards, "greedy", np.array([0.5])).tolist() == [[0.5, 0.5, 0.5]]


def test_sample_labels_score_tokens_up_to_and_including_the_first_end_token():
    class Tok:
        bos_token_id, eos_token_id, pad_token_id = 1, 2, 0

    generated = torch.tensor([[5, 6, 2, 0, 0], [7, 2, 0, 0, 0], [8, 9, 9, 9, 9]])
    inputs = sample_labels(generated, Tok())
    assert inputs["input_ids"][:, 0].tolist() == [1, 1, 1]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert inputs["labels"][0].tolist() == [1, 5, 6, 2, -100, -100]


def test_scst_settings_are_checked():
    with pytest.raises(ConfigError, match="scst.samples"):
        ScstConfig(samples=1, baseline="mean_of_others")
    with pytest.raises(ConfigError, match="scst.temperature"):
        ScstConfig(temperature=0)


def test_a_parent_that_does_not_exist_is_named(mlflow_store):
    with pytest.raises(ConfigError, match="scst.parent.*models:/nope@champion"):
        caption.load_scst_config(None, ["scst.parent=models:/nope@champion"])
    with pytest.raises(ConfigError, match="scst.parent.*expected models"):
        caption.load_scst_config(None, ["scst.parent=not-a-model"])


# -- end to end -----------------------------------------------------------------------------------------------------
def greedy_train_cider(checkpoint_dir: Path) -> float:
    """CIDEr-D of the checkpoint's greedy captions of its training clips (df from the training references)."""
    model, cfg = caption.load_captioner(checkpoint_dir)
    splits, _ = caption.load_caption_splits(cfg.data, clip_frames=cfg.model.num_frames)
    clips = caption.source_clips(model.encoder, splits, cfg)
    train = clips.datasets["train"]
    waveforms = torch.stack([train[i][clips.input_key] for i in range(len(train))])
    texts = model.generate(waveforms, num_beams=1, max_new_tokens=cfg.decoding.max_new_tokens).texts
    cider = CiderD([list(r.captions) for r in splits["train"]])
    return float(cider.score(texts, list(range(len(texts)))).mean())


@pytest.mark.slow
def test_scst_raises_training_cider_and_registers_a_scst_version_with_its_lineage(mlflow_store, no_corenlp):
    # a deliberately under-trained XE checkpoint: one epoch on 64 clips
    clips = "data.limit_clips=64"
    demo = REPO / "examples/caption/demo.yaml"
    xe = caption.main(caption.load_caption_config(demo, [*TINY, clips, "train.epochs=1"]))
    assert xe.model_version == "1" and xe.promoted

    cfg = caption.load_scst_config(
        REPO / "examples/caption/scst_demo.yaml", [*TINY, clips, "train.batch_size=8", "scst.epochs=3"]
    )
    assert cfg.scst.parent == "models:/avlm-caption/1"  # the alias is pinned to the version it named
    parent_cfg = caption.load_captioner(fetch_checkpoint("models:/avlm-caption/1").checkpoint_dir)[1]
    assert cfg.model == parent_cfg.model and cfg.decoding == parent_cfg.decoding
    assert cfg.train.lr == cfg.scst.lr == 1e-4 and cfg.train.epochs == 3 and cfg.scst.baseline == "mean_of_others"
    scst = caption.main(cfg)

    client = MlflowClient()
    run = client.get_run(scst.run_id)
    assert run.data.tags["training"] == "xe+scst"
    assert run.data.tags["lineage.parent_model"] == "avlm-caption"
    assert run.data.tags["lineage.parent_version"] == "1"
    assert run.data.tags["lineage.parent_run_id"] == xe.run_id
    for key in ("scst/reward_mean", "scst/reward_std", "scst/baseline_mean", "scst/advantage_mean", "val/CIDEr_D"):
        assert len(client.get_metric_history(scst.run_id, key)) == 3, key
    rewards = [m.value for m in client.get_metric_history(scst.run_id, "scst/reward_mean")]

    # the SCST version: same registered model, alias scst, lineage tags, and the gate's decision on record
    version = client.get_model_version("avlm-caption", scst.model_version)
    assert scst.model_version == "2"
    assert str(client.get_model_version_by_alias("avlm-caption", "scst").version) == "2"
    assert version.tags["training"] == "xe+scst" and version.tags["lineage.parent_version"] == "1"
    assert version.tags["promotion.decision"] in ("promoted", "rejected")
    assert ("beats" in version.tags["promotion.reason"]) or ("does not beat" in version.tags["promotion.reason"])
    assert client.get_model_version("avlm-caption", "1").tags["training"] == "xe"

    # the retention probe ran for both: the same frozen LM alone, and each checkpoint with its fusion active
    xe_metrics, scst_metrics = client.get_run(xe.run_id).data.metrics, run.data.metrics
    assert xe_metrics["retention/lm_accuracy"] == scst_metrics["retention/lm_accuracy"] > 0.9
    for metrics, tags in ((scst_metrics, run.data.tags), (xe_metrics, client.get_run(xe.run_id).data.tags)):
        verdict = "PASS" if metrics["retention/delta_pt"] >= -0.5 else "FAIL"
        assert tags["retention"] == verdict
    assert version.tags["retention"] == run.data.tags["retention"]

    # SCST raised the training-set CIDEr-D of its under-trained parent (greedy captions, training df)
    before = greedy_train_cider(fetch_checkpoint("models:/avlm-caption/1").checkpoint_dir)
    after = greedy_train_cider(fetch_checkpoint("models:/avlm-caption@scst").checkpoint_dir)
    print(f"train CIDEr-D: XE {before:.4f} -> +SCST {after:.4f}; sampled reward per epoch {rewards}")
    assert after > before + 0.01


@pytest.mark.slow
def test_xe_that_plateaus_starts_scst_from_its_best_checkpoint_as_a_linked_run(mlflow_store, no_corenlp):
    # min_delta 10: no epoch after the first improves, so patience 1 stops XE after epoch 2 of 3
    overrides = [*TINY, "train.epochs=3", "train.patience=1", "train.min_delta=10", "scst.after_plateau=true"]
    overrides += ["scst.epochs=1", "retention.enabled=false"]
    xe = caption.main(caption.load_caption_config(REPO / "examples/caption/demo.yaml", overrides))
    assert xe.state.stopped_early and xe.state.epoch == 2
    scst = xe.scst
    assert scst is not None and scst.run_id != xe.run_id and scst.model_version == "2"
    client = MlflowClient()
    xe_tags, scst_tags = client.get_run(xe.run_id).data.tags, client.get_run(scst.run_id).data.tags
    assert xe_tags["scst.after_plateau"] == "ran" and xe_tags["scst.child_run_id"] == scst.run_id
    assert scst_tags["lineage.parent_run_id"] == xe.run_id and scst_tags["lineage.parent_version"] == "1"
    assert scst_tags["training"] == "xe+scst" and len(scst.state.history) == 1
    assert str(client.get_model_version_by_alias("avlm-caption", "scst").version) == "2"
