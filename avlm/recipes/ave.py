"""AVE: audio-visual event localisation under a fixed visual token budget, spent uniformly or anchored on eventful
seconds.

Each second of a 10 s clip is seen by a frozen vision backbone at one resolution; a resolution costs
``(r / patch)²`` tokens and every clip gets the same budget, ``10 × tokens(base)``. ``uniform`` spends it evenly.
``anchored`` asks a cheap Stage-1 *eventness* scorer which seconds matter, sees its top-k seconds ("anchors") at a
high resolution and pays for them by lowering the least eventful seconds, to exactly the same total; a confidence
gate falls back to uniform when the scores are too flat to trust. A small temporal localiser then classifies every
second (28 events + background on AVE) from the allocated visual embeddings and the audio embeddings. Metric: AVE
segment accuracy. One run is one (allocation, seed); the comparison anchored − uniform is paired by seed, and the
study's promotion chain (val sweep → quick test → full test, ``examples/ave/demo_chain.yaml``) runs it through the
shared protocol layer, with a ``diagnose`` of each stage (:func:`chain_stage_report`).

Run it::

    python entrypoints/train_ave.py                                  # one run: demo data, uniform allocation
    python entrypoints/train_ave.py allocation.method=anchored eventness.method=oracle seed=3
    mlflow run . -e ave --env-manager local                          # the demo's pre-registered chain
    python entrypoints/ave_prepare.py --data_dir /data/AVE           # decode AVE/*.mp4 once, then data.data_dir
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from avlm.ave.allocation import (
    AllocationConfig,
    ClipPlan,
    allocation_budget,
    check_allocation,
    plan_clips,
    plan_summary,
)
from avlm.ave.diagnose import ClipOutcome, anchor_hits, diagnose_runs, write_outcomes
from avlm.ave.eventness import EventnessConfig, EventnessInputs, cached_eventness_scores, write_scores
from avlm.ave.features import AveFeatures, AveFeaturesConfig, load_ave_features
from avlm.config import load_config
from avlm.data import default_cache_dir
from avlm.data.ave import AveSplits, load_ave_splits, missing_extracted
from avlm.data.ave_demo import ensure_ave_demo
from avlm.errors import ConfigError, DataError
from avlm.metrics.localisation import segment_metrics
from avlm.models import count_parameters, parameter_groups
from avlm.models.localiser import EventLocaliser
from avlm.tracking import TrackingConfig, plots, record_run_start
from avlm.tracking.registry import RegistryConfig
from avlm.train import (
    LoopState,
    StepOutput,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    open_run,
    optimizer_steps_per_epoch,
    resume_from,
)

logger = logging.getLogger(__name__)

RECIPE = "ave"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AveDataConfig:
    """Attributes:
    dataset: demo (built in, generated once) or ave (``data_dir``: Annotations.txt, the split files, and the
        extracted frames/ + audio/ that ``ave_prepare`` writes).
    data_dir: the AVE root.
    cross_split_ids: what to do with the YouTube ids the official splits share (18 in AVE): keep (the official
        protocol) or drop them from every split. Either way they are reported in the run.
    demo_seed: seed of the generated demo.
    cache_dir: where the demo is generated; empty = $AVLM_CACHE_DIR or ~/.cache/avlm.
    limit_clips: keep the first N clips of each split (quick checks); 0 = all.
    """

    dataset: Literal["demo", "ave"] = "demo"
    data_dir: str = ""
    cross_split_ids: Literal["keep", "drop"] = "keep"
    demo_seed: int = 0
    cache_dir: str = ""
    limit_clips: int = 0

    def __post_init__(self) -> None:
        if self.dataset == "ave" and not self.data_dir:
            raise ConfigError("config key 'data.data_dir' is required with data.dataset=ave (the AVE root)")
        if self.limit_clips < 0:
            raise ConfigError(f"config key 'data.limit_clips' must be >= 0, got {self.limit_clips}")


@dataclasses.dataclass
class LocaliserConfig:
    """Attributes:
    head: the temporal model over the seconds: mlp (per second), tcn or bilstm.
    hidden: projection and head width.
    dropout: head dropout.
    per_resolution: one visual projection per resolution (false: one shared by all resolutions).
    """

    head: Literal["mlp", "tcn", "bilstm"] = "mlp"
    hidden: int = 64
    dropout: float = 0.1
    per_resolution: bool = True

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise ConfigError(f"config key 'localiser.hidden' must be >= 1, got {self.hidden}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"config key 'localiser.dropout' must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class AveEvalConfig:
    """Attributes:
    test: also evaluate the test split with the best checkpoint (the chain's quick and full test stages set it);
        val is always evaluated, and it alone chooses the checkpoint.
    example_clips: val clips drawn in the scores / anchors / labels figure.
    """

    test: bool = False
    example_clips: int = 4


@dataclasses.dataclass
class AveConfig:
    """The whole train_ave configuration (examples/ave/*.yaml).

    Attributes:
        seed: seeds the localiser's initialisation, sampling and dropout (Stage 1 has its own, ``eventness.seed``,
            so every seed of a comparison sees the same scores).
        output_dir: local folder for checkpoints and plots (one sub-folder per run).
        resume: MLflow run id or checkpoint folder to continue a crashed run from.
    """

    seed: int = 0
    output_dir: str = "outputs"
    resume: str = ""
    data: AveDataConfig = dataclasses.field(default_factory=AveDataConfig)
    features: AveFeaturesConfig = dataclasses.field(default_factory=AveFeaturesConfig)
    eventness: EventnessConfig = dataclasses.field(default_factory=EventnessConfig)
    allocation: AllocationConfig = dataclasses.field(default_factory=AllocationConfig)
    localiser: LocaliserConfig = dataclasses.field(default_factory=LocaliserConfig)
    eval: AveEvalConfig = dataclasses.field(default_factory=AveEvalConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=20,
            batch_size=32,
            lr=3e-3,
            weight_decay=0.01,
            warmup_ratio=0.0,
            monitor="val/accuracy",
            patience=6,
        )  # fmt: skip
    )
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    # A single run is one arm of a paired comparison: the chain registers a claimed configuration, not each run.
    registry: RegistryConfig = dataclasses.field(
        default_factory=lambda: RegistryConfig(register=False, name="avlm-ave", promote_metric="val/accuracy")
    )


def load_ave_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> AveConfig:
    return load_config(AveConfig, path, overrides)


@dataclasses.dataclass
class AveResult:
    """What :func:`main` returns (on the main process; other ranks get the loop state and metrics only)."""

    run_id: str | None
    state: LoopState
    final_metrics: dict[str, float]
    plans: dict[str, dict[str, ClipPlan]]
    output_dir: Path
    model_version: str | None = None  # a single run registers nothing: the chain registers a claimed configuration
    promoted: bool | None = None


# ----------------------------------------------------------------------------------------------------------------
# Data, Stage 1, allocation
# ----------------------------------------------------------------------------------------------------------------
def load_splits(cfg: AveDataConfig) -> tuple[AveSplits, str]:
    """The splits (cross-split ids found, the policy applied) and the dataset's name; missing frames/audio → a
    DataError naming the first clips and what they lack, before any run exists."""
    if cfg.dataset == "ave":
        root, name = Path(cfg.data_dir), f"ave:{Path(cfg.data_dir).name}"
    else:
        root, name = ensure_ave_demo(Path(cfg.cache_dir) if cfg.cache_dir else None, seed=cfg.demo_seed), "ave-demo"
    splits = load_ave_splits(root, cross_split_ids=cfg.cross_split_ids, limit_clips=cfg.limit_clips)
    problems = missing_extracted(root, [clip for clips in splits.clips.values() for clip in clips])
    if problems:
        shown = "; ".join(problems[:5])
        raise DataError(
            f"{root}: {len(problems)} problem(s) with the extracted frames/audio: {shown}"
            f"{' …' if len(problems) > 5 else ''}. Run `python entrypoints/ave_prepare.py --data_dir {root}` first"
        )
    for split in ("train", "val"):
        if not splits.clips.get(split):
            raise DataError(f"{root}: the {split} split has no clips")
    return splits, name


def feature_cache_root(cfg: AveFeaturesConfig) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir() / "ave_features"


def stage1_scores(
    cfg: AveConfig, features: AveFeatures, labels: Mapping[str, Mapping[str, np.ndarray]], splits: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """Eventness scores per split, computed once and cached, or read from ``eventness.scores_file`` (its scores
    then get this config's smoothing and normalisation: a run's own ``eventness_scores.json`` holds final scores,
    so reuse it with the defaults). A learned scorer trains on the train split's labels only; the oracle reads the
    labels of the clips it scores."""
    train_ids = list(labels["train"])
    scores = {}
    for split in splits:
        # A video the splits share has one label per split: the oracle must see this split's, a learned head only
        # the train split's.
        known = labels[split] if cfg.eventness.method == "oracle" else labels["train"]
        inputs = EventnessInputs(features=features, labels=dict(known), train_ids=train_ids)
        scores[split], _ = cached_eventness_scores(
            inputs, cfg.eventness, list(labels[split]), feature_cache_root(cfg.features)
        )
    return scores


@dataclasses.dataclass
class Standardizer:
    """Per-feature mean and std of the train split's embeddings, one pair per visual resolution and one for audio.

    A frozen backbone's class signal can sit in low-variance dimensions, which a per-vector LayerNorm leaves
    small: standardising each feature (as a linear probe would) is what lets a small localiser read it."""

    visual: dict[int, tuple[torch.Tensor, torch.Tensor]]
    audio: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def fit(cls, features: AveFeatures, train_ids: Sequence[str]) -> Standardizer:
        rows = features.index(list(train_ids))

        def moments(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            flat = values[rows].reshape(-1, values.shape[-1]).float()
            return flat.mean(0), flat.std(0).clamp_min(1e-6)

        return cls({r: moments(v) for r, v in features.visual.items()}, moments(features.audio))


class AllocatedClips(torch.utils.data.Dataset):
    """Per clip: each second's visual embedding at the resolution its plan gave it (standardised with that
    resolution's train statistics), the standardised audio embeddings, the resolution indices and the labels."""

    def __init__(
        self,
        features: AveFeatures,
        plans: Mapping[str, ClipPlan],
        labels: Mapping[str, np.ndarray],
        standardizer: Standardizer,
    ) -> None:
        ids = list(labels)
        rows = features.index(ids)
        resolutions = sorted(features.visual)
        resolution = torch.tensor([plans[i].resolutions for i in ids], dtype=torch.long)  # (N, T) in pixels
        self.visual = torch.zeros(len(ids), *features.visual[resolutions[0]].shape[1:])
        self.resolution = torch.zeros_like(resolution)  # index into the sorted resolutions
        for index, r in enumerate(resolutions):
            seen = resolution == r
            mean, std = standardizer.visual[r]
            self.visual[seen] = (features.visual[r][rows][seen].float() - mean) / std
            self.resolution[seen] = index
        mean, std = standardizer.audio
        self.audio = (features.audio[rows].float() - mean) / std
        self.labels = torch.as_tensor(np.stack([labels[i] for i in ids]), dtype=torch.long)
        self.video_ids = ids

    def __len__(self) -> int:
        return len(self.video_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"visual": self.visual[i], "audio": self.audio[i], "resolution": self.resolution[i],
                "labels": self.labels[i]}  # fmt: skip


def clip_outcomes(
    video_ids: Sequence[str],
    labels: np.ndarray,
    predictions: np.ndarray,
    scores: Mapping[str, np.ndarray],
    plans: Mapping[str, ClipPlan],
) -> dict[str, ClipOutcome]:
    """What diagnose needs of each evaluated clip: labels, predictions, Stage-1 scores and the plan."""
    return {
        video_id: ClipOutcome(
            video_id=video_id,
            labels=labels[i].tolist(),
            predictions=predictions[i].tolist(),
            scores=[float(s) for s in scores[video_id]],
            resolutions=list(plans[video_id].resolutions),
            anchors=list(plans[video_id].anchors),
            fallback=plans[video_id].fallback,
            reason=plans[video_id].reason,
        )
        for i, video_id in enumerate(video_ids)
    }


def run_name_for(cfg: AveConfig) -> str:
    """``ave-<allocation>-<eventness>-seed<N>``, e.g. ``ave-anchored_k2-oracle-seed3``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    if cfg.allocation.method == "uniform":
        return f"{RECIPE}-uniform{cfg.allocation.base_resolution}-seed{cfg.seed}"
    method = Path(cfg.eventness.scores_file).stem if cfg.eventness.scores_file else cfg.eventness.method
    return f"{RECIPE}-anchored_k{cfg.allocation.k}-{method}-seed{cfg.seed}"


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: AveConfig) -> AveResult:
    """Stage 1, allocation, localiser training and evaluation of one (allocation, seed). See the module docstring."""
    cfg, resume = resume_from(cfg)

    # -- 1. data and cached features (bad data and bad budgets stop here, before an MLflow run exists) ----------
    splits, dataset_name = load_splits(cfg.data)
    used = ["train", "val"] + (["test"] if cfg.eval.test else [])
    if cfg.eval.test and not splits.clips.get("test"):
        raise DataError(f"{splits.root}: eval.test is set but the test split has no clips")
    labels = {s: {c.video_id: c.labels(splits.classes) for c in splits.clips[s]} for s in used}
    # every split's clips, whatever this run evaluates: one cache entry serves the val sweep and the test stages
    video_ids = sorted({c.video_id for clips in splits.clips.values() for c in clips})
    features = load_ave_features(splits.root, video_ids, cfg.features)
    check_allocation(cfg.allocation, features.tokens)
    budget = allocation_budget(cfg.allocation, features.tokens)

    # -- 2. Stage 1: eventness per second; allocation: each second's resolution, the same budget per clip ------
    scores = stage1_scores(cfg, features, labels, used)
    plans = {s: plan_clips(scores[s], list(labels[s]), cfg.allocation, features.tokens) for s in used}
    standardizer = Standardizer.fit(features, list(labels["train"]))
    inputs = {s: AllocatedClips(features, plans[s], labels[s], standardizer) for s in used}

    torch.manual_seed(cfg.seed)
    model = EventLocaliser(
        inputs["train"].visual.shape[-1],
        inputs["train"].audio.shape[-1],
        len(splits.classes),
        num_resolutions=len(features.visual) if cfg.localiser.per_resolution else 1,
        head=cfg.localiser.head,
        hidden=cfg.localiser.hidden,
        dropout=cfg.localiser.dropout,
    )
    trainable, total = count_parameters(model)

    run_name = run_name_for(cfg)
    with open_run(cfg, recipe=RECIPE, run_name=run_name, train_cfg=cfg.train, resume=resume) as run:
        accelerator, run_logger = run.accelerator, run.logger

        # -- 3. what this run is: config, tags, run card, the data's cross-split ids, Stage 1's scores ---------
        if run.is_new:
            record_run_start(
                run_logger,
                cfg=cfg,
                config_yaml=run.config_yaml,
                tags={
                    "recipe": RECIPE,
                    "dataset": dataset_name,
                    "allocation": cfg.allocation.method,
                    "eventness": cfg.eventness.method if cfg.allocation.method == "anchored" else "none",
                    "visual_backbone": cfg.features.visual_backbone,
                    "token_budget": str(budget),
                    "data.cross_split_ids": f"{len(splits.cross_split_ids)} ({cfg.data.cross_split_ids})",
                },
                run_card={
                    "recipe": RECIPE,
                    "run_name": run_name,
                    "dataset": {"name": dataset_name, **splits.summary()},
                    "features": features.key,
                    "tokens_per_resolution": {str(r): n for r, n in sorted(features.tokens.items())},
                    "token_budget_per_clip": budget,
                },
                num_processes=accelerator.num_processes,
                mixed_precision=cfg.train.mixed_precision,
                trainable_params=trainable,
                total_params=total,
            )
            if splits.cross_split_ids:
                run_logger.log_dict(splits.cross_split_ids, "data/cross_split_ids.json")
            if cfg.allocation.method == "anchored":
                merged = {v: s for split in used for v, s in scores[split].items()}
                path = _artifact_folder(run.output_dir) / "eventness_scores.json"
                write_scores(path, merged)
                run_logger.log_artifact(path, "eventness")
            allocation_metrics = {"alloc/tokens_per_clip": float(budget)}
            for split in used:
                summary = plan_summary(plans[split].values())
                allocation_metrics.update({f"alloc/{split}_{k}": float(v) for k, v in summary.items()})
            run_logger.log_metrics(allocation_metrics, step=0)

        loader_kwargs = {"batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers}
        generator = torch.Generator().manual_seed(cfg.seed)
        train_loader = torch.utils.data.DataLoader(
            inputs["train"], shuffle=True, drop_last=len(inputs["train"]) > cfg.train.batch_size, generator=generator,
            **loader_kwargs,
        )  # fmt: skip
        eval_loaders = {s: torch.utils.data.DataLoader(inputs[s], shuffle=False, **loader_kwargs) for s in used[1:]}

        # -- 4. optimisation: AdamW, the configured schedule ----------------------------------------------------
        optimizer = build_optimizer(
            parameter_groups(model, [("localiser", None, cfg.train.lr)], weight_decay=cfg.train.weight_decay)
        )
        steps = optimizer_steps_per_epoch(len(train_loader), cfg.train.grad_accum_steps)
        scheduler = build_scheduler(
            optimizer, name=cfg.train.scheduler, num_training_steps=cfg.train.epochs * steps,
            warmup_ratio=cfg.train.warmup_ratio,
        )  # fmt: skip
        run.restore(model, optimizer, scheduler)
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        eval_loaders = {s: accelerator.prepare(loader) for s, loader in eval_loaders.items()}

        # -- 5. one step: per-second cross-entropy over the 29 classes -------------------------------------------
        def train_step(
            model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
        ) -> StepOutput:
            logits = model(batch["visual"], batch["audio"], batch["resolution"])
            return StepOutput(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))

        @torch.no_grad()
        def predict(model: torch.nn.Module, split: str) -> tuple[np.ndarray, np.ndarray, float]:
            predictions, targets, loss, seconds = [], [], 0.0, 0
            for batch in eval_loaders[split]:
                logits = model(batch["visual"], batch["audio"], batch["resolution"])
                logits, labels = accelerator.gather_for_metrics((logits, batch["labels"]))
                loss += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum").item()
                seconds += labels.numel()
                predictions.append(logits.argmax(-1).cpu().numpy())
                targets.append(labels.cpu().numpy())
            return np.concatenate(predictions), np.concatenate(targets), loss / max(seconds, 1)

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            predictions, targets, loss = predict(model, "val")
            return {"val/accuracy": float((predictions == targets).mean()), "val/loss": loss}

        # -- 6. train; the best checkpoint by val accuracy --------------------------------------------------------
        state = run.fit(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            train_step=train_step,
            evaluate=evaluate,
            train_cfg=cfg.train,
        )

        # -- 7. the best checkpoint on val (and test): segment accuracy, per clip outcomes, plots ---------------
        run.load_best(model)
        final_metrics: dict[str, float] = {}
        outcomes: dict[str, dict[str, ClipOutcome]] = {}
        for split in used[1:]:
            predictions, targets, _ = predict(model, split)
            measured = segment_metrics(targets, predictions, splits.classes)
            final_metrics.update({f"final/{split}_{k}": v for k, v in measured.items()})
            outcomes[split] = clip_outcomes(inputs[split].video_ids, targets, predictions, scores[split], plans[split])
            if cfg.allocation.method == "anchored":
                final_metrics.update(
                    {f"alloc/{split}_{k}": v for k, v in anchor_hits(outcomes[split].values()).items()}
                )
        result = AveResult(run.run_id, state, final_metrics, plans, run.output_dir)
        if not run.is_main_process:
            return result

        run_logger.log_metrics({**final_metrics, "best_epoch": state.best_epoch}, step=state.global_step)
        for split, clips in outcomes.items():
            path = _artifact_folder(run.output_dir) / f"{split}.json"
            write_outcomes(path, clips)
            run_logger.log_artifact(path, "predictions")
        run_logger.log_figure(
            plots.training_curves(state.history, {"loss": ["train/loss", "val/loss"], "accuracy": ["val/accuracy"]}),
            "plots/training_curves.png",
        )
        examples = list(outcomes["val"].values())[: cfg.eval.example_clips]
        run_logger.log_figure(plots.eventness_examples(examples, splits.classes), "plots/eventness_examples.png")
        logger.info(
            "done: run %s, %s allocation (%d tokens per clip), best val accuracy %.4f at epoch %d%s",
            run.run_id, cfg.allocation.method, budget, state.best_value, state.best_epoch,
            f", test accuracy {final_metrics['final/test_accuracy']:.4f}" if cfg.eval.test else "",
        )  # fmt: skip
        return result


def _artifact_folder(output_dir: Path) -> Path:
    """The run's local folder for files written, then logged (kept: the run's outputs stay on disk)."""
    folder = Path(output_dir) / "artifacts"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# ----------------------------------------------------------------------------------------------------------------
# The chain's view of a stage (called by avlm.protocol.chain after each decided stage)
# ----------------------------------------------------------------------------------------------------------------
def chain_stage_report(decision: Any, swept: Any, folder: Path, download: Any) -> None:
    """``diagnose.json`` / ``diagnose.md`` of the stage's candidate against the baseline (paired by seed and clip,
    on the test split when the stage evaluated it, else val) and the fallback fraction of each candidate cell.

    Args:
        decision: the stage's :class:`avlm.protocol.chain.StageDecision`.
        swept: its :class:`avlm.protocol.sweep.SweepResult`.
        folder: where to write the files (the chain logs them on the stage run and the chain run).
        download: ``download(run_id, artifact_path, destination) -> Path | None``.
    """
    runs = swept.runs
    candidate, baseline = runs.get(decision.candidate, {}), runs.get(decision.baseline, {})
    seeds = sorted(set(candidate) & set(baseline))
    split = "test" if seeds and "final/test_accuracy" in candidate[seeds[0]].metrics else "val"
    if seeds:
        report = diagnose_runs(
            {s: candidate[s].run_id for s in seeds},
            {s: baseline[s].run_id for s in seeds},
            split=split,
            download=download,
            folder=folder,
        )
        if report is not None:
            logger.info(
                "stage %s diagnose (%s): Δ %+.4f, fallback %.3f, anchor precision %s", decision.stage, split,
                report["accuracy"]["delta"], report["fallback"]["frac"], report["anchors"]["precision"],
            )  # fmt: skip
    fallback = {
        cell.name: [c.metrics.get(f"alloc/{split}_fallback_frac", np.nan) for c in runs.get(cell.name, {}).values()]
        for cell in swept.cells
        if cell.name != decision.baseline
    }
    if fallback:
        figure = plots.fallback_per_candidate(fallback, split=split, winner=decision.candidate)
        plots.save_and_close(figure, folder / "fallback_per_candidate.png")
