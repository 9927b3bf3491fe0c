"""Sanity checks run before any probe headline number: each catches one way a probe result can be wrong.

Every check is a pure function of arrays and callables (the recipe trains the probes and passes them in) and
returns a ``SanityResult`` whose figures go verbatim into the report's Sanity Checks section.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from avlm.data.clips import label_checksum

# How many overlapping keys a failure message names: enough to find them, short enough to read.
_KEYS_NAMED = 5


@dataclass(frozen=True)
class SanityResult:
    """Outcome of one sanity check.

    Attributes:
        name: the check's name, as shown in the report (e.g. ``split_hygiene``).
        passed: whether the check passed; the probe gate fails when any check did not.
        figures: the numbers and checksums the verdict rests on (flat: name → number, string or bool).
        message: one line saying what was found, and on failure what is wrong.
    """

    name: str
    passed: bool
    figures: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def _named_keys(keys: Iterable[Any]) -> str:
    ordered = sorted(keys, key=str)
    shown = ", ".join(repr(k) for k in ordered[:_KEYS_NAMED])
    return shown + (f" and {len(ordered) - _KEYS_NAMED} more" if len(ordered) > _KEYS_NAMED else "")


def split_hygiene(
    train_groups: Iterable[Any],
    val_groups: Iterable[Any],
    train_ids: Iterable[Any],
    val_ids: Iterable[Any],
    *,
    name: str = "split_hygiene",
    other: str = "val",
) -> SanityResult:
    """Train and val (or another held-out split) share no group key (scene, video, patient) and no sample id.

    A shared group leaks near-duplicate samples from train into val; a shared sample id is the same sample in both.
    Either inflates the val number of whichever features memorise best. An empty split fails too: a check run
    on nothing has not checked anything.

    Args:
        train_groups / val_groups: the group key of each sample (or the set of keys) of each split.
        train_ids / val_ids: the sample ids of each split.
        name: the check's name in the report (e.g. ``split_hygiene_seed1`` when run once per seed's split).
        other: the held-out split's name (``val``, ``test``), used in the figures' names and the message.

    Returns:
        Figures: unique ``train_groups``, ``<other>_groups``, ``group_overlap``, ``train_ids``, ``<other>_ids``,
        ``id_overlap`` counts.
    """
    train_group_set, val_group_set = set(train_groups), set(val_groups)
    train_id_set, val_id_set = set(train_ids), set(val_ids)
    shared_groups = train_group_set & val_group_set
    shared_ids = train_id_set & val_id_set
    figures = {
        "train_groups": len(train_group_set),
        f"{other}_groups": len(val_group_set),
        "group_overlap": len(shared_groups),
        "train_ids": len(train_id_set),
        f"{other}_ids": len(val_id_set),
        "id_overlap": len(shared_ids),
    }
    problems = []
    if not (train_group_set and val_group_set and train_id_set and val_id_set):
        problems.append("a split has no groups or no ids: the check ran on nothing")
    if shared_groups:
        problems.append(f"{len(shared_groups)} group key(s) in both train and {other}: {_named_keys(shared_groups)}")
    if shared_ids:
        problems.append(f"{len(shared_ids)} sample id(s) in both train and {other}: {_named_keys(shared_ids)}")
    if problems:
        return SanityResult(name, False, figures, "; ".join(problems))
    message = (
        f"train and {other} are disjoint: {len(train_group_set)} vs {len(val_group_set)} groups, "
        f"{len(train_id_set)} vs {len(val_id_set)} samples"
    )
    return SanityResult(name, True, figures, message)


def tiny_subset_overfit(
    train_fn: Callable[[], float], threshold: float = 0.6, *, name: str = "tiny_subset_overfit"
) -> SanityResult:
    """The probe can fit a tiny training subset: if it cannot, the training loop (not the features) is broken.

    Args:
        train_fn: trains a probe on the tiny subset for the sanity epoch budget and returns its train mAP there.
        threshold: the least train mAP that passes (inclusive).
        name: the check's name in the report.

    Returns:
        Figures: ``train_mAP``, ``threshold``. A NaN mAP fails.
    """
    train_map = float(train_fn())
    passed = bool(train_map >= threshold)
    relation = ">=" if passed else "<"
    message = f"train mAP on the tiny subset {train_map:.4f} {relation} threshold {threshold:.4f}"
    if not passed:
        message += ": the probe cannot fit a few samples; check the loss, learning rate and label wiring"
    return SanityResult(name, passed, {"train_mAP": train_map, "threshold": float(threshold)}, message)


def shuffled_label_control(
    train_fn: Callable[[np.ndarray], float],
    labels: Any,
    rng_seed: int,
    min_drop: float,
    *,
    name: str = "shuffled_label",
) -> SanityResult:
    """Training on row-shuffled labels must score clearly worse than training on the true labels.

    If the probe's train mAP barely drops when the labels no longer belong to their samples, the number measures
    label statistics (prevalence, memorisation), not the features. The shuffle itself is verified first: a
    shuffle that leaves every row as it was (an identity permutation, constant labels) would make the control
    pass vacuously, so it fails the check and no probe is trained.

    Args:
        train_fn: trains the probe on the training features with the given (N, K) labels and returns its train mAP
            against those same labels. It receives numpy arrays: first the true labels, then the shuffled ones.
        labels: (N, K) training labels, one row per training sample.
        rng_seed: seed of the row permutation (``numpy.random.default_rng(rng_seed).permutation(N)``).
        min_drop: the least ``ref_mAP - shuffled_mAP`` that passes (inclusive).
        name: the check's name in the report.

    Returns:
        Figures: ``ref_mAP``, ``shuffled_mAP``, ``drop``, ``min_drop``, ``train_checksum``, ``shuffled_checksum``,
        ``rows_changed`` (of all rows), ``first5_row_diff_count`` (of the first five rows), ``rng_seed``.
    """
    true_labels = np.asarray(labels)
    if true_labels.ndim == 1:
        true_labels = true_labels[:, None]
    permutation = np.random.default_rng(rng_seed).permutation(len(true_labels))
    shuffled_labels = true_labels[permutation]
    row_changed = (shuffled_labels != true_labels).reshape(len(true_labels), -1).any(axis=1)
    figures: dict[str, Any] = {
        "ref_mAP": float("nan"),
        "shuffled_mAP": float("nan"),
        "drop": float("nan"),
        "min_drop": float(min_drop),
        "train_checksum": label_checksum(true_labels),
        "shuffled_checksum": label_checksum(shuffled_labels),
        "rows_changed": int(row_changed.sum()),
        "first5_row_diff_count": int(row_changed[:5].sum()),
        "rng_seed": int(rng_seed),
    }
    if figures["train_checksum"] == figures["shuffled_checksum"] or not row_changed.any():
        message = (
            f"the shuffle changed no label row ({len(true_labels)} rows; identity permutation or identical rows): "
            "the control would pass vacuously, so no probe was trained"
        )
        return SanityResult(name, False, figures, message)
    ref_map = float(train_fn(true_labels))
    shuffled_map = float(train_fn(shuffled_labels))
    drop = ref_map - shuffled_map
    figures.update(ref_mAP=ref_map, shuffled_mAP=shuffled_map, drop=drop)
    passed = bool(drop >= min_drop)
    relation = ">=" if passed else "<"
    message = f"train mAP {ref_map:.4f} true vs {shuffled_map:.4f} shuffled: drop {drop:.4f} {relation} {min_drop:.4f}"
    if not passed:
        message += ": the probe scores as well without the true labels; is train_fn using the labels it is given?"
    return SanityResult(name, passed, figures, message)


def label_provenance(
    first_batch_labels: Any,
    first_batch_indices: Any,
    dataset_labels: Any,
    eval_targets: Any,
    val_labels: Any,
    *,
    name: str = "label_provenance",
) -> SanityResult:
    """The probe trains on its samples' own labels and is evaluated against the val split's labels.

    Catches label mix-ups that leave every other number plausible: a loader that pairs features with another
    sample's labels, or an evaluation scored against the train labels. The comparisons are by checksum, so row
    order matters: the evaluated targets must be in val order (an evaluation loader does not shuffle).

    Args:
        first_batch_labels: (B, K) labels the first training batch actually used.
        first_batch_indices: (B,) dataset row indices of that batch's samples.
        dataset_labels: (N, K) the training split's labels, indexed by ``first_batch_indices``.
        eval_targets: (M, K) targets the evaluation scored against.
        val_labels: (M, K) the val split's labels.
        name: the check's name in the report.

    Returns:
        Figures: checksums ``first_batch_used``, ``first_batch_lookup``, ``eval``, ``val``, ``train``.
    """
    dataset_array = np.asarray(dataset_labels)
    looked_up = dataset_array[np.asarray(first_batch_indices, dtype=np.int64)]
    figures = {
        "first_batch_used": label_checksum(first_batch_labels),
        "first_batch_lookup": label_checksum(looked_up),
        "eval": label_checksum(eval_targets),
        "val": label_checksum(val_labels),
        "train": label_checksum(dataset_array),
    }
    problems = []
    if figures["first_batch_used"] != figures["first_batch_lookup"]:
        problems.append("the first training batch's labels are not its samples' dataset labels")
    if figures["eval"] != figures["val"]:
        origin = " (they are the train labels)" if figures["eval"] == figures["train"] else ""
        problems.append(f"the evaluated targets are not the val labels{origin}")
    if problems:
        return SanityResult(name, False, figures, "; ".join(problems))
    return SanityResult(name, True, figures, "first-batch labels match the dataset; evaluated targets are val's")
