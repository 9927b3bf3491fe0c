"""Tiny train_cvs runs for the recipe tests (imported by the test modules beside it)."""

from pathlib import Path

from avlm.recipes import cvs

REPO = Path(__file__).resolve().parents[2]
# a small head and few entropy clips: seconds per epoch on the demo data
TINY = (
    "tracking.system_metrics=false",
    "model.head_hidden=32",
    "model.head_queries=2",
    "model.head_heads=2",
    "data.entropy_clips=4",
    "train.batch_size=16",
)


def run_cvs(*overrides: str, path: str = "examples/cvs/demo.yaml") -> cvs.CVSResult:
    """``cvs.main`` on a config of the repository with the tiny settings, then ``overrides``."""
    return cvs.main(cvs.load_cvs_config(REPO / path, [*TINY, *overrides]))
