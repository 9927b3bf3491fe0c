"""MixUp and CutMix on batches of clips, with soft multi-label targets."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def mix_clips(
    pixel_values: Tensor,
    labels: Tensor,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
    switch_prob: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Mix each clip with another clip of the batch (MixUp or CutMix) and mix the labels likewise.

    MixUp blends whole clips: ``x = lam * x + (1 - lam) * x[perm]`` with ``lam ~ Beta(mixup_alpha, mixup_alpha)``.
    CutMix pastes one box, the same on every frame so the clip stays temporally consistent, from ``x[perm]``; the
    box is drawn for ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, clipped at the borders, and ``lam`` is then set
    to the share of pixels actually kept. Labels become ``lam * y + (1 - lam) * y[perm]`` either way.

    Args:
        pixel_values: (B, T, C, H, W) floating-point clips.
        labels: (B, K) targets in [0, 1].
        mixup_alpha: Beta parameter for MixUp; 0 disables it.
        cutmix_alpha: Beta parameter for CutMix; 0 disables it.
        generator: Source of all randomness, so a batch is mixed the same way for the same generator state.
        switch_prob: Probability of CutMix when both are enabled.

    Returns:
        Mixed clips and soft labels (float). With both alphas 0 the inputs are returned unchanged.
    """
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return pixel_values, labels
    if pixel_values.ndim != 5 or labels.ndim != 2 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"expected pixel_values (B, T, C, H, W) and labels (B, K), got {tuple(pixel_values.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point to mix, got {pixel_values.dtype}")

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=generator.device))

    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = uniform() < switch_prob
    else:
        use_cutmix = cutmix_alpha > 0
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    # torch's Beta sampler cannot take a generator; seed numpy's from it to stay deterministic.
    beta_seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
    lam = float(np.random.default_rng(beta_seed).beta(alpha, alpha))
    batch = pixel_values.shape[0]
    perm = torch.randperm(batch, generator=generator, device=generator.device).to(pixel_values.device)
    soft = labels if labels.is_floating_point() else labels.float()

    if use_cutmix:
        height, width = pixel_values.shape[-2:]
        ratio = (1.0 - lam) ** 0.5
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(uniform() * height), int(uniform() * width)
        y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
        x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = pixel_values[perm][..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        mixed = lam * pixel_values + (1.0 - lam) * pixel_values[perm]
    return mixed, lam * soft + (1.0 - lam) * soft[perm]
