"""Heads and the video classifier: shapes, pooling behaviour, frozen backbone handling, and a model that learns."""

import pytest
import torch
from torch import nn

from avlm.errors import ConfigError, ModelError
from avlm.losses import MultiLabelLoss
from avlm.models import (
    AttentivePooler,
    ClassificationHead,
    ClassifierOutput,
    MeanPooler,
    VideoClassifier,
    apply_adaptation,
    build_backbone,
    unfreeze_last_blocks,
)


def tokens(batch=3, n=10, dim=48, seed=0):
    return torch.randn(batch, n, dim, generator=torch.Generator().manual_seed(seed))


def clip(batch=2, seed=0):
    return torch.randn(batch, 4, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def make_classifier(pooling="attentive", num_classes=3, seed=0):
    torch.manual_seed(seed)
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    return VideoClassifier(backbone, ClassificationHead(48, num_classes, pooling=pooling, num_heads=4, hidden_dim=32))


def test_attentive_pooler_shapes_and_probabilities():
    torch.manual_seed(0)
    pooler = AttentivePooler(48, num_queries=2, num_heads=4)
    pooled, attention = pooler(tokens())
    assert pooled.shape == (3, 96)
    assert attention.shape == (3, 4, 2, 10)
    torch.testing.assert_close(attention.sum(-1), torch.ones(3, 4, 2))


def test_attentive_pooler_is_permutation_invariant_over_tokens():
    torch.manual_seed(0)
    pooler = AttentivePooler(48, num_queries=1, num_heads=4)
    x = tokens()
    order = torch.randperm(10, generator=torch.Generator().manual_seed(1))
    pooled, attention = pooler(x)
    pooled_perm, attention_perm = pooler(x[:, order])
    torch.testing.assert_close(pooled_perm, pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_perm, attention[..., order])


def test_attentive_pooler_over_identical_tokens_returns_their_value_projection():
    torch.manual_seed(0)
    pooler = AttentivePooler(8, num_queries=1, num_heads=2)
    token = torch.randn(1, 1, 8)
    pooled, attention = pooler(token.expand(1, 5, 8))
    torch.testing.assert_close(attention, torch.full((1, 2, 1, 5), 0.2))
    mha = pooler.attention
    value = pooler.norm(token) @ mha.in_proj_weight[16:].T + mha.in_proj_bias[16:]
    torch.testing.assert_close(pooled, (value @ mha.out_proj.weight.T + mha.out_proj.bias).flatten(1))


def test_mean_pooler():
    x = tokens()
    pooled, attention = MeanPooler(48)(x)
    torch.testing.assert_close(pooled, x.mean(1))
    assert attention is None


def test_classification_head_layers_and_outputs():
    torch.manual_seed(0)
    head = ClassificationHead(48, 3, num_queries=2, num_heads=4, hidden_dim=16, dropout=0.1)
    assert [type(m) for m in head.mlp] == [nn.LayerNorm, nn.Linear, nn.GELU, nn.Dropout, nn.Linear]
    assert head.mlp[1].in_features == 96 and head.mlp[1].out_features == 16 and head.mlp[3].p == 0.1
    logits, attention = head(tokens())
    assert logits.shape == (3, 3) and attention.shape == (3, 4, 2, 10)
    mean_logits, none = ClassificationHead(48, 5, pooling="mean", hidden_dim=16)(tokens())
    assert mean_logits.shape == (3, 5) and none is None


def test_head_config_errors():
    with pytest.raises(ConfigError, match="model.head_heads=5"):
        ClassificationHead(48, 3, num_heads=5)
    with pytest.raises(ConfigError, match="unknown pooling 'max'"):
        ClassificationHead(48, 3, pooling="max")


def test_classifier_pixels_and_cached_tokens_agree():
    model = make_classifier().eval()
    x = clip()
    out = model(x, output_attentions=True)
    assert isinstance(out, ClassifierOutput)
    assert out.logits.shape == (2, 3)
    assert out.pooler_attention.shape == (2, 4, 1, 32)
    assert [a.shape for a in out.backbone_attentions] == [(2, 2, 32, 32)] * 2
    cached = model.backbone_tokens(x)
    from_cache = model(tokens=cached)
    torch.testing.assert_close(from_cache.logits, out.logits)
    assert from_cache.backbone_attentions is None
    assert model(x).backbone_attentions is None
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="exactly one"):
        model(x, tokens=cached)


def test_frozen_backbone_stays_in_eval_and_without_graph():
    model = make_classifier()
    apply_adaptation(model, "frozen")
    # Attention dropout that would change the tokens if the backbone ever ran in train mode.
    for layer in model.backbone.model.encoder.layer:
        layer.attention.dropout_prob = 0.5
    x = clip()
    reference = model.eval().backbone_tokens(x)
    model.train()
    assert model.training and model.head.training
    assert not any(m.training for m in model.backbone.modules())
    train_tokens = model.backbone_tokens(x)
    assert not train_tokens.requires_grad
    torch.testing.assert_close(train_tokens, reference)
    out = model(x)
    out.logits.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_staged_unfreeze_puts_the_backbone_back_in_train_mode():
    model = make_classifier()
    apply_adaptation(model, "staged")
    model.train()
    assert not model.backbone.training
    unfreeze_last_blocks(model, 1)
    tokens_out = model.backbone_tokens(clip())
    assert model.backbone.training and tokens_out.requires_grad


def test_tiny_classifier_learns_a_separable_task():
    """Label k is on when colour channel k of the clip is bright: a frozen random V-JEPA 2 plus head learns it."""
    model = make_classifier(seed=0)
    apply_adaptation(model, "frozen")
    frozen_before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(32, 3, generator=g) > 0.5).float()
    pixels = 0.3 * torch.randn(32, 4, 3, 32, 32, generator=g) + (labels * 2 - 1)[:, None, :, None, None]
    loss_fn = MultiLabelLoss("bce")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses = []
    for step in range(50):
        index = torch.arange(step * 8, step * 8 + 8) % 32
        loss = loss_fn(model(pixels[index]).logits, labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    model.eval()
    with torch.no_grad():
        accuracy = ((model(pixels).logits > 0).float() == labels).float().mean().item()
    assert accuracy == 1.0
    for key, value in model.backbone.state_dict().items():
        assert torch.equal(value, frozen_before[key]), key


def test_classifier_pooler_mask_from_pixels_and_cached_tokens_agree():
    model = make_classifier().eval()
    x = clip()
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, :5] = True
    from_pixels = model(x, pooler_mask=mask)
    from_cache = model(tokens=model.backbone_tokens(x), pooler_mask=mask)
    assert torch.equal(from_cache.logits, from_pixels.logits)
    assert from_pixels.pooler_attention[..., 5:].max() < 1e-6
    torch.testing.assert_close(from_pixels.pooler_attention.sum(-1), torch.ones(2, 4, 1))


def test_classifier_masked_layers_are_checked_and_kept():
    torch.manual_seed(0)
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    head = ClassificationHead(48, 3, num_heads=4, hidden_dim=8)
    assert VideoClassifier(backbone, head, masked_layers=[1]).masked_layers == (1,)
    assert VideoClassifier(backbone, head).masked_layers == ()
    with pytest.raises(ModelError, match=r"masked layers \[-1\] out of range: backbone 'vjepa2-tiny' has layers 0..1"):
        VideoClassifier(backbone, head, masked_layers=[-1])
