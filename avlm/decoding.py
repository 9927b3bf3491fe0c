"""Captioning clips for evaluation: beam search, the N-best lists and their reranking, and the scores of a split.

The caption recipe decodes its validation and test clips with these every epoch and at the end; ``evaluate_caption``
decodes any registered version with them, clean or with noise, so both report the same figures for the same model.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch

from avlm.errors import ConfigError
from avlm.metrics import CaptionScorer, CaptionScores, caption_metrics_for_logging
from avlm.models import FusionCaptioner
from avlm.rerank import NBestReport, RerankConfig, Reranker, nbest_metrics


@dataclasses.dataclass
class DecodingConfig:
    """How captions are generated for validation, test and the registered model.

    Attributes:
        num_beams: beam width (1 = greedy).
        max_new_tokens: longest generated caption, in tokens.
        batch_size: clips per generate call.
        rerank: keep beam search's N-best (N = num_beams) and rerank it (``avlm.rerank``); every evaluation then
            also logs the reranked metrics, CIDEr-D-max / SPIDEr-max and self-BLEU, and the decoding-vs-reranking
            table.
    """

    num_beams: int = 5
    max_new_tokens: int = 20
    batch_size: int = 32
    rerank: RerankConfig = dataclasses.field(default_factory=RerankConfig)

    def __post_init__(self) -> None:
        for key in ("num_beams", "max_new_tokens", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'decoding.{key}' must be >= 1, got {getattr(self, key)}")


@dataclasses.dataclass
class DecodedSplit:
    """A split's generated captions by clip position: the top beam, and with reranking the N-best lists (best beam
    first) and the reranked picks."""

    top: dict[int, str]
    nbest: dict[int, list[str]] | None = None
    reranked: dict[int, str] | None = None


@dataclasses.dataclass
class SplitScores:
    """The scores of a decoded split: the top beam's (what ``val/<metric>`` means), and the N-best report."""

    top: CaptionScores
    nbest: NBestReport | None = None

    def metrics(self, prefix: str) -> dict[str, float]:
        """Flat metric names: ``<prefix>CIDEr_D``, ``<prefix>rerank/CIDEr_D``, ``<prefix>CIDEr_D_max``, …"""
        metrics = caption_metrics_for_logging(self.top, prefix=prefix)
        if self.nbest is not None:
            metrics.update({f"{prefix}{name}": value for name, value in self.nbest.metrics.items()})
        return metrics


@torch.no_grad()
def decode_split(
    net: FusionCaptioner,
    loader: Any,
    decoding: DecodingConfig,
    source_inputs: Callable[[dict[str, Any]], dict[str, Any]],
    *,
    accelerator: Any = None,
    reranker: Reranker | None = None,
    max_caption_tokens: int = 0,
    waveforms: Callable[[list[int]], list[Any]] | None = None,
    sample_rate: int = 0,
) -> DecodedSplit:
    """Caption every clip of ``loader`` with beam search; with a reranker, keep the N-best and rerank it.

    Every process captions its share of the clips; the captions of all of them come back on every process.

    Args:
        net: the unwrapped captioner.
        loader: yields batches with ``clip`` positions and the source.
        decoding: beam width, caption length.
        source_inputs: batch -> ``source`` / ``source_features`` keyword arguments.
        accelerator: gathers the processes' captions (None = one process).
        reranker: reranks the N-best lists (None = top beam only).
        max_caption_tokens: tokenised length for the contrastive similarity.
        waveforms: clip positions -> their raw clips (CLAP similarity).
        sample_rate: the clips' rate.
    """
    rows: list[tuple[int, str, list[str] | None, str | None]] = []
    keep = decoding.num_beams if reranker is not None else 1
    for batch in loader:
        sources = source_inputs(batch)
        generated = net.generate(
            **sources,
            num_beams=decoding.num_beams,
            max_new_tokens=decoding.max_new_tokens,
            num_return_sequences=keep,
        )
        clips = batch["clip"].tolist()
        lists = [generated.texts[i * keep : (i + 1) * keep] for i in range(len(clips))]
        picks: list[str | None] = [None] * len(clips)
        if reranker is not None:
            similarity = reranker.similarities(
                net,
                net.source_tokens(**sources),
                lists,
                max_length=max_caption_tokens,
                waveforms=waveforms(clips) if waveforms is not None else None,
                sample_rate=sample_rate,
            )
            nbest = dict(zip(clips, lists, strict=True))
            picked = reranker(nbest, dict(zip(clips, similarity, strict=True)) if similarity is not None else None)
            picks = [picked[clip] for clip in clips]
        rows.extend(
            (clip, texts[0], texts if reranker is not None else None, pick)
            for clip, texts, pick in zip(clips, lists, picks, strict=True)
        )
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rows = gather_object(rows)
    by_clip = {row[0]: row for row in rows}  # a clip repeated to even out the ranks' batches appears once
    if reranker is None:
        return DecodedSplit(top={clip: row[1] for clip, row in by_clip.items()})
    return DecodedSplit(
        top={clip: row[1] for clip, row in by_clip.items()},
        nbest={clip: row[2] for clip, row in by_clip.items()},
        reranked={clip: row[3] for clip, row in by_clip.items()},
    )


def score_decoded(decoded: DecodedSplit, records: Sequence[Any], scorer: CaptionScorer) -> SplitScores:
    """Score a decoded split against its records' references (top beam; N-best metrics when there are lists)."""
    references = {i: list(r.captions) for i, r in enumerate(records)}
    top = scorer.score(decoded.top, references)
    if decoded.nbest is None:
        return SplitScores(top=top)
    return SplitScores(top=top, nbest=nbest_metrics(decoded.nbest, references, scorer, decoded.reranked))


def prediction_rows(records: Sequence[Any], decoded: DecodedSplit, scores: SplitScores) -> list[dict[str, Any]]:
    """predictions.json: id, prediction (the top beam), references, every per-item score (for bootstrap CIs), and
    with reranking the N-best candidates and the reranked pick."""
    rows = []
    for i, record in enumerate(records):
        row = {
            "id": record.clip_id,
            "prediction": decoded.top[i],
            "references": list(record.captions),
            "scores": {metric: values[i] for metric, values in scores.top.per_item.items()},
        }
        if decoded.nbest is not None:
            row["candidates"] = decoded.nbest[i]
            row["reranked"] = decoded.reranked[i]
        rows.append(row)
    return rows
