"""The AVE demo: the extracted layout the reader takes, deterministic, an audio cue on event seconds only, and a
class cue that the tiny frame encoder reads at 176 px but not at 80 px."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import soundfile
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from avlm.ave.features import build_frame_encoder, frame_pixels
from avlm.data.ave import load_ave_splits, missing_extracted, read_clip_audio, read_clip_frames
from avlm.data.ave_demo import DEMO_VERSION, ensure_ave_demo
from avlm.data.generated import COMPLETE_MARKER

CLASSES = ["background", "bell", "dog", "engine", "violin"]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_ave_demo(tmp_path_factory.mktemp("ave_demo"), seed=0, videos=(6, 3, 3))


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_layout_is_what_the_reader_takes(small: Path) -> None:
    assert small.name == f"ave_demo_{DEMO_VERSION}_s0_6-3-3"
    assert (small / COMPLETE_MARKER).is_file()
    annotations = (small / "Annotations.txt").read_text().splitlines()
    assert annotations[0] == "Category&VideoID&Quality&StartTime&EndTime"
    split_rows = [(small / f"{name}Set.txt").read_text().splitlines() for name in ("train", "val", "test")]
    # Split files have no header and together hold exactly the rows of Annotations.txt, in order.
    assert annotations[1:] == [row for rows in split_rows for row in rows]
    assert [len(rows) for rows in split_rows] == [6, 3, 3]

    splits = load_ave_splits(small)
    assert splits.classes == CLASSES
    assert splits.cross_split_ids == {}
    ids = [clip.video_id for split in ("train", "val", "test") for clip in splits.clips[split]]
    assert ids == [f"demo{n:05d}" for n in range(12)]
    assert missing_extracted(small, ids) == []
    train_classes = []
    for clip in splits.clips["train"] + splits.clips["val"] + splits.clips["test"]:
        (event,) = clip.events
        assert 1 <= event.end - event.start <= 6 and event.quality == "good"
        labels = clip.labels(splits.classes)
        assert labels.dtype == np.int64 and labels.shape == (10,)
        assert set(np.flatnonzero(labels)) == set(range(event.start, event.end))
        if clip.split == "train":
            train_classes.append(event.category)
    # 6 train clips over 4 classes by quota: two classes twice, two once.
    assert sorted(train_classes.count(c) for c in CLASSES[1:]) == [1, 1, 2, 2]

    with Image.open(small / "frames" / "demo00004" / "9.jpg") as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (176, 176))
    info = soundfile.info(small / "audio" / "demo00004.wav")
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (16000, 1, 160000, "PCM_16")


def test_same_seed_same_bytes_other_seed_other_data(small: Path, tmp_path: Path) -> None:
    again = ensure_ave_demo(tmp_path / "a", seed=0, videos=(6, 3, 3))
    assert tree_digest(again) == tree_digest(small)
    other = ensure_ave_demo(tmp_path / "b", seed=1, videos=(6, 3, 3))
    assert (other / "Annotations.txt").read_bytes() != (small / "Annotations.txt").read_bytes()
    assert ensure_ave_demo(tmp_path / "a", seed=0, videos=(6, 3, 3)) == again  # generated once, then found


@pytest.mark.parametrize("videos", [(0, 1, 1), (4, -1, 1), (4, 1)])
def test_bad_sizes_refused(videos: tuple, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="videos must be 3 clip counts"):
        ensure_ave_demo(tmp_path, videos=videos)


def test_audio_cue_is_loud_on_event_seconds_only(small: Path) -> None:
    splits = load_ave_splits(small)
    for clip in splits.clips["train"] + splits.clips["val"] + splits.clips["test"]:
        seconds = read_clip_audio(small, clip.video_id).astype(np.float64).reshape(10, 16000)
        rms = np.sqrt(np.mean(seconds**2, axis=1))
        event = clip.labels(splits.classes) > 0
        # Class-independent and clearly louder: every event second at least 5x the loudest background second.
        assert rms[event].min() > 5 * rms[~event].max(), (clip.video_id, rms)


@pytest.fixture(scope="module")
def readable(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Logistic regressions on vit-tiny embeddings of the (60, 20, 0) demo: train clips → val clips."""
    root = ensure_ave_demo(tmp_path_factory.mktemp("ave_demo_readable"), seed=0, videos=(60, 20, 0))
    splits = load_ave_splits(root)
    encoder = build_frame_encoder("vit-tiny")

    def frames_and_labels(split: str) -> tuple[list[Image.Image], np.ndarray]:
        frames, labels = [], []
        for clip in splits.clips[split]:
            frames += read_clip_frames(root, clip.video_id)
            labels.append(clip.labels(splits.classes))
        return frames, np.concatenate(labels)

    def embed(frames: list[Image.Image], resolution: int) -> np.ndarray:
        return encoder(frame_pixels(frames, resolution, encoder.mean, encoder.std)).numpy()

    def accuracy(train: tuple, test: tuple) -> float:
        classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)).fit(*train)
        return float(classifier.score(*test))

    (train_frames, train_y), (val_frames, val_y) = frames_and_labels("train"), frames_and_labels("val")
    train_event, val_event = train_y > 0, val_y > 0
    # Every second of 20 train clips at the lowest resolution; the event seconds only at the others.
    train_x, val_x = embed(train_frames[:200], 56), embed(val_frames, 56)
    result = {"event_56": accuracy((train_x, train_event[:200]), (val_x, val_event))}
    train_frames = [f for f, event in zip(train_frames, train_event, strict=True) if event]
    val_frames = [f for f, event in zip(val_frames, val_event, strict=True) if event]
    for resolution in (56, 80, 176):
        train_x, val_x = embed(train_frames, resolution), embed(val_frames, resolution)
        result[resolution] = accuracy((train_x, train_y[train_event]), (val_x, val_y[val_event]))
    return result


def test_class_cue_readable_at_176_px_not_at_80(readable: dict) -> None:
    # 4 balanced classes: chance is 0.25. Measured on these 70 val event seconds (seed 0): 0.77 at 176 px, 0.24 at
    # 80 px, 0.31 at 56 px; on the default (160, 48, 48) demo, val + test: 0.95 at 176, 0.24 at 112, 0.25 at 80.
    assert readable[176] >= 0.7
    assert readable[176] - readable[80] >= 0.4
    assert readable[80] <= 0.4
    assert readable[56] <= 0.4


def test_something_is_there_cue_readable_at_56_px(readable: dict) -> None:
    # Event vs background seconds (about 35% events): the coarse disc is visible even at the lowest resolution.
    assert readable["event_56"] >= 0.95
