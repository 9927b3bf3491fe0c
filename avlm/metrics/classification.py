"""Multi-label classification metrics: average precision per class and its mean (the CVS mAP)."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score


def _as_2d_array(values: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{what} must be (N, K), got shape {array.shape}")
    return array


def average_precision_per_class(y_true: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> np.ndarray:
    """Average precision of each class (column), as sklearn's ``average_precision_score``.

    Soft targets (label means over annotators, mixup) are binarised at 0.5: a target of at least 0.5 is positive,
    which is the majority vote of the CVS evaluator for three annotators.

    Args:
        y_true: (N, K) targets in [0, 1]; a 1-D array is one class.
        scores: (N, K) scores, any monotone scale (logits or probabilities).

    Returns:
        (K,) AP per class; NaN for a class without any positive (AP is undefined there).

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    targets = _as_2d_array(y_true, "y_true")
    preds = _as_2d_array(scores, "scores")
    if targets.shape != preds.shape:
        raise ValueError(f"y_true {targets.shape} and scores {preds.shape} must have the same shape")
    positives = targets >= 0.5
    ap = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        # sklearn warns and returns a meaningless value for a column without positives: skip it instead.
        if positives[:, k].any():
            ap[k] = average_precision_score(positives[:, k], preds[:, k])
    return ap


def mean_average_precision(y_true: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor) -> float:
    """Mean of the per-class APs over the classes that have positives.

    Args:
        y_true: (N, K) targets in [0, 1].
        scores: (N, K) scores.

    Returns:
        The mAP (equal to sklearn's ``average_precision_score(average="macro")`` when every class has a positive);
        NaN when no class has a positive.
    """
    ap = average_precision_per_class(y_true, scores)
    defined = ap[~np.isnan(ap)]
    return float(defined.mean()) if defined.size else float("nan")
