"""Bad data stops every recipe before its MLflow run exists (issue #11): the error names the bad file or folder, and
the store holds no run afterwards, not even a FAILED one.

Each case builds a tiny dataset in the layout its reader documents (shared/formats/README.md), breaks one thing, and
calls the recipe's ``main`` in-process; everything is refused before a model trains, so each case takes a second.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile
from mlflow import MlflowClient
from mlflow.entities import ViewType
from PIL import Image

from avlm.errors import ConfigError, DataError
from avlm.recipes import caption, cvs, probe

REPO = Path(__file__).resolve().parents[2]
# Per recipe: its main, its config loader, its example and tiny settings. Nothing here should train, but a recipe
# that failed to refuse its data trains for a second only.
RECIPES = {
    "cvs": (
        cvs.main,
        cvs.load_cvs_config,
        "cvs/demo.yaml",
        "model.head_hidden=16 model.head_heads=2 train.batch_size=2",
    ),
    "probe": (
        probe.main,
        probe.load_probe_config,
        "probe/demo.yaml",
        "backbone.pretext.steps=0 data.input_mask_ratio=0 grid.poolings=[mean_all] grid.optimizers=[adamw] "
        "grid.seeds=[1] sanity.pooling=mean_all sanity.tiny_clips=2 sanity.epochs=1 gate.evaluate_on=val",
    ),
    "caption": (
        caption.main,
        caption.load_caption_config,
        "caption/demo.yaml",
        "model.lm=lm-tiny retention.enabled=false metrics.spice=false train.monitor=val/CIDEr_D "
        "decoding.num_beams=1 decoding.max_new_tokens=4",
    ),
}


def starter(recipe: str, *overrides: str) -> Callable[[], object]:
    """The recipe's ``main`` on its example with tiny settings and ``overrides``, called later (inside
    ``pytest.raises``: the config is loaded there too, so a config error counts as refused)."""
    main, load_config, example, tiny = RECIPES[recipe]
    quick = ["tracking.system_metrics=false", "train.epochs=1", "registry.register=false", *tiny.split()]
    return lambda: main(load_config(REPO / "examples" / example, [*quick, *overrides]))


def runs_in(store: str) -> list:
    client = MlflowClient(store)
    experiments = client.search_experiments(view_type=ViewType.ALL)
    return client.search_runs([e.experiment_id for e in experiments], run_view_type=ViewType.ALL)


def assert_refused_before_a_run(store: str, start: Callable[[], object], error: type, *named: str) -> None:
    """``start()`` raises ``error`` whose message holds every one of ``named``, and no MLflow run exists."""
    with pytest.raises(error) as caught:
        start()
    assert runs_in(store) == [], f"a run was left behind by: {caught.value!r}"
    for text in named:
        assert text in str(caught.value), f"{text!r} not named in: {caught.value}"


def write_image(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ------------------------------------------------------------------------------------------------------------- CVS
def endoscapes(root: Path, clips: tuple[int, int] = (6, 4)) -> Path:
    """Endoscapes2023 look-alike: train/ and val/, one video per clip, frames 0-75 (25 fps numbering), label at 75."""
    rng = np.random.default_rng(0)
    video = 1
    for split, count in zip(("train", "val"), clips, strict=True):
        images = []
        for i in range(count):
            for frame in range(0, 100, 25):
                write_image(root / split / f"{video}_{frame}.jpg", rng)
            images.append({"id": video, "file_name": f"{video}_75.jpg", "ds": [i % 2, (i // 2) % 2, 2 / 3]})
            video += 1
        (root / split / "annotation_ds_coco.json").write_text(json.dumps({"images": images}))
    return root


def _no_root(root: Path) -> tuple[Path, list[str]]:
    return root / "absent", [str(root / "absent")]


def _no_val_folder(root: Path) -> tuple[Path, list[str]]:
    shutil.rmtree(root / "val")
    return root, [str(root / "val")]


def _bad_json(root: Path) -> tuple[Path, list[str]]:
    (root / "val" / "annotation_ds_coco.json").write_text("{not json")
    return root, [str(root / "val" / "annotation_ds_coco.json")]


def _labelled_frame_missing(root: Path) -> tuple[Path, list[str]]:
    (root / "train" / "2_75.jpg").unlink()
    return root, [str(root / "train" / "2_75.jpg")]


def _truncated_frame(root: Path) -> tuple[Path, list[str]]:
    cut_in_half(root / "train" / "3_25.jpg")
    return root, [str(root / "train" / "3_25.jpg")]


@pytest.mark.parametrize(
    "fault", [_no_root, _no_val_folder, _bad_json, _labelled_frame_missing, _truncated_frame], ids=lambda f: f.__name__
)
def test_cvs_refuses_bad_endoscapes_data_before_a_run(mlflow_store, tmp_path, fault):
    data_dir, named = fault(endoscapes(tmp_path / "endoscapes"))
    start = starter("cvs", f"data.data_dir={data_dir}")
    assert_refused_before_a_run(mlflow_store, start, DataError, *named)


@pytest.mark.parametrize("override", ["train.batch_size=8", "data.limit_clips=1"])
def test_cvs_refuses_a_train_split_smaller_than_one_batch_before_a_run(mlflow_store, tmp_path, override):
    root = endoscapes(tmp_path / "endoscapes")  # 6 train clips, batch 2
    start = starter("cvs", f"data.data_dir={root}", override)
    assert_refused_before_a_run(mlflow_store, start, ConfigError, "train.batch_size", str(root))


# ----------------------------------------------------------------------------------------------------------- probe
def probe_manifest(folder: Path, train: int = 4, val: int = 4) -> Path:
    """A manifest CSV of clips of four frames each (one folder per clip, relative to the manifest), two labels."""
    rng = np.random.default_rng(0)
    rows = []
    for split, count in (("train", train), ("val", val)):
        for i in range(count):
            for t in range(4):
                write_image(folder / f"{split}{i}" / f"{t}.png", rng)
            rows.append([f"{split}{i}", split, f"{split}{i}", f"{split}{i}", i % 2, (i // 2) % 2])
    path = folder / "clips.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([["sample_id", "split", "group", "frames", "label:a", "label:b"], *rows])
    return path


def start_probe(tmp_path: Path, manifest: Path, *overrides: str) -> Callable[[], object]:
    return starter("probe", f"data.manifest={manifest}", f"output_dir={tmp_path / 'outputs'}", *overrides)


def test_probe_refuses_a_manifest_of_missing_or_corrupt_clips_before_a_run(mlflow_store, tmp_path):
    manifest = probe_manifest(tmp_path / "data")
    assert_refused_before_a_run(
        mlflow_store, start_probe(tmp_path, tmp_path / "absent.csv"), DataError, str(tmp_path / "absent.csv")
    )
    shutil.rmtree(tmp_path / "data" / "train1")
    assert_refused_before_a_run(mlflow_store, start_probe(tmp_path, manifest), DataError, str(manifest), "'train1'")
    probe_manifest(tmp_path / "data")
    cut_in_half(tmp_path / "data" / "val2" / "3.png")
    frame = str(tmp_path / "data" / "val2" / "3.png")
    assert_refused_before_a_run(mlflow_store, start_probe(tmp_path, manifest), DataError, str(manifest), frame)
    assert not (tmp_path / "outputs").exists()


def test_probe_refuses_a_single_train_clip_before_a_run(mlflow_store, tmp_path):
    """One train clip has no spread to standardise the features by: the probe's loss was NaN, in a FAILED run."""
    one = probe_manifest(tmp_path / "one", train=1)
    assert_refused_before_a_run(mlflow_store, start_probe(tmp_path, one), DataError, str(one), "split 'train'")
    four = probe_manifest(tmp_path / "four")
    for key in ("data.limit_clips", "data.max_train_clips"):
        assert_refused_before_a_run(mlflow_store, start_probe(tmp_path, four, f"{key}=1"), ConfigError, key)


def test_probe_refuses_a_missing_checkpoint_and_an_unmasked_sanity_pooling_before_a_run(mlflow_store, tmp_path):
    manifest = probe_manifest(tmp_path / "data")
    absent = tmp_path / "weights.safetensors"
    start = start_probe(tmp_path, manifest, f"backbone.checkpoint={absent}")
    assert_refused_before_a_run(mlflow_store, start, ConfigError, "backbone.checkpoint", str(absent))
    start = start_probe(tmp_path, manifest, "sanity.pooling=mean_visible")
    assert_refused_before_a_run(mlflow_store, start, ConfigError, "sanity.pooling", "data.input_mask_ratio")


# --------------------------------------------------------------------------------------------------------- caption
def write_tone(path: Path, samples: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = 0.1 * np.sin(np.arange(8000, dtype=np.float32) / 5) if samples is None else samples
    soundfile.write(path, wave, 16_000, subtype="FLOAT")


def audiocaps(root: Path, clips: tuple[int, int, int] = (8, 2, 2), audio: bool = True) -> Path:
    """AudioCaps look-alike: <split>.csv (1 caption per train clip, 5 otherwise) and audio/<split>/<youtube_id>.wav."""
    root.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "val", "test"), clips, strict=True):
        rows = []
        for i in range(count):
            for k in range(1 if split == "train" else 5):
                rows.append([f"{split}{i}{k}", f"{split}{i:02d}", "0", f"a dog barks {i} times, then {k}"])
            if audio:
                write_tone(root / "audio" / split / f"{split}{i:02d}.wav")
        with (root / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([["audiocap_id", "youtube_id", "start_time", "caption"], *rows])
    return root


def clotho(root: Path) -> Path:
    """Clotho look-alike: clotho_captions_<split>.csv and clotho_audio_<split>/<file_name>, two clips a split."""
    for split in ("development", "validation", "evaluation"):
        names = [f"{split} {i}.wav" for i in range(2)]
        for name in names:
            write_tone(root / f"clotho_audio_{split}" / name)
        with (root / f"clotho_captions_{split}.csv").open("w", newline="") as f:
            header = ["file_name", *(f"caption_{k}" for k in range(1, 6))]
            csv.writer(f).writerows([header, *([name, *(f"a bird sings {k}" for k in range(5))] for name in names)])
    return root


def start_caption(dataset: str, data_dir: Path, *overrides: str) -> Callable[[], object]:
    return starter("caption", f"data.dataset={dataset}", f"data.data_dir={data_dir}", "train.batch_size=4", *overrides)


def test_caption_refuses_missing_audio_frames_and_caption_files_before_a_run(mlflow_store, tmp_path):
    no_audio = audiocaps(tmp_path / "audiocaps", audio=False)  # an AudioCaps root without its audio/ folder
    assert_refused_before_a_run(
        mlflow_store, start_caption("audiocaps", no_audio), DataError, str(no_audio / "audio" / "train")
    )
    root = clotho(tmp_path / "clotho")
    shutil.rmtree(root / "clotho_audio_development")
    assert_refused_before_a_run(
        mlflow_store, start_caption("clotho", root), DataError, str(root / "clotho_audio_development")
    )
    root = audiocaps(tmp_path / "no-val-csv")
    (root / "val.csv").unlink()
    assert_refused_before_a_run(mlflow_store, start_caption("audiocaps", root), DataError, str(root / "val.csv"))
    video = tmp_path / "video"  # captions listed, no frames/ folder
    for split in ("train", "val", "test"):
        video.mkdir(exist_ok=True)
        (video / f"captions_{split}.csv").write_text(f"clip_id,caption_1\n{split}0,a red square moves left\n")
    start = start_caption("video", video, "model.encoder=vjepa2-tiny")
    assert_refused_before_a_run(mlflow_store, start, DataError, str(video / "frames"))


def _nan_samples(path: Path) -> None:
    write_tone(path, np.full(8000, np.nan, dtype=np.float32))


def _corrupt_body(path: Path) -> None:
    """A good header, then bytes that do not decode (soundfile.info reads it; reading the samples fails)."""
    path.unlink()
    path = path.with_suffix(".flac")
    soundfile.write(path, np.random.default_rng(0).uniform(-0.5, 0.5, 32_000), 16_000)
    data = bytearray(path.read_bytes())
    for i in range(200, len(data), 7):
        data[i] = (data[i] * 31 + 7) % 256
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("fault", [_nan_samples, _corrupt_body], ids=lambda f: f.__name__)
def test_caption_refuses_audio_that_does_not_decode_before_a_run(mlflow_store, tmp_path, fault):
    """Such files pass a header check and used to fail the feature cache inside the run. They count as missing:
    with max_missing_fraction=0 the reader refuses the split, naming the clip and its folder."""
    root = audiocaps(tmp_path / "audiocaps")
    fault(root / "audio" / "train" / "train03.wav")
    start = start_caption("audiocaps", root, "data.max_missing_fraction=0")
    assert_refused_before_a_run(mlflow_store, start, DataError, str(root / "audio" / "train"), "'train03'")


def test_caption_refuses_too_few_training_captions_before_a_run(mlflow_store, tmp_path):
    root = audiocaps(tmp_path / "audiocaps", clips=(3, 2, 2))  # 3 training captions, batch 4
    start = start_caption("audiocaps", root)
    assert_refused_before_a_run(mlflow_store, start, ConfigError, "train.batch_size", "3 training captions", str(root))


@pytest.mark.parametrize("split", ["val", "test"])
def test_caption_refuses_a_split_left_empty_by_skipped_audio_before_a_run(mlflow_store, tmp_path, split):
    """max_missing_fraction=1 lets the reader skip every clip of a split; the recipe must refuse it, which it did only
    inside the run (the feature cache of an empty split; without the cache, an empty test split after training)."""
    root = audiocaps(tmp_path / "audiocaps")
    shutil.rmtree(root / "audio" / split)
    start = start_caption("audiocaps", root, "data.max_missing_fraction=1")
    assert_refused_before_a_run(mlflow_store, start, DataError, str(root), f"split '{split}' has no clips")
