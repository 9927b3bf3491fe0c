"""Built-in synthetic CVS data, written in the Endoscapes2023 layout so that ``load_endoscapes`` reads it.

Recipes fall back to it when no ``data_dir`` is given, so that every recipe, test and example runs without the
real (licence-restricted) videos. It mimics what matters for the pipeline: 1 fps frames named
``${VIDEO_ID}_${FRAME_NUM}.jpg`` with FRAME_NUM counted at 25 fps, a CVS keyframe every 5 s listed in
``annotation_ds_coco.json`` with annotator-mean ``ds`` scores, ``<split>_vids.txt`` files, and the real label mix
(about 74% all-negative keyframes; C1 14.6%, C2 10.5%, C3 16.8% positive, see the Class Distribution Analysis of
the CVS research log).

Each criterion is a visual pattern drawn on the frames leading up to its keyframe: C1 a red square, C2 a square
of red and green horizontal stripes (like C1 at a glance, as the cystic plate is confused with C1 in real data),
C3 two blue blobs. A ``ds`` of 1/3 (one annotator of three) draws a weak or partial pattern, so hard negatives
exist; textured background, camera jitter, distractor shapes, occluding tools and noise keep the task from being
trivial.

Beside the CVS labels it writes what the rest of the Endoscapes2023 release holds, so every reader runs here:

- segmentation masks (``<split>_seg/annotation_coco.json``, compressed RLE, the real category names) on every
  stored frame of about half of each split's videos: the red square is Calot's triangle (C1), the striped square
  the cystic plate (C2), the first and second blue blob the cystic artery and the cystic duct (C3), the tool a
  ``tool`` instance; each at the jittered position drawn on that frame, absent where it was hidden. Only the json
  is written there; the loader takes the frames from ``<split>/``.
- the data-efficiency subsets ``12_5/train_{0,1,2}/`` and ``25/train_{0,1,2}/``: an ``annotation_ds_coco.json``
  of the keyframes of 12.5% / 25% of the train videos per fold;
- ``all_metadata.csv``: the three annotators' votes per keyframe, whose means are its ``ds`` scores.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from avlm.data.endoscapes import CVS_CRITERIA
from avlm.data.generated import generate_once

logger = logging.getLogger(__name__)

# Bump whenever the generator's output changes: it is part of the cache folder name.
DEMO_VERSION = "v3"

SPLIT_VIDEOS = {"train": range(1, 91), "val": range(121, 141), "test": range(162, 182)}
KEYFRAMES_PER_VIDEO = (10, 14)  # inclusive range, about 12 on average
FRAME_STEP = 25  # frame numbers advance by 25 per stored frame: 1 fps of a 25 fps video
KEYFRAME_EVERY = 5  # stored frames, i.e. one labelled frame every 5 s
FIRST_KEYFRAME = 2  # fewer than the default clip's 3 earlier frames exist, so the first clip needs padding
# Categories of Endoscapes-Seg50, in its order; the first four are the SEG_CLASSES anatomy, ids 1..4 in both.
SEG_CATEGORIES = ("cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct", "gallbladder", "tool")
_CYSTIC_PLATE, _CALOT_TRIANGLE, _CYSTIC_ARTERY, _CYSTIC_DUCT, _TOOL_CLASS = 1, 2, 3, 4, 6
# Official data-efficiency subsets: folder → fraction of the train videos; three folds each.
SUBSET_FRACTIONS = {"12_5": 0.125, "25": 0.25}
SUBSET_FOLDS = 3

# Joint distribution of (C1, C2, C3) per keyframe. Marginals C1 14.6%, C2 10.5%, C3 16.8%; 73.9% all-negative
# and 4.9% all-positive as in the research log; the pairs and singles split the rest, C1+C3 being the common pair.
LABEL_COMBOS: dict[tuple[int, int, int], float] = {
    (0, 0, 0): 0.739,
    (1, 0, 0): 0.047,
    (0, 1, 0): 0.031,
    (0, 0, 1): 0.074,
    (1, 1, 0): 0.015,
    (1, 0, 1): 0.035,
    (0, 1, 1): 0.010,
    (1, 1, 1): 0.049,
}

_RED = np.array([250.0, 25.0, 25.0])
_GREEN = np.array([75.0, 180.0, 70.0])
_BLUE = np.array([40.0, 70.0, 230.0])
_TOOL = np.array([165.0, 168.0, 178.0])
_DISTRACTOR_COLOURS = np.array(
    [[225, 205, 60], [205, 60, 200], [60, 200, 215], [240, 240, 235], [235, 145, 40], [95, 55, 30], [125, 60, 165]],
    dtype=np.float64,
)


def ensure_cvs_demo(root: str | os.PathLike | None = None, *, seed: int = 0, image_size: int = 32) -> Path:
    """Generate (once; cached) and return the demo dataset folder.

    The folder is ``root / f"cvs_demo_{DEMO_VERSION}_s{seed}_{image_size}px"``; it is generated in a temporary
    sibling folder and renamed into place when complete, so an interrupted generation never looks complete.

    Args:
        root: Cache folder; default ``$AVLM_CACHE_DIR`` or ``~/.cache/avlm``.
        seed: Seed of the generator; the same seed gives byte-identical files.
        image_size: Side of the square frames in pixels (at least 16).

    Returns:
        The dataset folder, holding ``train/``, ``val/``, ``test/``, ``<split>_vids.txt``, ``<split>_seg/``, ``12_5/``,
        ``25/`` and ``all_metadata.csv``.
    """
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 for the demo patterns to be drawable, got {image_size}")
    return generate_once(
        root,
        f"cvs_demo_{DEMO_VERSION}_s{seed}_{image_size}px",
        lambda folder: _write_demo(folder, seed, image_size),
        "CVS demo data",
    )


def _write_demo(folder: Path, seed: int, image_size: int) -> dict:
    summary: dict = {"version": DEMO_VERSION, "seed": seed, "image_size": image_size, "splits": {}}
    votes_rows = []
    for split_index, (split, videos) in enumerate(SPLIT_VIDEOS.items()):
        split_dir = folder / split
        split_dir.mkdir()
        plan = _plan_split(seed, split_index, videos)
        # About half of the videos have masks, on all their frames: ~50% of clips, as in the research log.
        order = np.random.default_rng([seed, 3, split_index]).permutation(len(videos))
        masked = {videos[i] for i in order[: (len(videos) + 1) // 2]}
        images, seg_frames = [], []
        n_frames = 0
        for video_id, states in plan:
            entries, frame_masks = _write_video(split_dir, seed, video_id, states, image_size)
            n_frames += len(frame_masks)
            if video_id in masked:
                seg_frames.extend(frame_masks)
            for entry in entries:
                images.append({"id": len(images) + 1, **entry})
            votes_rows.extend(_annotator_votes(seed, video_id, entries))
        _write_coco(split_dir / "annotation_ds_coco.json", f"split {split}", seed, images, [], CVS_CRITERIA)
        _write_segmentation(folder / f"{split}_seg", split, seed, seg_frames, image_size)
        (folder / f"{split}_vids.txt").write_text("".join(f"{v}\n" for v in videos), encoding="utf-8")
        summary["splits"][split] = {
            "videos": len(videos),
            "keyframes": len(images),
            "frames": n_frames,
            "masked_videos": len(masked),
            "masked_frames": len(seg_frames),
        }
        if split == "train":
            _write_subsets(folder, seed, videos, images)
    _write_votes(folder / "all_metadata.csv", votes_rows)
    return summary


def _write_coco(
    path: Path, what: str, seed: int, images: list[dict], annotations: list[dict], categories: tuple[str, ...]
) -> None:
    coco = {
        "info": {"description": f"avlm synthetic CVS demo {DEMO_VERSION} (seed {seed}), {what}"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": c} for k, c in enumerate(categories)],
    }
    # Label files stay readable; the mask file is written compact (an indented dump is slow and large).
    path.write_text(json.dumps(coco, indent=None if annotations else 1), encoding="utf-8")


def _write_segmentation(seg_dir: Path, split: str, seed: int, frames: list[tuple[str, np.ndarray]], size: int) -> None:
    """One COCO image per masked frame; one compressed-RLE instance per class present (the map has no overlaps)."""
    seg_dir.mkdir()
    images, annotations = [], []
    for image_id, (file_name, classes) in enumerate(frames, start=1):
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
        for category_id in range(1, len(SEG_CATEGORIES) + 1):
            pixels = classes == category_id
            if not pixels.any():
                continue
            rle = coco_mask.encode(np.asfortranarray(pixels.astype(np.uint8)))
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category_id,
                    "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                    "area": int(pixels.sum()),
                    "bbox": [float(v) for v in coco_mask.toBbox(rle)],
                    "iscrowd": 0,
                }
            )
    what = f"segmentation, split {split}"
    _write_coco(seg_dir / "annotation_coco.json", what, seed, images, annotations, SEG_CATEGORIES)


def _write_subsets(folder: Path, seed: int, videos: range, images: list[dict]) -> None:
    """``<subset>/train_<fold>/annotation_ds_coco.json``: the keyframes of a random share of the train videos."""
    for subset_index, (name, fraction) in enumerate(SUBSET_FRACTIONS.items()):
        n_videos = max(1, int(fraction * len(videos) + 0.5))
        for fold in range(SUBSET_FOLDS):
            order = np.random.default_rng([seed, 4, subset_index, fold]).permutation(len(videos))
            chosen = {videos[i] for i in order[:n_videos]}
            fold_dir = folder / name / f"train_{fold}"
            fold_dir.mkdir(parents=True)
            kept = [image for image in images if image["video_id"] in chosen]
            _write_coco(
                fold_dir / "annotation_ds_coco.json", f"subset {name} fold {fold}", seed, kept, [], CVS_CRITERIA
            )


def _annotator_votes(seed: int, video_id: int, entries: list[dict]) -> list[list[int]]:
    """Rows ``vid, frame, votes`` whose three annotators' votes average to each keyframe's ``ds``."""
    rng = np.random.default_rng([seed, 5, video_id])
    rows = []
    for entry in entries:
        # votes[annotator][criterion]: a ds of k/3 gets k positive votes from randomly chosen annotators.
        votes = np.zeros((3, len(CVS_CRITERIA)), dtype=int)
        for criterion, score in enumerate(entry["ds"]):
            votes[rng.permutation(3)[: round(score * 3)], criterion] = 1
        rows.append([video_id, entry["frame_id"], *votes.ravel().tolist()])
    return rows


def _write_votes(path: Path, rows: list[list[int]]) -> None:
    header = ["vid", "frame", *(f"{c}_{a}" for a in range(1, 4) for c in CVS_CRITERIA)]
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _plan_split(seed: int, split_index: int, videos: range) -> list[tuple[int, list[tuple[float, ...]]]]:
    """Return per video the ``ds`` scores of its keyframes, in time order.

    Label combinations are allotted by quota (largest remainder) over the whole split, so every split has the
    target label mix up to rounding rather than up to sampling noise.
    """
    rng = np.random.default_rng([seed, 1, split_index])
    n_keyframes = rng.integers(KEYFRAMES_PER_VIDEO[0], KEYFRAMES_PER_VIDEO[1] + 1, size=len(videos))
    total = int(n_keyframes.sum())
    combos = list(LABEL_COMBOS)
    exact = np.array(list(LABEL_COMBOS.values())) * total
    counts = np.floor(exact).astype(int)
    counts[np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]] += 1
    labels = np.array([combo for combo, count in zip(combos, counts, strict=True) for _ in range(count)])
    labels = labels[rng.permutation(total)]
    plan = []
    offset = 0
    for video_id, n in zip(videos, n_keyframes, strict=True):
        video_labels = labels[offset : offset + n]
        offset += n
        # CVS is reached late in a dissection: positives drift towards the end of the video.
        order = np.argsort(video_labels.sum(axis=1) + rng.normal(0.0, 1.0, size=n), kind="stable")
        states = []
        for label in video_labels[order]:
            positive = rng.choice([2 / 3, 1.0], size=3)
            negative = rng.choice([0.0, 1 / 3], size=3, p=[0.75, 0.25])
            states.append(tuple(float(p if y else q) for y, p, q in zip(label, positive, negative, strict=True)))
        plan.append((video_id, states))
    return plan


def _write_video(
    split_dir: Path, seed: int, video_id: int, states: list[tuple[float, ...]], size: int
) -> tuple[list[dict], list[tuple[str, np.ndarray]]]:
    """Write one video's frames; return its keyframe annotation entries and (file name, class map) per frame.

    The class map holds the ``SEG_CATEGORIES`` id (0 = none) of the pattern or tool visible at each pixel.
    """
    rng = np.random.default_rng([seed, 2, video_id])
    unit = size / 32.0
    pad = max(1, round(2 * unit))
    texture = _texture(rng, size + 2 * pad)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    start_frame = int(rng.integers(0, 400)) * FRAME_STEP
    entries, frame_masks = [], []
    frame_index = 0
    for k, ds in enumerate(states):
        keyframe_index = FIRST_KEYFRAME + k * KEYFRAME_EVERY
        scene = _scene(rng, ds, size, unit)
        # The frames since the previous keyframe show this keyframe's state.
        while frame_index <= keyframe_index:
            frame, classes = _render(rng, scene, texture, pad, size, unit, yy, xx)
            frame_num = start_frame + frame_index * FRAME_STEP
            file_name = f"{video_id}_{frame_num}.jpg"
            Image.fromarray(frame).save(split_dir / file_name, format="JPEG", quality=95, subsampling=0)
            frame_masks.append((file_name, classes))
            frame_index += 1
        entries.append(
            {
                "file_name": file_name,
                "height": size,
                "width": size,
                "video_id": video_id,
                "frame_id": frame_num,
                "is_ds_keyframe": True,
                "ds": list(ds),
            }
        )
    return entries, frame_masks


def _texture(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth tissue-like background: a pinkish base colour plus upsampled low-frequency noise."""
    base = np.array([160.0, 110.0, 100.0]) + rng.normal(0.0, 12.0, size=3)
    coarse = np.clip(base + rng.normal(0.0, 24.0, size=(5, 5, 3)), 0, 255).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((side, side), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float64)


def _scene(rng: np.random.Generator, ds: tuple[float, ...], size: int, unit: float) -> dict:
    """Positions and strengths of the patterns and distractors for one keyframe interval."""
    scene: dict = {"shapes": []}
    for _ in range(int(rng.integers(2, 5))):
        side = float(rng.uniform(2.0, 6.0) * unit)
        scene["shapes"].append(
            {
                "kind": "disc" if rng.random() < 0.5 else "rect",
                "colour": _DISTRACTOR_COLOURS[rng.integers(len(_DISTRACTOR_COLOURS))],
                "size": side,
                "y": float(rng.uniform(0, size - side)),
                "x": float(rng.uniform(0, size - side)),
                "alpha": float(rng.uniform(0.7, 1.0)),
            }
        )
    c1, c2, c3 = ds
    # C2 is drawn fainter than C1: the cystic plate is the harder criterion in real data too.
    patterns = (
        (c1, "red_square", 0.5 + 0.5 * c1, _CALOT_TRIANGLE),
        (c2, "striped_square", 0.3 + 0.6 * c2, _CYSTIC_PLATE),
    )
    for score, kind, alpha, class_id in patterns:
        if score > 0:
            side = (3.0 + 3.0 * score) * unit
            scene["shapes"].append(
                {
                    "kind": kind,
                    "size": side,
                    "alpha": alpha,
                    "pattern": True,
                    "class_id": class_id,
                    "y": float(rng.uniform(0, size - side)),
                    "x": float(rng.uniform(0, size - side)),
                }
            )
    if c3 > 0:
        radius = (1.2 + 1.0 * c3) * unit
        distance = float(rng.uniform(6.0, 10.0) * unit)
        angle = float(rng.uniform(0, 2 * np.pi))
        dy, dx = distance * np.sin(angle), distance * np.cos(angle)
        margin = radius + 0.5
        cy = float(rng.uniform(margin + max(0.0, -dy), size - margin - max(0.0, dy)))
        cx = float(rng.uniform(margin + max(0.0, -dx), size - margin - max(0.0, dx)))
        # One annotator of three: only one of the two structures is visible.
        blobs = [(cy, cx)] if c3 < 0.5 else [(cy, cx), (cy + dy, cx + dx)]
        for (y, x), class_id in zip(blobs, (_CYSTIC_ARTERY, _CYSTIC_DUCT), strict=False):
            scene["shapes"].append(
                {
                    "kind": "blue_blob",
                    "size": 2 * radius,
                    "alpha": 0.5 + 0.5 * c3,
                    "pattern": True,
                    "class_id": class_id,
                    "y": y - radius,
                    "x": x - radius,
                }
            )
    return scene


def _render(rng, scene, texture, pad, size, unit, yy, xx) -> tuple[np.ndarray, np.ndarray]:
    """Return the frame and its (size, size) uint8 class map (``SEG_CATEGORIES`` ids, 0 = none)."""
    # Camera motion: the background shifts a little from frame to frame, the objects jitter.
    oy, ox = rng.integers(0, 2 * pad + 1, size=2)
    canvas = texture[oy : oy + size, ox : ox + size].copy()
    classes = np.zeros((size, size), dtype=np.uint8)
    jitter = max(1.0, unit)
    for shape in scene["shapes"]:
        # Brief occlusions: a pattern is sometimes hidden on one frame of the clip.
        if shape.get("pattern") and rng.random() < 0.1:
            continue
        y = shape["y"] + rng.uniform(-jitter, jitter)
        x = shape["x"] + rng.uniform(-jitter, jitter)
        _draw(canvas, classes, shape, y, x, size, unit, yy, xx)
    if rng.random() < 0.3:
        _draw_tool(rng, canvas, classes, size, unit, yy, xx)
    canvas *= rng.uniform(0.9, 1.1)
    canvas += rng.normal(0.0, 6.0, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8), classes


def _draw(canvas, classes, shape, y, x, size, unit, yy, xx) -> None:
    """Paint a shape on the canvas, and its class (0 for distractors) where it covers at least half a pixel."""
    kind, side, alpha = shape["kind"], shape["size"], shape["alpha"]
    class_id = shape.get("class_id", 0)
    if kind in ("disc", "blue_blob"):
        radius = side / 2
        coverage = np.clip(radius + 0.5 - np.hypot(yy - (y + radius), xx - (x + radius)), 0.0, 1.0)
        colour = _BLUE if kind == "blue_blob" else shape["colour"]
        _blend(canvas, coverage * alpha, colour)
        classes[coverage >= 0.5] = class_id
        return
    y0, x0 = int(round(y)), int(round(x))
    y1, x1 = min(size, y0 + max(1, int(round(side)))), min(size, x0 + max(1, int(round(side))))
    y0, x0 = max(0, y0), max(0, x0)
    if y1 <= y0 or x1 <= x0:
        return
    classes[y0:y1, x0:x1] = class_id
    region = canvas[y0:y1, x0:x1]
    if kind == "striped_square":
        band = max(1, int(round(unit)))
        rows = (np.arange(y1 - y0) // band) % 2 == 0
        colour = np.where(rows[:, None, None], _GREEN, _RED)
    else:
        colour = _RED if kind == "red_square" else shape["colour"]
    region[...] = (1 - alpha) * region + alpha * colour


def _draw_tool(rng, canvas, classes, size, unit, yy, xx) -> None:
    """A grey instrument shaft entering from the border, drawn over whatever is below it."""
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0, size, size=2)
    width = rng.uniform(2.0, 4.0) * unit
    distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
    along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    coverage = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0) * (along > 0)
    _blend(canvas, coverage, _TOOL)
    classes[coverage >= 0.5] = _TOOL_CLASS


def _blend(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    canvas *= 1 - coverage[..., None]
    canvas += coverage[..., None] * colour
