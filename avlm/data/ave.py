"""AVE (audio-visual event localisation): the annotation reader, per-second labels and the extracted layout.

Accepted layout (see shared/formats/README.md)::

    root/                                        load_ave_splits(root)
      Annotations.txt                            Category&VideoID&Quality&StartTime&EndTime, one row per event;
                                                 its categories are the classes (a header line is optional)
      trainSet.txt valSet.txt testSet.txt        the official splits, same format
      AVE/<VideoID>.mp4                          the videos (only ave_prepare reads them)
      frames/<VideoID>/<second>.jpg              seconds 0..9, written by ave_prepare (or by any other extractor)
      audio/<VideoID>.wav                        16 kHz mono, 10 s

Each clip is 10 one-second segments; second ``t`` is labelled with the class of the event whose
``[StartTime, EndTime)`` covers it, background (class 0) elsewhere. A video may have two events in one split (two
rows). In the official splits some YouTube ids appear in two splits, annotated with different classes: they are
always detected and logged, and ``cross_split_ids`` declares what to do with them (``keep`` = the official
protocol, ``drop`` = remove them from every split).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from avlm.data.audio_captions import _check_root, load_audio
from avlm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SECONDS = 10
BACKGROUND = "background"
SAMPLE_RATE = 16000
AVE_SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_FILES: dict[str, str] = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
ANNOTATIONS_FILE = "Annotations.txt"
HEADER: tuple[str, ...] = ("category", "videoid", "quality", "starttime", "endtime")
CROSS_SPLIT_POLICIES: tuple[str, ...] = ("keep", "drop")
_NAMED_IN_WARNING = 5


@dataclasses.dataclass(frozen=True)
class AveEvent:
    """One annotated event (one row of an annotation file).

    Attributes:
        category: Event class as written (e.g. ``Church bell``).
        start: First second of the event, 0..9.
        end: Second after the last one, 1..10 (the event covers ``[start, end)``).
        quality: The row's quality field as written (``good`` in the official files).
        line: 1-based line of the row in its file, for error messages.
    """

    category: str
    start: int
    end: int
    quality: str
    line: int


@dataclasses.dataclass
class AveClip:
    """One video of one split with its events.

    Attributes:
        video_id: YouTube id, also the name of its mp4, frame folder and wav.
        split: ``train``, ``val`` or ``test``.
        events: The rows of this video in this split's file, in file order (a video may have 2 events).
    """

    video_id: str
    split: str
    events: tuple[AveEvent, ...]

    def labels(self, classes: Sequence[str]) -> np.ndarray:
        """Per-second class indices: the event covering second ``t`` (``start <= t < end``), background elsewhere.

        Where two events overlap, the row listed first wins.

        Args:
            classes: Class names, index 0 = background (:attr:`AveSplits.classes`).

        Returns:
            int64 array of shape (10,).

        Raises:
            DataError: An event's category is not among ``classes``.
        """
        index = {name: i for i, name in enumerate(classes)}
        labels = np.zeros(SECONDS, dtype=np.int64)
        # Later rows first, so that an earlier row overwrites where they overlap.
        for event in reversed(self.events):
            if event.category not in index:
                raise DataError(
                    f"{self.video_id} ({self.split}, line {event.line}): category '{event.category}' is not among "
                    f"the {len(classes)} classes"
                )
            labels[event.start : event.end] = index[event.category]
        return labels


@dataclasses.dataclass
class AveSplits:
    """The AVE splits as read by :func:`load_ave_splits`.

    Attributes:
        root: The dataset folder (resolved).
        classes: ``["background", *sorted categories of Annotations.txt]``.
        clips: Split name → its clips, in file order (after the cross-split policy and ``limit_clips``).
        cross_split_ids: Video id → the splits it appears in (only ids in more than one), sorted by id; found in
            the split files as read, whatever the policy.
        policy: What was done with those ids: ``keep`` or ``drop``.
        dropped: Split name → clips removed from it by policy ``drop`` (0 everywhere with ``keep``).
    """

    root: Path
    classes: list[str]
    clips: dict[str, list[AveClip]]
    cross_split_ids: dict[str, list[str]]
    policy: str
    dropped: dict[str, int]

    def summary(self) -> dict:
        """JSON-able description for the run: clips and events per split, the classes, cross-split ids and policy."""
        return {
            "root": str(self.root),
            "num_classes": len(self.classes),
            "classes": list(self.classes),
            "clips": {split: len(clips) for split, clips in self.clips.items()},
            "events": {split: sum(len(clip.events) for clip in clips) for split, clips in self.clips.items()},
            "cross_split_ids": {
                "count": len(self.cross_split_ids),
                "policy": self.policy,
                "dropped": dict(self.dropped),
                "ids": {video_id: list(splits) for video_id, splits in self.cross_split_ids.items()},
            },
        }


def read_annotation_file(path: str | os.PathLike) -> list[tuple[str, AveEvent]]:
    """Read an AVE annotation or split file: rows ``Category&VideoID&Quality&StartTime&EndTime``.

    The first non-blank line may be the header (``Category&VideoID&Quality&StartTime&EndTime``, any case); blank
    lines are skipped; fields are stripped of surrounding whitespace.

    Args:
        path: ``Annotations.txt``, ``trainSet.txt``, ``valSet.txt`` or ``testSet.txt``.

    Returns:
        ``(video_id, event)`` per row, in file order.

    Raises:
        DataError: The file is missing or unreadable, or a row has the wrong number of fields, an empty category
            or video id, non-integer times, or times outside ``0 <= start < end <= 10``; the message names the
            file, the line and the row (``path:line: why: 'row'``).
    """
    path = Path(path)
    try:
        # utf-8-sig: copies edited on Windows start with a byte-order mark that would stick to the first category.
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read AVE annotation file {path}: {exc}") from exc
    rows: list[tuple[str, AveEvent]] = []
    first = True
    for number, raw in enumerate(text.splitlines(), start=1):
        row = raw.strip()
        if not row:
            continue
        fields = [field.strip() for field in row.split("&")]
        if first and tuple(field.lower() for field in fields) == HEADER:
            first = False
            continue
        first = False
        rows.append(_parse_row(fields, path, number, row))
    return rows


def _parse_row(fields: list[str], path: Path, line: int, row: str) -> tuple[str, AveEvent]:
    def bad(why: str) -> DataError:
        return DataError(f"{path}:{line}: {why}: '{row}'")

    if len(fields) != len(HEADER):
        raise bad(f"expected {len(HEADER)} fields Category&VideoID&Quality&StartTime&EndTime, got {len(fields)}")
    category, video_id, quality, start_text, end_text = fields
    if not category:
        raise bad("empty category")
    if not video_id:
        raise bad("empty video id")
    try:
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise bad("StartTime and EndTime must be integer seconds") from None
    if not 0 <= start < end <= SECONDS:
        raise bad(f"times must satisfy 0 <= StartTime < EndTime <= {SECONDS}, got {start} and {end}")
    return video_id, AveEvent(category=category, start=start, end=end, quality=quality, line=line)


def load_ave_splits(
    root: str | os.PathLike,
    *,
    cross_split_ids: Literal["keep", "drop"] = "keep",
    limit_clips: int = 0,
) -> AveSplits:
    """Read the classes from ``Annotations.txt`` and the clips of the three official split files.

    Video ids found in more than one split are always logged (a warning with their count and the first ids) and
    listed in the result; with ``cross_split_ids="drop"`` they are removed from every split.

    Args:
        root: The AVE folder (layout in this module's docstring).
        cross_split_ids: ``keep`` (the official protocol) or ``drop``.
        limit_clips: Keep only the first ``limit_clips`` clips of each split (after the policy); 0 keeps all.

    Returns:
        The splits, classes and cross-split report.

    Raises:
        DataError: The folder or a file is missing, a row is malformed, or a split file names a category that
            ``Annotations.txt`` lacks (naming the file and line).
        ConfigError: An unknown policy or a negative ``limit_clips``.
    """
    if cross_split_ids not in CROSS_SPLIT_POLICIES:
        raise ConfigError(
            f"config key 'data.cross_split_ids': must be one of {', '.join(CROSS_SPLIT_POLICIES)}, "
            f"got '{cross_split_ids}'"
        )
    if limit_clips < 0:
        raise ConfigError(f"config key 'data.limit_clips': must be >= 0 (0 = all clips), got {limit_clips}")
    folder = _check_root(root, "AVE", f"{ANNOTATIONS_FILE} and {', '.join(SPLIT_FILES.values())}")
    categories = sorted({event.category for _, event in read_annotation_file(folder / ANNOTATIONS_FILE)})
    classes = [BACKGROUND, *categories]
    known = set(categories)

    clips: dict[str, list[AveClip]] = {}
    for split in AVE_SPLITS:
        path = folder / SPLIT_FILES[split]
        grouped: dict[str, list[AveEvent]] = {}
        for video_id, event in read_annotation_file(path):
            if event.category not in known:
                raise DataError(
                    f"{path}:{event.line}: category '{event.category}' of video {video_id} is not in "
                    f"{folder / ANNOTATIONS_FILE} ({len(categories)} categories)"
                )
            grouped.setdefault(video_id, []).append(event)
        clips[split] = [AveClip(video_id, split, tuple(events)) for video_id, events in grouped.items()]

    shared = _cross_split_ids(clips)
    dropped = dict.fromkeys(AVE_SPLITS, 0)
    if shared:
        first_ids = ", ".join(
            f"{video_id} ({'/'.join(splits)})" for video_id, splits in list(shared.items())[:_NAMED_IN_WARNING]
        )
        more = f" and {len(shared) - _NAMED_IN_WARNING} more" if len(shared) > _NAMED_IN_WARNING else ""
        logger.warning(
            "AVE: %d video ids appear in more than one split: %s%s; policy cross_split_ids=%s%s",
            len(shared),
            first_ids,
            more,
            cross_split_ids,
            " (removed from every split)" if cross_split_ids == "drop" else " (kept, as the official protocol does)",
        )
    if cross_split_ids == "drop":
        for split in AVE_SPLITS:
            kept = [clip for clip in clips[split] if clip.video_id not in shared]
            dropped[split] = len(clips[split]) - len(kept)
            clips[split] = kept
    if limit_clips:
        clips = {split: split_clips[:limit_clips] for split, split_clips in clips.items()}
    logger.info(
        "AVE %s: %s clips, %d classes",
        folder,
        " / ".join(f"{split} {len(clips[split])}" for split in AVE_SPLITS),
        len(classes),
    )
    return AveSplits(
        root=folder, classes=classes, clips=clips, cross_split_ids=shared, policy=cross_split_ids, dropped=dropped
    )


def _cross_split_ids(clips: dict[str, list[AveClip]]) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for split in AVE_SPLITS:
        for clip in clips[split]:
            splits = seen.setdefault(clip.video_id, [])
            if split not in splits:
                splits.append(split)
    return {video_id: seen[video_id] for video_id in sorted(seen) if len(seen[video_id]) > 1}


def frame_path(root: str | os.PathLike, video_id: str, second: int) -> Path:
    """Return ``root/frames/<video_id>/<second>.jpg``, the extracted frame of one second (0..9)."""
    return Path(root) / "frames" / video_id / f"{second}.jpg"


def audio_path(root: str | os.PathLike, video_id: str) -> Path:
    """Return ``root/audio/<video_id>.wav``, the extracted 16 kHz mono soundtrack."""
    return Path(root) / "audio" / f"{video_id}.wav"


def video_path(root: str | os.PathLike, video_id: str) -> Path:
    """Return ``root/AVE/<video_id>.mp4``, the original video."""
    return Path(root) / "AVE" / f"{video_id}.mp4"


def missing_extracted(root: str | os.PathLike, clips: Iterable[AveClip | str]) -> list[str]:
    """List what the extracted layout lacks for ``clips`` (clips or video ids), one readable line per problem.

    A clip without a frame folder gives one line (``<id>: no frames/<id>/``), otherwise one per missing second
    (``<id>: no frames/<id>/3.jpg``); a missing wav gives ``<id>: no audio/<id>.wav``. Files are only looked for,
    not decoded.
    """
    problems = []
    for clip in clips:
        video_id = clip if isinstance(clip, str) else clip.video_id
        if not frame_path(root, video_id, 0).parent.is_dir():
            problems.append(f"{video_id}: no frames/{video_id}/")
        else:
            problems += [
                f"{video_id}: no frames/{video_id}/{second}.jpg"
                for second in range(SECONDS)
                if not frame_path(root, video_id, second).is_file()
            ]
        if not audio_path(root, video_id).is_file():
            problems.append(f"{video_id}: no audio/{video_id}.wav")
    return problems


def read_clip_audio(root: str | os.PathLike, video_id: str, sampling_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a clip's wav as a mono float32 waveform at ``sampling_rate``, cut or zero-padded to exactly 10 s.

    Raises:
        DataError: The wav is missing, unreadable, empty or holds non-finite samples.
    """
    return load_audio(audio_path(root, video_id), sampling_rate, num_samples=SECONDS * sampling_rate)


def read_clip_frames(root: str | os.PathLike, video_id: str) -> list[Image.Image]:
    """Read a clip's 10 extracted frames (seconds 0..9) as decoded RGB images.

    Raises:
        DataError: A frame is missing, unreadable, corrupt or truncated.
    """
    frames = []
    for second in range(SECONDS):
        path = frame_path(root, video_id, second)
        try:
            with Image.open(path) as image:
                # convert() decodes the whole file, so a truncated JPEG fails here, not later as garbage.
                frames.append(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read frame {path} of AVE video {video_id}: {exc}") from exc
    return frames
