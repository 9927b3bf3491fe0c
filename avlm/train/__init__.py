"""The accelerate training loop, optimizer/schedule, and safetensors checkpoints."""

from avlm.train.checkpoint import (
    LoopState,
    load_state,
    load_trainable,
    restore_optimization,
    save_checkpoint,
)
from avlm.train.lifecycle import (
    RecipeRun,
    Registration,
    Resume,
    checkpoint_config_yaml,
    ensure_writable,
    load_best_on_every_rank,
    open_run,
    resume_from,
)
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
from avlm.train.stages import StageOptimization, TrainingStage, fit_in_stages

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
    "RecipeRun",
    "Registration",
    "Resume",
    "checkpoint_config_yaml",
    "ensure_writable",
    "open_run",
    "resume_from",
    "restore_optimization",
    "save_checkpoint",
    "StageOptimization",
    "TrainingStage",
    "fit_in_stages",
]
