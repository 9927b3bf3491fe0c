"""The probe recipe's parts: poolings and when they apply, masked inputs, per-seed subsets, the probe's training
through the shared loop, the config's validation."""

import numpy as np
import pytest
import torch

from avlm.errors import ConfigError, ModelError
from avlm.models import build_backbone
from avlm.models.pretext import token_patch_grid
from avlm.recipes import probe
from avlm.train import make_accelerator


@pytest.fixture(scope="module")
def tiny_backbone():
    return build_backbone("vjepa2-tiny", num_frames=4)


def test_poolings_apply_only_where_they_mean_something(tiny_backbone):
    kept, skipped = probe.available_poolings(list(probe.POOLINGS), tiny_backbone, masked=False)
    assert kept == ["mean_all", "attentive"]
    assert "no CLS or register token" in skipped["mean_excluding_cls"]
    assert "not masked" in skipped["mean_visible"]
    kept, skipped = probe.available_poolings(list(probe.POOLINGS), tiny_backbone, masked=True)
    assert kept == ["mean_all", "mean_visible", "attentive"] and list(skipped) == ["mean_excluding_cls"]
    with pytest.raises(ConfigError, match="grid.poolings"):
        probe.available_poolings(["mean_excluding_cls"], tiny_backbone, masked=False)


def test_pooled_features_average_the_right_tokens():
    tokens = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    visible = torch.tensor([[True, False, True, False], [False, False, False, True]])
    prefix = torch.tensor([True, False, False, False])
    torch.testing.assert_close(probe.pooled_features(tokens, "mean_all", None, None), tokens.mean(1))
    torch.testing.assert_close(
        probe.pooled_features(tokens, "mean_visible", visible, None),
        torch.stack([tokens[0, [0, 2]].mean(0), tokens[1, 3]]),
    )
    torch.testing.assert_close(probe.pooled_features(tokens, "mean_excluding_cls", None, prefix), tokens[:, 1:].mean(1))
    assert probe.pooled_features(tokens, "attentive", None, None) is tokens


class Clips(torch.utils.data.Dataset):
    def __init__(self, n):
        self.pixels = torch.randn(n, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "sample_id": f"clip{i % 3}", "labels": torch.zeros(2)}


def test_masked_inputs_blank_the_hidden_patches_with_a_mask_fixed_per_sample_id(tiny_backbone):
    grid = token_patch_grid(tiny_backbone, "test")
    masked = probe.MaskedInputs(Clips(6), grid, mask_ratio=0.25, seed=0)
    item = masked[0]
    visible = item["visible"]
    assert visible.shape == (grid.num_tokens,) and int((~visible).sum()) == round(0.25 * grid.num_tokens)
    hidden_pixels = grid.pixel_mask(~visible[None])[0].expand_as(item["pixel_values"])
    assert torch.all(item["pixel_values"][hidden_pixels] == 0)
    assert torch.equal(item["pixel_values"][~hidden_pixels], Clips(6)[0]["pixel_values"][~hidden_pixels])
    assert torch.equal(masked[3]["visible"], visible)  # clip3 has clip0's sample id: same mask
    assert not torch.equal(masked[1]["visible"], visible)
    assert not torch.equal(probe.MaskedInputs(Clips(6), grid, 0.25, seed=1)[0]["visible"], visible)


def test_seed_subsets_are_sorted_seeded_and_whole_when_unlimited():
    assert np.array_equal(probe.seed_subset(10, 0, 1), np.arange(10))
    assert np.array_equal(probe.seed_subset(10, 20, 1), np.arange(10))
    first, again, other = probe.seed_subset(100, 30, 1), probe.seed_subset(100, 30, 1), probe.seed_subset(100, 30, 2)
    assert len(first) == 30 and np.array_equal(first, np.sort(first)) and len(set(first)) == 30
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def separable(n, seed):
    """Features whose first two dimensions decide the two labels."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)
    labels = torch.stack([features[:, 0] > 0.5, features[:, 1] < -0.5], dim=1).float()
    return features, labels


@pytest.mark.parametrize("optimizer_name", ["adamw", "sgd"])
def test_a_probe_learns_through_the_shared_loop_and_reports_its_first_batch(tmp_path, optimizer_name):
    (train_x, train_y), (val_x, val_y) = separable(256, 0), separable(128, 1)
    cfg = probe.ProbeConfig()
    train_cfg = probe.TrainConfig(epochs=15, batch_size=32, lr=1e-2, weight_decay=0.0, warmup_ratio=0.0, patience=0)
    fitted = probe.train_probe(
        features={"train": train_x, "val": val_x},
        labels={"train": train_y, "val": val_y},
        pooling="mean_all",
        optimizer_name=optimizer_name,
        seed=1,
        train_cfg=train_cfg,
        grid=cfg.grid,
        accelerator=make_accelerator(train_cfg),
        run_logger=probe.NullLogger(),
        checkpoint_dir=tmp_path,
        config_yaml="",
    )
    assert probe.mean_average_precision(fitted.targets["val"], fitted.scores["val"]) > 0.9
    assert np.array_equal(fitted.targets["val"], val_y.numpy())  # scored against val, in val order
    labels, indices = fitted.first_batch
    assert labels.shape == (32, 2) and np.array_equal(labels, train_y.numpy()[indices])
    assert not np.array_equal(indices, np.arange(32))  # the batches are shuffled
    assert (tmp_path / "last" / "trainable.safetensors").is_file()  # the shared loop's checkpoints


@pytest.mark.parametrize(
    "override, key",
    [
        ("grid.poolings=[mean_max]", "grid.poolings"),
        ("grid.poolings=[mean_all,mean_all]", "grid.poolings"),
        ("grid.optimizers=[lbfgs]", "grid.optimizers"),
        ("grid.seeds=[]", "grid.seeds"),
        ("data.input_mask_ratio=1.0", "data.input_mask_ratio"),
        ("gate.select_on=test", "gate.select_on"),
        ("gate.required_delta=.nan", "gate.required_delta"),
        ("sanity.tiny_clips=1", "sanity.tiny_clips"),
        ("backbone.pretext.steps=-1", "pretext.steps"),
        ("grid.colour=red", "grid.colour"),
    ],
)
def test_bad_config_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        probe.load_probe_config(None, [override])


def test_a_timm_vit_with_all_frame_tokens_marks_its_cls_tokens_for_mean_excluding_cls():
    backbone = build_backbone("timm-tiny", num_frames=4, frame_tokens="all")
    clip = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    tokens = backbone(clip).tokens
    per_frame = 1 + (32 // 8) ** 2  # CLS + 16 patches
    assert tokens.shape == (2, 4 * per_frame, 48)
    prefix = backbone.prefix_token_mask()
    assert prefix.tolist() == ([True] + [False] * 16) * 4
    torch.testing.assert_close(tokens[1, 2 * per_frame], backbone.base_model().forward_features(clip[1, 2:3])[0, 0])
    kept, skipped = probe.available_poolings(["mean_all", "mean_excluding_cls"], backbone, masked=False)
    assert kept == ["mean_all", "mean_excluding_cls"] and not skipped
    excluding = probe.pooled_features(tokens, "mean_excluding_cls", None, prefix)
    torch.testing.assert_close(excluding, tokens.reshape(2, 4, per_frame, 48)[:, :, 1:].mean(dim=(1, 2)))
    assert build_backbone("timm-tiny", num_frames=4).prefix_token_mask() is None  # pooled frames: no CLS left
    assert backbone.fingerprint() != build_backbone("timm-tiny", num_frames=4).fingerprint()
    with pytest.raises(ModelError, match="timm ViTs only"):
        build_backbone("vjepa2-tiny", frame_tokens="all")
