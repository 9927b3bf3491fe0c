"""Frozen-backbone feature cache: run the backbone once per clip, train the head from disk afterwards.

The cache key covers everything that changes the tokens — backbone fingerprint (weights/revision), input
preprocessing and the dataset manifest, whose hash covers each frame's content (``avlm.data.manifest_hash``) — so
a stale cache is never read. Files are safetensors storing their key, written atomically by the main process while
the other ranks wait; a file of another key is refused and a corrupt one rebuilt.
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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from avlm.errors import DataError

logger = logging.getLogger(__name__)


def cache_key(parts: Mapping[str, Any]) -> str:
    """Return the 24-hex-character file name of the cache entry of ``parts`` (a hash of their JSON, keys sorted)."""
    return hashlib.sha256(_key_json(parts).encode()).hexdigest()[:24]


def _key_json(parts: Mapping[str, Any]) -> str:
    return json.dumps(dict(parts), sort_keys=True, default=str)


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
    audio); ``collate_fn`` batches them when the items hold more than tensors. The file is named by a hash of
    ``key_parts`` and stores them whole; the main process checks it, rebuilding a corrupt or truncated file, and
    the other ranks read it afterwards.

    Returns:
        (tokens, hit): the (N, L, D) tokens and whether they came from an existing cache file.

    Raises:
        DataError: The file holds another key's tokens (or no key: not written here), or another number of clips
            than ``dataset`` (its key does not cover the data); or, on a rank other than the main one, the file
            the main process wrote cannot be read.
    """
    path = Path(cache_dir) / "features" / f"{cache_key(key_parts)}.safetensors"
    hit = path.is_file()
    tokens, failure = None, None
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            try:
                tokens = _read_cache(path, key_parts, len(dataset)) if hit else None
            except _UnusableCache as exc:
                logger.warning("feature cache %s is unusable (%s); rebuilding it", path, exc)
            except DataError as exc:
                failure = exc
            hit = tokens is not None
            if tokens is None and failure is None:
                try:
                    tokens = extract_tokens(
                        backbone,
                        dataset,
                        batch_size,
                        accelerator.device,
                        desc=f"caching {path.name}",
                        input_key=input_key,
                        collate_fn=collate_fn,
                    )
                    _write_cache(path, tokens, key_parts)
                except Exception as exc:
                    failure = exc
    # Raised after the barrier that ends main_process_first, so that the other ranks do not wait forever.
    if failure is not None:
        raise failure
    if tokens is None:
        try:
            tokens = _read_cache(path, key_parts, len(dataset))
        except _UnusableCache as exc:
            raise DataError(f"feature cache {path}, written by the main process, cannot be read: {exc}") from exc
    return tokens, hit


class _UnusableCache(Exception):
    """A cache file that cannot be read (truncated, corrupt, no tokens): rebuilt, never trusted."""


def _read_cache(path: Path, key_parts: Mapping[str, Any], expected_clips: int) -> torch.Tensor:
    """Return the tokens of a cache file after checking its stored key and its number of clips."""
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = (f.metadata() or {}).get("key")
            # Before the tensor: a file of another key is refused, not read (nor rebuilt over).
            _check_stored_key(path, stored, key_parts)
            tokens = f.get_tensor("tokens")
    except (SafetensorError, OSError) as exc:
        raise _UnusableCache(str(exc)) from exc
    if len(tokens) != expected_clips:
        raise DataError(
            f"feature cache {path} holds tokens of {len(tokens)} clips but the dataset has {expected_clips}: the "
            "cache key does not cover this dataset; delete the file and check the key's 'manifest' part"
        )
    return tokens


def _check_stored_key(path: Path, stored: str | None, key_parts: Mapping[str, Any]) -> None:
    """Refuse a file whose stored key differs from the requested one (a file copied or renamed into place)."""
    wanted = json.loads(_key_json(key_parts))
    try:
        found = json.loads(stored) if stored is not None else None
    except json.JSONDecodeError as exc:
        raise _UnusableCache(f"its stored key is not JSON: {exc}") from exc
    if found == wanted:
        return
    if not isinstance(found, dict):
        raise DataError(f"feature cache {path} stores no key (not written by avlm); refusing it: delete the file")
    differ = sorted(name for name in {*found, *wanted} if found.get(name) != wanted.get(name))
    detail = ", ".join(f"{name}: stored {found.get(name)!r}, requested {wanted.get(name)!r}" for name in differ)
    raise DataError(
        f"feature cache {path} was written for another key ({detail}); refusing tokens that may belong to other "
        "data or another backbone: delete the file to rebuild it"
    )


def _write_cache(path: Path, tokens: torch.Tensor, key_parts: Mapping[str, Any]) -> None:
    """Write atomically: a reader sees the old file or the whole new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    try:
        save_file({"tokens": tokens.contiguous()}, str(tmp), metadata={"key": _key_json(key_parts)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("feature cache written: %s %s", path, tuple(tokens.shape))


class TokenDataset(torch.utils.data.Dataset):
    """Cached tokens + labels, yielding the same dict keys as a pixel dataset but ``tokens`` for ``pixel_values``."""

    def __init__(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.tokens = tokens
        self.labels = labels

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"tokens": self.tokens[index], "labels": self.labels[index], "index": index}
