"""AVE features: the config, token costs, the frozen frame encoders, and the cache (values, reuse, keys, races)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from avlm.ave import features as features_module
from avlm.ave.features import (
    AveFeatures,
    AveFeaturesConfig,
    audio_encoder_fingerprint,
    build_frame_encoder,
    frame_encoder_fingerprint,
    frame_pixels,
    load_ave_features,
    tokens_for_resolution,
)
from avlm.data.ave import load_ave_splits, read_clip_audio, read_clip_frames
from avlm.data.ave_demo import ensure_ave_demo
from avlm.errors import ConfigError, DataError, ModelError
from avlm.models.captioner import _AUDIO_TINY_CONFIG, build_audio_encoder

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------------------------------------------
# Config and token costs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"visual_backbone": "resnet"}, "features.visual_backbone"),
        ({"visual_backbone": "timm:"}, "features.visual_backbone"),
        ({"stage1_visual_backbone": "clip"}, "features.stage1_visual_backbone"),
        ({"audio_encoder": "wavlm"}, "features.audio_encoder"),
        ({"resolutions": []}, "features.resolutions"),
        ({"resolutions": [56, 0]}, "features.resolutions"),
        ({"resolutions": [56, 80, 56]}, "features.resolutions"),
        ({"batch_size": 0}, "features.batch_size"),
    ],
)
def test_bad_config_names_the_key(overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config key '{key}': "):
        AveFeaturesConfig(**overrides)


def test_token_costs_of_the_demo_and_the_study() -> None:
    assert [tokens_for_resolution(r, 8) for r in (56, 80, 112, 176)] == [49, 100, 196, 484]
    assert [tokens_for_resolution(r, 16) for r in (112, 160, 224, 352, 448)] == [49, 100, 196, 484, 784]
    # The contract's budgets: uniform 112 = 1 anchor at 176 = 2 anchors at 176.
    assert 10 * 196 == 484 + 6 * 196 + 3 * 100 == 2 * 484 + 2 * 196 + 6 * 100 == 1960
    for resolution, patch in ((100, 8), (4, 8), (120, 16)):
        with pytest.raises(ConfigError, match=r"^config key 'features.resolutions': .*multiple of the patch size"):
            tokens_for_resolution(resolution, patch)


# ----------------------------------------------------------------------------------------------------------------
# Frame encoders
# ----------------------------------------------------------------------------------------------------------------
def test_vit_tiny_returns_its_cls_token_at_every_resolution() -> None:
    encoder = build_frame_encoder("vit-tiny")
    assert (encoder.patch_size, encoder.feature_dim, encoder.pooling) == (8, 48, "cls")
    assert encoder.mean == encoder.std == (0.5, 0.5, 0.5)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    generator = torch.Generator().manual_seed(0)
    for resolution in (56, 80, 112, 176):
        pixels = torch.randn(2, 3, resolution, resolution, generator=generator)
        embedded = encoder(pixels)
        assert embedded.shape == (2, 48)
        with torch.no_grad():
            cls = encoder.model.forward_features(pixels)[:, 0]  # the final norm's output at the CLS position
        torch.testing.assert_close(embedded, cls, rtol=0, atol=0)


def test_vit_tiny_is_reproducible_and_fingerprinted_without_building() -> None:
    pixels = torch.randn(1, 3, 80, 80, generator=torch.Generator().manual_seed(1))
    first, again, other = (build_frame_encoder("vit-tiny", init_seed=s) for s in (0, 0, 1))
    assert torch.equal(first(pixels), again(pixels))
    assert not torch.allclose(first(pixels), other(pixels))
    assert first.fingerprint() == again.fingerprint() == frame_encoder_fingerprint("vit-tiny", init_seed=0)
    assert other.fingerprint() == frame_encoder_fingerprint("vit-tiny", init_seed=1) != first.fingerprint()
    # pretrained=True cannot make a random tiny model pretrained: same weights, same fingerprint.
    assert frame_encoder_fingerprint("vit-tiny", pretrained=False) == first.fingerprint()


def test_frame_encoder_refuses_bad_specs_and_inputs() -> None:
    with pytest.raises(ModelError, match="unknown frame encoder"):
        build_frame_encoder("vit-huge")
    with pytest.raises(ModelError, match="could not build frame encoder 'timm:no_such_model_x'"):
        build_frame_encoder("timm:no_such_model_x", pretrained=False)
    with pytest.raises(ModelError, match="could not load the config"):
        build_frame_encoder("hf:/nonexistent/model/dir")
    encoder = build_frame_encoder("vit-tiny")
    with pytest.raises(ModelError, match="100 px is not a multiple of its patch size 8"):
        encoder(torch.zeros(1, 3, 100, 100))
    with pytest.raises(ModelError, match=r"expects \(B, 3, r, r\)"):
        encoder(torch.zeros(1, 3, 80, 96))


def test_timm_cnn_uses_its_own_pooling_and_stride() -> None:
    encoder = build_frame_encoder("timm:resnet18", pretrained=False)
    assert (encoder.patch_size, encoder.feature_dim, encoder.pooling) == (32, 512, "avg")
    assert encoder(torch.zeros(2, 3, 64, 64)).shape == (2, 512)


def _save_hf_vision_model(kind: str, folder: Path) -> Path:
    """A tiny random CLIP / SigLIP / DINOv2 vision model with an image processor, saved as from the Hub."""
    import transformers as tf

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, patch_size=8)
    torch.manual_seed(0)
    if kind == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(image_size=32, **common))
        processor = tf.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    elif kind == "clip-both-towers":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=99)
        config = tf.CLIPConfig(vision_config=dict(image_size=32, **common), text_config=text)
        config.text_config.bos_token_id, config.text_config.eos_token_id = 0, 1
        model = tf.CLIPModel(config)
        processor = tf.CLIPImageProcessor(image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6])
    elif kind == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(image_size=32, **common))
        processor = tf.SiglipImageProcessor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        model = tf.Dinov2Model(tf.Dinov2Config(image_size=32, **common))
        processor = tf.BitImageProcessor(image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("kind", "pooling"), [("clip", "cls"), ("clip-both-towers", "cls"), ("siglip", "map"), ("dinov2", "cls")]
)
def test_hf_vision_towers_give_their_pooled_output_at_any_resolution(kind: str, pooling: str, tmp_path: Path) -> None:
    from transformers import AutoImageProcessor, AutoModel

    folder = _save_hf_vision_model(kind, tmp_path / kind)
    spec = f"hf:{folder}"
    encoder = build_frame_encoder(spec)
    processor = AutoImageProcessor.from_pretrained(folder)
    assert (encoder.patch_size, encoder.feature_dim, encoder.pooling) == (8, 32, pooling)
    assert encoder.mean == pytest.approx(processor.image_mean) and encoder.std == pytest.approx(processor.image_std)
    assert encoder.fingerprint() == frame_encoder_fingerprint(spec)
    reference = AutoModel.from_pretrained(folder).eval()
    reference = getattr(reference, "vision_model", reference)
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(0))  # not the 32 px it was made at
    extra = {} if kind == "dinov2" else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        expected = reference(pixel_values=pixels, **extra).pooler_output
    torch.testing.assert_close(encoder(pixels), expected)
    assert encoder(pixels[:, :, :16, :16]).shape == (2, 32)

    random_init = build_frame_encoder(spec, pretrained=False, init_seed=3)
    assert random_init.fingerprint() == frame_encoder_fingerprint(spec, pretrained=False, init_seed=3)
    assert random_init.fingerprint() != encoder.fingerprint()
    assert not torch.allclose(random_init(pixels), expected)


def test_frame_pixels_resizes_with_antialias_so_a_fine_grating_turns_grey() -> None:
    # Columns alternate 0 / 255 (period 2 px): halving the size averages each output pixel's triangle filter
    # (weights 1/8, 3/8, 3/8, 1/8 over 4 columns) to exactly 0.5 away from the borders.
    stripes = np.zeros((16, 16, 3), dtype=np.uint8)
    stripes[:, 1::2] = 255
    flat = np.full((12, 20, 3), 51, dtype=np.uint8)  # not square: squashed to r×r, no crop
    out = frame_pixels([Image.fromarray(stripes), Image.fromarray(flat)], 8, (0.5, 0.0, 0.2), (0.5, 1.0, 0.2))
    assert out.shape == (2, 3, 8, 8)
    torch.testing.assert_close(out[0, 0, 1:-1, 1:-1], torch.zeros(6, 6), rtol=0, atol=1e-6)  # (0.5 - 0.5) / 0.5
    torch.testing.assert_close(out[0, 1, 1:-1, 1:-1], torch.full((6, 6), 0.5), rtol=0, atol=1e-6)
    # 51 / 255 = 0.2 everywhere, normalised per channel: (0.2 - 0.5) / 0.5, (0.2 - 0) / 1, (0.2 - 0.2) / 0.2
    torch.testing.assert_close(out[1], torch.tensor([-0.6, 0.2, 0.0]).view(3, 1, 1).expand(3, 8, 8))


# ----------------------------------------------------------------------------------------------------------------
# Audio encoder fingerprints
# ----------------------------------------------------------------------------------------------------------------
def test_audio_fingerprint_without_building_equals_the_encoders(tmp_path: Path) -> None:
    from transformers import ASTConfig, ASTFeatureExtractor, Wav2Vec2FeatureExtractor, WavLMConfig, WavLMModel

    for seed in (0, 3):
        assert (
            audio_encoder_fingerprint("audio-tiny", init_seed=seed)
            == build_audio_encoder("audio-tiny", init_seed=seed).fingerprint()
        )
    assert audio_encoder_fingerprint("audio-tiny", init_seed=0) != audio_encoder_fingerprint("audio-tiny", init_seed=3)
    wavlm = tmp_path / "wavlm"
    config = WavLMConfig(**_AUDIO_TINY_CONFIG)
    WavLMModel(config).save_pretrained(wavlm)
    Wav2Vec2FeatureExtractor(sampling_rate=16000).save_pretrained(wavlm)
    assert audio_encoder_fingerprint(f"hf:{wavlm}") == build_audio_encoder(f"hf:{wavlm}").fingerprint()
    ast = tmp_path / "ast"
    ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(ast)
    ASTFeatureExtractor().save_pretrained(ast)
    with pytest.raises(ModelError, match="not a time sequence"):
        audio_encoder_fingerprint(f"hf:{ast}")


# ----------------------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------------------
IDS = [f"demo{n:05d}" for n in range(8)]
CONFIG = dict(resolutions=[80, 56], batch_size=20)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, AveFeatures]:
    """The (4, 2, 2) demo, its features at 56 and 80 px computed once into a cache, and those features."""
    demo = ensure_ave_demo(tmp_path_factory.mktemp("ave_features_demo"), seed=0, videos=(4, 2, 2))
    cache = tmp_path_factory.mktemp("ave_features_cache")
    features = load_ave_features(demo, IDS, AveFeaturesConfig(cache_dir=str(cache), **CONFIG))
    return demo, cache, features


@pytest.fixture
def root(built: tuple, tmp_path: Path) -> Path:
    """A private copy of the demo (tests touch and delete its files); copies keep sizes and mtimes."""
    return Path(shutil.copytree(built[0], tmp_path / "data"))


@pytest.fixture
def cfg(built: tuple, tmp_path: Path) -> AveFeaturesConfig:
    """The module's config on a private copy of its filled cache."""
    return AveFeaturesConfig(cache_dir=str(shutil.copytree(built[1], tmp_path / "cache")), **CONFIG)


class BuildCounter:
    """Counts the frame / audio encoders built by load_ave_features (the real ones are built)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.frame: list[str] = []
        self.audio: list[str] = []
        frame, audio = features_module.build_frame_encoder, features_module.build_audio_encoder

        def count_frame(spec: str, **kwargs):
            self.frame.append(spec)
            return frame(spec, **kwargs)

        def count_audio(spec: str, **kwargs):
            self.audio.append(spec)
            return audio(spec, **kwargs)

        monkeypatch.setattr(features_module, "build_frame_encoder", count_frame)
        monkeypatch.setattr(features_module, "build_audio_encoder", count_audio)


def test_features_are_the_encoders_outputs(built: tuple) -> None:
    root, _, features = built
    assert features.video_ids == IDS
    assert features.index([IDS[6], IDS[1]]) == [6, 1]
    assert features.tokens == {56: 49, 80: 100}
    assert sorted(features.visual) == [56, 80] and features.stage1_visual is features.visual
    assert features.visual[80].shape == (8, 10, 48) and features.visual[80].dtype == torch.float32
    assert features.audio.shape == (8, 10, 32) and features.audio_rms.shape == (8, 10)

    encoder = build_frame_encoder("vit-tiny")
    frames = read_clip_frames(root, IDS[6])
    for resolution in (56, 80):
        expected = encoder(frame_pixels(frames, resolution, encoder.mean, encoder.std))
        torch.testing.assert_close(features.visual[resolution][6], expected, rtol=1e-4, atol=1e-5)

    waveform = read_clip_audio(root, IDS[6])
    rms = np.sqrt(np.mean(waveform.astype(np.float64).reshape(10, 16000) ** 2, axis=1))
    np.testing.assert_allclose(features.audio_rms[6].numpy(), rms, rtol=1e-6)
    with torch.no_grad():
        tokens = build_audio_encoder("audio-tiny")(torch.from_numpy(waveform)[None]).tokens[0]
    assert tokens.shape[0] == 499  # one token per 20 ms: second s holds tokens round(49.9 s) .. round(49.9 (s + 1))
    bounds = [0, 50, 100, 150, 200, 250, 299, 349, 399, 449, 499]
    expected = torch.stack([tokens[a:b].mean(dim=0) for a, b in zip(bounds[:-1], bounds[1:], strict=True)])
    torch.testing.assert_close(features.audio[6], expected, rtol=1e-4, atol=1e-5)

    # The demo's audio cue shows in the cached RMS: event seconds are the loud ones.
    splits = load_ave_splits(root)
    labels = {c.video_id: c.labels(splits.classes) for clips in splits.clips.values() for c in clips}
    for row, video_id in enumerate(IDS):
        event = labels[video_id] > 0
        assert features.audio_rms[row][event].min() > 5 * features.audio_rms[row][~event].max()

    with pytest.raises(DataError, match="1 video id.*no cached AVE features: demo99999"):
        features.index(["demo99999"])


def test_second_call_builds_no_encoder(
    built: tuple, root: Path, cfg: AveFeaturesConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder was built although every cache entry exists")

    monkeypatch.setattr(features_module, "build_frame_encoder", refuse)
    monkeypatch.setattr(features_module, "build_audio_encoder", refuse)
    first = built[2]
    again = load_ave_features(root, [IDS[5], *reversed(IDS), IDS[0]], cfg)  # any order, repeats: the same rows
    assert again.video_ids == IDS
    for resolution in (56, 80):
        assert torch.equal(again.visual[resolution], first.visual[resolution])
    assert torch.equal(again.audio, first.audio) and torch.equal(again.audio_rms, first.audio_rms)
    assert again.key == first.key
    cache = Path(cfg.cache_dir)
    assert sorted(p.name.split("_")[1] for p in cache.glob("*.safetensors")) == ["audio", "visual", "visual"]
    assert not list(cache.rglob("*.tmp"))


def test_changed_inputs_rebuild_only_their_entries(
    built: tuple, root: Path, cfg: AveFeaturesConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = built[2]
    counted = BuildCounter(monkeypatch)
    frame = root / "frames" / IDS[2] / "4.jpg"
    os.utime(frame, ns=(frame.stat().st_atime_ns, frame.stat().st_mtime_ns + 10**9))
    touched = load_ave_features(root, IDS, cfg)
    assert (counted.frame, counted.audio) == (["vit-tiny"], [])
    assert touched.key["frames"] != first.key["frames"] and touched.key["audio"] == first.key["audio"]
    assert touched.key["visual/80"] != first.key["visual/80"]
    torch.testing.assert_close(touched.visual[80], first.visual[80], rtol=1e-5, atol=1e-6)

    wav = root / "audio" / f"{IDS[3]}.wav"
    os.utime(wav, ns=(wav.stat().st_atime_ns, wav.stat().st_mtime_ns + 10**9))
    load_ave_features(root, IDS, cfg)
    assert (counted.frame, counted.audio) == (["vit-tiny"], ["audio-tiny"])

    # Another id list, another seed: other entries (two clips keep it cheap).
    subset = load_ave_features(root, IDS[:2], cfg)
    torch.testing.assert_close(subset.visual[80], first.visual[80][:2], rtol=1e-5, atol=1e-6)
    reseeded = load_ave_features(root, IDS[:2], dataclasses.replace(cfg, init_seed=1))
    assert (counted.frame, counted.audio) == (["vit-tiny"] * 3, ["audio-tiny"] * 3)
    assert reseeded.key["visual_backbone"] == frame_encoder_fingerprint("vit-tiny", init_seed=1)
    assert reseeded.key["audio_encoder"] == audio_encoder_fingerprint("audio-tiny", init_seed=1)
    assert not torch.allclose(reseeded.visual[80], subset.visual[80])


def test_foreign_or_corrupt_entries_are_refused_and_rebuilt(
    built: tuple, root: Path, cfg: AveFeaturesConfig, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    first = built[2]
    cache = Path(cfg.cache_dir)
    visual80, visual56 = cache / first.key["visual/80"], cache / first.key["visual/56"]
    # A file of the right name holding another entry's key and values (e.g. copied into place).
    save_file({"features": torch.zeros(8, 10, 48)}, str(visual80), metadata={"key": json.dumps({"kind": "other"})})
    visual56.write_bytes(visual56.read_bytes()[:100])  # truncated
    counted = BuildCounter(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="avlm.ave.features"):
        again = load_ave_features(root, IDS, cfg)
    assert "stores another key; refusing it and rebuilding it" in caplog.text
    assert "is unreadable" in caplog.text
    assert counted.frame == ["vit-tiny"] and counted.audio == []
    for resolution in (56, 80):
        torch.testing.assert_close(again.visual[resolution], first.visual[resolution], rtol=1e-5, atol=1e-6)
    with safe_open(str(visual80), framework="pt") as f:
        assert json.loads(f.metadata()["key"])["resolution"] == 80


def test_a_separate_stage1_backbone(root: Path, cfg: AveFeaturesConfig) -> None:
    cfg = dataclasses.replace(cfg, resolutions=[64, 96], stage1_visual_backbone="timm:resnet18", pretrained=False)
    features = load_ave_features(root, IDS[:2], cfg)
    assert features.tokens == {64: 64, 96: 144}  # the Stage-2 backbone's patch 8
    assert features.visual[96].shape == (2, 10, 48) and features.stage1_visual[96].shape == (2, 10, 512)
    assert features.key["stage1_visual_backbone"] == frame_encoder_fingerprint("timm:resnet18", pretrained=False)
    assert features.key["stage1_visual/96"] != features.key["visual/96"]
    with pytest.raises(ConfigError, match=r"config key 'features.resolutions': 80 px .* backbone 'timm:resnet18'"):
        load_ave_features(root, IDS[:2], dataclasses.replace(cfg, resolutions=[80]))


def test_missing_or_no_data_is_named(root: Path, cfg: AveFeaturesConfig) -> None:
    (root / "frames" / IDS[1] / "3.jpg").unlink()
    (root / "audio" / f"{IDS[2]}.wav").unlink()
    with pytest.raises(DataError, match=r"2 problem\(s\).*demo00001: no frames/demo00001/3.jpg; demo00002: no audio"):
        load_ave_features(root, IDS, cfg)
    with pytest.raises(DataError, match="no AVE video ids"):
        load_ave_features(root, [], cfg)


def test_atomic_replace_keeps_the_old_file_when_a_write_fails(tmp_path: Path) -> None:
    path = tmp_path / "entry.safetensors"
    path.write_bytes(b"old")

    def fail(tmp: str) -> None:
        Path(tmp).write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        features_module._replace_atomically(path, fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["entry.safetensors"]


_RACER = textwrap.dedent(
    """
    import sys
    from avlm.ave.features import AveFeaturesConfig, load_ave_features
    root, cache = sys.argv[1:3]
    ids = ["demo00000", "demo00001"]
    features = load_ave_features(root, ids, AveFeaturesConfig(resolutions=[56], cache_dir=cache))
    print(repr(float(features.visual[56].double().sum())), repr(float(features.audio.double().sum())))
    """
)


@pytest.mark.slow
def test_two_processes_racing_end_with_one_valid_file(built: tuple, tmp_path: Path) -> None:
    root = built[0]
    cache = tmp_path / "race"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", _RACER, str(root), str(cache)], stdout=subprocess.PIPE, env=env, text=True
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=300)[0] for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0]
    assert outputs[0] == outputs[1]
    files = sorted(p.name.split("_")[1] for p in cache.glob("*.safetensors"))
    assert files == ["audio", "visual"] and not list(cache.rglob("*.tmp"))
    again = load_ave_features(root, IDS[:2], AveFeaturesConfig(resolutions=[56], cache_dir=str(cache)))
    assert outputs[0].split() == [repr(float(again.visual[56].double().sum())), repr(float(again.audio.double().sum()))]
