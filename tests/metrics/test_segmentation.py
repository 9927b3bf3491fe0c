"""Confusion-matrix IoU / mIoU: a hand-computed case, ignored pixels, absent classes, and sklearn's jaccard."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from avlm.metrics.segmentation import ConfusionMatrix, segmentation_metrics


def test_hand_computed_iou_with_ignored_pixels_and_an_absent_class():
    confusion = ConfusionMatrix(4)
    target = torch.tensor([[0, 0, 1, 1], [1, 2, 2, -1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 2, 0, 3]])  # the last pixel is ignored, so class 3 is never counted
    confusion.update(pred, target)
    assert confusion.matrix.tolist() == [[1, 1, 0, 0], [0, 2, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    metrics = segmentation_metrics(confusion, ("bg", "a", "b", "c"))
    # bg: TP 1, FP 1 (a 2 predicted 0), FN 1 -> 1/3; a: TP 2, FP 1, FN 1 -> 1/2; b: TP 1, FP 1, FN 1 -> 1/3.
    assert metrics["IoU_bg"] == pytest.approx(1 / 3)
    assert metrics["IoU_a"] == pytest.approx(1 / 2)
    assert metrics["IoU_b"] == pytest.approx(1 / 3)
    assert math.isnan(metrics["IoU_c"])  # zero union: left out of the mean
    assert metrics["mIoU"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)


def test_accumulates_over_batches_like_one_batch():
    generator = np.random.default_rng(0)
    target = generator.integers(-1, 5, size=(6, 2, 8, 8))
    pred = generator.integers(0, 5, size=(6, 2, 8, 8))
    whole, split = ConfusionMatrix(5), ConfusionMatrix(5)
    whole.update(pred, target)
    for i in range(0, 6, 2):
        split.update(torch.from_numpy(pred[i : i + 2]), torch.from_numpy(target[i : i + 2]))
    assert np.array_equal(whole.matrix, split.matrix)
    assert whole.matrix.sum() == (target != -1).sum()


def test_equals_sklearn_jaccard_on_random_labels():
    generator = np.random.default_rng(1)
    target = generator.integers(0, 5, size=2000)
    pred = np.where(generator.random(2000) < 0.6, target, generator.integers(0, 5, size=2000))
    confusion = ConfusionMatrix(5)
    confusion.update(pred, target)
    names = ("background", "cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct")
    metrics = segmentation_metrics(confusion.matrix, names)
    per_class = jaccard_score(target, pred, labels=list(range(5)), average=None)
    assert [metrics[f"IoU_{n}"] for n in names] == pytest.approx(per_class.tolist(), abs=1e-12)
    assert metrics["mIoU"] == pytest.approx(jaccard_score(target, pred, average="macro"), abs=1e-12)


def test_bad_ids_and_shapes_are_errors():
    confusion = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion.update(np.array([0, 3]), np.array([0, 1]))
    with pytest.raises(ValueError, match="differs"):
        confusion.update(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="3 class names"):
        segmentation_metrics(np.zeros((4, 4)), ("a", "b", "c"))
    assert math.isnan(segmentation_metrics(confusion, ("a", "b", "c"))["mIoU"])
