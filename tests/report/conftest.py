"""Fixtures of the report tests: one MLflow store for a whole module (the demo trainings are shared)."""

import shutil

import mlflow
import pytest


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, avlm_cache, empty_store_file):
    """A fresh sqlite MLflow store for the module, in its own working directory; returns the folder.

    The module-scoped twin of ``mlflow_store`` (tests/conftest.py, function-scoped): the same isolation from a
    previous test's run or experiment, undone when the module ends."""
    folder = tmp_path_factory.mktemp("report_store")
    shutil.copyfile(empty_store_file, folder / "mlflow.db")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.delenv("MLFLOW_RUN_ID", raising=False)
        patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
        patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
        mlflow.set_tracking_uri(uri)
        yield folder
        while mlflow.active_run():
            mlflow.end_run()
