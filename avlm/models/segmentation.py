"""A lightweight segmentation decoder on the backbone's patch tokens, and its loss (the CVS study's Exp8).

The decoder turns each token step's grid of patch tokens into class logits at the clip's pixel resolution; the map
of a step serves every frame the step covers (a V-JEPA 2 tubelet covers 2 frames), so logits line up with the
per-frame masks ``seg_mask`` (B, T, S, S) of ``avlm.data`` (-1 = frame without a mask).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ModelError
from avlm.metrics.segmentation import IGNORE_INDEX
from avlm.models.backbones import TokenLayout


class SegmentationHead(nn.Module):
    """Patch tokens → LayerNorm → Linear(hidden) → (B·steps, hidden, grid, grid) → 3×3 conv → ×2 upsampling →
    3×3 conv → 1×1 conv to classes → bilinear upsampling to the image size → per-frame logits.

    Args:
        dim: token width D.
        num_classes: segmentation classes (``len(avlm.data.SEG_CLASSES)`` = 5 for Endoscapes).
        layout: where the backbone's tokens sit (``VideoBackbone.token_layout()``); prefix (CLS/register) tokens are
            dropped.
        hidden: channels of the decoder.

    Raises:
        ModelError: no layout (a backbone that pools its tokens has no patch grid to decode), or a non-positive
            ``hidden``.
    """

    def __init__(self, dim: int, num_classes: int, layout: TokenLayout | None, hidden: int = 64) -> None:
        super().__init__()
        if layout is None:
            raise ModelError("the segmentation head needs patch tokens: this backbone pools them (no token layout)")
        if hidden < 2:
            raise ModelError(f"segmentation head hidden={hidden} must be at least 2")
        self.layout = layout
        self.num_classes = num_classes
        self.norm = nn.LayerNorm(dim)
        self.project = nn.Linear(dim, hidden)
        self.decoder = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(hidden, hidden // 2, kernel_size=3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden // 2, num_classes, kernel_size=1),
        )

    @property
    def image_size(self) -> int:
        return self.layout.grid * self.layout.patch_size

    @property
    def num_frames(self) -> int:
        return self.layout.time_steps * self.layout.frames_per_step

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Decode the patch tokens of a batch of clips.

        Args:
            tokens: (B, N, D) backbone tokens, N = ``layout.num_tokens``.

        Returns:
            Logits (B, T, num_classes, S, S): T = time_steps · frames_per_step, S = grid · patch_size.

        Raises:
            ModelError: N differs from the layout's token count.
        """
        layout = self.layout
        if tokens.ndim != 3 or tokens.shape[1] != layout.num_tokens:
            raise ModelError(
                f"segmentation head expects (B, {layout.num_tokens}, D) tokens for {layout}, got {tuple(tokens.shape)}"
            )
        batch = tokens.shape[0]
        patches = tokens.reshape(batch, layout.time_steps, layout.tokens_per_step, -1)[:, :, layout.prefix_tokens :]
        features = self.project(self.norm(patches))  # (B, steps, grid², hidden), patches row-major
        features = features.reshape(batch * layout.time_steps, layout.grid, layout.grid, -1).permute(0, 3, 1, 2)
        logits = self.decoder(features)
        logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        logits = logits.view(batch, layout.time_steps, self.num_classes, self.image_size, self.image_size)
        return logits.repeat_interleave(layout.frames_per_step, dim=1)


def segmentation_loss(
    logits: torch.Tensor, seg_mask: torch.Tensor, has_mask: torch.Tensor, class_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixel-averaged cross-entropy over the clips that have masks, ignoring -1 pixels (frames without a mask).

    Args:
        logits: (B, T, C, S, S) from :class:`SegmentationHead`.
        seg_mask: (B, T, S, S) int64 class ids, -1 = ignored.
        has_mask: (B,) bool, True = the clip has at least one masked frame.
        class_weights: (C,) per-class weights of the cross-entropy (the weighted mean, as ``F.cross_entropy``);
            None = unweighted.

    Returns:
        A scalar; 0 (still attached to ``logits``' graph, so a backward pass works) when no clip has a masked pixel.

    Raises:
        ModelError: the mask's shape does not match the logits'.
    """
    batch, frames, classes, height, width = logits.shape
    if seg_mask.shape != (batch, frames, height, width) or has_mask.shape != (batch,):
        raise ModelError(
            f"seg_mask {tuple(seg_mask.shape)} / has_mask {tuple(has_mask.shape)} do not match segmentation logits "
            f"{tuple(logits.shape)}: expected ({batch}, {frames}, {height}, {width}) and ({batch},)"
        )
    target = torch.where(has_mask[:, None, None, None], seg_mask, torch.full_like(seg_mask, IGNORE_INDEX))
    if not (target != IGNORE_INDEX).any():
        return logits.sum() * 0.0
    per_pixel = logits.reshape(batch * frames, classes, height, width)
    return F.cross_entropy(
        per_pixel, target.reshape(batch * frames, height, width), weight=class_weights, ignore_index=IGNORE_INDEX
    )
