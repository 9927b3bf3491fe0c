"""The accelerate training loop, optimizer/schedule, and safetensors checkpoints."""

from avlm.train.checkpoint import (
    LoopState,
    load_state,
    load_trainable,
    restore_optimization,
    save_checkpoint,
)
from avlm.train.lifecycle import load_best_on_every_rank, resolve_resume, resume_from
from avlm.train.loop import (
    StepOutput,
    TrainConfig,
    distributed_state,
    epoch_seed,
    fit,
    make_accelerator,
    optimizer_steps_per_epoch,
)
from avlm.train.optim import build_optimizer, build_scheduler

__all__ = [
    "LoopState",
    "StepOutput",
    "TrainConfig",
    "build_optimizer",
    "build_scheduler",
    "distributed_state",
    "epoch_seed",
    "fit",
    "load_state",
    "load_trainable",
    "make_accelerator",
    "optimizer_steps_per_epoch",
    "load_best_on_every_rank",
    "resolve_resume",
    "resume_from",
    "restore_optimization",
    "save_checkpoint",
]
