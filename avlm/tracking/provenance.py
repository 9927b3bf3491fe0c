"""Where a run came from: git state, package versions, hardware — for tags and the run card."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import avlm

TRACKED_PACKAGES = (
    "avlm",
    "torch",
    "accelerate",
    "transformers",
    "peft",
    "timm",
    "mlflow",
    "numpy",
    "scikit-learn",
    "safetensors",
)


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed version of each package ("not installed" when absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def git_state(directory: str | Path | None = None) -> dict[str, Any]:
    """Commit and dirty flag of the checkout holding avlm (or ``directory``); ``unknown`` outside a git checkout."""
    directory = Path(directory or Path(avlm.__file__).resolve().parent.parent)

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": "unknown"}
    return {"commit": commit, "dirty": dirty}


def hardware_info(num_processes: int = 1, mixed_precision: str = "no") -> dict[str, Any]:
    """Host, CPU count, accelerator names and process count."""
    import torch

    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "num_processes": num_processes,
        "mixed_precision": mixed_precision,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def provenance_tags() -> dict[str, str]:
    """Tags every avlm run carries: git commit, dirty flag, package versions."""
    git = git_state()
    tags = {"avlm.git_commit": str(git["commit"]), "avlm.git_dirty": str(git["dirty"])}
    tags.update({f"versions.{name}": version for name, version in package_versions().items()})
    return tags
