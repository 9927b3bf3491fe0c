"""Runs built by hand for the report tests: plain records, a fake source, and runs logged into MLflow."""

import importlib.util
import json
import tempfile
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from avlm.config import config_from_dict
from avlm.report.spec import ReportSpec
from avlm.tracking.run_table import RunRecord

REPO = Path(__file__).resolve().parents[2]


def record(run_id, *, seed=1, start=0, params=None, metrics=None, tags=None, name="", experiment="e"):
    """A RunRecord with params ``cfg.seed`` plus ``params``."""
    return RunRecord(
        run_id=run_id,
        run_name=name or f"run-seed{seed}",
        experiment=experiment,
        status="FINISHED",
        start_time=start,
        params={"cfg.seed": str(seed), **(params or {})},
        metrics=dict(metrics or {}),
        tags=dict(tags or {}),
    )


class FakeSource:
    """Histories and JSON artifacts from dicts: ``histories[(run_id, key)]``, ``artifacts[(run_id, path)]``."""

    def __init__(self, histories=None, artifacts=None):
        self.histories = histories or {}
        self.artifacts = artifacts or {}

    def metric_history(self, run_id, key):
        return self.histories.get((run_id, key), [])

    def load_json_artifact(self, run_id, artifact_path):
        return self.artifacts.get((run_id, artifact_path))


def make_spec(**values):
    """A ReportSpec from keyword sections; name and kind default to a generic report."""
    values.setdefault("name", "test")
    values.setdefault("kind", "generic")
    if values["kind"] == "generic":
        values.setdefault("generic", {"metrics": ["m"]})
    values.setdefault("runs", {"experiments": ["e"]})
    return config_from_dict(ReportSpec, values)


def log_run(
    client: MlflowClient,
    experiment_id,
    *,
    name,
    params=None,
    metrics=None,
    tags=None,
    artifacts=None,
    status="FINISHED",
):
    """Log a finished run: ``metrics`` maps a key to a value (step 0) or to ``[(step, value), ...]``;
    ``artifacts`` maps an artifact path to a JSON-ready object."""
    run = client.create_run(experiment_id, run_name=name, tags={"mlflow.runName": name, **(tags or {})})
    points = []
    for key, value in (metrics or {}).items():
        for step, v in value if isinstance(value, list) else [(0, value)]:
            points.append(Metric(key, float(v), 1_000 + len(points), step))
    client.log_batch(
        run.info.run_id,
        metrics=points,
        params=[Param(k, str(v)) for k, v in (params or {}).items()],
        tags=[RunTag(k, str(v)) for k, v in (tags or {}).items()],
    )
    with tempfile.TemporaryDirectory() as folder:
        for path, content in (artifacts or {}).items():
            local = Path(folder) / path
            local.parent.mkdir(parents=True, exist_ok=True)
            local.write_text(json.dumps(content))
            client.log_artifact(run.info.run_id, str(local), str(Path(path).parent) if "/" in path else None)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def read_folder(folder):
    """Every file of a report folder: relative path → bytes."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def load_entrypoint(name):
    """``entrypoints/<name>.py`` as a module (entry points are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", REPO / "entrypoints" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
