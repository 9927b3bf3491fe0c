"""ClipDataset tensors, load_frame resizing and errors, and the record fingerprints."""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avlm.data import ClipDataset, ClipRecord, label_checksum, load_frame, manifest_hash
from avlm.errors import DataError
from avlm.probe import sanity

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.5)


def solid(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (12, 12)) -> str:
    Image.new("RGB", size, colour).save(path)  # PNG: lossless, so the pixel values are exact
    return str(path)


def make_records(folder: Path, n: int = 3, frames: int = 2) -> list[ClipRecord]:
    records = []
    for i in range(n):
        paths = tuple(solid(folder / f"{i}_{25 * t}.png", (10 * i, 20 * t, 255)) for t in range(frames))
        labels = (i % 2, 0, 1)
        records.append(ClipRecord(f"{i}_{25 * (frames - 1)}", i, 25 * (frames - 1), paths, labels, labels))
    return records


def test_item_shapes_labels_and_normalisation(tmp_path: Path) -> None:
    records = make_records(tmp_path)
    dataset = ClipDataset(records, image_size=8, mean=MEAN, std=STD)
    assert len(dataset) == 3
    assert dataset.labels.shape == (3, 3) and dataset.labels.dtype.kind == "i"
    assert dataset.labels.tolist() == [[0, 0, 1], [1, 0, 1], [0, 0, 1]]
    item = dataset[2]
    assert item["index"] == 2
    assert item["pixel_values"].shape == (2, 3, 8, 8) and item["pixel_values"].dtype == torch.float32
    assert torch.equal(item["labels"], torch.tensor([0.0, 0.0, 1.0]))
    # Frame t of clip 2 is the solid colour (20, 20 t, 255).
    for t in range(2):
        expected = [(c / 255 - m) / s for c, m, s in zip((20, 20 * t, 255), MEAN, STD, strict=True)]
        torch.testing.assert_close(item["pixel_values"][t].mean(dim=(1, 2)), torch.tensor(expected))
        assert item["pixel_values"][t].std(dim=(1, 2)).max() < 1e-5
    # Deterministic per index: a feature cache relies on it.
    assert torch.equal(dataset[1]["pixel_values"], dataset[1]["pixel_values"])


def test_batches_through_a_dataloader(tmp_path: Path) -> None:
    dataset = ClipDataset(make_records(tmp_path, n=4, frames=3), image_size=6, mean=MEAN, std=STD)
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=4)))
    assert batch["pixel_values"].shape == (4, 3, 3, 6, 6)
    assert batch["labels"].shape == (4, 3)
    assert batch["index"].tolist() == [0, 1, 2, 3]


def test_empty_dataset_has_empty_label_matrix() -> None:
    assert ClipDataset([], image_size=8, mean=MEAN, std=STD).labels.shape == (0, 3)


@pytest.mark.parametrize(("mean", "std"), [((0.5, 0.5), STD), (MEAN, (0.2, 0.0, 0.1))])
def test_bad_normalisation_is_refused(mean: tuple, std: tuple) -> None:
    with pytest.raises(ValueError):
        ClipDataset([], image_size=8, mean=mean, std=std)


def test_load_frame_resizes_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    # 40 x 20 (w x h): red | green | blue columns 0-9 | 10-29 | 30-39. Resized to 20 x 10, the centre crop
    # keeps columns 5-14 of the resized image, i.e. only green.
    image = np.zeros((20, 40, 3), dtype=np.uint8)
    image[:, :10, 0] = image[:, 10:30, 1] = image[:, 30:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(image).save(path)
    frame = load_frame(path, 10)
    assert frame.shape == (10, 10, 3) and frame.dtype == np.uint8
    assert (frame[:, 1:-1, 1] == 255).all() and (frame[:, 1:-1, [0, 2]] == 0).all()
    tall = load_frame(solid(tmp_path / "tall.png", (1, 2, 3), size=(16, 48)), 8)
    assert tall.shape == (8, 8, 3) and (tall == [1, 2, 3]).all()


def test_load_frame_converts_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8), (9, 8, 7, 100)).save(tmp_path / "alpha.png")
    assert (load_frame(tmp_path / "grey.png", 8) == 77).all()
    assert (load_frame(tmp_path / "alpha.png", 8) == [9, 8, 7]).all()


def test_unreadable_frames_raise_data_error_naming_them(tmp_path: Path) -> None:
    good = tmp_path / "1_0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=95)
    truncated = tmp_path / "1_25.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "1_50.jpg"
    garbage.write_bytes(b"\xff\xd8 this is not a jpeg")
    for path in (truncated, garbage, tmp_path / "1_75.jpg"):
        with pytest.raises(DataError, match=f"cannot read frame {path}"):
            load_frame(path, 32)
    record = ClipRecord("1_50", 1, 50, (str(good), str(garbage)), (0, 0, 0), (0.0, 0.0, 0.0))
    with pytest.raises(DataError, match="1_50.jpg"):
        ClipDataset([record], image_size=32, mean=MEAN, std=STD)[0]


def test_manifest_hash_follows_frame_content_not_folder(tmp_path: Path, file_record: Path) -> None:
    (tmp_path / "a").mkdir()
    records = make_records(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    moved = [replace(r, frame_paths=tuple(str(tmp_path / "b" / Path(p).name) for p in r.frame_paths)) for r in records]
    digest = manifest_hash(records)
    assert len(digest) == 64 and digest == manifest_hash(list(records)) == manifest_hash(moved)
    assert manifest_hash(records[::-1]) != digest
    assert manifest_hash(records[:2]) != digest
    renamed = replace(records[0], clip_id="0_99")
    assert manifest_hash([renamed, *records[1:]]) != digest
    other_frame = replace(records[0], frame_paths=(records[0].frame_paths[0], records[0].frame_paths[0]))
    assert manifest_hash([other_frame, *records[1:]]) != digest
    # Labels are not part of the manifest; label_checksum covers them.
    relabelled = replace(records[0], labels=(1, 1, 1))
    assert manifest_hash([relabelled, *records[1:]]) == digest
    # Another image under the same name changes it: a feature cache keyed on it cannot serve the old tokens.
    noise = np.random.default_rng(0).integers(0, 255, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(noise).save(moved[1].frame_paths[0])
    assert Path(moved[1].frame_paths[0]).stat().st_size != Path(records[1].frame_paths[0]).stat().st_size
    assert manifest_hash(moved) != digest
    Path(moved[2].frame_paths[1]).unlink()
    with pytest.raises(DataError, match=re.escape(f"{moved[2].frame_paths[1]}: cannot be read")):
        manifest_hash(moved)


def test_label_checksum_is_sha256_of_shape_and_canonical_float32_values(tmp_path: Path) -> None:
    records = make_records(tmp_path)
    matrix = np.array([r.labels for r in records])
    digest = label_checksum(records)
    assert digest == hashlib.sha256(b"(3, 3)" + matrix.astype("<f4").tobytes()).hexdigest()
    # Records, int, bool and float matrices, a list, a tensor and a strided view of the same values hash equal.
    wide = np.repeat(matrix, 2, axis=1)[:, ::2]
    for same in (matrix, matrix.astype(bool), matrix * 1.0, matrix.tolist(), torch.tensor(matrix), wide):
        assert label_checksum(same) == digest
    assert label_checksum(np.array([[-0.0, 1.0]])) == label_checksum(np.array([[0.0, 1.0]]))
    flipped = matrix.copy()
    flipped[1, 2] = 0
    for other in (flipped, matrix[:2], matrix[[1, 0, 2]], matrix.reshape(1, 9)):
        assert label_checksum(other) != digest


def test_the_probe_sanity_checks_use_the_one_label_checksum() -> None:
    assert sanity.label_checksum is label_checksum
