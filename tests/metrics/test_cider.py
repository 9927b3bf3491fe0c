"""Vectorised CIDEr-D: equal to pycocoevalcap's CiderScorer on the coco-caption demo and on random captions."""

import json
import math
import shutil
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from avlm.errors import ConfigError, DataError
from avlm.metrics.captioning import ptb_tokenize
from avlm.metrics.cider import CiderD, coco_cider_d

ORACLE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "oracles" / "coco_caption_demo"
TOLERANCE = 1e-9


@pytest.fixture(scope="module")
def demo():
    """The coco-caption demo PTB-tokenised once: (candidates, references per candidate, expected corpus CIDEr)."""
    if shutil.which("java") is None:
        pytest.skip("the PTB tokenizer needs java")
    by_image = defaultdict(list)
    for ref in json.loads((ORACLE_DIR / "references.json").read_text()):
        by_image[ref["image_id"]].append(ref["caption"])
    candidates = json.loads((ORACLE_DIR / "candidates.json").read_text())
    gts, res = ptb_tokenize([by_image[c["image_id"]] for c in candidates], [c["caption"] for c in candidates])
    expected = json.loads((ORACLE_DIR / "expected.json").read_text())["full_precision"]["CIDEr"]
    return [res[i][0] for i in range(len(res))], [gts[i] for i in range(len(gts))], expected


def random_captions(rng, count, vocabulary, longest=12):
    """Captions of 0..longest words from a small vocabulary, so that n-grams repeat within and across captions."""
    return [" ".join(rng.choice(vocabulary, rng.integers(0, longest + 1))) for _ in range(count)]


def random_reference_sets(rng, count, vocabulary):
    return [random_captions(rng, int(rng.integers(1, 7)), vocabulary) for _ in range(count)]


def test_demo_equals_coco_caption(demo):
    candidates, references, expected = demo
    scores = CiderD(references).score(candidates, np.arange(len(candidates)))
    _, coco = Cider().compute_score(dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    assert np.abs(scores - coco).max() < TOLERANCE
    assert scores.mean() == pytest.approx(expected, abs=TOLERANCE)
    assert round(scores.mean(), 3) == 0.600  # as the original demo printed it


def test_demo_with_separate_document_frequencies(demo):
    """Score 300 images with document frequencies from the other 700, as SCST does with its training set."""
    candidates, references, _ = demo
    scored, documents = slice(0, 300), references[300:]
    cider = CiderD(references[scored], document_frequency_references=documents)
    scores = cider.score(candidates[scored], np.arange(300))
    expected = coco_cider_d(candidates[scored], references[scored], document_frequency_references=documents)
    assert cider.n_documents == 700 and cider.ref_len == pytest.approx(math.log(700))
    assert np.abs(scores - expected).max() < TOLERANCE
    # Different document frequencies, different scores: the df references are really used.
    assert np.abs(scores - CiderD(references[scored]).score(candidates[scored], np.arange(300))).max() > 1e-3


def test_coco_cider_d_without_df_references_is_cider_compute_score():
    rng = np.random.default_rng(3)
    vocabulary = [f"w{i}" for i in range(12)]
    references = random_reference_sets(rng, 40, vocabulary)
    candidates = random_captions(rng, 40, vocabulary)
    _, coco = Cider().compute_score(dict(enumerate(references)), {i: [c] for i, c in enumerate(candidates)})
    np.testing.assert_array_equal(coco_cider_d(candidates, references), coco)


def test_hand_computed_idf():
    """'a b' vs 'a c' with df sets {a c}, {a b}, {d}: only the unigram 'a' matches, idf(a) = log 3/2, idf(b) = log 3."""
    documents = [["a c"], ["a b"], ["d"]]
    idf_a, idf_b = math.log(1.5), math.log(3.0)
    expected = 10.0 / 4 * idf_a**2 / (idf_a**2 + idf_b**2)  # identical norms, no bigram match, equal lengths
    cider = CiderD([["a c"]], document_frequency_references=documents)
    assert cider.score(["a b"], [0])[0] == pytest.approx(expected, rel=1e-12)
    assert coco_cider_d(["a b"], [["a c"]], document_frequency_references=documents)[0] == pytest.approx(expected)


@pytest.mark.parametrize(("n", "sigma"), [(4, 6.0), (1, 6.0), (2, 3.0), (3, 1.5), (5, 6.0)])
def test_random_captions_equal_coco(n, sigma):
    rng = np.random.default_rng(n)
    vocabulary = [f"w{i}" for i in range(15)]
    references = random_reference_sets(rng, 30, vocabulary)
    documents = random_reference_sets(rng, 50, vocabulary[:12])  # w12..w14: n-grams no document holds
    items = rng.integers(0, 30, 200)
    # Words no reference holds either (x0, x1), a caption of one word and an empty one.
    candidates = random_captions(rng, 197, [*vocabulary, "x0", "x1"]) + ["x0 x1 x0 x1", "w1", ""]
    cider = CiderD(references, document_frequency_references=documents, n=n, sigma=sigma)
    scores = cider.score(candidates, items)
    expected = coco_cider_d(
        candidates, [references[i] for i in items], document_frequency_references=documents, n=n, sigma=sigma
    )
    assert np.abs(scores - expected).max() < TOLERANCE
    assert scores.std() > 0.1 and scores[-1] == 0.0


def test_score_against_matches_coco_including_unseen_ngrams():
    rng = np.random.default_rng(7)
    vocabulary = [f"w{i}" for i in range(10)]
    documents = random_reference_sets(rng, 20, vocabulary)
    cider = CiderD(documents)
    # Rerank consensus: each candidate against the others; "zz" is in no reference yet matches between candidates.
    candidates = [*random_captions(rng, 5, vocabulary), "zz w1 zz", "zz w1 w2"]
    others = [candidates[:i] + candidates[i + 1 :] for i in range(len(candidates))]
    scores = cider.score_against(candidates, others)
    expected = coco_cider_d(candidates, others, document_frequency_references=documents)
    assert np.abs(scores - expected).max() < TOLERANCE
    assert scores[-1] > 0


def test_score_against_the_tables_references_is_score():
    rng = np.random.default_rng(11)
    vocabulary = [f"w{i}" for i in range(10)]
    references = random_reference_sets(rng, 25, vocabulary)
    cider = CiderD(references, document_frequency_references=random_reference_sets(rng, 40, vocabulary))
    candidates, items = random_captions(rng, 60, vocabulary), rng.integers(0, 25, 60)
    np.testing.assert_allclose(
        cider.score(candidates, items), cider.score_against(candidates, [references[i] for i in items]), atol=1e-12
    )


def test_scoring_is_repeatable_and_leaves_the_vocabulary_alone():
    cider = CiderD([["a dog barks", "a dog is barking"], ["rain falls"]])
    first = cider.score(["a cat barks", "heavy rain falls", "a dog barks"], [0, 1, 0])
    again = cider.score(["a cat barks", "heavy rain falls", "a dog barks"], [0, 1, 0])
    np.testing.assert_array_equal(first, again)
    assert "cat" not in cider._vocabulary.word_index
    assert cider.score([], []).shape == (0,) and cider.score_against([], []).shape == (0,)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c: c.score(["a"], [2]), "item indices must be in"),
        (lambda c: c.score(["a", "b"], [0]), "2 candidates but 1 item"),
        (lambda c: c.score("a b", [0, 0, 0]), "got one string"),
        (lambda c: c.score_against(["a"], [[]]), "no reference caption"),
        (lambda c: c.score_against(["a"], ["a b"]), "got one string"),
        (lambda c: c.score_against(["a"], [["b"], ["c"]]), "1 candidates but 2 reference lists"),
    ],
)
def test_bad_calls_raise_data_error(call, message):
    with pytest.raises(DataError, match=message):
        call(CiderD([["a b"], ["c d"]]))


def test_bad_construction():
    with pytest.raises(DataError, match=r"references\[1\] has no reference"):
        CiderD([["a"], []])
    with pytest.raises(DataError, match="document_frequency_references must be a non-empty"):
        CiderD([["a"]], document_frequency_references=[])
    with pytest.raises(ConfigError, match="n-gram order"):
        CiderD([["a"]], n=0)
    with pytest.raises(ConfigError, match="sigma"):
        CiderD([["a"]], sigma=0.0)
