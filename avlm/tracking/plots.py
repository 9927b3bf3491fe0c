"""Plots logged with each run, for what a table shows badly: curves over epochs, PR curves, per-layer entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402


def training_curves(history: Sequence[Mapping[str, float]], panels: Mapping[str, Sequence[str]]) -> plt.Figure:
    """One panel per entry of ``panels`` (title → metric names), each metric plotted against ``epoch``."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    epochs = [row["epoch"] for row in history]
    for ax, (title, keys) in zip(axes[0], panels.items(), strict=True):
        for key in keys:
            values = [row.get(key, np.nan) for row in history]
            if not np.all(np.isnan(values)):
                ax.plot(epochs, values, marker="o", label=key)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def precision_recall_curves(y_true: np.ndarray, scores: np.ndarray, class_names: Sequence[str]) -> plt.Figure:
    """Per-class precision-recall curves with each class's AP and prevalence (the AP of a random ranking)."""
    from avlm.metrics import average_precision_per_class

    ap = average_precision_per_class(y_true, scores)
    fig, ax = plt.subplots(figsize=(5, 4))
    for k, name in enumerate(class_names):
        positives = y_true[:, k] >= 0.5
        if not positives.any():
            continue
        precision, recall, _ = precision_recall_curve(positives, scores[:, k])
        ax.plot(recall, precision, label=f"{name} AP={ap[k]:.3f} (prevalence {positives.mean():.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def entropy_per_layer(entropies: Mapping[str, float]) -> plt.Figure:
    """Bar chart of attention entropy (% of maximum; 100 = uniform) per backbone layer and for the pooler."""
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(entropies) + 2), 4))
    names = list(entropies)
    ax.bar(range(len(names)), [entropies[n] for n in names], color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("attention entropy (% of max)")
    ax.set_ylim(0, 100)
    ax.axhline(100, color="grey", lw=0.5)
    fig.tight_layout()
    return fig
