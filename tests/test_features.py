"""The feature cache: keyed on the frames' content, refusing another key's file, rebuilding a corrupt one."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from avlm.data import ClipDataset, ensure_cvs_demo, load_endoscapes, manifest_hash
from avlm.errors import DataError
from avlm.features import cache_key, cached_tokens

MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)
CLIPS = 6


class MeanColourBackbone(torch.nn.Module):
    """Tokens (B, T, 3) = each frame's mean colour, so a changed frame changes its clip's tokens; counts clips."""

    def __init__(self) -> None:
        super().__init__()
        self.clips_seen = 0

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.clips_seen += len(pixel_values)
        return SimpleNamespace(tokens=pixel_values.mean(dim=(-1, -2)))


class StubAccelerator:
    """One process of a run: ``main_process_first`` records the barrier its exit is in accelerate."""

    def __init__(self, is_main_process: bool = True) -> None:
        self.is_main_process = is_main_process
        self.device = torch.device("cpu")
        self.barriers = 0

    @contextmanager
    def main_process_first(self) -> Iterator[None]:
        yield
        # accelerate's main process waits for the others here, outside any try: an exception inside skips it.
        self.barriers += 1


@pytest.fixture
def demo_val(avlm_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the CVS demo's val split, read with a fresh record of checked files."""
    root = tmp_path / "demo"
    shutil.copytree(ensure_cvs_demo(avlm_cache) / "val", root / "val")
    monkeypatch.setenv("AVLM_CACHE_DIR", str(tmp_path / "avlm_cache"))
    return root


def tokens_of(
    root: Path, cache_dir: Path, accelerator: StubAccelerator | None = None, clips: int = CLIPS
) -> tuple[torch.Tensor, bool, int, dict]:
    """Cache the first clips of ``root``'s val split as the recipes do; return tokens, hit, clips computed, key.

    The key's manifest is of the first ``CLIPS`` clips whatever ``clips`` is, to make a key that misses the data.
    """
    records = load_endoscapes(root, splits=("val",))["val"]
    backbone = MeanColourBackbone()
    key = {"backbone": "mean-colour", "image_size": 8, "manifest": manifest_hash(records[:CLIPS])}
    tokens, hit = cached_tokens(
        backbone,
        ClipDataset(records[:clips], 8, MEAN, STD),
        key_parts=key,
        cache_dir=cache_dir,
        accelerator=accelerator or StubAccelerator(),
        batch_size=4,
    )
    return tokens, hit, backbone.clips_seen, key


def cache_file(cache_dir: Path, key: dict) -> Path:
    return cache_dir / "features" / f"{cache_key(key)}.safetensors"


def test_a_changed_frame_under_the_same_name_gets_new_tokens(demo_val: Path, tmp_path: Path) -> None:
    cache = tmp_path / "features_cache"
    copy = tmp_path / "copy"
    shutil.copytree(demo_val, copy)
    tokens, hit, computed, key = tokens_of(demo_val, cache)
    assert (hit, computed) == (False, CLIPS) and tokens.shape == (CLIPS, 4, 3)
    assert tokens_of(demo_val, cache)[1:3] == (True, 0)
    # An unchanged copy elsewhere is the same data: same key, the cached tokens are reused.
    same, hit, computed, same_key = tokens_of(copy, cache)
    assert (hit, computed, same_key) == (True, 0, key) and torch.equal(same, tokens)
    # Another frame under the same file name: a new key, and the tokens are computed from the new pixels.
    changed_clip = 2
    frame = load_endoscapes(copy, splits=("val",))["val"][changed_clip].frame_paths[-1]
    size = Path(frame).stat().st_size
    Image.new("RGB", (32, 32), (255, 255, 255)).save(frame, format="JPEG")
    assert Path(frame).stat().st_size != size
    changed, hit, computed, changed_key = tokens_of(copy, cache)
    assert (hit, computed) == (False, CLIPS) and changed_key["manifest"] != key["manifest"]
    others = [k for k in range(CLIPS) if k != changed_clip]
    assert torch.equal(changed[others], tokens[others])
    assert not torch.allclose(changed[changed_clip, -1], tokens[changed_clip, -1])
    torch.testing.assert_close(changed[changed_clip, -1], (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    assert cache_file(cache, key).is_file() and cache_file(cache, changed_key).is_file()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_corrupt_cache_file_is_rebuilt(
    demo_val: Path, tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "features_cache"
    tokens, _, _, key = tokens_of(demo_val, cache)
    path = cache_file(cache, key)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 64, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="avlm.features"):
        rebuilt, hit, computed, _ = tokens_of(demo_val, cache)
    assert (hit, computed) == (False, CLIPS) and torch.equal(rebuilt, tokens)
    assert f"feature cache {path} is unusable" in caplog.text and "rebuilding it" in caplog.text
    assert tokens_of(demo_val, cache)[1:3] == (True, 0)


def test_a_cache_file_of_another_key_is_refused_after_the_barrier(demo_val: Path, tmp_path: Path) -> None:
    cache = tmp_path / "features_cache"
    _, _, _, key = tokens_of(demo_val, cache)
    # Copied into the place of another dataset's file, e.g. by hand: its tokens belong to other frames.
    other = {**key, "manifest": "0" * 64}
    impostor = cache_file(cache, other)
    shutil.copy(cache_file(cache, key), impostor)
    before = impostor.read_bytes()
    records = load_endoscapes(demo_val, splits=("val",))["val"][:CLIPS]
    accelerator = StubAccelerator()
    expected = f"feature cache {impostor} was written for another key (manifest: stored '{key['manifest']}', "
    with pytest.raises(DataError, match=re.escape(expected) + ".*delete the file"):
        cached_tokens(
            MeanColourBackbone(),
            ClipDataset(records, 8, MEAN, STD),
            key_parts=other,
            cache_dir=cache,
            accelerator=accelerator,
        )
    # Raised after the barrier, so the other ranks are not left waiting; the file is left as it was.
    assert accelerator.barriers == 1
    assert impostor.read_bytes() == before


def test_a_cache_file_with_another_number_of_clips_is_refused(demo_val: Path, tmp_path: Path) -> None:
    cache = tmp_path / "features_cache"
    tokens_of(demo_val, cache)
    # The same key for fewer clips: the key does not cover the data (the manifest is of the first CLIPS clips).
    with pytest.raises(DataError, match=f"holds tokens of {CLIPS} clips but the dataset has {CLIPS - 1}"):
        tokens_of(demo_val, cache, clips=CLIPS - 1)


def test_other_ranks_name_a_cache_file_they_cannot_read(demo_val: Path, tmp_path: Path) -> None:
    cache = tmp_path / "features_cache"
    _, _, _, key = tokens_of(demo_val, cache)
    path = cache_file(cache, key)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(
        DataError, match=re.escape(f"feature cache {path}, written by the main process, cannot be read")
    ):
        tokens_of(demo_val, cache, accelerator=StubAccelerator(is_main_process=False))
