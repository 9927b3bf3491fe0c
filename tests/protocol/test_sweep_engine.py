"""The sweep engine with a stand-in recipe (a subprocess that attaches to its child run and logs a metric in a
second): each (cell, seed) runs exactly once however many workers and processes pull from the study, a re-run
adds no run, a failed child is retried by the next invocation only, an interrupted one is queued again and a
resumed sweep takes it; sqlite pops of queued trials are atomic. The real recipe runs in test_sweep_demo.py."""

import contextlib
import os
import signal
import sys
import tempfile
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow import MlflowClient

from avlm.errors import RunInterrupted
from avlm.protocol import sweep
from avlm.protocol.sweep import open_storage, run_sweep, sweep_spec_from_dict

# A stand-in for entrypoints/<recipe>.py: the metric is 10 × lr + seed / 100; data.data_dir picks a behaviour.
FAKE_RECIPE = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from mlflow import MlflowClient

    args = dict(a.split("=", 1) for a in sys.argv[1:])
    print("fake recipe", args, flush=True)
    behaviour = args.get("data.data_dir", "")
    if behaviour == "/crash" or (behaviour == "/sleep" and Path("fail-sleeper").exists()):
        print("error: data: no such folder", flush=True)
        sys.exit(2)  # before its run opens, as a recipe refusing bad data does
    while behaviour == "/sleep" and Path("hold").exists():
        time.sleep(0.2)  # until the test lets it go (or SIGTERM ends it)
    client, run_id = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]), os.environ["MLFLOW_RUN_ID"]
    run = client.get_run(run_id)
    assert os.environ["MLFLOW_EXPERIMENT_ID"] == run.info.experiment_id
    parent = run.data.tags["mlflow.parentRunId"]  # the spec is frozen in it before any child starts
    assert "avlm.sweep.spec_sha256" in client.get_run(parent).data.tags, "spec not frozen"
    assert "sweep/spec.yaml" in [a.path for a in client.list_artifacts(parent, "sweep")], "spec not frozen"
    if behaviour == "/fail-run":
        client.set_terminated(run_id, "FAILED")  # a recipe that fails inside its run
        sys.exit(2)
    client.log_metric(run_id, "best/val/mAP", 10 * float(args.get("train.lr", "0.005")) + int(args["seed"]) / 100)
    client.log_metric(run_id, "time/epoch_s", 1.0)
    client.set_terminated(run_id, "FINISHED")
    """
)


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    """Children run the stand-in recipe with the cell's overrides and the seed."""
    script = tmp_path / "fake_recipe.py"
    script.write_text(FAKE_RECIPE)

    def command(self, cell, seed, run_name):
        return [sys.executable, str(script), *self.resolved[cell].args, f"seed={seed}"]

    monkeypatch.setattr(sweep._Sweep, "_child_command", command)
    return script


def make_spec(cells, seeds=(0, 1), name="engine"):
    return sweep_spec_from_dict(
        {
            "name": name,
            "recipe": "train_cvs",
            "base_config": "examples/cvs/demo.yaml",
            "cells": [{"name": n, "overrides": o} for n, o in cells],
            "seeds": list(seeds),
            "objective": {"metric": "best/val/mAP"},
        }
    )


def children_of(uri, result):
    client = MlflowClient(uri)
    experiment = client.get_run(result.parent_run_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'"
    return client.search_runs([experiment], query, order_by=["attributes.start_time ASC"])


def all_runs(uri):
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def points(runs, status=None):
    return Counter(
        (r.data.tags["avlm.sweep.cell"], int(r.data.tags["avlm.sweep.seed"]))
        for r in runs
        if r.data.tags.get("avlm.sweep.role") == "child" and (status is None or r.info.status == status)
    )


def attempts(tmp_path):
    """attempt-<k> -> its trials, less the duplicates (a worker that asked while every grid point was taken gets a
    point held by an earlier trial, and its trial ends PRUNED without running anything)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    names = [n for n in optuna.get_all_study_names(storage) if ":attempt-" in n]
    return {
        name.rsplit(":", 1)[1]: [
            t
            for t in optuna.load_study(study_name=name, storage=storage).trials
            if t.user_attrs.get("avlm.outcome") != "duplicate"
        ]
        for name in sorted(names)
    }


GRID = [("lr1", {"train.lr": 0.01}), ("lr2", {"train.lr": 0.02})]


def test_each_cell_seed_runs_once_and_a_rerun_adds_nothing(tmp_path, mlflow_store, fake_recipe):
    spec = make_spec(GRID)
    result = run_sweep(spec, workers=3)
    children = children_of(mlflow_store, result)
    assert points(children, "FINISHED") == Counter({(c, s): 1 for c, _ in GRID for s in (0, 1)})
    assert result.winner == "lr2" and result.complete and result.summarized
    assert result.cell("lr2").values == {0: pytest.approx(0.2), 1: pytest.approx(0.21)}
    client = MlflowClient(mlflow_store)
    parent = client.get_run(result.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["avlm.sweep.winner"] == "lr2"
    assert parent.info.experiment_id == client.get_experiment_by_name("avlm-sweep-engine").experiment_id
    for child in children:  # each child's output was kept and uploaded for diagnosis
        logs = [a.path for a in MlflowClient(mlflow_store).list_artifacts(child.info.run_id, "logs")]
        assert len(logs) == 1 and logs[0].endswith(".log")
    assert (tmp_path / "optuna.db").is_file()  # beside the MLflow store by default
    (attempt,) = attempts(tmp_path).values()
    assert sorted(t.state.name for t in attempt) == ["COMPLETE"] * 4

    again = run_sweep(spec, workers=3)
    assert len(all_runs(mlflow_store)) == 5 and again.parent_run_id == result.parent_run_id
    assert again.winner == "lr2" and len(attempts(tmp_path)) == 1  # nothing to do: no new attempt

    # MLflow is what counts: a child marked FAILED by hand is run again by the next re-run, and only that one
    marked = result.runs["lr1"][1].run_id
    client.set_terminated(marked, "FAILED")
    retried = run_sweep(spec, workers=3)
    assert len(all_runs(mlflow_store)) == 6 and retried.runs["lr1"][1].run_id != marked
    assert points(children_of(mlflow_store, retried), "FINISHED") == points(children, "FINISHED")
    outcomes = Counter(t.user_attrs["avlm.outcome"] for t in attempts(tmp_path)["attempt-1"])
    assert outcomes == Counter({"reused": 3, "ran": 1})


@contextlib.contextmanager
def optuna_storage(kind):
    """ "" (the default: sqlite beside the MLflow store), or a database on a PostgreSQL server of its own."""
    if kind == "sqlite":
        yield ""
        return
    sys.path.insert(0, str(Path(__file__).parents[1] / "tracking"))
    from postgres import running_postgres  # the registry tests' server (pgserver's binaries, a unix socket)

    # not under pytest's basetemp, which is private to this user (see tests/tracking/postgres.py)
    with tempfile.TemporaryDirectory(prefix="avlm-sweep-pg-") as base, running_postgres(Path(base) / "data") as server:
        yield server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)


@pytest.mark.slow
@pytest.mark.parametrize("storage_kind", ["sqlite", "postgresql"])
def test_two_processes_on_one_storage_share_the_parent_and_the_grid(storage_kind, mlflow_store, fake_recipe):
    """Two sweep processes (here: threads, each with its own storage connection and MLflow client) start the same
    spec at once, as the same command on two machines does (one tracking store, one Optuna storage)."""
    spec = make_spec(GRID)
    results, errors = [], []
    storage = contextlib.ExitStack()
    url = storage.enter_context(optuna_storage(storage_kind))

    def one_process():
        try:
            results.append(run_sweep(spec, workers=2, storage=url))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one_process) for _ in range(2)]
    with storage:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert not errors
    assert results[0].parent_run_id == results[1].parent_run_id
    parents = [r for r in all_runs(mlflow_store) if r.data.tags.get("avlm.sweep.role") == "parent"]
    assert len(parents) == 1
    assert points(children_of(mlflow_store, results[0])) == Counter({(c, s): 1 for c, _ in GRID for s in (0, 1)})
    assert any(r.summarized for r in results)  # the last one to finish wrote the summary
    assert MlflowClient(mlflow_store).get_run(parents[0].info.run_id).data.tags["avlm.sweep.winner"] == "lr2"


def test_a_failed_child_is_retried_by_the_next_invocation_only(tmp_path, mlflow_store, fake_recipe):
    spec = make_spec([("good", {"train.lr": 0.01}), ("crash", {"data.data_dir": "/crash"})], seeds=(0,))
    result = run_sweep(spec, workers=2)
    assert [(cell, seed, child.status) for cell, seed, child in result.failed()] == [("crash", 0, "FAILED")]
    assert result.winner == "good" and not result.complete
    crashed = result.runs["crash"][0]
    log = mlflow.artifacts.download_artifacts(run_id=crashed.run_id, artifact_path="logs", tracking_uri=mlflow_store)
    (log_file,) = os.listdir(log)
    assert "error: data: no such folder" in open(os.path.join(log, log_file)).read()
    parent = MlflowClient(mlflow_store).get_run(result.parent_run_id)
    assert parent.data.tags["avlm.sweep.failed"] == "1" and parent.info.status == "FINISHED"
    assert [t.state.name for t in attempts(tmp_path)["attempt-0"]].count("FAIL") == 1

    again = run_sweep(spec, workers=2)
    assert points(children_of(mlflow_store, again)) == Counter({("good", 0): 1, ("crash", 0): 2})
    outcomes = sorted(t.user_attrs["avlm.outcome"] for t in attempts(tmp_path)["attempt-1"])
    assert outcomes == ["failed", "reused"]


@pytest.mark.slow
def test_an_interrupted_sweep_queues_its_children_and_a_resume_runs_them(tmp_path, mlflow_store, fake_recipe):
    """SIGTERM while a child runs: it ends KILLED and its trial is queued again. The resumed sweep takes the queued
    trial, retries the failure from before it started, and leaves a failure of its own for the next run."""
    spec = make_spec([("crash", {"data.data_dir": "/crash"}), ("sleeper", {"data.data_dir": "/sleep"})], seeds=(0,))
    (tmp_path / "hold").touch()
    client = MlflowClient(mlflow_store)

    def interrupt_once_the_sleeper_runs():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            runs = all_runs(mlflow_store)
            sleeping = [r for r in runs if r.data.tags.get("avlm.sweep.cell") == "sleeper"]
            crashed = [r for r in runs if r.data.tags.get("avlm.sweep.cell") == "crash" and r.info.end_time]
            if sleeping and crashed and "fake recipe" in _log_text(tmp_path):
                break
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=interrupt_once_the_sleeper_runs, daemon=True).start()
    with pytest.raises(RunInterrupted):
        run_sweep(spec, workers=2)
    (attempt,) = attempts(tmp_path).values()
    queued = [t for t in attempt if t.state.name == "WAITING"]
    assert [t.params["cell"] for t in queued] == ["sleeper"]
    runs = all_runs(mlflow_store)
    assert points(runs, "KILLED") == Counter({("sleeper", 0): 1})
    parent = next(r for r in runs if r.data.tags.get("avlm.sweep.role") == "parent")
    assert parent.info.status == "KILLED"

    # resume: the queued sleeper fails this time (a failure of this invocation: deferred), the old crash is retried
    (tmp_path / "hold").unlink()
    (tmp_path / "fail-sleeper").touch()
    result = run_sweep(spec, workers=2)
    assert points(children_of(mlflow_store, result)) == Counter({("crash", 0): 2, ("sleeper", 0): 2})
    second = attempts(tmp_path)["attempt-1"]
    outcomes = {t.params["cell"]: t.user_attrs["avlm.outcome"] for t in second}
    assert outcomes == {"crash": "failed", "sleeper": "deferred"}
    assert client.get_run(result.parent_run_id).info.status == "FINISHED"

    # the next invocation retries both, and the sleeper now finishes
    (tmp_path / "fail-sleeper").unlink()
    result = run_sweep(spec, workers=2)
    assert points(children_of(mlflow_store, result)) == Counter({("crash", 0): 3, ("sleeper", 0): 3})
    assert points(children_of(mlflow_store, result), "FINISHED") == Counter({("sleeper", 0): 1})
    assert [cell for cell, _, _ in result.failed()] == ["crash"] and result.winner == "sleeper"


def _log_text(tmp_path):
    return "".join(p.read_text(errors="replace") for p in tmp_path.glob("outputs/sweeps/*/children/sleeper*.log"))


@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")
def test_sqlite_storage_hands_each_queued_trial_to_one_worker(tmp_path):
    """sqlite ignores SELECT ... FOR UPDATE: without serialized transactions, eight threads popping eight queued
    trials at once took the same trial several times (Optuna 5.0)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    for round_ in range(5):
        study = optuna.create_study(study_name=f"pop-{round_}", storage=storage)
        for x in range(8):
            study.enqueue_trial({"x": x})
        barrier, taken = threading.Barrier(8), []

        def take(name=study.study_name, barrier=barrier, taken=taken):
            worker_study = optuna.load_study(study_name=name, storage=storage)
            barrier.wait()
            taken.append(worker_study.ask().number)

        threads = [threading.Thread(target=take) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(taken) == list(range(8))
