"""Video captioning data: a reader for a documented manifest layout, the caption Dataset, and its demo data.

Accepted layout::

    root/                                        load_video_captions(root, clip_frames=...)
      captions_train.csv                         header clip_id,caption_1[,caption_2,...,caption_5]
      captions_val.csv                           one row per clip; caption_1 must be non-empty, the others may be
      captions_test.csv                          empty (clips may have 1 to 5 references)
      frames/<clip_id>/*.jpg                     the clip's frames (.jpg or .jpeg); time order is file-name order,
                                                 so number them with zero padding (00007.jpg, not 7.jpg)

A clip keeps ``clip_frames`` of its frames, evenly spaced from the first to the last (see
``evenly_spaced_indices``); a clip with fewer frames repeats some. Clips whose folder is missing, unreadable or
holds no frames are named in one warning per split and skipped; a split missing more than
``max_missing_fraction`` of its clips is an error. Captions are kept as written (surrounding whitespace stripped).

``ensure_video_caption_demo`` writes a small synthetic dataset in this layout (coloured shapes moving across
32×32 frames, 5 templated captions per clip), so that the captioning recipe, its tests and examples run on video
in seconds without downloading anything.
"""

from __future__ import annotations

import csv
import itertools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from avlm.data.audio_captions import (
    _NAMED_IN_WARNING,
    _check_fraction,
    _check_root,
    _warn_shared_clips,
    read_csv_rows,
)
from avlm.data.clips import ClipFrames, manifest_hash
from avlm.data.generated import generate_once
from avlm.data.integrity import frame_problems
from avlm.errors import DataError

logger = logging.getLogger(__name__)

VIDEO_CAPTION_SPLITS: tuple[str, ...] = ("train", "val", "test")
MAX_CAPTIONS = 5
FRAME_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg")


@dataclass(frozen=True)
class VideoCaptionRecord:
    """One video clip and its reference captions.

    Attributes:
        clip_id: The csv's ``clip_id``, also the name of the clip's frame folder.
        frame_paths: Absolute paths of the clip's selected frames, in time order (``clip_frames`` of them).
        captions: Non-empty reference captions in column order.
        split: Split the clip was read from.
    """

    clip_id: str
    frame_paths: tuple[str, ...]
    captions: tuple[str, ...]
    split: str


def load_video_captions(
    root: str | os.PathLike,
    splits: Sequence[str] = VIDEO_CAPTION_SPLITS,
    *,
    clip_frames: int,
    max_missing_fraction: float = 0.2,
    verify_frames: bool = True,
) -> dict[str, list[VideoCaptionRecord]]:
    """Read the clips of a video-captioning dataset in the layout of this module's docstring.

    Args:
        root: Folder holding ``captions_<split>.csv`` and ``frames/<clip_id>/``.
        splits: Splits to read.
        clip_frames: Frames kept per clip, evenly spaced over its frames (the encoder's number of frames).
        max_missing_fraction: Largest fraction of a split's clips that may lack readable frames.
        verify_frames: Decode each kept frame with PIL, so empty, non-image or truncated files count as missing
            now rather than being trained on; a frame decoded once is not decoded again while unchanged (see
            ``avlm.data.integrity``). Off: only the folder listing is checked.

    Returns:
        Split name → records in csv order.

    Raises:
        DataError: Missing root or csv, malformed csv (bad header, wrong field count, empty clip_id or caption_1,
            a clip_id that is not a plain folder name or is listed twice), or more than ``max_missing_fraction`` of
            a split's clips without readable frames.
    """
    if clip_frames < 1:
        raise ValueError(f"clip_frames must be positive, got {clip_frames}")
    root = _check_root(root, "video-caption", "captions_<split>.csv files and a frames/<clip_id>/ folder per clip")
    _check_fraction(max_missing_fraction)
    frames_dir = root / "frames"
    result = {}
    for split in (splits,) if isinstance(splits, str) else splits:
        rows = _read_video_caption_csv(root / f"captions_{split}.csv")
        listed = [(clip_id, captions, *_clip_frames(frames_dir / clip_id, clip_frames)) for clip_id, captions in rows]
        kept_frames = (path for *_, frame_paths, problem in listed if problem is None for path in frame_paths)
        broken = frame_problems(kept_frames, f"video captions {split}") if verify_frames else {}
        records, problems = [], []
        for clip_id, captions, frame_paths, problem in listed:
            bad = next((path for path in frame_paths if path in broken), None)
            if problem is None and bad is not None:
                problem = f"unreadable frame {os.path.basename(bad)}: {broken[bad]}"
            if problem is None:
                records.append(VideoCaptionRecord(clip_id, frame_paths, captions, split))
            else:
                problems.append(f"{clip_id} ({problem})")
        if problems:
            _report_missing(problems, len(rows), f"video captions {split}", frames_dir, max_missing_fraction)
        logger.info(
            "video captions %s: %d clips, %d captions, %d frames per clip, %d skipped for missing frames",
            split,
            len(records),
            sum(len(r.captions) for r in records),
            clip_frames,
            len(problems),
        )
        result[split] = records
    _warn_shared_clips("video captions", result)
    return result


def evenly_spaced_indices(num_frames: int, clip_frames: int) -> list[int]:
    """Return ``clip_frames`` frame indices spread evenly from the first frame to the last.

    Index k is ``round(k * (num_frames - 1) / (clip_frames - 1))`` (halves rounded up), so the first and last
    frames are always kept and motion over the whole clip is seen; with fewer frames than wanted, some repeat. A
    single wanted frame is the middle one.

    Args:
        num_frames: Frames the clip has (at least 1).
        clip_frames: Frames wanted (at least 1).
    """
    if num_frames < 1 or clip_frames < 1:
        raise ValueError(f"num_frames and clip_frames must be positive, got {num_frames} and {clip_frames}")
    if clip_frames == 1:
        return [(num_frames - 1) // 2]
    span, steps = num_frames - 1, clip_frames - 1
    return [(2 * k * span + steps) // (2 * steps) for k in range(clip_frames)]


class VideoCaptionDataset(torch.utils.data.Dataset):
    """Normalised clip tensors with their captions, one item per clip.

    Items are deterministic per index (no augmentation): feature caches key on them.

    Args:
        records: Clips to serve, in order.
        image_size: Side of the square frames (the encoder's ``image_size``); see ``load_frame`` for the resize.
        mean: Per-channel mean of the pixel values in [0, 1] (the encoder's ``mean``), subtracted before dividing
            by ``std``.
        std: Per-channel standard deviation (the encoder's ``std``).

    Items are dicts with ``clip_id`` (str), ``pixel_values`` (float32 tensor [T, 3, image_size, image_size]),
    ``captions`` (list of the clip's references) and ``index`` (int).
    """

    def __init__(
        self, records: Sequence[VideoCaptionRecord], image_size: int, mean: Sequence[float], std: Sequence[float]
    ):
        self.records = list(records)
        self.image_size = image_size
        self.load_clip = ClipFrames(image_size, mean, std)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        return {
            "clip_id": record.clip_id,
            "pixel_values": self.load_clip(record.frame_paths),
            "captions": list(record.captions),
            "index": int(i),
        }


def collate_video_captions(items: Sequence[dict]) -> dict:
    """Batch ``VideoCaptionDataset`` items: pixel values stacked to [B, T, 3, S, S], text kept as lists.

    torch's default collate would transpose the per-clip caption lists, and fails when clips have different
    numbers of references.
    """
    return {
        "clip_id": [item["clip_id"] for item in items],
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "captions": [item["captions"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }


def video_manifest_hash(records: Sequence[VideoCaptionRecord]) -> str:
    """Return a sha256 hex digest of the clip ids and their kept frames' contents, in order.

    The same fingerprint as ``manifest_hash`` of CVS clips: each frame counts by the sha256 of its bytes, so a
    changed frame changes it while the same data gives the same hash in any folder; skipped clips and another
    ``clip_frames`` change it. The resize and normalisation are not in it: a feature cache must key on
    ``image_size``, ``mean`` and ``std`` as well.
    """
    return manifest_hash(records)


def _read_video_caption_csv(csv_path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """Return (clip_id, non-empty captions) per data row, checking the header and every row."""
    header, rows = read_csv_rows(
        csv_path, "splits are read from captions_<split>.csv", lambda header: _check_header(header, csv_path)
    )
    caption_positions = [header.index(c) for c in _check_header(header, csv_path)]
    id_position = header.index("clip_id")
    result, first_line = [], {}
    for start, fields in rows:
        clip_id = fields[id_position]
        captions = tuple(fields[p] for p in caption_positions)
        if not clip_id or not captions[0]:
            raise DataError(f"{csv_path}, line {start}: empty {'clip_id' if not clip_id else 'caption_1'}")
        if clip_id in (".", "..") or "/" in clip_id or "\\" in clip_id:
            raise DataError(f"{csv_path}, line {start}: clip_id {clip_id!r} is not a plain folder name")
        if clip_id in first_line:
            raise DataError(f"{csv_path}, line {start}: clip_id {clip_id!r} is also on line {first_line[clip_id]}")
        first_line[clip_id] = start
        result.append((clip_id, tuple(c for c in captions if c)))
    return result


def _check_header(header: list[str], csv_path: Path) -> list[str]:
    """Return the caption columns, caption_1 to caption_n (n <= MAX_CAPTIONS), of a valid header."""
    expected = ["clip_id", *(f"caption_{k}" for k in range(1, MAX_CAPTIONS + 1))]
    caption_columns = [name for name in header if name != "clip_id"]
    if (
        header.count("clip_id") != 1
        or not 1 <= len(caption_columns) <= MAX_CAPTIONS
        or sorted(caption_columns) != expected[1 : len(caption_columns) + 1]
    ):
        raise DataError(
            f"{csv_path}, line 1: header {header} must be clip_id and caption_1 to caption_n (n at most "
            f"{MAX_CAPTIONS}), each once, e.g. {','.join(expected)}"
        )
    return [f"caption_{k}" for k in range(1, len(caption_columns) + 1)]


def _clip_frames(clip_dir: Path, clip_frames: int) -> tuple[tuple[str, ...], str | None]:
    """Return the clip's kept frame paths, or () and why its folder has no frames."""
    try:
        with os.scandir(clip_dir) as entries:
            names = sorted(e.name for e in entries if e.name.lower().endswith(FRAME_EXTENSIONS) and e.is_file())
    except FileNotFoundError:
        return (), "missing"
    except OSError as exc:
        return (), f"unreadable folder: {exc.strerror or exc}"
    if not names:
        return (), f"no {' or '.join(FRAME_EXTENSIONS)} frames"
    return tuple(str(clip_dir / names[k]) for k in evenly_spaced_indices(len(names), clip_frames)), None


def _report_missing(problems: list[str], total: int, name: str, frames_dir: Path, max_fraction: float) -> None:
    """Warn about the skipped clips, or raise if they are more than ``max_fraction`` of the split."""
    fraction = len(problems) / total
    named = ", ".join(problems[:_NAMED_IN_WARNING])
    more = f" and {len(problems) - _NAMED_IN_WARNING} more" if len(problems) > _NAMED_IN_WARNING else ""
    where = frames_dir if frames_dir.is_dir() else f"{frames_dir} (folder does not exist)"
    message = f"{name}: {len(problems)} of {total} clips ({fraction:.1%}) have no readable frames in {where}: "
    message += named + more
    if fraction > max_fraction:
        raise DataError(
            f"{message}; more than max_missing_fraction={max_fraction:g} (expected a folder <clip_id>/ of "
            f"{' or '.join(FRAME_EXTENSIONS)} frames per clip in {frames_dir})"
        )
    logger.warning("%s; skipping them", message)


# ----------------------------------------------------------------------------------------------------------------
# Demo data: coloured shapes moving across small frames
# ----------------------------------------------------------------------------------------------------------------
# Bump whenever the generator's output changes: it is part of the cache folder name.
DEMO_VERSION = "v1"

DEMO_SPLIT_SIZES = {"train": 300, "val": 60, "test": 60}
DEMO_FRAME_SIZE = 32
DEMO_FRAMES_PER_CLIP = (8, 12)  # inclusive; a reader keeping up to 8 frames never repeats one
DEMO_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow"),
    "size": ("small", "large"),
    "motion": ("left", "right", "up", "down", "still"),
}
DEMO_COLOURS = {"red": (225, 35, 35), "green": (35, 190, 55), "blue": (45, 75, 235), "yellow": (235, 215, 35)}
# Half the side of the shape's bounding box, in pixels: small shapes are 8-9 px wide, large ones 14-15 px.
DEMO_HALF_SIZES = {"small": (4.0, 4.5), "large": (7.0, 7.5)}
DEMO_TRAVEL = (10.0, 14.0)  # pixels the centre moves from the first frame to the last
_DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
_SUPERSAMPLE = 4  # shapes are drawn at 4x and area-averaged down, so edges and sub-pixel motion are smooth

# Caption vocabulary: synonyms per attribute value; every caption states all four attributes.
SHAPE_NOUNS = {
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "triangular shape"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
MOTION_VERBS = {
    "left": ("moves to the left", "slides left", "drifts leftwards"),
    "right": ("moves to the right", "slides right", "drifts rightwards"),
    "up": ("moves up", "rises", "drifts upwards"),
    "down": ("moves down", "sinks", "drifts downwards"),
    "still": ("stays still", "does not move", "stays in place"),
}
MOTION_PARTICIPLES = {
    "left": ("moving to the left", "sliding left", "drifting leftwards"),
    "right": ("moving to the right", "sliding right", "drifting rightwards"),
    "up": ("moving up", "rising", "drifting upwards"),
    "down": ("moving down", "sinking", "drifting downwards"),
    "still": ("standing still", "not moving", "staying in place"),
}
# Five phrasings; each clip gets every one once, so its references are distinct.
DEMO_TEMPLATES = (
    "a {size} {colour} {noun} {moves}",
    "the {colour} {noun} is {size} and {moves}",
    "a {size} {noun} in {colour}, {moving}",
    "there is a {size} {colour} {noun} {moving}",
    "a {colour} {noun} of {size_level} size {moves}",
)


def ensure_video_caption_demo(root: str | os.PathLike | None = None, *, seed: int = 0) -> Path:
    """Generate (once; cached) and return the demo video-captioning dataset folder.

    The folder is ``root / f"video_caption_demo_{DEMO_VERSION}_s{seed}"``, generated in a temporary sibling
    folder and renamed into place when complete (``generate_once``). Each clip is 8 to 12 JPEG frames of 32×32
    showing one shape (circle, square, triangle) of one colour (red, green, blue, yellow) and size (small, large)
    over a dark grey background, moving left, right, up or down by 10-14 px over the clip, or staying still;
    attributes are balanced over their 120 combinations. Each clip has 5 captions, one per template, with synonyms
    drawn at random ("A small red circle moves to the left", "The red disc is tiny and slides left", ...).
    ``demo_attributes_<split>.csv`` (not part of the layout) lists each clip's attributes for tests.

    Args:
        root: Cache folder; default ``$AVLM_CACHE_DIR`` or ``~/.cache/avlm``.
        seed: Seed of the generator; the same seed gives byte-identical files.

    Returns:
        The dataset folder, in the layout ``load_video_captions`` reads, with the splits train (300 clips),
        val (60) and test (60).
    """
    return generate_once(
        root,
        f"video_caption_demo_{DEMO_VERSION}_s{seed}",
        lambda folder: _write_demo(folder, seed),
        "video-caption demo data",
    )


def caption_demo_clip(attributes: dict[str, str], rng: np.random.Generator) -> list[str]:
    """Return the 5 reference captions of a demo clip with the given attributes, synonyms drawn from ``rng``.

    Args:
        attributes: One value per key of ``DEMO_ATTRIBUTES``.
        rng: Source of the synonym choices.
    """
    captions = []
    for template in DEMO_TEMPLATES:
        text = template.format(
            noun=_pick(rng, SHAPE_NOUNS[attributes["shape"]]),
            colour=attributes["colour"],
            size=_pick(rng, SIZE_WORDS[attributes["size"]]),
            size_level=attributes["size"],
            moves=_pick(rng, MOTION_VERBS[attributes["motion"]]),
            moving=_pick(rng, MOTION_PARTICIPLES[attributes["motion"]]),
        )
        captions.append(text[0].upper() + text[1:])
    return captions


def render_demo_clip(attributes: dict[str, str], num_frames: int, rng: np.random.Generator) -> np.ndarray:
    """Return uint8 frames (num_frames, DEMO_FRAME_SIZE, DEMO_FRAME_SIZE, 3) of the clip the attributes describe.

    Args:
        attributes: One value per key of ``DEMO_ATTRIBUTES``.
        num_frames: Frames in the clip; the shape moves at a constant speed from the first to the last.
        rng: Source of the clip's variation (position, travel, size, colour and background jitter, noise).
    """
    size = DEMO_FRAME_SIZE
    half = rng.uniform(*DEMO_HALF_SIZES[attributes["size"]])
    low, high = half + 1.0, size - half - 1.0  # the whole shape stays inside the frame
    dx, dy = _DIRECTIONS[attributes["motion"]]
    travel = rng.uniform(*DEMO_TRAVEL) if (dx, dy) != (0, 0) else 0.0
    # Start where the whole path fits: a shape moving right starts in the left part of its range.
    start = [rng.uniform(low - min(d, 0) * travel, high - max(d, 0) * travel) for d in (dx, dy)]
    colour = np.clip(np.array(DEMO_COLOURS[attributes["colour"]]) + rng.uniform(-15, 15, size=3), 0, 255)
    background = rng.uniform(25, 70)
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    for t in range(num_frames):
        progress = t / max(num_frames - 1, 1)
        centre = (start[0] + dx * travel * progress, start[1] + dy * travel * progress)
        coverage = _shape_coverage(attributes["shape"], centre, half)[..., None]
        noise = rng.normal(0.0, 3.0, size=(size, size, 1))
        frame = (background + noise) * (1.0 - coverage) + colour * coverage
        frames[t] = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return frames


def _shape_coverage(shape: str, centre: tuple[float, float], half: float) -> np.ndarray:
    """Fraction of each pixel covered by the shape, (DEMO_FRAME_SIZE, DEMO_FRAME_SIZE) floats in [0, 1]."""
    scale = _SUPERSAMPLE
    canvas = Image.new("L", (DEMO_FRAME_SIZE * scale, DEMO_FRAME_SIZE * scale), 0)
    draw = ImageDraw.Draw(canvas)
    # Pixel (i, j) covers [j, j + 1) x [i, i + 1), so a centre of 16.0 lies on the border of pixels 15 and 16.
    x, y = centre
    left, top, right, bottom = (x - half) * scale, (y - half) * scale, (x + half) * scale, (y + half) * scale
    if shape == "circle":
        draw.ellipse((left, top, right - 1, bottom - 1), fill=255)
    elif shape == "square":
        draw.rectangle((left, top, right - 1, bottom - 1), fill=255)
    else:  # an upright isosceles triangle filling half its bounding box
        draw.polygon([((left + right) / 2, top), (right, bottom), (left, bottom)], fill=255)
    small = canvas.resize((DEMO_FRAME_SIZE, DEMO_FRAME_SIZE), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _plan_split(seed: int, split_index: int, size: int) -> list[dict[str, str]]:
    """Attributes per clip: every combination once per cycle of 120 clips, in random order."""
    combos = list(itertools.product(*DEMO_ATTRIBUTES.values()))
    rng = np.random.default_rng([seed, 1, split_index])
    order = np.concatenate([rng.permutation(len(combos)) for _ in range(-(-size // len(combos)))])[:size]
    return [dict(zip(DEMO_ATTRIBUTES, combos[k], strict=True)) for k in order]


def _write_demo(folder: Path, seed: int) -> dict:
    summary: dict = {"version": DEMO_VERSION, "seed": seed, "frame_size": DEMO_FRAME_SIZE, "splits": {}}
    caption_header = ["clip_id", *(f"caption_{k}" for k in range(1, MAX_CAPTIONS + 1))]
    for split_index, (split, size) in enumerate(DEMO_SPLIT_SIZES.items()):
        caption_rows, attribute_rows = [], []
        n_frames = 0
        for clip_index, attributes in enumerate(_plan_split(seed, split_index, size)):
            rng = np.random.default_rng([seed, 2, split_index, clip_index])
            # The id does not give the attributes away.
            clip_id = f"{split}_{clip_index:04d}"
            clip_dir = folder / "frames" / clip_id
            clip_dir.mkdir(parents=True)
            num_frames = int(rng.integers(DEMO_FRAMES_PER_CLIP[0], DEMO_FRAMES_PER_CLIP[1] + 1))
            for t, frame in enumerate(render_demo_clip(attributes, num_frames, rng)):
                Image.fromarray(frame).save(clip_dir / f"{t:05d}.jpg", format="JPEG", quality=95, subsampling=0)
            n_frames += num_frames
            captions = caption_demo_clip(attributes, rng)
            caption_rows.append([clip_id, *(captions[k] for k in rng.permutation(len(captions)))])
            attribute_rows.append([clip_id, *attributes.values()])
        _write_csv(folder / f"captions_{split}.csv", caption_header, caption_rows)
        _write_csv(folder / f"demo_attributes_{split}.csv", ["clip_id", *DEMO_ATTRIBUTES], attribute_rows)
        summary["splits"][split] = {"clips": size, "captions": MAX_CAPTIONS * size, "frames": n_frames}
    return summary


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
