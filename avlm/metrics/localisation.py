"""AVE segment-level metrics: accuracy over all one-second segments, and where it comes from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def segment_metrics(labels: np.ndarray, predictions: np.ndarray, classes: Sequence[str]) -> dict[str, float]:
    """AVE's segment accuracy and its parts.

    Args:
        labels / predictions: (N, T) class indices per clip and second; class 0 is background.
        classes: class names by index (``classes[0]`` the background).

    Returns:
        ``accuracy`` (correct seconds / all seconds: the AVE metric), ``event_accuracy`` (on seconds whose label is
        an event), ``background_accuracy``, ``event_detection`` (event-vs-background agreement, class ignored) and
        ``class_accuracy/<name>`` per class present in ``labels`` (absent classes are left out, not NaN).
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    correct = labels == predictions
    event = labels != 0
    metrics = {
        "accuracy": float(correct.mean()),
        "event_accuracy": float(correct[event].mean()) if event.any() else float("nan"),
        "background_accuracy": float(correct[~event].mean()) if (~event).any() else float("nan"),
        "event_detection": float((event == (predictions != 0)).mean()),
    }
    for index, name in enumerate(classes):
        seconds = labels == index
        if seconds.any():
            metrics[f"class_accuracy/{name}"] = float(correct[seconds].mean())
    return metrics
