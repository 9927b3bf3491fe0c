"""A video classifier: a (mostly frozen) backbone and a trainable head."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
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
        backbone_attentions: per backbone layer, when asked for and computed from pixels, else None; they carry
            their graph when the backbone trains (attention supervision of backbone layers).
        seg_logits: (B, T, classes, S, S) per-frame segmentation logits when the classifier has a seg_head.
    """

    logits: torch.Tensor
    pooler_attention: torch.Tensor | None = None
    backbone_attentions: list[torch.Tensor] | None = None
    seg_logits: torch.Tensor | None = None


class VideoClassifier(nn.Module):
    """Backbone + head.

    A backbone without any trainable parameter runs in eval mode under ``torch.no_grad()`` even while the
    classifier trains, so its features equal the cached ones (no dropout / drop-path) and no graph is kept.

    Args:
        backbone: the video encoder.
        head: the classification head over its tokens.
        masked_layers: the backbone layers a ``backbone_mask`` applies at; empty = every layer.
        seg_head: an optional segmentation decoder over the same tokens (multi-task training).

    Raises:
        ModelError: a masked layer index out of the backbone's range.
    """

    def __init__(
        self,
        backbone: VideoBackbone,
        head: ClassificationHead,
        masked_layers: Sequence[int] = (),
        seg_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.seg_head = seg_head
        if masked_layers:
            backbone.check_layer_indices(masked_layers)
        self.masked_layers = tuple(int(index) for index in masked_layers)

    def backbone_is_frozen(self) -> bool:
        """Whether no backbone parameter requires a gradient."""
        return not any(p.requires_grad for p in self.backbone.parameters())

    def train(self, mode: bool = True) -> VideoClassifier:
        super().train(mode)
        if self.backbone_is_frozen():
            self.backbone.eval()
        return self

    def _run_backbone(
        self, pixel_values: torch.Tensor, output_attentions: bool, token_mask: torch.Tensor | None = None
    ):
        frozen = self.backbone_is_frozen()
        # Trainability can change after .train() was called (staged unfreezing), so the mode is settled per call.
        wanted_mode = self.training and not frozen
        if self.backbone.training != wanted_mode:
            self.backbone.train(wanted_mode)
        with torch.no_grad() if frozen else contextlib.nullcontext():
            if token_mask is None:
                return self.backbone(pixel_values, output_attentions=output_attentions)
            return self.backbone(
                pixel_values,
                output_attentions=output_attentions,
                token_mask=token_mask,
                masked_layers=self.masked_layers,
            )

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
        pooler_mask: torch.Tensor | None = None,
        backbone_mask: torch.Tensor | None = None,
    ) -> ClassifierOutput:
        """Classify clips, or cached backbone tokens.

        Args:
            pixel_values: (B, T, C, H, W) normalised frames.
            tokens: (B, N, D) cached backbone output; only the head runs.
            output_attentions: also return the backbone's per-layer attentions (pixels only).
            pooler_mask: (B, N) bool, the tokens the head's pooler may attend to (``anatomy_token_mask``).
            backbone_mask: (B, N) bool, the keys the backbone's self-attention may attend to at ``masked_layers``
                (pixels only).

        Returns:
            Logits and attention maps.

        Raises:
            ValueError: neither or both of ``pixel_values`` and ``tokens`` given, or a backbone mask with tokens.
        """
        if (pixel_values is None) == (tokens is None):
            raise ValueError("pass exactly one of pixel_values or tokens")
        if backbone_mask is not None and tokens is not None:
            raise ValueError("backbone_mask needs pixel_values: cached tokens were computed without it")
        backbone_attentions = None
        if tokens is None:
            out = self._run_backbone(pixel_values, output_attentions=output_attentions, token_mask=backbone_mask)
            tokens, backbone_attentions = out.tokens, out.attentions
        logits, pooler_attention = self.head(tokens, pooler_mask)
        return ClassifierOutput(
            logits=logits,
            pooler_attention=pooler_attention,
            backbone_attentions=backbone_attentions,
            seg_logits=self.seg_head(tokens) if self.seg_head is not None else None,
        )
