"""Experiment tracking: the MLflow run, provenance tags, run card, plots."""

from avlm.tracking.mlflow_logger import (
    DEFAULT_TRACKING_URI,
    MLflowLogger,
    TrackingConfig,
    nested_run,
    resolve_tracking_uri,
    set_run_tags,
    to_float,
    tracked_run,
)
from avlm.tracking.provenance import git_state, hardware_info, package_versions, provenance_tags, record_run_start
from avlm.tracking.run_logger import NullLogger, PrefixedLogger, RunLogger

__all__ = [
    "DEFAULT_TRACKING_URI",
    "MLflowLogger",
    "NullLogger",
    "PrefixedLogger",
    "RunLogger",
    "TrackingConfig",
    "git_state",
    "hardware_info",
    "nested_run",
    "package_versions",
    "provenance_tags",
    "record_run_start",
    "resolve_tracking_uri",
    "set_run_tags",
    "to_float",
    "tracked_run",
]
