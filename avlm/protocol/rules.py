"""Decision rules declared before the runs they judge, evaluated by code on per-seed evidence.

A rule is a conjunction of conditions over named figures of one metric each, declared in a config or spec::

    rule:
      name: quick-test
      conditions:
        - {figure: delta, metric: test/mAP, op: ">=", threshold: 0.018}    # mean paired (candidate - baseline)
        - {figure: p_value, metric: test/mAP, test: wilcoxon, alternative: greater, op: "<=", threshold: 0.2}
        - {figure: not_worse, metric: diag/fallback_frac, mode: min, tolerance: 0.0}
        - {figure: value, metric: test/mAP, op: ">=", threshold: 0.5}      # candidate mean over its seeds

Figures:

- ``value``: the candidate's mean over its seeds (no baseline needed).
- ``delta``: the mean over paired seeds of ``sign * (candidate - baseline)``, ``sign`` = +1 for ``mode: max``
  and -1 for ``mode: min``, so a positive delta always means "candidate better".
- ``p_value``: the p-value of :func:`avlm.stats.paired_test` (``test``, ``alternative``) on the paired seeds,
  with both sides multiplied by ``sign`` first, so that ``alternative: greater`` always reads "candidate better".
- ``not_worse``: a diagnostic that must not get worse: ``sign * mean(candidate - baseline) >= -tolerance`` over
  the paired seeds (``op`` and ``threshold`` do not apply).

Seeds pair by key: evidence holds ``metric -> seed -> value`` for each side (a single run is the one seed
``"best"``); only seeds present on both sides pair, and the outcome lists them. A condition never raises on bad
evidence: a missing metric, no baseline, no seed in common, too few pairs for a test or a non-finite value make it
fail with the reason, so a rule's outcome is always a record that can be written down.

The rule's identity is :func:`rule_sha256` of its canonical JSON (:func:`rule_to_dict`: every field a figure uses,
defaults included, nothing else), so a rule declared with or without its defaults has one hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any, Literal

from avlm.config import config_from_dict
from avlm.errors import ConfigError

FIGURES = ("value", "delta", "p_value", "not_worse")
OPS = (">", ">=", "<", "<=")
ALTERNATIVES = ("two-sided", "greater", "less")
NO_BASELINE = "no baseline"

# The keys each figure reads; any other key declared on a condition is a mistake (e.g. a tolerance on a p-value).
_FIGURE_KEYS = {
    "value": ("figure", "metric", "op", "threshold"),
    "delta": ("figure", "metric", "op", "threshold", "mode"),
    "p_value": ("figure", "metric", "op", "threshold", "mode", "test", "alternative"),
    "not_worse": ("figure", "metric", "mode", "tolerance"),
}
_COMPARE = {">": float.__gt__, ">=": float.__ge__, "<": float.__lt__, "<=": float.__le__}


@dataclasses.dataclass
class Condition:
    """One condition of a rule (see the module docstring for each figure).

    Attributes:
        figure: value | delta | p_value | not_worse.
        metric: the metric the figure is computed on, e.g. ``test/mAP``.
        op: how the figure compares with ``threshold`` (not used by ``not_worse``).
        threshold: the bound the figure is compared with.
        mode: max (higher is better) or min; orients ``delta``, ``p_value`` and ``not_worse``.
        test: ``p_value`` only: one of :data:`avlm.stats.PAIRED_TESTS`.
        alternative: ``p_value`` only, as seen from ``mode`` ("greater" = candidate better).
        tolerance: ``not_worse`` only: how much worse than the baseline's mean still counts as not worse (>= 0).
    """

    figure: Literal["value", "delta", "p_value", "not_worse"]
    metric: str
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float = 0.0
    mode: Literal["max", "min"] = "max"
    test: str = "wilcoxon"
    alternative: str = "greater"
    tolerance: float = 0.0

    def __post_init__(self) -> None:
        if self.figure not in FIGURES:
            raise ConfigError(f"condition figure {self.figure!r} is not one of {', '.join(FIGURES)}")
        if not self.metric.strip():
            raise ConfigError("a condition needs a metric")
        if self.op not in OPS:
            raise ConfigError(f"condition op {self.op!r} is not one of {', '.join(OPS)}")
        if self.mode not in ("max", "min"):
            raise ConfigError(f"condition mode {self.mode!r} is not one of max, min")
        from avlm import stats  # here, not at the top: scipy and sklearn are seconds the registry CLI does not need

        if self.test not in stats.PAIRED_TESTS:
            raise ConfigError(f"condition test {self.test!r} is not one of {', '.join(stats.PAIRED_TESTS)}")
        if self.alternative not in ALTERNATIVES:
            raise ConfigError(f"condition alternative {self.alternative!r} is not one of {', '.join(ALTERNATIVES)}")
        for key in ("threshold", "tolerance"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"condition {key} must be a finite number, got {value!r}")
            setattr(self, key, float(value))
        if self.tolerance < 0:
            raise ConfigError(f"condition tolerance must be >= 0, got {self.tolerance:g}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        stray = [k for k in defaults if k not in _FIGURE_KEYS[self.figure] and getattr(self, k) != defaults[k]]
        if stray:
            raise ConfigError(f"condition key {stray[0]!r} does not apply to figure {self.figure!r}")

    @property
    def sign(self) -> float:
        return 1.0 if self.mode == "max" else -1.0

    def describe(self) -> str:
        """The condition in words, e.g. ``mean Δ test/mAP >= 0.018``."""
        lower = " (lower is better)" if self.mode == "min" else ""
        if self.figure == "value":
            return f"mean {self.metric} {self.op} {self.threshold:g}"
        if self.figure == "delta":
            return f"mean Δ {self.metric}{lower} {self.op} {self.threshold:g}"
        if self.figure == "p_value":
            return f"{self.test} p ({self.alternative}) on {self.metric}{lower} {self.op} {self.threshold:g}"
        return f"{self.metric} not worse than baseline ({self.mode}, tolerance {self.tolerance:g})"


@dataclasses.dataclass
class Rule:
    """A conjunction of conditions; passes when every condition passes.

    Attributes:
        conditions: at least one condition.
        name: a label for records and reports (part of the rule's hash).
    """

    conditions: list[Condition]
    name: str = ""

    def __post_init__(self) -> None:
        if not self.conditions:
            raise ConfigError("a rule needs at least one condition (an empty rule would pass anything)")


def rule_from_dict(values: Mapping[str, Any], where: str) -> Rule:
    """Build and validate a rule from its declaration (the mapping under a ``rule:`` key).

    Args:
        values: ``{"conditions": [...], "name": ...}``.
        where: where the declaration came from (a file and key), named in every error.

    Raises:
        ConfigError: naming ``where`` and the bad key (unknown key, a key the figure does not use, a wrong value).
    """
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where}: a rule must be a mapping with 'conditions', got {values!r}")
    conditions = values.get("conditions")
    if isinstance(conditions, list):
        for i, condition in enumerate(conditions):
            figure = condition.get("figure") if isinstance(condition, Mapping) else None
            if figure in _FIGURE_KEYS:
                stray = [k for k in condition if k not in _FIGURE_KEYS[figure]]
                if stray:
                    raise ConfigError(
                        f"{where}: config key 'conditions[{i}].{stray[0]}' does not apply to figure {figure!r} "
                        f"(its keys: {', '.join(_FIGURE_KEYS[figure])})"
                    )
    try:
        return config_from_dict(Rule, values)
    except ConfigError as err:
        # A condition's own check (__post_init__) does not know its index; the config layer does.
        key = getattr(err, "key", "")
        at = f" (config key '{key}')" if key and f"'{key}" not in str(err) else ""
        raise ConfigError(f"{where}: {err}{at}") from err


def rule_to_dict(rule: Rule) -> dict[str, Any]:
    """The rule's canonical form: its name and, per condition, exactly the keys its figure uses."""
    return {
        "name": rule.name,
        "conditions": [{k: getattr(c, k) for k in _FIGURE_KEYS[c.figure]} for c in rule.conditions],
    }


def rule_sha256(rule: Rule) -> str:
    """SHA-256 of the rule's canonical JSON (sorted keys, no spaces): its identity in records."""
    text = json.dumps(rule_to_dict(rule), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def margin_rule(metric: str, mode: str, margin: float) -> Rule:
    """The recipes' gate as a rule: the candidate beats the baseline (the champion) on ``metric`` by more than
    ``margin``."""
    return Rule([Condition("delta", metric, ">", margin, mode)], name="margin")


@dataclasses.dataclass
class Evidence:
    """What a rule is evaluated on.

    Attributes:
        candidate: metric -> seed (str) -> value; a single run is the one seed ``"best"``.
        baseline: same shape; None = nothing to compare with.
        candidate_label: who the candidate is (a cell name, a model version), for reasons and records.
        baseline_label: who the baseline is.
        candidate_run_ids: the runs the candidate's values come from.
        baseline_run_ids: the runs the baseline's values come from.
    """

    candidate: dict[str, dict[str, float]]
    baseline: dict[str, dict[str, float]] | None
    candidate_label: str = "candidate"
    baseline_label: str = "baseline"
    candidate_run_ids: list[str] = dataclasses.field(default_factory=list)
    baseline_run_ids: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (values as floats, seeds as strings)."""
        return {
            "candidate": _plain_values(self.candidate),
            "baseline": None if self.baseline is None else _plain_values(self.baseline),
            "candidate_label": self.candidate_label,
            "baseline_label": self.baseline_label,
            "candidate_run_ids": list(self.candidate_run_ids),
            "baseline_run_ids": list(self.baseline_run_ids),
        }


@dataclasses.dataclass
class ConditionOutcome:
    """One condition's verdict.

    Attributes:
        condition: the condition in words (:meth:`Condition.describe`).
        passed: whether it holds.
        value: the figure (a mean, a delta, a p-value); None when it could not be computed.
        n: how many values it was computed on (the candidate's seeds for ``value``, pairs otherwise).
        seeds: those seeds.
        detail: the figure's inputs: per-seed values of each side, means, and for a test its name, alternative,
            statistic and p-value.
        reason: why it passed or failed, e.g. ``0.021 >= 0.018 (n=3)``, ``no baseline``.
    """

    condition: str
    passed: bool
    value: float | None
    n: int
    seeds: list[str]
    detail: dict[str, Any]
    reason: str = ""


@dataclasses.dataclass
class RuleOutcome:
    """A rule's verdict on some evidence.

    Attributes:
        passed: every condition passed.
        reason: one line: what passed, or which conditions failed and why.
        conditions: each condition's verdict, in the rule's order.
        rule_sha256: the hash of the rule that was evaluated.
    """

    passed: bool
    reason: str
    conditions: list[ConditionOutcome]
    rule_sha256: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (non-finite floats become null), for tags and artifacts."""
        return _json_ready(dataclasses.asdict(self))


def evaluate_rule(rule: Rule, evidence: Evidence) -> RuleOutcome:
    """Evaluate every condition of ``rule`` on ``evidence`` (see the module docstring); never raises on bad
    evidence, which fails the condition it concerns instead."""
    outcomes = [_evaluate_condition(c, evidence) for c in rule.conditions]
    passed = all(o.passed for o in outcomes)
    if passed:
        reason = "passed: " + "; ".join(f"{o.condition}: {o.reason}" for o in outcomes)
    else:
        reason = "failed: " + "; ".join(f"{o.condition}: {o.reason}" for o in outcomes if not o.passed)
    return RuleOutcome(passed=passed, reason=reason, conditions=outcomes, rule_sha256=rule_sha256(rule))


def _evaluate_condition(condition: Condition, evidence: Evidence) -> ConditionOutcome:
    text = condition.describe()

    def failed(reason: str, seeds: list[str] | None = None, **detail: Any) -> ConditionOutcome:
        return ConditionOutcome(text, False, None, len(seeds or []), seeds or [], detail, reason)

    candidate = _side_values(evidence.candidate, condition.metric)
    if candidate is None:
        return failed(f"no {condition.metric} on the candidate ({evidence.candidate_label})")
    bad = _non_finite(candidate)
    if condition.figure == "value":
        seeds = _sorted_seeds(candidate)
        if bad:
            return failed(f"non-finite candidate {condition.metric} at seed {bad}", seeds, candidate=candidate)
        value = _mean(candidate[s] for s in seeds)
        return _compare(condition, text, value, seeds, {"candidate": candidate, "candidate_mean": value})

    if evidence.baseline is None:
        return failed(NO_BASELINE, candidate=candidate)
    baseline = _side_values(evidence.baseline, condition.metric)
    if baseline is None:
        return failed(f"no {condition.metric} on the baseline ({evidence.baseline_label})", candidate=candidate)
    seeds = _sorted_seeds({s: v for s, v in candidate.items() if s in baseline})
    detail: dict[str, Any] = {
        "candidate": {s: candidate[s] for s in seeds},
        "baseline": {s: baseline[s] for s in seeds},
        "unpaired_seeds": {
            "candidate": _sorted_seeds({s: 0 for s in candidate if s not in baseline}),
            "baseline": _sorted_seeds({s: 0 for s in baseline if s not in candidate}),
        },
    }
    if not seeds:
        return failed(
            f"no seed in common (candidate: {', '.join(_sorted_seeds(candidate))}; "
            f"baseline: {', '.join(_sorted_seeds(baseline))})",
            **detail,
        )
    bad = _non_finite({s: candidate[s] for s in seeds}) or _non_finite({s: baseline[s] for s in seeds})
    if bad:
        return failed(f"non-finite {condition.metric} at seed {bad}", seeds, **detail)
    cand = [candidate[s] for s in seeds]
    base = [baseline[s] for s in seeds]
    detail["candidate_mean"], detail["baseline_mean"] = _mean(cand), _mean(base)
    gain = _mean(condition.sign * (c - b) for c, b in zip(cand, base, strict=True))
    detail["mean_delta"] = gain

    if condition.figure == "delta":
        return _compare(condition, text, gain, seeds, detail)
    if condition.figure == "not_worse":
        passed = gain >= -condition.tolerance
        relation = "not worse" if passed else "worse"
        reason = f"{relation}: Δ {gain:.6g}, tolerance {condition.tolerance:g} (n={len(seeds)})"
        return ConditionOutcome(text, passed, gain, len(seeds), seeds, detail, reason)
    from avlm import stats

    try:
        result = stats.paired_test(
            [condition.sign * v for v in cand],
            [condition.sign * v for v in base],
            test=condition.test,
            alternative=condition.alternative,
        )
    except ValueError as err:  # too few pairs, mostly: the test cannot speak, so the condition does not hold
        return failed(f"{condition.test} test not computable on n={len(seeds)}: {err}", seeds, **detail)
    detail.update(
        test=result.test,
        alternative=result.alternative,
        statistic=float(result.statistic),
        p=float(result.p_value),
        exact=bool(result.exact),
        oriented="values multiplied by -1 (mode min)" if condition.mode == "min" else "as measured (mode max)",
    )
    return _compare(condition, text, float(result.p_value), seeds, detail)


def _compare(condition: Condition, text: str, value: float, seeds: list[str], detail: dict) -> ConditionOutcome:
    if not math.isfinite(value):
        return ConditionOutcome(text, False, None, len(seeds), seeds, detail, f"figure is {value}")
    passed = _COMPARE[condition.op](float(value), condition.threshold)
    relation = condition.op if passed else f"is not {condition.op}"
    reason = f"{value:.6g} {relation} {condition.threshold:g} (n={len(seeds)})"
    return ConditionOutcome(text, passed, float(value), len(seeds), seeds, detail, reason)


def _side_values(side: Mapping[str, Mapping[str, float]], metric: str) -> dict[str, float] | None:
    values = side.get(metric)
    if not values:
        return None
    return {str(seed): float(value) for seed, value in values.items()}


def _non_finite(values: Mapping[str, float]) -> str:
    return next((s for s, v in values.items() if not math.isfinite(v)), "")


def _sorted_seeds(values: Mapping[str, Any]) -> list[str]:
    """Seeds in natural order (2 before 10; names like "best" after the numbers)."""
    return sorted(values, key=lambda s: (0, int(s), "") if s.lstrip("-").isdigit() else (1, 0, s))


def _mean(values: Any) -> float:
    values = list(values)
    return math.fsum(values) / len(values)


def _plain_values(side: Mapping[str, Mapping[Any, Any]]) -> dict[str, dict[str, float]]:
    return {metric: {str(s): float(v) for s, v in values.items()} for metric, values in side.items()}


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) or hasattr(value, "item"):
        number = value.item() if hasattr(value, "item") else value
        return number if isinstance(number, int) or math.isfinite(number) else None
    return str(value)
