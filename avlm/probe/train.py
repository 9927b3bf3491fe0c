"""One probe trained on frozen features by the shared loop (``avlm.train.fit``), and a grid cell scored from two.

A cell of the probe grid trains two probes alike (same init, batch order and data), one on the pretrained
backbone's features and one on its random-init copy's, so that they differ only by their features.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch import nn

from avlm.features import TokenDataset
from avlm.metrics import mean_average_precision
from avlm.models import LinearProbe, parameter_groups
from avlm.probe.gate import CellResult
from avlm.stats import best_f1
from avlm.tracking import RunLogger
from avlm.train import StepOutput, TrainConfig, build_optimizer, build_scheduler, fit


@dataclasses.dataclass
class ProbeFit:
    """A trained probe's last-epoch predictions.

    Attributes:
        scores / targets: split → (N, K) sigmoid scores and the targets they were scored against, in split order.
        first_batch: the labels and dataset indices of the first training batch.
    """

    scores: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]
    first_batch: tuple[np.ndarray, np.ndarray]


def train_probe(
    *,
    features: dict[str, torch.Tensor],
    labels: dict[str, torch.Tensor],
    pooling: str,
    optimizer_name: str,
    lr: float,
    momentum: float,
    attentive_heads: int,
    seed: int,
    train_cfg: TrainConfig,
    accelerator: Accelerator,
    run_logger: RunLogger,
    checkpoint_dir: Path,
    config_yaml: str,
) -> ProbeFit:
    """Train one probe on ``features["train"]`` with the shared loop; predict every split of ``features``.

    The probe's init and batch order depend on ``seed`` alone, so the pretrained and random-init probes of a cell
    differ only by their features. The predictions are the last epoch's: val chooses nothing here.

    Args:
        features / labels: split → probe inputs (``avlm.probe.features.FrozenFeatures.inputs``) and their labels;
            ``train`` is trained on, ``val`` is evaluated every epoch, every split is predicted at the end.
        pooling: the inputs' pooling; ``attentive`` trains an attentive pooler, the others are standardised.
        optimizer_name: ``adamw`` or ``sgd`` (``avlm.train.build_optimizer``).
        lr: learning rate; weight decay is ``train_cfg.weight_decay``.
        momentum: SGD momentum.
        attentive_heads: attention heads of the attentive pooler.
        seed: seed of the init and batch order.
        train_cfg: epochs, batch size, schedule, precision (the shared loop's settings).
        accelerator: the run's accelerator.
        run_logger: where the loop logs the probe's curves.
        checkpoint_dir: the loop's checkpoints.
        config_yaml: the run's config, saved beside the checkpoints.
    """
    train_features, train_labels = features["train"], labels["train"]
    stats = {}
    if pooling != "attentive":
        stats = {"feature_mean": train_features.mean(0), "feature_std": train_features.std(0).clamp_min(1e-6)}
    torch.manual_seed(seed)
    probe = LinearProbe(train_features.shape[-1], train_labels.shape[1], pooling, heads=attentive_heads, **stats)
    # The shared builder: no decay on biases and the pooler's queries and norms, as in the other recipes.
    optimizer = build_optimizer(
        parameter_groups(probe, [("probe", None, lr)], weight_decay=train_cfg.weight_decay),
        kind=optimizer_name,
        momentum=momentum,
    )
    train_loader = torch.utils.data.DataLoader(
        TokenDataset(train_features, train_labels),
        batch_size=min(train_cfg.batch_size, len(train_features)),
        shuffle=True,
        # whole batches only: accelerate pads a short last batch with repeated samples when it splits it across
        # processes, so N processes would train on other samples than one
        drop_last=True,
        generator=torch.Generator().manual_seed(seed),
    )
    eval_loaders = {
        split: torch.utils.data.DataLoader(TokenDataset(features[split], labels[split]), batch_size=512)
        for split in features
    }
    scheduler = build_scheduler(
        optimizer,
        name=train_cfg.scheduler,
        num_training_steps=train_cfg.epochs * len(train_loader),
        warmup_ratio=train_cfg.warmup_ratio,
    )
    probe, optimizer, train_loader, scheduler = accelerator.prepare(probe, optimizer, train_loader, scheduler)
    eval_loaders = {split: accelerator.prepare(loader) for split, loader in eval_loaders.items()}
    loss_fn = nn.BCEWithLogitsLoss()
    first_batch: list[np.ndarray] = []

    def train_step(model: nn.Module, batch: dict[str, Any], _generator: torch.Generator) -> StepOutput:
        if not first_batch:  # what the first batch really trained on, for the label-provenance check
            first_batch.extend([batch["labels"].cpu().numpy(), batch["index"].cpu().numpy()])
        logits = model(batch["tokens"])
        return StepOutput(loss_fn(logits, batch["labels"]), torch.sigmoid(logits), batch["labels"])

    @torch.no_grad()
    def predict(model: nn.Module, loader: Any) -> tuple[np.ndarray, np.ndarray]:
        scores, targets = [], []
        for batch in loader:
            logits, batch_labels = accelerator.gather_for_metrics((model(batch["tokens"]), batch["labels"]))
            scores.append(torch.sigmoid(logits).float().cpu().numpy())
            targets.append(batch_labels.float().cpu().numpy())
        return np.concatenate(scores), np.concatenate(targets)

    def evaluate(model: nn.Module) -> dict[str, float]:
        scores, targets = predict(model, eval_loaders["val"])
        return {"val/mAP": mean_average_precision(targets, scores), "val/best_F1": best_f1(targets, scores)}

    fit(
        accelerator=accelerator,
        model=probe,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=train_loader,
        train_step=train_step,
        train_metrics=lambda scores, targets: {"mAP": mean_average_precision(targets, scores)},
        evaluate=evaluate,
        cfg=train_cfg,
        seed=seed,
        run_logger=run_logger,
        checkpoint_dir=checkpoint_dir,
        config_yaml=config_yaml,
        verbose=False,
    )
    probe.eval()
    predictions = {split: predict(probe, loader) for split, loader in eval_loaders.items()}
    return ProbeFit(
        scores={split: scores for split, (scores, _) in predictions.items()},
        targets={split: targets for split, (_, targets) in predictions.items()},
        first_batch=(first_batch[0], first_batch[1]),
    )


def cell_result(pooling: str, optimizer_name: str, seed: int, fits: dict[str, ProbeFit]) -> CellResult:
    """The grid cell of the ``pretrained`` and ``random`` probes in ``fits``: mAP per split, best F1 on val.

    Test numbers are None when the probes predicted no ``test`` split.
    """

    def split_map(name: str, split: str) -> float | None:
        fitted = fits[name]
        return mean_average_precision(fitted.targets[split], fitted.scores[split]) if split in fitted.scores else None

    return CellResult(
        pooling=pooling,
        optimizer=optimizer_name,
        seed=seed,
        pre_val=split_map("pretrained", "val"),
        rand_val=split_map("random", "val"),
        pre_test=split_map("pretrained", "test"),
        rand_test=split_map("random", "test"),
        pre_best_f1=best_f1(fits["pretrained"].targets["val"], fits["pretrained"].scores["val"]),
        rand_best_f1=best_f1(fits["random"].targets["val"], fits["random"].scores["val"]),
    )
