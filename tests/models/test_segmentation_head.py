"""The lightweight segmentation decoder (Exp8): shapes, prefix tokens, tubelet frames, its loss, and that it learns."""

import pytest
import torch
import torch.nn.functional as F

from avlm.errors import ModelError
from avlm.metrics.segmentation import ConfusionMatrix, segmentation_metrics
from avlm.models import TokenLayout
from avlm.models.segmentation import SegmentationHead, segmentation_loss

VJEPA_LAYOUT = TokenLayout(time_steps=2, frames_per_step=2, grid=4, patch_size=8, prefix_tokens=0)
TIMM_LAYOUT = TokenLayout(time_steps=4, frames_per_step=1, grid=4, patch_size=8, prefix_tokens=1)
CLASSES = ("background", "cystic_plate", "calot_triangle", "cystic_artery", "cystic_duct")


def test_logits_per_frame_and_a_tubelet_map_serves_both_its_frames():
    torch.manual_seed(0)
    head = SegmentationHead(16, 5, VJEPA_LAYOUT, hidden=8)
    logits = head(torch.randn(3, VJEPA_LAYOUT.num_tokens, 16))
    assert logits.shape == (3, 4, 5, 32, 32)
    assert torch.equal(logits[:, 0], logits[:, 1]) and torch.equal(logits[:, 2], logits[:, 3])
    assert not torch.equal(logits[:, 1], logits[:, 2])


def test_prefix_tokens_are_dropped():
    torch.manual_seed(0)
    head = SegmentationHead(16, 5, TIMM_LAYOUT, hidden=8)
    tokens = torch.randn(2, TIMM_LAYOUT.num_tokens, 16)
    changed = tokens.clone()
    changed[:, :: TIMM_LAYOUT.tokens_per_step] = 100.0  # the CLS token of every frame
    assert head(tokens).shape == (2, 4, 5, 32, 32)
    assert torch.equal(head(tokens), head(changed))


def test_wrong_token_count_and_pooled_backbones_are_model_errors():
    with pytest.raises(ModelError, match="no token layout"):
        SegmentationHead(16, 5, None)
    head = SegmentationHead(16, 5, VJEPA_LAYOUT, hidden=8)
    with pytest.raises(ModelError, match=r"\(B, 32, D\)"):
        head(torch.randn(1, 31, 16))


def test_loss_is_cross_entropy_over_masked_clips_and_pixels_only():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 3, 4, 4, requires_grad=True)
    seg_mask = torch.randint(0, 3, (2, 2, 4, 4))
    seg_mask[0, 1] = -1  # clip 0's second frame has no mask
    has_mask = torch.tensor([True, False])  # clip 1 is left out whatever its mask says
    loss = segmentation_loss(logits, seg_mask, has_mask)
    expected = F.cross_entropy(logits[0, 0].unsqueeze(0), seg_mask[0, 0].unsqueeze(0))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_without_masks_is_zero_with_a_graph():
    logits = torch.randn(2, 2, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 2, 4, 4), -1), torch.tensor([True, False]))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))
    with pytest.raises(ModelError, match="do not match"):
        segmentation_loss(logits, torch.zeros(2, 2, 8, 8, dtype=torch.long), torch.tensor([True, True]))


def _linearly_readable_batch(class_vectors: torch.Tensor, batch: int, generator: torch.Generator):
    """Tokens = their patch's class vector + noise; the mask paints each patch's pixels with its class."""
    layout = VJEPA_LAYOUT
    classes = torch.randint(0, 5, (batch, layout.time_steps, layout.grid, layout.grid), generator=generator)
    tokens = class_vectors[classes.flatten(1)] + 0.1 * torch.randn(batch, layout.num_tokens, 16, generator=generator)
    pixels = classes.repeat_interleave(layout.patch_size, 2).repeat_interleave(layout.patch_size, 3)
    seg_mask = pixels.repeat_interleave(layout.frames_per_step, 1)
    return tokens, seg_mask, torch.ones(batch, dtype=torch.bool)


def _miou(head, tokens, seg_mask):
    confusion = ConfusionMatrix(5)
    with torch.no_grad():
        confusion.update(head(tokens).argmax(2), seg_mask)
    return segmentation_metrics(confusion, CLASSES)["mIoU"]


def test_miou_rises_when_trained_on_linearly_readable_tokens():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    class_vectors = torch.randn(5, 16, generator=generator)
    head = SegmentationHead(16, 5, VJEPA_LAYOUT, hidden=16)
    held_out = _linearly_readable_batch(class_vectors, 8, generator)[:2]
    before = _miou(head, *held_out)
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(40):
        tokens, seg_mask, has_mask = _linearly_readable_batch(class_vectors, 4, generator)
        loss = segmentation_loss(head(tokens), seg_mask, has_mask)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = _miou(head, *held_out)
    assert before < 0.15
    assert after > 0.6
