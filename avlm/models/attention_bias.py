"""Anatomy masks as attention biases over keys, and a streaming probe of backbone attention.

Hard attention masking (the research log's Exp12) lets a query attend only to tokens that overlap the anatomy:
:func:`anatomy_token_mask` turns per-pixel class masks into a (B, N) bool mask over a backbone's tokens, and
:func:`additive_key_bias` turns that into the additive bias the attention kernels take (0 = allowed, a large
negative *finite* value = masked, so that a row with every key masked stays uniform instead of turning NaN).
The bias depends on the key only: masked keys get no attention from any query.

Inside V-JEPA 2 (transformers) the bias goes through the attention function registered here under
:data:`KEY_BIAS_ATTENTION` with ``transformers.AttentionInterface``; the backbone switches its model to it for one
forward (:func:`vjepa2_attention_call`). timm ViT blocks take it through ``Attention.forward(attn_mask=...)``, set by
forward pre-hooks (:func:`install_timm_key_bias`).

:func:`attention_probe` streams each layer's attention probabilities to a callback as they are computed and keeps
none of them, so diagnostics over a large backbone hold one layer's map of one batch at a time:
``heads · N² · 4`` bytes per clip in float32 (ViT-L, 2,048 tokens, 16 heads: 268 MB per clip per layer, against
6.4 GB per clip for all 24 layers at once).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ModelError

if TYPE_CHECKING:
    from avlm.models.backbones import TokenLayout

# Finite in float16 (whose largest magnitude is 65504) so no row ever becomes all -inf (NaN after softmax), and
# exp(-1e4) underflows to exactly 0 in every float dtype: masked keys get no attention mass at all.
MASKED_KEY_BIAS = -1.0e4
# The name of the V-JEPA 2 attention function that adds the key bias (transformers AttentionInterface).
KEY_BIAS_ATTENTION = "avlm_key_bias"

AttentionReduce = Callable[[int, torch.Tensor], None]


class TokenMask(NamedTuple):
    """A token mask from anatomy masks.

    Attributes:
        allowed: (B, N) bool, True = the token may be attended.
        applied: (B,) bool, True where the clip's mask restricts anything (it has masks with some anatomy); False
            rows of ``allowed`` are all True.
    """

    allowed: torch.Tensor
    applied: torch.Tensor


def anatomy_token_mask(
    seg_mask: torch.Tensor, has_mask: torch.Tensor, layout: TokenLayout, dilation: int = 0
) -> TokenMask:
    """Which tokens overlap the anatomy.

    A patch token is allowed when any pixel of its patch, in any frame of its time step that has a mask, is
    anatomy (class id > 0), after dilating the step's patch map by ``dilation`` patches (8-neighbourhood).
    CLS/register tokens are always allowed. A time step none of whose frames has a mask is allowed whole, and so
    is every token of a clip without masks (``has_mask`` False) or whose masks hold no anatomy at all.

    Args:
        seg_mask: (B, T, S, S) int64 class ids, -1 = no mask for that frame; S = ``grid · patch_size``,
            T = ``time_steps · frames_per_step``.
        has_mask: (B,) bool, whether the clip has a mask on some frame.
        layout: where the backbone's tokens sit (``VideoBackbone.token_layout()``).
        dilation: patches added around the anatomy on each side, per time step.

    Returns:
        The (B, N) allowed tokens and the (B,) clips where the mask applies.

    Raises:
        ModelError: masks whose shape does not fit the layout, or a negative dilation.
    """
    if dilation < 0:
        raise ModelError(f"attention mask dilation={dilation} must be non-negative")
    frames, size = layout.time_steps * layout.frames_per_step, layout.grid * layout.patch_size
    if seg_mask.ndim != 4 or tuple(seg_mask.shape[1:]) != (frames, size, size):
        raise ModelError(
            f"seg_mask of shape {tuple(seg_mask.shape)} does not fit the backbone's tokens: expected "
            f"(B, {frames}, {size}, {size})"
        )
    batch, steps, grid, patch = seg_mask.shape[0], layout.time_steps, layout.grid, layout.patch_size
    # (B, steps, frames_per_step, grid, patch, grid, patch): a patch's pixels over its step's frames.
    by_patch = seg_mask.reshape(batch, steps, layout.frames_per_step, grid, patch, grid, patch)
    anatomy = (by_patch > 0).any(dim=(2, 4, 6))  # (B, steps, grid, grid); frames without a mask are all -1
    if dilation:
        anatomy = (
            F.max_pool2d(anatomy.flatten(0, 1).float(), kernel_size=2 * dilation + 1, stride=1, padding=dilation)
            .reshape(batch, steps, grid, grid)
            .bool()
        )
    step_has_mask = (by_patch >= 0).any(dim=(2, 3, 4, 5, 6))  # (B, steps)
    applied = has_mask.to(torch.bool) & anatomy.flatten(1).any(dim=1)
    patches = anatomy.flatten(2) | ~(step_has_mask & applied[:, None])[..., None]  # (B, steps, grid²)
    prefix = patches.new_ones(batch, steps, layout.prefix_tokens)
    return TokenMask(allowed=torch.cat([prefix, patches], dim=2).flatten(1), applied=applied)


def additive_key_bias(token_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N) additive bias over keys: 0 where ``token_mask`` is True, :data:`MASKED_KEY_BIAS` where False."""
    return torch.zeros(token_mask.shape, dtype=dtype, device=token_mask.device).masked_fill(
        ~token_mask.to(torch.bool), MASKED_KEY_BIAS
    )


@dataclasses.dataclass(frozen=True)
class AttentionProbe:
    """What :func:`attention_probe` installs on a backbone: the callback and the layers it wants (None = all)."""

    reduce: AttentionReduce
    layers: frozenset[int] | None = None

    def wants(self, layer_index: int) -> bool:
        return self.layers is None or layer_index in self.layers


@contextlib.contextmanager
def attention_probe(
    backbone: nn.Module, reduce: AttentionReduce, layers: Sequence[int] | None = None
) -> Iterator[None]:
    """Stream every backbone layer's attention probabilities to ``reduce`` during the forwards inside the block.

    Each forward calls ``reduce(layer_index, probs)`` once per chosen layer, as soon as that layer has computed
    them, with the softmax probabilities before attention dropout, detached: V-JEPA 2 (B, heads, N, N), timm
    (B·T, heads, n, n) with the frames folded into the batch. Nothing is kept, so under ``torch.no_grad()`` the peak
    is one layer's map of one batch, ``heads · N² · 4`` bytes per clip in float32 (ViT-L with 2,048 tokens and 16
    heads: 268 MB per clip per layer); feed small batches to bound it further. Any key bias of the forward is
    included in the probabilities.

    Args:
        backbone: a ``VideoBackbone`` with attention layers.
        reduce: called with the layer index and that layer's probabilities.
        layers: the layer indices to probe; None = all.

    Raises:
        ModelError: a backbone without attention layers, or a layer index out of range.
    """
    chosen = None if layers is None else backbone.check_layer_indices(layers, what="attention probe layers")
    if not backbone.has_attention_layers():
        raise ModelError(f"backbone '{backbone.name}' has no attention layers to probe")
    previous = backbone.attention_probe
    backbone.attention_probe = AttentionProbe(reduce=reduce, layers=chosen)
    try:
        yield
    finally:
        backbone.attention_probe = previous


# ---------------------------------------------------------------------------------------------------------------
# V-JEPA 2 (transformers): an attention function that adds the key bias at chosen layers.


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What the key-bias attention function does during one V-JEPA 2 forward.

    Attributes:
        layer_of: attention module → encoder layer index (modules not listed run the fallback unchanged).
        fallback: the implementation the model had (``eager`` / ``sdpa``), used wherever nothing is asked.
        key_bias: (B, N) additive bias, or None.
        biased_layers: the layer indices the bias applies at.
        probabilities: return the probabilities of every layer (``output_attentions``).
        probe: layers whose probabilities go to a callback, or None.
    """

    layer_of: dict[nn.Module, int]
    fallback: str
    key_bias: torch.Tensor | None = None
    biased_layers: frozenset[int] = frozenset()
    probabilities: bool = False
    probe: AttentionProbe | None = None


_active_call: AttentionCall | None = None


def _key_bias_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers attention function: the model's own one, plus the key bias / probe at the chosen layers."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.vjepa2.modeling_vjepa2 import eager_attention_forward

    call = _active_call
    if call is None:
        raise ModelError(f"the '{KEY_BIAS_ATTENTION}' attention runs only inside VideoBackbone.forward")
    layer = call.layer_of.get(module)
    bias = call.key_bias if layer is not None and layer in call.biased_layers else None
    probe = call.probe if layer is not None and call.probe is not None and call.probe.wants(layer) else None
    if bias is None and probe is None:
        fallback = "eager" if call.probabilities else call.fallback
        function = ALL_ATTENTION_FUNCTIONS.get_interface(fallback, eager_attention_forward)
        return function(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    mask = None if bias is None else bias[:, None, None, :].to(query.dtype)
    if attention_mask is not None:
        mask = attention_mask if mask is None else mask + attention_mask
    if probe is None and not call.probabilities:
        context = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout, scale=scaling)
        return context.transpose(1, 2).contiguous(), None
    # The eager path of transformers' V-JEPA 2, with the bias added before the softmax.
    scores = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if mask is not None:
        scores = scores + mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    if probe is not None:
        probe.reduce(layer, probs.detach())
    probs = F.dropout(probs, p=dropout, training=module.training)
    context = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return context, probs if call.probabilities else None


def _register_key_bias_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(KEY_BIAS_ATTENTION, _key_bias_attention)


@contextlib.contextmanager
def _installed(model: nn.Module, call: AttentionCall | None, implementation: str) -> Iterator[None]:
    global _active_call
    previous_call, previous_implementation = _active_call, model.config._attn_implementation
    _active_call = call
    if implementation != previous_implementation:
        model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        _active_call = previous_call
        if implementation != previous_implementation:
            model.set_attn_implementation(previous_implementation)


def vjepa2_attention_call(model: nn.Module, call: AttentionCall) -> contextlib.AbstractContextManager[None]:
    """Run ``model`` (a transformers ``VJEPA2Model``) with the key-bias attention function doing ``call``."""
    _register_key_bias_attention()
    return _installed(model, call, KEY_BIAS_ATTENTION)


def checkpoint_context_fn(model: nn.Module) -> Callable[[], tuple[contextlib.AbstractContextManager[None], ...]]:
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) that replays a layer as it first ran.

    Checkpointing recomputes a layer during backward, after the forward's :func:`vjepa2_attention_call` has
    ended: the returned function, called by checkpoint at forward time, snapshots the attention in use then
    (implementation and key bias; the probe is not called again) and reinstates it for the recomputation.
    """

    def contexts() -> tuple[contextlib.AbstractContextManager[None], contextlib.AbstractContextManager[None]]:
        call = _active_call
        if call is not None and call.probe is not None:
            # The same (eager) path as the forward took, without calling the probe a second time.
            silent = AttentionProbe(reduce=lambda _layer, _probs: None, layers=call.probe.layers)
            call = dataclasses.replace(call, probe=silent)
        return contextlib.nullcontext(), _installed(model, call, model.config._attn_implementation)

    return contexts


# ---------------------------------------------------------------------------------------------------------------
# timm ViTs: Attention.forward(x, attn_mask=...) at chosen blocks, per frame.


def install_timm_key_bias(
    attention_modules: Sequence[nn.Module], layers: frozenset[int], key_bias: torch.Tensor
) -> list[torch.utils.hooks.RemovableHandle]:
    """Make the chosen timm ``Attention`` modules add ``key_bias`` to their scores.

    Args:
        attention_modules: ``blocks[i].attn`` of the ViT, in block order.
        layers: the block indices to bias.
        key_bias: (B·T, n) additive bias, frames folded into the batch as the backbone runs them.

    Returns:
        The hook handles; the bias stays until they are removed.
    """
    mask = key_bias[:, None, None, :]

    def add_mask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        tokens = args[0] if args else kwargs["x"]
        if tokens.shape[0] != mask.shape[0]:
            raise ModelError(
                f"the backbone's key bias was set for {mask.shape[0]} frames but a block ran on {tokens.shape[0]}: "
                "backward must follow its own forward when gradient checkpointing is on"
            )
        if kwargs.get("attn_mask") is not None:
            raise ModelError("timm attention already received an attn_mask: cannot add the key bias to it")
        return args, {**kwargs, "attn_mask": mask.to(tokens.dtype)}

    return [attention_modules[index].register_forward_pre_hook(add_mask, with_kwargs=True) for index in sorted(layers)]
