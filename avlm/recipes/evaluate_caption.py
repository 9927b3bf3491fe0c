"""Evaluate any captioner version: decode a split of its data, score it, log everything to a new MLflow run.

The model is named as users name it (``models:/avlm-caption@scst``, ``models:/avlm-caption/3``, a run id) and the
new run carries the version it evaluated as tags (``evaluated.model``, ``evaluated.version``, ``evaluated.run_id``,
``evaluated.uri``). Decoding starts from the checkpoint's own ``decoding`` section: any ``decoding.*`` key given
here replaces that key only (``decoding.num_beams=1``, ``decoding.rerank.enabled=true``), so an evaluation with no
decoding keys reproduces the training run's ``final/<split>_*`` figures. The data are the checkpoint's (its dataset,
clip length, limits, text normalisation); ``data_dir`` moves its root.

Metric names: the clean split's metrics are unprefixed (``CIDEr_D``, ``BLEU_4``, ``rerank/CIDEr_D``, …), so runs
evaluating different versions share their columns; the split is the ``split`` tag. With ``snr_db`` (audio only)
each SNR adds its own set, ``snr20/CIDEr_D``, ``snr0/CIDEr_D``, … (``snr-5/…`` for -5 dB): white noise at that SNR
relative to each clip's own power over the waveform the encoder sees (``avlm.data.noise``; a silent clip stays
silent), drawn from ``noise_seed`` and the clip's id, the same noise pattern at every SNR. ``plots/snr_curve.png``
shows each metric against the SNR with the clean figure as a dashed line.

Artifacts: ``predictions.json`` (one row per clip: id, prediction, references, per-item scores; with reranking the
N-best and the pick), ``predictions/snr<N>.json`` per SNR, ``tables/decoding.md|json`` with reranking, the
resolved config. Everything that can be refused (the model, the split, the data, the settings) is checked before
the MLflow run opens.

Run it::

    mlflow run . -e evaluate_caption --env-manager local -P model=models:/avlm-caption@scst -P split=test
    python entrypoints/evaluate_caption.py --model models:/avlm-caption/3 --num_beams 1 --rerank true
    python entrypoints/evaluate_caption.py --model <run id> --snr_db [20,10,0] --data_dir /data/clotho
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from avlm.config import config_from_dict, config_to_dict, flatten_config, load_config
from avlm.data.noise import add_white_noise, noise_generator
from avlm.decoding import DecodedSplit, DecodingConfig, SplitScores, decode_split, prediction_rows, score_decoded
from avlm.errors import ConfigError
from avlm.metrics import CaptionScorer, spice_unavailable_reason
from avlm.recipes.caption import (
    CaptionConfig,
    CaptionMetricsConfig,
    CaptionSamples,
    caption_collate,
    load_caption_splits,
    load_captioner,
    source_clips,
)
from avlm.rerank import Reranker
from avlm.tracking import TrackingConfig, plots, provenance_tags, tracked_run
from avlm.tracking.model_source import CheckpointSource, fetch_checkpoint

logger = logging.getLogger(__name__)

RECIPE = "evaluate_caption"
# What the SNR curve plots, when present (SPIDEr needs SPICE).
CURVE_METRICS = ("CIDEr_D", "SPIDEr", "BLEU_4", "METEOR", "ROUGE_L")


@dataclasses.dataclass
class EvaluateCaptionConfig:
    """One evaluation of one captioner version.

    Attributes:
        model: ``models:/<name>@<alias>``, ``models:/<name>/<version>`` or the run id of a caption training.
        split: which split of the checkpoint's data to caption.
        decoding: beam width, caption length, batch size, reranking; :func:`load_evaluate_caption_config` starts it
            from the checkpoint's own decoding, so only the keys given change.
        data_dir: the dataset root, when it is not where the checkpoint was trained (empty = the checkpoint's).
        snr_db: also evaluate with white noise at each of these SNRs in dB (audio models only; empty = clean only).
        noise_seed: seeds the noise (with each clip's id).
        metrics: SPICE settings of this machine.
        tracking: where the evaluation run is logged (experiment empty = ``avlm-evaluate_caption``).
        output_dir: local folder; the run's files go to ``<output_dir>/<run name>-<run id[:8]>/``.
    """

    model: str = "models:/avlm-caption@champion"
    split: Literal["train", "val", "test"] = "test"
    decoding: DecodingConfig = dataclasses.field(default_factory=DecodingConfig)
    data_dir: str = ""
    snr_db: list[float] = dataclasses.field(default_factory=list)
    noise_seed: int = 0
    metrics: CaptionMetricsConfig = dataclasses.field(default_factory=CaptionMetricsConfig)
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    output_dir: str = "outputs"

    def __post_init__(self) -> None:
        if not self.model.strip():
            raise ConfigError("config key 'model' is empty: name a version (models:/<name>@<alias>, ...) or a run id")
        names = [snr_prefix(snr) for snr in self.snr_db]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ConfigError(f"config key 'snr_db' = {self.snr_db} repeats {', '.join(repeated)}")


def load_evaluate_caption_config(
    path: str | Path | None = None, overrides: Sequence[str] = ()
) -> EvaluateCaptionConfig:
    """The config from ``path`` and ``overrides``, its ``decoding`` section started from the checkpoint's.

    Raises:
        ConfigError: a bad key or value, or a ``model`` that names no checkpoint.
    """
    requested = load_config(EvaluateCaptionConfig, path, overrides)
    trained = _checkpoint_config(fetch_checkpoint(requested.model, key="model"))
    return load_config(EvaluateCaptionConfig, path, overrides, base=EvaluateCaptionConfig(decoding=trained.decoding))


@dataclasses.dataclass
class EvaluateCaptionResult:
    run_id: str | None
    source: CheckpointSource
    split: str
    num_clips: int
    metrics: dict[str, float]
    spice_unavailable_reason: str | None
    output_dir: Path


def snr_prefix(snr_db: float) -> str:
    """``snr20/``, ``snr-5/``, ``snr2.5/``: the namespace of one SNR's metrics."""
    return f"snr{snr_db + 0.0:g}/"  # + 0.0: -0.0 is 0 dB


# ----------------------------------------------------------------------------------------------------------------
# Noisy sources
# ----------------------------------------------------------------------------------------------------------------
class NoisyClips(torch.utils.data.Dataset):
    """A split's clips with white noise at one SNR, the same noise for a clip every time it is read."""

    def __init__(self, clips: torch.utils.data.Dataset, records: Sequence[Any], snr_db: float, seed: int, key: str):
        self.clips, self.records, self.snr_db, self.seed, self.key = clips, records, snr_db, seed, key

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.clips[index])
        generator = noise_generator(self.seed, self.records[index].clip_id)
        item[self.key] = add_white_noise(item[self.key], self.snr_db, generator)
        return item


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: EvaluateCaptionConfig) -> EvaluateCaptionResult:
    """Caption ``cfg.split`` with the version ``cfg.model`` names (clean, then at each SNR), score, log, return."""
    # -- 1. the version, its config with this evaluation's decoding, its data: all checked before a run exists ----
    source = fetch_checkpoint(cfg.model, key="model")
    net, trained = load_captioner(source.checkpoint_dir)
    run_cfg = dataclasses.replace(  # a CaptionConfig again: its checks (rerank vs contrastive) apply to this one
        trained,
        data=dataclasses.replace(trained.data, data_dir=cfg.data_dir or trained.data.data_dir),
        decoding=cfg.decoding,
        metrics=cfg.metrics,
    )
    if cfg.snr_db and net.modality != "audio":
        raise ConfigError(
            f"config key 'snr_db' = {cfg.snr_db}: white noise is added to audio, and {cfg.model!r} captions "
            f"{net.modality} (encoder '{trained.model.encoder}'); leave snr_db empty"
        )
    splits, dataset_name = load_caption_splits(run_cfg.data, clip_frames=trained.model.num_frames)
    if cfg.split not in splits:
        raise ConfigError(
            f"config key 'split' = {cfg.split!r}: the data of {cfg.model!r} ({dataset_name}) has the splits "
            f"{', '.join(sorted(splits))}"
        )
    records = splits[cfg.split]
    clips = source_clips(net.encoder, {cfg.split: records}, run_cfg)
    clean = clips.datasets[cfg.split]
    if len(clean) == 0:
        raise ConfigError(f"config key 'split' = {cfg.split!r}: the split holds no clips")
    clean[0]  # the first clip decodes: unreadable audio or frames stop here, before the run

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    net.to(device)
    reranker = None
    if cfg.decoding.rerank.enabled:
        reranker = Reranker(cfg.decoding.rerank, [r.captions for r in splits["train"]], device=device)
    no_spice = spice_unavailable_reason(cfg.metrics.spice_config())
    collate = caption_collate(net.tokenizer, trained.data.max_caption_tokens)
    sample_rate = clips.preprocessing.get("sample_rate", 0)

    def source_inputs(batch: dict[str, Any]) -> dict[str, Any]:
        return {"source": batch["source"].to(device)}

    def caption(sources: torch.utils.data.Dataset) -> DecodedSplit:
        samples = CaptionSamples(records, sources, pairs=False, input_key=clips.input_key)
        loader = torch.utils.data.DataLoader(samples, batch_size=cfg.decoding.batch_size, collate_fn=collate)
        return decode_split(
            net,
            loader,
            cfg.decoding,
            source_inputs,
            reranker=reranker,
            max_caption_tokens=trained.data.max_caption_tokens,
            waveforms=(lambda at: [sources[i][clips.input_key].numpy() for i in at]) if sample_rate else None,
            sample_rate=sample_rate,
        )

    # -- 2. the run: what was evaluated, how ----------------------------------------------------------------------
    name = source.model_name and f"{source.model_name}-v{source.version}" or source.run_id[:8]
    run_name = cfg.tracking.run_name or f"{RECIPE}-{name}-{cfg.split}"

    def run_folder(run_id: str) -> Path:
        return Path(cfg.output_dir) / f"{run_name}-{run_id[:8]}"

    scorer = CaptionScorer(spice=cfg.metrics.spice_config())
    with tracked_run(cfg.tracking, recipe=RECIPE, run_name=run_name, is_main_process=True, run_dir=run_folder) as (
        run_logger
    ):
        run_dir = run_folder(run_logger.run_id)
        try:
            run_logger.log_params(flatten_config(cfg, prefix="cfg."))
            run_logger.set_tags(
                {
                    "recipe": RECIPE,
                    **source.lineage_tags(prefix="evaluated."),
                    "evaluated.training": "xe+scst" if trained.scst.enabled else "xe",
                    "split": cfg.split,
                    "clips": str(len(records)),
                    "dataset": dataset_name,
                    "encoder": trained.model.encoder,
                    "lm": trained.model.lm,
                    "fusion": trained.model.fusion,
                    "decoding": _decoding_tag(cfg.decoding),
                    "snr_db": ",".join(f"{snr:g}" for snr in cfg.snr_db) or "none",
                    "spice": "available" if no_spice is None else "unavailable",
                    **({"spice_unavailable_reason": no_spice} if no_spice else {}),
                    **provenance_tags(),
                }
            )
            run_logger.log_dict(config_to_dict(cfg), "config/resolved_config.json")
            run_logger.log_dict(config_to_dict(run_cfg), "config/checkpoint_config.json")

            # -- 3. clean, then each SNR: caption, score, predictions ------------------------------------------
            metrics: dict[str, float] = {}

            def evaluate(sources: torch.utils.data.Dataset, prefix: str, predictions_file: str) -> SplitScores:
                decoded = caption(sources)
                scores = score_decoded(decoded, records, scorer)
                metrics.update(scores.metrics(prefix))
                _write_predictions(run_logger, run_dir, predictions_file, prediction_rows(records, decoded, scores))
                return scores

            clean_scores = evaluate(clean, "", "predictions.json")
            if clean_scores.nbest is not None:  # the study's T3: decoding vs reranking
                markdown = clean_scores.nbest.markdown(title=f"Decoding vs reranking ({cfg.split})")
                run_logger.log_text(markdown, "tables/decoding.md")
                run_logger.log_dict(clean_scores.nbest.table(), "tables/decoding.json")
            for snr in cfg.snr_db:
                prefix = snr_prefix(snr)
                evaluate(
                    NoisyClips(clean, records, snr, cfg.noise_seed, clips.input_key),
                    prefix,
                    f"predictions/{prefix[:-1]}.json",
                )
                logger.info("%s at %g dB: CIDEr_D %.4f", cfg.split, snr, metrics[f"{prefix}CIDEr_D"])
        finally:
            scorer.close()
        run_logger.log_metrics(metrics, step=0)
        if cfg.snr_db:
            noisy = {snr: _unprefixed(metrics, snr_prefix(snr)) for snr in cfg.snr_db}
            clean = {name: metrics[name] for name in CURVE_METRICS if name in metrics}
            run_logger.log_figure(plots.metric_against_snr(clean, noisy), "plots/snr_curve.png")
    logger.info("evaluated %s (%s) on %s: CIDEr_D %.4f", cfg.model, name, cfg.split, metrics["CIDEr_D"])
    return EvaluateCaptionResult(
        run_id=run_logger.run_id,
        source=source,
        split=cfg.split,
        num_clips=len(records),
        metrics=metrics,
        spice_unavailable_reason=no_spice,
        output_dir=run_dir,
    )


def summary_lines(cfg: EvaluateCaptionConfig, result: EvaluateCaptionResult) -> list[str]:
    """What the entry point prints: the run, what it evaluated, every metric."""
    source = result.source
    version = f"{source.model_name} version {source.version}, " if source.model_name else ""
    lines = [
        f"MLflow run {result.run_id}: {cfg.model} ({version}run {source.run_id}) on {result.split}, "
        f"{result.num_clips} clips, {_decoding_tag(cfg.decoding)}"
    ]
    lines += [f"  {key} = {value:.4f}" for key, value in sorted(result.metrics.items())]
    if result.spice_unavailable_reason:
        lines.append(f"  (no SPICE/SPIDEr: {result.spice_unavailable_reason})")
    return lines


def _unprefixed(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {name[len(prefix) :]: value for name, value in metrics.items() if name.startswith(prefix)}


def _checkpoint_config(source: CheckpointSource) -> CaptionConfig:
    return config_from_dict(CaptionConfig, yaml.safe_load((source.checkpoint_dir / "config.yaml").read_text()))


def _decoding_tag(decoding: DecodingConfig) -> str:
    rerank = f", reranked ({decoding.rerank.similarity})" if decoding.rerank.enabled else ""
    return f"beam {decoding.num_beams}, max {decoding.max_new_tokens} tokens{rerank}"


def _write_predictions(run_logger: Any, run_dir: Path, artifact_file: str, rows: list[dict[str, Any]]) -> None:
    """Write the rows to ``run_dir/artifact_file`` and log them as the run's ``artifact_file``."""
    path = run_dir / artifact_file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2))
    parent = str(Path(artifact_file).parent)
    run_logger.log_artifact(path, None if parent == "." else parent)
