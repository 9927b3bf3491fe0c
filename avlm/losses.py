"""Multi-label losses over logits: BCE with per-class positive weights, or sigmoid focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ConfigError

LOSS_KINDS = ("bce", "focal")


class MultiLabelLoss(nn.Module):
    """Loss for K independent binary labels, averaged over batch and classes.

    - ``bce``: ``binary_cross_entropy_with_logits`` with per-class ``pos_weight``.
    - ``focal``: the sigmoid focal loss of Lin et al. (2017), ``alpha_t · (1 - p_t)^gamma · BCE``, as
      ``torchvision.ops.sigmoid_focal_loss``; a negative ``focal_alpha`` turns the alpha balancing off. When
      ``pos_weight`` is given it also scales the positive term of the BCE inside the focal loss.

    Label smoothing maps targets to ``targets · (1 - ε) + ε / 2`` before either loss.

    Args:
        kind: ``"bce"`` or ``"focal"``.
        pos_weight: one weight per class for positive targets (e.g. negatives / positives), or None.
        focal_alpha: weight of positives in the focal loss (negatives get 1 - alpha).
        focal_gamma: focusing exponent; 0 gives alpha-weighted BCE.
        label_smoothing: ε in [0, 1).
    """

    def __init__(
        self,
        kind: str = "bce",
        *,
        pos_weight: Sequence[float] | None = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ConfigError(f"loss.kind '{kind}' is unknown: use one of {', '.join(LOSS_KINDS)}")
        if focal_alpha > 1.0:
            raise ConfigError(f"loss.focal_alpha={focal_alpha} must be at most 1 (negative disables it)")
        if focal_gamma < 0.0:
            raise ConfigError(f"loss.focal_gamma={focal_gamma} must be non-negative")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing={label_smoothing} must be in [0, 1)")
        if pos_weight is not None and any(w <= 0 for w in pos_weight):
            raise ConfigError(f"loss.pos_weight={list(pos_weight)} must be positive")
        self.kind = kind
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.label_smoothing = label_smoothing
        # A buffer so that .to(device) moves it; not persistent, as it comes from the config.
        self.pos_weight: torch.Tensor | None
        self.register_buffer(
            "pos_weight",
            None if pos_weight is None else torch.tensor(list(pos_weight), dtype=torch.float32),
            persistent=False,
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Compute the loss.

        Args:
            logits: (B, K).
            targets: (B, K) in [0, 1] (soft targets allowed).

        Returns:
            The scalar mean over batch and classes.

        Raises:
            ConfigError: ``pos_weight`` has a length other than K.
        """
        if self.pos_weight is not None and self.pos_weight.numel() != logits.shape[-1]:
            raise ConfigError(f"loss.pos_weight has {self.pos_weight.numel()} values for {logits.shape[-1]} classes")
        targets = targets.to(logits.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / 2.0
        pos_weight = None if self.pos_weight is None else self.pos_weight.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight, reduction="none")
        if self.kind == "bce":
            return bce.mean()
        p = torch.sigmoid(logits)
        p_t = p * targets + (1.0 - p) * (1.0 - targets)
        loss = bce * (1.0 - p_t) ** self.focal_gamma
        if self.focal_alpha >= 0:
            loss = (self.focal_alpha * targets + (1.0 - self.focal_alpha) * (1.0 - targets)) * loss
        return loss.mean()
