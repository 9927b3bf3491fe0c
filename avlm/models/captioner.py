"""Captioning with a frozen source encoder and a frozen causal LM, joined by a small trainable fusion.

::

    waveform (B, S) | frames (B, T, C, H, W)
        ─► frozen encoder ─► (B, N, D_enc) ─► projector ─► K source tokens (B, K, d)
                                                                 │ after chosen decoder layers
    <bos> caption ───────────────────────────────────► frozen causal LM ─► next-token logits
                                         (data_only: the K tokens are an input prefix instead)

The source modality is one config switch (``model.encoder``), with no other change:

- ``audio-tiny``: a 2-layer WavLM built from a config with random weights, on raw 16 kHz waveforms.
- ``hf:<HF id or local path>``: ``AutoModel.from_pretrained`` plus its ``AutoFeatureExtractor``. The encoder takes
  raw waveforms at the extractor's ``sampling_rate`` and runs the extractor itself, so one call site serves every
  family: WavLM / wav2vec 2.0 / HuBERT get normalised ``input_values``; Whisper gets log-mel ``input_features``
  padded to the extractor's window (30 s for the released checkpoints, which the encoder's position table
  requires) and only its encoder runs (1500 frames of 20 ms; frames past the clip encode padding, and the
  projector attends over all of them); AST gets its fbank patches; CLAP (48 kHz!) runs its audio tower only,
  whose (B, C, F, T) map becomes F·T tokens. Tokens are the last hidden state, (B, T, D_enc).
- ``vjepa2-tiny``, ``vjepa2:<id>``, ``timm-tiny``, ``timm:<name>``: the video backbones of
  :mod:`avlm.models.backbones` on (B, T, C, H, W) frames, yielding (B, N, D) tokens.

The LM (``model.lm``) is ``lm-tiny`` (a 4-layer GPT-2 with random weights and the vocabulary of a tokenizer
built offline from captions, :func:`build_caption_tokenizer`), ``lm-tiny-warm`` (the same after a brief text-only
warm-up on the caption demo's grammar, cached on disk: :mod:`avlm.models.lm_warmup`) or ``hf:<id or path>``
(``AutoModelForCausalLM.from_pretrained``, GPT-2 and Llama families, and any model whose decoder layers
:func:`~avlm.models.fusion.find_decoder_layers` finds).

Fusion modes (``model.fusion``); in every mode the encoder is frozen and the projector trains:

================== ================================================= =====================================
mode               where the source enters                           what trains besides the projector
================== ================================================= =====================================
additive           ``h + alpha_l · adapter_l(h, src)`` after each    adapters and one alpha per layer
                   layer in ``fusion_layers`` (no prefix)            (+ ``fusion_gate_l2 · Σ alpha²`` in the loss)
cross_attention    Flamingo tanh-gated cross-attention + FFW after   the blocks and their gates (init 0)
                   the same layers (no prefix)
concat             ``h + MLP([h; mean(src)])`` at the same layers,   the MLPs (last layer zero-initialised)
                   no prefix
partial_unfreeze   as cross_attention                                the blocks + the top ``unfreeze_top``
                                                                     LM decoder layers
data_only          K prefix embeddings before the caption            LoRA on the LM (peft), no fusion
                   (``inputs_embeds``), no per-layer fusion          blocks
================== ================================================= =====================================

Layer indices are 0-based positions in the LM's decoder layer list; the block at ``l`` rewrites the hidden
states output by layer ``l``. The frozen LM (and encoder) run in eval mode even while the model trains, so
with every alpha at 0 the logits are the frozen LM's, bit for bit.

Loss: token cross-entropy with teacher forcing (labels are -100 on padding), plus ``fusion_gate_l2 · Σ alpha²``
(additive only), plus ``contrastive_weight ·`` a symmetric InfoNCE between the mean source token and the mean
of the caption's (frozen) input token embeddings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from avlm.errors import ConfigError, ModelError
from avlm.models.adaptation import count_parameters
from avlm.models.backbones import BackboneOutput, VideoBackbone, _seeded, build_backbone
from avlm.models.fusion import (
    AdditiveAdapter,
    ConcatFusion,
    GatedCrossAttention,
    LayerFusion,
    find_decoder_layers,
)

FUSION_MODES = ("additive", "cross_attention", "concat", "partial_unfreeze", "data_only")
# Modes whose source enters through blocks hooked after decoder layers (data_only uses an input prefix instead).
LAYER_FUSION_MODES = ("additive", "cross_attention", "concat", "partial_unfreeze")

AUDIO_SAMPLING_RATE = 16_000
_ENCODER_SPEC_HELP = (
    "use audio-tiny, hf:<hf id or path> (audio), or a video backbone: vjepa2-tiny, vjepa2:<id>, timm-tiny, timm:<name>"
)
_LM_SPEC_HELP = "use lm-tiny, lm-tiny-warm or hf:<hf id or path>"

# The tiny WavLM: 4 conv layers with a total stride of 320 samples (one token per 20 ms, like the real ones),
# width 32, 2 transformer layers of 2 heads: a few ms per second of audio on CPU.
_AUDIO_TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32, 32, 32, 32),
    conv_kernel=(10, 8, 8, 4),
    conv_stride=(5, 4, 4, 4),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=4,
    num_buckets=32,
    max_bucket_distance=64,
)
# initializer_range 0.1, not GPT-2's 0.02: the output layer is tied to the embeddings and follows a LayerNorm, so at
# 0.02 a random 64-wide LM's logits span about ±1 and no frozen-LM fusion could ever predict a word confidently.
_LM_TINY_CONFIG = dict(n_layer=4, n_embd=64, n_head=4, n_positions=256, initializer_range=0.1)
CAPTION_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>"}


# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CaptionModelConfig:
    """The ``model`` section of a captioning recipe.

    Attributes:
        encoder: audio-tiny | hf:<HF id or local path> (audio) | vjepa2-tiny | vjepa2:<id> | timm-tiny |
            timm:<model name> (video). The only switch between modalities.
        num_frames: clip length T for a video encoder (ignored for audio).
        lm: lm-tiny | lm-tiny-warm | hf:<HF id or local path> of an ``AutoModelForCausalLM``.
        init_seed: seed of the random-init tiny encoder / LM, so a checkpoint rebuilds the same frozen parts.
        fusion: additive | cross_attention | concat | partial_unfreeze | data_only (see the module docstring).
        fusion_layers: 0-based decoder layers whose output hidden states receive the source (layer modes).
        audio_tokens: K, the number of source tokens the projector produces (for a video source too).
        projector_width / projector_heads: width of the projector's learned queries and its attention heads.
        adapter_dim / adapter_heads: bottleneck width a and heads of the per-layer fusion blocks.
        fusion_gate_init: initial alpha of the additive adapters.
        fusion_gate_l2: weight of the L2 penalty on the additive alphas, added to the loss.
        unfreeze_top: partial_unfreeze: the top N LM decoder layers that train.
        lora_r / lora_alpha / lora_dropout: data_only: peft LoRA settings on the LM.
        lora_targets: data_only: LM module names for LoRA; empty = peft's default for the architecture
            (GPT-2: c_attn; Llama: q_proj, v_proj).
        contrastive_weight: weight of the source/caption InfoNCE (0 = cross-entropy only).
        temperature: InfoNCE temperature.
    """

    encoder: str = "audio-tiny"
    num_frames: int = 4
    lm: str = "lm-tiny"
    init_seed: int = 0
    fusion: Literal["additive", "cross_attention", "concat", "partial_unfreeze", "data_only"] = "additive"
    fusion_layers: list[int] = dataclasses.field(default_factory=lambda: [1, 3])
    audio_tokens: int = 16
    projector_width: int = 768
    projector_heads: int = 8
    adapter_dim: int = 256
    adapter_heads: int = 4
    fusion_gate_init: float = 0.05
    fusion_gate_l2: float = 1e-4
    unfreeze_top: int = 4
    lora_r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    lora_targets: list[str] = dataclasses.field(default_factory=list)
    contrastive_weight: float = 0.0
    temperature: float = 0.07

    def __post_init__(self) -> None:
        if self.fusion not in FUSION_MODES:
            raise ConfigError(f"config key 'model.fusion': unknown mode '{self.fusion}', use one of {FUSION_MODES}")
        for key in ("num_frames", "audio_tokens", "projector_width", "adapter_dim", "lora_r"):
            if getattr(self, key) < 1:
                raise ConfigError(f"config key 'model.{key}' must be >= 1, got {getattr(self, key)}")
        for heads, width in (("projector_heads", "projector_width"), ("adapter_heads", "adapter_dim")):
            if getattr(self, heads) < 1 or getattr(self, width) % getattr(self, heads):
                raise ConfigError(
                    f"config key 'model.{heads}'={getattr(self, heads)} must divide "
                    f"model.{width}={getattr(self, width)}"
                )
        for key in ("fusion_gate_l2", "contrastive_weight"):
            if getattr(self, key) < 0:
                raise ConfigError(f"config key 'model.{key}' must be >= 0, got {getattr(self, key)}")
        if self.temperature <= 0:
            raise ConfigError(f"config key 'model.temperature' must be > 0, got {self.temperature}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"config key 'model.lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if self.fusion == "partial_unfreeze" and self.unfreeze_top < 1:
            raise ConfigError(
                f"config key 'model.unfreeze_top' must be >= 1 for partial_unfreeze, got {self.unfreeze_top}"
            )
        if self.fusion in LAYER_FUSION_MODES:
            layers = list(self.fusion_layers)
            if not layers:
                raise ConfigError(f"config key 'model.fusion_layers' is empty: fusion '{self.fusion}' needs layers")
            if any(index < 0 for index in layers) or len(set(layers)) != len(layers):
                raise ConfigError(
                    f"config key 'model.fusion_layers'={layers} must hold distinct 0-based decoder layer indices"
                )


# ----------------------------------------------------------------------------------------------------------------
# Frozen encoders
# ----------------------------------------------------------------------------------------------------------------
def _config_identity(config: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in config.to_dict().items()
        if k not in {"transformers_version", "_name_or_path", "_commit_hash", "architectures", "dtype", "torch_dtype"}
        and not k.startswith("_attn_implementation")
    }


class AudioEncoder(nn.Module):
    """A frozen transformers audio model behind one interface: raw waveforms in, (B, T, D) tokens out.

    Attributes:
        name: the spec it was built from, e.g. ``audio-tiny`` or ``hf:microsoft/wavlm-base-plus``.
        model: the HF module that runs (Whisper: its encoder; CLAP: its audio tower).
        feature_extractor: the HF feature extractor turning waveforms into the model's inputs.
        feature_dim: D, the width of the returned tokens.
        sampling_rate: the rate waveforms must have (the data pipeline resamples to it).
        revision: the Hugging Face commit hash of the weights when known, else None.
    """

    def __init__(
        self,
        *,
        name: str,
        model: nn.Module,
        feature_extractor: Any,
        feature_dim: int,
        revision: str | None,
        identity: dict[str, Any],
    ) -> None:
        super().__init__()
        self.name = name
        self.model = model
        self.feature_extractor = feature_extractor
        self.feature_dim = int(feature_dim)
        self.sampling_rate = int(feature_extractor.sampling_rate)
        self.revision = revision
        self._identity = identity
        self._input_names = set(inspect.signature(model.forward).parameters)

    def forward(self, waveform: torch.Tensor) -> BackboneOutput:
        """Encode a batch of equal-length clips.

        Args:
            waveform: (B, S) mono audio at ``sampling_rate``.

        Returns:
            Tokens (B, T, D); attentions are never computed.
        """
        if waveform.ndim != 2:
            raise ModelError(
                f"audio encoder '{self.name}' expects waveforms of shape (B, S), got {tuple(waveform.shape)}"
            )
        # HF feature extractors work on numpy arrays: they normalise, pad and compute spectrograms per clip.
        arrays = [clip.detach().float().cpu().numpy() for clip in waveform]
        inputs = self.feature_extractor(arrays, sampling_rate=self.sampling_rate, return_tensors="pt")
        inputs = {k: v.to(waveform.device) for k, v in inputs.items() if k in self._input_names}
        if "attention_mask" in inputs and bool(inputs["attention_mask"].all()):
            # Equal-length clips: an all-ones mask changes nothing, and WavLM's attention warns when given one.
            del inputs["attention_mask"]
        hidden = self.model(**inputs).last_hidden_state
        if hidden.ndim == 4:  # CLAP's HTS-AT: a (B, C, F, T) map
            hidden = hidden.flatten(2).transpose(1, 2)
        if hidden.shape[-1] != self.feature_dim:
            # The width comes from the config; a model whose output differs would break the projector later.
            raise ModelError(
                f"audio encoder '{self.name}' returned width {hidden.shape[-1]}, its config says {self.feature_dim}"
            )
        return BackboneOutput(tokens=hidden)

    def fingerprint(self) -> str:
        """A stable id for feature-cache keys: spec, revision, config, sampling rate, and init seed if random."""
        payload = {"spec": self.name, "revision": self.revision, "sampling_rate": self.sampling_rate, **self._identity}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, feature_dim={self.feature_dim}, sampling_rate={self.sampling_rate}"


def build_audio_encoder(spec: str, *, init_seed: int = 0) -> AudioEncoder:
    """Build a frozen audio encoder from its spec.

    Args:
        spec: ``audio-tiny`` or ``hf:<HF id or local path>``.
        init_seed: seed of the random initialisation of ``audio-tiny``; the caller's RNG is left untouched.

    Returns:
        The encoder in eval mode with every parameter frozen.

    Raises:
        ModelError: unknown spec, or weights / feature extractor that cannot be loaded.
    """
    from transformers import AutoFeatureExtractor, AutoModel, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    if spec == "audio-tiny":
        config = WavLMConfig(**_AUDIO_TINY_CONFIG)
        with _seeded(init_seed):
            model = WavLMModel(config)
        feature_extractor = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=AUDIO_SAMPLING_RATE,
            padding_value=0.0,
            do_normalize=True,
            return_attention_mask=True,
        )
        identity = {"config": _config_identity(config), "pretrained": False, "init_seed": init_seed}
        revision = None
    elif spec.startswith("hf:") and spec[len("hf:") :]:
        source = spec[len("hf:") :]
        try:
            # float32 regardless of the checkpoint dtype: mixed precision is the trainer's business (autocast).
            model = AutoModel.from_pretrained(source, dtype=torch.float32)
            feature_extractor = AutoFeatureExtractor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load audio encoder '{spec}' from '{source}': {exc}") from exc
        revision = getattr(model.config, "_commit_hash", None)
        identity = {"config": _config_identity(model.config), "pretrained": True}
        if hasattr(model, "audio_model"):  # CLAP: the text tower is not needed
            model = model.audio_model
        elif getattr(model.config, "is_encoder_decoder", False):  # Whisper: the decoder is not needed
            model = model.get_encoder()
    else:
        raise ModelError(f"unknown audio encoder '{spec}': use audio-tiny or hf:<hf id or path>")
    feature_dim = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None)
    if not feature_dim:
        raise ModelError(f"audio encoder '{spec}' ({type(model).__name__}) has no hidden_size in its config")
    model.requires_grad_(False)
    return AudioEncoder(
        name=spec,
        model=model,
        feature_extractor=feature_extractor,
        feature_dim=feature_dim,
        revision=revision,
        identity=identity,
    ).eval()


def build_source_encoder(spec: str, *, num_frames: int = 4, init_seed: int = 0) -> AudioEncoder | VideoBackbone:
    """Build the frozen source encoder: audio from :func:`build_audio_encoder`, video from ``build_backbone``.

    Args:
        spec: ``audio-tiny``, ``hf:<id>``, ``vjepa2-tiny``, ``vjepa2:<id>``, ``timm-tiny`` or ``timm:<name>``.
        num_frames: clip length of a video backbone.
        init_seed: seed of random-init encoders.

    Returns:
        The encoder, frozen and in eval mode; calling it returns a ``BackboneOutput`` whose tokens are (B, N, D).

    Raises:
        ModelError: unknown or unloadable spec.
    """
    if spec == "audio-tiny" or spec.startswith("hf:"):
        return build_audio_encoder(spec, init_seed=init_seed)
    if spec in ("vjepa2-tiny", "timm-tiny") or spec.startswith(("vjepa2:", "timm:")):
        backbone = build_backbone(spec, num_frames=num_frames, init_seed=init_seed)
        backbone.requires_grad_(False)
        return backbone.eval()
    raise ModelError(f"unknown encoder {spec!r}: {_ENCODER_SPEC_HELP}")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer and frozen LM
# ----------------------------------------------------------------------------------------------------------------
def build_caption_tokenizer(texts: Iterable[str]) -> Any:
    """A word-level tokenizer over the words of ``texts``, built offline (for ``lm-tiny``).

    Lowercased, split on whitespace and punctuation; words not seen become ``<unk>``. Ids 0-3 are
    ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``.

    Args:
        texts: captions (any iterable of strings).

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` with pad / bos / eos / unk tokens set.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel(unk_token=CAPTION_SPECIAL_TOKENS["unk_token"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=list(CAPTION_SPECIAL_TOKENS.values()))
    tokenizer.train_from_iterator(list(texts), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **CAPTION_SPECIAL_TOKENS)


def load_caption_tokenizer(spec: str, texts: Iterable[str] | None = None) -> Any:
    """The tokenizer that goes with an LM spec.

    Args:
        spec: ``lm-tiny`` or ``lm-tiny-warm`` (built from ``texts`` with :func:`build_caption_tokenizer`) or
            ``hf:<id or path>``
            (``AutoTokenizer.from_pretrained``; a missing pad token is set to the eos token, as for GPT-2).
        texts: the captions to build the ``lm-tiny`` vocabulary from.

    Returns:
        The tokenizer.

    Raises:
        ConfigError: ``lm-tiny`` or ``lm-tiny-warm`` without texts.
        ModelError: unknown spec, unloadable tokenizer, or one without an eos token.
    """
    if spec in ("lm-tiny", "lm-tiny-warm"):
        if texts is None:
            raise ConfigError(f"lm '{spec}' builds its vocabulary from captions: pass texts")
        return build_caption_tokenizer(texts)
    if not (spec.startswith("hf:") and spec[len("hf:") :]):
        raise ModelError(f"unknown lm '{spec}': {_LM_SPEC_HELP}")
    from transformers import AutoTokenizer

    source = spec[len("hf:") :]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not load the tokenizer of lm '{spec}' from '{source}': {exc}") from exc
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer of lm '{spec}' has no eos token: captions could not end")
    if tokenizer.pad_token_id is None:
        # Labels are masked by attention mask, not by id, so a pad that equals eos still trains the eos.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def start_token_id(tokenizer: Any) -> int:
    # Some LMs (Qwen) have no bos token; GPT-2 style, the eos token then starts a sequence.
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_captions(tokenizer: Any, captions: Sequence[str], *, max_length: int) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: ``<bos> caption <eos>``, right-padded.

    Special tokens are added here, not by the tokenizer, so every tokenizer (GPT-2 adds none, Llama adds bos)
    yields the same layout. Captions longer than ``max_length - 2`` tokens are cut; the eos is always kept.

    Args:
        tokenizer: from :func:`load_caption_tokenizer`.
        captions: B strings.
        max_length: longest sequence, bos and eos included (at least 3).

    Returns:
        ``input_ids`` and ``attention_mask`` (B, L), and ``labels`` (B, L): the input ids, -100 on padding.
    """
    if max_length < 3:
        raise ConfigError(f"max_length={max_length} must be at least 3 (bos, a token, eos)")
    start, end, pad = start_token_id(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
    encoded = tokenizer(list(captions), add_special_tokens=False)["input_ids"]
    rows = [[start, *ids[: max_length - 2], end] for ids in encoded]
    length = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), length), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": input_ids.masked_fill(attention_mask == 0, -100),
    }


def build_causal_lm(spec: str, tokenizer: Any, *, init_seed: int = 0) -> nn.Module:
    """Build the (not yet frozen) causal LM.

    Args:
        spec: ``lm-tiny`` (GPT-2, 4 layers, width 64, 4 heads, random weights, the tokenizer's vocabulary) or
            ``lm-tiny-warm`` (``lm-tiny`` after a few hundred steps of text-only training on the caption demo's
            grammar, :func:`~avlm.models.lm_warmup.build_warm_lm`; trained once per vocabulary and seed, then
            read from the avlm cache dir) or ``hf:<HF id or local path>`` (``AutoModelForCausalLM.from_pretrained``,
            float32).
        tokenizer: the LM's tokenizer (sets the tiny vocabulary and the special token ids).
        init_seed: seed of the ``lm-tiny`` initialisation (and of the warm-up's batch order); the caller's RNG is
            left untouched.

    Returns:
        The LM in eval mode.

    Raises:
        ModelError: unknown spec, unloadable weights, or a tokenizer larger than the LM's vocabulary.
    """
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if spec == "lm-tiny":
        config = GPT2Config(
            **_LM_TINY_CONFIG,
            vocab_size=len(tokenizer),
            bos_token_id=start_token_id(tokenizer),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        with _seeded(init_seed):
            lm = GPT2LMHeadModel(config)
    elif spec == "lm-tiny-warm":
        from avlm.models.lm_warmup import build_warm_lm

        lm = build_warm_lm(tokenizer, init_seed=init_seed)
    elif spec.startswith("hf:") and spec[len("hf:") :]:
        source = spec[len("hf:") :]
        try:
            lm = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load lm '{spec}' from '{source}': {exc}") from exc
        vocab = lm.get_input_embeddings().num_embeddings
        if len(tokenizer) > vocab:
            raise ModelError(f"lm '{spec}' has {vocab} token embeddings but its tokenizer has {len(tokenizer)} tokens")
    else:
        raise ModelError(f"unknown lm '{spec}': {_LM_SPEC_HELP}")
    return lm.eval()


# ----------------------------------------------------------------------------------------------------------------
# Projector and the captioner
# ----------------------------------------------------------------------------------------------------------------
class SourceProjector(nn.Module):
    """Encoder tokens (B, N, D_enc) -> K source tokens (B, K, d) in the LM's hidden size.

    Learned-query attention pooling (a one-layer Perceiver resampler): K learned queries attend over all encoder
    tokens, then an MLP maps them to the LM width. K stays fixed whatever N the encoder yields (WavLM: 50 per
    second; Whisper: 1500 per window; V-JEPA 2: one per tubelet), and each query can pick its own part of the
    clip, which pooling over fixed time windows cannot.

    Args:
        in_dim: encoder width D_enc.
        out_dim: LM hidden size d.
        num_tokens: K.
        width: width of the queries and the attention.
        num_heads: attention heads; must divide ``width``.
    """

    def __init__(self, in_dim: int, out_dim: int, *, num_tokens: int, width: int, num_heads: int) -> None:
        super().__init__()
        self.input_norm = nn.LayerNorm(in_dim)
        self.input = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.empty(1, num_tokens, width))
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.attention = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.output = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Project (B, N, D_enc) encoder tokens to (B, K, d) source tokens."""
        keys = self.input(self.input_norm(features.to(self.queries.dtype)))
        queries = self.queries.expand(features.shape[0], -1, -1)
        pooled, _ = self.attention(queries, keys, keys, need_weights=False)
        # The residual keeps the K outputs distinct even when the attention is nearly uniform at init.
        return self.output(pooled + queries)


def label_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """(B,) number of predicted tokens per caption (position t predicts token t + 1; -100 takes no loss)."""
    return (labels[:, 1:] != -100).sum(1)


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) sum of the token cross-entropies of each caption: what a token-weighted mean over any set of captions
    (one process's share of a batch, a whole split) is built from."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), labels[:, 1:], ignore_index=-100, reduction="none")
    return losses.sum(1)


@dataclass
class CaptionerOutput:
    """What the captioner's forward returns.

    Attributes:
        loss: ``xe_loss + fusion_gate_penalty + contrastive_weight · contrastive_loss``; None without labels.
        xe_loss: mean token cross-entropy over label positions; None without labels.
        contrastive_loss: symmetric InfoNCE between sources and captions of the batch (0 for a batch of one).
        fusion_gate_penalty: ``gate_l2 · Σ alpha²`` (additive), else 0.
        logits: (B, L, vocab) over the caption positions (a data_only prefix is cut off).
        source_tokens: (B, K, d), the projector's output.
    """

    loss: torch.Tensor | None
    xe_loss: torch.Tensor | None
    contrastive_loss: torch.Tensor
    fusion_gate_penalty: torch.Tensor
    logits: torch.Tensor
    source_tokens: torch.Tensor


@dataclass
class GeneratedCaptions:
    """What :meth:`FusionCaptioner.generate` returns.

    Attributes:
        token_ids: (B · num_return_sequences, ≤ max_new_tokens) new tokens only, padded after eos.
        texts: the decoded captions, special tokens removed.
    """

    token_ids: torch.Tensor
    texts: list[str]


class FusionCaptioner(nn.Module):
    """Frozen source encoder → trainable projector → frozen causal LM with trainable fusion.

    Build it with :func:`build_captioner`. The module docstring describes the modes. Only the projector, the
    fusion blocks and the mode's LM parts train; :func:`avlm.models.trainable_state_dict` saves exactly them.

    Args:
        encoder: frozen source encoder (audio or video) returning ``BackboneOutput`` tokens (B, N, D_enc).
        lm: causal LM (frozen here, except what the mode trains).
        tokenizer: the LM's tokenizer (special token ids for generation, decoding).
        config: the model config.

    Raises:
        ConfigError: ``fusion_layers`` or ``unfreeze_top`` beyond the LM's depth.
        ModelError: an LM whose decoder layers cannot be found (layer modes).
    """

    def __init__(self, encoder: nn.Module, lm: nn.Module, tokenizer: Any, config: CaptionModelConfig) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.modality = "video" if isinstance(encoder, VideoBackbone) else "audio"
        self.encoder = encoder.requires_grad_(False)
        lm.requires_grad_(False)
        hidden_size = lm.get_input_embeddings().embedding_dim
        self.projector = SourceProjector(
            encoder.feature_dim,
            hidden_size,
            num_tokens=config.audio_tokens,
            width=config.projector_width,
            num_heads=config.projector_heads,
        )
        self.fusion: LayerFusion | None = None
        if config.fusion in LAYER_FUSION_MODES:
            layers = find_decoder_layers(lm)
            depth = len(layers)
            out_of_range = [index for index in config.fusion_layers if not 0 <= index < depth]
            if out_of_range:
                raise ConfigError(
                    f"config key 'model.fusion_layers'={list(config.fusion_layers)}: {out_of_range} out of range, "
                    f"lm '{config.lm}' has {depth} decoder layers (indices 0..{depth - 1})"
                )
            self.fusion = LayerFusion(lm, {index: self._fusion_block(hidden_size) for index in config.fusion_layers})
            if config.fusion == "partial_unfreeze":
                if config.unfreeze_top > depth:
                    raise ConfigError(
                        f"config key 'model.unfreeze_top'={config.unfreeze_top} exceeds the {depth} decoder layers "
                        f"of lm '{config.lm}'"
                    )
                for layer in list(layers)[depth - config.unfreeze_top :]:
                    layer.requires_grad_(True)
        else:
            lm = _with_lora(lm, config)
        self.lm = lm
        self.train(False)

    def _fusion_block(self, hidden_size: int) -> nn.Module:
        cfg = self.config
        if cfg.fusion == "additive":
            return AdditiveAdapter(hidden_size, cfg.adapter_dim, cfg.adapter_heads, cfg.fusion_gate_init)
        if cfg.fusion == "concat":
            return ConcatFusion(hidden_size, cfg.adapter_dim)
        return GatedCrossAttention(hidden_size, cfg.adapter_dim, cfg.adapter_heads)

    def train(self, mode: bool = True) -> FusionCaptioner:
        super().train(mode)
        # Frozen weights run without dropout, so that alpha = 0 gives the frozen LM exactly and encoder features
        # can be cached; the parts that train (unfrozen top layers, LoRA dropout) follow ``mode``.
        self.encoder.eval()
        self.lm.eval()
        if mode and self.config.fusion == "partial_unfreeze":
            layers = find_decoder_layers(self.lm)
            for layer in list(layers)[len(layers) - self.config.unfreeze_top :]:
                layer.train()
        if mode and self.config.fusion == "data_only":
            for name, module in self.lm.named_modules():
                if name.endswith("lora_dropout"):
                    module.train()
        return self

    # -- source ------------------------------------------------------------------------------------------------
    def encode_source(self, source: torch.Tensor) -> torch.Tensor:
        """Frozen encoder forward only (what a feature cache stores).

        Args:
            source: (B, S) waveforms at the encoder's sampling rate, or (B, T, C, H, W) normalised frames.

        Returns:
            Encoder tokens (B, N, D_enc).
        """
        with torch.no_grad():
            return self.encoder(source).tokens

    def source_tokens(
        self, source: torch.Tensor | None = None, source_features: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The K projected source tokens (B, K, d), from raw inputs or from cached encoder tokens.

        Raises:
            ValueError: neither or both of ``source`` and ``source_features`` given.
        """
        if (source is None) == (source_features is None):
            raise ValueError("pass exactly one of source or source_features")
        features = self.encode_source(source) if source_features is None else source_features
        return self.projector(features)

    # -- training ----------------------------------------------------------------------------------------------
    def forward(
        self,
        source: torch.Tensor | None,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        source_features: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """Teacher-forced caption logits and losses.

        Args:
            source: (B, S) waveforms or (B, T, C, H, W) frames; None when ``source_features`` is given.
            input_ids: (B, L) ``<bos> caption <eos>`` ids (see :func:`encode_captions`).
            attention_mask: (B, L), 0 on padding.
            labels: (B, L) target ids, -100 where no loss is taken; None for logits only.
            source_features: (B, N, D_enc) cached encoder tokens instead of ``source``.

        Returns:
            Losses, logits and source tokens.
        """
        source_tokens = self.source_tokens(source, source_features)
        if self.fusion is None:
            logits = self._prefix_logits(source_tokens, input_ids, attention_mask)
        else:
            with self.fusion.source(source_tokens):
                logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        contrastive = self.contrastive_loss(source_tokens, input_ids, attention_mask)
        penalty = self.fusion_gate_penalty()
        xe = loss = None
        if labels is not None:
            xe = caption_token_losses(logits, labels).sum() / label_token_counts(labels).sum().clamp_min(1)
            loss = xe + penalty
            if self.config.contrastive_weight > 0:
                loss = loss + self.config.contrastive_weight * contrastive
        return CaptionerOutput(
            loss=loss,
            xe_loss=xe,
            contrastive_loss=contrastive,
            fusion_gate_penalty=penalty,
            logits=logits,
            source_tokens=source_tokens,
        )

    def _prefix_embeddings(self, source_tokens: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        embeddings = self.lm.get_input_embeddings()(input_ids)
        return torch.cat([source_tokens.to(embeddings.dtype), embeddings], dim=1)

    def _prefix_logits(
        self, source_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        prefix_mask = attention_mask.new_ones(source_tokens.shape[:2])
        out = self.lm(
            inputs_embeds=self._prefix_embeddings(source_tokens, input_ids),
            attention_mask=torch.cat([prefix_mask, attention_mask], dim=1),
            use_cache=False,
        )
        return out.logits[:, source_tokens.shape[1] :]

    def contrastive_loss(
        self, source_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Symmetric InfoNCE between each mean source token and the mean input embedding of each caption.

        The caption side uses the LM's frozen input embeddings, not its hidden states: in the layer modes the
        hidden states already carry the source, so matching them would be trivial. Captions of the batch are the
        negatives (duplicate captions count as negatives too).

        Args:
            source_tokens: (B, K, d).
            input_ids: (B, L) caption ids.
            attention_mask: (B, L), 0 on padding.

        Returns:
            A scalar; 0 for a batch of one.
        """
        source, caption = self._contrastive_embeddings(source_tokens, input_ids, attention_mask)
        similarity = source @ caption.T / self.config.temperature
        targets = torch.arange(similarity.shape[0], device=similarity.device)
        return (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.T, targets)) / 2

    def text_source_similarity(
        self, source_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Cosine similarity of every source to every caption in the space of :meth:`contrastive_loss`.

        These are the InfoNCE's logits times its temperature, so they mean something once the projector has
        trained with ``contrastive_weight > 0``; :func:`avlm.rerank.contrastive_similarity` reranks N-best lists
        by them.

        Args:
            source_tokens: (B, K, d) from :meth:`source_tokens`.
            input_ids: (C, L) caption ids, any C (e.g. the N-best lists of the B sources, flattened).
            attention_mask: (C, L), 0 on padding.

        Returns:
            (B, C) float32 similarities in [-1, 1].
        """
        source, caption = self._contrastive_embeddings(source_tokens, input_ids, attention_mask)
        return source @ caption.T

    def _contrastive_embeddings(
        self, source_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm mean source token (B, d) and unit-norm mean input embedding of each caption (C, d)."""
        mask = attention_mask.unsqueeze(-1).float()
        embeddings = self.lm.get_input_embeddings()(input_ids).float()
        caption = F.normalize((embeddings * mask).sum(1) / mask.sum(1).clamp_min(1.0), dim=-1)
        source = F.normalize(source_tokens.float().mean(1), dim=-1)
        return source, caption

    def fusion_gate_penalty(self) -> torch.Tensor:
        """``fusion_gate_l2 · Σ_l alpha_l²`` over the additive adapters; a zero tensor in the other modes."""
        device = self.projector.queries.device
        if self.config.fusion != "additive" or self.fusion is None:
            return torch.zeros((), device=device)
        squares = torch.stack([block.gate_l2() for block in self.fusion.blocks.values()])
        return self.config.fusion_gate_l2 * squares.sum()

    def fusion_gate_magnitudes(self) -> dict[int, float]:
        """Fusion layer -> |alpha| (additive) or mean |tanh(gate)| (cross_attention, partial_unfreeze).

        Returns:
            One entry per fusion layer; empty for concat (no gate) and data_only (no fusion blocks).
        """
        return self.fusion.gate_magnitudes() if self.fusion is not None else {}

    # -- decoding ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        source: torch.Tensor | None = None,
        *,
        source_features: torch.Tensor | None = None,
        num_beams: int = 5,
        max_new_tokens: int = 30,
        **generate_kwargs: Any,
    ) -> GeneratedCaptions:
        """Caption sources with transformers' ``generate`` (beam search, or greedy when ``num_beams=1``).

        The source tokens are computed once; ``generate`` repeats each sample num_beams times and the fusion
        hooks repeat the source tokens to match. data_only passes the prefix through ``inputs_embeds``.

        Args:
            source: (B, S) waveforms or (B, T, C, H, W) frames.
            source_features: (B, N, D_enc) cached encoder tokens instead of ``source``.
            num_beams: beam width; 1 decodes greedily.
            max_new_tokens: longest caption, in tokens.
            **generate_kwargs: passed on to ``generate`` (e.g. ``num_return_sequences``, ``length_penalty``).

        Returns:
            New token ids and decoded captions.
        """
        tokens = self.source_tokens(source, source_features)
        prompt = torch.full((tokens.shape[0], 1), start_token_id(self.tokenizer), device=tokens.device)
        kwargs = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "do_sample": False,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
            **generate_kwargs,
        }
        if self.fusion is None:
            embeddings = self._prefix_embeddings(tokens, prompt)
            mask = torch.ones(embeddings.shape[:2], dtype=torch.long, device=tokens.device)
            # Decoder-only generate from inputs_embeds returns the new tokens only.
            token_ids = self.lm.generate(inputs_embeds=embeddings, attention_mask=mask, **kwargs)
        else:
            with self.fusion.source(tokens):
                token_ids = self.lm.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs)
            token_ids = token_ids[:, prompt.shape[1] :]
        texts = [text.strip() for text in self.tokenizer.batch_decode(token_ids, skip_special_tokens=True)]
        return GeneratedCaptions(token_ids=token_ids, texts=texts)

    # -- accounting --------------------------------------------------------------------------------------------
    def parameter_counts(self) -> dict[str, int]:
        """Trainable counts per part, and the trainable / total counts of the whole model.

        Returns:
            ``trainable``, ``total``, ``trainable/projector``, ``trainable/fusion``, ``trainable/lm``.
        """
        trainable, total = count_parameters(self)
        return {
            "trainable": trainable,
            "total": total,
            "trainable/projector": count_parameters(self.projector)[0],
            "trainable/fusion": count_parameters(self.fusion)[0] if self.fusion is not None else 0,
            "trainable/lm": count_parameters(self.lm)[0],
        }


def _with_lora(lm: nn.Module, config: CaptionModelConfig) -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    # GPT-2 stores its projections as Conv1D (weights transposed): peft needs to be told.
    fan_in_fan_out = any(isinstance(module, Conv1D) for module in lm.modules())
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_targets) or None,
        fan_in_fan_out=fan_in_fan_out,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(lm, lora)
    except ValueError as exc:  # targets that match nothing, or no default for the architecture
        raise ConfigError(f"config key 'model.lora_targets'={list(config.lora_targets)}: {exc}") from exc


def build_captioner(config: CaptionModelConfig, tokenizer: Any) -> FusionCaptioner:
    """Build the encoder, the LM and the fusion a config describes.

    Trainable parts (projector, fusion blocks) are initialised from the global RNG: seed it first.

    Args:
        config: the model config.
        tokenizer: from :func:`load_caption_tokenizer` for ``config.lm``.

    Returns:
        The captioner in eval mode, with only the mode's parameters trainable.
    """
    encoder = build_source_encoder(config.encoder, num_frames=config.num_frames, init_seed=config.init_seed)
    lm = build_causal_lm(config.lm, tokenizer, init_seed=config.init_seed)
    return FusionCaptioner(encoder, lm, tokenizer, config)


def params_ratio(trainable: int, reference: int) -> float:
    """Trainable parameters relative to a reference system's (the paper keeps systems within ±10%).

    Args:
        trainable: this model's trainable count.
        reference: the reference model's trainable count.

    Returns:
        ``trainable / reference``; 1.0 means matched.

    Raises:
        ConfigError: a reference count that is not positive.
    """
    if reference <= 0:
        raise ConfigError(f"reference parameter count must be positive, got {reference}")
    return trainable / reference
