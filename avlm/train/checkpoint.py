"""Checkpoints of the trainable parts only, in safetensors + JSON: nothing is ever unpickled.

A checkpoint directory holds::

    trainable.safetensors   the parameters that train (head, LoRA matrices, unfrozen blocks)
    config.yaml             the resolved config that rebuilds the rest of the model
    optimizer.safetensors   optimizer tensors            (``last`` only: what a resumed run needs)
    optimizer.json          optimizer groups and scalars (``last`` only)
    scheduler.json          lr-scheduler counters        (``last`` only)
    state.json              loop state: epoch, step, best metric, history, MLflow run id
    lora_adapter/           peft ``save_pretrained`` output when LoRA is on

Saving is split in two so that the loop can write off its training thread: :func:`checkpoint_files` copies
everything into memory (cheap, on the training thread), :func:`write_checkpoint` puts it on disk (anywhere).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from avlm.errors import ModelError

TRAINABLE_FILE = "trainable.safetensors"
CONFIG_FILE = "config.yaml"
STATE_FILE = "state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META_FILE = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
RESUME_ONLY_FILES = (OPTIMIZER_FILE, OPTIMIZER_META_FILE, SCHEDULER_FILE)

# file name -> its contents: tensors for a .safetensors file, text for the others
CheckpointFiles = dict[str, "dict[str, torch.Tensor] | str"]


@dataclasses.dataclass
class LoopState:
    """Where a training stands; saved with every ``last`` checkpoint so a crashed run can go on."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    best_value: float | None = None
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    stage: int = 1  # of a run trained in stages (staged fine-tuning); 1 otherwise
    stage_start_epoch: int = 0  # epochs completed when the current stage began
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    run_id: str | None = None

    def to_json(self) -> str:
        # shallow and compact: ``asdict`` deep-copies the history and ``indent`` takes json's pure-Python encoder
        # (6.2 ms against 0.7 ms a save, with 100 epochs of history)
        return json.dumps({field.name: getattr(self, field.name) for field in dataclasses.fields(self)})

    @classmethod
    def from_json(cls, text: str) -> LoopState:
        return cls(**json.loads(text))


def gather_trainable_state(accelerator: Any, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) values of the model's trainable parameters, as CPU copies, keyed by state-dict name.

    Goes through ``accelerator.get_state_dict``, which gathers the shards under FSDP and DeepSpeed ZeRO-3: it is a
    collective there, so every rank must call this; only the main process gets the tensors (the other ranks may
    get an empty dict). Under ZeRO-3 the values are the 16-bit copies DeepSpeed consolidates.

    Raises:
        ModelError: a trainable parameter has no entry in the gathered state dict (FSDP without
            ``fsdp_use_orig_params: true`` flattens the parameters under names of its own).
    """
    from torch.distributed.fsdp._common_utils import clean_tensor_name

    # FSDP's (and activation checkpointing's) wrapper prefixes are not part of the state-dict names
    names = [clean_tensor_name(n) for n, p in accelerator.unwrap_model(model).named_parameters() if p.requires_grad]
    full = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return {}
    missing = sorted(set(names) - full.keys())
    if missing:
        raise ModelError(
            f"trainable parameters {missing[:5]} are not in the gathered state dict (keys such as "
            f"{sorted(full)[:3]}); under FSDP set fsdp_use_orig_params: true in the accelerate config"
        )
    # a copy even on the CPU, where .cpu() would alias the live weights the next optimizer step changes
    return {name: full[name].detach().to("cpu", copy=True).contiguous() for name in names}


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into safetensors-able tensors (copies) and JSON-able everything else."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().to("cpu", copy=True).contiguous()
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


def checkpoint_files(
    *,
    trainable: dict[str, torch.Tensor],
    config_yaml: str,
    state: LoopState,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> CheckpointFiles:
    """A checkpoint's files in memory: a snapshot that later optimizer steps do not change.

    ``trainable`` is taken as given (:func:`gather_trainable_state` already returns copies); the optimizer
    tensors are copied, the loop state and the scheduler counters serialised.
    """
    files: CheckpointFiles = {
        TRAINABLE_FILE: {k: v.contiguous() for k, v in trainable.items()},
        CONFIG_FILE: config_yaml,
        STATE_FILE: state.to_json(),
    }
    if optimizer is not None:
        tensors, meta = _optimizer_to_files(optimizer)
        files[OPTIMIZER_FILE] = tensors
        files[OPTIMIZER_META_FILE] = json.dumps(meta)
    if scheduler is not None:
        files[SCHEDULER_FILE] = json.dumps({k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"})
    return files


def write_checkpoint(directory: str | Path, files: CheckpointFiles, *, base: str | Path | None = None) -> Path:
    """Write ``files`` as the checkpoint folder ``directory``, atomically (a crash mid-write leaves the previous
    one intact).

    Args:
        directory: the checkpoint folder (``…/best``, ``…/last``); replaced if it exists.
        files: what :func:`checkpoint_files` returned (or part of it, with ``base``).
        base: a checkpoint folder of the same epoch whose files are hard-linked in (copied where the file system
            has no hard links) before ``files`` are written: ``last`` shares ``best``'s weights and state.
    """
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if base is not None:
        for source in Path(base).iterdir():
            if source.is_file():
                _link_or_copy(source, tmp / source.name)
    for name, content in files.items():
        if isinstance(content, str):
            (tmp / name).write_text(content)
        else:
            save_file(content, str(tmp / name))
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _link_or_copy(source: Path, target: Path) -> None:
    # checkpoints are replaced by renaming whole folders, never rewritten in place, so a shared inode stays valid
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def save_checkpoint(
    directory: str | Path,
    *,
    trainable: dict[str, torch.Tensor],
    config_yaml: str,
    state: LoopState,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> Path:
    """Write a checkpoint atomically, now (:func:`checkpoint_files` then :func:`write_checkpoint`)."""
    files = checkpoint_files(
        trainable=trainable, config_yaml=config_yaml, state=state, optimizer=optimizer, scheduler=scheduler
    )
    return write_checkpoint(directory, files)


def _corrupt(path: Path, err: Exception) -> ModelError:
    """The error for an unreadable checkpoint file: which file, which folder to delete, what to resume instead."""
    directory = path.parent
    try:
        run_id = json.loads((directory / STATE_FILE).read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        run_id = None
    instead = f"resume from its copy in MLflow with resume={run_id}" if run_id else "start the run again"
    return ModelError(
        f"checkpoint file {path} is corrupt or truncated ({type(err).__name__}: {err}): delete the checkpoint "
        f"folder {directory}, then {instead}"
    )


def _require(directory: str | Path, name: str) -> Path:
    path = Path(directory) / name
    if not path.is_file():
        raise ModelError(f"checkpoint {directory} has no {name}: not a complete avlm checkpoint directory")
    return path


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _corrupt(path, err) from err


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _corrupt(path, err) from err


def load_trainable(directory: str | Path) -> dict[str, torch.Tensor]:
    """The trainable weights of a checkpoint folder.

    Raises:
        ModelError: the folder has no weights file, or it is corrupt or truncated.
    """
    return _read_tensors(_require(directory, TRAINABLE_FILE))


def load_state(directory: str | Path) -> LoopState:
    """The loop state of a checkpoint folder.

    Raises:
        ModelError: the folder has no ``state.json``, or it is corrupt, truncated or not a loop state.
    """
    path = _require(directory, STATE_FILE)
    data = _read_json(path)
    try:
        return LoopState(**data)
    except TypeError as err:  # not an object, or keys LoopState does not have
        raise _corrupt(path, err) from err


def restore_optimization(
    directory: str | Path,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> None:
    """Load optimizer and scheduler state saved by :func:`save_checkpoint` (no pickle involved).

    Raises:
        ModelError: a file is missing, corrupt or truncated, or does not fit this optimizer.
    """
    tensors = _read_tensors(_require(directory, OPTIMIZER_FILE))
    meta_path = _require(directory, OPTIMIZER_META_FILE)
    sched_path = _require(directory, SCHEDULER_FILE)
    meta, sched_state = _read_json(meta_path), _read_json(sched_path)
    try:
        optimizer_state = _optimizer_from_files(tensors, meta)
    except (KeyError, TypeError, ValueError, AttributeError) as err:  # valid JSON of the wrong shape
        raise _corrupt(meta_path, err) from err
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, ValueError) as err:
        raise ModelError(f"optimizer state in {directory} does not fit this model's optimizer: {err}") from err
    sched_state["lr_lambdas"] = [None] * len(optimizer.param_groups)  # the lambdas are rebuilt from the config
    scheduler.load_state_dict(sched_state)
