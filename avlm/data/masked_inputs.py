"""Masked clip inputs: a fixed random fraction of each clip's patches blanked, as a masked-video model sees them.

The probe recipe wraps its clip datasets in :class:`MaskedInputs` when ``data.input_mask_ratio`` > 0; the visible
tokens it returns let the ``mean_visible`` pooling average only what the backbone saw.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:  # avlm.data stays importable without the model library
    from avlm.models.pretext import PatchGrid


class MaskedInputs(torch.utils.data.Dataset):
    """A clip dataset whose clips have a fixed random fraction of their patches blanked, with the visible tokens.

    The mask of a clip depends on its sample id and the seed only, so it is the same in every split, subset and
    process. Blanked pixels are set to 0, the dataset mean colour after normalisation (as in the pretext).

    Args:
        clips: items with ``pixel_values`` (T, C, H, W) and ``sample_id``.
        grid: the backbone's token ↔ patch layout (``avlm.models.pretext.token_patch_grid``).
        mask_ratio: fraction of the tokens blanked; at least one token is blanked and at least one is kept.
        seed: seed of the masks.
    """

    def __init__(self, clips: torch.utils.data.Dataset, grid: PatchGrid, mask_ratio: float, seed: int) -> None:
        self.clips = clips
        self.grid = grid
        self.num_masked = min(grid.num_tokens - 1, max(1, round(mask_ratio * grid.num_tokens)))
        self.seed = seed

    def visible(self, sample_id: str) -> torch.Tensor:
        """(L,) bool: the tokens of the clip whose patches are kept."""
        # crc32, not hash(): Python salts str hashes per process, and every rank must draw the same mask.
        rng = np.random.default_rng([self.seed, zlib.crc32(sample_id.encode())])
        keep = torch.ones(self.grid.num_tokens, dtype=torch.bool)
        keep[torch.from_numpy(rng.permutation(self.grid.num_tokens)[: self.num_masked])] = False
        return keep

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.clips[i]
        visible = self.visible(item["sample_id"])
        pixels = item["pixel_values"].masked_fill(self.grid.pixel_mask(~visible[None])[0], 0.0)
        return {**item, "pixel_values": pixels, "visible": visible}
