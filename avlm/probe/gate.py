"""The probe's PASS/FAIL gate, declared before anything runs, and the tables the report shows.

The grid is pooling × optimizer × seed; each cell trains one probe on frozen features of the pretrained backbone
and one on those of its random-init copy. The gate asks one question: on a configuration chosen without looking
at the test split, does pretraining beat random init by at least ``required_delta`` on average over seeds?
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Literal

from avlm.errors import ConfigError
from avlm.probe.sanity import SanityResult
from avlm.stats import format_mean_std, mean_std

# Float round-off must not decide the gate: 0.57 - 0.56 is 0.00999…98 in binary, yet it meets a 0.01 requirement.
_ROUND_OFF = 1e-12


@dataclasses.dataclass
class GateConfig:
    """Attributes:
    required_delta: the least mean over seeds of (pretrained − random) that passes, in metric units.
    metric: the metric the cells hold (``CellResult.pre_val`` etc.); only mAP is produced by the probe recipe.
    select_on: split on which the gate configuration (pooling, optimizer) is chosen; always val, so that a test
        split stays held out.
    evaluate_on: split whose numbers the gate compares with ``required_delta``. ``test`` gives an unbiased figure
        and needs test numbers in every cell of the chosen configuration; ``val`` reuses the selection split, so
        the delta is the best of the grid and optimistic.
    """

    required_delta: float = 0.01
    metric: Literal["mAP"] = "mAP"
    select_on: Literal["val"] = "val"
    evaluate_on: Literal["val", "test"] = "val"

    def __post_init__(self) -> None:
        if not math.isfinite(self.required_delta):
            raise ConfigError(f"config key 'gate.required_delta' must be a finite number, got {self.required_delta}")
        if self.metric != "mAP":
            raise ConfigError(f"config key 'gate.metric' must be 'mAP', got {self.metric!r}")
        if self.select_on != "val":
            raise ConfigError(
                f"config key 'gate.select_on' must be 'val', got {self.select_on!r}: "
                "selecting on test would leave no held-out number"
            )
        if self.evaluate_on not in ("val", "test"):
            raise ConfigError(f"config key 'gate.evaluate_on' must be 'val' or 'test', got {self.evaluate_on!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CellResult:
    """Results of one grid cell and seed: a probe on pretrained features and one on random-init features.

    Keyword-only: nine numbers in a row are too easy to pass in the wrong order.

    Attributes:
        pooling / optimizer: the cell's configuration.
        seed: the seed of both probes (and of the split, if the recipe resamples it).
        pre_val / rand_val: val mAP of the pretrained / random-init probe.
        pre_test / rand_test: test mAP, or None where the recipe has no test split.
        pre_best_f1 / rand_best_f1: val best F1 (``avlm.stats.best_f1``) of the two probes.
    """

    pooling: str
    optimizer: str
    seed: int
    pre_val: float
    rand_val: float
    pre_test: float | None = None
    rand_test: float | None = None
    pre_best_f1: float
    rand_best_f1: float


@dataclasses.dataclass(frozen=True)
class GateDecision:
    """The gate's verdict and the figures it rests on.

    Attributes:
        passed: every sanity check passed and ``delta_mean >= required_delta``.
        gate_pooling / gate_optimizer: the configuration chosen on ``selected_on``.
        pre_mean / pre_std, rand_mean / rand_std: pretrained and random-init metric over seeds on ``evaluated_on``
            (mean, sample std with ddof=1).
        delta_mean / delta_std: the same for the per-seed paired difference pretrained − random.
        required_delta: the declared threshold.
        reasons: one line per consideration, in the order the report shows them.
        metric: the metric name (mAP).
        selected_on: split the configuration was chosen on (val).
        evaluated_on: split the figures above are from.
        seeds: the seeds averaged over.
        sanity_passed: whether every sanity check passed (and at least one ran).
    """

    passed: bool
    gate_pooling: str
    gate_optimizer: str
    pre_mean: float
    pre_std: float
    rand_mean: float
    rand_std: float
    delta_mean: float
    delta_std: float
    required_delta: float
    reasons: list[str]
    metric: str = "mAP"
    selected_on: str = "val"
    evaluated_on: str = "val"
    seeds: list[int] = dataclasses.field(default_factory=list)
    sanity_passed: bool = False


@dataclasses.dataclass(frozen=True)
class AblationRow:
    """One configuration of the grid summarised over seeds, on one split.

    Attributes:
        pooling / optimizer: the configuration.
        split: the split the numbers are from (val or test).
        seeds: how many seeds were averaged.
        pre_mean / pre_std, rand_mean / rand_std, delta_mean / delta_std: mean and sample std (ddof=1) over seeds of
            the pretrained metric, the random-init metric and their per-seed difference.
    """

    pooling: str
    optimizer: str
    split: str
    seeds: int
    pre_mean: float
    pre_std: float
    rand_mean: float
    rand_std: float
    delta_mean: float
    delta_std: float


@dataclasses.dataclass(frozen=True)
class RunRow:
    """One cell and seed as the report's Run Metrics table shows it (``*_test`` are None without a test split)."""

    pooling: str
    optimizer: str
    seed: int
    pre_val: float
    rand_val: float
    delta_val: float
    pre_test: float | None
    rand_test: float | None
    delta_test: float | None
    pre_best_f1: float
    rand_best_f1: float


def _configurations(cells: Sequence[CellResult]) -> dict[tuple[str, str], list[CellResult]]:
    """Cells grouped by (pooling, optimizer) in grid order (first appearance), each group sorted by seed.

    Raises:
        ValueError: no cells, a (pooling, optimizer, seed) twice, or configurations with different seed sets.
    """
    if not cells:
        raise ValueError("no probe cells: the grid is empty")
    groups: dict[tuple[str, str], list[CellResult]] = {}
    for cell in cells:
        groups.setdefault((cell.pooling, cell.optimizer), []).append(cell)
    reference_seeds = None
    for (pooling, optimizer), group in groups.items():
        seeds = [c.seed for c in group]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"pooling={pooling} optimizer={optimizer}: a seed appears twice in {sorted(seeds)}")
        # Configurations compared on different seeds would differ by seed luck, not by configuration.
        if reference_seeds is None:
            reference_seeds = sorted(seeds)
        elif sorted(seeds) != reference_seeds:
            raise ValueError(
                f"pooling={pooling} optimizer={optimizer} has seeds {sorted(seeds)}, the first configuration "
                f"{reference_seeds}: every configuration needs the same seeds"
            )
        group.sort(key=lambda c: c.seed)
    return groups


def _split_values(group: Sequence[CellResult], split: str) -> tuple[list[float], list[float], list[float]]:
    """Pretrained values, random-init values and their paired differences of one configuration on ``split``."""
    pre = [getattr(c, f"pre_{split}") for c in group]
    rand = [getattr(c, f"rand_{split}") for c in group]
    missing = [c.seed for c, p, r in zip(group, pre, rand, strict=True) if p is None or r is None]
    if missing:
        raise ValueError(
            f"pooling={group[0].pooling} optimizer={group[0].optimizer}: seeds {missing} have no {split} numbers"
        )
    return pre, rand, [p - r for p, r in zip(pre, rand, strict=True)]


def _summarise(group: Sequence[CellResult], split: str) -> AblationRow:
    pre, rand, delta = _split_values(group, split)
    (pre_mean, pre_std), (rand_mean, rand_std), (delta_mean, delta_std) = mean_std(pre), mean_std(rand), mean_std(delta)
    return AblationRow(
        pooling=group[0].pooling,
        optimizer=group[0].optimizer,
        split=split,
        seeds=len(group),
        pre_mean=pre_mean,
        pre_std=pre_std,
        rand_mean=rand_mean,
        rand_std=rand_std,
        delta_mean=delta_mean,
        delta_std=delta_std,
    )


def ablation_table(cells: Sequence[CellResult], split: Literal["val", "test"] = "val") -> list[AblationRow]:
    """Each configuration's pretrained, random-init and delta metric, mean and std over seeds, in grid order.

    Args:
        cells: every cell and seed of the grid, in grid order (the order configurations first appear is kept).
        split: which split's numbers to summarise; the gate's selection uses val.

    Returns:
        One row per (pooling, optimizer).

    Raises:
        ValueError: an incomplete grid (see ``decide``), or ``split="test"`` with cells lacking test numbers.
    """
    return [_summarise(group, split) for group in _configurations(cells).values()]


def run_table(cells: Sequence[CellResult]) -> list[RunRow]:
    """The per-seed rows of the report's Run Metrics table: configurations in grid order, seeds ascending."""
    rows = []
    for group in _configurations(cells).values():
        for cell in group:
            has_test = cell.pre_test is not None and cell.rand_test is not None
            rows.append(
                RunRow(
                    pooling=cell.pooling,
                    optimizer=cell.optimizer,
                    seed=cell.seed,
                    pre_val=cell.pre_val,
                    rand_val=cell.rand_val,
                    delta_val=cell.pre_val - cell.rand_val,
                    pre_test=cell.pre_test,
                    rand_test=cell.rand_test,
                    delta_test=cell.pre_test - cell.rand_test if has_test else None,
                    pre_best_f1=cell.pre_best_f1,
                    rand_best_f1=cell.rand_best_f1,
                )
            )
    return rows


def decide(cells: Sequence[CellResult], sanity_results: Sequence[SanityResult], gate: GateConfig) -> GateDecision:
    """Apply the declared gate to the grid's results.

    The rule:

    1. Selection, on val only: the gate configuration is the (pooling, optimizer) with the largest mean over seeds
       of val (pretrained − random); on a tie (within float round-off) the first in grid order, i.e. the order in
       which configurations first appear in ``cells``. Test numbers are never looked at here.
    2. Evaluation, on ``gate.evaluate_on``: for that configuration, the mean over seeds of the paired per-seed
       difference pretrained − random, compared with ``gate.required_delta`` (``>=``, within float round-off).
    3. PASS iff at least one sanity check ran, every sanity check passed, and step 2 holds. A failed sanity check
       fails the gate whatever the delta: the numbers it would rest on are not trustworthy.

    The figures in the decision (means, sample stds with ddof=1) are all from ``evaluated_on``; the val delta that
    chose the configuration is stated in the reasons.

    Args:
        cells: every cell and seed of the grid, in grid order.
        sanity_results: the sanity suite's results.
        gate: the configuration declared before the run.

    Returns:
        The decision with its figures and reasons.

    Raises:
        ValueError: the grid is empty or incomplete (a configuration without every seed, a duplicate cell), or the
            gate is evaluated on test and the chosen configuration lacks test numbers.
    """
    groups = _configurations(cells)
    selection_rows = [_summarise(group, gate.select_on) for group in groups.values()]
    finite_rows = [row for row in selection_rows if math.isfinite(row.delta_mean)]
    # A NaN delta (a split without positives) is never chosen; if every one is NaN the gate fails on the first.
    chosen = finite_rows[0] if finite_rows else selection_rows[0]
    for row in finite_rows[1:]:
        if row.delta_mean > chosen.delta_mean + _ROUND_OFF:
            chosen = row
    group = groups[(chosen.pooling, chosen.optimizer)]
    evaluated = _summarise(group, gate.evaluate_on)
    seeds = [c.seed for c in group]

    failed_checks = [r for r in sanity_results if not r.passed]
    sanity_passed = bool(sanity_results) and not failed_checks
    delta_met = math.isfinite(evaluated.delta_mean) and evaluated.delta_mean >= gate.required_delta - _ROUND_OFF
    passed = sanity_passed and delta_met

    metric, split = gate.metric, gate.evaluate_on
    reasons = []
    if not sanity_results:
        reasons.append("No sanity check ran: the gate cannot pass without the sanity suite.")
    elif failed_checks:
        names = ", ".join(f"{r.name} ({r.message})" for r in failed_checks)
        reasons.append(f"Sanity check(s) failed: {names}. The gate fails whatever the delta.")
    else:
        reasons.append(f"All {len(sanity_results)} sanity checks passed.")
    if not finite_rows:
        reasons.append(f"No configuration has a finite mean {gate.select_on} delta (a split without positives?).")
    reasons.append(
        f"Gate configuration pooling={chosen.pooling}, optimizer={chosen.optimizer}: the largest mean "
        f"{gate.select_on} delta {chosen.delta_mean:.4f} of {len(groups)} configuration(s), seeds {seeds}."
    )
    if split == gate.select_on and len(groups) > 1:
        reasons.append(
            f"Evaluated on {split}, the split it was selected on: the delta is the best of {len(groups)} and "
            "optimistic; a held-out test split (gate.evaluate_on=test) gives an unbiased figure."
        )
    relation = ">=" if delta_met else "<"
    verdict = "met" if delta_met else "not met"
    reasons.append(
        f"Pretrained − random {split} {metric} over seeds {seeds}: delta mean {evaluated.delta_mean:.6f} {relation} "
        f"required {gate.required_delta:.6f} ({verdict})."
    )
    reasons.append(
        f"Gate delta mean±std = {format_mean_std(evaluated.delta_mean, evaluated.delta_std)}, pretrained {metric} "
        f"mean±std = {format_mean_std(evaluated.pre_mean, evaluated.pre_std)}, random {metric} mean±std = "
        f"{format_mean_std(evaluated.rand_mean, evaluated.rand_std)} ({split}, sample std over seeds)."
    )
    return GateDecision(
        passed=passed,
        gate_pooling=chosen.pooling,
        gate_optimizer=chosen.optimizer,
        pre_mean=evaluated.pre_mean,
        pre_std=evaluated.pre_std,
        rand_mean=evaluated.rand_mean,
        rand_std=evaluated.rand_std,
        delta_mean=evaluated.delta_mean,
        delta_std=evaluated.delta_std,
        required_delta=gate.required_delta,
        reasons=reasons,
        metric=metric,
        selected_on=gate.select_on,
        evaluated_on=split,
        seeds=seeds,
        sanity_passed=sanity_passed,
    )
