"""One probe trained through the shared loop learns separable features, is scored on val in val order and reports
the first batch it trained on; a grid cell is scored from its two probes."""

import numpy as np
import pytest
import torch

from avlm.metrics import mean_average_precision
from avlm.probe import ProbeFit, cell_result, train_probe
from avlm.stats import best_f1
from avlm.tracking import NullLogger
from avlm.train import TrainConfig, make_accelerator


def separable(n, seed):
    """Features whose first two dimensions decide the two labels."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, 8, generator=generator)
    labels = torch.stack([features[:, 0] > 0.5, features[:, 1] < -0.5], dim=1).float()
    return features, labels


@pytest.mark.parametrize("optimizer_name, lr", [("adamw", 1e-2), ("sgd", 0.1)])
def test_a_probe_learns_through_the_shared_loop_and_reports_its_first_batch(tmp_path, optimizer_name, lr):
    (train_x, train_y), (val_x, val_y) = separable(256, 0), separable(128, 1)
    train_cfg = TrainConfig(epochs=15, batch_size=32, lr=lr, weight_decay=0.0, warmup_ratio=0.0, patience=0)
    fitted = train_probe(
        features={"train": train_x, "val": val_x},
        labels={"train": train_y, "val": val_y},
        pooling="mean_all",
        optimizer_name=optimizer_name,
        lr=lr,
        momentum=0.9,
        attentive_heads=4,
        seed=1,
        train_cfg=train_cfg,
        accelerator=make_accelerator(train_cfg),
        run_logger=NullLogger(),
        checkpoint_dir=tmp_path,
        config_yaml="",
    )
    assert mean_average_precision(fitted.targets["val"], fitted.scores["val"]) > 0.9
    assert np.array_equal(fitted.targets["val"], val_y.numpy())  # scored against val, in val order
    labels, indices = fitted.first_batch
    assert labels.shape == (32, 2) and np.array_equal(labels, train_y.numpy()[indices])
    assert not np.array_equal(indices, np.arange(32))  # the batches are shuffled
    assert (tmp_path / "last" / "trainable.safetensors").is_file()  # the shared loop's checkpoints


def test_a_cell_is_scored_from_its_pretrained_and_random_probes_with_test_only_where_predicted():
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.4).astype(np.float32)
    good = targets + 0.3 * rng.normal(size=targets.shape)  # informative scores
    noise = rng.normal(size=targets.shape)
    first_batch = (targets[:4], np.arange(4))
    fits = {
        "pretrained": ProbeFit({"val": good, "test": good[::-1]}, {"val": targets, "test": targets[::-1]}, first_batch),
        "random": ProbeFit({"val": noise, "test": noise}, {"val": targets, "test": targets}, first_batch),
    }
    cell = cell_result("mean_all", "adamw", 3, fits)
    assert (cell.pooling, cell.optimizer, cell.seed) == ("mean_all", "adamw", 3)
    assert (
        cell.pre_val == mean_average_precision(targets, good) > cell.rand_val == mean_average_precision(targets, noise)
    )
    assert cell.pre_test == mean_average_precision(targets[::-1], good[::-1])
    assert cell.pre_best_f1 == best_f1(targets, good) and cell.rand_best_f1 == best_f1(targets, noise)
    without_test = {
        name: ProbeFit({"val": f.scores["val"]}, {"val": f.targets["val"]}, first_batch) for name, f in fits.items()
    }
    no_test = cell_result("mean_all", "adamw", 3, without_test)
    assert no_test.pre_test is None and no_test.rand_test is None and no_test.pre_val == cell.pre_val
