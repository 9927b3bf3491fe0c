"""Multi-label losses over logits: BCE with per-class positive weights, or sigmoid focal loss; and the attention
supervision term that pulls attention maps towards a token mask."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ConfigError

LOSS_KINDS = ("bce", "focal")
ATTENTION_SUPERVISION_KINDS = ("kl", "bce")
# Probabilities are floored here before their log: a masked-out token can hold exactly 0 attention.
_PROBABILITY_FLOOR = 1e-8


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


def attention_supervision_loss(
    attention: torch.Tensor, token_mask: torch.Tensor, applies: torch.Tensor, kind: str = "kl"
) -> torch.Tensor:
    """Pull attention rows towards the tokens of a mask (the research log's Exp11).

    - ``kl``: ``KL(target ‖ p)`` per attention row, the target uniform over the mask's tokens:
      ``Σ_{j∈mask} (1/|mask|) · log((1/|mask|) / p_j)``.
    - ``bce``: ``-log(Σ_{j∈mask} p_j)``, the mass inside the mask pushed to 1.

    Probabilities are floored at 1e-8 before the log. Rows are averaged over heads and queries per clip, then
    over the clips where ``applies`` is True.

    Args:
        attention: (B, heads, Nq, N) softmax probabilities (pooler or backbone layer).
        token_mask: (B, N) bool, True = inside the mask.
        applies: (B,) bool, the clips whose mask counts (e.g. ``anatomy_token_mask(...).applied``).
        kind: ``"kl"`` or ``"bce"``.

    Returns:
        The scalar loss; 0, still attached to ``attention``'s graph, when no clip applies.

    Raises:
        ConfigError: an unknown kind, or shapes that do not match.
    """
    if kind not in ATTENTION_SUPERVISION_KINDS:
        raise ConfigError(
            f"loss.attention_supervision '{kind}' is unknown: use one of {', '.join(ATTENTION_SUPERVISION_KINDS)}"
        )
    batch, tokens = attention.shape[0], attention.shape[-1]
    if attention.ndim != 4 or tuple(token_mask.shape) != (batch, tokens) or tuple(applies.shape) != (batch,):
        raise ConfigError(
            f"attention supervision needs attention (B, heads, Nq, N), token_mask (B, N) and applies (B,); got "
            f"{tuple(attention.shape)}, {tuple(token_mask.shape)} and {tuple(applies.shape)}"
        )
    applies = applies.to(torch.bool) & token_mask.any(dim=1)
    if not applies.any():
        return attention.sum() * 0.0
    attention, inside = attention[applies], token_mask[applies].to(attention.dtype)[:, None, None, :]
    if kind == "kl":
        target = inside / inside.sum(dim=-1, keepdim=True)
        log_ratio = target.clamp_min(_PROBABILITY_FLOOR).log() - attention.clamp_min(_PROBABILITY_FLOOR).log()
        per_row = (target * log_ratio).sum(dim=-1)
    else:
        per_row = -(attention * inside).sum(dim=-1).clamp_min(_PROBABILITY_FLOOR).log()
    return per_row.mean(dim=(1, 2)).mean()
