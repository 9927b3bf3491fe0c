"""Per-second heads over a sequence of embeddings: (B, T, D) → (B, T, out_dim).

Used by the AVE Stage-1 eventness heads (one logit per second, or one per class) and by the Stage-2 event
localiser (one logit per class per second). Three kinds, from no temporal context to the whole clip:

- ``mlp``: the same 2-layer MLP on every second, independently.
- ``tcn``: a projection, two dilated ``Conv1d`` (dilations 1 and 2, padded to keep the length) with a residual
  connection around them, then a linear read-out; each output sees ``3 · (kernel_size - 1) / 2`` seconds on each side.
- ``bilstm``: one bidirectional LSTM layer, then a linear read-out; each output sees the whole sequence.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from avlm.errors import ConfigError

TEMPORAL_HEADS = ("mlp", "tcn", "bilstm")
TCN_DILATIONS = (1, 2)


class TemporalHead(nn.Module):
    """A per-second read-out with the temporal context of ``kind``.

    Args:
        kind: ``mlp`` | ``tcn`` | ``bilstm`` (see the module docstring).
        in_dim: width D of the input embeddings.
        out_dim: outputs per second.
        hidden: width of the MLP's hidden layer, the TCN's channels, each LSTM direction's state.
        dropout: dropout after each hidden activation (and on the LSTM's outputs).
        kernel_size: TCN kernel size; odd, so that symmetric padding keeps the sequence length.
        config_section: the config section the caller's values came from: errors name the keys
            ``<config_section>.head``, ``.hidden``, ``.dropout`` and ``.kernel_size``.

    Raises:
        ConfigError: unknown kind, ``hidden`` or a width below 1, dropout outside [0, 1), even or non-positive
            kernel size.
    """

    def __init__(
        self,
        kind: Literal["mlp", "tcn", "bilstm"],
        in_dim: int,
        out_dim: int,
        *,
        hidden: int = 64,
        dropout: float = 0.1,
        kernel_size: int = 3,
        config_section: str = "model",
    ) -> None:
        super().__init__()
        key = f"config key '{config_section}"
        if kind not in TEMPORAL_HEADS:
            raise ConfigError(f"{key}.head': unknown temporal head {kind!r}: use one of {', '.join(TEMPORAL_HEADS)}")
        if hidden < 1:
            raise ConfigError(f"{key}.hidden': must be >= 1, got {hidden}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"{key}.dropout': must be in [0, 1), got {dropout}")
        if kind == "tcn" and (kernel_size < 1 or kernel_size % 2 == 0):
            raise ConfigError(f"{key}.kernel_size': must be odd and >= 1 (same-length padding), got {kernel_size}")
        if in_dim < 1 or out_dim < 1:
            raise ConfigError(f"{key}.head': input and output widths must be >= 1, got {in_dim} and {out_dim}")
        self.kind = kind
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.dropout = nn.Dropout(dropout)
        if kind == "mlp":
            self.hidden_layer = nn.Linear(in_dim, hidden)
        elif kind == "tcn":
            self.hidden_layer = nn.Linear(in_dim, hidden)
            self.convs = nn.ModuleList(
                nn.Conv1d(hidden, hidden, kernel_size, padding=d * (kernel_size - 1) // 2, dilation=d)
                for d in TCN_DILATIONS
            )
        else:
            self.lstm = nn.LSTM(in_dim, hidden, num_layers=1, batch_first=True, bidirectional=True)
        self.readout = nn.Linear(2 * hidden if kind == "bilstm" else hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map embeddings (B, T, D) to per-second outputs (B, T, out_dim)."""
        if x.ndim != 3 or x.shape[-1] != self.in_dim:
            raise ValueError(f"TemporalHead expects (B, T, {self.in_dim}) inputs, got {tuple(x.shape)}")
        if self.kind == "bilstm":
            hidden, _ = self.lstm(x)
            return self.readout(self.dropout(hidden))
        hidden = self.dropout(nn.functional.gelu(self.hidden_layer(x)))
        if self.kind == "tcn":
            # Conv1d wants (B, channels, T); the residual keeps each second's own features next to its context.
            h = hidden.transpose(1, 2)
            context = h
            for conv in self.convs:
                context = self.dropout(nn.functional.gelu(conv(context)))
            hidden = (h + context).transpose(1, 2)
        return self.readout(hidden)
