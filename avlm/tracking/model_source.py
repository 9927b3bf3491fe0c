"""Find and fetch the checkpoint a registered model version (or a run) was made from.

A later stage starts from an earlier one's weights: SCST from an XE version, ``evaluate_caption`` from any
version. They name it as users do — ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or a run id — and
get back the checkpoint folder the recipe's ``load_captioner`` reads, with the lineage to tag on the new run.
"""

from __future__ import annotations

import atexit
import dataclasses
import re
import shutil
import tempfile
from pathlib import Path

from avlm.errors import ConfigError

_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_RUN_ID = re.compile(r"^(?:runs:/)?(?P<run_id>[0-9a-f]{32})/?$")


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A fetched checkpoint and where it came from.

    Attributes:
        uri: what the user named.
        checkpoint_dir: the local checkpoint folder (``config.yaml``, ``trainable.safetensors``, ``tokenizer/``).
        run_id: the run that trained it.
        model_name: the registered model ("" for a bare run id).
        version: the registered version ("" for a bare run id).
    """

    uri: str
    checkpoint_dir: Path
    run_id: str
    model_name: str = ""
    version: str = ""

    def lineage_tags(self, prefix: str = "lineage.parent_") -> dict[str, str]:
        """``lineage.parent_model``, ``lineage.parent_version``, ``lineage.parent_run_id`` (and the URI)."""
        return {
            f"{prefix}model": self.model_name,
            f"{prefix}version": self.version,
            f"{prefix}run_id": self.run_id,
            f"{prefix}uri": self.uri,
        }


def fetch_checkpoint(uri: str, key: str = "model", dest: str | Path | None = None) -> CheckpointSource:
    """Download the checkpoint behind ``uri`` from the tracking store.

    Args:
        uri: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, or a 32-hex run id (its ``checkpoints/best``).
        key: the config key that holds ``uri``, named in errors.
        dest: download folder (default: a new temporary folder, removed when this process exits: the checkpoint is
            read by the process that fetched it).

    Raises:
        ConfigError: a malformed URI, an unknown model, alias, version or run, or one without a checkpoint.
    """
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    if dest is None:
        dest = Path(tempfile.mkdtemp(prefix="avlm-checkpoint-"))
        atexit.register(shutil.rmtree, dest, True)
    dest = Path(dest)
    match = _MODEL_URI.match(uri.strip())
    try:
        if match:
            name = match["name"]
            version = (
                client.get_model_version_by_alias(name, match["alias"])
                if match["alias"]
                else client.get_model_version(name, match["version"])
            )
            # The pyfunc model carries the checkpoint as its artifact "checkpoint" (log_and_register): fetch only it.
            source = version.source.rstrip("/")
            try:
                folder = Path(download_artifacts(artifact_uri=f"{source}/artifacts/checkpoint", dst_path=str(dest)))
            except (MlflowException, OSError):
                folder = Path(download_artifacts(artifact_uri=source, dst_path=str(dest)))
            found = [p.parent for p in folder.rglob("config.yaml") if (p.parent / "trainable.safetensors").exists()]
            if not found:
                raise ConfigError(f"config key '{key}' = {uri!r}: version {version.version} holds no avlm checkpoint")
            return CheckpointSource(uri, found[0], version.run_id or "", name, str(version.version))
        run_uri = _RUN_ID.match(uri.strip())
        if run_uri:
            run_id = run_uri["run_id"]
            client.get_run(run_id)
            folder = download_artifacts(run_id=run_id, artifact_path="checkpoints/best", dst_path=str(dest))
            return CheckpointSource(uri, Path(folder), run_id)
    except MlflowException as err:
        raise ConfigError(f"config key '{key}' = {uri!r}: {err.message}") from err
    except OSError as err:  # a run without checkpoints/best
        raise ConfigError(f"config key '{key}' = {uri!r}: no checkpoint to download ({err})") from err
    raise ConfigError(
        f"config key '{key}' = {uri!r}: expected models:/<name>@<alias>, models:/<name>/<version>, runs:/<run id> "
        "or a run id"
    )
