"""Frame decode checks and content digests: remembered while a file is unchanged, never trusted once it changes."""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from avlm.data.integrity import content_digests, frame_problems, verify_frames
from avlm.errors import DataError


def write_jpegs(folder: Path, count: int, seed: int = 0) -> list[str]:
    """Noisy 24x24 JPEGs (noise, so that half a file cuts into the image data rather than the headers)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for t in range(count):
        path = folder / f"{t:03d}.jpg"
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    return paths


def truncate(path: str) -> None:
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2])


def test_frames_are_decoded_once_while_unchanged(tmp_path: Path, decoded: list[bytes], file_record: Path) -> None:
    frames = write_jpegs(tmp_path / "clip", 4)
    assert frame_problems([*frames, frames[0]], "clip") == {}
    assert len(decoded) == 4 and file_record.is_file()  # a repeated path is decoded once
    assert frame_problems(frames, "clip") == {}
    assert len(decoded) == 4  # the second pass reads nothing
    # A changed file (another size) is decoded again, and only it.
    with open(frames[2], "ab") as f:
        f.write(b"\0")
    assert frame_problems(frames, "clip") == {}
    assert len(decoded) == 5 and decoded[-1] == Path(frames[2]).read_bytes()
    # A file that does not decode is never recorded as good: checked, and refused, on every pass.
    truncate(frames[1])
    for expected_decodes in (6, 7):
        problems = frame_problems(frames, "clip")
        assert list(problems) == [frames[1]] and "truncated" in problems[frames[1]].lower()
        assert len(decoded) == expected_decodes


def test_a_linked_data_folder_shares_the_record_of_its_target(tmp_path: Path, decoded: list[bytes]) -> None:
    frames = write_jpegs(tmp_path / "clip", 3)
    (tmp_path / "link").symlink_to(tmp_path / "clip")
    assert frame_problems(frames, "clip") == {}
    assert frame_problems([str(tmp_path / "link" / Path(p).name) for p in frames], "link") == {}
    assert len(decoded) == 3


def test_frames_that_do_not_decode_are_named_with_their_clip(tmp_path: Path, decoded: list[bytes]) -> None:
    frames = write_jpegs(tmp_path / "clip", 3)
    truncate(frames[0])
    Path(frames[2]).write_bytes(b"\xff\xd8 not a jpeg")
    missing = str(tmp_path / "clip" / "gone.jpg")
    uses = {frames[0]: "train clip a", frames[1]: "train clip a", frames[2]: "val clip b", missing: "val clip c"}
    with pytest.raises(DataError) as error:
        verify_frames(uses, "my dataset")
    message = str(error.value)
    assert message.startswith("my dataset: 3 of 4 frame files cannot be decoded")
    assert re.search(
        f"{re.escape(frames[0])} \\(used by train clip a\\): does not decode: [^;]*truncated", message, re.I
    )
    assert f"{frames[2]} (used by val clip b): not an image (unknown format" in message
    assert f"{missing} (used by val clip c): cannot be read: No such file or directory" in message
    assert frames[1] not in message


def test_long_lists_of_bad_frames_are_shortened(tmp_path: Path, decoded: list[bytes]) -> None:
    frames = write_jpegs(tmp_path / "clip", 8)
    for path in frames:
        Path(path).write_bytes(b"junk")
    with pytest.raises(
        DataError,
        match=re.escape(
            f"{frames[4]} (used by clip 4): not an image (unknown format, or its header is cut off); and 3 more"
        ),
    ):
        verify_frames({path: f"clip {k}" for k, path in enumerate(frames)}, "data")


def test_content_digests_follow_content_not_names_or_times(tmp_path: Path, decoded: list[bytes]) -> None:
    frames = write_jpegs(tmp_path / "a", 3)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    copies = [str(tmp_path / "b" / Path(p).name) for p in frames]
    digests = content_digests(frames)
    assert len(set(digests.values())) == 3 and all(len(d) == 64 for d in digests.values())
    # The same bytes elsewhere have the same digests: a copied dataset keeps its feature cache.
    assert [content_digests(copies)[p] for p in copies] == [digests[p] for p in frames]
    # Rewritten in place with the same size and its old mtime restored (as cp -p or rsync -a do): still seen.
    target = Path(copies[1])
    stat = target.stat()
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    time.sleep(0.05)  # the kernel stamps ctime from a coarse clock (1-10 ms ticks): let a tick pass, as in real use
    target.write_bytes(bytes(data))
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert target.stat().st_size == stat.st_size and target.stat().st_mtime_ns == stat.st_mtime_ns
    changed = content_digests(copies)
    assert changed[copies[1]] != digests[frames[1]]
    assert changed[copies[0]] == digests[frames[0]] and changed[copies[2]] == digests[frames[2]]
    assert decoded == []  # hashing does not decode
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'gone.jpg'}: cannot be read")):
        content_digests([frames[0], str(tmp_path / "gone.jpg")])


def test_a_corrupt_record_is_started_again(
    tmp_path: Path, decoded: list[bytes], file_record: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frames = write_jpegs(tmp_path / "clip", 2)
    file_record.parent.mkdir(parents=True)
    file_record.write_bytes(b"this is not an sqlite database, but long enough to be read as one" * 20)
    with caplog.at_level(logging.WARNING, logger="avlm.data.integrity"):
        assert frame_problems(frames, "clip") == {}
    assert f"file check record {file_record} is corrupt" in caplog.text
    assert len(decoded) == 2
    assert frame_problems(frames, "clip") == {}
    assert len(decoded) == 2  # the new record works
