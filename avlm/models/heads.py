"""Trainable heads on top of backbone tokens: a pooler, then a small MLP classifier; and the linear probe.

The attentive pooler is the V-JEPA evaluation probe: learned query tokens cross-attend over all backbone tokens,
so the head can pick the spatio-temporal regions that matter; its attention map is returned for analysis.
"""

from __future__ import annotations

import torch
from torch import nn

from avlm.errors import ConfigError, ModelError
from avlm.models.attention_bias import additive_key_bias

POOLINGS = ("attentive", "mean")


class AttentivePooler(nn.Module):
    """Learned query tokens cross-attending over the tokens (``nn.MultiheadAttention``).

    Args:
        dim: token width D.
        num_queries: number of learned queries; their outputs are concatenated.
        num_heads: attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, num_queries: int = 1, num_heads: int = 4) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ConfigError(f"model.head_heads={num_heads} must be a positive divisor of the feature dim {dim}")
        if num_queries < 1:
            raise ConfigError(f"num_queries={num_queries} must be at least 1")
        self.dim = dim
        self.num_queries = num_queries
        self.num_heads = num_heads
        self.queries = nn.Parameter(torch.empty(1, num_queries, dim))
        nn.init.trunc_normal_(self.queries, std=0.02)
        # Keys/values are normalised: foundation features can have large, uneven magnitudes.
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)

    @property
    def out_dim(self) -> int:
        return self.num_queries * self.dim

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool tokens.

        Args:
            tokens: (B, N, D).
            token_mask: (B, N) bool, True = the queries may attend to the token; the others get an additive bias
                of ``MASKED_KEY_BIAS`` (finite: a row with every token masked stays uniform). None = no bias.

        Returns:
            The pooled features (B, num_queries·D) and the attention probabilities (B, heads, num_queries, N).

        Raises:
            ModelError: a token mask that is not bool of shape (B, N).
        """
        keys = self.norm(tokens)
        batch = tokens.shape[0]
        queries = self.queries.expand(batch, -1, -1)
        attn_mask = None
        if token_mask is not None:
            if token_mask.dtype != torch.bool or token_mask.shape != tokens.shape[:2]:
                raise ModelError(
                    f"pooler token_mask must be a bool tensor of shape {tuple(tokens.shape[:2])}, got "
                    f"{token_mask.dtype} {tuple(token_mask.shape)}"
                )
            # nn.MultiheadAttention takes a per-head mask as (B·heads, queries, N).
            bias = additive_key_bias(token_mask, keys.dtype)[:, None, None, :]
            attn_mask = bias.expand(-1, self.num_heads, self.num_queries, -1).reshape(
                batch * self.num_heads, self.num_queries, -1
            )
        pooled, attention = self.attention(
            queries, keys, keys, need_weights=True, average_attn_weights=False, attn_mask=attn_mask
        )
        return pooled.flatten(1), attention


class MeanPooler(nn.Module):
    """Average over tokens.

    Args:
        dim: token width D.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    @property
    def out_dim(self) -> int:
        return self.dim

    def forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """Pool tokens (B, N, D) into (B, D); there is no attention map.

        Raises:
            ModelError: a token mask is given (a mean has no attention to mask).
        """
        if token_mask is not None:
            raise ModelError("mean pooling has no attention to mask: use pooling 'attentive' for a pooler mask")
        return tokens.mean(dim=1), None


class ClassificationHead(nn.Module):
    """Pooler, then LayerNorm → Linear(hidden) → GELU → Dropout → Linear(num_classes).

    Args:
        in_dim: token width D of the backbone.
        num_classes: number of (multi-label) outputs.
        pooling: ``"attentive"`` or ``"mean"``.
        num_queries: learned queries of the attentive pooler.
        num_heads: heads of the attentive pooler; must divide ``in_dim``.
        hidden_dim: width of the MLP.
        dropout: dropout before the last layer.
    """

    def __init__(
        self,
        in_dim: int,
        num_classes: int,
        *,
        pooling: str = "attentive",
        num_queries: int = 1,
        num_heads: int = 4,
        hidden_dim: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling '{pooling}': use one of {', '.join(POOLINGS)}")
        if num_classes < 1 or hidden_dim < 1:
            raise ConfigError(f"num_classes={num_classes} and hidden_dim={hidden_dim} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"head dropout={dropout} must be in [0, 1)")
        self.pooling = pooling
        self.pooler: AttentivePooler | MeanPooler = (
            AttentivePooler(in_dim, num_queries=num_queries, num_heads=num_heads)
            if pooling == "attentive"
            else MeanPooler(in_dim)
        )
        pooled_dim = self.pooler.out_dim
        self.mlp = nn.Sequential(
            nn.LayerNorm(pooled_dim),
            nn.Linear(pooled_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, num_classes),
        )

    def forward(
        self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Classify.

        Args:
            tokens: (B, N, D) backbone tokens.
            token_mask: (B, N) bool, the tokens the attentive pooler may attend to; None = all.

        Returns:
            Logits (B, num_classes) and the pooler attention (B, heads, num_queries, N), or None for mean pooling.
        """
        pooled, attention = self.pooler(tokens, token_mask)
        return self.mlp(pooled), attention


class LinearProbe(nn.Module):
    """A linear classifier on standardised pooled features, or on an attentive pooling of the tokens.

    Args:
        dim: feature width D.
        num_labels: outputs.
        pooling: ``attentive`` puts a one-query ``AttentivePooler`` (V-JEPA's evaluation probe) before the linear
            layer; otherwise the inputs are already pooled and are standardised with ``feature_mean``/``feature_std``
            (the training split's), so that one learning rate suits every backbone.
        feature_mean / feature_std: (D,) statistics of the pooled training features; None = 0 / 1.
        heads: attention heads of the attentive pooler.
    """

    def __init__(
        self,
        dim: int,
        num_labels: int,
        pooling: str,
        feature_mean: torch.Tensor | None = None,
        feature_std: torch.Tensor | None = None,
        heads: int = 4,
    ) -> None:
        super().__init__()
        self.pooler = AttentivePooler(dim, num_queries=1, num_heads=heads) if pooling == "attentive" else None
        self.register_buffer("feature_mean", feature_mean if feature_mean is not None else torch.zeros(dim))
        self.register_buffer("feature_std", feature_std if feature_std is not None else torch.ones(dim))
        self.linear = nn.Linear(dim, num_labels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_labels) of pooled features (B, D), or of tokens (B, N, D) for the attentive probe."""
        if self.pooler is not None:
            features, _ = self.pooler(features)
        else:
            features = (features - self.feature_mean) / self.feature_std
        return self.linear(features)
