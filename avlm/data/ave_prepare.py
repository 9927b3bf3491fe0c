"""Decode the AVE videos once into the extracted layout that training reads: 10 frames and a 16 kHz wav per video.

python entrypoints/ave_prepare.py --data_dir /data/AVE_Dataset                 # writes frames/ and audio/ there
python entrypoints/ave_prepare.py --data_dir /data/AVE_Dataset --out_dir /scratch/ave

For each ``AVE/<id>.mp4`` (decoded with PyAV, one pass over both streams):

- ``frames/<id>/<t>.jpg`` for t = 0..9: the decoded frame nearest the middle of second t (times counted from the
  first frame). A video shorter than 10 s repeats its last frame for the seconds it lacks, and is listed as short.
- ``audio/<id>.wav``: the soundtrack resampled to 16 kHz by PyAV's ``AudioResampler``, its channels averaged to
  mono, cut or zero-padded to exactly 10 s, 16-bit PCM. Less than 9.5 s of sound also lists the video as short.

The work is resumable: a video whose 10 frames and wav all exist is skipped, and every file is written under a
temporary name and renamed into place, so a killed run never leaves a half-written file that looks finished. A
video that does not open or decode (or lacks a video or audio stream) is named in the log, skipped and counted;
the counts of the call go to ``<out_dir>/prepare_summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import av
import numpy as np
import soundfile
from PIL import Image
from tqdm.auto import tqdm

from avlm.data.ave import SAMPLE_RATE, SECONDS, audio_path, frame_path, video_path
from avlm.errors import DataError

logger = logging.getLogger(__name__)

SUMMARY_FILE = "prepare_summary.json"
# Less sound than this is reported: AAC priming and container rounding lose a few milliseconds on every video.
_MIN_AUDIO_SECONDS = SECONDS - 0.5


@dataclasses.dataclass
class PrepareSummary:
    """What one :func:`prepare_ave` call did.

    Attributes:
        decoded: Videos decoded and written in this call.
        skipped_existing: Videos skipped because their 10 frames and wav already existed.
        corrupt: Ids of the videos that could not be opened or decoded (nothing written for them).
        short: Ids of the decoded videos with less than 10 s of picture or 9.5 s of sound (padded).
        out_dir: Where ``frames/`` and ``audio/`` were written.
        missing: Ids asked for (``video_ids``) that have no ``AVE/<id>.mp4``.
    """

    decoded: int
    skipped_existing: int
    corrupt: list[str]
    short: list[str]
    out_dir: Path
    missing: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON-able form written to ``prepare_summary.json``."""
        return {**dataclasses.asdict(self), "out_dir": str(self.out_dir)}


class _Undecodable(Exception):
    """A video that opens but gives no usable picture or sound."""


def prepare_ave(
    data_dir: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    video_ids: Sequence[str] | None = None,
    jpeg_quality: int = 90,
) -> PrepareSummary:
    """Decode ``data_dir/AVE/<id>.mp4`` into ``out_dir/frames/<id>/<t>.jpg`` and ``out_dir/audio/<id>.wav``.

    Args:
        data_dir: The AVE folder holding ``AVE/*.mp4``.
        out_dir: Where to write the extracted layout; None = ``data_dir``.
        video_ids: The videos to prepare, in this order; None = every ``AVE/*.mp4``, sorted by name.
        jpeg_quality: JPEG quality of the frames (1..95, Pillow's scale).

    Returns:
        The counts of this call (also written to ``out_dir/prepare_summary.json``).

    Raises:
        DataError: ``data_dir/AVE`` is not a folder, holds no mp4 (without ``video_ids``), or a video id cannot
            name a file.
    """
    if not 1 <= jpeg_quality <= 95:
        raise ValueError(f"jpeg_quality must be in 1..95, got {jpeg_quality}")
    data_dir = Path(data_dir).expanduser()
    out_dir = Path(out_dir).expanduser() if out_dir is not None else data_dir
    videos = data_dir / "AVE"
    if not videos.is_dir():
        raise DataError(f"AVE video folder {videos} does not exist: data_dir must hold AVE/<VideoID>.mp4")
    if video_ids is None:
        video_ids = sorted(path.stem for path in videos.glob("*.mp4"))
        if not video_ids:
            raise DataError(f"AVE video folder {videos} holds no .mp4 file")
    for video_id in video_ids:
        if not video_id or video_id.startswith(".") or "/" in video_id or os.sep in video_id:
            raise DataError(f"AVE video id {video_id!r} cannot name a file")

    summary = PrepareSummary(decoded=0, skipped_existing=0, corrupt=[], short=[], out_dir=out_dir)
    for video_id in tqdm(video_ids, desc="ave_prepare", unit="video"):
        if _is_prepared(out_dir, video_id):
            summary.skipped_existing += 1
            continue
        path = video_path(data_dir, video_id)
        if not path.is_file():
            logger.warning("AVE video %s: no such file, skipped", path)
            summary.missing.append(video_id)
            continue
        try:
            frames, waveform, short = decode_video(path)
        except (av.FFmpegError, OSError, ValueError, RuntimeError, _Undecodable) as exc:
            logger.warning("AVE video %s is corrupt or undecodable, skipped: %s", path, exc)
            summary.corrupt.append(video_id)
            continue
        _write_extracted(out_dir, video_id, frames, waveform, jpeg_quality)
        summary.decoded += 1
        if short:
            summary.short.append(video_id)

    _write_atomic(
        out_dir / SUMMARY_FILE,
        lambda tmp: tmp.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8"),
    )
    if summary.corrupt or summary.missing:
        logger.warning(
            "ave_prepare: %d corrupt and %d missing videos skipped (listed in %s)",
            len(summary.corrupt),
            len(summary.missing),
            out_dir / SUMMARY_FILE,
        )
    logger.info(
        "ave_prepare: %d decoded (%d short), %d already prepared, %d corrupt, %d missing → %s",
        summary.decoded,
        len(summary.short),
        summary.skipped_existing,
        len(summary.corrupt),
        len(summary.missing),
        out_dir,
    )
    return summary


def decode_video(path: str | os.PathLike) -> tuple[list[Image.Image], np.ndarray, bool]:
    """Decode one video: the frame nearest the middle of each second and the 16 kHz mono soundtrack.

    Args:
        path: A video file with a video and an audio stream.

    Returns:
        The 10 RGB frames (seconds 0..9), the float32 waveform of exactly 10 s at 16 kHz, and whether the video
        was short (a second without a frame of its own, or less than 9.5 s of sound).

    Raises:
        av.FFmpegError: The file does not open or decode.
        _Undecodable: No video or audio stream, or nothing decoded from one of them.
    """
    targets = np.arange(SECONDS) + 0.5
    best_distance = np.full(SECONDS, np.inf)
    frames: list[Image.Image | None] = [None] * SECONDS
    covered: set[int] = set()
    origin: float | None = None
    # Planar float at 16 kHz in the source's own layout; channels are averaged here, as load_audio does, because
    # FFmpeg's mono downmix adds the channels at -3 dB (a stereo copy of a mono track would come out 1.41× louder).
    resampler = av.AudioResampler(format="fltp", layout=None, rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    samples = 0
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise _Undecodable("no video stream")
        if not container.streams.audio:
            raise _Undecodable("no audio stream")
        video, audio = container.streams.video[0], container.streams.audio[0]
        video.thread_type = "AUTO"
        video_index = 0
        last_time = -np.inf
        for packet in container.demux(video, audio):
            if last_time > SECONDS and samples >= SECONDS * SAMPLE_RATE:
                break  # both streams are past 10 s: the rest of a longer file is not used
            for frame in packet.decode():
                if packet.stream.type == "audio":
                    for out in resampler.resample(frame):
                        chunks.append(out.to_ndarray().mean(axis=0))
                        samples += chunks[-1].size
                    continue
                time = frame.time if frame.time is not None else video_index / float(video.average_rate or 25)
                video_index += 1
                origin = time if origin is None else origin
                last_time = time - origin
                if 0 <= last_time < SECONDS:
                    covered.add(int(last_time))
                distance = np.abs(targets - last_time)
                closer = distance < best_distance
                if closer.any():
                    # One RGB conversion per frame that is the nearest so far to some second's middle.
                    image = frame.to_image()
                    best_distance[closer] = distance[closer]
                    for second in np.flatnonzero(closer):
                        frames[second] = image
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().mean(axis=0))
    if origin is None:
        raise _Undecodable("no video frame decoded")
    if not chunks or samples == 0:
        raise _Undecodable("no audio decoded")
    waveform = np.concatenate(chunks).astype(np.float32)
    short = len(covered) < SECONDS or waveform.size < _MIN_AUDIO_SECONDS * SAMPLE_RATE
    waveform = np.pad(waveform[: SECONDS * SAMPLE_RATE], (0, max(0, SECONDS * SAMPLE_RATE - waveform.size)))
    return [image for image in frames if image is not None], waveform, short


def _write_extracted(
    out_dir: Path, video_id: str, frames: list[Image.Image], waveform: np.ndarray, jpeg_quality: int
) -> None:
    """Write one video's 10 jpgs, then its wav, each atomically."""
    for second, image in enumerate(frames):
        _write_atomic(
            frame_path(out_dir, video_id, second),
            lambda tmp, image=image: image.save(tmp, format="JPEG", quality=jpeg_quality),
        )
    # Clipped first: 16-bit PCM would wrap around, not saturate, on a resampling overshoot above 1.
    pcm = np.clip(waveform, -1.0, 1.0)
    _write_atomic(
        audio_path(out_dir, video_id),
        lambda tmp: soundfile.write(tmp, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV"),
    )


def _is_prepared(out_dir: Path, video_id: str) -> bool:
    return audio_path(out_dir, video_id).is_file() and all(
        frame_path(out_dir, video_id, second).is_file() for second in range(SECONDS)
    )


def _write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary sibling, then rename it to ``path``: a kill leaves no half file at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
