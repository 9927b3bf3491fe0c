"""Chain specs (validation, each stage as a sweep, the idea's hash), the stop rule and decision records: pure, no
MLflow, no training."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import yaml

from avlm.errors import ConfigError
from avlm.protocol.chain import (
    StageDecision,
    StopRule,
    StopRuleRefused,
    Winner,
    chain_sha256,
    chain_spec_from_dict,
    check_stop_rule,
    decision_records,
    load_chain_spec,
    stage_sweep_spec,
)
from avlm.protocol.rules import Evidence, evaluate_rule, rule_from_dict
from avlm.tracking.chain_runs import ChainRunRecord

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "chains" / "cvs_demo.yaml"


def demo_values():
    return yaml.safe_load(DEMO.read_text())


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "chains").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_example_chain_loads_and_opens_with_its_command(path):
    assert path.read_text().startswith("# mlflow run . -e chain ")
    load_chain_spec(path)


def test_the_demo_parses_and_each_stage_is_a_sweep_of_its_candidates_and_the_baseline():
    spec = load_chain_spec(DEMO)
    assert [s.name for s in spec.stages] == ["val_sweep", "quick_test", "full_test"]
    val = stage_sweep_spec(spec, spec.stages[0], {})
    assert [c.name for c in val.cell_list()] == ["model.head_dropout=0.0", "model.head_dropout=0.3", "baseline"]
    assert val.seeds == [0, 1, 2] and val.objective.baseline == "baseline" and val.objective.metric == "best/val/mAP"
    assert val.register is False and val.overrides["train.epochs"] == 2 and "model.head_dropout" not in val.overrides
    assert [(t.metric, t.mode) for t in val.tie_breaks] == [("val/loss", "min")]

    winners = {"val_sweep": Winner("model.head_dropout=0.3", {"model.head_dropout": 0.3})}
    full = stage_sweep_spec(spec, spec.stages[2], winners)
    assert [(c.name, c.overrides) for c in full.cell_list()] == [
        ("model.head_dropout=0.3", {"model.head_dropout": 0.3}),
        ("baseline", {}),
    ]
    assert full.seeds == list(range(10)) and full.objective.metric == "final/test_mAP"
    assert full.objective.baseline == "baseline" and full.name == "cvs-demo-head-dropout.full_test"
    assert spec.stages[1].rule.conditions[1].figure == "p_value" and spec.stages[0].rule is None


def with_change(change):
    values = demo_values()
    change(values)
    return values


def set_key(path, value):
    def change(values):
        node = values
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value

    return change


def drop_key(path):
    def change(values):
        node = values
        for part in path[:-1]:
            node = node[part]
        del node[path[-1]]

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (set_key(["stagez"], []), "unknown config key 'stagez'"),
        (set_key(["stages", 1, "rul"], {}), "unknown config key 'stages[1].rul'"),
        (set_key(["stages", 1, "winner"], "full_test"), "winner 'full_test' is not an earlier stage"),
        (set_key(["stages", 0, "winner"], "val_sweep"), "give its candidates as exactly one of grid, cells or winner"),
        (drop_key(["stages", 0, "grid"]), "stage 'val_sweep': give its candidates as exactly one of"),
        (drop_key(["stages", 2, "rule"]), "stage 'full_test' (the last) needs a rule"),
        (set_key(["stages", 2, "name"], "quick_test"), "stage name 'quick_test' is used twice"),
        (set_key(["stages", 2, "name"], "full test"), "stage name 'full test' is not a name"),
        (set_key(["stages", 1, "seeds"], [0, 1, 1]), "seeds [0, 1, 1] repeat a seed"),
        (set_key(["stages", 1, "seeds"], [0, -1]), "a seed must be >= 0"),
        (set_key(["stages", 1, "rule", "conditions", 0, "tolerance"], 0.1), "'conditions[0].tolerance' does not apply"),
        (set_key(["stages", 1, "rule", "conditions"], []), "stage 'quick_test' rule: a rule needs at least one"),
        (set_key(["objective", "baseline"], "uniform"), "'objective.baseline': 'uniform' is not the baseline cell"),
        (drop_key(["objective"]), "config key 'objective' must be a mapping with a metric"),
        (set_key(["stop_rule"], {"push": "p"}), "set both push and max_ideas"),
        (set_key(["stop_rule", "push"], "c0003 'x'"), "'stop_rule.push'"),
        (set_key(["stages", 0, "grid"], {"model.head_dropout": 0.1}), "expected a non-empty list of values"),
        (set_key(["stages", 1, "objective"], {"metric": "m", "mode": "best"}), "'objective.mode': expected one of"),
        (set_key(["stages", 0, "grid"], None), "give its candidates as exactly one of"),
        (set_key(["stages", 0, "budget"], {"max_cells": 2}), "3 cells"),
        (set_key(["overrides", "seed"], 3), "the sweep sets seed on every child itself"),
        (set_key(["num_processes"], 0), "'num_processes' must be >= 1"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_a_bad_spec_is_refused_naming_the_key_and_the_file(change, message):
    with pytest.raises(ConfigError) as raised:
        chain_spec_from_dict(with_change(change), "my_chain.yaml")
    assert message in str(raised.value) and "my_chain.yaml" in str(raised.value), str(raised.value)


def test_a_cell_named_like_the_baseline_is_refused():
    values = with_change(set_key(["stages", 0], {"name": "s", "seeds": [0], "cells": [{"name": "baseline"}]}))
    with pytest.raises(ConfigError, match="a cell is named like the baseline 'baseline'"):
        chain_spec_from_dict(values, "x.yaml")


def test_a_missing_or_malformed_file_is_refused_naming_it(tmp_path):
    with pytest.raises(ConfigError, match="chain spec not found"):
        load_chain_spec(tmp_path / "none.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping"):
        load_chain_spec(tmp_path / "list.yaml")


def test_the_idea_hash_ignores_the_stop_rule_and_rule_defaults_and_follows_what_is_run(tmp_path):
    base = chain_sha256(chain_spec_from_dict(demo_values(), "a.yaml"))
    assert chain_sha256(chain_spec_from_dict(demo_values(), "elsewhere/b.yaml")) == base  # the file is not the idea
    assert chain_sha256(chain_spec_from_dict(with_change(set_key(["stop_rule", "max_ideas"], 5)), "a")) == base
    explicit = with_change(set_key(["stages", 1, "rule", "conditions", 2, "tolerance"], 0.0))
    explicit["stages"][2]["rule"]["conditions"][0]["mode"] = "max"  # a default, spelt out
    assert chain_sha256(chain_spec_from_dict(explicit, "a")) == base
    stricter = with_change(set_key(["stages", 1, "rule", "conditions", 0, "threshold"], 0.02))
    assert chain_sha256(chain_spec_from_dict(stricter, "a")) != base
    more_seeds = with_change(set_key(["stages", 1, "seeds"], [0, 1, 2, 3]))
    assert chain_sha256(chain_spec_from_dict(more_seeds, "a")) != base
    # the base config's bytes are part of the idea, as they are of a sweep's identity
    config = tmp_path / "demo.yaml"
    shutil.copyfile(REPO / "examples/cvs/demo.yaml", config)
    copied = chain_sha256(chain_spec_from_dict(with_change(set_key(["base_config"], str(config))), "a"))
    config.write_text(config.read_text().replace("patience: 8", "patience: 9"))
    assert chain_sha256(chain_spec_from_dict(with_change(set_key(["base_config"], str(config))), "a")) != copied


def record(run_id, sha, **kwargs):
    fields = dict(run_name=f"chain-{run_id}", experiment="avlm-chain-x", status="FINISHED", outcome="stopped")
    fields.update(kwargs)
    return ChainRunRecord(run_id=run_id, chain_sha256=sha, deleted=False, start_time=0, **fields)


def test_the_stop_rule_refuses_the_idea_past_the_cap_and_counts_a_rerun_once():
    rule = StopRule(push="c0003", max_ideas=2)
    tried = [record("r1", "a" * 64), record("r2", "a" * 64, status="FAILED", outcome="failed")]
    check_stop_rule(rule, "b" * 64, tried)  # idea 2 of 2: allowed
    tried.append(record("r3", "b" * 64))
    check_stop_rule(rule, "a" * 64, tried)  # a re-run of idea 1: the same idea, allowed
    check_stop_rule(rule, "b" * 64, tried)
    with pytest.raises(StopRuleRefused) as refused:
        check_stop_rule(rule, "c" * 64, tried)
    message = str(refused.value)
    assert "push 'c0003' may try 2 ideas and has tried 2" in message and "would be idea 3" in message
    assert all(f"run {r}" in message for r in ("r1", "r2", "r3")) and "no run was created" in message
    assert refused.value.push == "c0003" and refused.value.max_ideas == 2 and len(refused.value.counted) == 3
    check_stop_rule(StopRule(), "c" * 64, tried)  # no stop rule: nothing is counted


QUICK_RULE = {
    "name": "promote",
    "conditions": [
        {"figure": "delta", "metric": "final/test_mAP", "op": ">=", "threshold": 0.018},
        {"figure": "not_worse", "metric": "val/loss", "mode": "min"},
    ],
}


def decided(candidate_map, baseline_map):
    rule = rule_from_dict(QUICK_RULE, "test")
    evidence = Evidence(
        candidate={"final/test_mAP": candidate_map, "val/loss": {"0": 0.5, "1": 0.5}},
        baseline={"final/test_mAP": baseline_map, "val/loss": {"0": 0.6, "1": 0.5}},
        candidate_label="dropout",
        candidate_run_ids=["c0", "c1"],
        baseline_run_ids=["b0", "b1"],
    )
    outcome = evaluate_rule(rule, evidence)
    return StageDecision(
        stage="quick_test",
        passed=outcome.passed,
        reason=outcome.reason,
        candidate="dropout",
        candidate_overrides={"model.head_dropout": 0.3},
        baseline="baseline",
        stage_run_id="s" * 32,
        sweep_spec_sha256="f" * 64,
        outcome=outcome,
        evidence=evidence,
    )


def test_a_decision_is_recorded_as_tags_metrics_and_the_full_outcome():
    failed = decided({"0": 0.60, "1": 0.61}, {"0": 0.60, "1": 0.60})  # mean Δ 0.005 < 0.018
    tags, metrics, artifact = decision_records(failed)
    assert artifact == "chain/quick_test/decision.json"
    assert tags["chain/quick_test/decision"] == "failed" and metrics["chain/quick_test/decision"] == 0.0
    assert tags["chain/quick_test/reason"] == failed.outcome.reason and "0.005 is not >= 0.018" in failed.reason
    assert tags["chain/quick_test/condition_0"].startswith("mean Δ final/test_mAP >= 0.018: failed")
    assert tags["chain/quick_test/condition_1"].startswith("val/loss not worse than baseline (min, tolerance 0): pass")
    assert metrics["chain/quick_test/condition_0"] == pytest.approx(0.005)
    assert metrics["chain/quick_test/condition_1"] == pytest.approx(0.05)  # lower loss: +0.05 better
    assert tags["chain/quick_test/rule_sha256"] == failed.outcome.rule_sha256
    assert tags["chain/quick_test/candidate"] == "dropout" and tags["chain/quick_test/stage_run_id"] == "s" * 32

    payload = json.loads(json.dumps(failed.to_dict()))  # JSON-ready as it is
    assert payload["decision"] == "failed" and payload["outcome"] == failed.outcome.to_dict()
    assert payload["evidence"]["candidate_run_ids"] == ["c0", "c1"] and payload["candidate_overrides"]
    assert payload["outcome"]["conditions"][0]["seeds"] == ["0", "1"]

    passed = decided({"0": 0.62, "1": 0.63}, {"0": 0.60, "1": 0.60})
    tags, metrics, _ = decision_records(passed)
    assert tags["chain/quick_test/decision"] == "passed" and metrics["chain/quick_test/decision"] == 1.0


def test_a_condition_without_a_figure_gets_a_tag_but_no_metric():
    missing = decided({"0": 0.6}, {"1": 0.6})  # no seed in common: the delta cannot be computed
    tags, metrics, _ = decision_records(missing)
    assert "no seed in common" in tags["chain/quick_test/condition_0"]
    assert "chain/quick_test/condition_0" not in metrics and metrics["chain/quick_test/decision"] == 0.0


def test_the_spec_dict_is_not_changed_by_loading():
    values = demo_values()
    before = copy.deepcopy(values)
    chain_spec_from_dict(values, "a")
    assert values == before
