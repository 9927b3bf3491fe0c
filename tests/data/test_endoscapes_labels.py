"""Per-annotator CVS labels (all_metadata.csv) and the label policies of load_endoscapes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avlm.data import LABEL_POLICIES, binarise_votes, cvs_demo, ensure_cvs_demo, load_endoscapes, read_annotator_votes
from avlm.errors import DataError

# votes[annotator][criterion] of keyframe 7_50: C1 1 of 3, C2 2 of 3, C3 3 of 3 (ds 1/3, 2/3, 1).
VOTES_7_50 = ((1, 0, 1), (0, 1, 1), (0, 1, 1))
HEADER = "vid,frame,C1_1,C2_1,C3_1,C1_2,C2_2,C3_2,C1_3,C2_3,C3_3\n"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """Train keyframes 7_50 (votes VOTES_7_50) and 7_75 (all zero); an unlabelled frame 7_25 in the csv."""
    train = tmp_path / "train"
    train.mkdir()
    for name in ("7_25.jpg", "7_50.jpg", "7_75.jpg"):
        Image.new("RGB", (8, 8), (90, 40, 30)).save(train / name)
    images = [
        {"id": 1, "file_name": "7_50.jpg", "ds": [1 / 3, 2 / 3, 1.0]},
        {"id": 2, "file_name": "7_75.jpg", "ds": [0.0, 0.0, 0.0]},
    ]
    (train / "annotation_ds_coco.json").write_text(json.dumps({"images": images}))
    flat = ",".join(str(v) for annotator in VOTES_7_50 for v in annotator)
    (tmp_path / "all_metadata.csv").write_text(f"{HEADER}7,25,,,,,,,,,\n7,50,{flat}\n7,75,0,0,0,0,0,0,0,0,0\n")
    return tmp_path


def labels_under(root: Path, policy: str) -> list[tuple[int, ...]]:
    return [r.labels for r in load_endoscapes(root, splits=("train",), label_policy=policy)["train"]]


@pytest.mark.parametrize(
    ("policy", "expected"),
    [
        ("majority", (0, 1, 1)),
        ("any", (1, 1, 1)),
        ("all", (0, 0, 1)),
        ("annotator_1", (1, 0, 1)),
        ("annotator_2", (0, 1, 1)),
        ("annotator_3", (0, 1, 1)),
    ],
)
def test_policies_binarise_the_votes(dataset: Path, policy: str, expected: tuple[int, ...]) -> None:
    assert binarise_votes(VOTES_7_50, policy) == expected
    assert labels_under(dataset, policy) == [expected, (0, 0, 0)]


def test_policy_list() -> None:
    assert LABEL_POLICIES == ("majority", "any", "all", "annotator_1", "annotator_2", "annotator_3")


def test_scores_stay_the_ds_values(dataset: Path) -> None:
    (record, _) = load_endoscapes(dataset, splits=("train",), label_policy="any")["train"]
    assert record.scores == (1 / 3, 2 / 3, 1.0)


def test_votes_are_read_with_unlabelled_rows_skipped(dataset: Path) -> None:
    votes = read_annotator_votes(dataset / "all_metadata.csv")
    assert votes == {(7, 50): VOTES_7_50, (7, 75): ((0, 0, 0),) * 3}


def test_other_column_spellings(tmp_path: Path) -> None:
    header = "video_id,frame_num," + ",".join(f"rater{a}_C{c}" for a in (1, 2, 3) for c in (1, 2, 3))
    (tmp_path / "all_metadata.csv").write_text(f"{header}\n7,50,{','.join('1' * 9)}\n")
    assert read_annotator_votes(tmp_path / "all_metadata.csv") == {(7, 50): ((1, 1, 1),) * 3}


def test_majority_needs_no_metadata_and_equals_the_official_rounding(dataset: Path) -> None:
    (dataset / "all_metadata.csv").unlink()
    assert labels_under(dataset, "majority") == [(0, 1, 1), (0, 0, 0)]
    with pytest.raises(DataError, match=r"all_metadata.csv does not exist"):
        labels_under(dataset, "any")


def test_majority_of_the_demo_votes_equals_the_default_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A smaller demo keeps this quick; its generator and label plan are the full demo's.
    monkeypatch.setattr(cvs_demo, "SPLIT_VIDEOS", {"train": range(1, 11), "val": range(11, 14), "test": range(14, 17)})
    demo = ensure_cvs_demo(tmp_path)
    default = load_endoscapes(demo)
    votes = read_annotator_votes(demo / "all_metadata.csv")
    for records in default.values():
        for record in records:
            assert binarise_votes(votes[(record.video_id, record.frame_num)], "majority") == record.labels
    # And through load_endoscapes: any ≥ majority ≥ all, criterion by criterion, with strictly more positives.
    any_labels = np.array([r.labels for r in load_endoscapes(demo, splits=("train",), label_policy="any")["train"]])
    all_labels = np.array([r.labels for r in load_endoscapes(demo, splits=("train",), label_policy="all")["train"]])
    majority = np.array([r.labels for r in default["train"]])
    assert (any_labels >= majority).all() and (majority >= all_labels).all()
    assert any_labels.sum() > majority.sum() > all_labels.sum()


def test_keyframe_without_votes_is_named(dataset: Path) -> None:
    (dataset / "all_metadata.csv").write_text(f"{HEADER}7,75,0,0,0,0,0,0,0,0,0\n")
    with pytest.raises(DataError, match="no annotator votes for train keyframe 7_50"):
        labels_under(dataset, "all")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (f"{HEADER}7,50,2,0,0,0,0,0,0,0,0\n", r"line 2: an annotator vote must be 0 or 1, got '2'"),
        (f"{HEADER}7,50,1,0,0,0,0,0,0,0,\n", r"line 2: an annotator vote must be 0 or 1, got ''"),
        ("vid,frame,C1,C2,C3\n7,50,1,0,0\n", r"expected a video column .* its columns are \['vid', 'frame', 'C1'"),
    ],
)
def test_malformed_metadata_names_file_and_line(dataset: Path, content: str, message: str) -> None:
    (dataset / "all_metadata.csv").write_text(content)
    with pytest.raises(DataError, match=message):
        read_annotator_votes(dataset / "all_metadata.csv")


def test_unknown_policy(dataset: Path) -> None:
    with pytest.raises(ValueError, match="label_policy must be one of"):
        labels_under(dataset, "annotator_4")
