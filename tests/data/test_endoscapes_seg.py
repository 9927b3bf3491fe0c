"""Endoscapes-Seg50 masks: COCO polygons / RLE and semseg PNGs → per-frame class maps aligned with the frames."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from avlm.data import SEG_CLASSES, ClipDataset, attach_masks, load_endoscapes, load_frame, load_segmentation_masks
from avlm.data.endoscapes_seg import category_class, read_label_map
from avlm.errors import DataError

WIDTH, HEIGHT = 64, 48
# The drawn rectangle: rows 8..23, columns 16..31 of the 64x48 frame (even edges, so both resizes are exact).
TOP, BOTTOM, LEFT, RIGHT = 8, 24, 16, 32
RECTANGLE_POLYGON = [LEFT, TOP, RIGHT, TOP, RIGHT, BOTTOM, LEFT, BOTTOM]
CATEGORIES = [
    {"id": 1, "name": "cystic_plate"},
    {"id": 2, "name": "Calot's Triangle"},
    {"id": 3, "name": "cystic artery"},
    {"id": 4, "name": "Cystic-Duct"},
    {"id": 5, "name": "gallbladder"},
    {"id": 6, "name": "tool"},
]


def rle(pixels: np.ndarray, compressed: bool = True) -> dict:
    """COCO RLE of a bool mask; uncompressed = column-major run lengths starting with a background run."""
    if compressed:
        encoded = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
        return {"size": encoded["size"], "counts": encoded["counts"].decode("ascii")}
    flat = pixels.T.ravel().astype(int)
    runs, value, length = [], 0, 0
    for pixel in flat:
        if pixel == value:
            length += 1
        else:
            runs.append(length)
            value, length = pixel, 1
    runs.append(length)
    return {"size": list(pixels.shape), "counts": runs}


def box(top: int, bottom: int, left: int, right: int) -> np.ndarray:
    pixels = np.zeros((HEIGHT, WIDTH), dtype=bool)
    pixels[top:bottom, left:right] = True
    return pixels


def write_seg_json(root: Path, split: str, images: list[dict], annotations: list[dict], categories=None) -> Path:
    seg_dir = root / f"{split}_seg"
    seg_dir.mkdir(parents=True, exist_ok=True)
    path = seg_dir / "annotation_coco.json"
    coco = {"images": images, "annotations": annotations, "categories": categories or CATEGORIES}
    path.write_text(json.dumps(coco))
    return path


def seg_image(image_id: int, file_name: str) -> dict:
    return {"id": image_id, "file_name": file_name, "height": HEIGHT, "width": WIDTH}


def instance(annotation_id: int, image_id: int, category_id: int, segmentation: object) -> dict:
    return {"id": annotation_id, "image_id": image_id, "category_id": category_id, "segmentation": segmentation}


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """One train video: keyframe 5_75 (a red rectangle = Calot's triangle) and context frames 5_25, 5_50."""
    train = tmp_path / "train"
    train.mkdir()
    for name in ("5_25.png", "5_50.png", "5_75.png"):
        pixels = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
        if name == "5_75.png":
            pixels[TOP:BOTTOM, LEFT:RIGHT] = (255, 0, 0)
        Image.fromarray(pixels).save(train / name)
    images = [{"id": 1, "file_name": "5_75.png", "ds": [1.0, 0.0, 0.0]}]
    (train / "annotation_ds_coco.json").write_text(json.dumps({"images": images}))
    write_seg_json(
        tmp_path,
        "train",
        [seg_image(1, "5_75.png"), seg_image(2, "5_50.png")],
        [
            instance(1, 1, 2, [RECTANGLE_POLYGON]),
            instance(2, 2, 4, rle(box(0, 4, 8, 16))),  # compressed RLE
            instance(3, 2, 3, rle(box(40, 48, 56, 64), compressed=False)),  # uncompressed RLE
            instance(4, 2, 6, rle(box(20, 30, 20, 30))),  # tool: background
        ],
    )
    return tmp_path


def test_classes_and_category_names() -> None:
    assert SEG_CLASSES == ("background", "cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct")
    assert category_class("Hepatocystic triangle", "x") == category_class("calot_triangle", "x") == 2
    assert category_class("Cystic Plate", "x") == 1
    assert category_class("Gallbladder", "x") == category_class("Tool", "x") == 0


@pytest.mark.parametrize(
    ("size", "expected"),
    # 64x48 → shorter side to 24: 32x24, crop 4 columns each side; to 96: 128x96, crop 16 columns.
    [(24, (4, 12, 4, 12)), (96, (16, 48, 16, 48)), (48, (8, 24, 8, 24))],
)
def test_mask_rectangle_matches_the_drawn_pixels_at_any_size(dataset: Path, size: int, expected: tuple) -> None:
    masks = load_segmentation_masks(dataset, "train")
    rendered = masks[(5, 75)].render(size)
    assert rendered.dtype == np.int64 and rendered.shape == (size, size)
    top, bottom, left, right = expected
    hand = np.zeros((size, size), dtype=np.int64)
    hand[top:bottom, left:right] = 2
    np.testing.assert_array_equal(rendered, hand)
    red = load_frame(dataset / "train" / "5_75.png", size)[..., 0] > 127
    np.testing.assert_array_equal(red, rendered == 2)


def test_rle_kinds_and_tool_as_background(dataset: Path) -> None:
    classes = load_segmentation_masks(dataset, "train")[(5, 50)].class_map()
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    expected[0:4, 8:16] = 4  # cystic duct, compressed RLE
    expected[40:48, 56:64] = 3  # cystic artery, uncompressed RLE
    np.testing.assert_array_equal(classes, expected)


def test_smaller_instances_are_painted_over_larger_ones(tmp_path: Path) -> None:
    write_seg_json(
        tmp_path,
        "val",
        [seg_image(7, "9_0.jpg")],
        [instance(1, 7, 3, rle(box(10, 12, 10, 12))), instance(2, 7, 1, rle(box(0, 48, 0, 64)))],
    )
    classes = load_segmentation_masks(tmp_path, "val")[(9, 0)].class_map()
    assert (classes[10:12, 10:12] == 3).all() and (classes == 1).sum() == HEIGHT * WIDTH - 4


def test_unknown_category_names_file_and_category(tmp_path: Path) -> None:
    path = write_seg_json(tmp_path, "train", [], [], categories=[{"id": 1, "name": "liver"}])
    with pytest.raises(DataError, match=rf"{path}.*'liver'"):
        load_segmentation_masks(tmp_path, "train")


def test_malformed_segmentation_is_named(tmp_path: Path) -> None:
    path = write_seg_json(tmp_path, "train", [seg_image(1, "1_0.jpg")], [instance(8, 1, 2, [[1, 2, 3]])])
    with pytest.raises(DataError, match=rf"{path}: annotations\[0\] \(id=8\)"):
        load_segmentation_masks(tmp_path, "train")


def test_missing_masks_name_the_expected_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="train_seg/annotation_coco.json"):
        load_segmentation_masks(tmp_path, "train")


def test_semseg_pngs_through_the_label_map(tmp_path: Path) -> None:
    semseg = tmp_path / "test_seg" / "semseg"
    semseg.mkdir(parents=True)
    values = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    values[0:2, 0:3] = 7  # cystic plate in the PNG's own numbering
    values[5, 5] = 3  # tool
    values[6, 6] = 9  # cystic duct
    Image.fromarray(values).save(semseg / "4_100.png")
    (tmp_path / "test_seg" / "seg_label_map.txt").write_text(
        "# id name\n0 background\n7: cystic plate\n3,Tool\nCystic Duct 9\n"
    )
    classes = load_segmentation_masks(tmp_path, "test")[(4, 100)].class_map()
    expected = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    expected[0:2, 0:3] = 1
    expected[6, 6] = 4
    np.testing.assert_array_equal(classes, expected)
    values[1, 1] = 8  # not in the map
    Image.fromarray(values).save(semseg / "4_100.png")
    with pytest.raises(DataError, match=r"4_100.png: pixel value\(s\) \[8\]"):
        load_segmentation_masks(tmp_path, "test")[(4, 100)].class_map()
    (tmp_path / "test_seg" / "seg_label_map.txt").unlink()
    with pytest.raises(DataError, match="seg_label_map.txt does not exist"):
        load_segmentation_masks(tmp_path, "test")


def test_label_map_errors(tmp_path: Path) -> None:
    path = tmp_path / "seg_label_map.txt"
    path.write_text("1 cystic_plate\n1 cystic_duct\n")
    with pytest.raises(DataError, match="line 2: id 1 is defined twice"):
        read_label_map(path)
    path.write_text("1 spleen\n")
    with pytest.raises(DataError, match="line 1: unknown segmentation category 'spleen'"):
        read_label_map(path)


def test_attach_masks_and_the_dataset_items(dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    records = load_endoscapes(dataset, splits=("train",), clip_frames=4)
    with caplog.at_level(logging.INFO, logger="avlm.data.endoscapes_seg"):
        train = attach_masks(dataset, records)["train"]
    assert "masks on 1 of 1 clips (100.0%), 0 clips without masks, 2 masked frames" in caplog.text
    (clip,) = train
    # Frames 5_25 (padding), 5_25, 5_50, 5_75: the first two have no mask.
    assert [m is None for m in clip.mask_frames] == [True, True, False, False] and clip.has_mask
    mean, std = [0.5] * 3, [0.25] * 3
    plain = ClipDataset(train, 24, mean, std)[0]
    masked = ClipDataset(train, 24, mean, std, with_masks=True)[0]
    assert set(plain) == {"pixel_values", "labels", "index"}
    assert set(masked) == set(plain) | {"seg_mask", "has_mask"}
    assert all(torch.equal(plain[k], masked[k]) for k in ("pixel_values", "labels")) and plain["index"] == 0
    seg = masked["seg_mask"]
    assert seg.dtype == torch.int64 and seg.shape == (4, 24, 24)
    assert (seg[:2] == -1).all()
    assert torch.equal(seg[3], torch.from_numpy(load_segmentation_masks(dataset, "train")[(5, 75)].render(24)))
    assert int((seg[2] == 4).sum()) == 2 * 4  # the duct box: rows 0..3 × columns 8..15, halved and shifted by the crop
    assert masked["has_mask"].dtype == torch.bool and bool(masked["has_mask"])
    batch = torch.utils.data.default_collate([masked, masked])
    assert batch["seg_mask"].shape == (2, 4, 24, 24) and batch["has_mask"].tolist() == [True, True]


def test_clip_without_masks_is_marked(dataset: Path) -> None:
    records = load_endoscapes(dataset, splits=("train",), clip_frames=1)
    write_seg_json(dataset, "train", [seg_image(2, "5_50.png")], [])
    (clip,) = attach_masks(dataset, records)["train"]
    assert clip.mask_frames == () and not clip.has_mask
    item = ClipDataset([clip], 16, [0.5] * 3, [0.25] * 3, with_masks=True)[0]
    assert (item["seg_mask"] == -1).all() and not item["has_mask"]


def test_mask_of_another_size_than_its_frame_is_refused(dataset: Path) -> None:
    records = load_endoscapes(dataset, splits=("train",), clip_frames=1)
    image = {"id": 1, "file_name": "5_75.png", "height": HEIGHT, "width": WIDTH + 2}
    write_seg_json(dataset, "train", [image], [])
    with pytest.raises(DataError, match=r"66x48 \(width x height\) but frame .*5_75.png is 64x48"):
        attach_masks(dataset, records)
