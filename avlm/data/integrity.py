"""Content fingerprints and decode checks of data files, remembered in the avlm cache so that re-runs only stat.

A feature cache keyed on frame names reuses the tokens of another folder with the same names, or of a frame
rewritten in place; keyed on each file's content (sha256 of its bytes) it cannot, and the key stays the same for
the same data on every machine, so it also serves as run provenance. A frame that does not decode (a truncated
JPEG), or an audio file that does not (a corrupt body behind a good header, NaN samples), is found by the readers
before any run exists and named, rather than failing the feature cache or the training halfway.

Cost: the first time a file is seen it is read once; the decode check reads it anyway, and sha256 of the bytes
costs a small fraction of a JPEG decode. What is learnt is recorded in ``file_checks.sqlite`` in
``default_cache_dir()``, per resolved path with the file's size, ``mtime_ns`` and ``ctime_ns``; a file whose stat
still matches is not read again, so a second pass over unchanged data costs one ``stat`` per file. What a file
was decoded as (image or audio) is recorded with it, so one kind's check never vouches for the other. ``ctime_ns``
is there because ``cp -p``, ``rsync -a`` and ``tar`` restore ``mtime``, so a replaced file of the same size would
otherwise pass, while only the kernel sets ``ctime``. sqlite rather than a JSON file because several processes
(ranks, parallel runs) record at once and sqlite serialises their writes. The record is only a memo: an
unusable one is rebuilt (corrupt) or ignored (locked, read-only), never trusted over the files.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from pathlib import Path

import numpy as np
import soundfile
from PIL import Image, UnidentifiedImageError
from tqdm.contrib.concurrent import thread_map

from avlm.data.generated import default_cache_dir
from avlm.errors import DataError

logger = logging.getLogger(__name__)

LEDGER_NAME = "file_checks.sqlite"
# Below this many files to read, a progress bar is noise.
PROGRESS_MIN_FILES = 500
_NAMED_IN_ERROR = 5
_SQL_CHUNK = 500
# PIL's decoders and hashlib release the GIL, so threads decode files in parallel.
_WORKERS = min(8, os.cpu_count() or 1)

Signature = tuple[int, int, int]  # (size, mtime_ns, ctime_ns)
Outcome = tuple[str | None, str | None]  # (sha256 of the bytes or None if unreadable, problem or None)
# The ledger's ``decodes`` column: 0 = only hashed, else the kind the file decodes as.
_IMAGE, _AUDIO = 1, 2


def content_digests(paths: Iterable[str]) -> dict[str, str]:
    """Return path → sha256 hex digest of the file's bytes, reading only files the record does not vouch for.

    Args:
        paths: Files, in any order, repeats allowed.

    Raises:
        DataError: A file is missing or unreadable (named).
    """
    outcomes = _inspect(paths, kind=None, desc="hashing data files")
    problems = {path: problem for path, (_, problem) in outcomes.items() if problem}
    if problems:
        named = "; ".join(f"{path}: {problem}" for path, problem in list(problems.items())[:_NAMED_IN_ERROR])
        raise DataError(f"{len(problems)} data file(s) cannot be read (moved or deleted since reading?): {named}")
    return {path: digest for path, (digest, _) in outcomes.items() if digest is not None}


def frame_problems(paths: Iterable[str], what: str) -> dict[str, str]:
    """Decode every image file not yet known to decode (PIL ``load()``); return path → why it does not.

    A truncated JPEG fails here (PIL's ``LOAD_TRUNCATED_IMAGES`` is False by default). Files that decode are
    recorded with their digest, so a later pass, and ``content_digests``, do not read them again.

    Args:
        paths: Frame files, in any order, repeats allowed.
        what: What the frames belong to, for the progress bar and the log line.

    Returns:
        The files that are missing, unreadable or do not decode, each with the reason; empty when all decode.
    """
    outcomes = _inspect(paths, kind=_IMAGE, desc=f"checking frames of {what}")
    return {path: problem for path, (_, problem) in outcomes.items() if problem}


def audio_problems(paths: Iterable[str], what: str) -> dict[str, str]:
    """Decode every audio file not yet known to decode (all its samples, with soundfile); return path → why not.

    A header that soundfile reads is not enough: a download cut or corrupted after its header, or a float file
    holding NaN, passes ``soundfile.info`` and fails only when the feature cache or the training loads it. Files
    that decode, with at least one sample and only finite values, are recorded as ``frame_problems`` records
    frames, so a later pass does not decode them again.

    Args:
        paths: Audio files (anything libsndfile reads), in any order, repeats allowed.
        what: What the files belong to, for the progress bar and the log line.

    Returns:
        The files that are missing, unreadable, do not decode, have no samples or hold non-finite samples, each
        with the reason; empty when all decode.
    """
    outcomes = _inspect(paths, kind=_AUDIO, desc=f"checking audio of {what}")
    return {path: problem for path, (_, problem) in outcomes.items() if problem}


def verify_frames(uses: Mapping[str, str], what: str) -> None:
    """Raise a DataError naming the frame files that do not decode, each with what uses it.

    Args:
        uses: Frame file → the clip that uses it, as a user finds it (e.g. ``"train clip 3_150"``).
        what: The dataset, named first in the error (e.g. its folder or manifest file).

    Raises:
        DataError: Some frames are missing, unreadable or corrupt (truncated, not an image).
    """
    problems = frame_problems(uses, what)
    if problems:
        shown = list(problems.items())[:_NAMED_IN_ERROR]
        named = "; ".join(f"{path} (used by {uses[path]}): {problem}" for path, problem in shown)
        more = f"; and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise DataError(
            f"{what}: {len(problems)} of {len(uses)} frame files cannot be decoded (corrupt or truncated; "
            f"replace them or remove their clips): {named}{more}"
        )


def decode_image(data: bytes) -> None:
    """Decode a whole image from its bytes; raises what PIL raises for a corrupt or truncated file."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()


def _inspect(paths: Iterable[str], *, kind: int | None, desc: str) -> dict[str, Outcome]:
    """Return path → outcome, reading (and decoding as ``kind``, if given) only the files the record does not vouch
    for."""
    outcomes: dict[str, Outcome] = {}
    resolved: dict[str, str] = {}
    signatures: dict[str, Signature] = {}
    real_dirs: dict[str, str] = {}
    for path in dict.fromkeys(str(p) for p in paths):
        # Folders resolved once each (realpath per file costs an lstat per path component): a linked data folder
        # and its target share records; a linked file is recorded under its own name, with its target's stat.
        folder, name = os.path.split(os.path.abspath(path))
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(folder)
        real = os.path.join(real_dirs[folder], name)
        try:
            stat = os.stat(real)
        except OSError as exc:
            outcomes[path] = (None, f"cannot be read: {exc.strerror or exc}")
            continue
        resolved[path] = real
        signatures[real] = (stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    ledger = _Ledger(default_cache_dir() / LEDGER_NAME)
    known = ledger.lookup(signatures)
    todo = [real for real in signatures if real not in known or (kind is not None and known[real][1] != kind)]
    start = time.perf_counter()
    fresh = thread_map(
        lambda real: _read_and_check(real, kind),
        todo,
        max_workers=_WORKERS,
        desc=desc,
        unit="file",
        disable=len(todo) < PROGRESS_MIN_FILES,
        leave=False,
    )
    checked = dict(zip(todo, fresh, strict=True))
    ledger.remember(
        [
            (real, signatures[real], digest, kind if kind is not None and problem is None else 0)
            for real, (digest, problem) in checked.items()
            if digest is not None
        ]
    )
    if todo:
        logger.info(
            "%s: read %d of %d files in %.2f s, %d known unchanged from %s",
            desc,
            len(todo),
            len(signatures),
            time.perf_counter() - start,
            len(signatures) - len(todo),
            ledger.path,
        )
    for path, real in resolved.items():
        outcomes[path] = checked[real] if real in checked else (known[real][0], None)
    return outcomes


def _read_and_check(real: str, kind: int | None) -> Outcome:
    try:
        data = Path(real).read_bytes()
    except OSError as exc:
        return None, f"cannot be read: {exc.strerror or exc}"
    digest = hashlib.sha256(data).hexdigest()
    return digest, _PROBLEM_OF[kind](data) if kind is not None else None


def _image_problem(data: bytes) -> str | None:
    try:
        decode_image(data)
    except UnidentifiedImageError:
        return "not an image (unknown format, or its header is cut off)"
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"does not decode: {exc}"
    return None


def _audio_problem(data: bytes) -> str | None:
    try:
        samples, _ = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.SoundFileError, OSError, ValueError, TypeError, RuntimeError) as exc:
        return f"does not decode: {exc}"
    if samples.shape[0] == 0:
        return "no samples"
    if not np.isfinite(samples).all():
        return "holds NaN or infinite samples"
    return None


_PROBLEM_OF: dict[int, Callable[[bytes], str | None]] = {_IMAGE: _image_problem, _AUDIO: _audio_problem}


class _Ledger:
    """The sqlite record of files read: resolved path → stat signature, content digest, what it decodes as."""

    def __init__(self, path: Path):
        self.path = path

    def lookup(self, signatures: Mapping[str, Signature]) -> dict[str, tuple[str, int]]:
        """Return resolved path → (sha256, kind it decodes as, 0 if only hashed) for the files whose recorded
        signature still matches."""
        found: dict[str, tuple[str, int]] = {}
        reals = list(signatures)
        try:
            with closing(self._connect()) as db:
                for i in range(0, len(reals), _SQL_CHUNK):
                    chunk = reals[i : i + _SQL_CHUNK]
                    rows = db.execute(
                        "SELECT path, size, mtime_ns, ctime_ns, sha256, decodes FROM files "
                        f"WHERE path IN ({','.join('?' * len(chunk))})",
                        chunk,
                    )
                    for real, size, mtime_ns, ctime_ns, digest, decodes in rows:
                        if (size, mtime_ns, ctime_ns) == signatures[real]:
                            found[real] = (digest, int(decodes))
        except (sqlite3.Error, OSError) as exc:
            logger.warning("file check record %s unusable (%s); reading every file", self.path, exc)
            return {}
        return found

    def remember(self, rows: list[tuple[str, Signature, str, int]]) -> None:
        """Record (resolved path, signature, sha256, decodes-as kind) rows, replacing what was known of those paths."""
        if not rows:
            return
        try:
            with closing(self._connect()) as db, db:
                db.executemany(
                    "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)",
                    [(real, *signature, digest, int(decodes)) for real, signature, digest, decodes in rows],
                )
        except (sqlite3.Error, OSError) as exc:
            logger.warning("cannot record file checks in %s (%s); the next run reads these files again", self.path, exc)

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return self._open()
        except sqlite3.DatabaseError as exc:
            if isinstance(exc, sqlite3.OperationalError):  # locked, read-only: not ours to delete
                raise
            # Not a database (a torn write, a stray file): it is only a memo, so start it again.
            logger.warning("file check record %s is corrupt (%s); starting it again", self.path, exc)
            self.path.unlink(missing_ok=True)
            return self._open()

    def _open(self) -> sqlite3.Connection:
        # A generous timeout: other ranks may be recording the same dataset at the same moment.
        db = sqlite3.connect(self.path, timeout=60)
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                "ctime_ns INTEGER, sha256 TEXT NOT NULL, decodes INTEGER NOT NULL)"
            )
        except sqlite3.Error:
            db.close()
            raise
        return db
