"""The shared loop on its own: loss terms and training metrics per epoch, early stopping, checkpoints."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from avlm.tracking import NullLogger
from avlm.train import StepOutput, TrainConfig, build_scheduler, fit, load_state, make_accelerator


class RecordingLogger(NullLogger):
    def __init__(self) -> None:
        self.steps: list[tuple[int, dict[str, Any]]] = []

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        self.steps.append((step, dict(metrics)))


def regression_task(cfg: TrainConfig) -> dict[str, Any]:
    torch.manual_seed(0)
    inputs = torch.randn(64, 4)
    targets = inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0])
    model = torch.nn.Linear(4, 1)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(inputs, targets), batch_size=cfg.batch_size, shuffle=False
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, name="constant_with_warmup", num_training_steps=100, warmup_ratio=0.0)
    accelerator = make_accelerator(cfg)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    return dict(accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, train_loader=loader)


def squared_error_step(model: torch.nn.Module, batch: Any, generator: torch.Generator) -> StepOutput:
    inputs, targets = batch
    error = (model(inputs).squeeze(-1) - targets) ** 2
    half = error[: len(error) // 2].mean()
    # two named terms whose sum is the loss; no per-sample scores (no train_metrics)
    return StepOutput(loss=error.mean(), parts={"first_half": half, "second_half": error.mean() - half})


def test_loss_terms_are_logged_per_epoch_and_the_model_learns(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.1, monitor="val/mse", monitor_mode="min", patience=0)
    task = regression_task(cfg)
    logger = RecordingLogger()
    val_inputs = torch.randn(32, 4)
    val_targets = val_inputs @ torch.tensor([1.0, -2.0, 0.5, 3.0])

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        with torch.no_grad():
            return {"val/mse": float(((model(val_inputs).squeeze(-1) - val_targets) ** 2).mean())}

    state = fit(
        **task,
        train_step=squared_error_step,
        train_metrics=None,
        evaluate=evaluate,
        cfg=cfg,
        seed=0,
        run_logger=logger,
        checkpoint_dir=tmp_path,
        config_yaml="x: 1\n",
        trainable_state=lambda: {k: v.detach().clone() for k, v in task["model"].state_dict().items()},
    )
    assert [row["epoch"] for row in state.history] == [1, 2, 3, 4]
    for row in state.history:
        assert row["train/first_half"] + row["train/second_half"] == pytest.approx(row["train/loss"], rel=1e-5)
    # each epoch's terms are the means of what its steps returned: 4 steps an epoch, step losses logged per step
    step_losses = [m["train/step_loss"] for _, m in logger.steps if "train/step_loss" in m]
    assert len(step_losses) == 16
    assert state.history[0]["train/loss"] == pytest.approx(np.mean(step_losses[:4]), rel=1e-6)
    assert state.history[-1]["val/mse"] < 0.5 * state.history[0]["val/mse"]
    assert state.best_epoch == int(np.argmin([r["val/mse"] for r in state.history])) + 1
    assert load_state(tmp_path / "best").best_epoch == state.best_epoch
    assert load_state(tmp_path / "last").epoch == 4


def test_early_stopping_stops_after_patience_epochs_without_improvement(tmp_path):
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.1, monitor="val/constant", patience=2)
    task = regression_task(cfg)
    state = fit(
        **task,
        train_step=squared_error_step,
        train_metrics=None,
        evaluate=lambda model: {"val/constant": 1.0},
        cfg=cfg,
        seed=0,
        run_logger=NullLogger(),
        checkpoint_dir=tmp_path,
        config_yaml="x: 1\n",
        trainable_state=lambda: {},
    )
    assert state.epoch == 3 and state.stopped_early and state.best_epoch == 1
