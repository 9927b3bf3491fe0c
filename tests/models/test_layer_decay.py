"""Layer-wise learning-rate decay: the documented lr of each backbone block, embeddings and the rest."""

import pytest
import torch

from avlm.models import ClassificationHead, VideoClassifier, apply_adaptation, build_backbone, parameter_groups
from avlm.models.adaptation import layer_decay_parts

LR, DECAY = 1e-3, 0.5


def tiny_classifier(spec="vjepa2-tiny"):
    torch.manual_seed(0)
    backbone = build_backbone(spec, num_frames=4)
    return VideoClassifier(backbone, ClassificationHead(backbone.feature_dim, 3, hidden_dim=16))


def lr_by_group(model):
    groups = parameter_groups(
        model, [("head", model.head, 5e-3), *layer_decay_parts(model.backbone, LR, DECAY)], weight_decay=0.05
    )
    return {g["name"]: g["lr"] for g in groups}, {g["name"]: {id(p) for p in g["params"]} for g in groups}


def test_unfrozen_blocks_get_backbone_lr_times_decay_to_the_blocks_above():
    model = tiny_classifier()
    apply_adaptation(model, "unfreeze", unfreeze_last_n=2)
    lrs, members = lr_by_group(model)
    # 2 blocks: block 0 at LR·0.5², block 1 at LR·0.5; the frozen embeddings and final norm form no group
    assert lrs == {
        "head": 5e-3,
        "head_no_decay": 5e-3,
        "backbone_block_0": pytest.approx(2.5e-4, rel=1e-12),
        "backbone_block_0_no_decay": pytest.approx(2.5e-4, rel=1e-12),
        "backbone_block_1": pytest.approx(5e-4, rel=1e-12),
        "backbone_block_1_no_decay": pytest.approx(5e-4, rel=1e-12),
    }
    for i, block in enumerate(model.backbone.blocks()):
        assert members[f"backbone_block_{i}"] | members[f"backbone_block_{i}_no_decay"] == {
            id(p) for p in block.parameters()
        }


def test_lora_matrices_take_the_lr_of_their_block():
    model = tiny_classifier()
    apply_adaptation(model, "lora", lora_r=2, lora_targets=["query", "value"])
    lrs, members = lr_by_group(model)
    assert {k: v for k, v in lrs.items() if k.startswith("backbone")} == {
        "backbone_block_0": pytest.approx(2.5e-4, rel=1e-12),
        "backbone_block_1": pytest.approx(5e-4, rel=1e-12),
    }
    for i, block in enumerate(model.backbone.blocks()):
        lora = {id(p) for name, p in block.named_parameters() if "lora_" in name}
        assert len(lora) == 4 and members[f"backbone_block_{i}"] == lora  # A and B of query and value


@pytest.mark.parametrize("spec", ["vjepa2-tiny", "timm-tiny"])
def test_a_fully_trained_backbone_puts_embeddings_lowest_and_its_final_norm_at_backbone_lr(spec):
    model = tiny_classifier(spec)
    model.backbone.requires_grad_(True)
    lrs, members = lr_by_group(model)
    assert lrs["backbone_embeddings"] == pytest.approx(LR * DECAY**3, rel=1e-12)
    embeddings = members["backbone_embeddings"] | members.get("backbone_embeddings_no_decay", set())
    assert embeddings == {id(p) for p in model.backbone.embedding_parameters()} and embeddings
    # the final norm (and V-JEPA 2's unused predictor) are neither embeddings nor blocks
    assert lrs["backbone_no_decay"] == LR


def test_decay_one_gives_every_part_the_backbone_lr():
    parts = layer_decay_parts(tiny_classifier().backbone, LR, 1.0)
    assert [name for name, _, _ in parts] == ["backbone_embeddings", "backbone_block_0", "backbone_block_1", "backbone"]
    assert {lr for _, _, lr in parts} == {LR}
