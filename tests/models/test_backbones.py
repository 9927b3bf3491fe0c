"""Backbones: specs, shapes, attentions, determinism of random init, fingerprints, LoRA target regexes."""

import logging
import re

import pytest
import torch

from avlm.errors import ModelError
from avlm.models import BackboneOutput, VideoBackbone, build_backbone, count_parameters


def clip(batch=2, frames=4, size=32, seed=0):
    return torch.randn(batch, frames, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def vjepa_tiny():
    return build_backbone("vjepa2-tiny", init_seed=0)


@pytest.fixture(scope="module")
def timm_tiny():
    return build_backbone("timm-tiny", init_seed=0)


def test_vjepa2_tiny_attributes_and_parameter_count(vjepa_tiny):
    b = vjepa_tiny
    assert isinstance(b, VideoBackbone)
    assert (b.name, b.revision, b.feature_dim, b.image_size, b.num_frames) == ("vjepa2-tiny", None, 48, 32, 4)
    assert b.mean == (0.485, 0.456, 0.406) and b.std == (0.229, 0.224, 0.225)
    assert len(b.blocks()) == 2
    # Encoder by hand: Conv3d 3*2*8*8*48+48; per layer 2 norms (4*48), q/k/v/proj 4*(48*48+48), fc1 48*96+96,
    # fc2 96*48+48; final norm 2*48.
    layer = 4 * 48 + 4 * (48 * 48 + 48) + (48 * 96 + 96) + (96 * 48 + 48)
    encoder = (3 * 2 * 8 * 8 * 48 + 48) + 2 * layer + 2 * 48
    assert sum(p.numel() for p in b.model.encoder.parameters()) == encoder == 56_496
    assert count_parameters(b) == (66_192, 66_192)  # the (never run) predictor holds the other 9,696


def test_vjepa2_tiny_tokens_and_eager_attentions(vjepa_tiny):
    out = vjepa_tiny(clip(), output_attentions=True)
    assert isinstance(out, BackboneOutput)
    # (4 frames / tubelet 2) * (32 / 8)^2 = 32 tokens of width 48.
    assert out.tokens.shape == (2, 32, 48)
    assert len(out.attentions) == 2
    for attention in out.attentions:
        assert attention.shape == (2, 2, 32, 32)
        torch.testing.assert_close(attention.sum(-1), torch.ones(2, 2, 32), atol=1e-5, rtol=0)
    assert vjepa_tiny(clip()).attentions is None
    torch.testing.assert_close(vjepa_tiny(clip()).tokens, out.tokens)


def test_random_init_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(1)
    state = torch.get_rng_state()
    a = build_backbone("vjepa2-tiny", init_seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    b = build_backbone("vjepa2-tiny", init_seed=7)
    c = build_backbone("vjepa2-tiny", init_seed=8)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(
        a.model.encoder.layer[0].attention.query.weight, c.model.encoder.layer[0].attention.query.weight
    )
    t1, t2 = build_backbone("timm-tiny", init_seed=3), build_backbone("timm-tiny", init_seed=3)
    assert all(torch.equal(x, y) for x, y in zip(t1.state_dict().values(), t2.state_dict().values(), strict=True))


def test_fingerprint_is_stable_and_tracks_what_changes_features(vjepa_tiny):
    fp = vjepa_tiny.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", fp)
    assert build_backbone("vjepa2-tiny", init_seed=0).fingerprint() == fp
    others = {
        build_backbone("vjepa2-tiny", init_seed=1).fingerprint(),
        build_backbone("vjepa2-tiny", num_frames=8).fingerprint(),
        build_backbone("vjepa2-tiny", image_size=48).fingerprint(),
        build_backbone("timm-tiny").fingerprint(),
    }
    assert fp not in others and len(others) == 4


def test_vjepa2_from_local_path_matches_and_switches_to_eager_only_for_attentions(vjepa_tiny, tmp_path):
    vjepa_tiny.model.save_pretrained(tmp_path)
    loaded = build_backbone(f"vjepa2:{tmp_path}")
    assert loaded.name == f"vjepa2:{tmp_path}" and loaded.image_size == 32 and loaded.feature_dim == 48
    assert loaded.model.config._attn_implementation == "sdpa"
    x = clip(seed=3)
    with torch.no_grad():
        expected = vjepa_tiny(x, output_attentions=True)
        plain = loaded(x)
        with_attn = loaded(x, output_attentions=True)
    torch.testing.assert_close(plain.tokens, expected.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(with_attn.tokens, expected.tokens, atol=1e-5, rtol=1e-5)
    assert len(with_attn.attentions) == 2
    for got, want in zip(with_attn.attentions, expected.attentions, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert loaded.model.config._attn_implementation == "sdpa"  # back to the fast kernel
    assert loaded.fingerprint() != vjepa_tiny.fingerprint()
    # Not pretrained: the config only, randomly initialised from the seed.
    random = build_backbone(f"vjepa2:{tmp_path}", pretrained=False, init_seed=5)
    assert not torch.allclose(random(x).tokens, plain.tokens)


def test_vjepa2_missing_path_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="could not load backbone"):
        build_backbone(f"vjepa2:{tmp_path / 'absent'}")


def test_timm_tiny_is_per_frame(timm_tiny):
    b = timm_tiny
    assert (b.feature_dim, b.image_size, b.num_frames) == (48, 32, 4)
    assert b.mean == (0.5, 0.5, 0.5) and b.std == (0.5, 0.5, 0.5)
    assert count_parameters(b) == (66_768, 66_768)
    x = clip(batch=2, frames=4)
    out = b(x)
    assert out.tokens.shape == (2, 4, 48) and out.attentions is None
    with torch.no_grad():
        frame = b.model.forward_head(b.model.forward_features(x[1, 2:3]), pre_logits=True)
    torch.testing.assert_close(out.tokens[1, 2:3], frame)


def test_timm_attentions_fold_frames_into_batch(timm_tiny):
    x = clip(batch=2, frames=4)
    fused_before = [blk.attn.fused_attn for blk in timm_tiny.model.blocks]
    out = timm_tiny(x, output_attentions=True)
    assert [blk.attn.fused_attn for blk in timm_tiny.model.blocks] == fused_before
    assert len(out.attentions) == 2
    for attention in out.attentions:
        assert attention.shape == (8, 2, 17, 17)  # (B*T, heads, cls + 16 patches, same)
        torch.testing.assert_close(attention.sum(-1), torch.ones(8, 2, 17), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.tokens, timm_tiny(x).tokens, atol=1e-5, rtol=1e-5)


def test_timm_without_vit_blocks_returns_no_attentions_and_warns_once(caplog):
    b = build_backbone("timm:resnet10t", pretrained=False, image_size=32, num_frames=2)
    assert b.feature_dim == 512 and b.mean == (0.485, 0.456, 0.406)
    with caplog.at_level(logging.WARNING, logger="avlm.models.backbones"):
        first = b(clip(batch=1, frames=2), output_attentions=True)
        b(clip(batch=1, frames=2), output_attentions=True)
    assert first.tokens.shape == (1, 2, 512) and first.attentions is None
    assert sum("no ViT attention blocks" in r.getMessage() for r in caplog.records) == 1


def test_timm_named_model_takes_its_data_config():
    b = build_backbone("timm:vit_tiny_patch16_224", pretrained=False, image_size=32, num_frames=1)
    assert (b.feature_dim, b.image_size) == (192, 32)
    assert b.mean == (0.5, 0.5, 0.5)
    assert b(clip(batch=1, frames=1)).tokens.shape == (1, 1, 192)


@pytest.mark.parametrize("spec", ["vjepa2", "vjepa2:", "timm:", "clip-vit", ""])
def test_unknown_spec_lists_accepted_forms(spec):
    with pytest.raises(ModelError, match="vjepa2-tiny, vjepa2:<hf id or path>, timm-tiny or timm:<model name>"):
        build_backbone(spec)


def test_bad_frame_counts_and_input_shapes(vjepa_tiny):
    with pytest.raises(ModelError, match="num_frames 3"):
        build_backbone("vjepa2-tiny", num_frames=3)
    with pytest.raises(ModelError, match="image_size 30"):
        build_backbone("vjepa2-tiny", image_size=30)
    with pytest.raises(ModelError, match=r"\(B, 4, 3, 32, 32\)"):
        vjepa_tiny(clip(size=48))


def test_lora_regex_targets_encoder_projections_only(vjepa_tiny, timm_tiny):
    regex = vjepa_tiny.lora_target_regex(["query", "key", "value"])
    matched = sorted(n for n, _ in vjepa_tiny.model.named_modules() if re.fullmatch(regex, n))
    assert matched == [f"encoder.layer.{i}.attention.{p}" for i in range(2) for p in ("key", "query", "value")]
    assert vjepa_tiny.lora_target_regex(["v_proj"]) == vjepa_tiny.lora_target_regex(["value"])
    timm_regex = timm_tiny.lora_target_regex(["value"])
    assert sorted(n for n, _ in timm_tiny.model.named_modules() if re.fullmatch(timm_regex, n)) == [
        "blocks.0.attn.qkv",
        "blocks.1.attn.qkv",
    ]
    with pytest.raises(ModelError, match="unknown LoRA target"):
        vjepa_tiny.lora_target_regex(["qkv"])
