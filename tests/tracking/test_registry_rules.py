"""The promotion gate as a declared rule: evidence on the version (tags and JSON), an append-only trail."""

import json
import warnings

import mlflow
import pytest
from mlflow import MlflowClient
from test_registry import add_version, stage

from avlm.errors import TrainingError
from avlm.protocol import rules
from avlm.protocol.rules import Evidence, evaluate_rule, rule_from_dict, rule_sha256
from avlm.tracking.registry import (
    METRIC_VALUE_TAG,
    PromotionRefused,
    RegistryConfig,
    current_champion,
    decision_history,
    promote_if_better,
    promote_with_rule,
)

BASE = [0.50, 0.52, 0.49, 0.51, 0.50, 0.53, 0.48, 0.50, 0.52, 0.51]
SIGNIFICANT = rule_from_dict(
    {
        "name": "full-test",
        "conditions": [
            {"figure": "delta", "metric": "test/mAP", "op": ">=", "threshold": 0.005},
            {"figure": "p_value", "metric": "test/mAP", "test": "wilcoxon", "op": "<=", "threshold": 0.05},
        ],
    },
    "test",
)


def sweep_evidence(deltas):
    """Per-seed values of a candidate and a baseline cell, as a sweep's children would give them."""
    seeds = [str(s) for s in range(len(deltas))]
    return Evidence(
        candidate={"test/mAP": {s: b + d for s, b, d in zip(seeds, BASE, deltas, strict=True)}},
        baseline={"test/mAP": dict(zip(seeds, BASE, strict=True))},
        candidate_label="anchored",
        baseline_label="uniform",
        candidate_run_ids=[f"cand{s}" for s in seeds],
        baseline_run_ids=[f"base{s}" for s in seeds],
    )


def tags_of(name, version):
    return MlflowClient().get_model_version(name, version).tags


def test_a_p_value_rule_promotes_on_significant_evidence_and_writes_it_as_tags_and_json(mlflow_store, tmp_path):
    name = "rule-gate"
    v1, run1 = add_version(name, 0.5)
    ev = sweep_evidence([0.01 + 0.001 * i for i in range(10)])
    decision = promote_with_rule(name, v1, SIGNIFICANT, ev)
    assert decision.promoted and decision.decision == "promoted" and decision.index == 1
    assert str(current_champion(name).version) == v1 and stage(name, v1) == "Production"

    tags = tags_of(name, v1)
    assert tags["promotion.latest"] == "1" and tags["promotion.1.decision"] == "promoted"
    assert tags["promotion.1.passed"] == "true" and tags["promotion.1.kind"] == "gate"
    assert tags["promotion.1.rule_sha256"] == rule_sha256(SIGNIFICANT)
    assert json.loads(tags["promotion.1.rule"]) == rules.rule_to_dict(SIGNIFICANT)
    values = json.loads(tags["promotion.1.values"])
    assert values["candidate"]["test/mAP"]["9"] == pytest.approx(BASE[9] + 0.019)
    assert values["baseline"]["test/mAP"]["0"] == BASE[0] and values["baseline_label"] == "uniform"
    p_condition = json.loads(tags["promotion.1.condition.1"])
    assert p_condition["test"] == "wilcoxon" and p_condition["n"] == 10 and p_condition["passed"]
    assert p_condition["p"] == pytest.approx(1 / 1024) and p_condition["seeds"] == [str(s) for s in range(10)]
    assert tags["promotion.1.candidate_run_ids"] == ",".join(f"cand{s}" for s in range(10))
    assert tags["promotion.1.baseline_run_ids"].startswith("base0,base1")
    assert tags["promotion.decision"] == "promoted"  # the flat tags recipes read: the latest decision

    # The JSON copy in the version's run holds the same record with the full outcome.
    assert tags["promotion.1.artifact"] == f"runs:/{run1}/promotion/v{v1}/decision_1.json"
    path = mlflow.artifacts.download_artifacts(tags["promotion.1.artifact"], dst_path=str(tmp_path))
    document = json.loads(open(path).read())
    assert document["rule_sha256"] == rule_sha256(SIGNIFICANT) and document["decision"] == "promoted"
    assert document["outcome"] == evaluate_rule(SIGNIFICANT, ev).to_dict()
    assert document["evidence"]["candidate_run_ids"] == ev.candidate_run_ids


def test_a_p_value_rule_refuses_on_noise_and_records_why(mlflow_store):
    name = "rule-gate"
    v1, _ = add_version(name, 0.5)
    promote_if_better(RegistryConfig(name=name), v1)
    v2, _ = add_version(name, 0.6)
    noisy = sweep_evidence([0.03, -0.02, 0.01, -0.01, 0.02, -0.03, 0.01, -0.02, 0.02, 0.0])
    decision = promote_with_rule(name, v2, SIGNIFICANT, noisy)
    assert not decision.promoted and decision.decision == "rejected"
    assert str(current_champion(name).version) == v1 and stage(name, v2) == "None"
    tags = tags_of(name, v2)
    assert tags["promotion.1.decision"] == "rejected" and tags["promotion.1.passed"] == "false"
    assert tags["promotion.1.champion_before"] == v1
    assert "wilcoxon p (greater) on test/mAP <= 0.05" in tags["promotion.1.reason"]
    assert not json.loads(tags["promotion.1.condition.1"])["passed"]


def test_a_second_gate_call_keeps_the_first_decision(mlflow_store):
    cfg = RegistryConfig(name="trail")
    v1, _ = add_version(cfg.name, 0.5)
    assert promote_if_better(cfg, v1).promoted
    again = promote_if_better(cfg, v1)  # re-running the gate on the champion
    assert not again.promoted and again.decision == "kept" and again.reason == "already champion"
    tags = tags_of(cfg.name, v1)
    assert tags["promotion.1.decision"] == "promoted" and tags["promotion.1.reason"] == "no current champion"
    assert tags["promotion.2.decision"] == "kept" and tags["promotion.latest"] == "2"
    assert int(tags["promotion.2.seq"]) > int(tags["promotion.1.seq"])
    history = decision_history(cfg.name, v1)
    assert [(r.index, r.decision) for r in history] == [(1, "promoted"), (2, "kept")]
    assert str(current_champion(cfg.name).version) == v1


def test_decisions_from_before_the_series_are_kept_as_record_zero(mlflow_store):
    name = "legacy"
    v1, run1 = add_version(name, 0.5)
    client = MlflowClient()
    old = {"promotion.decision": "promoted", "promotion.reason": "no current champion", "promotion.metric": "val/mAP",
           "promotion.mode": "max", "promotion.margin": "0.0", "promotion.candidate_value": "0.5",
           "promotion.champion_version": "none", "promotion.champion_value": "none",
           "promotion.compared_run_ids": run1, "promotion.by": "someone@host",
           "promotion.at": "2024-01-01T00:00:00+00:00"}  # fmt: skip
    for key, value in old.items():
        client.set_model_version_tag(name, v1, key, value)
    client.set_registered_model_alias(name, "champion", v1)
    promote_if_better(RegistryConfig(name=name), v1)
    history = decision_history(name, v1)
    assert [(r.index, r.decision, r.by) for r in history][0] == (0, "promoted", "someone@host")
    assert history[1].decision == "kept" and tags_of(name, v1)["promotion.0.reason"] == "no current champion"


@pytest.mark.parametrize("whose", ["candidate", "champion"])
def test_a_version_without_the_metric_tag_gets_an_error_naming_model_version_and_tag(mlflow_store, whose):
    cfg = RegistryConfig(name="untagged")
    v1, _ = add_version(cfg.name, 0.5)
    promote_if_better(cfg, v1)
    v2, _ = add_version(cfg.name, 0.6)
    bare = v2 if whose == "candidate" else v1
    MlflowClient().delete_model_version_tag(cfg.name, bare, METRIC_VALUE_TAG)
    expected = f"registered model 'untagged' version {bare} has no tag 'avlm.metric_value'"
    with pytest.raises(TrainingError, match=expected):
        promote_if_better(cfg, v2)
    assert str(current_champion(cfg.name).version) == v1


def test_the_rule_is_frozen_on_the_version_before_it_is_evaluated(mlflow_store, monkeypatch):
    name = "frozen"
    v1, _ = add_version(name, 0.5)

    def crash(rule, evidence):
        raise RuntimeError("promoter died mid-evaluation")

    monkeypatch.setattr("avlm.tracking.registry.evaluate_rule", crash)
    with pytest.raises(RuntimeError):
        promote_with_rule(name, v1, SIGNIFICANT, sweep_evidence([0.01] * 10))
    tags = tags_of(name, v1)
    assert tags["promotion.1.decision"] == "evaluating" and tags["promotion.1.rule_sha256"] == rule_sha256(SIGNIFICANT)
    assert current_champion(name) is None


def test_a_rule_said_to_be_frozen_in_a_run_must_be_there(mlflow_store):
    name = "chained"
    v1, _ = add_version(name, 0.5)
    with mlflow.start_run() as stage_run:
        mlflow.set_tag("chain/full/rule_sha256", rule_sha256(SIGNIFICANT))
    with mlflow.start_run() as other_run:
        pass
    ev = sweep_evidence([0.01 + 0.001 * i for i in range(10)])
    with pytest.raises(PromotionRefused, match=f"not frozen in run {other_run.info.run_id}"):
        promote_with_rule(name, v1, SIGNIFICANT, ev, frozen_by_run_id=other_run.info.run_id)
    assert "promotion.latest" not in tags_of(name, v1)
    assert promote_with_rule(name, v1, SIGNIFICANT, ev, frozen_by_run_id=stage_run.info.run_id).promoted
    assert tags_of(name, v1)["promotion.1.rule_frozen_in"] == stage_run.info.run_id


def test_an_unknown_version_is_a_clear_error(mlflow_store):
    add_version("known", 0.5)
    with warnings.catch_warnings(), pytest.raises(Exception, match="registered model 'known' has no version 7"):
        promote_with_rule("known", 7, SIGNIFICANT, sweep_evidence([0.01] * 10))
