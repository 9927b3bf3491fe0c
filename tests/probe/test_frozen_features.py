"""Frozen-feature pooling: which poolings apply to which backbone and input, what each one averages, the per-seed
subsets, and the masked inputs that ``mean_visible`` pools over."""

import numpy as np
import pytest
import torch

from avlm.data.masked_inputs import MaskedInputs
from avlm.errors import ConfigError, ModelError
from avlm.models import build_backbone
from avlm.models.pretext import token_patch_grid
from avlm.probe import POOLINGS, available_poolings, pooled_features, seed_subset


@pytest.fixture(scope="module")
def tiny_backbone():
    return build_backbone("vjepa2-tiny", num_frames=4)


def test_poolings_apply_only_where_they_mean_something(tiny_backbone):
    kept, skipped = available_poolings(list(POOLINGS), tiny_backbone, masked=False)
    assert kept == ["mean_all", "attentive"]
    assert "no CLS or register token" in skipped["mean_excluding_cls"]
    assert "not masked" in skipped["mean_visible"]
    kept, skipped = available_poolings(list(POOLINGS), tiny_backbone, masked=True)
    assert kept == ["mean_all", "mean_visible", "attentive"] and list(skipped) == ["mean_excluding_cls"]
    with pytest.raises(ConfigError, match="grid.poolings"):
        available_poolings(["mean_excluding_cls"], tiny_backbone, masked=False)


def test_pooled_features_average_the_right_tokens():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    visible = torch.tensor([[True, False, True, False], [False, False, False, True]])
    prefix = torch.tensor([True, False, False, False])
    torch.testing.assert_close(pooled_features(tokens, "mean_all", None, None), tokens.mean(1))
    torch.testing.assert_close(
        pooled_features(tokens, "mean_visible", visible, None),
        torch.stack([tokens[0, [0, 2]].mean(0), tokens[1, 3]]),
    )
    torch.testing.assert_close(pooled_features(tokens, "mean_excluding_cls", None, prefix), tokens[:, 1:].mean(1))
    assert pooled_features(tokens, "attentive", None, None) is tokens


class Clips(torch.utils.data.Dataset):
    def __init__(self, n):
        self.pixels = torch.randn(n, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "sample_id": f"clip{i % 3}", "labels": torch.zeros(2)}


def test_masked_inputs_blank_the_hidden_patches_with_a_mask_fixed_per_sample_id(tiny_backbone):
    grid = token_patch_grid(tiny_backbone, "test")
    masked = MaskedInputs(Clips(6), grid, mask_ratio=0.25, seed=0)
    item = masked[0]
    visible = item["visible"]
    assert visible.shape == (grid.num_tokens,) and int((~visible).sum()) == round(0.25 * grid.num_tokens)
    hidden_pixels = grid.pixel_mask(~visible[None])[0].expand_as(item["pixel_values"])
    assert torch.all(item["pixel_values"][hidden_pixels] == 0)
    assert torch.equal(item["pixel_values"][~hidden_pixels], Clips(6)[0]["pixel_values"][~hidden_pixels])
    assert torch.equal(masked[3]["visible"], visible)  # clip3 has clip0's sample id: same mask
    assert not torch.equal(masked[1]["visible"], visible)
    assert not torch.equal(MaskedInputs(Clips(6), grid, 0.25, seed=1)[0]["visible"], visible)


def test_seed_subsets_are_sorted_seeded_and_whole_when_unlimited():
    assert np.array_equal(seed_subset(10, 0, 1), np.arange(10))
    assert np.array_equal(seed_subset(10, 20, 1), np.arange(10))
    first, again, other = seed_subset(100, 30, 1), seed_subset(100, 30, 1), seed_subset(100, 30, 2)
    assert len(first) == 30 and np.array_equal(first, np.sort(first)) and len(set(first)) == 30
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_a_timm_vit_with_all_frame_tokens_marks_its_cls_tokens_for_mean_excluding_cls():
    backbone = build_backbone("timm-tiny", num_frames=4, frame_tokens="all")
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = backbone(clip).tokens
    per_frame = 1 + (32 // 8) ** 2  # CLS + 16 patches
    assert tokens.shape == (2, 4 * per_frame, 48)
    prefix = backbone.prefix_token_mask()
    assert prefix.tolist() == ([True] + [False] * 16) * 4
    torch.testing.assert_close(tokens[1, 2 * per_frame], backbone.base_model().forward_features(clip[1, 2:3])[0, 0])
    kept, skipped = available_poolings(["mean_all", "mean_excluding_cls"], backbone, masked=False)
    assert kept == ["mean_all", "mean_excluding_cls"] and not skipped
    excluding = pooled_features(tokens, "mean_excluding_cls", None, prefix)
    torch.testing.assert_close(excluding, tokens.reshape(2, 4, per_frame, 48)[:, :, 1:].mean(dim=(1, 2)))
    assert build_backbone("timm-tiny", num_frames=4).prefix_token_mask() is None  # pooled frames: no CLS left
    assert backbone.fingerprint() != build_backbone("timm-tiny", num_frames=4).fingerprint()
    with pytest.raises(ModelError, match="timm ViTs only"):
        build_backbone("vjepa2-tiny", frame_tokens="all")
