"""Diversity of a set of captions for one item (an N-best list, a set of samples): self-BLEU."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from avlm.errors import DataError
from avlm.metrics.caption_statistics import bleu_item_statistics
from avlm.stats import CorpusBleu


def self_bleu(candidates: Sequence[str], n: int = 4) -> float:
    """Mean over candidates of the sentence-level BLEU-n of each against all the others.

    Each candidate is the hypothesis and the other candidates its references, scored with pycocoevalcap's BLEU as
    ``Bleu.compute_score`` scores one item (clipped n-gram matches, closest reference length): its per-item
    ``Bleu_n``. Higher means less diverse; identical candidates give 1.0 (to pycocoevalcap's 1e-9 smoothing).
    Captions are whitespace-tokenised as given: pass normalised text.

    Args:
        candidates: Two or more captions.
        n: BLEU order, 1 to 4.

    Returns:
        The mean sentence BLEU-n.

    Raises:
        DataError: fewer than two candidates, or a candidate that is not a string.
        ValueError: ``n`` is not 1, 2, 3 or 4.
    """
    bleu = CorpusBleu(n)
    if isinstance(candidates, str):
        raise DataError("self_bleu needs a sequence of candidate captions, got one string")
    candidates = list(candidates)
    if len(candidates) < 2:
        raise DataError(f"self_bleu needs at least 2 candidates, got {len(candidates)}")
    not_text = [i for i, candidate in enumerate(candidates) if not isinstance(candidate, str)]
    if not_text:
        raise DataError(f"self_bleu candidates must be strings; not a string at positions {not_text[:10]}")
    others = {i: candidates[:i] + candidates[i + 1 :] for i in range(len(candidates))}
    hypotheses = {i: [candidate] for i, candidate in enumerate(candidates)}
    # One item's statistics through the corpus formula are that item's sentence-level score.
    return float(np.mean(bleu.from_totals(bleu_item_statistics(others, hypotheses))))
