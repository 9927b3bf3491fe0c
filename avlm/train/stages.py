"""Staged training: a run that fits in stages, each from the previous stage's best checkpoint.

A stage trains up to its own epoch count with its own patience and learning rates; the next one starts from the
best checkpoint so far with a fresh optimizer and schedule (built by the recipe for that stage). Resume is by
:class:`~avlm.train.LoopState`: ``state.stage`` and ``state.stage_start_epoch`` say where a crashed run was.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch

from avlm.train.checkpoint import LoopState
from avlm.train.lifecycle import RecipeRun
from avlm.train.loop import StepOutput, TrainConfig

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainingStage:
    """One stage of the training: how long, how patient, at which learning rates.

    Attributes:
        number: 1-based.
        max_epochs: epochs this stage may run; 0 = until train.epochs.
        patience: epochs without improvement before the stage stops; 0 = never.
        lr / backbone_lr: head and backbone learning rates.
        backbone_frozen: the backbone's trainable blocks stay at lr 0 (they are trainable parameters from the start
            because DDP fixes the set of trained parameters when it wraps the model).
    """

    number: int
    max_epochs: int
    patience: int
    lr: float
    backbone_lr: float
    backbone_frozen: bool

    def end_epoch(self, start_epoch: int, total_epochs: int) -> int:
        """The epoch count at which this stage ends when it began at ``start_epoch``; never past ``total_epochs``."""
        return min(total_epochs, start_epoch + self.max_epochs) if self.max_epochs else total_epochs


class StageOptimization(Protocol):
    """Builds a stage's optimizer and scheduler for the (unwrapped) model, the stage starting at ``start_epoch``."""

    def __call__(
        self, model: torch.nn.Module, stage: TrainingStage, *, start_epoch: int
    ) -> tuple[torch.optim.Optimizer, Any]: ...


def fit_in_stages(
    run: RecipeRun,
    stages: Sequence[TrainingStage],
    stage_optimization: StageOptimization,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: LoopState,
    train_loader: torch.utils.data.DataLoader,
    train_step: Callable[[torch.nn.Module, Any, torch.Generator], StepOutput],
    evaluate: Callable[[torch.nn.Module], Mapping[str, float]],
    train_cfg: TrainConfig,
    train_metrics: Callable[..., Mapping[str, float]] | None = None,
    early_stop_ends_run: bool = False,
) -> LoopState:
    """:meth:`RecipeRun.fit` stage by stage, from ``state.stage`` (``optimizer`` and ``scheduler`` are that stage's,
    prepared); the run ends after the last stage or at ``train_cfg.epochs``.

    Between stages: ``stage{n}/best_<monitor>`` is logged, the best checkpoint is loaded and the next stage's
    optimization is built and prepared. With several stages each evaluation also logs ``stage``. A resumed stage
    that had stopped early is not fitted again; ``early_stop_ends_run`` makes an early stop end the run.
    """
    accelerator = run.accelerator
    stage = stages[state.stage - 1]

    def evaluate_in_stage(model: torch.nn.Module) -> dict[str, float]:
        return {**evaluate(model), "stage": stage.number}

    while True:
        if not state.stopped_early:  # a resumed stage that had stopped early is over
            state = run.fit(
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                train_loader=train_loader,
                train_step=train_step,
                train_metrics=train_metrics,
                evaluate=evaluate if len(stages) == 1 else evaluate_in_stage,
                train_cfg=dataclasses.replace(
                    train_cfg,
                    epochs=stage.end_epoch(state.stage_start_epoch, train_cfg.epochs),
                    patience=stage.patience,
                ),
                state=state,
            )
        if stage.number == len(stages) or state.epoch >= train_cfg.epochs:
            return state
        if state.stopped_early and early_stop_ends_run:
            logger.info(
                "stage %d stopped early and an early stop ends the run: no stage %d", stage.number, stage.number + 1
            )
            return state
        run.logger.log_metrics({f"stage{stage.number}/best_{train_cfg.monitor}": state.best_value},
                               step=state.global_step)  # fmt: skip
        stage = stages[stage.number]
        run.load_best(model)
        state.stage, state.stage_start_epoch = stage.number, state.epoch
        state.epochs_without_improvement, state.stopped_early = 0, False
        optimizer, scheduler = accelerator.prepare(
            *stage_optimization(accelerator.unwrap_model(model), stage, start_epoch=state.epoch)
        )
        logger.info("stage %d from stage %d's best checkpoint (epoch %d)", stage.number, stage.number - 1,
                    state.best_epoch)  # fmt: skip
