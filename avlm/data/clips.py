"""Clip tensors for CVS records, and fingerprints of a record list for run provenance and feature caches."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from avlm.data.endoscapes import CVS_CRITERIA, ClipRecord
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
    width, height = image.size
    if (width, height) != (image_size, image_size):
        scale = image_size / min(width, height)
        new_size = (max(image_size, round(width * scale)), max(image_size, round(height * scale)))
        image = image.resize(new_size, Image.Resampling.BILINEAR)
        left, top = (new_size[0] - image_size) // 2, (new_size[1] - image_size) // 2
        image = image.crop((left, top, left + image_size, top + image_size))
    return np.array(image, dtype=np.uint8)


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

    Attributes:
        labels: (N, 3) int64 array of the binary labels, in record order.
    """

    def __init__(self, records: Sequence[ClipRecord], image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.records = list(records)
        self.image_size = image_size
        self.load_clip = ClipFrames(image_size, mean, std)
        self.labels = np.array([r.labels for r in self.records], dtype=np.int64).reshape(-1, len(CVS_CRITERIA))

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        return {
            "pixel_values": self.load_clip(record.frame_paths),
            "labels": torch.tensor(record.labels, dtype=torch.float32),
            "index": int(i),
        }


def manifest_hash(records: Sequence[ClipRecord]) -> str:
    """Return a sha256 hex digest of the clip ids and frame file names, in order.

    File names rather than absolute paths, so the same data gives the same hash on every machine.
    """
    digest = hashlib.sha256()
    for record in records:
        digest.update(record.clip_id.encode("utf-8"))
        for path in record.frame_paths:
            digest.update(b"\x00" + os.path.basename(path).encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def label_checksum(records_or_labels: Sequence[ClipRecord] | np.ndarray) -> str:
    """Return a sha256 hex digest of the (N, 3) label matrix stored as int8 bytes.

    Args:
        records_or_labels: Records, or their label matrix (integer or integral-valued).
    """
    if isinstance(records_or_labels, np.ndarray):
        labels = records_or_labels
    else:
        labels = np.array([r.labels for r in records_or_labels], dtype=np.int8).reshape(-1, len(CVS_CRITERIA))
    if labels.ndim != 2:
        raise ValueError(f"labels must be a 2-D (N, criteria) matrix, got shape {labels.shape}")
    if labels.dtype.kind not in "biu" and not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must be integral (binary), got fractional values")
    return hashlib.sha256(np.ascontiguousarray(labels, dtype=np.int8).tobytes()).hexdigest()
