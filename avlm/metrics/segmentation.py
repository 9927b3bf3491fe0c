"""Semantic segmentation quality: a confusion matrix accumulated over batches, per-class IoU and mIoU.

Background counts as a class and enters the mean, as the CVS study's Exp8 mIoU (27-30 % on Endoscapes-Seg50) did.
Pixels whose target is -1 (a frame without a mask) are ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

IGNORE_INDEX = -1


class ConfusionMatrix:
    """Pixel counts ``matrix[target, predicted]`` over every :meth:`update` so far.

    Args:
        num_classes: classes 0 .. num_classes-1.

    Attributes:
        matrix: (num_classes, num_classes) int64; rows are the true class, columns the predicted one.
    """

    def __init__(self, num_classes: int):
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        self.num_classes = num_classes
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        """Add the pixels of one batch.

        Args:
            pred: predicted class ids, any shape (e.g. (B, T, S, S), the argmax of the logits' class dim).
            target: true class ids of the same shape; -1 = ignored.

        Raises:
            ValueError: shapes differ, or a class id outside 0 .. num_classes-1 (-1 allowed in ``target``).
        """
        pred = _as_int_array(pred)
        target = _as_int_array(target)
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {pred.shape} differs from target shape {target.shape}")
        kept = target != IGNORE_INDEX
        pred, target = pred[kept], target[kept]
        for name, ids in (("pred", pred), ("target", target)):
            if ids.size and (ids.min() < 0 or ids.max() >= self.num_classes):
                raise ValueError(
                    f"{name} holds class ids in [{ids.min()}, {ids.max()}], outside 0..{self.num_classes - 1}"
                )
        flat = target * self.num_classes + pred
        self.matrix += np.bincount(flat, minlength=self.num_classes**2).reshape(self.num_classes, self.num_classes)


def _as_int_array(ids: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids).astype(np.int64, copy=False).ravel()


def segmentation_metrics(confusion: ConfusionMatrix | np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """Per-class IoU = TP / (TP + FP + FN) and their mean (mIoU), background included.

    A class absent from both the targets and the predictions (zero union) has IoU NaN and is left out of the mean;
    mIoU is NaN when every class is.

    Args:
        confusion: a :class:`ConfusionMatrix` or its (C, C) ``matrix`` (rows true, columns predicted).
        class_names: C names, in class-id order (e.g. ``avlm.data.SEG_CLASSES``).

    Returns:
        ``{"mIoU": .., "IoU_<name>": .. for each class}``.

    Raises:
        ValueError: the matrix is not square or its size differs from ``len(class_names)``.
    """
    matrix = np.asarray(confusion.matrix if isinstance(confusion, ConfusionMatrix) else confusion, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] != len(class_names):
        raise ValueError(f"confusion matrix of shape {matrix.shape} does not match {len(class_names)} class names")
    true_positives = np.diag(matrix)
    union = matrix.sum(axis=0) + matrix.sum(axis=1) - true_positives
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, true_positives / union, np.nan)
    present = ~np.isnan(iou)
    metrics = {"mIoU": float(iou[present].mean()) if present.any() else math.nan}
    metrics.update({f"IoU_{name}": float(value) for name, value in zip(class_names, iou, strict=True)})
    return metrics
