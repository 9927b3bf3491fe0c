"""Built-in demo datasets are generated once into a cache folder; this makes that safe to interrupt and to race.

A dataset is written into a temporary sibling folder and renamed into place only when complete (with a
``.complete`` marker holding its summary), so an interrupted generation never looks complete and two processes
generating the same dataset at once end with one identical copy.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
_STALE_TMP_S = 3600.0


def default_cache_dir() -> Path:
    """Return ``$AVLM_CACHE_DIR``, else ``~/.cache/avlm``."""
    return Path(os.environ.get("AVLM_CACHE_DIR") or Path.home() / ".cache" / "avlm").expanduser()


def generate_once(root: str | os.PathLike | None, name: str, write: Callable[[Path], dict], what: str) -> Path:
    """Return ``root / name``, first calling ``write(folder)`` to generate it if no complete copy exists.

    Args:
        root: Cache folder; None = :func:`default_cache_dir`.
        name: Folder name; it should change with anything that changes the content (version, seed, size).
        write: Fills the given empty folder and returns a JSON-able summary, stored in the marker file.
        what: What is generated, for the log line.
    """
    root = Path(root).expanduser() if root is not None else default_cache_dir()
    target = root / name
    if (target / COMPLETE_MARKER).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(root, name)
    if target.exists():
        if (target / COMPLETE_MARKER).is_file():  # another process has just finished it
            return target
        # Only a complete folder is ever renamed into place, so this is not ours: not safe to reuse.
        logger.warning("removing incomplete demo folder %s (no %s marker)", target, COMPLETE_MARKER)
        shutil.rmtree(target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp's 0o700 would stay on the renamed dataset folder
    try:
        summary = write(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same generation first; its copy is identical.
            if not (target / COMPLETE_MARKER).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("generated %s in %s in %.1f s", what, target, time.perf_counter() - start)
    return target


def _remove_stale_tmp(root: Path, name: str) -> None:
    """Delete temporary folders left by generations that crashed over an hour ago."""
    now = time.time()
    for path in root.glob(f".{name}.tmp-*"):
        try:
            if now - path.stat().st_mtime > _STALE_TMP_S:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
