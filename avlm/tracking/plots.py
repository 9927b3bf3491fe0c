"""Plots logged with each run, for what a table shows badly: curves over epochs, PR curves, per-layer entropy."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

if TYPE_CHECKING:
    from avlm.probe.gate import AblationRow


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


def metric_against_snr(clean: Mapping[str, float], noisy: Mapping[float, Mapping[str, float]]) -> plt.Figure:
    """One panel per metric of ``clean``: its value at each SNR of ``noisy`` (dB → metric → value), the clean value
    as a dashed line."""
    levels = sorted(noisy)
    fig, axes = plt.subplots(1, len(clean), figsize=(4 * len(clean), 3.5), squeeze=False)
    for ax, (name, value) in zip(axes[0], clean.items(), strict=True):
        ax.plot(levels, [noisy[snr].get(name, np.nan) for snr in levels], marker="o", label="noisy")
        ax.axhline(value, linestyle="--", color="gray", label="clean")
        ax.set_title(name)
        ax.set_xlabel("SNR (dB)")
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


def probe_cells(rows: Sequence[AblationRow]) -> plt.Figure:
    """Pretrained vs random-init metric per probe configuration (pooling × optimizer), mean ± std over seeds.

    Args:
        rows: ``avlm.probe.ablation_table`` rows (they carry the stds), all from one split.
    """
    labels = [f"{row.pooling}\n{row.optimizer}" for row in rows]
    positions = np.arange(len(rows))
    offset = 0.15  # side by side, so that overlapping error bars stay readable
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(rows) + 2), 4))
    for shift, name, means, stds, color in (
        (-offset, "pretrained", [r.pre_mean for r in rows], [r.pre_std for r in rows], "tab:blue"),
        (offset, "random init", [r.rand_mean for r in rows], [r.rand_std for r in rows], "tab:orange"),
    ):
        ax.errorbar(positions + shift, means, yerr=stds, fmt="o", capsize=4, color=color, label=name)
    ax.set_xticks(positions, labels, fontsize=8)
    splits = sorted({row.split for row in rows})
    seeds = sorted({row.seeds for row in rows})
    ax.set_ylabel(f"{'/'.join(splits)} mAP (mean ± std over {'/'.join(map(str, seeds))} seeds)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
