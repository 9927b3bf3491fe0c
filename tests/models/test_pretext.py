"""Pretext: config checks, the token grid, learning without labels, and strict safetensors backbone checkpoints."""

import math
from collections.abc import Mapping

import pytest
import torch
from safetensors.torch import save_file

from avlm.errors import ConfigError, ModelError
from avlm.models import (
    PretextConfig,
    build_backbone,
    load_backbone_checkpoint,
    pretrain_backbone,
    save_backbone_checkpoint,
)
from avlm.models.pretext import token_patch_grid


class RampClips(torch.utils.data.Dataset):
    """Clips of smooth colour ramps that stay put over the frames (plus a little noise): a blanked patch can be
    predicted from its neighbours, so the pretext has something to learn."""

    def __init__(self, n=12, seed=0, labels=None):
        g = torch.Generator().manual_seed(seed)
        ramp = torch.linspace(-1.0, 1.0, 32)
        slopes = torch.randn(n, 1, 3, 2, generator=g)
        field = slopes[..., 0, None, None] * ramp[:, None] + slopes[..., 1, None, None] * ramp[None, :]
        self.pixels = field.expand(n, 4, 3, 32, 32) + 0.05 * torch.randn(n, 4, 3, 32, 32, generator=g)
        self.labels = labels if labels is not None else torch.zeros(n, 3)

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i], "labels": self.labels[i], "index": i}


class ForbiddenLabels(Mapping):
    """An item whose labels raise when read: the pretext must never touch them."""

    def __init__(self, item):
        self.item = item

    def __getitem__(self, key):
        if key == "labels":
            raise AssertionError("the pretext read the labels")
        return self.item[key]

    def __iter__(self):
        return iter(self.item)

    def __len__(self):
        return len(self.item)


class NoLabelAccess(RampClips):
    def __getitem__(self, i):
        return ForbiddenLabels(super().__getitem__(i))


def same_weights(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def clip(seed=0):
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def quick(**overrides):
    return PretextConfig(**{"steps": 4, "batch_size": 4, "warmup_steps": 1, **overrides})


def test_defaults_are_valid_and_zero_steps_is_allowed():
    cfg = PretextConfig()
    assert (cfg.objective, cfg.steps, cfg.mask_ratio) == ("masked_pixels", 600, 0.5)
    assert PretextConfig(steps=0).steps == 0  # the default warm-up is cut to the steps


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"objective": "contrastive"}, "pretext.objective"),
        ({"steps": -1}, "pretext.steps"),
        ({"steps": 2.5}, "pretext.steps"),
        ({"batch_size": 0}, "pretext.batch_size"),
        ({"steps": 10, "warmup_steps": -1}, "pretext.warmup_steps"),
        ({"lr": 0.0}, "pretext.lr"),
        ({"lr": math.nan}, "pretext.lr"),
        ({"weight_decay": -0.1}, "pretext.weight_decay"),
        ({"mask_ratio": 0.0}, "pretext.mask_ratio"),
        ({"mask_ratio": 1.0}, "pretext.mask_ratio"),
        ({"normalize_targets": "yes"}, "pretext.normalize_targets"),
        ({"seed": True}, "pretext.seed"),
    ],
)
def test_bad_config_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=rf"'{key}'"):
        PretextConfig(**overrides)


def test_patch_grid_follows_the_backbone_token_order():
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    grid = token_patch_grid(backbone, "masked_pixels")
    assert (grid.time, grid.side, grid.frames_per_token, grid.patch) == (2, 4, 2, 8)
    assert (grid.num_tokens, grid.pixels_per_token) == (32, 2 * 8 * 8 * 3)
    embed = backbone.model.encoder.embeddings
    blank = torch.zeros(1, 4, 3, 32, 32)
    for token in (0, 5, 19, 31):
        one_token = torch.zeros(1, 32, dtype=torch.bool)
        one_token[0, token] = True
        lit = blank.masked_fill(grid.pixel_mask(one_token), 1.0)
        assert lit.sum() == grid.pixels_per_token
        # patchify puts the lit pixels at that token, and the backbone's patch embedding changes only that token.
        assert torch.equal(grid.patchify(lit).sum(-1)[0].nonzero().flatten(), torch.tensor([token]))
        with torch.no_grad():
            changed = (embed(lit) - embed(blank)).abs().sum(-1)[0]
        assert changed.nonzero().flatten().tolist() == [token]


def test_loss_decreases_and_figures_are_reported():
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    backbone.eval()
    figures = pretrain_backbone(backbone, RampClips(), quick(steps=40, batch_size=6, warmup_steps=4, lr=1e-2))
    assert (figures["objective"], figures["steps"], figures["clips"]) == ("masked_pixels", 40, 12)
    assert len(figures["losses"]) == 40 and all(math.isfinite(v) for v in figures["losses"])
    assert figures["loss_first"] == pytest.approx(sum(figures["losses"][:10]) / 10)
    assert figures["loss_last"] < 0.75 * figures["loss_first"]  # 1.14 -> 0.53 when measured
    assert figures["seconds"] > 0
    assert not backbone.training  # the caller's mode is restored


def test_labels_are_never_read_and_do_not_change_the_weights():
    # Items whose labels raise on access: the pretext runs through.
    pretrain_backbone(build_backbone("vjepa2-tiny", init_seed=0), NoLabelAccess(), quick(steps=2))
    a, b = build_backbone("vjepa2-tiny", init_seed=0), build_backbone("vjepa2-tiny", init_seed=0)
    pretrain_backbone(a, RampClips(labels=torch.zeros(12, 3)), quick())
    pretrain_backbone(b, RampClips(labels=torch.randint(0, 2, (12, 3)).float()), quick())
    assert same_weights(a, b)


def test_pretext_changes_the_encoder_and_the_fingerprint_but_zero_steps_changes_nothing():
    random = build_backbone("vjepa2-tiny", init_seed=0)
    pretrained = build_backbone("vjepa2-tiny", init_seed=0)
    pretrain_backbone(pretrained, RampClips(), quick())
    assert not torch.equal(
        random.model.encoder.layer[0].attention.query.weight, pretrained.model.encoder.layer[0].attention.query.weight
    )
    assert pretrained.fingerprint() != random.fingerprint()

    skipped = build_backbone("vjepa2-tiny", init_seed=0)
    figures = pretrain_backbone(skipped, NoLabelAccess(), PretextConfig(steps=0, warmup_steps=0))
    assert figures["steps"] == 0 and figures["losses"] == [] and math.isnan(figures["loss_last"])
    assert same_weights(skipped, random)
    assert skipped.fingerprint() == random.fingerprint()


def test_backbone_without_a_token_grid_is_refused():
    with pytest.raises(ModelError, match="one token per spatio-temporal patch.*timm-tiny"):
        pretrain_backbone(build_backbone("timm-tiny", init_seed=0), RampClips(), quick())


def test_checkpoint_round_trip_restores_the_same_tokens(tmp_path):
    pretrained = build_backbone("vjepa2-tiny", init_seed=0)
    pretrain_backbone(pretrained, RampClips(), quick())
    path = save_backbone_checkpoint(pretrained, tmp_path / "ckpt" / "backbone.safetensors")
    assert path.is_file() and not list(path.parent.glob(".*tmp*"))

    restored = build_backbone("vjepa2-tiny", init_seed=3)
    with torch.no_grad():
        before = restored(clip()).tokens
    metadata = load_backbone_checkpoint(restored, path)
    assert metadata["spec"] == "vjepa2-tiny" and metadata["format"] == "avlm-backbone"
    with torch.no_grad():
        expected, got = pretrained(clip()).tokens, restored(clip()).tokens
    assert torch.equal(got, expected) and not torch.allclose(got, before)
    # Same weights, same feature-cache key, whichever init the loading backbone started from.
    assert restored.fingerprint() == pretrained.fingerprint()
    assert restored.fingerprint() != build_backbone("vjepa2-tiny", init_seed=3).fingerprint()


def test_checkpoint_of_another_architecture_names_missing_and_unexpected_keys(tmp_path):
    path = save_backbone_checkpoint(build_backbone("timm-tiny", init_seed=0), tmp_path / "timm.safetensors")
    with pytest.raises(ModelError) as error:
        load_backbone_checkpoint(build_backbone("vjepa2-tiny", init_seed=0), path)
    message = str(error.value)
    assert str(path) in message and "saved from 'timm-tiny'" in message
    assert "missing key(s): model.encoder." in message and "unexpected key(s): model.blocks." in message


def test_checkpoint_with_a_wrong_shape_names_it(tmp_path):
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    state = {name: tensor.clone() for name, tensor in backbone.state_dict().items()}
    name = "model.encoder.layer.0.attention.query.weight"
    state[name] = torch.zeros(32, 48)
    save_file(state, str(tmp_path / "narrow.safetensors"))
    untouched = backbone.state_dict()[name].clone()
    with pytest.raises(ModelError, match=rf"1 shape mismatch\(es\): {name} \(file \(32, 48\), backbone \(48, 48\)\)"):
        load_backbone_checkpoint(backbone, tmp_path / "narrow.safetensors")
    assert torch.equal(backbone.state_dict()[name], untouched)  # nothing loaded on a mismatch


def test_missing_or_unreadable_checkpoint_is_a_model_error(tmp_path):
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    with pytest.raises(ModelError, match="does not exist"):
        load_backbone_checkpoint(backbone, tmp_path / "absent.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="not a readable safetensors file"):
        load_backbone_checkpoint(backbone, tmp_path / "junk.safetensors")
