"""Each sanity check passes on clean data and catches its fault: leakage, a broken shuffle, mixed-up labels."""

import hashlib

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from avlm.data import label_checksum
from avlm.probe import label_provenance, shuffled_label_control, split_hygiene, tiny_subset_overfit


def linear_probe_data(n=120, dim=4, classes=3, seed=0):
    """Features and multi-label targets that a linear probe can fit (and cannot fit once rows are shuffled)."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(n, dim))
    logits = features @ rng.normal(size=(dim, classes)) + 0.3 * rng.normal(size=(n, classes))
    labels = (logits > np.quantile(logits, 0.65, axis=0)).astype(np.float32)
    return features, labels


def linear_probe_train_map(features, calls):
    """train_fn for the shuffled-label control: a logistic probe per class, scored on the labels it was given."""

    def train_fn(labels):
        calls.append(label_checksum(labels))
        scores = np.column_stack(
            [
                LogisticRegression().fit(features, labels[:, k]).decision_function(features)
                for k in range(labels.shape[1])
            ]
        )
        return average_precision_score(labels, scores, average="macro")

    return train_fn


def test_label_checksum_is_sha256_of_shape_and_canonical_float32_bytes():
    labels = np.array([[1, 0, 1], [0, 0, 1]])
    expected = hashlib.sha256(b"(2, 3)" + labels.astype("<f4").tobytes()).hexdigest()
    assert label_checksum(labels) == expected and len(expected) == 64
    # bool, int, float64, a list and a CPU tensor of the same values hash equal
    for same in (labels.astype(bool), labels.astype(np.float64), labels.tolist(), torch.tensor(labels)):
        assert label_checksum(same) == expected
    # a strided view hashes as its copy; -0.0 as 0.0
    wide = np.arange(12, dtype=np.float64).reshape(3, 4)
    assert label_checksum(wide.T) == label_checksum(np.ascontiguousarray(wide.T))
    assert label_checksum(np.array([[-0.0, 1.0]])) == label_checksum(np.array([[0.0, 1.0]]))
    # a changed value, reordered rows or another shape of the same bytes all change it
    changed = labels.copy()
    changed[1, 1] = 1
    assert label_checksum(changed) != expected
    assert label_checksum(labels[::-1]) != expected
    assert label_checksum(labels.reshape(3, 2)) != expected


def test_split_hygiene_passes_disjoint_splits():
    result = split_hygiene(["s1", "s1", "s2"], ["s3", "s4"], ["a", "b", "c"], ["d", "e"])
    assert result.passed and result.name == "split_hygiene"
    assert result.figures == {
        "train_groups": 2,
        "val_groups": 2,
        "group_overlap": 0,
        "train_ids": 3,
        "val_ids": 2,
        "id_overlap": 0,
    }


def test_split_hygiene_catches_a_shared_group_and_names_it():
    result = split_hygiene(
        ["s1", "s2", "scene-7"], ["scene-7", "s9"], ["a", "b", "c"], ["d", "e"], name="hygiene_seed2"
    )
    assert not result.passed and result.name == "hygiene_seed2"
    assert result.figures["group_overlap"] == 1 and result.figures["id_overlap"] == 0
    assert "'scene-7'" in result.message and "group" in result.message


def test_split_hygiene_catches_a_shared_sample_id_and_truncates_long_lists():
    result = split_hygiene(["s1"], ["s2"], ["a", "b", "c"], ["c", "d"])
    assert not result.passed and result.figures["id_overlap"] == 1 and "'c'" in result.message
    ids = [f"tok{i:02d}" for i in range(8)]
    many = split_hygiene(["s1"], ["s2"], ids, ids)
    assert many.figures["id_overlap"] == 8
    assert "'tok00'" in many.message and "'tok05'" not in many.message and "and 3 more" in many.message


def test_split_hygiene_fails_on_an_empty_split():
    result = split_hygiene(["s1"], [], ["a"], [])
    assert not result.passed and "ran on nothing" in result.message


@pytest.mark.parametrize(
    "train_map, passed",
    [(0.6, True), (0.95, True), (np.nextafter(0.6, 0.0), False), (0.2, False), (float("nan"), False)],
)
def test_tiny_subset_overfit_threshold_is_inclusive(train_map, passed):
    calls = []
    result = tiny_subset_overfit(lambda: calls.append(1) or train_map, threshold=0.6)
    assert result.passed is passed and calls == [1]
    assert result.figures["threshold"] == 0.6
    np.testing.assert_equal(result.figures["train_mAP"], train_map)


def test_shuffled_label_control_passes_a_probe_that_uses_its_labels():
    features, labels = linear_probe_data()
    calls = []
    result = shuffled_label_control(linear_probe_train_map(features, calls), labels, rng_seed=3, min_drop=0.2)
    figures = result.figures
    assert result.passed, result.message
    assert figures["drop"] == pytest.approx(figures["ref_mAP"] - figures["shuffled_mAP"]) and figures["drop"] >= 0.2
    # train_fn got the true labels first, then a shuffle that really differs from them
    assert calls == [figures["train_checksum"], figures["shuffled_checksum"]]
    assert figures["train_checksum"] == label_checksum(labels) != figures["shuffled_checksum"]
    permutation = np.random.default_rng(3).permutation(len(labels))
    changed = (labels[permutation] != labels).any(axis=1)
    assert figures["rows_changed"] == changed.sum() > 0
    assert figures["first5_row_diff_count"] == changed[:5].sum()


def test_shuffled_label_control_fails_a_probe_that_ignores_its_labels():
    features, labels = linear_probe_data()
    # The bug this control exists for: train_fn scores against labels it holds itself, not the ones passed in.
    probe = linear_probe_train_map(features, [])
    result = shuffled_label_control(lambda _: probe(labels), labels, rng_seed=3, min_drop=0.2)
    assert not result.passed
    assert result.figures["drop"] == pytest.approx(0.0)
    assert result.figures["train_checksum"] != result.figures["shuffled_checksum"]


def test_shuffled_label_control_fails_on_constant_labels_without_training():
    calls = []
    result = shuffled_label_control(lambda y: calls.append(1) or 1.0, np.ones((50, 3)), rng_seed=0, min_drop=0.1)
    assert not result.passed and calls == []
    assert result.figures["train_checksum"] == result.figures["shuffled_checksum"]
    assert result.figures["rows_changed"] == 0 and result.figures["first5_row_diff_count"] == 0
    assert np.isnan(result.figures["drop"]) and "changed no label row" in result.message


def test_shuffled_label_control_fails_on_an_identity_permutation():
    labels = np.eye(3)
    seed = next(s for s in range(1000) if (np.random.default_rng(s).permutation(3) == np.arange(3)).all())
    calls = []
    result = shuffled_label_control(lambda y: calls.append(1) or 1.0, labels, rng_seed=seed, min_drop=0.1)
    assert not result.passed and calls == []
    assert result.figures["rng_seed"] == seed and result.figures["rows_changed"] == 0
    # the next seed that does permute passes the shuffle check and trains both probes
    other = next(s for s in range(seed + 1, 1000) if (np.random.default_rng(s).permutation(3) != np.arange(3)).any())
    assert shuffled_label_control(
        lambda y: float(label_checksum(y) == label_checksum(labels)), labels, rng_seed=other, min_drop=0.5
    ).passed


def provenance_case(seed=0):
    rng = np.random.default_rng(seed)
    train_labels = (rng.random((40, 3)) < 0.4).astype(np.float32)
    val_labels = (rng.random((40, 3)) < 0.4).astype(np.float32)
    batch_indices = rng.permutation(40)[:8]
    return train_labels, val_labels, batch_indices


def test_label_provenance_passes_consistent_labels():
    train_labels, val_labels, batch_indices = provenance_case()
    batch = torch.tensor(train_labels[batch_indices])  # what a DataLoader hands the training step
    result = label_provenance(batch, torch.tensor(batch_indices), train_labels, val_labels.copy(), val_labels)
    assert result.passed, result.message
    assert result.figures["first_batch_used"] == result.figures["first_batch_lookup"]
    assert result.figures["eval"] == result.figures["val"] != result.figures["train"]


def test_label_provenance_catches_first_batch_labels_from_other_rows():
    train_labels, val_labels, batch_indices = provenance_case()
    shifted = train_labels[(batch_indices + 1) % len(train_labels)]  # an off-by-one in the loader
    result = label_provenance(shifted, batch_indices, train_labels, val_labels, val_labels)
    assert not result.passed and "first training batch" in result.message
    assert result.figures["first_batch_used"] != result.figures["first_batch_lookup"]


def test_label_provenance_catches_evaluation_against_train_labels():
    train_labels, val_labels, batch_indices = provenance_case()
    result = label_provenance(train_labels[batch_indices], batch_indices, train_labels, train_labels, val_labels)
    assert not result.passed and "not the val labels (they are the train labels)" in result.message
    # a shuffled evaluation order is also caught: scores and targets would no longer line up with val
    reordered = val_labels[np.random.default_rng(1).permutation(len(val_labels))]
    assert not label_provenance(train_labels[batch_indices], batch_indices, train_labels, reordered, val_labels).passed
