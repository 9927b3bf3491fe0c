"""Frozen features for the probes: the tokens of both backbones per split, pooled as each probe needs them.

The tokens are extracted once per backbone and split (cached on disk, keyed on the weights, the input pipeline
and the manifest); a probe then sees them pooled one of four ways (:data:`POOLINGS`), on a per-seed subset of the
clips (:func:`seed_subset`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from avlm.data import ClipManifest
from avlm.errors import ConfigError
from avlm.features import cached_tokens
from avlm.models import VideoBackbone

POOLINGS = ("mean_all", "mean_excluding_cls", "mean_visible", "attentive")


def pooling_unavailable(pooling: str, backbone: VideoBackbone, masked: bool) -> str | None:
    """Why ``pooling`` cannot be used with this backbone and input, or None if it can.

    Args:
        pooling: one of :data:`POOLINGS`.
        backbone: the probed backbone (its CLS/register tokens decide ``mean_excluding_cls``).
        masked: whether the inputs are masked (``mean_visible`` needs it).
    """
    if pooling == "mean_excluding_cls" and backbone.prefix_token_mask() is None:
        return f"backbone '{backbone.name}' has no CLS or register token"
    if pooling == "mean_visible" and not masked:
        return "inputs are not masked (data.input_mask_ratio is 0)"
    return None


def available_poolings(requested: list[str], backbone: VideoBackbone, masked: bool) -> tuple[list[str], dict[str, str]]:
    """The requested poolings this backbone and input can serve, and the reason for each one skipped.

    Raises:
        ConfigError: none of ``requested`` applies (the message names ``grid.poolings`` and every reason).
    """
    skipped = {p: reason for p in requested if (reason := pooling_unavailable(p, backbone, masked))}
    kept = [p for p in requested if p not in skipped]
    if not kept:
        raise ConfigError(f"config key 'grid.poolings': none of {requested} applies here ({skipped})")
    return kept, skipped


def pooled_features(
    tokens: torch.Tensor, pooling: str, visible: torch.Tensor | None, prefix: torch.Tensor | None
) -> torch.Tensor:
    """(N, L, D) tokens → what the probe sees: (N, D) for the mean poolings, the tokens for ``attentive``.

    Args:
        tokens: (N, L, D) frozen tokens.
        pooling: one of :data:`POOLINGS`.
        visible: (N, L) bool visible tokens, for ``mean_visible``.
        prefix: (L,) bool CLS/register tokens, for ``mean_excluding_cls``.
    """
    if pooling == "mean_all":
        return tokens.mean(dim=1)
    if pooling == "mean_excluding_cls":
        return tokens[:, ~prefix].mean(dim=1)
    if pooling == "mean_visible":
        weights = visible.to(tokens.dtype).unsqueeze(-1)
        return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    return tokens


def seed_subset(size: int, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of a random subset of ``limit`` of ``size`` items drawn with ``seed`` (all when 0 or more)."""
    if limit == 0 or limit >= size:
        return np.arange(size)
    return np.sort(np.random.default_rng(seed).choice(size, limit, replace=False))


@dataclasses.dataclass
class FrozenFeatures:
    """The frozen tokens of both backbones for every split, and what each pooling needs besides them.

    Attributes:
        tokens: backbone name (``pretrained``/``random``) → split → (N, L, D) tokens in manifest order.
        labels: split → (N, K) float labels in manifest order.
        visible: split → (N, L) bool visible tokens (masked inputs only).
        prefix: (L,) bool CLS/register tokens, or None.
    """

    tokens: dict[str, dict[str, torch.Tensor]]
    labels: dict[str, torch.Tensor]
    visible: dict[str, torch.Tensor]
    prefix: torch.Tensor | None

    def inputs(self, backbone: str, pooling: str, subsets: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Split → the probe inputs of the clips ``subsets[split]`` (indices into the split)."""
        return {
            split: pooled_features(self.tokens[backbone][split], pooling, self.visible.get(split), self.prefix)[
                torch.as_tensor(indices)
            ]
            for split, indices in subsets.items()
        }

    def targets(self, subsets: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Split → the labels of the clips ``subsets[split]``."""
        return {split: self.labels[split][torch.as_tensor(indices)] for split, indices in subsets.items()}


def extract_frozen_features(
    backbones: Mapping[str, VideoBackbone],
    clips: Mapping[str, torch.utils.data.Dataset],
    manifest: ClipManifest,
    *,
    clip_frames: int,
    input_mask: tuple[float, int] | None,
    cache_dir: Path,
    accelerator: Accelerator,
) -> FrozenFeatures:
    """The tokens of every backbone on every split of ``clips``, from the feature cache or computed into it.

    Args:
        backbones: name → frozen backbone; they share one architecture (the CLS/register mask is the first one's).
        clips: split → the clips of ``manifest.split(split)``, in its order, prepared as the backbones expect;
            ``avlm.data.masked_inputs.MaskedInputs`` when ``input_mask`` is given.
        manifest: the clips' manifest (labels, and its per-split hash in the cache key).
        clip_frames: frames per clip (in the cache key).
        input_mask: ``(mask ratio, mask seed)`` of masked inputs, or None.
        cache_dir: the feature cache's folder.
        accelerator: the run's accelerator (the main process fills the cache, the others wait and read it).
    """
    tokens = {
        name: {
            split: cached_tokens(
                backbone,
                dataset,
                key_parts={
                    "backbone": backbone.fingerprint(),
                    "image_size": backbone.image_size,
                    "mean": backbone.mean,
                    "std": backbone.std,
                    "clip_frames": clip_frames,
                    "manifest": manifest.manifest_hash(split),
                    "input_mask": list(input_mask) if input_mask else None,
                },
                cache_dir=cache_dir,
                accelerator=accelerator,
                batch_size=64,
            )[0]
            for split, dataset in clips.items()
        }
        for name, backbone in backbones.items()
    }
    return FrozenFeatures(
        tokens=tokens,
        labels={s: torch.as_tensor(manifest.label_matrix(s), dtype=torch.float32) for s in clips},
        visible={s: torch.stack([clips[s].visible(c.sample_id) for c in manifest.split(s)]) for s in clips}
        if input_mask
        else {},
        prefix=next(iter(backbones.values())).prefix_token_mask(),
    )
