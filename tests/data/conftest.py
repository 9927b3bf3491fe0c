"""Fixtures of the data tests: an isolated record of checked files, and a count of the frames decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from avlm.data import integrity


@pytest.fixture
def file_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ``default_cache_dir()`` at a fresh folder, so each test starts with no frame known; return the record."""
    cache = tmp_path / "avlm_cache"
    monkeypatch.setenv("AVLM_CACHE_DIR", str(cache))
    return cache / integrity.LEDGER_NAME


@pytest.fixture
def decoded(file_record: Path, monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The bytes of every image decoded by the frame checks, in order (with a fresh record)."""
    calls: list[bytes] = []
    decode = integrity.decode_image

    def counting(data: bytes) -> None:
        calls.append(data)
        decode(data)

    monkeypatch.setattr(integrity, "decode_image", counting)
    return calls
