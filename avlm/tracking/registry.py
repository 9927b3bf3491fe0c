"""MLflow model registry: register the best checkpoint, promote it only through a pre-declared gate.

Every version gets the alias ``candidate``. It becomes ``champion`` (alias, and stage ``Production`` with the
previous holder moved to ``Archived`` — stages are deprecated by MLflow but users still read them) only if its
validation metric beats the current champion's by the configured margin. The decision, promoted or not, is
written on the version as ``promotion.*`` tags, so the registry itself is the audit trail.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import logging
import platform
import warnings
from pathlib import Path
from typing import Any, Literal

import avlm
from avlm.errors import ConfigError

logger = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_VALUE_TAG = "avlm.metric_value"


@dataclasses.dataclass
class RegistryConfig:
    """Registration and the promotion gate (declared before training starts; logged with the run).

    Attributes:
        register: log the best checkpoint as an MLflow model and register a version.
        name: registered model name.
        promote_metric: validation metric the gate compares (the run's best value of it).
        promote_mode: max (higher is better) or min.
        promote_margin: the candidate must beat the champion by more than this to take its place.
    """

    register: bool = True
    name: str = "avlm-cvs"
    promote_metric: str = "val/mAP"
    promote_mode: Literal["max", "min"] = "max"
    promote_margin: float = 0.0

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("config key 'registry.name' must not be empty")
        if self.promote_margin < 0:
            raise ConfigError(f"config key 'registry.promote_margin' must be >= 0, got {self.promote_margin}")


@dataclasses.dataclass
class PromotionDecision:
    promoted: bool
    reason: str
    version: str
    candidate_value: float
    champion_version: str | None
    champion_value: float | None


def log_and_register(
    cfg: RegistryConfig,
    *,
    checkpoint_dir: str | Path,
    recipe: str,
    run_id: str,
    metric_value: float,
    extra_tags: dict[str, str] | None = None,
) -> Any:
    """Log ``checkpoint_dir`` as a pyfunc model in run ``run_id``, register it, tag it and alias it ``candidate``.

    Returns:
        The registered ``ModelVersion``.
    """
    import mlflow
    from mlflow import MlflowClient

    with _active_run(run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(checkpoint_dir)},
            model_config={"recipe": recipe},
            code_paths=[str(Path(avlm.__file__).parent)],
            # Explicit requirements: inferring them would load the model in a subprocess.
            pip_requirements=["torch", "transformers", "peft", "timm", "accelerate", "safetensors", "pyyaml"],
        )
    client = MlflowClient()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        version = mlflow.register_model(info.model_uri, cfg.name)
    tags = {
        "recipe": recipe,
        "run_id": run_id,
        "avlm.metric": cfg.promote_metric,
        METRIC_VALUE_TAG: repr(float(metric_value)),
        **(extra_tags or {}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(cfg.name, version.version, key, value)
    client.set_registered_model_alias(cfg.name, CANDIDATE_ALIAS, version.version)
    logger.info("registered %s version %s (alias %s)", cfg.name, version.version, CANDIDATE_ALIAS)
    return client.get_model_version(cfg.name, version.version)


def register_reference(
    name: str, *, source: str, run_id: str, tags: dict[str, str], alias: str, description: str = ""
) -> Any:
    """Register a model version that points at ``source`` (a checkpoint file, a folder of run artifacts, a hub id)
    without copying it: for weights that live elsewhere, the registry keeps the reference and the evidence.

    Args:
        name: registered model name (created if new).
        source: where the weights are; stored as the version's source, unresolved.
        run_id: the run whose evidence admitted the version.
        tags: version tags (the evidence).
        alias: alias moved to the new version.
        description: version description.

    Returns:
        The registered ``ModelVersion``.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(
        name, source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}, description=description or None
    )
    client.set_registered_model_alias(name, alias, version.version)
    logger.info("registered %s version %s -> %s (alias %s)", name, version.version, source, alias)
    return client.get_model_version(name, version.version)


class _active_run:
    """Make ``run_id`` the fluent API's active run for a block (it already is when called from a tracked run)."""

    def __init__(self, run_id: str):
        self.run_id = run_id
        self.started = False

    def __enter__(self) -> None:
        import mlflow

        active = mlflow.active_run()
        if active is None or active.info.run_id != self.run_id:
            mlflow.start_run(run_id=self.run_id, nested=active is not None)
            self.started = True

    def __exit__(self, *exc: Any) -> None:
        import mlflow

        if self.started:
            mlflow.end_run()


def current_champion(name: str) -> Any | None:
    """The version holding the ``champion`` alias, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        return None


def promote_if_better(cfg: RegistryConfig, version: str | int) -> PromotionDecision:
    """Apply the gate to ``version`` of ``cfg.name`` and record the decision on it.

    The candidate's value is its ``avlm.metric_value`` tag (set at registration from the run's best value of
    ``cfg.promote_metric``); so is the champion's.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(version)
    candidate = client.get_model_version(cfg.name, version)
    candidate_value = float(candidate.tags[METRIC_VALUE_TAG])
    champion = current_champion(cfg.name)
    champion_version = str(champion.version) if champion is not None else None  # MLflow hands back ints
    champion_value = float(champion.tags[METRIC_VALUE_TAG]) if champion is not None else None
    sign = 1.0 if cfg.promote_mode == "max" else -1.0
    if champion is None:
        promoted, reason = True, "no current champion"
    elif champion_version == version:
        promoted, reason = False, "already champion"
    else:
        gain = sign * (candidate_value - champion_value)
        promoted = gain > cfg.promote_margin
        relation = "beats" if promoted else "does not beat"
        reason = (
            f"{cfg.promote_metric} {candidate_value:.6g} {relation} champion v{champion_version} "
            f"{champion_value:.6g} by more than margin {cfg.promote_margin:g} ({cfg.promote_mode}; gain {gain:.6g})"
        )
    decision_tags = {
        "promotion.decision": "promoted" if promoted else "rejected",
        "promotion.reason": reason,
        "promotion.metric": cfg.promote_metric,
        "promotion.mode": cfg.promote_mode,
        "promotion.margin": repr(cfg.promote_margin),
        "promotion.candidate_value": repr(candidate_value),
        "promotion.champion_version": champion_version or "none",
        "promotion.champion_value": repr(champion_value) if champion_value is not None else "none",
        "promotion.compared_run_ids": ",".join(
            [candidate.run_id] + ([champion.run_id] if champion is not None else [])
        ),
        "promotion.by": f"{getpass.getuser()}@{platform.node()}",
        "promotion.at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for key, value in decision_tags.items():
        client.set_model_version_tag(cfg.name, version, key, value)
    if promoted:
        client.set_registered_model_alias(cfg.name, CHAMPION_ALIAS, version)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; users still ask for them
            client.transition_model_version_stage(cfg.name, version, "Production", archive_existing_versions=True)
        if champion is not None:
            client.set_model_version_tag(cfg.name, champion_version, "promotion.superseded_by", version)
    logger.info("promotion gate for %s v%s: %s (%s)", cfg.name, version, decision_tags["promotion.decision"], reason)
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        version=version,
        candidate_value=candidate_value,
        champion_version=champion_version,
        champion_value=champion_value,
    )
