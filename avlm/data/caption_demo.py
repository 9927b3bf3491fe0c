"""Built-in synthetic audio-captioning data, written in the Clotho v2.1 layout so that ``load_clotho`` reads it.

The captioning recipe falls back to it when no ``data_dir`` is given, so that recipe, tests and examples run in
seconds on a CPU without downloading AudioCaps or Clotho. Each clip is 1.6–2.0 s of 16 kHz mono audio holding one
procedurally generated sound event, or the same event three times, over a faint constant background hiss. Five
attributes are drawn per clip, balanced over the 64 combinations within each split, and each is audible:

- kind: a steady ``tone`` (sine plus a weak second harmonic), a ``rising`` or ``falling`` chirp (a logarithmic
  sweep over 1.3 octaves or more, so its direction is audible even in a 0.1 s event), or a ``noise`` burst;
- pitch: ``low`` (tones 200–400 Hz, sweeps within 150–750 Hz, noise low-passed at 500 Hz) or ``high`` (tones
  1.5–3 kHz, sweeps within 1.2–4.8 kHz, noise high-passed at 3 kHz);
- rhythm: ``single`` event or ``repeated`` (three events 0.10–0.15 s apart);
- duration of each event: ``short`` (0.10–0.20 s) or ``long`` (0.40–0.50 s);
- loudness: ``loud`` (RMS about -18 dBFS) or ``quiet`` (about -34 dBFS). The background hiss has the same level in
  every clip, so loudness stays audible to encoders whose feature extractors normalise each clip's level.

Each clip has 5 reference captions, one per template, with synonyms drawn at random from a vocabulary of about
50 words ("A faint brief high pitched beep sounds three times", "Three quiet short beeps at a high pitch, ...").
``demo_attributes_<split>.csv`` (not part of Clotho) lists each file's attributes for diagnostics and tests.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
import re
from pathlib import Path

import numpy as np
import soundfile
from scipy.signal import butter, chirp, sosfilt

from avlm.data.audio_captions import CLOTHO_CAPTION_COLUMNS
from avlm.data.generated import generate_once

logger = logging.getLogger(__name__)

# Bump whenever the generator's output changes: it is part of the cache folder name.
DEMO_VERSION = "v1"

SAMPLE_RATE = 16_000
SPLIT_SIZES = {"development": 400, "validation": 100, "evaluation": 100}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "kind": ("tone", "rising", "falling", "noise"),
    "pitch": ("low", "high"),
    "rhythm": ("single", "repeated"),
    "duration": ("short", "long"),
    "loudness": ("loud", "quiet"),
}
REPEATS = 3
EVENT_SECONDS = {"short": (0.10, 0.20), "long": (0.40, 0.50)}
GAP_SECONDS = (0.10, 0.15)
CLIP_SECONDS = (1.6, 2.0)
EVENT_RMS = {"loud": 0.12, "quiet": 0.02}
BACKGROUND_RMS = 0.002
RAMP_SECONDS = 0.01  # raised-cosine fades: a hard onset would click across all frequencies and blur the pitch

# One (singular, plural) noun per synonym.
NOUNS: dict[str, tuple[tuple[str, str], ...]] = {
    "tone": (("beep", "beeps"), ("tone", "tones")),
    "rising": (("rising chirp", "rising chirps"), ("upward sweep", "upward sweeps")),
    "falling": (("falling chirp", "falling chirps"), ("downward sweep", "downward sweeps")),
    "noise": (("burst of noise", "bursts of noise"), ("noise burst", "noise bursts")),
}
PITCH_WORDS = {"low": ("low", "low pitched", "deep"), "high": ("high", "high pitched")}
DURATION_WORDS = {"short": ("short", "brief"), "long": ("long", "lengthy")}
LOUDNESS_WORDS = {"loud": ("loud", "strong"), "quiet": ("quiet", "soft", "faint")}
LOUDNESS_ADVERBS = {"loud": ("loudly",), "quiet": ("quietly", "softly")}
# Five phrasings per rhythm; each clip gets every one of them once, so its references are distinct.
TEMPLATES = {
    "single": (
        "a {loud} {dur} {pitch} {noun} sounds once",
        "a {loud} {dur} {noun} at a {pitch_level} pitch, just once",
        "there is a single {loud} {noun} that is {dur} and {pitch}",
        "a {pitch} {noun} plays {loudly} once for a {dur} moment",
        "{loud} and {dur}, a {pitch} {noun} is heard only once",
    ),
    "repeated": (
        "a {loud} {dur} {pitch} {noun} sounds three times",
        "{loud} {dur} {nouns} at a {pitch_level} pitch, three in a row",
        "there are three {loud} {nouns}, each {dur} and {pitch}",
        "a {pitch} {noun} plays {loudly} three times, each one {dur}",
        "{loud} and {dur}, a {pitch} {noun} is heard repeatedly",
    ),
}


def ensure_caption_demo(root: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Generate (once; cached) and return the demo audio-captioning dataset folder.

    The folder is ``root / f"caption_demo_{DEMO_VERSION}_s{seed}"``; it is generated in a temporary sibling folder
    and renamed into place when complete, so an interrupted generation never looks complete.

    Args:
        root: Cache folder; default ``$AVLM_CACHE_DIR`` or ``~/.cache/avlm``.
        seed: Seed of the generator; the same seed gives byte-identical files.

    Returns:
        The dataset folder, in the Clotho layout: ``clotho_captions_<split>.csv`` and ``clotho_audio_<split>/``
        for the splits development (400 clips), validation (100) and evaluation (100).
    """
    return generate_once(
        root,
        f"caption_demo_{DEMO_VERSION}_s{seed}",
        lambda folder: _write_demo(folder, seed),
        "audio-caption demo data",
    )


def caption_clip(attributes: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Return the 5 reference captions of a clip with the given attributes, synonyms drawn from ``rng``.

    Args:
        attributes: One value per key of ``ATTRIBUTES``.
        rng: Source of the synonym choices.
    """
    captions = []
    for template in TEMPLATES[attributes["rhythm"]]:
        noun, nouns = NOUNS[attributes["kind"]][rng.integers(len(NOUNS[attributes["kind"]]))]
        text = template.format(
            noun=noun,
            nouns=nouns,
            pitch=_pick(rng, PITCH_WORDS[attributes["pitch"]]),
            pitch_level=attributes["pitch"],
            dur=_pick(rng, DURATION_WORDS[attributes["duration"]]),
            loud=_pick(rng, LOUDNESS_WORDS[attributes["loudness"]]),
            loudly=_pick(rng, LOUDNESS_ADVERBS[attributes["loudness"]]),
        )
        text = re.sub(r"\ba (?=[aeiou])", "an ", text)
        captions.append(text[0].upper() + text[1:])
    return captions


def synthesize_clip(attributes: dict[str, str], rng: np.random.Generator) -> np.ndarray:
    """Return a float32 waveform at ``SAMPLE_RATE`` with the sound event(s) the attributes describe.

    Args:
        attributes: One value per key of ``ATTRIBUTES``.
        rng: Source of the clip's variation (timing, frequencies, levels, noise).
    """
    sr = SAMPLE_RATE
    repeats = REPEATS if attributes["rhythm"] == "repeated" else 1
    event_samples = int(rng.uniform(*EVENT_SECONDS[attributes["duration"]]) * sr)
    gap_samples = [int(rng.uniform(*GAP_SECONDS) * sr) for _ in range(repeats - 1)]
    busy = repeats * event_samples + sum(gap_samples)
    margin = int(0.05 * sr)
    shortest = max(int(CLIP_SECONDS[0] * sr), busy + 2 * margin)
    length = int(rng.integers(shortest, int(CLIP_SECONDS[1] * sr) + 1))
    onset = int(rng.integers(margin, length - busy - margin + 1))
    event = _event(attributes["kind"], attributes["pitch"], event_samples, rng)
    # Per-clip level jitter of +-3 dB keeps loud and quiet 16 dB apart.
    event *= EVENT_RMS[attributes["loudness"]] * 10 ** (rng.uniform(-3, 3) / 20) / np.sqrt(np.mean(event**2))
    waveform = rng.normal(0.0, BACKGROUND_RMS, size=length)
    position = onset
    for k in range(repeats):
        waveform[position : position + event_samples] += event
        position += event_samples + (gap_samples[k] if k < repeats - 1 else 0)
    return np.clip(waveform, -1.0, 1.0).astype(np.float32)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _event(kind: str, pitch: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """One sound event of ``n`` samples, with fades, at an arbitrary level."""
    t = np.arange(n) / SAMPLE_RATE
    if kind == "tone":
        frequency = rng.uniform(200, 400) if pitch == "low" else rng.uniform(1500, 3000)
        phase = rng.uniform(0, 2 * np.pi)
        signal = np.sin(2 * np.pi * frequency * t + phase) + rng.uniform(0, 0.3) * np.sin(4 * np.pi * frequency * t)
    elif kind in ("rising", "falling"):
        lower = rng.uniform(150, 250) if pitch == "low" else rng.uniform(1200, 1600)
        upper = lower * rng.uniform(2.5, 3.0)
        start, end = (lower, upper) if kind == "rising" else (upper, lower)
        signal = chirp(t, f0=start, t1=t[-1], f1=end, method="logarithmic")
    else:
        sos = _LOW_PASS if pitch == "low" else _HIGH_PASS
        # Filter a longer stretch and keep its end, so the filter's start-up transient is not in the event.
        signal = sosfilt(sos, rng.normal(size=n + SAMPLE_RATE // 20))[-n:]
    ramp = min(int(RAMP_SECONDS * SAMPLE_RATE), n // 2)
    fade = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
    signal[:ramp] *= fade
    signal[n - ramp :] *= fade[::-1]
    return signal


_LOW_PASS = butter(4, 500, btype="lowpass", fs=SAMPLE_RATE, output="sos")
_HIGH_PASS = butter(4, 3000, btype="highpass", fs=SAMPLE_RATE, output="sos")


def _plan_split(seed: int, split_index: int, size: int) -> list[dict[str, str]]:
    """Attributes per clip: every combination once per cycle of 64 clips, in random order."""
    combos = list(itertools.product(*ATTRIBUTES.values()))
    rng = np.random.default_rng([seed, 1, split_index])
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-size // len(combos)))])[:size]
    return [dict(zip(ATTRIBUTES, combos[k], strict=True)) for k in order]


def _write_demo(folder: Path, seed: int) -> dict:
    summary: dict = {"version": DEMO_VERSION, "seed": seed, "sample_rate": SAMPLE_RATE, "splits": {}}
    for split_index, (split, size) in enumerate(SPLIT_SIZES.items()):
        audio_dir = folder / f"clotho_audio_{split}"
        audio_dir.mkdir()
        caption_rows, attribute_rows = [], []
        for clip_index, attributes in enumerate(_plan_split(seed, split_index, size)):
            rng = np.random.default_rng([seed, 2, split_index, clip_index])
            # Spaces in the name, as in many real Clotho file names; the name does not give the attributes away.
            file_name = f"synth {split} {clip_index:04d}.wav"
            soundfile.write(audio_dir / file_name, synthesize_clip(attributes, rng), SAMPLE_RATE, subtype="PCM_16")
            captions = caption_clip(attributes, rng)
            caption_rows.append([file_name, *(captions[k] for k in rng.permutation(len(captions)))])
            attribute_rows.append([file_name, *attributes.values()])
        _write_csv(folder / f"clotho_captions_{split}.csv", ["file_name", *CLOTHO_CAPTION_COLUMNS], caption_rows)
        _write_csv(folder / f"demo_attributes_{split}.csv", ["file_name", *ATTRIBUTES], attribute_rows)
        summary["splits"][split] = {"clips": size, "captions": 5 * size}
    return summary


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
