"""Shared fixtures: offline hub, an isolated avlm cache per session, a temp sqlite MLflow store per test."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def avlm_cache(tmp_path_factory):
    """One cache (demo data, feature cache) for the whole session, outside the user's ~/.cache."""
    path = tmp_path_factory.mktemp("avlm_cache")
    os.environ["AVLM_CACHE_DIR"] = str(path)
    return path


def point_mlflow_at(patch: pytest.MonkeyPatch, uri: str) -> None:
    """Make ``uri`` the tracking store of the test, with nothing of a previous test's run or experiment left."""
    import mlflow

    patch.setenv("MLFLOW_TRACKING_URI", uri)
    # mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID; a previous test's id must not leak into this store
    patch.delenv("MLFLOW_RUN_ID", raising=False)
    patch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    patch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    mlflow.set_tracking_uri(uri)


@pytest.fixture(scope="session")
def empty_store_file(tmp_path_factory):
    """A sqlite file holding an empty, fully migrated MLflow store: copying it takes milliseconds, creating a store
    takes seconds (MLflow runs its schema migrations on every new database)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    client = MlflowClient(f"sqlite:///{path}", registry_uri=f"sqlite:///{path}")
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch, avlm_cache, empty_store_file):
    """A fresh sqlite MLflow store in a temp working directory; returns its URI."""
    import shutil

    import mlflow

    monkeypatch.chdir(tmp_path)
    shutil.copyfile(empty_store_file, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    point_mlflow_at(monkeypatch, uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: on a shared 2-core machine thread hand-offs cost far more
    than they save (several times slower). Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def module_store(tmp_path_factory, avlm_cache, empty_store_file):
    """A fresh sqlite MLflow store for a whole module (trainings its tests share), in its own working directory;
    returns the folder. The module-scoped twin of ``mlflow_store``."""
    import shutil

    import mlflow

    folder = tmp_path_factory.mktemp("module_store")
    shutil.copyfile(empty_store_file, folder / "mlflow.db")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        point_mlflow_at(patch, f"sqlite:///{folder / 'mlflow.db'}")
        yield folder
        while mlflow.active_run():
            mlflow.end_run()
