"""The video-caption manifest reader, frame selection, the caption Dataset, the hashes and the built-in demo data."""

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
import torch
from PIL import Image

from avlm.data import (
    VIDEO_CAPTION_DEMO_VERSION,
    VideoCaptionDataset,
    VideoCaptionRecord,
    caption_reference_hash,
    collate_video_captions,
    ensure_video_caption_demo,
    evenly_spaced_indices,
    load_video_captions,
    video_manifest_hash,
)
from avlm.data import video_captions as video_module
from avlm.data.generated import COMPLETE_MARKER
from avlm.errors import DataError

HEADER = ["clip_id", "caption_1", "caption_2", "caption_3"]
MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)


def write_clip(root: Path, clip_id: str, num_frames: int, size: tuple[int, int] = (12, 10)) -> list[Path]:
    """Solid-colour JPEG frames whose red channel encodes the frame number (20 t), written in reverse order."""
    folder = root / "frames" / clip_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{t:05d}.jpg" for t in range(num_frames)]
    for t in reversed(range(num_frames)):  # creation order must not matter, only names do
        Image.new("RGB", size, (20 * t, 100, 200)).save(paths[t], format="JPEG", quality=95)
    return paths


def write_captions(path: Path, rows: list[list[str]], header: list[str] = HEADER) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows([header, *rows])


@pytest.fixture
def dataset_root(tmp_path: Path) -> Path:
    # 10 train clips of 10 frames with 1-3 references (empty trailing captions are allowed); 2 val clips.
    write_captions(
        tmp_path / "captions_train.csv",
        [[f"c{k:02d}", f"caption {k}", f"second {k}" if k % 2 else "", "third, with a comma"] for k in range(10)],
    )
    write_captions(tmp_path / "captions_val.csv", [["v0", "a", "b", "c"], ["v1", "d", "", ""]])
    for k in range(10):
        write_clip(tmp_path, f"c{k:02d}", 10)
    write_clip(tmp_path, "v0", 3)
    write_clip(tmp_path, "v1", 1)
    (tmp_path / "frames" / "c00" / "notes.txt").write_text("not a frame")
    return tmp_path


# ---------------------------------------------------------------------------------------------------- reader


@pytest.mark.parametrize(
    ("num_frames", "clip_frames", "expected"),
    [
        (8, 4, [0, 2, 5, 7]),
        (12, 4, [0, 4, 7, 11]),
        (10, 4, [0, 3, 6, 9]),
        (9, 3, [0, 4, 8]),
        (4, 3, [0, 2, 3]),  # 1.5 rounds up
        (5, 5, [0, 1, 2, 3, 4]),
        (2, 4, [0, 0, 1, 1]),  # too few frames: some repeat
        (3, 4, [0, 1, 1, 2]),
        (1, 3, [0, 0, 0]),
        (10, 1, [4]),  # one frame: the middle one
    ],
)
def test_evenly_spaced_indices(num_frames: int, clip_frames: int, expected: list[int]) -> None:
    assert evenly_spaced_indices(num_frames, clip_frames) == expected


def test_evenly_spaced_indices_reject_empty() -> None:
    with pytest.raises(ValueError, match="positive"):
        evenly_spaced_indices(0, 4)
    with pytest.raises(ValueError, match="positive"):
        evenly_spaced_indices(4, 0)


def test_reader_keeps_evenly_spaced_frames_and_nonempty_captions(dataset_root: Path) -> None:
    data = load_video_captions(dataset_root, splits=("train", "val"), clip_frames=4)
    assert set(data) == {"train", "val"}
    train = data["train"]
    assert [r.clip_id for r in train] == [f"c{k:02d}" for k in range(10)]
    assert all(r.split == "train" for r in train)
    frames = dataset_root / "frames" / "c03"
    assert train[3].frame_paths == tuple(str(frames / f"{t:05d}.jpg") for t in (0, 3, 6, 9))
    assert train[3].captions == ("caption 3", "second 3", "third, with a comma")
    assert train[4].captions == ("caption 4", "third, with a comma")  # the empty caption_2 is dropped
    v0, v1 = data["val"]
    assert [Path(p).name for p in v0.frame_paths] == ["00000.jpg", "00001.jpg", "00001.jpg", "00002.jpg"]
    assert v1.frame_paths == (str(dataset_root / "frames" / "v1" / "00000.jpg"),) * 4
    assert v1.captions == ("d",)
    assert load_video_captions(dataset_root, splits="val", clip_frames=2)["val"][0].frame_paths == (
        v0.frame_paths[0],
        v0.frame_paths[-1],
    )


def test_missing_and_unreadable_clips_are_named_and_skipped(
    dataset_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frames = dataset_root / "frames"
    for path in (frames / "c02").iterdir():
        path.unlink()
    (frames / "c02").rmdir()
    (frames / "c07" / "00009.jpg").write_bytes(b"")  # a failed download: the last frame is always kept
    with caplog.at_level(logging.INFO, logger="avlm.data.video_captions"):
        records = load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]
    assert [r.clip_id for r in records] == [f"c{k:02d}" for k in range(10) if k not in (2, 7)]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 of 10 clips" in warnings[0] and str(frames) in warnings[0]
    assert "c02 (missing)" in warnings[0] and "c07 (unreadable frame 00009.jpg" in warnings[0]
    assert "8 clips, 20 captions, 4 frames per clip, 2 skipped for missing frames" in caplog.text
    # Without verification only the folder listing counts, so the empty file passes.
    unverified = load_video_captions(dataset_root, splits="train", clip_frames=4, verify_frames=False)["train"]
    assert "c07" in [r.clip_id for r in unverified]


def test_truncated_frames_skip_their_clip_and_are_decoded_once(
    dataset_root: Path, decoded: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    frame = dataset_root / "frames" / "c04" / "00003.jpg"  # kept: frames 0, 3, 6 and 9 of 10
    frame.write_bytes(frame.read_bytes()[:-40])
    with caplog.at_level(logging.WARNING, logger="avlm.data.video_captions"):
        records = load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]
    assert "c04" not in [r.clip_id for r in records] and len(records) == 9
    assert re.search(r"c04 \(unreadable frame 00003.jpg: does not decode: [^)]*truncated", caplog.text, re.IGNORECASE)
    assert len(decoded) == 40  # every kept frame of the 10 clips, once
    assert len(load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]) == 9
    assert len(decoded) == 41  # the second pass decodes only the bad frame, which is never recorded as good


def test_too_many_missing_clips_name_the_folder(dataset_root: Path) -> None:
    frames = dataset_root / "frames"
    for clip_id in ("c01", "c05"):
        for path in (frames / clip_id).iterdir():
            path.unlink()
    (frames / "c08" / "00000.jpg").rename(frames / "c08" / "00000.png")  # only the .png's siblings remain
    for path in (frames / "c08").glob("*.jpg"):
        path.unlink()
    with pytest.raises(DataError, match="max_missing_fraction=0.2") as info:
        load_video_captions(dataset_root, splits="train", clip_frames=4)
    message = str(info.value)
    assert "3 of 10 clips" in message and str(frames) in message
    assert "c01 (no .jpg or .jpeg frames)" in message and "c08 (no .jpg or .jpeg frames)" in message
    assert len(load_video_captions(dataset_root, splits="train", clip_frames=4, max_missing_fraction=0.3)["train"]) == 7


def test_absent_frames_folder_is_said_so(dataset_root: Path) -> None:
    (dataset_root / "frames").rename(dataset_root / "images")
    with pytest.raises(DataError, match=r"frames \(folder does not exist\)"):
        load_video_captions(dataset_root, splits="val", clip_frames=4)


def test_missing_root_and_csv_are_named(tmp_path: Path, dataset_root: Path) -> None:
    with pytest.raises(DataError, match="demo"):
        load_video_captions(tmp_path / "nowhere", clip_frames=4)
    with pytest.raises(DataError, match=re.escape(str(dataset_root / "captions_test.csv"))):
        load_video_captions(dataset_root, clip_frames=4)
    with pytest.raises(ValueError, match="clip_frames"):
        load_video_captions(dataset_root, clip_frames=0)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("clip_id,caption_1\nc00,a\nc01,b,c\n", "line 3: row has 3 fields but the header has 2"),
        ("clip_id,caption_1,caption_2\nc00,a,b\nc01, ,b\n", "line 3: empty caption_1"),
        ("clip_id,caption_1\n,a\n", "line 2: empty clip_id"),
        ('clip_id,caption_1\nc00,"two\nlines"\nc01,a\nc00,b\n', "line 5: clip_id 'c00' is also on line 2"),
        ("clip_id,caption_1\n../c00,a\n", "line 2: clip_id '../c00' is not a plain folder name"),
        ("clip_id,caption_2\nc00,a\n", "line 1: header ['clip_id', 'caption_2'] must be clip_id and caption_1"),
        ("clip_id,caption_1,caption\nc00,a,b\n", "line 1: header"),
        ("clip_id," + ",".join(f"caption_{k}" for k in range(1, 7)) + "\n", "line 1: header"),
        ("clip_id,caption_1\n", "has no caption rows"),
    ],
)
def test_malformed_csv_names_file_and_line(dataset_root: Path, content: str, expected: str) -> None:
    path = dataset_root / "captions_val.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=re.escape(expected)) as info:
        load_video_captions(dataset_root, splits="val", clip_frames=4)
    assert str(path) in str(info.value)


def test_non_utf8_csv_is_named(dataset_root: Path) -> None:
    path = dataset_root / "captions_val.csv"
    path.write_bytes("clip_id,caption_1\nv0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match=re.escape(f"caption file {path} is not UTF-8")):
        load_video_captions(dataset_root, splits="val", clip_frames=4)


def test_clips_in_two_splits_are_warned_about(dataset_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_captions(dataset_root / "captions_val.csv", [["c03", "leaked", "", ""]])
    with caplog.at_level(logging.WARNING, logger="avlm.data.audio_captions"):
        load_video_captions(dataset_root, splits=("train", "val"), clip_frames=2)
    assert "c03 in train, val" in caplog.text


# ---------------------------------------------------------------------------------------------------- Dataset, hashes


def test_dataset_items_are_normalised_frames(dataset_root: Path) -> None:
    records = load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]
    dataset = VideoCaptionDataset(records, image_size=10, mean=MEAN, std=STD)
    assert len(dataset) == 10
    item = dataset[3]
    assert item["clip_id"] == "c03" and item["index"] == 3 and item["captions"] == list(records[3].captions)
    assert item["pixel_values"].shape == (4, 3, 10, 10) and item["pixel_values"].dtype == torch.float32
    # 12x10 frames centre-cropped to 10x10 are not resized: each value is the decoded JPEG pixel, normalised.
    for t, path in enumerate(records[3].frame_paths):
        decoded = np.asarray(Image.open(path).convert("RGB"))[:, 1:11]
        expected = torch.from_numpy(decoded.copy()).permute(2, 0, 1).float() / 255 - torch.tensor(MEAN)[:, None, None]
        expected /= torch.tensor(STD)[:, None, None]
        torch.testing.assert_close(item["pixel_values"][t], expected)
    # Frame k of the clip has red 20 k: frames 0, 3, 6 and 9 were kept, in time order.
    red = item["pixel_values"][:, 0].mean(dim=(1, 2)) * STD[0] + MEAN[0]
    torch.testing.assert_close(red * 255, torch.tensor([0.0, 60.0, 120.0, 180.0]), atol=3.0, rtol=0)
    assert torch.equal(dataset[3]["pixel_values"], item["pixel_values"])  # deterministic per index
    assert VideoCaptionDataset(records, image_size=6, mean=MEAN, std=STD)[0]["pixel_values"].shape == (4, 3, 6, 6)
    with pytest.raises(ValueError, match="3 values"):
        VideoCaptionDataset(records, image_size=10, mean=(0.5,), std=STD)
    with pytest.raises(ValueError, match="positive"):
        VideoCaptionDataset(records, image_size=10, mean=MEAN, std=(0.2, 0.0, 0.5))


def test_collate_stacks_frames_and_keeps_caption_lists(dataset_root: Path) -> None:
    records = load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]
    dataset = VideoCaptionDataset(records, image_size=8, mean=MEAN, std=STD)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_video_captions)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (3, 4, 3, 8, 8)
    assert batch["clip_id"] == ["c00", "c01", "c02"]
    assert batch["captions"] == [list(r.captions) for r in records[:3]]
    assert [len(c) for c in batch["captions"]] == [2, 3, 2]  # different reference counts batch fine
    assert batch["index"].tolist() == [0, 1, 2] and batch["index"].dtype == torch.long


def test_hashes_are_stable_and_sensitive(dataset_root: Path, tmp_path: Path, file_record: Path) -> None:
    records = load_video_captions(dataset_root, splits="train", clip_frames=4)["train"]
    shutil.copytree(dataset_root / "frames", tmp_path / "elsewhere")
    moved = [
        VideoCaptionRecord(
            r.clip_id,
            tuple(str(tmp_path / "elsewhere" / r.clip_id / Path(p).name) for p in r.frame_paths),
            r.captions,
            "x",
        )
        for r in records
    ]
    assert video_manifest_hash(records) == video_manifest_hash(moved)
    assert len(video_manifest_hash(records)) == 64
    # Another image under the same name changes it.
    noise = np.random.default_rng(0).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    Image.fromarray(noise).save(moved[3].frame_paths[1], format="JPEG")
    assert Path(moved[3].frame_paths[1]).stat().st_size != Path(records[3].frame_paths[1]).stat().st_size
    assert video_manifest_hash(moved) != video_manifest_hash(records)
    assert video_manifest_hash(records[:-1]) != video_manifest_hash(records)
    other_frames = load_video_captions(dataset_root, splits="train", clip_frames=3)["train"]
    assert video_manifest_hash(other_frames) != video_manifest_hash(records)
    # The audio recipe's reference hash works on video records: clip ids and captions only.
    assert caption_reference_hash(records) == caption_reference_hash(moved)
    assert caption_reference_hash(other_frames) == caption_reference_hash(records)
    edited = [VideoCaptionRecord(records[0].clip_id, records[0].frame_paths, ("changed",), "train"), *records[1:]]
    assert caption_reference_hash(edited) != caption_reference_hash(records)


# ---------------------------------------------------------------------------------------------------- demo data

# The words by which a caption states each attribute.
ATTRIBUTE_WORDS = {
    "shape": {
        "circle": {"circle", "disc", "ball"},
        "square": {"square", "box", "block"},
        "triangle": {"triangle", "wedge", "triangular"},
    },
    "colour": {colour: {colour} for colour in ("red", "green", "blue", "yellow")},
    "size": {"small": {"small", "little", "tiny"}, "large": {"large", "big"}},
    "motion": {
        "left": {"left", "leftwards"},
        "right": {"right", "rightwards"},
        "up": {"up", "upwards", "rises", "rising"},
        "down": {"down", "downwards", "sinks", "sinking"},
        "still": {"still", "not", "place"},
    },
}
REFERENCE_RGB = {"red": (225, 35, 35), "green": (35, 190, 55), "blue": (45, 75, 235), "yellow": (235, 215, 35)}


def attributes_stated(caption: str) -> dict[str, str]:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    stated = {}
    for attribute, values in ATTRIBUTE_WORDS.items():
        found = [value for value, cues in values.items() if words & cues]
        assert len(found) == 1, f"{caption!r} states {attribute} as {found}"
        stated[attribute] = found[0]
    return stated


def shape_seen(path: str) -> dict:
    """The shape's pixels are the saturated ones (the background is grey): centroid, extent, fill and colour."""
    rgb = np.asarray(Image.open(path).convert("RGB")).astype(np.float64)
    mask = rgb.max(axis=-1) - rgb.min(axis=-1) > 90
    ys, xs = np.nonzero(mask)
    height, width = np.ptp(ys) + 1, np.ptp(xs) + 1
    colour = rgb[mask].mean(axis=0)
    return {
        "centre": np.array([xs.mean(), ys.mean()]),
        "extent": max(height, width),
        "fill": mask.sum() / (height * width),
        "colour": min(REFERENCE_RGB, key=lambda name: np.linalg.norm(colour - np.array(REFERENCE_RGB[name]))),
    }


def attributes_seen(frame_paths: tuple[str, ...]) -> dict[str, str]:
    first, last = shape_seen(frame_paths[0]), shape_seen(frame_paths[-1])
    dx, dy = last["centre"] - first["centre"]
    if max(abs(dx), abs(dy)) < 1:
        motion = "still"
    elif abs(dx) > abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    assert max(abs(dx), abs(dy)) < 1 or max(abs(dx), abs(dy)) > 8, (frame_paths[0], dx, dy)
    fill = first["fill"]
    return {
        "shape": "square" if fill > 0.88 else "triangle" if fill < 0.66 else "circle",
        "colour": first["colour"],
        "size": "large" if first["extent"] >= 12 else "small",
        "motion": motion,
    }


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    start = time.perf_counter()
    folder = ensure_video_caption_demo(tmp_path_factory.mktemp("cache"), seed=0)
    return folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def demo(generated: tuple[Path, float]) -> Path:
    return generated[0]


def test_demo_is_quick_and_read_by_the_reader(generated: tuple[Path, float]) -> None:
    folder, seconds = generated
    assert folder.name == f"video_caption_demo_{VIDEO_CAPTION_DEMO_VERSION}_s0"
    assert (folder / COMPLETE_MARKER).is_file()
    assert seconds < 30  # about 2 s on 2 cores
    data = load_video_captions(folder, clip_frames=4)
    assert {split: len(records) for split, records in data.items()} == {"train": 300, "val": 60, "test": 60}
    for records in data.values():
        for record in records:
            assert len(record.captions) == 5 and len(set(record.captions)) == 5
            assert len(record.frame_paths) == 4 and len(set(record.frame_paths)) == 4
            on_disk = sorted((folder / "frames" / record.clip_id).iterdir())
            assert 8 <= len(on_disk) <= 12
            assert (record.frame_paths[0], record.frame_paths[-1]) == (str(on_disk[0]), str(on_disk[-1]))
    with Image.open(data["train"][0].frame_paths[0]) as frame:
        assert (frame.format, frame.size, frame.mode) == ("JPEG", (32, 32), "RGB")
    vocabulary = {w for records in data.values() for r in records for c in r.captions for w in c.lower().split()}
    assert len(vocabulary) < 60


def test_demo_captions_say_what_is_seen(demo: Path) -> None:
    records = load_video_captions(demo, splits="val", clip_frames=4)["val"]
    with open(demo / "demo_attributes_val.csv", encoding="utf-8") as f:
        truth = {row.pop("clip_id"): row for row in csv.DictReader(f)}
    for record in records:
        attributes = truth[record.clip_id]
        for caption in record.captions:
            assert attributes_stated(caption) == attributes, caption
        assert attributes_seen(record.frame_paths) == attributes, record.clip_id
    # Every value of every attribute occurs in the 60 validation clips.
    for name, values in video_module.DEMO_ATTRIBUTES.items():
        assert {a[name] for a in truth.values()} == set(values)


def test_demo_same_seed_is_byte_identical(demo: Path, tmp_path: Path) -> None:
    again = ensure_video_caption_demo(tmp_path, seed=0)
    assert again != demo
    first, second = tree_digest(demo), tree_digest(again)
    assert first == second
    assert len([name for name in first if name.endswith(".jpg")]) > 8 * 420


def test_demo_other_seed_differs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(video_module, "DEMO_SPLIT_SIZES", {"train": 4, "val": 2, "test": 2})
    a = load_video_captions(ensure_video_caption_demo(tmp_path / "a", seed=0), clip_frames=4)["train"]
    b = load_video_captions(ensure_video_caption_demo(tmp_path / "b", seed=1), clip_frames=4)["train"]
    assert caption_reference_hash(a) != caption_reference_hash(b)
    assert Path(a[0].frame_paths[0]).read_bytes() != Path(b[0].frame_paths[0]).read_bytes()


def test_demo_second_call_reuses(demo: Path) -> None:
    marker = demo / COMPLETE_MARKER
    stamp = marker.stat().st_mtime_ns
    start = time.perf_counter()
    assert ensure_video_caption_demo(demo.parent, seed=0) == demo
    assert time.perf_counter() - start < 0.5
    assert marker.stat().st_mtime_ns == stamp


def test_demo_feeds_encoder_shaped_batches(demo: Path) -> None:
    records = load_video_captions(demo, splits="test", clip_frames=4)["test"]
    dataset = VideoCaptionDataset(records, image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    batch = collate_video_captions([dataset[i] for i in range(0, 60, 15)])
    assert batch["pixel_values"].shape == (4, 4, 3, 64, 64)
    assert torch.isfinite(batch["pixel_values"]).all()
    assert batch["captions"] == [list(records[i].captions) for i in range(0, 60, 15)]
