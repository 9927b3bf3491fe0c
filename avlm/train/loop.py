"""The one training loop every recipe uses, on ``accelerate.Accelerator``.

A recipe hands it a ``train_step`` (batch → loss, scores, targets) and an ``evaluate`` (→ validation metrics);
the loop owns everything else: gradient accumulation, clipping, the lr schedule, per-step and per-epoch
logging, early stopping on a monitored metric, the best and last checkpoints, and resuming.

Randomness inside an epoch (dropout, MixUp, the sample order) is seeded from ``(seed, epoch)`` alone, so a run
resumed from the checkpoint of epoch k replays epochs k+1… exactly as the uninterrupted run did.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import inspect
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import accelerate.optimizer
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from avlm.errors import ConfigError, TrainingError
from avlm.train.checkpoint import (
    RESUME_ONLY_FILES,
    CheckpointFiles,
    LoopState,
    checkpoint_files,
    gather_trainable_state,
    write_checkpoint,
)

if TYPE_CHECKING:
    from avlm.tracking.run_logger import RunLogger

logger = logging.getLogger(__name__)

# accelerate's optimizer.step() probes importlib for the optional lomo_optim package twice per step, uncached:
# 0.5 ms a step here, a tenth of a small head's step (bench/loop_overhead.py). Installed packages do not change
# while a process runs, so the answer is cached.
if hasattr(accelerate.optimizer, "is_lomo_available"):
    accelerate.optimizer.is_lomo_available = functools.cache(accelerate.optimizer.is_lomo_available)


def _zero_grad_fn(optimizer: torch.optim.Optimizer) -> Callable[[], None]:
    """``optimizer.zero_grad(set_to_none=True)`` as accelerate does it, with its per-step question asked once.

    ``AcceleratedOptimizer.zero_grad`` asks ``inspect.signature`` on every call whether the wrapped optimizer's
    ``zero_grad`` takes ``set_to_none``: 40-110 us a step, 1-3 % of a small head's step (bench/loop_overhead.py).
    The answer cannot change while a fit runs, so it is asked here, once an epoch, and the wrapped optimizer is
    zeroed as accelerate would zero it: on the micro-steps that end an optimizer step, with ``set_to_none=True``.
    Anything else (DeepSpeed's wrapper subclass, which leaves zeroing to DeepSpeed; an optimizer without
    ``set_to_none``; a plain torch optimizer) is called as it is.
    """
    if type(optimizer) is accelerate.optimizer.AcceleratedOptimizer:
        inner, gradient_state = optimizer.optimizer, optimizer.gradient_state
        if "set_to_none" in inspect.signature(inner.zero_grad).parameters:

            def zero_grad() -> None:
                if gradient_state.sync_gradients:
                    inner.zero_grad(set_to_none=True)

            return zero_grad
    return functools.partial(optimizer.zero_grad, set_to_none=True)


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
        sync_every_steps: optimizer steps between reads of the step losses from the device. They are logged and
            checked for NaN/inf a window at a time (and at every epoch's end), so the host never waits for the
            device inside a window; a non-finite loss stops the training up to this many steps after it appeared,
            always before a checkpoint is written.
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
    sync_every_steps: int = 32

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "grad_accum_steps", "sync_every_steps"):
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
    # loss terms and step statistics, logged per epoch as train/<name> (a name holding "/" as it is)
    parts: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


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
    """True for several processes on a machine without accelerators (``torchrun``, or ``accelerate launch
    --multi_gpu`` as ``avlm.launch`` starts them on a CPU): accelerate then needs ``cpu=True`` to set up gloo DDP."""
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


class _EpochTally:
    """One epoch's losses, loss terms and scores, kept on the device and read back a window at a time.

    Reading a value (``.item()``) makes the host wait for the device to finish the step; reading a window of
    ``sync_every_steps`` optimizer steps in one transfer lets the host queue the next steps meanwhile.
    """

    def __init__(self, accelerator: Accelerator, epoch: int) -> None:
        self.accelerator = accelerator
        self.epoch = epoch
        self.losses: list[float] = []  # every micro-batch's loss read back so far, averaged over processes
        self.parts: dict[str, list[float]] = {}
        self.scores: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.last_step_loss = self.last_lr = float("nan")  # what the progress bar shows
        self._losses: list[torch.Tensor] = []  # the window not read back yet
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._steps: list[int] = []  # optimizer step of each micro-batch in the window
        self._step_ends: list[tuple[int, float]] = []  # (window index, lr) of the micro-batches that ended a step

    def add(self, out: StepOutput, step: int, keep_scores: bool) -> None:
        """Keep one micro-batch's outputs (no host sync); ``step`` is the optimizer step it belongs to."""
        self._losses.append(out.loss.detach())
        for name, value in out.parts.items():
            self._parts.setdefault(name, []).append(value.detach())
        self._steps.append(step)
        if keep_scores:
            self.scores.append(out.scores.detach())
            self.targets.append(out.targets.detach())

    def end_step(self, lr: float) -> None:
        """The last micro-batch added ended an optimizer step taken at learning rate ``lr``."""
        self._step_ends.append((len(self._losses) - 1, lr))

    def read_back(self, run_logger: RunLogger) -> None:
        """Read the window back in one transfer (one reduction across processes), log its step losses and ``lr``.

        Raises:
            TrainingError: a loss in the window is NaN or infinite (after logging the steps before it).
        """
        if not self._losses:
            return
        series = [self._losses, *self._parts.values()]
        values = torch.cat([torch.stack(tensors) for tensors in series])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="mean")
        host = values.tolist()
        losses, offset = host[: len(self._losses)], len(self._losses)
        for name, tensors in self._parts.items():
            self.parts.setdefault(name, []).extend(host[offset : offset + len(tensors)])
            offset += len(tensors)
        bad = next((i for i, loss in enumerate(losses) if not math.isfinite(loss)), len(losses))
        for index, lr in self._step_ends:
            if index >= bad:
                break
            run_logger.log_metrics({"train/step_loss": losses[index], "lr": lr}, step=self._steps[index])
            self.last_step_loss, self.last_lr = losses[index], lr
        if bad < len(losses):
            raise self._non_finite(losses[bad], self._steps[bad])
        self.losses.extend(losses)
        self._losses, self._parts, self._steps, self._step_ends = [], {}, [], []

    def raise_if_not_finite_locally(self, err: BaseException) -> None:
        """Raise the NaN error if this process's window holds a non-finite loss: weights a NaN step wrote make
        later steps fail in ways that say nothing of the cause. Local only: a collective here could hang."""
        for loss, step in zip(torch.stack(self._losses).tolist() if self._losses else [], self._steps, strict=True):
            if not math.isfinite(loss):
                raise self._non_finite(loss, step) from err

    def _non_finite(self, loss: float, step: int) -> TrainingError:
        return TrainingError(
            f"loss is {loss} at epoch {self.epoch + 1}, optimizer step {step} (losses are checked every "
            "train.sync_every_steps steps, so the training stopped a few steps later, before any checkpoint): "
            "lower train.lr, turn on train.max_grad_norm, or check the inputs for NaN"
        )

    def gathered_scores(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's scores and targets from every process, as float arrays (one gather per epoch).

        The order is process-major, not batch-major as the loader yielded them: the training metrics (AP, means)
        do not depend on the order of the samples.
        """
        scores, targets = torch.cat(self.scores), torch.cat(self.targets)
        if self.accelerator.num_processes > 1:
            # plain gather: training batches are whole (drop_last), nothing to trim
            scores, targets = self.accelerator.gather((scores, targets))
        return scores.float().cpu().numpy(), targets.float().cpu().numpy()


class _CheckpointWriter:
    """One background thread that writes the checkpoints, so the training does not wait for the disk.

    A save waits for the previous one (checkpoints land in order and at most one snapshot waits in memory);
    ``on_checkpoint`` runs on the writer thread once a folder is complete; an error in the writer is raised in
    the training thread at its next sync point (:meth:`check`), save or :meth:`close`.
    """

    def __init__(self, checkpoint_dir: Path, on_checkpoint: Callable[[Path, str], None] | None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.on_checkpoint = on_checkpoint
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="avlm-checkpoint")
        self._pending: concurrent.futures.Future | None = None

    def save(self, files: CheckpointFiles, with_best: bool) -> None:
        """Queue ``last`` (and ``best`` first, sharing its files, when ``with_best``) after the previous save."""
        self.wait()
        self._pending = self._executor.submit(self._write, files, with_best)

    def check(self) -> None:
        """Raise the error of a save that has failed, without waiting for one still running."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for the last save. With ``raise_errors=False`` (the training already failed) its error is logged,
        so that it does not hide the training's own."""
        try:
            self.wait()
        except Exception:
            if raise_errors:
                raise
            logger.exception("writing the last checkpoint failed as well")
        finally:
            self._executor.shutdown()

    def _write(self, files: CheckpointFiles, with_best: bool) -> None:
        best = None
        if with_best:  # the same epoch's best and last differ by the optimizer files only
            best = self._write_one("best", {k: v for k, v in files.items() if k not in RESUME_ONLY_FILES}, None)
            files = {k: v for k, v in files.items() if k in RESUME_ONLY_FILES}
        self._write_one("last", files, best)

    def _write_one(self, kind: str, files: CheckpointFiles, base: Path | None) -> Path:
        directory = self.checkpoint_dir / kind
        try:
            path = write_checkpoint(directory, files, base=base)
        except Exception as err:
            raise TrainingError(f"writing the {kind} checkpoint {directory} failed: {err}") from err
        if self.on_checkpoint:
            try:
                self.on_checkpoint(path, kind)
            except Exception as err:
                raise TrainingError(f"on_checkpoint({path}, {kind!r}) failed: {err}") from err
        return path


def _train_epoch(
    *,
    epoch: int,
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
    run_logger: RunLogger,
    state: LoopState,
    writer: _CheckpointWriter,
    verbose: bool,
) -> bool:
    """Train, evaluate and log one epoch, updating ``state``; return whether the monitored metric improved."""
    set_seed(epoch_seed(seed, epoch))
    generator = torch.Generator().manual_seed(epoch_seed(seed, epoch) + accelerator.process_index)
    _set_epoch(train_loader, epoch)
    model.train()
    epoch_start = time.perf_counter()
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    zero_grad = _zero_grad_fn(optimizer)
    tally = _EpochTally(accelerator, epoch)
    progress = tqdm(
        train_loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        disable=not (verbose and accelerator.is_local_main_process),
        leave=False,
    )
    try:
        for batch in progress:
            with accelerator.accumulate(model):
                out = train_step(model, batch, generator)
                accelerator.backward(out.loss)
                if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(trainable_params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                zero_grad()
            tally.add(out, state.global_step + 1, keep_scores=train_metrics is not None)
            if accelerator.sync_gradients:
                state.global_step += 1
                tally.end_step(scheduler.get_last_lr()[0])
                if state.global_step % cfg.sync_every_steps == 0:
                    tally.read_back(run_logger)
                    writer.check()
                    # redrawn at tqdm's pace, not on every call
                    progress.set_postfix(loss=f"{tally.last_step_loss:.4f}", lr=f"{tally.last_lr:.2e}", refresh=False)
    except TrainingError:
        raise
    except Exception as err:
        tally.raise_if_not_finite_locally(err)
        raise
    tally.read_back(run_logger)  # before the evaluation and the checkpoint: NaN weights never reach a file
    writer.check()
    train_seconds = time.perf_counter() - epoch_start

    model.eval()
    val_metrics = dict(evaluate(model))
    row: dict[str, float] = {"epoch": epoch + 1, "train/loss": float(np.mean(tally.losses))}
    # a part already in a namespace (``scst/reward_mean``) keeps its name; the others are train/<name>
    row.update({(name if "/" in name else f"train/{name}"): float(np.mean(v)) for name, v in tally.parts.items()})
    if train_metrics is not None:
        epoch_metrics = train_metrics(*tally.gathered_scores())
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
    return improved


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
    run_logger: RunLogger,
    checkpoint_dir: str | Path,
    config_yaml: str,
    state: LoopState | None = None,
    on_checkpoint: Callable[[Path, str], None] | None = None,
    verbose: bool = True,
) -> LoopState:
    """Train until ``cfg.epochs`` or early stopping; return the final loop state.

    Every epoch logs ``train/loss``, the mean of each loss term in ``StepOutput.parts`` and the recipe's
    ``train_metrics`` of the gathered scores (both prefixed ``train/``), its validation metrics, ``lr`` and ``epoch``
    at the current optimizer step; every optimizer step logs ``train/step_loss`` and ``lr`` (sent a window of
    ``cfg.sync_every_steps`` steps at a time, see :class:`TrainConfig`).
    The main process writes ``checkpoint_dir/last`` (with optimizer state) every epoch and ``checkpoint_dir/best``
    whenever the monitored metric improves (``best`` first; ``last`` then hard-links its files), on a background
    thread that the next epoch's save and the end of ``fit`` wait for; ``on_checkpoint(path, "best"|"last")`` is
    called on that thread once the folder is complete. The weights saved are the full (unsharded) trainable
    parameters, gathered on every rank (:func:`avlm.train.checkpoint.gather_trainable_state`, correct under DDP,
    FSDP and DeepSpeed ZeRO-3).
    ``verbose=False`` drops the per-epoch progress bar and log line (to DEBUG) for callers that train many small
    models and show their own progress.

    Raises:
        TrainingError: the loss became NaN or infinite (the message names the epoch and step), or a checkpoint
            could not be written.
    """
    state = state or LoopState()
    writer = _CheckpointWriter(Path(checkpoint_dir), on_checkpoint)
    try:
        for epoch in range(state.epoch, cfg.epochs):
            improved = _train_epoch(
                epoch=epoch,
                accelerator=accelerator,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                train_loader=train_loader,
                train_step=train_step,
                train_metrics=train_metrics,
                evaluate=evaluate,
                cfg=cfg,
                seed=seed,
                run_logger=run_logger,
                state=state,
                writer=writer,
                verbose=verbose,
            )
            weights = gather_trainable_state(accelerator, model)  # a collective under FSDP / ZeRO-3: every rank
            if accelerator.is_main_process:
                files = checkpoint_files(
                    trainable=weights, config_yaml=config_yaml, state=state, optimizer=optimizer, scheduler=scheduler
                )
                writer.save(files, with_best=improved)
            accelerator.wait_for_everyone()
            if state.stopped_early:
                logger.info("early stopping: %s did not improve for %d epochs", cfg.monitor, cfg.patience)
                break
    except BaseException:
        writer.close(raise_errors=False)
        raise
    writer.close()
    accelerator.wait_for_everyone()  # no rank reads the checkpoints before the main process has written them
    return state
