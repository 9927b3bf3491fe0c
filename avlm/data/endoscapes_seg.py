"""Endoscapes-Seg50 segmentation masks: per-frame anatomy class maps for CVS clips.

Layout read (see shared/formats/README.md, Endoscapes2023; the parts marked *assumed* are not documented there):

- ``<split>_seg/annotation_coco.json``: COCO instance annotations of the segmented frames. ``images`` entries are
  keyed by their ``file_name`` (``${VIDEO_ID}_${FRAME_NUM}.jpg``) and give ``height``/``width``; each annotation's
  ``segmentation`` may be polygons, uncompressed or compressed RLE (the official files store RLE although
  ``iscrowd`` is 0, so the kind is taken from the value, never from ``iscrowd``). A listed image without
  annotations is a frame whose pixels are all background.
- *Assumed*: ``<split>_seg/semseg/*.png`` (else ``semseg/*.png`` in the dataset root): single-channel class-id
  PNGs named like the frames, with ``seg_label_map.txt`` (one ``<id> <name>`` pair a line; ``name: id``,
  ``id,name`` and the like are accepted too) beside the ``semseg`` folder or in the root. They are read only for
  frames the json does not hold.

Categories are matched by name (case, spaces, hyphens and apostrophes do not matter; known synonyms such as
"hepatocystic triangle" for Calot's triangle are accepted) to ``SEG_CLASSES``; gallbladder and tool pixels are
background. Overlapping instances are painted largest first, so a small structure on a larger one stays visible.
"""

from __future__ import annotations

import abc
import dataclasses
import json
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from avlm.data.clips import square_resize
from avlm.data.endoscapes import ClipRecord, parse_frame_name
from avlm.errors import DataError

logger = logging.getLogger(__name__)

SEG_CLASSES: tuple[str, ...] = ("background", "cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct")
SEG_ANNOTATION_FILE = "annotation_coco.json"
SEG_LABEL_MAP_FILE = "seg_label_map.txt"

# SEG_CLASSES index → the normalised category names taken for it. Gallbladder and tools are not CVS anatomy.
_CATEGORY_NAMES: dict[int, tuple[str, ...]] = {
    0: ("background", "gallbladder", "gall_bladder", "tool", "tools", "instrument", "instruments"),
    1: ("cystic_plate",),
    2: ("calot_triangle", "calots_triangle", "hepatocystic_triangle", "hepatocystic_triangle_dissection"),
    3: ("cystic_artery",),
    4: ("cystic_duct",),
}
_CATEGORY_CLASS = {name: class_id for class_id, names in _CATEGORY_NAMES.items() for name in names}


def normalise_category(name: str) -> str:
    """``"Calot's Triangle"`` → ``"calots_triangle"``: lower case, apostrophes dropped, other separators ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower().replace("'", "").replace("\u2019", "")).strip("_")


def category_class(name: str, where: str) -> int:
    """Return the ``SEG_CLASSES`` index of a category name, or raise DataError naming ``where`` and the name."""
    key = normalise_category(name)
    if key not in _CATEGORY_CLASS:
        raise DataError(
            f"{where}: unknown segmentation category {name!r}; known: {', '.join(SEG_CLASSES)} "
            f"(gallbladder and tool count as background)"
        )
    return _CATEGORY_CLASS[key]


class FrameMask(abc.ABC):
    """One frame's segmentation, rendered on demand (a full-size class map is only decoded when asked for)."""

    source: str

    @abc.abstractmethod
    def class_map(self) -> np.ndarray:
        """Return the (H, W) int64 ``SEG_CLASSES`` map at the annotation's native size."""

    @abc.abstractmethod
    def native_size(self) -> tuple[int, int]:
        """Return (width, height) of the annotated frame."""

    def render(self, image_size: int) -> np.ndarray:
        """Return the (image_size, image_size) int64 class map, resized and cropped exactly like ``load_frame``.

        Nearest-neighbour resampling keeps class ids intact.
        """
        classes = Image.fromarray(self.class_map().astype(np.uint8))
        return np.asarray(square_resize(classes, image_size, Image.Resampling.NEAREST), dtype=np.int64)


@dataclass(frozen=True, eq=False)
class CocoFrameMask(FrameMask):
    """A frame's COCO instances.

    Attributes:
        source: ``annotation_coco.json`` path and image entry, for error messages.
        height: Frame height of the annotation.
        width: Frame width of the annotation.
        instances: (class id, COCO ``segmentation``) per instance.
    """

    source: str
    height: int
    width: int
    instances: tuple[tuple[int, object], ...]

    def native_size(self) -> tuple[int, int]:
        return self.width, self.height

    def class_map(self) -> np.ndarray:
        decoded = []
        for class_id, segmentation in self.instances:
            try:
                decoded.append((class_id, _decode_segmentation(segmentation, self.height, self.width)))
            except (ValueError, TypeError, KeyError) as exc:
                raise DataError(f"{self.source}: cannot decode a segmentation: {exc}") from exc
        classes = np.zeros((self.height, self.width), dtype=np.int64)
        for class_id, pixels in sorted(decoded, key=lambda item: -int(item[1].sum())):
            classes[pixels] = class_id
        return classes


@dataclass(frozen=True, eq=False)
class PngFrameMask(FrameMask):
    """A frame's class-id PNG (``semseg``), its pixel values mapped to ``SEG_CLASSES`` through ``lookup``.

    Attributes:
        source: The PNG path.
        lookup: PNG pixel value → ``SEG_CLASSES`` id, ``-1`` for a value ``seg_label_map.txt`` does not define.
        label_map: The ``seg_label_map.txt`` path, for error messages.
    """

    source: str
    lookup: tuple[int, ...]
    label_map: str

    def native_size(self) -> tuple[int, int]:
        try:
            with Image.open(self.source) as image:
                return image.size
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read segmentation mask {self.source}: {exc}") from exc

    def class_map(self) -> np.ndarray:
        try:
            with Image.open(self.source) as image:
                values = np.asarray(image)
        except (OSError, ValueError, SyntaxError) as exc:
            raise DataError(f"cannot read segmentation mask {self.source}: {exc}") from exc
        if values.ndim != 2:
            raise DataError(f"segmentation mask {self.source} has shape {values.shape}; expected one class-id channel")
        lookup = np.asarray(self.lookup, dtype=np.int64)
        if values.max(initial=0) >= len(lookup) or (lookup[values] < 0).any():
            unknown = sorted(int(v) for v in np.unique(values) if v >= len(lookup) or lookup[v] < 0)
            raise DataError(f"segmentation mask {self.source}: pixel value(s) {unknown} are not in {self.label_map}")
        return lookup[values]


def _decode_segmentation(segmentation: object, height: int, width: int) -> np.ndarray:
    """COCO polygons, uncompressed RLE or compressed RLE → (H, W) bool."""
    if isinstance(segmentation, list):
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools 2.0.x builds its output through numpy 2's deprecated copy=False path; the result is correct.
        warnings.filterwarnings("ignore", "__array__ implementation doesn't accept a copy", DeprecationWarning)
        pixels = coco_mask.decode(rle).astype(bool)
    if pixels.shape != (height, width):
        raise ValueError(f"mask of shape {pixels.shape} for a {height}x{width} frame")
    return pixels


def load_segmentation_masks(root: str | os.PathLike, split: str) -> dict[tuple[int, int], FrameMask]:
    """Read the segmentation masks of one split of an Endoscapes2023 copy.

    Args:
        root: Dataset folder (holding ``<split>_seg/``).
        split: ``train``, ``val`` or ``test``.

    Returns:
        (video_id, frame_num) → mask, for every segmented frame (json first, then ``semseg`` PNGs for frames the
        json lacks). Nothing is decoded yet.

    Raises:
        DataError: No ``<split>_seg/annotation_coco.json`` nor ``semseg`` PNGs, malformed json, an unknown
            category (naming file and category), a PNG folder without ``seg_label_map.txt``.
    """
    root = Path(root).expanduser().resolve()
    seg_dir = root / f"{split}_seg"
    json_path = seg_dir / SEG_ANNOTATION_FILE
    png_dir = next((d for d in (seg_dir / "semseg", root / "semseg") if d.is_dir()), None)
    if not json_path.is_file() and png_dir is None:
        raise DataError(
            f"no segmentation masks for split {split!r}: neither {json_path} nor a semseg/ folder "
            f"({seg_dir / 'semseg'} or {root / 'semseg'}) exists"
        )
    masks: dict[tuple[int, int], FrameMask] = _read_coco_masks(json_path) if json_path.is_file() else {}
    if png_dir is not None:
        for key, mask in _read_png_masks(png_dir, root).items():
            masks.setdefault(key, mask)
    return masks


def _read_coco_masks(json_path: Path) -> dict[tuple[int, int], FrameMask]:
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"segmentation file {json_path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("images", "categories")):
        raise DataError(f"segmentation file {json_path} needs 'images' and 'categories' lists (COCO format)")
    classes = {}
    for category in data["categories"]:
        if not isinstance(category, dict) or "id" not in category or not isinstance(category.get("name"), str):
            raise DataError(f"{json_path}: category {category!r} needs an 'id' and a 'name'")
        classes[category["id"]] = category_class(category["name"], f"{json_path}: category id {category['id']}")
    instances: dict[object, list[tuple[int, object]]] = {}
    for index, annotation in enumerate(data.get("annotations") or []):
        if not isinstance(annotation, dict):
            raise DataError(f"{json_path}: annotations[{index}] is not an object: {annotation!r}")
        where = f"{json_path}: annotations[{index}] (id={annotation.get('id')!r})"
        if annotation.get("category_id") not in classes:
            raise DataError(f"{where}: category_id {annotation.get('category_id')!r} is not in 'categories'")
        _check_segmentation(annotation.get("segmentation"), where)
        instances.setdefault(annotation.get("image_id"), []).append(
            (classes[annotation["category_id"]], annotation["segmentation"])
        )
    masks: dict[tuple[int, int], FrameMask] = {}
    for index, image in enumerate(data["images"]):
        if not isinstance(image, dict):
            raise DataError(f"{json_path}: images[{index}] is not an object: {image!r}")
        where = f"{json_path}: images[{index}] (file_name={image.get('file_name')!r})"
        parsed = parse_frame_name(image.get("file_name")) if isinstance(image.get("file_name"), str) else None
        size = (image.get("height"), image.get("width"))
        if parsed is None or not all(isinstance(x, int) and x > 0 for x in size):
            raise DataError(f"{where} needs a <video_id>_<frame_num> file_name and positive integer height/width")
        masks[parsed] = CocoFrameMask(where, size[0], size[1], tuple(instances.get(image.get("id"), ())))
    return masks


def _check_segmentation(segmentation: object, where: str) -> None:
    polygons = isinstance(segmentation, list) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segmentation
    )
    rle = isinstance(segmentation, dict) and "size" in segmentation and "counts" in segmentation
    if not (polygons or rle):
        raise DataError(f"{where}: 'segmentation' must be polygons or an RLE dict (size, counts), got {segmentation!r}")


def _read_png_masks(png_dir: Path, root: Path) -> dict[tuple[int, int], FrameMask]:
    map_path = next((p for p in (png_dir.parent / SEG_LABEL_MAP_FILE, root / SEG_LABEL_MAP_FILE) if p.is_file()), None)
    if map_path is None:
        raise DataError(f"{png_dir} holds class-id PNGs but {png_dir.parent / SEG_LABEL_MAP_FILE} does not exist")
    value_class = read_label_map(map_path)
    lookup = tuple(value_class.get(v, -1) for v in range(max(value_class) + 1))
    masks: dict[tuple[int, int], FrameMask] = {}
    with os.scandir(png_dir) as entries:
        for entry in entries:
            parsed = parse_frame_name(entry.name)
            if parsed is not None and entry.name.lower().endswith(".png"):
                masks[parsed] = PngFrameMask(str(png_dir / entry.name), lookup, str(map_path))
    return masks


def read_label_map(path: str | os.PathLike) -> dict[int, int]:
    """Read ``seg_label_map.txt``: PNG pixel value → ``SEG_CLASSES`` id.

    Each non-empty line not starting with ``#`` pairs an integer with a category name, in either order, separated
    by white space, ``:``, ``,`` or ``=`` (the exact official layout is not documented; this covers the usual ones).

    Raises:
        DataError: A line without an id and a name, an id given twice, or an unknown category (naming the file).
    """
    value_class: dict[int, int] = {}
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            match = re.fullmatch(r"(\d+)\s*[\s:,=]\s*(.+)", text) or re.fullmatch(r"(.+?)\s*[\s:,=]\s*(\d+)", text)
            if match is None:
                raise DataError(f"{path}, line {line_no}: expected '<id> <category name>', got {text!r}")
            value, name = (match.group(1), match.group(2)) if match.group(1).isdigit() else match.group(2, 1)
            if int(value) in value_class:
                raise DataError(f"{path}, line {line_no}: id {value} is defined twice")
            value_class[int(value)] = category_class(name.strip().strip("'\""), f"{path}, line {line_no}")
    if not value_class:
        raise DataError(f"{path} defines no class ids")
    return value_class


def attach_masks(root: str | os.PathLike, splits: Mapping[str, Sequence[ClipRecord]]) -> dict[str, list[ClipRecord]]:
    """Attach the segmentation masks of each split to its clips (``ClipRecord.mask_frames``).

    A clip frame gets the mask keyed by its file name's (video_id, frame_num); a clip none of whose frames has one
    keeps ``mask_frames == ()`` (``has_mask`` False) and is counted in the split's log line.

    Args:
        root: Dataset folder (``<split>_seg/`` of each split).
        splits: Split name → records, as ``load_endoscapes`` returns them.

    Returns:
        Split name → records, in the same order, with masks attached.

    Raises:
        DataError: As ``load_segmentation_masks``; or a mask whose size differs from its frame's on disk (the
            mask would not align with the pixels it labels), naming both.
    """
    result: dict[str, list[ClipRecord]] = {}
    for split, records in splits.items():
        masks = load_segmentation_masks(root, split)
        checked: set[str] = set()
        attached = []
        for record in records:
            frame_masks = tuple(masks.get(parse_frame_name(os.path.basename(p))) for p in record.frame_paths)
            for path, mask in zip(record.frame_paths, frame_masks, strict=True):
                if mask is not None and path not in checked:
                    _check_same_size(path, mask)
                    checked.add(path)
            has_any = any(m is not None for m in frame_masks)
            attached.append(dataclasses.replace(record, mask_frames=frame_masks) if has_any else record)
        result[split] = attached
        with_mask = sum(r.has_mask for r in attached)
        logger.info(
            "Endoscapes %s: segmentation masks on %d of %d clips (%.1f%%), %d clips without masks, %d masked frames",
            split,
            with_mask,
            len(attached),
            100.0 * with_mask / max(len(attached), 1),
            len(attached) - with_mask,
            len(checked),
        )
    return result


def _check_same_size(frame_path: str, mask: FrameMask) -> None:
    try:
        with Image.open(frame_path) as image:
            frame_size = image.size
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"cannot read frame {frame_path}: {exc}") from exc
    if frame_size != mask.native_size():
        raise DataError(
            f"{mask.source}: the mask is {mask.native_size()[0]}x{mask.native_size()[1]} (width x height) but frame "
            f"{frame_path} is {frame_size[0]}x{frame_size[1]}; the mask would not align with the frame"
        )
