"""The run lifecycle every recipe shares: resume, the run and its folder, training, the best checkpoint, registration.

A recipe's ``main`` reads as its method::

    cfg, resume = resume_from(cfg)                  # a crashed run's own config and checkpoints, or nothing
    data, model = ...                               # bad data fails here, before any MLflow run exists
    with open_run(cfg, recipe=..., run_name=..., train_cfg=cfg.train, resume=resume) as run:
        if run.is_new: record_run_start(run.logger, ...)
        optimizer, scheduler = ...
        run.restore(model, optimizer, scheduler)
        state = run.fit(model=..., train_step=..., evaluate=..., ...)
        run.load_best(model)
        ...                                         # final metrics, plots
        run.register_and_promote(cfg.registry, recipe=..., metric_value=state.best_value, tags=...)

and what happens around the method (where the run's files go, how a crashed run continues on any machine, how the
best checkpoint is registered and promoted) is written here once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from avlm.errors import AvlmError, ConfigError
from avlm.tracking.run_logger import RunLogger
from avlm.train.checkpoint import LoopState, load_state, load_trainable, restore_optimization
from avlm.train.loop import StepOutput, TrainConfig, distributed_state, fit, make_accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_KINDS = ("last", "best")


@dataclasses.dataclass
class Resume:
    """A crashed run to continue: its checkpoints on this machine and where its loop stopped."""

    last: Path
    best: Path | None
    state: LoopState


@dataclasses.dataclass
class Registration:
    """What the registry decided for a run's best checkpoint."""

    version: str
    promoted: bool


def _on_main_then_everywhere(work: Callable[[], Any]) -> Any:
    """Run ``work`` on the main process only (it talks to MLflow) and hand its result, or its error, to every rank,
    so that a refusal stops all ranks with the same message instead of leaving the others waiting at a barrier."""
    from accelerate.utils import broadcast_object_list

    dist = distributed_state()
    outcome: list[Any] = [None, None]
    if dist.is_main_process:
        try:
            outcome = [work(), None]
        except AvlmError as err:
            outcome = [None, err]
    if dist.num_processes > 1:
        outcome = broadcast_object_list(outcome)
    if outcome[1] is not None:
        raise outcome[1]
    return outcome[0]


def _refuse_finished(run_id: str, tracking_uri: str) -> None:
    from avlm.tracking.artifacts import run_status

    if run_status(run_id, tracking_uri) == "FINISHED":
        raise ConfigError(
            f"config key 'resume': MLflow run {run_id} is FINISHED; there is nothing to resume (its results and "
            "registered model stand). Start a new run instead, e.g. with another seed."
        )


def resume_from(cfg: Any) -> tuple[Any, Resume | None]:
    """The configuration and checkpoints to start a recipe with: ``cfg`` itself, or for ``cfg.resume`` (an MLflow
    run id, or a run's ``checkpoints/last`` folder) the configuration the crashed run started with and its last and
    best checkpoints, so that it continues unchanged into the same MLflow run, on this machine or any other.

    A run id's checkpoints are downloaded from the run's artifacts by the main process (the other ranks never talk to
    MLflow). A FINISHED run is refused before anything is created or changed.

    Raises:
        ConfigError: ``resume`` is not a run id or checkpoint folder, escapes ``output_dir``, names a FINISHED run,
            or names a run without checkpoints.
    """
    if not cfg.resume:
        return cfg, None
    from avlm.config import config_from_dict, validate_resume

    validate_resume(cfg.resume, cfg.output_dir)
    tracking_uri = cfg.tracking.tracking_uri
    folder = Path(cfg.resume)
    if folder.is_dir():
        state = load_state(folder)
        if state.run_id:
            _on_main_then_everywhere(lambda: _refuse_finished(state.run_id, tracking_uri))
        best = folder.parent / "best"
        resume = Resume(last=folder, best=best if best.is_dir() else None, state=state)
    else:
        from avlm.tracking.artifacts import download_run_folders

        local = Path(cfg.output_dir) / "resumed" / cfg.resume

        def download() -> dict[str, Path]:
            _refuse_finished(cfg.resume, tracking_uri)
            folders = {kind: f"checkpoints/{kind}" for kind in CHECKPOINT_KINDS}
            found = download_run_folders(cfg.resume, folders, local, tracking_uri)
            if "last" not in found:
                raise ConfigError(f"config key 'resume': MLflow run {cfg.resume} has no checkpoints/last to go on from")
            return found

        found = _on_main_then_everywhere(download)
        resume = Resume(last=found["last"], best=found.get("best"), state=load_state(found["last"]))
    saved = yaml.safe_load((resume.last / "config.yaml").read_text())
    saved["resume"] = cfg.resume
    return config_from_dict(type(cfg), saved), resume


def checkpoint_config_yaml(cfg: Any) -> str:
    """The config a checkpoint carries: the resolved one, without ``resume`` (a checkpoint rebuilds a model, it does
    not point back at the run it continued)."""
    from avlm.config import config_to_dict

    return yaml.safe_dump({**config_to_dict(cfg), "resume": ""}, sort_keys=False)


def ensure_writable(folder: str | Path, key: str = "output_dir") -> Path:
    """Create ``folder`` and write a file in it now, so an unwritable output folder stops the run before it trains.

    Raises:
        ConfigError: naming ``key``, the folder and the OS error.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".avlm-write-check-"):
            pass
    except OSError as err:
        raise ConfigError(f"config key '{key}': cannot write to {folder.resolve()} ({err.strerror or err})") from err
    return folder


@dataclasses.dataclass
class RecipeRun:
    """One training's run: the accelerator, the logger (a real one on the main process only), the local folder and
    what a resumed run brings. Made by :func:`open_run`."""

    accelerator: Any
    logger: RunLogger
    run_id: str | None
    output_dir: Path
    config_yaml: str
    seed: int
    resume: Resume | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def is_new(self) -> bool:
        """False for a resumed run, whose config, tags and run card were recorded when it started."""
        return self.resume is None

    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def restore(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        """Load a resumed run's trainable weights, optimizer and scheduler state (before ``accelerator.prepare``)."""
        if self.resume is None:
            return
        if self.accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
            # `last` holds the trainable weights gathered whole but only rank 0's shard of the optimizer state
            raise ConfigError(
                f"config key 'resume': resuming a {self.accelerator.distributed_type.value} run is not supported "
                "(its checkpoints hold rank 0's shard of the optimizer state only); start the run again"
            )
        from avlm.models import load_trainable_state_dict

        load_trainable_state_dict(model, load_trainable(self.resume.last))
        restore_optimization(self.resume.last, optimizer, scheduler)
        logger.info("resumed from %s after epoch %d", self.resume.last, self.resume.state.epoch)

    def fit(
        self,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        train_loader: torch.utils.data.DataLoader,
        train_step: Callable[[torch.nn.Module, Any, torch.Generator], StepOutput],
        evaluate: Callable[[torch.nn.Module], Mapping[str, float]],
        train_cfg: TrainConfig,
        train_metrics: Callable[..., Mapping[str, float]] | None = None,
        before_upload: Callable[[Path], None] | None = None,
        state: LoopState | None = None,
    ) -> LoopState:
        """:func:`avlm.train.fit` with this run's logger, seed, checkpoints and resumed state; each checkpoint is
        uploaded to the run as ``checkpoints/{last,best}`` (after ``before_upload(folder)`` adds its extra files).
        ``state`` continues a training that this process already ran (the next stage of a staged run)."""

        def upload(path: Path, kind: str) -> None:
            if before_upload is not None:
                before_upload(path)
            self.logger.log_artifacts(path, f"checkpoints/{kind}")

        if state is None:
            state = self.resume.state if self.resume else LoopState()
        state.run_id = self.run_id
        return fit(
            accelerator=self.accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            train_step=train_step,
            train_metrics=train_metrics,
            evaluate=evaluate,
            cfg=train_cfg,
            seed=self.seed,
            run_logger=self.logger,
            checkpoint_dir=self.checkpoint_dir,
            config_yaml=self.config_yaml,
            state=state,
            on_checkpoint=upload,
        )

    def load_best(self, model: torch.nn.Module) -> torch.nn.Module:
        """The best checkpoint's weights in ``model`` on every rank, in eval mode (a resumed run with no epoch left
        to train never passed through the loop's evaluation); returns the unwrapped model."""
        model.eval()
        return load_best_on_every_rank(self.accelerator, model, self.checkpoint_dir / "best")

    def register_and_promote(
        self,
        registry_cfg: Any,
        *,
        recipe: str,
        metric_value: float,
        tags: Mapping[str, str],
        aliases: Sequence[str] = (),
        **model_kwargs: Any,
    ) -> Registration | None:
        """Register the best checkpoint as a new version (alias ``candidate``, and ``aliases``) and put it through
        the declared promotion gate; the decision is tagged on the version and on the run. Main process only; None
        when registration is off or on the other ranks. ``model_kwargs`` go to ``log_and_register`` (input
        example…)."""
        if not (self.is_main_process and registry_cfg.register):
            return None
        from avlm.tracking.registry import log_and_register, promote_if_better

        self.logger.flush()  # the version's run page shows the whole history
        version = log_and_register(
            registry_cfg,
            checkpoint_dir=self.checkpoint_dir / "best",
            recipe=recipe,
            run_id=self.run_id,
            metric_value=metric_value,
            extra_tags=dict(tags),
            aliases=aliases,
            **model_kwargs,
        )
        decision = promote_if_better(registry_cfg, version.version)
        self.logger.set_tags(
            {"registered_version": version.version, "promotion": "promoted" if decision.promoted else "rejected"}
        )
        return Registration(version=str(version.version), promoted=decision.promoted)


def _seed_checkpoints(resume: Resume, checkpoint_dir: Path) -> None:
    """Put a resumed run's downloaded checkpoints where this run keeps its own, unless an at-least-as-recent copy is
    there already: the final evaluation loads ``checkpoints/best`` even when no later epoch improves on it."""
    for kind, source in (("last", resume.last), ("best", resume.best)):
        target = checkpoint_dir / kind
        if source is None or (target.exists() and target.resolve() == source.resolve()):
            continue
        if target.exists() and load_state(target).epoch >= load_state(source).epoch:
            continue
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


@contextlib.contextmanager
def open_run(
    cfg: Any, *, recipe: str, run_name: str, train_cfg: TrainConfig, resume: Resume | None
) -> Iterator[RecipeRun]:
    """The accelerator and the MLflow run of one training (a new one, the one ``mlflow run`` made, or the resumed
    one), with its local folder ``<output_dir>/<run name>-<run id[:8]>`` (the same on every rank).

    Checked before the MLflow run exists: the batch splits evenly across processes, the output folder is writable.
    The run ends FINISHED, FAILED on an exception, KILLED on an interrupt (see ``avlm.tracking.tracked_run``).
    """
    from accelerate.utils import broadcast_object_list

    from avlm.tracking import tracked_run

    accelerator = make_accelerator(train_cfg)
    if train_cfg.batch_size % accelerator.num_processes:
        raise ConfigError(
            f"config key 'train.batch_size' ({train_cfg.batch_size}) must be divisible by the "
            f"number of processes ({accelerator.num_processes})"
        )
    ensure_writable(cfg.output_dir)

    def run_folder(run_id: str) -> Path:
        return Path(cfg.output_dir) / f"{run_name}-{run_id[:8]}"

    with tracked_run(
        cfg.tracking,
        recipe=recipe,
        run_name=run_name,
        is_main_process=accelerator.is_main_process,
        resume_run_id=resume.state.run_id if resume else None,
        run_dir=run_folder,  # writes that wait for the tracking server are kept in its tracking/ folder
    ) as run_logger:
        (run_id,) = broadcast_object_list([run_logger.run_id])  # every rank uses the main run's folder
        run = RecipeRun(
            accelerator=accelerator,
            logger=run_logger,
            run_id=run_logger.run_id,
            output_dir=run_folder(run_id or "local"),
            config_yaml=checkpoint_config_yaml(cfg),
            seed=cfg.seed,
            resume=resume,
        )
        if resume is not None and accelerator.is_main_process:
            _seed_checkpoints(resume, run.checkpoint_dir)
        yield run


def load_best_on_every_rank(accelerator: Any, model: torch.nn.Module, best_dir: str | Path) -> torch.nn.Module:
    """Load the best checkpoint's trainable weights into the unwrapped model on every rank; return that model.

    Only the main process wrote the checkpoint (other nodes may not see its disk), so it loads the file and the
    other ranks receive the weights by broadcast.
    """
    from accelerate.utils import broadcast

    from avlm.models import load_trainable_state_dict

    accelerator.wait_for_everyone()
    net = accelerator.unwrap_model(model)
    if accelerator.is_main_process:
        load_trainable_state_dict(net, load_trainable(best_dir))
    if accelerator.num_processes > 1:
        for param in (p for p in net.parameters() if p.requires_grad):
            param.data.copy_(broadcast(param.data.clone(), from_process=0))
    return net
