"""Overhead of the avlm training loop (``avlm.train.fit``, MLflow logging every step) over a plain PyTorch loop.

Run it::

    python bench/loop_overhead.py 2>/dev/null          # avlm vs plain, 30 rounds of 3 epochs x 1024 clips, ~3 min
    python bench/loop_overhead.py --variants all --rounds 18 2>/dev/null   # every variant below, ~6 min

Both sides train the same tiny model (the CVS attentive head, 48-d tokens) on the same random "cached tokens"
with BCE, AdamW, the same warmup + cosine schedule and gradient clipping, and run the same evaluation (val mAP)
after every epoch; a model this small makes the loop's per-step costs as visible as they can be. Variants, each
built fresh from the same seed and timed around the training only (model building, ``accelerator.prepare`` and
opening the MLflow run, with the writes that opening it queues, are setup, reported once at the end):

- ``plain``: a hand-written loop (forward, loss, backward, clip_grad_norm_, step, scheduler, zero_grad), no logging,
  no checkpoints, no training metrics, no progress bar.
- ``plain-ckpt``: the same, saving a checkpoint every epoch as a hand-written loop would (``torch.save`` of the
  model, optimizer and scheduler state dicts, one file, on the training thread).
- ``accelerate``: the plain loop on accelerate's prepared model, optimizer, loader and scheduler
  (``accelerator.backward``, ``accelerator.clip_grad_norm_``): what accelerate's wrappers cost by themselves.
- ``avlm``: ``fit`` as a recipe runs it: a real ``MLflowLogger`` on a temporary sqlite store (``train/step_loss``
  and ``lr`` every optimizer step, the epoch metrics every epoch), safetensors checkpoints (``best`` and ``last``)
  every epoch; timed until the logger's buffer is flushed, so the MLflow writes the background thread would
  otherwise do after the timer are counted (the time that last flush takes is printed apart: it is the store's
  own cost, about 0.1 ms a point in MLflow's SQLAlchemy store).
- ``avlm-no-ckpt``: the same without checkpoint writes (``write_checkpoint`` patched out; the weights and optimizer
  state are still gathered and copied every epoch).
- ``avlm-bare``: neither MLflow nor checkpoints (a ``NullLogger``): what accelerate, keeping the step losses and
  scores on the device (read back every ``train.sync_every_steps`` steps), the training mAP and the progress bar
  cost by themselves.

What each side does beyond the shared work: every ``avlm`` variant also computes the training scores
(``sigmoid``) and the epoch's training mAP (sklearn, through the CVS recipe's ``classification_metrics``), draws
a progress bar, reseeds every epoch (``set_seed``; what makes a resumed run replay its epochs) and logs an epoch
row; the plain loops do none of that. The headline ratio (``avlm``/``plain``) charges all of it to avlm;
``plain-ckpt``/``plain`` is what checkpointing costs a plain loop.

A round runs ``plain``, the chosen variants, the same variants backwards, and ``plain`` again (after a warm-up round
that is not counted), so that a steady drift of the machine's speed weighs on each variant as on ``plain``; a
variant's ratio in a round is its two trainings over plain's two, and the bench prints the median over the rounds
with its 95% bootstrap interval. fit's progress bars go to stderr as in a real run. Everything runs on the CPU
(``ACCELERATE_USE_CPU``), the machine the project's budgets are set for. On the shared 2-core development machine
even two runs of the same plain loop differ by about 11% (the standard deviation of a round's plain/plain ratio):
30 rounds leave the median uncertain by about +-0.05, so read the interval, not the third decimal.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
os.environ.setdefault("ACCELERATE_USE_CPU", "true")  # the plain loop runs on the CPU: so does fit's accelerator

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from avlm.features import TokenDataset  # noqa: E402
from avlm.losses import MultiLabelLoss  # noqa: E402
from avlm.metrics import mean_average_precision  # noqa: E402
from avlm.models import ClassificationHead  # noqa: E402
from avlm.recipes.cvs import classification_metrics  # noqa: E402
from avlm.stats import ConfidenceInterval, bootstrap_ci  # noqa: E402
from avlm.tracking import NullLogger, TrackingConfig, tracked_run  # noqa: E402
from avlm.train import (  # noqa: E402
    StepOutput,
    TrainConfig,
    build_scheduler,
    fit,
    make_accelerator,
    optimizer_steps_per_epoch,
)

GOAL = 1.05
TOKENS, DIM, CLASSES = 32, 48, 3  # what the vjepa2-tiny backbone gives for a 4-frame clip
VARIANTS = ("avlm", "plain-ckpt", "accelerate", "avlm-no-ckpt", "avlm-bare")  # each against plain
PLAIN_VARIANTS = ("plain", "plain-ckpt", "accelerate")
SEED = 0


def make_data(clips: int, val_clips: int) -> tuple[TokenDataset, torch.Tensor, torch.Tensor]:
    """Random tokens with multi-label targets that depend on them (so the loss moves), plus a validation set."""
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randn(clips + val_clips, TOKENS, DIM, generator=generator)
    direction = torch.randn(DIM, CLASSES, generator=generator)
    labels = (tokens.mean(dim=1) @ direction + 0.5 * torch.randn(clips + val_clips, CLASSES, generator=generator)) > 1
    labels = labels.float()
    return TokenDataset(tokens[:clips], labels[:clips]), tokens[clips:], labels[clips:]


def make_head() -> ClassificationHead:
    torch.manual_seed(SEED)
    return ClassificationHead(DIM, CLASSES, pooling="attentive", num_queries=4, num_heads=4, hidden_dim=128)


def make_optimization(
    model: torch.nn.Module, cfg: TrainConfig, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = build_scheduler(optimizer, name=cfg.scheduler, num_training_steps=steps, warmup_ratio=cfg.warmup_ratio)
    return optimizer, scheduler


def make_evaluate(val_tokens: torch.Tensor, val_labels: torch.Tensor) -> Callable[[torch.nn.Module], dict[str, float]]:
    """The evaluation both loops run after every epoch: val mAP of one batched forward."""

    @torch.no_grad()
    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        logits, _ = model(val_tokens)
        return {"val/mAP": mean_average_precision(val_labels.numpy(), torch.sigmoid(logits).numpy())}

    return evaluate


def run_plain(
    dataset: TokenDataset, evaluate: Callable, cfg: TrainConfig, use_accelerate: bool, checkpoint: Path | None = None
) -> float:
    """The hand-written loop; with ``checkpoint``, ``torch.save`` of the training state there every epoch."""
    model = make_head()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(SEED),
    )
    optimizer, scheduler = make_optimization(model, cfg, cfg.epochs * len(loader))
    backward, clip = (lambda loss: loss.backward()), torch.nn.utils.clip_grad_norm_
    if use_accelerate:
        accelerator = make_accelerator(cfg)
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        backward, clip = accelerator.backward, accelerator.clip_grad_norm_
    loss_fn = MultiLabelLoss("bce")
    start = time.perf_counter()
    for _ in range(cfg.epochs):
        model.train()
        for batch in loader:
            logits, _ = model(batch["tokens"])
            loss = loss_fn(logits, batch["labels"])
            backward(loss)
            clip(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        model.eval()
        evaluate(model)
        if checkpoint is not None:
            state = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
            torch.save({name: part.state_dict() for name, part in state.items()}, checkpoint)
    return time.perf_counter() - start


@contextlib.contextmanager
def run_logger_for(variant: str, setup_s: list[float]) -> Iterator[Any]:
    """The MLflow run (``avlm``, ``avlm-no-ckpt``) or a NullLogger; records how long opening + closing took."""
    if variant == "avlm-bare":
        yield NullLogger()
        return
    start = time.perf_counter()
    tracking = TrackingConfig(system_metrics=False)
    with tracked_run(tracking, recipe="bench", run_name=f"bench-{variant}", is_main_process=True) as run_logger:
        run_logger.flush()  # what opening the run queued (its name tag) is setup: delivered before the timer
        setup_s.append(time.perf_counter() - start)
        yield run_logger
        start = time.perf_counter()
    setup_s[-1] += time.perf_counter() - start


def run_avlm(
    variant: str,
    dataset: TokenDataset,
    evaluate: Callable,
    cfg: TrainConfig,
    workdir: Path,
    setup_s: list[float],
    flush_s: list[float] | None = None,
) -> float:
    """One ``fit``; returns its seconds, flush included, and appends the final flush's seconds to ``flush_s``."""
    model = make_head()
    accelerator = make_accelerator(cfg)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    steps = cfg.epochs * optimizer_steps_per_epoch(len(loader), cfg.grad_accum_steps)
    optimizer, scheduler = make_optimization(model, cfg, steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    loss_fn = MultiLabelLoss("bce")

    def train_step(model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        logits, _ = model(batch["tokens"])
        return StepOutput(loss_fn(logits, batch["labels"]), torch.sigmoid(logits), batch["labels"])

    no_checkpoints = mock.patch("avlm.train.loop.write_checkpoint") if variant != "avlm" else contextlib.nullcontext()
    with run_logger_for(variant, setup_s) as run_logger, no_checkpoints, tempfile.TemporaryDirectory(dir=workdir) as ck:
        start = time.perf_counter()
        fit(
            accelerator=accelerator,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=loader,
            train_step=train_step,
            train_metrics=classification_metrics,
            evaluate=evaluate,
            cfg=cfg,
            seed=SEED,
            run_logger=run_logger,
            checkpoint_dir=ck,
            config_yaml="bench: true\n",
        )
        flush_start = time.perf_counter()
        run_logger.flush()  # the buffered metrics reach sqlite inside the timed span
        end = time.perf_counter()
        if flush_s is not None and variant != "avlm-bare":
            flush_s.append(end - flush_start)
        return end - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="timed rounds (after one warm-up round)")
    parser.add_argument(
        "--variants", default="avlm", help=f"comma-separated, compared with plain: any of {','.join(VARIANTS)}, or all"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per training")
    parser.add_argument("--clips", type=int, default=1024, help="training clips (32 tokens x 48 dims each)")
    parser.add_argument("--val-clips", type=int, default=128, help="validation clips evaluated every epoch")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    script_start = time.perf_counter()

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.manual_seed(SEED)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, patience=0)  # no early stop: same work
    dataset, val_tokens, val_labels = make_data(args.clips, args.val_clips)
    evaluate = make_evaluate(val_tokens, val_labels)
    steps = args.epochs * (args.clips // args.batch_size)
    compared = VARIANTS if args.variants == "all" else tuple(dict.fromkeys(["avlm", *args.variants.split(",")]))
    if unknown := set(compared) - set(VARIANTS):
        parser.error(f"unknown --variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    # plain, the variants, the variants backwards, plain: a steady drift of the machine's speed within a round
    # weighs on every variant as on plain
    order = ("plain", *compared, *reversed(compared), "plain")

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), mlflow {mlflow.__version__}; "
        f"{args.clips} clips x {TOKENS} tokens x {DIM} dims, batch {args.batch_size}, {args.epochs} epochs "
        f"= {steps} optimizer steps per training, val {args.val_clips} clips; {args.rounds} rounds of "
        f"{','.join(order)} + 1 warm-up"
    )
    with tempfile.TemporaryDirectory(prefix="avlm-bench-") as tmp:
        workdir = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.environ.pop("MLFLOW_RUN_ID", None)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment("avlm-bench")  # creates the store (schema migrations) before any timing

        seconds: dict[str, list[float]] = {v: [] for v in ("plain", *compared)}  # per round, its two runs summed
        setup_s: list[float] = []
        flush_s: list[float] = []
        rounds_start = time.perf_counter()
        for round_index in range(args.rounds + 1):
            spent = dict.fromkeys(seconds, 0.0)
            for variant in order:
                if variant in PLAIN_VARIANTS:
                    checkpoint = workdir / "plain.pt" if variant == "plain-ckpt" else None
                    spent[variant] += run_plain(dataset, evaluate, cfg, variant == "accelerate", checkpoint)
                else:
                    flushes = flush_s if variant == "avlm" and round_index > 0 else None
                    spent[variant] += run_avlm(variant, dataset, evaluate, cfg, workdir, setup_s, flushes)
            if round_index == 0:  # warms up allocators, kernels, imports and the sqlite store
                print(f"warm-up round done ({time.perf_counter() - rounds_start:.1f} s)")
                continue
            for variant, value in spent.items():
                seconds[variant].append(value)
            ratios = "  ".join(f"{v}/plain {spent[v] / spent['plain']:.3f}" for v in compared)
            print(f"round {round_index:>2}: plain {spent['plain'] / 2:.3f}s  {ratios}", flush=True)

    plain = seconds["plain"]
    print(f"\nper-training seconds: plain median {statistics.median(plain) / 2:.3f} min {min(plain) / 2:.3f}")
    intervals = {}
    for variant in compared:
        intervals[variant] = interval = _median_ci(np.array(seconds[variant]) / np.array(plain))
        extra_ms = (statistics.median(seconds[variant]) - statistics.median(plain)) / 2 * 1000
        print(
            f"{variant:>13}/plain: median {interval.estimate:.3f} [95% CI {interval.low:.3f}-{interval.high:.3f}]  "
            f"(+{extra_ms:.0f} ms per training = {extra_ms / steps * 1000:.0f} us per step)"
        )
    plain_training_s = statistics.median(plain) / 2
    print(
        f"avlm's last flush (MLflow writing the queued points to sqlite): median {np.median(flush_s) * 1000:.0f} ms "
        f"= {np.median(flush_s) / plain_training_s:.3f} of a plain training\n"
        f"setup outside the timings: opening + closing an MLflow run {np.median(setup_s) * 1000:.0f} ms (median)\n"
        f"total bench time {time.perf_counter() - script_start:.1f} s"
    )
    headline = intervals["avlm"]
    verdict = "PASS" if headline.estimate <= GOAL else "MISS"
    if headline.low <= GOAL < headline.high:
        verdict += " (but its 95% CI straddles the goal: more --rounds, or a quieter machine)"
    print(f"avlm (MLflow every step + checkpoints) / plain, median {headline.estimate:.3f}: goal <= {GOAL}: {verdict}")


def _median_ci(ratios: np.ndarray) -> ConfidenceInterval:
    """The median per-round ratio with its 95% percentile-bootstrap interval: how far the machine's noise leaves
    it uncertain."""
    return bootstrap_ci(ratios, lambda resampled: np.median(resampled, axis=-1), method="percentile", seed=SEED)


if __name__ == "__main__":
    main()
