"""The one training loop every recipe uses, on ``accelerate.Accelerator``.

A recipe hands it a ``train_step`` (batch → loss, scores, targets) and an ``evaluate`` (→ validation metrics);
the loop owns everything else: gradient accumulation, clipping, the lr schedule, per-step and per-epoch
logging, early stopping on a monitored metric, the best and last checkpoints, and resuming.

Randomness inside an epoch (dropout, MixUp, the sample order) is seeded from ``(seed, epoch)`` alone, so a run
resumed from the checkpoint of epoch k replays epochs k+1… exactly as the uninterrupted run did.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import accelerate.optimizer
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from avlm.errors import ConfigError, TrainingError
from avlm.train.checkpoint import LoopState, save_checkpoint

logger = logging.getLogger(__name__)

# accelerate's optimizer.step() probes importlib for the optional lomo_optim package twice per step, uncached:
# 0.5 ms a step here, a tenth of a small head's step (bench/loop_overhead.py). Installed packages do not change
# while a process runs, so the answer is cached.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


@dataclasses.dataclass
class TrainConfig:
    """Optimisation settings shared by the recipes.

    Attributes:
        epochs: maximum number of epochs.
        batch_size: global batch per micro-step, split across processes (same result for 1 or N processes).
        grad_accum_steps: micro-steps per optimizer step (effective batch = batch_size × grad_accum_steps).
        lr: learning rate of the head (and of anything not in the backbone).
        backbone_lr: learning rate of the backbone's trainable parts (LoRA matrices, unfrozen blocks).
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms, pooler queries).
        scheduler: a transformers schedule name: cosine, linear, constant_with_warmup, …
        warmup_ratio: fraction of the optimizer steps spent warming up linearly.
        max_grad_norm: gradient clipping threshold; 0 turns clipping off.
        mixed_precision: no, fp16 or bf16 (accelerate autocast).
        monitor: metric for best checkpoint and early stopping (a name the recipe's evaluation returns).
        monitor_mode: max or min.
        patience: epochs without improvement before stopping; 0 = never stop early.
        min_delta: improvement smaller than this does not count.
        num_workers: DataLoader worker processes.
    """

    epochs: int = 8
    batch_size: int = 16
    grad_accum_steps: int = 1
    lr: float = 5e-4
    backbone_lr: float = 1e-4
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    monitor: str = "val/mAP"
    monitor_mode: Literal["max", "min"] = "max"
    patience: int = 3
    min_delta: float = 0.0
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'train.{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "backbone_lr"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key 'train.{key}' must be > 0, got {getattr(self, key)}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError(f"config key 'train.warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        for key in ("patience", "num_workers", "weight_decay", "max_grad_norm", "min_delta"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'train.{key}' must be >= 0, got {getattr(self, key)}")


@dataclasses.dataclass
class StepOutput:
    """What a recipe's ``train_step`` returns for one micro-batch."""

    loss: torch.Tensor  # scalar, mean over the micro-batch
    scores: torch.Tensor | None = None  # per-sample predictions for the epoch's training metrics
    targets: torch.Tensor | None = None
    parts: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # loss terms, logged as train/<name>


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Accelerator whose batches are the *global* batch split across processes (``split_batches``), so one
    process and N processes see the same samples per optimizer step and take the same steps."""
    from accelerate import DataLoaderConfiguration
    from accelerate.state import AcceleratorState

    # AcceleratorState is a process-wide singleton that refuses a second, different mixed-precision setting; a
    # notebook or test calling a recipe twice must get a fresh one (the distributed PartialState is kept).
    AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(
        cpu=_cpu_only_multiprocess(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
    )


def distributed_state() -> Any:
    """accelerate's process-wide PartialState (rank, world size), set up the way :func:`make_accelerator` does."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu_only_multiprocess())


def _cpu_only_multiprocess() -> bool:
    """True under a plain ``torchrun`` on a machine without accelerators: accelerate then needs ``cpu=True`` to
    set up gloo DDP (``accelerate launch`` with a MULTI_CPU config sets it by itself)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return world_size > 1 and not has_accelerator


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random inside epoch ``epoch``: depends on nothing that came before it."""
    return seed * 100_003 + epoch


def optimizer_steps_per_epoch(num_batches: int, grad_accum_steps: int) -> int:
    return math.ceil(num_batches / grad_accum_steps)


def is_improvement(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def _set_epoch(loader: Any, epoch: int) -> None:
    """Tell the sampler which epoch it is. accelerate's prepared loader counts epochs itself and overrides the
    sampler's epoch with that count when iterated, which a resumed run must reset."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    elif hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def fit(
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    train_loader: torch.utils.data.DataLoader,
    train_step: Callable[[torch.nn.Module, Any, torch.Generator], StepOutput],
    train_metrics: Callable[[np.ndarray, np.ndarray], Mapping[str, float]] | None,
    evaluate: Callable[[torch.nn.Module], Mapping[str, float]],
    cfg: TrainConfig,
    seed: int,
    run_logger: Any,
    checkpoint_dir: str | Path,
    config_yaml: str,
    trainable_state: Callable[[], dict[str, torch.Tensor]],
    state: LoopState | None = None,
    on_checkpoint: Callable[[Path, str], None] | None = None,
    verbose: bool = True,
) -> LoopState:
    """Train until ``cfg.epochs`` or early stopping; return the final loop state.

    Every epoch logs ``train/loss``, the mean of each loss term in ``StepOutput.parts`` and the recipe's
    ``train_metrics`` of the gathered scores (both prefixed ``train/``), its validation metrics, ``lr`` and ``epoch``
    at the current optimizer step; every optimizer step logs ``train/step_loss`` and ``lr``.
    The main process writes ``checkpoint_dir/last`` (with optimizer state) every epoch and ``checkpoint_dir/best``
    whenever the monitored metric improves, then calls ``on_checkpoint(path, "last"|"best")``.
    ``verbose=False`` drops the per-epoch progress bar and log line (to DEBUG) for callers that train many small
    models and show their own progress.

    Raises:
        TrainingError: the loss became NaN or infinite (the message names the epoch and step).
    """
    state = state or LoopState()
    checkpoint_dir = Path(checkpoint_dir)
    trainable_params = [p for p in model.parameters() if p.requires_grad]

    for epoch in range(state.epoch, cfg.epochs):
        set_seed(epoch_seed(seed, epoch))
        generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) + accelerator.process_index)
        _set_epoch(train_loader, epoch)
        model.train()
        epoch_start = time.perf_counter()
        losses, scores, targets = [], [], []
        parts: dict[str, list[float]] = {}
        progress = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not (verbose and accelerator.is_local_main_process),
            leave=False,
        )
        for batch in progress:
            with accelerator.accumulate(model):
                out = train_step(model, batch, generator)
                mean_loss = accelerator.reduce(out.loss.detach(), reduction="mean")
                if not torch.isfinite(mean_loss):
                    raise TrainingError(
                        f"loss is {mean_loss.item()} at epoch {epoch + 1}, optimizer step {state.global_step + 1}: "
                        "lower train.lr, turn on train.max_grad_norm, or check the inputs for NaN"
                    )
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable_params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            losses.append(mean_loss.item())
            for name, value in out.parts.items():
                parts.setdefault(name, []).append(accelerator.reduce(value.detach(), reduction="mean").item())
            if train_metrics is not None:
                # plain gather: training batches are whole (drop_last), nothing to trim
                batch_scores, batch_targets = accelerator.gather((out.scores.detach(), out.targets.detach()))
                scores.append(batch_scores.float().cpu().numpy())
                targets.append(batch_targets.float().cpu().numpy())
            if accelerator.sync_gradients:
                state.global_step += 1
                lr = scheduler.get_last_lr()[0]
                run_logger.log_metrics({"train/step_loss": losses[-1], "lr": lr}, step=state.global_step)
                progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{lr:.2e}", refresh=False)  # redrawn at tqdm pace
        train_seconds = time.perf_counter() - epoch_start

        model.eval()
        val_metrics = dict(evaluate(model))
        row: dict[str, float] = {"epoch": epoch + 1, "train/loss": float(np.mean(losses))}
        row.update({f"train/{name}": float(np.mean(values)) for name, values in parts.items()})
        if train_metrics is not None:
            epoch_metrics = train_metrics(np.concatenate(scores), np.concatenate(targets))
            row.update({f"train/{k}": float(v) for k, v in epoch_metrics.items()})
        row.update({k: float(v) for k, v in val_metrics.items()})
        if "train/mAP" in row and "val/mAP" in row:
            row["train_val_gap/mAP"] = row["train/mAP"] - row["val/mAP"]
        row["lr"] = scheduler.get_last_lr()[0]
        row["throughput/train_samples_per_s"] = len(train_loader.dataset) / max(train_seconds, 1e-9)
        row["time/epoch_s"] = time.perf_counter() - epoch_start
        if cfg.monitor not in row:
            raise ConfigError(
                f"config key 'train.monitor' = '{cfg.monitor}' is not a logged metric; choose one of {sorted(row)}"
            )
        state.history.append(row)
        state.epoch = epoch + 1
        improved = is_improvement(row[cfg.monitor], state.best_value, cfg.monitor_mode, cfg.min_delta)
        if improved:
            state.best_value, state.best_epoch, state.epochs_without_improvement = row[cfg.monitor], epoch + 1, 0
        else:
            state.epochs_without_improvement += 1
        state.stopped_early = 0 < cfg.patience <= state.epochs_without_improvement and state.epoch < cfg.epochs
        run_logger.log_metrics(
            {**row, "best/" + cfg.monitor: state.best_value if state.best_value is not None else float("nan")},
            step=state.global_step,
        )
        logger.log(
            logging.INFO if verbose else logging.DEBUG,
            "epoch %d/%d  train loss %.4f  %s %.4f  (best %.4f at epoch %d)",
            epoch + 1, cfg.epochs, row["train/loss"], cfg.monitor, row[cfg.monitor],
            state.best_value if state.best_value is not None else float("nan"), state.best_epoch,
        )  # fmt: skip

        if accelerator.is_main_process:
            weights = trainable_state()
            if improved:
                path = save_checkpoint(checkpoint_dir / "best", trainable=weights, config_yaml=config_yaml, state=state)
                if on_checkpoint:
                    on_checkpoint(path, "best")
            path = save_checkpoint(
                checkpoint_dir / "last",
                trainable=weights,
                config_yaml=config_yaml,
                state=state,
                optimizer=optimizer,
                scheduler=scheduler,
            )
            if on_checkpoint:
                on_checkpoint(path, "last")
        accelerator.wait_for_everyone()
        if state.stopped_early:
            logger.info("early stopping: %s did not improve for %d epochs", cfg.monitor, cfg.patience)
            break
    return state
