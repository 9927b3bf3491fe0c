"""White noise at a chosen signal-to-noise ratio, for the robustness study (captions of noisy audio).

The SNR is relative to each clip's own power, measured over the waveform as given (a clip padded with silence to
the encoder's length counts its padding, as the encoder sees it). The noise drawn is rescaled to the exact power
the SNR asks for, so the measured SNR of the result equals the requested one up to the waveform's float precision,
however short the clip.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch


def add_white_noise(
    waveform: np.ndarray | torch.Tensor, snr_db: float, generator: np.random.Generator | torch.Generator
) -> np.ndarray | torch.Tensor:
    """``waveform`` plus Gaussian white noise at ``snr_db`` dB below the waveform's mean power.

    A silent waveform (all zeros) has no power to be relative to: it stays silent (zero noise), so that a dataset's
    silent clip is evaluated as it is rather than stopping the evaluation; its SNR is undefined, not ``snr_db``.

    Args:
        waveform: samples (any shape: one clip, or a batch whose power is then measured over all of it); not changed.
        snr_db: 10·log10(signal power / noise power); any finite value (negative = more noise than signal).
        generator: draws the noise (a numpy ``Generator`` or a ``torch.Generator``): the same seed gives the same
            noise, and the same noise pattern at every SNR (only its level changes).

    Returns:
        A new waveform of the same type, shape and floating dtype (integer samples come back as float64), and for
        a tensor the same device.

    Raises:
        ValueError: ``snr_db`` is not finite, or the waveform holds a non-finite sample.
    """
    if not math.isfinite(snr_db):
        raise ValueError(f"snr_db must be finite, got {snr_db}")
    is_tensor = isinstance(waveform, torch.Tensor)
    signal = waveform.detach().cpu().double().numpy() if is_tensor else np.asarray(waveform, dtype=np.float64)
    if not np.isfinite(signal).all():
        raise ValueError("waveform holds a non-finite sample")
    if isinstance(generator, torch.Generator):
        noise = torch.randn(signal.shape, generator=generator, dtype=torch.float64).numpy()
    else:
        noise = generator.standard_normal(signal.shape)
    signal_power = float(np.mean(signal**2)) if signal.size else 0.0
    noise_power = float(np.mean(noise**2)) if noise.size else 0.0
    if signal_power == 0.0 or noise_power == 0.0:
        noisy = signal.copy()
    else:
        noisy = signal + noise * math.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    if is_tensor:
        dtype = waveform.dtype if waveform.is_floating_point() else torch.float64
        return torch.from_numpy(noisy).to(dtype=dtype, device=waveform.device)
    dtype = np.asarray(waveform).dtype
    return noisy.astype(dtype if np.issubdtype(dtype, np.floating) else np.float64)


def noise_generator(seed: int, clip_id: str) -> np.random.Generator:
    """The generator of one clip's noise: fixed by the seed and the clip's id (not its position, which changes with
    ``limit_clips``), and the same in every process (unlike Python's salted ``hash``)."""
    digest = hashlib.sha256(clip_id.encode()).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


def measured_snr_db(clean: np.ndarray | torch.Tensor, noisy: np.ndarray | torch.Tensor) -> float:
    """10·log10 of the clean waveform's power over that of ``noisy - clean`` (inf when they are equal)."""
    clean = np.asarray(clean, dtype=np.float64)
    noise_power = float(np.mean((np.asarray(noisy, dtype=np.float64) - clean) ** 2))
    return math.inf if noise_power == 0.0 else 10.0 * math.log10(float(np.mean(clean**2)) / noise_power)
