"""Frozen foundation video encoders behind one interface.

``build_backbone(spec)`` turns a short spec into a :class:`VideoBackbone`:

- ``vjepa2-tiny``: a 2-layer V-JEPA 2 built from a config with random weights (tests, smoke runs).
- ``vjepa2:<HF id or local path>``: a V-JEPA 2 checkpoint (``transformers.VJEPA2Model``); encoder only.
- ``timm-tiny``: a 2-layer timm ViT with random weights, applied frame by frame.
- ``timm:<model name>``: any timm image model, applied frame by frame.

Every backbone takes ``pixel_values`` of shape (B, T, C, H, W), already resized to ``image_size`` and
normalised with the backbone's ``mean`` / ``std`` (the data pipeline does both), and returns tokens (B, N, D):
V-JEPA 2 gives one token per spatio-temporal tubelet; timm models give one pooled feature per frame (N = T), or
with ``frame_tokens="all"`` (ViTs) every token of every frame, CLS/register tokens included, which
``prefix_token_mask`` marks. ``forward(..., token_mask=...)`` masks keys inside self-attention (anatomy masks,
see ``avlm.models.attention_bias``); ``enable_gradient_checkpointing()`` trades compute for activation memory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from avlm.errors import ModelError
from avlm.models.attention_bias import (
    AttentionCall,
    AttentionProbe,
    additive_key_bias,
    checkpoint_context_fn,
    install_timm_key_bias,
    vjepa2_attention_call,
)

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SPEC_HELP = "use vjepa2-tiny, vjepa2:<hf id or path>, timm-tiny or timm:<model name>"

# The tiny V-JEPA 2: crop 32, patch 8, tubelet 2, width 48, 2 layers of 2 heads (a few ms per forward on CPU).
_VJEPA2_TINY_CONFIG = dict(
    hidden_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    mlp_ratio=2.0,
    crop_size=32,
    patch_size=8,
    tubelet_size=2,
    pred_hidden_size=24,
    pred_num_hidden_layers=1,
    pred_num_attention_heads=2,
    pred_num_mask_tokens=2,
)
# What timm models hold below their first block (ViTs: patch_embed and the tokens; convnets: stem / conv1).
_TIMM_EMBEDDING_ATTRIBUTES = frozenset(
    {"patch_embed", "cls_token", "reg_token", "pos_embed", "norm_pre", "stem", "conv1", "bn1"}
)
_TIMM_TINY_KWARGS = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)

# User-facing LoRA target names -> module paths inside one block. The research log speaks of q_proj/k_proj/v_proj,
# the HF V-JEPA 2 modules are query/key/value: accept both.
_VJEPA2_LORA_TARGETS = {
    "query": "attention.query",
    "q": "attention.query",
    "q_proj": "attention.query",
    "key": "attention.key",
    "k": "attention.key",
    "k_proj": "attention.key",
    "value": "attention.value",
    "v": "attention.value",
    "v_proj": "attention.value",
    "proj": "attention.proj",
    "o_proj": "attention.proj",
    "out_proj": "attention.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}
# timm ViTs compute q, k and v with one fused Linear: peft can only adapt it whole, so any of them maps to "qkv"
# (asking for "value" alone therefore adapts q, k and v together).
_TIMM_LORA_TARGETS = {
    "query": "attn.qkv",
    "q": "attn.qkv",
    "q_proj": "attn.qkv",
    "key": "attn.qkv",
    "k": "attn.qkv",
    "k_proj": "attn.qkv",
    "value": "attn.qkv",
    "v": "attn.qkv",
    "v_proj": "attn.qkv",
    "qkv": "attn.qkv",
    "proj": "attn.proj",
    "o_proj": "attn.proj",
    "out_proj": "attn.proj",
    "fc1": "mlp.fc1",
    "fc2": "mlp.fc2",
}


@dataclass
class BackboneOutput:
    """What a backbone returns.

    Attributes:
        tokens: (B, N, D) features.
        attentions: one (B, heads, Nq, Nk) tensor of softmax probabilities per backbone layer, or None unless
            asked for (and None for timm models without ViT blocks).
    """

    tokens: torch.Tensor
    attentions: list[torch.Tensor] | None = None


@dataclass(frozen=True)
class TokenLayout:
    """Where each output token sits in the clip, for maps over tokens (anatomy masks, segmentation, heatmaps).

    Tokens are ordered time-major: for each of ``time_steps`` steps, ``prefix_tokens`` CLS/register tokens, then
    ``grid × grid`` patch tokens row by row. Step ``t`` covers frames ``t·frames_per_step .. (t+1)·frames_per_step-1``
    (V-JEPA 2: a tubelet of 2 frames; timm: one frame), and patch ``(r, c)`` covers pixels
    ``[r·patch_size, (r+1)·patch_size) × [c·patch_size, (c+1)·patch_size)`` of those frames.

    Attributes:
        time_steps: token steps along time.
        frames_per_step: frames each step covers.
        grid: patches per side.
        patch_size: pixels per patch side (``grid · patch_size = image_size``).
        prefix_tokens: CLS/register tokens at the start of each step (timm ViTs); 0 for V-JEPA 2.
    """

    time_steps: int
    frames_per_step: int
    grid: int
    patch_size: int
    prefix_tokens: int = 0

    @property
    def tokens_per_step(self) -> int:
        return self.prefix_tokens + self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        return self.time_steps * self.tokens_per_step


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed the CPU RNG for the block and restore the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _unwrap_peft(model: nn.Module) -> nn.Module:
    """The module under a peft ``PeftModel`` wrapper (LoRA layers are injected into it in place)."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def _regex_for(targets: Sequence[str], table: dict[str, str], block_prefix: str, spec: str) -> str:
    """Full-name regex (peft matches it with ``re.fullmatch``) for the given user-facing target names."""
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ModelError(f"no LoRA target modules given for backbone '{spec}': use some of {sorted(table)}")
    unknown = [t for t in targets if t not in table]
    if unknown:
        raise ModelError(f"unknown LoRA target(s) {unknown} for backbone '{spec}': use some of {sorted(table)}")
    paths = sorted({table[t] for t in targets})
    return rf"{block_prefix}\.\d+\.(?:{'|'.join(re.escape(p) for p in paths)})"


class VideoBackbone(nn.Module):
    """Frozen-foundation video encoder behind one interface.

    Attributes:
        name: the spec it was built from, e.g. ``vjepa2-tiny`` or ``vjepa2:facebook/vjepa2-vitl-fpc16-256-ssv2``.
        revision: the Hugging Face commit hash of the weights when known, else None.
        feature_dim: D, the width of the returned tokens.
        image_size: frames must be resized / cropped to this square size.
        num_frames: T, the clip length the backbone expects.
        mean: per-channel normalisation mean expected by the weights.
        std: per-channel normalisation std expected by the weights.
        model: the wrapped HF / timm module (LoRA replaces it with a peft ``PeftModel``).
    """

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        feature_dim: int,
        image_size: int,
        num_frames: int,
        mean: Sequence[float],
        std: Sequence[float],
        revision: str | None,
        identity: dict[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_dim = int(feature_dim)
        self.image_size = int(image_size)
        self.num_frames = int(num_frames)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.revision = revision
        self._identity = identity
        # Set by avlm.models.attention_bias.attention_probe for the forwards inside its block.
        self.attention_probe: AttentionProbe | None = None
        self.gradient_checkpointing = False

    def base_model(self) -> nn.Module:
        """The HF / timm module itself, looking through a peft wrapper when LoRA is applied."""
        return _unwrap_peft(self.model)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool = False,
        token_mask: torch.Tensor | None = None,
        masked_layers: Sequence[int] = (),
    ) -> BackboneOutput:
        """Encode a batch of clips.

        Args:
            pixel_values: (B, T, C, H, W) normalised frames, T = ``num_frames``, H = W = ``image_size``.
            output_attentions: also return per-layer attention probabilities (with their graph when the backbone
                trains, e.g. for attention supervision).
            token_mask: (B, N) bool over the output tokens (``token_layout()``), True = may be attended: the other
                keys get an additive bias of ``MASKED_KEY_BIAS`` in the self-attention of ``masked_layers``, so no
                query attends to them. None = no bias, the forward is exactly the unmasked one.
            masked_layers: layer indices the mask applies at; empty = every layer.

        Returns:
            The tokens and, when asked, the attentions.

        Raises:
            ModelError: input of the wrong shape, a token mask for a backbone without a token layout or of the
                wrong shape, or a layer index out of range.
        """
        self._check_input(pixel_values)
        key_bias = None if token_mask is None else self._key_bias(token_mask, pixel_values.shape[0])
        biased_layers = frozenset() if token_mask is None else self.check_layer_indices(masked_layers)
        return self._encode(pixel_values, output_attentions, key_bias, biased_layers)

    def _encode(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool,
        key_bias: torch.Tensor | None,
        biased_layers: frozenset[int],
    ) -> BackboneOutput:
        """The backbone's forward, inputs checked: ``key_bias`` (B, N) additive float at ``biased_layers``."""
        raise NotImplementedError

    def has_attention_layers(self) -> bool:
        """Whether the backbone's blocks compute self-attention that can be masked, probed and returned."""
        return True

    def check_layer_indices(self, layers: Sequence[int], what: str = "masked layers") -> frozenset[int]:
        """The layer indices as a set, every one checked against the number of blocks.

        Args:
            layers: indices from 0; empty = every layer.
            what: what they are, for the error message.

        Raises:
            ModelError: an index outside ``[0, number of blocks)``.
        """
        count = len(self.blocks())
        bad = [index for index in layers if not 0 <= int(index) < count]
        if bad:
            raise ModelError(f"{what} {bad} out of range: backbone '{self.name}' has layers 0..{count - 1}")
        return frozenset(int(index) for index in layers) or frozenset(range(count))

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each block's activations during backward instead of keeping them (train mode; works with
        LoRA and unfrozen blocks, and with the key bias of ``token_mask``)."""
        raise NotImplementedError

    def _key_bias(self, token_mask: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, N) float32 additive key bias from a (B, N) bool token mask, checked against the token layout."""
        layout = self.token_layout()
        if layout is None:
            raise ModelError(
                f"backbone '{self.name}' has no token layout (pooled frame features): its attention cannot be "
                "masked by tokens; use frame_tokens='all' with a ViT"
            )
        if token_mask.dtype != torch.bool or tuple(token_mask.shape) != (batch, layout.num_tokens):
            raise ModelError(
                f"token_mask must be a bool tensor of shape ({batch}, {layout.num_tokens}) for backbone "
                f"'{self.name}', got {token_mask.dtype} {tuple(token_mask.shape)}"
            )
        return additive_key_bias(token_mask, torch.float32)

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks in order (the last ones are unfrozen by ``unfreeze_last_blocks``)."""
        raise NotImplementedError

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The parameters below the first block (patch / tubelet embedding, CLS and position tokens): layer 0 of
        layer-wise learning-rate decay."""
        raise NotImplementedError

    def lora_target_regex(self, modules: Sequence[str]) -> str:
        """A regex over full module names for ``peft.LoraConfig(target_modules=...)``.

        Args:
            modules: user-facing projection names, e.g. ``("query", "key", "value")``.

        Returns:
            A regex matching those projections inside the encoder blocks only.
        """
        raise NotImplementedError

    def prefix_token_mask(self) -> torch.Tensor | None:
        """(N,) bool: which output tokens are CLS/register tokens rather than patch features; None when none are."""
        return None

    def token_layout(self) -> TokenLayout | None:
        """Where the output tokens sit in space and time; None when they have no spatial layout (pooled frames)."""
        return None

    def identify_weights(self, weights_sha256: str) -> None:
        """Key ``fingerprint()`` on these weights instead of the init they started from (after pretraining or
        loading a checkpoint): the feature cache must not serve a random-init copy's tokens for them."""
        self._identity = {k: v for k, v in self._identity.items() if k != "init_seed"}
        self._identity["weights_sha256"] = weights_sha256

    def fingerprint(self) -> str:
        """A stable id for feature-cache keys: spec, revision, config, input size, and init seed if random.

        Returns:
            A sha256 hex digest, identical across processes for the same backbone.
        """
        payload = {
            "spec": self.name,
            "revision": self.revision,
            "num_frames": self.num_frames,
            "image_size": self.image_size,
            **self._identity,
        }
        blob = json.dumps(payload, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def _check_input(self, pixel_values: torch.Tensor) -> None:
        expected = (self.num_frames, 3, self.image_size, self.image_size)
        if pixel_values.ndim != 5 or tuple(pixel_values.shape[1:]) != expected:
            raise ModelError(
                f"backbone '{self.name}' expects pixel_values of shape (B, {', '.join(map(str, expected))}), "
                f"got {tuple(pixel_values.shape)}"
            )

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, feature_dim={self.feature_dim}, image_size={self.image_size}, "
            f"num_frames={self.num_frames}"
        )


class VJEPA2Backbone(VideoBackbone):
    """V-JEPA 2 encoder (the predictor is never run); tokens are (B, T/tubelet · (H/patch)², D)."""

    def _encode(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool,
        key_bias: torch.Tensor | None,
        biased_layers: frozenset[int],
    ) -> BackboneOutput:
        base = self.base_model()
        previous = base.config._attn_implementation
        if key_bias is not None or self.attention_probe is not None:
            call = AttentionCall(
                layer_of={layer.attention: index for index, layer in enumerate(base.encoder.layer)},
                fallback=previous,
                key_bias=key_bias,
                biased_layers=biased_layers,
                probabilities=output_attentions,
                probe=self.attention_probe,
            )
            with vjepa2_attention_call(base, call):
                out = self.model(
                    pixel_values_videos=pixel_values, skip_predictor=True, output_attentions=output_attentions
                )
            return self._output(out, output_attentions)
        # sdpa/flash kernels never materialise the probabilities: switch to eager for this call only.
        switch = output_attentions and previous != "eager"
        if switch:
            base.set_attn_implementation("eager")
        try:
            out = self.model(pixel_values_videos=pixel_values, skip_predictor=True, output_attentions=output_attentions)
        finally:
            if switch:
                base.set_attn_implementation(previous)
        return self._output(out, output_attentions)

    def _output(self, out: Any, output_attentions: bool) -> BackboneOutput:
        attentions = None
        if output_attentions:
            attentions = list(out.attentions or ())
            layers = len(self.base_model().encoder.layer)
            if len(attentions) != layers:
                raise ModelError(
                    f"backbone '{self.name}' returned {len(attentions)} attention maps for {layers} layers"
                )
        return BackboneOutput(tokens=out.last_hidden_state, attentions=attentions)

    def enable_gradient_checkpointing(self) -> None:
        base = self.base_model()
        # Non-reentrant (it needs no input that requires grad, so frozen embeddings + LoRA work); the context_fn
        # replays a layer with the attention (key bias) it ran with, since the recomputation comes after forward.
        base.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": checkpoint_context_fn(base)}
        )
        self.gradient_checkpointing = True

    def blocks(self) -> nn.ModuleList:
        return self.base_model().encoder.layer

    def token_layout(self) -> TokenLayout:
        config = self.base_model().config
        return TokenLayout(
            time_steps=self.num_frames // config.tubelet_size,
            frames_per_step=config.tubelet_size,
            grid=self.image_size // config.patch_size,
            patch_size=config.patch_size,
        )

    def embedding_parameters(self) -> list[nn.Parameter]:
        return list(self.base_model().encoder.embeddings.parameters())

    def lora_target_regex(self, modules: Sequence[str]) -> str:
        # Anchored at "encoder.layer.N." so that the predictor's own query/key/value stay untouched.
        return _regex_for(modules, _VJEPA2_LORA_TARGETS, r"encoder\.layer", self.name)


class TimmFrameBackbone(VideoBackbone):
    """A timm image model applied to each frame; tokens are the pooled per-frame features, (B, T, D), or with
    ``frame_tokens="all"`` (ViTs only) every frame's tokens in time order, (B, T·(P + patches), D), P being the
    model's CLS/register tokens (``num_prefix_tokens``).

    Attentions (ViT-style models only) come per block with the frames folded into the batch:
    (B·T, heads, N, N), N = prefix tokens + patches. Models without ``blocks[i].attn`` return None.
    """

    def __init__(self, *, frame_tokens: str = "pooled", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.frame_tokens = frame_tokens
        self._warned_no_attention = False
        self._attention_setup: list[Callable[[], None]] = []

    def prefix_token_mask(self) -> torch.Tensor | None:
        if self.frame_tokens != "all":
            return None
        base = self.base_model()
        prefix, patches = int(base.num_prefix_tokens), int(base.patch_embed.num_patches)
        if prefix == 0:
            return None
        per_frame = torch.zeros(prefix + patches, dtype=torch.bool)
        per_frame[:prefix] = True
        return per_frame.repeat(self.num_frames)

    def token_layout(self) -> TokenLayout | None:
        if self.frame_tokens != "all":
            return None
        base = self.base_model()
        grid = int(base.patch_embed.grid_size[0])
        return TokenLayout(
            time_steps=self.num_frames,
            frames_per_step=1,
            grid=grid,
            patch_size=self.image_size // grid,
            prefix_tokens=int(base.num_prefix_tokens),
        )

    def _attention_modules(self) -> list[nn.Module] | None:
        blocks = getattr(self.base_model(), "blocks", None)
        if blocks is None:
            return None
        modules = [getattr(block, "attn", None) for block in blocks]
        if not modules or any(
            m is None or not hasattr(m, "attn_drop") or not hasattr(m, "fused_attn") for m in modules
        ):
            return None
        return modules

    def has_attention_layers(self) -> bool:
        return self._attention_modules() is not None

    def _encode(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool,
        key_bias: torch.Tensor | None,
        biased_layers: frozenset[int],
    ) -> BackboneOutput:
        self._undo_attention_setup()
        batch, frames = pixel_values.shape[:2]
        images = pixel_values.flatten(0, 1)
        base = self.base_model()
        probe = self.attention_probe
        if key_bias is not None:
            # Per frame: the frames run folded into the batch, so clip b's keys of frame t are row b·T + t.
            key_bias = key_bias.reshape(batch * frames, -1)

        wants_modules = output_attentions or probe is not None or key_bias is not None
        attention_modules = self._attention_modules() if wants_modules else None
        if attention_modules is None and (probe is not None or key_bias is not None):
            raise ModelError(f"backbone '{self.name}' has no ViT attention blocks to mask or probe")
        if output_attentions and attention_modules is None and not self._warned_no_attention:
            logger.warning("backbone '%s' has no ViT attention blocks: attentions are not available", self.name)
            self._warned_no_attention = True

        captured: list[torch.Tensor] = []
        recording = [True]  # off once this forward ends: checkpointing's recomputation must not record again

        def record(index: int) -> Callable[[nn.Module, tuple], None]:
            def hook(_module: nn.Module, args: tuple) -> None:
                if not recording[0]:
                    return
                if output_attentions:
                    captured.append(args[0])
                if probe is not None and probe.wants(index):
                    probe.reduce(index, args[0].detach())

            return hook

        for index, module in enumerate(attention_modules or ()):
            if not (output_attentions or (probe is not None and probe.wants(index))):
                continue
            # The fused kernel never materialises the probabilities; the explicit path feeds them to attn_drop
            # (a pre-hook sees them before dropout).
            handle = module.attn_drop.register_forward_pre_hook(record(index))
            self._attention_setup.append(functools.partial(_restore_attention, module, module.fused_attn, handle))
            module.fused_attn = False
        if key_bias is not None:
            handles = install_timm_key_bias(attention_modules, biased_layers, key_bias)
            self._attention_setup.extend(handle.remove for handle in handles)
        try:
            features = base.forward_features(images)
            if self.frame_tokens == "pooled":
                features = base.forward_head(features, pre_logits=True)
        finally:
            recording[0] = False
            # Checkpointing recomputes the blocks during backward: the key bias and kernels stay as they ran until
            # the next forward.
            if not (self.gradient_checkpointing and torch.is_grad_enabled()):
                self._undo_attention_setup()

        # pooled: (B·T, D) → (B, T, D); all: (B·T, P + patches, D) → (B, T·(P + patches), D), frame by frame
        tokens = features.reshape(batch, -1, features.shape[-1])
        return BackboneOutput(tokens=tokens, attentions=captured if output_attentions and attention_modules else None)

    def _undo_attention_setup(self) -> None:
        """Remove the hooks and restore the kernels a forward set up (kept after it only for checkpointing)."""
        while self._attention_setup:
            self._attention_setup.pop()()

    def enable_gradient_checkpointing(self) -> None:
        base = self.base_model()
        if not hasattr(base, "set_grad_checkpointing"):
            raise ModelError(f"backbone '{self.name}': timm model has no set_grad_checkpointing")
        # timm checkpoints non-reentrantly by default (timm.layers.use_reentrant_ckpt() is False).
        base.set_grad_checkpointing(True)
        self.gradient_checkpointing = True

    def blocks(self) -> nn.ModuleList:
        base = self.base_model()
        for attribute in ("blocks", "stages", "layers"):
            container = getattr(base, attribute, None)
            if isinstance(container, nn.ModuleList):
                return container
            if isinstance(container, nn.Sequential):
                return nn.ModuleList(list(container))
        # torchvision-style ResNets in timm keep their stages as layer1..layer4.
        stages = [getattr(base, f"layer{i}") for i in range(1, 5) if hasattr(base, f"layer{i}")]
        if stages:
            return nn.ModuleList(stages)
        raise ModelError(f"backbone '{self.name}' has no blocks, stages or layers to unfreeze")

    def embedding_parameters(self) -> list[nn.Parameter]:
        return [
            param
            for name, param in self.base_model().named_parameters()
            if name.split(".")[0] in _TIMM_EMBEDDING_ATTRIBUTES
        ]

    def lora_target_regex(self, modules: Sequence[str]) -> str:
        return _regex_for(modules, _TIMM_LORA_TARGETS, r"blocks", self.name)


def _restore_attention(module: nn.Module, fused: bool, handle: torch.utils.hooks.RemovableHandle) -> None:
    handle.remove()
    module.fused_attn = fused


def _build_vjepa2(
    spec: str,
    source: str | None,
    *,
    num_frames: int,
    image_size: int | None,
    pretrained: bool,
    init_seed: int,
    drop_path: float = 0.0,
) -> VideoBackbone:
    from transformers import VJEPA2Config, VJEPA2Model

    overrides: dict[str, Any] = {}
    if image_size is not None:
        # V-JEPA 2 uses RoPE (no learned position table), so it runs at any crop that the patch size divides.
        overrides["crop_size"] = int(image_size)
    if drop_path:
        # transformers' VJEPA2Layer: rate 0 at the first layer, rising linearly to drop_path at the last.
        overrides["drop_path_rate"] = float(drop_path)

    random_init = source is None or not pretrained
    if source is None:
        config = VJEPA2Config(
            **{**_VJEPA2_TINY_CONFIG, **overrides}, frames_per_clip=num_frames, attn_implementation="eager"
        )
    else:
        try:
            if pretrained:
                # float32 regardless of the checkpoint dtype: mixed precision is the trainer's business (autocast).
                model = VJEPA2Model.from_pretrained(
                    source, attn_implementation="sdpa", dtype=torch.float32, **overrides
                )
                config = model.config
            else:
                config = VJEPA2Config.from_pretrained(source, attn_implementation="sdpa", **overrides)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load backbone '{spec}' from '{source}': {exc}") from exc

    if config.crop_size % config.patch_size:
        raise ModelError(
            f"backbone '{spec}': image_size {config.crop_size} is not a multiple of the patch size {config.patch_size}"
        )
    if num_frames < 1 or (num_frames >= config.tubelet_size and num_frames % config.tubelet_size):
        raise ModelError(
            f"backbone '{spec}': num_frames {num_frames} is not a multiple of the tubelet size {config.tubelet_size}"
        )
    if random_init:
        with _seeded(init_seed):
            model = VJEPA2Model(config)

    identity_config = {
        k: v
        for k, v in config.to_dict().items()
        if k not in {"transformers_version", "_name_or_path", "_commit_hash", "architectures", "dtype", "torch_dtype"}
        and not k.startswith("_attn_implementation")
    }
    identity: dict[str, Any] = {"config": identity_config, "pretrained": not random_init}
    if random_init:
        identity["init_seed"] = init_seed
    return VJEPA2Backbone(
        name=spec,
        model=model.eval(),
        feature_dim=config.hidden_size,
        image_size=config.crop_size,
        num_frames=num_frames,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        revision=getattr(config, "_commit_hash", None),
        identity=identity,
    )


def _build_timm(
    spec: str,
    model_name: str,
    *,
    num_frames: int,
    image_size: int | None,
    pretrained: bool,
    init_seed: int,
    frame_tokens: str = "pooled",
    extra_kwargs: dict[str, Any] | None = None,
    drop_path: float = 0.0,
) -> VideoBackbone:
    import timm
    from timm.data import resolve_data_config

    kwargs: dict[str, Any] = {"num_classes": 0, **(extra_kwargs or {})}
    if image_size is not None:
        kwargs["img_size"] = int(image_size)
    if drop_path:  # only when set, so that the feature-cache fingerprint of every existing backbone stays the same
        kwargs["drop_path_rate"] = float(drop_path)

    def create(**create_kwargs: Any) -> nn.Module:
        with _seeded(init_seed):
            return timm.create_model(model_name, pretrained=pretrained, **create_kwargs)

    try:
        try:
            model = create(**kwargs)
        except TypeError:
            if "img_size" not in kwargs:
                raise
            # Convolutional models take no img_size and run at any resolution.
            kwargs.pop("img_size")
            model = create(**kwargs)
    except TypeError as exc:
        if "drop_path_rate" not in kwargs:
            raise
        raise ModelError(f"backbone '{spec}' does not support drop path (timm drop_path_rate): {exc}") from exc
    except (RuntimeError, OSError) as exc:  # unknown model name, or weights that cannot be fetched
        raise ModelError(f"could not build backbone '{spec}': {exc}") from exc
    if frame_tokens == "all" and not hasattr(getattr(model, "patch_embed", None), "num_patches"):
        raise ModelError(f"backbone '{spec}': frame_tokens='all' needs a ViT (patch tokens); use 'pooled'")

    data_config = resolve_data_config({}, model=model)
    size = image_size or getattr(getattr(model, "patch_embed", None), "img_size", None) or data_config["input_size"][1:]
    size = size if isinstance(size, int) else size[0]
    pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    identity: dict[str, Any] = {
        "model_name": model_name,
        "kwargs": kwargs,
        "pretrained_cfg": pretrained_cfg,
        "pretrained": pretrained,
        "frame_tokens": frame_tokens,
    }
    if not pretrained:
        identity["init_seed"] = init_seed
    return TimmFrameBackbone(
        frame_tokens=frame_tokens,
        name=spec,
        model=model.eval(),
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        image_size=int(size),
        num_frames=num_frames,
        mean=tuple(data_config["mean"]),
        std=tuple(data_config["std"]),
        revision=None,
        identity=identity,
    )


def build_backbone(
    spec: str,
    *,
    num_frames: int = 4,
    image_size: int | None = None,
    pretrained: bool = True,
    init_seed: int = 0,
    frame_tokens: Literal["pooled", "all"] = "pooled",
    drop_path: float = 0.0,
) -> VideoBackbone:
    """Build a video backbone from its spec.

    Args:
        spec: ``vjepa2-tiny``, ``vjepa2:<HF id or local path>``, ``timm-tiny`` or ``timm:<model name>``.
        num_frames: clip length T fed to the backbone.
        image_size: square input size; None keeps the model's own (V-JEPA 2 crop size, timm input size).
        pretrained: load the published weights (``vjepa2:`` / ``timm:``); the tiny specs are always random.
        init_seed: seed of the random initialisation; the caller's RNG state is left untouched.
        frame_tokens: timm only: ``pooled`` (one feature per frame) or ``all`` (every token of every frame, CLS and
            register tokens included; ViTs only). V-JEPA 2 has no pooled form and accepts ``pooled`` only.
        drop_path: stochastic depth, the rate of the last block (V-JEPA 2 ``drop_path_rate``, timm
            ``drop_path_rate``; both rise linearly from 0 at the first block); active in train mode only, 0 = off.

    Returns:
        The backbone, in eval mode, with every parameter trainable until an adaptation mode freezes them.

    Raises:
        ModelError: unknown spec, unloadable weights, a frame count / size the model cannot take, a drop path
            outside [0, 1) or one the timm model does not take.
    """
    if not 0.0 <= drop_path < 1.0:
        raise ModelError(f"drop_path={drop_path} must be in [0, 1)")
    if not isinstance(spec, str) or not spec.strip():
        raise ModelError(f"unknown backbone {spec!r}: {_SPEC_HELP}")
    spec = spec.strip()
    if frame_tokens not in ("pooled", "all") or (frame_tokens == "all" and not spec.startswith("timm")):
        raise ModelError(f"backbone '{spec}': frame_tokens={frame_tokens!r} applies to timm ViTs only ('all')")
    common = dict(num_frames=num_frames, image_size=image_size, init_seed=init_seed, drop_path=drop_path)
    if spec == "vjepa2-tiny":
        return _build_vjepa2(spec, None, pretrained=False, **common)
    if spec.startswith("vjepa2:") and spec[len("vjepa2:") :]:
        return _build_vjepa2(spec, spec[len("vjepa2:") :], pretrained=pretrained, **common)
    if spec == "timm-tiny":
        return _build_timm(
            spec,
            "vit_tiny_patch16_224",
            pretrained=False,
            frame_tokens=frame_tokens,
            extra_kwargs=_TIMM_TINY_KWARGS,
            **{**common, "image_size": image_size or _TIMM_TINY_KWARGS["img_size"]},
        )
    if spec.startswith("timm:") and spec[len("timm:") :]:
        return _build_timm(spec, spec[len("timm:") :], pretrained=pretrained, frame_tokens=frame_tokens, **common)
    raise ModelError(f"unknown backbone '{spec}': {_SPEC_HELP}")
