"""TemporalHead: output shapes, each kind's temporal context, the TCN's residual, and the errors naming config keys."""

import math

import pytest
import torch

from avlm.errors import ConfigError
from avlm.models.temporal import TEMPORAL_HEADS, TemporalHead

GELU_1 = 0.5 * (1 + math.erf(1 / math.sqrt(2)))  # gelu(1) = Φ(1); gelu(-1) = -Φ(-1) = Φ(1) - 1


@pytest.mark.parametrize("kind", TEMPORAL_HEADS)
def test_maps_each_second_to_out_dim(kind):
    torch.manual_seed(0)
    head = TemporalHead(kind, 5, 3, hidden=8)
    assert head(torch.randn(2, 10, 5)).shape == (2, 10, 3)
    assert head(torch.randn(1, 4, 5)).shape == (1, 4, 3)


def _changed_seconds(head: TemporalHead, seconds: int, poked: int) -> list[int]:
    """The output seconds that change when only input second ``poked`` changes (eval mode: no dropout)."""
    torch.manual_seed(1)
    head.eval()
    x = torch.randn(1, seconds, head.in_dim)
    y = x.clone()
    y[0, poked] += 1.0
    with torch.no_grad():
        diff = (head(x) - head(y)).abs().amax(dim=-1)[0]
    return [t for t in range(seconds) if diff[t] > 0]


@pytest.mark.parametrize(
    ("kind", "kernel_size", "seconds", "poked", "changed"),
    [
        ("mlp", 3, 10, 5, [5]),  # no temporal context
        ("tcn", 3, 10, 5, list(range(2, 9))),  # dilations 1 and 2 with kernel 3: ±3 seconds
        ("tcn", 5, 16, 8, list(range(2, 15))),  # kernel 5: ±6 seconds
        ("bilstm", 3, 10, 5, list(range(10))),  # both directions: the whole clip
    ],
)
def test_temporal_context_of_each_kind(kind, kernel_size, seconds, poked, changed):
    torch.manual_seed(0)
    head = TemporalHead(kind, 4, 2, hidden=6, kernel_size=kernel_size)
    assert _changed_seconds(head, seconds, poked) == changed


def _set_identity_readout(head: TemporalHead) -> None:
    """hidden_layer = identity, readout = sum of the hidden units: the head computes Σ gelu(x)."""
    with torch.no_grad():
        head.hidden_layer.weight.copy_(torch.eye(2))
        head.hidden_layer.bias.zero_()
        head.readout.weight.fill_(1.0)
        head.readout.bias.zero_()


def test_mlp_and_tcn_residual_equal_hand_computed_values():
    x = torch.tensor([[[1.0, -1.0], [0.0, 1.0], [2.0, 0.0]]])
    # Σ gelu per second: gelu(1) + gelu(-1) = 2Φ(1) - 1; gelu(0) + gelu(1); gelu(2) + gelu(0)
    gelu_2 = 2 * 0.5 * (1 + math.erf(2 / math.sqrt(2)))
    expected = torch.tensor([[[2 * GELU_1 - 1], [GELU_1], [gelu_2]]])
    mlp = TemporalHead("mlp", 2, 1, hidden=2).eval()
    _set_identity_readout(mlp)
    torch.testing.assert_close(mlp(x), expected)
    # With its convolutions zeroed, the TCN is its residual path: the same per-second MLP.
    tcn = TemporalHead("tcn", 2, 1, hidden=2).eval()
    _set_identity_readout(tcn)
    with torch.no_grad():
        for conv in tcn.convs:
            conv.weight.zero_()
            conv.bias.zero_()
    torch.testing.assert_close(tcn(x), expected)


def test_dropout_is_active_in_training_only():
    torch.manual_seed(0)
    head = TemporalHead("mlp", 4, 2, hidden=32, dropout=0.5)
    x = torch.randn(2, 10, 4)
    head.train()
    assert not torch.equal(head(x), head(x))
    head.eval()
    assert torch.equal(head(x), head(x))


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"kind": "gru"}, "eventness.head"),
        ({"hidden": 0}, "eventness.hidden"),
        ({"dropout": 1.0}, "eventness.dropout"),
        ({"kind": "tcn", "kernel_size": 4}, "eventness.kernel_size"),
    ],
)
def test_bad_arguments_name_the_config_key(kwargs, key):
    args = {"kind": "mlp", "in_dim": 4, "out_dim": 1, "config_section": "eventness", **kwargs}
    with pytest.raises(ConfigError, match=rf"^config key '{key}': "):
        TemporalHead(**args)


def test_wrong_input_width_is_refused():
    head = TemporalHead("bilstm", 4, 1)
    with pytest.raises(ValueError, match=r"\(B, T, 4\)"):
        head(torch.zeros(1, 10, 3))
