"""CLAP audio-text similarity, an external judge for reranking N-best captions (:mod:`avlm.rerank`).

A CLAP model (transformers ``ClapModel`` with its ``ClapProcessor``: a ``ClapFeatureExtractor`` and a tokenizer)
embeds each clip and each candidate caption in one space; a candidate's similarity to its clip is the cosine of the
two embeddings. Specs:

- ``clap-tiny``: random weights from a small ``ClapConfig`` (2-layer text tower of width 32, 2-stage HTS-AT audio
  tower of width 16 → 32 on a 1 s window, 16-wide projections) and a word-level tokenizer built offline from the
  caption demo's vocabulary (:mod:`avlm.data.caption_demo`), laid out as RoBERTa's (``<bos> words <eos>``). For
  tests: it runs in milliseconds and needs no download; its similarities mean nothing.
- ``hf:<HF id or local path>``: ``ClapModel.from_pretrained`` and ``ClapProcessor.from_pretrained``, e.g.
  ``hf:laion/clap-htsat-unfused`` or ``hf:laion/larger_clap_general``.

Waveforms at any rate are resampled to the feature extractor's (48 kHz for the released CLAPs) with
``scipy.signal.resample_poly``. The feature extractor crops clips longer than its window (10 s for the released
models) at random, and a fused model's extractor picks random chunks: each clip is featurised alone with numpy's
global RNG seeded (and restored afterwards), so a clip's similarities are the same on every call and whatever
else is in the batch.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from avlm.errors import DataError, ModelError
from avlm.models.backbones import _seeded
from avlm.models.captioner import CAPTION_SPECIAL_TOKENS, build_caption_tokenizer

CLAP_SPEC_HELP = "use clap-tiny or hf:<hf id or path> of a CLAP model"
# Fixed seed of the per-clip feature extraction (random crops of long clips, random fusion chunks).
_FEATURE_SEED = 0

# Unfused HTS-AT on a 1 s window: the extractor's 101 x 64 log-mel frames are resized to 256 x 64 and folded into
# a 128 x 128 "image" (spec_size 128, freq_ratio 2), 4 x 4 patches in windows of 8, two stages of one block.
_CLAP_TINY_AUDIO = dict(
    spec_size=128,
    num_mel_bins=64,
    window_size=8,
    patch_embeds_hidden_size=16,
    hidden_size=32,
    depths=[1, 1],
    num_attention_heads=[2, 2],
)
_CLAP_TINY_TEXT = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=66
)
_CLAP_TINY_PROJECTION_DIM = 16
_CLAP_TINY_WINDOW_S = 1


class ClapSimilarity:
    """Cosine similarity between clips and candidate captions, by a CLAP model.

    Args:
        spec: ``clap-tiny`` or ``hf:<HF id or local path>`` (see the module docstring).
        device: where the model runs.
        batch_size: clips, or captions, per forward pass.
        init_seed: seed of the ``clap-tiny`` random weights; the caller's RNG is left untouched.

    Attributes:
        spec: the spec it was built from.
        model: the ``ClapModel``, frozen, in eval mode.
        processor: its ``ClapProcessor`` (``feature_extractor`` and ``tokenizer``).
        sampling_rate: the rate the feature extractor expects; other rates are resampled to it.

    Raises:
        ModelError: unknown spec, or a model / processor that cannot be loaded.
    """

    def __init__(
        self, spec: str, device: str | torch.device = "cpu", *, batch_size: int = 32, init_seed: int = 0
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.spec = spec
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.model, self.processor = _build_clap(spec, init_seed)
        self.model.requires_grad_(False).eval().to(self.device)
        self.sampling_rate = int(self.processor.feature_extractor.sampling_rate)

    @torch.no_grad()
    def audio_embeddings(self, waveforms: Sequence[np.ndarray | torch.Tensor], sample_rate: int) -> torch.Tensor:
        """Unit-norm CLAP embeddings of clips.

        Args:
            waveforms: mono clips (1-D arrays or tensors), any lengths.
            sample_rate: their rate in Hz.

        Returns:
            (len(waveforms), P) float32 on ``device``.

        Raises:
            DataError: a clip that is not 1-D or is empty, or a rate that is not positive.
        """
        clips = [self._resampled(clip, sample_rate, index) for index, clip in enumerate(waveforms)]
        extractor = self.processor.feature_extractor
        features = []
        for clip in clips:
            with _numpy_seeded(_FEATURE_SEED):
                features.append(extractor(clip, sampling_rate=self.sampling_rate, return_tensors="pt"))
        embeddings = []
        for start in range(0, len(features), self.batch_size):
            chunk = features[start : start + self.batch_size]
            inputs = {key: torch.cat([f[key] for f in chunk]).to(self.device) for key in chunk[0].keys()}
            embeddings.append(_pooled(self.model.get_audio_features(**inputs)))
        if not embeddings:
            return torch.zeros((0, self._projection_dim()), device=self.device)
        return F.normalize(torch.cat(embeddings).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm CLAP embeddings of captions.

        Args:
            texts: captions, as given (CLAP's tokenizer is cased; no normalisation here).

        Returns:
            (len(texts), P) float32 on ``device``.
        """
        tokenizer = self.processor.tokenizer
        embeddings = []
        for start in range(0, len(texts), self.batch_size):
            inputs = tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            inputs = {key: inputs[key].to(self.device) for key in ("input_ids", "attention_mask")}
            embeddings.append(_pooled(self.model.get_text_features(**inputs)))
        if not embeddings:
            return torch.zeros((0, self._projection_dim()), device=self.device)
        return F.normalize(torch.cat(embeddings).float(), dim=-1)

    def similarity(
        self,
        waveforms: Sequence[np.ndarray | torch.Tensor],
        sample_rate: int,
        candidates: Sequence[Sequence[str]],
    ) -> list[np.ndarray]:
        """Cosine similarity of each clip to each of its candidate captions.

        Args:
            waveforms: B mono clips (1-D arrays or tensors), any lengths.
            sample_rate: their rate in Hz (resampled to :attr:`sampling_rate`).
            candidates: for each clip, its candidate captions (e.g. its N-best list), any number each.

        Returns:
            B float64 arrays; array ``b`` holds ``len(candidates[b])`` similarities in [-1, 1].

        Raises:
            DataError: a different number of clips and candidate lists, or a clip that cannot be used.
        """
        if len(waveforms) != len(candidates):
            raise DataError(f"got {len(waveforms)} clips but {len(candidates)} candidate lists")
        audio = self.audio_embeddings(waveforms, sample_rate)
        flat = [text for texts in candidates for text in texts]
        text = self.text_embeddings(flat)
        bounds = np.cumsum([0, *(len(texts) for texts in candidates)])
        return [(text[bounds[b] : bounds[b + 1]] @ audio[b]).double().cpu().numpy() for b in range(len(candidates))]

    def _resampled(self, clip: np.ndarray | torch.Tensor, sample_rate: int, index: int) -> np.ndarray:
        from scipy.signal import resample_poly

        if isinstance(clip, torch.Tensor):
            clip = clip.detach().cpu().numpy()
        clip = np.asarray(clip, dtype=np.float64)
        if clip.ndim != 1 or clip.size == 0:
            raise DataError(f"clip {index}: expected a non-empty mono waveform (1-D), got shape {clip.shape}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise DataError(f"sample_rate must be a positive integer number of Hz, got {sample_rate}")
        sample_rate = int(sample_rate)
        if sample_rate == self.sampling_rate:
            return clip
        common = math.gcd(self.sampling_rate, sample_rate)
        return resample_poly(clip, self.sampling_rate // common, sample_rate // common)

    def _projection_dim(self) -> int:
        return int(self.model.config.projection_dim)

    def __repr__(self) -> str:
        return f"ClapSimilarity(spec={self.spec!r}, device={str(self.device)!r}, sampling_rate={self.sampling_rate})"


def _build_clap(spec: str, init_seed: int) -> tuple[Any, Any]:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    if spec == "clap-tiny":
        tokenizer = _clap_tiny_tokenizer()
        config = ClapConfig(
            text_config=dict(
                **_CLAP_TINY_TEXT,
                vocab_size=len(tokenizer),
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            ),
            audio_config=_CLAP_TINY_AUDIO,
            projection_dim=_CLAP_TINY_PROJECTION_DIM,
        )
        # RoBERTa positions start after the padding index: two positions are not usable by tokens.
        tokenizer.model_max_length = _CLAP_TINY_TEXT["max_position_embeddings"] - 2
        # rand_trunc: the unfused model's one-channel input (fusion's four channels are for fused models).
        extractor = ClapFeatureExtractor(max_length_s=_CLAP_TINY_WINDOW_S, truncation="rand_trunc")
        with _seeded(init_seed):
            model = ClapModel(config)
        return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)
    if spec.startswith("hf:") and spec[len("hf:") :]:
        source = spec[len("hf:") :]
        try:
            # float32 whatever the checkpoint's dtype, as for the captioner's encoders.
            model = ClapModel.from_pretrained(source, dtype=torch.float32)
            processor = ClapProcessor.from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ModelError(f"could not load CLAP model '{spec}' from '{source}': {exc}") from exc
        return model, processor
    raise ModelError(f"unknown CLAP model '{spec}': {CLAP_SPEC_HELP}")


def _clap_tiny_tokenizer() -> Any:
    """A word-level tokenizer over the caption demo's vocabulary, adding ``<bos>`` and ``<eos>`` like RoBERTa's."""
    from tokenizers import processors

    from avlm.data import caption_demo as demo

    templates = [re.sub(r"\{\w+\}", " ", text) for texts in demo.TEMPLATES.values() for text in texts]
    tables = (demo.PITCH_WORDS, demo.DURATION_WORDS, demo.LOUDNESS_WORDS, demo.LOUDNESS_ADVERBS)
    words = [word for table in tables for synonyms in table.values() for word in synonyms]
    nouns = [noun for pairs in demo.NOUNS.values() for pair in pairs for noun in pair]
    tokenizer = build_caption_tokenizer([*templates, *words, *nouns, "an"])
    bos, eos = CAPTION_SPECIAL_TOKENS["bos_token"], CAPTION_SPECIAL_TOKENS["eos_token"]
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        special_tokens=[(bos, tokenizer.bos_token_id), (eos, tokenizer.eos_token_id)],
    )
    return tokenizer


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; 4.x the tensor itself.
    return output.pooler_output if hasattr(output, "pooler_output") else output


@contextlib.contextmanager
def _numpy_seeded(seed: int) -> Iterator[None]:
    """Seed numpy's global RNG (which HF feature extractors draw from) for the block, then restore its state."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)
