"""A generic manifest of labelled multi-label clips, each with a group key and a split, read from CSV or JSON.

Any dataset whose clips are image frames on disk plugs in by writing one manifest file, without code: the probe
recipe reads it with ``load_clip_manifest``. Every clip has

- ``sample_id``: unique over the whole manifest;
- ``split``: any name (``train``, ``val``, ``test``, ...);
- ``group``: what must not be shared between splits (a scene, video or patient id); the reader keeps clips whose
  group is in two splits, and ``group_overlap`` reports them, so a hygiene check can fail loudly on them;
- ``frames``: the clip's frames, in time order, given as

  - a folder: its image files (``.jpg .jpeg .png .bmp .webp``), in natural name order (``2.jpg`` before
    ``10.jpg``);
  - a glob (``frames/scene-0001/cam_front_*.jpg``): the image files it matches, in natural name order;
  - a list of image files: ``;``-separated in a CSV cell (``a/0.jpg;a/5.jpg``), or a JSON list.

  Relative paths are relative to the manifest's folder, not to the working directory. Video files are not read:
  decode them to frames first;
- labels, binary (0 or 1), in one of these forms:

  - one ``label:<name>`` column (JSON: key) per label, each 0 or 1 (JSON also ``true``/``false``);
  - a ``labels`` column: the ``;``-separated names of the labels present (an empty cell: none present). The
    label names cannot be read off such a column (a label present in no clip would vanish), so pass
    ``label_names``, or in JSON declare them at the top level (below);
  - JSON only: ``labels`` as an object ``{name: 0 or 1}`` with every label, or as a list of the present names.

Other columns or keys are ignored, so an existing clip index with extra metadata can be used as is.

CSV example (``probe_clips.csv``; frames under ``frames/`` next to it)::

    sample_id,split,group,frames,label:pedestrian,label:cyclist
    s0001_a,train,scene-0001,frames/s0001_a,1,0
    s0001_b,train,scene-0001,frames/s0001_b/*.jpg,0,0
    s0007_a,val,scene-0007,frames/s0007_a/000.jpg;frames/s0007_a/005.jpg;frames/s0007_a/010.jpg,1,1

or, with a ``labels`` column (read with ``label_names=["pedestrian", "cyclist"]``)::

    sample_id,split,group,frames,labels
    s0001_a,train,scene-0001,frames/s0001_a,pedestrian
    s0001_b,train,scene-0001,frames/s0001_b/*.jpg,
    s0007_a,val,scene-0007,frames/s0007_a/000.jpg;frames/s0007_a/005.jpg;frames/s0007_a/010.jpg,pedestrian;cyclist

JSON example (a bare list of such objects works too, with ``labels`` as an object or with ``label:<name>`` keys)::

    {"labels": ["pedestrian", "cyclist"],
     "clips": [{"sample_id": "s0001_a", "split": "train", "group": "scene-0001",
                "frames": "frames/s0001_a", "labels": ["pedestrian"]},
               {"sample_id": "s0007_a", "split": "val", "group": "scene-0007",
                "frames": ["frames/s0007_a/000.jpg", "frames/s0007_a/005.jpg"],
                "labels": {"pedestrian": 1, "cyclist": 1}}]}

The label order is ``label_names`` when given, else the declared order (top-level ``labels``, the
``label:<name>`` columns, or the first clip's label keys). ``write_cvs_demo_manifest`` writes the built-in CVS
demo as such a manifest, so the probe's demo goes through this reader too.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avlm.data.clips import ClipFrames, label_checksum, manifest_hash
from avlm.data.cvs_demo import ensure_cvs_demo
from avlm.data.endoscapes import CVS_CRITERIA, load_endoscapes
from avlm.data.integrity import verify_frames
from avlm.data.video_captions import evenly_spaced_indices
from avlm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

REQUIRED_FIELDS: tuple[str, ...] = ("sample_id", "split", "group", "frames")
LABEL_PREFIX = "label:"
LIST_SEPARATOR = ";"
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
_NAMED_IN_ERROR = 5
_GLOB_CHARACTERS = re.compile(r"[*?\[]")
_DIGITS = re.compile(r"(\d+)")


@dataclass(frozen=True)
class ProbeClip:
    """One labelled clip of a manifest.

    It has the ``frame_paths`` and ``labels`` of a CVS ``ClipRecord`` (and ``clip_id`` as an alias of
    ``sample_id``), so ``manifest_hash`` takes it as it takes CVS records.

    Attributes:
        sample_id: Unique id of the clip in its manifest.
        frame_paths: Absolute paths of the clip's frames, in time order (``clip_frames`` of them if it was given).
        labels: One value per label of the manifest, in its ``label_names`` order, each 0.0 or 1.0.
        group: Key that must not be shared between splits (scene, video or patient id).
        split: Split the clip belongs to.
    """

    sample_id: str
    frame_paths: tuple[str, ...]
    labels: tuple[float, ...]
    group: str
    split: str

    @property
    def clip_id(self) -> str:
        """The ``sample_id``, under the name the CVS record helpers read."""
        return self.sample_id


class ProbeClipDataset(torch.utils.data.Dataset):
    """Normalised clip tensors and binary labels of manifest clips, one item per clip.

    The items of ``ClipDataset`` (frames loaded, resized and normalised by the same ``ClipFrames``, so a clip gives
    the same tensor in both), for any number of labels and with the clip's ``sample_id``. Items are deterministic
    per index (feature caches key on them).

    Args:
        clips: Clips to serve, in order.
        num_labels: Labels per clip (the manifest's ``len(label_names)``).
        image_size: Side of the square frames; see ``load_frame`` for the resize.
        mean: Per-channel mean of the pixel values in [0, 1], subtracted before dividing by ``std``.
        std: Per-channel standard deviation.

    Items are dicts with ``pixel_values`` (float32 tensor [T, 3, image_size, image_size]), ``labels`` (float32
    tensor [num_labels]), ``index`` (int) and ``sample_id`` (str); torch's default collate batches them.

    Attributes:
        labels: (N, num_labels) int64 array of the binary labels, in clip order.
    """

    def __init__(
        self,
        clips: Sequence[ProbeClip],
        num_labels: int,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        self.records = list(clips)
        bad = [c.sample_id for c in self.records if len(c.labels) != num_labels]
        if bad:
            raise ValueError(f"clips {bad[:_NAMED_IN_ERROR]} do not have num_labels={num_labels} labels")
        self.image_size = image_size
        self.load_clip = ClipFrames(image_size, mean, std)
        self.labels = np.array([c.labels for c in self.records], dtype=np.int64).reshape(-1, num_labels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        clip = self.records[i]
        return {
            "pixel_values": self.load_clip(clip.frame_paths),
            "labels": torch.tensor(clip.labels, dtype=torch.float32),
            "index": int(i),
            "sample_id": clip.sample_id,
        }


@dataclass
class ClipManifest:
    """The clips of a manifest file and the names of their labels.

    Attributes:
        path: The manifest file, named in errors.
        label_names: Names of the labels, in the order of each clip's ``labels``.
        clips: Clips in file order.
    """

    path: Path
    label_names: tuple[str, ...]
    clips: list[ProbeClip]

    def by_split(self) -> dict[str, list[ProbeClip]]:
        """Return split name → its clips in file order, splits in order of first appearance."""
        result: dict[str, list[ProbeClip]] = {}
        for clip in self.clips:
            result.setdefault(clip.split, []).append(clip)
        return result

    def split(self, name: str) -> list[ProbeClip]:
        """Return the clips of one split, in file order.

        Raises:
            DataError: The split has no clips (a probe cannot fit or score on it).
        """
        clips = [c for c in self.clips if c.split == name]
        if not clips:
            present = ", ".join(f"{s} ({len(c)} clips)" for s, c in self.by_split().items()) or "none"
            raise DataError(f"{self.path}: split {name!r} has no clips (splits in the manifest: {present})")
        return clips

    def groups_by_split(self) -> dict[str, set[str]]:
        """Return split name → the group keys of its clips."""
        return {split: {c.group for c in clips} for split, clips in self.by_split().items()}

    def label_matrix(self, split: str | None = None) -> np.ndarray:
        """Return the (N, len(label_names)) int64 label matrix of one split's clips, or of all clips."""
        clips = self.clips if split is None else self.split(split)
        return np.array([c.labels for c in clips], dtype=np.int64).reshape(-1, len(self.label_names))

    def manifest_hash(self, split: str | None = None) -> str:
        """Return ``manifest_hash`` of one split's clips, or of all clips (sample ids and frame contents).

        For a manifest of CVS clips whose sample ids are the clip ids, this equals ``manifest_hash`` of the same
        ``ClipRecord`` list.
        """
        return manifest_hash(self.clips if split is None else self.split(split))

    def label_checksum(self, split: str | None = None) -> str:
        """Return ``label_checksum`` of the label matrix of one split's clips, or of all clips."""
        return label_checksum(self.label_matrix(split))

    def dataset(self, split: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> ProbeClipDataset:
        """Return the ``ProbeClipDataset`` of one split's clips.

        Args:
            split: Split to serve; it must have clips.
            image_size: Side of the square frames.
            mean: Per-channel mean of the pixel values in [0, 1].
            std: Per-channel standard deviation.
        """
        return ProbeClipDataset(self.split(split), len(self.label_names), image_size, mean, std)


def load_clip_manifest(
    path: str | os.PathLike,
    *,
    clip_frames: int | None = None,
    label_names: Sequence[str] | None = None,
    required_splits: Sequence[str] = (),
) -> ClipManifest:
    """Read a clip manifest in one of the forms of this module's docstring (``.csv`` or ``.json``).

    Args:
        path: Manifest file; its suffix (``.csv`` or ``.json``) says how to read it.
        clip_frames: Frames kept per clip, evenly spaced from its first frame to its last (see
            ``evenly_spaced_indices``); None keeps all of them.
        label_names: Labels expected, in the order wanted. Required for a ``labels`` column of present names
            unless the JSON declares them; otherwise the file's labels must be exactly these.
        required_splits: Splits that must have at least one clip (e.g. ``("train", "val")`` for a probe).

    Returns:
        The manifest's clips in file order, their frames resolved to absolute paths, and the label names.

    Raises:
        DataError: Missing, unreadable or malformed file (the message names the file, the line or clip, and the
            column or key): a missing column, an empty field, a duplicate sample_id, a label value other than
            0 or 1, an unknown or missing label, frames that do not exist or fewer than ``clip_frames``, kept
            frames that do not decode (each decoded once, see ``avlm.data.integrity``), no clips, or an empty
            required split.
        ConfigError: ``label_names`` is empty, repeats a name, or has a name with ``;``.
        ValueError: ``clip_frames`` is below 1.
    """
    if clip_frames is not None and clip_frames < 1:
        raise ValueError(f"clip_frames must be positive (or None for all frames), got {clip_frames}")
    if label_names is not None:
        label_names = _check_label_names(label_names, "label_names", ConfigError)
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"clip manifest {path} does not exist")
    path = path.resolve()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        rows, vocabulary = _read_csv(path, label_names)
    elif suffix == ".json":
        rows, vocabulary = _read_json(path, label_names)
    else:
        raise DataError(f"clip manifest {path}: unknown file type {path.suffix!r}; use a .csv or .json file")
    if not rows:
        raise DataError(f"clip manifest {path} has no clips")

    clips, frame_problems = [], []
    first_seen: dict[str, str] = {}
    uses: dict[str, str] = {}
    for row in rows:
        sample_id, split, group = (_text_field(row, key, path) for key in ("sample_id", "split", "group"))
        if sample_id in first_seen:
            raise DataError(f"{path}, {row.where}: sample_id {sample_id!r} is also at {first_seen[sample_id]}")
        first_seen[sample_id] = row.where
        labels = _row_labels(row, vocabulary, path)
        frame_paths, problem = _row_frames(row, path, clip_frames)
        if problem is not None:
            frame_problems.append(f"{row.where} (sample_id {sample_id!r}): {problem}")
        for frame in frame_paths:
            uses.setdefault(frame, f"{row.where} (sample_id {sample_id!r}, split {split!r})")
        clips.append(ProbeClip(sample_id, frame_paths, labels, group, split))
    if frame_problems:
        named = "; ".join(frame_problems[:_NAMED_IN_ERROR])
        more = f"; and {len(frame_problems) - _NAMED_IN_ERROR} more" if len(frame_problems) > _NAMED_IN_ERROR else ""
        raise DataError(
            f"{path}: {len(frame_problems)} of {len(rows)} clips have missing or too few frames "
            f"(relative paths are read from {path.parent}): {named}{more}"
        )
    verify_frames(uses, f"clip manifest {path}")

    manifest = ClipManifest(path=path, label_names=vocabulary, clips=clips)
    for split in (required_splits,) if isinstance(required_splits, str) else required_splits:
        manifest.split(split)
    _log_summary(manifest)
    _warn_shared_groups(manifest)
    return manifest


def group_overlap(manifest: ClipManifest, a: str = "train", b: str = "val") -> dict:
    """Report the group keys that have clips in both splits ``a`` and ``b``, and those clips.

    Never raises: a split absent from the manifest shares nothing. The hygiene check decides what to do.

    Args:
        manifest: Manifest to check.
        a: First split.
        b: Second split.

    Returns:
        ``{"splits": [a, b], "groups": sorted shared group keys, "sample_ids": {a: [...], b: [...]}}``, the
        sample ids being those of the clips of shared groups in each split, in file order; empty lists when
        the splits share no group.
    """
    groups = manifest.groups_by_split()
    shared = groups.get(a, set()) & groups.get(b, set())
    return {
        "splits": [a, b],
        "groups": sorted(shared, key=_natural_key),
        "sample_ids": {
            split: [c.sample_id for c in manifest.clips if c.split == split and c.group in shared] for split in (a, b)
        },
    }


def write_cvs_demo_manifest(
    root: str | os.PathLike | None, out_path: str | os.PathLike, *, seed: int = 0, image_size: int = 32
) -> Path:
    """Write the built-in CVS demo data as a clip manifest CSV, so the probe's demo runs through the generic reader.

    The demo is generated once (``ensure_cvs_demo``) and read with ``load_endoscapes(clip_frames=4)``; each of its
    clips becomes a row with ``sample_id`` = its clip id, ``group`` = its video id, its split, its 4 frames as a
    ``;``-separated list and the binarised criteria as ``label:C1``, ``label:C2``, ``label:C3``. Frames under the
    manifest's folder are written relative to it, others as absolute paths.

    Args:
        root: Cache folder of the demo data; None = ``$AVLM_CACHE_DIR`` or ``~/.cache/avlm``.
        out_path: CSV file to write (its folder is created); replaced atomically if it exists.
        seed: Seed of the demo generator.
        image_size: Side of the demo frames.

    Returns:
        ``out_path``.
    """
    records = load_endoscapes(ensure_cvs_demo(root, seed=seed, image_size=image_size), clip_frames=4)
    out_path = Path(out_path).expanduser()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    base = out_path.parent.resolve()

    def written(frame: str) -> str:
        return os.path.relpath(frame, base) if Path(frame).is_relative_to(base) else frame

    header = [*REQUIRED_FIELDS, *(f"{LABEL_PREFIX}{name}" for name in CVS_CRITERIA)]
    # A temporary file renamed into place: a concurrent reader never sees half a manifest.
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            for split, split_records in records.items():
                for r in split_records:
                    frames = LIST_SEPARATOR.join(written(p) for p in r.frame_paths)
                    writer.writerow([r.clip_id, split, str(r.video_id), frames, *r.labels])
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


# ----------------------------------------------------------------------------------------------------------------
# Reading the two file types into rows of fields
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Row:
    """The raw fields of one clip, with where it is in the file (``line 7`` or ``clips[3]``) for messages."""

    where: str
    fields: dict[str, object]
    field_kind: str  # "column" or "key"

    def name(self, field: str) -> str:
        return f"{self.field_kind} {field!r}"


def _read_csv(path: Path, label_names: tuple[str, ...] | None) -> tuple[list[_Row], tuple[str, ...]]:
    rows = []
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would stick to the first column name.
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            vocabulary = _check_csv_header(header, path, label_names)
            line = reader.line_num + 1
            for fields in reader:
                # A quoted field may span lines: the row starts on the line after the previous row ended.
                start, line = line, reader.line_num + 1
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"{path}, line {start}: row has {len(fields)} fields but the header has {len(header)} "
                        f"(a frame list or label list with an unquoted comma? separate them with ';')"
                    )
                rows.append(_Row(f"line {start}", dict(zip(header, fields, strict=True)), "column"))
    except UnicodeDecodeError as exc:
        raise DataError(f"clip manifest {path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"clip manifest {path}, line {reader.line_num}: malformed csv: {exc}") from exc
    return rows, vocabulary


def _check_csv_header(header: list[str], path: Path, label_names: tuple[str, ...] | None) -> tuple[str, ...]:
    """Check the header's columns and return the label names, in the order wanted."""
    expected = f"expected {', '.join(REQUIRED_FIELDS)} and {LABEL_PREFIX}<name> columns or a labels column"
    if not any(header):
        raise DataError(f"{path}, line 1: no header ({expected})")
    repeated = sorted({name for name in header if header.count(name) > 1})
    if repeated:
        raise DataError(f"{path}, line 1: column(s) {repeated} appear more than once")
    missing = [name for name in REQUIRED_FIELDS if name not in header]
    if missing:
        raise DataError(f"{path}, line 1: missing column(s) {missing} in header {header} ({expected})")
    column_labels = [name[len(LABEL_PREFIX) :] for name in header if name.startswith(LABEL_PREFIX)]
    if column_labels and "labels" in header:
        raise DataError(f"{path}, line 1: has both {LABEL_PREFIX}<name> columns and a labels column; keep one form")
    if column_labels:
        declared = _check_label_names(column_labels, f"{path}, line 1: the {LABEL_PREFIX}<name> columns", DataError)
        return _match_label_names(declared, label_names, f"{path}, line 1", LABEL_PREFIX)
    if "labels" not in header:
        raise DataError(f"{path}, line 1: no label columns in header {header} ({expected})")
    if label_names is None:
        raise DataError(
            f"{path}: a labels column lists the labels present, so the label names cannot be read off it; pass "
            f"label_names (all labels, in order) or use one {LABEL_PREFIX}<name> column per label"
        )
    return label_names


def _read_json(path: Path, label_names: tuple[str, ...] | None) -> tuple[list[_Row], tuple[str, ...]]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"clip manifest {path} is not valid JSON: {exc}") from exc
    declared = None
    if isinstance(data, dict):
        unknown = sorted(set(data) - {"labels", "clips"})
        if unknown or "clips" not in data:
            raise DataError(
                f"{path}: a JSON object manifest has the keys 'clips' (a list of clips) and optionally 'labels' "
                f"(the label names); got keys {sorted(data)}"
            )
        if "labels" in data:
            if not isinstance(data["labels"], list) or not all(isinstance(n, str) for n in data["labels"]):
                raise DataError(f"{path}: top-level 'labels' must be a list of label names, got {data['labels']!r}")
            declared = _check_label_names(data["labels"], f"{path}: top-level 'labels'", DataError)
        data = data["clips"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of clips or an object with 'clips', got {type(data).__name__}")
    rows = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{path}, clips[{index}]: expected an object, got {entry!r}")
        missing = [key for key in REQUIRED_FIELDS if key not in entry]
        if missing:
            raise DataError(f"{path}, clips[{index}]: missing key(s) {missing} (has {sorted(entry)})")
        rows.append(_Row(f"clips[{index}]", entry, "key"))
    if declared is None and rows:
        declared = _first_clip_label_names(rows[0], path)
    if declared is None:
        if label_names is None:
            if rows and not isinstance(rows[0].fields.get("labels"), (list, str)):
                # Neither a list of present names nor a full set of labels: malformed, so name its fault instead.
                _row_labels(rows[0], (), path)
            raise DataError(
                f"{path}: clips list the labels present, so the label names cannot be read off them; pass "
                'label_names, declare them as {"labels": [...], "clips": [...]}, or give each clip every label as '
                "{name: 0 or 1}"
            )
        return rows, label_names
    return rows, _match_label_names(declared, label_names, f"{path}", "")


def _first_clip_label_names(row: _Row, path: Path) -> tuple[str, ...] | None:
    """Label names of a clip that gives every label (``label:<name>`` keys or a ``labels`` object), else None."""
    keys = [key[len(LABEL_PREFIX) :] for key in row.fields if key.startswith(LABEL_PREFIX)]
    if not keys and isinstance(row.fields.get("labels"), dict):
        keys = list(row.fields["labels"])
    return _check_label_names(keys, f"{path}, {row.where}: the label keys", DataError) if keys else None


# ----------------------------------------------------------------------------------------------------------------
# Checking the fields of one row
# ----------------------------------------------------------------------------------------------------------------
def _check_label_names(names: Sequence[str], what: str, error: type[Exception]) -> tuple[str, ...]:
    names = tuple(str(n).strip() for n in names)
    if not names:
        raise error(f"{what}: no label names")
    bad = [n for n in names if not n or LIST_SEPARATOR in n]
    if bad:
        raise error(f"{what}: label names must be non-empty and without {LIST_SEPARATOR!r}, got {bad}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise error(f"{what}: label name(s) {repeated} appear more than once")
    return names


def _match_label_names(
    declared: tuple[str, ...], wanted: tuple[str, ...] | None, where: str, prefix: str
) -> tuple[str, ...]:
    """Return the label names in the order wanted, after checking that the file declares exactly those."""
    if wanted is None:
        return declared
    unknown = [f"{prefix}{n}" for n in declared if n not in wanted]
    if unknown:
        raise DataError(f"{where}: unknown label(s) {unknown}, not in label_names {list(wanted)}")
    missing = [f"{prefix}{n}" for n in wanted if n not in declared]
    if missing:
        raise DataError(f"{where}: label(s) {missing} of label_names are missing")
    return wanted


def _text_field(row: _Row, key: str, path: Path) -> str:
    value = row.fields[key]
    # JSON ids are often numbers (a video id); they name the same thing as their text.
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{path}, {row.where}, {row.name(key)}: expected a non-empty text, got {value!r}")
    return value.strip()


def _row_labels(row: _Row, vocabulary: tuple[str, ...], path: Path) -> tuple[float, ...]:
    """Return the row's labels in ``vocabulary`` order, from whichever label form it uses."""
    fields = row.fields
    columns = [key for key in fields if key.startswith(LABEL_PREFIX)]
    if columns and "labels" in fields:
        raise DataError(f"{path}, {row.where}: has both {LABEL_PREFIX}<name> and 'labels' {row.field_kind}s")
    if columns:
        values = {key[len(LABEL_PREFIX) :]: (fields[key], row.name(key)) for key in columns}
        return _label_values(values, vocabulary, f"{path}, {row.where}", LABEL_PREFIX)
    if "labels" not in fields:
        raise DataError(f"{path}, {row.where}: no labels ({LABEL_PREFIX}<name> {row.field_kind}s or 'labels')")
    value = fields["labels"]
    where = f"{path}, {row.where}, {row.name('labels')}"
    if isinstance(value, dict):
        values = {str(name): (v, f"{row.name('labels')} ({name!r})") for name, v in value.items()}
        return _label_values(values, vocabulary, f"{path}, {row.where}", "")
    if isinstance(value, str):
        present = [name.strip() for name in value.split(LIST_SEPARATOR) if name.strip()]
    elif isinstance(value, list) and all(isinstance(name, str) for name in value):
        present = [name.strip() for name in value]
    else:
        raise DataError(f"{where}: expected the names of the labels present, got {value!r}")
    unknown = [name for name in present if name not in vocabulary]
    if unknown:
        raise DataError(f"{where}: unknown label(s) {unknown} (labels: {', '.join(vocabulary)})")
    return tuple(1.0 if name in present else 0.0 for name in vocabulary)


def _label_values(
    values: dict[str, tuple[object, str]], vocabulary: tuple[str, ...], where: str, prefix: str
) -> tuple[float, ...]:
    """Return the 0/1 values of ``{label: (raw value, field description)}``, which must hold every label."""
    unknown = [f"{prefix}{name}" for name in values if name not in vocabulary]
    if unknown:
        raise DataError(f"{where}: unknown label(s) {unknown} (labels: {', '.join(vocabulary)})")
    missing = [f"{prefix}{name}" for name in vocabulary if name not in values]
    if missing:
        raise DataError(f"{where}: missing label(s) {missing}")
    return tuple(_binary_value(*values[name], where) for name in vocabulary)


def _binary_value(value: object, field: str, where: str) -> float:
    number = math.nan
    if isinstance(value, bool):
        number = float(value)
    elif isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str) and value.strip():
        try:
            number = float(value.strip())
        except ValueError:
            pass
    if number not in (0.0, 1.0):
        raise DataError(f"{where}, {field}: value {value!r} is not 0 or 1 (labels are binary)")
    return number


def _row_frames(row: _Row, path: Path, clip_frames: int | None) -> tuple[tuple[str, ...], str | None]:
    """Return the row's frame paths, or () and why its frames cannot be used (a missing file is not malformed).

    Raises:
        DataError: The frames field is empty, of the wrong type, or names a video file.
    """
    value = row.fields["frames"]
    where = f"{path}, {row.where}, {row.name('frames')}"
    if isinstance(value, str):
        entries = [p.strip() for p in value.split(LIST_SEPARATOR) if p.strip()]
        # One entry may be a folder or a glob; several are frame files.
        expand = len(entries) == 1
    elif isinstance(value, list) and all(isinstance(p, str) for p in value):
        entries, expand = [p.strip() for p in value if p.strip()], False
    else:
        raise DataError(f"{where}: expected a folder, a glob or a list of frame files, got {value!r}")
    if not entries:
        raise DataError(f"{where}: empty (expected a folder, a glob or a list of frame files)")
    videos = [p for p in entries if p.lower().endswith(VIDEO_EXTENSIONS)]
    if videos:
        raise DataError(f"{where}: {videos[0]!r} is a video file; decode it to image frames and list those")
    resolved = [os.path.normpath(os.path.join(path.parent, p)) for p in entries]

    if expand and _GLOB_CHARACTERS.search(entries[0]):
        frames = _image_files(p for p in glob.glob(resolved[0]) if os.path.isfile(p))
        if not frames:
            return (), f"glob {entries[0]!r} matches no image files ({', '.join(IMAGE_EXTENSIONS)})"
    elif expand and os.path.isdir(resolved[0]):
        with os.scandir(resolved[0]) as listing:
            frames = _image_files(e.path for e in listing if e.is_file() and not e.name.startswith("."))
        if not frames:
            return (), f"folder {entries[0]!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
    else:
        absent = [entry for entry, p in zip(entries, resolved, strict=True) if not os.path.isfile(p)]
        if len(entries) == 1 and absent:
            return (), f"{entries[0]!r} does not exist"
        if absent:
            return (), f"{len(absent)} of {len(entries)} frames do not exist, e.g. {absent[0]!r}"
        frames = resolved

    if clip_frames is None:
        return tuple(frames), None
    if len(frames) < clip_frames:
        return (), f"{len(frames)} frames, fewer than clip_frames={clip_frames}"
    return tuple(frames[k] for k in evenly_spaced_indices(len(frames), clip_frames)), None


def _image_files(paths) -> list[str]:
    return sorted((p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)), key=_natural_key)


def _natural_key(text: str) -> list:
    """Sort key that compares digit runs as numbers, so frame 2 comes before frame 10 without zero padding."""
    return [(0, int(part), part) if part.isdigit() else (1, 0, part) for part in _DIGITS.split(text)]


def _log_summary(manifest: ClipManifest) -> None:
    for split, clips in manifest.by_split().items():
        n = len(clips)
        rates = ", ".join(
            f"{name} {sum(c.labels[k] for c in clips) / n:.1%}" for k, name in enumerate(manifest.label_names)
        )
        logger.info(
            "clip manifest %s, %s: %d clips, %d groups, positive rate %s",
            manifest.path.name,
            split,
            n,
            len({c.group for c in clips}),
            rates,
        )


def _warn_shared_groups(manifest: ClipManifest) -> None:
    """Name split pairs that share groups: kept (the hygiene check reports them via ``group_overlap``), not hidden."""
    splits = list(manifest.by_split())
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            shared = group_overlap(manifest, a, b)["groups"]
            if shared:
                named = ", ".join(repr(g) for g in shared[:_NAMED_IN_ERROR])
                more = f" and {len(shared) - _NAMED_IN_ERROR} more" if len(shared) > _NAMED_IN_ERROR else ""
                logger.warning(
                    "clip manifest %s: %d group(s) have clips in both %s and %s: %s%s",
                    manifest.path,
                    len(shared),
                    a,
                    b,
                    named,
                    more,
                )
