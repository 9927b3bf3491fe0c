"""Reading a run back from MLflow: its status and its artifacts (what resuming on another machine needs)."""

from __future__ import annotations

import logging
from pathlib import Path

from avlm.errors import ConfigError
from avlm.tracking.mlflow_logger import resolve_tracking_uri

logger = logging.getLogger(__name__)


def run_status(run_id: str, tracking_uri: str = "") -> str | None:
    """The run's status (``RUNNING``, ``FINISHED``, ``FAILED``, ``KILLED``…), or None when the store has no such run."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient(resolve_tracking_uri(tracking_uri)).get_run(run_id).info.status
    except MlflowException:
        return None


def download_run_folders(run_id: str, folders: dict[str, str], destination: str | Path, tracking_uri: str = "") -> dict:
    """Download artifact folders of a run, e.g. ``{"last": "checkpoints/last", "best": "checkpoints/best"}``.

    Returns:
        name → local folder, for the folders the run has (a run that never improved has no ``best``).

    Raises:
        ConfigError: the run has none of them.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    present = {}
    for name, artifact_path in folders.items():
        parent, leaf = artifact_path.rsplit("/", 1) if "/" in artifact_path else ("", artifact_path)
        if not any(info.path == artifact_path for info in client.list_artifacts(run_id, parent or None)):
            continue
        local = Path(destination) / name
        local.mkdir(parents=True, exist_ok=True)
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=artifact_path, dst_path=str(local), tracking_uri=uri
        )
        present[name] = local / leaf  # download_artifacts keeps the last path component
        logger.info("downloaded %s of run %s to %s", artifact_path, run_id, present[name])
    if not present:
        raise ConfigError(f"MLflow run {run_id} at {uri} has none of the artifacts {sorted(folders.values())}")
    return present
