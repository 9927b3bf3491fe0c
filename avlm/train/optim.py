"""Optimizer and learning-rate schedule: AdamW over parameter groups, transformers' warmup schedules."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import LambdaLR
from transformers import get_scheduler

OPTIMIZERS = ("adamw", "sgd")


def build_optimizer(param_groups: Sequence[dict], kind: str = "adamw", momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW (or SGD with momentum) over groups that each carry their own ``lr`` and ``weight_decay``.

    Args:
        param_groups: torch parameter groups, each with ``params``, ``lr`` and ``weight_decay``.
        kind: ``adamw`` (decoupled weight decay) or ``sgd`` (L2 weight decay, heavy-ball ``momentum``).
        momentum: SGD momentum; ignored by AdamW.
    """
    groups = [dict(g) for g in param_groups]
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=momentum)
    raise ValueError(f"unknown optimizer {kind!r}: use one of {list(OPTIMIZERS)}")


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    name: str,
    num_training_steps: int,
    warmup_ratio: float,
    frozen_steps_by_group: Sequence[int] | None = None,
) -> LambdaLR:
    """transformers' schedule (``cosine``, ``linear``, ``constant_with_warmup``…) for every parameter group.

    ``frozen_steps_by_group[i] = n`` keeps group ``i`` at lr 0 for its first ``n`` steps, then runs the same
    schedule over the remaining steps: staged training (head first, backbone later) without rebuilding the
    optimizer, which DDP would not allow (its set of trained parameters is fixed when the model is wrapped).
    """
    num_warmup_steps = math.ceil(warmup_ratio * num_training_steps)
    base = get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)
    schedule = base.lr_lambdas[0]
    if not frozen_steps_by_group or not any(frozen_steps_by_group):
        return base
    lambdas = []
    for frozen in frozen_steps_by_group:
        if frozen <= 0:
            lambdas.append(schedule)
            continue
        remaining = max(1, num_training_steps - frozen)
        late = get_scheduler(
            name,
            optimizer,
            num_warmup_steps=math.ceil(warmup_ratio * remaining),
            num_training_steps=remaining,
        ).lr_lambdas[0]
        lambdas.append(_gated(late, frozen))
    # LambdaLR starts from each group's ``initial_lr``, which the schedulers above only read, so building
    # several on one optimizer is harmless.
    return LambdaLR(optimizer, lambdas)


class _gated:
    """lr multiplier 0 for the first ``frozen`` steps, then ``schedule(step - frozen)`` (a class: picklable)."""

    def __init__(self, schedule, frozen: int):
        self.schedule = schedule
        self.frozen = frozen

    def __call__(self, step: int) -> float:
        return 0.0 if step < self.frozen else self.schedule(step - self.frozen)
