"""evaluate_cvs: an ensemble of one version reproduces it, of two the mean of their probabilities; members that see
other clips or labels, and unknown URIs, are refused before any run exists. Two tiny trainings, shared by the module."""

import csv
import importlib.util
import io
from pathlib import Path

import mlflow
import numpy as np
import pytest
from cvs_runs import run_cvs
from mlflow import MlflowClient
from sklearn.metrics import average_precision_score

from avlm.data import CVS_CRITERIA
from avlm.data.endoscapes import ClipRecord
from avlm.errors import ConfigError
from avlm.recipes import cvs, evaluate_cvs
from avlm.tracking.model_source import CheckpointSource

REPO = Path(__file__).resolve().parents[2]
# entrypoints/ is a folder of scripts, not a package: load the script as `python entrypoints/...` would run it
_spec = importlib.util.spec_from_file_location("evaluate_cvs_entrypoint", REPO / "entrypoints/evaluate_cvs.py")
entrypoint = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(entrypoint)


def evaluation(*overrides: str) -> evaluate_cvs.EvaluateCVSConfig:
    return evaluate_cvs.load_evaluate_cvs_config(None, ["tracking.system_metrics=false", *overrides])


def all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def read_csv(run_id: str, path: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/{path}"))))


def columns(rows: list[dict[str, str]], prefix: str) -> np.ndarray:
    return np.array([[float(row[f"{prefix}{c}"]) for c in CVS_CRITERIA] for row in rows])


@pytest.fixture(scope="module")
def trained(module_store):
    """Two tiny frozen demo trainings (seeds 1 and 2), registered as avlm-cvs versions 1 and 2, in a store of this
    module."""
    results = [run_cvs("data.limit_clips=32", "train.epochs=1", f"seed={seed}") for seed in (1, 2)]
    assert [r.model_version for r in results] == ["1", "2"]
    return results


# -- settings and refusals ------------------------------------------------------------------------------------------
def test_members_are_required_once_each_and_unknown_keys_are_named():
    with pytest.raises(ConfigError, match="'members' is empty"):
        evaluation()
    with pytest.raises(ConfigError, match="names models:/avlm-cvs/1 more than once"):
        evaluation("members=[models:/avlm-cvs/1,models:/avlm-cvs/2,models:/avlm-cvs/1]")
    with pytest.raises(ConfigError, match="unknown config key 'data.limit_clips'"):
        evaluation("members=[models:/avlm-cvs/1]", "data.limit_clips=3")
    with pytest.raises(ConfigError, match="config key 'split'"):
        evaluation("members=[models:/avlm-cvs/1]", "split=train")


@pytest.mark.parametrize(
    "uri,message",
    [
        ("models:/avlm-cvs/7", r"'members\[0\]' = 'models:/avlm-cvs/7'"),
        ("runs:/" + "0" * 32, r"'members\[0\]' = 'runs:/0{32}'"),
        ("avlm-cvs", r"'members\[0\]' = 'avlm-cvs': expected models:/"),
    ],
    ids=["unknown version", "unknown run", "malformed"],
)
def test_an_unknown_or_malformed_member_is_refused_before_any_run_exists(mlflow_store, uri, message):
    client = MlflowClient()
    client.create_registered_model("avlm-cvs")
    with pytest.raises(ConfigError, match=message):
        evaluate_cvs.main(evaluation(f"members=[{uri}]"))
    assert all_runs(client) == []


def member(index: int, clips: dict[str, tuple[int, int, int]], limit_clips: int = 0) -> evaluate_cvs.EnsembleMember:
    """Member ``index`` (version ``index`` of avlm-cvs) seeing ``clips`` (clip id → labels), without a checkpoint."""
    records = [ClipRecord(clip, 1, int(clip.split("_")[1]), (), labels, labels) for clip, labels in clips.items()]
    config = cvs.load_cvs_config(None, [f"data.limit_clips={limit_clips}"])
    source = CheckpointSource(f"models:/avlm-cvs/{index}", Path("."), "f" * 32, "avlm-cvs", str(index))
    return evaluate_cvs.EnsembleMember(f"members[{index}]", source, config, records, "cvs-demo")


def test_members_are_aligned_on_the_first_members_clip_order():
    first = member(0, {"1_25": (1, 0, 0), "1_50": (0, 1, 0), "1_75": (0, 0, 1)})
    second = member(1, {"1_75": (0, 0, 1), "1_25": (1, 0, 0), "1_50": (0, 1, 0)})
    evaluate_cvs.align_members([first, second])
    assert [r.clip_id for r in second.records] == ["1_25", "1_50", "1_75"]
    assert [r.labels for r in second.records] == [(1, 0, 0), (0, 1, 0), (0, 0, 1)]


def test_members_that_see_other_clips_or_other_labels_are_refused_naming_both():
    first = member(0, {"1_25": (1, 0, 0), "1_50": (0, 1, 0)}, limit_clips=2)
    fewer = member(1, {"1_25": (1, 0, 0)}, limit_clips=1)
    with pytest.raises(ConfigError) as info:
        evaluate_cvs.align_members([first, fewer])
    message = str(info.value)
    assert "members[0] (models:/avlm-cvs/0) and members[1] (models:/avlm-cvs/1) see different clips" in message
    assert "2 vs 1 clips; e.g. 1_50 only in members[0]" in message and "data.limit_clips 2 vs 1" in message
    other = member(1, {"1_25": (1, 0, 0), "1_50": (0, 1, 0), "1_99": (0, 0, 0)})
    with pytest.raises(ConfigError, match="e.g. 1_99 only in members"):
        evaluate_cvs.align_members([first, other])
    relabelled = member(1, {"1_25": (1, 0, 0), "1_50": (1, 1, 0)})
    with pytest.raises(ConfigError, match=r"label 1 of the 2 clips differently \(e.g. 1_50.*set data.label_policy"):
        evaluate_cvs.align_members([first, relabelled])


# -- end to end -----------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_ensemble_of_one_version_reproduces_its_final_evaluation(trained):
    result = evaluate_cvs.main(evaluation("members=[models:/avlm-cvs/1]"))
    first = trained[0]
    assert result.metrics["ensemble/mAP"] == pytest.approx(first.final_metrics["final/val_mAP"], abs=1e-9)
    for c in CVS_CRITERIA:
        assert result.metrics[f"ensemble/AP_{c}"] == pytest.approx(first.final_metrics[f"final/val_AP_{c}"], abs=1e-9)
        assert result.metrics[f"member_0/AP_{c}"] == result.metrics[f"ensemble/AP_{c}"]

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert result.run_id not in {r.run_id for r in trained} and run.info.status == "FINISHED"
    assert run.data.metrics["ensemble/mAP"] == result.metrics["ensemble/mAP"]
    tags = run.data.tags
    assert (tags["recipe"], tags["split"], tags["clips"], tags["dataset"]) == ("evaluate_cvs", "val", "32", "cvs-demo")
    assert tags["ensemble.members"] == "models:/avlm-cvs/1"
    assert (tags["member_0.model"], tags["member_0.version"]) == ("avlm-cvs", "1")
    assert tags["member_0.run_id"] == first.run_id
    # the same clips, labels and (to the CSV's 6 decimals) probabilities as the training's own final evaluation
    rows = read_csv(result.run_id, "predictions/val_predictions.csv")
    training_rows = read_csv(first.run_id, "predictions/val_predictions.csv")
    assert [r["clip_id"] for r in rows] == [r["clip_id"] for r in training_rows]
    np.testing.assert_array_equal(columns(rows, "label_"), columns(training_rows, "label_"))
    np.testing.assert_allclose(columns(rows, "prob_"), columns(training_rows, "prob_"), atol=2e-6)
    np.testing.assert_array_equal(columns(rows, "member_0_prob_"), columns(rows, "prob_"))
    table = mlflow.artifacts.load_text(f"runs:/{result.run_id}/tables/ensemble.md")
    assert f"| 0 | `models:/avlm-cvs/1` | avlm-cvs v1 | `{first.run_id[:8]}` |" in table
    assert f"**{result.metrics['ensemble/mAP']:.4f}**" in table


@pytest.mark.slow
def test_an_ensemble_of_two_runs_is_the_mean_of_their_probabilities(trained, capsys):
    first, second = trained
    members = f"[runs:/{first.run_id},{second.run_id}]"  # both run forms, through the entry point's shortcut
    assert entrypoint.main(["--members", members, "--split", "val", "tracking.system_metrics=false"]) == 0
    given = f"runs:/{first.run_id},{second.run_id}"
    (run,) = [r for r in all_runs(MlflowClient()) if r.data.tags.get("ensemble.members") == given]
    metrics, tags = run.data.metrics, run.data.tags
    assert tags["member_0.uri"] == f"runs:/{first.run_id}" and tags["member_1.uri"] == second.run_id
    assert (tags["member_0.run_id"], tags["member_1.run_id"], tags["member_1.version"]) == (
        first.run_id, second.run_id, "",
    )  # fmt: skip
    assert "ensemble of 2 on val, 32 clips" in capsys.readouterr().out

    # by hand: the two trainings' own validation predictions, averaged, through sklearn's AP
    first_rows = read_csv(first.run_id, "predictions/val_predictions.csv")
    second_rows = read_csv(second.run_id, "predictions/val_predictions.csv")
    assert [r["clip_id"] for r in first_rows] == [r["clip_id"] for r in second_rows]
    labels = columns(first_rows, "label_")
    mean = (columns(first_rows, "prob_") + columns(second_rows, "prob_")) / 2
    by_hand = [average_precision_score(labels[:, k], mean[:, k]) for k in range(len(CVS_CRITERIA))]
    for k, c in enumerate(CVS_CRITERIA):
        assert metrics[f"ensemble/AP_{c}"] == pytest.approx(by_hand[k], abs=1e-9)
    assert metrics["ensemble/mAP"] == pytest.approx(np.mean(by_hand), abs=1e-9)
    assert metrics["member_0/mAP"] == pytest.approx(first.final_metrics["final/val_mAP"], abs=1e-9)
    assert metrics["member_1/mAP"] == pytest.approx(second.final_metrics["final/val_mAP"], abs=1e-9)
    rows = read_csv(run.info.run_id, "predictions/val_predictions.csv")
    np.testing.assert_allclose(columns(rows, "prob_"), mean, atol=2e-6)
