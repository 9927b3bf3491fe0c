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
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image

from avlm.data.endoscapes import CVS_CRITERIA
from avlm.data.generated import generate_once

logger = logging.getLogger(__name__)

# Bump whenever the generator's output changes: it is part of the cache folder name.
DEMO_VERSION = "v2"

SPLIT_VIDEOS = {"train": range(1, 91), "val": range(121, 141), "test": range(162, 182)}
KEYFRAMES_PER_VIDEO = (10, 14)  # inclusive range, about 12 on average
FRAME_STEP = 25  # frame numbers advance by 25 per stored frame: 1 fps of a 25 fps video
KEYFRAME_EVERY = 5  # stored frames, i.e. one labelled frame every 5 s
FIRST_KEYFRAME = 2  # fewer than the default clip's 3 earlier frames exist, so the first clip needs padding

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
        The dataset folder, holding ``train/``, ``val/``, ``test/`` and ``<split>_vids.txt``.
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
    for split_index, (split, videos) in enumerate(SPLIT_VIDEOS.items()):
        split_dir = folder / split
        split_dir.mkdir()
        plan = _plan_split(seed, split_index, videos)
        images = []
        n_frames = 0
        for video_id, states in plan:
            entries, written = _write_video(split_dir, seed, video_id, states, image_size)
            n_frames += written
            for entry in entries:
                images.append({"id": len(images) + 1, **entry})
        coco = {
            "info": {"description": f"avlm synthetic CVS demo {DEMO_VERSION} (seed {seed}), split {split}"},
            "licenses": [],
            "images": images,
            "annotations": [],
            "categories": [{"id": k + 1, "name": c} for k, c in enumerate(CVS_CRITERIA)],
        }
        with open(split_dir / "annotation_ds_coco.json", "w", encoding="utf-8") as f:
            json.dump(coco, f, indent=1)
        (folder / f"{split}_vids.txt").write_text("".join(f"{v}\n" for v in videos), encoding="utf-8")
        summary["splits"][split] = {"videos": len(videos), "keyframes": len(images), "frames": n_frames}
    return summary


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
) -> tuple[list[dict], int]:
    """Write one video's frames; return its keyframe annotation entries and the number of frames written."""
    rng = np.random.default_rng([seed, 2, video_id])
    unit = size / 32.0
    pad = max(1, round(2 * unit))
    texture = _texture(rng, size + 2 * pad)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    start_frame = int(rng.integers(0, 400)) * FRAME_STEP
    entries = []
    frame_index = 0
    for k, ds in enumerate(states):
        keyframe_index = FIRST_KEYFRAME + k * KEYFRAME_EVERY
        scene = _scene(rng, ds, size, unit)
        # The frames since the previous keyframe show this keyframe's state.
        while frame_index <= keyframe_index:
            frame = _render(rng, scene, texture, pad, size, unit, yy, xx)
            frame_num = start_frame + frame_index * FRAME_STEP
            file_name = f"{video_id}_{frame_num}.jpg"
            Image.fromarray(frame).save(split_dir / file_name, format="JPEG", quality=95, subsampling=0)
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
    return entries, frame_index


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
    for score, kind, alpha in ((c1, "red_square", 0.5 + 0.5 * c1), (c2, "striped_square", 0.3 + 0.6 * c2)):
        if score > 0:
            side = (3.0 + 3.0 * score) * unit
            scene["shapes"].append(
                {
                    "kind": kind,
                    "size": side,
                    "alpha": alpha,
                    "pattern": True,
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
        for y, x in blobs:
            scene["shapes"].append(
                {
                    "kind": "blue_blob",
                    "size": 2 * radius,
                    "alpha": 0.5 + 0.5 * c3,
                    "pattern": True,
                    "y": y - radius,
                    "x": x - radius,
                }
            )
    return scene


def _render(rng, scene, texture, pad, size, unit, yy, xx) -> np.ndarray:
    # Camera motion: the background shifts a little from frame to frame, the objects jitter.
    oy, ox = rng.integers(0, 2 * pad + 1, size=2)
    canvas = texture[oy : oy + size, ox : ox + size].copy()
    jitter = max(1.0, unit)
    for shape in scene["shapes"]:
        # Brief occlusions: a pattern is sometimes hidden on one frame of the clip.
        if shape.get("pattern") and rng.random() < 0.1:
            continue
        y = shape["y"] + rng.uniform(-jitter, jitter)
        x = shape["x"] + rng.uniform(-jitter, jitter)
        _draw(canvas, shape, y, x, size, unit, yy, xx)
    if rng.random() < 0.3:
        _draw_tool(rng, canvas, size, unit, yy, xx)
    canvas *= rng.uniform(0.9, 1.1)
    canvas += rng.normal(0.0, 6.0, size=canvas.shape)
    return np.clip(np.rint(canvas), 0, 255).astype(np.uint8)


def _draw(canvas, shape, y, x, size, unit, yy, xx) -> None:
    kind, side, alpha = shape["kind"], shape["size"], shape["alpha"]
    if kind in ("disc", "blue_blob"):
        radius = side / 2
        coverage = np.clip(radius + 0.5 - np.hypot(yy - (y + radius), xx - (x + radius)), 0.0, 1.0)
        colour = _BLUE if kind == "blue_blob" else shape["colour"]
        _blend(canvas, coverage * alpha, colour)
        return
    y0, x0 = int(round(y)), int(round(x))
    y1, x1 = min(size, y0 + max(1, int(round(side)))), min(size, x0 + max(1, int(round(side))))
    y0, x0 = max(0, y0), max(0, x0)
    if y1 <= y0 or x1 <= x0:
        return
    region = canvas[y0:y1, x0:x1]
    if kind == "striped_square":
        band = max(1, int(round(unit)))
        rows = (np.arange(y1 - y0) // band) % 2 == 0
        colour = np.where(rows[:, None, None], _GREEN, _RED)
    else:
        colour = _RED if kind == "red_square" else shape["colour"]
    region[...] = (1 - alpha) * region + alpha * colour


def _draw_tool(rng, canvas, size, unit, yy, xx) -> None:
    """A grey instrument shaft entering from the border, drawn over whatever is below it."""
    angle = rng.uniform(0, np.pi)
    cy, cx = rng.uniform(0, size, size=2)
    width = rng.uniform(2.0, 4.0) * unit
    distance = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
    along = (yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle)
    coverage = np.clip(width / 2 + 0.5 - distance, 0.0, 1.0) * (along > 0)
    _blend(canvas, coverage, _TOOL)


def _blend(canvas: np.ndarray, coverage: np.ndarray, colour: np.ndarray) -> None:
    canvas *= 1 - coverage[..., None]
    canvas += coverage[..., None] * colour
