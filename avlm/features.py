"""Frozen-backbone feature cache: run the backbone once per clip, train the head from disk afterwards.

The cache key covers everything that changes the tokens — backbone fingerprint (weights/revision), input
preprocessing and the dataset manifest — so a stale cache is never read. Files are safetensors, written
atomically by the main process while the other ranks wait.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


def cache_key(parts: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(parts), sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def extract_tokens(
    backbone: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    device: Any,
    desc: str = "backbone features",
    input_key: str = "pixel_values",
    collate_fn: Callable | None = None,
) -> torch.Tensor:
    """Backbone tokens (N, L, D) for every item of ``dataset`` (its ``input_key`` field), in order, in eval mode."""
    was_training = backbone.training
    backbone.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)
    chunks = [backbone(batch[input_key].to(device)).tokens.float().cpu() for batch in tqdm(loader, desc=desc)]
    backbone.train(was_training)
    return torch.cat(chunks)


def cached_tokens(
    backbone: torch.nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    key_parts: Mapping[str, Any],
    cache_dir: str | Path,
    accelerator: Any,
    batch_size: int = 16,
    input_key: str = "pixel_values",
    collate_fn: Callable | None = None,
) -> tuple[torch.Tensor, bool]:
    """Tokens of ``dataset`` from the cache, computing and storing them first if needed.

    ``input_key`` names the backbone's input in the dataset's items (``pixel_values`` for video, ``waveform`` for
    audio); ``collate_fn`` batches them when the items hold more than tensors.

    Returns:
        (tokens, hit): the (N, L, D) tokens and whether they came from an existing cache file.
    """
    path = Path(cache_dir) / "features" / f"{cache_key(key_parts)}.safetensors"
    hit = path.is_file()
    with accelerator.main_process_first():
        if not path.is_file() and accelerator.is_main_process:
            tokens = extract_tokens(
                backbone,
                dataset,
                batch_size,
                accelerator.device,
                desc=f"caching {path.name}",
                input_key=input_key,
                collate_fn=collate_fn,
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file(
                {"tokens": tokens.contiguous()}, str(tmp), metadata={"key": json.dumps(dict(key_parts), default=str)}
            )
            tmp.rename(path)
            logger.info("feature cache written: %s %s", path, tuple(tokens.shape))
    tokens = load_file(str(path))["tokens"]
    if len(tokens) != len(dataset):
        raise RuntimeError(f"feature cache {path} holds {len(tokens)} clips, expected {len(dataset)}; delete it")
    return tokens, hit


class TokenDataset(torch.utils.data.Dataset):
    """Cached tokens + labels, yielding the same dict keys as a pixel dataset but ``tokens`` for ``pixel_values``."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens = tokens
        self.labels = labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokens[index], "labels": self.labels[index], "index": index}
