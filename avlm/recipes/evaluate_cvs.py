"""Evaluate an ensemble of CVS classifiers: average the probabilities of several versions or runs on a split.

The members are named as users name them (``models:/avlm-cvs@champion``, ``models:/avlm-cvs/3``,
``runs:/<run id>`` or a bare run id). Each member is evaluated as its own training evaluated itself: with its
checkpoint's config (backbone, image size and normalisation, clip_frames, frame selection, limits, test-time
augmentation ``eval.tta``) on its own data (``data.data_dir`` moves the root of every member at once). The members
must see the same clips of the split with the same labels; the ensemble's probability per clip and criterion is the
mean of the members' probabilities, and its AP per criterion is sklearn's over those means. An ensemble of one
member therefore reproduces that member's ``final/<split>_*`` figures.

Everything that can be refused (a URI, a checkpoint, a split, data that differ between members) is checked before
the MLflow run opens. The new run (experiment ``avlm-evaluate_cvs``) holds ``ensemble/mAP``,
``ensemble/AP_C1..3``, ``member_<i>/mAP`` and ``member_<i>/AP_C1..3``; tags ``ensemble.members`` (the URIs as
given) and ``member_<i>.uri|model|version|run_id`` (what each resolved to); artifacts
``predictions/<split>_predictions.csv`` (per clip: labels, the ensemble's and every member's probabilities) and
``tables/ensemble.md`` (members vs ensemble).

Run it::

    mlflow run . -e evaluate_cvs --env-manager local -P config=examples/cvs/ensemble_demo.yaml
    python entrypoints/evaluate_cvs.py --members [models:/avlm-cvs/1,models:/avlm-cvs/2] --split test
    python entrypoints/evaluate_cvs.py --members [models:/avlm-cvs@champion,<run id>] --data_dir /data/endoscapes
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from avlm.config import config_to_dict, flatten_config, load_config
from avlm.data import CVS_CRITERIA, ClipDataset
from avlm.data.endoscapes import ClipRecord
from avlm.errors import ConfigError
from avlm.models.tta import tta_probabilities
from avlm.recipes.cvs import (
    CVSConfig,
    classification_metrics,
    load_classifier,
    load_cvs_config,
    load_cvs_splits,
    write_predictions,
)
from avlm.tracking import TrackingConfig, provenance_tags, tracked_run
from avlm.tracking.model_source import CheckpointSource, fetch_checkpoint

logger = logging.getLogger(__name__)

RECIPE = "evaluate_cvs"


@dataclasses.dataclass
class EnsembleDataConfig:
    """What replaces the members' own data settings; an empty value keeps each member's.

    Attributes:
        data_dir: the Endoscapes2023 root every member reads (empty = each member's own data_dir, or the built-in
            demo data it was trained on).
        label_policy: how the annotators' votes become labels for every member (empty = each member's own; members
            trained with different policies need one here to be compared on the same labels).
    """

    data_dir: str = ""
    label_policy: Literal["", "majority", "any", "all", "annotator_1", "annotator_2", "annotator_3"] = ""


@dataclasses.dataclass
class EvaluateCVSConfig:
    """One evaluation of an ensemble of CVS classifiers.

    Attributes:
        members: ``models:/<name>@<alias>``, ``models:/<name>/<version>``, ``runs:/<run id>`` or a run id of a
            train_cvs run, one per member (at least one, each once).
        split: which split of the members' data to evaluate.
        data: replaces the members' data settings (see :class:`EnsembleDataConfig`).
        batch_size: clips per forward pass.
        tracking: where the evaluation run is logged (experiment empty = ``avlm-evaluate_cvs``).
        output_dir: local folder; the run's files go to ``<output_dir>/<run name>-<run id[:8]>/``.
    """

    members: list[str] = dataclasses.field(default_factory=list)
    split: Literal["val", "test"] = "val"
    data: EnsembleDataConfig = dataclasses.field(default_factory=EnsembleDataConfig)
    batch_size: int = 16
    tracking: TrackingConfig = dataclasses.field(default_factory=TrackingConfig)
    output_dir: str = "outputs"

    def __post_init__(self) -> None:
        if not self.members:
            raise ConfigError("config key 'members' is empty: name the versions or runs to ensemble")
        blank = [i for i, uri in enumerate(self.members) if not uri.strip()]
        if blank:
            raise ConfigError(f"config key 'members[{blank[0]}]' is empty")
        repeated = sorted({uri for uri in self.members if self.members.count(uri) > 1})
        if repeated:
            raise ConfigError(f"config key 'members' names {', '.join(repeated)} more than once")
        if self.batch_size < 1:
            raise ConfigError(f"config key 'batch_size' must be >= 1, got {self.batch_size}")


def load_evaluate_cvs_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> EvaluateCVSConfig:
    """The config from ``path`` (YAML, optional) and ``key=value`` overrides.

    Raises:
        ConfigError: a bad key or value (unknown keys are named with where they came from).
    """
    return load_config(EvaluateCVSConfig, path, overrides)


@dataclasses.dataclass
class EnsembleMember:
    """One member, resolved: its checkpoint, its training config and the split's clips it sees.

    Attributes:
        key: the config key naming it (``members[<i>]``), for messages.
        source: the fetched checkpoint and its lineage.
        config: the member's training config (data settings with this evaluation's replacements).
        records: the split's clips, in the order of the first member's.
        dataset_name: ``cvs-demo`` or ``endoscapes:<folder>``.
    """

    key: str
    source: CheckpointSource
    config: CVSConfig
    records: list[ClipRecord]
    dataset_name: str

    @property
    def label(self) -> str:
        """``members[1] (models:/avlm-cvs/2)``: how messages name the member."""
        return f"{self.key} ({self.source.uri})"


@dataclasses.dataclass
class EvaluateCVSResult:
    """What :func:`main` returns: the run, the members as resolved, the figures and the ensemble's (N, 3)
    probabilities in the first member's clip order."""

    run_id: str | None
    members: list[EnsembleMember]
    split: str
    num_clips: int
    metrics: dict[str, float]
    probabilities: np.ndarray
    output_dir: Path


# ----------------------------------------------------------------------------------------------------------------
# Members: resolve, check they agree, predict
# ----------------------------------------------------------------------------------------------------------------
def resolve_member(uri: str, key: str, split: str, data: EnsembleDataConfig) -> EnsembleMember:
    """Fetch the checkpoint ``uri`` names and read the split's clips with its data settings.

    Raises:
        ConfigError: an unknown or malformed URI, a checkpoint that is not a train_cvs one, or a split its data lack.
    """
    source = fetch_checkpoint(uri, key=key)
    trained = load_cvs_config(source.checkpoint_dir / "config.yaml")
    trained = dataclasses.replace(
        trained,
        data=dataclasses.replace(
            trained.data,
            data_dir=data.data_dir or trained.data.data_dir,
            label_policy=data.label_policy or trained.data.label_policy,
        ),
    )
    splits, dataset_name = load_cvs_splits(trained.data)
    if split not in splits:
        raise ConfigError(
            f"config key 'split' = {split!r}: the data of {key} ({uri}, {dataset_name}) have the splits "
            f"{', '.join(sorted(splits))}"
        )
    if not splits[split]:
        raise ConfigError(f"config key 'split' = {split!r}: {key} ({uri}) finds no clips in it")
    return EnsembleMember(key, source, trained, splits[split], dataset_name)


def align_members(members: list[EnsembleMember]) -> None:
    """Put every member's clips in the first member's order, in place.

    Raises:
        ConfigError: a member sees other clips than the first, or other labels for them (both members named).
    """
    reference = members[0]
    order = [record.clip_id for record in reference.records]
    labels = {record.clip_id: record.labels for record in reference.records}
    for member in members[1:]:
        by_id = {record.clip_id: record for record in member.records}
        missing = [clip for clip in order if clip not in by_id]
        extra = [clip for clip in by_id if clip not in labels]
        if missing or extra:
            example = f"{missing[0]} only in {reference.key}" if missing else f"{extra[0]} only in {member.key}"
            raise ConfigError(
                f"config key 'members': {reference.label} and {member.label} see different clips of the split "
                f"({len(order)} vs {len(by_id)} clips; e.g. {example}): their data settings differ "
                f"({reference.dataset_name} vs {member.dataset_name}, data.limit_clips "
                f"{reference.config.data.limit_clips} vs {member.config.data.limit_clips}); ensemble members trained "
                "on the same data, or give data.data_dir"
            )
        differing = [clip for clip in order if by_id[clip].labels != labels[clip]]
        if differing:
            raise ConfigError(
                f"config key 'members': {reference.label} and {member.label} label {len(differing)} of the "
                f"{len(order)} clips differently (e.g. {differing[0]}: data.label_policy "
                f"{reference.config.data.label_policy} vs {member.config.data.label_policy}); set data.label_policy"
            )
        member.records = [by_id[clip] for clip in order]


@torch.no_grad()
def member_probabilities(member: EnsembleMember, batch_size: int, device: torch.device) -> np.ndarray:
    """(N, 3) probabilities of the member's classifier on its clips: its own preprocessing and TTA, as its final
    evaluation computed them.

    Raises:
        ConfigError: the member masks its attention with the anatomy masks (not evaluated here yet).
    """
    cfg = member.config
    if cfg.model.attention_mask != "none":
        # its final evaluation fed each clip's anatomy masks to the model; without them its figures would differ
        raise ConfigError(
            f"config key 'members': {member.label} was trained with model.attention_mask={cfg.model.attention_mask}; "
            "evaluate_cvs does not feed anatomy masks to the members yet"
        )
    model, _ = load_classifier(member.source.checkpoint_dir)
    model.to(device)
    dataset = ClipDataset(member.records, model.backbone.image_size, model.backbone.mean, model.backbone.std)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    probs = [
        tta_probabilities(lambda x: model(pixel_values=x).logits, batch["pixel_values"].to(device), cfg.eval.tta)
        for batch in loader
    ]
    return torch.cat(probs).cpu().numpy().astype(np.float64)


def ensemble_table(members: list[EnsembleMember], metrics: dict[str, float], split: str) -> str:
    """Markdown: one row per member (URI, version, run, mAP and AP per criterion), then the ensemble's."""
    columns = ["mAP", *(f"AP_{c}" for c in CVS_CRITERIA)]
    lines = [
        f"# Ensemble of {len(members)} on {split}",
        "",
        "| member | uri | version | run | " + " | ".join(columns) + " |",
        "|---|---|---|---|" + "---:|" * len(columns),
    ]
    for i, member in enumerate(members):
        source = member.source
        version = f"{source.model_name} v{source.version}" if source.model_name else "-"
        figures = " | ".join(f"{metrics[f'member_{i}/{c}']:.4f}" for c in columns)
        lines.append(f"| {i} | `{source.uri}` | {version} | `{source.run_id[:8]}` | {figures} |")
    figures = " | ".join(f"**{metrics[f'ensemble/{c}']:.4f}**" for c in columns)
    lines.append(f"| ensemble | mean probability | | | {figures} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------
def main(cfg: EvaluateCVSConfig) -> EvaluateCVSResult:
    """Evaluate each member of ``cfg.members`` on ``cfg.split``, average their probabilities, log, return."""
    # -- 1. the members and their clips: all checked before a run exists -------------------------------------------
    members = [resolve_member(uri, f"members[{i}]", cfg.split, cfg.data) for i, uri in enumerate(cfg.members)]
    align_members(members)
    records = members[0].records
    targets = np.array([record.labels for record in records], dtype=np.float64)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    # -- 2. the run: what was ensembled ------------------------------------------------------------------------------
    run_name = cfg.tracking.run_name or f"{RECIPE}-{len(members)}members-{cfg.split}"

    def run_folder(run_id: str) -> Path:
        return Path(cfg.output_dir) / f"{run_name}-{run_id[:8]}"

    with tracked_run(cfg.tracking, recipe=RECIPE, run_name=run_name, is_main_process=True, run_dir=run_folder) as (
        run_logger
    ):
        run_dir = run_folder(run_logger.run_id)
        run_logger.log_params(flatten_config(cfg, prefix="cfg."))
        member_tags: dict[str, str] = {}
        for i, member in enumerate(members):
            member_tags.update(member.source.lineage_tags(prefix=f"member_{i}."))
        run_logger.set_tags(
            {
                "recipe": RECIPE,
                "ensemble.members": ",".join(cfg.members),
                **member_tags,
                "split": cfg.split,
                "clips": str(len(records)),
                "dataset": members[0].dataset_name,
                **provenance_tags(),
            }
        )
        run_logger.log_dict(config_to_dict(cfg), "config/resolved_config.json")

        # -- 3. each member with its own preprocessing, then the mean of their probabilities ----------------------
        metrics: dict[str, float] = {}
        member_probs = []
        for i, member in enumerate(tqdm(members, desc=f"ensemble members on {cfg.split}", unit="member")):
            probs = member_probabilities(member, cfg.batch_size, device)
            member_probs.append(probs)
            metrics.update({f"member_{i}/{k}": v for k, v in classification_metrics(probs, targets).items()})
            logger.info("%s: %s mAP %.4f", member.label, cfg.split, metrics[f"member_{i}/mAP"])
        probabilities = np.mean(member_probs, axis=0)
        metrics.update({f"ensemble/{k}": v for k, v in classification_metrics(probabilities, targets).items()})
        run_logger.log_metrics(metrics, step=0)

        predictions = write_predictions(
            run_dir / "predictions" / f"{cfg.split}_predictions.csv", records, targets, probabilities,
            {f"member_{i}": probs for i, probs in enumerate(member_probs)},
        )  # fmt: skip
        run_logger.log_artifact(predictions, "predictions")
        run_logger.log_text(ensemble_table(members, metrics, cfg.split), "tables/ensemble.md")
    logger.info("ensemble of %d on %s: mAP %.4f", len(members), cfg.split, metrics["ensemble/mAP"])
    return EvaluateCVSResult(
        run_id=run_logger.run_id,
        members=members,
        split=cfg.split,
        num_clips=len(records),
        metrics=metrics,
        probabilities=probabilities,
        output_dir=run_dir,
    )


def summary_lines(cfg: EvaluateCVSConfig, result: EvaluateCVSResult) -> list[str]:
    """What the entry point prints: the run, each member's mAP, the ensemble's figures."""
    lines = [
        f"MLflow run {result.run_id}: ensemble of {len(result.members)} on {result.split}, {result.num_clips} clips"
    ]
    for i, member in enumerate(result.members):
        lines.append(f"  member_{i}/mAP = {result.metrics[f'member_{i}/mAP']:.4f}  {member.label}")
    lines += [f"  {key} = {value:.4f}" for key, value in sorted(result.metrics.items()) if key.startswith("ensemble/")]
    return lines
