"""Critical View of Safety (CVS) classification on a frozen video backbone.

Three multi-label criteria (C1 hepatocystic triangle, C2 cystic plate, C3 two structures) per short clip of
laparoscopic video. A frozen foundation backbone (V-JEPA 2 from transformers, or a timm image model applied per
frame) feeds an attentive-pooling head; optionally LoRA, unfrozen last blocks, or staged training adapt the
backbone. Metric: per-criterion average precision and their mean (mAP).

Run it::

    mlflow run . -e train_cvs --env-manager local                        # built-in demo data, tiny backbone
    python entrypoints/train_cvs.py --config examples/cvs/vjepa2_lora.yaml --data_dir /data/endoscapes
    accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/train_cvs.py --config ...
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from avlm.config import load_config
from avlm.data import (
    CVS_CRITERIA,
    SEG_CLASSES,
    ClipDataset,
    EpochSampler,
    attach_masks,
    check_training_splits,
    class_balanced_weights,
    default_cache_dir,
    ensure_cvs_demo,
    label_checksum,
    load_endoscapes,
    manifest_hash,
)
from avlm.data.clips import clip_masks
from avlm.data.mixing import draw_mix
from avlm.errors import ConfigError, DataError, ModelError
from avlm.features import TokenDataset, cached_tokens
from avlm.losses import MultiLabelLoss
from avlm.metrics import (
    ConfusionMatrix,
    average_precision_per_class,
    segmentation_metrics,
)
from avlm.models import (
    ClassificationHead,
    SegmentationHead,
    VideoClassifier,
    apply_adaptation,
    build_backbone,
    count_parameters,
    load_trainable_state_dict,
    parameter_groups,
    save_lora_adapter,
    segmentation_loss,
)
from avlm.models.adaptation import layer_decay_parts
from avlm.models.tta import TTA_AUGMENTATIONS, tta_probabilities
from avlm.recipes.cvs_attention import AnatomyAttention, AttentionEntropies, log_attention_diagnostics
from avlm.tracking import TrackingConfig, plots, record_run_start
from avlm.tracking.registry import RegistryConfig
from avlm.train import (
    LoopState,
    StepOutput,
    TrainConfig,
    TrainingStage,
    build_optimizer,
    build_scheduler,
    fit_in_stages,
    load_trainable,
    open_run,
    optimizer_steps_per_epoch,
    resume_from,
)

logger = logging.getLogger(__name__)

RECIPE = "cvs"


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CVSDataConfig:
    """Attributes:
    data_dir: Endoscapes2023 root (train/ val/ test/ with annotation_ds_coco.json); empty = built-in demo data.
    clip_frames: frames per clip, ending at the labelled frame.
    frame_stride: frame-number step between clip frames (25 = 1 s in Endoscapes' 25 fps numbering).
    frame_selection: stride (a frame every frame_stride) or uniform (clip_frames frames spread evenly over
        clip_window frame numbers before the labelled frame, each the latest frame on disk at or before its place).
    clip_window: uniform only: the window's span in frame numbers; 0 = (clip_frames - 1) · frame_stride, the
        span of a stride clip (then the two differ only where frames are missing on disk).
    demo_seed: seed of the generated demo dataset.
    sampler: random, or class_balanced (WeightedRandomSampler-style, with replacement).
    mixup_alpha / cutmix_alpha: clip-level MixUp / CutMix Beta parameters; 0 = off (they touch pixels, so
        they turn the feature cache off).
    feature_cache: train the head from cached backbone tokens when the backbone is frozen and nothing
        touches pixels.
    cache_dir: feature cache and demo data location; empty = $AVLM_CACHE_DIR or ~/.cache/avlm.
    entropy_clips: fixed validation clips on which attention entropy is measured each epoch.
    limit_clips: keep only the first N clips of each split (quick checks); 0 = all.
    subset / subset_fold: train on an official data-efficiency subset of the training videos ("12.5" or "25",
        folds 0-2); empty = the whole training split.
    label_policy: how the three annotators' votes become a binary label: majority (2 of 3, the official evaluator),
        any (1 of 3), all (3 of 3), or annotator_1 / annotator_2 / annotator_3 (all_metadata.csv).
    masks: read the Endoscapes-Seg50 anatomy masks (<split>_seg/) when the dataset has them; the segmentation head,
        the attention masks and supervision need them, the attention diagnostics use them (mass inside the anatomy).
    """

    data_dir: str = ""
    clip_frames: int = 4
    frame_stride: int = 25
    frame_selection: Literal["stride", "uniform"] = "stride"
    clip_window: int = 0
    demo_seed: int = 0
    sampler: Literal["random", "class_balanced"] = "random"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    feature_cache: bool = True
    cache_dir: str = ""
    entropy_clips: int = 16
    limit_clips: int = 0
    subset: Literal["", "12.5", "25"] = ""
    subset_fold: int = 0
    label_policy: Literal["majority", "any", "all", "annotator_1", "annotator_2", "annotator_3"] = "majority"
    masks: bool = True

    def __post_init__(self) -> None:
        for key in ("clip_frames", "frame_stride"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'data.{key}' must be >= 1, got {getattr(self, key)}")
        for key in ("mixup_alpha", "cutmix_alpha", "entropy_clips", "limit_clips", "clip_window"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'data.{key}' must be >= 0, got {getattr(self, key)}")
        if self.subset_fold not in (0, 1, 2):
            raise ConfigError(f"config key 'data.subset_fold' must be 0, 1 or 2, got {self.subset_fold}")
        if self.clip_window and self.frame_selection != "uniform":
            raise ConfigError("config key 'data.clip_window' applies to data.frame_selection=uniform only")


@dataclasses.dataclass
class CVSModelConfig:
    """Attributes:
    backbone: vjepa2-tiny | vjepa2:<HF id or local path> | timm-tiny | timm:<model name>.
    pretrained: load pretrained timm weights (V-JEPA 2 ids are always pretrained; the -tiny specs never).
    init_seed: seed of random-init backbones (the tiny specs), so a checkpoint rebuilds the same backbone.
    adaptation: frozen | lora | unfreeze (last N blocks) | staged (head first, then last N blocks at backbone_lr).
    lora_r / lora_alpha / lora_dropout / lora_targets: peft LoRA settings; targets are module names inside the
        backbone's attention (V-JEPA 2: query, key, value; timm ViT: qkv).
    unfreeze_last_n: blocks trained by unfreeze and staged.
    drop_path: stochastic depth on the backbone blocks (the last block's rate, rising linearly from 0 at the first;
        V-JEPA 2 and timm drop_path_rate); train mode only, so it needs a backbone that trains. 0 = off.
    stage1_epochs / stage1_patience: staged only (Exp9): stage 1 trains the head alone (the blocks' lr is 0) for
        up to stage1_epochs epochs, stopping early after stage1_patience epochs without improvement (0 = never).
    stage1_stop_ends_run: staged only: an early stop in stage 1 ends the run (default: stage 2 still starts).
    stage2_epochs / stage2_lr: staged only: stage 2 starts from stage 1's best checkpoint with fresh AdamW state
        and runs up to stage2_epochs epochs (0 = until train.epochs), the head at stage2_lr (0 = train.lr) and the
        unfrozen blocks at train.backbone_lr, early-stopping after train.patience epochs without improvement.
    seg_head: Exp8's multi-task decoder: per-frame anatomy segmentation (5 classes) from the patch tokens, trained
        with loss.seg_weight · CE on the clips that have masks; val mIoU and IoU per class every epoch.
    seg_hidden: the decoder's width.
    attention_mask: hard attention masking on the anatomy (Exp12): none; pooler (the attentive pooler's queries may
        only attend to tokens whose patches overlap the anatomy); backbone (the same additive bias inside the
        backbone's self-attention at attention_mask_layers). Clips without masks pass unmasked.
    attention_mask_layers: backbone layers that get the bias (0-based; negative counts from the end); empty = all.
    attention_mask_dilation: grow the anatomy's patch mask by this many patches before masking.
    pooling: attentive (learned queries + cross-attention) or mean.
    head_queries / head_heads / head_hidden / head_dropout: attentive pooler and MLP sizes.
    """

    backbone: str = "vjepa2-tiny"
    pretrained: bool = True
    init_seed: int = 0
    adaptation: Literal["frozen", "lora", "unfreeze", "staged"] = "frozen"
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.1
    lora_targets: list[str] = dataclasses.field(default_factory=lambda: ["query", "key", "value"])
    unfreeze_last_n: int = 1
    stage1_epochs: int = 2
    stage1_patience: int = 0
    stage1_stop_ends_run: bool = False
    stage2_epochs: int = 0
    stage2_lr: float = 0.0
    drop_path: float = 0.0
    seg_head: bool = False
    seg_hidden: int = 64
    attention_mask: Literal["none", "pooler", "backbone"] = "none"
    attention_mask_layers: list[int] = dataclasses.field(default_factory=list)
    attention_mask_dilation: int = 0
    pooling: Literal["attentive", "mean"] = "attentive"
    head_queries: int = 1
    head_heads: int = 4
    head_hidden: int = 512
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"config key 'model.lora_r' must be >= 1, got {self.lora_r}")
        if not 0 <= self.head_dropout < 1 or not 0 <= self.lora_dropout < 1:
            raise ConfigError("config keys 'model.head_dropout' and 'model.lora_dropout' must be in [0, 1)")
        for key in ("unfreeze_last_n", "stage1_epochs", "stage1_patience", "stage2_epochs", "stage2_lr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'model.{key}' must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.drop_path < 1:
            raise ConfigError(f"config key 'model.drop_path' must be in [0, 1), got {self.drop_path}")
        for key in ("seg_hidden",):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'model.{key}' must be >= 1, got {getattr(self, key)}")
        if self.attention_mask_dilation < 0:
            raise ConfigError(
                f"config key 'model.attention_mask_dilation' must be >= 0, got {self.attention_mask_dilation}"
            )
        if self.attention_mask == "pooler" and self.pooling != "attentive":
            raise ConfigError("config key 'model.attention_mask: pooler' needs model.pooling: attentive")
        if self.attention_mask_layers and self.attention_mask != "backbone":
            raise ConfigError("config key 'model.attention_mask_layers' applies to model.attention_mask: backbone only")
        if self.drop_path and self.adaptation == "frozen":
            # a frozen backbone always runs in eval mode (VideoClassifier), where drop path does nothing
            raise ConfigError(
                "config key 'model.drop_path' needs a backbone that trains (adaptation lora, unfreeze or staged)"
            )


@dataclasses.dataclass
class LossConfig:
    """Attributes:
    kind: bce (BCEWithLogits) or focal (sigmoid focal loss).
    pos_weight: per-criterion positive weight [C1, C2, C3]; empty = none.
    focal_alpha / focal_gamma: focal loss parameters.
    label_smoothing: targets become y(1-ε) + ε/2.
    seg_weight: weight of the segmentation CE (model.seg_head) in the total loss.
    seg_class_weights: per-class weights of that CE, in SEG_CLASSES order (background first); empty = unweighted
        (Exp8). Small anatomy on a large background (the demo: 1.8% of the pixels) needs them.
    attention_supervision: weight λ of a term pulling attention towards the anatomy masks (Exp11); 0 = off.
    attention_supervision_kind: kl (KL from the uniform distribution over the mask's tokens) or bce (-log of the
        attention mass inside the mask).
    attention_supervision_source: pooler (the attentive pooler's attention) or backbone (the layers in
        attention_supervision_layers, which must train: LoRA / unfreeze / staged).
    attention_supervision_layers: backbone layers supervised (0-based, negative from the end); empty = all.
    """

    kind: Literal["bce", "focal"] = "bce"
    pos_weight: list[float] = dataclasses.field(default_factory=list)
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    label_smoothing: float = 0.0
    seg_weight: float = 0.5
    seg_class_weights: list[float] = dataclasses.field(default_factory=list)
    attention_supervision: float = 0.0
    attention_supervision_kind: Literal["kl", "bce"] = "kl"
    attention_supervision_source: Literal["pooler", "backbone"] = "pooler"
    attention_supervision_layers: list[int] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        for key in ("seg_weight", "attention_supervision"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'loss.{key}' must be >= 0, got {getattr(self, key)}")
        if self.seg_class_weights and (
            len(self.seg_class_weights) != len(SEG_CLASSES) or min(self.seg_class_weights) < 0
        ):
            raise ConfigError(
                f"config key 'loss.seg_class_weights' needs {len(SEG_CLASSES)} values >= 0 ({', '.join(SEG_CLASSES)}), "
                f"got {self.seg_class_weights}"
            )
        if self.pos_weight and len(self.pos_weight) != len(CVS_CRITERIA):
            raise ConfigError(f"config key 'loss.pos_weight' needs {len(CVS_CRITERIA)} values, got {self.pos_weight}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"config key 'loss.label_smoothing' must be in [0, 1), got {self.label_smoothing}")


@dataclasses.dataclass
class CVSTrainConfig(TrainConfig):
    """The shared optimisation settings (:class:`avlm.train.TrainConfig`) and CVS's own.

    Attributes:
        layer_decay: layer-wise learning-rate decay (BEiT / MAE): of L backbone blocks, block i trains at
            backbone_lr · layer_decay^(L - i), the embeddings at backbone_lr · layer_decay^(L + 1); 1 = off.
        gradient_checkpointing: recompute the backbone blocks' activations in the backward pass instead of keeping
            them (less memory for LoRA / unfrozen blocks, about a third more compute).
    """

    layer_decay: float = 1.0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"config key 'train.layer_decay' must be in (0, 1], got {self.layer_decay}")


@dataclasses.dataclass
class CVSEvalConfig:
    """Attributes:
    tta: test-time augmentations of the final val/test evaluation (and of the registered model): sigmoid
        probabilities averaged over the clip and each of hflip (mirrored frames) and temporal_shift (the clip one
        frame later, still ending on the labelled frame). The per-epoch evaluation that picks the best checkpoint
        runs without them. Empty = off.
    diagnostics: after training, the best checkpoint's attention on the val clips (the log's "Attention Diagnostic"
        and "Criterion Comparison" analyses): per layer and for the pooler the entropy, std and max of the attention
        and its mass inside the anatomy masks, by label category; logged as attn/* metrics and tables/attention_*.
        Computed one layer of one batch at a time (see README: memory).
    diagnostics_clips: val clips in the diagnostics; 0 = all.
    heatmap_clips: val clips drawn as attention heatmaps over their frames (plots/attention_heatmaps*.png).
    heatmap_layers: backbone layers drawn beside the pooler (negative counts from the end).
    """

    tta: list[str] = dataclasses.field(default_factory=list)
    diagnostics: bool = True
    diagnostics_clips: int = 0
    heatmap_clips: int = 4
    heatmap_layers: list[int] = dataclasses.field(default_factory=lambda: [-1])

    def __post_init__(self) -> None:
        for key in ("diagnostics_clips", "heatmap_clips"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'eval.{key}' must be >= 0, got {getattr(self, key)}")
        unknown = [name for name in self.tta if name not in TTA_AUGMENTATIONS]
        if unknown or len(set(self.tta)) != len(self.tta):
            raise ConfigError(
                f"config key 'eval.tta' takes distinct names from {list(TTA_AUGMENTATIONS)}, got {self.tta}"
            )


@dataclasses.dataclass
class CVSConfig:
    """The whole train_cvs configuration (examples/cvs/*.yaml).

    Attributes:
        seed: seeds sampling, initialisation of the head, dropout and MixUp.
        output_dir: local folder for checkpoints and plots (one sub-folder per run).
        resume: MLflow run id or checkpoint folder to continue a crashed run from (its saved config is used).
    """

    seed: int = 1
    output_dir: str = "outputs"
    resume: str = ""
    data: CVSDataConfig = dataclasses.field(default_factory=CVSDataConfig)
    model: CVSModelConfig = dataclasses.field(default_factory=CVSModelConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: CVSTrainConfig = dataclasses.field(default_factory=CVSTrainConfig)
    eval: CVSEvalConfig = dataclasses.field(default_factory=CVSEvalConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    registry: RegistryConfig = dataclasses.field(default_factory=lambda: RegistryConfig(name="avlm-cvs"))


def load_cvs_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> CVSConfig:
    return load_config(CVSConfig, path, overrides)


@dataclasses.dataclass
class CVSResult:
    """What :func:`main` returns (on the main process; other ranks get the loop state and metrics only)."""

    run_id: str | None
    state: LoopState
    final_metrics: dict[str, float]
    model_version: str | None = None
    promoted: bool | None = None
    used_feature_cache: bool = False
    output_dir: Path | None = None


# ----------------------------------------------------------------------------------------------------------------
# Data, model, naming
# ----------------------------------------------------------------------------------------------------------------
def load_cvs_splits(cfg: CVSDataConfig) -> tuple[dict[str, list], str]:
    """Clip records per split and the dataset's name (``cvs-demo`` or ``endoscapes:<folder>``)."""
    if cfg.data_dir:
        root, dataset = Path(cfg.data_dir), f"endoscapes:{Path(cfg.data_dir).name}"
    else:
        root = ensure_cvs_demo(Path(cfg.cache_dir) if cfg.cache_dir else None, seed=cfg.demo_seed)
        dataset = "cvs-demo"
    # train/ and val/ are required (a missing folder is named), test/ is read when it is there
    wanted = ("train", "val", "test") if (root / "test").is_dir() else ("train", "val")
    splits = load_endoscapes(
        root,
        splits=wanted,
        clip_frames=cfg.clip_frames,
        frame_stride=cfg.frame_stride,
        frame_selection=cfg.frame_selection,
        clip_window=cfg.clip_window,
        subset=cfg.subset,
        subset_fold=cfg.subset_fold,
        label_policy=cfg.label_policy,
    )
    if cfg.limit_clips:
        splits = {name: records[: cfg.limit_clips] for name, records in splits.items()}
    if cfg.masks:
        # the splits that have Endoscapes-Seg50 masks get them (Seg50 covers 50 of the 201 videos)
        segmented = [name for name in splits if (root / f"{name}_seg").is_dir()]
        splits.update(attach_masks(root, {name: splits[name] for name in segmented}))
    return splits, dataset


def check_mask_config(cfg: CVSConfig, splits: dict[str, list], where: str) -> bool:
    """Refuse settings that cannot work together; return whether the clips carry anatomy masks.

    Raises:
        ConfigError: a switch needs masks that data.masks is off for or the training clips lack, backbone attention
            supervision of a backbone that does not train, or TTA with attention masks (a flipped clip would no
            longer match its mask).
    """
    with_masks = any(record.has_mask for records in splits.values() for record in records)
    users = [
        name
        for name, used in (
            ("model.seg_head", cfg.model.seg_head),
            ("model.attention_mask", cfg.model.attention_mask != "none"),
            ("loss.attention_supervision", cfg.loss.attention_supervision > 0),
        )
        if used
    ]
    if users and not cfg.data.masks:
        raise ConfigError(f"config keys {users} need the anatomy masks: set data.masks: true")
    if users and not any(record.has_mask for record in splits["train"]):
        raise ConfigError(
            f"config keys {users} need anatomy masks, but no training clip of {where} has one (Endoscapes-Seg50 "
            "masks are read from <data_dir>/train_seg/annotation_coco.json)"
        )
    supervised = cfg.loss.attention_supervision > 0
    if supervised and cfg.loss.attention_supervision_source == "backbone" and cfg.model.adaptation == "frozen":
        raise ConfigError(
            "config key 'loss.attention_supervision_source: backbone' needs a backbone that trains "
            "(model.adaptation lora, unfreeze or staged)"
        )
    if supervised and cfg.loss.attention_supervision_source == "pooler" and cfg.model.pooling != "attentive":
        raise ConfigError("config key 'loss.attention_supervision_source: pooler' needs model.pooling: attentive")
    if cfg.eval.tta and cfg.model.attention_mask != "none":
        raise ConfigError("config key 'eval.tta' cannot be combined with model.attention_mask (masks are not flipped)")
    if cfg.train.gradient_checkpointing and cfg.model.adaptation == "frozen":
        raise ConfigError("config key 'train.gradient_checkpointing' needs a backbone that trains (it saves nothing)")
    return with_masks


class TokensWithMasks(torch.utils.data.Dataset):
    """Cached tokens with each clip's anatomy masks, read without its frames (``seg_mask``, ``has_mask``)."""

    def __init__(self, tokens: TokenDataset, records: list, image_size: int):
        self.tokens, self.records, self.image_size = tokens, records, image_size

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        seg_mask = clip_masks(record, self.image_size)
        return {**self.tokens[index], "seg_mask": seg_mask, "has_mask": torch.tensor(record.has_mask)}


def cached_token_sets(
    pixel_sets: dict[str, ClipDataset],
    splits: dict[str, list],
    backbone: Any,
    cfg: CVSConfig,
    accelerator: Any,
    with_masks: bool,
) -> dict[str, torch.utils.data.Dataset]:
    """Each split's backbone tokens, from the feature cache (computed and stored on a miss), with their labels (and
    the clips' anatomy masks when the clips have them)."""
    cache_dir = Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir()
    token_sets = {}
    for name, ds in pixel_sets.items():
        tokens, _ = cached_tokens(
            backbone.to(accelerator.device),
            ds,
            key_parts={
                "backbone": backbone.fingerprint(),
                "image_size": backbone.image_size,
                "mean": backbone.mean,
                "std": backbone.std,
                "clip_frames": cfg.data.clip_frames,
                "manifest": manifest_hash(splits[name]),
            },
            cache_dir=cache_dir,
            accelerator=accelerator,
            batch_size=cfg.train.batch_size,
        )
        token_set = TokenDataset(tokens, torch.as_tensor(ds.labels, dtype=torch.float32))
        token_sets[name] = TokensWithMasks(token_set, splits[name], backbone.image_size) if with_masks else token_set
    return token_sets


def build_cvs_model(cfg: CVSModelConfig, num_frames: int) -> VideoClassifier:
    """Backbone + head, with the configured adaptation applied (deterministic given the seeds)."""
    try:
        backbone = build_backbone(
            cfg.backbone,
            num_frames=num_frames,
            pretrained=cfg.pretrained,
            init_seed=cfg.init_seed,
            drop_path=cfg.drop_path,
        )
    except ModelError as err:
        if cfg.drop_path and "drop path" in str(err):
            raise ConfigError(f"config key 'model.drop_path': {err}") from err
        raise
    head = ClassificationHead(
        backbone.feature_dim,
        len(CVS_CRITERIA),
        pooling=cfg.pooling,
        num_queries=cfg.head_queries,
        num_heads=cfg.head_heads,
        hidden_dim=cfg.head_hidden,
        dropout=cfg.head_dropout,
    )
    layout = backbone.token_layout()
    needs_layout = cfg.seg_head or cfg.attention_mask != "none"
    if needs_layout and layout is None:
        raise ConfigError(
            f"config keys 'model.seg_head' / 'model.attention_mask' need patch tokens: backbone '{cfg.backbone}' "
            "gives one pooled token per frame (timm: use a ViT with frame tokens 'all')"
        )
    seg_head = (
        SegmentationHead(backbone.feature_dim, len(SEG_CLASSES), layout, hidden=cfg.seg_hidden)
        if cfg.seg_head
        else None
    )
    try:
        model = VideoClassifier(backbone, head, masked_layers=cfg.attention_mask_layers, seg_head=seg_head)
    except ModelError as err:
        raise ConfigError(f"config key 'model.attention_mask_layers': {err}") from err
    apply_adaptation(
        model,
        "unfreeze" if cfg.adaptation == "staged" else cfg.adaptation,
        lora_r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        lora_targets=cfg.lora_targets,
        unfreeze_last_n=cfg.unfreeze_last_n,
    )
    return model


def run_name_for(cfg: CVSConfig) -> str:
    """``cvs-<backbone>-<adaptation>-seed<N>``, e.g. ``cvs-vjepa2-vitl-fpc16-256-ssv2-lora_r32-seed1``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    backbone = re.sub(r"[^A-Za-z0-9_.-]+", "-", cfg.model.backbone.split(":")[-1].rstrip("/").split("/")[-1])
    adaptation = {
        "lora": f"lora_r{cfg.model.lora_r}",
        "unfreeze": f"unfreeze{cfg.model.unfreeze_last_n}",
        "staged": f"staged{cfg.model.unfreeze_last_n}",
    }.get(cfg.model.adaptation, cfg.model.adaptation)
    return f"{RECIPE}-{backbone}-{adaptation}-seed{cfg.seed}"


def run_card_for(
    run_name: str,
    dataset_name: str,
    splits: dict[str, list],
    pixel_sets: dict[str, ClipDataset],
    backbone: Any,
) -> dict[str, Any]:
    """The run card's recipe fields: the run, its dataset (manifest and label hashes, clips, positive rates) and
    backbone."""
    return {
        "recipe": RECIPE,
        "run_name": run_name,
        "dataset": {
            "name": dataset_name,
            "manifest_sha256": {name: manifest_hash(r) for name, r in splits.items()},
            "label_sha256": {name: label_checksum(r) for name, r in splits.items()},
            "clips": {name: len(r) for name, r in splits.items()},
            "positive_rate": {
                name: dict(zip(CVS_CRITERIA, ds.labels.mean(axis=0).round(4).tolist(), strict=True))
                for name, ds in pixel_sets.items()
            },
        },
        "backbone": {
            "name": backbone.name,
            "revision": backbone.revision,
            "fingerprint": backbone.fingerprint(),
        },
    }


def optimizer_parts(model: VideoClassifier, cfg: CVSTrainConfig) -> list[tuple[str, Any, float]]:
    """``parameter_groups`` parts: the heads at lr, the backbone at backbone_lr (per block with layer decay)."""
    if cfg.layer_decay == 1:
        backbone_parts = [("backbone", model.backbone, cfg.backbone_lr)]
    else:
        backbone_parts = layer_decay_parts(model.backbone, cfg.backbone_lr, cfg.layer_decay)
    heads = [("head", model.head, cfg.lr)]
    if model.seg_head is not None:
        heads.append(("seg_head", model.seg_head, cfg.lr))
    return [*heads, *backbone_parts]


def training_stages(cfg: CVSConfig) -> list[TrainingStage]:
    """One stage, or staged's two (Exp9): head only, then the last blocks from stage 1's best checkpoint."""
    train = cfg.train
    if cfg.model.adaptation != "staged":
        return [TrainingStage(1, train.epochs, train.patience, train.lr, train.backbone_lr, backbone_frozen=False)]
    model = cfg.model
    return [
        TrainingStage(1, min(model.stage1_epochs, train.epochs), model.stage1_patience, train.lr, train.backbone_lr,
                      backbone_frozen=True),
        TrainingStage(2, model.stage2_epochs, train.patience, model.stage2_lr or train.lr, train.backbone_lr,
                      backbone_frozen=False),
    ]  # fmt: skip


def stage_optimization(
    model: VideoClassifier, stage: TrainingStage, *, start_epoch: int, train_cfg: CVSTrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW groups (head lr / backbone lr, per block with layer decay) and warmup + schedule over the stage; with
    ``train_cfg`` and ``steps_per_epoch`` bound, the ``StageOptimization`` of :func:`avlm.train.fit_in_stages`."""
    stage_cfg = dataclasses.replace(train_cfg, lr=stage.lr, backbone_lr=stage.backbone_lr)
    groups = parameter_groups(model, optimizer_parts(model, stage_cfg), weight_decay=train_cfg.weight_decay)
    optimizer = build_optimizer(groups)
    steps = max(1, (stage.end_epoch(start_epoch, train_cfg.epochs) - start_epoch) * steps_per_epoch)
    frozen = steps if stage.backbone_frozen else 0
    scheduler = build_scheduler(
        optimizer,
        name=train_cfg.scheduler,
        num_training_steps=steps,
        warmup_ratio=train_cfg.warmup_ratio,
        frozen_steps_by_group=[frozen if g["name"].startswith("backbone") else 0 for g in groups],
    )
    return optimizer, scheduler


def classification_metrics(scores: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """mAP and AP per criterion (sklearn's average precision; targets binarised at 0.5)."""
    ap = average_precision_per_class(targets, scores)
    metrics = {f"AP_{name}": float(value) for name, value in zip(CVS_CRITERIA, ap, strict=True)}
    metrics["mAP"] = float(np.nanmean(ap)) if not np.all(np.isnan(ap)) else float("nan")
    return metrics


def _collate_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {"tokens": batch["tokens"]} if "tokens" in batch else {"pixel_values": batch["pixel_values"]}


@torch.no_grad()
def predict_clips(
    model: torch.nn.Module,
    loader: Any,
    tta: list[str] | None = None,
    confusion: Any = None,
    *,
    accelerator: Any,
    loss_fn: MultiLabelLoss,
    anatomy_attention: AnatomyAttention,
) -> tuple[np.ndarray, ...]:
    """Probabilities, targets and mean loss; with ``tta`` the averaged probabilities and a NaN loss; with
    ``confusion`` the segmentation predictions are counted in it."""
    scores, targets, losses, counts = [], [], [], []
    for batch in loader:
        if tta:
            probs = tta_probabilities(lambda x: model(pixel_values=x).logits, batch["pixel_values"], tta)
            probs, labels = accelerator.gather_for_metrics((probs, batch["labels"]))
            losses.append(float("nan"))
        else:
            anatomy = anatomy_attention.token_mask(batch.get("seg_mask"), batch.get("has_mask"))
            out = model(**_collate_inputs(batch), **anatomy_attention.model_inputs(anatomy))
            if confusion is not None and out.seg_logits is not None:
                confusion.update(*accelerator.gather_for_metrics((out.seg_logits.argmax(2), batch["seg_mask"])))
            logits, labels = accelerator.gather_for_metrics((out.logits, batch["labels"]))
            probs = torch.sigmoid(logits)
            losses.append(loss_fn(logits, labels).item() * len(labels))  # over all ranks' samples
        scores.append(probs.float().cpu().numpy())
        targets.append(labels.float().cpu().numpy())
        counts.append(len(labels))
    return np.concatenate(scores), np.concatenate(targets), float(np.sum(losses) / max(np.sum(counts), 1))


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: CVSConfig) -> CVSResult:
    """Train, evaluate, log and register one CVS model. See the module docstring for the method."""
    cfg, resume = resume_from(cfg)

    # -- 1. data (bad data stops here, before an MLflow run exists) ---------------------------------------------
    splits, dataset_name = load_cvs_splits(cfg.data)
    where = cfg.data.data_dir or "the built-in CVS demo data"
    check_training_splits(
        splits,
        where=f"{where} (data.limit_clips={cfg.data.limit_clips})" if cfg.data.limit_clips else where,
        batch_size=cfg.train.batch_size,
    )
    with_masks = check_mask_config(cfg, splits, where)

    # -- 2. model: frozen backbone + attentive head (+ LoRA / unfrozen blocks) (+ segmentation decoder) ---------
    torch.manual_seed(cfg.seed)
    model = build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    backbone = model.backbone
    if cfg.train.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    trainable, total = count_parameters(model)
    pixel_sets = {
        name: ClipDataset(records, backbone.image_size, backbone.mean, backbone.std, with_masks=with_masks)
        for name, records in splits.items()
    }

    run_name = run_name_for(cfg)
    with open_run(cfg, recipe=RECIPE, run_name=run_name, train_cfg=cfg.train, resume=resume) as run:
        accelerator, run_logger = run.accelerator, run.logger

        # -- 3. what this run is: config, tags, run card --------------------------------------------------------
        if run.is_new:
            gate = f"{cfg.registry.promote_metric} {cfg.registry.promote_mode} +{cfg.registry.promote_margin:g}"
            record_run_start(
                run_logger,
                cfg=cfg,
                config_yaml=run.config_yaml,
                tags={
                    "recipe": RECIPE,
                    "dataset": dataset_name,
                    "backbone": cfg.model.backbone,
                    "adaptation": cfg.model.adaptation,
                    "gate": gate,
                },
                run_card=run_card_for(run_name, dataset_name, splits, pixel_sets, backbone),
                num_processes=accelerator.num_processes,
                mixed_precision=cfg.train.mixed_precision,
                trainable_params=trainable,
                total_params=total,
            )

        # -- 4. inputs: cached backbone tokens when nothing upstream of the head trains --------------------------
        use_cache = (
            cfg.data.feature_cache
            and model.backbone_is_frozen()
            and cfg.model.attention_mask != "backbone"
            and cfg.data.mixup_alpha == 0
            and cfg.data.cutmix_alpha == 0
        )
        train_inputs = (
            cached_token_sets(pixel_sets, splits, backbone, cfg, accelerator, with_masks) if use_cache else pixel_sets
        )
        run_logger.set_tags({"feature_cache": str(use_cache)})

        sampler = EpochSampler(
            len(train_inputs["train"]),
            seed=cfg.seed,
            weights=class_balanced_weights(pixel_sets["train"].labels)
            if cfg.data.sampler == "class_balanced"
            else None,
        )
        loader_kwargs = {"batch_size": cfg.train.batch_size, "num_workers": cfg.train.num_workers}
        train_loader = torch.utils.data.DataLoader(
            train_inputs["train"], sampler=sampler, drop_last=True, **loader_kwargs
        )
        val_loader = torch.utils.data.DataLoader(train_inputs["val"], shuffle=False, **loader_kwargs)

        # -- 5. optimisation: AdamW groups (head lr / backbone lr), warmup + cosine -----------------------------
        loss_fn = MultiLabelLoss(
            cfg.loss.kind,
            pos_weight=cfg.loss.pos_weight or None,
            focal_alpha=cfg.loss.focal_alpha,
            focal_gamma=cfg.loss.focal_gamma,
            label_smoothing=cfg.loss.label_smoothing,
        )
        steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), cfg.train.grad_accum_steps)
        stages = training_stages(cfg)
        optimization = functools.partial(stage_optimization, train_cfg=cfg.train, steps_per_epoch=steps_per_epoch)
        state = run.resume.state if run.resume else LoopState()
        optimizer, scheduler = optimization(model, stages[state.stage - 1], start_epoch=state.stage_start_epoch)
        run.restore(model, optimizer, scheduler)
        model, optimizer, train_loader, val_loader, scheduler = accelerator.prepare(
            model, optimizer, train_loader, val_loader, scheduler
        )
        loss_fn = loss_fn.to(accelerator.device)

        # -- 6. one training step: (MixUp/CutMix) → anatomy masks → logits → CVS (+ seg, + attention) loss --------
        anatomy_attention = AnatomyAttention.from_config(cfg, backbone)
        seg_class_weights = (
            torch.tensor(cfg.loss.seg_class_weights, device=accelerator.device) if cfg.loss.seg_class_weights else None
        )

        def train_step(model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
            targets = batch["labels"]
            inputs = _collate_inputs(batch)
            soft_targets = targets
            seg_mask, has_mask = batch.get("seg_mask"), batch.get("has_mask")
            plan = draw_mix(len(targets), (backbone.image_size,) * 2, mixup_alpha=cfg.data.mixup_alpha,
                            cutmix_alpha=cfg.data.cutmix_alpha, generator=generator)  # fmt: skip
            if plan is not None and "pixel_values" in inputs:
                plan = dataclasses.replace(plan, perm=plan.perm.to(targets.device))
                inputs["pixel_values"], soft_targets = plan.pixels(inputs["pixel_values"]), plan.labels(targets)
                if seg_mask is not None:
                    seg_mask, has_mask = plan.masks(seg_mask, has_mask)
            anatomy = anatomy_attention.token_mask(seg_mask, has_mask)
            out = model(**inputs, **anatomy_attention.model_inputs(anatomy),
                        output_attentions=anatomy_attention.supervise_backbone)  # fmt: skip
            loss = loss_fn(out.logits, soft_targets)
            parts: dict[str, torch.Tensor] = {}
            if out.seg_logits is not None:
                parts["cvs_loss"] = loss.detach()
                parts["seg_loss"] = segmentation_loss(out.seg_logits, seg_mask, has_mask, seg_class_weights)
                loss = loss + cfg.loss.seg_weight * parts["seg_loss"]
            if cfg.loss.attention_supervision > 0:
                parts["attention_supervision"] = anatomy_attention.supervision_loss(out, anatomy)
                loss = loss + cfg.loss.attention_supervision * parts["attention_supervision"]
            parts = {name: value.detach() for name, value in parts.items()}
            return StepOutput(loss, torch.sigmoid(out.logits), targets, parts=parts)

        # -- 7. evaluation: loss, AP per criterion, mAP, attention entropy on a fixed subset --------------------
        attention_entropies = AttentionEntropies(
            pixel_sets["val"],
            cfg.data.entropy_clips,
            anatomy_attention,
            backbone_fixed=use_cache and cfg.model.attention_mask != "backbone",
        )
        predict = functools.partial(
            predict_clips, accelerator=accelerator, loss_fn=loss_fn, anatomy_attention=anatomy_attention
        )

        def evaluate(model: torch.nn.Module, split: str = "val", loader: Any = None) -> dict[str, float]:
            confusion = ConfusionMatrix(len(SEG_CLASSES)) if cfg.model.seg_head else None
            scores, targets, loss = predict(model, loader or val_loader, confusion=confusion)
            metrics = {f"{split}/{k}": v for k, v in classification_metrics(scores, targets).items()}
            metrics[f"{split}/loss"] = loss
            if confusion is not None:
                metrics.update({f"{split}/{k}": v for k, v in segmentation_metrics(confusion, SEG_CLASSES).items()})
            if split == "val":
                metrics.update(attention_entropies(accelerator.unwrap_model(model), accelerator.device))
            return metrics

        # -- 8. train (a staged run: stage 2 starts from stage 1's best checkpoint, with fresh AdamW state) --------
        state = fit_in_stages(
            run,
            stages,
            optimization,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            state=state,
            train_loader=train_loader,
            train_step=train_step,
            train_metrics=classification_metrics,
            evaluate=evaluate,
            train_cfg=cfg.train,
            early_stop_ends_run=cfg.model.stage1_stop_ends_run,
        )

        # -- 9. the best checkpoint: final evaluation (with test-time augmentation), predictions, plots -----------
        net = run.load_best(model)
        final_metrics: dict[str, float] = {}
        tta = cfg.eval.tta
        # augmentations act on pixels: a head trained from cached tokens is evaluated through its backbone
        final_inputs = pixel_sets if tta else train_inputs
        final_val_loader = (
            accelerator.prepare(torch.utils.data.DataLoader(final_inputs["val"], shuffle=False, **loader_kwargs))
            if tta
            else val_loader
        )
        # the segmentation is scored on the un-augmented pass (the TTA pass averages CVS probabilities only)
        confusion = ConfusionMatrix(len(SEG_CLASSES)) if cfg.model.seg_head else None
        val_scores, val_targets, _ = predict(model, final_val_loader, tta, confusion=None if tta else confusion)
        final_metrics.update({f"final/val_{k}": v for k, v in classification_metrics(val_scores, val_targets).items()})
        if tta:  # what the augmentations changed
            without_tta = predict(model, val_loader, confusion=confusion)
            final_metrics["final/val_mAP_without_tta"] = classification_metrics(*without_tta[:2])["mAP"]
        if confusion is not None:
            final_metrics.update({f"final/val_{k}": v for k, v in segmentation_metrics(confusion, SEG_CLASSES).items()})
        if "test" in final_inputs:
            test_loader = accelerator.prepare(
                torch.utils.data.DataLoader(final_inputs["test"], shuffle=False, **loader_kwargs)
            )
            test_scores, test_targets, _ = predict(model, test_loader, tta)
            final_metrics.update(
                {f"final/test_{k}": v for k, v in classification_metrics(test_scores, test_targets).items()}
            )
        result = CVSResult(
            run_id=run.run_id,
            state=state,
            final_metrics=final_metrics,
            used_feature_cache=use_cache,
            output_dir=run.output_dir,
        )
        if not run.is_main_process:
            return result

        run_logger.log_metrics({**final_metrics, "best_epoch": state.best_epoch}, step=state.global_step)
        save_lora_adapter(net, run.checkpoint_dir / "best" / "lora_adapter")
        if cfg.eval.diagnostics:
            diagnostics_metrics = log_attention_diagnostics(
                run_logger, net, pixel_sets["val"], cfg, accelerator.device, anatomy_attention
            )
            run_logger.log_metrics(diagnostics_metrics, step=state.global_step)
        _log_predictions(run_logger, splits["val"], val_scores, val_targets)
        _log_plots(run_logger, state.history, val_scores, val_targets)

        # -- 10. registry: candidate, then the promotion gate -----------------------------------------------------
        registration = run.register_and_promote(
            cfg.registry,
            recipe=RECIPE,
            metric_value=state.best_value,
            tags={
                "backbone": cfg.model.backbone,
                "adaptation": cfg.model.adaptation,
                "dataset": dataset_name,
                "best_epoch": str(state.best_epoch),
            },
            input_example=pixel_sets["val"][0]["pixel_values"][None].numpy(),
            output_example=probability_frame(val_scores[:1]),
            metadata={"preprocessing": preprocessing_card(cfg, backbone)},
        )
        if registration is not None:
            result.model_version, result.promoted = registration.version, registration.promoted
        logger.info(
            "done: run %s, best %s %.4f at epoch %d", run.run_id, cfg.train.monitor, state.best_value, state.best_epoch
        )
        return result


def write_predictions(
    path: Path,
    records: list,
    targets: np.ndarray,
    probabilities: np.ndarray,
    extra_probabilities: dict[str, np.ndarray] | None = None,
) -> Path:
    """One CSV row per clip: ids, labels, ``prob_<criterion>``, and ``<name>_prob_<criterion>`` per extra set."""
    extra = extra_probabilities or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["clip_id", "video_id", "frame_num"]
            + [f"label_{c}" for c in CVS_CRITERIA]
            + [f"prob_{c}" for c in CVS_CRITERIA]
            + [f"{name}_prob_{c}" for name in extra for c in CVS_CRITERIA]
        )
        for row, record in enumerate(records):
            writer.writerow(
                [record.clip_id, record.video_id, record.frame_num]
                + [int(t) for t in targets[row]]
                + [f"{p:.6f}" for p in probabilities[row]]
                + [f"{p:.6f}" for probs in extra.values() for p in probs[row]]
            )
    return path


def _log_predictions(run_logger: Any, records: list, scores: np.ndarray, targets: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        run_logger.log_artifact(
            write_predictions(Path(tmp) / "val_predictions.csv", records, targets, scores), "predictions"
        )


def _log_plots(run_logger: Any, history: list[dict[str, float]], scores: np.ndarray, targets: np.ndarray) -> None:
    run_logger.log_figure(
        plots.training_curves(
            history,
            {
                "loss": ["train/loss", "val/loss"],
                "mAP": ["train/mAP", "val/mAP"],
                "val AP per criterion": [f"val/AP_{c}" for c in CVS_CRITERIA],
                "attention entropy (%)": ["entropy/pooler", "entropy/backbone_mean"],
            },
        ),
        "plots/training_curves.png",
    )
    run_logger.log_figure(plots.precision_recall_curves(targets, scores, CVS_CRITERIA), "plots/val_pr_curves.png")
    last = history[-1]
    entropies = {
        k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("entropy/") and k != "entropy/backbone_mean"
    }
    if entropies:
        run_logger.log_figure(plots.entropy_per_layer(entropies), "plots/attention_entropy.png")


# ----------------------------------------------------------------------------------------------------------------
# Inference from a registered model (used by the pyfunc wrapper)
# ----------------------------------------------------------------------------------------------------------------
def load_classifier(checkpoint_dir: str | Path) -> tuple[VideoClassifier, CVSConfig]:
    """Rebuild the trained classifier from a checkpoint folder (config.yaml + trainable.safetensors)."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = load_cvs_config(checkpoint_dir / "config.yaml")
    model = build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    load_trainable_state_dict(model, load_trainable(checkpoint_dir))
    return model.eval(), cfg


def probability_frame(probs: np.ndarray) -> Any:
    """The registered model's output: one row per clip, columns ``prob_C1..3``."""
    import pandas as pd

    return pd.DataFrame(np.asarray(probs), columns=[f"prob_{c}" for c in CVS_CRITERIA])


def preprocessing_card(cfg: CVSConfig, backbone: Any) -> dict[str, Any]:
    """How a client prepares clips for ``predict`` (stored in the registered model's metadata)."""
    card = {
        "clip_frames": cfg.data.clip_frames,
        "frame_stride_s": cfg.data.frame_stride / 25,
        "image_size": backbone.image_size,
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "layout": "(B, T, 3, S, S) float32: RGB frames resized to S x S, divided by 255, then (x - mean) / std",
    }
    if cfg.data.frame_selection != "stride":
        window = cfg.data.clip_window or (cfg.data.clip_frames - 1) * cfg.data.frame_stride
        card["frame_selection"] = f"{cfg.data.frame_selection} over the {window / 25:g} s before the labelled frame"
    if cfg.eval.tta:
        card["tta"] = list(cfg.eval.tta)  # applied inside predict
    return card


# Normalised pixels lie within a few units of 0; raw 0-255 values divided by a std of ~0.25 reach ~1000.
_MAX_NORMALISED_PIXEL = 20.0


def load_predictor(checkpoint_dir: str | Path) -> Any:
    """Callable: clips (B, T, 3, S, S) float array, normalised as the backbone expects → DataFrame of P(criterion)."""
    model, cfg = load_classifier(checkpoint_dir)

    @torch.no_grad()
    def predict(clips: Any) -> Any:
        pixels = torch.as_tensor(np.asarray(clips), dtype=torch.float32)
        if pixels.numel() and pixels.abs().max() > _MAX_NORMALISED_PIXEL:
            raise DataError(
                f"model input reaches {pixels.abs().max():.4g}: it looks like raw pixels; resize frames to "
                f"{model.backbone.image_size}, divide by 255 and normalise with mean {list(model.backbone.mean)} and "
                f"std {list(model.backbone.std)} (the registered model's metadata 'preprocessing')"
            )
        return probability_frame(
            tta_probabilities(lambda x: model(pixel_values=x).logits, pixels, cfg.eval.tta).numpy()
        )

    return predict
