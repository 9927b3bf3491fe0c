"""load_endoscapes on tiny Endoscapes2023 look-alikes written in tmp_path."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image

from avlm.data import CVS_CRITERIA, ClipRecord, cvs_demo, ensure_cvs_demo, load_endoscapes
from avlm.errors import DataError


def write_frame(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".jpg", ".png"):
        Image.new("RGB", (8, 8), (120, 60, 50)).save(path)
    else:
        path.write_text("not a frame")


def write_split(root: Path, split: str, labelled: dict[str, list[float]], context: tuple[str, ...] = ()) -> Path:
    """Write labelled frames (listed in the json, in the given order) and unlabelled context frames."""
    split_dir = root / split
    split_dir.mkdir(parents=True, exist_ok=True)
    for name in [*labelled, *context]:
        write_frame(split_dir / name)
    images = [{"id": i + 1, "file_name": name, "ds": ds} for i, (name, ds) in enumerate(labelled.items())]
    (split_dir / "annotation_ds_coco.json").write_text(json.dumps({"images": images, "annotations": []}))
    return split_dir


def write_json(split_dir: Path, images: object) -> None:
    (split_dir / "annotation_ds_coco.json").write_text(json.dumps({"images": images}))


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    # Listed out of order on purpose: records must come back sorted by (video, frame).
    write_split(
        tmp_path,
        "train",
        {"3_100.jpg": [2 / 3, 1 / 3, 0.0], "3_50.jpg": [1.0, 0.0, 1 / 3], "1_200.png": [0.0, 1.0, 2 / 3]},
        context=("3_0.jpg", "3_25.jpg", "3_75.jpg", "1_125.jpg", "1_150.jpg", "notes.txt"),
    )
    write_split(tmp_path, "val", {"121_25.jpg": [0.0, 0.0, 0.0]}, context=("121_0.jpg",))
    write_split(tmp_path, "test", {"162_0.jpg": [1 / 3, 2 / 3, 1.0]})
    return tmp_path


def names(record: ClipRecord) -> list[str]:
    return [Path(p).name for p in record.frame_paths]


def test_clips_are_built_padded_and_sorted(dataset: Path) -> None:
    data = load_endoscapes(dataset)
    assert set(data) == {"train", "val", "test"}
    train = data["train"]
    assert [r.clip_id for r in train] == ["1_200", "3_50", "3_100"]
    assert [(r.video_id, r.frame_num) for r in train] == [(1, 200), (3, 50), (3, 100)]
    # 1_175 is a gap: filled with the previous frame so the clip stays in time order.
    assert names(train[0]) == ["1_125.jpg", "1_150.jpg", "1_150.jpg", "1_200.png"]
    # 3_-25 would precede the video: padded by repeating its earliest existing frame.
    assert names(train[1]) == ["3_0.jpg", "3_0.jpg", "3_25.jpg", "3_50.jpg"]
    assert names(train[2]) == ["3_25.jpg", "3_50.jpg", "3_75.jpg", "3_100.jpg"]
    assert train[2].frame_paths[0] == str((dataset / "train" / "3_25.jpg").resolve())
    assert all(Path(p).is_absolute() for r in train for p in r.frame_paths)
    assert names(data["val"][0]) == ["121_0.jpg"] * 3 + ["121_25.jpg"]
    assert names(data["test"][0]) == ["162_0.jpg"] * 4


def test_labels_binarised_at_half_and_scores_kept(dataset: Path) -> None:
    train = load_endoscapes(dataset, splits=("train",))["train"]
    by_id = {r.clip_id: r for r in train}
    assert by_id["3_100"].labels == (1, 0, 0)  # 2/3 -> 1, 1/3 -> 0
    assert by_id["3_50"].labels == (1, 0, 0)
    assert by_id["1_200"].labels == (0, 1, 1)
    assert by_id["3_100"].scores == pytest.approx((2 / 3, 1 / 3, 0.0))
    assert all(len(r.labels) == len(CVS_CRITERIA) for r in train)


def test_clip_length_and_stride(dataset: Path) -> None:
    train = load_endoscapes(dataset, splits="train", clip_frames=2, frame_stride=50)["train"]
    assert names(train[2]) == ["3_50.jpg", "3_100.jpg"]
    single = load_endoscapes(dataset, splits=["train"], clip_frames=1)["train"]
    assert [names(r) for r in single] == [["1_200.png"], ["3_50.jpg"], ["3_100.jpg"]]


def test_split_summary_is_logged(dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="avlm.data.endoscapes"):
        load_endoscapes(dataset)
    assert "train: 2 videos, 3 clips, positive rate C1 66.7%, C2 33.3%, C3 33.3%" in caplog.text


def test_vids_files_accept_a_subset(dataset: Path) -> None:
    (dataset / "train_vids.txt").write_text("1\n2\n3\n\n")
    (dataset / "val_vids.txt").write_text("121.0\n")
    assert len(load_endoscapes(dataset)["train"]) == 3


def test_missing_root_mentions_demo(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="demo") as info:
        load_endoscapes(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)


def test_missing_split_folder(dataset: Path) -> None:
    with pytest.raises(DataError, match="holdout"):
        load_endoscapes(dataset, splits=("train", "holdout"))


def test_missing_annotation_file(dataset: Path) -> None:
    (dataset / "val" / "annotation_ds_coco.json").unlink()
    with pytest.raises(DataError, match=r"val/annotation_ds_coco\.json does not exist"):
        load_endoscapes(dataset)


def test_invalid_json(dataset: Path) -> None:
    (dataset / "val" / "annotation_ds_coco.json").write_text("{not json")
    with pytest.raises(DataError, match=r"val/annotation_ds_coco\.json is not valid JSON"):
        load_endoscapes(dataset)


@pytest.mark.parametrize("content", [{"annotations": []}, {"images": []}, [1, 2]])
def test_json_without_images(dataset: Path, content: object) -> None:
    (dataset / "val" / "annotation_ds_coco.json").write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"val/annotation_ds_coco\.json has no 'images'"):
        load_endoscapes(dataset)


BAD_ENTRIES = {
    "no-file_name": ({"id": 7, "ds": [0, 0, 0]}, r"images\[1\] \(file_name=None, id=7\) has no 'file_name'"),
    "no-ds": ({"id": 7, "file_name": "121_0.jpg"}, r"images\[1\] \(file_name='121_0.jpg', id=7\) has no 'ds'"),
    "ds-length": ({"file_name": "121_0.jpg", "ds": [0, 1]}, r"images\[1\].*'ds' must be a list of 3 numbers"),
    "ds-range": ({"file_name": "121_0.jpg", "ds": [0, 1.5, 0]}, r"images\[1\].*in \[0, 1\].*1\.5"),
    "ds-string": ({"file_name": "121_0.jpg", "ds": [0, "1", 0]}, r"images\[1\].*'ds' must be"),
    "ds-bool": ({"file_name": "121_0.jpg", "ds": [True, 0, 0]}, r"images\[1\].*'ds' must be"),
    "ds-scalar": ({"file_name": "121_0.jpg", "ds": 1.0}, r"images\[1\].*'ds' must be"),
    "bad-name": ({"file_name": "frame_0.jpg", "ds": [0, 0, 0]}, r"images\[1\] \(file_name='frame_0.jpg'.*<video_id>"),
    "bad-extension": ({"file_name": "121_0.gif", "ds": [0, 0, 0]}, r"images\[1\].*'121_0.gif'"),
    "listed-twice": ({"file_name": "121_25.jpg", "ds": [0, 0, 0]}, r"images\[1\].*listed twice.*images\[0\]"),
    "frame-missing": ({"file_name": "121_50.jpg", "ds": [0, 0, 0]}, r"images\[1\].*val/121_50\.jpg is not on disk"),
    "other-extension": ({"file_name": "121_0.png", "ds": [0, 0, 0]}, r"images\[1\].*val/121_0\.png is not on disk"),
    "not-an-object": ("121_0.jpg", r"images\[1\] is not an object"),
}


@pytest.mark.parametrize(("entry", "message"), list(BAD_ENTRIES.values()), ids=list(BAD_ENTRIES))
def test_bad_entry_names_file_and_entry(dataset: Path, entry: object, message: str) -> None:
    write_json(dataset / "val", [{"id": 1, "file_name": "121_25.jpg", "ds": [0, 0, 0]}, entry])
    with pytest.raises(DataError, match=message) as info:
        load_endoscapes(dataset)
    assert str(dataset / "val" / "annotation_ds_coco.json") in str(info.value)


def test_frame_stored_twice(dataset: Path) -> None:
    write_frame(dataset / "train" / "3_25.png")
    with pytest.raises(DataError, match=r"3_25 is stored twice \(3_25\.(jpg|png) and 3_25\.(png|jpg)\)"):
        load_endoscapes(dataset)


def test_video_in_two_splits(dataset: Path) -> None:
    write_split(dataset, "test", {"162_0.jpg": [0, 0, 0], "3_500.jpg": [1, 1, 1]})
    write_split(dataset, "val", {"121_25.jpg": [0, 0, 0], "162_900.jpg": [0, 0, 0]}, context=("121_0.jpg",))
    with pytest.raises(DataError, match=r"2 video\(s\).*video 3 in train, test; video 162 in val, test"):
        load_endoscapes(dataset)
    # Only the loaded splits are compared.
    assert len(load_endoscapes(dataset, splits=("train", "val"))["val"]) == 2


def test_video_missing_from_vids_file(dataset: Path) -> None:
    (dataset / "train_vids.txt").write_text("1\n2\n")
    with pytest.raises(DataError, match=r"video\(s\) \[3\] are not listed in .*train_vids\.txt"):
        load_endoscapes(dataset)


def test_malformed_vids_file(dataset: Path) -> None:
    (dataset / "test_vids.txt").write_text("162\nvideo163\n")
    with pytest.raises(DataError, match=r"test_vids\.txt, line 2: expected a video id, got 'video163'"):
        load_endoscapes(dataset)


def test_a_corrupt_frame_is_named_with_its_clip_and_sound_frames_are_decoded_once(
    dataset: Path, decoded: list[bytes]
) -> None:
    load_endoscapes(dataset)
    assert len(decoded) == 11  # the distinct frames of the 5 clips (the context frame 1_175 does not exist)
    load_endoscapes(dataset)
    assert len(decoded) == 11  # unchanged files are not decoded again
    frame = (dataset / "train" / "3_75.jpg").resolve()
    frame.write_bytes(frame.read_bytes()[:-60])  # a copy cut short: the name and the header are still there
    with pytest.raises(DataError) as error:
        load_endoscapes(dataset)
    message = str(error.value)
    assert message.startswith(f"Endoscapes data {dataset.resolve()}: 1 of 11 frame files cannot be decoded")
    assert f"{frame} (used by train clip 3_100): does not decode" in message
    assert len(decoded) == 12  # only the changed file was read


def test_subset_reads_train_from_the_subset_annotation(dataset: Path) -> None:
    fold_dir = dataset / "12_5" / "train_2"
    fold_dir.mkdir(parents=True)
    write_json(fold_dir, [{"id": 1, "file_name": "3_50.jpg", "ds": [1.0, 0.0, 1 / 3]}])
    data = load_endoscapes(dataset, subset="12_5", subset_fold=2)
    assert [r.clip_id for r in data["train"]] == ["3_50"]
    # Frames come from train/, exactly as in the full split; other splits are unaffected.
    full = {r.clip_id: r for r in load_endoscapes(dataset)["train"]}
    assert data["train"][0] == full["3_50"]
    assert data["val"] == load_endoscapes(dataset)["val"]
    assert load_endoscapes(dataset, subset="12.5", subset_fold=2)["train"] == data["train"]


def test_subset_as_a_video_list(dataset: Path) -> None:
    fold_dir = dataset / "25" / "train_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / "train_vids.txt").write_text("3\n")
    train = load_endoscapes(dataset, subset="25")["train"]
    assert [r.clip_id for r in train] == ["3_50", "3_100"]


def test_missing_subset_folder_is_named(dataset: Path) -> None:
    with pytest.raises(DataError, match=r"subset folder .*25/train_1 does not exist"):
        load_endoscapes(dataset, subset="25", subset_fold=1)
    (dataset / "25" / "train_1").mkdir(parents=True)
    with pytest.raises(DataError, match=r"25/train_1 holds neither annotation_ds_coco.json nor train_vids.txt"):
        load_endoscapes(dataset, subset="25", subset_fold=1)
    with pytest.raises(ValueError, match="subset must be empty or one of"):
        load_endoscapes(dataset, subset="50")


def test_demo_subsets_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cvs_demo, "SPLIT_VIDEOS", {"train": range(1, 9), "val": range(9, 10), "test": range(10, 11)})
    demo = ensure_cvs_demo(tmp_path)
    for subset, n_videos in (("12_5", 1), ("25", 2)):  # of 8 train videos
        folds = [load_endoscapes(demo, splits=("train",), subset=subset, subset_fold=f)["train"] for f in range(3)]
        assert [len({r.video_id for r in fold}) for fold in folds] == [n_videos] * 3
