"""Multi-label classification metrics: average precision per class and its mean (the CVS mAP)."""

from __future__ import annotations

import numpy as np
import torch


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
    """Average precision of each class (column): sklearn's ``average_precision_score``, computed here.

    The formula is sklearn's (``sum_t (R_t - R_{t-1}) P_t`` over the distinct scores t; tests hold the two equal to
    1e-12). sklearn's call costs about 2 ms a class, mostly its input checks, which the training loop paid for every
    epoch's training mAP: the CVS mAP of 1,024 clips takes 0.5 ms here against 6.8 ms through sklearn.

    Soft targets (label means over annotators, mixup) are binarised at 0.5: a target of at least 0.5 is positive,
    which is the majority vote of the CVS evaluator for three annotators.

    Args:
        y_true: (N, K) targets in [0, 1]; a 1-D array is one class.
        scores: (N, K) scores, any monotone scale (logits or probabilities).

    Returns:
        (K,) AP per class; NaN for a class without any positive (AP is undefined there).

    Raises:
        ValueError: the shapes differ or are not 2-D, or a score is NaN or infinite.
    """
    targets = _as_2d_array(y_true, "y_true")
    preds = _as_2d_array(scores, "scores")
    if targets.shape != preds.shape:
        raise ValueError(f"y_true {targets.shape} and scores {preds.shape} must have the same shape")
    if not np.isfinite(preds).all():
        raise ValueError("scores contain NaN or infinity")
    positives = targets >= 0.5
    ap = np.full(targets.shape[1], np.nan)
    for k in range(targets.shape[1]):
        if positives[:, k].any():  # AP is undefined without a positive
            ap[k] = _binary_average_precision(positives[:, k], preds[:, k])
    return ap


def _binary_average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """AP of one class that has a positive: precision at each distinct score, weighted by the recall it adds."""
    ranked = np.argsort(-scores, kind="stable")
    ranked_scores = scores[ranked]
    # a threshold at each distinct score: the last sample of a run of tied scores closes it
    threshold_ends = np.flatnonzero(np.append(ranked_scores[1:] != ranked_scores[:-1], True))
    true_positives = np.cumsum(positive[ranked])[threshold_ends]
    precision = true_positives / (threshold_ends + 1)
    return float(np.sum(np.diff(true_positives, prepend=0) * precision) / true_positives[-1])


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
