"""The AVE event localiser: per-second classes from the allocated visual embeddings and the audio embeddings."""

from __future__ import annotations

import torch
from torch import nn

from avlm.models.temporal import TemporalHead


class EventLocaliser(nn.Module):
    """Each second's visual embedding projected by the projection of the resolution it was seen at (the same
    backbone's embedding at 80 px and at 176 px are vectors of different spaces; one shared projection was measured
    to read a high-resolution class cue far worse on the demo), the audio embedding projected, both concatenated,
    then a temporal head → (B, T, num_classes) logits. Inputs are expected standardised (the recipe does it).

    Args:
        visual_dim / audio_dim: widths of the cached embeddings.
        num_classes: event classes + background.
        num_resolutions: visual projections, one per resolution the allocation may use (1 = one shared).
        head: mlp | tcn | bilstm (:class:`avlm.models.temporal.TemporalHead`).
        hidden: projection and head width.
        dropout: dropout of the head.
    """

    def __init__(
        self,
        visual_dim: int,
        audio_dim: int,
        num_classes: int,
        *,
        num_resolutions: int = 1,
        head: str = "mlp",
        hidden: int = 64,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.visual = nn.ModuleList(nn.Linear(visual_dim, hidden) for _ in range(max(num_resolutions, 1)))
        self.audio = nn.Linear(audio_dim, hidden)
        self.temporal = TemporalHead(
            head, 2 * hidden, num_classes, hidden=hidden, dropout=dropout, config_section="localiser"
        )

    def forward(self, visual: torch.Tensor, audio: torch.Tensor, resolution: torch.Tensor) -> torch.Tensor:
        """``visual`` (B, T, Dv), ``audio`` (B, T, Da), ``resolution`` (B, T) projection indices → logits (B, T, C)."""
        if len(self.visual) == 1:
            seen = self.visual[0](visual)
        else:
            every = torch.stack([project(visual) for project in self.visual], dim=-2)  # (B, T, R, H)
            index = resolution[..., None, None].expand(*resolution.shape, 1, every.shape[-1])
            seen = every.gather(-2, index).squeeze(-2)
        return self.temporal(torch.cat([seen, self.audio(audio)], dim=-1))
