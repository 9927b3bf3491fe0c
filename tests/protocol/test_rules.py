"""Declared rules on constructed per-seed evidence: every figure, every op, and evidence that is not there."""

import json
import math

import pytest

from avlm import stats
from avlm.errors import ConfigError
from avlm.protocol.rules import (
    Condition,
    Evidence,
    Rule,
    evaluate_rule,
    margin_rule,
    rule_from_dict,
    rule_sha256,
    rule_to_dict,
)

SEEDS = [str(s) for s in range(10)]
BASE = [0.50, 0.52, 0.49, 0.51, 0.50, 0.53, 0.48, 0.50, 0.52, 0.51]


def by_seed(values, seeds=SEEDS):
    return dict(zip(seeds, values, strict=True))


def evidence(candidate, baseline=BASE, metric="test/mAP", **kwargs):
    return Evidence(
        candidate={metric: by_seed(candidate)},
        baseline=None if baseline is None else {metric: by_seed(baseline)},
        **kwargs,
    )


def one(condition, ev):
    outcome = evaluate_rule(Rule([condition]), ev)
    assert outcome.passed == outcome.conditions[0].passed
    return outcome.conditions[0]


def test_value_is_the_candidate_mean_over_its_seeds_and_needs_no_baseline():
    cand = [0.6, 0.7, 0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]
    result = one(Condition("value", "test/mAP", ">=", 0.6), evidence(cand, baseline=None))
    assert result.passed and result.value == pytest.approx(0.6) and result.n == 10 and result.seeds == SEEDS
    assert not one(Condition("value", "test/mAP", ">", 0.6), evidence(cand, baseline=None)).passed


@pytest.mark.parametrize(
    ("op", "threshold", "passed"),
    [(">", 0.125, False), (">=", 0.125, True), ("<", 0.125, False), ("<=", 0.125, True), (">", 0.1, True),
     ("<", 0.2, True)],
)  # fmt: skip
def test_every_op_compares_the_figure_with_the_threshold_and_the_boundary_is_exact(op, threshold, passed):
    ev = Evidence({"m": {"0": 0.75, "1": 0.25}}, {"m": {"0": 0.5, "1": 0.25}})  # mean Δ 0.125, exact in binary
    result = one(Condition("delta", "m", op, threshold), ev)
    assert result.value == 0.125 and result.passed is passed


def test_delta_is_the_mean_paired_difference_oriented_by_mode():
    cand = [b + 0.02 for b in BASE]
    up = one(Condition("delta", "test/mAP", ">=", 0.019), evidence(cand))
    assert up.passed and up.value == pytest.approx(0.02) and up.n == 10
    assert up.detail["candidate_mean"] == pytest.approx(sum(cand) / 10)
    # For a loss lower is better: the same numbers are a regression of 0.02.
    down = one(Condition("delta", "test/mAP", ">", 0.0, mode="min"), evidence(cand))
    assert not down.passed and down.value == pytest.approx(-0.02)
    assert "lower is better" in down.condition


def test_a_p_value_threshold_promotes_on_consistent_gains_and_refuses_on_noise():
    consistent = [b + 0.01 + 0.001 * i for i, b in enumerate(BASE)]
    noisy = [b + d for b, d in zip(BASE, [0.03, -0.02, 0.01, -0.01, 0.02, -0.03, 0.01, -0.02, 0.02, 0.0], strict=True)]
    condition = Condition("p_value", "test/mAP", "<=", 0.05, test="wilcoxon", alternative="greater")
    passed = one(condition, evidence(consistent))
    assert passed.passed and passed.value == pytest.approx(1 / 1024)  # exact: all 10 signed ranks positive
    reference = stats.paired_test(noisy, BASE, test="wilcoxon", alternative="greater")
    refused = one(condition, evidence(noisy))
    assert not refused.passed and refused.value == pytest.approx(reference.p_value) and refused.value > 0.05
    assert refused.detail["test"] == "wilcoxon" and refused.detail["alternative"] == "greater"
    assert refused.detail["p"] == refused.value and refused.n == 10


@pytest.mark.parametrize("test", stats.PAIRED_TESTS)
def test_each_declared_test_is_the_one_run(test):
    cand = [b + 0.01 + 0.002 * (i % 3) for i, b in enumerate(BASE)]
    result = one(Condition("p_value", "test/mAP", "<=", 0.05, test=test), evidence(cand))
    reference = stats.paired_test(cand, BASE, test=test, alternative="greater")
    assert result.detail["test"] == test and result.value == pytest.approx(reference.p_value)
    assert result.detail["statistic"] == pytest.approx(reference.statistic)


def test_p_value_alternative_is_seen_from_the_mode():
    """mode min: "greater" means the candidate is lower; the test runs on negated values."""
    lower = [b - 0.01 - 0.001 * i for i, b in enumerate(BASE)]
    condition = Condition("p_value", "test/mAP", "<=", 0.05, mode="min", test="wilcoxon", alternative="greater")
    assert one(condition, evidence(lower)).passed
    higher = [b + 0.01 + 0.001 * i for i, b in enumerate(BASE)]
    assert not one(condition, evidence(higher)).passed


def test_not_worse_allows_the_declared_tolerance_and_no_more():
    base = [0.10] * 10
    slightly = [0.11] * 10  # fallback fraction up by 0.01: worse for mode min
    declared = {"figure": "not_worse", "metric": "diag/fallback_frac", "mode": "min"}
    strict = rule_from_dict({"conditions": [declared]}, "test")
    tolerant = rule_from_dict({"conditions": [{**declared, "tolerance": 0.02}]}, "test")
    ev = evidence(slightly, base, metric="diag/fallback_frac")
    assert not evaluate_rule(strict, ev).passed
    assert evaluate_rule(tolerant, ev).passed
    assert evaluate_rule(strict, evidence(base, base, metric="diag/fallback_frac")).passed  # equal is not worse


def test_a_missing_metric_fails_naming_the_metric_and_the_side_that_lacks_it():
    ev = Evidence(
        candidate={"test/mAP": by_seed(BASE)},
        baseline={"val/mAP": by_seed(BASE)},
        candidate_label="cell anchored",
        baseline_label="cell uniform",
    )
    on_candidate = one(Condition("value", "test/AP_C1", ">", 0.0), ev)
    assert not on_candidate.passed and on_candidate.reason == "no test/AP_C1 on the candidate (cell anchored)"
    on_baseline = one(Condition("delta", "test/mAP"), ev)
    assert not on_baseline.passed and on_baseline.reason == "no test/mAP on the baseline (cell uniform)"
    assert on_baseline.value is None


@pytest.mark.parametrize("figure", ["delta", "p_value", "not_worse"])
def test_a_figure_that_needs_a_baseline_fails_without_one(figure):
    result = one(Condition(figure, "test/mAP", op="<=" if figure == "p_value" else ">"), evidence(BASE, None))
    assert not result.passed and result.reason == "no baseline"


def test_seeds_pair_by_key_and_unpaired_ones_are_listed():
    ev = Evidence({"m": {"0": 0.6, "1": 0.6, "2": 0.7}}, {"m": {"1": 0.5, "2": 0.5, "3": 0.5}})
    result = one(Condition("delta", "m"), ev)
    assert result.seeds == ["1", "2"] and result.value == pytest.approx(0.15)
    assert result.detail["unpaired_seeds"] == {"candidate": ["0"], "baseline": ["3"]}
    disjoint = one(Condition("delta", "m"), Evidence({"m": {"0": 1.0}}, {"m": {"1": 0.0}}))
    assert not disjoint.passed and "no seed in common" in disjoint.reason


def test_a_test_on_too_few_pairs_fails_with_its_reason_instead_of_raising():
    result = one(Condition("p_value", "m", "<=", 0.5), Evidence({"m": {"best": 0.6}}, {"m": {"best": 0.5}}))
    assert not result.passed and "not computable on n=1" in result.reason


def test_a_non_finite_value_fails_the_condition():
    result = one(Condition("delta", "m"), Evidence({"m": {"0": math.nan, "1": 0.7}}, {"m": {"0": 0.5, "1": 0.5}}))
    assert not result.passed and "non-finite" in result.reason and "seed 0" in result.reason


def test_a_rule_is_a_conjunction_and_its_outcome_is_json_ready():
    rule = rule_from_dict(
        {
            "name": "quick",
            "conditions": [
                {"figure": "delta", "metric": "test/mAP", "op": ">=", "threshold": 0.018},
                {"figure": "value", "metric": "test/mAP", "op": ">=", "threshold": 0.9},
            ],
        },
        "chain.yaml stage quick",
    )
    outcome = evaluate_rule(rule, evidence([b + 0.02 for b in BASE]))
    assert [c.passed for c in outcome.conditions] == [True, False] and not outcome.passed
    assert outcome.reason.startswith("failed: mean test/mAP >= 0.9")
    assert outcome.rule_sha256 == rule_sha256(rule)
    document = outcome.to_dict()
    assert json.loads(json.dumps(document, allow_nan=False)) == document
    assert document["conditions"][0]["detail"]["candidate"]["3"] == pytest.approx(0.53)


def test_the_hash_is_of_the_canonical_rule_whether_defaults_are_written_or_not():
    short = rule_from_dict({"conditions": [{"figure": "p_value", "metric": "m", "op": "<=", "threshold": 0.2}]}, "a")
    spelled = rule_from_dict(
        {"conditions": [{"figure": "p_value", "metric": "m", "op": "<=", "threshold": 0.2, "mode": "max",
                         "test": "wilcoxon", "alternative": "greater"}]},
        "b",
    )  # fmt: skip
    assert rule_sha256(short) == rule_sha256(spelled)
    assert rule_from_dict(rule_to_dict(short), "round trip") == short
    stricter = rule_from_dict({"conditions": [{"figure": "p_value", "metric": "m", "op": "<=", "threshold": 0.1}]}, "c")
    assert rule_sha256(stricter) != rule_sha256(short)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ({"conditions": []}, "at least one condition"),
        ({"conditions": [{"figure": "delta", "metric": "m"}], "nmae": "x"}, "unknown config key 'nmae'"),
        ({"conditions": [{"figure": "delta", "metric": "m", "op": "=="}]}, "'conditions[0].op'"),
        ({"conditions": [{"figure": "median", "metric": "m"}]}, "'conditions[0].figure'"),
        ({"conditions": [{"figure": "value", "metric": "m", "tolerance": 0.1}]}, "'conditions[0].tolerance' does not"),
        ({"conditions": [{"figure": "p_value", "metric": "m", "test": "mannwhitney"}]}, "not one of ttest"),
        ({"conditions": [{"figure": "not_worse", "metric": "m", "tolerance": -1}]}, "tolerance must be >= 0"),
        ({"conditions": [{"figure": "delta", "metric": "m", "threshold": "high"}]}, "expected a number"),
    ],
)
def test_a_bad_declaration_names_where_and_the_key(declared, message):
    with pytest.raises(ConfigError, match="^chains/x.yaml stage quick: ") as err:
        rule_from_dict(declared, "chains/x.yaml stage quick")
    assert message in str(err.value)


def test_margin_rule_is_the_recipes_gate_strictly_above_the_margin():
    rule = margin_rule("val/mAP", "max", 0.01)
    assert rule.conditions == [Condition("delta", "val/mAP", ">", 0.01, "max")]
    beats = Evidence({"val/mAP": {"best": 0.52}}, {"val/mAP": {"best": 0.50}})
    short = Evidence({"val/mAP": {"best": 0.505}}, {"val/mAP": {"best": 0.50}})
    assert evaluate_rule(rule, beats).passed and not evaluate_rule(rule, short).passed
    assert evaluate_rule(
        margin_rule("val/loss", "min", 0.0), Evidence({"val/loss": {"best": 0.2}}, {"val/loss": {"best": 0.3}})
    ).passed
