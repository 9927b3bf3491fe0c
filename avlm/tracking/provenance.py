"""Where a run came from: git state, package versions, hardware — for tags and the run card."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import tempfile
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


def record_run_start(
    run_logger: Any,
    *,
    cfg: Any,
    config_yaml: str,
    tags: dict[str, str],
    run_card: dict[str, Any],
    num_processes: int,
    mixed_precision: str,
    trainable_params: int,
    total_params: int,
) -> None:
    """What every recipe logs before training: the config (flat ``cfg.*`` params, JSON, reloadable YAML), tags with
    provenance, the run card (the recipe's fields plus git, packages, parameters, seed, hardware) and the counts.

    The ``cfg.`` prefix keeps avlm's params apart from the ones ``mlflow run`` logs for MLproject parameters, which
    may carry the same names in another string form (MLflow refuses to change a logged param).
    """
    from avlm.config import config_to_dict, flatten_config

    run_logger.log_params(flatten_config(cfg, prefix="cfg."))
    run_logger.set_tags({**tags, **provenance_tags()})
    run_logger.log_dict(config_to_dict(cfg), "config/resolved_config.json")
    run_logger.log_dict(
        {
            **run_card,
            "git": git_state(),
            "packages": package_versions(),
            "parameters": {
                "trainable": trainable_params,
                "total": total_params,
                "trainable_fraction": trainable_params / max(total_params, 1),
            },
            "seed": cfg.seed,
            "hardware": hardware_info(num_processes, mixed_precision),
        },
        "run_card.json",
    )
    with tempfile.TemporaryDirectory() as tmp:
        config_path = Path(tmp) / "config.yaml"
        config_path.write_text(config_yaml)
        run_logger.log_artifact(config_path, "config")
    run_logger.log_metrics({"params/trainable": trainable_params, "params/total": total_params}, step=0)
