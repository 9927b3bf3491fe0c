"""Audio captioning: a frozen audio encoder and a frozen causal LM joined by additive, layer-selective fusion.

The method (see ``avlm.models.captioner`` for the model): the frozen encoder's tokens go through a trainable
projector to K source tokens; at each LM layer in ``model.fusion_layers`` a small adapter reads them and adds
``alpha_l · adapter_l`` to the hidden states (``model.fusion=additive``; the baselines cross_attention, concat,
partial_unfreeze and data_only share everything else). Training is teacher-forced token cross-entropy, plus an
optional InfoNCE between pooled source and caption (``model.contrastive_weight``) and an L2 penalty on the gates.
Every epoch the validation clips are captioned with beam search and scored with pycocoevalcap (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr); early stopping and the registry gate use val SPIDEr, or CIDEr-D when
SPICE cannot run here, which the run states in its tags. Captions are normalised (lowercase, no punctuation,
``avlm.metrics.normalize_caption``) identically for references and training targets when
``data.normalize_text`` is on; predictions come out of a model trained on normalised text.

Run it::

    mlflow run . -e train_caption --env-manager local                    # built-in demo sounds, tiny models
    python entrypoints/train_caption.py --config examples/caption/additive_audiocaps.yaml --data_dir /data/audiocaps
    accelerate launch --config_file examples/accelerate/ddp_2gpu.yaml entrypoints/train_caption.py --config ...
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from avlm.config import config_from_dict, load_config
from avlm.data import (
    AudioCaptionDataset,
    AudioCaptionRecord,
    VideoCaptionDataset,
    VideoCaptionRecord,
    audio_manifest_hash,
    caption_reference_hash,
    check_training_splits,
    collate_audio_captions,
    collate_video_captions,
    default_cache_dir,
    ensure_caption_demo,
    ensure_video_caption_demo,
    evenly_spaced_indices,
    load_audio,
    load_audiocaps,
    load_clotho,
    load_video_captions,
    video_manifest_hash,
)
from avlm.decoding import DecodingConfig
from avlm.errors import ConfigError
from avlm.features import cached_tokens
from avlm.metrics import (
    SpiceConfig,
    normalize_caption,
    spice_unavailable_reason,
)
from avlm.models import (
    AdditiveAdapter,
    CaptionModelConfig,
    FusionCaptioner,
    build_captioner,
    count_parameters,
    encode_captions,
    label_token_counts,
    load_caption_tokenizer,
    load_trainable_state_dict,
    parameter_groups,
    params_ratio,
)
from avlm.recipes.caption_eval import CaptionEvaluator, log_final_evaluation
from avlm.retention import RetentionConfig, RetentionResult, load_retention_items, retention_verdict, score_retention
from avlm.scst import ScstConfig, ScstObjective
from avlm.tracking import TrackingConfig, record_run_start, set_run_tags
from avlm.tracking.model_source import CheckpointSource, fetch_checkpoint
from avlm.tracking.registry import RegistryConfig
from avlm.train import (
    LoopState,
    StepOutput,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    distributed_state,
    load_trainable,
    open_run,
    optimizer_steps_per_epoch,
    resume_from,
)

logger = logging.getLogger(__name__)

RECIPE = "caption"
# The research plan keeps compared systems within ±10% of the additive system's trainable parameters.
PARAMS_TOLERANCE = 0.10
SPLIT_NAMES = {
    "clotho": {"development": "train", "validation": "val", "evaluation": "test"},
    "audiocaps": {"train": "train", "val": "val", "test": "test"},
    "video": {"train": "train", "val": "val", "test": "test"},
}
AUDIO_DATASETS = ("demo", "clotho", "audiocaps")
VIDEO_DATASETS = ("video_demo", "video")


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaptionDataConfig:
    """Where the clips come from and how they are prepared.

    Attributes:
        dataset: demo (built-in synthetic sounds, Clotho layout), clotho (Clotho v2), audiocaps; for a video
            encoder: video_demo (built-in moving shapes) or video (``captions_<split>.csv`` + ``frames/<clip_id>/``).
        data_dir: dataset root; for the demos, where to generate them (empty = the avlm cache folder).
        clip_seconds: every clip is padded with silence or cut to this length (AudioCaps 10, Clotho up to 30).
        max_missing_fraction: missing/unreadable audio files are skipped with a warning up to this fraction.
        limit_clips: keep only the first N clips of each split (0 = all).
        overfit_clips: Phase-0 sanity: train and validate on the first N training clips (0 = off).
        max_caption_tokens: teacher-forcing length, bos and eos included.
        normalize_text: lowercase and strip punctuation of every caption (references and targets alike).
        feature_cache: cache the frozen encoder's tokens once and train from them.
        cache_dir: where demo data and features are cached (empty = $AVLM_CACHE_DIR or ~/.cache/avlm).
    """

    dataset: Literal["demo", "clotho", "audiocaps", "video_demo", "video"] = "demo"
    data_dir: str = ""
    clip_seconds: float = 2.0
    max_missing_fraction: float = 0.2
    limit_clips: int = 0
    overfit_clips: int = 0
    max_caption_tokens: int = 24
    normalize_text: bool = True
    feature_cache: bool = True
    cache_dir: str = ""

    def __post_init__(self) -> None:
        if self.clip_seconds <= 0:
            raise ConfigError(f"config key 'data.clip_seconds' must be > 0, got {self.clip_seconds}")
        if not 0 <= self.max_missing_fraction <= 1:
            raise ConfigError(
                f"config key 'data.max_missing_fraction' must be in [0, 1], got {self.max_missing_fraction}"
            )
        for key in ("limit_clips", "overfit_clips"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'data.{key}' must be >= 0, got {getattr(self, key)}")
        if self.max_caption_tokens < 3:
            raise ConfigError(f"config key 'data.max_caption_tokens' must be >= 3, got {self.max_caption_tokens}")


@dataclasses.dataclass
class CaptionMetricsConfig:
    """SPICE needs Stanford CoreNLP 3.6.0; without it SPICE and SPIDEr are left out (never estimated).

    Attributes:
        spice: compute SPICE (and SPIDEr) when it can run.
        corenlp_dir: folder holding stanford-corenlp-3.6.0.jar and its -models jar (empty = $AVLM_CORENLP_DIR,
            else pycocoevalcap's own lib folder).
        download_corenlp: fetch the jars (about 400 MB) when they are missing.
    """

    spice: bool = True
    corenlp_dir: str = ""
    download_corenlp: bool = False

    def spice_config(self) -> SpiceConfig | bool:
        return SpiceConfig(corenlp_dir=self.corenlp_dir, download=self.download_corenlp) if self.spice else False


@dataclasses.dataclass
class CaptionConfig:
    """The whole caption recipe. ``train.lr`` is the projector's learning rate and ``train.backbone_lr`` that of
    everything trainable inside the LM (fusion blocks, gates, LoRA, unfrozen layers)."""

    data: CaptionDataConfig = dataclasses.field(default_factory=CaptionDataConfig)
    model: CaptionModelConfig = dataclasses.field(default_factory=CaptionModelConfig)
    train: TrainConfig = dataclasses.field(
        default_factory=lambda: TrainConfig(
            epochs=20,
            lr=2e-4,
            backbone_lr=1e-4,
            weight_decay=0.01,
            warmup_ratio=0.03,
            monitor="val/SPIDEr",
            patience=2,
        )
    )
    decoding: DecodingConfig = dataclasses.field(default_factory=DecodingConfig)
    metrics: CaptionMetricsConfig = dataclasses.field(default_factory=CaptionMetricsConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    registry: RegistryConfig = dataclasses.field(
        default_factory=lambda: RegistryConfig(name="avlm-caption", promote_metric="val/SPIDEr")
    )
    scst: ScstConfig = dataclasses.field(default_factory=ScstConfig)
    retention: RetentionConfig = dataclasses.field(default_factory=RetentionConfig)
    effective_batch: int = 0  # target sequences per optimizer step via accumulation; 0 = train.grad_accum_steps
    seed: int = 1
    output_dir: str = "outputs"
    resume: str = ""

    def __post_init__(self) -> None:
        rerank = self.decoding.rerank
        if (
            rerank.enabled
            and rerank.similarity == "contrastive"
            and rerank.similarity_weight
            and not (self.model.contrastive_weight > 0)
        ):
            raise ConfigError(
                "config key 'decoding.rerank.similarity' = 'contrastive' needs a captioner trained with "
                "model.contrastive_weight > 0 (its projection is untrained otherwise); use similarity 'clap' or "
                "decoding.rerank.similarity_weight=0 (consensus only)"
            )
        if self.effective_batch < 0:
            raise ConfigError(f"config key 'effective_batch' must be >= 0, got {self.effective_batch}")
        if self.effective_batch and self.effective_batch % self.train.batch_size:
            raise ConfigError(
                f"config key 'effective_batch' ({self.effective_batch}) must be a multiple of train.batch_size "
                f"({self.train.batch_size})"
            )


def load_caption_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> CaptionConfig:
    return load_config(CaptionConfig, path, overrides)


@dataclasses.dataclass
class CaptionResult:
    run_id: str | None
    state: LoopState
    final_metrics: dict[str, float]
    monitor: str
    spice_unavailable_reason: str | None
    parameter_counts: dict[str, int]
    output_dir: Path
    model_version: str | None = None
    promoted: bool = False
    scst: CaptionResult | None = None  # the SCST run ``scst.after_plateau`` started from this one


# ----------------------------------------------------------------------------------------------------------------
# Data, naming, the samples the loops see
# ----------------------------------------------------------------------------------------------------------------
def load_caption_splits(
    cfg: CaptionDataConfig, clip_frames: int
) -> tuple[dict[str, list[AudioCaptionRecord | VideoCaptionRecord]], str]:
    """Records of the train/val(/test) splits, renamed to those names, limited and normalised as configured.

    ``clip_frames`` is how many evenly spaced frames a video clip keeps (the video encoder's clip length).
    """
    missing = cfg.max_missing_fraction
    demo_root = Path(cfg.data_dir) if cfg.data_dir else Path(cfg.cache_dir or default_cache_dir())
    if cfg.dataset == "demo":
        native, name = load_clotho(ensure_caption_demo(demo_root), max_missing_fraction=missing), "caption-demo"
        renames = SPLIT_NAMES["clotho"]
    elif cfg.dataset == "video_demo":
        root = ensure_video_caption_demo(demo_root)
        native = load_video_captions(root, clip_frames=clip_frames, max_missing_fraction=missing)
        name, renames = "video-caption-demo", SPLIT_NAMES["video"]
    else:
        if not cfg.data_dir:
            raise ConfigError(f"config key 'data.data_dir' is empty: dataset '{cfg.dataset}' needs its root folder")
        if cfg.dataset == "video":
            native = load_video_captions(cfg.data_dir, clip_frames=clip_frames, max_missing_fraction=missing)
            renames = SPLIT_NAMES["video"]
        else:
            reader = load_clotho if cfg.dataset == "clotho" else load_audiocaps
            native, renames = reader(cfg.data_dir, max_missing_fraction=missing), SPLIT_NAMES[cfg.dataset]
        name = cfg.dataset
    splits = {renames[split]: records for split, records in native.items()}
    if cfg.limit_clips:
        splits = {split: records[: cfg.limit_clips] for split, records in splits.items()}
    if cfg.overfit_clips:
        subset = splits["train"][: cfg.overfit_clips]
        splits = {"train": subset, "val": subset}
    if cfg.normalize_text:
        splits = {
            split: [dataclasses.replace(r, captions=tuple(normalize_caption(c) for c in r.captions)) for r in records]
            for split, records in splits.items()
        }
    return splits, name


def run_name_for(cfg: CaptionConfig) -> str:
    """``caption-<encoder>-<lm>-<fusion>-L<layers>-seed<N>``, e.g. ``caption-wavlm-base-gpt2-additive-L12_24-seed1``."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name

    def short(spec: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", spec.split(":")[-1].rstrip("/").split("/")[-1])

    layers = "" if cfg.model.fusion == "data_only" else "-L" + "_".join(str(i) for i in cfg.model.fusion_layers)
    return f"{RECIPE}-{short(cfg.model.encoder)}-{short(cfg.model.lm)}-{cfg.model.fusion}{layers}-seed{cfg.seed}"


@dataclasses.dataclass
class SourceClips:
    """One modality's clips as encoder inputs: per-split datasets, the item key of the input, its collate, and
    what the encoder's tokens depend on besides the encoder and the clips (part of the feature-cache key)."""

    datasets: dict[str, torch.utils.data.Dataset]
    input_key: str
    collate: Callable
    manifest_hash: Callable[[list], str]
    preprocessing: dict[str, Any]


def source_clips(encoder: Any, splits: dict[str, list], cfg: CaptionConfig) -> SourceClips:
    """Waveforms at the audio encoder's rate, padded/cut to ``data.clip_seconds``; or normalised video frames."""
    if cfg.data.dataset in VIDEO_DATASETS:
        size, mean, std = encoder.image_size, encoder.mean, encoder.std
        return SourceClips(
            datasets={name: VideoCaptionDataset(r, size, mean, std) for name, r in splits.items()},
            input_key="pixel_values",
            collate=collate_video_captions,
            manifest_hash=video_manifest_hash,
            preprocessing={"image_size": size, "mean": mean, "std": std, "clip_frames": cfg.model.num_frames},
        )
    num_samples = round(cfg.data.clip_seconds * encoder.sampling_rate)
    return SourceClips(
        datasets={name: AudioCaptionDataset(r, encoder.sampling_rate, num_samples) for name, r in splits.items()},
        input_key="waveform",
        collate=collate_audio_captions,
        manifest_hash=audio_manifest_hash,
        preprocessing={"sample_rate": encoder.sampling_rate, "num_samples": num_samples},
    )


class CaptionSamples(torch.utils.data.Dataset):
    """Source (cached encoder tokens, or the encoder's input) with one caption (``pairs``) or the clip's first.

    Items carry the clip's position in its split (``clip``), so generated captions find their references.
    """

    def __init__(self, records: list, sources: torch.Tensor | torch.utils.data.Dataset, pairs: bool, input_key: str):
        self.records = records
        self.sources = sources
        self.input_key = input_key
        self.items = [(i, c) for i, r in enumerate(records) for c in (range(len(r.captions)) if pairs else [0])]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        clip, caption = self.items[index]
        source = self.sources[clip] if isinstance(self.sources, torch.Tensor) else self.sources[clip][self.input_key]
        return {"source": source, "caption": self.records[clip].captions[caption], "clip": clip}


def caption_collate(tokenizer: Any, max_tokens: int) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    def collate(items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = encode_captions(tokenizer, [item["caption"] for item in items], max_length=max_tokens)
        batch["source"] = torch.stack([item["source"] for item in items])
        batch["clip"] = torch.tensor([item["clip"] for item in items])
        return batch

    return collate


def cached_encoder_tokens(
    encoder: Any, clips: SourceClips, splits: dict[str, list], cfg: CaptionConfig, accelerator: Any
) -> dict[str, torch.Tensor]:
    """Each split's frozen-encoder tokens, computed once and cached under the encoder's fingerprint, the
    preprocessing and the split's manifest."""
    sources = {}
    for name, dataset in clips.datasets.items():
        sources[name], _ = cached_tokens(
            encoder.to(accelerator.device),
            dataset,
            key_parts={
                "encoder": encoder.fingerprint(),
                **clips.preprocessing,
                "manifest": clips.manifest_hash(splits[name]),
            },
            cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(),
            accelerator=accelerator,
            batch_size=cfg.decoding.batch_size,
            input_key=clips.input_key,
            collate_fn=clips.collate,
        )
    return sources


def additive_reference_parameters(model: FusionCaptioner) -> int:
    """Trainable parameters the additive system would have with this model's projector, layers and widths."""
    cfg = model.config
    hidden = model.lm.get_input_embeddings().embedding_dim
    adapter = AdditiveAdapter(hidden, cfg.adapter_dim, cfg.adapter_heads, cfg.fusion_gate_init)
    return count_parameters(model.projector)[0] + len(cfg.fusion_layers) * count_parameters(adapter)[0]


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: CaptionConfig) -> CaptionResult:
    """Train, evaluate, log and register one captioner (XE, or SCST from ``scst.parent``); with
    ``scst.after_plateau``, an XE run that early-stops is followed by an SCST run from its best checkpoint."""
    result = _train(cfg)
    if cfg.scst.after_plateau and not cfg.scst.enabled:
        result.scst = _scst_after_plateau(cfg, result)
    return result


def _train(cfg: CaptionConfig) -> CaptionResult:
    """One run of the recipe, XE or SCST; :func:`main` may chain a second."""
    cfg, resume = resume_from(cfg)

    # The monitored metric is declared before training: SPIDEr needs SPICE, and without it the run says so.
    no_spice = spice_unavailable_reason(cfg.metrics.spice_config())
    monitor = cfg.train.monitor
    if no_spice and re.search(r"SPIDEr|SPICE", monitor):
        monitor = re.sub(r"SPIDEr|SPICE", "CIDEr_D", monitor)
    accumulate = cfg.effective_batch // cfg.train.batch_size if cfg.effective_batch else cfg.train.grad_accum_steps
    train_cfg = dataclasses.replace(cfg.train, monitor=monitor, grad_accum_steps=accumulate)
    registry_cfg = dataclasses.replace(cfg.registry, promote_metric=monitor)
    if cfg.scst.enabled and cfg.scst.reward == "spider" and no_spice:
        raise ConfigError(f"config key 'scst.reward' = 'spider' needs SPICE, which cannot run here: {no_spice}")

    # -- 1. data (bad data stops here, before an MLflow run exists) ---------------------------------------------
    splits, dataset_name = load_caption_splits(cfg.data, clip_frames=cfg.model.num_frames)
    train_pairs = not cfg.scst.enabled  # XE trains on (clip, caption) pairs, SCST on clips
    check_training_splits(
        splits,
        where=cfg.data.data_dir or f"the built-in {cfg.data.dataset} data",
        batch_size=train_cfg.batch_size,
        train_items=sum(len(r.captions) for r in splits["train"]) if train_pairs else None,
        unit="captions" if train_pairs else "clips",
    )
    retention_items = load_retention_items(cfg.retention.items) if cfg.retention.enabled else None

    # -- 2. model: frozen encoder → projector → frozen LM with trainable fusion; SCST starts from its parent ----
    parent: CheckpointSource | None = None
    if cfg.scst.enabled:
        parent, model = load_scst_parent(cfg)
        tokenizer = model.tokenizer
        torch.manual_seed(cfg.seed)
    else:
        tokenizer = load_caption_tokenizer(cfg.model.lm, [c for r in splits["train"] for c in r.captions])
        torch.manual_seed(cfg.seed)
        model = build_captioner(cfg.model, tokenizer)
    training = "xe+scst" if parent is not None else "xe"
    lineage = parent.lineage_tags() if parent is not None else {}
    counts, ratio = parameter_counts_vs_additive(model)
    encoder = model.encoder
    data_modality = "video" if cfg.data.dataset in VIDEO_DATASETS else "audio"
    if model.modality != data_modality:
        raise ConfigError(
            f"config key 'model.encoder' = '{cfg.model.encoder}' is a {model.modality} encoder but "
            f"'data.dataset' = '{cfg.data.dataset}' holds {data_modality}: audio datasets {AUDIO_DATASETS}, "
            f"video datasets {VIDEO_DATASETS}"
        )
    clips = source_clips(encoder, splits, cfg)

    run_name = run_name_for(cfg)
    with open_run(cfg, recipe=RECIPE, run_name=run_name, train_cfg=train_cfg, resume=resume) as run:
        accelerator, run_logger = run.accelerator, run.logger

        # -- 3. what this run is: config, tags, run card --------------------------------------------------------
        if run.is_new:
            record_caption_run_start(
                run,
                cfg,
                run_name=run_name,
                train_cfg=train_cfg,
                registry_cfg=registry_cfg,
                no_spice=no_spice,
                dataset_name=dataset_name,
                splits=splits,
                clips=clips,
                model=model,
                counts=counts,
                training=training,
                lineage=lineage,
            )
            run_logger.log_metrics({"params/ratio_to_additive": ratio}, step=0)

        # -- 4. sources: the frozen encoder's tokens, computed once and cached, or waveforms ---------------------
        if cfg.data.feature_cache:
            sources, source_key = cached_encoder_tokens(encoder, clips, splits, cfg, accelerator), "source_features"
        else:
            sources, source_key = clips.datasets, "source"

        def source_inputs(batch: dict[str, Any]) -> dict[str, Any]:
            if source_key == "source":
                return {"source": batch["source"]}
            return {"source": None, "source_features": batch["source"]}

        def teacher_forced(model: torch.nn.Module, batch: dict[str, Any]) -> Any:
            return model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                labels=batch["labels"],
                **source_inputs(batch),
            )

        run_logger.set_tags({"feature_cache": str(cfg.data.feature_cache)})

        collate = caption_collate(tokenizer, cfg.data.max_caption_tokens)
        train_loader = torch.utils.data.DataLoader(
            # SCST samples its own captions: one item per clip
            CaptionSamples(splits["train"], sources["train"], pairs=train_pairs, input_key=clips.input_key),
            batch_size=train_cfg.batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            num_workers=train_cfg.num_workers,
            generator=torch.Generator().manual_seed(cfg.seed),
        )

        def eval_loader(split: str, pairs: bool) -> Any:
            batch_size = train_cfg.batch_size if pairs else cfg.decoding.batch_size
            samples = CaptionSamples(splits[split], sources[split], pairs=pairs, input_key=clips.input_key)
            return accelerator.prepare(
                torch.utils.data.DataLoader(samples, batch_size=batch_size, shuffle=False, collate_fn=collate)
            )

        # -- 5. optimisation: AdamW, projector lr vs fusion lr, warmup + cosine ---------------------------------
        groups = parameter_groups(
            model,
            [("projector", model.projector, train_cfg.lr), ("adapters", None, train_cfg.backbone_lr)],
            weight_decay=train_cfg.weight_decay,
        )
        optimizer = build_optimizer(groups)
        steps_per_epoch = optimizer_steps_per_epoch(len(train_loader), train_cfg.grad_accum_steps)
        scheduler = build_scheduler(
            optimizer,
            name=train_cfg.scheduler,
            num_training_steps=train_cfg.epochs * steps_per_epoch,
            warmup_ratio=train_cfg.warmup_ratio,
        )
        run.restore(model, optimizer, scheduler)
        model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
        val_pairs, val_clips = eval_loader("val", pairs=True), eval_loader("val", pairs=False)
        # the retention probe's reference: the LM alone, before this run trains anything (partial_unfreeze trains
        # LM layers; an SCST run's reference is then its XE parent's LM)
        lm_alone = None
        if retention_items is not None:
            lm_alone = score_retention(accelerator.unwrap_model(model), retention_items, with_fusion=False)

        # -- 6. one training step: teacher-forced XE (+ InfoNCE, + gate L2), or SCST (avlm.scst) ----------------
        def xe_step(model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
            out = teacher_forced(model, batch)
            # DDP averages the processes' gradients: weighting each process's token mean by its share of the batch's
            # tokens makes that average the batch's token mean, as one process computes it (share = 1 for one).
            tokens = label_token_counts(batch["labels"]).sum()
            share = tokens * accelerator.num_processes / accelerator.reduce(tokens, reduction="sum")
            xe = out.xe_loss * share
            parts = {"xe_loss": xe, "fusion_gate_penalty": out.fusion_gate_penalty}
            if cfg.model.contrastive_weight > 0:
                parts["contrastive_loss"] = out.contrastive_loss  # negatives: this process's share of the batch
            return StepOutput(loss=out.loss - out.xe_loss + xe, parts=parts)

        train_step = xe_step if parent is None else scst_train_step(cfg, splits["train"], accelerator, source_inputs)

        # -- 7. evaluation: val XE, beam-search captions scored by pycocoevalcap, gate magnitudes ---------------
        evaluator = CaptionEvaluator(
            cfg,
            accelerator,
            splits=splits,
            clips=clips,
            source_inputs=source_inputs,
            teacher_forced=teacher_forced,
            eval_loader=eval_loader,
            val_pairs=val_pairs,
            val_clips=val_clips,
        )

        # -- 8. train ---------------------------------------------------------------------------------------------
        try:
            state = run.fit(
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                train_loader=train_loader,
                train_step=train_step,
                evaluate=evaluator,
                train_cfg=train_cfg,
                # lm-tiny's vocabulary is built from this run's data: the checkpoint carries its tokenizer
                before_upload=lambda path: tokenizer.save_pretrained(path / "tokenizer"),
            )

            # -- 9. the best checkpoint: final captions and scores, predictions.json, plots -----------------------
            run.load_best(model)
            retention = None
            if lm_alone is not None:  # "no audio given": the fusion active on a silent clip's source tokens
                retention = score_retention(accelerator.unwrap_model(model), retention_items, with_fusion=True)
            final = evaluator.final(model)
        finally:
            evaluator.close()

        result = CaptionResult(
            run_id=run.run_id,
            state=state,
            final_metrics=final.metrics,
            monitor=monitor,
            spice_unavailable_reason=no_spice,
            parameter_counts=counts,
            output_dir=run.output_dir,
        )
        if not run.is_main_process:
            return result

        run_logger.log_metrics({**final.metrics, "best_epoch": state.best_epoch}, step=state.global_step)
        retention_tags = {}
        if retention is not None:
            retention_tags = log_retention(run_logger, lm_alone, retention, cfg.retention, step=state.global_step)
        log_final_evaluation(run_logger, final, state.history, cfg.model.fusion_layers)

        # -- 10. registry: candidate, then the promotion gate -----------------------------------------------------
        registration = run.register_and_promote(
            registry_cfg,
            recipe=RECIPE,
            metric_value=state.best_value,
            tags={
                "encoder": cfg.model.encoder,
                "lm": cfg.model.lm,
                "fusion": cfg.model.fusion,
                "dataset": dataset_name,
                "best_epoch": str(state.best_epoch),
                "training": training,
                **lineage,
                **retention_tags,
            },
            aliases=("scst",) if parent is not None else (),
            input_example=predictor_input([splits["val"][0]], data_modality),
            output_example=[final.predictions["val"][0]["prediction"]] if "val" in final.predictions else [""],
        )
        if registration is not None:
            result.model_version, result.promoted = registration.version, registration.promoted
        logger.info("done: run %s, best %s %.4f at epoch %d", run.run_id, monitor, state.best_value, state.best_epoch)
        return result


# ----------------------------------------------------------------------------------------------------------------
# SCST: fine-tuning an XE checkpoint on the metric (avlm.scst), as its own run
# ----------------------------------------------------------------------------------------------------------------
def scst_run_config(parent_cfg: CaptionConfig, parent: str, registered_as: str = "") -> CaptionConfig:
    """The config of an SCST run from checkpoint ``parent`` whose config was ``parent_cfg``: the parent's data,
    model and decoding (so XE and +SCST runs compare column by column), its ``scst`` section's epochs and lr,
    no warmup, a fresh run name, and the parent's registered model when it has one."""
    settings = parent_cfg.scst
    return dataclasses.replace(
        parent_cfg,
        scst=dataclasses.replace(settings, parent=parent, after_plateau=False),
        train=dataclasses.replace(
            parent_cfg.train, epochs=settings.epochs, lr=settings.lr, backbone_lr=settings.lr, warmup_ratio=0.0
        ),
        tracking=dataclasses.replace(parent_cfg.tracking, run_name=""),
        registry=dataclasses.replace(parent_cfg.registry, name=registered_as or parent_cfg.registry.name),
        resume="",
    )


def load_scst_config(path: str | Path | None, overrides: Sequence[str] = ()) -> CaptionConfig:
    """The ``scst`` entry point's config: the parent checkpoint's config made an SCST run (:func:`scst_run_config`),
    then the keys ``path`` and ``overrides`` set (``scst.parent`` names the parent; an alias is resolved to its
    version now, so the run records exactly which checkpoint it started from)."""
    requested = load_config(CaptionConfig, path, overrides)
    if not requested.scst.parent:
        raise ConfigError("config key 'scst.parent' is empty: name the XE checkpoint (models:/<name>@<alias>, ...)")
    source = fetch_checkpoint(requested.scst.parent, key="scst.parent")
    parent_cfg = config_from_dict(CaptionConfig, yaml.safe_load((source.checkpoint_dir / "config.yaml").read_text()))
    pinned = f"models:/{source.model_name}/{source.version}" if source.model_name else source.run_id
    base = scst_run_config(
        dataclasses.replace(parent_cfg, scst=dataclasses.replace(requested.scst, after_plateau=False)),
        pinned,
        source.model_name,
    )
    return load_config(CaptionConfig, path, [*overrides, f"scst.parent={pinned}"], base=base)


def _scst_after_plateau(cfg: CaptionConfig, result: CaptionResult) -> CaptionResult | None:
    """Phase 1 of the study: once XE early-stops, SCST from its best checkpoint, as a second run linked to the first
    (its ``lineage.parent_*`` tags; the XE run's ``scst.child_run_id``)."""
    from accelerate.utils import broadcast_object_list

    main_process = distributed_state().is_main_process
    if not result.state.stopped_early:
        reason = f"XE did not early-stop within train.epochs={cfg.train.epochs} (no plateau): no SCST run"
        logger.info("scst.after_plateau: %s", reason)
        if main_process and result.run_id:
            set_run_tags(result.run_id, {"scst.after_plateau": f"skipped: {reason}"})
        return None
    # only the main process registered the version: every process starts from what it names
    parent = f"models:/{cfg.registry.name}/{result.model_version}" if result.model_version else result.run_id
    if distributed_state().num_processes > 1:
        (parent,) = broadcast_object_list([parent])
    logger.info("scst.after_plateau: XE early-stopped at epoch %d; SCST from %s", result.state.epoch, parent)
    os.environ.pop("MLFLOW_RUN_ID", None)  # the run `mlflow run` made is the XE run's; SCST gets its own
    scst_result = _train(scst_run_config(cfg, parent))
    if main_process and result.run_id and scst_result.run_id:
        set_run_tags(result.run_id, {"scst.after_plateau": "ran", "scst.child_run_id": scst_result.run_id})
    return scst_result


def load_scst_parent(cfg: CaptionConfig) -> tuple[CheckpointSource, FusionCaptioner]:
    """The XE checkpoint ``scst.parent`` names and its captioner, which must be the model this config describes."""
    parent = fetch_checkpoint(cfg.scst.parent, key="scst.parent")
    model, parent_cfg = load_captioner(parent.checkpoint_dir)
    if parent_cfg.model != cfg.model:
        raise ConfigError(
            f"config key 'model' differs from the model of scst.parent {cfg.scst.parent!r}: SCST fine-tunes "
            "that model as it is (leave the model section to the parent's config)"
        )
    return parent, model


def scst_train_step(
    cfg: CaptionConfig,
    train_records: Sequence[Any],
    accelerator: Any,
    source_inputs: Callable[[dict[str, Any]], dict[str, Any]],
) -> Callable[[torch.nn.Module, dict[str, Any], torch.Generator], StepOutput]:
    """The loop's training step for SCST: :class:`avlm.scst.ScstObjective`, its CIDEr-D document frequencies from
    the training references."""
    spice = cfg.metrics.spice_config()
    scst_objective = ScstObjective(
        cfg.scst,
        [r.captions for r in train_records],
        max_new_tokens=cfg.decoding.max_new_tokens,
        spice=spice if isinstance(spice, SpiceConfig) else None,
    )

    def train_step(model: torch.nn.Module, batch: dict[str, Any], generator: torch.Generator) -> StepOutput:
        return scst_objective(model, accelerator.unwrap_model(model), source_inputs(batch), batch)

    return train_step


# ----------------------------------------------------------------------------------------------------------------
# What a run logs about itself
# ----------------------------------------------------------------------------------------------------------------
def parameter_counts_vs_additive(model: FusionCaptioner) -> tuple[dict[str, int], float]:
    """The model's parameter counts, the additive system's (``additive_reference``) among them, and the ratio of
    trainable parameters to it; a fusion outside the research plan's tolerance is warned about."""
    counts = model.parameter_counts()
    counts["additive_reference"] = additive_reference_parameters(model)
    ratio = params_ratio(counts["trainable"], counts["additive_reference"])
    if abs(ratio - 1) > PARAMS_TOLERANCE:
        logger.warning(
            "fusion '%s' trains %d parameters, %.2fx the additive system's %d (outside ±%d%%): compare it "
            "param-normalised (params/ratio_to_additive)",
            model.config.fusion, counts["trainable"], ratio, counts["additive_reference"], PARAMS_TOLERANCE * 100,
        )  # fmt: skip
    return counts, ratio


def record_caption_run_start(
    run: Any,
    cfg: CaptionConfig,
    *,
    run_name: str,
    train_cfg: TrainConfig,
    registry_cfg: RegistryConfig,
    no_spice: str | None,
    dataset_name: str,
    splits: dict[str, list],
    clips: SourceClips,
    model: FusionCaptioner,
    counts: dict[str, int],
    training: str,
    lineage: dict[str, str],
) -> None:
    """Log what a new run is: its config, its tags (what it trains, what it monitors, whether SPICE runs, the
    promotion gate) and its run card (the data's hashes and sizes, encoder, LM, fusion, loss, decoding)."""
    monitor, encoder = train_cfg.monitor, model.encoder
    record_run_start(
        run.logger,
        cfg=cfg,
        config_yaml=run.config_yaml,
        tags={
            "recipe": RECIPE,
            "dataset": dataset_name,
            "encoder": cfg.model.encoder,
            "lm": cfg.model.lm,
            "fusion": cfg.model.fusion,
            "fusion_layers": ",".join(str(i) for i in cfg.model.fusion_layers),
            "monitor": monitor,
            "training": training,
            **lineage,
            "spice": "available" if no_spice is None else "unavailable",
            **({"spice_unavailable_reason": no_spice} if no_spice else {}),
            "gate": f"{monitor} {registry_cfg.promote_mode} +{registry_cfg.promote_margin:g}",
        },
        run_card={
            "recipe": RECIPE,
            "run_name": run_name,
            "dataset": {
                "name": dataset_name,
                "modality": model.modality,
                "manifest_sha256": {name: clips.manifest_hash(r) for name, r in splits.items()},
                "reference_sha256": {name: caption_reference_hash(r) for name, r in splits.items()},
                "clips": {name: len(r) for name, r in splits.items()},
                "captions": {name: sum(len(x.captions) for x in r) for name, r in splits.items()},
                "preprocessing": clips.preprocessing,
                "text_normalization": "lowercase, punctuation stripped (avlm.metrics.normalize_caption)"
                if cfg.data.normalize_text
                else "none",
            },
            "encoder": {
                "name": encoder.name,
                "revision": encoder.revision,
                "fingerprint": encoder.fingerprint(),
            },
            "lm": {"name": cfg.model.lm, "revision": getattr(model.lm.config, "_commit_hash", None)},
            "fusion": {
                "mode": cfg.model.fusion,
                "layers": list(cfg.model.fusion_layers),
                "source_tokens": cfg.model.audio_tokens,
                "projector_width": cfg.model.projector_width,
                "fusion_gate_init": cfg.model.fusion_gate_init,
            },
            "loss": {
                "contrastive_weight": cfg.model.contrastive_weight,
                "temperature": cfg.model.temperature,
                "gate_l2": cfg.model.fusion_gate_l2,
            },
            "decoding": dataclasses.asdict(cfg.decoding),
            "training": training,
            **({"scst": dataclasses.asdict(cfg.scst)} if cfg.scst.enabled else {}),
            "parameter_counts": counts,
            "monitor": monitor,
            "spice_unavailable_reason": no_spice,
        },
        num_processes=run.accelerator.num_processes,
        mixed_precision=train_cfg.mixed_precision,
        trainable_params=counts["trainable"],
        total_params=counts["total"],
    )


def log_retention(
    run_logger: Any, lm_alone: RetentionResult, fused: RetentionResult, cfg: RetentionConfig, step: int
) -> dict[str, str]:
    """Log the retention probe (accuracies, Δ in points vs the LM alone, per-item results) and tag its verdict on
    the run; returns the tags for the model version too."""
    delta_pt, verdict = retention_verdict(fused.accuracy, lm_alone.accuracy, cfg.max_drop_pt)
    run_logger.log_metrics(
        {
            "retention/lm_accuracy": lm_alone.accuracy,
            "retention/accuracy": fused.accuracy,
            "retention/delta_pt": delta_pt,
        },
        step=step,
    )
    run_logger.log_dict({"lm_alone": lm_alone.per_item, "with_fusion": fused.per_item}, "retention/per_item.json")
    tags = {
        "retention": verdict,
        "retention.delta_pt": f"{delta_pt:.4g}",
        "retention.max_drop_pt": f"{cfg.max_drop_pt:g}",
        "retention.items": cfg.items,
    }
    run_logger.set_tags(tags)
    logger.info(
        "retention: %.3f with fusion vs %.3f LM alone (%+.2f pt, tolerance -%g): %s",
        fused.accuracy, lm_alone.accuracy, delta_pt, cfg.max_drop_pt, verdict,
    )  # fmt: skip
    return tags


# ----------------------------------------------------------------------------------------------------------------
# Inference from a registered model (used by the pyfunc wrapper)
# ----------------------------------------------------------------------------------------------------------------
def load_captioner(checkpoint_dir: str | Path) -> tuple[FusionCaptioner, CaptionConfig]:
    """Rebuild the captioner of a checkpoint folder: its config, tokenizer and trainable weights."""
    checkpoint_dir = Path(checkpoint_dir)
    cfg = config_from_dict(CaptionConfig, yaml.safe_load((checkpoint_dir / "config.yaml").read_text()))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir / "tokenizer"))
    model = build_captioner(cfg.model, tokenizer)
    load_trainable_state_dict(model, load_trainable(checkpoint_dir))
    return model.eval(), cfg


def predictor_input(records: Sequence[Any], modality: str) -> Any:
    """The registered model's input for ``records``: a DataFrame with a ``frames_dir`` (video) or ``audio_path``
    (audio) column, as :func:`load_predictor` reads it."""
    import pandas as pd

    if modality == "video":
        return pd.DataFrame({"frames_dir": [str(Path(r.frame_paths[0]).parent) for r in records]})
    return pd.DataFrame({"audio_path": [str(r.audio_path) for r in records]})


def load_predictor(checkpoint_dir: str | Path) -> Callable[[Any], list[str]]:
    """Callable for the pyfunc model: a DataFrame → one caption per row.

    Audio models read an ``audio_path`` column (any file soundfile reads); video models a ``frames_dir`` column
    (a folder of frames, of which ``model.num_frames`` evenly spaced ones are used, as in training).
    """
    model, cfg = load_captioner(checkpoint_dir)
    column = "frames_dir" if model.modality == "video" else "audio_path"

    def source_of(path: str) -> torch.Tensor:
        if model.modality == "video":
            frames = sorted(str(p) for p in Path(path).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
            chosen = tuple(frames[i] for i in evenly_spaced_indices(len(frames), cfg.model.num_frames))
            record = VideoCaptionRecord(clip_id=Path(path).name, frame_paths=chosen, captions=(), split="")
            encoder = model.encoder
            return VideoCaptionDataset([record], encoder.image_size, encoder.mean, encoder.std)[0]["pixel_values"]
        num_samples = round(cfg.data.clip_seconds * model.encoder.sampling_rate)
        return torch.from_numpy(load_audio(path, model.encoder.sampling_rate, num_samples))

    def predict(frame: Any) -> list[str]:
        if column not in frame:
            raise ConfigError(f"model input needs a '{column}' column, got columns {list(frame.columns)}")
        sources = torch.stack([source_of(path) for path in frame[column]])
        generated = model.generate(
            sources, num_beams=cfg.decoding.num_beams, max_new_tokens=cfg.decoding.max_new_tokens
        )
        return generated.texts

    return predict
