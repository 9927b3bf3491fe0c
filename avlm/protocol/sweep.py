"""Sweeps: one parent MLflow run, one nested child run per (cell, seed), a summary and a winner chosen by a rule.

Run one::

    mlflow run . -e sweep --env-manager local -P spec=examples/sweeps/cvs_demo.yaml -P workers=2
    python entrypoints/sweep.py --spec examples/sweeps/cvs_demo.yaml --workers 2
    # many machines: the same command on each, one Optuna storage and one tracking server
    MLFLOW_TRACKING_URI=http://mlflow:5000 python entrypoints/sweep.py --spec ... --workers 4 \\
        --storage postgresql://user:pass@db/optuna

What happens, in order:

1. The spec is validated and every cell's config is loaded by its recipe's own loader (:func:`resolve_cells`):
   a typo'd key fails here, before any run exists.
2. The parent run is settled and the spec is frozen into it (``sweep/spec.yaml``, ``sweep/base_config.yaml``,
   ``sweep/cells.json`` and the tag ``avlm.sweep.spec_sha256``) before any child starts. The parent is the run a
   chain gave, else the sweep's existing parent (a re-run), else ``$MLFLOW_RUN_ID`` (the run ``mlflow run``
   made), else a new run. Which process settles it is decided by Optuna's storage: the first to create the
   sweep's home study (an atomic insert) settles the parent and records its id in the study; every other process
   (another machine, a re-run) reads it from there, and tags its own ``mlflow run`` run ``avlm.sweep.role=worker``.
3. Optuna schedules the children: a study with a ``GridSampler`` over ``cell`` × ``seed`` in an RDB storage
   (``optuna.db`` beside the MLflow sqlite file by default; PostgreSQL across machines). ``workers`` threads in
   this process each run ``study.optimize`` one trial at a time; a trial runs its (cell, seed) as a subprocess
   (``python -m avlm.launch --num_processes N -- entrypoints/<recipe>.py --config <base> key=value ...``) with
   ``MLFLOW_RUN_ID`` set to a child run the sweep made, so the recipe's tracked run attaches to it. The child's
   output goes to ``<output_dir>/sweeps/<name>-<parent>/children/*.log``, uploaded as its ``logs/`` artifact.
   Unless set, ``OMP_NUM_THREADS`` is the machine's cores divided among the children's processes (children that
   each take every core for torch's threads run slower together than one by one).
4. When no (cell, seed) is running anywhere, the summary is written on the parent: ``sweep_summary.json``,
   ``sweep_summary.md`` (cell × mean ± std, Δ vs the baseline, p, n), ``best_config.json`` (the winner's full
   resolved config), the tag ``avlm.sweep.winner`` and ``avlm.sweep.is_winner=true`` on the winner's children.

Exactly once per (cell, seed), and resume:

- Trials are created one at a time (a row lock on PostgreSQL, the file's write lock on sqlite) and numbered in
  that order, and GridSampler gives the trial numbered ``i < cells × seeds`` grid point ``i``; a trial whose grid
  point an earlier-numbered trial already holds is a duplicate and ends PRUNED without running anything
  (GridSampler re-proposes a running point once every point has started, e.g. more workers than points left).
- A worker that dies (machine lost, ``kill -9``) stops its trials' heartbeats; after :data:`GRACE_PERIOD_S`
  Optuna fails them and queues a copy, which the next worker to ask takes (WAITING → RUNNING, atomic on
  PostgreSQL by ``SELECT ... FOR UPDATE`` and on sqlite by :func:`serialize_sqlite_transactions`). A child
  interrupted by Ctrl-C or SIGTERM is queued again the same way at once.
- GridSampler counts a failed trial's point as visited and never proposes it again, so a child that fails marks
  its trial failed and is not retried in the same attempt. A re-run (same spec hash, same experiment) opens the
  next *attempt*, a fresh grid study: points that already have a FINISHED child complete at once with that child's
  value (no new run), the others run. Previous children are found by their tags in the experiment (see
  :mod:`avlm.tracking.children`), not from local files. An attempt opens only when the previous one holds no
  running or queued trial, so two attempts never run at once.
- A re-run retries what had failed (or was marked FAILED or KILLED in MLflow) before it started; a child that
  fails during it waits for the next re-run, so a deterministic failure costs one child per invocation.

Why Optuna: its RDB storage already is the shared, transactional work queue a multi-machine sweep needs (atomic
trial numbering and popping, heartbeats and retries of dead workers, sqlite or PostgreSQL, a dashboard), its
GridSampler enumerates the grid, and the same study can later take a TPE sampler for a search that is not a grid;
nothing here needs a cluster scheduler (Ray Tune) because every child is a subprocess that accelerate launches.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from avlm.errors import ConfigError, RunInterrupted
from avlm.protocol.spec import (
    REPO_ROOT,
    Cell,
    ResolvedCell,
    SweepSpec,
    load_sweep_spec,
    resolve_cells,
    spec_sha256,
    spec_yaml,
    sweep_spec_from_dict,
)
from avlm.stats import format_mean_std, mean_std, paired_test
from avlm.tracking.children import (
    CELL_TAG,
    FINISHED,
    IS_WINNER_TAG,
    KEY_TAG,
    NAME_TAG,
    PARENT_TAG,
    ROLE_TAG,
    SEED_TAG,
    SPEC_SHA_TAG,
    SUPERSEDED_TAG,
    WINNER_TAG,
    ChildRun,
    SweepRuns,
    json_text,
)
from avlm.tracking.mlflow_logger import absolute_tracking_uri

if TYPE_CHECKING:
    import optuna

    from avlm.protocol.rules import Evidence

__all__ = [
    "CellSummary",
    "ChildRun",
    "SweepResult",
    "SweepSpec",
    "choose_winner",
    "load_sweep_spec",
    "representative_children",
    "run_sweep",
    "spec_sha256",
    "summarize_cells",
    "summary_dict",
    "summary_markdown",
    "sweep_spec_from_dict",
]

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 20  # a running trial's heartbeat in the Optuna storage
GRACE_PERIOD_S = 60  # a trial whose heartbeat is older is a dead worker's: Optuna fails it and queues a copy
PARENT_WAIT_S = 30.0  # how long a joining process waits for the first one to record the parent run
_GRID_ID_WAIT_S = 10.0  # how long a claim waits for an earlier trial's grid point to be written (milliseconds)
_OUTCOME = "avlm.outcome"  # trial user attr: running | ran | failed | reused | duplicate | deferred | interrupted
_RUN_ID_ATTR = "avlm.mlflow_run_id"
_INTERRUPTED_EXIT = {130, 143, -signal.SIGINT, -signal.SIGTERM}
_LOG_TAIL_LINES = 15


# ----------------------------------------------------------------------------------------------------------------
# Results (pure)
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class CellSummary:
    """One cell over its seeds.

    Attributes:
        name: the cell.
        overrides: the cell's own overrides (dotted key -> value).
        values: seed -> the objective metric of its FINISHED child.
        mean / std: over ``values`` (sample std, ddof=1; 0 for one value; NaN for none).
        delta: the aggregate over paired seeds of (cell - baseline), raw (not signed by mode); None for the
            baseline itself or without a baseline.
        p_value: the objective's paired test (two-sided) against the baseline; None with fewer than 2 pairs.
        n: seeds with a value.
        aggregate: the objective's aggregate (mean or median) of ``values``.
        score: what ranks the cell: ``delta`` with a baseline, else ``aggregate`` (NaN when it has none).
        failed_seeds: seeds without a value (no FINISHED child, or the metric not logged).
        tie_values: tie-break metric -> its mean over the cell's FINISHED children that logged it.
        run_ids: seed -> the child run that represents it.
    """

    name: str
    overrides: dict[str, Any]
    values: dict[int, float]
    mean: float
    std: float
    delta: float | None
    p_value: float | None
    n: int = 0
    aggregate: float = math.nan
    score: float = math.nan
    failed_seeds: list[int] = dataclasses.field(default_factory=list)
    tie_values: dict[str, float] = dataclasses.field(default_factory=dict)
    run_ids: dict[int, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class SweepResult:
    """What :func:`run_sweep` returns.

    Attributes:
        parent_run_id: the parent run (children are nested under it; the summary is on it).
        spec_sha256: the spec's identity.
        cells: per cell, in spec order.
        winner: the winning cell's name; empty when no cell is eligible.
        best_config: the winner's full resolved config (base + overrides + cell overrides, as the recipe resolves
            it; the base config's seed); empty without a winner.
        runs: cell -> seed -> the child that represents it (the latest FINISHED one, else the latest).
        winner_reason: why the winner won (objective, ties, tie-breaks).
        best_overrides: the spec's overrides with the winner's on top (what to apply to the base config).
        complete: every (cell, seed) has a FINISHED child.
        summarized: the summary was written on the parent (False while children still run on other workers).
    """

    parent_run_id: str
    spec_sha256: str
    cells: list[CellSummary]
    winner: str
    best_config: dict[str, Any]
    runs: dict[str, dict[int, ChildRun]]
    winner_reason: str = ""
    best_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    complete: bool = False
    summarized: bool = False

    def cell(self, name: str) -> CellSummary:
        """The summary of cell ``name``.

        Raises:
            KeyError: no such cell.
        """
        for cell in self.cells:
            if cell.name == name:
                return cell
        raise KeyError(name)

    def failed(self) -> list[tuple[str, int, ChildRun | None]]:
        """(cell, seed, child or None) for every (cell, seed) without a FINISHED child, in spec order."""
        missing = []
        for cell in self.cells:
            for seed in cell.failed_seeds:
                child = self.runs.get(cell.name, {}).get(seed)
                if child is None or child.status != FINISHED:
                    missing.append((cell.name, seed, child))
        return missing

    def evidence(self, candidate: str, baseline: str, metrics: Sequence[str]) -> Evidence:
        """The per-seed values of ``metrics`` for a rule (:mod:`avlm.protocol.rules`): ``candidate`` against
        ``baseline`` (a cell name; empty = no baseline), from their FINISHED children, seeds as strings."""
        from avlm.protocol.rules import Evidence

        def side(cell: str) -> tuple[dict[str, dict[str, float]], list[str]]:
            finished = {seed: c for seed, c in sorted(self.runs.get(cell, {}).items()) if c.status == FINISHED}
            values = {m: {str(s): c.metrics[m] for s, c in finished.items() if m in c.metrics} for m in metrics}
            return values, [c.run_id for c in finished.values()]

        cand_values, cand_ids = side(candidate)
        base_values, base_ids = side(baseline) if baseline else (None, [])
        return Evidence(
            candidate=cand_values,
            baseline=base_values,
            candidate_label=candidate,
            baseline_label=baseline or "baseline",
            candidate_run_ids=cand_ids,
            baseline_run_ids=base_ids,
        )


def representative_children(children: Sequence[ChildRun]) -> dict[str, dict[int, ChildRun]]:
    """cell -> seed -> the child standing for that (cell, seed): its latest FINISHED child, else its latest one."""
    chosen: dict[tuple[str, int], ChildRun] = {}
    for child in sorted(children, key=lambda c: c.start_time):
        key = (child.cell, child.seed)
        current = chosen.get(key)
        if current is None or child.status == FINISHED or current.status != FINISHED:
            chosen[key] = child
    runs: dict[str, dict[int, ChildRun]] = {}
    for (cell, seed), child in chosen.items():
        runs.setdefault(cell, {})[seed] = child
    return runs


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _aggregate(values: Sequence[float], how: str) -> float:
    if not values:
        return math.nan
    return float(np.median(values)) if how == "median" else float(np.mean(values))


def summarize_cells(spec: SweepSpec, runs: Mapping[str, Mapping[int, ChildRun]]) -> list[CellSummary]:
    """Each cell's objective over its seeds, its paired difference to the baseline and the tie-break figures."""
    objective = spec.objective
    summaries = []
    for cell in spec.cell_list():
        children = runs.get(cell.name, {})
        finished = {
            seed: children[seed] for seed in spec.seeds if seed in children and children[seed].status == FINISHED
        }
        values = {
            seed: float(child.metrics[objective.metric])
            for seed, child in finished.items()
            if _finite(child.metrics.get(objective.metric))
        }
        mean, std = mean_std(values.values()) if values else (math.nan, math.nan)
        tie_values = {}
        for tie_break in spec.tie_breaks:
            found = [c.metrics[tie_break.metric] for c in finished.values() if _finite(c.metrics.get(tie_break.metric))]
            if found:
                tie_values[tie_break.metric] = float(np.mean(found))
        aggregate = _aggregate(list(values.values()), objective.aggregate)
        summaries.append(
            CellSummary(
                name=cell.name,
                overrides=dict(cell.overrides),
                values=values,
                mean=mean,
                std=std,
                delta=None,
                p_value=None,
                n=len(values),
                aggregate=aggregate,
                score=aggregate,
                failed_seeds=[seed for seed in spec.seeds if seed not in values],
                tie_values=tie_values,
                run_ids={seed: child.run_id for seed, child in children.items()},
            )
        )
    if objective.baseline:
        baseline = next(s for s in summaries if s.name == objective.baseline)
        for summary in summaries:
            if summary is baseline:
                summary.score = math.nan  # the reference, never a candidate
                continue
            paired = sorted(set(summary.values) & set(baseline.values))
            deltas = [summary.values[s] - baseline.values[s] for s in paired]
            summary.delta = _aggregate(deltas, objective.aggregate) if deltas else None
            summary.score = summary.delta if summary.delta is not None else math.nan
            if len(paired) >= 2:
                result = paired_test(
                    [summary.values[s] for s in paired], [baseline.values[s] for s in paired], objective.test
                )
                summary.p_value = result.p_value
    return summaries


def choose_winner(spec: SweepSpec, cells: Sequence[CellSummary]) -> tuple[str, str]:
    """The winning cell and why: the best score (``objective.mode``), ties within ``objective.tie_tolerance``
    broken by ``tie_breaks`` in order (a cell without a tie-break's figure loses that tie-break), then spec order.

    A cell is eligible when it has a score, is not the baseline, and (``objective.require_all_seeds``) has a
    value for every seed.

    Returns:
        ``(name, reason)``; ``("", reason)`` when no cell is eligible.
    """
    objective = spec.objective
    sign = 1.0 if objective.mode == "max" else -1.0
    figure = f"{objective.aggregate} {'Δ ' if objective.baseline else ''}{objective.metric}"
    if objective.baseline:
        figure += f" vs {objective.baseline}"
    eligible = [
        c
        for c in cells
        if c.name != objective.baseline
        and math.isfinite(c.score)
        and not (objective.require_all_seeds and c.failed_seeds)
    ]
    if not eligible:
        incomplete = [
            f"{c.name} (no value for seed {', '.join(map(str, c.failed_seeds))})" for c in cells if c.failed_seeds
        ]
        detail = f": {'; '.join(incomplete)}" if incomplete else ""
        return "", f"no eligible cell{detail}"
    best = max(sign * c.score for c in eligible)
    tied = [c for c in eligible if sign * c.score >= best - objective.tie_tolerance]
    leader = tied[0] if len(tied) == 1 else None
    reason = f"best {figure} ({objective.mode}): {best * sign:.4f}"
    for tie_break in spec.tie_breaks:
        if len(tied) == 1:
            break
        tb_sign = 1.0 if tie_break.mode == "max" else -1.0
        known = [c for c in tied if _finite(c.tie_values.get(tie_break.metric))]
        if not known:
            continue
        top = max(tb_sign * c.tie_values[tie_break.metric] for c in known)
        names = ", ".join(c.name for c in tied)
        tied = [c for c in known if tb_sign * c.tie_values[tie_break.metric] == top]
        reason += f"; tied ({names}), broken by {tie_break.metric} ({tie_break.mode}): {top * tb_sign:.4f}"
    if leader is None and len(tied) > 1:
        reason += f"; still tied ({', '.join(c.name for c in tied)}), the first in spec order wins"
    return tied[0].name, reason


def _plain(value: Any) -> Any:
    """JSON-ready: non-finite floats become null (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def summary_dict(spec: SweepSpec, result: SweepResult) -> dict[str, Any]:
    """``sweep_summary.json``: the objective, every cell's figures and runs, the winner and what failed."""
    return _plain(
        {
            "name": spec.name,
            "recipe": spec.recipe,
            "spec_sha256": result.spec_sha256,
            "parent_run_id": result.parent_run_id,
            "objective": dataclasses.asdict(spec.objective),
            "tie_breaks": [dataclasses.asdict(t) for t in spec.tie_breaks],
            "seeds": list(spec.seeds),
            "std": "sample standard deviation over seeds (ddof=1)",
            "p_value": f"paired {spec.objective.test} test, two-sided, over the seeds both cells finished",
            "complete": result.complete,
            "winner": result.winner,
            "winner_reason": result.winner_reason,
            "best_overrides": result.best_overrides,
            "cells": [
                {
                    "name": c.name,
                    "overrides": c.overrides,
                    "values": {str(seed): v for seed, v in sorted(c.values.items())},
                    "mean": c.mean,
                    "std": c.std,
                    "n": c.n,
                    "aggregate": c.aggregate,
                    "delta": c.delta,
                    "p_value": c.p_value,
                    "failed_seeds": c.failed_seeds,
                    "tie_values": c.tie_values,
                    "run_ids": {str(seed): run_id for seed, run_id in sorted(c.run_ids.items())},
                }
                for c in result.cells
            ],
            "failed": [
                {
                    "cell": cell,
                    "seed": seed,
                    "status": child.status if child else "NOT RUN",
                    "run_id": child and child.run_id,
                }
                for cell, seed, child in result.failed()
            ],
        }
    )


def _number(value: float | None, digits: int = 4, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def summary_markdown(spec: SweepSpec, result: SweepResult) -> str:
    """``sweep_summary.md``: one row per cell (mean ± std over seeds, Δ vs the baseline, p, n), the winner."""
    objective = spec.objective
    baseline = objective.baseline
    lines = [
        f"# Sweep {spec.name}",
        "",
        f"Objective: {objective.metric} ({objective.mode}), {objective.aggregate} over seeds "
        f"{', '.join(map(str, spec.seeds))}" + (f"; Δ = cell − {baseline}, paired by seed" if baseline else "") + ".",
        f"Spec sha256 `{result.spec_sha256}`, parent run `{result.parent_run_id}`.",
        "",
        f"| cell | overrides | {objective.metric} mean ± std |"
        + (f" Δ vs {baseline} | p ({objective.test}) |" if baseline else "")
        + " n | |",
        "|---|---|---|" + ("---|---|" if baseline else "") + "---|---|",
    ]
    for c in result.cells:
        overrides = ", ".join(f"`{k}={v}`" for k, v in c.overrides.items()) or "—"
        spread = format_mean_std(c.mean, c.std) if c.n else "—"
        note = []
        if c.name == result.winner:
            note.append("**winner**")
        if c.name == baseline:
            note.append("baseline")
        if c.failed_seeds:
            note.append(f"no value: seed {', '.join(map(str, c.failed_seeds))}")
        p_value = "—" if c.p_value is None else f"{c.p_value:.3f}"
        paired = f" {_number(c.delta, signed=True)} | {p_value} |" if baseline else ""
        lines.append(f"| {c.name} | {overrides} | {spread} |{paired} {c.n}/{len(spec.seeds)} | {'; '.join(note)} |")
    lines += ["", f"Winner: {result.winner or 'none'} ({result.winner_reason})."]
    failed = result.failed()
    if failed:
        lines += ["", "Without a FINISHED child:"]
        lines += [
            f"- {cell} seed {seed}: {child.status if child else 'not run'}"
            + (f" (run `{child.run_id}`, log in its `logs/` artifacts)" if child else "")
            for cell, seed, child in failed
        ]
    lines += [
        "",
        "std: sample standard deviation over seeds (ddof=1); p: two-sided, over the seeds both cells finished.",
    ]
    return "\n".join(lines) + "\n"


def build_result(
    spec: SweepSpec, sha: str, parent_run_id: str, children: Sequence[ChildRun], resolved: Sequence[ResolvedCell]
) -> SweepResult:
    """The sweep's result from its children as the tracking store holds them (pure)."""
    runs = representative_children(children)
    cells = summarize_cells(spec, runs)
    winner, reason = choose_winner(spec, cells)
    configs = {r.cell.name: r.config for r in resolved}
    complete = all(
        seed in runs.get(cell.name, {}) and runs[cell.name][seed].status == FINISHED
        for cell in spec.cell_list()
        for seed in spec.seeds
    )
    return SweepResult(
        parent_run_id=parent_run_id,
        spec_sha256=sha,
        cells=cells,
        winner=winner,
        best_config=configs.get(winner, {}),
        runs=runs,
        winner_reason=reason,
        best_overrides=spec.cell_overrides(winner) if winner else {},
        complete=complete,
    )


# ----------------------------------------------------------------------------------------------------------------
# The engine
# ----------------------------------------------------------------------------------------------------------------
class ChildFailed(Exception):
    """A child did not finish (its trial is marked FAIL; the sweep goes on)."""


class _Interrupted(ChildFailed):
    """The sweep was interrupted while this trial ran (its trial is queued again)."""


def run_sweep(spec: SweepSpec, *, workers: int = 1, storage: str = "", parent_run_id: str | None = None) -> SweepResult:
    """Run (or resume) the sweep: every (cell, seed) without a FINISHED child runs, ``workers`` at a time.

    Args:
        spec: the sweep (see :mod:`avlm.protocol.spec`).
        workers: children run at once by this process; other processes (machines) may join with the same spec,
            storage and tracking server.
        storage: Optuna storage URL (``postgresql://...`` across machines); empty = ``optuna.db`` beside the
            MLflow sqlite store (or in the working directory when the tracking store is not a sqlite file).
        parent_run_id: the run to nest the children under and write the summary on (a chain's stage run); None
            = the sweep's existing parent, else ``$MLFLOW_RUN_ID``, else a new run.

    Returns:
        The :class:`SweepResult` as the tracking store holds it when this process is done.

    Raises:
        ConfigError: the spec, a cell's config key or the storage URL is bad (before any run exists), or the
            parent already holds another sweep.
        RunInterrupted / KeyboardInterrupt: SIGTERM or Ctrl-C; the running children are stopped and queued again.
    """
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    resolved = resolve_cells(spec)  # every cell's config loads before anything is created
    engine = _Sweep(spec, resolved, workers=workers, storage=storage, parent_run_id=parent_run_id)
    return engine.run()


def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside the MLflow sqlite file, so a store and the sweep bookkeeping about it move together
    (a test's temp store gets its own); ``optuna.db`` in the working directory for any other store."""
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return prefix + str(Path(tracking_uri[len(prefix) :]).resolve().with_name("optuna.db"))
    return prefix + str(Path("optuna.db").resolve())


def open_storage(url: str) -> optuna.storages.RDBStorage:
    """The sweep's Optuna storage: heartbeats on (a dead worker's trials are failed and queued again after
    :data:`GRACE_PERIOD_S`), sqlite transactions serialized (:func:`serialize_sqlite_transactions`).

    Raises:
        ConfigError: the URL is malformed, its server unreachable or its driver missing.
    """
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    sqlite = url.startswith("sqlite")
    for attempt in range(3):
        try:
            with _experimental_allowed():
                storage = RDBStorage(
                    url,
                    engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                    heartbeat_interval=HEARTBEAT_INTERVAL_S,
                    grace_period=GRACE_PERIOD_S,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
                )
            break
        except Exception as err:  # sqlalchemy: bad URL, unreachable server, missing driver
            # two workers creating a new storage's tables at once collide ("table ... already exists", a duplicate
            # schema version row); the tables exist once the other is done
            racing = any(word in f"{type(err).__name__} {err}" for word in ("IntegrityError", "already exists"))
            if not racing or attempt == 2:
                raise ConfigError(f"sweep storage {_hide_password(url)!r}: {type(err).__name__}: {err}") from err
            time.sleep(1.0)
    if sqlite:
        serialize_sqlite_transactions(storage)
    return storage


def serialize_sqlite_transactions(storage: optuna.storages.RDBStorage) -> None:
    """Make every transaction on a sqlite storage begin IMMEDIATE (take the file's write lock at once).

    sqlite ignores ``SELECT ... FOR UPDATE``, and the driver opens a transaction only at the first write, so
    Optuna's pop of a queued trial (read WAITING, then write RUNNING) is not atomic there: two workers were seen
    to take the same queued trial and run its (cell, seed) twice. With the write lock taken at BEGIN, each of
    Optuna's read-then-write steps is atomic across threads and processes (SQLAlchemy's recipe for pysqlite).
    """
    import sqlalchemy

    engine = storage.engine

    @sqlalchemy.event.listens_for(engine, "connect")
    def _driver_leaves_transactions_to_us(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # pooled connections predate the listeners


def _safe_name(text: str) -> str:
    """``text`` usable in a file name and a run name (cells are named ``key=value,...``)."""
    return re.sub(r"[^A-Za-z0-9_.,=+-]+", "_", text).strip("_") or "cell"


def _metric_key(text: str) -> str:
    """``text`` usable in an MLflow metric key (no ``=`` or ``,``)."""
    return re.sub(r"[^A-Za-z0-9_.\- /]+", "_", text)


@contextlib.contextmanager
def _optuna_quiet() -> Iterator[None]:
    """Optuna's own lines (a traceback per failed trial, a warning per re-proposed grid point) stay out of the
    sweep's log: the sweep logs one line per child itself."""
    import optuna

    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


@contextlib.contextmanager
def _experimental_allowed() -> Iterator[None]:
    """Heartbeats and their retries are "experimental" in Optuna 5 (stable since 2.8); say it once, here."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises :class:`RunInterrupted` in the main thread (as Ctrl-C raises KeyboardInterrupt), so the sweep
    stops its children; elsewhere (a chain's thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise RunInterrupted(signum)

    previous = signal.signal(signal.SIGTERM, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Sweep:
    """One process's part in a sweep (see the module docstring for the protocol)."""

    def __init__(
        self,
        spec: SweepSpec,
        resolved: Sequence[ResolvedCell],
        *,
        workers: int,
        storage: str,
        parent_run_id: str | None,
    ):
        import optuna

        from avlm.tracking import resolve_tracking_uri

        self.spec = spec
        self.resolved = {r.cell.name: r for r in resolved}
        self.cells: list[Cell] = [r.cell for r in resolved]
        self.points = [(cell.name, seed) for cell in self.cells for seed in spec.seeds]
        self.workers = workers
        self.given_parent = parent_run_id
        self.sha = spec_sha256(spec)
        first = resolved[0].config
        self.tracking_uri = absolute_tracking_uri(
            resolve_tracking_uri(first.get("tracking", {}).get("tracking_uri", ""))
        )
        self.output_dir = Path(first.get("output_dir", "outputs"))
        self.runs = SweepRuns(self.tracking_uri)
        launcher_run = os.environ.get("MLFLOW_RUN_ID") or None
        self.launcher_run = launcher_run
        if parent_run_id:
            self.experiment_id = self.runs.experiment_of(parent_run_id)
        elif launcher_run:
            self.experiment_id = self.runs.experiment_of(launcher_run)
        else:
            self.experiment_id = self.runs.experiment_id(spec.experiment or f"avlm-sweep-{spec.name}")
        identity = f"{self.experiment_id}\n{self.sha}\n{parent_run_id or ''}"
        self.key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.study_base = f"avlm-sweep:{spec.name[:200]}:{self.key}"
        self.storage_url = storage or default_storage(self.tracking_uri)
        self.storage = open_storage(self.storage_url)
        self.optuna = optuna
        self.stopping = threading.Event()
        self.processes: dict[int, subprocess.Popen] = {}
        self.lock = threading.Lock()
        self.errors: list[BaseException] = []
        self.deferred: set[tuple[str, int]] = set()
        self.parent = ""
        self.folder = self.output_dir
        self.finished_count = 0

    # -- the process's part, top to bottom --------------------------------------------------------------------------
    def run(self) -> SweepResult:
        with _optuna_quiet():
            self.parent = self._settle_parent()
            self.folder = self.output_dir / "sweeps" / f"{_safe_name(self.spec.name)}-{self.parent[:8]}"
            owned = self._owns_parent_status()
            if owned and self.runs.status(self.parent) != "RUNNING":
                self.runs.set_status(self.parent, "RUNNING")
            try:
                with _sigterm_raises():
                    self._schedule()
            except BaseException as err:  # KILLED on Ctrl-C or SIGTERM (RunInterrupted), FAILED on a fault of ours
                if owned:
                    self.runs.set_status(self.parent, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
                raise
            return self._finish(owned)

    def _schedule(self) -> None:
        """Join the latest attempt if it still has work, else open the next one for what is left to run."""
        attempt = self._latest_attempt()
        pending = self._pending()
        self.finished_count = len(self.points) - len(pending)
        if attempt is not None and not self._over(attempt):
            # a point whose latest try had ended before we came is retried once this attempt is over; a try that
            # fails while we take part waits for the next invocation
            ended_before = {t.number for t in attempt.get_trials(deepcopy=False) if t.state.is_finished()}
            logger.info("sweep %s: joining %s", self.spec.name, attempt.study_name)
            self._work(attempt)
            if not self._over(attempt):
                return  # trials still run on other workers
            pending = self._pending()
            latest = self._latest_claims(attempt)
            retry = {point for point in pending if point in latest and latest[point] in ended_before}
            if not retry:
                return
            self.deferred = pending - retry
            attempt = self._open_attempt(self._attempt_index(attempt) + 1)
        elif pending:
            attempt = self._open_attempt(0 if attempt is None else self._attempt_index(attempt) + 1)
        else:
            logger.info(
                "sweep %s: all %d (cell, seed) runs are FINISHED; nothing to run", self.spec.name, len(self.points)
            )
            return
        logger.info(
            "sweep %s: %d of %d (cell, seed) runs to do, %d worker(s), Optuna study %s in %s",
            self.spec.name, len(pending), len(self.points), self.workers, attempt.study_name,
            _hide_password(self.storage_url),
        )  # fmt: skip
        self._work(attempt)

    def _finish(self, owned: bool) -> SweepResult:
        children = self.runs.children(self.parent, self.sha)
        result = build_result(self.spec, self.sha, self.parent, children, list(self.resolved.values()))
        attempt = self._latest_attempt()
        live = [] if attempt is None else [t for t in attempt.get_trials(deepcopy=False) if not t.state.is_finished()]
        if live:
            logger.info(
                "sweep %s: %d trial(s) still running or queued on other workers; the last one to finish writes the "
                "summary", self.spec.name, len(live),
            )  # fmt: skip
            return result
        self._write_summary(result)
        result.summarized = True
        if owned:
            self.runs.set_status(self.parent, "FINISHED")
        logger.info(
            "sweep %s: summary written on run %s; winner %s (%s)",
            self.spec.name, self.parent, result.winner or "none", result.winner_reason,
        )  # fmt: skip
        return result

    # -- the parent run ------------------------------------------------------------------------------------------
    def _settle_parent(self) -> str:
        """The first process to create the home study settles the parent; the others read it from the study."""
        home_name = self.study_base
        try:
            self.optuna.create_study(study_name=home_name, storage=self.storage)
            first = True
        except self.optuna.exceptions.DuplicatedStudyError:
            first = False
        home = self.optuna.load_study(study_name=home_name, storage=self.storage)
        parent = None if first else self._recorded_parent(home_name)
        if parent is None:
            parent = self._adopt_parent()
            home.set_user_attr("mlflow_parent_run_id", parent)
            home.set_user_attr("spec_sha256", self.sha)
            home.set_user_attr("mlflow_experiment_id", self.experiment_id)
        if self.launcher_run and self.launcher_run != parent:
            # `mlflow run` made a run for this process; it points at the sweep it joined
            self.runs.set_tags(self.launcher_run, {ROLE_TAG: "worker", PARENT_TAG: parent, NAME_TAG: self.spec.name})
        return parent

    def _recorded_parent(self, home_name: str) -> str | None:
        deadline = time.monotonic() + PARENT_WAIT_S
        while True:
            attrs = self.optuna.load_study(study_name=home_name, storage=self.storage).user_attrs
            if attrs.get("mlflow_parent_run_id"):
                return str(attrs["mlflow_parent_run_id"])
            if time.monotonic() > deadline:
                logger.warning("sweep %s: study %s names no parent run; settling it here", self.spec.name, home_name)
                return None
            time.sleep(1.0)

    def _adopt_parent(self) -> str:
        """The parent run, with the spec frozen into it (before any child exists)."""
        parent = self.given_parent or self.runs.find_parent(self.experiment_id, self.key)
        if parent is None:
            parent = self.launcher_run or self.runs.create_run(
                self.experiment_id, f"sweep-{self.spec.name}", {ROLE_TAG: "parent", KEY_TAG: self.key}
            )
        tags = self.runs.tags(parent)
        held = tags.get(SPEC_SHA_TAG)
        if held and held != self.sha:
            raise ConfigError(
                f"run {parent} already holds sweep spec {held[:12]} ({tags.get(NAME_TAG, '?')}); a parent run holds "
                f"one sweep: give this one ({self.spec.name}, {self.sha[:12]}) its own parent run"
            )
        if held != self.sha:
            cells = {r.cell.name: {"overrides": r.cell.overrides, "args": list(r.args)} for r in self.resolved.values()}
            self.runs.log_texts(
                parent,
                {
                    "sweep/spec.yaml": spec_yaml(self.spec),
                    "sweep/base_config.yaml": self.spec.base_config_path().read_text(),
                    "sweep/cells.json": json_text(cells),
                },
            )
        self.runs.set_tags(
            parent,
            {
                ROLE_TAG: "parent",
                KEY_TAG: self.key,
                NAME_TAG: self.spec.name,
                SPEC_SHA_TAG: self.sha,
                "avlm.recipe": self.spec.recipe,
            },
        )
        return parent

    def _owns_parent_status(self) -> bool:
        """The sweep sets its parent's status unless a chain gave it or this process's `mlflow run` made it."""
        return not self.given_parent and self.parent != self.launcher_run

    # -- attempts (one Optuna grid study each) -------------------------------------------------------------------
    def _attempt_name(self, index: int) -> str:
        return f"{self.study_base}:attempt-{index}"

    def _attempt_index(self, study: optuna.Study) -> int:
        return int(study.study_name.rsplit("-", 1)[1])

    def _sampler(self) -> optuna.samplers.GridSampler:
        # The same seed everywhere: it fixes the grid's order, so grid point i is the same (cell, seed) in every
        # process. Its later random picks (among points not started) are reseeded per worker.
        sampler = self.optuna.samplers.GridSampler(
            {"cell": [c.name for c in self.cells], "seed": list(self.spec.seeds)}, seed=0
        )
        sampler.reseed_rng()
        return sampler

    def _load(self, name: str) -> optuna.Study:
        return self.optuna.load_study(study_name=name, storage=self.storage, sampler=self._sampler())

    def _latest_attempt(self) -> optuna.Study | None:
        prefix = f"{self.study_base}:attempt-"
        indices = [
            int(name[len(prefix) :])
            for name in self.optuna.get_all_study_names(self.storage)
            if name.startswith(prefix) and name[len(prefix) :].isdigit()
        ]
        if not indices:
            return None
        study = self._load(self._attempt_name(max(indices)))
        with _experimental_allowed():
            self.optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed, and queued again
        return study

    def _open_attempt(self, index: int) -> optuna.Study:
        direction = "maximize" if self.spec.objective.mode == "max" else "minimize"
        study = self.optuna.create_study(
            study_name=self._attempt_name(index),
            storage=self.storage,
            sampler=self._sampler(),
            direction=direction,
            load_if_exists=True,  # another worker may open the same attempt at the same moment
        )
        study.set_user_attr("mlflow_parent_run_id", self.parent)
        return study

    def _claimed_grid_ids(self, trials: Sequence[optuna.trial.FrozenTrial]) -> set[int]:
        return {
            t.system_attrs["grid_id"]
            for t in trials
            if "grid_id" in t.system_attrs and t.user_attrs.get(_OUTCOME) != "duplicate"
        }

    def _has_work(self, study: optuna.Study) -> bool:
        """A trial is queued, or a grid point has no trial yet."""
        trials = study.get_trials(deepcopy=False)
        waiting = any(t.state == self.optuna.trial.TrialState.WAITING for t in trials)
        return waiting or len(self._claimed_grid_ids(trials)) < len(self.points)

    def _over(self, study: optuna.Study) -> bool:
        """Every grid point was taken, and no trial runs or waits."""
        trials = study.get_trials(deepcopy=False)
        return len(self._claimed_grid_ids(trials)) == len(self.points) and all(t.state.is_finished() for t in trials)

    def _latest_claims(self, study: optuna.Study) -> dict[tuple[str, int], int]:
        """(cell, seed) -> the number of the latest trial that held it in the attempt (a queued copy included)."""
        latest: dict[tuple[str, int], int] = {}
        for t in study.get_trials(deepcopy=False):
            if "cell" in t.params and t.user_attrs.get(_OUTCOME) != "duplicate":
                point = (t.params["cell"], t.params["seed"])
                latest[point] = max(latest.get(point, -1), t.number)
        return latest

    def _pending(self) -> set[tuple[str, int]]:
        """(cell, seed) points without a FINISHED child."""
        done = {(c.cell, c.seed) for c in self.runs.children(self.parent, self.sha) if c.status == FINISHED}
        return set(self.points) - done

    # -- workers ---------------------------------------------------------------------------------------------------
    def _work(self, attempt: optuna.Study) -> None:
        """``workers`` threads take trials of the attempt until it has none left to give."""
        done = [threading.Event() for _ in range(min(self.workers, len(self.points)))]
        for i, event in enumerate(done):
            name = f"avlm-sweep-worker-{i}"
            threading.Thread(target=self._worker, args=(attempt.study_name, event), name=name, daemon=True).start()
        try:
            _wait_for(done)
        except KeyboardInterrupt:
            logger.warning("sweep %s: interrupted; stopping %d running child(ren)", self.spec.name, len(self.processes))
            self.stopping.set()
            with self.lock:
                for process in self.processes.values():
                    with contextlib.suppress(ProcessLookupError):
                        process.terminate()
            _wait_for(done)  # their trials end FAIL and go back in the queue
            raise
        if self.errors:
            raise self.errors[0]

    def _worker(self, study_name: str, done: threading.Event) -> None:
        try:
            study = self._load(study_name)
            while not self.stopping.is_set() and self._has_work(study):
                study.optimize(
                    self._objective, n_trials=1, catch=(ChildFailed,), callbacks=[self._queue_interrupted],
                    gc_after_trial=False,
                )  # fmt: skip
        except BaseException as err:  # a fault of the sweep itself (tracking store, storage): stop starting children
            logger.error("sweep %s: worker stopped by %s: %s", self.spec.name, type(err).__name__, err, exc_info=True)
            self.errors.append(err)
            self.stopping.set()
        finally:
            done.set()

    def _queue_interrupted(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """A trial interrupted by Ctrl-C/SIGTERM goes back in the queue, as a dead worker's trial does."""
        if trial.state == self.optuna.trial.TrialState.FAIL and trial.user_attrs.get(_OUTCOME) == "interrupted":
            from optuna.storages import RetryHeartbeatStaleTrialCallback

            with _experimental_allowed():
                requeue = RetryHeartbeatStaleTrialCallback()
            requeue(study, trial)

    def _frozen(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial:
        return next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)

    def _claim(self, trial: optuna.Trial) -> int | None:
        """None when this trial holds its grid point; else the number of the earlier trial that does.

        The holder of a grid point is the lowest-numbered trial given it (trial numbers are assigned one at a time
        under a lock on the study row, so every lower-numbered trial exists already), together with the copies
        Optuna queues of it when it dies or is interrupted (one at a time: a copy is made only once its original
        has failed).
        """
        frozen = self._frozen(trial)
        grid_id = frozen.system_attrs["grid_id"]
        root = frozen.system_attrs.get("failed_trial", frozen.number)  # a queued copy stands for its original
        deadline = time.monotonic() + _GRID_ID_WAIT_S
        while True:
            earlier = [t for t in trial.study.get_trials(deepcopy=False) if t.number < root]
            holders = [t.number for t in earlier if t.system_attrs.get("grid_id") == grid_id]
            if holders:
                return min(holders)
            # a trial is created first and given its grid point just after (milliseconds): wait for it
            unknown = [t for t in earlier if "grid_id" not in t.system_attrs and not t.state.is_finished()]
            if not unknown or time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def _objective(self, trial: optuna.Trial) -> float:
        cell = trial.suggest_categorical("cell", [c.name for c in self.cells])
        seed = trial.suggest_categorical("seed", list(self.spec.seeds))
        trial.set_user_attr(_OUTCOME, "running")
        if self.stopping.is_set():
            trial.set_user_attr(_OUTCOME, "interrupted")
            raise _Interrupted("the sweep is stopping")
        holder = self._claim(trial)
        if holder is not None:
            trial.set_user_attr(_OUTCOME, "duplicate")
            raise self.optuna.TrialPruned(f"grid point held by trial {holder}")
        children = [c for c in self.runs.children(self.parent, self.sha) if (c.cell, c.seed) == (cell, seed)]
        finished = [c for c in children if c.status == FINISHED]
        if finished:
            trial.set_user_attr(_OUTCOME, "reused")
            trial.set_user_attr(_RUN_ID_ATTR, finished[-1].run_id)
            return self._objective_value(finished[-1])
        if (cell, seed) in self.deferred:
            trial.set_user_attr(_OUTCOME, "deferred")
            raise self.optuna.TrialPruned("failed during this invocation; the next re-run retries it")
        child = self._run_child(trial, cell, seed, stale=[c for c in children if c.status == "RUNNING"])
        return self._objective_value(child)

    def _objective_value(self, child: ChildRun) -> float:
        value = child.metrics.get(self.spec.objective.metric)
        if not _finite(value):
            raise ChildFailed(f"run {child.run_id} is FINISHED but logged no finite {self.spec.objective.metric}")
        return float(value)

    def _child_command(self, cell: str, seed: int, run_name: str) -> list[str]:
        """The recipe run of (cell, seed): the MLproject command's form, with the cell's overrides."""
        spec = self.spec
        accelerate = spec.accelerate_config_path()
        return [
            sys.executable, "-m", "avlm.launch", "--num_processes", str(spec.num_processes),
            "--accelerate_config", str(accelerate) if accelerate else "", "--",
            str(REPO_ROOT / "entrypoints" / f"{spec.recipe}.py"), "--config", str(spec.base_config_path()),
            f"tracking.run_name={run_name}", *self.resolved[cell].args, f"seed={seed}",
            *([] if spec.register else ["registry.register=false"]),
        ]  # fmt: skip

    def _run_child(self, trial: optuna.Trial, cell: str, seed: int, stale: Sequence[ChildRun]) -> ChildRun:
        """Create the child run, run the recipe in a subprocess attached to it, and return the child as stored."""
        spec = self.spec
        run_name = f"{spec.name}-{_safe_name(cell)}-seed{seed}"
        child_id = self.runs.create_child(
            self.parent,
            run_name=run_name,
            tags={
                NAME_TAG: spec.name,
                SPEC_SHA_TAG: self.sha,
                CELL_TAG: cell,
                SEED_TAG: str(seed),
                "avlm.recipe": spec.recipe,
            },
        )
        trial.set_user_attr(_RUN_ID_ATTR, child_id)
        for old in stale:  # its trial is gone (we hold the grid point): a dead worker's child
            self.runs.set_tags(old.run_id, {SUPERSEDED_TAG: child_id})
            self.runs.set_status(old.run_id, "KILLED")
        command = self._child_command(cell, seed, run_name)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
        env.update(
            MLFLOW_RUN_ID=child_id, MLFLOW_TRACKING_URI=self.tracking_uri, MLFLOW_EXPERIMENT_ID=self.experiment_id
        )
        # children (each of num_processes processes) that each take every core for torch's threads run slower
        # together than one by one
        processes = min(self.workers, len(self.points)) * spec.num_processes
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        log_path = self.folder / "children" / f"{_safe_name(cell)}_seed{seed}_{child_id[:8]}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        logger.info("sweep %s: %s seed %d: started (run %s, log %s)", spec.name, cell, seed, child_id, log_path)
        start = time.monotonic()
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            with self.lock:
                self.processes[process.pid] = process
            if self.stopping.is_set():  # interrupted while it started
                process.terminate()
            try:
                returncode = process.wait()
            finally:
                with self.lock:
                    self.processes.pop(process.pid, None)
        interrupted = self.stopping.is_set() or returncode in _INTERRUPTED_EXIT
        if returncode != 0 and self.runs.status(child_id) == "RUNNING":
            # the recipe stopped before its tracked run existed (or could close it); exit 0 with the run still
            # RUNNING means its writes wait in its outbox for `avlm tracking replay`, so that one is left alone
            self.runs.set_status(child_id, "KILLED" if interrupted else "FAILED")
        with contextlib.suppress(Exception):  # the log is for diagnosis; losing its upload loses nothing else
            self.runs.log_file(child_id, log_path, "logs")
        child = self.runs.child(child_id)
        seconds = time.monotonic() - start
        if child.status == FINISHED:  # its metrics are complete, whatever the process did after closing it
            if returncode != 0:
                logger.warning(
                    "sweep %s: %s seed %d: run FINISHED, but exit status %d", spec.name, cell, seed, returncode
                )
            trial.set_user_attr(_OUTCOME, "ran")
            with self.lock:
                self.finished_count += 1
                done = self.finished_count
            value = child.metrics.get(spec.objective.metric)
            logger.info(
                "sweep %s: [%d/%d] %s seed %d: FINISHED, %s = %s (run %s, %.0f s)",
                spec.name, done, len(self.points), cell, seed, spec.objective.metric,
                "missing" if value is None else f"{value:.4f}", child_id, seconds,
            )  # fmt: skip
            return child
        if interrupted:
            trial.set_user_attr(_OUTCOME, "interrupted")
            logger.warning(
                "sweep %s: %s seed %d: interrupted (run %s %s)", spec.name, cell, seed, child_id, child.status
            )
            raise _Interrupted(f"{cell} seed {seed} interrupted")
        trial.set_user_attr(_OUTCOME, "failed")
        tail = "\n    ".join(_tail(log_path, _LOG_TAIL_LINES))
        logger.warning(
            "sweep %s: %s seed %d: %s, exit status %d after %.0f s (run %s); the sweep goes on. Log %s ends:\n    %s",
            spec.name, cell, seed, child.status, returncode, seconds, child_id, log_path, tail,
        )  # fmt: skip
        raise ChildFailed(f"{cell} seed {seed}: {child.status} (exit status {returncode})")

    # -- the summary -----------------------------------------------------------------------------------------------
    def _write_summary(self, result: SweepResult) -> None:
        spec = self.spec
        files = {
            "sweep_summary.json": json_text(summary_dict(spec, result)),
            "sweep_summary.md": summary_markdown(spec, result),
            "best_config.json": json_text(result.best_config),
        }
        failed = result.failed()
        tags = {
            WINNER_TAG: result.winner,
            "avlm.sweep.winner_reason": result.winner_reason,
            "avlm.sweep.complete": str(result.complete).lower(),
            "avlm.sweep.failed": str(len(failed)),
        }
        metrics: dict[str, float] = {}
        for cell in result.cells:
            for figure in ("mean", "std", "delta", "p_value"):
                value = getattr(cell, figure)
                if _finite(value):
                    metrics[f"cell/{_metric_key(cell.name)}/{figure}"] = value
            metrics[f"cell/{_metric_key(cell.name)}/n"] = cell.n
        child_tags = {
            child.run_id: {IS_WINNER_TAG: str(cell == result.winner and child.status == FINISHED).lower()}
            for cell, seeds in result.runs.items()
            for child in seeds.values()
        }
        self.runs.log_summary(self.parent, files=files, tags=tags, metrics=metrics, child_tags=child_tags)


def _wait_for(done: Sequence[threading.Event]) -> None:
    """Wait until every worker has set its event, interruptible by Ctrl-C and SIGTERM.

    Not ``Thread.join`` (nor ``is_alive``): in CPython before 3.13, a signal handler that raises while they wait on
    the thread's state lock makes the thread look finished while it still runs (the interrupted waiter releases the
    lock the running thread holds, bpo-45274's handling), so the sweep would exit under a worker that is still
    queueing its interrupted trial.
    """
    while not all(event.is_set() for event in done):
        time.sleep(0.2)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    # progress bars rewrite one line with carriage returns: keep the last state of each line
    return [line.rsplit("\r", 1)[-1] for line in text.splitlines()[-lines:]]


def _hide_password(url: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]+@", r"\1***@", url)


def summary_lines(spec: SweepSpec, result: SweepResult) -> list[str]:
    """What the entry point prints: the parent run, each cell's figures, the winner, what did not finish."""
    lines = [f"Sweep {spec.name}: parent run {result.parent_run_id} (spec {result.spec_sha256[:12]})"]
    for c in result.cells:
        figures = format_mean_std(c.mean, c.std) if c.n else "no value"
        delta = f", Δ {_number(c.delta, signed=True)}" if c.delta is not None else ""
        p_value = f", p {c.p_value:.3f}" if c.p_value is not None else ""
        lines.append(f"  {c.name}: {spec.objective.metric} {figures} (n={c.n}){delta}{p_value}")
    lines.append(f"Winner: {result.winner or 'none'} ({result.winner_reason})")
    failed = result.failed()
    if failed:
        lines.append(
            f"Without a FINISHED child ({len(failed)}): "
            + ", ".join(f"{cell} seed {seed} ({child.status if child else 'not run'})" for cell, seed, child in failed)
            + "; re-run the same command to retry them"
        )
    return lines
