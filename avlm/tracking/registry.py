"""MLflow model registry: register the best checkpoint, promote it only through a pre-declared gate.

Every version gets the alias ``candidate``. It becomes ``champion`` (alias, and stage ``Production`` with the
previous holder moved to ``Archived`` — stages are deprecated by MLflow but users still read them) only through a
declared rule (:mod:`avlm.protocol.rules`): the recipes' gate is the simplest one (:func:`promote_if_better`: the
registered metric value beats the champion's by the configured margin); a chain's gate is any rule on per-seed
evidence, p-values included (:func:`promote_with_rule`). By hand, ``avlm registry promote`` re-applies a standing
passed decision or, with ``--force``, records the person's reason (:func:`promote_by_hand`).

Family champions: with ``registry.family_alias`` (``champion-lora``, or ``champion-{adaptation}`` filled from the
version's tags), the recipes' gate runs a second time against that alias's holder only, so users find the best
version of each adaptation family beside the overall champion; the family alias moves alone (stages follow the
overall champion), and its decisions are records like the champion's, with the alias named.

The audit trail
---------------
Every decision, promoted or not, is appended to the version: tags ``promotion.<n>.*`` (n = 1, 2, … in the
version's order; ``promotion.latest`` = the last n; the registered model's ``promotion.sequence`` orders the
decisions of all versions), holding the kind, decision, reason, who and when, the rule and its SHA-256 (written,
with decision ``evaluating``, before the rule is evaluated), the evidence's per-seed values and run ids, and each
condition's figure, n, seeds, test and p. The same record, with the full evidence and outcome, is logged as
``promotion/v<version>/decision_<n>.json`` in the version's run (``promotion.<n>.artifact``). Nothing is ever
overwritten but the flat ``promotion.decision``, ``promotion.reason``, … tags, which mirror the latest decision
for existing readers; a decision from before the series (flat tags only) is kept as record 0 when the next one
is written. :func:`check_registry` compares the aliases and stages with these records (what was moved by hand in
the MLflow UI or API) and :func:`rollback` restores what the records say.

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
import json
import logging
import os
import platform
import random
import re
import string
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

import avlm
from avlm.errors import ConfigError, TrainingError
from avlm.protocol.rules import Evidence, Rule, RuleOutcome, evaluate_rule, margin_rule, rule_sha256, rule_to_dict

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
        family_alias: the alias of this run's family champion beside the overall ``champion`` (e.g.
            ``champion-lora``, ``champion-frozen``; "" = none): after the overall gate, the same gate (metric, mode,
            margin, like-with-like checks) is run against the holder of this alias only, and the alias moves to the
            version when it beats that holder; recorded on the version like the overall decision. ``{tag}`` fields
            are filled from the version's tags: ``champion-{adaptation}`` gives each adaptation its own champion.
    """

    register: bool = True
    name: str = "avlm-cvs"
    promote_metric: str = "val/mAP"
    promote_mode: Literal["max", "min"] = "max"
    promote_margin: float = 0.0
    family_alias: str = ""

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("config key 'registry.name' must not be empty")
        if self.promote_margin < 0:
            raise ConfigError(f"config key 'registry.promote_margin' must be >= 0, got {self.promote_margin}")
        if self.family_alias:
            _check_family_alias(self.family_alias)


def _check_family_alias(alias: str) -> None:
    """An alias name MLflow accepts that is none of the gate's own (``champion``, ``candidate``), once its ``{tag}``
    fields are filled (with a placeholder here; with the version's tags by :func:`family_alias_of`)."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import _validate_model_alias_name, _validate_model_alias_name_reserved

    key = "config key 'registry.family_alias'"
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(alias) if field is not None]
    except ValueError as e:
        raise ConfigError(f"{key}: {alias!r} is not a template of {{tag}} fields: {e}") from e
    if any(not field.isidentifier() for field in fields):
        raise ConfigError(f"{key}: {alias!r}: each {{...}} field names a version tag, e.g. champion-{{adaptation}}")
    alias = alias.format_map({field: "tag" for field in fields})
    if alias in (CHAMPION_ALIAS, CANDIDATE_ALIAS):
        raise ConfigError(f"{key} must not be {alias!r}: that alias is the overall gate's (try 'champion-lora')")
    try:
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as e:
        raise ConfigError(f"{key}: {e.message}") from e


def family_alias_of(cfg: RegistryConfig, model_version: Any) -> str:
    """``cfg.family_alias`` with its ``{tag}`` fields filled from the version's tags ("" when there is none).

    Raises:
        TrainingError: the version lacks a tag the template names.
        ConfigError: the filled alias is not one MLflow accepts, or is ``champion``/``candidate``.
    """
    if not cfg.family_alias:
        return ""
    fields = [field for _, field, _, _ in string.Formatter().parse(cfg.family_alias) if field]
    missing = [field for field in fields if field not in model_version.tags]
    if missing:
        raise TrainingError(
            f"registered model {model_version.name!r} version {model_version.version} has no tag "
            f"{missing[0]!r}, which registry.family_alias {cfg.family_alias!r} names"
        )
    alias = cfg.family_alias.format_map({field: model_version.tags[field] for field in fields})
    _check_family_alias(alias)
    return alias


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
    aliases: Sequence[str] = (),
) -> Any:
    """Log ``checkpoint_dir`` as a pyfunc model in run ``run_id``, register it, tag it and alias it ``candidate``
    (and ``aliases``, e.g. ``scst``: the latest version of that kind, whatever the gate decides).

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
        aliases: more aliases moved to this version.

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
    moved = (CANDIDATE_ALIAS, *aliases)
    for alias in moved:
        client.set_registered_model_alias(cfg.name, alias, version.version)
    logger.info("registered %s version %s (aliases %s)", cfg.name, version.version, ", ".join(moved))
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
    return alias_holder(name, CHAMPION_ALIAS)


def alias_holder(name: str, alias: str) -> Any | None:
    """The version holding ``alias`` (``champion``, a family alias such as ``champion-lora``), or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException as e:
        # Only "no such alias / model" means no holder; a failing store must not let any version through.
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


# -- the promotion gate: a declared rule, evaluated under the lock, recorded append-only --------------------------


class PromotionRefused(TrainingError):
    """A promotion or rollback that the gate's records do not back (the message says what is missing)."""


@dataclasses.dataclass
class PromotionDecision:
    """What a gate decided for one version.

    Attributes:
        promoted: the version is champion now because of this decision.
        reason: one line.
        version: the version decided on.
        candidate_value: the recipes' gate: the version's registered metric value (None for a declared rule).
        champion_version: the champion when the decision was made.
        champion_value: the recipes' gate: the champion's registered metric value.
        decision: promoted | rejected | kept (already champion).
        index: the decision's index in the version's ``promotion.<index>.*`` series.
        outcome: the rule's outcome (None when no rule was evaluated: no champion to compare with, already
            champion).
        rule_sha256: the hash of the rule applied.
        alias: the alias the decision was about (``champion``, or a family alias; ``champion_version`` is then that
            alias's holder).
        family: with ``RegistryConfig.family_alias``: the decision of the family gate that followed this one.
    """

    promoted: bool
    reason: str
    version: str
    candidate_value: float | None
    champion_version: str | None
    champion_value: float | None
    decision: str = ""
    index: int = 0
    outcome: RuleOutcome | None = None
    rule_sha256: str = ""
    alias: str = CHAMPION_ALIAS
    family: PromotionDecision | None = None


@dataclasses.dataclass
class DecisionRecord:
    """One entry of a version's audit trail: tags ``promotion.<index>.*`` on the version, and the same record with
    the full evidence and outcome as the JSON artifact ``artifact``.

    Attributes:
        model: registered model name.
        version: the version decided on.
        index: position in the version's series, from 1; 0 is a decision made before the series existed, read
            from the flat ``promotion.*`` tags.
        seq: position among all decisions on the model (the registered model's ``promotion.sequence`` tag);
            None for index 0.
        kind: gate (a rule evaluated by code) | promote (by hand, backed by a standing gate decision) | force (by
            hand, with a reason) | rollback.
        decision: promoted | rejected | kept (already champion; nothing moved) | forced | restored (by a
            rollback) | evaluating (the rule was frozen but no decision was written: the promoter died).
        passed: the rule's verdict; None when no rule was evaluated.
        reason: one line.
        at: when (UTC, ISO 8601).
        by: who (user@host).
        champion_before: the champion when the decision was made.
        rule: the rule evaluated, canonical (:func:`avlm.protocol.rules.rule_to_dict`).
        rule_sha256: its hash.
        rule_frozen_in: the run the rule was frozen in before the evidence was gathered, when given.
        values: the evidence's values: candidate and baseline (metric -> seed -> value) and their labels.
        candidate_run_ids: the runs the candidate's values come from.
        baseline_run_ids: the runs the baseline's values come from.
        conditions: each condition's outcome (condition, passed, value, n, seeds, reason, test and p for p-values).
        backed_by: for ``promote``, the index of the gate decision it relies on.
        artifact: URI of the JSON copy ("" when the version has no run to hold it).
        alias: the alias decided on: ``champion`` or a family alias (``champion-lora``); ``champion_before`` is
            that alias's holder then. Tag ``promotion.<index>.alias``, written for family aliases only.
    """

    model: str
    version: str
    index: int
    seq: int | None
    kind: str
    decision: str
    passed: bool | None = None
    reason: str = ""
    at: str = ""
    by: str = ""
    champion_before: str | None = None
    rule: dict[str, Any] | None = None
    rule_sha256: str = ""
    rule_frozen_in: str = ""
    values: dict[str, Any] | None = None
    candidate_run_ids: list[str] = dataclasses.field(default_factory=list)
    baseline_run_ids: list[str] = dataclasses.field(default_factory=list)
    conditions: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    backed_by: int | None = None
    artifact: str = ""
    alias: str = CHAMPION_ALIAS

    @property
    def order(self) -> tuple[int, str, int, int]:
        """Sort key of the model's decision log: the sequence, then (records without one) time and version."""
        return (-1 if self.seq is None else self.seq, self.at, int(self.version), self.index)


def promote_if_better(cfg: RegistryConfig, version: str | int) -> PromotionDecision:
    """The recipes' gate: :func:`~avlm.protocol.rules.margin_rule` on the version's registered metric value, with the
    champion's as the baseline, decided and recorded under :func:`promotion_lock`.

    No champion: promoted ("no current champion"). Already champion: kept, not re-promoted. The candidate's and the
    champion's values are their ``avlm.metric_value`` tags (set at registration from the run's best value of
    ``cfg.promote_metric``). The decision is appended to the version's audit trail (see :func:`decision_history`).

    With ``cfg.family_alias`` (e.g. ``champion-lora``, or ``champion-{adaptation}`` filled from the version's tags
    by :func:`family_alias_of`), the same gate then runs a second time, under the same hold
    of the lock, against the holder of that alias only: the alias moves to the version when it beats the holder
    (or there is none), whatever the overall decision was. It is recorded as the version's next decision, with the
    alias named (``promotion.<n>.alias``); the flat ``promotion.decision``… tags keep mirroring the overall one.

    Returns:
        The overall decision; with a family alias, its ``family`` holds the family gate's.

    Raises:
        TrainingError: the version or the champion has no readable ``avlm.metric_value`` tag (names the model,
            version and tag).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(version)
    rule = margin_rule(cfg.promote_metric, cfg.promote_mode, cfg.promote_margin)
    model_version = _model_version(client, cfg.name, version)
    candidate_value = _registered_value(model_version, cfg.promote_metric)
    family_alias = family_alias_of(cfg, model_version)

    def judge(candidate: Any, holder: Any | None, alias: str) -> _Verdict:
        evidence = Evidence(  # with no other version to compare with, what there is
            candidate={cfg.promote_metric: {"best": candidate_value}},
            baseline=None,
            candidate_label=f"v{version}",
            baseline_label="none",
            candidate_run_ids=[candidate.run_id] if candidate.run_id else [],
        )
        # The flat promotion.* tags recipes and users read: the latest decision (the series keeps every one).
        latest = {
            "metric": cfg.promote_metric,
            "mode": cfg.promote_mode,
            "margin": repr(cfg.promote_margin),
            "candidate_value": repr(candidate_value),
            "champion_value": "none",
            "compared_run_ids": ",".join(r for r in (candidate.run_id, holder and holder.run_id) if r),
        }
        if holder is None:
            return _Verdict("promoted", f"no current {alias}", evidence, None, latest)
        holder_version = str(holder.version)
        if holder_version == version:
            return _Verdict("kept", f"already {alias}", evidence, None, latest)
        unlike = _not_comparable(candidate, holder, cfg.promote_metric)
        if unlike:
            return _Verdict("rejected", f"refused: {unlike}", evidence, None, latest)
        holder_value = _registered_value(holder, cfg.promote_metric)
        latest["champion_value"] = repr(holder_value)
        evidence = dataclasses.replace(
            evidence,
            baseline={cfg.promote_metric: {"best": holder_value}},
            baseline_label=f"{alias} v{holder_version}",
            baseline_run_ids=[holder.run_id] if holder.run_id else [],
        )
        outcome = evaluate_rule(rule, evidence)
        relation = "beats" if outcome.passed else "does not beat"
        reason = (
            f"{cfg.promote_metric} {candidate_value:.6g} {relation} {alias} v{holder_version} "
            f"{holder_value:.6g} by more than margin {cfg.promote_margin:g} ({cfg.promote_mode}; "
            f"gain {outcome.conditions[0].value:.6g})"
        )
        return _Verdict("promoted" if outcome.passed else "rejected", reason, evidence, outcome, latest, holder_value)

    with promotion_lock(cfg.name):
        decision = _decide(client, cfg.name, version, rule, judge)
        if family_alias:
            decision.family = _decide(client, cfg.name, version, rule, judge, alias=family_alias)
    for made in (decision, decision.family):
        if made is not None:
            made.candidate_value = candidate_value
    return decision


def promote_with_rule(
    name: str, version: str | int, rule: Rule, evidence: Evidence, *, frozen_by_run_id: str | None = None
) -> PromotionDecision:
    """Evaluate a declared rule on ``evidence`` (e.g. per-seed values of a sweep's candidate and baseline cells) and
    promote ``version`` of ``name`` to champion (alias, stage ``Production``) when it passes.

    The baseline is the evidence's, not the champion's: the caller chose what the candidate is compared with when
    it declared the protocol. Under :func:`promotion_lock`: the champion is re-read, the rule and its hash are
    written on the version (decision ``evaluating``) before it is evaluated, then the outcome and the full
    evidence are written as tags and as the JSON artifact ``promotion/v<version>/decision_<index>.json`` of the
    version's run. Already champion: the rule is evaluated and recorded, nothing moves (decision ``kept``).

    Args:
        name: registered model name.
        version: the candidate version.
        rule: the declared rule.
        evidence: what the rule is evaluated on.
        frozen_by_run_id: the run the rule was frozen in before its evidence was gathered (a chain's stage run):
            one of its tags or params must hold the rule's SHA-256, else the promotion is refused.

    Raises:
        PromotionRefused: ``frozen_by_run_id`` does not hold the rule's hash.
        ConfigError: no such version.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(version)
    _model_version(client, name, version)
    if frozen_by_run_id:
        _check_frozen(client, frozen_by_run_id, rule_sha256(rule))

    def judge(candidate: Any, champion: Any | None, alias: str) -> _Verdict:
        outcome = evaluate_rule(rule, evidence)
        if champion is not None and str(champion.version) == version:
            reason = f"already champion; rule {'passed' if outcome.passed else 'failed'} ({outcome.reason})"
            return _Verdict("kept", reason, evidence, outcome)
        return _Verdict("promoted" if outcome.passed else "rejected", outcome.reason, evidence, outcome)

    return _gate(name, version, rule, judge, frozen_in=frozen_by_run_id)


@dataclasses.dataclass
class _Verdict:
    """What a gate's judge decided, for :func:`_decide` to record."""

    decision: str  # promoted | rejected | kept
    reason: str
    evidence: Evidence | None
    outcome: RuleOutcome | None
    latest: dict[str, str] | None = None
    champion_value: float | None = None


Judge = Callable[[Any, Any | None, str], _Verdict]  # (candidate, the alias's holder or None, alias) -> verdict


def _gate(name: str, version: str, rule: Rule, judge: Judge, *, frozen_in: str | None = None) -> PromotionDecision:
    """:func:`_decide` on the champion alias, under the promotion lock."""
    from mlflow import MlflowClient

    with promotion_lock(name):
        return _decide(MlflowClient(), name, version, rule, judge, frozen_in=frozen_in)


def _decide(
    client: Any,
    name: str,
    version: str,
    rule: Rule,
    judge: Judge,
    *,
    frozen_in: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> PromotionDecision:
    """The caller holds the promotion lock: re-read the candidate and the holder of ``alias``, freeze the rule on the
    version, let ``judge(candidate, holder, alias)`` decide, record the decision, and move the alias when promoted
    (the champion with its stages; a family alias alone)."""
    candidate = client.get_model_version(name, version)  # re-read: its trail may have grown meanwhile
    holder = alias_holder(name, alias)
    holder_version = str(holder.version) if holder is not None else None  # MLflow hands back ints
    record = _begin_record(
        client, candidate, kind="gate", rule=rule, champion_before=holder_version, frozen_in=frozen_in, alias=alias
    )
    verdict = judge(candidate, holder, alias)
    record = _finish_record(
        client,
        record,
        candidate,
        decision=verdict.decision,
        reason=verdict.reason,
        evidence=verdict.evidence,
        outcome=verdict.outcome,
        latest=verdict.latest,
    )
    promoted = verdict.decision == "promoted"
    if promoted:
        _move_alias(client, name, alias, version, superseding=holder_version)
    logger.info(
        "promotion gate %s for %s v%s (%s): %s (%s)",
        rule.name or record.rule_sha256[:12],
        name,
        version,
        alias,
        verdict.decision,
        verdict.reason,
    )
    return PromotionDecision(
        promoted=promoted,
        reason=verdict.reason,
        version=version,
        candidate_value=None,
        champion_version=holder_version,
        champion_value=verdict.champion_value,
        decision=verdict.decision,
        index=record.index,
        outcome=verdict.outcome,
        rule_sha256=record.rule_sha256,
        alias=alias,
    )


def _model_version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise ConfigError(f"registered model {name!r} has no version {version}") from e
        raise


COMPARABILITY_TAGS = ("dataset",)  # versions that differ in these never compete for one champion


def _not_comparable(candidate: Any, champion: Any, metric: str) -> str:
    """Why the champion's registered value cannot be compared with the candidate's ("" when it can): a value of
    another metric (``val/CIDEr_D`` where SPICE was unavailable against ``val/SPIDEr``), or another dataset."""
    champion_metric = champion.tags.get("avlm.metric", metric)
    if champion_metric != metric:
        return (
            f"champion v{champion.version} was judged on {champion_metric}, this version on {metric}: the gate "
            "compares like with like (register it under another model name, or re-evaluate both on one metric)"
        )
    for tag in COMPARABILITY_TAGS:
        ours, theirs = candidate.tags.get(tag), champion.tags.get(tag)
        if ours is not None and theirs is not None and ours != theirs:
            return (
                f"champion v{champion.version} has {tag}={theirs!r}, this version {tag}={ours!r}: versions of "
                f"different {tag}s never compete for one champion (register them under per-{tag} model names)"
            )
    return ""


def _registered_value(model_version: Any, metric: str) -> float:
    """The version's ``avlm.metric_value`` tag as a number, or an error naming the model, version and tag."""
    where = f"registered model {model_version.name!r} version {model_version.version}"
    raw = model_version.tags.get(METRIC_VALUE_TAG)
    if raw is None:
        raise TrainingError(
            f"{where} has no tag {METRIC_VALUE_TAG!r} (its value of {metric}, set at registration by "
            "log_and_register), so the promotion gate cannot compare it; tag it or register it again"
        )
    try:
        return float(raw)
    except ValueError as e:
        raise TrainingError(f"{where}: tag {METRIC_VALUE_TAG!r} = {raw!r} is not a number") from e


def _check_frozen(client: Any, run_id: str, sha: str) -> None:
    run = client.get_run(run_id)
    if sha not in run.data.tags.values() and sha not in run.data.params.values():
        raise PromotionRefused(
            f"rule {sha[:12]}… was not frozen in run {run_id} (no tag or param of that run holds its SHA-256): "
            "a rule is declared, and frozen in its run, before the evidence it judges is gathered"
        )


# -- the audit trail: promotion.<index>.* tags, promotion.latest, the model's promotion.sequence -------------------

PROMOTION_PREFIX = "promotion."
LATEST_TAG = "promotion.latest"
SEQUENCE_TAG = "promotion.sequence"
SUPERSEDED_TAG = "promotion.superseded_by"
MOVES = ("promoted", "forced", "restored")  # decisions that put the champion alias on their version
TAG_VALUE_LIMIT = 5000  # MLflow allows more; a tag is for reading, the JSON artifact holds everything
_LATEST_KEYS = (
    "decision",
    "reason",
    "metric",
    "mode",
    "margin",
    "candidate_value",
    "champion_version",
    "champion_value",
    "compared_run_ids",
    "by",
    "at",
)
_RECORD_TAG = re.compile(r"promotion\.(\d+)\.")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


def _who() -> str:
    return f"{getpass.getuser()}@{platform.node()}"


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _record_tags(record: DecisionRecord) -> dict[str, str]:
    """The record as version tags (values over ``TAG_VALUE_LIMIT`` are cut; the artifact has them whole)."""
    p = f"{PROMOTION_PREFIX}{record.index}."
    passed = "none" if record.passed is None else str(record.passed).lower()
    tags = {
        f"{p}kind": record.kind,
        f"{p}seq": "none" if record.seq is None else str(record.seq),
        f"{p}at": record.at,
        f"{p}by": record.by,
        f"{p}champion_before": record.champion_before or "none",
        f"{p}passed": passed,
        f"{p}reason": record.reason,
    }
    if record.alias != CHAMPION_ALIAS:  # records from before family aliases name none: they are all champion's
        tags[f"{p}alias"] = record.alias
    if record.rule is not None:
        tags[f"{p}rule"] = _compact(record.rule)
        tags[f"{p}rule_sha256"] = record.rule_sha256
    if record.rule_frozen_in:
        tags[f"{p}rule_frozen_in"] = record.rule_frozen_in
    if record.values is not None:
        tags[f"{p}values"] = _compact(record.values)
        tags[f"{p}candidate_run_ids"] = ",".join(record.candidate_run_ids)
        tags[f"{p}baseline_run_ids"] = ",".join(record.baseline_run_ids)
    for i, condition in enumerate(record.conditions):
        tags[f"{p}condition.{i}"] = _compact(condition)
    if record.backed_by is not None:
        tags[f"{p}backed_by"] = str(record.backed_by)
    if record.artifact:
        tags[f"{p}artifact"] = record.artifact
    tags[f"{p}decision"] = record.decision  # last: a record is complete once its decision is written
    cut = " …(cut; see the artifact)"
    return {k: v if len(v) <= TAG_VALUE_LIMIT else v[: TAG_VALUE_LIMIT - len(cut)] + cut for k, v in tags.items()}


def _write_tags(client: Any, name: str, version: str, tags: dict[str, str], already: dict[str, str] | None = None):
    for key, value in tags.items():
        if (already or {}).get(key) != value:
            client.set_model_version_tag(name, version, key, value)


def _begin_record(
    client: Any,
    model_version: Any,
    *,
    kind: str,
    rule: Rule | None = None,
    champion_before: str | None,
    frozen_in: str | None = None,
    alias: str = CHAMPION_ALIAS,
) -> DecisionRecord:
    """Open the next record of the version's series (caller holds the lock): the rule and its hash are written,
    with decision ``evaluating``, before anything is decided. ``champion_before``: the holder of ``alias``."""
    name, version, tags = model_version.name, str(model_version.version), model_version.tags
    if LATEST_TAG not in tags:
        legacy = _legacy_record(name, version, tags)
        if legacy is not None:  # a decision from before the series: keep it as record 0, or the mirror overwrites it
            _write_tags(client, name, version, _record_tags(legacy))
    index = int(tags.get(LATEST_TAG, "0")) + 1
    sequence = int(client.get_registered_model(name).tags.get(SEQUENCE_TAG, "0")) + 1
    client.set_registered_model_tag(name, SEQUENCE_TAG, str(sequence))
    record = DecisionRecord(
        model=name,
        version=version,
        index=index,
        seq=sequence,
        kind=kind,
        decision="evaluating",
        at=_now(),
        by=_who(),
        champion_before=champion_before,
        rule=rule_to_dict(rule) if rule is not None else None,
        rule_sha256=rule_sha256(rule) if rule is not None else "",
        rule_frozen_in=frozen_in or "",
        alias=alias,
    )
    _write_tags(client, name, version, _opening_tags(record))
    client.set_model_version_tag(name, version, LATEST_TAG, str(index))
    return record


def _opening_tags(record: DecisionRecord) -> dict[str, str]:
    """What is written before the evidence is looked at: the record's kind, place, and the rule with its hash."""
    keep = ("kind", "seq", "alias", "rule", "rule_sha256", "rule_frozen_in", "decision")
    return {k: v for k, v in _record_tags(record).items() if k.rsplit(".", 1)[-1] in keep}


def _finish_record(
    client: Any,
    record: DecisionRecord,
    model_version: Any,
    *,
    decision: str,
    reason: str,
    evidence: Evidence | None = None,
    outcome: RuleOutcome | None = None,
    backed_by: int | None = None,
    latest: dict[str, str] | None = None,
) -> DecisionRecord:
    """Write the decision, its evidence and outcome (tags, then the JSON artifact), and, for a decision on the
    champion, the flat latest tags (a family decision leaves them mirroring the overall gate's)."""
    opened = _opening_tags(record)
    metrics = sorted({c["metric"] for c in (record.rule or {}).get("conditions", [])})
    record = dataclasses.replace(
        record,
        decision=decision,
        passed=None if outcome is None else outcome.passed,
        reason=reason,
        values=None if evidence is None else _evidence_values(evidence, metrics),
        candidate_run_ids=[] if evidence is None else list(evidence.candidate_run_ids),
        baseline_run_ids=[] if evidence is None else list(evidence.baseline_run_ids),
        conditions=[] if outcome is None else [_condition_summary(c) for c in outcome.to_dict()["conditions"]],
        backed_by=backed_by,
    )
    record.artifact = _log_record_artifact(client, record, model_version.run_id, evidence, outcome)
    _write_tags(client, record.model, record.version, _record_tags(record), already=opened)
    if record.alias != CHAMPION_ALIAS:
        return record
    flat = {
        "metric": ",".join(metrics) or "none",
        "mode": "none",
        "margin": "none",
        "candidate_value": "none",
        "champion_value": "none",
        "compared_run_ids": ",".join(record.candidate_run_ids + record.baseline_run_ids),
        **(latest or {}),
        "decision": decision,
        "reason": reason,
        "champion_version": record.champion_before or "none",
        "by": record.by,
        "at": record.at,
    }
    flat_tags = {f"{PROMOTION_PREFIX}{k}": flat[k] for k in _LATEST_KEYS}
    _write_tags(client, record.model, record.version, flat_tags, already=model_version.tags)
    return record


def _evidence_values(evidence: Evidence, metrics: list[str]) -> dict[str, Any]:
    """The evidence's values of the rule's metrics (the artifact keeps every metric the caller passed)."""
    full = evidence.to_dict()
    pick = lambda side: None if side is None else {m: side[m] for m in metrics if m in side}  # noqa: E731
    return {
        "candidate": pick(full["candidate"]),
        "baseline": pick(full["baseline"]),
        "candidate_label": evidence.candidate_label,
        "baseline_label": evidence.baseline_label,
    }


def _condition_summary(condition: dict[str, Any]) -> dict[str, Any]:
    detail = condition["detail"]
    summary = {k: condition[k] for k in ("condition", "passed", "value", "n", "seeds", "reason")}
    summary.update(
        {
            k: detail[k]
            for k in ("candidate_mean", "baseline_mean", "test", "alternative", "statistic", "p")
            if k in detail
        }
    )
    return summary


def _log_record_artifact(
    client: Any, record: DecisionRecord, run_id: str | None, evidence: Evidence | None, outcome: RuleOutcome | None
) -> str:
    """Log the whole record as ``promotion/v<version>/decision_<index>.json`` in the version's run; its URI."""
    from mlflow.exceptions import MlflowException

    if not run_id:
        return ""
    path = f"promotion/v{record.version}/decision_{record.index}.json"
    document = {
        **dataclasses.asdict(dataclasses.replace(record, artifact="")),
        "evidence": None if evidence is None else evidence.to_dict(),
        "outcome": None if outcome is None else outcome.to_dict(),
    }
    try:
        client.log_text(run_id, json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False), path)
    except (MlflowException, OSError) as e:  # the tags hold the record; the copy is a convenience
        logger.warning(
            "decision %d of %s v%s not copied to run %s: %s", record.index, record.model, record.version, run_id, e
        )
        return ""
    return f"runs:/{run_id}/{path}"


def _legacy_record(name: str, version: str, tags: dict[str, str]) -> DecisionRecord | None:
    """A decision written before the series (flat ``promotion.*`` tags only) as record 0."""
    decision = tags.get("promotion.decision")
    if decision is None:
        return None
    reason = tags.get("promotion.reason", "")
    if reason == "already champion":
        decision = "kept"  # the old gate wrote "rejected" for a champion it left in place
    metric, mode, margin = (tags.get(f"promotion.{k}") for k in ("metric", "mode", "margin"))
    rule = None
    if metric and mode in ("max", "min") and margin not in (None, "none"):
        rule = margin_rule(metric, mode, float(margin))
    run_ids = [r for r in tags.get("promotion.compared_run_ids", "").split(",") if r]
    values = None
    if metric and tags.get("promotion.candidate_value", "none") != "none":
        champion_value = tags.get("promotion.champion_value", "none")
        values = {
            "candidate": {metric: {"best": float(tags["promotion.candidate_value"])}},
            "baseline": None if champion_value == "none" else {metric: {"best": float(champion_value)}},
            "candidate_label": f"v{version}",
            "baseline_label": f"champion v{tags.get('promotion.champion_version', 'none')}",
        }
    champion = tags.get("promotion.champion_version", "none")
    return DecisionRecord(
        model=name,
        version=version,
        index=0,
        seq=None,
        kind="gate",
        decision=decision,
        passed=None if reason in ("no current champion", "already champion") else decision == "promoted",
        reason=reason,
        at=tags.get("promotion.at", ""),
        by=tags.get("promotion.by", ""),
        champion_before=None if champion == "none" else champion,
        rule=rule_to_dict(rule) if rule else None,
        rule_sha256=rule_sha256(rule) if rule else "",
        values=values,
        candidate_run_ids=run_ids[:1],
        baseline_run_ids=run_ids[1:],
    )


def _read_record(name: str, version: str, tags: dict[str, str], index: int) -> DecisionRecord:
    p = f"{PROMOTION_PREFIX}{index}."
    get = lambda key, default="": tags.get(p + key, default)  # noqa: E731

    def loads(key: str) -> Any:
        text = get(key)
        try:
            return json.loads(text) if text else None
        except ValueError:  # cut at TAG_VALUE_LIMIT: the artifact has it whole
            return {"cut": text}

    passed = {"true": True, "false": False}.get(get("passed", "none"))
    champion = get("champion_before", "none")
    conditions, i = [], 0
    while p + f"condition.{i}" in tags:
        conditions.append(loads(f"condition.{i}"))
        i += 1
    return DecisionRecord(
        model=name,
        version=version,
        index=index,
        seq=None if get("seq", "none") == "none" else int(get("seq")),
        kind=get("kind", "gate"),
        decision=get("decision", "evaluating"),
        passed=passed,
        reason=get("reason"),
        at=get("at"),
        by=get("by"),
        champion_before=None if champion == "none" else champion,
        rule=loads("rule"),
        rule_sha256=get("rule_sha256"),
        rule_frozen_in=get("rule_frozen_in"),
        values=loads("values"),
        candidate_run_ids=[r for r in get("candidate_run_ids").split(",") if r],
        baseline_run_ids=[r for r in get("baseline_run_ids").split(",") if r],
        conditions=conditions,
        backed_by=int(get("backed_by")) if get("backed_by") else None,
        artifact=get("artifact"),
        alias=get("alias", CHAMPION_ALIAS),
    )


def version_records(model_version: Any) -> list[DecisionRecord]:
    """Every decision recorded on one ``ModelVersion``, in order (record 0 = a decision from before the series)."""
    name, version, tags = model_version.name, str(model_version.version), model_version.tags
    indices = sorted({int(m.group(1)) for key in tags if (m := _RECORD_TAG.match(key))})
    if not indices:
        legacy = _legacy_record(name, version, tags)
        return [legacy] if legacy is not None else []
    return [_read_record(name, version, tags, i) for i in indices]


def _all_versions(client: Any, name: str) -> list[Any]:
    quoted = name.replace("'", "\\'")
    versions = client.search_model_versions(f"name='{quoted}'")
    return sorted(versions, key=lambda v: int(v.version))


def model_versions(name: str) -> list[Any]:
    """Every ``ModelVersion`` of ``name`` (with its tags), in version order."""
    from mlflow import MlflowClient

    return _all_versions(MlflowClient(), name)


def decision_history(name: str, version: str | int | None = None) -> list[DecisionRecord]:
    """Every promotion decision on ``name`` (or on one version of it), in the order they were made: the champion's
    and the family aliases' (each record's ``alias`` says which)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    if version is not None:
        return version_records(_model_version(client, name, str(version)))
    return _model_records(client, name)


def _model_records(client: Any, name: str, versions: list[Any] | None = None) -> list[DecisionRecord]:
    versions = _all_versions(client, name) if versions is None else versions
    return sorted([r for v in versions for r in version_records(v)], key=lambda r: r.order)


def gate_champion(records: list[DecisionRecord], alias: str = CHAMPION_ALIAS) -> DecisionRecord | None:
    """The decision that, by the gate's records, put the current holder of ``alias`` (the champion, or a family
    alias) in place: the model's last decision on that alias that moved it (promoted, forced or restored).
    ``records`` in log order."""
    return next((r for r in reversed(records) if r.alias == alias and r.decision in MOVES), None)


def standing_decision(
    records: list[DecisionRecord], version: str, alias: str = CHAMPION_ALIAS
) -> DecisionRecord | None:
    """The version's last ``promoted`` decision on ``alias``, unless it has been superseded since: by a decision
    that moved the alias to another version, or by a later rejection of this version. ``records`` in log order."""
    standing = None
    for record in (r for r in records if r.alias == alias):
        if record.version == version and record.decision == "promoted":
            standing = record
        elif record.version != version and record.decision in MOVES:
            standing = None
        elif record.version == version and record.decision == "rejected":
            standing = None
    return standing


# -- consistency: what was moved by hand outside the gate, and how to restore it ---------------------------------


@dataclasses.dataclass
class AliasCheck:
    """One family alias (``champion-lora``…) against the gate's records on it.

    Attributes:
        alias: the family alias.
        holder: the version holding it now.
        gate_holder: the version the gate's records on it put there (see :func:`gate_champion`).
        issues: its inconsistencies (also listed in :attr:`RegistryCheck.issues`).
    """

    alias: str
    holder: str | None
    gate_holder: str | None
    issues: list[str]


@dataclasses.dataclass
class RegistryCheck:
    """The registry's aliases and stages against the gate's records.

    Attributes:
        name: registered model name.
        champion: the version holding the ``champion`` alias.
        gate_champion: the version the gate's records put there (see :func:`gate_champion`).
        production: the versions in stage ``Production``.
        issues: each inconsistency, one line each (empty = consistent), the family aliases' included.
        notes: things worth knowing that are not inconsistencies (a forced champion, an unfinished decision).
        families: each family alias: one named by a decision record, or any ``champion-*`` alias on the model.
    """

    name: str
    champion: str | None
    gate_champion: str | None
    production: list[str]
    issues: list[str]
    notes: list[str]
    families: list[AliasCheck] = dataclasses.field(default_factory=list)

    @property
    def consistent(self) -> bool:
        return not self.issues

    @property
    def champion_issues(self) -> list[str]:
        """The issues of the champion alias and the stages (not of the family aliases)."""
        family = {issue for check in self.families for issue in check.issues}
        return [issue for issue in self.issues if issue not in family]


def version_stage(model_version: Any) -> str:
    """The version's stage (None, Staging, Production, Archived), without MLflow's deprecation warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; users still read them
        return model_version.current_stage or "None"


def _alias_issues(alias: str, holder: str | None, records: list[DecisionRecord]) -> list[str]:
    """Where the holder of ``alias`` differs from what the gate's records on it say (moved by hand)."""
    gate = gate_champion(records, alias)
    if holder is not None and not any(
        r.version == holder and r.alias == alias and r.decision in MOVES for r in records
    ):
        return [f"the {alias} v{holder} has no passed gate decision (the alias was moved outside the gate)"]
    if holder is not None and gate is not None and gate.version != holder:
        return [
            f"the {alias} alias is on v{holder}, but the gate's records put v{gate.version} there "
            f"(decision #{gate.index} of v{gate.version}, {gate.decision} at {gate.at})"
        ]
    if holder is None and gate is not None:
        return [f"no version holds the {alias} alias, but the gate's records put v{gate.version} there"]
    return []


def _model_aliases(client: Any, name: str) -> dict[str, str]:
    """Alias -> version of registered model ``name`` ({} when there is no such model)."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            return {}
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def check_registry(name: str) -> RegistryCheck:
    """Compare the champion alias, the stages and the family aliases of ``name`` with the gate's records; see
    :class:`RegistryCheck`."""
    from mlflow import MlflowClient

    client = MlflowClient()
    versions = _all_versions(client, name)
    stages = {str(v.version): version_stage(v) for v in versions}
    records = _model_records(client, name, versions)
    aliases = _model_aliases(client, name)
    champion = aliases.get(CHAMPION_ALIAS)
    production = [v for v, stage in stages.items() if stage == "Production"]
    gate = gate_champion(records)
    issues: list[str] = []
    if champion is not None and stages.get(champion) == "Archived":
        issues.append(f"the champion alias is on v{champion}, which is Archived")
    elif champion is not None and stages.get(champion) != "Production":
        issues.append(f"the champion v{champion} is not in stage Production (stage {stages.get(champion)})")
    issues += [f"stage Production on v{v}, which is not the champion" for v in production if v != champion]
    if len(production) > 1:
        issues.append(f"{len(production)} versions in stage Production: {', '.join(f'v{v}' for v in production)}")
    issues += _alias_issues(CHAMPION_ALIAS, champion, records)
    family_aliases = {r.alias for r in records} | {a for a in aliases if a.startswith(f"{CHAMPION_ALIAS}-")}
    families = []
    for alias in sorted(family_aliases - {CHAMPION_ALIAS}):
        on_alias = [r for r in records if r.alias == alias]
        holder = gate_champion(on_alias, alias)
        families.append(
            AliasCheck(
                alias,
                aliases.get(alias),
                holder.version if holder else None,
                _alias_issues(alias, aliases.get(alias), on_alias),
            )
        )
        issues += families[-1].issues
    notes = [
        f"v{r.version} decision #{r.index} never finished (promoter died while evaluating; rule frozen at {r.at})"
        for r in records
        if r.decision == "evaluating"
    ]
    if gate is not None and gate.version == champion and gate.decision == "forced":
        notes.append(f"the champion v{champion} was forced by {gate.by} at {gate.at}: {gate.reason}")
    return RegistryCheck(name, champion, gate.version if gate else None, production, issues, notes, families)


def _move_alias(client: Any, name: str, alias: str, version: str, *, superseding: str | None = None) -> None:
    """``alias`` to ``version``: the champion with its stages (:func:`_move_champion`), a family alias alone."""
    if alias == CHAMPION_ALIAS:
        _move_champion(client, name, version, superseding=superseding)
    else:
        client.set_registered_model_alias(name, alias, version)


def _move_champion(client: Any, name: str, version: str, *, superseding: str | None = None) -> None:
    """Champion alias and stage Production to ``version``, the previous Production version(s) to Archived."""
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; users still ask for them
        client.transition_model_version_stage(name, version, "Production", archive_existing_versions=True)
    if superseding is not None and superseding != version:
        client.set_model_version_tag(name, superseding, SUPERSEDED_TAG, version)


def set_aliases(name: str, version: str | int, aliases: Sequence[str]) -> None:
    """Point ``aliases`` of registered model ``name`` at ``version`` (e.g. a chain's ``claimed`` beside ``champion``,
    after its gate promoted it): an alias names one version, so each moves from wherever it was."""
    from mlflow import MlflowClient

    client = MlflowClient()
    for alias in aliases:
        client.set_registered_model_alias(name, alias, str(version))


def promote_by_hand(name: str, version: str | int, *, force: bool = False, reason: str = "") -> DecisionRecord | None:
    """Make ``version`` champion on a person's request (``avlm registry promote``), recorded as a decision.

    Without ``force`` it must hold a standing ``promoted`` gate decision (:func:`standing_decision`): the command
    re-applies what the gate decided (e.g. after the alias was moved by hand). With ``force`` it needs a reason,
    recorded with who and when.

    Returns:
        The decision written; None when the version already is champion in stage Production (nothing to do).

    Raises:
        PromotionRefused: no standing passed gate decision (and no ``force``).
        ConfigError: ``force`` without a reason; no such version.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    version = str(version)
    if force and not reason.strip():
        raise ConfigError('a forced promotion needs a reason (--reason "..."), recorded on the version')
    _model_version(client, name, version)
    with promotion_lock(name):
        model_version = client.get_model_version(name, version)
        records = [r for r in _model_records(client, name) if r.alias == CHAMPION_ALIAS]
        standing = standing_decision(records, version)
        champion = current_champion(name)
        champion_version = str(champion.version) if champion is not None else None
        if champion_version == version and version_stage(model_version) == "Production":
            return None
        if not force and standing is None:
            last = next((r for r in reversed(records) if r.version == version and r.kind == "gate"), None)
            why = (
                f"its last gate decision is #{last.index}, {last.decision}: {last.reason}"
                if last
                else ("it has no gate decision at all")
            )
            raise PromotionRefused(
                f"refused: {name} v{version} holds no passed gate decision that still stands ({why}); promote it "
                'through a gate, or with --force --reason "..."'
            )
        record = _begin_record(
            client, model_version, kind="force" if force else "promote", champion_before=champion_version
        )
        if force:
            decision, text = "forced", f"forced by hand: {reason.strip()}"
        else:
            decision, text = "promoted", f"promoted by hand on gate decision #{standing.index} ({standing.reason})"
        record = _finish_record(
            client, record, model_version, decision=decision, reason=text, backed_by=None if force else standing.index
        )
        _move_champion(client, name, version)
    logger.info("%s v%s %s by %s", name, version, decision, record.by)
    return record


def rollback(name: str, *, to: str | int | None = None, reason: str = "") -> list[DecisionRecord]:
    """Restore a consistent state through the gate's records, recorded as ``rollback`` decisions (``restored``).

    Without ``to``: the champion alias and stage Production go back to the version the gate's records put there
    (:func:`gate_champion`: the last decision that promoted, forced or restored a version), undoing what was
    moved by hand, and so does each family alias (``champion-lora``…) the records name a holder for; nothing is
    written when the registry is consistent already. With ``to`` (and a reason): an earlier champion is
    reinstated, e.g. to undo a promotion that turned out bad; ``to`` must have been champion through the records
    (promoted, forced or restored) and not rejected since.

    Returns:
        The decisions written, the champion's first (empty when there was nothing to do).

    Raises:
        PromotionRefused: no gate record to restore from; ``to`` never champion through the records.
        ConfigError: ``to`` without a reason.
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    if to is not None and not reason.strip():
        raise ConfigError('a rollback to a chosen version needs a reason (--reason "..."), recorded on it')
    with promotion_lock(name):
        state = check_registry(name)
        records = [r for r in decision_history(name) if r.alias == CHAMPION_ALIAS]
        # (alias, version, holder before, reason) of each alias to move
        moves: list[tuple[str, str, str | None, str]] = []
        if to is None:
            gate = gate_champion(records)
            families = [f for f in state.families if f.issues and f.gate_holder is not None]
            if gate is None and not families:
                raise PromotionRefused(f"no decision of the gate ever made a champion of {name}: nothing to restore")
            if gate is not None and state.champion_issues:
                text = f"restored the gate's champion v{gate.version} (decision #{gate.index}): "
                moves.append((CHAMPION_ALIAS, gate.version, state.champion, text + "; ".join(state.champion_issues)))
            for family in families:
                text = f"restored the gate's {family.alias} v{family.gate_holder}: " + "; ".join(family.issues)
                moves.append((family.alias, family.gate_holder, family.holder, text))
        else:
            target = str(to)
            _model_version(client, name, target)
            promoted = [r for r in records if r.version == target and r.decision in MOVES]
            if not promoted:
                raise PromotionRefused(f"refused: {name} v{target} was never champion through the gate's records")
            since = [r for r in records if r.version == target and r.order > promoted[-1].order]
            rejected = [r for r in since if r.decision == "rejected"]
            if rejected:
                raise PromotionRefused(
                    f"refused: {name} v{target} was rejected by the gate since it was champion (decision "
                    f"#{rejected[-1].index}: {rejected[-1].reason})"
                )
            if not (state.champion == target and not state.champion_issues):
                text = f"rolled back from v{state.champion or 'none'} to v{target}: {reason.strip()}"
                moves.append((CHAMPION_ALIAS, target, state.champion, text))
        written = []
        for alias, target, before, text in moves:
            model_version = client.get_model_version(name, target)
            record = _begin_record(client, model_version, kind="rollback", champion_before=before, alias=alias)
            written.append(_finish_record(client, record, model_version, decision="restored", reason=text))
            _move_alias(client, name, alias, target)
            logger.info("%s: %s", name, text)
    return written
