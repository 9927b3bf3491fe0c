"""Per-item sufficient statistics of coco-caption's pooled metrics (BLEU-1..4, METEOR), for bootstrapping them.

BLEU and METEOR are not means of per-item scores: pycocoevalcap pools n-gram counts and lengths (BLEU) and the
METEOR jar pools its alignment statistics over the corpus before applying the formula. A bootstrap over items
therefore resamples the per-item statistics and recomputes the corpus formula on each resample's sums
(:class:`avlm.stats.CorpusBleu`, :class:`avlm.stats.CorpusMeteor`); on the full sample this gives back the scorer's
corpus value exactly (BLEU) or to rounding (METEOR). The statistics come from the scorers themselves:

- BLEU: pycocoevalcap's ``BleuScorer`` cooks each (hypothesis, references) pair into its length, reference
  lengths, candidate n-gram counts and clipped matches; the "closest" reference length is chosen per item, as
  ``Bleu.compute_score`` does (``option="closest"``). Columns: :data:`avlm.stats.BLEU_STAT_FIELDS`.
- METEOR: the jar's ``SCORE`` command answers one statistics line per segment (the best-scoring reference's
  alignment), the very lines pycocoevalcap's ``Meteor`` sends back to ``EVAL``, whose corpus score is the formula
  on their sums. Columns:
  :data:`avlm.stats.METEOR_STAT_FIELDS`.

Captions go through the PTB tokenizer first, as in :class:`avlm.metrics.captioning.CaptionScorer`, so the
statistics belong to the same tokens the scores do. Usage::

    stats = caption_item_statistics(predictions, references)
    bootstrap_ci(stats.bleu, CorpusBleu(4))          # BLEU-4 with its 95% BCa interval
    paired_bootstrap(ours.meteor, theirs.meteor, CorpusMeteor())   # same items, both systems
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer
from pycocoevalcap.meteor.meteor import Meteor

from avlm.errors import AvlmError
from avlm.metrics.captioning import BLEU_NAMES, _ClosableMeteor, check_caption_items, ptb_tokenize
from avlm.stats import BLEU_STAT_FIELDS, METEOR_STAT_FIELDS, CorpusBleu, CorpusMeteor

_METEOR_LINES_PER_WRITE = 100


@dataclasses.dataclass(frozen=True)
class CaptionItemStatistics:
    """Per-item statistics of one system's captions, rows in ``item_ids`` order.

    Attributes:
        item_ids: the item ids, in the order of the rows.
        bleu: (n, 10) BLEU statistics, columns :data:`avlm.stats.BLEU_STAT_FIELDS`.
        meteor: (n, 23) METEOR statistics, columns :data:`avlm.stats.METEOR_STAT_FIELDS`; None when not asked.
    """

    item_ids: list
    bleu: np.ndarray
    meteor: np.ndarray | None

    def corpus(self) -> dict[str, float]:
        """Corpus BLEU_1..BLEU_4 (and METEOR) recomputed from the statistics: the scorers' corpus values."""
        values = {name: CorpusBleu(order).value(self.bleu) for order, name in enumerate(BLEU_NAMES, start=1)}
        if self.meteor is not None:
            values["METEOR"] = CorpusMeteor().value(self.meteor)
        return values


def bleu_item_statistics(gts: Mapping[int, list[str]], res: Mapping[int, list[str]]) -> np.ndarray:
    """BLEU statistics of tokenised captions, one row per key of ``res`` in its order.

    Args:
        gts: key -> tokenised reference captions (the PTB tokenizer's output).
        res: key -> a one-element list holding the tokenised hypothesis; the same keys.

    Returns:
        (n, 10) float array, columns :data:`avlm.stats.BLEU_STAT_FIELDS`.
    """
    scorer = BleuScorer(n=4)
    for key in res:
        scorer += (res[key][0], gts[key])
    rows = []
    for cooked in scorer.ctest:
        testlen = cooked["testlen"]
        # BleuScorer._single_reflen(option="closest"): the reference length nearest the hypothesis', ties to shorter.
        reflen = min((abs(length - testlen), length) for length in cooked["reflen"])[1]
        rows.append([testlen, reflen, *cooked["guess"], *cooked["correct"]])
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(BLEU_STAT_FIELDS))


def meteor_item_statistics(gts: Mapping[int, list[str]], res: Mapping[int, list[str]], meteor: Meteor) -> np.ndarray:
    """METEOR statistics of tokenised captions from a running jar, one row per key of ``res`` in its order.

    The ``SCORE`` lines are pycocoevalcap's (``Meteor._stat``: references, then the hypothesis with any ``|||``
    removed), sent :data:`_METEOR_LINES_PER_WRITE` at a time rather than one round trip each (3-4x faster); a
    block's answers (about 150 bytes each) stay well inside the pipe's buffer, so neither side blocks the other.

    Args:
        gts: key -> tokenised reference captions.
        res: key -> a one-element list holding the tokenised hypothesis.
        meteor: a pycocoevalcap ``Meteor`` whose JVM is up (the caller serialises calls to it).

    Returns:
        (n, 23) float array, columns :data:`avlm.stats.METEOR_STAT_FIELDS`.

    Raises:
        AvlmError: the jar answered a line that is not 23 numbers.
    """
    keys = list(res)
    rows = []
    for start in range(0, len(keys), _METEOR_LINES_PER_WRITE):
        block = keys[start : start + _METEOR_LINES_PER_WRITE]
        lines = "".join(
            " ||| ".join(("SCORE", " ||| ".join(gts[key]), res[key][0].replace("|||", "").replace("  ", " "))) + "\n"
            for key in block
        )
        meteor.meteor_p.stdin.write(lines.encode())
        meteor.meteor_p.stdin.flush()
        for key in block:
            line = meteor.meteor_p.stdout.readline().decode().strip()
            try:
                row = [float(field) for field in line.split()]
            except ValueError:
                row = []
            if len(row) != len(METEOR_STAT_FIELDS):
                expected = len(METEOR_STAT_FIELDS)
                raise AvlmError(f"METEOR answered {line!r} to SCORE for item {key!r}; expected {expected} numbers")
            rows.append(row)
    return np.asarray(rows, dtype=np.float64).reshape(len(rows), len(METEOR_STAT_FIELDS))


def tokenized_captions(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]
) -> tuple[list, dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenise captions as :class:`avlm.metrics.captioning.CaptionScorer` does; return (item ids, gts, res).

    Raises:
        DataError: ids differ between predictions and references, an item has no reference, or a caption is not a
            string.
        AvlmError: no Java runtime on PATH.
    """
    item_ids = check_caption_items(predictions, references)
    if shutil.which("java") is None:
        raise AvlmError("no 'java' on PATH: the PTB tokenizer and METEOR need a Java runtime")
    gts, res = ptb_tokenize([list(references[i]) for i in item_ids], [predictions[i] for i in item_ids])
    return item_ids, gts, res


def caption_item_statistics(
    predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], *, meteor: bool = True
) -> CaptionItemStatistics:
    """Per-item BLEU (and METEOR) statistics of one caption per item against that item's references.

    Starting METEOR's JVM costs about 15 s (its paraphrase table); ``meteor=False`` skips it.

    Args:
        predictions: item id -> predicted caption.
        references: item id -> one or more reference captions; the same ids.
        meteor: also collect METEOR's statistics.

    Returns:
        The :class:`CaptionItemStatistics`, rows in ``predictions`` order.

    Raises:
        DataError: the items do not fit (see :func:`tokenized_captions`).
        AvlmError: no Java runtime, or METEOR's Java process failed.
    """
    item_ids, gts, res = tokenized_captions(predictions, references)
    meteor_rows = None
    if meteor:
        jar = _ClosableMeteor()
        try:
            meteor_rows = meteor_item_statistics(gts, res, jar)
        except (OSError, ValueError) as err:
            raise AvlmError(f"METEOR's Java process failed ({err!r}); its stderr ends with: {jar.close()}") from err
        finally:
            jar.close()
    return CaptionItemStatistics(item_ids, bleu_item_statistics(gts, res), meteor_rows)
