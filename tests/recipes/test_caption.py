"""train_caption end to end, in-process: what lands in MLflow and the registry, Phase-0 overfitting, baselines."""

import json
import logging
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from avlm.errors import ConfigError
from avlm.recipes import caption

REPO = Path(__file__).resolve().parents[2]
TINY = [
    "tracking.system_metrics=false",
    "data.limit_clips=32",
    "train.epochs=2",
    "train.batch_size=16",
    "decoding.num_beams=2",
    "decoding.max_new_tokens=12",
]


def run(*overrides):
    return caption.main(caption.load_caption_config(REPO / "examples/caption/demo.yaml", [*TINY, *overrides]))


@pytest.fixture
def no_corenlp(tmp_path, monkeypatch):
    """SPICE cannot run (no CoreNLP jars), whatever this machine has installed."""
    monkeypatch.setenv("AVLM_CORENLP_DIR", str(tmp_path / "no-corenlp"))


def artifact_paths(client, run_id, path=""):
    found = []
    for item in client.list_artifacts(run_id, path):
        found.extend(artifact_paths(client, run_id, item.path) if item.is_dir else [item.path])
    return found


def test_run_logs_gates_scores_predictions_and_registers_without_spice(mlflow_store, no_corenlp):
    result = run()
    client = MlflowClient()
    logged = client.get_run(result.run_id)

    # SPICE is unavailable here: the run says so and monitors CIDEr-D instead of SPIDEr, never a made-up SPICE
    assert result.monitor == "val/CIDEr_D" and "AVLM_CORENLP_DIR" in result.spice_unavailable_reason
    assert logged.data.tags["monitor"] == "val/CIDEr_D" and logged.data.tags["spice"] == "unavailable"
    assert "no-corenlp" in logged.data.tags["spice_unavailable_reason"]
    assert not [k for k in logged.data.metrics if "SPICE" in k or "SPIDEr" in k]
    assert logged.data.params["cfg.train.monitor"] == "val/SPIDEr"  # the declared config is kept as declared
    assert logged.data.tags["fusion"] == "additive" and logged.data.tags["recipe"] == "caption"

    # per-epoch caption metrics, losses and one gate magnitude per fusion layer
    for key in ("val/CIDEr_D", "val/BLEU_4", "val/METEOR", "val/ROUGE_L", "val/xe_loss", "train/xe_loss"):
        assert len(client.get_metric_history(result.run_id, key)) == 2, key
    for layer in (1, 3):
        gates = client.get_metric_history(result.run_id, f"fusion_gate/layer_{layer}")
        assert len(gates) == 2 and all(g.value > 0 for g in gates)
    assert logged.data.metrics["params/ratio_to_additive"] == pytest.approx(1.0)
    assert logged.data.metrics["params/trainable"] == result.parameter_counts["trainable"]
    assert result.parameter_counts["trainable/lm"] == 0 and result.parameter_counts["trainable/fusion"] > 0

    artifacts = set(artifact_paths(client, result.run_id))
    for expected in (
        "run_card.json",
        "config/config.yaml",
        "predictions/val_predictions.json",
        "predictions/test_predictions.json",
        "plots/training_curves.png",
        "plots/fusion_gate_magnitudes.png",
        "checkpoints/best/trainable.safetensors",
        "checkpoints/best/tokenizer/tokenizer.json",
    ):
        assert expected in artifacts, expected
    card = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/run_card.json"))
    assert set(card["dataset"]["reference_sha256"]) == {"train", "val", "test"}
    assert card["fusion"]["layers"] == [1, 3] and card["decoding"]["num_beams"] == 2

    # predictions.json: one row per val clip with its references and per-item scores that average to the corpus
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/predictions/val_predictions.json"))
    assert len(rows) == 32 and all(len(row["references"]) == 5 for row in rows)
    cider = [row["scores"]["CIDEr_D"] for row in rows]
    assert sum(cider) / len(cider) == pytest.approx(result.final_metrics["final/val_CIDEr_D"], abs=1e-9)

    # registry: candidate alias, tags; the registered pyfunc captions an audio file
    version = client.get_model_version("avlm-caption", result.model_version)
    assert "candidate" in version.aliases and version.tags["fusion"] == "additive"
    assert version.tags["avlm.metric"] == "val/CIDEr_D"
    model = mlflow.pyfunc.load_model("models:/avlm-caption@candidate")
    clip = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/predictions/val_predictions.json"))[0]
    demo_root = next(Path(caption.default_cache_dir()).glob("caption_demo_*"))
    audio = next(demo_root.rglob(clip["id"]))
    texts = model.predict(pd.DataFrame({"audio_path": [str(audio)]}))
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_phase0_overfitting_a_small_subset_drives_loss_down_and_cider_up(mlflow_store, no_corenlp):
    # The research plan's Phase-0 check: on 8 clips seen in training and validation the fusion must fit them; from
    # the random LM, so that every word of the captions is the fusion's doing.
    result = run(
        "model.lm=lm-tiny",
        "retention.enabled=false",
        "data.limit_clips=0",
        "data.overfit_clips=8",
        "train.batch_size=8",
        "train.epochs=25",
        "train.patience=0",
        "model.fusion_gate_init=0.2",
        "decoding.num_beams=1",
        "decoding.max_new_tokens=20",
        "registry.register=false",
    )
    history = result.state.history
    assert history[-1]["train/xe_loss"] < 0.6 * history[0]["train/xe_loss"]
    assert history[0]["val/CIDEr_D"] < 0.1 and result.state.best_value > max(0.3, 4 * history[0]["val/CIDEr_D"])
    assert max(history[-1][f"fusion_gate/layer_{layer}"] for layer in (1, 3)) > 0.3  # the gates opened


@pytest.mark.parametrize("fusion", ["cross_attention", "partial_unfreeze", "data_only"])
def test_baselines_train_and_report_their_size_against_the_additive_system(fusion, mlflow_store, no_corenlp, caplog):
    extra = ["model.fusion_layers=[1,3]", "model.unfreeze_top=1"] if fusion == "partial_unfreeze" else []
    with caplog.at_level(logging.WARNING, logger="avlm.recipes.caption"):
        result = run(f"model.fusion={fusion}", "train.epochs=1", "registry.register=false", *extra)
    ratio = result.parameter_counts["trainable"] / result.parameter_counts["additive_reference"]
    logged = MlflowClient().get_run(result.run_id).data.metrics
    assert logged["params/ratio_to_additive"] == pytest.approx(ratio)
    outside = abs(ratio - 1) > caption.PARAMS_TOLERANCE
    assert outside == ("param-normalised" in caplog.text)
    assert outside == (fusion in ("partial_unfreeze", "data_only"))  # cross-attention is matched by construction
    assert result.state.history[0]["train/xe_loss"] > 0 and "final/val_CIDEr_D" in result.final_metrics
    assert (result.parameter_counts["trainable/lm"] > 0) == (fusion in ("partial_unfreeze", "data_only"))


def test_bad_caption_input_is_named(mlflow_store):
    with pytest.raises(ConfigError, match="data.data_dir"):
        run("data.dataset=clotho")
    with pytest.raises(ConfigError, match="'vjepa2-tiny' is a video encoder but 'data.dataset' = 'demo' holds audio"):
        run("model.encoder=vjepa2-tiny")
    with pytest.raises(ConfigError, match="effective_batch"):
        caption.load_caption_config(None, ["effective_batch=20", "train.batch_size=16"])
    # bad data and a mismatched encoder fail before an MLflow run exists
    client = MlflowClient()
    assert [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])] == []


def test_video_source_is_one_config_switch_and_its_model_captions_frames(mlflow_store, no_corenlp):
    # Same recipe, same fusion: only model.encoder and data.dataset change (examples/caption/video_demo.yaml).
    result = run("model.encoder=vjepa2-tiny", "data.dataset=video_demo", "registry.name=avlm-caption-video")
    client = MlflowClient()
    logged = client.get_run(result.run_id)
    card = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/run_card.json"))
    assert card["dataset"]["modality"] == "video" and card["dataset"]["preprocessing"]["clip_frames"] == 4
    assert len(client.get_metric_history(result.run_id, "fusion_gate/layer_3")) == 2
    assert "val/CIDEr_D" in logged.data.metrics and result.parameter_counts["trainable/lm"] == 0
    model = mlflow.pyfunc.load_model("models:/avlm-caption-video@candidate")
    demo_root = next(Path(caption.default_cache_dir()).glob("video_caption_demo_*"))
    clip_dirs = sorted(p for p in (demo_root / "frames").iterdir())[:2]
    texts = model.predict(pd.DataFrame({"frames_dir": [str(p) for p in clip_dirs]}))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_effective_batch_accumulates_gradients(mlflow_store, no_corenlp):
    # 32 clips x 5 captions = 160 pairs = 10 batches of 16; an effective batch of 32 takes 5 optimizer steps
    result = run("effective_batch=32", "train.epochs=1", "registry.register=false", "decoding.num_beams=1")
    assert result.state.global_step == 5
    steps = MlflowClient().get_metric_history(result.run_id, "train/step_loss")
    assert [m.step for m in steps] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_reranked_evaluation_logs_oracle_diversity_and_the_decoding_table(mlflow_store, no_corenlp):
    result = run(
        "train.epochs=1",
        "data.limit_clips=16",
        "model.contrastive_weight=0.1",
        "decoding.num_beams=3",
        "decoding.rerank.enabled=true",
        "retention.enabled=false",
        "registry.register=false",
    )
    client = MlflowClient()
    metrics = client.get_run(result.run_id).data.metrics
    for prefix in ("val/", "final/test_"):
        assert {f"{prefix}rerank/CIDEr_D", f"{prefix}CIDEr_D_max", f"{prefix}self_BLEU_4"} <= set(metrics), prefix
        # the oracle picks the best of the candidates the top beam is one of
        assert metrics[f"{prefix}CIDEr_D_max"] >= max(metrics[f"{prefix}CIDEr_D"], metrics[f"{prefix}rerank/CIDEr_D"])
        assert 0 <= metrics[f"{prefix}self_BLEU_4"] <= 1
    artifacts = set(artifact_paths(client, result.run_id))
    assert {"tables/decoding_val.md", "tables/decoding_val.json", "tables/decoding_test.md"} <= artifacts
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/tables/decoding_val.json"))
    assert [row["decoding"] for row in table] == ["top beam", "reranked", "oracle max"]
    assert table[0]["CIDEr_D"] == pytest.approx(metrics["final/val_CIDEr_D"])
    rows = json.loads(mlflow.artifacts.load_text(f"runs:/{result.run_id}/predictions/val_predictions.json"))
    assert all(len(r["candidates"]) == 3 and r["prediction"] == r["candidates"][0] for r in rows)
    assert all(r["reranked"] in r["candidates"] for r in rows)
