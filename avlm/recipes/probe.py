"""Probe: do a pretrained backbone's frozen features carry more task information than a random-init copy's?

Method. A gate is declared in the config and logged before anything runs: PASS iff every sanity check passes and,
for the probe configuration (pooling × optimizer) chosen on val, the mean over seeds of (pretrained − random) mAP
is at least ``gate.required_delta``. Then:

1. data: a clip manifest (CSV/JSON: frames, labels, group key, split; ``avlm.data.manifest``), or the built-in
   CVS demo written as one;
2. backbones: the pretrained one (hub weights, a safetensors checkpoint of the same architecture, or a short
   masked-pixel pretext on the unlabelled train clips) and a random-init copy of the same architecture;
3. frozen tokens of every split, once per backbone (feature cache keyed on the weights);
4. sanity suite, before any headline number: split hygiene per seed, tiny-subset overfit, shuffled-label control,
   label provenance;
5. the grid: for each pooling, optimizer and seed, a probe on the pretrained tokens and one on the random-init
   tokens, same init and batch order, each trained by the shared loop ``avlm.train.fit`` (a nested MLflow run per
   cell and seed);
6. the gate's decision, the report (Markdown + JSON) and a plot on the parent run, ``gate=PASS|FAIL`` tags;
7. on PASS only, the probed backbone's reference (not external weights) registered with the gate's evidence.

Run it::

    mlflow run . -e probe --env-manager local                           # demo: a pretext-trained tiny backbone
    python entrypoints/probe.py --config examples/probe/demo_fail.yaml    # demo without pretext: honest FAIL
    python entrypoints/probe.py --config examples/probe/vjepa2_manifest.yaml --manifest /data/clips.csv
"""

from __future__ import annotations

import dataclasses
import json
import logging
import zlib
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate.utils import broadcast_object_list
from torch import nn
from tqdm.auto import tqdm

from avlm.config import config_to_dict, flatten_config, load_config
from avlm.data import ClipManifest, default_cache_dir, load_clip_manifest, write_cvs_demo_manifest
from avlm.errors import ConfigError
from avlm.features import TokenDataset, cached_tokens
from avlm.metrics import mean_average_precision
from avlm.models import VideoBackbone, build_backbone, count_parameters
from avlm.models.heads import AttentivePooler
from avlm.models.pretext import (
    PatchGrid,
    PretextConfig,
    load_backbone_checkpoint,
    pretrain_backbone,
    save_backbone_checkpoint,
    token_patch_grid,
)
from avlm.probe import (
    CellResult,
    GateConfig,
    GateDecision,
    ProbeReport,
    SanityResult,
    ablation_table,
    decide,
    label_provenance,
    render_markdown,
    report_json,
    run_table,
    shuffled_label_control,
    split_hygiene,
    tiny_subset_overfit,
)
from avlm.stats import best_f1
from avlm.tracking import NullLogger, PrefixedLogger, TrackingConfig, nested_run, plots, record_run_start, tracked_run
from avlm.tracking.registry import register_reference
from avlm.train import StepOutput, TrainConfig, build_optimizer, build_scheduler, fit, make_accelerator
from avlm.train.optim import OPTIMIZERS

logger = logging.getLogger(__name__)

RECIPE = "probe"
POOLINGS = ("mean_all", "mean_excluding_cls", "mean_visible", "attentive")
BACKBONES = ("pretrained", "random")
# MLflow keeps tag values up to 8,000 characters; the reasoning is cut below that, the report holds it whole.
_MAX_TAG = 7000


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ProbeDataConfig:
    """Attributes:
    manifest: clip manifest (.csv or .json, see ``avlm.data.manifest``); empty = the built-in CVS demo.
    label_names: the labels, in order; needed only for a CSV ``labels`` column of present names.
    clip_frames: frames per clip, evenly spaced over the listed frames.
    demo_seed: seed of the generated demo data.
    cache_dir: feature cache and demo data location; empty = $AVLM_CACHE_DIR or ~/.cache/avlm.
    max_train_clips / max_val_clips: each seed probes a random subset of at most this many train / val clips
        (drawn with the seed; 0 = all), so that seeds also vary the data, as in the hand-run probes.
    input_mask_ratio: fraction of each clip's patches blanked before the backbone (fixed per sample id), as a
        masked-video model sees its inputs; > 0 enables the ``mean_visible`` pooling. Needs a backbone with one
        token per spatio-temporal patch (V-JEPA 2).
    input_mask_seed: seed of those masks.
    limit_clips: keep only the first N clips of each split (quick checks); 0 = all.
    """

    manifest: str = ""
    label_names: list[str] = dataclasses.field(default_factory=list)
    clip_frames: int = 4
    demo_seed: int = 0
    cache_dir: str = ""
    max_train_clips: int = 0
    max_val_clips: int = 0
    input_mask_ratio: float = 0.0
    input_mask_seed: int = 0
    limit_clips: int = 0

    def __post_init__(self) -> None:
        if self.clip_frames < 1:
            raise ConfigError(f"config key 'data.clip_frames' must be >= 1, got {self.clip_frames}")
        for key in ("max_train_clips", "max_val_clips", "limit_clips"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'data.{key}' must be >= 0 (0 = all), got {getattr(self, key)}")
        if not 0 <= self.input_mask_ratio < 1:
            raise ConfigError(f"config key 'data.input_mask_ratio' must be in [0, 1), got {self.input_mask_ratio}")


@dataclasses.dataclass
class ProbeBackboneConfig:
    """Attributes:
    spec: vjepa2-tiny | vjepa2:<HF id or path> | timm-tiny | timm:<model name>.
    pretrained: load the published weights of a ``vjepa2:``/``timm:`` spec into the pretrained copy.
    checkpoint: a safetensors state dict (``save_backbone_checkpoint``) of the same architecture, loaded into the
        pretrained copy; a mismatch is an error naming the keys.
    init_seed: seed of the random initialisation of both copies (before any loading or pretext).
    frame_tokens: timm ViTs: ``pooled`` (one feature per frame) or ``all`` (every token of every frame, CLS and
        register tokens included, which ``mean_excluding_cls`` leaves out).
    pretext: a self-supervised pretext run on the unlabelled train clips to make the pretrained copy (steps 0 =
        none). The demo uses it; with real weights leave it off.
    """

    spec: str = "vjepa2-tiny"
    pretrained: bool = True
    checkpoint: str = ""
    init_seed: int = 0
    frame_tokens: Literal["pooled", "all"] = "pooled"
    pretext: PretextConfig = dataclasses.field(default_factory=lambda: PretextConfig(steps=0))


@dataclasses.dataclass
class ProbeGridConfig:
    """Attributes:
    poolings: any of mean_all, mean_excluding_cls (needs CLS/register tokens), mean_visible (needs
        data.input_mask_ratio > 0), attentive; the inapplicable ones are skipped with the reason logged.
    optimizers: adamw (lr = train.lr, weight decay = train.weight_decay) and/or sgd (sgd_lr, sgd_momentum).
    seeds: probe seeds; each seeds both probes of a cell alike (init, batch order, data subset).
    sgd_lr / sgd_momentum: the SGD probes' settings.
    attentive_heads: attention heads of the attentive probe.
    """

    poolings: list[str] = dataclasses.field(default_factory=lambda: list(POOLINGS))
    optimizers: list[str] = dataclasses.field(default_factory=lambda: list(OPTIMIZERS))
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3])
    sgd_lr: float = 0.1
    sgd_momentum: float = 0.9
    attentive_heads: int = 4

    def __post_init__(self) -> None:
        for key, allowed in (("poolings", POOLINGS), ("optimizers", OPTIMIZERS)):
            values = getattr(self, key)
            unknown = [v for v in values if v not in allowed]
            if not values or unknown or len(set(values)) != len(values):
                raise ConfigError(f"config key 'grid.{key}' must list distinct values of {list(allowed)}, got {values}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config key 'grid.seeds' must list distinct seeds, got {self.seeds}")
        if self.sgd_lr <= 0 or not 0 <= self.sgd_momentum < 1:
            raise ConfigError("config keys 'grid.sgd_lr' (> 0) and 'grid.sgd_momentum' ([0, 1)) are out of range")


@dataclasses.dataclass
class SanityConfig:
    """Attributes:
    pooling / optimizer: the probe the sanity checks train, on the pretrained features. The attentive probe is the
        one with the most capacity to memorise, so the shuffled-label control is hardest for it.
    tiny_clips: size of the tiny training subset the probe must overfit.
    tiny_batch_size: its batch size (a few steps per epoch; one batch of the whole subset learns slowly).
    epochs: the sanity probes' epoch budget.
    overfit_threshold: train mAP the tiny-subset probe must reach.
    shuffle_min_drop: train mAP the probe must lose when its labels are row-shuffled.
    """

    pooling: str = "attentive"
    optimizer: str = "adamw"
    tiny_clips: int = 32
    tiny_batch_size: int = 8
    epochs: int = 60
    overfit_threshold: float = 0.6
    shuffle_min_drop: float = 0.05

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS or self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"config keys 'sanity.pooling' / 'sanity.optimizer' must be one of {list(POOLINGS)} / "
                f"{list(OPTIMIZERS)}, got {self.pooling!r} / {self.optimizer!r}"
            )
        if self.tiny_clips < 2 or self.epochs < 1 or self.tiny_batch_size < 1:
            raise ConfigError(
                "config keys 'sanity.tiny_clips' (>= 2), 'sanity.tiny_batch_size' and 'sanity.epochs' (>= 1) are out "
                f"of range: {self.tiny_clips}, {self.tiny_batch_size}, {self.epochs}"
            )


@dataclasses.dataclass
class ProbeRegistryConfig:
    """Attributes:
    register: on PASS, register the probed backbone's reference with the gate's evidence as tags (never on FAIL).
    name: registered model name.
    alias: alias moved to the new version.
    """

    register: bool = True
    name: str = "avlm-probe-backbone"
    alias: str = "probe-pass"


@dataclasses.dataclass
class ProbeConfig:
    """The whole probe configuration (examples/probe/*.yaml).

    Attributes:
        seed: seed of the sanity suite (tiny subset, label shuffle, sanity probes).
        output_dir: local folder for the report, probe checkpoints and a pretext checkpoint (one sub-folder per run).
        train: the probes' optimisation, run by the shared loop; a fixed budget (patience 0), and the numbers
            are the last epoch's, so val chooses nothing but the gate configuration.
    """

    seed: int = 0
    output_dir: str = "outputs"
    gate: GateConfig = dataclasses.field(default_factory=GateConfig)
    data: ProbeDataConfig = dataclasses.field(default_factory=ProbeDataConfig)
    backbone: ProbeBackboneConfig = dataclasses.field(default_factory=ProbeBackboneConfig)
    grid: ProbeGridConfig = dataclasses.field(default_factory=ProbeGridConfig)
    sanity: SanityConfig = dataclasses.field(default_factory=SanityConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=30, batch_size=128, lr=1e-2, weight_decay=1e-4, warmup_ratio=0.0, max_grad_norm=0.0, patience=0
        )
    )
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    registry: ProbeRegistryConfig = dataclasses.field(default_factory=ProbeRegistryConfig)


def load_probe_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ProbeConfig:
    return load_config(ProbeConfig, path, overrides)


@dataclasses.dataclass
class ProbeResult:
    """What :func:`main` returns.

    Attributes:
        run_id: the parent MLflow run (None on ranks other than the main one).
        decision: the gate's decision.
        sanity: the sanity suite's results.
        cells: every cell and seed of the grid.
        poolings: the poolings probed; ``skipped_poolings`` maps the others to why.
        report_markdown: the report's text.
        output_dir: where the report and checkpoints were written.
        model_version: the registered version on PASS, else None.
    """

    run_id: str | None
    decision: GateDecision
    sanity: list[SanityResult]
    cells: list[CellResult]
    poolings: list[str]
    skipped_poolings: dict[str, str]
    report_markdown: str
    output_dir: Path
    model_version: str | None = None


# ----------------------------------------------------------------------------------------------------------------
# Data: the manifest, masked inputs, per-seed subsets
# ----------------------------------------------------------------------------------------------------------------
def load_probe_manifest(cfg: ProbeDataConfig) -> tuple[ClipManifest, str]:
    """The manifest (train and val required) and the dataset's name (``cvs-demo`` or the manifest's path)."""
    if cfg.manifest:
        path, name = Path(cfg.manifest), str(Path(cfg.manifest).expanduser())
    else:
        cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
        path = write_cvs_demo_manifest(
            cache, cache / "probe_demo" / f"cvs_demo_s{cfg.demo_seed}.csv", seed=cfg.demo_seed
        )
        name = "cvs-demo"
    manifest = load_clip_manifest(
        path, clip_frames=cfg.clip_frames, label_names=cfg.label_names or None, required_splits=("train", "val")
    )
    if cfg.limit_clips:
        kept = [c for clips in manifest.by_split().values() for c in clips[: cfg.limit_clips]]
        manifest = dataclasses.replace(manifest, clips=[c for c in manifest.clips if c in kept])
    return manifest, name


class MaskedInputs(torch.utils.data.Dataset):
    """A clip dataset whose clips have a fixed random fraction of their patches blanked, with the visible tokens.

    The mask of a clip depends on its sample id and the seed only, so it is the same in every split, subset and
    process. Blanked pixels are set to 0, the dataset mean colour after normalisation (as in the pretext).
    """

    def __init__(self, clips: torch.utils.data.Dataset, grid: PatchGrid, mask_ratio: float, seed: int) -> None:
        self.clips = clips
        self.grid = grid
        self.num_masked = min(grid.num_tokens - 1, max(1, round(mask_ratio * grid.num_tokens)))
        self.seed = seed

    def visible(self, sample_id: str) -> torch.Tensor:
        """(L,) bool: the tokens of the clip whose patches are kept."""
        rng = np.random.default_rng([self.seed, zlib.crc32(sample_id.encode())])
        keep = torch.ones(self.grid.num_tokens, dtype=torch.bool)
        keep[torch.from_numpy(rng.permutation(self.grid.num_tokens)[: self.num_masked])] = False
        return keep

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict:
        item = self.clips[i]
        visible = self.visible(item["sample_id"])
        pixels = item["pixel_values"].masked_fill(self.grid.pixel_mask(~visible[None])[0], 0.0)
        return {**item, "pixel_values": pixels, "visible": visible}


def seed_subset(size: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a random subset of ``limit`` of ``size`` items drawn with ``seed`` (all when 0 or more)."""
    if limit == 0 or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, limit, replace=False))


# ----------------------------------------------------------------------------------------------------------------
# Backbones: the pretrained one and its random-init copy
# ----------------------------------------------------------------------------------------------------------------
def build_backbone_pair(
    cfg: ProbeBackboneConfig,
    num_frames: int,
    pretext_clips: Callable[[VideoBackbone], torch.utils.data.Dataset],
    accelerator: Any,
    out: Path,
) -> tuple[VideoBackbone, VideoBackbone, dict[str, Any]]:
    """The pretrained backbone, its random-init copy (same spec, sizes and init seed) and how the first was made.

    ``pretext_clips(backbone)`` gives the unlabelled clips of the pretext, prepared as the backbone expects.

    The pretext runs on the main process, which saves the result for the other ranks to load: every rank must
    probe the same weights.

    Returns:
        (pretrained, random, status): ``status`` has ``pretrained_status`` (hub weights / checkpoint / pretext /
        random init), ``source`` (what a registered version points at), ``checkpoint`` (a file of this run, or
        None) and the pretext's figures.
    """
    common = {"num_frames": num_frames, "init_seed": cfg.init_seed, "frame_tokens": cfg.frame_tokens}
    pretrained = build_backbone(cfg.spec, pretrained=cfg.pretrained, **common)
    random_copy = build_backbone(cfg.spec, pretrained=False, **common)
    hub_weights = cfg.pretrained and ":" in cfg.spec
    status: dict[str, Any] = {"pretrained_status": "hub weights" if hub_weights else "random init", "checkpoint": None}
    status["source"] = _weights_reference(cfg.spec) if hub_weights else ""
    if cfg.checkpoint:
        load_backbone_checkpoint(pretrained, cfg.checkpoint)
        status.update(pretrained_status=f"checkpoint {cfg.checkpoint}", source=str(Path(cfg.checkpoint).resolve()))
    if cfg.pretext.steps:
        path = out / "backbone" / "pretrained.safetensors"
        if accelerator.is_main_process:
            figures = pretrain_backbone(pretrained, pretext_clips(pretrained), cfg.pretext, device=accelerator.device)
            save_backbone_checkpoint(pretrained, path)
            status["pretext"] = figures
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            load_backbone_checkpoint(pretrained, path)
        status.update(pretrained_status=f"pretext {cfg.pretext.objective} {cfg.pretext.steps} steps", checkpoint=path)
    if status["pretrained_status"] == "random init":
        logger.warning(
            "backbone '%s' has no pretrained weights, checkpoint or pretext: the probe compares two random inits "
            "(both from init_seed %d), so the gate cannot pass",
            cfg.spec,
            cfg.init_seed,
        )
    for backbone in (pretrained, random_copy):
        backbone.requires_grad_(False).eval().to(accelerator.device)
    return pretrained, random_copy, status


def _weights_reference(spec: str) -> str:
    """Where published weights come from: a local folder's absolute path, ``hf://<id>``, or the timm spec."""
    kind, _, source = spec.partition(":")
    if kind == "vjepa2":
        return str(Path(source).resolve()) if Path(source).exists() else f"hf://{source}"
    return spec


def pooling_unavailable(pooling: str, backbone: VideoBackbone, masked: bool) -> str | None:
    """Why ``pooling`` cannot be used with this backbone and input, or None if it can."""
    if pooling == "mean_excluding_cls" and backbone.prefix_token_mask() is None:
        return f"backbone '{backbone.name}' has no CLS or register token"
    if pooling == "mean_visible" and not masked:
        return "inputs are not masked (data.input_mask_ratio is 0)"
    return None


def available_poolings(requested: list[str], backbone: VideoBackbone, masked: bool) -> tuple[list[str], dict]:
    """The requested poolings this backbone and input can serve, and the reason for each one skipped."""
    skipped = {p: reason for p in requested if (reason := pooling_unavailable(p, backbone, masked))}
    kept = [p for p in requested if p not in skipped]
    if not kept:
        raise ConfigError(f"config key 'grid.poolings': none of {requested} applies here ({skipped})")
    return kept, skipped


def pooled_features(
    tokens: torch.Tensor, pooling: str, visible: torch.Tensor | None, prefix: torch.Tensor | None
) -> torch.Tensor:
    """(N, L, D) tokens → what the probe sees: (N, D) for the mean poolings, the tokens for ``attentive``."""
    if pooling == "mean_all":
        return tokens.mean(dim=1)
    if pooling == "mean_excluding_cls":
        return tokens[:, ~prefix].mean(dim=1)
    if pooling == "mean_visible":
        weights = visible.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return tokens


# ----------------------------------------------------------------------------------------------------------------
# The probe and its training through the shared loop
# ----------------------------------------------------------------------------------------------------------------
class LinearProbe(nn.Module):
    """A linear classifier on standardised pooled features, or on an attentive pooling of the tokens.

    Args:
        dim: feature width D.
        num_labels: outputs.
        pooling: ``attentive`` puts a one-query ``AttentivePooler`` (V-JEPA's evaluation probe) before the linear
            layer; otherwise the inputs are already pooled and are standardised with ``feature_mean``/``feature_std``
            (the training split's), so that one learning rate suits every backbone.
        heads: attention heads of the attentive pooler.
    """

    def __init__(
        self,
        dim: int,
        num_labels: int,
        pooling: str,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_queries=1, num_heads=heads) if pooling == "attentive" else None
        self.register_buffer("feature_mean", feature_mean if feature_mean is not None else torch.zeros(dim))
        self.register_buffer("feature_std", feature_std if feature_std is not None else torch.ones(dim))
        self.linear = nn.Linear(dim, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.pooler is not None:
            features, _ = self.pooler(features)
        else:
            features = (features - self.feature_mean) / self.feature_std
        return self.linear(features)


@dataclasses.dataclass
class ProbeFit:
    """A trained probe's last-epoch predictions.

    Attributes:
        scores / targets: split → (N, K) sigmoid scores and the targets they were scored against, in split order.
        first_batch: the labels and dataset indices of the first training batch.
    """

    scores: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    first_batch: tuple[np.ndarray, np.ndarray]


@dataclasses.dataclass
class FrozenFeatures:
    """The frozen tokens of both backbones for every split, and what each pooling needs besides them.

    Attributes:
        tokens: backbone name (``pretrained``/``random``) → split → (N, L, D) tokens in manifest order.
        labels: split → (N, K) float labels in manifest order.
        visible: split → (N, L) bool visible tokens (masked inputs only).
        prefix: (L,) bool CLS/register tokens, or None.
    """

    tokens: dict[str, dict[str, torch.Tensor]]
    labels: dict[str, torch.Tensor]
    visible: dict[str, torch.Tensor]
    prefix: torch.Tensor | None

    def inputs(self, backbone: str, pooling: str, subsets: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Split → the probe inputs of the clips ``subsets[split]`` (indices into the split)."""
        return {
            split: pooled_features(self.tokens[backbone][split], pooling, self.visible.get(split), self.prefix)[
                torch.as_tensor(indices)
            ]
            for split, indices in subsets.items()
        }

    def targets(self, subsets: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Split → the labels of the clips ``subsets[split]``."""
        return {split: self.labels[split][torch.as_tensor(indices)] for split, indices in subsets.items()}


def train_probe(
    *,
    features: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    pooling: str,
    optimizer_name: str,
    seed: int,
    train_cfg: TrainConfig,
    grid: ProbeGridConfig,
    accelerator: Any,
    run_logger: Any,
    checkpoint_dir: Path,
    config_yaml: str,
) -> ProbeFit:
    """Train one probe on ``features["train"]`` with the shared loop; predict every split of ``features``.

    The probe's init and batch order depend on ``seed`` alone, so the pretrained and random-init probes of a cell
    differ only by their features. The predictions are the last epoch's: val chooses nothing here.
    """
    train_features, train_labels = features["train"], labels["train"]
    stats = {}
    if pooling != "attentive":
        stats = {"feature_mean": train_features.mean(0), "feature_std": train_features.std(0).clamp_min(1e-6)}
    torch.manual_seed(seed)
    probe = LinearProbe(train_features.shape[-1], train_labels.shape[1], pooling, heads=grid.attentive_heads, **stats)
    lr = train_cfg.lr if optimizer_name == "adamw" else grid.sgd_lr
    # No decay on biases and the pooler's queries and norms, as in the other recipes.
    decayed = [p for n, p in probe.named_parameters() if p.ndim >= 2 and "queries" not in n]
    not_decayed = [p for n, p in probe.named_parameters() if p.ndim < 2 or "queries" in n]
    optimizer = build_optimizer(
        [
            {"params": decayed, "lr": lr, "weight_decay": train_cfg.weight_decay},
            {"params": not_decayed, "lr": lr, "weight_decay": 0.0},
        ],
        kind=optimizer_name,
        momentum=grid.sgd_momentum,
    )
    train_loader = torch.utils.data.DataLoader(
        TokenDataset(train_features, train_labels),
        batch_size=min(train_cfg.batch_size, len(train_features)),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    eval_loaders = {
        split: torch.utils.data.DataLoader(TokenDataset(features[split], labels[split]), batch_size=512)
        for split in features
    }
    scheduler = build_scheduler(
        optimizer,
        name=train_cfg.scheduler,
        num_training_steps=train_cfg.epochs * len(train_loader),
        warmup_ratio=train_cfg.warmup_ratio,
    )
    probe, optimizer, train_loader, scheduler = accelerator.prepare(probe, optimizer, train_loader, scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    loss_fn = nn.BCEWithLogitsLoss()
    first_batch: list[np.ndarray] = []

    def train_step(model: nn.Module, batch: dict[str, Any], _generator: torch.Generator) -> StepOutput:
        if not first_batch:  # what the first batch really trained on, for the label-provenance check
            first_batch.extend([batch["labels"].cpu().numpy(), batch["index"].cpu().numpy()])
        logits = model(batch["tokens"])
        return StepOutput(loss_fn(logits, batch["labels"]), torch.sigmoid(logits), batch["labels"])

    @torch.no_grad()
    def predict(model: nn.Module, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        scores, targets = [], []
        for batch in loader:
            logits, batch_labels = accelerator.gather_for_metrics((model(batch["tokens"]), batch["labels"]))
            scores.append(torch.sigmoid(logits).float().cpu().numpy())
            targets.append(batch_labels.float().cpu().numpy())
        return np.concatenate(scores), np.concatenate(targets)

    def evaluate(model: nn.Module) -> dict[str, float]:
        scores, targets = predict(model, eval_loaders["val"])
        return {"val/mAP": mean_average_precision(targets, scores), "val/best_F1": best_f1(targets, scores)}

    fit(
        accelerator=accelerator,
        model=probe,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        train_step=train_step,
        train_metrics=lambda scores, targets: {"mAP": mean_average_precision(targets, scores)},
        evaluate=evaluate,
        cfg=train_cfg,
        seed=seed,
        run_logger=run_logger,
        checkpoint_dir=checkpoint_dir,
        config_yaml=config_yaml,
        trainable_state=lambda: {k: v.detach().cpu() for k, v in accelerator.unwrap_model(probe).state_dict().items()},
        verbose=False,
    )
    probe.eval()
    predictions = {split: predict(probe, loader) for split, loader in eval_loaders.items()}
    return ProbeFit(
        scores={split: scores for split, (scores, _) in predictions.items()},
        targets={split: targets for split, (_, targets) in predictions.items()},
        first_batch=(first_batch[0], first_batch[1]),
    )


# ----------------------------------------------------------------------------------------------------------------
# The sanity suite
# ----------------------------------------------------------------------------------------------------------------
def run_sanity_suite(
    cfg: ProbeConfig,
    manifest: ClipManifest,
    subsets_by_seed: dict[int, dict[str, np.ndarray]],
    train: Any,
) -> tuple[list[SanityResult], list[dict[str, Any]]]:
    """The sanity checks, in the order the report shows them, and the first training batch's rows.

    1. split hygiene for each seed's train/val subsets (and the whole train split against test, if any);
    2. tiny-subset overfit and 3. shuffled-label control, with probes of ``sanity.pooling`` and
    ``sanity.optimizer`` on the pretrained features, trained for ``sanity.epochs``;
    4. label provenance of the shuffled-label control's true-label probe (the same code trains the grid's probes).

    Args:
        train: ``train(subsets, train_labels or None, train_cfg) -> ProbeFit``, a pretrained-feature probe.
    """
    by_split = manifest.by_split()
    results = []
    hygiene_pairs = [
        (f"split_hygiene_seed{seed}", subsets["train"], "val", subsets["val"])
        for seed, subsets in subsets_by_seed.items()
    ]
    if "test" in by_split:
        hygiene_pairs.append(
            ("split_hygiene_train_test", np.arange(len(by_split["train"])), "test", np.arange(len(by_split["test"])))
        )
    for name, train_indices, other, other_indices in hygiene_pairs:
        train_clips = [by_split["train"][i] for i in train_indices]
        other_clips = [by_split[other][i] for i in other_indices]
        results.append(
            split_hygiene(
                [c.group for c in train_clips],
                [c.group for c in other_clips],
                [c.sample_id for c in train_clips],
                [c.sample_id for c in other_clips],
                name=name,
                other=other,
            )
        )

    train_labels = manifest.label_matrix("train")
    all_train, all_val = np.arange(len(train_labels)), np.arange(len(by_split["val"]))
    tiny = np.sort(np.random.default_rng(cfg.seed).permutation(len(train_labels))[: cfg.sanity.tiny_clips])
    full_cfg = dataclasses.replace(cfg.train, epochs=cfg.sanity.epochs)
    tiny_cfg = dataclasses.replace(full_cfg, batch_size=cfg.sanity.tiny_batch_size)
    fits: list[ProbeFit] = []

    def train_map(train_indices: np.ndarray, labels: np.ndarray | None, train_cfg: TrainConfig) -> float:
        fitted = train({"train": train_indices, "val": all_val}, labels, train_cfg)
        fits.append(fitted)
        return mean_average_precision(fitted.targets["train"], fitted.scores["train"])

    results.append(tiny_subset_overfit(lambda: train_map(tiny, None, tiny_cfg), cfg.sanity.overfit_threshold))
    results.append(
        shuffled_label_control(
            lambda labels: train_map(all_train, labels, full_cfg), train_labels, cfg.seed, cfg.sanity.shuffle_min_drop
        )
    )
    # The true-label probe of the shuffled control (it is not trained when the shuffle changed nothing).
    reference = fits[1] if len(fits) > 1 else train({"train": all_train, "val": all_val}, None, full_cfg)
    first_labels, first_indices = reference.first_batch
    results.append(
        label_provenance(
            first_labels, first_indices, train_labels, reference.targets["val"], manifest.label_matrix("val")
        )
    )
    alignment = [
        {
            "row": int(i),
            "sample_id": by_split["train"][i].sample_id,
            "group": by_split["train"][i].group,
            "labels": ";".join(n for n, v in zip(manifest.label_names, train_labels[i], strict=True) if v) or "-",
        }
        for i in first_indices[:10]
    ]
    return results, alignment


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: ProbeConfig) -> ProbeResult:
    """Run the probe and decide the gate. See the module docstring for the method."""
    accelerator = make_accelerator(cfg.train)
    run_name = cfg.tracking.run_name or f"{RECIPE}-{cfg.backbone.spec.split('/')[-1].replace(':', '-')}"
    is_main = accelerator.is_main_process
    with tracked_run(cfg.tracking, recipe=RECIPE, run_name=run_name, is_main_process=is_main) as run_logger:
        # -- 0. the gate, declared before anything runs -------------------------------------------------------------
        gate_text = (
            f"PASS iff every sanity check passes and the mean over seeds of (pretrained - random) "
            f"{cfg.gate.evaluate_on} {cfg.gate.metric} >= {cfg.gate.required_delta:g} for the pooling x optimizer "
            f"chosen on {cfg.gate.select_on}"
        )
        run_logger.log_params({f"gate.{k}": v for k, v in dataclasses.asdict(cfg.gate).items()})
        run_logger.set_tags({"gate.declared": gate_text, "gate": "PENDING"})
        run_id = run_logger.run_id
        # One folder for every rank (they load the pretext checkpoint from it), named by the main run's id.
        (run_tag,) = broadcast_object_list([(run_id or "local")[:8]])
        out = Path(cfg.output_dir) / f"{run_name}-{run_tag}"
        config_yaml = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)

        # -- 1. data: the manifest ----------------------------------------------------------------------------------
        manifest, dataset_name = load_probe_manifest(cfg.data)
        splits = [s for s in ("train", "val", "test") if s in manifest.by_split()]
        if cfg.gate.evaluate_on not in splits:
            raise ConfigError(
                f"config key 'gate.evaluate_on' = {cfg.gate.evaluate_on!r}, but {manifest.path} has no such split; "
                "add one, or evaluate on val (the split the configuration is chosen on: an optimistic figure)"
            )
        # -- 2. backbones: the pretrained one and its random-init copy -------------------------------------------
        pretrained, random_copy, status = build_backbone_pair(
            cfg.backbone,
            cfg.data.clip_frames,
            lambda backbone: manifest.dataset("train", backbone.image_size, backbone.mean, backbone.std),
            accelerator,
            out,
        )
        clips: dict[str, Any] = {
            s: manifest.dataset(s, pretrained.image_size, pretrained.mean, pretrained.std) for s in splits
        }
        masked = cfg.data.input_mask_ratio > 0
        if masked:
            grid = token_patch_grid(pretrained, "data.input_mask_ratio (masked inputs)")
            clips = {
                s: MaskedInputs(ds, grid, cfg.data.input_mask_ratio, cfg.data.input_mask_seed)
                for s, ds in clips.items()
            }
        poolings, skipped = available_poolings(cfg.grid.poolings, pretrained, masked)
        for pooling, reason in skipped.items():
            logger.warning("pooling %s skipped: %s", pooling, reason)
        if reason := pooling_unavailable(cfg.sanity.pooling, pretrained, masked):
            raise ConfigError(f"config key 'sanity.pooling' = {cfg.sanity.pooling!r} does not apply here: {reason}")
        # What trains is one probe at a time on the frozen backbone; the run card counts the grid's largest one.
        largest_probe = max(
            count_parameters(
                LinearProbe(pretrained.feature_dim, len(manifest.label_names), p, heads=cfg.grid.attentive_heads)
            )[0]
            for p in poolings
        )
        record_run_start(
            run_logger,
            cfg=cfg,
            config_yaml=config_yaml,
            tags={
                "recipe": RECIPE,
                "dataset": dataset_name,
                "backbone": cfg.backbone.spec,
                "pretrained_status": status["pretrained_status"],
                **{f"pooling_skipped.{p}": r for p, r in skipped.items()},
            },
            run_card={
                "recipe": RECIPE,
                "run_name": run_name,
                "gate": gate_text,
                "dataset": _dataset_card(manifest, dataset_name, splits),
                "backbones": {
                    "pretrained": {
                        "fingerprint": pretrained.fingerprint(),
                        "status": status["pretrained_status"],
                        "source": status["source"],
                    },
                    "random": {"fingerprint": random_copy.fingerprint(), "init_seed": cfg.backbone.init_seed},
                },
                "poolings": poolings,
                "skipped_poolings": skipped,
            },
            num_processes=accelerator.num_processes,
            mixed_precision=cfg.train.mixed_precision,
            trainable_params=largest_probe,
            total_params=largest_probe + sum(p.numel() for p in pretrained.parameters()),
        )
        if "pretext" in status:  # figures of the pretext, which ran on the main process
            for step, loss in enumerate(status["pretext"]["losses"]):
                run_logger.log_metrics({"pretext/loss": loss}, step=step)
            run_logger.log_metrics({"pretext/seconds": status["pretext"]["seconds"]}, step=0)
            run_logger.log_artifact(status["checkpoint"], "backbone")

        # -- 3. frozen tokens, once per backbone and split (cached on disk, keyed on the weights) -----------------
        cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
        features = FrozenFeatures(
            tokens={
                name: {
                    s: cached_tokens(
                        backbone,
                        clips[s],
                        key_parts={
                            "backbone": backbone.fingerprint(),
                            "image_size": backbone.image_size,
                            "mean": backbone.mean,
                            "std": backbone.std,
                            "clip_frames": cfg.data.clip_frames,
                            "manifest": manifest.manifest_hash(s),
                            "input_mask": [cfg.data.input_mask_ratio, cfg.data.input_mask_seed] if masked else None,
                        },
                        cache_dir=cache_dir,
                        accelerator=accelerator,
                        batch_size=64,
                    )[0]
                    for s in splits
                }
                for name, backbone in (("pretrained", pretrained), ("random", random_copy))
            },
            labels={s: torch.as_tensor(manifest.label_matrix(s), dtype=torch.float32) for s in splits},
            visible={s: torch.stack([clips[s].visible(c.sample_id) for c in manifest.split(s)]) for s in splits}
            if masked
            else {},
            prefix=pretrained.prefix_token_mask(),
        )
        subsets_by_seed = {
            seed: {
                "train": seed_subset(len(features.labels["train"]), cfg.data.max_train_clips, seed),
                "val": seed_subset(len(features.labels["val"]), cfg.data.max_val_clips, seed),
                **({"test": np.arange(len(features.labels["test"]))} if "test" in splits else {}),
            }
            for seed in cfg.grid.seeds
        }

        def train(backbone, pooling, optimizer_name, seed, subsets, train_cfg, log, where, train_labels=None):
            labels = features.targets(subsets)
            if train_labels is not None:
                labels["train"] = torch.as_tensor(train_labels, dtype=torch.float32)
            return train_probe(
                features=features.inputs(backbone, pooling, subsets),
                labels=labels,
                pooling=pooling,
                optimizer_name=optimizer_name,
                seed=seed,
                train_cfg=train_cfg,
                grid=cfg.grid,
                accelerator=accelerator,
                run_logger=log,
                checkpoint_dir=out / "probes" / where,
                config_yaml=config_yaml,
            )

        # -- 4. sanity suite, before any headline number ------------------------------------------------------------
        sanity, alignment = run_sanity_suite(
            cfg,
            manifest,
            subsets_by_seed,
            lambda subsets, labels, train_cfg: train(
                "pretrained",
                cfg.sanity.pooling,
                cfg.sanity.optimizer,
                cfg.seed,
                subsets,
                train_cfg,
                NullLogger(),
                "sanity",
                labels,
            ),
        )
        for check in sanity:
            numbers = {
                k: v for k, v in check.figures.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            run_logger.log_metrics({f"sanity/{check.name}/{k}": v for k, v in numbers.items()}, step=0)
            run_logger.set_tags({f"sanity.{check.name}": "PASS" if check.passed else "FAIL"})
        run_logger.set_tags({"sanity.all_passed": str(all(check.passed for check in sanity))})

        # -- 5. the grid: pooling × optimizer × seed, a pretrained and a random-init probe each ---------------------
        cells = []
        grid_cells = [(p, o, seed) for p in poolings for o in cfg.grid.optimizers for seed in cfg.grid.seeds]
        for pooling, optimizer_name, seed in tqdm(grid_cells, desc="probe grid", disable=not is_main):
            where = f"{pooling}-{optimizer_name}-seed{seed}"
            with nested_run(
                run_logger,
                run_name=where,
                tags={"recipe": RECIPE, "pooling": pooling, "optimizer": optimizer_name, "seed": seed},
            ) as child:
                child.log_params({"pooling": pooling, "optimizer": optimizer_name, "seed": seed})
                fits = {
                    name: train(
                        name,
                        pooling,
                        optimizer_name,
                        seed,
                        subsets_by_seed[seed],
                        cfg.train,
                        PrefixedLogger(child, f"{name}/"),
                        f"{where}/{name}",
                    )
                    for name in BACKBONES
                }
                cell = _cell_result(pooling, optimizer_name, seed, fits)
                child.log_metrics(_cell_metrics(cell), step=0)
            cells.append(cell)
            logger.info(
                "%s: val mAP pretrained %.4f, random %.4f, delta %+.4f", where, cell.pre_val, cell.rand_val,
                cell.pre_val - cell.rand_val,
            )  # fmt: skip

        # -- 6. the gate's decision, the report, the plot ------------------------------------------------------------
        decision = decide(cells, sanity, cfg.gate)
        report = ProbeReport(
            generated_at=datetime.now(timezone.utc),
            config_snapshot={
                "dataset": dataset_name,
                "manifest": str(manifest.path),
                "pretrained_status": status["pretrained_status"],
                "poolings_probed": poolings,
                **{f"pooling_skipped.{p}": r for p, r in skipped.items()},
                **flatten_config(cfg),
            },
            sanity=sanity,
            gate=decision,
            ablation=ablation_table(cells, "val"),
            runs=run_table(cells),
            alignment_samples=alignment,
            title=f"Probe Report: {cfg.backbone.spec} on {dataset_name}",
        )
        result = ProbeResult(
            run_id=run_id,
            decision=decision,
            sanity=sanity,
            cells=cells,
            poolings=poolings,
            skipped_poolings=skipped,
            report_markdown=render_markdown(report),
            output_dir=out,
        )
        if not is_main:
            return result
        out.mkdir(parents=True, exist_ok=True)
        (out / "probe_report.md").write_text(result.report_markdown)
        (out / "probe_report.json").write_text(json.dumps(report_json(report), indent=2, allow_nan=False))
        run_logger.log_artifact(out / "probe_report.md", "report")
        run_logger.log_artifact(out / "probe_report.json", "report")
        run_logger.log_figure(plots.probe_cells(report.ablation), "plots/probe_cells.png")
        verdict = "PASS" if decision.passed else "FAIL"
        run_logger.log_metrics(
            {
                "gate/passed": float(decision.passed),
                "gate/delta_mean": decision.delta_mean,
                "gate/delta_std": decision.delta_std,
                "gate/pre_mean": decision.pre_mean,
                "gate/rand_mean": decision.rand_mean,
                "gate/required_delta": decision.required_delta,
            },
            step=0,
        )
        evidence = {
            "gate": verdict,
            "gate.pooling": decision.gate_pooling,
            "gate.optimizer": decision.gate_optimizer,
            "gate.evaluated_on": decision.evaluated_on,
            "gate.seeds": ",".join(map(str, decision.seeds)),
            "gate.delta_mean": repr(decision.delta_mean),
            "gate.delta_std": repr(decision.delta_std),
            "gate.pre_mean": repr(decision.pre_mean),
            "gate.rand_mean": repr(decision.rand_mean),
            "gate.required_delta": repr(decision.required_delta),
            "gate.reasoning": "\n".join(decision.reasons)[:_MAX_TAG],
        }
        run_logger.set_tags(evidence)

        # -- 7. registry: on PASS only, the probed backbone's reference with the evidence --------------------------
        if decision.passed and cfg.registry.register:
            # A pretext checkpoint is this run's artifact; external weights stay where they are and are referenced.
            source = f"{run_logger.artifact_uri}/backbone" if status["checkpoint"] is not None else status["source"]
            version = register_reference(
                cfg.registry.name,
                source=source,
                run_id=run_id,
                alias=cfg.registry.alias,
                description=f"Probe gate PASS. {decision.reasons[-1]}",
                tags={
                    **evidence,
                    "recipe": RECIPE,
                    "backbone": cfg.backbone.spec,
                    "pretrained_status": status["pretrained_status"],
                    "weights_fingerprint": pretrained.fingerprint(),
                    "dataset": dataset_name,
                    "gate.declared": gate_text,
                    "gate.report": f"{run_logger.artifact_uri}/report/probe_report.md",
                },
            )
            result.model_version = str(version.version)
            run_logger.set_tags({"registered_version": result.model_version})
        logger.info("probe gate %s: %s", verdict, decision.reasons[-2])
        return result


def _dataset_card(manifest: ClipManifest, name: str, splits: list[str]) -> dict[str, Any]:
    return {
        "name": name,
        "manifest": str(manifest.path),
        "label_names": list(manifest.label_names),
        "manifest_sha256": {s: manifest.manifest_hash(s) for s in splits},
        "label_sha256": {s: manifest.label_checksum(s) for s in splits},
        "clips": {s: len(manifest.split(s)) for s in splits},
        "groups": {s: len(manifest.groups_by_split()[s]) for s in splits},
        "positive_rate": {
            s: dict(zip(manifest.label_names, manifest.label_matrix(s).mean(0).round(4).tolist(), strict=True))
            for s in splits
        },
    }


def _cell_result(pooling: str, optimizer_name: str, seed: int, fits: dict[str, ProbeFit]) -> CellResult:
    def split_map(name: str, split: str) -> float | None:
        fitted = fits[name]
        return mean_average_precision(fitted.targets[split], fitted.scores[split]) if split in fitted.scores else None

    return CellResult(
        pooling=pooling,
        optimizer=optimizer_name,
        seed=seed,
        pre_val=split_map("pretrained", "val"),
        rand_val=split_map("random", "val"),
        pre_test=split_map("pretrained", "test"),
        rand_test=split_map("random", "test"),
        pre_best_f1=best_f1(fits["pretrained"].targets["val"], fits["pretrained"].scores["val"]),
        rand_best_f1=best_f1(fits["random"].targets["val"], fits["random"].scores["val"]),
    )


def _cell_metrics(cell: CellResult) -> dict[str, float]:
    metrics = {
        "pre_val_mAP": cell.pre_val,
        "rand_val_mAP": cell.rand_val,
        "delta_val_mAP": cell.pre_val - cell.rand_val,
        "pre_val_best_F1": cell.pre_best_f1,
        "rand_val_best_F1": cell.rand_best_f1,
    }
    if cell.pre_test is not None and cell.rand_test is not None:
        metrics.update(
            pre_test_mAP=cell.pre_test, rand_test_mAP=cell.rand_test, delta_test_mAP=cell.pre_test - cell.rand_test
        )
    return metrics


def probe_summary(cfg: ProbeConfig, result: ProbeResult) -> list[str]:
    """The entry point's closing lines: the verdict, its figures, the report, the registry."""
    d = result.decision
    lines = [
        f"MLflow run {result.run_id}: probe gate {'PASS' if d.passed else 'FAIL'} "
        f"(pooling={d.gate_pooling}, optimizer={d.gate_optimizer}, {d.evaluated_on} {d.metric})",
        *[f"  {reason}" for reason in d.reasons],
        f"Report: {result.output_dir / 'probe_report.md'} (and in the run's artifacts under report/)",
    ]
    if result.model_version:
        lines.append(f"Registered {cfg.registry.name} version {result.model_version} (alias {cfg.registry.alias}).")
    else:
        lines.append("Nothing registered" + (" (the gate failed)." if not d.passed else " (registry.register is off)."))
    return lines
