"""MLflow model registry: register the best checkpoint, promote it only through a pre-declared gate.

Every version gets the alias ``candidate``. It becomes ``champion`` (alias, and stage ``Production`` with the
previous holder moved to ``Archived`` — stages are deprecated by MLflow but users still read them) only if its
validation metric beats the current champion's by the configured margin. The decision, promoted or not, is
written on the version as ``promotion.*`` tags, so the registry itself is the audit trail.

Concurrent promotions
---------------------
Two trainings that finish together must not both read the old champion and both win: reading the champion,
deciding, and writing the decision, alias and stages happen under one lock (:func:`promotion_lock`), so
promotions of one model queue and each one re-reads the champion inside the lock.
MLflow offers no compare-and-set on aliases (``set_registered_model_alias`` overwrites unconditionally and the
decision spans several writes: tags, alias, stages), so a re-read-and-retry scheme could still interleave two
decisions; a lock is the simple, complete answer. The lock depends on what the client can reach:

- ``sqlite:///…`` (the default store): a lock file beside the database file (``<db>.promotion.lock``, an
  ``fcntl`` lock through ``filelock``; one per database, as sqlite serialises its writers anyway). sqlite is only
  safe on a local file system, where these locks work, and the kernel drops the lock of a process that dies, so
  a killed promoter never blocks the next one.
- ``postgresql…://`` (a team database reached directly): a PostgreSQL advisory lock keyed by the model name,
  taken through SQLAlchemy on the registry URI; the server drops it when the holder's connection ends, so it too
  survives a killed promoter, and it works from any number of machines.
- ``http(s)://`` (an ``mlflow server``; the client cannot see its database) and any other store: the lock is a
  registered model named ``<name>.promotion-lock``, created to acquire and deleted to release. Creating a
  registered model is atomic in every MLflow registry store (a unique name, enforced by the database behind the
  server), so exactly one client holds it. Its limit: a promoter killed inside the critical section (well under a
  second of registry calls) leaves the lock model behind; the next promotion waits
  ``PROMOTION_LOCK_TIMEOUT_S`` and then fails naming the lock model and its holder, to be deleted by hand once
  the holder is known dead. Breaking stale locks automatically would need a compare-and-delete MLflow lacks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import getpass
import hashlib
import logging
import os
import platform
import random
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

import avlm
from avlm.errors import ConfigError, TrainingError

logger = logging.getLogger(__name__)

CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
METRIC_VALUE_TAG = "avlm.metric_value"
LOCK_HOLDER_TAG = "avlm.lock_holder"
MAX_STORED_EXAMPLE_VALUES = 100_000
PROMOTION_LOCK_TIMEOUT_S = 120.0  # a promotion holds the lock for a few registry calls; minutes mean a stuck holder


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
    input_example: Any,
    output_example: Any,
    metadata: dict[str, Any] | None = None,
    extra_tags: dict[str, str] | None = None,
) -> Any:
    """Log ``checkpoint_dir`` as a pyfunc model in run ``run_id``, register it, tag it and alias it ``candidate``.

    The model's signature is inferred from one valid input and the model's output on it, so the registry shows
    the input schema and ``mlflow models serve`` refuses requests that do not fit it (with HTTP 400).

    Args:
        cfg: the registry settings (model name, gate).
        checkpoint_dir: checkpoint folder the recipe's ``load_predictor`` reads.
        recipe: module under ``avlm.recipes`` whose ``load_predictor`` serves the model.
        run_id: the run the model is logged in.
        metric_value: the run's best value of ``cfg.promote_metric`` (what the gate compares).
        input_example: a batch of one valid input, as ``predict`` takes it: a numpy array (its dtype and every
            dimension but the first become a tensor schema) or a DataFrame (its columns become the schema). It is
            also stored beside the model, unless it holds more than ``MAX_STORED_EXAMPLE_VALUES`` values (a
            full-size video clip would be tens of MB of JSON); the signature is logged either way. A stored example
            is also run once through the logged model by MLflow (its serving-input check; it warns on failure).
        output_example: what ``predict`` returns for ``input_example`` (a DataFrame, or a list of strings).
        metadata: shown in the model's MLmodel file, e.g. the preprocessing the input must have had (CVS clips
            come resized and normalised by the client, as the recipe's ``ClipFrames`` does).
        extra_tags: more version tags.

    Returns:
        The registered ``ModelVersion``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, output_example)
    stored_example = input_example if np.size(input_example) <= MAX_STORED_EXAMPLE_VALUES else None
    if stored_example is None:
        logger.info(
            "input example of %d values not stored with the model (limit %d); the signature still gives its shape",
            np.size(input_example),
            MAX_STORED_EXAMPLE_VALUES,
        )
    with _active_run(run_id), warnings.catch_warnings():
        # Left out on purpose (logged above); MLflow would warn that it is missing.
        warnings.filterwarnings("ignore", message=".*An input example was not provided")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"checkpoint": str(checkpoint_dir)},
            model_config={"recipe": recipe, "input": "tensor" if signature.inputs.is_tensor_spec() else "columns"},
            signature=signature,
            input_example=stored_example,
            metadata=metadata,
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
    except MlflowException as e:
        # Only "no such alias / model" means no champion; a failing store must not let any version through.
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return None
        raise


def _holder() -> str:
    return f"{getpass.getuser()}@{platform.node()} pid {os.getpid()}"


@contextlib.contextmanager
def promotion_lock(name: str, timeout_s: float = PROMOTION_LOCK_TIMEOUT_S) -> Iterator[None]:
    """Hold the promotion lock of registered model ``name`` on the current registry (see the module docstring).

    Raises:
        TrainingError: the lock was not acquired within ``timeout_s``; the message names the lock and its holder.
    """
    import mlflow
    from sqlalchemy.engine import make_url

    uri = mlflow.get_registry_uri()
    scheme = uri.partition(":")[0].split("+")[0]
    if scheme == "sqlite" and make_url(uri).database not in (None, "", ":memory:"):
        lock = _sqlite_file_lock(Path(make_url(uri).database), timeout_s)
    elif scheme in ("postgresql", "postgres"):
        lock = _postgres_advisory_lock(uri, name, timeout_s)
    else:
        lock = _registered_model_lock(name, timeout_s)
    with lock:
        yield


@contextlib.contextmanager
def _sqlite_file_lock(database: Path, timeout_s: float) -> Iterator[None]:
    import filelock

    path = database.with_name(database.name + ".promotion.lock")
    try:
        with filelock.FileLock(path, timeout=timeout_s):
            yield
    except filelock.Timeout as e:
        raise TrainingError(f"promotion lock {path} still held after {timeout_s:g} s by another process") from e


@contextlib.contextmanager
def _postgres_advisory_lock(uri: str, name: str, timeout_s: float) -> Iterator[None]:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    # Advisory locks take a 64-bit key; the hash keeps promotions of different models from queueing together.
    key = int.from_bytes(hashlib.sha256(f"avlm.promotion:{name}".encode()).digest()[:8], "big", signed=True)
    engine = sqlalchemy.create_engine(uri, poolclass=NullPool)
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f"SET lock_timeout = {int(timeout_s * 1000)}"))
            try:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            except sqlalchemy.exc.OperationalError as e:
                raise TrainingError(
                    f"promotion lock of registered model {name!r} (PostgreSQL advisory lock {key}) still held "
                    f"after {timeout_s:g} s; see pg_locks on the registry database"
                ) from e
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
    finally:
        engine.dispose()


def _lock_holder(client: Any, lock_name: str) -> str | None:
    """Who holds the lock model (its holder tag), or None when there is no lock model."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(lock_name).tags.get(LOCK_HOLDER_TAG, "unknown")
    except MlflowException:
        return None


@contextlib.contextmanager
def _registered_model_lock(name: str, timeout_s: float) -> Iterator[None]:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    lock_name = f"{name}.promotion-lock"
    holder = _holder()
    deadline, wait = time.monotonic() + timeout_s, 0.05
    while True:
        try:
            client.create_registered_model(
                lock_name, tags={LOCK_HOLDER_TAG: holder}, description=f"avlm: promotion of {name} in progress"
            )
            break
        except MlflowException as e:
            # A create racing the holder's delete can be answered "does not exist" (seen with a sqlite-backed
            # server): contention like "already exists", unless the model was made after all, by this process.
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" and _lock_holder(client, lock_name) == holder:
                break
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST"):
                raise
        if time.monotonic() > deadline:
            raise TrainingError(
                f"promotion lock of registered model {name!r} still held after {timeout_s:g} s by "
                f"{_lock_holder(client, lock_name) or 'unknown (just released)'}: if "
                f"that process is gone, delete the registered model {lock_name!r} and promote again"
            )
        time.sleep(wait * random.uniform(0.5, 1.5))  # jitter: waiters do not retry in lockstep
        wait = min(wait * 2, 1.0)
    try:
        yield
    finally:
        client.delete_registered_model(lock_name)


def promote_if_better(cfg: RegistryConfig, version: str | int) -> PromotionDecision:
    """Apply the gate to ``version`` of ``cfg.name`` and record the decision on it.

    The candidate's value is its ``avlm.metric_value`` tag (set at registration from the run's best value of
    ``cfg.promote_metric``); so is the champion's. The champion is read, and the decision made and recorded,
    under :func:`promotion_lock`, so concurrent promotions act as if they ran one after the other.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(version)
    candidate = client.get_model_version(cfg.name, version)
    candidate_value = float(candidate.tags[METRIC_VALUE_TAG])
    with promotion_lock(cfg.name):
        decision = _decide_and_record(cfg, client, candidate, candidate_value)
    outcome = "promoted" if decision.promoted else "rejected"
    logger.info("promotion gate for %s v%s: %s (%s)", cfg.name, version, outcome, decision.reason)
    return decision


def _decide_and_record(cfg: RegistryConfig, client: Any, candidate: Any, candidate_value: float) -> PromotionDecision:
    """The gate itself; the caller holds the promotion lock, so the champion read here is still champion below."""
    version = str(candidate.version)
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
    return PromotionDecision(
        promoted=promoted,
        reason=reason,
        version=version,
        candidate_value=candidate_value,
        champion_version=champion_version,
        champion_value=champion_value,
    )
