"""The generic clip manifest: its CSV and JSON forms, frame resolution and selection, errors, the CVS demo manifest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avlm.data import ClipDataset, ClipRecord, ensure_cvs_demo, label_checksum, load_endoscapes, manifest_hash
from avlm.data.manifest import (
    ClipManifest,
    ProbeClip,
    ProbeClipDataset,
    group_overlap,
    load_clip_manifest,
    write_cvs_demo_manifest,
)
from avlm.errors import ConfigError, DataError

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)
LABELS = ("ped", "car", "bike")
# sample_id, split, group, number of frames, labels present
CLIPS = [
    ("a", "train", "scene-1", 3, ("ped",)),
    ("b", "train", "scene-1", 5, ()),
    ("c", "train", "scene-2", 4, ("car", "bike")),
    ("d", "val", "scene-3", 3, ("ped", "car", "bike")),
]


def write_frames(folder: Path, count: int, colour_base: int = 0) -> list[str]:
    """Solid-colour PNG frames 00000.png, 00001.png, ...; PNG is lossless, so pixel values are exact."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for t in range(count):
        Image.new("RGB", (10, 8), (colour_base, 30 * t, 200)).save(folder / f"{t:05d}.png")
        names.append(f"{t:05d}.png")
    return names


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    for k, (sample_id, _, _, count, _) in enumerate(CLIPS):
        write_frames(tmp_path / "frames" / sample_id, count, colour_base=40 * k)
    return tmp_path


def frame_list(sample_id: str, count: int) -> list[str]:
    return [f"frames/{sample_id}/{t:05d}.png" for t in range(count)]


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def csv_with_label_columns(path: Path, frames: str = "folder") -> Path:
    rows = []
    for sample_id, split, group, count, present in CLIPS:
        if frames == "folder":
            cell = f"frames/{sample_id}"
        elif frames == "glob":
            cell = f"frames/{sample_id}/*.png"
        else:
            cell = ";".join(frame_list(sample_id, count))
        rows.append([sample_id, split, group, cell, *(int(n in present) for n in LABELS)])
    return write_csv(path, ["sample_id", "split", "group", "frames", *(f"label:{n}" for n in LABELS)], rows)


def expected_clips(root: Path) -> list[ProbeClip]:
    return [
        ProbeClip(
            sample_id,
            tuple(str(root / p) for p in frame_list(sample_id, count)),
            tuple(float(n in present) for n in LABELS),
            group,
            split,
        )
        for sample_id, split, group, count, present in CLIPS
    ]


def test_every_csv_and_json_form_gives_the_same_clips(dataset_dir: Path) -> None:
    expected = expected_clips(dataset_dir)
    manifests = {
        "csv columns, folders": csv_with_label_columns(dataset_dir / "folders.csv"),
        "csv columns, globs": csv_with_label_columns(dataset_dir / "globs.csv", frames="glob"),
        "csv columns, lists": csv_with_label_columns(dataset_dir / "lists.csv", frames="list"),
    }
    manifests["csv labels column"] = write_csv(
        dataset_dir / "present.csv",
        ["sample_id", "extra_metadata", "group", "split", "labels", "frames"],
        [[s, "ignored", g, sp, ";".join(p), f"frames/{s}"] for s, sp, g, _, p in CLIPS],
    )
    json_forms = {
        "json dict labels": [
            {
                "sample_id": s,
                "split": sp,
                "group": g,
                "frames": frame_list(s, n),
                "labels": {x: int(x in p) for x in LABELS},
            }
            for s, sp, g, n, p in CLIPS
        ],
        "json label keys": [
            {"sample_id": s, "split": sp, "group": g, "frames": f"frames/{s}", **{f"label:{x}": x in p for x in LABELS}}
            for s, sp, g, n, p in CLIPS
        ],
        "json declared names": {
            "labels": list(LABELS),
            "clips": [
                {"sample_id": s, "split": sp, "group": g, "frames": f"frames/{s}/*.png", "labels": list(p)}
                for s, sp, g, n, p in CLIPS
            ],
        },
    }
    for name, content in json_forms.items():
        manifests[name] = dataset_dir / f"{name.replace(' ', '_')}.json"
        manifests[name].write_text(json.dumps(content), encoding="utf-8")
    # A bare list of present names needs label_names: the file cannot tell a label no clip has.
    bare = [
        {"sample_id": s, "split": sp, "group": g, "frames": f"frames/{s}", "labels": list(p)}
        for s, sp, g, n, p in CLIPS
    ]
    manifests["json present names"] = dataset_dir / "present.json"
    manifests["json present names"].write_text(json.dumps(bare), encoding="utf-8")

    for name, path in manifests.items():
        needs_names = name in ("csv labels column", "json present names")
        manifest = load_clip_manifest(path, label_names=LABELS if needs_names else None)
        assert manifest.label_names == LABELS, name
        assert manifest.clips == expected, name
        assert manifest.path == path.resolve()


def test_label_names_set_the_order_and_must_match_the_file(dataset_dir: Path) -> None:
    path = csv_with_label_columns(dataset_dir / "m.csv")
    reordered = load_clip_manifest(path, label_names=("bike", "ped", "car"))
    assert reordered.label_names == ("bike", "ped", "car")
    assert [c.labels for c in reordered.clips][2] == (1.0, 0.0, 1.0)  # clip c: car and bike
    with pytest.raises(DataError, match=r"m\.csv, line 1: unknown label\(s\) \['label:bike'\]"):
        load_clip_manifest(path, label_names=("ped", "car"))
    with pytest.raises(DataError, match=r"m\.csv, line 1: label\(s\) \['label:truck'\] of label_names are missing"):
        load_clip_manifest(path, label_names=(*LABELS, "truck"))
    with pytest.raises(ConfigError, match="appear more than once"):
        load_clip_manifest(path, label_names=("ped", "ped"))
    present = write_csv(
        dataset_dir / "present.csv",
        ["sample_id", "split", "group", "frames", "labels"],
        [["a", "train", "g", "frames/a", "ped"]],
    )
    with pytest.raises(DataError, match=r"present\.csv: a labels column .* pass label_names"):
        load_clip_manifest(present)


def test_relative_frames_are_read_from_the_manifest_folder(dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (dataset_dir / "lists").mkdir()
    monkeypatch.chdir(dataset_dir / "frames")  # a working directory where the relative paths would not resolve
    absolute = str(dataset_dir / "frames" / "b" / "00000.png")
    rows = [["a", "train", "g", "../frames/a/00000.png;../frames/a/00002.png", 1], ["b", "val", "h", absolute, 0]]
    manifest = load_clip_manifest(
        write_csv(dataset_dir / "lists" / "m.csv", ["sample_id", "split", "group", "frames", "label:x"], rows)
    )
    assert manifest.clips[0].frame_paths == (
        str(dataset_dir / "frames/a/00000.png"),
        str(dataset_dir / "frames/a/00002.png"),
    )
    assert manifest.clips[1].frame_paths == (absolute,)


def test_folders_and_globs_sort_frames_in_natural_order(tmp_path: Path) -> None:
    clip = tmp_path / "clip"
    clip.mkdir()
    for t in (10, 2, 1):
        Image.new("RGB", (4, 4)).save(clip / f"frame_{t}.jpg")
    (clip / "notes.txt").write_text("not a frame")
    (clip / ".hidden.jpg").write_bytes(b"")
    rows = [["a", "train", "g", "clip", 1], ["b", "train", "g", "clip/frame_*", 0]]
    manifest = load_clip_manifest(
        write_csv(tmp_path / "m.csv", ["sample_id", "split", "group", "frames", "label:x"], rows)
    )
    expected = tuple(str(clip / f"frame_{t}.jpg") for t in (1, 2, 10))
    assert [c.frame_paths for c in manifest.clips] == [expected, expected]


def test_clip_frames_keeps_evenly_spaced_frames(tmp_path: Path) -> None:
    write_frames(tmp_path / "long", 10)
    write_frames(tmp_path / "short", 3)
    header = ["sample_id", "split", "group", "frames", "label:x"]
    path = write_csv(tmp_path / "m.csv", header, [["long", "train", "g", "long", 1]])
    picked = lambda frames: [Path(p).name for p in load_clip_manifest(path, clip_frames=frames).clips[0].frame_paths]
    # First and last always kept; round(k * 9 / 3) for k = 0..3.
    assert picked(4) == ["00000.png", "00003.png", "00006.png", "00009.png"]
    assert picked(1) == ["00004.png"]  # the middle one
    assert picked(10) == [f"{t:05d}.png" for t in range(10)]
    assert len(picked(None)) == 10
    path = write_csv(
        tmp_path / "m.csv", header, [["long", "train", "g", "long", 1], ["short", "train", "g", "short", 0]]
    )
    with pytest.raises(
        DataError, match=r"1 of 2 clips .*line 3 \(sample_id 'short'\): 3 frames, fewer than clip_frames=4"
    ):
        load_clip_manifest(path, clip_frames=4)
    with pytest.raises(ValueError, match="clip_frames"):
        load_clip_manifest(path, clip_frames=0)


HEADER = ["sample_id", "split", "group", "frames", "label:ped", "label:car"]
GOOD_ROWS = [
    ["a", "train", "scene-1", "frames/a", 1, 0],
    ["b", "train", "scene-1", "frames/b", 0, 0],
    ["d", "val", "scene-3", "frames/d", 1, 1],
]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda rows: rows[1].__setitem__(5, 2), r"bad\.csv, line 3, column 'label:car': value '2' is not 0 or 1"),
        (
            lambda rows: rows[0].__setitem__(4, "0.5"),
            r"bad\.csv, line 2, column 'label:ped': value '0\.5' is not 0 or 1",
        ),
        (lambda rows: rows[0].__setitem__(4, ""), r"bad\.csv, line 2, column 'label:ped': value '' is not 0 or 1"),
        (lambda rows: rows[2].__setitem__(0, "a"), r"bad\.csv, line 4: sample_id 'a' is also at line 2"),
        (lambda rows: rows[1].__setitem__(2, " "), r"bad\.csv, line 3, column 'group': expected a non-empty text"),
        (lambda rows: rows[1].__setitem__(3, ""), r"bad\.csv, line 3, column 'frames': empty"),
        (lambda rows: rows[1].__setitem__(3, "clip.mp4"), r"bad\.csv, line 3, column 'frames': 'clip.mp4' is a video"),
        (lambda rows: rows[1].append("extra"), r"bad\.csv, line 3: row has 7 fields but the header has 6"),
    ],
    ids=[
        "label 2",
        "label 0.5",
        "label empty",
        "duplicate id",
        "empty group",
        "empty frames",
        "video file",
        "extra field",
    ],
)
def test_bad_csv_rows_name_the_file_line_column_and_value(dataset_dir: Path, change, message: str) -> None:
    rows = [list(r) for r in GOOD_ROWS]
    change(rows)
    with pytest.raises(DataError, match=message):
        load_clip_manifest(write_csv(dataset_dir / "bad.csv", HEADER, rows))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (
            ["sample_id", "split", "frames", "label:ped", "label:car"],
            r"bad\.csv, line 1: missing column\(s\) \['group'\]",
        ),
        (["sample_id", "split", "group", "frames", "x", "y"], r"bad\.csv, line 1: no label columns"),
        (
            ["sample_id", "split", "group", "frames", "label:ped", "labels"],
            "both label:<name> columns and a labels column",
        ),
        (["sample_id", "split", "group", "frames", "label:ped", "label:ped"], r"\['label:ped'\] appear more than once"),
    ],
)
def test_bad_csv_headers_name_the_column(dataset_dir: Path, header: list[str], message: str) -> None:
    rows = [row[: len(header)] for row in GOOD_ROWS]
    with pytest.raises(DataError, match=message):
        load_clip_manifest(write_csv(dataset_dir / "bad.csv", header, rows))


def test_unknown_label_names_are_refused(dataset_dir: Path) -> None:
    path = write_csv(
        dataset_dir / "bad.csv",
        ["sample_id", "split", "group", "frames", "labels"],
        [["a", "train", "g", "frames/a", "ped;truck"]],
    )
    with pytest.raises(
        DataError, match=r"bad\.csv, line 2, column 'labels': unknown label\(s\) \['truck'\] \(labels: ped, car\)"
    ):
        load_clip_manifest(path, label_names=("ped", "car"))
    clips = [
        {"sample_id": "a", "split": "train", "group": "g", "frames": "frames/a", "labels": {"ped": 1, "car": 0}},
        {"sample_id": "b", "split": "train", "group": "g", "frames": "frames/b", "labels": {"ped": 1, "bus": 0}},
    ]
    (dataset_dir / "bad.json").write_text(json.dumps(clips))
    with pytest.raises(DataError, match=r"bad\.json, clips\[1\]: unknown label\(s\) \['bus'\]"):
        load_clip_manifest(dataset_dir / "bad.json")
    (dataset_dir / "bad.json").write_text(json.dumps({"labels": ["ped"], "clips": clips[:1]}))
    with pytest.raises(DataError, match=r"bad\.json, clips\[0\]: unknown label\(s\) \['car'\]"):
        load_clip_manifest(dataset_dir / "bad.json")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            [{"sample_id": "a", "split": "train", "group": "g", "frames": "frames/a", "labels": {"ped": 0.5}}],
            r"clips\[0\], key 'labels' \('ped'\): value 0\.5 is not 0 or 1",
        ),
        (
            [{"sample_id": "a", "split": "train", "group": "g", "frames": "frames/a", "label:ped": 2}],
            r"clips\[0\], key 'label:ped': value 2 is not 0 or 1",
        ),
        (
            [{"sample_id": "a", "split": "train", "frames": "frames/a", "label:ped": 1}],
            r"clips\[0\]: missing key\(s\) \['group'\]",
        ),
        (
            [{"sample_id": "a", "split": "train", "group": "g", "frames": [], "label:ped": 1}],
            r"clips\[0\], key 'frames': empty",
        ),
        ({"labels": ["ped"], "clips": [], "extra": 1}, r"got keys \['clips', 'extra', 'labels'\]"),
        ({"labels": ["ped"], "clips": []}, "has no clips"),
        ("[{", "is not valid JSON"),
        (
            [{"sample_id": "a", "split": "train", "group": "g", "frames": "frames/a", "labels": 5}],
            r"clips\[0\], key 'labels': expected the names of the labels present, got 5",
        ),
        ([{"sample_id": "a", "split": "train", "group": "g", "frames": "frames/a"}], r"clips\[0\]: no labels"),
    ],
    ids=[
        "label 0.5",
        "label 2",
        "missing key",
        "empty frames",
        "unknown top-level key",
        "no clips",
        "not json",
        "labels not names",
        "no labels",
    ],
)
def test_bad_json_names_the_file_clip_key_and_value(dataset_dir: Path, content, message: str) -> None:
    path = dataset_dir / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError, match=rf"bad\.json.*{message}"):
        load_clip_manifest(path)


def test_missing_frames_are_counted_and_the_first_named(dataset_dir: Path) -> None:
    rows = [[f"m{k}", "train", "g", f"frames/gone_{k}", 1, 0] for k in range(7)]
    rows += [["a", "train", "g", "frames/a/00000.png;frames/a/00009.png;frames/a/00010.png", 1, 0]]
    rows += [["e", "train", "g", "frames/a/*.jpg", 1, 0], ["good", "val", "h", "frames/d", 0, 0]]
    (dataset_dir / "frames" / "empty").mkdir()
    rows += [["f", "train", "g", "frames/empty", 1, 0]]
    with pytest.raises(DataError) as caught:
        load_clip_manifest(write_csv(dataset_dir / "m.csv", HEADER, rows))
    message = str(caught.value)
    assert message.startswith(f"{dataset_dir / 'm.csv'}: 10 of 11 clips have missing or too few frames")
    assert "line 2 (sample_id 'm0'): 'frames/gone_0' does not exist" in message
    assert "m4" in message and "m5" not in message and "and 5 more" in message
    # The others, past the first five named, are counted; each kind of problem has its own wording.
    rows = rows[7:]
    with pytest.raises(DataError) as caught:
        load_clip_manifest(write_csv(dataset_dir / "m.csv", HEADER, rows))
    message = str(caught.value)
    assert "3 of 4 clips" in message
    assert "line 2 (sample_id 'a'): 2 of 3 frames do not exist, e.g. 'frames/a/00009.png'" in message
    assert "glob 'frames/a/*.jpg' matches no image files" in message
    assert "folder 'frames/empty' holds no image files" in message


def test_a_frame_that_does_not_decode_is_named_with_its_line_and_clip(dataset_dir: Path, file_record: Path) -> None:
    path = csv_with_label_columns(dataset_dir / "m.csv", frames="list")
    frame = dataset_dir / "frames" / "c" / "00002.png"
    frame.write_bytes(frame.read_bytes()[:-28])  # into the image data: a shorter cut only loses the end marker
    with pytest.raises(DataError) as error:
        load_clip_manifest(path)
    message = str(error.value)
    assert message.startswith(f"clip manifest {path}: 1 of 15 frame files cannot be decoded")
    assert f"{frame} (used by line 4 (sample_id 'c', split 'train')): does not decode" in message


def test_empty_splits_are_refused_where_required(dataset_dir: Path) -> None:
    rows = [row for row in GOOD_ROWS if row[1] == "train"]
    path = write_csv(dataset_dir / "m.csv", HEADER, rows)
    manifest = load_clip_manifest(path)  # nothing required: reading alone is fine
    with pytest.raises(
        DataError, match=r"m\.csv: split 'val' has no clips \(splits in the manifest: train \(2 clips\)\)"
    ):
        manifest.split("val")
    with pytest.raises(DataError, match="split 'val' has no clips"):
        manifest.dataset("val", image_size=8, mean=MEAN, std=STD)
    with pytest.raises(DataError, match="split 'val' has no clips"):
        load_clip_manifest(path, required_splits=("train", "val"))
    assert len(load_clip_manifest(path, required_splits="train").split("train")) == 2


def test_splits_groups_and_fingerprints(dataset_dir: Path) -> None:
    manifest = load_clip_manifest(csv_with_label_columns(dataset_dir / "m.csv"))
    assert {s: [c.sample_id for c in clips] for s, clips in manifest.by_split().items()} == {
        "train": ["a", "b", "c"],
        "val": ["d"],
    }
    assert manifest.groups_by_split() == {"train": {"scene-1", "scene-2"}, "val": {"scene-3"}}
    assert manifest.label_matrix().tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1], [1, 1, 1]]
    assert manifest.label_matrix("val").shape == (1, 3)
    assert manifest.manifest_hash() == manifest_hash(manifest.clips)
    assert manifest.manifest_hash("train") != manifest.manifest_hash()
    assert manifest.label_checksum("train") == label_checksum(np.array([[1, 0, 0], [0, 0, 0], [0, 1, 1]]))
    assert group_overlap(manifest) == {"splits": ["train", "val"], "groups": [], "sample_ids": {"train": [], "val": []}}


def test_group_overlap_reports_a_shared_group_without_raising(
    dataset_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = [list(r) for r in GOOD_ROWS] + [
        ["e", "val", "scene-1", "frames/c", 0, 1],
        ["f", "test", "scene-1", "frames/c", 0, 1],
    ]
    manifest = load_clip_manifest(write_csv(dataset_dir / "m.csv", HEADER, rows))
    assert [c.sample_id for c in manifest.clips] == ["a", "b", "d", "e", "f"]  # nothing dropped
    assert group_overlap(manifest) == {
        "splits": ["train", "val"],
        "groups": ["scene-1"],
        "sample_ids": {"train": ["a", "b"], "val": ["e"]},
    }
    assert group_overlap(manifest, "val", "test")["groups"] == ["scene-1"]
    assert group_overlap(manifest, "train", "missing") == {
        "splits": ["train", "missing"],
        "groups": [],
        "sample_ids": {"train": [], "missing": []},
    }
    assert "1 group(s) have clips in both train and val: 'scene-1'" in caplog.text


def test_dataset_items_equal_clip_dataset_items(dataset_dir: Path) -> None:
    manifest = load_clip_manifest(csv_with_label_columns(dataset_dir / "m.csv"), clip_frames=3)
    dataset = manifest.dataset("train", image_size=8, mean=MEAN, std=STD)
    assert isinstance(dataset, ProbeClipDataset) and len(dataset) == 3
    assert dataset.labels.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]] and dataset.labels.dtype == np.int64
    # The same frames and labels as a CVS record: ClipDataset must serve identical tensors.
    clip = manifest.clips[1]
    record = ClipRecord("b_0", 0, 0, clip.frame_paths, tuple(int(x) for x in clip.labels), clip.labels)
    reference = ClipDataset([record], image_size=8, mean=MEAN, std=STD)[0]
    item = dataset[1]
    assert item["sample_id"] == "b" and item["index"] == 1
    assert item["pixel_values"].shape == (3, 3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert torch.equal(item["pixel_values"], reference["pixel_values"])
    assert torch.equal(item["labels"], torch.tensor([0.0, 0.0, 0.0]))
    # Clip b has frames 0, 2, 4 of 5 kept: green channel 30 t.
    expected_green = [(30 * t / 255 - MEAN[1]) / STD[1] for t in (0, 2, 4)]
    torch.testing.assert_close(item["pixel_values"][:, 1].mean(dim=(1, 2)), torch.tensor(expected_green))


def test_dataset_with_two_labels_batches(dataset_dir: Path) -> None:
    manifest = load_clip_manifest(write_csv(dataset_dir / "m.csv", HEADER, GOOD_ROWS), clip_frames=2)
    dataset = manifest.dataset("train", image_size=6, mean=MEAN, std=STD)
    assert dataset.labels.shape == (2, 2)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert batch["pixel_values"].shape == (2, 2, 3, 6, 6)
    assert torch.equal(batch["labels"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert batch["sample_id"] == ["a", "b"] and batch["index"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="num_labels=3"):
        ProbeClipDataset(manifest.clips, 3, image_size=6, mean=MEAN, std=STD)


@pytest.fixture(scope="module")
def cvs_demo_manifest(tmp_path_factory: pytest.TempPathFactory, avlm_cache: Path) -> tuple[ClipManifest, dict]:
    out = write_cvs_demo_manifest(avlm_cache, tmp_path_factory.mktemp("manifest") / "cvs_demo.csv")
    records = load_endoscapes(ensure_cvs_demo(avlm_cache), clip_frames=4)  # cached by the line above
    return load_clip_manifest(out, clip_frames=4, required_splits=("train", "val", "test")), records


def test_cvs_demo_manifest_round_trips(cvs_demo_manifest: tuple[ClipManifest, dict]) -> None:
    manifest, records = cvs_demo_manifest
    assert manifest.label_names == ("C1", "C2", "C3")
    by_split = manifest.by_split()
    assert list(by_split) == ["train", "val", "test"]
    for split, split_records in records.items():
        clips = by_split[split]
        assert len(clips) == len(split_records) > 0
        assert [c.sample_id for c in clips] == [r.clip_id for r in split_records]
        assert [c.frame_paths for c in clips] == [r.frame_paths for r in split_records]
        assert {c.group for c in clips} == {str(r.video_id) for r in split_records}
        assert manifest.manifest_hash(split) == manifest_hash(split_records)
        assert manifest.label_checksum(split) == label_checksum(split_records)
    groups = manifest.groups_by_split()
    assert (
        not groups["train"] & groups["val"]
        and not groups["train"] & groups["test"]
        and not groups["val"] & groups["test"]
    )
    assert group_overlap(manifest)["groups"] == []


def test_cvs_demo_manifest_with_an_injected_shared_group(
    cvs_demo_manifest: tuple[ClipManifest, dict], tmp_path: Path
) -> None:
    manifest, _ = cvs_demo_manifest
    with open(manifest.path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    val_row = next(k for k, row in enumerate(rows) if row[1] == "val")
    moved_id, train_group = rows[val_row][0], next(row[2] for row in rows[1:] if row[1] == "train")
    rows[val_row][2] = train_group
    # Next to the original, so relative frame paths (if any) still resolve.
    edited = write_csv(manifest.path.with_name("shared.csv"), rows[0], rows[1:])
    overlap = group_overlap(load_clip_manifest(edited))
    assert overlap["groups"] == [train_group]
    assert overlap["sample_ids"]["val"] == [moved_id]
    assert overlap["sample_ids"]["train"] == [c.sample_id for c in manifest.split("train") if c.group == train_group]
