"""evaluate_caption: a registered version decoded and scored again, into a new run tagged with that version; SNR
robustness; refusals before any run exists. One tiny XE training, shared by the module."""

import importlib.util
import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from avlm.data.noise import measured_snr_db
from avlm.errors import ConfigError
from avlm.recipes import caption, evaluate_caption

REPO = Path(__file__).resolve().parents[2]
# entrypoints/ is a folder of scripts, not a package: load the script as `python entrypoints/...` would run it
_spec = importlib.util.spec_from_file_location("evaluate_caption_entrypoint", REPO / "entrypoints/evaluate_caption.py")
entrypoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entrypoint)
# as small as the wiring allows: what is tested is the evaluation, not the captioner
TINY = [
    "tracking.system_metrics=false",
    "data.limit_clips=16",
    "train.epochs=1",
    "train.batch_size=16",
    "model.lm=lm-tiny",
    "retention.enabled=false",
    "decoding.num_beams=2",
    "decoding.max_new_tokens=8",
]
VERSION = "models:/avlm-caption/1"


def evaluation(*overrides: str) -> evaluate_caption.EvaluateCaptionConfig:
    return evaluate_caption.load_evaluate_caption_config(None, ["tracking.system_metrics=false", *overrides])


def all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def artifact(run_id: str, path: str):
    return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, avlm_cache, empty_store_file):
    """One tiny XE captioner, registered as avlm-caption version 1, in a store of this module (SPICE off)."""
    folder = tmp_path_factory.mktemp("evaluate_caption")
    shutil.copyfile(empty_store_file, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("AVLM_CORENLP_DIR", str(folder / "no-corenlp"))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        result = caption.main(caption.load_caption_config(REPO / "examples/caption/demo.yaml", TINY))
        assert result.model_version == "1"
        yield result
        while mlflow.active_run():
            mlflow.end_run()


# -- settings -------------------------------------------------------------------------------------------------------
def test_snr_namespaces_and_repeated_levels():
    assert [evaluate_caption.snr_prefix(s) for s in (20.0, 0.0, -0.0, -5.0, 2.5)] == [
        "snr20/",
        "snr0/",
        "snr0/",
        "snr-5/",
        "snr2.5/",
    ]
    with pytest.raises(ConfigError, match="'snr_db'.*repeats snr0/"):
        evaluate_caption.EvaluateCaptionConfig(snr_db=[0.0, 10.0, -0.0])
    with pytest.raises(ConfigError, match="config key 'split'"):
        evaluate_caption.load_evaluate_caption_config(None, ["split=dev"])


# -- end to end -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_version_evaluated_again_reproduces_its_training_runs_test_figures(trained):
    cfg = evaluation(f"model={VERSION}", "split=test")
    assert (cfg.decoding.num_beams, cfg.decoding.max_new_tokens) == (2, 8)  # the checkpoint's decoding
    result = evaluate_caption.main(cfg)

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert result.run_id != trained.run_id and run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["evaluated.model"], tags["evaluated.version"]) == ("avlm-caption", "1")
    assert tags["evaluated.run_id"] == trained.run_id and tags["evaluated.uri"] == VERSION
    assert (tags["split"], tags["recipe"], tags["clips"]) == ("test", "evaluate_caption", "16")
    assert (
        run.data.params["cfg.decoding.num_beams"] == "2" and run.data.params["cfg.decoding.rerank.enabled"] == "False"
    )

    # the same captions as the training run's final test pass: every final/test_* figure, exactly
    final = {k.removeprefix("final/test_"): v for k, v in trained.final_metrics.items() if k.startswith("final/test_")}
    assert set(final) == {"BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr_D"}
    assert {k: run.data.metrics[k] for k in final} == final
    rows = artifact(result.run_id, "predictions.json")
    training_rows = artifact(trained.run_id, "predictions/test_predictions.json")
    assert len(rows) == 16 and [r["id"] for r in rows] == [r["id"] for r in training_rows]
    assert [r["prediction"] for r in rows] == [r["prediction"] for r in training_rows]
    assert (result.output_dir / "predictions.json").is_file()


@pytest.mark.slow
def test_snr_levels_log_one_metric_set_each_the_curve_and_reranking(trained, capsys, monkeypatch):
    # what each pass feeds the model: the clean waveforms, then the same clips at 20 dB and at 0 dB
    fed: list[torch.Tensor] = []
    decode_split = evaluate_caption.decode_split

    def recording(net, loader, *args, **kwargs):
        def batches():
            for batch in loader:
                fed.append(batch["source"].clone())
                yield batch

        return decode_split(net, batches(), *args, **kwargs)

    monkeypatch.setattr(evaluate_caption, "decode_split", recording)
    client = MlflowClient()
    before = {r.info.run_id for r in all_runs(client)}
    argv = ["--model", VERSION, "--snr_db", "[20,0]", "--num_beams", "2", "--rerank", "true"]
    # consensus only: the tiny model was trained without the contrastive head its similarity needs
    assert entrypoint.main([*argv, "decoding.rerank.similarity_weight=0", "tracking.system_metrics=false"]) == 0
    (run,) = [r for r in all_runs(client) if r.info.run_id not in before]

    assert len(fed) == 3 and all(batch.shape == fed[0].shape for batch in fed)  # one batch of 16 clips per pass
    for batch, snr_db in zip(fed[1:], (20.0, 0.0), strict=True):
        measured = [measured_snr_db(clean.numpy(), noisy.numpy()) for clean, noisy in zip(fed[0], batch, strict=True)]
        assert max(abs(m - snr_db) for m in measured) < 0.01

    metrics = run.data.metrics
    for prefix in ("", "snr20/", "snr0/"):
        expected = {"CIDEr_D", "BLEU_4", "METEOR", "ROUGE_L", "rerank/CIDEr_D", "CIDEr_D_max", "self_BLEU_4"}
        assert {f"{prefix}{name}" for name in expected} <= set(metrics), prefix
        assert metrics[f"{prefix}CIDEr_D_max"] >= metrics[f"{prefix}CIDEr_D"]
    assert run.data.tags["snr_db"] == "20,0" and run.data.params["cfg.decoding.rerank.enabled"] == "True"
    assert "plots/snr_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "tables/decoding.md" in {a.path for a in client.list_artifacts(run.info.run_id, "tables")}
    clean = artifact(run.info.run_id, "predictions.json")
    assert all(len(r["candidates"]) == 2 and r["reranked"] in r["candidates"] for r in clean)
    for level in ("snr20", "snr0"):
        noisy = artifact(run.info.run_id, f"predictions/{level}.json")
        cider = [row["scores"]["CIDEr_D"] for row in noisy]
        assert sum(cider) / len(cider) == pytest.approx(metrics[f"{level}/CIDEr_D"], abs=1e-9)
        assert [r["id"] for r in noisy] == [r["id"] for r in clean]
    printed = capsys.readouterr().out
    assert f"MLflow run {run.info.run_id}: {VERSION} (avlm-caption version 1" in printed and "snr0/CIDEr_D" in printed


@pytest.mark.slow
def test_bad_settings_are_named_before_any_run_exists(trained, capsys, tmp_path, monkeypatch):
    client = MlflowClient()
    before = len(all_runs(client))
    assert entrypoint.main(["--model", VERSION, "--split", "dev"]) == 2
    assert "config key 'split'" in capsys.readouterr().err
    assert entrypoint.main(["--model", "models:/avlm-caption/7"]) == 2
    assert "config key 'model' = 'models:/avlm-caption/7'" in capsys.readouterr().err
    assert entrypoint.main(["--model", "models:/nope@champion", "--snr_db", "[10]"]) == 2
    assert "config key 'model'" in capsys.readouterr().err
    assert entrypoint.main(["--model", VERSION, "--rerank", "true"]) == 2  # contrastive, not trained here
    assert "config key 'decoding.rerank.similarity'" in capsys.readouterr().err
    # unreadable data: the demo's csv files without its audio
    demo = next(Path(caption.default_cache_dir()).glob("caption_demo_*"))
    broken = tmp_path / "data" / demo.name
    broken.mkdir(parents=True)
    for path in demo.iterdir():
        if path.is_file():
            shutil.copy(path, broken)
    assert entrypoint.main(["--model", VERSION, "--data_dir", str(tmp_path / "data")]) == 2
    assert str(broken) in capsys.readouterr().err
    # white noise is for audio: a video captioner (here the audio one, relabelled) refuses snr_db
    load_captioner = evaluate_caption.load_captioner

    def as_video(checkpoint_dir):
        net, cfg = load_captioner(checkpoint_dir)
        net.modality = "video"
        return net, cfg

    monkeypatch.setattr(evaluate_caption, "load_captioner", as_video)
    with pytest.raises(ConfigError, match=r"config key 'snr_db' = \[10.0\]: .* captions video"):
        evaluate_caption.main(evaluation(f"model={VERSION}", "snr_db=[10]"))
    assert len(all_runs(client)) == before
