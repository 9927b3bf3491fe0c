"""MixUp and CutMix on batches of clips, with soft multi-label targets (and the clips' anatomy masks)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class MixPlan:
    """One batch's draw: which clip each clip is mixed with, how much, and (CutMix) where.

    Attributes:
        perm: (B,) the partner of each clip.
        lam: the weight of each clip's own content (CutMix: the share of its pixels kept).
        box: CutMix's pasted box ``(y0, y1, x0, x1)``, the same on every frame; None for MixUp.
    """

    perm: Tensor
    lam: float
    box: tuple[int, int, int, int] | None

    def pixels(self, pixel_values: Tensor) -> Tensor:
        """``lam · x + (1 - lam) · x[perm]`` (MixUp) or ``x`` with the box pasted from ``x[perm]`` (CutMix)."""
        if self.box is None:
            return self.lam * pixel_values + (1.0 - self.lam) * pixel_values[self.perm]
        y0, y1, x0, x1 = self.box
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = pixel_values[self.perm][..., y0:y1, x0:x1]
        return mixed

    def labels(self, labels: Tensor) -> Tensor:
        soft = labels if labels.is_floating_point() else labels.float()
        return self.lam * soft + (1.0 - self.lam) * soft[self.perm]

    def masks(self, seg_mask: Tensor, has_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed clips' class masks (B, T, H, W; -1 = unknown) and which clips have one.

        CutMix pastes the box like the pixels. A MixUp clip shows both clips' anatomy, so the mask is their union:
        where either is anatomy (class > 0) that class (the heavier clip's when both are), else unknown (-1) where
        either is unknown, else background. A partner without masks makes the whole mixed clip unknown.
        """
        other, other_has = seg_mask[self.perm], has_mask[self.perm]
        if self.box is not None:
            y0, y1, x0, x1 = self.box
            mixed = seg_mask.clone()
            mixed[..., y0:y1, x0:x1] = other[..., y0:y1, x0:x1]
            return mixed, has_mask & other_has
        heavy, light = (seg_mask, other) if self.lam >= 0.5 else (other, seg_mask)
        mixed = torch.where(heavy > 0, heavy, torch.where(light > 0, light, torch.minimum(heavy, light)))
        both = has_mask & other_has
        return torch.where(both.view(-1, *([1] * (mixed.ndim - 1))), mixed, torch.full_like(mixed, -1)), both


def draw_mix(
    batch: int,
    image_size: tuple[int, int],
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    generator: torch.Generator,
    switch_prob: float = 0.5,
) -> MixPlan | None:
    """Draw how a batch is mixed (see :func:`mix_clips`); None when both alphas are 0."""
    if mixup_alpha < 0 or cutmix_alpha < 0:
        raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha} and {cutmix_alpha}")
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob}")
    if mixup_alpha == 0 and cutmix_alpha == 0:
        return None

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
    perm = torch.randperm(batch, generator=generator, device=generator.device)
    if not use_cutmix:
        return MixPlan(perm, lam, None)
    height, width = image_size
    ratio = (1.0 - lam) ** 0.5
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(uniform() * height), int(uniform() * width)
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return MixPlan(perm, 1.0 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


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
    to the share of pixels actually kept. Labels become ``lam * y + (1 - lam) * y[perm]`` either way. To mix the
    clips' masks the same way, draw the :class:`MixPlan` with :func:`draw_mix` and apply it.

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
    plan = draw_mix(
        pixel_values.shape[0],
        tuple(pixel_values.shape[-2:]),
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        generator=generator,
        switch_prob=switch_prob,
    )
    if plan is None:
        return pixel_values, labels
    if pixel_values.ndim != 5 or labels.ndim != 2 or labels.shape[0] != pixel_values.shape[0]:
        raise ValueError(
            f"expected pixel_values (B, T, C, H, W) and labels (B, K), got {tuple(pixel_values.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point to mix, got {pixel_values.dtype}")
    plan = MixPlan(plan.perm.to(pixel_values.device), plan.lam, plan.box)
    return plan.pixels(pixel_values), plan.labels(labels)
