"""The AVE reader: annotation rows with and without a header, bad rows named by line, per-second labels,
cross-split ids found and handled by policy, and the extracted layout (frames, wav) read back."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import soundfile
from PIL import Image

from avlm.data import ave
from avlm.data.ave import AveClip, AveEvent
from avlm.errors import ConfigError, DataError

HEADER = "Category&VideoID&Quality&StartTime&EndTime"
ANNOTATIONS = [
    "Church bell&RUhOCu3LNXM&good&0&10",
    "Dog barking&dog1&good&2&5",
    "Church bell&dog1&good&7&9",
    "Acoustic guitar&gtr1&good&1&4",
    "Dog barking&dog2&good&0&3",
    "Acoustic guitar&dog2&good&5&10",
]


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def write_dataset(root, train, val, test, annotations=ANNOTATIONS):
    root.mkdir(parents=True, exist_ok=True)
    write_lines(root / "Annotations.txt", [HEADER, *annotations])
    for name, lines in (("trainSet.txt", train), ("valSet.txt", val), ("testSet.txt", test)):
        write_lines(root / name, lines)
    return root


def test_header_is_optional_and_rows_keep_their_line_numbers(tmp_path):
    rows = ["Dog barking&dog1&good&2&5", "", "  Church bell & dog1 & bad & 7 & 9  "]
    with_header = ave.read_annotation_file(write_lines(tmp_path / "a.txt", [HEADER, *rows]))
    without = ave.read_annotation_file(write_lines(tmp_path / "b.txt", rows))
    assert without == [
        ("dog1", AveEvent("Dog barking", 2, 5, "good", 1)),
        ("dog1", AveEvent("Church bell", 7, 9, "bad", 3)),  # the blank line 2 is skipped but counted
    ]
    assert [(vid, e.category, e.start, e.end, e.line) for vid, e in with_header] == [
        ("dog1", "Dog barking", 2, 5, 2),
        ("dog1", "Church bell", 7, 9, 4),
    ]
    # A header with another case, and a byte-order mark before it, is still a header.
    bom = tmp_path / "c.txt"
    bom.write_bytes(b"\xef\xbb\xbfcategory&videoid&quality&starttime&endtime\r\nDog barking&dog1&good&2&5\r\n")
    assert ave.read_annotation_file(bom) == [("dog1", AveEvent("Dog barking", 2, 5, "good", 2))]


@pytest.mark.parametrize(
    ("row", "why"),
    [
        ("Dog barking&dog1&good&2", "expected 5 fields"),
        ("Dog barking&dog1&good&2&5&x", "expected 5 fields"),
        ("Dog barking&&good&2&5", "empty video id"),
        ("&dog1&good&2&5", "empty category"),
        ("Dog barking&dog1&good&2.5&5", "integer seconds"),
        ("Dog barking&dog1&good&5&5", "0 <= StartTime < EndTime <= 10, got 5 and 5"),
        ("Dog barking&dog1&good&3&11", "got 3 and 11"),
        ("Dog barking&dog1&good&-1&4", "got -1 and 4"),
    ],
)
def test_a_bad_row_is_named_with_its_file_and_line(tmp_path, row, why):
    path = write_lines(tmp_path / "trainSet.txt", ["Church bell&ok1&good&0&10", "", row])
    with pytest.raises(DataError) as err:
        ave.read_annotation_file(path)
    assert str(err.value).startswith(f"{path}:3: ")
    assert why in str(err.value) and f"'{row}'" in str(err.value)


def test_a_header_after_the_first_row_is_a_bad_row(tmp_path):
    path = write_lines(tmp_path / "a.txt", ["Dog barking&dog1&good&2&5", HEADER])
    with pytest.raises(DataError, match=r"a.txt:2: StartTime and EndTime must be integer"):
        ave.read_annotation_file(path)


def test_labels_per_second_of_a_two_event_video():
    classes = ["background", "Acoustic guitar", "Church bell", "Dog barking"]
    clip = AveClip(
        "dog1",
        "train",
        (AveEvent("Dog barking", 2, 5, "good", 1), AveEvent("Church bell", 4, 9, "good", 2)),
    )
    labels = clip.labels(classes)
    # Second 4 is in both events: the row listed first (Dog barking) wins; second 9 is background ([4, 9)).
    np.testing.assert_array_equal(labels, [0, 0, 3, 3, 3, 2, 2, 2, 2, 0])
    assert labels.dtype == np.int64 and labels.shape == (10,)
    with pytest.raises(DataError, match=r"dog1 \(train, line 2\): category 'Church bell' is not among the 2"):
        clip.labels(["background", "Dog barking"])


def test_splits_classes_and_clips_in_file_order(tmp_path):
    root = write_dataset(
        tmp_path / "AVE_Dataset",
        train=["Dog barking&dog1&good&2&5", "Acoustic guitar&gtr1&good&1&4", "Church bell&dog1&good&7&9"],
        val=["Church bell&RUhOCu3LNXM&good&0&10"],
        test=["Dog barking&dog2&good&0&3", "Acoustic guitar&dog2&good&5&10"],
    )
    splits = ave.load_ave_splits(root)
    assert splits.classes == ["background", "Acoustic guitar", "Church bell", "Dog barking"]
    assert [clip.video_id for clip in splits.clips["train"]] == ["dog1", "gtr1"]
    dog1 = splits.clips["train"][0]
    assert [(e.category, e.line) for e in dog1.events] == [("Dog barking", 1), ("Church bell", 3)]
    np.testing.assert_array_equal(dog1.labels(splits.classes), [0, 0, 3, 3, 3, 0, 0, 2, 2, 0])
    np.testing.assert_array_equal(splits.clips["test"][0].labels(splits.classes), [3, 3, 3, 0, 0, 1, 1, 1, 1, 1])
    assert splits.cross_split_ids == {} and splits.dropped == {"train": 0, "val": 0, "test": 0}
    summary = splits.summary()
    assert summary["clips"] == {"train": 2, "val": 1, "test": 1}
    assert summary["events"] == {"train": 3, "val": 1, "test": 2}
    assert summary["num_classes"] == 4 and summary["cross_split_ids"]["count"] == 0
    assert ave.load_ave_splits(root, limit_clips=1).summary()["clips"] == {"train": 1, "val": 1, "test": 1}


@pytest.mark.parametrize("policy", ["keep", "drop"])
def test_cross_split_ids_are_found_logged_and_handled_by_policy(tmp_path, caplog, policy):
    root = write_dataset(
        tmp_path / "AVE_Dataset",
        train=["Dog barking&dog1&good&2&5", "Acoustic guitar&gtr1&good&1&4", "Church bell&RUhOCu3LNXM&good&0&10"],
        val=["Dog barking&dog2&good&0&3"],
        # dog1 and dog2 again, with other classes: 2 shared ids, as in the official splits (18 there).
        test=["Church bell&dog1&good&7&9", "Acoustic guitar&dog2&good&5&10", "Acoustic guitar&gtr2&good&0&1"],
        annotations=[*ANNOTATIONS, "Acoustic guitar&gtr2&good&0&1"],
    )
    with caplog.at_level(logging.WARNING, logger="avlm.data.ave"):
        splits = ave.load_ave_splits(root, cross_split_ids=policy)
    assert splits.cross_split_ids == {"dog1": ["train", "test"], "dog2": ["val", "test"]}
    assert splits.policy == policy
    [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "2 video ids appear in more than one split: dog1 (train/test), dog2 (val/test)" in warning
    assert f"cross_split_ids={policy}" in warning
    ids = {split: [clip.video_id for clip in clips] for split, clips in splits.clips.items()}
    if policy == "keep":
        assert ids == {"train": ["dog1", "gtr1", "RUhOCu3LNXM"], "val": ["dog2"], "test": ["dog1", "dog2", "gtr2"]}
        assert splits.dropped == {"train": 0, "val": 0, "test": 0}
    else:
        assert ids == {"train": ["gtr1", "RUhOCu3LNXM"], "val": [], "test": ["gtr2"]}
        assert splits.dropped == {"train": 1, "val": 1, "test": 2}
    assert splits.summary()["cross_split_ids"] == {
        "count": 2,
        "policy": policy,
        "dropped": splits.dropped,
        "ids": {"dog1": ["train", "test"], "dog2": ["val", "test"]},
    }


def test_a_split_category_missing_from_annotations_is_named(tmp_path):
    root = write_dataset(
        tmp_path / "AVE_Dataset",
        train=["Dog barking&dog1&good&2&5"],
        val=["Dog barking&dog2&good&0&3", "Cat meowing&cat1&good&0&3"],
        test=[],
    )
    with pytest.raises(DataError, match=r"valSet.txt:2: category 'Cat meowing' of video cat1 is not in .*Annotations"):
        ave.load_ave_splits(root)


def test_bad_arguments_and_missing_files(tmp_path):
    with pytest.raises(ConfigError, match=r"^config key 'data.cross_split_ids': must be one of keep, drop"):
        ave.load_ave_splits(tmp_path, cross_split_ids="skip")
    with pytest.raises(ConfigError, match=r"^config key 'data.limit_clips'"):
        ave.load_ave_splits(tmp_path, limit_clips=-1)
    with pytest.raises(DataError, match="AVE data folder .*nowhere does not exist"):
        ave.load_ave_splits(tmp_path / "nowhere")
    root = write_dataset(tmp_path / "AVE_Dataset", train=[], val=[], test=[])
    (root / "valSet.txt").unlink()
    with pytest.raises(DataError, match="cannot read AVE annotation file .*valSet.txt"):
        ave.load_ave_splits(root)


def test_paths_missing_files_and_reading_the_extracted_layout(tmp_path):
    assert ave.frame_path(tmp_path, "v1", 3) == tmp_path / "frames" / "v1" / "3.jpg"
    assert ave.audio_path(tmp_path, "v1") == tmp_path / "audio" / "v1.wav"
    assert ave.video_path(tmp_path, "v1") == tmp_path / "AVE" / "v1.mp4"
    for second in range(10):
        if second != 3:
            path = ave.frame_path(tmp_path, "v1", second)
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (24, 16), (10 * second, 0, 200)).save(path, quality=95)
    clip = AveClip("v1", "train", (AveEvent("Dog barking", 2, 5, "good", 1),))
    assert ave.missing_extracted(tmp_path, [clip, "v2"]) == [
        "v1: no frames/v1/3.jpg",
        "v1: no audio/v1.wav",
        "v2: no frames/v2/",
        "v2: no audio/v2.wav",
    ]
    with pytest.raises(DataError, match="cannot read frame .*3.jpg of AVE video v1"):
        ave.read_clip_frames(tmp_path, "v1")
    Image.new("L", (24, 16), 90).save(ave.frame_path(tmp_path, "v1", 3))  # greyscale: returned as RGB
    ave.audio_path(tmp_path, "v1").parent.mkdir()
    # 3 s at 8 kHz: read back at 16 kHz and zero-padded to 10 s.
    tone = (0.25 * np.sin(2 * np.pi * 200 * np.arange(24000) / 8000)).astype(np.float32)
    soundfile.write(ave.audio_path(tmp_path, "v1"), tone, 8000, subtype="FLOAT")
    assert ave.missing_extracted(tmp_path, [clip]) == []

    frames = ave.read_clip_frames(tmp_path, "v1")
    assert [(f.mode, f.size) for f in frames] == [("RGB", (24, 16))] * 10
    assert np.asarray(frames[3])[0, 0].tolist() == [90, 90, 90]
    assert abs(int(np.asarray(frames[7])[8, 12, 0]) - 70) <= 2
    audio = ave.read_clip_audio(tmp_path, "v1")
    assert audio.dtype == np.float32 and audio.shape == (160000,)
    assert np.sqrt(np.mean(audio[1000:47000] ** 2)) == pytest.approx(0.25 / np.sqrt(2), rel=0.02)
    assert not audio[48000:].any()
    assert ave.read_clip_audio(tmp_path, "v1", sampling_rate=8000).shape == (80000,)
