"""Attention heatmaps: token attention to per-frame patch maps, and the figure's grid of frames."""

import numpy as np
import pytest
import torch

from avlm.models import TokenLayout
from avlm.tracking.plots import attention_heatmaps, save_and_close, token_map_per_frame

VJEPA_LAYOUT = TokenLayout(time_steps=2, frames_per_step=2, grid=2, patch_size=8, prefix_tokens=0)
TIMM_LAYOUT = TokenLayout(time_steps=3, frames_per_step=1, grid=2, patch_size=8, prefix_tokens=1)


def test_tubelet_steps_are_repeated_per_frame():
    maps = token_map_per_frame(torch.arange(8.0), VJEPA_LAYOUT)
    step_0, step_1 = [[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]]
    assert maps.tolist() == [step_0, step_0, step_1, step_1]


def test_prefix_tokens_are_dropped_and_values_kept():
    # Per frame: CLS, then 4 patches row-major.
    attention = np.array([0.9, 0.1, 0.2, 0.3, 0.4, 0.8, 0.0, 0.0, 0.0, 0.0, 0.7, 0.01, 0.02, 0.03, 0.04])
    maps = token_map_per_frame(attention, TIMM_LAYOUT)
    assert maps.shape == (3, 2, 2)
    assert maps.tolist() == [[[0.1, 0.2], [0.3, 0.4]], [[0.0, 0.0], [0.0, 0.0]], [[0.01, 0.02], [0.03, 0.04]]]
    with pytest.raises(ValueError, match=r"shape \(15,\)"):
        token_map_per_frame(attention[:-1], TIMM_LAYOUT)


def test_heatmap_figure_has_a_row_per_clip_and_a_column_per_frame(tmp_path):
    frames = np.zeros((2, 4, 16, 16, 3), dtype=np.uint8)
    maps = np.stack([token_map_per_frame(torch.arange(8.0), VJEPA_LAYOUT), np.zeros((4, 2, 2))])
    figure = attention_heatmaps(frames, maps, ["clip 1_100", "clip 2_200"])
    assert len(figure.axes) == 2 * 4
    first, last = figure.axes[0], figure.axes[-1]
    assert first.get_title() == "clip 1_100 · frame 0" and last.get_title() == "frame 3"
    frame_image, overlay = first.images
    assert frame_image.get_array().shape == (16, 16, 3)
    assert overlay.get_array().shape == (2, 2) and overlay.get_extent() == [-0.5, 15.5, 15.5, -0.5]
    assert overlay.get_clim() == (0.0, 7.0)  # one colour scale per clip, from 0 to its peak
    assert last.images[1].get_clim() == (0.0, 1.0)  # an all-zero map keeps a valid scale
    with pytest.raises(ValueError, match="do not fit"):
        attention_heatmaps(frames, maps[:, :3], ["a", "b"])
    with pytest.raises(ValueError, match="1 titles for 2 clips"):
        attention_heatmaps(frames, maps, ["a"])
    assert save_and_close(figure, tmp_path / "heatmaps.png").stat().st_size > 0
