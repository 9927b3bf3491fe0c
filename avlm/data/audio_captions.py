"""Readers for AudioCaps and Clotho v2.1 (see shared/formats/README.md), waveform loading, and a caption Dataset.

Accepted layouts::

    audiocaps/                                   load_audiocaps(root)
      train.csv val.csv test.csv                 header audiocap_id,youtube_id,start_time,caption
      audio/train/<youtube_id>.wav               one 10 s clip per YouTube id, .wav or .flac, named by
      audio/val/<audiocap_id>.flac               youtube_id or by any audiocap_id of its rows
      audio/test/...

    clotho/                                      load_clotho(root)
      clotho_captions_development.csv            header file_name,caption_1,...,caption_5
      clotho_captions_validation.csv
      clotho_captions_evaluation.csv
      clotho_audio_development/<file_name>       the file named in the csv, as is
      clotho_audio_validation/<file_name>
      clotho_audio_evaluation/<file_name>

AudioCaps rows are grouped into clips by ``youtube_id`` (train: 1 caption per clip; val/test: 5), in the csv's
order. Real copies miss audio (deleted YouTube videos, failed downloads): missing or unreadable files are named
in one warning per split and skipped, and a split missing more than ``max_missing_fraction`` of its clips is an
error. Captions are kept as written (only surrounding whitespace is stripped); normalising case and punctuation
is the tokenizer's and the metric's job. Clotho file names are kept verbatim, surrounding spaces included: some
official names begin with a space (``' clip.wav'``), so the missing-audio messages quote clip names.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile
import torch
from scipy.signal import resample_poly

from avlm.data.integrity import audio_problems, content_digests
from avlm.errors import DataError

logger = logging.getLogger(__name__)

AUDIOCAPS_SPLITS: tuple[str, ...] = ("train", "val", "test")
CLOTHO_SPLITS: tuple[str, ...] = ("development", "validation", "evaluation")
CLOTHO_CAPTION_COLUMNS: tuple[str, ...] = tuple(f"caption_{k}" for k in range(1, 6))
AUDIOCAPS_COLUMNS: tuple[str, ...] = ("audiocap_id", "youtube_id", "start_time", "caption")
# In order of preference when a clip has several files.
AUDIO_EXTENSIONS: tuple[str, ...] = (".wav", ".flac")
_NAMED_IN_WARNING = 5


@dataclass(frozen=True)
class AudioCaptionRecord:
    """One audio clip and its reference captions.

    Attributes:
        clip_id: AudioCaps ``youtube_id``, or the Clotho ``file_name``.
        audio_path: Absolute path of the audio file.
        captions: Reference captions in file order (1 for AudioCaps train, 5 otherwise).
        split: Split the clip was read from.
    """

    clip_id: str
    audio_path: str
    captions: tuple[str, ...]
    split: str


def load_audiocaps(
    root: str | os.PathLike,
    splits: Sequence[str] = AUDIOCAPS_SPLITS,
    *,
    max_missing_fraction: float = 0.2,
    verify_audio: bool = True,
) -> dict[str, list[AudioCaptionRecord]]:
    """Read the clips of an AudioCaps copy whose audio is on disk.

    Args:
        root: Folder holding ``<split>.csv`` and ``audio/<split>/``.
        splits: Splits to read.
        max_missing_fraction: Largest fraction of a split's clips that may lack readable audio.
        verify_audio: Decode each file whole (``avlm.data.integrity.audio_problems``; a file decoded once is not
            decoded again while unchanged), so empty, non-audio, corrupt or NaN-holding downloads count as missing
            now rather than failing the feature cache or the training. Off: only existence is checked.

    Returns:
        Split name → records in the csv's order of first appearance. A clip's file is
        ``audio/<split>/<youtube_id>.wav``, else ``.flac``, else the same named by its audiocap_ids in row order.

    Raises:
        DataError: Missing folder or csv, malformed csv row, a youtube_id listed with two start times, or more
            than ``max_missing_fraction`` of a split's clips without readable audio.
    """
    root = _check_root(root, "AudioCaps", "<split>.csv files and audio/<split>/ folders")
    _check_fraction(max_missing_fraction)
    result = {}
    for split in (splits,) if isinstance(splits, str) else splits:
        csv_path = root / f"{split}.csv"
        audio_dir = root / "audio" / split
        clips: dict[str, dict] = {}
        for line, row in _read_caption_csv(csv_path, AUDIOCAPS_COLUMNS, hint=f"splits are {AUDIOCAPS_SPLITS}"):
            _check_start_time(row["start_time"], csv_path, line)
            clip = clips.setdefault(
                row["youtube_id"], {"line": line, "start": row["start_time"], "names": [], "captions": []}
            )
            if float(clip["start"]) != float(row["start_time"]):
                raise DataError(
                    f"{csv_path}, line {line}: youtube_id {row['youtube_id']!r} has start_time {row['start_time']} "
                    f"but {clip['start']} on line {clip['line']}; one audio file cannot hold both clips"
                )
            clip["names"].append(row["audiocap_id"])
            clip["captions"].append(row["caption"])
        files = _index_audio(audio_dir)
        entries = []
        for youtube_id, clip in clips.items():
            path = next((files[n] for n in (youtube_id, *clip["names"]) if n in files), None)
            entries.append((youtube_id, path, tuple(clip["captions"])))
        expected = "files named <youtube_id> or <audiocap_id> with extension " + " or ".join(AUDIO_EXTENSIONS)
        result[split] = _keep_readable(
            entries, split, audio_dir, f"AudioCaps {split}", expected, max_missing_fraction, verify_audio
        )
    _warn_shared_clips("AudioCaps", result)
    return result


def load_clotho(
    root: str | os.PathLike,
    splits: Sequence[str] = CLOTHO_SPLITS,
    *,
    max_missing_fraction: float = 0.2,
    verify_audio: bool = True,
) -> dict[str, list[AudioCaptionRecord]]:
    """Read the clips of a Clotho v2.1 copy (or of the built-in demo, which uses the same layout).

    Args:
        root: Folder holding ``clotho_captions_<split>.csv`` and ``clotho_audio_<split>/``.
        splits: Splits to read.
        max_missing_fraction: Largest fraction of a split's clips that may lack readable audio.
        verify_audio: Decode each file whole (see ``load_audiocaps``).

    Returns:
        Split name → records in csv order, each with its 5 captions in column order.

    Raises:
        DataError: Missing folder or csv, malformed csv row, a file_name listed twice, or more than
            ``max_missing_fraction`` of a split's clips without readable audio.
    """
    root = _check_root(root, "Clotho", "clotho_captions_<split>.csv files and clotho_audio_<split>/ folders")
    _check_fraction(max_missing_fraction)
    result = {}
    for split in (splits,) if isinstance(splits, str) else splits:
        csv_path = root / f"clotho_captions_{split}.csv"
        audio_dir = root / f"clotho_audio_{split}"
        rows = _read_caption_csv(
            csv_path,
            ("file_name", *CLOTHO_CAPTION_COLUMNS),
            hint=f"splits are {CLOTHO_SPLITS}",
            verbatim=("file_name",),  # the name on disk, leading space and all
        )
        first_line: dict[str, int] = {}
        for line, row in rows:
            if row["file_name"] in first_line:
                raise DataError(
                    f"{csv_path}, line {line}: file_name {row['file_name']!r} is also on line "
                    f"{first_line[row['file_name']]}"
                )
            first_line[row["file_name"]] = line
        on_disk = set(os.listdir(audio_dir)) if audio_dir.is_dir() else set()
        entries = [
            (
                row["file_name"],
                str(audio_dir / row["file_name"]) if row["file_name"] in on_disk else None,
                tuple(row[c] for c in CLOTHO_CAPTION_COLUMNS),
            )
            for _, row in rows
        ]
        expected = f"the file_name values of {csv_path.name}"
        result[split] = _keep_readable(
            entries, split, audio_dir, f"Clotho {split}", expected, max_missing_fraction, verify_audio
        )
    _warn_shared_clips("Clotho", result)
    return result


def load_audio(path: str | os.PathLike, sample_rate: int, num_samples: int | None = None) -> np.ndarray:
    """Read an audio file as a mono waveform at ``sample_rate``, optionally of a fixed length.

    Channels are averaged (so a stereo copy of a mono recording is unchanged). A file at another rate is
    resampled with a polyphase filter by the exact rational factor ``sample_rate / file_rate``
    (``scipy.signal.resample_poly``), so 44.1 kHz → 16 kHz is 160/441 with no drift in length or pitch. Values are
    not renormalised: encoders' feature extractors do that. With ``num_samples``, the waveform is cut after its
    first ``num_samples`` samples or padded with zeros at the end.

    Args:
        path: A wav, flac or any other file libsndfile reads.
        sample_rate: Rate of the returned waveform in Hz (the encoder's rate).
        num_samples: Length of the returned waveform; None keeps the (resampled) file length.

    Returns:
        float32 array of shape (num_samples,), or (ceil(frames * sample_rate / file_rate),) without
        ``num_samples``.

    Raises:
        DataError: The file is missing, unreadable or corrupt, has no samples, or holds non-finite values.
    """
    if sample_rate < 1 or (num_samples is not None and num_samples < 1):
        raise ValueError(f"sample_rate and num_samples must be positive, got {sample_rate} and {num_samples}")
    try:
        data, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, OSError, ValueError, TypeError) as exc:
        raise DataError(f"cannot read audio {path}: {exc}") from exc
    if data.shape[0] == 0:
        raise DataError(f"audio file {path} has no samples")
    if not np.isfinite(data).all():
        raise DataError(f"audio file {path} holds NaN or infinite samples")
    waveform = data.mean(axis=1)
    if file_rate != sample_rate:
        common = math.gcd(int(file_rate), int(sample_rate))
        waveform = resample_poly(waveform, sample_rate // common, int(file_rate) // common)
    if num_samples is not None:
        waveform = waveform[:num_samples]
        if len(waveform) < num_samples:
            waveform = np.pad(waveform, (0, num_samples - len(waveform)))
    return np.ascontiguousarray(waveform, dtype=np.float32)


class AudioCaptionDataset(torch.utils.data.Dataset):
    """Fixed-length mono waveforms with their captions, one item per clip or per (clip, caption) pair.

    The ``"clips"`` view serves each clip once with all its references (evaluation, or a CIDEr reward); the
    ``"pairs"`` view serves each (clip, caption) pair as a sample (teacher-forced training), so a clip with 5
    references is seen 5 times per epoch. Items are deterministic per index: feature caches key on them.

    Args:
        records: Clips to serve, in order.
        sample_rate: Rate the encoder expects, in Hz.
        num_samples: Waveform length in samples (e.g. 10 s × 16 kHz = 160,000).
        view: ``"clips"`` or ``"pairs"``.

    Items are dicts with ``clip_id`` (str), ``waveform`` (float32 tensor [num_samples]), ``captions`` (list of all
    the clip's references), ``index`` (int) and, in the pairs view, ``caption`` (the pair's caption).
    """

    VIEWS = ("clips", "pairs")

    def __init__(self, records: Sequence[AudioCaptionRecord], sample_rate: int, num_samples: int, view: str = "clips"):
        if view not in self.VIEWS:
            raise ValueError(f"view must be one of {self.VIEWS}, got {view!r}")
        if sample_rate < 1 or num_samples < 1:
            raise ValueError(f"sample_rate and num_samples must be positive, got {sample_rate} and {num_samples}")
        self.records = list(records)
        self.sample_rate = sample_rate
        self.num_samples = num_samples
        self.view = view
        # (record index, caption index); caption index -1 in the clips view.
        if view == "pairs":
            self._items = [(r, c) for r, record in enumerate(self.records) for c in range(len(record.captions))]
        else:
            self._items = [(r, -1) for r in range(len(self.records))]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> dict:
        record_index, caption_index = self._items[i]
        record = self.records[record_index]
        waveform = load_audio(record.audio_path, self.sample_rate, self.num_samples)
        item = {
            "clip_id": record.clip_id,
            "waveform": torch.from_numpy(waveform),
            "captions": list(record.captions),
            "index": int(i),
        }
        if caption_index >= 0:
            item["caption"] = record.captions[caption_index]
        return item


def collate_audio_captions(items: Sequence[dict]) -> dict:
    """Batch ``AudioCaptionDataset`` items: waveforms stacked to [B, num_samples], text kept as lists.

    torch's default collate would transpose the per-clip caption lists, and fails when clips have different
    numbers of references.
    """
    batch = {
        "clip_id": [item["clip_id"] for item in items],
        "waveform": torch.stack([item["waveform"] for item in items]),
        "captions": [item["captions"] for item in items],
        "index": torch.tensor([item["index"] for item in items], dtype=torch.long),
    }
    if items and "caption" in items[0]:
        batch["caption"] = [item["caption"] for item in items]
    return batch


def audio_manifest_hash(records: Sequence[AudioCaptionRecord]) -> str:
    """Return a sha256 hex digest of the clip ids and the content of their audio files, in order.

    Each file counts by the sha256 of its bytes (``content_digests``: read once, then remembered while its size,
    mtime and ctime are unchanged), so a replaced or re-encoded file changes the hash although its name does not,
    and the same data gives the same hash in any folder and on any machine; clips skipped for missing audio
    change it.

    Raises:
        DataError: An audio file is missing or unreadable.
    """
    contents = content_digests(record.audio_path for record in records)
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.clip_id, contents[record.audio_path]]).encode("utf-8") + b"\n")
    return digest.hexdigest()


def caption_reference_hash(records: Sequence[AudioCaptionRecord]) -> str:
    """Return a sha256 hex digest of each clip id with its reference captions, in order.

    Caption metrics are comparable between runs only when this matches.
    """
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record.clip_id, list(record.captions)], ensure_ascii=False).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _check_root(root: str | os.PathLike, dataset: str, expected: str) -> Path:
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DataError(
            f"{dataset} data folder {path} does not exist. Point data_dir at a {dataset} copy (with {expected}), "
            f"or leave data_dir unset to use the built-in demo data."
        )
    return path.resolve()


def _check_fraction(max_missing_fraction: float) -> None:
    if not 0.0 <= max_missing_fraction <= 1.0:
        raise ValueError(f"max_missing_fraction must be in [0, 1], got {max_missing_fraction}")


def _check_start_time(text: str, csv_path: Path, line: int) -> None:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise DataError(f"{csv_path}, line {line}: start_time must be a number of seconds >= 0, got {text!r}")


def read_csv_rows(
    csv_path: Path,
    hint: str,
    check_header: Callable[[list[str]], Any] | None = None,
    *,
    verbatim: Collection[str] = (),
) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and (first line number, fields) of every data row of a caption CSV.

    ``check_header`` runs on the header before any row is read. Fields are stripped of surrounding whitespace,
    except in the columns named in ``verbatim`` (file names, which may begin with a space). Rows whose field count
    differs from the header's, text that is not UTF-8, malformed CSV and a file without data rows are DataErrors
    naming the file (and line). A quoted caption may span lines: a row's line number is where it starts.
    """
    if not csv_path.is_file():
        raise DataError(f"caption file {csv_path} does not exist ({hint})")
    rows = []
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would stick to the first column name.
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            header = [name.strip() for name in next(reader, [])]
            if check_header is not None:
                check_header(header)
            kept = [name in verbatim for name in header]
            line = reader.line_num + 1
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise DataError(
                        f"{csv_path}, line {start}: row has {len(fields)} fields but the header has {len(header)} "
                        f"(a caption with an unquoted comma?)"
                    )
                rows.append(
                    (start, [field if keep else field.strip() for field, keep in zip(fields, kept, strict=True)])
                )
    except UnicodeDecodeError as exc:
        raise DataError(f"caption file {csv_path} is not UTF-8 text: {exc}") from exc
    except csv.Error as exc:
        raise DataError(f"caption file {csv_path}, line {reader.line_num}: malformed csv: {exc}") from exc
    if not rows:
        raise DataError(f"caption file {csv_path} has no caption rows")
    return header, rows


def _read_caption_csv(
    csv_path: Path, columns: Sequence[str], hint: str, verbatim: Collection[str] = ()
) -> list[tuple[int, dict[str, str]]]:
    """Return (first line number, row) for each data row, with every required column present and not blank; the
    ``verbatim`` columns keep their surrounding whitespace."""

    def check_header(header: list[str]) -> None:
        missing = [c for c in columns if c not in header]
        if missing:
            raise DataError(f"{csv_path}: header {header} lacks column(s) {missing}; expected {list(columns)}")

    header, rows = read_csv_rows(csv_path, hint, check_header, verbatim=verbatim)
    position = {c: header.index(c) for c in columns}
    result = []
    for start, fields in rows:
        row = {c: fields[position[c]] for c in columns}
        empty = [c for c in columns if not row[c].strip()]
        if empty:
            raise DataError(f"{csv_path}, line {start}: empty {', '.join(empty)}")
        result.append((start, row))
    return result


def _index_audio(audio_dir: Path) -> dict[str, str]:
    """Map file stem → path of the audio files in one directory listing, preferring AUDIO_EXTENSIONS' order."""
    if not audio_dir.is_dir():
        return {}
    by_stem: dict[str, tuple[int, str]] = {}
    with os.scandir(audio_dir) as entries:
        for entry in entries:
            stem, extension = os.path.splitext(entry.name)
            rank = AUDIO_EXTENSIONS.index(extension.lower()) if extension.lower() in AUDIO_EXTENSIONS else -1
            if rank >= 0 and (stem not in by_stem or rank < by_stem[stem][0]):
                by_stem[stem] = (rank, str(audio_dir / entry.name))
    return {stem: path for stem, (_, path) in by_stem.items()}


def _keep_readable(
    entries: list[tuple[str, str | None, tuple[str, ...]]],
    split: str,
    audio_dir: Path,
    name: str,
    expected: str,
    max_missing_fraction: float,
    verify_audio: bool,
) -> list[AudioCaptionRecord]:
    """Build records for the entries (clip id, audio path or None, captions) whose audio is readable.

    ``expected`` says how the audio files must be named; the error for too many missing files repeats it, since a
    whole folder of wrongly named files looks like missing audio.
    """
    records, problems = [], []
    broken = audio_problems((path for _, path, _ in entries if path is not None), name) if verify_audio else {}
    for clip_id, path, captions in entries:
        problem = "missing" if path is None else (f"unreadable: {broken[path]}" if path in broken else None)
        if problem is None:
            records.append(AudioCaptionRecord(clip_id, str(path), captions, split))
        else:
            problems.append(f"{clip_id!r} ({problem})")
    if problems:
        fraction = len(problems) / len(entries)
        named = ", ".join(problems[:_NAMED_IN_WARNING])
        more = f" and {len(problems) - _NAMED_IN_WARNING} more" if len(problems) > _NAMED_IN_WARNING else ""
        where = audio_dir if audio_dir.is_dir() else f"{audio_dir} (folder does not exist)"
        message = (
            f"{name}: {len(problems)} of {len(entries)} clips ({fraction:.1%}) have no readable audio in {where}: "
            f"{named}{more}"
        )
        if fraction > max_missing_fraction:
            raise DataError(
                f"{message}; more than max_missing_fraction={max_missing_fraction:g} (expected {expected} "
                f"in {audio_dir})"
            )
        logger.warning("%s; skipping them", message)
    counts = sorted({len(r.captions) for r in records}) or [0]
    per_clip = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    logger.info(
        "%s: %d clips, %d captions (%s per clip), %d skipped for missing audio",
        name,
        len(records),
        sum(len(r.captions) for r in records),
        per_clip,
        len(problems),
    )
    return records


def _warn_shared_clips(dataset: str, result: dict[str, list[AudioCaptionRecord]]) -> None:
    """Name clips read in more than one split: scores on a split that shares clips with training are inflated."""
    splits_of_clip: dict[str, list[str]] = {}
    for split, records in result.items():
        for record in records:
            splits_of_clip.setdefault(record.clip_id, []).append(split)
    shared = {clip: splits for clip, splits in splits_of_clip.items() if len(splits) > 1}
    if shared:
        listing = "; ".join(f"{clip} in {', '.join(s)}" for clip, s in list(shared.items())[:_NAMED_IN_WARNING])
        logger.warning("%s: %d clip(s) appear in more than one split: %s", dataset, len(shared), listing)
