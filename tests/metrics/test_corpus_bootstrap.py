"""Pooled caption metrics from per-item statistics equal the scorers' corpus values on the coco-caption demo."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from pycocoevalcap.bleu.bleu import Bleu

from avlm.metrics.caption_statistics import (
    bleu_item_statistics,
    caption_item_statistics,
    meteor_item_statistics,
    tokenized_captions,
)
from avlm.metrics.captioning import _ClosableMeteor
from avlm.stats import CorpusBleu, CorpusMeteor, bootstrap_ci, paired_bootstrap

# <repo root>/../shared, as in tests/metrics/test_captioning.py.
ORACLE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "oracles" / "coco_caption_demo"


@pytest.fixture(scope="module")
def demo():
    """(predictions, references, expected) of the coco-caption demo."""
    assert ORACLE_DIR.is_dir(), f"oracle folder {ORACLE_DIR} is missing (shared/ must sit beside the repo)"
    predictions = {c["image_id"]: c["caption"] for c in json.loads((ORACLE_DIR / "candidates.json").read_text())}
    references = defaultdict(list)
    for reference in json.loads((ORACLE_DIR / "references.json").read_text()):
        references[reference["image_id"]].append(reference["caption"])
    return predictions, dict(references), json.loads((ORACLE_DIR / "expected.json").read_text())


def _jar_eval(jar: _ClosableMeteor, stats) -> tuple[list[float], float]:
    """The jar's EVAL of statistics lines, as pycocoevalcap's Meteor.compute_score sends them: (segments, corpus)."""
    lines = [" ".join(repr(float(value)) for value in row) for row in stats]  # Java prints counts as "8.0" too
    jar.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(lines) + "\n").encode())
    jar.meteor_p.stdin.flush()
    segments = [float(jar.meteor_p.stdout.readline()) for _ in lines]
    return segments, float(jar.meteor_p.stdout.readline())


@pytest.fixture(scope="module")
def tokenized(demo):
    """(gts, res) of the demo after the PTB tokenizer."""
    _, gts, res = tokenized_captions(demo[0], demo[1])
    return gts, res


@pytest.fixture(scope="module")
def bleu_stats(tokenized):
    return bleu_item_statistics(*tokenized)


@pytest.fixture(scope="module")
def meteor_scored(tokenized):
    """METEOR statistics of the demo and the jar's EVAL of them, from one JVM (its start costs 10-20 s)."""
    jar = _ClosableMeteor()
    try:
        stats = meteor_item_statistics(*tokenized, jar)
        segments, corpus = _jar_eval(jar, stats)
    finally:
        jar.close()
    return stats, segments, corpus


def test_bleu_from_item_statistics_is_pycocoevalcaps_corpus_bleu(bleu_stats, tokenized, demo):
    expected = demo[2]
    gts, res = tokenized
    corpus, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for order in (1, 2, 3, 4):
        value = CorpusBleu(order).value(bleu_stats)
        assert value == corpus[order - 1]  # the same operations on the same sums: equal, not just close
        assert value == pytest.approx(expected["full_precision"][f"Bleu_{order}"], abs=1e-12)
    totals = bleu_stats.sum(axis=0)
    assert totals[0] == expected["bleu_stats"]["testlen"]
    assert totals[1] == expected["bleu_stats"]["reflen"]
    assert totals[6:10].tolist() == expected["bleu_stats"]["correct"]


def test_meteor_from_item_statistics_is_the_jars(meteor_scored, demo):
    stats, segments, corpus = meteor_scored
    assert CorpusMeteor().value(stats) == pytest.approx(corpus, abs=1e-12)
    assert CorpusMeteor().value(stats) == pytest.approx(demo[2]["full_precision"]["METEOR"], abs=1e-12)
    # Each segment's line alone gives the jar's segment score as well.
    assert CorpusMeteor().from_totals(stats) == pytest.approx(segments, abs=1e-12)
    ci = bootstrap_ci(stats, CorpusMeteor(), n_resamples=2000)
    assert ci.low < ci.estimate == CorpusMeteor().value(stats) < ci.high
    assert 0.003 < ci.high - ci.low < 0.03
    assert paired_bootstrap(stats, stats.copy(), CorpusMeteor(), n_resamples=200).p_value == 1.0


def test_bootstrap_of_corpus_bleu_on_the_demo(bleu_stats):
    statistic = CorpusBleu(4)
    ci = bootstrap_ci(bleu_stats, statistic, n_resamples=2000)
    assert ci.estimate == statistic.value(bleu_stats)
    assert ci.low < ci.estimate < ci.high
    assert 0.005 < ci.high - ci.low < 0.05  # 1,000 captions: about +-1 point of BLEU-4
    # The count-weighted path and the plain batch path resample the same items.
    plain = bootstrap_ci(bleu_stats, lambda batch: statistic(batch), n_resamples=200)
    weighted = bootstrap_ci(bleu_stats, statistic, n_resamples=200)
    assert (plain.low, plain.high) == pytest.approx((weighted.low, weighted.high), rel=1e-12)


def test_paired_bootstrap_of_bleu_finds_mismatched_captions_worse(demo, bleu_stats):
    predictions, references, _ = demo
    ids = list(predictions)
    # Each image gets its neighbour's caption: a system that is clearly worse on the same items.
    shifted = {image: predictions[ids[(i + 1) % len(ids)]] for i, image in enumerate(ids)}
    worse = caption_item_statistics(shifted, references, meteor=False)
    assert worse.meteor is None and worse.item_ids == ids
    assert worse.corpus()["BLEU_4"] < CorpusBleu(4).value(bleu_stats) - 0.05
    result = paired_bootstrap(bleu_stats, worse.bleu, CorpusBleu(4), n_resamples=1000)
    assert result.p_value == pytest.approx(2 / 1001)
    assert result.delta.low > 0.05
    assert paired_bootstrap(bleu_stats, bleu_stats.copy(), CorpusBleu(4), n_resamples=200).p_value == 1.0
