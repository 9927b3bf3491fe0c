"""AudioCaps and Clotho readers on tiny look-alikes, load_audio, the caption Dataset, and the built-in demo data."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from avlm.data import (
    CAPTION_DEMO_VERSION,
    AudioCaptionDataset,
    AudioCaptionRecord,
    audio_manifest_hash,
    caption_reference_hash,
    collate_audio_captions,
    ensure_caption_demo,
    load_audio,
    load_audiocaps,
    load_clotho,
)
from avlm.data import caption_demo as demo_module
from avlm.data.generated import COMPLETE_MARKER
from avlm.errors import DataError

AUDIOCAPS_HEADER = "audiocap_id,youtube_id,start_time,caption\n"
CLOTHO_HEADER = ["file_name", "caption_1", "caption_2", "caption_3", "caption_4", "caption_5"]


def write_sine(
    path: Path, seconds: float = 0.1, sample_rate: int = 16_000, frequency: float = 440.0, channels: int = 1
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    wave = 0.5 * np.sin(2 * np.pi * frequency * t)
    soundfile.write(path, np.stack([wave] * channels, axis=1) if channels > 1 else wave, sample_rate)


def write_clotho_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([CLOTHO_HEADER, *rows])


# ---------------------------------------------------------------------------------------------------- AudioCaps


@pytest.fixture
def audiocaps(tmp_path: Path) -> Path:
    # Written by hand, quoted as in the real files; val rows of the two clips interleave on purpose.
    (tmp_path / "train.csv").write_text(
        AUDIOCAPS_HEADER
        + '97151,vfY_TJq7n_U,130,"Rustling occurs, ducks quack and water splashes"\n'
        + "2,yt_b,0,Rain falls on a roof\n"
        + '3,yt-c,10.5,"A man speaks, then, a door slams"\n'
    )
    (tmp_path / "val.csv").write_text(
        AUDIOCAPS_HEADER + "".join(f"{10 + k},{'yt_d' if k % 2 == 0 else 'yt_e'},20,Caption {k}\n" for k in range(10))
    )
    (tmp_path / "test.csv").write_text(AUDIOCAPS_HEADER + "".join(f"{30 + k},yt_f,0,Test {k}\n" for k in range(5)))
    audio = tmp_path / "audio"
    write_sine(audio / "train" / "vfY_TJq7n_U.wav")
    write_sine(audio / "train" / "2.flac")  # named by audiocap_id
    write_sine(audio / "train" / "yt-c.flac")
    write_sine(audio / "train" / "yt-c.wav")  # .wav is preferred over .flac
    write_sine(audio / "val" / "yt_d.wav")
    write_sine(audio / "val" / "15.flac")  # yt_e's third audiocap_id (rows 11, 13, 15, 17, 19)
    write_sine(audio / "test" / "yt_f.wav")
    return tmp_path


def test_audiocaps_groups_references_by_youtube_id(audiocaps: Path) -> None:
    data = load_audiocaps(audiocaps)
    assert set(data) == {"train", "val", "test"}
    train = data["train"]
    assert [r.clip_id for r in train] == ["vfY_TJq7n_U", "yt_b", "yt-c"]
    assert [r.captions for r in train] == [
        ("Rustling occurs, ducks quack and water splashes",),
        ("Rain falls on a roof",),
        ("A man speaks, then, a door slams",),
    ]
    assert [Path(r.audio_path).name for r in train] == ["vfY_TJq7n_U.wav", "2.flac", "yt-c.wav"]
    assert all(Path(r.audio_path).is_absolute() and r.split == "train" for r in train)
    val = data["val"]
    assert [r.clip_id for r in val] == ["yt_d", "yt_e"]
    assert val[0].captions == tuple(f"Caption {k}" for k in (0, 2, 4, 6, 8))
    assert val[1].captions == tuple(f"Caption {k}" for k in (1, 3, 5, 7, 9))
    assert Path(val[1].audio_path) == (audiocaps / "audio" / "val" / "15.flac").resolve()
    assert [len(r.captions) for r in data["test"]] == [5]


def test_audiocaps_youtube_id_with_two_start_times(audiocaps: Path) -> None:
    (audiocaps / "test.csv").write_text(AUDIOCAPS_HEADER + "1,yt_f,0,One\n2,yt_f,30,Two\n")
    with pytest.raises(DataError, match=r"test\.csv, line 3: youtube_id 'yt_f' has start_time 30 but 0 on line 2"):
        load_audiocaps(audiocaps, splits="test")


def test_audiocaps_missing_csv_names_file(audiocaps: Path) -> None:
    with pytest.raises(DataError, match=r"validation\.csv does not exist \(splits are \('train', 'val', 'test'\)\)"):
        load_audiocaps(audiocaps, splits=("train", "validation"))


def test_missing_root_mentions_demo(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="demo") as info:
        load_clotho(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


# ---------------------------------------------------------------------------------------------------- Clotho


@pytest.fixture
def clotho(tmp_path: Path) -> Path:
    # Real Clotho names hold spaces and commas; captions hold commas.
    names = ["Water Boiling.wav", "birds, morning 01.wav", "x.wav"]
    for split in ("development", "validation", "evaluation"):
        rows = [[name, *(f"{split} {name} caption {k}, with a comma" for k in range(1, 6))] for name in names]
        write_clotho_csv(tmp_path / f"clotho_captions_{split}.csv", rows)
        for name in names:
            write_sine(tmp_path / f"clotho_audio_{split}" / name)
    return tmp_path


def test_clotho_reads_five_captions_per_file(clotho: Path) -> None:
    data = load_clotho(clotho)
    assert list(data) == ["development", "validation", "evaluation"]
    dev = data["development"]
    assert [r.clip_id for r in dev] == ["Water Boiling.wav", "birds, morning 01.wav", "x.wav"]
    assert dev[1].captions == tuple(f"development birds, morning 01.wav caption {k}, with a comma" for k in range(1, 6))
    assert Path(dev[1].audio_path) == (clotho / "clotho_audio_development" / "birds, morning 01.wav").resolve()
    assert load_clotho(clotho, splits="evaluation")["evaluation"][2].split == "evaluation"


def test_clotho_file_name_with_leading_space_is_kept_verbatim(clotho: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Official Clotho names can begin with a space; stripping it would look for a file that does not exist.
    names = [" clip.wav", "trailing .wav", "plain.wav"]
    write_clotho_csv(
        clotho / "clotho_captions_validation.csv",
        [[name, "  A caption.  ", "b", "c", "d", "e "] for name in names],
    )
    audio_dir = clotho / "clotho_audio_validation"
    for name in names:
        write_sine(audio_dir / name)
    records = load_clotho(clotho, splits="validation")["validation"]
    assert [r.clip_id for r in records] == names
    assert Path(records[0].audio_path) == (audio_dir / " clip.wav").resolve()
    assert records[0].captions == ("A caption.", "b", "c", "d", "e")  # captions are still stripped
    # Messages quote names, so the leading space shows.
    (audio_dir / " clip.wav").unlink()
    with caplog.at_level(logging.WARNING, logger="avlm.data.audio_captions"):
        kept = load_clotho(clotho, splits="validation", max_missing_fraction=0.5)["validation"]
    assert [r.clip_id for r in kept] == names[1:]
    assert "' clip.wav' (missing)" in caplog.text
    # A blank file_name is still an empty field.
    write_clotho_csv(clotho / "clotho_captions_validation.csv", [["   ", "a", "b", "c", "d", "e"]])
    with pytest.raises(DataError, match="line 2: empty file_name"):
        load_clotho(clotho, splits="validation")


def test_missing_and_unreadable_audio_are_named_and_skipped(
    clotho: Path, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    names = [f"clip {i}.wav" for i in range(10)]
    write_clotho_csv(clotho / "clotho_captions_validation.csv", [[n, "a", "b", "c", "d", "e"] for n in names])
    audio_dir = clotho / "clotho_audio_validation"
    for name in names:
        write_sine(audio_dir / name)
    (audio_dir / "clip 3.wav").unlink()
    (audio_dir / "clip 7.wav").write_bytes(b"")  # a failed download
    with caplog.at_level(logging.INFO, logger="avlm.data.audio_captions"):
        records = load_clotho(clotho, splits="validation")["validation"]
    assert [r.clip_id for r in records] == [n for n in names if n not in ("clip 3.wav", "clip 7.wav")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Clotho validation: 2 of 10 clips (20.0%) have no readable audio" in warnings[0]
    assert "'clip 3.wav' (missing)" in warnings[0] and "'clip 7.wav' (unreadable" in warnings[0]
    assert "8 clips, 40 captions (5 per clip), 2 skipped for missing audio" in caplog.text
    # Without verification an empty file is only found when it is loaded.
    unverified = load_clotho(clotho, splits="validation", verify_audio=False)["validation"]
    assert len(unverified) == 9


def test_long_missing_list_is_shortened(clotho: Path, caplog: pytest.LogCaptureFixture) -> None:
    names = [f"c{i:02d}.wav" for i in range(40)]
    write_clotho_csv(clotho / "clotho_captions_evaluation.csv", [[n, "a", "b", "c", "d", "e"] for n in names])
    for name in names[8:]:
        write_sine(clotho / "clotho_audio_evaluation" / name)
    with caplog.at_level(logging.WARNING, logger="avlm.data.audio_captions"):
        assert len(load_clotho(clotho, splits="evaluation")["evaluation"]) == 32
    assert (
        "'c00.wav' (missing), 'c01.wav' (missing), 'c02.wav' (missing), 'c03.wav' (missing), 'c04.wav' (missing)"
        in caplog.text
    )
    assert "and 3 more" in caplog.text and "c05.wav" not in caplog.text


def test_too_much_missing_audio_names_the_folder(audiocaps: Path) -> None:
    (audiocaps / "audio" / "train" / "2.flac").unlink()
    with pytest.raises(DataError, match="AudioCaps train: 1 of 3 clips") as info:
        load_audiocaps(audiocaps, splits="train")
    message = str(info.value)
    assert str((audiocaps / "audio" / "train").resolve()) in message
    assert "'yt_b' (missing)" in message and "max_missing_fraction=0.2" in message
    assert "expected files named <youtube_id> or <audiocap_id> with extension .wav or .flac" in message
    assert len(load_audiocaps(audiocaps, splits="train", max_missing_fraction=0.5)["train"]) == 2


def test_absent_audio_folder_is_said_so(clotho: Path) -> None:
    for path in (clotho / "clotho_audio_validation").iterdir():
        path.unlink()
    (clotho / "clotho_audio_validation").rmdir()
    with pytest.raises(DataError, match=r"clotho_audio_validation \(folder does not exist\)"):
        load_clotho(clotho, splits="validation")
    with pytest.raises(ValueError, match="max_missing_fraction"):
        load_clotho(clotho, max_missing_fraction=1.5)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("file_name,caption_1,caption_2,caption_3,caption_4\nx.wav,a,b,c,d\n", r"lacks column\(s\) \['caption_5'\]"),
        (
            "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\nx.wav,a,b,c,d,e\nx.wav,a,b, ,d,e\n",
            "line 3: empty caption_3",
        ),
        (
            "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\nx.wav,a,b,c,d,e, f\n",
            "line 2: row has 7 fields",
        ),
        (
            "file_name,caption_1,caption_2,caption_3,caption_4,caption_5\nx.wav,a,b,c,d,e\nx.wav,a,b,c,d,e\n",
            "line 3: file_name 'x.wav' is also on line 2",
        ),
        ("file_name,caption_1,caption_2,caption_3,caption_4,caption_5\n", "has no caption rows"),
    ],
    ids=["missing-column", "empty-caption", "unquoted-comma", "duplicate-file", "no-rows"],
)
def test_malformed_clotho_csv_names_file_and_line(clotho: Path, content: str, expected: str) -> None:
    csv_path = clotho / "clotho_captions_validation.csv"
    csv_path.write_text(content)
    with pytest.raises(DataError, match=expected) as info:
        load_clotho(clotho)
    assert str(csv_path.resolve()) in str(info.value)


def test_malformed_audiocaps_rows_name_file_and_line(audiocaps: Path) -> None:
    csv_path = (audiocaps / "val.csv").resolve()
    # The quoted caption spans lines 2-3, so the bad row starts on line 4.
    csv_path.write_text(AUDIOCAPS_HEADER + '1,yt_d,0,"Two\nlines"\n2,yt_d,0,""\n')
    with pytest.raises(DataError, match=re.escape(f"{csv_path}, line 4: empty caption")):
        load_audiocaps(audiocaps)
    csv_path.write_text(AUDIOCAPS_HEADER + "1,yt_d,soon,A caption\n")
    with pytest.raises(DataError, match=re.escape(f"{csv_path}, line 2: start_time must be a number")):
        load_audiocaps(audiocaps)
    csv_path.write_bytes(AUDIOCAPS_HEADER.encode() + b"1,yt_d,0,caf\xe9\n")
    with pytest.raises(DataError, match="not UTF-8"):
        load_audiocaps(audiocaps)


# ---------------------------------------------------------------------------------------------------- load_audio


def peak_frequency(waveform: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(waveform * np.hanning(len(waveform))))
    return float(np.fft.rfftfreq(len(waveform), 1 / sample_rate)[spectrum.argmax()])


def test_resampling_keeps_frequency_and_duration(tmp_path: Path) -> None:
    path = tmp_path / "sine_44k.wav"
    write_sine(path, seconds=1.0, sample_rate=44_100, frequency=1000.0)
    waveform = load_audio(path, sample_rate=16_000)
    assert waveform.dtype == np.float32 and waveform.shape == (16_000,)
    assert peak_frequency(waveform, 16_000) == pytest.approx(1000.0, abs=1.0)
    # Away from the edges the amplitude is kept (0.5) and nothing above the new Nyquist leaks in.
    assert np.abs(waveform[1000:-1000]).max() == pytest.approx(0.5, abs=0.01)
    # 22.05 kHz stereo → 16 kHz mono: channels are averaged, so identical channels give the same signal.
    stereo = tmp_path / "sine_22k_stereo.flac"
    write_sine(stereo, seconds=0.5, sample_rate=22_050, frequency=3000.0, channels=2)
    mono = load_audio(stereo, sample_rate=16_000)
    assert mono.shape == (8000,)
    assert peak_frequency(mono, 16_000) == pytest.approx(3000.0, abs=2.0)
    assert np.abs(mono[500:-500]).max() == pytest.approx(0.5, abs=0.01)


def test_channels_are_averaged(tmp_path: Path) -> None:
    path = tmp_path / "left_only.wav"
    left = 0.5 * np.sin(2 * np.pi * 200 * np.arange(1600) / 16_000)
    soundfile.write(path, np.stack([left, np.zeros_like(left)], axis=1), 16_000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path, 16_000), left / 2, atol=1e-7)


def test_pad_and_truncate(tmp_path: Path) -> None:
    path = tmp_path / "short.wav"
    write_sine(path, seconds=0.1, frequency=440.0)  # 1600 samples
    full = load_audio(path, 16_000)
    padded = load_audio(path, 16_000, num_samples=4000)
    assert padded.shape == (4000,)
    np.testing.assert_array_equal(padded[:1600], full)
    assert not padded[1600:].any()
    truncated = load_audio(path, 16_000, num_samples=1000)
    np.testing.assert_array_equal(truncated, full[:1000])
    # Resampling first, then the fixed length at the target rate.
    assert load_audio(path, 8000, num_samples=1000).shape == (1000,)
    with pytest.raises(ValueError, match="positive"):
        load_audio(path, 16_000, num_samples=0)


def test_corrupt_or_empty_audio_is_named(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"RIFF" + b"\x00" * 40)
    with pytest.raises(DataError, match=re.escape(f"cannot read audio {corrupt}")):
        load_audio(corrupt, 16_000)
    empty = tmp_path / "empty.wav"
    soundfile.write(empty, np.zeros(0), 16_000)
    with pytest.raises(DataError, match=re.escape(f"audio file {empty} has no samples")):
        load_audio(empty, 16_000)
    with pytest.raises(DataError, match="missing.flac"):
        load_audio(tmp_path / "missing.flac", 16_000)


# ---------------------------------------------------------------------------------------------------- Dataset, hashes


def test_dataset_views_and_collate(clotho: Path) -> None:
    records = load_clotho(clotho, splits="development")["development"]
    clips = AudioCaptionDataset(records, sample_rate=8000, num_samples=1200)
    assert len(clips) == 3
    item = clips[1]
    assert item["clip_id"] == "birds, morning 01.wav" and item["index"] == 1
    assert item["waveform"].shape == (1200,) and item["waveform"].dtype == torch.float32
    assert item["captions"] == list(records[1].captions) and "caption" not in item
    assert not item["waveform"][800:].any()  # 0.1 s at 8 kHz, then zero padding

    pairs = AudioCaptionDataset(records, sample_rate=8000, num_samples=1200, view="pairs")
    assert len(pairs) == 15
    assert [pairs[i]["caption"] for i in range(5, 10)] == list(records[1].captions)
    assert pairs[7]["clip_id"] == records[1].clip_id
    assert torch.equal(pairs[7]["waveform"], item["waveform"])

    batch = next(iter(torch.utils.data.DataLoader(pairs, batch_size=4, collate_fn=collate_audio_captions)))
    assert batch["waveform"].shape == (4, 1200)
    assert batch["clip_id"] == [records[0].clip_id] * 4
    assert batch["caption"] == list(records[0].captions[:4])
    assert batch["captions"] == [list(records[0].captions)] * 4
    assert batch["index"].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="view"):
        AudioCaptionDataset(records, 8000, 1200, view="captions")


def test_hashes_are_stable_and_sensitive(tmp_path: Path, file_record: Path) -> None:
    write_sine(tmp_path / "x" / "a.wav", frequency=440.0)
    write_sine(tmp_path / "x" / "b.wav", frequency=220.0)
    shutil.copytree(tmp_path / "x", tmp_path / "elsewhere")
    records = [
        AudioCaptionRecord("a", str(tmp_path / "x" / "a.wav"), ("one dog", "two dogs"), "val"),
        AudioCaptionRecord("b", str(tmp_path / "x" / "b.wav"), ("rain",), "val"),
    ]
    moved = [
        AudioCaptionRecord(r.clip_id, str(tmp_path / "elsewhere" / Path(r.audio_path).name), r.captions, "test")
        for r in records
    ]
    assert audio_manifest_hash(records) == audio_manifest_hash(moved)
    assert caption_reference_hash(records) == caption_reference_hash(moved)
    assert len(audio_manifest_hash(records)) == 64
    assert audio_manifest_hash(records[:1]) != audio_manifest_hash(records)
    assert audio_manifest_hash(records[::-1]) != audio_manifest_hash(records)
    edited = [records[0], AudioCaptionRecord("b", records[1].audio_path, ("rain.",), "val")]
    assert audio_manifest_hash(edited) == audio_manifest_hash(records)
    # Other audio under the same name changes it: a feature cache keyed on it cannot serve the old tokens.
    write_sine(Path(moved[1].audio_path), seconds=0.2, frequency=330.0)
    assert audio_manifest_hash(moved) != audio_manifest_hash(records)
    assert caption_reference_hash(edited) != caption_reference_hash(records)
    # Caption boundaries count: ("one dog", "two dogs") is not ("one dog two dogs",).
    joined = [AudioCaptionRecord("a", "/data/x/audio/a.wav", ("one dog two dogs",), "val"), records[1]]
    assert caption_reference_hash(joined) != caption_reference_hash(records)


# ---------------------------------------------------------------------------------------------------- demo data

# The words by which a caption states each attribute (plural "s" stripped before matching).
ATTRIBUTE_WORDS = {
    "kind": {
        "tone": {"beep", "tone"},
        "rising": {"rising", "upward"},
        "falling": {"falling", "downward"},
        "noise": {"noise"},
    },
    "pitch": {"low": {"low", "deep"}, "high": {"high"}},
    "rhythm": {"single": {"once", "single"}, "repeated": {"three", "repeatedly"}},
    "duration": {"short": {"short", "brief"}, "long": {"long", "lengthy"}},
    "loudness": {"loud": {"loud", "strong", "loudly"}, "quiet": {"quiet", "soft", "faint", "quietly", "softly"}},
}


def attributes_stated(caption: str) -> dict[str, str]:
    words = {w.rstrip("s") for w in re.findall(r"[a-z]+", caption.lower())}
    stated = {}
    for attribute, values in ATTRIBUTE_WORDS.items():
        found = [value for value, cues in values.items() if words & cues]
        assert len(found) == 1, f"{caption!r} states {attribute} as {found}"
        stated[attribute] = found[0]
    return stated


def attributes_heard(path: Path) -> dict[str, str]:
    """Measure the attributes from the waveform: 10 ms frame levels, event count and lengths, spectrum."""
    waveform, sample_rate = soundfile.read(path)
    frame = sample_rate // 100
    levels = np.sqrt((waveform[: len(waveform) // frame * frame].reshape(-1, frame) ** 2).mean(axis=1))
    active = levels > 4 * demo_module.BACKGROUND_RMS
    edges = np.diff(np.concatenate([[0], active.astype(int), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    # Low-passed noise dips below the gate for a frame or two; a real gap between repeats is >= 100 ms.
    keep = np.concatenate([[True], starts[1:] - ends[:-1] >= 5])
    starts, ends = starts[keep], np.concatenate([ends[:-1][keep[1:]], ends[-1:]])
    event = waveform[starts[0] * frame : ends[0] * frame]
    third = len(event) // 3
    spectrum = np.abs(np.fft.rfft(event * np.hanning(len(event)))) ** 2
    centroid = (spectrum * np.fft.rfftfreq(len(event), 1 / sample_rate)).sum() / spectrum.sum()
    heard = {
        "pitch": "high" if centroid > 1000 else "low",
        "rhythm": {1: "single", 3: "repeated"}.get(len(starts), f"{len(starts)} events"),
        "duration": "long" if (ends - starts).max() * frame / sample_rate > 0.3 else "short",
        "loudness": "loud" if levels.max() > 0.05 else "quiet",
    }
    start_pitch = peak_frequency(event[:third], sample_rate)
    end_pitch = peak_frequency(event[-third:], sample_rate)
    heard["sweep"] = (
        "rising" if end_pitch > 1.3 * start_pitch else "falling" if start_pitch > 1.3 * end_pitch else "flat"
    )
    return heard


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    start = time.perf_counter()
    folder = ensure_caption_demo(tmp_path_factory.mktemp("cache"), seed=0)
    return folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def demo(generated: tuple[Path, float]) -> Path:
    return generated[0]


def test_demo_is_quick_and_in_clotho_layout(generated: tuple[Path, float]) -> None:
    folder, seconds = generated
    assert folder.name == f"caption_demo_{CAPTION_DEMO_VERSION}_s0"
    assert (folder / COMPLETE_MARKER).is_file()
    assert seconds < 30  # about 2 s on 2 cores
    data = load_clotho(folder)
    assert {split: len(records) for split, records in data.items()} == demo_module.SPLIT_SIZES
    info = soundfile.info(data["development"][0].audio_path)
    assert (info.samplerate, info.channels, info.subtype) == (16_000, 1, "PCM_16")
    assert all(1.6 <= soundfile.info(r.audio_path).duration <= 2.0 for r in data["validation"])
    vocabulary = {w for records in data.values() for r in records for c in r.captions for w in c.lower().split()}
    assert len(vocabulary) < 70


def test_demo_same_seed_is_byte_identical(demo: Path, tmp_path: Path) -> None:
    again = ensure_caption_demo(tmp_path, seed=0)
    assert again != demo
    first, second = tree_digest(demo), tree_digest(again)
    assert first == second
    assert len([name for name in first if name.endswith(".wav")]) == 600
    records = load_clotho(demo)["evaluation"]
    assert audio_manifest_hash(records) == audio_manifest_hash(load_clotho(again)["evaluation"])


def test_demo_other_seed_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "SPLIT_SIZES", {"development": 4, "validation": 2, "evaluation": 2})
    a = load_clotho(ensure_caption_demo(tmp_path / "a", seed=0))["development"]
    b = load_clotho(ensure_caption_demo(tmp_path / "b", seed=1))["development"]
    assert caption_reference_hash(a) != caption_reference_hash(b)
    assert Path(a[0].audio_path).read_bytes() != Path(b[0].audio_path).read_bytes()


def test_demo_captions_say_what_is_heard(demo: Path) -> None:
    records = load_clotho(demo, splits="validation")["validation"]
    with open(demo / "demo_attributes_validation.csv", encoding="utf-8") as f:
        truth = {row.pop("file_name"): row for row in csv.DictReader(f)}
    for record in records:
        assert len(set(record.captions)) == 5, record.captions
        attributes = truth[record.clip_id]
        for caption in record.captions:
            assert attributes_stated(caption) == attributes, caption
        heard = attributes_heard(Path(record.audio_path))
        for name in ("pitch", "rhythm", "duration", "loudness"):
            assert heard[name] == attributes[name], (record.clip_id, name, heard)
        if attributes["kind"] in ("rising", "falling"):
            assert heard["sweep"] == attributes["kind"], (record.clip_id, heard)
        elif attributes["kind"] == "tone":
            assert heard["sweep"] == "flat", (record.clip_id, heard)
    # Every combination of the 64 is used at least once in 100 clips, so every attribute is varied.
    assert len({tuple(a.values()) for a in truth.values()}) == 64


def test_demo_second_call_reuses(demo: Path) -> None:
    marker = demo / COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_caption_demo(demo.parent, seed=0) == demo
    assert time.perf_counter() - start < 0.5
    assert marker.stat().st_mtime_ns == stamp


def test_demo_dataset_feeds_fixed_length_batches(demo: Path) -> None:
    records = load_clotho(demo, splits="evaluation")["evaluation"]
    dataset = AudioCaptionDataset(records, sample_rate=16_000, num_samples=32_000, view="pairs")
    assert len(dataset) == 500
    batch = collate_audio_captions([dataset[i] for i in range(0, 500, 50)])
    assert batch["waveform"].shape == (10, 32_000)
    assert all(c in refs for c, refs in zip(batch["caption"], batch["captions"], strict=True))
