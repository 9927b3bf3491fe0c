"""Plots logged with each run, for what a table shows badly: curves over epochs, PR curves, per-layer entropy,
attention heatmaps over a clip's frames, AVE's scores and anchors per clip, a chain stage's paired deltas."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # headless: training machines have no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import precision_recall_curve  # noqa: E402

if TYPE_CHECKING:
    import torch

    from avlm.ave.diagnose import ClipOutcome
    from avlm.models import TokenLayout
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


def token_map_per_frame(attention: np.ndarray | torch.Tensor, layout: TokenLayout) -> np.ndarray:
    """Attention over the backbone's tokens as one patch map per frame.

    Prefix (CLS/register) tokens are dropped and the values kept as they are (not renormalised); a time step's
    map is repeated for each frame it covers (V-JEPA 2: 2 frames per tubelet).

    Args:
        attention: (N,) attention per token, N = ``layout.num_tokens`` (e.g. the pooler's, averaged over heads, or
            a backbone layer's, averaged over heads and queries).
        layout: where the tokens sit (``VideoBackbone.token_layout()``).

    Returns:
        (T, grid, grid) float64, T = time_steps · frames_per_step.

    Raises:
        ValueError: ``attention`` is not (N,) for the layout.
    """
    if hasattr(attention, "detach"):
        attention = attention.detach().cpu().numpy()
    values = np.asarray(attention, dtype=np.float64)
    if values.shape != (layout.num_tokens,):
        raise ValueError(f"token attention must have shape ({layout.num_tokens},) for {layout}, got {values.shape}")
    steps = values.reshape(layout.time_steps, layout.tokens_per_step)[:, layout.prefix_tokens :]
    return steps.reshape(layout.time_steps, layout.grid, layout.grid).repeat(layout.frames_per_step, axis=0)


def attention_heatmaps(frames: np.ndarray, maps: np.ndarray, titles: Sequence[str]) -> plt.Figure:
    """Attention maps over the frames of a few clips: a row per clip, a column per frame.

    Each patch map is upsampled (bilinear) to the frame and overlaid half transparent; the colour scale runs from 0
    to the clip's largest value, so the frames of a clip compare with each other (clips do not: each has its own).

    Args:
        frames: (K, T, S, S, 3) uint8 RGB frames.
        maps: (K, T, grid, grid) attention per patch (e.g. :func:`token_map_per_frame` of each clip).
        titles: K row titles (clip id, labels, predictions).

    Raises:
        ValueError: shapes that do not fit together.
    """
    frames, maps = np.asarray(frames), np.asarray(maps, dtype=np.float64)
    if frames.ndim != 5 or frames.shape[-1] != 3 or maps.ndim != 4 or maps.shape[:2] != frames.shape[:2]:
        raise ValueError(f"frames (K, T, S, S, 3) {frames.shape} and maps (K, T, grid, grid) {maps.shape} do not fit")
    if len(titles) != len(frames):
        raise ValueError(f"{len(titles)} titles for {len(frames)} clips")
    clips, num_frames, height, width = frames.shape[:4]
    fig, axes = plt.subplots(clips, num_frames, figsize=(2 * num_frames, 2 * clips + 0.3), squeeze=False)
    pixel_edges = (-0.5, width - 0.5, height - 0.5, -0.5)  # the map covers the frame's pixels exactly
    for row, (clip_frames, clip_maps, title) in enumerate(zip(frames, maps, titles, strict=True)):
        peak = float(clip_maps.max()) if clip_maps.max() > 0 else 1.0
        for t, ax in enumerate(axes[row]):
            ax.imshow(clip_frames[t])
            ax.imshow(
                clip_maps[t], cmap="jet", alpha=0.5, vmin=0.0, vmax=peak, extent=pixel_edges, interpolation="bilinear"
            )
            ax.set_title(f"{title} · frame {t}" if t == 0 else f"frame {t}", fontsize=7)
            ax.set_axis_off()
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


def save_and_close(figure: plt.Figure, path: str | Path) -> Path:
    """Write ``figure`` to ``path`` (PNG) and free it: files a run's logger does not own (a chain's stage files)."""
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return Path(path)


def eventness_examples(outcomes: Sequence[ClipOutcome], classes: Sequence[str]) -> plt.Figure:
    """One panel per clip: its Stage-1 scores per second, the seconds labelled as an event (shaded, with the
    class), the anchors (stars), the resolution each second got (bars, right axis) and the errors (red ×)."""
    fig, axes = plt.subplots(len(outcomes), 1, figsize=(8, 2.2 * max(len(outcomes), 1)), squeeze=False)
    for ax, clip in zip(axes[:, 0], outcomes, strict=False):
        seconds = np.arange(len(clip.scores))
        for t, label in enumerate(clip.labels):
            if label:
                ax.axvspan(t - 0.5, t + 0.5, color="tab:green", alpha=0.15, lw=0)
        ax.plot(seconds, clip.scores, marker="o", color="tab:blue", label="eventness")
        anchors = [t for t in clip.anchors if 0 <= t < len(clip.scores)]
        ax.plot(anchors, [clip.scores[t] for t in anchors], "*", ms=14, color="tab:orange", label="anchor")
        wrong = [t for t in seconds if clip.predictions[t] != clip.labels[t]]
        ax.plot(wrong, [clip.scores[t] for t in wrong], "x", ms=8, color="tab:red", label="wrong")
        twin = ax.twinx()
        twin.bar(seconds, clip.resolutions, width=0.6, color="grey", alpha=0.25)
        twin.set_ylabel("px", fontsize=8)
        events = sorted({classes[label] for label in clip.labels if label})
        note = f" — fell back: {clip.reason}" if clip.fallback else ""
        ax.set_title(f"{clip.video_id}: {', '.join(events) or 'no event'}{note}", fontsize=9)
        ax.set_xticks(seconds)
        ax.set_ylabel("score", fontsize=8)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("second (shaded: labelled event; bars: resolution)")
    fig.tight_layout()
    return fig


def fallback_per_candidate(fallback: Mapping[str, Sequence[float]], *, split: str, winner: str) -> plt.Figure:
    """The fraction of clips whose anchored allocation fell back to uniform, per candidate cell (mean ± std over
    its seeds; the stage's candidate in orange)."""
    names = list(fallback)
    means = [float(np.nanmean(fallback[n])) if len(fallback[n]) else np.nan for n in names]
    stds = [float(np.nanstd(fallback[n])) if len(fallback[n]) else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 2), 4))
    colors = ["tab:orange" if n == winner else "tab:blue" for n in names]
    ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=colors)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(f"{split} fallback fraction")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return fig


def paired_deltas(
    candidate: Mapping[str, float], baseline: Mapping[str, float], *, metric: str, interval: tuple[float, float]
) -> plt.Figure:
    """Candidate − baseline of ``metric`` per seed (paired by seed), their mean and its confidence ``interval``."""
    seeds = sorted(set(candidate) & set(baseline), key=lambda s: (len(s), s))
    deltas = [candidate[s] - baseline[s] for s in seeds]
    fig, ax = plt.subplots(figsize=(max(4, 0.5 * len(seeds) + 3), 4))
    ax.bar(range(len(seeds)), deltas, color=["tab:green" if d > 0 else "tab:red" for d in deltas])
    mean = float(np.mean(deltas)) if deltas else np.nan
    ax.axhline(mean, color="black", lw=1, label=f"mean Δ {mean:+.4f}")
    ax.axhspan(
        interval[0], interval[1], color="grey", alpha=0.2, label=f"95% CI [{interval[0]:+.4f}, {interval[1]:+.4f}]"
    )
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(seeds)), [f"seed {s}" for s in seeds], rotation=30, fontsize=8)
    ax.set_ylabel(f"Δ {metric} (candidate − baseline)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
