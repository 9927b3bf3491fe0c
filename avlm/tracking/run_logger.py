"""The one logging interface the loop and the recipes are typed against, and its two MLflow-free implementations.

``MLflowLogger`` (``avlm.tracking.mlflow_logger``) is the real one; ranks other than the main one get a
:class:`NullLogger`; :class:`PrefixedLogger` lets two trainings share one run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class RunLogger(Protocol):
    """What a training may record about itself (torchtune's ``MetricLoggerInterface``, plus artifacts)."""

    run_id: str | None
    artifact_uri: str | None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class NullLogger:
    """What ranks other than the main one get: every call does nothing, so they never touch MLflow."""

    run_id: str | None = None
    artifact_uri: str | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None: ...

    def log_params(self, params: Mapping[str, Any]) -> None: ...

    def set_tags(self, tags: Mapping[str, Any]) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None: ...

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None: ...

    def log_dict(self, data: Any, artifact_file: str) -> None: ...

    def log_text(self, text: str, artifact_file: str) -> None: ...

    def log_figure(self, figure: Any, artifact_file: str) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class PrefixedLogger:
    """A logger that puts ``prefix`` before every metric name, so that two trainings can share one run
    (``pretrained/val/mAP`` and ``random/val/mAP``); everything else goes to the wrapped logger unchanged."""

    def __init__(self, inner: RunLogger, prefix: str):
        self.inner = inner
        self.prefix = prefix
        self.run_id = inner.run_id
        self.artifact_uri = inner.artifact_uri

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.inner.log_metrics({f"{self.prefix}{key}": value for key, value in metrics.items()}, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.inner.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.inner.set_tags(tags)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifact(path, artifact_path)

    def log_artifacts(self, directory: str | Path, artifact_path: str | None = None) -> None:
        self.inner.log_artifacts(directory, artifact_path)

    def log_dict(self, data: Any, artifact_file: str) -> None:
        self.inner.log_dict(data, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.inner.log_text(text, artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.inner.log_figure(figure, artifact_file)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        """The wrapped logger belongs to whoever opened it; closing the prefix view leaves it open."""
