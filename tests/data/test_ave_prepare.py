"""ave_prepare on mp4s the tests encode with PyAV: the frame nearest each second's middle, a 10 s 16 kHz mono wav,
short and corrupt videos counted, resuming after a finished or a killed call, and the entry point."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
import soundfile

from avlm.data import ave_prepare
from avlm.data.ave import read_clip_frames
from avlm.data.ave_prepare import SUMMARY_FILE, prepare_ave

REPO = Path(__file__).resolve().parents[2]
FPS = 4
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.5


def write_mp4(path: Path, seconds: float, *, size: int = 32, sample_rate: int = 44100, sound: bool = True) -> None:
    """A video at 4 fps whose frame i (second t, quarter q) is the flat colour (20 + 20 t, 40 + 60 q, 128), with a
    stereo 440 Hz tone of amplitude 0.5 in both channels (with ``sound``); the frame at a second's middle has q = 2."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as out:
        video = out.add_stream("mpeg4", rate=FPS)
        video.width = video.height = size
        video.pix_fmt = "yuv420p"
        video.bit_rate = 1_000_000
        audio = out.add_stream("aac", rate=sample_rate)
        audio.layout = "stereo"
        for index in range(round(seconds * FPS)):
            second, quarter = divmod(index, FPS)
            pixels = np.empty((size, size, 3), np.uint8)
            pixels[...] = (20 + 20 * second, 40 + 60 * quarter, 128)
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            frame.pts = index
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if not sound:
            return
        n = round(seconds * sample_rate)
        tone = (TONE_AMPLITUDE * np.sin(2 * np.pi * TONE_HZ * np.arange(n) / sample_rate)).astype(np.float32)
        for start in range(0, n, 1024):
            chunk = tone[start : start + 1024]
            frame = av.AudioFrame.from_ndarray(np.stack([chunk, chunk]), format="fltp", layout="stereo")
            frame.sample_rate = sample_rate
            frame.pts = start
            out.mux(audio.encode(frame))
        out.mux(audio.encode())


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> Path:
    """AVE/full.mp4 (10.5 s), short.mp4 (7 s), silent.mp4 (no audio stream), bad.mp4 (random bytes), made once."""
    folder = tmp_path_factory.mktemp("ave_videos") / "AVE"
    write_mp4(folder / "full.mp4", 10.5)
    write_mp4(folder / "short.mp4", 7.0)
    write_mp4(folder / "silent.mp4", 10.0, sound=False)
    (folder / "bad.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return folder


def copy_videos(videos: Path, data_dir: Path, names=("full", "short", "silent", "bad")) -> Path:
    (data_dir / "AVE").mkdir(parents=True)
    for name in names:
        shutil.copy(videos / f"{name}.mp4", data_dir / "AVE" / f"{name}.mp4")
    return data_dir


def mean_colours(root: Path, video_id: str) -> np.ndarray:
    return np.array(
        [np.asarray(f, dtype=np.float64).reshape(-1, 3).mean(axis=0) for f in read_clip_frames(root, video_id)]
    )


def test_decodes_frames_and_audio_and_names_the_corrupt_video(videos, tmp_path, caplog):
    data_dir = copy_videos(videos, tmp_path / "data")
    with caplog.at_level(logging.WARNING, logger="avlm.data.ave_prepare"):
        summary = prepare_ave(data_dir)
    assert (summary.decoded, summary.skipped_existing, summary.corrupt, summary.short) == (
        2,
        0,
        ["bad", "silent"],
        ["short"],
    )
    assert summary.out_dir == data_dir
    messages = [r.getMessage() for r in caplog.records]
    assert any("bad.mp4 is corrupt or undecodable" in m for m in messages)
    assert any("silent.mp4 is corrupt or undecodable, skipped: no audio stream" in m for m in messages)
    for name in ("bad", "silent"):
        assert not (data_dir / "frames" / name).exists() and not (data_dir / "audio" / f"{name}.wav").exists()
    assert sorted(p.name for p in (data_dir / "frames" / "full").iterdir()) == sorted(f"{t}.jpg" for t in range(10))

    # Second t's frame is the one at t + 0.5 s (quarter 2), never one of the 10.5 s video's last half second.
    colours = mean_colours(data_dir, "full")
    expected = np.array([[20 + 20 * t, 40 + 60 * 2, 128] for t in range(10)])
    np.testing.assert_allclose(colours, expected, atol=6)
    # The 7 s video repeats its last frame (second 6, quarter 3) for seconds 7, 8 and 9.
    colours = mean_colours(data_dir, "short")
    expected = np.array([[20 + 20 * t, 160, 128] for t in range(7)] + [[140, 220, 128]] * 3)
    np.testing.assert_allclose(colours, expected, atol=6)

    info = soundfile.info(data_dir / "audio" / "full.wav")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 160000, "PCM_16")
    audio, _ = soundfile.read(data_dir / "audio" / "full.wav", dtype="float32")
    spectrum = np.abs(np.fft.rfft(audio))
    assert np.argmax(spectrum) / 10 == TONE_HZ  # 10 s of signal: bin k is k / 10 Hz
    # Both channels averaged: the tone keeps its amplitude (RMS 0.5 / sqrt 2), not FFmpeg's +3 dB downmix.
    assert np.sqrt(np.mean(audio[8000:152000] ** 2)) == pytest.approx(TONE_AMPLITUDE / np.sqrt(2), rel=0.02)
    short, _ = soundfile.read(data_dir / "audio" / "short.wav", dtype="float32")
    assert short.shape == (160000,) and not short[113000:].any() and np.abs(short[8000:104000]).max() > 0.4

    written = json.loads((data_dir / SUMMARY_FILE).read_text())
    assert written == {
        "decoded": 2,
        "skipped_existing": 0,
        "corrupt": ["bad", "silent"],
        "short": ["short"],
        "out_dir": str(data_dir),
        "missing": [],
    }
    assert not list(data_dir.rglob(".*.tmp-*"))


def test_a_second_call_skips_finished_videos_and_redoes_an_incomplete_one(videos, tmp_path):
    data_dir = copy_videos(videos, tmp_path / "data", names=("full", "short"))
    out_dir = tmp_path / "extracted"
    assert prepare_ave(data_dir, out_dir).decoded == 2
    stamps = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.jpg")}
    again = prepare_ave(data_dir, out_dir)
    assert (again.decoded, again.skipped_existing, again.short) == (0, 2, [])
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*.jpg")} == stamps
    (out_dir / "frames" / "short" / "4.jpg").unlink()
    third = prepare_ave(data_dir, out_dir, video_ids=["short", "full", "absent"])
    assert (third.decoded, third.skipped_existing, third.short, third.missing) == (1, 1, ["short"], ["absent"])
    assert (out_dir / "frames" / "short" / "4.jpg").is_file()
    assert not (data_dir / "frames").exists()


def test_a_kill_while_writing_leaves_no_file_that_looks_finished(videos, tmp_path, monkeypatch):
    data_dir = copy_videos(videos, tmp_path / "data", names=("full",))

    def killed(path, *args, **kwargs):
        Path(path).write_bytes(b"RIFF half a wav")
        raise KeyboardInterrupt

    monkeypatch.setattr(ave_prepare.soundfile, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_ave(data_dir)
    assert len(list((data_dir / "frames" / "full").glob("*.jpg"))) == 10
    assert list((data_dir / "audio").iterdir()) == []  # neither the wav nor its temporary file
    monkeypatch.undo()
    assert prepare_ave(data_dir).decoded == 1
    assert soundfile.info(data_dir / "audio" / "full.wav").frames == 160000


def load_entrypoint():
    spec = importlib.util.spec_from_file_location("ave_prepare_entry", REPO / "entrypoints" / "ave_prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_entry_point_prints_one_line_and_exits_2_on_bad_data(videos, tmp_path, capsys):
    entry = load_entrypoint()
    data_dir = copy_videos(videos, tmp_path / "data", names=("full", "bad"))
    assert entry.main(["--data_dir", str(data_dir), "--out_dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out.strip()
    assert out == (
        f"ave_prepare: 1 decoded (0 short), 0 already prepared, 1 corrupt, 0 missing; "
        f"summary in {tmp_path / 'out' / SUMMARY_FILE}"
    )
    assert entry.main(["--data_dir", str(tmp_path / "nowhere")]) == 2
    assert "ave_prepare: error: AVE video folder" in capsys.readouterr().err
    assert entry.main(["--data_dir", str(data_dir), "--out", "x"]) == 2  # no abbreviations
    assert "unknown option '--out' (did you mean --out_dir?" in capsys.readouterr().err
