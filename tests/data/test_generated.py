"""Every built-in demo is generated through ``generate_once``: a generation that crashes part-way leaves nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from avlm.data import (
    caption_demo,
    cvs_demo,
    ensure_caption_demo,
    ensure_cvs_demo,
    ensure_video_caption_demo,
    video_captions,
)


@pytest.mark.parametrize(
    "ensure_demo, module, writer",
    [
        (ensure_cvs_demo, cvs_demo, "_write_video"),
        (ensure_caption_demo, caption_demo, "synthesize_clip"),
        (ensure_video_caption_demo, video_captions, "render_demo_clip"),
    ],
    ids=["cvs", "audio_caption", "video_caption"],
)
def test_a_crash_during_generation_leaves_no_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ensure_demo, module, writer
) -> None:
    calls = []
    real_writer = getattr(module, writer)

    def write_then_crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("disk full")
        return real_writer(*args, **kwargs)

    monkeypatch.setattr(module, writer, write_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_demo(tmp_path, seed=0)
    assert list(tmp_path.iterdir()) == []
