"""Per-second AVE features, computed once by frozen encoders and cached on disk for every later cell and seed.

For each clip and each of its 10 seconds:

- a visual embedding at each resolution ``r`` of ``features.resolutions``: the second's frame (the jpg of the
  extracted layout) resized to r×r (bilinear, antialiased, no crop), normalised with the backbone's mean/std and
  encoded by a frozen image backbone (:class:`FrameEncoder`); it costs ``(r // patch_size) ** 2`` visual tokens.
  A separate Stage-1 backbone may encode the same frames for the eventness scorers (the study's
  ``STAGE1_CACHES_DIR``);
- an audio embedding: the mean over that second of the tokens a frozen audio encoder
  (:func:`avlm.models.captioner.build_audio_encoder`) gives for the whole 10 s clip, and the RMS energy of the
  second's waveform.

Cache (``features.cache_dir``, default ``default_cache_dir() / "ave_features"``): one safetensors file per
(backbone, resolution) and one for audio, each named by :func:`avlm.features.cache_key` of what its values depend
on (the encoder's fingerprint, the preprocessing, the resolution, and a hash of the sorted video ids with each
frame's / wav's size and mtime) and storing that key, so that a stale file is never read: a file of another key
(or a corrupt one) is refused and rebuilt. Rows follow the sorted video ids (:meth:`AveFeatures.index`). Files
are written to a temporary name and renamed, and builders of the same data take turns on a file lock, so racing
processes end with one valid file and the later one reads it instead of encoding again. Encoder fingerprints are
computed from the spec and the model config without loading weights, and each image backbone's patch size,
width, mean/std and pooling are kept in a small card next to the entries: a call whose entries all exist builds
no encoder at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import filelock
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from avlm.data.ave import SECONDS, audio_path, frame_path, missing_extracted, read_clip_audio, read_clip_frames
from avlm.data.generated import default_cache_dir
from avlm.errors import ConfigError, DataError, ModelError
from avlm.features import cache_key
from avlm.models.backbones import _TIMM_TINY_KWARGS, _seeded
from avlm.models.captioner import _AUDIO_TINY_CONFIG, AUDIO_SAMPLING_RATE, _config_identity, build_audio_encoder

logger = logging.getLogger(__name__)

VIT_TINY = "vit-tiny"
# The tiny ViT of the demo and the tests: timm-tiny's width and depth with patch 8; dynamic_img_size resamples
# its 14×14 position table (base 112 px) to each resolution's grid.
_VIT_TINY_MODEL = "vit_tiny_patch16_224"
_VIT_TINY_KWARGS = {**_TIMM_TINY_KWARGS, "img_size": 112}
_FRAME_SPEC_HELP = "use vit-tiny, timm:<model name> or hf:<HF id or local path>"
# Audio encoders whose tokens are not a time sequence (spectrogram patches over frequency × time): a per-second
# mean of them would mix seconds.
_NOT_TIME_ORDERED = ("clap", "clap_audio_model", "audio-spectrogram-transformer")
# Bump when the layout or the meaning of the stored values changes: it is part of every key.
FORMAT_VERSION = 1
PREPROCESSING = (
    "jpg -> RGB [0, 1] -> r x r (torch bilinear, antialias, align_corners False; no crop) -> (x - mean) / std"
)


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AveFeaturesConfig:
    """The ``features`` section of the AVE recipe.

    Attributes:
        visual_backbone: Stage-2 image backbone: ``vit-tiny`` (a random 2-block timm ViT, patch 8, width 48),
            ``timm:<model name>`` or ``hf:<HF id or local path>`` (CLIP / SigLIP / DINOv2 vision towers).
        stage1_visual_backbone: Another backbone for Stage-1's visual inputs; empty = ``visual_backbone``.
        audio_encoder: ``audio-tiny`` or ``hf:<HF id or path>`` (:func:`~avlm.models.captioner.build_audio_encoder`).
        resolutions: Square input sizes in pixels, each a multiple of the backbones' patch sizes.
        pretrained: ``timm:`` / ``hf:`` backbones load their published weights (the tiny ones are always random).
        init_seed: Seed of every random initialisation (tiny encoders, ``pretrained: false``).
        batch_size: Frames per encoder forward (audio: clips of 10 s per forward = batch_size // 10, at least 1).
        cache_dir: Folder of the cache; empty = ``default_cache_dir() / "ave_features"``.
    """

    visual_backbone: str = VIT_TINY
    stage1_visual_backbone: str = ""
    audio_encoder: str = "audio-tiny"
    resolutions: list[int] = dataclasses.field(default_factory=lambda: [56, 80, 112, 176])
    pretrained: bool = True
    init_seed: int = 0
    batch_size: int = 64
    cache_dir: str = ""

    def __post_init__(self) -> None:
        for key in ("visual_backbone", "stage1_visual_backbone"):
            spec = getattr(self, key)
            if key == "stage1_visual_backbone" and spec == "":
                continue
            try:
                _parse_frame_spec(spec)
            except ModelError as exc:
                raise ConfigError(f"config key 'features.{key}': {exc}") from None
        if self.audio_encoder != "audio-tiny" and not (
            self.audio_encoder.startswith("hf:") and self.audio_encoder[len("hf:") :]
        ):
            raise ConfigError(
                f"config key 'features.audio_encoder': unknown audio encoder '{self.audio_encoder}', use audio-tiny "
                "or hf:<HF id or path>"
            )
        resolutions = list(self.resolutions)
        if not resolutions:
            raise ConfigError("config key 'features.resolutions': give at least one resolution")
        bad = [r for r in resolutions if isinstance(r, bool) or not isinstance(r, int) or r < 1]
        if bad:
            raise ConfigError(f"config key 'features.resolutions': resolutions must be positive integers, got {bad}")
        if len(set(resolutions)) != len(resolutions):
            raise ConfigError(f"config key 'features.resolutions': {resolutions} lists a resolution twice")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'features.batch_size': must be >= 1, got {self.batch_size}")


def tokens_for_resolution(resolution: int, patch_size: int) -> int:
    """The visual tokens one frame costs at ``resolution``: ``(resolution // patch_size) ** 2``.

    Raises:
        ConfigError: ``resolution`` is not a positive multiple of ``patch_size``.
    """
    if resolution < patch_size or resolution % patch_size:
        raise ConfigError(
            f"config key 'features.resolutions': {resolution} px is not a multiple of the patch size {patch_size} "
            f"(use e.g. {max(1, round(resolution / patch_size)) * patch_size})"
        )
    return (resolution // patch_size) ** 2


# ----------------------------------------------------------------------------------------------------------------
# Frozen frame encoders
# ----------------------------------------------------------------------------------------------------------------
class FrameEncoder(nn.Module):
    """A frozen image backbone behind one interface: normalised (B, 3, r, r) frames in, one (B, D) embedding out.

    The embedding is the model's own pooled output: the CLS token for ViTs that have one (timm ``global_pool``
    ``token``; CLIP and DINOv2's ``pooler_output``, the layer-normed CLS), else the model's pooling (timm
    ``avg`` / ``map``; SigLIP's attention-pooling head). :attr:`pooling` says which.

    Attributes:
        name: The spec it was built from.
        patch_size: Pixels per patch side; a resolution r costs ``(r // patch_size) ** 2`` tokens.
        feature_dim: D.
        mean / std: Per-channel normalisation the weights expect.
        pooling: ``cls``, ``avg``, ``map`` or ``mean`` (the mean of the last hidden states of a model without a
            pooled output).
        model: The timm or transformers module.
    """

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        family: str,
        patch_size: int,
        feature_dim: int,
        mean: Sequence[float],
        std: Sequence[float],
        pooling: str,
        identity: Mapping[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.family = family
        self.patch_size = int(patch_size)
        self.feature_dim = int(feature_dim)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pooling = pooling
        self._identity = dict(identity)
        self._hf_kwargs = {}
        if family == "hf" and "interpolate_pos_encoding" in inspect.signature(model.forward).parameters:
            # CLIP / SigLIP keep a fixed position table; DINOv2 always interpolates and takes no such argument.
            self._hf_kwargs["interpolate_pos_encoding"] = True

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Embed a batch of square frames.

        Args:
            pixels: (B, 3, r, r), normalised with :attr:`mean` / :attr:`std`, r a multiple of :attr:`patch_size`.

        Returns:
            (B, D) float embeddings.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3]:
            raise ModelError(f"frame encoder '{self.name}' expects (B, 3, r, r) frames, got {tuple(pixels.shape)}")
        if pixels.shape[-1] % self.patch_size:
            raise ModelError(
                f"frame encoder '{self.name}': {pixels.shape[-1]} px is not a multiple of its patch size "
                f"{self.patch_size}"
            )
        if self.family == "hf":
            out = self.model(pixel_values=pixels, **self._hf_kwargs)
            pooled = getattr(out, "pooler_output", None)
            return out.last_hidden_state.mean(dim=1) if pooled is None else pooled
        return self.model.forward_head(self.model.forward_features(pixels), pre_logits=True)

    def fingerprint(self) -> str:
        """A stable id for cache keys, computed from the spec and config only (:func:`frame_encoder_fingerprint`)."""
        return _fingerprint(self._identity)

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, patch_size={self.patch_size}, feature_dim={self.feature_dim}, pooling={self.pooling}"
        )


def _parse_frame_spec(spec: str) -> tuple[str, str]:
    """(family, model name or path) of a frame-encoder spec: ``vit-tiny``, ``timm`` or ``hf``."""
    if spec == VIT_TINY:
        return VIT_TINY, _VIT_TINY_MODEL
    for family in ("timm", "hf"):
        prefix = f"{family}:"
        if isinstance(spec, str) and spec.startswith(prefix) and spec[len(prefix) :].strip():
            return family, spec[len(prefix) :].strip()
    raise ModelError(f"unknown frame encoder {spec!r}: {_FRAME_SPEC_HELP}")


def _timm_kwargs(family: str) -> dict[str, Any]:
    extra = _VIT_TINY_KWARGS if family == VIT_TINY else {}
    return {"num_classes": 0, "dynamic_img_size": True, **extra}


def _hf_config(spec: str, source: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the config of frame encoder '{spec}' from '{source}': {exc}") from exc


def frame_encoder_identity(spec: str, *, pretrained: bool = True, init_seed: int = 0) -> dict[str, Any]:
    """What identifies a frame encoder's weights, without loading them: spec, config, revision, seed if random.

    Raises:
        ModelError: Unknown spec, or an ``hf:`` config that cannot be read.
    """
    family, name = _parse_frame_spec(spec)
    random_init = family == VIT_TINY or not pretrained
    identity: dict[str, Any] = {"spec": spec, "pretrained": not random_init}
    if family == "hf":
        import transformers

        config = _hf_config(spec, name)
        identity.update(config=_config_identity(config), revision=getattr(config, "_commit_hash", None))
        library = f"transformers {transformers.__version__}"
    else:
        import timm

        identity.update(model_name=name, kwargs=_timm_kwargs(family))
        if not random_init:
            published = timm.models.get_pretrained_cfg(name)
            identity["pretrained_cfg"] = published.to_dict() if published is not None else None
        library = f"timm {timm.__version__}"
    if random_init:
        # A random init is only reproducible with the same seed, library and torch RNG.
        identity.update(init_seed=init_seed, library=library, torch=torch.__version__)
    return identity


def frame_encoder_fingerprint(spec: str, *, pretrained: bool = True, init_seed: int = 0) -> str:
    """``build_frame_encoder(spec, ...).fingerprint()`` without building the encoder (no weights are loaded)."""
    return _fingerprint(frame_encoder_identity(spec, pretrained=pretrained, init_seed=init_seed))


def _fingerprint(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(identity), sort_keys=True, default=str).encode("utf-8")).hexdigest()


def build_frame_encoder(spec: str, *, pretrained: bool = True, init_seed: int = 0) -> FrameEncoder:
    """Build a frozen frame encoder from its spec.

    Args:
        spec: ``vit-tiny``; ``timm:<name>`` (``timm.create_model(name, num_classes=0, dynamic_img_size=True)``; a
            model that takes no ``dynamic_img_size``, e.g. a CNN, runs at any size without it); ``hf:<id or path>``
            (``AutoModel``, its vision tower for CLIP / SigLIP, and its ``AutoImageProcessor``'s mean/std).
        pretrained: Load the published weights (``timm:`` / ``hf:``); ``vit-tiny`` is always random.
        init_seed: Seed of a random initialisation; the caller's RNG is left untouched.

    Returns:
        The encoder in eval mode with every parameter frozen.

    Raises:
        ModelError: Unknown spec, or weights / config / image processor that cannot be loaded.
    """
    identity = frame_encoder_identity(spec, pretrained=pretrained, init_seed=init_seed)
    family, name = _parse_frame_spec(spec)
    if family == "hf":
        encoder = _build_hf(spec, name, pretrained=identity["pretrained"], init_seed=init_seed, identity=identity)
    else:
        encoder = _build_timm(
            spec, name, family, pretrained=identity["pretrained"], init_seed=init_seed, identity=identity
        )
    encoder.model.requires_grad_(False)
    return encoder.eval()


def _build_timm(
    spec: str, name: str, family: str, *, pretrained: bool, init_seed: int, identity: dict[str, Any]
) -> FrameEncoder:
    import timm
    from timm.data import resolve_data_config

    kwargs = _timm_kwargs(family)
    try:
        with _seeded(init_seed):
            try:
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
            except TypeError:
                # CNNs take no dynamic_img_size: they run at any resolution anyway.
                kwargs.pop("dynamic_img_size")
                model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as exc:  # unknown model name, or weights that cannot be fetched
        raise ModelError(f"could not build frame encoder '{spec}': {exc}") from exc
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None:
        patch = patch_embed.patch_size
    else:  # a CNN: a "token" is one cell of its last feature map
        patch = (getattr(model, "feature_info", None) or [{}])[-1].get("reduction")
        if patch is None:
            raise ModelError(f"frame encoder '{spec}' has neither a patch embedding nor a known stride")
    patch = patch if isinstance(patch, int) else patch[0]
    pool = getattr(model, "global_pool", None)
    pooling = pool if isinstance(pool, str) else str(getattr(pool, "pool_type", "") or "model head")
    data_config = resolve_data_config({}, model=model)
    return FrameEncoder(
        name=spec,
        model=model,
        family="timm",
        patch_size=patch,
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        mean=data_config["mean"],
        std=data_config["std"],
        pooling="cls" if pooling == "token" else pooling,
        identity=identity,
    )


def _build_hf(spec: str, source: str, *, pretrained: bool, init_seed: int, identity: dict[str, Any]) -> FrameEncoder:
    from transformers import AutoImageProcessor, AutoModel

    try:
        if pretrained:
            # float32 whatever the checkpoint's dtype: the features are cached as float32.
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
        else:
            with _seeded(init_seed):
                model = AutoModel.from_config(_hf_config(spec, source))
        processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load frame encoder '{spec}' from '{source}': {exc}") from exc
    # CLIP / SigLIP checkpoints hold both towers: only the vision tower runs.
    vision = getattr(model, "vision_model", model)
    config = vision.config
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None or not getattr(config, "patch_size", None):
        raise ModelError(f"frame encoder '{spec}': no image_mean/image_std in its processor or no patch_size")
    if getattr(vision, "head", None) is not None:
        pooling = "map"  # SigLIP's multi-head attention pooling
    elif type(vision).__name__.startswith(("CLIP", "Dinov2")):
        pooling = "cls"
    else:
        pooling = "pooler_output"
    return FrameEncoder(
        name=spec,
        model=vision,
        family="hf",
        patch_size=config.patch_size,
        feature_dim=config.hidden_size,
        mean=mean,
        std=std,
        pooling=pooling,
        identity=identity,
    )


def frame_pixels(
    frames: Sequence[Image.Image], resolution: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """Decoded frames as an encoder's input: (B, 3, r, r), resized as :data:`PREPROCESSING` says, normalised."""
    return _normalise(_resize(_float_groups(frames), len(frames), resolution), mean, std)


def _float_groups(frames: Sequence[Image.Image]) -> list[tuple[list[int], torch.Tensor]]:
    """Frames as (B, 3, H, W) floats in [0, 1], one contiguous batch per frame size (resized a batch at a time)."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index, frame in enumerate(frames):
        by_size.setdefault(frame.size, []).append(index)
    groups = []
    for indices in by_size.values():
        array = np.stack([np.asarray(frames[i].convert("RGB")) for i in indices])
        groups.append((indices, torch.from_numpy(array).permute(0, 3, 1, 2).float().div_(255.0).contiguous()))
    return groups


def _resize(groups: Sequence[tuple[list[int], torch.Tensor]], count: int, resolution: int) -> torch.Tensor:
    resized = torch.empty(count, 3, resolution, resolution)
    for indices, pixels in groups:
        resized[indices] = F.interpolate(
            pixels, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )
    return resized


def _normalise(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


# ----------------------------------------------------------------------------------------------------------------
# Audio encoder identity (the fingerprint of build_audio_encoder's result, without loading weights)
# ----------------------------------------------------------------------------------------------------------------
def audio_encoder_fingerprint(spec: str, *, init_seed: int = 0) -> str:
    """``build_audio_encoder(spec, init_seed=...).fingerprint()`` computed from the spec and config only.

    Raises:
        ModelError: Unknown spec, a config / feature extractor that cannot be read, or an encoder whose tokens are
            not a time sequence (CLAP, AST), whose per-second means would mix seconds.
    """
    from transformers import AutoConfig, AutoFeatureExtractor, WavLMConfig

    if spec == "audio-tiny":
        config = WavLMConfig(**_AUDIO_TINY_CONFIG)
        identity = {"config": _config_identity(config), "pretrained": False, "init_seed": init_seed}
        revision, sampling_rate = None, AUDIO_SAMPLING_RATE
    elif spec.startswith("hf:") and spec[len("hf:") :]:
        source = spec[len("hf:") :]
        try:
            config = AutoConfig.from_pretrained(source)
            sampling_rate = AutoFeatureExtractor.from_pretrained(source).sampling_rate
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load audio encoder '{spec}' from '{source}': {exc}") from exc
        identity = {"config": _config_identity(config), "pretrained": True}
        revision = getattr(config, "_commit_hash", None)
    else:
        raise ModelError(f"unknown audio encoder '{spec}': use audio-tiny or hf:<hf id or path>")
    if getattr(config, "model_type", "") in _NOT_TIME_ORDERED:
        raise ModelError(
            f"audio encoder '{spec}' ({config.model_type}) gives spectrogram patches, not a time sequence of "
            "tokens: per-second AVE features need a WavLM / wav2vec 2.0 / HuBERT / Whisper-style encoder"
        )
    payload = {"spec": spec, "revision": revision, "sampling_rate": int(sampling_rate), **identity}
    return _fingerprint(payload)


# ----------------------------------------------------------------------------------------------------------------
# Features and their cache
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AveFeatures:
    """Cached per-second features of a set of clips; rows follow :attr:`video_ids`.

    Attributes:
        video_ids: The clips, sorted, each once.
        visual: Resolution → (N, 10, Dv) float32 embeddings of the Stage-2 backbone.
        stage1_visual: The same from the Stage-1 backbone (the very same tensors when it is not set apart).
        audio: (N, 10, Da) per-second means of the audio encoder's tokens.
        audio_rms: (N, 10) RMS energy of each second's waveform.
        tokens: Resolution → visual tokens one frame costs with the Stage-2 backbone's patch size.
        key: What the cache entries were keyed on (fingerprints, preprocessing, data hashes, entry keys).
    """

    video_ids: list[str]
    visual: dict[int, torch.Tensor]
    stage1_visual: dict[int, torch.Tensor]
    audio: torch.Tensor
    audio_rms: torch.Tensor
    tokens: dict[int, int]
    key: dict[str, str]
    _rows: dict[str, int] = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._rows = {video_id: row for row, video_id in enumerate(self.video_ids)}

    def index(self, video_ids: Sequence[str]) -> list[int]:
        """The rows of ``video_ids``, in their order.

        Raises:
            DataError: Some ids have no cached features.
        """
        missing = [video_id for video_id in video_ids if video_id not in self._rows]
        if missing:
            raise DataError(
                f"{len(missing)} video id(s) have no cached AVE features: {', '.join(missing[:5])}"
                f"{' …' if len(missing) > 5 else ''}"
            )
        return [self._rows[video_id] for video_id in video_ids]


@dataclasses.dataclass
class _Entry:
    """One cache file: its path, key parts and the names of the tensors it holds."""

    path: Path
    parts: dict[str, Any]
    names: tuple[str, ...]


def load_ave_features(
    root: str | os.PathLike, video_ids: Sequence[str], cfg: AveFeaturesConfig, *, device: Any = "cpu"
) -> AveFeatures:
    """Features of ``video_ids`` from the cache, encoding (once) whatever it lacks.

    Args:
        root: The AVE folder in the extracted layout (``frames/<id>/<sec>.jpg``, ``audio/<id>.wav``).
        video_ids: The clips (any order, repeats allowed); the result's rows follow them sorted.
        cfg: The ``features`` section.
        device: Where the encoders run.

    Returns:
        The features: read through safetensors' memory map from the cache files (those just computed, from memory).

    Raises:
        DataError: No ids, or frames / wavs missing or unreadable (naming the clips and files).
        ConfigError: A resolution that is not a multiple of a backbone's patch size.
        ModelError: An encoder that cannot be built.
    """
    root = Path(root)
    ids = sorted(set(video_ids))
    if not ids:
        raise DataError(f"{root}: no AVE video ids to compute features for")
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir() / "ave_features"
    cache_dir.mkdir(parents=True, exist_ok=True)
    frames_hash, audio_hash = _data_hashes(root, ids)
    stage2 = cfg.visual_backbone
    stage1 = cfg.stage1_visual_backbone or stage2
    resolutions = sorted(cfg.resolutions)

    encoders: dict[str, FrameEncoder] = {}

    def encoder_of(spec: str) -> FrameEncoder:
        if spec not in encoders:
            encoders[spec] = build_frame_encoder(spec, pretrained=cfg.pretrained, init_seed=cfg.init_seed).to(device)
        return encoders[spec]

    # Builders of the same data take turns: the later one finds the earlier one's files and reads them.
    with filelock.FileLock(cache_dir / f".lock-{cache_key({'frames': frames_hash, 'audio': audio_hash})}"):
        fingerprints = {
            spec: frame_encoder_fingerprint(spec, pretrained=cfg.pretrained, init_seed=cfg.init_seed)
            for spec in dict.fromkeys((stage2, stage1))
        }
        cards = {spec: _encoder_card(cache_dir, spec, fp, encoder_of) for spec, fp in fingerprints.items()}
        for spec in fingerprints:
            try:
                costs = {r: tokens_for_resolution(r, cards[spec]["patch_size"]) for r in resolutions}
            except ConfigError as exc:
                raise ConfigError(f"{exc}; the patch size is that of backbone '{spec}'") from None
            if spec == stage2:
                tokens = costs
        visual_entries = {
            (spec, r): _visual_entry(cache_dir, fingerprints[spec], cards[spec], r, frames_hash)
            for spec in fingerprints
            for r in resolutions
        }
        audio_fp = audio_encoder_fingerprint(cfg.audio_encoder, init_seed=cfg.init_seed)
        audio_entry = _audio_entry(cache_dir, audio_fp, audio_hash)

        loaded = {name: _read_entry(entry, len(ids)) for name, entry in visual_entries.items()}
        missing = [name for name, values in loaded.items() if values is None]
        if missing:
            computed = _encode_frames(root, ids, [(encoder_of(spec), r) for spec, r in missing], cfg.batch_size)
            for name, values in zip(missing, computed, strict=True):
                _write_entry(visual_entries[name], {"features": values})
                loaded[name] = {"features": values}
        audio = _read_entry(audio_entry, len(ids))
        if audio is None:
            encoder = build_audio_encoder(cfg.audio_encoder, init_seed=cfg.init_seed).to(device)
            audio = _encode_audio(root, ids, encoder, max(1, cfg.batch_size // SECONDS))
            _write_entry(audio_entry, audio)

    visual = {r: loaded[(stage2, r)]["features"] for r in resolutions}
    stage1_visual = visual if stage1 == stage2 else {r: loaded[(stage1, r)]["features"] for r in resolutions}
    key = {
        "format": str(FORMAT_VERSION),
        "preprocessing": PREPROCESSING,
        "visual_backbone": fingerprints[stage2],
        "stage1_visual_backbone": fingerprints[stage1],
        "audio_encoder": audio_fp,
        "frames": frames_hash,
        "audio": audio_hash,
        "resolutions": ",".join(map(str, resolutions)),
        "audio_entry": audio_entry.path.name,
        **{f"visual/{r}": visual_entries[(stage2, r)].path.name for r in resolutions},
        **{f"stage1_visual/{r}": visual_entries[(stage1, r)].path.name for r in resolutions},
    }
    return AveFeatures(
        video_ids=ids,
        visual=visual,
        stage1_visual=stage1_visual,
        audio=audio["audio"],
        audio_rms=audio["rms"],
        tokens=tokens,
        key=key,
    )


def _data_hashes(root: Path, ids: Sequence[str]) -> tuple[str, str]:
    """sha256 of the sorted ids with each frame's (resp. wav's) size and mtime: what the entries' values read."""
    frames, audio = hashlib.sha256(), hashlib.sha256()
    try:
        for video_id in ids:
            stats = [frame_path(root, video_id, second).stat() for second in range(SECONDS)]
            frames.update(json.dumps([video_id, [[s.st_size, s.st_mtime_ns] for s in stats]]).encode())
            wav = audio_path(root, video_id).stat()
            audio.update(json.dumps([video_id, wav.st_size, wav.st_mtime_ns]).encode())
    except OSError as exc:
        problems = missing_extracted(root, ids) or [str(exc)]
        raise DataError(
            f"{root}: {len(problems)} problem(s) with the extracted AVE frames/audio: {'; '.join(problems[:5])}"
            f"{' …' if len(problems) > 5 else ''}"
        ) from exc
    return frames.hexdigest(), audio.hexdigest()


def _encoder_card(cache_dir: Path, spec: str, fingerprint: str, encoder_of: Any) -> dict[str, Any]:
    """Patch size, width, mean/std and pooling of a frame encoder: read from its card, else built once and kept."""
    path = cache_dir / "encoders" / f"{fingerprint[:24]}.json"
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
        if card.get("fingerprint") == fingerprint:
            return card
    except (OSError, ValueError):
        pass
    encoder = encoder_of(spec)
    card = {
        "fingerprint": fingerprint,
        "spec": spec,
        "patch_size": encoder.patch_size,
        "feature_dim": encoder.feature_dim,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "pooling": encoder.pooling,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(card, indent=1) + "\n", encoding="utf-8"))
    return card


def _visual_entry(cache_dir: Path, fingerprint: str, card: Mapping[str, Any], resolution: int, data: str) -> _Entry:
    parts = {
        "kind": "ave_visual",
        "format": FORMAT_VERSION,
        "backbone": fingerprint,
        "resolution": resolution,
        "preprocessing": {
            "resize": PREPROCESSING,
            "mean": card["mean"],
            "std": card["std"],
            "pooling": card["pooling"],
        },
        "data": data,
    }
    return _Entry(cache_dir / f"ave_visual_{resolution}px_{cache_key(parts)}.safetensors", parts, ("features",))


def _audio_entry(cache_dir: Path, fingerprint: str, data: str) -> _Entry:
    parts = {
        "kind": "ave_audio",
        "format": FORMAT_VERSION,
        "encoder": fingerprint,
        "preprocessing": "10 s waveform at the encoder's rate -> tokens -> mean per second; RMS per second",
        "data": data,
    }
    return _Entry(cache_dir / f"ave_audio_{cache_key(parts)}.safetensors", parts, ("audio", "rms"))


def _key_text(parts: Mapping[str, Any]) -> str:
    return json.dumps(dict(parts), sort_keys=True, default=str)


def _read_entry(entry: _Entry, clips: int) -> dict[str, torch.Tensor] | None:
    """The entry's tensors, memory-mapped; None (and a warning) for a missing, corrupt or foreign file."""
    if not entry.path.is_file():
        return None
    try:
        with safe_open(str(entry.path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
            if stored != _key_text(entry.parts):
                logger.warning("feature cache %s stores another key; refusing it and rebuilding it", entry.path)
                return None
            values = {name: f.get_tensor(name) for name in entry.names}
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        logger.warning("feature cache %s is unreadable (%s); rebuilding it", entry.path, exc)
        return None
    if any(tuple(v.shape[:2]) != (clips, SECONDS) for v in values.values()):
        logger.warning(
            "feature cache %s holds other shapes than (%d, %d, ...); rebuilding it", entry.path, clips, SECONDS
        )
        return None
    return values


def _write_entry(entry: _Entry, values: Mapping[str, torch.Tensor]) -> None:
    tensors = {name: values[name].contiguous() for name in entry.names}
    _replace_atomically(entry.path, lambda tmp: save_file(tensors, tmp, metadata={"key": _key_text(entry.parts)}))
    logger.info("AVE feature cache written: %s %s", entry.path, {k: tuple(v.shape) for k, v in tensors.items()})


def _replace_atomically(path: Path, write: Any) -> None:
    """``write(tmp)`` to a unique temporary sibling, then rename it onto ``path``: readers never see half a file."""
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0o600 would keep a shared cache from other users
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _chunks(ids: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


@torch.no_grad()
def _encode_frames(
    root: Path, ids: Sequence[str], jobs: Sequence[tuple[FrameEncoder, int]], batch_size: int
) -> list[torch.Tensor]:
    """(N, 10, D) embeddings per (encoder, resolution) job; each clip's frames are decoded once for all jobs."""
    outputs: list[list[torch.Tensor]] = [[] for _ in jobs]
    clips_per_batch = max(1, batch_size // SECONDS)
    with tqdm(total=len(ids), desc=f"AVE frames → {len(jobs)} embedding cache(s)", unit="clip") as progress:
        for chunk in _chunks(ids, clips_per_batch):
            frames = [frame for video_id in chunk for frame in read_clip_frames(root, video_id)]
            groups = _float_groups(frames)
            resized: dict[int, torch.Tensor] = {}  # shared by the jobs of one resolution
            for job, (encoder, resolution) in enumerate(jobs):
                if resolution not in resized:
                    resized[resolution] = _resize(groups, len(frames), resolution)
                pixels = _normalise(resized[resolution], encoder.mean, encoder.std)
                device = next(encoder.model.parameters()).device
                embedded = encoder(pixels.to(device)).float().cpu()
                outputs[job].append(embedded.reshape(len(chunk), SECONDS, -1))
            progress.update(len(chunk))
    return [torch.cat(parts) for parts in outputs]


@torch.no_grad()
def _encode_audio(root: Path, ids: Sequence[str], encoder: nn.Module, clips_per_batch: int) -> dict[str, torch.Tensor]:
    """Per-second token means (N, 10, D) and waveform RMS (N, 10) of every clip."""
    rate = encoder.sampling_rate
    # Whisper-style extractors pad every clip to a fixed window: only the tokens of its first 10 s are the clip's.
    window = getattr(encoder.feature_extractor, "chunk_length", None)
    device = next(encoder.model.parameters()).device
    means, rms = [], []
    for chunk in tqdm(list(_chunks(ids, clips_per_batch)), desc="AVE audio → embedding cache", unit="batch"):
        waves = np.stack([read_clip_audio(root, video_id, rate) for video_id in chunk])
        tokens = encoder(torch.from_numpy(waves).to(device)).tokens.float().cpu()
        covered = round(tokens.shape[1] * SECONDS / window) if window else tokens.shape[1]
        bounds = np.linspace(0, covered, SECONDS + 1).round().astype(int)
        if np.any(np.diff(bounds) < 1):
            raise ModelError(f"audio encoder '{encoder.name}' gives {covered} tokens for 10 s: fewer than one a second")
        means.append(
            torch.stack([tokens[:, a:b].mean(dim=1) for a, b in zip(bounds[:-1], bounds[1:], strict=True)], dim=1)
        )
        seconds = waves.reshape(len(chunk), SECONDS, -1).astype(np.float64)
        rms.append(torch.from_numpy(np.sqrt(np.mean(seconds**2, axis=-1))).float())
    return {"audio": torch.cat(means), "rms": torch.cat(rms)}
