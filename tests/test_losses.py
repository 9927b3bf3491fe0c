"""Multi-label losses against torch / torchvision references and hand computations; attention supervision."""

import math

import pytest
import torch
from torch import nn
from torchvision.ops import sigmoid_focal_loss

from avlm.errors import ConfigError
from avlm.losses import ATTENTION_SUPERVISION_KINDS, MultiLabelLoss, attention_supervision_loss
from avlm.models import AttentivePooler


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


# --- attention supervision ---------------------------------------------------------------------------------------


def one_row_attention(*probs):
    return torch.tensor(probs).reshape(1, 1, 1, -1)


def test_attention_supervision_hand_values():
    # p = [0.5, 0.25, 0.25, 0], mask = first two tokens: target [0.5, 0.5, 0, 0].
    attention = one_row_attention(0.5, 0.25, 0.25, 0.0)
    mask = torch.tensor([[True, True, False, False]])
    applies = torch.tensor([True])
    kl = 0.5 * math.log(0.5 / 0.5) + 0.5 * math.log(0.5 / 0.25)
    torch.testing.assert_close(attention_supervision_loss(attention, mask, applies, "kl"), torch.tensor(kl))
    bce = -math.log(0.75)
    torch.testing.assert_close(attention_supervision_loss(attention, mask, applies, "bce"), torch.tensor(bce))


def test_attention_supervision_means_over_rows_then_applying_clips_only():
    # Clip 0: two heads, mass inside 0.75 and 0.5; clip 1 does not apply; clip 2: mass inside 1.
    attention = torch.tensor(
        [
            [[[0.5, 0.25, 0.25, 0.0]], [[0.25, 0.25, 0.25, 0.25]]],
            [[[0.0, 0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0, 1.0]]],
            [[[0.0, 0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0, 0.0]]],
        ]
    )
    mask = torch.tensor([[True, True, False, False], [True, False, False, False], [False, False, True, False]])
    applies = torch.tensor([True, False, True])
    expected = ((-math.log(0.75) - math.log(0.5)) / 2 + 0.0) / 2
    got = attention_supervision_loss(attention, mask, applies, "bce")
    torch.testing.assert_close(got, torch.tensor(expected))
    # A target on exactly the attended token costs no KL; a masked-out 0 probability is floored, not -inf.
    kl_clip2 = attention_supervision_loss(attention[2:], mask[2:], applies[2:], "kl")
    torch.testing.assert_close(kl_clip2, torch.tensor(0.0))
    kl_clip1 = attention_supervision_loss(attention[1:2], mask[1:2], torch.tensor([True]), "kl")
    torch.testing.assert_close(kl_clip1, torch.tensor(-math.log(1e-8)))


def test_attention_supervision_is_zero_with_a_graph_when_nothing_applies():
    attention = torch.full((2, 1, 1, 4), 0.25, requires_grad=True)
    loss = attention_supervision_loss(attention, torch.ones(2, 4, dtype=torch.bool), torch.tensor([False, False]))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(attention.grad, torch.zeros_like(attention))
    # A clip whose mask is empty cannot apply either.
    empty = attention_supervision_loss(attention, torch.zeros(2, 4, dtype=torch.bool), torch.tensor([True, True]))
    assert empty.item() == 0.0


@pytest.mark.parametrize("kind", ATTENTION_SUPERVISION_KINDS)
def test_attention_supervision_step_moves_pooler_mass_into_the_mask(kind):
    torch.manual_seed(0)
    pooler = AttentivePooler(16, num_queries=1, num_heads=2)
    tokens = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[:, :3] = True
    applies = torch.ones(4, dtype=torch.bool)

    def mass_inside():
        with torch.no_grad():
            return (pooler(tokens)[1] * mask[:, None, None, :]).sum(-1).mean().item()

    before = mass_inside()
    optimizer = torch.optim.SGD(pooler.parameters(), lr=0.5)
    loss = attention_supervision_loss(pooler(tokens)[1], mask, applies, kind)
    loss.backward()
    optimizer.step()
    assert mass_inside() > before + 1e-3


def test_attention_supervision_errors():
    with pytest.raises(ConfigError, match="loss.attention_supervision 'mse'"):
        attention_supervision_loss(torch.ones(1, 1, 1, 2), torch.ones(1, 2, dtype=torch.bool), torch.ones(1), "mse")
    with pytest.raises(ConfigError, match=r"token_mask \(B, N\)"):
        attention_supervision_loss(torch.ones(1, 1, 1, 2), torch.ones(1, 3, dtype=torch.bool), torch.ones(1))
