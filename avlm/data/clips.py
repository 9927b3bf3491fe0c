"""Clip tensors for CVS records, and fingerprints of records and labels for run provenance and feature caches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from PIL import Image

from avlm.data.endoscapes import CVS_CRITERIA, ClipRecord
from avlm.data.integrity import content_digests
from avlm.errors import DataError


def load_frame(path: str | os.PathLike, image_size: int) -> np.ndarray:
    """Read a frame as RGB, resize its shorter side to ``image_size`` (bilinear) and centre-crop a square.

    Args:
        path: Image file.
        image_size: Side of the returned square.

    Returns:
        uint8 array of shape (image_size, image_size, 3).

    Raises:
        DataError: The file is missing, unreadable, corrupt or truncated.
    """
    try:
        with Image.open(path) as image:
            # convert() decodes the whole file, so a truncated JPEG fails here rather than later as garbage.
            image = image.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"cannot read frame {path}: {exc}") from exc
    return np.array(square_resize(image, image_size, Image.Resampling.BILINEAR), dtype=np.uint8)


def square_resize(image: Image.Image, image_size: int, resample: Image.Resampling) -> Image.Image:
    """Resize the shorter side of ``image`` to ``image_size`` and centre-crop a square: the geometry of every frame.

    Segmentation masks go through the same function (with nearest-neighbour ``resample``), so a mask pixel lands
    on the frame pixel it labels.

    Args:
        image: Any PIL image (RGB frame, or an ``L``/``I`` class map).
        image_size: Side of the returned square.
        resample: PIL resampling filter (bilinear for frames, nearest for class maps).

    Returns:
        The (image_size, image_size) image; ``image`` itself when it already has that size.
    """
    width, height = image.size
    if (width, height) == (image_size, image_size):
        return image
    scale = image_size / min(width, height)
    new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
    image = image.resize(new_size, resample)
    left, top = (new_size[0] - image_size) // 2, (new_size[1] - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


class ClipFrames:
    """Frame files → one normalised clip tensor (T, 3, S, S): resized, scaled to [0, 1], ``(x - mean) / std``.

    Args:
        image_size: Side of the square frames (see ``load_frame`` for the resize).
        mean: Per-channel mean of the pixel values in [0, 1] (the backbone's).
        std: Per-channel standard deviation (the backbone's).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {list(std)}")
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = image_size
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __call__(self, frame_paths: Sequence[str]) -> torch.Tensor:
        frames = np.stack([load_frame(p, self.image_size) for p in frame_paths])  # (T, S, S, 3)
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float().div_(255.0)
        return (pixels - self._mean) / self._std


class ClipDataset(torch.utils.data.Dataset):
    """Normalised clip tensors and binary CVS labels, one item per record.

    Items are deterministic per index (no augmentation here) because feature caches key on them; augment on
    the batch instead (see ``mix_clips``).

    Args:
        records: Clips to serve, in order.
        image_size: Side of the square frames.
        mean: Per-channel mean of the pixel values in [0, 1], subtracted before dividing by ``std``.
        std: Per-channel standard deviation.
        with_masks: Also serve the segmentation masks attached to the records (``attach_masks``): ``seg_mask``, an
            int64 (T, S, S) map of ``SEG_CLASSES`` ids, resized like the frames (nearest neighbour), ``-1`` on
            frames without a mask; and ``has_mask``, a bool tensor, True when at least one frame has a mask. False
            keeps the items exactly as without masks (no extra keys).

    Attributes:
        labels: (N, 3) int64 array of the binary labels, in record order.
    """

    def __init__(
        self,
        records: Sequence[ClipRecord],
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        with_masks: bool = False,
    ):
        self.records = list(records)
        self.image_size = image_size
        self.with_masks = with_masks
        self.load_clip = ClipFrames(image_size, mean, std)
        self.labels = np.array([r.labels for r in self.records], dtype=np.int64).reshape(-1, len(CVS_CRITERIA))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        item = {
            "pixel_values": self.load_clip(record.frame_paths),
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "index": int(i),
        }
        if self.with_masks:
            item["seg_mask"] = clip_masks(record, self.image_size)
            item["has_mask"] = torch.tensor(record.has_mask)
        return item


def clip_masks(record: ClipRecord, image_size: int) -> torch.Tensor:
    """Return the (T, S, S) int64 class map of a clip's frames, ``-1`` on frames without a mask.

    Args:
        record: A clip whose ``mask_frames`` were attached (``attach_masks``); a record without any gives all -1.
        image_size: Side S, the frames' (same resize and crop as ``load_frame``, nearest neighbour).
    """
    masks = torch.full((len(record.frame_paths), image_size, image_size), -1, dtype=torch.int64)
    for t, frame_mask in enumerate(record.mask_frames):
        if frame_mask is not None:
            masks[t] = torch.from_numpy(frame_mask.render(image_size))
    return masks


def manifest_hash(records: Sequence[ClipRecord]) -> str:
    """Return a sha256 hex digest of the clip ids and the content of their frames, in order.

    A frame counts by the sha256 of its bytes (``content_digests``: read once, then remembered per resolved path,
    size, mtime and ctime), so a changed, replaced or truncated frame changes the hash although its name does not;
    the same data gives the same hash in any folder and on any machine, so it also serves as run provenance.
    Takes any records with ``clip_id`` and ``frame_paths`` (CVS, manifest and video-caption clips). Feature
    caches key on it; labels are not in it (``label_checksum``).

    Raises:
        DataError: A frame file is missing or unreadable.
    """
    digests = content_digests(path for record in records for path in record.frame_paths)
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.clip_id.encode("utf-8"))
        for path in record.frame_paths:
            digest.update(b"\x00" + digests[str(path)].encode("ascii"))
        digest.update(b"\n")
    return digest.hexdigest()


def label_checksum(labels: Sequence[ClipRecord] | ArrayLike) -> str:
    """Return a sha256 hex digest of a label array's shape and values: the one label fingerprint of avlm.

    What is hashed: ``repr(shape)`` as UTF-8 (so a (4, 2) and a (2, 4) array of the same values differ), then the
    values as C-contiguous little-endian float32 with ``-0.0`` made ``0.0``. So bool, int and float labels of the
    same values, a list, a CPU or accelerator torch tensor, and a strided view and its copy all hash equal; a
    changed value, a reordered row or another shape changes the digest.

    Args:
        labels: Records with ``labels`` (CVS or manifest clips; hashed as their (N, K) label matrix), or the labels
            themselves (numpy array, nested list, torch tensor).

    Returns:
        64 hex characters.
    """
    if hasattr(labels, "detach"):  # a torch tensor, possibly on an accelerator
        labels = labels.detach().cpu().numpy()
    elif isinstance(labels, Sequence) and labels and hasattr(labels[0], "labels"):
        labels = [record.labels for record in labels]
    canonical = np.ascontiguousarray(np.asarray(labels, dtype="<f4")) + np.float32(0.0)
    digest = hashlib.sha256(repr(canonical.shape).encode("utf-8"))
    digest.update(canonical.tobytes())
    return digest.hexdigest()
