"""Chains against a real MLflow store: the stop rule counted from the store, decisions recorded on the chain run, a
failed rule stopping the chain, resume, promotion, the entry point. In all but the last test the trainings are
stood in for by child runs that log declared metrics (the sweep's own result building, winner choice and evidence
are the real ones); the last (slow) one trains for real."""

import importlib.util
import json
import shlex
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.entities import ViewType

from avlm.errors import ConfigError, TrainingError
from avlm.protocol import chain as chain_module
from avlm.protocol.chain import StopRuleRefused, chain_spec_from_dict, run_chain
from avlm.protocol.spec import resolve_cells, spec_sha256
from avlm.protocol.sweep import build_result
from avlm.tracking.chain_runs import SHA_TAG, STAGE_TAG
from avlm.tracking.children import CELL_TAG, NAME_TAG, SEED_TAG, SPEC_SHA_TAG, SweepRuns

REPO = Path(__file__).resolve().parents[2]

# stage -> cell -> the value every one of its children logs for each metric (plus 0.001 × seed)
GOOD = {"final/test_mAP": 0.70, "best/val/mAP": 0.70, "val/loss": 0.40}
BASE = {"final/test_mAP": 0.60, "best/val/mAP": 0.60, "val/loss": 0.50}
WORSE = {"final/test_mAP": 0.50, "best/val/mAP": 0.50, "val/loss": 0.60}


class FakeSweeps:
    """Stands in for run_sweep: each (cell, seed) without a FINISHED child becomes a FINISHED child run of the stage
    run logging the declared metrics; the result is built by the sweep's own code from the store."""

    def __init__(self, uri, values):
        self.uri, self.values, self.calls, self.created = uri, values, [], 0
        self.fail_once = set()  # (stage, cell, seed) whose next child ends FAILED

    def __call__(self, spec, *, workers, storage, parent_run_id):
        stage = spec.name.rsplit(".", 1)[1]
        self.calls.append((stage, [c.name for c in spec.cell_list()], list(spec.seeds), parent_run_id))
        runs, sha = SweepRuns(self.uri), spec_sha256(spec)
        done = {(c.cell, c.seed) for c in runs.children(parent_run_id, sha) if c.status == "FINISHED"}
        for cell in spec.cell_list():
            for seed in spec.seeds:
                if (cell.name, seed) in done:
                    continue
                tags = {NAME_TAG: spec.name, SPEC_SHA_TAG: sha, CELL_TAG: cell.name, SEED_TAG: str(seed)}
                child = runs.create_child(parent_run_id, run_name=f"{cell.name}-{seed}", tags=tags)
                values = self.values[stage].get(cell.name, self.values[stage].get("*"))
                runs.log_metrics(child, {k: v + 0.001 * seed for k, v in values.items()})
                failing = (stage, cell.name, seed) in self.fail_once
                self.fail_once.discard((stage, cell.name, seed))
                runs.set_status(child, "FAILED" if failing else "FINISHED")
                self.created += 1
        return build_result(spec, sha, parent_run_id, runs.children(parent_run_id, sha), resolve_cells(spec))


def chain_entrypoint():
    """entrypoints/chain.py as a module (entry points are scripts, not a package)."""
    loader = importlib.util.spec_from_file_location("chain_entrypoint", REPO / "entrypoints" / "chain.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    return module


def spec_values(**changes):
    values = {
        "name": "dropout",
        "recipe": "train_cvs",
        "base_config": "examples/cvs/demo.yaml",
        "overrides": {"train.epochs": 1},
        "baseline": {"name": "baseline"},
        "objective": {"metric": "best/val/mAP"},
        "stop_rule": {"push": "p1", "max_ideas": 2},
        "stages": [
            {"name": "val_sweep", "seeds": [0, 1, 2], "grid": {"model.head_dropout": [0.0, 0.3]}},
            {
                "name": "quick_test",
                "seeds": [0, 1, 2],
                "winner": "val_sweep",
                "rule": {
                    "conditions": [
                        {"figure": "delta", "metric": "final/test_mAP", "op": ">=", "threshold": 0.05},
                        {"figure": "not_worse", "metric": "val/loss", "mode": "min"},
                    ]
                },
            },
            {
                "name": "full_test",
                "seeds": [0, 1, 2, 3],
                "winner": "val_sweep",
                "rule": {"conditions": [{"figure": "delta", "metric": "final/test_mAP", "op": ">", "threshold": 0}]},
            },
        ],
    }
    values.update(changes)
    return chain_spec_from_dict(values, "test_chain.yaml")


def all_runs(uri):
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    return client.search_runs(experiments, run_view_type=ViewType.ALL) if experiments else []


def chain_runs_in(uri):
    return [r for r in all_runs(uri) if r.data.tags.get("avlm.chain.role") == "chain"]


def stage_runs_of(uri, chain_run_id):
    return {
        r.data.tags[STAGE_TAG]: r
        for r in all_runs(uri)
        if r.data.tags.get("mlflow.parentRunId") == chain_run_id and r.data.tags.get("avlm.chain.role") == "stage"
    }


def artifact_json(uri, run_id, path):
    local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)
    return json.loads(Path(local).read_text())


@pytest.fixture
def fake_sweeps(mlflow_store, monkeypatch):
    monkeypatch.chdir(REPO)  # base_config is relative to the repository (and so is the sweep's resolution)

    def install(values):
        sweeps = FakeSweeps(mlflow_store, values)
        monkeypatch.setattr(chain_module, "run_sweep", sweeps)
        return sweeps

    return install


STOPS_AT_QUICK = {
    "val_sweep": {"model.head_dropout=0.3": GOOD, "model.head_dropout=0.0": WORSE, "baseline": BASE},
    # the winner is 0.3 (Δ val +0.1); on the test its Δ is only +0.01 < 0.05
    "quick_test": {"model.head_dropout=0.3": {**BASE, "final/test_mAP": 0.61}, "baseline": BASE},
    "full_test": {"*": GOOD},
}
PASSES = {
    "val_sweep": STOPS_AT_QUICK["val_sweep"],
    "quick_test": {"model.head_dropout=0.3": GOOD, "baseline": BASE},
    "full_test": {"model.head_dropout=0.3": GOOD, "baseline": BASE},
}


def test_a_failed_rule_stops_the_chain_records_every_decision_and_later_stages_never_start(fake_sweeps, mlflow_store):
    sweeps = fake_sweeps(STOPS_AT_QUICK)
    spec = spec_values()
    result = run_chain(spec)
    assert result.outcome == "stopped" and result.stopped_at == "quick_test" and result.not_run == ["full_test"]
    assert [call[0] for call in sweeps.calls] == ["val_sweep", "quick_test"]  # the full test's sweep never ran
    # the quick test ran the val sweep's winner against the baseline, on its own seeds
    assert sweeps.calls[1][1:3] == (["model.head_dropout=0.3", "baseline"], [0, 1, 2])

    (chain_run,) = chain_runs_in(mlflow_store)
    tags, metrics = chain_run.data.tags, chain_run.data.metrics
    assert chain_run.info.run_id == result.run_id and chain_run.info.status == "FINISHED"
    assert tags["avlm.chain.outcome"] == "stopped" and tags["avlm.chain.stopped_at"] == "quick_test"
    assert tags["avlm.chain.push"] == "p1" and tags[SHA_TAG] == result.chain_sha256
    assert tags["chain/val_sweep/decision"] == "passed" and metrics["chain/val_sweep/decision"] == 1.0
    assert tags["chain/val_sweep/candidate"] == "model.head_dropout=0.3"
    assert tags["chain/quick_test/decision"] == "failed" and metrics["chain/quick_test/decision"] == 0.0
    assert "mean Δ final/test_mAP >= 0.05" in tags["chain/quick_test/reason"]
    assert metrics["chain/quick_test/condition_0"] == pytest.approx(0.01)
    assert tags["chain/quick_test/condition_1"].startswith("val/loss not worse than baseline (min, tolerance 0): pass")
    assert tags["chain/full_test/decision"] == "not run" and "chain/full_test/decision" not in metrics

    stages = stage_runs_of(mlflow_store, result.run_id)
    assert sorted(stages) == ["quick_test", "val_sweep"]  # no full_test run exists
    assert all(s.info.status == "FINISHED" for s in stages.values())
    assert stages["quick_test"].data.tags["avlm.chain.decision"] == "failed"
    assert stages["quick_test"].data.tags["avlm.chain.rule_sha256"] == result.decisions[1].outcome.rule_sha256
    assert not [r for r in all_runs(mlflow_store) if r.data.tags.get(NAME_TAG) == "dropout.full_test"]

    decision = artifact_json(mlflow_store, result.run_id, "chain/quick_test/decision.json")
    assert decision == json.loads(json.dumps(result.decisions[1].to_dict()))
    assert decision["outcome"]["conditions"][0]["seeds"] == ["0", "1", "2"]
    assert len(decision["evidence"]["candidate_run_ids"]) == 3
    assert decision["stage_run_id"] == stages["quick_test"].info.run_id
    frozen = artifact_json(mlflow_store, result.run_id, "chain_spec.json")
    assert frozen["chain_sha256"] == result.chain_sha256 and frozen["spec"]["stages"][2]["name"] == "full_test"
    assert "STOPPED at quick_test" in result.verdict() and "not run: full_test" in result.verdict()


def test_a_chain_that_passes_every_stage_resumes_without_new_runs_and_promotes_once(fake_sweeps, mlflow_store):
    sweeps = fake_sweeps(PASSES)
    spec = spec_values(promote={"model": "avlm-cvs-chain"})
    result = run_chain(spec)
    assert result.outcome == "passed" and [d.passed for d in result.decisions] == [True, True, True]
    assert [c[0] for c in sweeps.calls] == ["val_sweep", "quick_test", "full_test"]
    assert sweeps.created == 3 * 3 + 2 * 3 + 2 * 4
    assert result.registered_version == "1" and result.promoted
    client = MlflowClient(mlflow_store)
    champion = client.get_model_version_by_alias("avlm-cvs-chain", "champion")
    full_children = result.decisions[2].evidence.candidate_run_ids
    assert str(champion.version) == "1" and champion.run_id == full_children[0]
    assert champion.tags["avlm.chain.run_id"] == result.run_id
    assert "PASSED" in result.verdict() and "registered version 1, promoted to champion" in result.verdict()

    again = run_chain(spec)  # the same idea: the same chain run, the same stage runs, no new child, no new version
    assert again.run_id == result.run_id and again.resumed and again.outcome == "passed"
    assert sweeps.created == 23 and len(chain_runs_in(mlflow_store)) == 1
    assert sorted(stage_runs_of(mlflow_store, result.run_id)) == ["full_test", "quick_test", "val_sweep"]
    assert [str(v.version) for v in client.search_model_versions("name='avlm-cvs-chain'")] == ["1"]
    assert [call[3] for call in sweeps.calls[3:]] == [call[3] for call in sweeps.calls[:3]]


def test_a_rerun_of_a_stopped_chain_decides_again_from_the_runs_it_kept(fake_sweeps, mlflow_store):
    sweeps = fake_sweeps(STOPS_AT_QUICK)
    spec = spec_values()
    first = run_chain(spec)
    sweeps.values = PASSES  # what the store holds decides again: the quick test's children are kept as they were
    again = run_chain(spec)
    assert again.run_id == first.run_id and again.stopped_at == "quick_test"
    (chain_run,) = chain_runs_in(mlflow_store)
    assert chain_run.data.tags["avlm.chain.stopped_at"] == "quick_test" and sweeps.created == 15


def test_the_stop_rule_counts_ideas_from_the_store_and_refuses_before_any_run_is_created(fake_sweeps, mlflow_store):
    fake_sweeps(STOPS_AT_QUICK)
    first = run_chain(spec_values())
    run_chain(spec_values())  # a re-run of idea 1: allowed, and still one idea
    second = run_chain(spec_values(name="dropout-v2"))
    assert first.chain_sha256 != second.chain_sha256
    other_push = run_chain(spec_values(name="lr", stop_rule={"push": "p2", "max_ideas": 1}))
    before = {r.info.run_id for r in all_runs(mlflow_store)}

    with pytest.raises(StopRuleRefused) as refused:
        run_chain(spec_values(name="dropout-v3"))
    message = str(refused.value)
    assert "push 'p1' may try 2 ideas and has tried 2" in message
    assert first.run_id in message and second.run_id in message and other_push.run_id not in message
    assert {r.info.run_id for r in all_runs(mlflow_store)} == before  # no run was created

    # deleting a chain run does not give its idea back
    MlflowClient(mlflow_store).delete_run(second.run_id)
    with pytest.raises(StopRuleRefused, match="deleted"):
        run_chain(spec_values(name="dropout-v3"))
    run_chain(spec_values(name="dropout"))  # idea 1 again: still allowed
    # raising the cap is written in the spec, and does not make an idea new
    raised = run_chain(spec_values(name="dropout-v3", stop_rule={"push": "p1", "max_ideas": 3}))
    assert raised.outcome == "stopped"
    assert run_chain(spec_values(stop_rule={"push": "p1", "max_ideas": 3})).run_id == first.run_id


def test_a_bad_stage_config_key_fails_before_any_run_is_created(fake_sweeps, mlflow_store):
    sweeps = fake_sweeps(PASSES)
    spec = spec_values()
    spec.stages[2].overrides = {"train.epochz": 3}  # in the last stage: found before the first stage runs
    with pytest.raises(ConfigError, match="unknown config key 'train.epochz'") as raised:
        run_chain(spec)
    assert "stage 'full_test'" in str(raised.value) and all_runs(mlflow_store) == [] and sweeps.calls == []


def test_under_mlflow_run_the_launchers_run_is_the_chain_run_and_a_rerun_points_at_it(
    fake_sweeps, mlflow_store, monkeypatch
):
    fake_sweeps(STOPS_AT_QUICK)
    client = MlflowClient(mlflow_store)
    experiment = client.create_experiment("avlm-cvs")
    launcher = client.create_run(experiment, run_name="mlflow-run-1").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", launcher)
    first = run_chain(spec_values())
    assert first.run_id == launcher and client.get_run(launcher).info.run_name == "dropout"
    assert "avlm.sweep.role" not in client.get_run(launcher).data.tags  # the sweeps did not take it as theirs
    assert set(stage_runs_of(mlflow_store, launcher)) == {"val_sweep", "quick_test"}

    relaunch = client.create_run(experiment, run_name="mlflow-run-2").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", relaunch)
    again = run_chain(spec_values())
    assert again.run_id == launcher and again.resumed
    tags = client.get_run(relaunch).data.tags
    assert tags["avlm.chain.resumed_into"] == launcher and "avlm.chain.role" not in tags  # it is no idea of its own


def test_a_stage_with_a_failed_training_cannot_be_decided_and_a_rerun_retries_it(fake_sweeps, mlflow_store):
    sweeps = fake_sweeps(PASSES)
    sweeps.fail_once.add(("quick_test", "baseline", 1))
    with pytest.raises(TrainingError, match="'quick_test' cannot be decided: 1 run.*baseline seed 1 .FAILED."):
        run_chain(spec_values())
    (chain_run,) = chain_runs_in(mlflow_store)
    assert chain_run.info.status == "FAILED" and chain_run.data.tags["avlm.chain.outcome"] == "failed"
    stages = stage_runs_of(mlflow_store, chain_run.info.run_id)
    assert stages["quick_test"].info.status == "FAILED" and stages["val_sweep"].info.status == "FINISHED"
    assert "chain/quick_test/decision" not in chain_run.data.tags
    # the same chain again: the failed child runs again, the rest is kept, and the chain goes on
    again = run_chain(spec_values())
    assert again.run_id == chain_run.info.run_id and again.outcome == "passed" and sweeps.created == 15 + 1 + 8


def test_the_entry_point_prints_the_verdict_and_refuses_past_the_cap_with_exit_status_2(
    fake_sweeps, mlflow_store, tmp_path, capsys
):
    entrypoint = chain_entrypoint()
    fake_sweeps(STOPS_AT_QUICK)
    path = tmp_path / "chain.yaml"
    values = yaml.safe_load((REPO / "examples/chains/cvs_demo.yaml").read_text())
    values["stop_rule"]["max_ideas"] = 1
    values["experiment"] = "avlm-chains"
    values["stages"][1]["rule"]["conditions"][0]["threshold"] = 0.5
    path.write_text(yaml.safe_dump(values))
    assert entrypoint.main(["--spec", str(path), "--workers", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].startswith("chain cvs-demo-head-dropout: STOPPED at quick_test (candidate model.head_dropout=0.3)")
    assert "not run: full_test [run " in out[1] and out[2].startswith("Browse it: mlflow ui --backend-store-uri")

    values["stages"][0]["seeds"] = [0, 1]  # another idea of the same push, past its cap of 1
    path.write_text(yaml.safe_dump(values))
    runs_before = len(all_runs(mlflow_store))
    assert entrypoint.main(["--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("chain: error: stop rule: push 'cvs-demo-dropout' may try 1 idea and has tried 1")
    assert len(all_runs(mlflow_store)) == runs_before


def test_the_mlproject_entry_point_reaches_the_chain_parser():
    from mlflow.projects._project_spec import load_project

    entry = load_project(str(REPO)).get_entry_point("chain")
    assert set(entry.parameters) == {"spec", "workers", "storage"}
    assert entry.parameters["spec"].default == "examples/chains/cvs_demo.yaml"
    samples = {"spec": "my chain.yaml", "workers": "2.0", "storage": "postgresql://db/optuna"}
    argv = shlex.split(entry.compute_command(samples, storage_dir=None))
    assert argv[:2] == ["python", "entrypoints/chain.py"]
    module = chain_entrypoint()
    args = module.build_parser().parse_args(argv[2:])
    assert (args.spec, args.workers, args.storage) == ("my chain.yaml", 2, "postgresql://db/optuna")
    defaults = shlex.split(entry.compute_command({}, storage_dir=None))
    assert module.build_parser().parse_args(defaults[2:]).workers == 1


# THE chain test, with real trainings: two tiny CVS demo trainings (1 epoch, a small head, 64 clips per split). The
# quick stage runs one candidate and the baseline on seed 0 under a rule no run can pass (Δ mAP >= 10), so the
# chain stops there; the full stage's run, sweep and children never exist. Through the entry point, as users run it.
@pytest.mark.slow
def test_a_chain_whose_quick_stage_fails_never_starts_its_full_stage(tmp_path, mlflow_store, capsys):
    spec = {
        "name": "e2e-dropout",
        "recipe": "train_cvs",
        "base_config": "examples/cvs/demo.yaml",
        "experiment": "avlm-chain-e2e",
        "overrides": {
            "train.epochs": 1,
            "data.limit_clips": 64,
            "data.entropy_clips": 4,
            "model.head_hidden": 32,
            "model.head_queries": 2,
            "model.head_heads": 2,
            "tracking.system_metrics": False,
            "output_dir": str(tmp_path / "outputs"),
        },
        "objective": {"metric": "final/test_mAP"},
        "stop_rule": {"push": "e2e", "max_ideas": 1},
        "stages": [
            {
                "name": "quick_test",
                "seeds": [0],
                "cells": [{"name": "dropout", "overrides": {"model.head_dropout": 0.3}}],
                "rule": {"conditions": [{"figure": "delta", "metric": "final/test_mAP", "op": ">=", "threshold": 10}]},
            },
            {
                "name": "full_test",
                "seeds": [0, 1],
                "winner": "quick_test",
                "rule": {"conditions": [{"figure": "delta", "metric": "final/test_mAP", "op": ">", "threshold": 0.0}]},
            },
        ],
    }
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(spec))

    assert chain_entrypoint().main(["--spec", str(path), "--workers", "2"]) == 0  # a verdict, not an error
    out = capsys.readouterr().out
    assert "chain e2e-dropout: STOPPED at quick_test (candidate dropout)" in out and "not run: full_test" in out

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("avlm-chain-e2e")
    runs = client.search_runs([experiment.experiment_id])
    (chain,) = [r for r in runs if r.data.tags.get("avlm.chain.role") == "chain"]
    stages = [r for r in runs if r.data.tags.get("avlm.chain.role") == "stage"]
    assert chain.info.status == "FINISHED" and chain.data.tags["avlm.chain.stopped_at"] == "quick_test"
    assert chain.data.tags["avlm.chain.outcome"] == "stopped" and chain.data.metrics["chain/quick_test/decision"] == 0
    assert "is not >= 10 (n=1)" in chain.data.tags["chain/quick_test/reason"]
    assert [s.data.tags["avlm.chain.stage"] for s in stages] == ["quick_test"]  # no full_test stage run exists
    (quick,) = stages
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == quick.info.run_id]
    assert sorted(c.data.tags["avlm.sweep.cell"] for c in children) == ["baseline", "dropout"]
    assert all(c.info.status == "FINISHED" and "final/test_mAP" in c.data.metrics for c in children)
    # every run is the chain, its one stage, or that stage's two trainings: nothing of the full stage
    assert len(runs) == 4 and not [r for r in runs if "full_test" in r.data.tags.get("avlm.sweep.name", "")]
    # the same idea again is allowed past its push's cap of 1, and trains nothing new
    assert chain_entrypoint().main(["--spec", str(path)]) == 0
    assert len(client.search_runs([experiment.experiment_id])) == 4
