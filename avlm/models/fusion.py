"""How source tokens (audio or video, already in the LM's width) enter a frozen causal LM, layer by layer.

Every per-layer block takes the hidden states output by one decoder layer, (B, L, d), and the source tokens,
(B, K, d), and returns new hidden states of the same shape. :class:`LayerFusion` attaches the blocks to the LM
with forward hooks on its decoder layers, so any ``AutoModelForCausalLM`` whose layer list
:func:`find_decoder_layers` can find works unchanged, including under ``generate``.

The three blocks share one bottleneck width ``a`` (``adapter_dim``) and have the same parameter budget,
about ``6·d·a`` per layer, so the comparison isolates how the source is mixed in, not how much capacity it gets:

- :class:`AdditiveAdapter`: ``h + alpha · (x + MLP(LN(h + x)))``, ``x = CrossAttention(LN(h), source)``: a
  cross-attention transformer block whose whole residual update is scaled by ``alpha``, one learned, unsquashed
  scalar per layer (init ``gate_init``), pulled towards 0 by an L2 penalty.
- :class:`GatedCrossAttention`: Flamingo's gated xattn-dense block, ``h + tanh(g_attn) · CrossAttention(LN(h),
  source)``, then ``+ tanh(g_ffw) · MLP(LN(·))``; both gates start at 0. The same two sub-blocks as the additive
  adapter: only the gating differs. Flamingo inserts it before an LM layer; here it sits after layer ``l``, i.e.
  before layer ``l + 1``.
- :class:`ConcatFusion`: ``h + MLP([LN(h); LN(mean(source))])`` with a zero-initialised last layer: no
  attention and no gate; it starts as the identity because its output is exactly 0.

Each block starts as (additive: close to) the identity, so the LM's own behaviour is the starting point.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ConfigError, ModelError

# Where decoder-only LMs in transformers keep their decoder layers: GPT-2 / GPT-J / Bloom / Falcon, the Llama
# family (Mistral, Qwen, Gemma, Phi), OPT, GPT-NeoX / Pythia, MPT.
_DECODER_LAYER_PATHS = (
    "transformer.h",
    "model.layers",
    "model.decoder.layers",
    "gpt_neox.layers",
    "transformer.blocks",
    "transformer.layers",
)


def find_decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM, in order.

    Args:
        lm: an ``AutoModelForCausalLM`` (or a peft wrapper of one).

    Returns:
        The ``nn.ModuleList`` of decoder layers (GPT-2 ``transformer.h``, Llama ``model.layers``, ...).

    Raises:
        ModelError: no known layer list, and no ``nn.ModuleList`` as long as ``config.num_hidden_layers``.
    """
    from peft import PeftModel

    base = lm.get_base_model() if isinstance(lm, PeftModel) else lm
    for path in _DECODER_LAYER_PATHS:
        module: nn.Module | None = base
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    # Unknown architectures: the only ModuleList whose length is the configured depth is the layer stack.
    depth = getattr(getattr(base, "config", None), "num_hidden_layers", None)
    candidates = [m for m in base.modules() if isinstance(m, nn.ModuleList) and depth and len(m) == depth]
    if len(candidates) == 1:
        return candidates[0]
    raise ModelError(
        f"cannot find the decoder layers of {type(base).__name__}: none of {', '.join(_DECODER_LAYER_PATHS)} "
        f"exists and {len(candidates)} ModuleLists have config.num_hidden_layers={depth} entries"
    )


class SourceCrossAttention(nn.Module):
    """Multi-head attention from the LM's hidden states to the source tokens, in a bottleneck width.

    Args:
        dim: LM hidden size d (queries, keys and values come in at this width, the output leaves at it).
        inner_dim: bottleneck width a of queries, keys and values.
        num_heads: heads; must divide ``inner_dim``.
    """

    def __init__(self, dim: int, inner_dim: int, num_heads: int) -> None:
        super().__init__()
        if num_heads < 1 or inner_dim % num_heads:
            raise ConfigError(f"config key 'model.adapter_heads'={num_heads} must divide model.adapter_dim={inner_dim}")
        self.num_heads = num_heads
        self.query_norm = nn.LayerNorm(dim)
        # Source tokens are normalised too: the projector's output scale is free to drift during training.
        self.source_norm = nn.LayerNorm(dim)
        self.query = nn.Linear(dim, inner_dim)
        self.key = nn.Linear(dim, inner_dim)
        self.value = nn.Linear(dim, inner_dim)
        self.out = nn.Linear(inner_dim, dim)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Attend.

        Args:
            hidden: (B, L, d) LM hidden states (the queries).
            source: (B, K, d) source tokens (keys and values); all K are valid, so there is no mask.

        Returns:
            (B, L, d). Each position depends on its own hidden state and the source only, so cached decoding
            (one new position per step) computes exactly what the full forward does.
        """
        source = self.source_norm(source)
        query = self._split_heads(self.query(self.query_norm(hidden)))
        key = self._split_heads(self.key(source))
        value = self._split_heads(self.value(source))
        attended = F.scaled_dot_product_attention(query, key, value)
        return self.out(attended.transpose(1, 2).flatten(2))


def _bottleneck_mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim))


class AdditiveAdapter(nn.Module):
    """``h + alpha · adapter(h, source)``: the primary fusion.

    Args:
        dim: LM hidden size d.
        adapter_dim: bottleneck width a of the attention and the MLP.
        num_heads: attention heads; must divide ``adapter_dim``.
        gate_init: initial alpha. With alpha = 0 the block returns ``h`` bit for bit.
    """

    def __init__(self, dim: int, adapter_dim: int, num_heads: int, gate_init: float) -> None:
        super().__init__()
        self.attention = SourceCrossAttention(dim, adapter_dim, num_heads)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = _bottleneck_mlp(dim, adapter_dim, dim)
        self.alpha = nn.Parameter(torch.tensor(float(gate_init)))

    def forward(self, hidden: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, source)
        # The MLP reads the hidden state with the attended source added, as in a transformer block, so the
        # update can depend on what the LM is saying, not only on which source tokens it attends to.
        update = attended + self.mlp(self.mlp_norm(hidden + attended))
        return hidden + self.alpha * update

    def gate_magnitude(self) -> float:
        """|alpha|."""
        return float(self.alpha.detach().abs())

    def gate_l2(self) -> torch.Tensor:
        """alpha², the term of the gate penalty."""
        return self.alpha.square()


class GatedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention-dense block (tanh gates initialised to 0).

    Args:
        dim: LM hidden size d.
        adapter_dim: bottleneck width a of the attention and the feed-forward.
        num_heads: attention heads; must divide ``adapter_dim``.
    """

    def __init__(self, dim: int, adapter_dim: int, num_heads: int) -> None:
        super().__init__()
        self.attention = SourceCrossAttention(dim, adapter_dim, num_heads)
        self.attention_gate = nn.Parameter(torch.zeros(()))
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = _bottleneck_mlp(dim, adapter_dim, dim)
        self.mlp_gate = nn.Parameter(torch.zeros(()))

    def forward(self, hidden: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        hidden = hidden + self.attention_gate.tanh() * self.attention(hidden, source)
        return hidden + self.mlp_gate.tanh() * self.mlp(self.mlp_norm(hidden))

    def gate_magnitude(self) -> float:
        """Mean |tanh(gate)| over the attention and feed-forward gates."""
        gates = torch.stack([self.attention_gate, self.mlp_gate]).detach()
        return float(gates.tanh().abs().mean())


class ConcatFusion(nn.Module):
    """``h + MLP([LN(h); LN(mean over K of source)])``, the feature-concatenation baseline.

    The source is mean-pooled (no attention: that is what separates this baseline from the other two) and
    concatenated to every position; the MLP projects the 2d-wide concatenation back to d. Its last layer starts
    at zero, so the block starts as the exact identity and has no gate.

    Args:
        dim: LM hidden size d.
        adapter_dim: the MLP is 2d -> 2a -> d, about the parameter budget of the attention blocks.
    """

    def __init__(self, dim: int, adapter_dim: int) -> None:
        super().__init__()
        self.hidden_norm = nn.LayerNorm(dim)
        self.source_norm = nn.LayerNorm(dim)
        self.mlp = _bottleneck_mlp(2 * dim, 2 * adapter_dim, dim)
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, hidden: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        pooled = self.source_norm(source.mean(dim=1, keepdim=True)).expand(-1, hidden.shape[1], -1)
        return hidden + self.mlp(torch.cat([self.hidden_norm(hidden), pooled], dim=-1))


class LayerFusion(nn.Module):
    """Per-layer fusion blocks attached to a causal LM's decoder layers with forward hooks.

    The hooks are inert until source tokens are set with :meth:`source`; without them the LM computes exactly
    what it computes alone (e.g. for a retention probe). The blocks live here, not inside the LM, so the LM's own
    ``state_dict`` is untouched. Do not turn on the LM's gradient checkpointing: its recomputation runs during
    ``backward``, outside :meth:`source`, where the hooks no longer fuse.

    Args:
        lm: the causal LM.
        blocks: decoder layer index -> block, applied to that layer's output hidden states.
    """

    def __init__(self, lm: nn.Module, blocks: dict[int, nn.Module]) -> None:
        super().__init__()
        layers = find_decoder_layers(lm)
        self.layer_indices = sorted(blocks)
        self.blocks = nn.ModuleDict({str(index): blocks[index] for index in self.layer_indices})
        self._source: torch.Tensor | None = None
        self._handles = [
            layers[index].register_forward_hook(functools.partial(self._inject, index)) for index in self.layer_indices
        ]

    @contextlib.contextmanager
    def source(self, tokens: torch.Tensor) -> Iterator[None]:
        """Make the hooks fuse ``tokens`` (B, K, d) into every LM forward run inside the block."""
        previous, self._source = self._source, tokens
        try:
            yield
        finally:
            self._source = previous

    def _inject(self, index: int, _module: nn.Module, _args: tuple, output):
        if self._source is None:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        source = self._source
        if hidden.shape[0] != source.shape[0]:
            # generate() repeats each sample num_beams (or num_return_sequences) times in a row
            # (repeat_interleave), and beam reordering stays inside a sample's block of rows.
            if hidden.shape[0] % source.shape[0]:
                raise ModelError(
                    f"decoder layer {index} runs a batch of {hidden.shape[0]} rows, not a multiple of the "
                    f"{source.shape[0]} source samples"
                )
            source = source.repeat_interleave(hidden.shape[0] // source.shape[0], dim=0)
        block = self.blocks[str(index)]
        dtype = next(block.parameters()).dtype
        fused = block(hidden.to(dtype), source.to(dtype)).to(hidden.dtype)
        if isinstance(output, tuple):
            return (fused, *output[1:])
        return fused

    def gate_magnitudes(self) -> dict[int, float]:
        """Layer index -> gate magnitude, for blocks that have a gate (not :class:`ConcatFusion`)."""
        return {
            index: self.blocks[str(index)].gate_magnitude()
            for index in self.layer_indices
            if hasattr(self.blocks[str(index)], "gate_magnitude")
        }

    def remove_hooks(self) -> None:
        """Detach from the LM (the blocks stay); afterwards the LM runs as if it had never been fused."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
