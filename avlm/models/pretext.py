"""A short self-supervised pretext that turns a random-init video backbone into a "pretrained" one.

The probe compares a pretrained backbone's frozen features with those of a random-init copy. On the built-in demo
there is no published checkpoint of the tiny architecture, so one is made here, from the unlabelled train clips:

- ``masked_pixels`` (VideoMAE / SimMIM style): a random ``mask_ratio`` of the spatio-temporal patches (one per
  backbone token) is blanked out, the backbone encodes the clip, and a linear head predicts the missing pixels,
  per-patch normalised as in MAE, from the tokens at the blanked positions. The head is thrown away afterwards.

Labels are never read: the pretext takes ``item["pixel_values"]`` from the dataset and nothing else. Running it
with ``steps=0`` leaves the backbone as initialised, which is the honest "no pretraining" control.

Measured on the CVS demo (``vjepa2-tiny``, defaults, 20-35 s on one CPU core): a linear probe on mean-pooled
frozen tokens (AdamW, probe seeds 1-3) goes from val mAP 0.217 at init seed 0 to 0.312; over init seeds 0-3 and
pretext seeds 0-2 the gain is +0.047 on average (smallest +0.008), +0.030 on test (smallest +0.013). A clip-level
contrastive pretext between augmented views was tried and did not beat random init.

The result is stored with ``save_backbone_checkpoint`` (the whole state dict as safetensors) and read back into a
backbone of the same architecture with ``load_backbone_checkpoint``, which refuses any mismatch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from avlm.errors import ConfigError, ModelError, TrainingError
from avlm.models.backbones import VideoBackbone

logger = logging.getLogger(__name__)

PRETEXT_OBJECTIVES = ("masked_pixels",)
CHECKPOINT_FORMAT = "avlm-backbone"
# Losses of this many first / last steps are averaged for the figures (single steps are noisy).
_LOSS_WINDOW = 10
_NAMED_IN_ERROR = 5


@dataclasses.dataclass
class PretextConfig:
    """How the backbone is pretrained on unlabelled clips.

    The defaults are the measured recipe for ``vjepa2-tiny`` on the CVS demo (20-30 s on one CPU core).

    Attributes:
        objective: the pretext task; ``masked_pixels`` is the only one (see the module docstring).
        steps: optimizer steps; 0 skips the pretext and leaves the backbone untouched (the control that must fail).
        batch_size: clips per step (fewer if the dataset is smaller).
        lr: peak AdamW learning rate, reached after ``warmup_steps`` and followed by a cosine decay to 0.
        warmup_steps: linear warm-up steps (all of them when ``steps`` is smaller).
        weight_decay: AdamW weight decay of the weight matrices (biases and norms are not decayed).
        mask_ratio: fraction of the patches blanked in each clip, strictly between 0 and 1.
        normalize_targets: predict each patch's pixels standardised by their own mean and std (MAE's
            ``norm_pix_loss``), so the loss weighs texture and colour edges rather than overall brightness.
        seed: seed of the head's initialisation, the clip order and the masks; the same seed gives the same weights.
        cache_clips: keep decoded clips in memory after their first use (the demo's 1,076 train clips take
            53 MB); turn off for large datasets.
    """

    objective: Literal["masked_pixels"] = "masked_pixels"
    steps: int = 600
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 30
    weight_decay: float = 0.05
    mask_ratio: float = 0.5
    normalize_targets: bool = True
    seed: int = 0
    cache_clips: bool = True

    def __post_init__(self) -> None:
        if self.objective not in PRETEXT_OBJECTIVES:
            raise ConfigError(
                f"config key 'pretext.objective' must be one of {list(PRETEXT_OBJECTIVES)}, got {self.objective!r}"
            )
        for key in ("steps", "batch_size", "warmup_steps", "seed"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"config key 'pretext.{key}' must be an integer, got {value!r}")
        if self.steps < 0:
            raise ConfigError(f"config key 'pretext.steps' must be >= 0 (0 skips the pretext), got {self.steps}")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'pretext.batch_size' must be >= 1, got {self.batch_size}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'pretext.warmup_steps' must be >= 0, got {self.warmup_steps}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"config key 'pretext.lr' must be a positive number, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and math.isfinite(self.weight_decay)) or (
            self.weight_decay < 0
        ):
            raise ConfigError(f"config key 'pretext.weight_decay' must be >= 0, got {self.weight_decay!r}")
        if not (isinstance(self.mask_ratio, (int, float)) and 0 < self.mask_ratio < 1):
            raise ConfigError(
                f"config key 'pretext.mask_ratio' must be strictly between 0 and 1, got {self.mask_ratio!r}"
            )
        if not isinstance(self.normalize_targets, bool):
            raise ConfigError(
                f"config key 'pretext.normalize_targets' must be true/false, got {self.normalize_targets!r}"
            )
        if not isinstance(self.cache_clips, bool):
            raise ConfigError(f"config key 'pretext.cache_clips' must be true/false, got {self.cache_clips!r}")


@dataclasses.dataclass(frozen=True)
class PatchGrid:
    """How the backbone's tokens tile a clip: token k covers frames of one tubelet and one square patch.

    Tokens are ordered (time, row, column), the order of V-JEPA 2's Conv3d patch embedding.
    """

    time: int
    side: int
    frames_per_token: int
    patch: int

    @property
    def num_tokens(self) -> int:
        return self.time * self.side * self.side

    @property
    def pixels_per_token(self) -> int:
        return self.frames_per_token * self.patch * self.patch * 3

    def patchify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, S, S) → (B, N, pixels_per_token), token order as the backbone's."""
        batch = pixel_values.shape[0]
        x = pixel_values.reshape(
            batch, self.time, self.frames_per_token, 3, self.side, self.patch, self.side, self.patch
        )
        return x.permute(0, 1, 4, 6, 2, 5, 7, 3).reshape(batch, self.num_tokens, self.pixels_per_token)

    def pixel_mask(self, token_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) token mask → (B, T, 1, S, S) pixel mask covering each masked token's tubelet and patch."""
        batch = token_mask.shape[0]
        mask = token_mask.view(batch, self.time, 1, 1, self.side, 1, self.side, 1)
        mask = mask.expand(batch, self.time, self.frames_per_token, 1, self.side, self.patch, self.side, self.patch)
        return mask.reshape(batch, self.time * self.frames_per_token, 1, self.side * self.patch, self.side * self.patch)


def token_patch_grid(backbone: VideoBackbone, purpose: str) -> PatchGrid:
    """The token grid of a backbone with one token per spatio-temporal patch; ModelError for any other.

    Args:
        backbone: the backbone.
        purpose: what needs the grid, named in the error (e.g. ``pretext objective 'masked_pixels'``).
    """
    config = getattr(backbone.base_model(), "config", None)
    patch = getattr(config, "patch_size", None)
    frames, size = backbone.num_frames, backbone.image_size
    with torch.no_grad():
        probe_clip = torch.zeros(1, frames, 3, size, size, device=_device_of(backbone))
        num_tokens = backbone(probe_clip).tokens.shape[1]
    side = size // patch if isinstance(patch, int) and patch > 0 and size % patch == 0 else 0
    time_steps = num_tokens // (side * side) if side else 0
    if not time_steps or time_steps * side * side != num_tokens or frames % time_steps:
        raise ModelError(
            f"{purpose} needs a backbone with one token per spatio-temporal patch (e.g. "
            f"vjepa2-tiny); backbone '{backbone.name}' gives {num_tokens} tokens for {frames} frames of "
            f"{size}x{size} with patch size {patch}"
        )
    return PatchGrid(time=time_steps, side=side, frames_per_token=frames // time_steps, patch=patch)


def _device_of(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for the block (the head's initialisation) and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _UnlabelledClips:
    """The clips of a dataset, ``item["pixel_values"]`` only, drawn in shuffled epochs; optionally kept in memory."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, seed: int, cache: bool) -> None:
        self.dataset = dataset
        self.size = len(dataset)
        if self.size == 0:
            raise ModelError("the pretext needs at least one clip, got an empty dataset")
        self.batch_size = min(batch_size, self.size)
        self.generator = torch.Generator().manual_seed(seed)
        self.cache: dict[int, torch.Tensor] | None = {} if cache else None
        self.order = torch.empty(0, dtype=torch.long)

    def clip(self, index: int) -> torch.Tensor:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        # The only field read: the labels stay unseen, whatever the dataset holds.
        pixels = self.dataset[index]["pixel_values"]
        if self.cache is not None:
            self.cache[index] = pixels
        return pixels

    def next_batch(self) -> torch.Tensor:
        if len(self.order) < self.batch_size:
            # A fresh shuffle once fewer than a batch remain, so no clip repeats within a batch.
            self.order = torch.randperm(self.size, generator=self.generator)
        indices, self.order = self.order[: self.batch_size], self.order[self.batch_size :]
        return torch.stack([self.clip(int(i)) for i in indices])


def pretrain_backbone(
    backbone: VideoBackbone, dataset: torch.utils.data.Dataset, cfg: PretextConfig, *, device: Any = "cpu"
) -> dict[str, Any]:
    """Train the backbone in place with the self-supervised pretext on unlabelled clips.

    The backbone is moved to ``device`` and stays there, in the train/eval mode it had before. Only parameters with
    ``requires_grad`` train; the pretext head is discarded. Afterwards ``backbone.fingerprint()`` names the new
    weights, so feature caches never mix them up with the random-init ones.

    Args:
        backbone: the backbone to pretrain, e.g. ``build_backbone("vjepa2-tiny", init_seed=0)``.
        dataset: items are mappings with ``pixel_values`` (T, 3, S, S) normalised as the backbone expects
            (``ClipDataset``, ``ProbeClipDataset``); nothing else of an item is read.
        cfg: the pretext settings.
        device: where to train.

    Returns:
        Figures for logging: ``objective``, ``steps``, ``clips`` (dataset size), ``seconds`` (wall time),
        ``loss_first`` / ``loss_last`` (mean loss of the first / last up to 10 steps; NaN when ``steps`` is 0) and
        ``losses`` (one float per step).

    Raises:
        ModelError: the backbone has no trainable parameter, or its tokens do not tile the clip (``masked_pixels``).
        TrainingError: the loss became non-finite.
    """
    started = time.perf_counter()
    figures: dict[str, Any] = {
        "objective": cfg.objective,
        "steps": cfg.steps,
        "clips": len(dataset),
        "loss_first": math.nan,
        "loss_last": math.nan,
        "losses": [],
    }
    if cfg.steps == 0:
        logger.info("pretext skipped (steps=0): backbone '%s' keeps its initial weights", backbone.name)
        figures["seconds"] = time.perf_counter() - started
        return figures

    backbone.to(device)
    parameters = [p for p in backbone.parameters() if p.requires_grad]
    if not parameters:
        raise ModelError(f"backbone '{backbone.name}' has no trainable parameters to pretrain")
    grid = token_patch_grid(backbone, f"pretext objective '{cfg.objective}'")
    with _seeded(cfg.seed):
        pixel_head = nn.Linear(backbone.feature_dim, grid.pixels_per_token).to(device)
    clips = _UnlabelledClips(dataset, cfg.batch_size, cfg.seed, cfg.cache_clips)
    masks = torch.Generator().manual_seed(cfg.seed + 1)
    num_masked = min(grid.num_tokens - 1, max(1, round(cfg.mask_ratio * grid.num_tokens)))

    trained = [*parameters, *pixel_head.parameters()]
    decayed = [p for p in trained if p.ndim >= 2]
    optimizer = torch.optim.AdamW(
        [{"params": decayed, "weight_decay": cfg.weight_decay}, {"params": [p for p in trained if p.ndim < 2]}],
        lr=cfg.lr,
        weight_decay=0.0,
    )
    schedule = get_cosine_schedule_with_warmup(optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps)

    was_training = backbone.training
    backbone.train()
    losses: list[float] = []
    try:
        progress = tqdm(range(cfg.steps), desc=f"pretext {cfg.objective}", leave=False)
        for step in progress:
            pixels = clips.next_batch().to(device)
            batch = pixels.shape[0]
            order = torch.rand(batch, grid.num_tokens, generator=masks).argsort(dim=1)
            token_mask = torch.zeros(batch, grid.num_tokens, dtype=torch.bool)
            token_mask.scatter_(1, order[:, :num_masked], True)
            token_mask = token_mask.to(device)
            # Normalised pixels are zero at the dataset mean colour: a blanked patch carries no content.
            tokens = backbone(pixels.masked_fill(grid.pixel_mask(token_mask), 0.0)).tokens
            targets = grid.patchify(pixels)
            if cfg.normalize_targets:
                targets = (targets - targets.mean(-1, keepdim=True)) / (targets.var(-1, keepdim=True) + 1e-6).sqrt()
            per_token = (pixel_head(tokens) - targets).pow(2).mean(-1)
            loss = per_token[token_mask].mean()
            if not torch.isfinite(loss):
                raise TrainingError(f"pretext loss is {loss.item()} at step {step}; lower pretext.lr (now {cfg.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
            progress.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    finally:
        backbone.train(was_training)
        optimizer.zero_grad(set_to_none=True)

    _record_weights(backbone)
    window = min(_LOSS_WINDOW, len(losses))
    figures.update(
        loss_first=sum(losses[:window]) / window,
        loss_last=sum(losses[-window:]) / window,
        losses=losses,
        seconds=time.perf_counter() - started,
    )
    logger.info(
        "pretext %s on '%s': %d steps over %d clips, loss %.4f -> %.4f, %.1f s",
        cfg.objective,
        backbone.name,
        cfg.steps,
        len(dataset),
        figures["loss_first"],
        figures["loss_last"],
        figures["seconds"],
    )
    return figures


def weights_digest(module: nn.Module) -> str:
    """A sha256 hex digest of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}\x00{tensor.dtype}\x00{tuple(tensor.shape)}\x00".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _record_weights(backbone: VideoBackbone) -> None:
    """Make ``fingerprint()`` name the current weights instead of the random init they started from.

    The fingerprint keys the feature cache; left as it was, a pretrained backbone would read the cached tokens
    of its random-init copy. The weights decide the tokens, so their digest replaces the init seed.
    """
    backbone.identify_weights(weights_digest(backbone))


def save_backbone_checkpoint(backbone: VideoBackbone, path: str | os.PathLike) -> Path:
    """Write the backbone's full state dict as one safetensors file (atomically: a temp file renamed into place).

    Args:
        backbone: the backbone to save.
        path: the ``.safetensors`` file; its folder is created.

    Returns:
        The path written.
    """
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "spec": backbone.name,
        "feature_dim": str(backbone.feature_dim),
        "image_size": str(backbone.image_size),
        "num_frames": str(backbone.num_frames),
        "weights_sha256": weights_digest(backbone),
    }
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("backbone checkpoint written: %s (%d tensors)", path, len(tensors))
    return path


def _named(keys: list[str]) -> str:
    more = f" and {len(keys) - _NAMED_IN_ERROR} more" if len(keys) > _NAMED_IN_ERROR else ""
    return ", ".join(keys[:_NAMED_IN_ERROR]) + more


def load_backbone_checkpoint(backbone: VideoBackbone, path: str | os.PathLike) -> dict[str, str]:
    """Load a ``save_backbone_checkpoint`` file into a backbone of the same architecture, strictly.

    Every tensor of the backbone must be in the file with the same shape, and the file must hold nothing else.
    Afterwards ``backbone.fingerprint()`` names the loaded weights.

    Args:
        backbone: a backbone built from the same spec and sizes as the saved one, e.g.
            ``build_backbone("vjepa2-tiny")``.
        path: the ``.safetensors`` file.

    Returns:
        The file's metadata (spec, sizes and weights digest of the saved backbone; empty for a foreign file).

    Raises:
        ModelError: the file is missing or not safetensors, or its tensors do not match the backbone's (the
            message names a few missing, unexpected and mis-shaped keys, and the file).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelError(f"backbone checkpoint {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            state = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"backbone checkpoint {path} is not a readable safetensors file: {exc}") from exc

    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{name} (file {tuple(state[name].shape)}, backbone {tuple(expected[name].shape)})"
        for name in set(state) & set(expected)
        if state[name].shape != expected[name].shape
    )
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_named(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_named(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_named(mismatched)}")
        saved_as = f" (saved from '{metadata['spec']}')" if "spec" in metadata else ""
        raise ModelError(
            f"backbone checkpoint {path}{saved_as} does not match backbone '{backbone.name}': {'; '.join(problems)}"
        )
    backbone.load_state_dict(state, strict=True)
    _record_weights(backbone)
    return metadata
