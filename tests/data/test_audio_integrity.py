"""Audio decode checks: every sample decoded once (a readable header is not enough), remembered while unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image

from avlm.data import integrity
from avlm.data.integrity import audio_problems, frame_problems


def write_wav(path: Path, samples: np.ndarray) -> str:
    soundfile.write(path, samples.astype(np.float32), 16_000, subtype="FLOAT")
    return str(path)


@pytest.fixture
def decodes(file_record: Path, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the audio files decoded by the checks, in order (with a fresh record)."""
    calls: list[int] = []
    read = soundfile.read

    def counting(file, *args, **kwargs):
        calls.append(len(file.getbuffer()))
        return read(file, *args, **kwargs)

    monkeypatch.setattr(integrity.soundfile, "read", counting)
    return calls


def test_audio_that_passes_a_header_check_but_does_not_decode_is_named(tmp_path: Path, decodes: list[int]) -> None:
    tone = write_wav(tmp_path / "tone.wav", 0.1 * np.sin(np.arange(800) / 5))
    nan = write_wav(tmp_path / "nan.wav", np.full(800, np.nan))
    silent = write_wav(tmp_path / "empty.wav", np.zeros(0))
    cut = tmp_path / "cut.flac"  # a good header, then bytes that are not FLAC frames
    soundfile.write(cut, np.random.default_rng(0).uniform(-0.5, 0.5, 32_000), 16_000)
    data = bytearray(cut.read_bytes())
    data[200:] = bytes((b * 31 + 7) % 256 for b in data[200:])
    cut.write_bytes(bytes(data))
    assert soundfile.info(nan).frames == 800 and soundfile.info(str(cut)).frames == 32_000  # headers are fine
    missing = str(tmp_path / "gone.wav")

    problems = audio_problems([tone, nan, silent, str(cut), missing, tone], "a split")
    assert problems == {
        nan: "holds NaN or infinite samples",
        silent: "no samples",
        str(cut): problems[str(cut)],
        missing: "cannot be read: No such file or directory",
    }
    assert problems[str(cut)].startswith("does not decode: ")
    assert len(decodes) == 4  # each file present decoded once, the repeated one too


def test_audio_is_decoded_once_while_unchanged_and_an_image_check_never_vouches_for_it(
    tmp_path: Path, decodes: list[int]
) -> None:
    tones = [write_wav(tmp_path / f"{k}.wav", 0.1 * np.sin(np.arange(400 + k) / 5)) for k in range(3)]
    assert audio_problems(tones, "clips") == {} and len(decodes) == 3
    assert audio_problems(tones, "clips") == {} and len(decodes) == 3  # the second pass only stats
    write_wav(Path(tones[1]), np.full(401, np.inf))  # rewritten: decoded again, refused on every pass
    for expected in (4, 5):
        assert audio_problems(tones, "clips") == {tones[1]: "holds NaN or infinite samples"}
        assert len(decodes) == expected
    # A file the record knows as a decoding image is still decoded as audio (and refused as such).
    image = tmp_path / "frame.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(image)
    assert frame_problems([str(image)], "frames") == {}
    assert audio_problems([str(image)], "clips")[str(image)].startswith("does not decode: ")
    assert len(decodes) == 6
