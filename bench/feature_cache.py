"""Epoch time of CVS head training from cached backbone tokens vs through the frozen backbone on pixels.

Run it::

    python bench/feature_cache.py                    # demo data, vjepa2-tiny, 5 rounds, about a minute
    python bench/feature_cache.py --rounds 7 --data-dir /data/endoscapes --limit-clips 512 2>/dev/null
    python bench/feature_cache.py --backbone vjepa2:facebook/vjepa2-vitl-fpc64-256   # a real backbone (weights)

Both paths are the cvs recipe's own pieces on the built-in demo data (generated into a temporary folder unless
``--data-dir`` is given): ``load_endoscapes`` clips, the ``vjepa2-tiny`` backbone (or ``--backbone``) with a
frozen-backbone attentive head from ``build_cvs_model``, ``ClipDataset`` decoding and normalising the JPEG frames every
epoch (the uncached path, ``data.feature_cache=false``), and ``cached_tokens`` / ``TokenDataset`` (the cached path).
Each path has its own model (same seeds), AdamW groups, warmup + cosine schedule, ``EpochSampler`` loader and
``accelerator.prepare``, as ``main()`` builds them.

How epochs are timed: every round calls ``avlm.train.fit`` for one more epoch on each path (a ``NullLogger``, no
MLflow) and reads that epoch's row of the returned ``LoopState.history``: fit times the training pass itself
(``throughput/train_samples_per_s`` = clips / training seconds) and the epoch including evaluation
(``time/epoch_s``; the evaluation here is the recipe's val loss + mAP pass, without its attention-entropy probe),
and writes its checkpoints after both clocks stop. This times exactly the loop the recipe runs, with none of the
recipe's setup (data generation, model building, MLflow run), which timing ``main()`` twice would include.
The paths alternate order each round, after one warm-up round that is not counted; ratios are per round (and
their median) and between the fastest epochs (min-based).

The one-time cost of building the cache (backbone over the train and val clips, written as safetensors into a
temporary folder, so always a miss) is reported in uncached epochs, with the epochs after which it pays off.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from avlm.data import ClipDataset, EpochSampler, ensure_cvs_demo, load_endoscapes, manifest_hash  # noqa: E402
from avlm.features import TokenDataset, cached_tokens, extract_tokens  # noqa: E402
from avlm.losses import MultiLabelLoss  # noqa: E402
from avlm.models import parameter_groups  # noqa: E402
from avlm.recipes.cvs import CVSModelConfig, build_cvs_model, classification_metrics  # noqa: E402
from avlm.tracking import NullLogger  # noqa: E402
from avlm.train import (  # noqa: E402
    LoopState,
    StepOutput,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    fit,
    make_accelerator,
)

GOAL = 0.1
SEED = 1
CLIP_FRAMES = 4
PATHS = ("cached", "uncached")


class HeadTraining:
    """One training setup (model, loaders, optimizer, schedule) fed either tokens or pixels."""

    def __init__(
        self, name: str, backbone: str, datasets: dict[str, Any], cfg: TrainConfig, total_epochs: int, workdir: Path
    ):
        self.name = name
        self.cfg = cfg
        self.accelerator = make_accelerator(cfg)
        torch.manual_seed(SEED)
        model = build_cvs_model(CVSModelConfig(backbone=backbone), num_frames=CLIP_FRAMES)  # frozen backbone
        train_loader = torch.utils.data.DataLoader(
            datasets["train"],
            sampler=EpochSampler(len(datasets["train"]), seed=SEED),
            drop_last=True,
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
        )
        val_loader = torch.utils.data.DataLoader(
            datasets["val"], shuffle=False, batch_size=cfg.batch_size, num_workers=cfg.num_workers
        )
        optimizer = build_optimizer(
            parameter_groups(
                model,
                [("head", model.head, cfg.lr), ("backbone", model.backbone, cfg.backbone_lr)],
                weight_decay=cfg.weight_decay,
            )
        )
        scheduler = build_scheduler(
            optimizer,
            name=cfg.scheduler,
            num_training_steps=total_epochs * len(train_loader),
            warmup_ratio=cfg.warmup_ratio,
        )
        self.model, self.optimizer, self.train_loader, self.val_loader, self.scheduler = self.accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        self.loss_fn = MultiLabelLoss("bce")
        self.state = LoopState()
        self.checkpoint_dir = workdir / f"checkpoints-{name}"

    @staticmethod
    def _inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"tokens": batch["tokens"]} if "tokens" in batch else {"pixel_values": batch["pixel_values"]}

    def train_step(self, model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        logits = model(**self._inputs(batch)).logits
        return StepOutput(self.loss_fn(logits, batch["labels"]), torch.sigmoid(logits), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        scores, targets, losses = [], [], []
        for batch in self.val_loader:
            logits = model(**self._inputs(batch)).logits
            losses.append(self.loss_fn(logits, batch["labels"]).item() * len(batch["labels"]))
            scores.append(torch.sigmoid(logits).float().cpu().numpy())
            targets.append(batch["labels"].float().cpu().numpy())
        ap = classification_metrics(np.concatenate(scores), np.concatenate(targets))
        metrics = {f"val/{k}": v for k, v in ap.items()}
        metrics["val/loss"] = float(np.sum(losses) / len(self.val_loader.dataset))
        return metrics

    def one_epoch(self) -> tuple[float, float]:
        """Train one more epoch with ``fit``; return (training seconds, seconds including evaluation)."""
        cfg = TrainConfig(**{**vars(self.cfg), "epochs": self.state.epoch + 1})
        self.state = fit(
            accelerator=self.accelerator,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            train_loader=self.train_loader,
            train_step=self.train_step,
            train_metrics=classification_metrics,
            evaluate=self.evaluate,
            cfg=cfg,
            seed=SEED,
            run_logger=NullLogger(),
            checkpoint_dir=self.checkpoint_dir,
            config_yaml="bench: true\n",
            state=self.state,
        )
        row = self.state.history[-1]
        return len(self.train_loader.dataset) / row["throughput/train_samples_per_s"], row["time/epoch_s"]


def summarize(label: str, cached: list[float], uncached: list[float]) -> float:
    per_round = [c / u for c, u in zip(cached, uncached, strict=True)]
    median = statistics.median(per_round)
    print(
        f"{label}: cached/uncached median {median:.3f}  min-based {min(cached) / min(uncached):.3f}  "
        f"(per round: {', '.join(f'{r:.3f}' for r in per_round)}; median seconds cached "
        f"{statistics.median(cached):.3f}, uncached {statistics.median(uncached):.3f})"
    )
    return median


@torch.no_grad()
def breakdown(
    backbone: torch.nn.Module, dataset: ClipDataset, batch_size: int, device: torch.device
) -> tuple[float, float]:
    """Seconds spent decoding every clip of ``dataset`` once, and running the frozen backbone on them."""
    decode_s = backbone_s = 0.0
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True))
    while True:
        start = time.perf_counter()
        batch = next(loader, None)
        decode_s += time.perf_counter() - start
        if batch is None:
            return decode_s, backbone_s
        start = time.perf_counter()
        backbone(batch["pixel_values"].to(device)).tokens.sum().item()  # .item(): wait for an accelerator
        backbone_s += time.perf_counter() - start


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    parser.add_argument("--data-dir", default="", help="Endoscapes2023 root; empty = demo data in a temp folder")
    parser.add_argument("--backbone", default="vjepa2-tiny", help="a model.backbone spec of the cvs recipe")
    parser.add_argument("--limit-clips", type=int, default=0, help="keep only the first N clips per split; 0 = all")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (the recipe's default: 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 = torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    script_start = time.perf_counter()

    logging.getLogger("avlm").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = TrainConfig(batch_size=args.batch_size, num_workers=args.num_workers, patience=0)

    with tempfile.TemporaryDirectory(prefix="avlm-bench-") as tmp:
        workdir = Path(tmp)
        root, generate_s = timed(lambda: Path(args.data_dir) if args.data_dir else ensure_cvs_demo(workdir))
        splits = load_endoscapes(root, splits=("train", "val"), clip_frames=CLIP_FRAMES, frame_stride=25)
        if args.limit_clips:
            splits = {name: records[: args.limit_clips] for name, records in splits.items()}

        # The cache, built as main() builds it: a frozen backbone's tokens per split, keyed on what changes them.
        torch.manual_seed(SEED)
        backbone = build_cvs_model(CVSModelConfig(backbone=args.backbone), num_frames=CLIP_FRAMES).backbone
        device = make_accelerator(cfg).device
        backbone.to(device)
        pixel_sets = {
            name: ClipDataset(records, backbone.image_size, backbone.mean, backbone.std)
            for name, records in splits.items()
        }
        # First calls pay one-off costs (kernel selection, allocator growth): not the cache's to carry.
        extract_tokens(
            backbone, torch.utils.data.Subset(pixel_sets["train"], range(2 * cfg.batch_size)), cfg.batch_size, device
        )
        token_sets: dict[str, TokenDataset] = {}
        build_s = load_s = 0.0
        for name, dataset in pixel_sets.items():
            key_parts = {
                "backbone": backbone.fingerprint(),
                "image_size": backbone.image_size,
                "mean": backbone.mean,
                "std": backbone.std,
                "clip_frames": CLIP_FRAMES,
                "manifest": manifest_hash(splits[name]),
            }
            cache = dict(key_parts=key_parts, cache_dir=workdir / "cache", accelerator=make_accelerator(cfg))
            (tokens, hit), seconds = timed(lambda ds=dataset, kw=cache: cached_tokens(backbone, ds, **kw))
            if hit:
                raise RuntimeError("the feature cache lives in a fresh temp folder: the first call must build it")
            build_s += seconds
            _, seconds = timed(lambda ds=dataset, kw=cache: cached_tokens(backbone, ds, **kw))
            load_s += seconds
            token_sets[name] = TokenDataset(tokens, torch.as_tensor(dataset.labels, dtype=torch.float32))

        print(
            f"torch {torch.__version__} ({device}, {torch.get_num_threads()} threads); "
            f"{'demo data' if not args.data_dir else root} "
            f"({len(splits['train'])} train / {len(splits['val'])} val clips of {CLIP_FRAMES} frames, "
            f"{backbone.image_size}px{f', generated in {generate_s:.1f} s' if not args.data_dir else ''}); "
            f"{args.backbone} frozen, tokens {tuple(token_sets['train'].tokens.shape[1:])}; batch {cfg.batch_size}, "
            f"num_workers {cfg.num_workers}; {args.rounds} rounds + 1 warm-up"
        )
        paths = {
            "cached": HeadTraining("cached", args.backbone, token_sets, cfg, args.rounds + 1, workdir),
            "uncached": HeadTraining("uncached", args.backbone, pixel_sets, cfg, args.rounds + 1, workdir),
        }
        train_s: dict[str, list[float]] = {name: [] for name in PATHS}
        epoch_s: dict[str, list[float]] = {name: [] for name in PATHS}
        rounds_start = time.perf_counter()
        for round_index in range(args.rounds + 1):
            order = PATHS if round_index % 2 == 0 else PATHS[::-1]
            seconds = {name: paths[name].one_epoch() for name in order}
            if round_index == 0:  # warm-up: allocators, kernels, the page cache holding the JPEGs
                print(f"warm-up round done ({time.perf_counter() - rounds_start:.1f} s)")
                continue
            for name in PATHS:
                train_s[name].append(seconds[name][0])
                epoch_s[name].append(seconds[name][1])
            print(
                f"round {round_index}: order {','.join(order)}  train epoch cached {seconds['cached'][0]:.3f}s "
                f"uncached {seconds['uncached'][0]:.3f}s = {seconds['cached'][0] / seconds['uncached'][0]:.3f}  |  "
                f"with val cached {seconds['cached'][1]:.3f}s uncached {seconds['uncached'][1]:.3f}s "
                f"= {seconds['cached'][1] / seconds['uncached'][1]:.3f}"
            )

        # Where an uncached training epoch goes: decoding the clips, the frozen backbone on them (best of 2 passes).
        passes = [breakdown(backbone, pixel_sets["train"], cfg.batch_size, device) for _ in range(2)]
        decode_s, backbone_s = min(p[0] for p in passes), min(p[1] for p in passes)

    print()
    median = summarize("training epoch        ", train_s["cached"], train_s["uncached"])
    summarize("epoch incl. evaluation", epoch_s["cached"], epoch_s["uncached"])
    print(
        f"uncached training epoch {statistics.median(train_s['uncached']):.3f} s ~ JPEG decoding {decode_s:.3f} s "
        f"+ frozen backbone {backbone_s:.3f} s + head training (the cached epoch) "
        f"{statistics.median(train_s['cached']):.3f} s"
    )
    uncached_epoch, cached_epoch = statistics.median(epoch_s["uncached"]), statistics.median(epoch_s["cached"])
    print(
        f"cache build (train + val, once): {build_s:.2f} s = {build_s / uncached_epoch:.2f} uncached epochs "
        f"(incl. evaluation); pays off after {build_s / max(uncached_epoch - cached_epoch, 1e-9):.1f} epochs; "
        f"loading it again (hit): {load_s * 1000:.0f} ms"
    )
    print(f"total bench time {time.perf_counter() - script_start:.1f} s")
    verdict = "PASS" if median <= GOAL else "MISS"
    print(f"training epoch cached/uncached, median {median:.3f}: goal <= {GOAL}: {verdict}")


if __name__ == "__main__":
    main()
