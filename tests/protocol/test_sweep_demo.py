"""THE demo sweep, as a user runs it (entrypoints/sweep.py on examples/sweeps/cvs_demo.yaml, real CVS trainings):
2 cells × 2 seeds with 2 workers make 1 parent and 4 nested children, a summary and a best config; a re-run adds
no run. (Failed, interrupted and concurrent children: test_sweep_engine.py, with a stand-in recipe.)"""

import importlib.util
import json

import mlflow
import pytest
from mlflow import MlflowClient

from avlm.config import config_to_dict
from avlm.protocol.spec import REPO_ROOT, load_sweep_spec, override_args, spec_yaml
from avlm.recipes.cvs import load_cvs_config

SPEC = REPO_ROOT / "examples" / "sweeps" / "cvs_demo.yaml"


def sweep_entrypoint():
    spec = importlib.util.spec_from_file_location("sweep_entrypoint", REPO_ROOT / "entrypoints" / "sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def runs_in(uri):
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def artifact_text(uri, run_id, path):
    with open(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=uri)) as f:
        return f.read()


@pytest.mark.slow
def test_demo_sweep_makes_one_parent_four_children_a_summary_and_a_rerun_adds_nothing(mlflow_store, capsys):
    main = sweep_entrypoint()
    assert main(["--spec", str(SPEC), "--workers", "2"]) == 0
    runs = runs_in(mlflow_store)
    (parent,) = [r for r in runs if r.data.tags.get("avlm.sweep.role") == "parent"]
    children = [r for r in runs if r.data.tags.get("avlm.sweep.role") == "child"]
    assert len(runs) == 5 and len(children) == 4
    pid = parent.info.run_id
    cells = ["train.lr=0.001", "train.lr=0.003"]
    assert sorted((c.data.tags["avlm.sweep.cell"], c.data.tags["avlm.sweep.seed"]) for c in children) == [
        (cell, seed) for cell in cells for seed in ("0", "1")
    ]
    for child in children:  # normal recipe runs, nested under the parent, registration off
        assert child.info.status == "FINISHED" and child.data.tags["mlflow.parentRunId"] == pid
        assert child.data.params["cfg.seed"] == child.data.tags["avlm.sweep.seed"]
        assert child.data.params["cfg.train.lr"] == child.data.tags["avlm.sweep.cell"].split("=")[1]
        assert child.data.params["cfg.registry.register"] == "False" and "best/val/mAP" in child.data.metrics
    assert MlflowClient(mlflow_store).search_registered_models() == []
    starts_ends = sorted((c.info.start_time, c.info.end_time) for c in children)
    assert any(s2 < e1 for (_, e1), (s2, _) in zip(starts_ends, starts_ends[1:], strict=False))  # 2 at once

    spec = load_sweep_spec(SPEC)
    assert artifact_text(mlflow_store, pid, "sweep/spec.yaml") == spec_yaml(spec)
    assert parent.info.status == "FINISHED" and len(parent.data.tags["avlm.sweep.spec_sha256"]) == 64
    summary = json.loads(artifact_text(mlflow_store, pid, "sweep_summary.json"))
    winner = parent.data.tags["avlm.sweep.winner"]
    assert summary["winner"] == winner in cells and summary["complete"] and summary["failed"] == []
    means = {c["name"]: c["mean"] for c in summary["cells"]}
    assert means[winner] == max(means.values())
    by_run = {c.info.run_id: c for c in children}
    for cell in summary["cells"]:
        assert cell["n"] == 2 and {by_run[r].data.tags["avlm.sweep.cell"] for r in cell["run_ids"].values()} == {
            cell["name"]
        }
        assert {by_run[r].data.tags["avlm.sweep.is_winner"] for r in cell["run_ids"].values()} == {
            "true" if cell["name"] == winner else "false"
        }
    markdown = artifact_text(mlflow_store, pid, "sweep_summary.md")
    assert f"| {winner} | `{winner}` |" in markdown and "**winner**" in markdown
    best = json.loads(artifact_text(mlflow_store, pid, "best_config.json"))
    assert best == config_to_dict(load_cvs_config(spec.base_config_path(), override_args(spec.cell_overrides(winner))))
    assert best["train"]["lr"] == float(winner.split("=")[1]) and best["train"]["epochs"] == 2
    assert best["model"]["backbone"] == "vjepa2-tiny" and best["data"]["limit_clips"] == 128  # base + overrides
    assert f"Winner: {winner}" in capsys.readouterr().out

    # a re-run adds nothing
    assert main(["--spec", str(SPEC), "--workers", "2"]) == 0
    assert len(runs_in(mlflow_store)) == 5
