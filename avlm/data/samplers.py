"""Resumable epoch-seeded sampling and class-balanced weights for the imbalanced CVS labels."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes the pair well: (seed, epoch) and (seed + 1, epoch - 1) give unrelated orders.
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFF_FFFF_FFFF_FFFF


class EpochSampler(torch.utils.data.Sampler[int]):
    """Order depends only on (seed, epoch): a resumed run replays exactly the epochs it missed.

    Without weights each epoch is a permutation of ``range(num_samples)``; with weights it draws
    ``num_samples`` indices with replacement, index ``i`` with probability proportional to ``weights[i]``.

    Args:
        num_samples: Dataset length, and the number of indices per epoch.
        seed: Run seed.
        weights: Optional non-negative per-sample weights (e.g. ``class_balanced_weights``).
    """

    def __init__(self, num_samples: int, seed: int, weights: Sequence[float] | None = None):
        if num_samples < 1:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0
        self.weights: torch.Tensor | None = None
        if weights is not None:
            w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
            if w.shape != (self.num_samples,):
                raise ValueError(
                    f"weights must have one value per sample ({self.num_samples}), got shape {tuple(w.shape)}"
                )
            if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
                raise ValueError("weights must be finite, non-negative and not all zero")
            self.weights = w

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        if self.weights is None:
            order = torch.randperm(self.num_samples, generator=generator)
        else:
            order = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.num_samples


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    """Per-sample weights so each criterion's positives and the all-negative group are drawn about equally often.

    With groups ``G_k`` = samples positive for criterion ``k`` and ``G_0`` = all-negative samples, sample ``i``
    gets ``w_i = sum over the groups g that contain i of 1 / |G_g|`` (empty groups are skipped), scaled so the
    weights average 1. Each group then holds total weight 1 before scaling, plus what its members collect from
    the other groups they belong to, so groups are drawn about equally often and samples positive for several
    criteria somewhat more.

    Args:
        labels: (N, K) binary label matrix.

    Returns:
        (N,) float64 weights with mean 1.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, criteria) matrix, got shape {labels.shape}")
    positive = labels > 0.5
    groups = np.concatenate([~positive.any(axis=1, keepdims=True), positive], axis=1)  # (N, K + 1)
    sizes = groups.sum(axis=0)
    inverse = np.divide(1.0, sizes, out=np.zeros(sizes.shape, dtype=np.float64), where=sizes > 0)
    weights = groups @ inverse
    return weights * (len(weights) / weights.sum()) if len(weights) else weights
