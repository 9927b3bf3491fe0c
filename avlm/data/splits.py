"""Checks of a training's splits made before its MLflow run is opened, so data that cannot train leaves no run.

A reader that skips missing clips (``max_missing_fraction``) can return an empty split, and a small split or a
``limit_clips`` can hold fewer training items than one batch; the loader drops the last partial batch, so either
would only fail inside the run, as a FAILED run with no epoch (or, for an empty evaluation split, after training).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from avlm.errors import ConfigError, DataError


def check_training_splits(
    splits: Mapping[str, Sequence[Any]],
    *,
    where: str,
    batch_size: int,
    train_items: int | None = None,
    unit: str = "clips",
    required: Sequence[str] = ("train", "val"),
) -> None:
    """Refuse splits a training cannot use: a required split absent or empty, any split present but empty, or a
    train split with fewer items than one batch.

    Args:
        splits: Split name → its clips (records of any kind).
        where: The dataset as a user finds it (its folder or manifest), named in every message.
        batch_size: ``train.batch_size``; the train loader drops a last partial batch.
        train_items: What one training batch counts (e.g. the captions of the train clips); default: its clips.
        unit: The name of those items in the message (``clips``, ``captions``).
        required: Splits that must be present.

    Raises:
        DataError: A required split is absent, or a split has no clips (e.g. all of its files were skipped).
        ConfigError: ``train.batch_size`` exceeds the training items (naming the key and the count).
    """
    for name in required:
        if name not in splits:
            present = ", ".join(splits) or "none"
            raise DataError(f"{where}: no '{name}' split (splits read: {present})")
    for name, clips in splits.items():
        if not clips:
            raise DataError(f"{where}: split '{name}' has no clips (were all of its files skipped as missing?)")
    items = len(splits["train"]) if train_items is None else train_items
    if items < batch_size:
        raise ConfigError(
            f"config key 'train.batch_size' ({batch_size}) exceeds the {items} training {unit} of {where}: no "
            "training step would run (lower it, or use more data)"
        )
