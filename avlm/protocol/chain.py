"""Promotion chains: a staged protocol (val sweep → quick test → full test) run stage by stage, each stage's rule
decided by code and written down, and a stop rule that caps how many ideas a push may try.

python entrypoints/chain.py --spec examples/chains/cvs_demo.yaml --workers 2
mlflow run . -e chain --env-manager local -P spec=examples/chains/cvs_demo.yaml -P workers=2

A chain spec (YAML) names the recipe, its base config and shared overrides, a **baseline cell** (overrides; run in
every stage on the stage's seeds, so each stage's figures are paired by seed) and the ordered stages::

    name: cvs-dropout
    recipe: train_cvs
    base_config: examples/cvs/demo.yaml
    overrides: {train.epochs: 2}
    baseline: {name: baseline, overrides: {}}
    objective: {metric: best/val/mAP, mode: max}         # how each stage's sweep ranks its cells (Δ vs baseline)
    stop_rule: {push: cvs-dropout-push, max_ideas: 2}    # optional
    stages:
      - {name: val_sweep, seeds: [0, 1, 2], grid: {model.head_dropout: [0.0, 0.3]}}
      - name: quick_test
        seeds: [0, 1, 2]
        winner: val_sweep                                # the winner cell of an earlier stage
        rule: {conditions: [{figure: delta, metric: final/test_mAP, op: ">=", threshold: 0.018}]}
      - {name: full_test, seeds: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], winner: val_sweep, rule: {...}}

A stage's candidates are a ``grid`` or a list of ``cells`` (as in a sweep spec, :mod:`avlm.protocol.sweep`) or the
``winner`` of an earlier stage; ``overrides`` (e.g. evaluating on the test split), ``objective``, ``tie_breaks``
and ``budget`` may be set per stage. Each stage is a sweep of its candidates and the baseline cell, run by
:func:`avlm.protocol.sweep.run_sweep` as a child run of the chain's run (the sweep's children nested under it).

Decisions. A stage's candidate is its sweep's winner, which is never the baseline (a winner may still lose to the
baseline: the next stage's rule is what judges it). A stage with a ``rule`` (:mod:`avlm.protocol.rules`) evaluates
it on the candidate-vs-baseline evidence of its sweep (per-seed values of the rule's metrics, paired by seed); a
stage without one passes once its sweep has finished (the last stage must have a rule: it is the claim). A stage
with a training that did not finish is not decided at all (the chain ends FAILED; a re-run retries the training).
Every decision is recorded on the chain run: metric and tag ``chain/<stage>/decision`` (1/0, passed/failed), tags
``chain/<stage>/reason``, ``…/candidate``, ``…/stage_run_id``, ``…/rule_sha256`` and ``…/condition_<i>`` (each
condition in words with its verdict) with metric ``…/condition_<i>`` (its figure), and the artifact
``chain/<stage>/decision.json`` (the stage, the candidate's overrides, the evidence with its run ids, and
:meth:`RuleOutcome.to_dict`). The stage run gets ``avlm.chain.decision`` and ``avlm.chain.reason``; its rule's
hash is tagged on it (``avlm.chain.rule_sha256``) before its sweep starts.

Outcomes. ``passed``: every stage passed. ``stopped``: a stage's rule failed; the chain says so (tag
``avlm.chain.stopped_at``, tag ``chain/<later stage>/decision = not run``, a warning in the log) and later stages
never start. Both are verdicts, not errors: the chain run ends FINISHED with tag ``avlm.chain.outcome`` and the
entry point exits 0 after one verdict line. A chain that cannot decide a stage (a training failed) or meets an
error ends FAILED (``avlm.chain.outcome = failed``, ``avlm.chain.error``) and the entry point exits 2; Ctrl-C or
SIGTERM ends it KILLED.

Promotion (optional, ``promote: {model: NAME}``): a passed chain registers its candidate as a version of ``NAME``
that refers to the best checkpoint of the last stage's first-seed run (``runs:/<run>/checkpoints/best``, with
:func:`avlm.tracking.registry.register_reference`), and puts it through
:func:`avlm.tracking.registry.promote_with_rule` with the last stage's rule and evidence, the stage run as the run
the rule was frozen in. A re-run of a chain that registered already does not register again.

The spec is validated whole when loaded (unknown key, wrong type, a winner of a later stage, a stage sweep the
sweep layer refuses → :class:`~avlm.errors.ConfigError` naming the key and the file); before any run exists,
every stage's cells are loaded by the recipe's own config loader (a typo'd key in the last stage fails before the
first stage trains); the spec is frozen into the chain run (``chain_spec.json`` and tag
``avlm.chain.spec_sha256``) before any stage starts.

Stop rule. ``stop_rule: {push: P, max_ideas: N}`` tags the chain run with the push; before any run is created, the
chain runs of push ``P`` already in the tracking store (every experiment, deleted runs included: deleting a run
does not give its idea back) are counted by idea, and a chain that would be idea ``N + 1`` is refused
(:class:`StopRuleRefused`, naming the push, the cap and the runs counted). An idea is
:func:`chain_sha256`: the hash of the spec without its ``stop_rule`` (raising the cap does not make an idea new)
and of its base config's bytes. A re-run of the same spec is the same idea: it continues in the chain run that idea
already has in the experiment (under ``mlflow run``, the launcher's run gets tag ``avlm.chain.resumed_into``),
whose stages resume through the sweeps' resumability (finished children are kept, failed ones re-run). Two chains
of one push started at the same moment may both pass the count; the cap guards a protocol, not a race.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from avlm.config import config_from_dict, config_to_dict
from avlm.errors import AvlmError, ConfigError, TrainingError
from avlm.protocol.rules import (
    Evidence,
    Rule,
    RuleOutcome,
    evaluate_rule,
    rule_from_dict,
    rule_sha256,
    rule_to_dict,
)
from avlm.protocol.spec import RECIPES, SweepSpec, resolve_cells, resolve_repo_path, sweep_spec_from_dict
from avlm.protocol.sweep import SweepResult, run_sweep
from avlm.tracking import resolve_tracking_uri
from avlm.tracking.chain_runs import (
    MAX_IDEAS_TAG,
    NAME_TAG,
    OUTCOME_TAG,
    PUSH_TAG,
    REGISTERED_TAG,
    RULE_SHA_TAG,
    SHA_TAG,
    SPEC_ARTIFACT,
    STOPPED_AT_TAG,
    ChainRunRecord,
    ChainRuns,
)
from avlm.tracking.provenance import provenance_tags

logger = logging.getLogger(__name__)

# Stage, baseline and push names go into tag keys (chain/<stage>/...) and MLflow filter strings.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------------------------------------------
# The spec
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class BaselineCell:
    """The reference every stage compares with, run on each stage's seeds.

    Attributes:
        name: the baseline cell's name in every stage's sweep (and in the evidence).
        overrides: config key → value on top of the chain's overrides (empty = the base config itself).
    """

    name: str = "baseline"
    overrides: Any = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"config key 'baseline.name': {self.name!r} is not a name of letters, digits, _.-")
        _check_overrides(self.overrides, "baseline.overrides")


@dataclasses.dataclass
class StopRule:
    """A cap on the ideas (distinct chains) one push may try.

    Attributes:
        push: the push's name; the chain run is tagged with it. Empty = no stop rule.
        max_ideas: how many distinct ideas the push may try (>= 1).
    """

    push: str = ""
    max_ideas: int = 0

    def __post_init__(self) -> None:
        if bool(self.push) != (self.max_ideas != 0):
            raise ConfigError("config key 'stop_rule': set both push and max_ideas, or neither")
        if self.push and not _NAME.fullmatch(self.push):
            raise ConfigError(f"config key 'stop_rule.push': {self.push!r} is not a name of letters, digits, _.-")
        if self.max_ideas < 0:
            raise ConfigError(f"config key 'stop_rule.max_ideas' must be >= 1, got {self.max_ideas}")


@dataclasses.dataclass
class Promotion:
    """What a passed chain registers.

    Attributes:
        model: registered model name; empty = register nothing.
        aliases: aliases the version gets when the gate promotes it, beside ``champion`` (e.g. ``claimed``).
    """

    model: str = ""
    aliases: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Stage:
    """One stage: a sweep of its candidates and the baseline cell on its seeds, then its rule.

    Attributes:
        name: the stage's name (letters, digits, ``_.-``): its run, its ``chain/<name>/…`` records.
        seeds: the seeds every cell runs on.
        grid: candidates as a grid (config key → list of values), as in a sweep spec.
        cells: candidates as a list of ``{name, overrides}``, as in a sweep spec.
        winner: the candidate is the winner cell of this earlier stage.
        overrides: config key → value for this stage's runs, candidates and baseline alike (e.g. test split).
        objective: this stage's sweep objective (default: the chain's); its baseline is always the baseline cell.
        tie_breaks: this stage's tie-breaks (default: the chain's).
        budget: this stage's sweep budget, as in a sweep spec (default: the sweep's).
        rule: the rule the stage's candidate must pass against the baseline for the chain to go on; None = the
            stage passes once its sweep has finished.
    """

    name: str = ""
    seeds: list[int] = dataclasses.field(default_factory=list)
    grid: Any = None
    cells: Any = None
    winner: str = ""
    overrides: Any = dataclasses.field(default_factory=dict)
    objective: Any = None
    tie_breaks: Any = None
    budget: Any = None
    rule: Any = None

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"stage name {self.name!r} is not a name of letters, digits, _.- (it names records)")
        if not self.seeds:
            raise ConfigError(f"stage '{self.name}': seeds must list at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"stage '{self.name}': seeds {self.seeds} repeat a seed")
        given = [key for key in ("grid", "cells", "winner") if getattr(self, key)]
        if len(given) != 1:
            raise ConfigError(
                f"stage '{self.name}': give its candidates as exactly one of grid, cells or winner"
                + (f" (got {' and '.join(given)})" if given else "")
            )
        _check_overrides(self.overrides, f"stage '{self.name}' overrides")
        for key in ("objective", "budget"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), Mapping):
                raise ConfigError(f"stage '{self.name}': {key} must be a mapping, got {getattr(self, key)!r}")
        if self.rule is not None and not isinstance(self.rule, Rule):
            self.rule = rule_from_dict(self.rule, where=f"stage '{self.name}' rule")


@dataclasses.dataclass
class ChainSpec:
    """A promotion chain (see the module docstring).

    Attributes:
        name: the chain's name (its run's name).
        recipe: the recipe every run trains (train_cvs | train_caption | probe | train_ave).
        base_config: the recipe's config file, relative to the repository root (or absolute).
        overrides: config key → value for every run of every stage.
        baseline: the baseline cell.
        objective: how each stage's sweep ranks its cells (a sweep spec's ``objective``; its ``baseline`` is set to
            the baseline cell).
        tie_breaks: each stage's sweep tie-breaks (a sweep spec's ``tie_breaks``).
        num_processes: processes per training run (accelerate launch).
        experiment: MLflow experiment of the chain run (and its stage and sweep runs); empty =
            ``avlm-chain-<name>``. Under ``mlflow run`` the launcher's run (and its experiment) is used.
        stop_rule: the push's cap on ideas (off by default).
        promote: what a passed chain registers (nothing by default).
        stages: the stages, in order.
        source: the file the spec came from (not part of the spec's identity).
    """

    name: str = ""
    recipe: str = ""
    base_config: str = ""
    overrides: Any = dataclasses.field(default_factory=dict)
    baseline: BaselineCell = dataclasses.field(default_factory=BaselineCell)
    objective: Any = None
    tie_breaks: Any = dataclasses.field(default_factory=list)
    num_processes: int = 1
    experiment: str = ""
    stop_rule: StopRule = dataclasses.field(default_factory=StopRule)
    promote: Promotion = dataclasses.field(default_factory=Promotion)
    stages: list[Stage] = dataclasses.field(default_factory=list)
    source: str = dataclasses.field(default="", init=False)

    def __post_init__(self) -> None:
        for key in ("name", "recipe", "base_config"):
            if not getattr(self, key).strip():
                raise ConfigError(f"config key '{key}' must be set")
        _check_overrides(self.overrides, "overrides")
        if not isinstance(self.objective, Mapping) or "metric" not in self.objective:
            raise ConfigError(f"config key 'objective' must be a mapping with a metric, got {self.objective!r}")
        if self.objective.get("baseline", self.baseline.name) not in ("", self.baseline.name):
            raise ConfigError(
                f"config key 'objective.baseline': {self.objective['baseline']!r} is not the baseline cell "
                f"{self.baseline.name!r} (a chain compares every stage with its baseline cell; leave it out)"
            )
        if self.num_processes < 1:
            raise ConfigError(f"config key 'num_processes' must be >= 1, got {self.num_processes}")
        if not self.stages:
            raise ConfigError("config key 'stages' must list at least one stage")
        seen: list[str] = []
        for stage in self.stages:
            if stage.name in seen:
                raise ConfigError(f"stage name '{stage.name}' is used twice")
            if stage.winner and stage.winner not in seen:
                earlier = f"earlier stages: {', '.join(seen)}" if seen else "it is the first stage"
                raise ConfigError(f"stage '{stage.name}': winner '{stage.winner}' is not an earlier stage ({earlier})")
            if self.baseline.name in _explicit_cell_names(stage):
                raise ConfigError(f"stage '{stage.name}': a cell is named like the baseline '{self.baseline.name}'")
            seen.append(stage.name)
        if self.stages[-1].rule is None:
            raise ConfigError(f"stage '{self.stages[-1].name}' (the last) needs a rule: it is the chain's claim")

    def stage(self, name: str) -> Stage:
        """The stage called ``name``."""
        return next(s for s in self.stages if s.name == name)


def _check_overrides(overrides: Any, where: str) -> None:
    if not isinstance(overrides, Mapping) or not all(isinstance(k, str) and k for k in overrides):
        raise ConfigError(f"{where} must be a mapping of config key → value, got {overrides!r}")


def _explicit_cell_names(stage: Stage) -> list[str]:
    if isinstance(stage.cells, list):
        return [c.get("name") for c in stage.cells if isinstance(c, Mapping)]
    return []


def chain_spec_from_dict(values: Mapping[str, Any], where: str) -> ChainSpec:
    """Build and validate a chain spec from its YAML mapping, checking every stage's sweep as the sweep layer will.

    Args:
        values: the spec.
        where: where it came from (a file), named in every error.

    Raises:
        ConfigError: naming ``where`` and the bad key.
    """
    try:
        spec = config_from_dict(ChainSpec, values)
    except ConfigError as err:
        raise ConfigError(f"chain spec {where}: {err}") from err
    spec.source = where
    for stage in spec.stages:
        try:
            stage_sweep_spec(spec, stage, {s.name: _PLACEHOLDER for s in spec.stages})
        except ConfigError as err:
            raise ConfigError(f"chain spec {where}: {err}") from err
    return spec


def load_chain_spec(path: str | Path) -> ChainSpec:
    """Read and validate a chain spec file (see :func:`chain_spec_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"chain spec not found: {path}")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"chain spec {path} is not valid YAML: {err}") from err
    if not isinstance(values, Mapping):
        raise ConfigError(f"chain spec {path} must hold a mapping of keys, got {type(values).__name__}")
    return chain_spec_from_dict(values, str(path))


def chain_spec_to_dict(spec: ChainSpec) -> dict[str, Any]:
    """The spec as plain data (what is frozen into the chain run), rules in their canonical form."""
    values = config_to_dict(spec)
    values.pop("source")
    for stage, stage_values in zip(spec.stages, values["stages"], strict=True):
        stage_values["rule"] = rule_to_dict(stage.rule) if stage.rule else None
    return values


def chain_sha256(spec: ChainSpec) -> str:
    """The idea's identity: SHA-256 of the spec's canonical JSON without its ``stop_rule``, and of the bytes of its
    base config (as a sweep's hash has them: editing the base config is another idea)."""
    values = chain_spec_to_dict(spec)
    values.pop("stop_rule")
    base = resolve_repo_path(spec.base_config)
    base_sha = hashlib.sha256(base.read_bytes()).hexdigest() if base.is_file() else ""
    text = json.dumps({"spec": values, "base_config_sha256": base_sha}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The stop rule
# ----------------------------------------------------------------------------------------------------------------
class StopRuleRefused(AvlmError):
    """A new chain past its push's cap on ideas; raised before any run is created.

    Attributes:
        push: the push.
        max_ideas: its cap.
        counted: the chain runs counted, oldest first.
    """

    def __init__(self, push: str, max_ideas: int, counted: Sequence[ChainRunRecord], chain_sha: str):
        ideas = _ideas(counted)
        runs = "; ".join(
            f"idea {ideas.index(r.chain_sha256) + 1} ({r.chain_sha256[:12]}): run {r.run_id} '{r.run_name}' in "
            f"{r.experiment}, {', '.join(filter(None, [r.status.lower(), r.outcome, 'deleted' if r.deleted else '']))}"
            for r in counted
        )
        super().__init__(
            f"stop rule: push '{push}' may try {max_ideas} idea{'s' if max_ideas != 1 else ''} and has tried "
            f"{len(ideas)} (counted from its chain runs: {runs}); this chain ({chain_sha[:12]}) would be idea "
            f"{len(ideas) + 1}, so it is refused and no run was created. To go on, write down why and raise "
            "stop_rule.max_ideas in the spec (a re-run of a counted spec is allowed: it is the same idea)."
        )
        self.push, self.max_ideas, self.counted = push, max_ideas, list(counted)


def _ideas(counted: Sequence[ChainRunRecord]) -> list[str]:
    """The distinct ideas among chain runs, in the order they were first tried."""
    return list(dict.fromkeys(r.chain_sha256 for r in counted))


def check_stop_rule(stop_rule: StopRule, chain_sha: str, counted: Sequence[ChainRunRecord]) -> None:
    """Refuse idea ``chain_sha`` when the push has tried ``max_ideas`` other ideas already.

    Args:
        stop_rule: the push and its cap (a spec without one passes).
        chain_sha: this chain's :func:`chain_sha256`.
        counted: the push's chain runs (:meth:`avlm.tracking.chain_runs.ChainRuns.of_push`).

    Raises:
        StopRuleRefused: naming the push, the cap and the runs counted.
    """
    if not stop_rule.push:
        return
    ideas = _ideas(counted)
    if chain_sha not in ideas and len(ideas) >= stop_rule.max_ideas:
        raise StopRuleRefused(stop_rule.push, stop_rule.max_ideas, counted, chain_sha)


# ----------------------------------------------------------------------------------------------------------------
# Decisions
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class StageDecision:
    """What a stage decided.

    Attributes:
        stage: the stage's name.
        passed: the chain goes on after it.
        reason: one line: the rule's reason, or why a stage without one passed.
        candidate: the stage's candidate cell (its sweep's best cell other than the baseline).
        candidate_overrides: that cell's overrides (what a ``winner`` of this stage runs).
        baseline: the baseline cell's name.
        stage_run_id: the stage's run (the sweep's parent).
        sweep_spec_sha256: the stage sweep's spec hash.
        outcome: the rule's outcome; None for a stage without a rule.
        evidence: the candidate-vs-baseline evidence the rule was evaluated on; None without a rule.
    """

    stage: str
    passed: bool
    reason: str
    candidate: str
    candidate_overrides: dict[str, Any]
    baseline: str
    stage_run_id: str = ""
    sweep_spec_sha256: str = ""
    outcome: RuleOutcome | None = None
    evidence: Evidence | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the artifact ``chain/<stage>/decision.json``."""
        return {
            "stage": self.stage,
            "decision": "passed" if self.passed else "failed",
            "reason": self.reason,
            "candidate": self.candidate,
            "candidate_overrides": self.candidate_overrides,
            "baseline": self.baseline,
            "stage_run_id": self.stage_run_id,
            "sweep_spec_sha256": self.sweep_spec_sha256,
            "outcome": self.outcome.to_dict() if self.outcome else None,
            "evidence": self.evidence.to_dict() if self.evidence else None,
        }


def decision_records(decision: StageDecision) -> tuple[dict[str, str], dict[str, float], str]:
    """How a decision is written on the chain run: (tags, metrics, artifact file of :meth:`StageDecision.to_dict`).

    Tags and metrics share the ``chain/<stage>/`` prefix: ``decision`` (passed/failed, 1/0), ``reason``,
    ``candidate``, ``stage_run_id``, ``rule_sha256`` and one ``condition_<i>`` per condition (the tag in words,
    the metric its figure when it could be computed).
    """
    prefix = f"chain/{decision.stage}"
    tags = {
        f"{prefix}/decision": "passed" if decision.passed else "failed",
        f"{prefix}/reason": decision.reason,
        f"{prefix}/candidate": decision.candidate,
        f"{prefix}/stage_run_id": decision.stage_run_id,
    }
    metrics = {f"{prefix}/decision": 1.0 if decision.passed else 0.0}
    if decision.outcome is not None:
        tags[f"{prefix}/rule_sha256"] = decision.outcome.rule_sha256
        for i, condition in enumerate(decision.outcome.conditions):
            verdict = "passed" if condition.passed else "failed"
            tags[f"{prefix}/condition_{i}"] = f"{condition.condition}: {verdict}, {condition.reason}"
            if condition.value is not None and math.isfinite(condition.value):
                metrics[f"{prefix}/condition_{i}"] = condition.value
    return tags, metrics, f"{prefix}/decision.json"


# ----------------------------------------------------------------------------------------------------------------
# Each stage as a sweep
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Winner:
    """An earlier stage's candidate, as a later stage runs it."""

    cell: str
    overrides: Mapping[str, Any]


# What validation puts in place of the winners of earlier stages, which exist only once those stages have run.
_PLACEHOLDER = Winner("<winner>", {})  # "<" is in no baseline name: the two never clash


def stage_sweep_spec(spec: ChainSpec, stage: Stage, winners: Mapping[str, Winner]) -> SweepSpec:
    """The sweep that runs ``stage``: its candidates and the baseline cell on its seeds, with the chain's and the
    stage's overrides, ranked by the stage's objective against the baseline cell; registration off.

    Raises:
        ConfigError: the sweep layer refuses it (names the key).
    """
    baseline = {"name": spec.baseline.name, "overrides": dict(spec.baseline.overrides)}
    values: dict[str, Any] = {
        "name": f"{spec.name}.{stage.name}",
        "recipe": spec.recipe,
        "base_config": spec.base_config,
        "overrides": {**spec.overrides, **stage.overrides},
        "seeds": list(stage.seeds),
        "objective": {**(stage.objective or spec.objective), "baseline": spec.baseline.name},
        "tie_breaks": list(stage.tie_breaks if stage.tie_breaks is not None else spec.tie_breaks),
        "register": False,
        "num_processes": spec.num_processes,
    }
    if stage.budget is not None:
        values["budget"] = stage.budget
    if stage.winner:
        winner = winners[stage.winner]
        candidates = [{"name": winner.cell, "overrides": dict(winner.overrides)}]
    elif stage.cells:
        candidates = list(stage.cells)
    else:
        # A sweep takes a grid or listed cells, not both: the grid's cells (named as the sweep names them) are listed
        # with the baseline cell after them.
        grid_only = {**values, "grid": stage.grid, "objective": {**values["objective"], "baseline": ""}}
        grid_only.pop("budget", None)  # the budget counts the baseline cell too; it is checked below
        cells = sweep_spec_from_dict(grid_only, where=f"stage '{stage.name}'").cell_list()
        candidates = [{"name": cell.name, "overrides": cell.overrides} for cell in cells]
    return sweep_spec_from_dict({**values, "cells": [*candidates, baseline]}, where=f"stage '{stage.name}'")


# ----------------------------------------------------------------------------------------------------------------
# Running a chain
# ----------------------------------------------------------------------------------------------------------------
def decide_stage(stage: Stage, baseline: str, result: SweepResult) -> StageDecision:
    """The stage's decision from its finished sweep: its candidate (the sweep's winner, never the baseline) and,
    with a rule, the rule evaluated on the candidate-vs-baseline evidence of the rule's metrics.

    Raises:
        TrainingError: a (cell, seed) of the sweep has no FINISHED child, or no cell could be ranked: the stage
            cannot be decided (a re-run of the chain retries the failed children).
    """
    failed = result.failed()
    if failed:
        missing = ", ".join(
            f"{cell} seed {seed} ({child.status if child else 'not run'})" for cell, seed, child in failed
        )
        raise TrainingError(
            f"stage '{stage.name}' cannot be decided: {len(failed)} run(s) without a FINISHED child: {missing}. "
            "Re-run the same chain to retry them (finished runs are kept)"
        )
    if not result.winner:
        raise TrainingError(f"stage '{stage.name}' has no candidate: {result.winner_reason}")
    common = {
        "stage": stage.name,
        "candidate": result.winner,
        "candidate_overrides": dict(result.cell(result.winner).overrides),
        "baseline": baseline,
        "stage_run_id": result.parent_run_id,
        "sweep_spec_sha256": result.spec_sha256,
    }
    if stage.rule is None:
        reason = f"no rule: {result.winner} goes on ({result.winner_reason})"
        return StageDecision(passed=True, reason=reason, **common)
    metrics = list(dict.fromkeys(c.metric for c in stage.rule.conditions))
    evidence = result.evidence(result.winner, baseline, metrics)
    outcome = evaluate_rule(stage.rule, evidence)
    return StageDecision(passed=outcome.passed, reason=outcome.reason, outcome=outcome, evidence=evidence, **common)


@dataclasses.dataclass
class ChainResult:
    """What :func:`run_chain` returns.

    Attributes:
        run_id: the chain run.
        name: the chain's name.
        chain_sha256: the idea.
        outcome: passed | stopped.
        decisions: the stages that ran, in order.
        stopped_at: the stage whose rule failed ("" when the chain passed).
        not_run: the stages after it, which never started.
        resumed: the chain continued in the run this idea had already.
        registered_version: the version a passed chain registered (``promote.model``), "" otherwise.
        promoted: whether that version became champion.
    """

    run_id: str
    name: str
    chain_sha256: str
    outcome: str
    decisions: list[StageDecision]
    stopped_at: str = ""
    not_run: list[str] = dataclasses.field(default_factory=list)
    resumed: bool = False
    registered_version: str = ""
    promoted: bool = False

    def verdict(self) -> str:
        """One line: the outcome, each stage's decision, and where the records are."""
        stages = ", ".join(f"{d.stage} {'passed' if d.passed else 'failed'}" for d in self.decisions)
        if self.outcome == "stopped":
            last = self.decisions[-1]
            text = (
                f"chain {self.name}: STOPPED at {self.stopped_at} (candidate {last.candidate}): {last.reason}; "
                f"not run: {', '.join(self.not_run) or 'none'}"
            )
        else:
            text = f"chain {self.name}: PASSED ({stages}; candidate {self.decisions[-1].candidate})"
            if self.registered_version:
                promoted = "promoted to champion" if self.promoted else "not promoted"
                text += f"; registered version {self.registered_version}, {promoted}"
        return f"{text} [run {self.run_id}]"


def _check_stage_configs(spec: ChainSpec) -> str:
    """Load every stage's cells with the recipe's loader (a typo'd key in the last stage fails now, not after the
    first stages ran); returns the tracking URI the runs go to, as the sweeps resolve it."""
    placeholders = {s.name: _PLACEHOLDER for s in spec.stages}
    resolved = []
    for stage in spec.stages:
        where = f"chain spec {spec.source}: stage '{stage.name}'"
        resolved += resolve_cells(stage_sweep_spec(spec, stage, placeholders), where=where)
    return resolve_tracking_uri(resolved[0].config.get("tracking", {}).get("tracking_uri", ""))


def run_chain(spec: ChainSpec, *, workers: int = 1, storage: str = "") -> ChainResult:
    """Run (or resume) the chain, stage by stage, until a stage's rule fails or every stage passed.

    Before any run exists: every stage's configs are loaded and the stop rule is applied. Then the chain run is
    opened (this idea's run, if it has one: a re-run resumes), the spec frozen into it, and each stage runs as a
    sweep under its own child run, decided and recorded (see the module docstring).

    Args:
        spec: the chain.
        workers: children each stage's sweep runs at once.
        storage: Optuna storage URL for the sweeps (empty = ``optuna.db`` beside the MLflow sqlite store).

    Returns:
        The :class:`ChainResult` (outcome ``passed`` or ``stopped``).

    Raises:
        ConfigError: a bad stage config key, before any run exists.
        StopRuleRefused: the push has tried its ``max_ideas`` other ideas, before any run exists.
        TrainingError: a stage could not be decided (a child failed); the chain run ends FAILED.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the running children are stopped, the chain run ends KILLED.
    """
    sha = chain_sha256(spec)
    runs = ChainRuns(_check_stage_configs(spec))
    if spec.stop_rule.push:
        check_stop_rule(spec.stop_rule, sha, runs.of_push(spec.stop_rule.push))
    tags = {
        NAME_TAG: spec.name,
        "avlm.chain.stages": ",".join(s.name for s in spec.stages),
        "avlm.recipe": spec.recipe,
        **provenance_tags(),
    }
    if spec.stop_rule.push:
        tags.update({PUSH_TAG: spec.stop_rule.push, MAX_IDEAS_TAG: str(spec.stop_rule.max_ideas)})
    chain = runs.open_chain_run(
        experiment=spec.experiment or f"avlm-chain-{spec.name}", run_name=spec.name, chain_sha256=sha, tags=tags
    )
    # The chain took the run `mlflow run` made (or pointed it at this idea's run); the sweeps must not take it too.
    os.environ.pop("MLFLOW_RUN_ID", None)
    frozen = {"chain_sha256": sha, "source": spec.source, "spec": chain_spec_to_dict(spec)}
    runs.log_dict(chain.run_id, frozen, SPEC_ARTIFACT)
    logger.info(
        "chain %s: run %s%s, idea %s, stages %s", spec.name, chain.run_id, " (resumed)" if chain.resumed else "",
        sha[:12], " → ".join(s.name for s in spec.stages),
    )  # fmt: skip
    result = ChainResult(chain.run_id, spec.name, sha, "passed", [], resumed=chain.resumed)
    winners: dict[str, Winner] = {}
    stage_run = ""
    try:
        for i, stage in enumerate(spec.stages):
            sweep_spec = stage_sweep_spec(spec, stage, winners)
            stage_tags = {NAME_TAG: spec.name, SHA_TAG: sha}
            if stage.rule is not None:  # frozen before its evidence exists (the registry checks it on promotion)
                stage_tags[RULE_SHA_TAG] = rule_sha256(stage.rule)
                stage_tags["avlm.chain.rule"] = json.dumps(rule_to_dict(stage.rule), sort_keys=True)
            stage_run = runs.open_stage_run(chain, stage.name, run_name=f"{spec.name}.{stage.name}", tags=stage_tags)
            logger.info("chain %s: stage %s (%d/%d): run %s", spec.name, stage.name, i + 1, len(spec.stages), stage_run)
            swept = run_sweep(sweep_spec, workers=workers, storage=storage, parent_run_id=stage_run)
            decision = decide_stage(stage, spec.baseline.name, swept)
            _record(runs, chain.run_id, decision)
            _report(runs, chain.run_id, spec.recipe, stage, decision, swept)
            runs.set_status(stage_run, "FINISHED")
            stage_run = ""
            result.decisions.append(decision)
            verdict = "passed" if decision.passed else "FAILED"
            logger.info("chain %s: stage %s %s: %s", spec.name, stage.name, verdict, decision.reason)
            if not decision.passed:
                result.outcome, result.stopped_at = "stopped", stage.name
                result.not_run = [s.name for s in spec.stages[i + 1 :]]
                break
            winners[stage.name] = Winner(decision.candidate, decision.candidate_overrides)
        if result.outcome == "passed" and spec.promote.model:
            _promote(runs, chain.run_id, spec, result)
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        if stage_run:
            runs.set_status(stage_run, status)
        runs.set_tags(chain.run_id, {OUTCOME_TAG: "failed", "avlm.chain.error": f"{type(err).__name__}: {err}"})
        runs.set_status(chain.run_id, status)
        raise
    final_tags = {OUTCOME_TAG: result.outcome}
    if result.stopped_at:
        final_tags[STOPPED_AT_TAG] = result.stopped_at
        final_tags.update({f"chain/{name}/decision": "not run" for name in result.not_run})
        logger.warning(
            "chain %s: STOPPED at stage %s; %s never start%s", spec.name, result.stopped_at,
            ", ".join(result.not_run) or "no later stage", "s" if len(result.not_run) == 1 else "",
        )  # fmt: skip
    runs.set_tags(chain.run_id, final_tags)
    runs.set_status(chain.run_id, "FINISHED")
    return result


def _record(runs: ChainRuns, chain_run_id: str, decision: StageDecision) -> None:
    """Write the decision on the chain run (see :func:`decision_records`) and its verdict on the stage run."""
    tags, metrics, artifact = decision_records(decision)
    runs.log_dict(chain_run_id, decision.to_dict(), artifact)
    runs.set_tags(chain_run_id, tags)
    runs.log_metrics(chain_run_id, metrics)
    runs.set_tags(
        decision.stage_run_id,
        {
            "avlm.chain.decision": "passed" if decision.passed else "failed",
            "avlm.chain.reason": decision.reason,
            "avlm.chain.candidate": decision.candidate,
        },
    )


def _report(
    runs: ChainRuns, chain_run_id: str, recipe: str, stage: Stage, decision: StageDecision, swept: SweepResult
) -> None:
    """The stage's figures and the recipe's own view of it, logged on the stage run (``report/``) and the chain
    run (``chain/<stage>/``): for every stage with evidence, the rule's first metric's Δ per seed with its 95 %
    bootstrap CI; then whatever the recipe module's ``chain_stage_report(decision, swept, folder, download)``
    writes (e.g. AVE's diagnose)."""
    import importlib
    import tempfile

    from avlm.stats import bootstrap_ci
    from avlm.tracking import plots

    with tempfile.TemporaryDirectory(prefix="avlm-chain-") as tmp:
        folder = Path(tmp)
        evidence = decision.evidence
        if evidence is not None and evidence.baseline is not None and stage.rule is not None:
            metric = stage.rule.conditions[0].metric
            candidate, baseline = evidence.candidate.get(metric, {}), evidence.baseline.get(metric, {})
            deltas = [candidate[s] - baseline[s] for s in candidate if s in baseline]
            if len(deltas) >= 2:
                ci = bootstrap_ci(deltas, method="percentile")
                figure = plots.paired_deltas(candidate, baseline, metric=metric, interval=(ci.low, ci.high))
                plots.save_and_close(figure, folder / "delta_per_seed.png")
        hook = getattr(importlib.import_module(RECIPES[recipe][0]), "chain_stage_report", None)
        if hook is not None:
            hook(decision, swept, folder, runs.download_file)
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            runs.log_file(decision.stage_run_id, path, "report")
            runs.log_file(chain_run_id, path, f"chain/{decision.stage}")


def _promote(runs: ChainRuns, chain_run_id: str, spec: ChainSpec, result: ChainResult) -> None:
    """Register the passed chain's candidate (a reference to the last stage's first-seed run's best checkpoint)
    and put it through the registry's rule gate with the last stage's rule and evidence. A resumed chain that
    registered already does not register again."""
    from avlm.tracking.registry import promote_with_rule, register_reference, set_aliases

    last, stage = result.decisions[-1], spec.stages[-1]
    held = runs.tags(chain_run_id).get(REGISTERED_TAG)
    if held:
        logger.info("chain %s: registered as %s version %s already", spec.name, spec.promote.model, held)
        result.registered_version = held
        return
    run_id = last.evidence.candidate_run_ids[0]  # seeds in order: the first seed's run
    version = register_reference(
        spec.promote.model,
        source=f"runs:/{run_id}/checkpoints/best",
        run_id=run_id,
        tags={"recipe": spec.recipe, "avlm.chain.run_id": chain_run_id, SHA_TAG: result.chain_sha256,
              "avlm.chain.candidate": last.candidate},
        alias="candidate",
        description=f"chain {spec.name}: candidate {last.candidate}, stage {last.stage}",
    )  # fmt: skip
    decision = promote_with_rule(
        spec.promote.model, version.version, stage.rule, last.evidence, frozen_by_run_id=last.stage_run_id
    )
    result.registered_version, result.promoted = str(version.version), decision.promoted
    if decision.promoted and spec.promote.aliases:
        set_aliases(spec.promote.model, version.version, spec.promote.aliases)
    runs.set_tags(chain_run_id, {REGISTERED_TAG: result.registered_version, "avlm.chain.promotion": decision.decision})
