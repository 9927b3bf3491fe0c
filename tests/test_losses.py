"""Multi-label losses against torch / torchvision references and hand computations."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from avlm.errors import ConfigError
from avlm.losses import MultiLabelLoss


def batch(seed=0, n=16, k=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=g) * 2, (torch.rand(n, k, generator=g) > 0.6).float()


def test_bce_equals_torch_with_pos_weight():
    logits, targets = batch()
    weights = [1.0, 3.0, 0.5]
    expected = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weights))(logits, targets)
    torch.testing.assert_close(MultiLabelLoss("bce", pos_weight=weights)(logits, targets), expected)
    torch.testing.assert_close(MultiLabelLoss()(logits, targets), nn.BCEWithLogitsLoss()(logits, targets))


def test_focal_matches_torchvision():
    logits, targets = batch()
    for alpha, gamma in [(0.25, 2.0), (0.6, 1.0), (-1.0, 2.0)]:
        expected = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma, reduction="mean")
        got = MultiLabelLoss("focal", focal_alpha=alpha, focal_gamma=gamma)(logits, targets)
        torch.testing.assert_close(got, expected)


def test_focal_with_gamma_0_and_alpha_half_is_half_bce():
    logits, targets = batch()
    focal = MultiLabelLoss("focal", focal_alpha=0.5, focal_gamma=0.0)(logits, targets)
    torch.testing.assert_close(focal, 0.5 * nn.BCEWithLogitsLoss()(logits, targets))
    # pos_weight scales the positive BCE term inside the focal loss too.
    weighted = MultiLabelLoss("focal", focal_alpha=0.5, focal_gamma=0.0, pos_weight=[2.0, 2.0, 2.0])
    expected = 0.5 * nn.BCEWithLogitsLoss(pos_weight=torch.full((3,), 2.0))(logits, targets)
    torch.testing.assert_close(weighted(logits, targets), expected)


def test_label_smoothing_value():
    # Logit 0 (p = 0.5) costs ln 2 whatever the target; logit 2 for target 1 smoothed by 0.2 to 0.9:
    # -(0.9 log s(2) + 0.1 log(1 - s(2))).
    loss = MultiLabelLoss("bce", label_smoothing=0.2)
    torch.testing.assert_close(loss(torch.zeros(1, 1), torch.ones(1, 1)), torch.tensor(math.log(2)))
    s = 1 / (1 + math.exp(-2.0))
    expected = -(0.9 * math.log(s) + 0.1 * math.log(1 - s))
    torch.testing.assert_close(loss(torch.full((1, 1), 2.0), torch.ones(1, 1)), torch.tensor(expected))
    logits, targets = batch()
    torch.testing.assert_close(loss(logits, targets), nn.BCEWithLogitsLoss()(logits, targets * 0.8 + 0.1))


def test_gradients_flow_and_soft_targets_work():
    logits, _ = batch()
    logits.requires_grad_(True)
    loss = MultiLabelLoss("focal")(logits, torch.full_like(logits, 2 / 3))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(logits.grad).all()


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="loss.kind 'hinge'"):
        MultiLabelLoss("hinge")
    with pytest.raises(ConfigError, match="loss.label_smoothing"):
        MultiLabelLoss(label_smoothing=1.0)
    with pytest.raises(ConfigError, match="loss.pos_weight has 2 values for 3 classes"):
        MultiLabelLoss(pos_weight=[1.0, 2.0])(*batch())
