"""Self-BLEU: pycocoevalcap's sentence-level BLEU of each candidate against the others, averaged."""

import math

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu

from avlm.errors import DataError
from avlm.metrics.diversity import self_bleu


def test_identical_candidates_give_one():
    assert self_bleu(["a dog barks twice in the rain"] * 4) == pytest.approx(1.0, abs=1e-8)


def test_hand_computed_two_candidates():
    # "a b c d" vs "a b c e" either way: 3 of 4 unigrams and 2 of 3 bigrams match, same length (no brevity penalty).
    assert self_bleu(["a b c d", "a b c e"], n=1) == pytest.approx(0.75, abs=1e-8)
    assert self_bleu(["a b c d", "a b c e"], n=2) == pytest.approx(math.sqrt(0.75 * 2 / 3), abs=1e-8)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_equals_pycocoevalcap_per_item_bleu(n):
    candidates = [
        "a dog barks loudly",
        "a dog barks twice near a road",
        "rain falls on a metal roof",
        "a dog barks",
        "a loud dog barks at a car",
    ]
    others = {i: candidates[:i] + candidates[i + 1 :] for i in range(len(candidates))}
    _, per_item = Bleu(4).compute_score(others, {i: [c] for i, c in enumerate(candidates)}, verbose=0)
    assert self_bleu(candidates, n=n) == pytest.approx(float(np.mean(per_item[n - 1])), abs=1e-12)


def test_more_diverse_is_lower():
    similar = ["a dog barks loudly", "a dog barks loudly twice", "a dog barks"]
    diverse = ["a dog barks loudly", "rain on a tin roof", "an engine idles"]
    assert self_bleu(diverse, n=2) < self_bleu(similar, n=2)


def test_bad_arguments():
    with pytest.raises(DataError, match="at least 2 candidates"):
        self_bleu(["only one"])
    with pytest.raises(DataError, match="one string"):
        self_bleu("a b c")
    with pytest.raises(ValueError, match="BLEU order"):
        self_bleu(["a b", "a c"], n=5)
