"""White noise at a requested SNR: the measured SNR, determinism, silent clips, types."""

import math

import numpy as np
import pytest
import torch

from avlm.data.noise import add_white_noise, measured_snr_db, noise_generator


def tone(seconds: float = 10.0, rate: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-t / seconds)).astype(np.float32)


@pytest.mark.parametrize("snr_db", [30.0, 20.0, 10.0, 0.0, -5.0])
def test_measured_snr_equals_the_requested_one_on_a_long_clip(snr_db):
    clean = tone()
    noisy = add_white_noise(clean, snr_db, np.random.default_rng(0))
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    assert abs(measured_snr_db(clean, noisy) - snr_db) < 0.01
    # independently of the helper: noise power = signal power / 10^(snr/10)
    noise = noisy.astype(np.float64) - clean
    expected = np.mean(clean.astype(np.float64) ** 2) / 10 ** (snr_db / 10)
    assert np.mean(noise**2) == pytest.approx(expected, rel=1e-3)


def test_tensors_come_back_as_tensors_at_the_requested_snr():
    clean = torch.from_numpy(tone(2.0)).reshape(2, -1)
    noisy = add_white_noise(clean, 10.0, torch.Generator().manual_seed(3))
    assert isinstance(noisy, torch.Tensor) and noisy.dtype == torch.float32 and noisy.shape == clean.shape
    assert abs(measured_snr_db(clean.numpy(), noisy.numpy()) - 10.0) < 0.01
    again = add_white_noise(clean, 10.0, torch.Generator().manual_seed(3))
    assert torch.equal(noisy, again)


def test_same_seed_same_noise_and_the_same_pattern_at_every_snr():
    clean = tone(1.0)
    first = add_white_noise(clean, 20.0, noise_generator(0, "clip_a.wav"))
    assert np.array_equal(first, add_white_noise(clean, 20.0, noise_generator(0, "clip_a.wav")))
    assert not np.array_equal(first, add_white_noise(clean, 20.0, noise_generator(0, "clip_b.wav")))
    assert not np.array_equal(first, add_white_noise(clean, 20.0, noise_generator(1, "clip_a.wav")))
    # 10 dB less SNR: the same noise, sqrt(10) times louder
    louder = add_white_noise(clean, 10.0, noise_generator(0, "clip_a.wav"))
    np.testing.assert_allclose(louder - clean, (first - clean) * math.sqrt(10), rtol=1e-4, atol=1e-6)


def test_a_silent_clip_stays_silent():
    silent = np.zeros(16000, dtype=np.float32)
    noisy = add_white_noise(silent, 0.0, np.random.default_rng(0))
    assert np.array_equal(noisy, silent) and noisy is not silent
    assert measured_snr_db(silent, noisy) == math.inf


def test_the_input_is_left_unchanged_and_bad_values_are_refused():
    clean = tone(0.5)
    kept = clean.copy()
    add_white_noise(clean, 0.0, np.random.default_rng(0))
    assert np.array_equal(clean, kept)
    with pytest.raises(ValueError, match="snr_db"):
        add_white_noise(clean, math.inf, np.random.default_rng(0))
    clean[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        add_white_noise(clean, 10.0, np.random.default_rng(0))
