"""Anatomy token masks, the key bias in the pooler and inside the backbones, and the streaming attention probe."""

import pytest
import torch

from avlm.errors import ModelError
from avlm.models import ClassificationHead, TokenLayout, VideoClassifier, build_backbone
from avlm.models.attention_bias import MASKED_KEY_BIAS, additive_key_bias, anatomy_token_mask, attention_probe

VJEPA2_LAYOUT = TokenLayout(time_steps=2, frames_per_step=2, grid=4, patch_size=8)
TIMM_LAYOUT = TokenLayout(time_steps=4, frames_per_step=1, grid=4, patch_size=8, prefix_tokens=1)


def clip(batch=3, seed=0):
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def patches(*cells, grid=4):
    """(grid²,) bool with the given (row, col) patches True."""
    out = torch.zeros(grid, grid, dtype=torch.bool)
    for row, col in cells:
        out[row, col] = True
    return out.flatten()


def random_token_mask(batch, tokens, seed=0, unmasked_clip=None):
    mask = torch.rand(batch, tokens, generator=torch.Generator().manual_seed(seed)) > 0.5
    if unmasked_clip is not None:
        mask[unmasked_clip] = True
    return mask


def make_classifier(spec="vjepa2-tiny", masked_layers=(), **kwargs):
    torch.manual_seed(0)
    backbone = build_backbone(spec, init_seed=0, **kwargs)
    head = ClassificationHead(backbone.feature_dim, 3, num_heads=4, hidden_dim=16)
    return VideoClassifier(backbone, head, masked_layers=masked_layers).eval()


# --- anatomy_token_mask -------------------------------------------------------------------------------------------


def test_anatomy_token_mask_hand_case():
    seg = torch.full((4, 4, 32, 32), -1, dtype=torch.int64)
    # clip 0: frame 0 marks one pixel of patch (0, 1) as cystic_artery; frame 1 has no mask; frames 2-3 have
    # masks with background only, so step 1 allows no patch.
    seg[0, 0] = 0
    seg[0, 0, 3, 12] = 3
    seg[0, 2:] = 0
    # clip 1: no mask at all; clip 2: masks with no anatomy; clip 3: anatomy in patch (3, 3) of frame 1 only, and
    # step 1 has no mask.
    seg[2] = 0
    seg[3, 1] = 0
    seg[3, 1, 24:, 30:] = 1
    has_mask = torch.tensor([True, False, True, True])
    allowed, applied = anatomy_token_mask(seg, has_mask, VJEPA2_LAYOUT)
    assert allowed.shape == (4, 32) and allowed.dtype == torch.bool
    assert applied.tolist() == [True, False, False, True]
    assert torch.equal(allowed[0], torch.cat([patches((0, 1)), patches()]))
    assert allowed[1].all() and allowed[2].all()
    assert torch.equal(allowed[3], torch.cat([patches((3, 3)), torch.ones(16, dtype=torch.bool)]))

    dilated, _ = anatomy_token_mask(seg, has_mask, VJEPA2_LAYOUT, dilation=1)
    assert torch.equal(dilated[0, :16], patches((0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)))
    assert torch.equal(dilated[3, :16], patches((2, 2), (2, 3), (3, 2), (3, 3)))
    assert torch.equal(dilated[0, 16:], patches())


def test_anatomy_token_mask_keeps_prefix_tokens_per_frame():
    seg = torch.zeros(1, 4, 32, 32, dtype=torch.int64)
    seg[0, 2, 8:16, 0:8] = 4  # frame 2, patch (1, 0)
    allowed, applied = anatomy_token_mask(seg, torch.tensor([True]), TIMM_LAYOUT)
    cls = torch.ones(1, dtype=torch.bool)
    expected = torch.cat([cls, patches(), cls, patches(), cls, patches((1, 0)), cls, patches()])
    assert applied.tolist() == [True] and torch.equal(allowed[0], expected)


def test_anatomy_token_mask_errors():
    with pytest.raises(ModelError, match=r"expected \(B, 4, 32, 32\)"):
        anatomy_token_mask(torch.zeros(1, 4, 16, 16, dtype=torch.int64), torch.tensor([True]), VJEPA2_LAYOUT)
    with pytest.raises(ModelError, match="dilation=-1"):
        anatomy_token_mask(torch.zeros(1, 4, 32, 32, dtype=torch.int64), torch.tensor([True]), VJEPA2_LAYOUT, -1)


def test_additive_key_bias_is_finite():
    bias = additive_key_bias(torch.tensor([[True, False]]), torch.float16)
    assert bias.tolist() == [[0.0, MASKED_KEY_BIAS]] and torch.isfinite(bias).all()


# --- pooler ------------------------------------------------------------------------------------------------------


def test_pooler_without_mask_is_bit_for_bit_the_plain_attention():
    head = make_classifier().head
    tokens = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(1))
    pooler = head.pooler
    keys = pooler.norm(tokens)
    reference, reference_attention = pooler.attention(
        pooler.queries.expand(3, -1, -1), keys, keys, need_weights=True, average_attn_weights=False
    )
    pooled, attention = pooler(tokens, None)
    assert torch.equal(pooled, reference.flatten(1)) and torch.equal(attention, reference_attention)
    logits, _ = head(tokens)
    assert torch.equal(logits, head(tokens, token_mask=None)[0])


def test_pooler_mask_leaves_no_mass_outside_and_unmasked_clips_unchanged():
    head = make_classifier().head
    tokens = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(1))
    mask = random_token_mask(3, 32, unmasked_clip=2)
    mask[1] = False  # every token masked: the same finite bias on every key, so no NaN and (nearly) no change
    logits, attention = head(tokens, mask)
    plain_logits, plain_attention = head(tokens)
    assert (attention[0][..., ~mask[0]] < 1e-6).all()
    torch.testing.assert_close(attention[0].sum(-1), torch.ones(4, 1))
    assert torch.isfinite(attention[1]).all()
    torch.testing.assert_close(attention[1], plain_attention[1], rtol=0, atol=5e-3)
    torch.testing.assert_close(attention[2], plain_attention[2], rtol=0, atol=1e-7)
    torch.testing.assert_close(logits[2], plain_logits[2], rtol=0, atol=1e-6)
    with pytest.raises(ModelError, match=r"shape \(3, 32\)"):
        head(tokens, mask[:, :5])


def test_mean_pooling_refuses_a_mask():
    head = ClassificationHead(48, 3, pooling="mean", hidden_dim=8)
    with pytest.raises(ModelError, match="mean pooling"):
        head(torch.randn(1, 4, 48), torch.ones(1, 4, dtype=torch.bool))


# --- backbone -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_vjepa2_without_masks_is_bit_for_bit_the_plain_model(implementation):
    model = make_classifier()
    model.backbone.base_model().set_attn_implementation(implementation)
    x = clip()
    out = model(x, pooler_mask=None, backbone_mask=None)
    reference = model.backbone.model(pixel_values_videos=x, skip_predictor=True).last_hidden_state
    assert torch.equal(model.backbone_tokens(x), reference)
    assert torch.equal(out.logits, model.head(reference)[0])


def test_vjepa2_backbone_mask_at_chosen_layers():
    model = make_classifier(masked_layers=[1])
    x = clip()
    mask = random_token_mask(3, 32, unmasked_clip=1)
    plain = model(x, output_attentions=True)
    masked = model(x, output_attentions=True, backbone_mask=mask, pooler_mask=mask)
    layer1 = masked.backbone_attentions[1]
    for b in (0, 2):
        assert (layer1[b][..., ~mask[b]] < 1e-6).all()
        assert (masked.pooler_attention[b][..., ~mask[b]] < 1e-6).all()
    # Layer 0 is not masked: the same as without the bias.
    assert torch.equal(masked.backbone_attentions[0], plain.backbone_attentions[0])
    # The clip whose mask allows everything is unchanged.
    torch.testing.assert_close(layer1[1], plain.backbone_attentions[1][1], rtol=0, atol=1e-7)
    torch.testing.assert_close(masked.logits[1], plain.logits[1], rtol=0, atol=1e-6)
    assert not torch.allclose(masked.logits[0], plain.logits[0])


def test_vjepa2_sdpa_bias_equals_eager_bias_and_all_layers_by_default():
    model = make_classifier()
    x = clip()
    mask = random_token_mask(3, 32, unmasked_clip=1)
    eager = model(x, output_attentions=True, backbone_mask=mask)
    for attention in eager.backbone_attentions:
        assert (attention[0][..., ~mask[0]] < 1e-6).all()
    model.backbone.base_model().set_attn_implementation("sdpa")
    sdpa = model(x, backbone_mask=mask)
    torch.testing.assert_close(sdpa.logits, eager.logits, rtol=0, atol=1e-5)
    assert model.backbone.base_model().config._attn_implementation == "sdpa"


def test_timm_backbone_mask_per_frame():
    model = make_classifier("timm-tiny", masked_layers=[0], frame_tokens="all")
    x = clip()
    mask = random_token_mask(3, 4 * 17, unmasked_clip=1)
    mask.view(3, 4, 17)[:, :, 0] = True
    kernels = [block.attn.fused_attn for block in model.backbone.base_model().blocks]
    first = model(x).logits
    plain = model(x, output_attentions=True)
    masked = model(x, output_attentions=True, backbone_mask=mask)
    per_frame = mask.view(12, 17)
    layer0 = masked.backbone_attentions[0]
    assert layer0.shape == (12, 2, 17, 17)
    for frame in range(12):
        if frame // 4 != 1:
            assert (layer0[frame][..., ~per_frame[frame]] < 1e-6).all()
    torch.testing.assert_close(layer0[4:8], plain.backbone_attentions[0][4:8], rtol=0, atol=1e-7)
    torch.testing.assert_close(masked.logits[1], plain.logits[1], rtol=0, atol=1e-6)
    # Hooks and kernels are restored after the forward: the next plain forward is bit for bit the first.
    assert torch.equal(model(x).logits, first)
    assert [block.attn.fused_attn for block in model.backbone.base_model().blocks] == kernels


def test_masks_need_a_token_layout_and_valid_layers():
    pooled = make_classifier("timm-tiny")
    with pytest.raises(ModelError, match="no token layout"):
        pooled(clip(), backbone_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ModelError, match=r"masked layers \[2\] out of range"):
        make_classifier(masked_layers=[2])
    model = make_classifier()
    with pytest.raises(ModelError, match=r"shape \(3, 32\)"):
        model(clip(), backbone_mask=torch.ones(3, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match="backbone_mask needs pixel_values"):
        model(tokens=torch.randn(3, 32, 48), backbone_mask=torch.ones(3, 32, dtype=torch.bool))


# --- streaming probe ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec, frame_tokens", [("vjepa2-tiny", "pooled"), ("timm-tiny", "all")])
def test_attention_probe_streams_each_layer_once(spec, frame_tokens):
    model = make_classifier(spec, frame_tokens=frame_tokens)
    x = clip()
    reference = model(x, output_attentions=True).backbone_attentions
    seen = []

    def reduce(layer, probs):
        assert not probs.requires_grad
        seen.append((layer, probs.amax(dim=-1).mean().item(), tuple(probs.shape)))

    with torch.no_grad(), attention_probe(model.backbone, reduce):
        model(x)
    assert [layer for layer, *_ in seen] == [0, 1]
    for layer, value, shape in seen:
        assert shape == tuple(reference[layer].shape)
        assert value == pytest.approx(reference[layer].amax(dim=-1).mean().item(), abs=1e-7)
    seen.clear()
    with torch.no_grad(), attention_probe(model.backbone, reduce, layers=[1]):
        model(x)
        model(x)
    assert [layer for layer, *_ in seen] == [1, 1]
    assert model.backbone.attention_probe is None
    seen.clear()
    model(x)
    assert seen == []


def test_attention_probe_sees_the_key_bias():
    model = make_classifier()
    x = clip()
    mask = random_token_mask(3, 32)
    outside = []
    with torch.no_grad(), attention_probe(model.backbone, lambda _layer, p: outside.append(p[..., ~mask[0]][0].max())):
        model(x, backbone_mask=mask)
    assert len(outside) == 2 and max(outside) < 1e-6
    with pytest.raises(ModelError, match=r"attention probe layers \[5\]"):
        with attention_probe(model.backbone, lambda *_: None, layers=[5]):
            pass
