"""Shared fixtures: offline hub, an isolated avlm cache per session, a temp sqlite MLflow store per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def avlm_cache(tmp_path_factory):
    """One cache (demo data, feature cache) for the whole session, outside the user's ~/.cache."""
    path = tmp_path_factory.mktemp("avlm_cache")
    os.environ["AVLM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, avlm_cache):
    """A fresh sqlite MLflow store in a temp working directory; returns its URI."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; a previous test's id must not leak into this store
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
