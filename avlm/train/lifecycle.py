"""The run lifecycle every recipe shares: resume, output folder, the best checkpoint on every rank, registration.

A recipe's ``main`` reads as its method; what happens around the method (where the run's files go, how a crashed
run continues, how the best checkpoint is registered and promoted) is written here once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from avlm.errors import ConfigError
from avlm.train.checkpoint import LoopState, load_state, load_trainable


def resolve_resume(resume: str, output_dir: str | Path, tracking_uri: str = "") -> Path:
    """Local checkpoint folder for a recipe's ``resume``: a folder, or an MLflow run id whose ``checkpoints/last``
    the main process downloads into ``output_dir/resumed/<run id>`` (the other ranks read it there, never MLflow).

    Raises:
        ConfigError: ``resume`` is neither a folder nor a run with ``checkpoints/last``.
    """
    from avlm.train.loop import distributed_state

    path = Path(resume)
    if path.is_dir():
        return path
    local = Path(output_dir) / "resumed" / resume
    dist = distributed_state()
    with dist.main_process_first():
        if dist.is_main_process:
            import mlflow

            from avlm.tracking import resolve_tracking_uri

            mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
            local.mkdir(parents=True, exist_ok=True)
            try:
                mlflow.artifacts.download_artifacts(
                    run_id=resume, artifact_path="checkpoints/last", dst_path=str(local)
                )
            except Exception as err:  # MLflow raises several types for a missing run or artifact
                raise ConfigError(
                    f"config key 'resume': '{resume}' is neither a checkpoint folder nor an MLflow run with "
                    f"checkpoints/last ({err})"
                ) from err
    return local / "last"  # download_artifacts keeps only the last path component


def resume_from(cfg: Any) -> tuple[Any, Path | None, LoopState | None]:
    """(config, checkpoint folder, loop state) to start a recipe with: as given, or for ``cfg.resume`` the
    configuration the crashed run started with (its ``config.yaml``), its last checkpoint and loop state, so the
    run continues unchanged into the same MLflow run."""
    if not cfg.resume:
        return cfg, None, None
    import yaml

    from avlm.config import config_from_dict

    resume_dir = resolve_resume(cfg.resume, cfg.output_dir, cfg.tracking.tracking_uri)
    saved = yaml.safe_load((resume_dir / "config.yaml").read_text())
    saved["resume"] = cfg.resume
    return config_from_dict(type(cfg), saved), resume_dir, load_state(resume_dir)


def load_best_on_every_rank(accelerator: Any, model: torch.nn.Module, best_dir: str | Path) -> torch.nn.Module:
    """Load the best checkpoint's trainable weights into the unwrapped model on every rank; return that model.

    Only the main process wrote the checkpoint (other nodes may not see its disk), so it loads the file and the
    other ranks receive the weights by broadcast.
    """
    from accelerate.utils import broadcast

    from avlm.models import load_trainable_state_dict

    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        load_trainable_state_dict(net, load_trainable(best_dir))
    if accelerator.num_processes > 1:
        for param in (p for p in net.parameters() if p.requires_grad):
            param.data.copy_(broadcast(param.data.clone(), from_process=0))
    return net
