"""Test-time augmentation for clip classifiers: average the sigmoid probabilities over augmented copies of a clip.

The CVS research log lists TTA as a free boost (no training cost). The augmentations keep the clip's shape and its
labelled (last) frame, so any clip model takes them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

TTA_AUGMENTATIONS = ("hflip", "temporal_shift")


def augment_clip(pixel_values: torch.Tensor, augmentation: str) -> torch.Tensor:
    """One augmented copy of a batch of clips.

    Args:
        pixel_values: (B, T, C, H, W) normalised frames, oldest first.
        augmentation: ``hflip`` (mirror every frame left-right) or ``temporal_shift`` (the clip one frame later:
            the oldest frame dropped and the labelled last frame repeated, so the clip still ends on it).

    Returns:
        A tensor of the same shape.

    Raises:
        ValueError: an unknown augmentation name.
    """
    if augmentation == "hflip":
        return pixel_values.flip(-1)
    if augmentation == "temporal_shift":
        frames = pixel_values.shape[1]
        index = torch.arange(1, frames + 1, device=pixel_values.device).clamp_(max=frames - 1)
        return pixel_values.index_select(1, index)
    raise ValueError(f"unknown test-time augmentation {augmentation!r}: use some of {list(TTA_AUGMENTATIONS)}")


def tta_probabilities(
    classify: Callable[[torch.Tensor], torch.Tensor], pixel_values: torch.Tensor, augmentations: Sequence[str]
) -> torch.Tensor:
    """Mean sigmoid probability over the clip and each augmented copy of it.

    Args:
        classify: pixels (B, T, C, H, W) → logits (B, K), e.g. ``lambda x: model(pixel_values=x).logits``.
        pixel_values: the clips.
        augmentations: names from ``TTA_AUGMENTATIONS``; empty gives ``sigmoid(classify(pixel_values))``.

    Returns:
        (B, K) probabilities, float32.
    """
    probs = torch.sigmoid(classify(pixel_values).float())
    if not augmentations:
        return probs
    # p + Σ(p_k - p) / n rather than Σ p_k / n: where an augmentation changes nothing the result is p exactly
    # (three equal float values summed and divided by three need not give the value back).
    shift = sum(torch.sigmoid(classify(augment_clip(pixel_values, a)).float()) - probs for a in augmentations)
    return probs + shift / (1 + len(augmentations))
