"""Adaptation modes: which parameters train, LoRA wiring, checkpoints of the trainable part, optimizer groups."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from avlm.errors import ConfigError, ModelError
from avlm.models import (
    ClassificationHead,
    VideoClassifier,
    apply_adaptation,
    build_backbone,
    count_parameters,
    load_trainable_state_dict,
    parameter_groups,
    save_lora_adapter,
    trainable_state_dict,
    unfreeze_last_blocks,
)


def make_classifier(spec="vjepa2-tiny", head_seed=0, pooling="attentive"):
    backbone = build_backbone(spec, init_seed=0)
    torch.manual_seed(head_seed)
    return VideoClassifier(backbone, ClassificationHead(backbone.feature_dim, 3, pooling=pooling, hidden_dim=16))


def clip(batch=2, seed=0):
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def trainable_names(module):
    return {name for name, p in module.named_parameters() if p.requires_grad}


def head_size(model):
    return sum(p.numel() for p in model.head.parameters())


def train_steps(model, steps=3):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for step in range(steps):
        logits = model(clip(seed=step)).logits
        loss = logits.pow(2).mean() - logits.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def test_frozen_trains_the_head_only():
    model = make_classifier()
    apply_adaptation(model, "frozen")
    assert trainable_names(model) == {f"head.{n}" for n, _ in model.head.named_parameters()}
    assert count_parameters(model) == (head_size(model), head_size(model) + 66_192)


def test_lora_on_vjepa2_wraps_encoder_qkv_only_with_hand_counted_parameters():
    model = make_classifier()
    apply_adaptation(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0)
    assert isinstance(model.backbone.model, PeftModel)
    backbone_trainable = trainable_names(model.backbone)
    assert backbone_trainable and all(".lora_A." in n or ".lora_B." in n for n in backbone_trainable)
    assert all("predictor." not in n for n in backbone_trainable)
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in model.backbone.model.named_modules() if ".lora_" in n}
    assert lora_modules == {
        f"base_model.model.encoder.layer.{i}.attention.{p}" for i in range(2) for p in ("query", "key", "value")
    }
    assert not any("lora" in n for n, _ in model.backbone.model.get_base_model().predictor.named_modules())
    # Per wrapped 48->48 Linear: A is r x 48, B is 48 x r; 3 projections x 2 layers.
    lora_count = 3 * 2 * (4 * 48 + 48 * 4)
    assert lora_count == 2_304
    assert count_parameters(model)[0] == lora_count + head_size(model)
    assert count_parameters(model.backbone) == (2_304, 66_192 + 2_304)


def test_lora_starts_as_the_identity_and_only_lora_moves():
    reference = make_classifier().eval()
    model = make_classifier()
    apply_adaptation(model, "lora", lora_r=4, lora_targets=("value",))
    model.eval()
    torch.testing.assert_close(model(clip()).logits, reference(clip()).logits)  # B = 0 at init
    base_before = {k: v.clone() for k, v in model.backbone.state_dict().items() if "lora_" not in k}
    train_steps(model)
    assert not torch.allclose(model(clip()).logits, reference(clip()).logits)
    for key, value in model.backbone.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_before[key]), key
    lora_b = [p for n, p in model.backbone.named_parameters() if "lora_B" in n]
    assert len(lora_b) == 2 and all(p.abs().sum() > 0 for p in lora_b)


def test_lora_on_timm_maps_qkv_to_the_fused_projection():
    model = make_classifier("timm-tiny")
    apply_adaptation(model, "lora", lora_r=4, lora_targets=("query", "value"))
    lora_modules = {n.rsplit(".lora_", 1)[0] for n, _ in model.backbone.model.named_modules() if ".lora_" in n}
    assert lora_modules == {"base_model.model.blocks.0.attn.qkv", "base_model.model.blocks.1.attn.qkv"}
    # Fused qkv is 48 -> 144: A is 4 x 48, B is 144 x 4, in 2 blocks.
    assert count_parameters(model.backbone)[0] == 2 * (4 * 48 + 144 * 4) == 1_536
    assert model(clip()).logits.shape == (2, 3)


def lora_wrapped_modules(model):
    """Names (inside the backbone's PeftModel) of the modules LoRA wraps."""
    return {n.rsplit(".lora_", 1)[0] for n, _ in model.backbone.model.named_modules() if ".lora_" in n}


@pytest.mark.parametrize(
    "targets,paths,per_layer",
    [
        # proj 48->48: 4·48 + 48·4 = 384; fc1 48->96: 4·48 + 96·4 = 576; fc2 96->48: 4·96 + 48·4 = 576
        (("o_proj", "fc1", "fc2"), ("attention.proj", "mlp.fc1", "mlp.fc2"), 384 + 576 + 576),
        # query, value and proj are each 48->48: 3 · 384
        (("query", "value", "o_proj"), ("attention.query", "attention.value", "attention.proj"), 3 * 384),
    ],
    ids=["o_proj+fc1+fc2", "query+value+o_proj"],
)
def test_lora_target_sets_on_vjepa2_wrap_exactly_those_encoder_modules(targets, paths, per_layer):
    model = make_classifier()
    apply_adaptation(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets)
    assert lora_wrapped_modules(model) == {
        f"base_model.model.encoder.layer.{i}.{path}" for i in range(2) for path in paths
    }
    # the predictor has its own attention.proj / mlp.fc1 / mlp.fc2: they stay plain
    assert not any("lora" in n for n, _ in model.backbone.model.get_base_model().predictor.named_modules())
    assert count_parameters(model.backbone) == (2 * per_layer, 66_192 + 2 * per_layer)
    assert count_parameters(model)[0] == 2 * per_layer + head_size(model)


@pytest.mark.parametrize(
    "targets,paths,per_block",
    [
        # proj 48->48: 384; fc1 48->192: 4·48 + 192·4 = 960; fc2 192->48: 4·192 + 48·4 = 960
        (("o_proj", "fc1", "fc2"), ("attn.proj", "mlp.fc1", "mlp.fc2"), 384 + 960 + 960),
        # query and value share the fused qkv 48->144 (4·48 + 144·4 = 768), plus proj's 384
        (("query", "value", "o_proj"), ("attn.qkv", "attn.proj"), 768 + 384),
    ],
    ids=["o_proj+fc1+fc2", "query+value+o_proj"],
)
def test_lora_target_sets_on_timm_wrap_exactly_those_block_modules(targets, paths, per_block):
    model = make_classifier("timm-tiny")
    apply_adaptation(model, "lora", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_targets=targets)
    assert lora_wrapped_modules(model) == {f"base_model.model.blocks.{i}.{path}" for i in range(2) for path in paths}
    assert count_parameters(model.backbone)[0] == 2 * per_block
    assert count_parameters(model)[0] == 2 * per_block + head_size(model)
    assert model(clip()).logits.shape == (2, 3)


def test_lora_targets_that_match_nothing_are_model_errors():
    with pytest.raises(ModelError, match="unknown LoRA target"):
        apply_adaptation(make_classifier(), "lora", lora_targets=("attn_q",))
    cnn = build_backbone("timm:resnet10t", pretrained=False, image_size=32)
    model = VideoClassifier(cnn, ClassificationHead(512, 3, pooling="mean", hidden_dim=8))
    with pytest.raises(ModelError, match="match no module") as info:
        apply_adaptation(model, "lora", lora_targets=("query", "value"))
    assert "['query', 'value']" in str(info.value) and "conv1" in str(info.value)


def test_lora_cannot_be_applied_twice():
    model = make_classifier()
    apply_adaptation(model, "lora", lora_r=2)
    with pytest.raises(ModelError, match="already applied"):
        apply_adaptation(model, "lora", lora_r=2)


def test_save_lora_adapter_round_trips_through_peft(tmp_path):
    model = make_classifier()
    assert save_lora_adapter(model, tmp_path / "none") is False
    apply_adaptation(model, "lora", lora_r=4, lora_alpha=8)
    train_steps(model)
    assert save_lora_adapter(model, tmp_path / "adapter") is True
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.1)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    fresh = build_backbone("vjepa2-tiny", init_seed=0)
    fresh.model = PeftModel.from_pretrained(fresh.model, tmp_path / "adapter")
    fresh.eval()
    model.eval()
    torch.testing.assert_close(fresh(clip()).tokens, model.backbone(clip()).tokens)


def test_unfreeze_last_block_makes_exactly_that_block_trainable():
    model = make_classifier()
    apply_adaptation(model, "unfreeze", unfreeze_last_n=1)
    expected = {f"backbone.model.encoder.layer.1.{n}" for n, _ in model.backbone.blocks()[1].named_parameters()}
    assert trainable_names(model) - {f"head.{n}" for n, _ in model.head.named_parameters()} == expected
    timm_model = make_classifier("timm-tiny")
    apply_adaptation(timm_model, "unfreeze", unfreeze_last_n=2)
    assert {n for n in trainable_names(timm_model.backbone)} == {
        f"model.blocks.{n}" for n, _ in timm_model.backbone.model.blocks.named_parameters()
    }


def test_unfreeze_validates_the_block_count():
    with pytest.raises(ConfigError, match="unfreeze_last_n >= 1"):
        apply_adaptation(make_classifier(), "unfreeze")
    with pytest.raises(ConfigError, match="unfreeze_last_n=3"):
        apply_adaptation(make_classifier(), "unfreeze", unfreeze_last_n=3)
    with pytest.raises(ConfigError, match="unknown adaptation mode 'full'"):
        apply_adaptation(make_classifier(), "full")


def test_staged_starts_frozen_then_unfreezes_returning_the_new_parameters():
    model = make_classifier()
    apply_adaptation(model, "staged")
    assert count_parameters(model.backbone)[0] == 0
    new = unfreeze_last_blocks(model, 1)
    assert {id(p) for p in new} == {id(p) for p in model.backbone.blocks()[1].parameters()}
    assert unfreeze_last_blocks(model, 1) == []
    assert len(unfreeze_last_blocks(model, 2)) == len(list(model.backbone.blocks()[0].parameters()))


@pytest.mark.parametrize("mode,kwargs", [("lora", {"lora_r": 4}), ("unfreeze", {"unfreeze_last_n": 1})])
def test_trainable_state_dict_round_trip_reproduces_logits(tmp_path, mode, kwargs):
    model = make_classifier(head_seed=0)
    apply_adaptation(model, mode, **kwargs)
    train_steps(model)
    state = trainable_state_dict(model)
    assert set(state) == trainable_names(model)
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    save_file(state, tmp_path / "trainable.safetensors")

    fresh = make_classifier(head_seed=1)
    apply_adaptation(fresh, mode, **kwargs)
    fresh.eval()
    assert not torch.allclose(fresh(clip()).logits, model(clip()).logits)
    load_trainable_state_dict(fresh, load_file(tmp_path / "trainable.safetensors"))
    torch.testing.assert_close(fresh(clip()).logits, model(clip()).logits, atol=0, rtol=0)


def test_load_trainable_state_dict_names_missing_unexpected_and_misshapen_keys():
    model = make_classifier()
    apply_adaptation(model, "frozen")
    state = trainable_state_dict(model)
    dropped = next(iter(state))
    partial = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(ModelError, match=f"missing keys \\['{dropped}'\\]"):
        load_trainable_state_dict(model, partial)
    with pytest.raises(ModelError, match=r"unexpected keys \['head.extra.weight'\]"):
        load_trainable_state_dict(model, {**state, "head.extra.weight": torch.zeros(1)})
    bad = {**state, "head.mlp.4.bias": torch.zeros(7)}
    with pytest.raises(ModelError, match=r"'head.mlp.4.bias' has shape \(7,\), the model expects \(3,\)"):
        load_trainable_state_dict(model, bad)
    # Loading frozen backbone tensors too is allowed: they are model keys.
    extra = {**state, "backbone.model.encoder.layernorm.bias": torch.ones(48)}
    load_trainable_state_dict(model, extra)
    assert torch.equal(model.backbone.model.encoder.layernorm.bias, torch.ones(48))


def cvs_parts(model):
    return [("head", model.head, 1e-3), ("backbone", model.backbone, 1e-5)]


def test_parameter_groups_refuse_a_trainable_parameter_outside_every_part():
    model = make_classifier()
    with pytest.raises(ValueError, match="in none of the parts"):
        parameter_groups(model, [("head", model.head, 1e-3)], weight_decay=0.05)


def test_parameter_groups_split_decay_and_cover_each_trainable_parameter_once():
    model = make_classifier()
    assert [g["name"] for g in parameter_groups(model, cvs_parts(model), weight_decay=0.05)] == [
        "head",
        "head_no_decay",
        "backbone",
        "backbone_no_decay",
    ]
    apply_adaptation(model, "frozen")
    groups = parameter_groups(model, cvs_parts(model), weight_decay=0.05)
    assert [g["name"] for g in groups] == ["head", "head_no_decay"]
    by_name = {g["name"]: g for g in groups}
    names = {id(p): n for n, p in model.head.named_parameters()}
    no_decay = {names[id(p)] for p in by_name["head_no_decay"]["params"]}
    assert "pooler.queries" in no_decay and "mlp.1.bias" in no_decay and "mlp.0.weight" in no_decay
    decay = {names[id(p)] for p in by_name["head"]["params"]}
    assert decay == {
        "pooler.attention.in_proj_weight",
        "pooler.attention.out_proj.weight",
        "mlp.1.weight",
        "mlp.4.weight",
    }
    assert by_name["head"]["weight_decay"] == 0.05 and by_name["head_no_decay"]["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-3 for g in groups)

    lora = make_classifier()
    apply_adaptation(lora, "lora", lora_r=4)
    groups = parameter_groups(lora, cvs_parts(lora), weight_decay=0.05)
    assert [g["name"] for g in groups] == ["head", "head_no_decay", "backbone"]
    assert groups[2]["lr"] == 1e-5 and len(groups[2]["params"]) == 12  # A and B of 6 projections

    unfrozen = make_classifier()
    apply_adaptation(unfrozen, "unfreeze", unfreeze_last_n=1)
    groups = parameter_groups(unfrozen, cvs_parts(unfrozen), weight_decay=0.05)
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in unfrozen.parameters() if p.requires_grad)
    backbone_no_decay = next(g for g in groups if g["name"] == "backbone_no_decay")["params"]
    assert all(p.ndim == 1 for p in backbone_no_decay) and len(backbone_no_decay) == 10
    torch.optim.AdamW(groups)  # AdamW accepts the extra "name" key
