"""Probe: do a pretrained backbone's frozen features carry more task information than a random-init copy's?

Method. A gate is declared in the config and logged before anything trains: PASS iff every sanity check passes and,
for the probe configuration (pooling × optimizer) chosen on val, the mean over seeds of (pretrained − random) mAP
is at least ``gate.required_delta``. Then:

1. data: a clip manifest (CSV/JSON: frames, labels, group key, split; ``avlm.data.manifest``), or the built-in
   CVS demo written as one; read and checked before the MLflow run is opened, so bad data leaves no run behind;
2. backbones: the pretrained one (hub weights, a safetensors checkpoint of the same architecture, or a short
   masked-pixel pretext on the unlabelled train clips) and a random-init copy of the same architecture;
3. frozen tokens of every split, once per backbone (feature cache keyed on the weights; ``avlm.probe.features``);
4. sanity suite, before any headline number: split hygiene per seed, tiny-subset overfit, shuffled-label control,
   label provenance;
5. the grid: for each pooling, optimizer and seed, a probe on the pretrained tokens and one on the random-init
   tokens, same init and batch order, each trained by the shared loop ``avlm.train.fit`` (``avlm.probe.train``;
   a nested MLflow run per cell and seed);
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
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from avlm.config import config_to_dict, flatten_config, load_config
from avlm.data import ClipManifest, default_cache_dir, load_clip_manifest, write_cvs_demo_manifest
from avlm.data.masked_inputs import MaskedInputs
from avlm.errors import ConfigError, DataError
from avlm.metrics import mean_average_precision
from avlm.models import LinearProbe, VideoBackbone, build_backbone, count_parameters
from avlm.models.pretext import (
    PretextConfig,
    load_backbone_checkpoint,
    pretrain_backbone,
    save_backbone_checkpoint,
    token_patch_grid,
)
from avlm.probe import (
    POOLINGS,
    CellResult,
    GateConfig,
    GateDecision,
    ProbeFit,
    ProbeReport,
    SanityResult,
    ablation_table,
    available_poolings,
    cell_metrics,
    cell_result,
    decide,
    evidence_tags,
    extract_frozen_features,
    gate_metrics,
    label_provenance,
    pooling_unavailable,
    render_markdown,
    report_json,
    run_table,
    seed_subset,
    shuffled_label_control,
    split_hygiene,
    tiny_subset_overfit,
    train_probe,
)
from avlm.tracking import (
    NullLogger,
    PrefixedLogger,
    RunLogger,
    TrackingConfig,
    nested_run,
    plots,
    record_run_start,
    tracked_run,
)
from avlm.tracking.registry import register_reference
from avlm.train import TrainConfig, make_accelerator
from avlm.train.optim import OPTIMIZERS

logger = logging.getLogger(__name__)

RECIPE = "probe"
BACKBONES = ("pretrained", "random")


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
        (drawn with the seed; 0 = all), so that seeds also vary the data, as in the hand-run probes. A probe
        standardises its features over its train clips, so it needs at least 2 of them.
    input_mask_ratio: fraction of each clip's patches blanked before the backbone (fixed per sample id), as a
        masked-video model sees its inputs; > 0 enables the ``mean_visible`` pooling. Needs a backbone with one
        token per spatio-temporal patch (V-JEPA 2).
    input_mask_seed: seed of those masks.
    limit_clips: keep only the first N clips of each split (quick checks); 0 = all, else at least 2.
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
        for key in ("max_train_clips", "limit_clips"):  # one train clip has no feature spread to standardise by
            if getattr(self, key) == 1:
                raise ConfigError(f"config key 'data.{key}' must be 0 (all) or >= 2 (a probe's train clips), got 1")
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

    def __post_init__(self) -> None:
        if self.sanity.pooling == "mean_visible" and self.data.input_mask_ratio == 0:
            raise ConfigError(
                "config key 'sanity.pooling' = 'mean_visible' needs masked inputs: set data.input_mask_ratio > 0, "
                "or another sanity.pooling"
            )


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
# Data: the manifest
# ----------------------------------------------------------------------------------------------------------------
def load_probe_manifest(cfg: ProbeDataConfig) -> tuple[ClipManifest, str]:
    """The manifest (train and val required, train with at least 2 clips) and the dataset's name (``cvs-demo`` or
    the manifest's path).

    Raises:
        DataError: what ``load_clip_manifest`` refuses, or a train split of one clip (nothing to standardise the
            features by: the probe's loss would be NaN).
    """
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
    if len(manifest.split("train")) < 2:
        raise DataError(f"{manifest.path}: split 'train' has 1 clip; a probe needs at least 2")
    return manifest, name


# ----------------------------------------------------------------------------------------------------------------
# Backbones: the pretrained one and its random-init copy
# ----------------------------------------------------------------------------------------------------------------
def build_backbone_pair(
    cfg: ProbeBackboneConfig,
    num_frames: int,
    pretext_clips: Callable[[VideoBackbone], torch.utils.data.Dataset],
    accelerator: Accelerator,
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


# ----------------------------------------------------------------------------------------------------------------
# The sanity suite
# ----------------------------------------------------------------------------------------------------------------
def run_sanity_suite(
    cfg: ProbeConfig,
    manifest: ClipManifest,
    subsets_by_seed: dict[int, dict[str, np.ndarray]],
    train: Callable[[dict[str, np.ndarray], np.ndarray | None, TrainConfig], ProbeFit],
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

    # -- 1. data: the manifest, checked before an MLflow run exists (bad data must not leave a FAILED run) ---------
    manifest, dataset_name = load_probe_manifest(cfg.data)
    checkpoint = Path(cfg.backbone.checkpoint).expanduser() if cfg.backbone.checkpoint else None
    if checkpoint is not None and not checkpoint.is_file():
        raise ConfigError(f"config key 'backbone.checkpoint': {checkpoint} does not exist")
    splits = [s for s in ("train", "val", "test") if s in manifest.by_split()]
    if cfg.gate.evaluate_on not in splits:
        raise ConfigError(
            f"config key 'gate.evaluate_on' = {cfg.gate.evaluate_on!r}, but {manifest.path} has no such split; "
            "add one, or evaluate on val (the split the configuration is chosen on: an optimistic figure)"
        )

    with tracked_run(cfg.tracking, recipe=RECIPE, run_name=run_name, is_main_process=is_main) as run_logger:
        # -- the gate, declared before anything trains ----------------------------------------------------------
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
        features = extract_frozen_features(
            {"pretrained": pretrained, "random": random_copy},
            clips,
            manifest,
            clip_frames=cfg.data.clip_frames,
            input_mask=(cfg.data.input_mask_ratio, cfg.data.input_mask_seed) if masked else None,
            cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(),
            accelerator=accelerator,
        )
        subsets_by_seed = {
            seed: {
                "train": seed_subset(len(features.labels["train"]), cfg.data.max_train_clips, seed),
                "val": seed_subset(len(features.labels["val"]), cfg.data.max_val_clips, seed),
                **({"test": np.arange(len(features.labels["test"]))} if "test" in splits else {}),
            }
            for seed in cfg.grid.seeds
        }

        def train(
            backbone: str,
            pooling: str,
            optimizer_name: str,
            seed: int,
            subsets: dict[str, np.ndarray],
            train_cfg: TrainConfig,
            log: RunLogger,
            where: str,
            train_labels: np.ndarray | None = None,
        ) -> ProbeFit:
            labels = features.targets(subsets)
            if train_labels is not None:
                labels["train"] = torch.as_tensor(train_labels, dtype=torch.float32)
            return train_probe(
                features=features.inputs(backbone, pooling, subsets),
                labels=labels,
                pooling=pooling,
                optimizer_name=optimizer_name,
                lr=train_cfg.lr if optimizer_name == "adamw" else cfg.grid.sgd_lr,
                momentum=cfg.grid.sgd_momentum,
                attentive_heads=cfg.grid.attentive_heads,
                seed=seed,
                train_cfg=train_cfg,
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
                cell = cell_result(pooling, optimizer_name, seed, fits)
                child.log_metrics(cell_metrics(cell), step=0)
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
        run_logger.log_metrics(gate_metrics(decision), step=0)
        evidence = evidence_tags(decision)
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
        logger.info("probe gate %s: %s", evidence["gate"], decision.reasons[-2])
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
