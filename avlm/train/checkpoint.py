"""Checkpoints of the trainable parts only, in safetensors + JSON: nothing is ever unpickled.

A checkpoint directory holds::

    trainable.safetensors   the parameters that train (head, LoRA matrices, unfrozen blocks)
    config.yaml             the resolved config that rebuilds the rest of the model
    optimizer.safetensors   optimizer tensors            (``last`` only: what a resumed run needs)
    optimizer.json          optimizer groups and scalars (``last`` only)
    scheduler.json          lr-scheduler counters        (``last`` only)
    state.json              loop state: epoch, step, best metric, history, MLflow run id
    lora_adapter/           peft ``save_pretrained`` output when LoRA is on
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from avlm.errors import ModelError

TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"


@dataclasses.dataclass
class LoopState:
    """Where a training stands; saved with every ``last`` checkpoint so a crashed run can go on."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    best_value: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        return cls(**json.loads(text))


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors and JSON-able everything else."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_files(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    directory: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    config_yaml: str,
    state: LoopState,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Path:
    """Write a checkpoint atomically (a crash mid-write leaves the previous one intact)."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / TRAINABLE_FILE))
    (tmp / CONFIG_FILE).write_text(config_yaml)
    (tmp / STATE_FILE).write_text(state.to_json())
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "optimizer.json").write_text(json.dumps(meta))
    if scheduler is not None:
        sched_state = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        (tmp / "scheduler.json").write_text(json.dumps(sched_state))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def load_trainable(directory: str | Path) -> dict[str, torch.Tensor]:
    path = Path(directory) / TRAINABLE_FILE
    if not path.is_file():
        raise ModelError(f"checkpoint {directory} has no {TRAINABLE_FILE}")
    return load_file(str(path))


def load_state(directory: str | Path) -> LoopState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise ModelError(f"checkpoint {directory} has no {STATE_FILE}: not an avlm checkpoint directory")
    return LoopState.from_json(path.read_text())


def restore_optimization(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load optimizer and scheduler state saved by :func:`save_checkpoint` (no pickle involved)."""
    directory = Path(directory)
    tensors = load_file(str(directory / "optimizer.safetensors"))
    meta = json.loads((directory / "optimizer.json").read_text())
    optimizer.load_state_dict(_optimizer_from_files(tensors, meta))
    sched_state = json.loads((directory / "scheduler.json").read_text())
    sched_state["lr_lambdas"] = [None] * len(optimizer.param_groups)  # the lambdas are rebuilt from the config
    scheduler.load_state_dict(sched_state)
