"""Reranking beam-search N-best lists, and what the N-best lists are worth (oracle and diversity metrics).

Beam search keeps the N most probable captions of a clip (``generate(..., num_beams=N, num_return_sequences=N)``,
best first). The most probable is often not the best caption: it tends to the generic. Reranking picks, per clip,
the candidate with the highest

    combined = similarity_weight · similarity(clip, candidate) + consensus_weight · consensus(candidate)

- similarity: how well a candidate fits its clip, by a judge outside beam search: the captioner's own contrastive
  projection (:func:`contrastive_similarity`, which needs a model trained with ``contrastive_weight > 0``) or a
  CLAP model (:class:`avlm.models.clap.ClapSimilarity`); both are cosines in [-1, 1].
- consensus: the candidate's CIDEr-D against the clip's other candidates (:func:`consensus_scores`), a minimum
  Bayes risk choice: the candidate most like the others is the one the model is surest of as a whole.
  CIDEr-D is on its x10 scale (about 0..10), so the weights also set the scales against each other.

Ties go to the better beam, so with both weights at 0 the top beam is kept.

:func:`nbest_metrics` says what the lists hold: the corpus metrics of the reranked captions (``rerank/<metric>``),
the oracle CIDEr-D and SPIDEr (``CIDEr_D_max``, ``SPIDEr_max``: per clip the best candidate's score against the
references, averaged over clips; how much reranking could gain at most) and their diversity (``self_BLEU_4``), with
a table of top beam, reranked and oracle for the paper's decoding-vs-reranking comparison (T3).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from avlm.errors import ConfigError, DataError
from avlm.metrics.captioning import (
    CAPTION_METRIC_NAMES,
    CaptionScorer,
    CaptionScores,
    check_caption_items,
    normalize_caption,
    ptb_tokenize,
)
from avlm.metrics.cider import CiderD
from avlm.metrics.diversity import self_bleu

SIMILARITIES = ("contrastive", "clap")
# Rows of the decoding-vs-reranking table.
TOP_BEAM, RERANKED, ORACLE = "top beam", "reranked", "oracle max"
# Metrics whose oracle (per item, the best candidate's score, averaged) is defined: the item-averaged ones. BLEU and
# METEOR pool their statistics over the corpus, so "the best candidate per item" has no corpus score.
_ORACLE_METRICS = ("ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr")


@dataclasses.dataclass
class RerankConfig:
    """The ``decoding.rerank`` section: rerank each clip's beam-search N-best list before scoring.

    Attributes:
        enabled: rerank (validation and test captions); off = the top beam, as without this section.
        similarity: the judge of how well a candidate fits its clip: ``contrastive`` (the captioner's own
            source/caption projection; needs ``model.contrastive_weight > 0``) or ``clap`` (a CLAP model, see ``clap``).
        clap: the CLAP model for ``similarity: clap``: ``clap-tiny`` (random weights, for tests) or
            ``hf:<HF id or local path>`` (e.g. ``hf:laion/clap-htsat-unfused``).
        similarity_weight: weight of the similarity (a cosine in [-1, 1]) in the combined score.
        consensus_weight: weight of the consensus (CIDEr-D against the clip's other candidates, about 0..10).
    """

    enabled: bool = False
    similarity: str = "contrastive"
    clap: str = ""
    similarity_weight: float = 1.0
    consensus_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.similarity not in SIMILARITIES:
            raise ConfigError(
                f"config key 'decoding.rerank.similarity': unknown similarity '{self.similarity}', "
                f"use one of {SIMILARITIES}"
            )
        for key in ("similarity_weight", "consensus_weight"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"config key 'decoding.rerank.{key}' must be a finite number >= 0, got {value}")
        if self.clap and not (self.clap == "clap-tiny" or (self.clap.startswith("hf:") and self.clap[3:])):
            raise ConfigError(f"config key 'decoding.rerank.clap'='{self.clap}': use clap-tiny or hf:<hf id or path>")
        if self.enabled and self.similarity == "clap" and not self.clap:
            raise ConfigError(
                "config key 'decoding.rerank.clap' is empty: similarity 'clap' needs a CLAP model "
                "(clap-tiny or hf:<hf id or path>)"
            )
        if self.enabled and self.similarity_weight == 0 and self.consensus_weight == 0:
            raise ConfigError(
                "config keys 'decoding.rerank.similarity_weight' and 'decoding.rerank.consensus_weight' are both 0: "
                "reranking would always keep the top beam"
            )


# ----------------------------------------------------------------------------------------------------------------
# Scores of the candidates
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def contrastive_similarity(
    captioner: Any, source_tokens: torch.Tensor, candidates: Sequence[Sequence[str]], *, max_length: int
) -> list[np.ndarray]:
    """Each clip's similarity to each of its candidates, by the captioner's contrastive projection.

    Args:
        captioner: a :class:`~avlm.models.captioner.FusionCaptioner`.
        source_tokens: (B, K, d) from ``captioner.source_tokens``.
        candidates: for each of the B clips, its candidate captions (any number each).
        max_length: longest tokenised caption, bos and eos included (as in training; longer ones are cut).

    Returns:
        B float64 arrays of cosines in [-1, 1]; array ``b`` holds ``len(candidates[b])`` values.

    Raises:
        DataError: a different number of clips and candidate lists.
    """
    from avlm.models.captioner import encode_captions

    if len(candidates) != source_tokens.shape[0]:
        raise DataError(f"got {source_tokens.shape[0]} clips' source tokens but {len(candidates)} candidate lists")
    flat = [text for texts in candidates for text in texts]
    if not flat:
        return [np.zeros(0) for _ in candidates]
    batch = encode_captions(captioner.tokenizer, flat, max_length=max_length)
    device = source_tokens.device
    # Every clip against every candidate: (B, C) with C the candidates of all clips, then each clip's own block.
    similarity = captioner.text_source_similarity(
        source_tokens, batch["input_ids"].to(device), batch["attention_mask"].to(device)
    )
    bounds = np.cumsum([0, *(len(texts) for texts in candidates)])
    values = similarity.double().cpu().numpy()
    return [values[b, bounds[b] : bounds[b + 1]] for b in range(len(candidates))]


def consensus_scores(candidates: Sequence[str], cider: CiderD) -> np.ndarray:
    """Each candidate's CIDEr-D against the other candidates of the same list.

    Captions are :func:`~avlm.metrics.normalize_caption`'d first. Duplicates count as others: a caption that beam
    search found twice agrees with itself once.

    Args:
        candidates: one clip's N-best list.
        cider: supplies the document frequencies (e.g. built on the training references); its references are not
            used.

    Returns:
        (N,) float64; zeros for a list of one.
    """
    return _consensus([candidates], cider)[0]


def rerank(
    nbest: Mapping[int, Sequence[str]],
    *,
    similarity: Mapping[int, np.ndarray] | None,
    cider: CiderD | None,
    similarity_weight: float,
    consensus_weight: float,
) -> tuple[dict[int, str], dict[int, np.ndarray]]:
    """Pick per clip the candidate with the highest combined score (see the module docstring).

    Args:
        nbest: clip -> its candidates, best beam first (non-empty).
        similarity: clip -> (N,) similarity of each candidate; None = no similarity term.
        cider: for the consensus (document frequencies); may be None when ``consensus_weight`` is 0.
        similarity_weight: weight of the similarity.
        consensus_weight: weight of the consensus (CIDEr-D against the clip's other candidates).

    Returns:
        ``(picked, combined)``: clip -> the chosen candidate as given, and clip -> (N,) combined scores.

    Raises:
        DataError: an empty list, similarities missing for a clip or of the wrong length.
        ConfigError: a consensus weight without a CiderD.
    """
    items = list(nbest)
    lists = [list(nbest[item]) for item in items]
    empty = [item for item, texts in zip(items, lists, strict=True) if not texts]
    if empty:
        raise DataError(f"every clip needs at least one candidate; none for clips {empty[:10]}")
    combined = [np.zeros(len(texts)) for texts in lists]
    if similarity is not None and similarity_weight:
        for index, (item, texts) in enumerate(zip(items, lists, strict=True)):
            if item not in similarity:
                raise DataError(f"no similarities for clip {item!r}")
            values = np.asarray(similarity[item], dtype=np.float64).reshape(-1)
            if values.shape != (len(texts),):
                raise DataError(f"clip {item!r} has {len(texts)} candidates but {values.size} similarities")
            combined[index] = combined[index] + similarity_weight * values
    if consensus_weight:
        if cider is None:
            raise ConfigError("a consensus_weight > 0 needs a CiderD for the consensus")
        for index, consensus in enumerate(_consensus(lists, cider)):
            combined[index] = combined[index] + consensus_weight * consensus
    # np.argmax takes the first maximum: ties go to the better beam.
    picked = {item: texts[int(np.argmax(scores))] for item, texts, scores in zip(items, lists, combined, strict=True)}
    return picked, dict(zip(items, combined, strict=True))


def _consensus(lists: Sequence[Sequence[str]], cider: CiderD) -> list[np.ndarray]:
    """Consensus scores of several N-best lists in one CiderD call."""
    texts = [[normalize_caption(text) for text in candidates] for candidates in lists]
    flat, others = [], []
    for candidates in texts:
        if len(candidates) > 1:
            flat += candidates
            others += [candidates[:k] + candidates[k + 1 :] for k in range(len(candidates))]
    scores = cider.score_against(flat, others) if flat else np.zeros(0)
    out, start = [], 0
    for candidates in texts:
        if len(candidates) > 1:
            out.append(np.asarray(scores[start : start + len(candidates)], dtype=np.float64))
            start += len(candidates)
        else:
            out.append(np.zeros(len(candidates)))
    return out


class Reranker:
    """What a recipe holds to rerank N-best lists as ``decoding.rerank`` says: the judge (the captioner's contrastive
    projection, or a CLAP model built once) and the consensus's document frequencies (the training references).

    Args:
        cfg: the ``decoding.rerank`` section.
        train_references: every training clip's references (normalised here).
        device: where a CLAP model runs.
    """

    def __init__(self, cfg: RerankConfig, train_references: Sequence[Sequence[str]], *, device: Any = "cpu") -> None:
        self.cfg = cfg
        self.cider = CiderD([[normalize_caption(r) for r in refs] for refs in train_references])
        self.clap = None
        if cfg.similarity == "clap" and cfg.similarity_weight:
            from avlm.models.clap import ClapSimilarity

            self.clap = ClapSimilarity(cfg.clap, device)

    def similarities(
        self,
        captioner: Any,
        source_tokens: torch.Tensor,
        candidates: Sequence[Sequence[str]],
        *,
        max_length: int,
        waveforms: Sequence[np.ndarray] | None = None,
        sample_rate: int = 0,
    ) -> list[np.ndarray] | None:
        """Each clip's similarity to each of its candidates (None when the similarity's weight is 0).

        Raises:
            ConfigError: CLAP without the clips' waveforms (a video source).
        """
        if not self.cfg.similarity_weight:
            return None
        if self.clap is None:
            return contrastive_similarity(captioner, source_tokens, candidates, max_length=max_length)
        if waveforms is None:
            raise ConfigError("config key 'decoding.rerank.similarity' = 'clap' needs audio clips (not a video source)")
        return self.clap.similarity(waveforms, sample_rate, candidates)

    def __call__(
        self, nbest: Mapping[int, Sequence[str]], similarity: Mapping[int, np.ndarray] | None
    ) -> dict[int, str]:
        """Clip -> the candidate with the highest combined score."""
        picked, _ = rerank(
            nbest,
            similarity=similarity,
            cider=self.cider,
            similarity_weight=self.cfg.similarity_weight,
            consensus_weight=self.cfg.consensus_weight,
        )
        return picked


# ----------------------------------------------------------------------------------------------------------------
# N-best metrics
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NBestReport:
    """What :func:`nbest_metrics` measured.

    Attributes:
        metrics: prefix-free names (the caller adds ``val/`` or ``test/``): ``rerank/<metric>`` for the reranked
            captions (each metric the scorer computed; absent without reranked captions), ``CIDEr_D_max``,
            ``SPIDEr_max`` (absent without SPICE) and ``self_BLEU_4`` (absent when no list has two candidates).
        rows: the decoding-vs-reranking table: one dict per row (``decoding``: top beam, reranked, oracle max),
            a value or None per metric of :data:`~avlm.metrics.captioning.CAPTION_METRIC_NAMES` that was computed.
            The oracle row holds, for each item-averaged metric, the mean over clips of the best candidate's score
            by that metric (None for BLEU and METEOR, whose corpus scores pool statistics).
        per_candidate: metric -> {(clip, k): score of candidate k of the clip against the clip's references}.
        spice_unavailable_reason: why SPICE and SPIDEr are absent, or None.
    """

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    per_candidate: dict[str, dict[tuple[Hashable, int], float]]
    spice_unavailable_reason: str | None = None

    def table(self) -> list[dict[str, Any]]:
        """The table's rows (copies of :attr:`rows`)."""
        return [dict(row) for row in self.rows]

    def markdown(self, digits: int = 4, title: str = "Decoding vs reranking") -> str:
        """The table as GitHub Markdown (``n/a`` where a figure is not defined)."""
        from avlm.report.tables import Table, number_cell, render_markdown, text_cell

        columns = [name for name in CAPTION_METRIC_NAMES if any(name in row for row in self.rows)]
        table = Table(
            name="nbest",
            title=title,
            columns=["decoding", *columns],
            rows=[
                [text_cell(row["decoding"]), *(number_cell(row.get(c), digits) for c in columns)] for row in self.rows
            ],
        )
        if any(row["decoding"] == ORACLE for row in self.rows):
            table.note(f"{ORACLE}: per clip the best candidate by each metric, averaged over clips")
        return render_markdown(table)


def nbest_metrics(
    nbest: Mapping[int, Sequence[str]],
    references: Mapping[int, Sequence[str]],
    scorer: CaptionScorer,
    reranked: Mapping[int, str] | None = None,
) -> NBestReport:
    """Oracle, reranking and diversity metrics of N-best lists.

    Every candidate is scored against its clip's references in ONE ``scorer.score`` call (ids ``(clip, k)``, with
    the scorer's SPICE setting), so SPICE starts once. In that call each clip's references count once per
    candidate in CIDEr-D's document frequencies, which gives an n-gram found in no reference the idf log(N·clips)
    instead of log(clips) and so lowers the CIDEr-D of candidates holding one. CIDEr-D per candidate is therefore
    recomputed with :class:`CiderD` on the PTB-tokenised text, each clip's references counted once: candidate
    ``k``'s CIDEr-D is the one a corpus of one caption per clip gives, and the oracle CIDEr-D is never below the
    top beam's. The top-beam and reranked rows are scored as corpora of one caption per clip (``spice=False``;
    SPICE per clip, which depends on nothing else, comes from the one call), so their BLEU and METEOR are the
    corpus figures the recipe reports. The PTB tokenizer (a short JVM run) runs four times in all.

    Args:
        nbest: clip -> its candidates, best beam first (non-empty).
        references: clip -> its reference captions; the same clips as ``nbest``.
        scorer: scores the captions (its METEOR JVM is reused across the calls).
        reranked: clip -> the candidate reranking chose (one of the clip's candidates); None = no reranked row.

    Returns:
        The metrics and the table.

    Raises:
        DataError: clips that differ between the mappings, an empty list, or a reranked caption that is not one of
            its clip's candidates.
    """
    items = check_caption_items({item: texts[0] if texts else "" for item, texts in nbest.items()}, references)
    empty = [item for item in items if not list(nbest[item])]
    if empty:
        raise DataError(f"every clip needs at least one candidate; none for clips {empty[:10]}")
    choice = {item: 0 for item in items}
    if reranked is not None:
        if set(reranked) != set(items):
            raise DataError("reranked captions must be given for exactly the clips of the N-best lists")
        not_candidates = [item for item in items if reranked[item] not in nbest[item]]
        if not_candidates:
            raise DataError(f"reranked captions that are not candidates of their clip: clips {not_candidates[:10]}")
        choice = {item: list(nbest[item]).index(reranked[item]) for item in items}

    keys = [(item, k) for item in items for k in range(len(nbest[item]))]
    candidates = {key: nbest[key[0]][key[1]] for key in keys}
    every = scorer.score(candidates, {key: references[key[0]] for key in keys})
    per_candidate = {name: dict(values) for name, values in every.per_item.items()}
    per_candidate["CIDEr_D"] = _candidate_cider_d(keys, candidates, references)
    if "SPICE" in per_candidate:
        per_candidate["SPIDEr"] = {k: (per_candidate["CIDEr_D"][k] + per_candidate["SPICE"][k]) / 2 for k in keys}

    top = _row(TOP_BEAM, {item: 0 for item in items}, nbest, references, scorer, per_candidate)
    rows = [top]
    metrics: dict[str, float] = {}
    if reranked is not None:
        rows.append(_row(RERANKED, choice, nbest, references, scorer, per_candidate))
        metrics.update({f"rerank/{name}": value for name, value in rows[-1].items() if name != "decoding"})
    oracle: dict[str, Any] = {"decoding": ORACLE}
    for name in top:
        if name != "decoding":
            oracle[name] = _oracle_mean(per_candidate[name], nbest, items) if name in _ORACLE_METRICS else None
    rows.append(oracle)
    metrics["CIDEr_D_max"] = oracle["CIDEr_D"]
    if "SPIDEr" in oracle:
        metrics["SPIDEr_max"] = oracle["SPIDEr"]
    diverse = [[normalize_caption(text) for text in nbest[item]] for item in items if len(nbest[item]) > 1]
    if diverse:
        metrics["self_BLEU_4"] = float(np.mean([self_bleu(texts, n=4) for texts in diverse]))
    return NBestReport(
        metrics=metrics,
        rows=rows,
        per_candidate=per_candidate,
        spice_unavailable_reason=every.spice_unavailable_reason,
    )


def _candidate_cider_d(
    keys: Sequence[tuple[Hashable, int]], candidates: Mapping[tuple, str], references: Mapping[Hashable, Sequence[str]]
) -> dict[tuple[Hashable, int], float]:
    """CIDEr-D of every candidate, document frequencies from each clip's PTB-tokenised references counted once."""
    gts, res = ptb_tokenize([references[item] for item, _ in keys], [candidates[key] for key in keys])
    first = {}
    for position, (item, _) in enumerate(keys):
        first.setdefault(item, position)
    clip_index = {item: index for index, item in enumerate(first)}
    cider = CiderD([gts[position] for position in first.values()])
    scores = cider.score([res[position][0] for position in range(len(keys))], [clip_index[item] for item, _ in keys])
    return {key: float(score) for key, score in zip(keys, scores, strict=True)}


def _row(
    name: str,
    choice: Mapping[Hashable, int],
    nbest: Mapping[Hashable, Sequence[str]],
    references: Mapping[Hashable, Sequence[str]],
    scorer: CaptionScorer,
    per_candidate: Mapping[str, Mapping[tuple[Hashable, int], float]],
) -> dict[str, Any]:
    """Corpus metrics of one caption per clip (candidate ``choice[clip]``); SPICE from the per-candidate scores."""
    scores: CaptionScores = scorer.score({item: nbest[item][k] for item, k in choice.items()}, references, spice=False)
    row: dict[str, Any] = {"decoding": name, **scores.corpus}
    if "SPICE" in per_candidate:
        for metric in ("SPICE", "SPIDEr"):
            row[metric] = float(np.mean([per_candidate[metric][(item, k)] for item, k in choice.items()]))
    return row


def _oracle_mean(
    scores: Mapping[tuple[Hashable, int], float], nbest: Mapping[Hashable, Sequence[str]], items: Sequence[Hashable]
) -> float:
    """Mean over clips of the best candidate's score."""
    # fmax skips an undefined score (SPICE writes NaN for some captions) unless all of a clip's are undefined.
    return float(np.mean([np.fmax.reduce([scores[(item, k)] for k in range(len(nbest[item]))]) for item in items]))
