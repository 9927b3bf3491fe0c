"""The shared loop on its own: loss terms and training metrics per epoch, early stopping, checkpoints."""

from __future__ import annotations

import dataclasses
import inspect
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from avlm.errors import TrainingError
from avlm.tracking import NullLogger
from avlm.train import StepOutput, TrainConfig, build_scheduler, fit, load_state, load_trainable, make_accelerator


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
    )
    assert state.epoch == 3 and state.stopped_early and state.best_epoch == 1


def run_fit(task: dict[str, Any], cfg: TrainConfig, tmp_path, **kwargs: Any):
    kwargs.setdefault("train_step", squared_error_step)
    kwargs.setdefault("evaluate", lambda model: {"val/constant": 1.0})
    kwargs.setdefault("run_logger", NullLogger())
    return fit(**task, train_metrics=None, cfg=cfg, seed=0, checkpoint_dir=tmp_path, config_yaml="x: 1\n", **kwargs)


def test_accumulated_micro_batches_take_the_steps_of_the_whole_batch(tmp_path):
    # the gradients of both micro-batches reach the optimizer step: zeroed after it, never between micro-batches
    whole = TrainConfig(epochs=2, batch_size=16, lr=0.1, monitor="val/constant", patience=0)
    halves = dataclasses.replace(whole, batch_size=8, grad_accum_steps=2)
    # one after the other: accelerate's gradient state (the accumulation count) is one per process
    whole_task = regression_task(whole)
    whole_state = run_fit(whole_task, whole, tmp_path / "whole")
    halves_task = regression_task(halves)
    halves_state = run_fit(halves_task, halves, tmp_path / "halves")
    assert whole_state.global_step == halves_state.global_step == 8
    for name in ("weight", "bias"):
        torch.testing.assert_close(
            getattr(halves_task["model"], name), getattr(whole_task["model"], name), rtol=1e-5, atol=1e-6
        )
    assert all(p.grad is None for p in halves_task["model"].parameters())  # zeroed after the last step


def test_the_steps_do_not_ask_for_the_optimizer_signature(tmp_path, monkeypatch):
    # accelerate's zero_grad inspects the optimizer's signature on every call (~40 us a step): fit asks once an epoch
    calls: list[int] = []
    signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda *args, **kwargs: calls.append(1) or signature(*args, **kwargs))
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.1, monitor="val/constant", patience=0)
    state = run_fit(regression_task(cfg), cfg, tmp_path)
    assert state.global_step == 32
    assert len(calls) <= cfg.epochs


def nan_at_step(bad_step: int, calls: list[int]):
    """A train step whose loss (hence the gradients, hence the weights) turns NaN at optimizer step ``bad_step``."""

    def step(model: torch.nn.Module, batch: Any, generator: torch.Generator) -> StepOutput:
        calls.append(1)
        out = squared_error_step(model, batch, generator)
        return StepOutput(loss=out.loss * float("nan")) if len(calls) == bad_step else out

    return step


def test_nan_loss_stops_the_training_naming_epoch_and_step_before_any_checkpoint_holds_it(tmp_path):
    # 4 steps an epoch, losses read back every 4: the NaN of step 6 is seen at step 8, the end of epoch 2
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.1, monitor="val/constant", patience=0, sync_every_steps=4)
    task, logger, calls = regression_task(cfg), RecordingLogger(), []
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, optimizer step 6 \(losses are checked"):
        run_fit(task, cfg, tmp_path, train_step=nan_at_step(6, calls), run_logger=logger)
    assert len(calls) == 8  # detected a window later, as documented
    assert [step for step, m in logger.steps if "train/step_loss" in m] == [1, 2, 3, 4, 5]  # the points before it
    assert not torch.isfinite(task["model"].weight).all()  # the optimizer did write NaN weights in memory…
    assert load_state(tmp_path / "last").epoch == 1  # …but no checkpoint holds them
    assert all(torch.isfinite(v).all() for v in load_trainable(tmp_path / "last").values())


def test_a_failure_caused_by_nan_weights_is_reported_as_the_nan_loss(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.1, monitor="val/constant", patience=0, sync_every_steps=4)
    task, calls = regression_task(cfg), []
    nan_step = nan_at_step(2, calls)

    def fragile_step(model: torch.nn.Module, batch: Any, generator: torch.Generator) -> StepOutput:
        if not torch.isfinite(model.weight).all():  # as torch.multinomial does on NaN probabilities
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return nan_step(model, batch, generator)

    with pytest.raises(TrainingError, match=r"loss is nan at epoch 1, optimizer step 2") as caught:
        run_fit(task, cfg, tmp_path, train_step=fragile_step)
    assert isinstance(caught.value.__cause__, RuntimeError)


def test_checkpoints_are_written_off_the_training_thread_complete_before_on_checkpoint(tmp_path):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=0.1, monitor="val/mse", monitor_mode="min", patience=0)
    task = regression_task(cfg)
    model = task["model"]
    val_by_epoch = iter([3.0, 1.0, 2.0, 4.0])  # best at epoch 2
    weights_seen: list[torch.Tensor] = []
    calls: list[tuple[str, int, str]] = []

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        weights_seen.append(model.weight.detach().clone())  # what the epoch's checkpoint must hold
        return {"val/mse": next(val_by_epoch)}

    def on_checkpoint(path: Path, kind: str) -> None:
        calls.append((kind, load_state(path).epoch, threading.current_thread().name))
        assert path == tmp_path / kind and sorted(load_trainable(path)) == ["bias", "weight"]

    state = run_fit(task, cfg, tmp_path, evaluate=evaluate, on_checkpoint=on_checkpoint)
    assert [(kind, epoch) for kind, epoch, _ in calls] == [
        ("best", 1), ("last", 1), ("best", 2), ("last", 2), ("last", 3), ("last", 4),
    ]  # fmt: skip
    assert all(name.startswith("avlm-checkpoint") for _, _, name in calls)
    assert state.best_epoch == 2
    # snapshots, not views: epoch 2's best is epoch 2's weights although two more epochs trained meanwhile
    torch.testing.assert_close(load_trainable(tmp_path / "best")["weight"], weights_seen[1], rtol=0, atol=0)
    torch.testing.assert_close(load_trainable(tmp_path / "last")["weight"], model.weight.detach(), rtol=0, atol=0)
    assert not (tmp_path / "best" / "optimizer.safetensors").exists()


def test_same_epoch_best_and_last_share_their_files(tmp_path):
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, monitor="val/constant", patience=0)
    run_fit(regression_task(cfg), cfg, tmp_path)
    for name in ("trainable.safetensors", "state.json", "config.yaml"):
        assert (tmp_path / "best" / name).samefile(tmp_path / "last" / name)
    assert (tmp_path / "last" / "optimizer.safetensors").is_file()


def test_an_on_checkpoint_error_stops_the_training_at_the_next_sync_point(tmp_path):
    cfg = TrainConfig(epochs=10, batch_size=16, lr=0.1, monitor="val/constant", patience=0, sync_every_steps=1)
    calls: list[int] = []

    def counting_step(model: torch.nn.Module, batch: Any, generator: torch.Generator) -> StepOutput:
        calls.append(1)
        return squared_error_step(model, batch, generator)

    def failing_upload(path: Path, kind: str) -> None:
        raise OSError("artifact store unreachable")

    with pytest.raises(TrainingError, match=r"on_checkpoint\(.*best'\) failed: artifact store unreachable"):
        run_fit(regression_task(cfg), cfg, tmp_path, train_step=counting_step, on_checkpoint=failing_upload)
    assert len(calls) <= 8  # at the latest when epoch 2 saves, the first save's error surfaces


def test_a_checkpoint_write_error_names_the_folder(tmp_path, monkeypatch):
    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("avlm.train.loop.write_checkpoint", disk_full)
    cfg = TrainConfig(epochs=1, batch_size=16, lr=0.1, monitor="val/constant", patience=0)
    with pytest.raises(TrainingError, match=rf"writing the best checkpoint {tmp_path / 'best'} failed: .*No space"):
        run_fit(regression_task(cfg), cfg, tmp_path)
