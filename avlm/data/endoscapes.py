"""Reader for the Endoscapes2023 CVS layout (see shared/formats/README.md, section Endoscapes2023).

Each split folder holds frames named ``${VIDEO_ID}_${FRAME_NUM}.jpg`` (FRAME_NUM counted at 25 fps, one frame per
second on disk) and ``annotation_ds_coco.json``, whose ``images`` entries are the CVS-labelled keyframes with
``ds = [C1, C2, C3]``, each the mean of three annotators. A labelled keyframe becomes a clip of ``clip_frames``
frames ending at it, so temporal models see the seconds leading up to the label.

Two parts of the layout are read on assumptions, as their format is not documented in shared/formats:

- The data-efficiency subsets ``12_5/train_{0,1,2}/`` and ``25/train_{0,1,2}/`` hold an ``annotation_ds_coco.json``
  listing the subset's keyframes (frames stay in ``train/``), or else a ``train_vids.txt`` of the subset's videos.
- ``all_metadata.csv`` holds one row per frame with its video (column ``vid``, or ``video_id``/``video``) and frame
  number (``frame``, or ``frame_num``/``frame_id``) and one 0/1 vote per annotator and criterion in columns named
  criterion first, annotator second (``C1_1`` … ``C3_3``; ``C2_rater3``, ``c2_annotator3`` and
  ``annotator3_C2`` are read too). Rows whose votes are empty (frames without a CVS label) are skipped.
"""

from __future__ import annotations

import bisect
import csv
import dataclasses
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from avlm.data.integrity import verify_frames
from avlm.errors import DataError

if TYPE_CHECKING:  # endoscapes_seg imports this module
    from avlm.data.endoscapes_seg import FrameMask

logger = logging.getLogger(__name__)

CVS_CRITERIA: tuple[str, str, str] = ("C1", "C2", "C3")

# The published split of the 201 videos; for documentation only, the built-in demo uses other ids.
OFFICIAL_SPLIT_VIDEOS = {"train": range(1, 121), "val": range(121, 162), "test": range(162, 202)}

FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png")
_FRAME_NAME = re.compile(r"^(\d+)_(\d+)(\.[A-Za-z]+)$")
FRAME_SELECTIONS = ("stride", "uniform")
# The official evaluator rounds the annotator mean: 2 of 3 annotators make a positive.
POSITIVE_THRESHOLD = 0.5
ANNOTATORS = 3
# How per-annotator votes become a binary label: majority (2 of 3, the official evaluator's and the ds rounding),
# any (1 of 3), all (3 of 3), or one annotator's vote.
LABEL_POLICIES = ("majority", "any", "all", *(f"annotator_{a}" for a in range(1, ANNOTATORS + 1)))
METADATA_FILE = "all_metadata.csv"
# data.subset value → folder of the official data-efficiency training subsets.
SUBSET_FOLDERS = {"12_5": "12_5", "12.5": "12_5", "25": "25"}


@dataclass(frozen=True)
class ClipRecord:
    """One CVS-labelled keyframe and the frames of the clip that ends at it.

    Attributes:
        clip_id: ``"<video_id>_<frame_num>"`` of the labelled (last) frame.
        video_id: Video the clip comes from.
        frame_num: Frame number of the labelled frame at 25 fps, as in the file name.
        frame_paths: Absolute frame paths, oldest first, ending with the labelled frame.
        labels: Binarised criteria C1, C2, C3: by default ``score >= 0.5``, the annotators' majority; see
            ``label_policy`` of ``load_endoscapes`` for the others.
        scores: The raw ``ds`` values (annotator means 0, 1/3, 2/3 or 1).
        mask_frames: Per clip frame, its segmentation mask (an ``avlm.data.endoscapes_seg.FrameMask``) or None;
            empty (the default) when no mask was attached (``attach_masks``).
    """

    clip_id: str
    video_id: int
    frame_num: int
    frame_paths: tuple[str, ...]
    labels: tuple[int, ...]
    scores: tuple[float, ...]
    mask_frames: tuple[FrameMask | None, ...] = ()

    @property
    def has_mask(self) -> bool:
        """True when at least one frame of the clip has a segmentation mask."""
        return any(mask is not None for mask in self.mask_frames)


def parse_frame_name(name: str) -> tuple[int, int] | None:
    """Return ``(video_id, frame_num)`` for a frame file name like ``12_3400.jpg``, or None if it is not one."""
    match = _FRAME_NAME.match(name)
    if match is None or match.group(3).lower() not in FRAME_EXTENSIONS:
        return None
    return int(match.group(1)), int(match.group(2))


def load_endoscapes(
    root: str | os.PathLike,
    splits: Sequence[str] = ("train", "val", "test"),
    clip_frames: int = 4,
    frame_stride: int = 25,
    annotation_file: str = "annotation_ds_coco.json",
    frame_selection: str = "stride",
    clip_window: int = 0,
    subset: str = "",
    subset_fold: int = 0,
    label_policy: str = "majority",
) -> dict[str, list[ClipRecord]]:
    """Read the CVS-labelled clips of an Endoscapes2023 copy.

    Args:
        root: Dataset folder holding one sub-folder per split.
        splits: Split folders to read.
        clip_frames: Frames per clip, the labelled frame included.
        frame_stride: Distance between consecutive clip frames in frame numbers (25 = one second).
        annotation_file: Name of the COCO json with the ``ds`` labels inside each split folder.
        frame_selection: ``stride`` (frames every ``frame_stride`` frame numbers, ending at the labelled one) or
            ``uniform`` (``clip_frames`` positions spread evenly over the ``clip_window`` frame numbers before the
            labelled frame, each taken as the latest frame on disk at or before it within the window).
        clip_window: ``uniform`` only: span of the window in frame numbers; 0 = ``(clip_frames - 1) ·
            frame_stride``, the span of a ``stride`` clip.
        subset: ``""`` (the whole train split), or ``12_5`` / ``25``: the ``train`` split is read from the official
            data-efficiency subset ``<subset>/train_<subset_fold>/`` (its annotation file, frames from ``train/``;
            or its ``train_vids.txt``). Other splits are unaffected.
        subset_fold: Which of the subset's folds (0, 1, 2 in the official release).
        label_policy: How the three annotators' votes make the binary ``labels``: ``majority`` (default; the
            official evaluator's rounding of ``ds``, read from the annotation file alone), ``any`` (1 of 3),
            ``all`` (3 of 3) or ``annotator_1`` / ``annotator_2`` / ``annotator_3``; all but ``majority`` read the
            votes from ``all_metadata.csv``. ``scores`` stay the ``ds`` values.

    Returns:
        Split name → records sorted by (video_id, frame_num). A clip frame missing on disk (start of the video or
        a gap) is filled with the nearest earlier frame of the clip that exists, or, before the first one, with
        the earliest existing frame, so the clip stays in time order and always ends with the labelled frame.

    Raises:
        DataError: Missing folder or file (a subset folder, ``all_metadata.csv`` for a non-majority policy),
            malformed annotation, missing labelled frame, a keyframe without votes, a video shared between splits
            or absent from its ``<split>_vids.txt``, or clip frames that do not decode (each named with its
            clip). Every clip frame is decoded once (``avlm.data.integrity``); a later call over unchanged files
            does not decode them again.
    """
    if isinstance(splits, str):
        splits = (splits,)
    if clip_frames < 1 or frame_stride < 1:
        raise ValueError(f"clip_frames and frame_stride must be >= 1, got {clip_frames} and {frame_stride}")
    if frame_selection not in FRAME_SELECTIONS or clip_window < 0:
        raise ValueError(
            f"frame_selection must be one of {list(FRAME_SELECTIONS)} and clip_window >= 0, got "
            f"{frame_selection!r} and {clip_window}"
        )
    if label_policy not in LABEL_POLICIES:
        raise ValueError(f"label_policy must be one of {list(LABEL_POLICIES)}, got {label_policy!r}")
    if (subset and subset not in SUBSET_FOLDERS) or subset_fold < 0:
        raise ValueError(
            f"subset must be empty or one of {list(SUBSET_FOLDERS)} and subset_fold >= 0, got {subset!r} and "
            f"{subset_fold}"
        )
    select = (
        _StrideSelection(clip_frames, frame_stride)
        if frame_selection == "stride"
        else _UniformSelection(clip_frames, clip_window or (clip_frames - 1) * frame_stride)
    )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"Endoscapes data folder {root} does not exist. Point data_dir at an Endoscapes2023 copy (with "
            f"{'/, '.join(splits)}/ folders), or leave data_dir unset to use the built-in demo data."
        )
    root = root.resolve()
    result: dict[str, list[ClipRecord]] = {}
    for split in splits:
        if split == "train" and subset:
            result[split] = _load_subset(root, SUBSET_FOLDERS[subset], subset_fold, select, annotation_file)
        else:
            result[split] = _load_split(root / split, root / split / annotation_file, select)
    if label_policy != "majority":
        result = _relabel(root / METADATA_FILE, result, label_policy)
    _check_split_hygiene(root, result)
    # Decoded now, before any run exists, rather than trained on (a truncated JPEG decodes to grey).
    uses: dict[str, str] = {}
    for split, records in result.items():
        for record in records:
            for path in record.frame_paths:
                uses.setdefault(path, f"{split} clip {record.clip_id}")
    verify_frames(uses, f"Endoscapes data {root}")
    for split, records in result.items():
        _log_split_summary(split, records)
    return result


def _load_split(
    split_dir: Path, json_path: Path, select: Callable[[dict[int, str], int], tuple[str, ...]]
) -> list[ClipRecord]:
    """Read the clips of the keyframes ``json_path`` lists, their frames from ``split_dir``."""
    if not split_dir.is_dir():
        raise DataError(
            f"Endoscapes split folder {split_dir} does not exist (expected {split_dir.name}/ under {split_dir.parent})"
        )
    frames = _index_frames(split_dir)
    records = []
    for index, file_name, scores in _read_annotations(json_path):
        # _read_annotations already checked the name, so this parse cannot fail.
        video_id, frame_num = parse_frame_name(file_name)  # type: ignore[misc]
        video_frames = frames.get(video_id, {})
        labelled_path = video_frames.get(frame_num)
        if labelled_path is None or os.path.basename(labelled_path) != file_name:
            raise DataError(
                f"{json_path}: images[{index}] (file_name={file_name!r}): frame {split_dir / file_name} is not on disk"
            )
        records.append(
            ClipRecord(
                clip_id=f"{video_id}_{frame_num}",
                video_id=video_id,
                frame_num=frame_num,
                frame_paths=select(video_frames, frame_num),
                labels=tuple(int(s >= POSITIVE_THRESHOLD) for s in scores),
                scores=scores,
            )
        )
    records.sort(key=lambda r: (r.video_id, r.frame_num))
    return records


def _load_subset(
    root: Path, folder: str, fold: int, select: Callable[[dict[int, str], int], tuple[str, ...]], annotation_file: str
) -> list[ClipRecord]:
    """The train clips of one fold of an official data-efficiency subset (layout: see the module docstring)."""
    subset_dir = root / folder / f"train_{fold}"
    if not subset_dir.is_dir():
        raise DataError(
            f"Endoscapes training subset folder {subset_dir} does not exist (data.subset={folder!r}, "
            f"subset_fold={fold}; the official release has {folder}/train_0, train_1, train_2)"
        )
    if (subset_dir / annotation_file).is_file():
        return _load_split(root / "train", subset_dir / annotation_file, select)
    vids_file = subset_dir / "train_vids.txt"
    if not vids_file.is_file():
        raise DataError(
            f"Endoscapes training subset folder {subset_dir} holds neither {annotation_file} nor {vids_file.name}"
        )
    videos = set(_read_video_list(vids_file))
    records = [r for r in _load_split(root / "train", root / "train" / annotation_file, select) if r.video_id in videos]
    if not records:
        raise DataError(f"{vids_file}: none of its videos has a labelled keyframe in {root / 'train'}")
    return records


def _index_frames(split_dir: Path) -> dict[int, dict[int, str]]:
    """Map video id → frame number → absolute path, from one directory listing."""
    frames: dict[int, dict[int, str]] = {}
    with os.scandir(split_dir) as entries:
        for entry in entries:
            parsed = parse_frame_name(entry.name)
            if parsed is None:
                continue
            video_id, frame_num = parsed
            video_frames = frames.setdefault(video_id, {})
            if frame_num in video_frames:
                raise DataError(
                    f"{split_dir}: frame {video_id}_{frame_num} is stored twice "
                    f"({os.path.basename(video_frames[frame_num])} and {entry.name}); keep one"
                )
            video_frames[frame_num] = str(split_dir / entry.name)
    return frames


class _StrideSelection:
    """Frames every ``stride`` frame numbers ending at the labelled one; missing ones filled by ``_fill_clip``."""

    def __init__(self, clip_frames: int, stride: int):
        self.clip_frames, self.stride = clip_frames, stride

    def __call__(self, video_frames: dict[int, str], frame_num: int) -> tuple[str, ...]:
        wanted = [frame_num - (self.clip_frames - 1 - j) * self.stride for j in range(self.clip_frames)]
        return _fill_clip([video_frames.get(n) for n in wanted])


class _UniformSelection:
    """``clip_frames`` positions evenly over ``[labelled - window, labelled]``, each the latest frame on disk at or
    before it inside the window (the earliest one in the window when none is), so the clip stays in time order."""

    def __init__(self, clip_frames: int, window: int):
        self.clip_frames, self.window = clip_frames, window

    def __call__(self, video_frames: dict[int, str], frame_num: int) -> tuple[str, ...]:
        start = frame_num - self.window
        on_disk = sorted(n for n in video_frames if start <= n <= frame_num)  # holds the labelled frame
        if self.clip_frames == 1:
            positions = [frame_num]
        else:  # rounded half up: positions on the stride grid stay exact
            step = self.window / (self.clip_frames - 1)
            positions = [math.floor(start + j * step + 0.5) for j in range(self.clip_frames)]
        chosen = [on_disk[max(bisect.bisect_right(on_disk, p) - 1, 0)] for p in positions]
        return tuple(video_frames[n] for n in chosen)


def _fill_clip(paths: list[str | None]) -> tuple[str, ...]:
    """Fill missing clip frames: from the previous existing frame, or before the first one, from it."""
    # The last frame (the labelled one) always exists, so a first existing frame is always found.
    first = next(p for p in paths if p is not None)
    filled = []
    previous = first
    for path in paths:
        previous = path if path is not None else previous
        filled.append(previous)
    return tuple(filled)


def _read_annotations(json_path: Path) -> list[tuple[int, str, tuple[float, ...]]]:
    """Return (entry index, file_name, ds scores) for each image entry, validated."""
    if not json_path.is_file():
        raise DataError(f"annotation file {json_path} does not exist")
    try:
        with open(json_path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"annotation file {json_path} is not valid JSON: {exc}") from exc
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise DataError(f"annotation file {json_path} has no 'images' list of labelled frames")
    entries = []
    seen: dict[str, int] = {}
    for index, image in enumerate(images):
        if not isinstance(image, dict):
            raise DataError(f"{json_path}: images[{index}] is not an object: {image!r}")
        where = f"{json_path}: images[{index}] (file_name={image.get('file_name')!r}, id={image.get('id')!r})"
        for key in ("file_name", "ds"):
            if key not in image:
                raise DataError(f"{where} has no '{key}'")
        file_name = image["file_name"]
        if not isinstance(file_name, str) or parse_frame_name(file_name) is None:
            raise DataError(
                f"{where}: file_name must look like <video_id>_<frame_num>"
                f"{{{','.join(FRAME_EXTENSIONS)}}}, got {file_name!r}"
            )
        if file_name in seen:
            raise DataError(f"{where}: file_name is listed twice (also images[{seen[file_name]}])")
        seen[file_name] = index
        entries.append((index, file_name, _check_scores(image["ds"], where)))
    return entries


def _check_scores(ds: object, where: str) -> tuple[float, ...]:
    def is_score(x: object) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and 0.0 <= x <= 1.0

    if not isinstance(ds, list) or len(ds) != len(CVS_CRITERIA) or not all(is_score(x) for x in ds):
        raise DataError(
            f"{where}: 'ds' must be a list of {len(CVS_CRITERIA)} numbers in [0, 1] "
            f"({', '.join(CVS_CRITERIA)}), got {ds!r}"
        )
    return tuple(float(x) for x in ds)


def read_annotator_votes(path: str | os.PathLike) -> dict[tuple[int, int], tuple[tuple[int, ...], ...]]:
    """Read the per-annotator CVS votes of ``all_metadata.csv`` (columns: see the module docstring).

    Returns:
        (video_id, frame_num) → votes[annotator][criterion], each 0 or 1, for every row whose votes are filled.

    Raises:
        DataError: The file is missing, lacks the video / frame / vote columns (naming what it has), or holds a
            vote other than 0 or 1 (naming the row and column).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"per-annotator labels file {path} does not exist (label policies other than majority need it)")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        video_column = _find_column(header, ("vid", "video_id", "video"))
        frame_column = _find_column(header, ("frame", "frame_num", "frame_id"))
        vote_columns = _vote_columns(header)
        if video_column is None or frame_column is None or len(vote_columns) != ANNOTATORS * len(CVS_CRITERIA):
            raise DataError(
                f"{path}: expected a video column (vid), a frame column (frame) and {ANNOTATORS * len(CVS_CRITERIA)} "
                f"vote columns C<criterion>_<annotator> (C1_1 … C3_3); its columns are {header}"
            )
        votes = {}
        for line_no, row in enumerate(reader, start=2):
            cells = [[row[vote_columns[(a, k)]].strip() for k in range(len(CVS_CRITERIA))] for a in range(ANNOTATORS)]
            if all(not cell for annotator in cells for cell in annotator):
                continue  # a frame without a CVS label
            try:
                key = (_whole_number(row[video_column]), _whole_number(row[frame_column]))
                votes[key] = tuple(tuple(_vote(cell) for cell in annotator) for annotator in cells)
            except ValueError as exc:
                raise DataError(f"{path}, line {line_no}: {exc} (row {row})") from exc
    return votes


def _whole_number(text: str) -> int:
    value = float(text)
    if not value.is_integer():
        raise ValueError(f"expected a whole number, got {text!r}")
    return int(value)


def _vote(text: str) -> int:
    if text not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"an annotator vote must be 0 or 1, got {text!r}")
    return int(float(text))


def _find_column(header: Sequence[str], names: Sequence[str]) -> str | None:
    by_name = {column.strip().lower(): column for column in header}
    return next((by_name[name] for name in names if name in by_name), None)


def _vote_columns(header: Sequence[str]) -> dict[tuple[int, int], str]:
    """(annotator index, criterion index) → column, for names like C2_3, C2_rater3 or annotator3_C2."""
    columns = {}
    for column in header:
        name = re.sub(r"[^a-z0-9]", "", column.lower())
        criterion_first = re.fullmatch(r"c([1-3])(?:rater|annotator|ann|r|a)?([1-9])", name)
        annotator_first = re.fullmatch(r"(?:rater|annotator|ann|r|a)([1-9])c([1-3])", name)
        if criterion_first:
            criterion, annotator = criterion_first.groups()
        elif annotator_first:
            annotator, criterion = annotator_first.groups()
        else:
            continue
        if int(annotator) <= ANNOTATORS:
            columns[(int(annotator) - 1, int(criterion) - 1)] = column
    return columns


def binarise_votes(votes: Sequence[Sequence[int]], policy: str) -> tuple[int, ...]:
    """Binary C1..C3 labels from votes[annotator][criterion] under a ``LABEL_POLICIES`` policy."""
    if policy.startswith("annotator_"):
        return tuple(int(v) for v in votes[int(policy.removeprefix("annotator_")) - 1])
    needed = {"majority": ANNOTATORS // 2 + 1, "any": 1, "all": ANNOTATORS}[policy]
    return tuple(int(sum(annotator[k] for annotator in votes) >= needed) for k in range(len(CVS_CRITERIA)))


def _relabel(metadata: Path, result: dict[str, list[ClipRecord]], policy: str) -> dict[str, list[ClipRecord]]:
    """Replace the labels by the policy's binarisation of the annotators' votes."""
    votes = read_annotator_votes(metadata)
    relabelled: dict[str, list[ClipRecord]] = {}
    disagreeing = 0
    for split, records in result.items():
        relabelled[split] = []
        for record in records:
            clip_votes = votes.get((record.video_id, record.frame_num))
            if clip_votes is None:
                raise DataError(f"{metadata}: no annotator votes for {split} keyframe {record.clip_id}")
            means = [sum(a[k] for a in clip_votes) / ANNOTATORS for k in range(len(CVS_CRITERIA))]
            disagreeing += any(abs(m - s) > 1e-6 for m, s in zip(means, record.scores, strict=True))
            relabelled[split].append(dataclasses.replace(record, labels=binarise_votes(clip_votes, policy)))
    if disagreeing:
        logger.warning("%s: the votes of %d keyframes do not average to their ds scores", metadata, disagreeing)
    logger.info("Endoscapes labels: policy %s (votes from %s)", policy, metadata)
    return relabelled


def _check_split_hygiene(root: Path, result: dict[str, list[ClipRecord]]) -> None:
    """Refuse a video in two splits (leakage) and videos that the official ``<split>_vids.txt`` lists do not hold."""
    splits_of_video: dict[int, list[str]] = {}
    for split, records in result.items():
        for video_id in sorted({r.video_id for r in records}):
            splits_of_video.setdefault(video_id, []).append(split)
    shared = {v: s for v, s in sorted(splits_of_video.items()) if len(s) > 1}
    if shared:
        listing = "; ".join(f"video {v} in {', '.join(s)}" for v, s in shared.items())
        raise DataError(f"{root}: {len(shared)} video(s) appear in more than one split: {listing}")
    for split, records in result.items():
        vids_file = root / f"{split}_vids.txt"
        if not vids_file.is_file():
            continue
        allowed = set(_read_video_list(vids_file))
        extra = sorted({r.video_id for r in records} - allowed)
        if extra:
            raise DataError(f"{root / split}: video(s) {extra} are not listed in {vids_file}")


def _read_video_list(path: Path) -> Iterable[int]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            text = line.strip()
            if not text:
                continue
            try:
                value = float(text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value != int(value):
                raise DataError(f"{path}, line {line_no}: expected a video id, got {text!r}")
            yield int(value)


def _log_split_summary(split: str, records: Sequence[ClipRecord]) -> None:
    n = max(len(records), 1)
    rates = ", ".join(f"{name} {sum(r.labels[k] for r in records) / n:.1%}" for k, name in enumerate(CVS_CRITERIA))
    logger.info(
        "Endoscapes %s: %d videos, %d clips, positive rate %s",
        split,
        len({r.video_id for r in records}),
        len(records),
        rates,
    )
