"""A video classifier: a (mostly frozen) backbone and a trainable head."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from avlm.models.backbones import VideoBackbone
from avlm.models.heads import ClassificationHead


@dataclass
class ClassifierOutput:
    """What the classifier returns.

    Attributes:
        logits: (B, num_classes).
        pooler_attention: (B, heads, num_queries, N) for attentive pooling, else None.
        backbone_attentions: per backbone layer, when asked for and computed from pixels, else None.
    """

    logits: torch.Tensor
    pooler_attention: torch.Tensor | None = None
    backbone_attentions: list[torch.Tensor] | None = None


class VideoClassifier(nn.Module):
    """Backbone + head.

    A backbone without any trainable parameter runs in eval mode under ``torch.no_grad()`` even while the
    classifier trains, so its features equal the cached ones (no dropout / drop-path) and no graph is kept.

    Args:
        backbone: the video encoder.
        head: the classification head over its tokens.
    """

    def __init__(self, backbone: VideoBackbone, head: ClassificationHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def backbone_is_frozen(self) -> bool:
        """Whether no backbone parameter requires a gradient."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> VideoClassifier:
        super().train(mode)
        if self.backbone_is_frozen():
            self.backbone.eval()
        return self

    def _run_backbone(self, pixel_values: torch.Tensor, output_attentions: bool):
        frozen = self.backbone_is_frozen()
        # Trainability can change after .train() was called (staged unfreezing), so the mode is settled per call.
        wanted_mode = self.training and not frozen
        if self.backbone.training != wanted_mode:
            self.backbone.train(wanted_mode)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            return self.backbone(pixel_values, output_attentions=output_attentions)

    def backbone_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Backbone forward only (what a feature cache stores).

        Args:
            pixel_values: (B, T, C, H, W) normalised frames.

        Returns:
            Tokens (B, N, D).
        """
        return self._run_backbone(pixel_values, output_attentions=False).tokens

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        *,
        tokens: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> ClassifierOutput:
        """Classify clips, or cached backbone tokens.

        Args:
            pixel_values: (B, T, C, H, W) normalised frames.
            tokens: (B, N, D) cached backbone output; only the head runs.
            output_attentions: also return the backbone's per-layer attentions (pixels only).

        Returns:
            Logits and attention maps.

        Raises:
            ValueError: neither or both of ``pixel_values`` and ``tokens`` given.
        """
        if (pixel_values is None) == (tokens is None):
            raise ValueError("pass exactly one of pixel_values or tokens")
        backbone_attentions = None
        if tokens is None:
            out = self._run_backbone(pixel_values, output_attentions=output_attentions)
            tokens, backbone_attentions = out.tokens, out.attentions
        logits, pooler_attention = self.head(tokens)
        return ClassifierOutput(
            logits=logits, pooler_attention=pooler_attention, backbone_attentions=backbone_attentions
        )
