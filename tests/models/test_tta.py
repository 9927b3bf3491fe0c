"""Test-time augmentation: the augmented clips, and probabilities averaged over them."""

import pytest
import torch

from avlm.models import ClassificationHead, VideoClassifier, build_backbone
from avlm.models.tta import augment_clip, tta_probabilities


def numbered_clip() -> torch.Tensor:
    # (1, T=4, C=1, H=1, W=3): value 10·t + w, so every frame and column is told apart
    t = torch.arange(4.0).view(1, 4, 1, 1, 1)
    w = torch.arange(3.0).view(1, 1, 1, 1, 3)
    return 10 * t + w


def test_hflip_mirrors_columns_and_temporal_shift_keeps_the_labelled_frame_last():
    clip = numbered_clip()
    assert augment_clip(clip, "hflip")[0, :, 0, 0].tolist() == [[2, 1, 0], [12, 11, 10], [22, 21, 20], [32, 31, 30]]
    # oldest frame dropped, the labelled (last) frame repeated
    assert augment_clip(clip, "temporal_shift")[0, :, 0, 0, 0].tolist() == [10, 20, 30, 30]
    with pytest.raises(ValueError, match="unknown test-time augmentation 'vflip'"):
        augment_clip(clip, "vflip")


def test_probabilities_average_over_the_clip_and_each_augmentation():
    # logits: the labelled frame's first two columns, and the oldest frame's first column
    def classify(x):
        return torch.stack([x[:, -1, 0, 0, 0], x[:, -1, 0, 0, 1], x[:, 0, 0, 0, 0]], dim=1) / 10

    clip = numbered_clip()
    sig = torch.sigmoid
    original = sig(torch.tensor([[3.0, 3.1, 0.0]]))
    flipped = sig(torch.tensor([[3.2, 3.1, 0.2]]))
    shifted = sig(torch.tensor([[3.0, 3.1, 1.0]]))
    assert torch.equal(tta_probabilities(classify, clip, []), original)
    torch.testing.assert_close(tta_probabilities(classify, clip, ["hflip"]), (original + flipped) / 2)
    torch.testing.assert_close(
        tta_probabilities(classify, clip, ["hflip", "temporal_shift"]), (original + flipped + shifted) / 3
    )


def test_a_model_invariant_to_the_augmentations_gets_exactly_its_plain_probabilities():
    torch.manual_seed(0)
    backbone = build_backbone("vjepa2-tiny", num_frames=4)
    model = VideoClassifier(backbone, ClassificationHead(backbone.feature_dim, 3, hidden_dim=16)).eval()
    # every frame equal and every row constant: flipping and shifting give the same clip back
    clip = torch.randn(2, 1, 3, 32, 1).expand(2, 4, 3, 32, 32).contiguous()

    def classify(x):
        return model(pixel_values=x).logits

    with torch.no_grad():
        plain = torch.sigmoid(classify(clip))
        assert torch.equal(tta_probabilities(classify, clip, ["hflip", "temporal_shift"]), plain)
        assert torch.equal(tta_probabilities(classify, clip, ["hflip"]), plain)
