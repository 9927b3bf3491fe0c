"""The built-in demo data: deterministic, cached, in the Endoscapes layout, with the real label mix, segmentation
masks of the drawn patterns, the training subsets and per-annotator votes."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avlm.data import DEMO_VERSION, attach_masks, ensure_cvs_demo, load_endoscapes, read_annotator_votes
from avlm.data import cvs_demo as demo_module
from avlm.data.cvs_demo import SEG_CATEGORIES, SPLIT_VIDEOS
from avlm.data.generated import COMPLETE_MARKER

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    start = time.perf_counter()
    folder = ensure_cvs_demo(tmp_path_factory.mktemp("cache"), seed=0)
    return folder, time.perf_counter() - start


@pytest.fixture(scope="module")
def demo(generated: tuple[Path, float]) -> Path:
    return generated[0]


@pytest.fixture(scope="module")
def records(demo: Path) -> dict:
    return load_endoscapes(demo)


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_folder_name_and_quick_generation(generated: tuple[Path, float]) -> None:
    folder, seconds = generated
    assert folder.name == f"cvs_demo_{DEMO_VERSION}_s0_32px"
    assert (folder / COMPLETE_MARKER).is_file()
    # About 2 s on 2 cores; the bound leaves room for a busy CI machine.
    assert seconds < 30
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20e6


def test_same_seed_is_byte_identical(demo: Path, tmp_path: Path) -> None:
    again = ensure_cvs_demo(tmp_path, seed=0)
    assert again != demo
    first, second = tree_digest(demo), tree_digest(again)
    assert first == second
    assert len([name for name in first if name.endswith(".jpg")]) > 3000


def test_other_seed_differs(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # One small video per split keeps this fast; only the labels' source of randomness is compared.
    monkeypatch.setattr(demo_module, "SPLIT_VIDEOS", {"train": range(1, 2), "val": range(2, 3), "test": range(3, 4)})
    a = ensure_cvs_demo(tmp_path / "a", seed=0)
    b = ensure_cvs_demo(tmp_path / "b", seed=1)
    annotation = Path("train") / "annotation_ds_coco.json"
    assert (a / annotation).read_bytes() != (b / annotation).read_bytes()


def test_layout_matches_endoscapes(demo: Path, records: dict) -> None:
    for split in SPLITS:
        videos = sorted({r.video_id for r in records[split]})
        assert videos == list(SPLIT_VIDEOS[split])
        assert (demo / f"{split}_vids.txt").read_text().split() == [str(v) for v in SPLIT_VIDEOS[split]]
        coco = json.loads((demo / split / "annotation_ds_coco.json").read_text())
        assert len(coco["images"]) == len(records[split])
        for video in videos:
            frames = sorted(r.frame_num for r in records[split] if r.video_id == video)
            assert 10 <= len(frames) <= 14
            assert all(f % 25 == 0 for f in frames)
            assert set(np.diff(frames)) == {125}  # a keyframe every 5 s
            # Every 1 fps frame up to the last keyframe is on disk, labelled or not.
            on_disk = sorted(int(p.stem.split("_")[1]) for p in (demo / split).glob(f"{video}_*.jpg"))
            assert on_disk == list(range(frames[0] - 50, frames[-1] + 1, 25))
    image = Image.open(records["train"][0].frame_paths[-1])
    assert (image.format, image.size, image.mode) == ("JPEG", (32, 32), "RGB")
    # The first keyframe of a video has 2 earlier frames only: its default 4-frame clip is padded.
    first = records["train"][0]
    assert first.frame_paths[0] == first.frame_paths[1] != first.frame_paths[2]


def test_label_mix_resembles_endoscapes(records: dict) -> None:
    labels = np.array([r.labels for split in SPLITS for r in records[split]])
    scores = np.array([r.scores for split in SPLITS for r in records[split]])
    assert abs((labels.sum(axis=1) == 0).mean() - 0.74) <= 0.06
    rates = labels.mean(axis=0)
    np.testing.assert_allclose(rates, [0.146, 0.105, 0.168], atol=0.03)
    assert rates.argmin() == 1  # C2 is the rarest
    assert (labels.sum(axis=1) >= 2).mean() > 0.05
    for split in SPLITS:  # every split, not just the union, carries the mix
        split_rates = np.array([r.labels for r in records[split]]).mean(axis=0)
        np.testing.assert_allclose(split_rates, [0.146, 0.105, 0.168], atol=0.03)
    # Annotator means; a positive has 2 or 3 votes, a negative 0 or 1.
    assert set(np.round(scores.ravel(), 6)) == {0.0, 0.333333, 0.666667, 1.0}
    assert np.array_equal(labels, (scores >= 0.5).astype(int))


def test_patterns_are_visible(records: dict) -> None:
    """C3 (two blue blobs) leaves strongly blue pixels on its keyframes; keyframes without any C3 vote have few."""

    def blue_pixels(path: str) -> int:
        rgb = np.asarray(Image.open(path), dtype=int)
        return int(((rgb[..., 2] > 160) & (rgb[..., 0] < 110) & (rgb[..., 1] < 140)).sum())

    train = records["train"]
    positive = np.mean([blue_pixels(r.frame_paths[-1]) for r in train if r.scores[2] == 1.0])
    negative = np.mean([blue_pixels(r.frame_paths[-1]) for r in train if r.scores[2] == 0.0])
    assert positive > 5 * max(negative, 1.0)


def test_second_call_reuses(demo: Path) -> None:
    marker = demo / COMPLETE_MARKER
    frame = next((demo / "val").glob("*.jpg"))
    stamps = (marker.stat().st_mtime_ns, frame.stat().st_mtime_ns)
    start = time.perf_counter()
    assert ensure_cvs_demo(demo.parent, seed=0) == demo
    assert time.perf_counter() - start < 0.5
    assert (marker.stat().st_mtime_ns, frame.stat().st_mtime_ns) == stamps


def test_default_root_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AVLM_CACHE_DIR", str(tmp_path))
    folder = tmp_path / f"cvs_demo_{DEMO_VERSION}_s3_48px"
    folder.mkdir()
    (folder / COMPLETE_MARKER).write_text("{}")
    assert ensure_cvs_demo(seed=3, image_size=48) == folder


def test_incomplete_folder_is_regenerated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "SPLIT_VIDEOS", {"train": range(1, 2), "val": range(2, 3), "test": range(3, 4)})
    half = tmp_path / f"cvs_demo_{DEMO_VERSION}_s0_32px"
    (half / "train").mkdir(parents=True)
    (half / "train" / "1_0.jpg").write_bytes(b"partial")
    folder = ensure_cvs_demo(tmp_path, seed=0)
    assert folder == half and (folder / COMPLETE_MARKER).is_file()
    assert len(load_endoscapes(folder)["train"]) >= 10


def test_image_size_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo_module, "SPLIT_VIDEOS", {"train": range(1, 2), "val": range(2, 3), "test": range(3, 4)})
    folder = ensure_cvs_demo(tmp_path, seed=0, image_size=64)
    assert folder.name.endswith("_64px")
    assert Image.open(next((folder / "test").glob("*.jpg"))).size == (64, 64)
    with pytest.raises(ValueError, match="image_size"):
        ensure_cvs_demo(tmp_path, image_size=8)


@pytest.fixture(scope="module")
def masked(demo: Path, records: dict) -> dict:
    return attach_masks(demo, records)


def test_about_half_of_the_clips_have_masks_on_all_frames(demo: Path, masked: dict) -> None:
    for split in SPLITS:
        share = np.mean([r.has_mask for r in masked[split]])
        assert 0.4 <= share <= 0.6, (split, share)
        seg = json.loads((demo / f"{split}_seg" / "annotation_coco.json").read_text())
        assert [c["name"] for c in seg["categories"]] == list(SEG_CATEGORIES)
        segmented = {image["file_name"] for image in seg["images"]}
        videos = {int(name.split("_")[0]) for name in segmented}
        assert len(videos) == (len(SPLIT_VIDEOS[split]) + 1) // 2
        # Every stored frame of a masked video has a mask, so each of its clips is masked on all its frames.
        on_disk = {p.name for p in (demo / split).glob("*.jpg") if int(p.name.split("_")[0]) in videos}
        assert segmented == on_disk
        for record in masked[split]:
            assert record.has_mask == (record.video_id in videos)
            expected = (True,) * len(record.frame_paths) if record.has_mask else ()
            assert tuple(m is not None for m in record.mask_frames) == expected


def test_masks_mark_the_drawn_patterns(masked: dict) -> None:
    """Pixels masked as Calot's triangle (the red square) are red, artery and duct (the blue blobs) are blue."""
    colours: dict[int, list[np.ndarray]] = {k: [] for k in range(5)}
    keyframes = [r for r in masked["train"] if r.has_mask]
    for record in keyframes:
        classes = record.mask_frames[-1].render(32)
        rgb = np.asarray(Image.open(record.frame_paths[-1]), dtype=float)
        for k in range(5):
            colours[k].append(rgb[classes == k])
    pixels = {k: np.concatenate(colours[k]) for k in range(5)}
    mean = {k: p.mean(axis=0) for k, p in pixels.items()}
    red, green, blue = 0, 1, 2
    assert mean[2][red] > mean[2][green] + 120  # calot_triangle: the red square
    # cystic_plate: red and green stripes, so little blue and far more red/green spread than the background.
    assert mean[1][blue] < mean[0][blue] - 20
    assert (pixels[1].std(axis=0)[:2] > 1.5 * pixels[0].std(axis=0)[:2]).all()
    for blob in (3, 4):  # cystic artery, cystic duct: the blue blobs
        assert mean[blob][blue] > mean[blob][red] + 60
    # A clip positive for a criterion shows its structure on the keyframe unless hidden that frame (10%).
    c3_full = [r for r in keyframes if r.scores[2] > 0.5]
    with_duct = np.mean([(r.mask_frames[-1].render(32) == 4).any() for r in c3_full])
    assert with_duct > 0.8
    c1_free = [r for r in keyframes if r.scores[0] == 0.0]
    assert not any((r.mask_frames[-1].render(32) == 2).any() for r in c1_free)


def test_training_subsets_hold_a_share_of_the_train_videos(demo: Path, records: dict) -> None:
    train_videos = {r.video_id for r in records["train"]}
    for name, n_videos in (("12_5", 11), ("25", 23)):  # 12.5% and 25% of 90 videos, rounded
        folds = []
        for fold in range(3):
            coco = json.loads((demo / name / f"train_{fold}" / "annotation_ds_coco.json").read_text())
            videos = {image["video_id"] for image in coco["images"]}
            assert len(videos) == n_videos and videos <= train_videos
            # Each chosen video keeps all its keyframes.
            assert len(coco["images"]) == sum(r.video_id in videos for r in records["train"])
            folds.append(videos)
        assert folds[0] != folds[1] != folds[2]


def test_annotator_votes_average_to_the_ds_scores(demo: Path, records: dict) -> None:
    votes = read_annotator_votes(demo / "all_metadata.csv")
    all_records = [r for split in SPLITS for r in records[split]]
    assert len(votes) == len(all_records)
    for record in all_records:
        clip_votes = np.array(votes[(record.video_id, record.frame_num)])
        np.testing.assert_allclose(clip_votes.mean(axis=0), record.scores, atol=1e-9)
