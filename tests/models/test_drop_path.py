"""Stochastic depth on the backbones: off changes nothing, on acts in train mode only."""

import pytest
import torch

from avlm.errors import ModelError
from avlm.models import build_backbone


@pytest.mark.parametrize("spec", ["vjepa2-tiny", "timm-tiny"])
def test_rate_zero_is_the_plain_backbone_bit_for_bit(spec):
    plain, zero = build_backbone(spec, num_frames=4), build_backbone(spec, num_frames=4, drop_path=0.0)
    assert zero.fingerprint() == plain.fingerprint()
    x = torch.randn(2, 4, 3, 32, 32)
    plain.train(), zero.train()
    assert torch.equal(zero(x).tokens, plain(x).tokens)


@pytest.mark.parametrize("spec", ["vjepa2-tiny", "timm-tiny"])
def test_a_positive_rate_drops_paths_in_train_mode_only(spec):
    plain, dropped = build_backbone(spec, num_frames=4), build_backbone(spec, num_frames=4, drop_path=0.5)
    # drop path holds no weights: the same init seed gives the same weights
    plain_state, dropped_state = plain.state_dict(), dropped.state_dict()
    assert plain_state.keys() == dropped_state.keys()
    assert all(torch.equal(plain_state[k], dropped_state[k]) for k in plain_state)
    assert dropped.fingerprint() != plain.fingerprint()  # a feature cache never serves one for the other
    x = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        reference = plain(x).tokens
        assert torch.equal(dropped.eval()(x).tokens, reference)
        torch.manual_seed(0)
        assert not torch.equal(dropped.train()(x).tokens, reference)


def test_a_rate_outside_zero_one_is_refused():
    with pytest.raises(ModelError, match=r"drop_path=1.0 must be in \[0, 1\)"):
        build_backbone("vjepa2-tiny", drop_path=1.0)
