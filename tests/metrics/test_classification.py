"""AP per class and mAP against sklearn and a hand computation."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from avlm.metrics import average_precision_per_class, mean_average_precision


def random_case(n=60, k=3, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, k)) < 0.3).astype(float)
    y[0] = 1.0  # every class has a positive
    scores = rng.normal(size=(n, k)) + y
    return y, scores


def test_hand_computed_average_precision():
    # Ranking: 0.9 (+), 0.8 (-), 0.7 (+), 0.1 (-): precision 1 at recall 0.5, 2/3 at recall 1.
    ap = average_precision_per_class(np.array([[1], [0], [1], [0]]), np.array([[0.9], [0.8], [0.7], [0.1]]))
    np.testing.assert_allclose(ap, [0.5 * 1 + 0.5 * 2 / 3])


def test_matches_sklearn_per_class_and_macro():
    y, scores = random_case()
    ap = average_precision_per_class(y, scores)
    np.testing.assert_allclose(ap, [average_precision_score(y[:, k], scores[:, k]) for k in range(3)])
    assert mean_average_precision(y, scores) == pytest.approx(average_precision_score(y, scores, average="macro"))


@pytest.mark.parametrize("seed", range(20))
def test_equals_sklearn_to_1e12_with_ties_and_any_prevalence(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 400))
    y = rng.random((n, 4)) < [0.02, 0.3, 0.7, 1.0]
    y[0, :2] = True  # rare classes still have a positive
    scores = rng.normal(size=(n, 4))
    scores[:, 1] = np.round(scores[:, 1], 1)  # many ties
    for dtype in (np.float64, np.float32):  # float32: what the training loop's scores arrive as
        typed = scores.astype(dtype)
        expected = [average_precision_score(y[:, k], typed[:, k]) for k in range(4)]
        np.testing.assert_allclose(average_precision_per_class(y.astype(float), typed), expected, rtol=0, atol=1e-12)


def test_non_finite_scores_are_an_error_as_in_sklearn():
    with pytest.raises(ValueError, match="NaN or infinity"):
        average_precision_per_class(np.array([[1.0], [0.0]]), np.array([[np.nan], [0.5]]))


def test_class_without_positives_is_nan_silently():
    y, scores = random_case()
    y[:, 1] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ap = average_precision_per_class(y, scores)
        assert np.isnan(ap[1]) and not np.isnan(ap[[0, 2]]).any()
        assert mean_average_precision(y, scores) == pytest.approx(np.mean(ap[[0, 2]]))
        assert np.isnan(mean_average_precision(np.zeros((4, 2)), np.ones((4, 2))))


def test_soft_targets_are_binarised_at_one_half():
    y, scores = random_case()
    # Annotator means of 0, 1/3, 2/3, 1: the majority vote is "at least 2/3".
    soft = np.where(y == 1, 2 / 3, 1 / 3)
    np.testing.assert_allclose(average_precision_per_class(soft, scores), average_precision_per_class(y, scores))
    np.testing.assert_allclose(average_precision_per_class(np.full((2, 1), 0.5), [[0.1], [0.2]]), [1.0])


def test_accepts_torch_tensors_and_one_dimensional_input():
    y, scores = random_case()
    np.testing.assert_allclose(
        average_precision_per_class(torch.tensor(y), torch.tensor(scores, dtype=torch.float32)),
        average_precision_per_class(y, scores),
        rtol=1e-6,
    )
    assert average_precision_per_class(y[:, 0], scores[:, 0]).shape == (1,)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="same shape"):
        average_precision_per_class(np.zeros((4, 3)), np.zeros((4, 2)))
