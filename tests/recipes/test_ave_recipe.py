"""train_ave end to end on the built-in demo: what one run records, the paired oracle/random comparison over seeds,
and the study's chain through the `ave` entry point (diagnose on every stage, a claim registered as `claimed`)."""

import importlib.util
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from avlm.ave.diagnose import read_outcomes
from avlm.recipes import ave
from avlm.stats import paired_test

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "ave" / "demo.yaml"
FAST = ["tracking.system_metrics=false"]
TOKENS = {56: 49, 80: 100, 112: 196, 176: 484}  # patch 8: (r / 8)²


def run(*overrides):
    return ave.main(ave.load_ave_config(DEMO, [*FAST, *overrides]))


def entrypoint(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def artifact(run_id, path):
    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path))


def test_an_anchored_run_spends_the_uniform_budget_and_records_scores_plans_and_predictions(mlflow_store):
    result = run("allocation.method=anchored", "eventness.method=audio_energy", "eval.test=true", "train.epochs=3")
    mlflow_run = MlflowClient().get_run(result.run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "ave-anchored_k2-audio_energy-seed0"
    tags, metrics = mlflow_run.data.tags, mlflow_run.data.metrics
    assert (tags["recipe"], tags["dataset"], tags["allocation"], tags["eventness"]) == (
        "ave", "ave-demo", "anchored", "audio_energy",
    )  # fmt: skip
    assert tags["token_budget"] == "1960" and metrics["alloc/tokens_per_clip"] == 1960
    assert tags["data.cross_split_ids"] == "0 (keep)"  # the demo's splits share no video
    for split in ("val", "test"):
        clips = read_outcomes(artifact(result.run_id, f"predictions/{split}.json"))
        assert len(clips) == 48
        # every clip's plan costs exactly the uniform budget, and the logged accuracy is the predictions'
        assert {sum(TOKENS[r] for r in clip.resolutions) for clip in clips.values()} == {1960}
        labels = np.array([clip.labels for clip in clips.values()])
        predictions = np.array([clip.predictions for clip in clips.values()])
        assert metrics[f"final/{split}_accuracy"] == pytest.approx((labels == predictions).mean())
        fallen = np.mean([clip.fallback for clip in clips.values()])
        assert metrics[f"alloc/{split}_fallback_frac"] == pytest.approx(fallen)
        anchored = [clip for clip in clips.values() if not clip.fallback]
        assert anchored and all(len(clip.anchors) == 2 and 176 in clip.resolutions for clip in anchored)
        # audio energy finds the demo's events: anchors sit on event seconds far more often than chance (~0.35)
        assert metrics[f"alloc/{split}_anchor_precision"] > 0.8
    scores = json.loads(artifact(result.run_id, "eventness/eventness_scores.json").read_text())
    assert len(scores) == 160 + 48 + 48 and all(len(v) == 10 for v in scores.values())
    listed = {a.path for a in MlflowClient().list_artifacts(result.run_id, "plots")}
    assert {"plots/eventness_examples.png", "plots/training_curves.png"} <= listed
    assert any(a.path == "checkpoints/best" for a in MlflowClient().list_artifacts(result.run_id, "checkpoints"))


def test_avlm_ave_diagnose_pairs_runs_and_its_delta_is_the_runs_accuracy_difference(tmp_path, mlflow_store, capsys):
    from avlm.__main__ import main

    anchored = run("allocation.method=anchored", "eventness.method=oracle", "train.epochs=2", "seed=1")
    uniform = run("allocation.method=uniform", "train.epochs=2", "seed=1")
    out = tmp_path / "diag"
    argv = ["ave", "diagnose", "--candidate", anchored.run_id, "--baseline", uniform.run_id, "--split", "val"]
    assert main([*argv, "--out", str(out)]) == 0
    report = json.loads((out / "diagnose.json").read_text())
    delta = anchored.final_metrics["final/val_accuracy"] - uniform.final_metrics["final/val_accuracy"]
    assert report["accuracy"]["delta"] == pytest.approx(delta) and report["split"] == "val"
    assert report["anchors"]["precision"] == pytest.approx(anchored.final_metrics["alloc/val_anchor_precision"])
    assert report["fallback"]["frac"] == 0.0  # the oracle's scores are never flat on the demo (one event per clip)
    assert "## Harmful buckets" in (out / "diagnose.md").read_text()
    assert f"Δ {delta:+.4f}" in capsys.readouterr().out
    # a split the runs were not evaluated on: a clear error, exit 2
    assert main([*argv[:-1], "test", "--out", str(out)]) == 2


def test_a_budget_the_resolutions_cannot_pay_is_refused_before_any_run(mlflow_store):
    from avlm.errors import ConfigError

    with pytest.raises(ConfigError, match="allocation.low_resolutions"):
        run("allocation.method=anchored", "allocation.low_resolutions=[56]", "allocation.adjacent=1")
    assert MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()]) == []


# THE comparison the study makes, paired by seed: anchoring on the oracle's event seconds beats spending the same
# budget uniformly (one-sided paired t-test over 5 seeds), while anchoring on random seconds gains nothing.
@pytest.mark.slow
def test_the_oracle_beats_uniform_over_seeds_and_a_random_scorer_does_not(mlflow_store):
    seeds = range(5)
    accuracy = {
        arm: [run(*overrides, f"seed={seed}").final_metrics["final/val_accuracy"] for seed in seeds]
        for arm, overrides in {
            "uniform": ["allocation.method=uniform"],
            "oracle": ["allocation.method=anchored", "eventness.method=oracle"],
            "random": ["allocation.method=anchored", "eventness.method=random"],
        }.items()
    }
    oracle = paired_test(accuracy["oracle"], accuracy["uniform"], "ttest", "greater")
    random = paired_test(accuracy["random"], accuracy["uniform"], "ttest", "greater")
    assert np.mean(accuracy["oracle"]) - np.mean(accuracy["uniform"]) > 0.02 and oracle.p_value < 0.05, accuracy
    assert random.p_value >= 0.05, accuracy


# The chain through the entry point users run: the oracle passes val → quick → full on tiny seed sets and is
# registered with alias `claimed`; every stage carries its diagnose and figures; a second idea whose quick test
# fails stops there and registers nothing. 14 trainings in subprocesses, 2 at a time.
@pytest.mark.slow
def test_the_ave_chain_claims_the_oracle_with_its_evidence_and_stops_a_failing_idea_at_quick(tmp_path, mlflow_store):
    def spec(name, eventness, quick_threshold, val_sweep=True):
        values = yaml.safe_load((REPO / "examples" / "ave" / "demo_chain.yaml").read_text())
        values.update(name=name, experiment="avlm-ave-test", stop_rule={"push": "ave-test", "max_ideas": 2})
        values["overrides"] = {"eventness.method": eventness, "tracking.system_metrics": False,
                               "output_dir": str(tmp_path / "outputs")}  # fmt: skip
        val, quick, full = values["stages"]
        candidate = [{"name": "anchored_k2", "overrides": {"allocation.method": "anchored"}}]
        val.update(seeds=[0], cells=candidate)
        quick.update(seeds=[0, 1] if val_sweep else [0])
        quick["rule"]["conditions"][0]["threshold"] = quick_threshold
        del quick["rule"]["conditions"][1]  # no p-value on two seeds
        full.update(seeds=[0, 1, 2], winner=quick["winner"] if val_sweep else "quick_test")
        full["rule"]["conditions"] = [full["rule"]["conditions"][0]]
        if not val_sweep:  # the quick test runs the candidate itself
            del quick["winner"]
            quick["cells"] = candidate
            values["stages"] = [quick, full]
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def chain_run(client, experiment, name):
        (found,) = [
            r
            for r in client.search_runs([experiment.experiment_id])
            if r.data.tags.get("avlm.chain.name") == name and r.data.tags.get("avlm.chain.role") == "chain"
        ]
        return found

    main = entrypoint("ave").main
    assert main(["--spec", str(spec("oracle", "oracle", 0.018)), "--workers", "2"]) == 0
    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("avlm-ave-test")
    chain = chain_run(client, experiment, "oracle")
    assert chain.data.tags["avlm.chain.outcome"] == "passed", chain.data.tags
    version = client.get_model_version_by_alias("avlm-ave", "claimed")
    assert client.get_model_version_by_alias("avlm-ave", "champion").version == version.version
    assert version.tags["avlm.chain.run_id"] == chain.info.run_id
    files = {a.path for a in client.list_artifacts(chain.info.run_id, "chain/full_test")}
    expected = {"diagnose.json", "diagnose.md", "delta_per_seed.png", "fallback_per_candidate.png", "decision.json"}
    assert {f"chain/full_test/{name}" for name in expected} <= files
    report = json.loads(artifact(chain.info.run_id, "chain/full_test/diagnose.json").read_text())
    assert report["split"] == "test" and report["seeds"] == [0, 1, 2] and report["accuracy"]["delta"] > 0.02
    assert report["anchors"]["precision"] > 0.9  # the oracle's anchors are event seconds

    assert main(["--spec", str(spec("impossible", "random", 10.0, val_sweep=False)), "--workers", "2"]) == 0
    stopped = chain_run(client, experiment, "impossible")
    assert stopped.data.tags["avlm.chain.stopped_at"] == "quick_test"
    assert stopped.data.tags["chain/full_test/decision"] == "not run"
    assert len(client.search_model_versions("name='avlm-ave'")) == 1  # nothing registered for the stopped idea
