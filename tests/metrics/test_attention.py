"""Attention entropy as a percentage of its maximum."""

import math

import pytest
import torch

from avlm.metrics import attention_entropy_percent, layer_entropies_percent
from avlm.models import build_backbone


def test_uniform_is_100_and_one_hot_is_0():
    assert attention_entropy_percent(torch.full((2, 3, 5, 7), 1 / 7)) == pytest.approx(100.0)
    one_hot = torch.zeros(2, 3, 5, 7)
    one_hot[..., 2] = 1.0
    assert attention_entropy_percent(one_hot) == 0.0


def test_hand_computed_rows_and_their_mean():
    # H(0.5, 0.25, 0.25, 0) = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2 nats; / ln 4 = 75 %.
    row = torch.tensor([0.5, 0.25, 0.25, 0.0])
    assert attention_entropy_percent(row) == pytest.approx(75.0)
    # Rows (0.9, 0.1, 0, 0) and uniform: the mean of their two percentages.
    skewed = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(4) * 100
    rows = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])
    assert attention_entropy_percent(rows) == pytest.approx((skewed + 100.0) / 2)


def test_single_key_is_zero_and_empty_is_an_error():
    assert attention_entropy_percent(torch.ones(2, 4, 3, 1)) == 0.0
    with pytest.raises(ValueError, match="non-empty"):
        attention_entropy_percent(torch.zeros(0, 4))


def test_layer_entropies_of_a_backbone():
    backbone = build_backbone("vjepa2-tiny", init_seed=0)
    clip = torch.randn(1, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        attentions = backbone(clip, output_attentions=True).attentions
    entropies = layer_entropies_percent(attentions)
    assert len(entropies) == 2
    # A random init with small weights attends almost uniformly, like the pretrained V-JEPA 2 in the study.
    assert all(90.0 < e <= 100.0 for e in entropies)
    assert entropies == [attention_entropy_percent(a) for a in attentions]
