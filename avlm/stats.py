"""Summary statistics shared by reports: mean ± std over seeds, and the best-threshold F1 of multi-label scores."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sklearn.metrics import precision_recall_curve


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of ``values`` (e.g. one metric over seeds).

    The std is the sample std (``ddof=1``, Bessel-corrected): with a handful of seeds it is the unbiased variance
    estimate, and it is larger than numpy's default ``ddof=0`` by a factor ``sqrt(n / (n - 1))`` (1.22 for
    three seeds). One value has no spread to estimate: its std is reported as 0.

    Args:
        values: one or more numbers; NaN propagates to both results.

    Returns:
        ``(mean, std)`` as Python floats.

    Raises:
        ValueError: ``values`` is empty.
    """
    array = np.asarray(list(values), dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(np.std(array, ddof=1)) if array.size > 1 else 0.0
    return float(np.mean(array)), std


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``mean ± std`` with ``digits`` decimals each, as in the probe report: ``"0.6015 ± 0.0465"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def best_f1(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean over classes of each class's best F1 over all decision thresholds.

    For each class (column) that has a positive, sklearn's ``precision_recall_curve`` gives precision and recall at
    every distinct score used as a threshold (predict positive when ``score >= threshold``); the class's best F1
    is the largest ``2PR / (P + R)`` over those points (0 where ``P + R = 0``). The result is the unweighted mean
    over those classes, like ``mean_average_precision``.

    The threshold is chosen per class on the very data it is scored on, so this is an optimistic (oracle-threshold)
    figure, and it has a floor that needs no model: the lowest threshold predicts every sample positive, which
    scores ``2p / (1 + p)`` for a class of prevalence ``p``.

    Args:
        y_true: (N, K) targets in [0, 1], binarised at 0.5 like ``average_precision_per_class``; 1-D is one class.
        scores: (N, K) scores on any monotone scale.

    Returns:
        The mean best F1; NaN when no class has a positive.

    Raises:
        ValueError: the shapes differ or are not 1-D / 2-D.
    """
    targets = np.asarray(y_true, dtype=np.float64)
    preds = np.asarray(scores, dtype=np.float64)
    if targets.shape != preds.shape:
        raise ValueError(f"y_true {targets.shape} and scores {preds.shape} must have the same shape")
    if targets.ndim == 1:
        targets, preds = targets[:, None], preds[:, None]
    if targets.ndim != 2:
        raise ValueError(f"y_true and scores must be (N, K), got shape {targets.shape}")
    positives = targets >= 0.5
    per_class = []
    for k in range(targets.shape[1]):
        # F1 is undefined without a positive (and sklearn warns): skip the class, as mAP does.
        if not positives[:, k].any():
            continue
        precision, recall, _ = precision_recall_curve(positives[:, k], preds[:, k])
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
        per_class.append(f1.max())
    return float(np.mean(per_class)) if per_class else float("nan")
