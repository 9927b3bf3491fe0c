"""``avlm registry ...``: promote only what a gate passed, find what was moved by hand, restore it."""

import warnings

from mlflow import MlflowClient
from test_registry import add_version, stage

from avlm.__main__ import main
from avlm.tracking.registry import RegistryConfig, current_champion, decision_history, promote_if_better

NAME = "cli-model"


def registry(capsys, *argv):
    """Run ``avlm registry ...`` in-process; (exit status, stdout, stderr)."""
    status = main(["registry", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def champion():
    version = current_champion(NAME)
    return None if version is None else str(version.version)


def gated_pair():
    """v1 promoted (first champion), v2 promoted over it by the gate, v3 registered but never gated."""
    cfg = RegistryConfig(name=NAME, promote_margin=0.01)
    v1, _ = add_version(NAME, 0.50)
    v2, _ = add_version(NAME, 0.60)
    assert promote_if_better(cfg, v1).promoted and promote_if_better(cfg, v2).promoted
    v3, _ = add_version(NAME, 0.70)
    return v1, v2, v3


def move_by_hand(alias_to=None, stage_of=None, to_stage=None):
    """What a person does in the MLflow UI or API, outside the gate."""
    client = MlflowClient()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if alias_to is not None:
            client.set_registered_model_alias(NAME, "champion", alias_to)
        if stage_of is not None:
            client.transition_model_version_stage(NAME, stage_of, to_stage)


def test_promote_refuses_an_ungated_version_and_prints_why(mlflow_store, capsys):
    v1, v2, v3 = gated_pair()
    status, out, err = registry(capsys, "promote", NAME, v3)
    assert status == 2 and "refused" in err and f"v{v3} holds no passed gate decision" in err
    assert "no gate decision at all" in out
    assert champion() == v2 and stage(NAME, v3) == "None"
    assert decision_history(NAME, v3) == []

    rejected, _ = add_version(NAME, 0.55)  # gated, but lost to the champion
    promote_if_better(RegistryConfig(name=NAME, promote_margin=0.01), rejected)
    status, out, err = registry(capsys, "promote", NAME, rejected)
    assert status == 2 and "rejected" in err and "does not beat champion" in out
    # v1 passed once, but v2's promotion superseded that decision.
    status, _, err = registry(capsys, "promote", NAME, v1)
    assert status == 2 and champion() == v2


def test_force_needs_a_reason_and_records_it_with_who_and_when(mlflow_store, capsys):
    _, v2, v3 = gated_pair()
    status, _, err = registry(capsys, "promote", NAME, v3, "--force")
    assert status == 2 and "needs a reason" in err and champion() == v2
    status, _, err = registry(capsys, "promote", NAME, v3, "--force", "--reason", "   ")
    assert status == 2 and champion() == v2

    status, out, _ = registry(capsys, "promote", NAME, v3, "--force", "--reason", "hot-fix approved by the PI")
    assert status == 0 and champion() == v3 and stage(NAME, v3) == "Production" and stage(NAME, v2) == "Archived"
    tags = MlflowClient().get_model_version(NAME, v3).tags
    assert tags["promotion.1.kind"] == "force" and tags["promotion.1.decision"] == "forced"
    assert tags["promotion.1.reason"] == "forced by hand: hot-fix approved by the PI"
    assert "@" in tags["promotion.1.by"] and tags["promotion.1.at"].endswith("+00:00")
    status, out, _ = registry(capsys, "check", NAME)
    assert status == 0 and "forced by" in out  # recorded: consistent, and said


def test_check_finds_hand_moved_aliases_and_stages(mlflow_store, capsys):
    v1, v2, v3 = gated_pair()
    status, out, _ = registry(capsys, "check", NAME)
    assert status == 0 and "consistent with the gate's records" in out

    move_by_hand(alias_to=v1)  # back to an Archived version by hand
    status, out, _ = registry(capsys, "check", NAME)
    assert status == 1
    assert f"the champion alias is on v{v1}, which is Archived" in out
    assert f"stage Production on v{v2}, which is not the champion" in out
    assert f"the gate's records put v{v2} there" in out

    move_by_hand(alias_to=v2, stage_of=v3, to_stage="Production")  # alias fixed, but a second Production version
    status, out, _ = registry(capsys, "check", NAME)
    assert status == 1 and f"stage Production on v{v3}" in out and "2 versions in stage Production" in out

    move_by_hand(alias_to=v3)  # a version no gate passed
    status, out, _ = registry(capsys, "check", NAME)
    assert status == 1 and f"the champion v{v3} has no passed gate decision" in out


def test_rollback_restores_the_gate_champion_and_records_it(mlflow_store, capsys):
    v1, v2, v3 = gated_pair()
    move_by_hand(alias_to=v3, stage_of=v3, to_stage="Production")
    status, out, _ = registry(capsys, "rollback", NAME, "--tracking-uri", mlflow_store)
    assert status == 0 and f"restored the gate's champion v{v2}" in out
    assert champion() == v2 and stage(NAME, v2) == "Production" and stage(NAME, v3) == "Archived"
    assert registry(capsys, "check", NAME)[0] == 0
    last = decision_history(NAME)[-1]
    assert (last.version, last.kind, last.decision, last.champion_before) == (v2, "rollback", "restored", v3)
    assert registry(capsys, "rollback", NAME)[1].strip().endswith("nothing to roll back")  # consistent: no record
    assert decision_history(NAME)[-1] == last


def test_rollback_to_an_earlier_champion_needs_a_reason_and_a_gate_record(mlflow_store, capsys):
    v1, v2, v3 = gated_pair()
    assert registry(capsys, "rollback", NAME, "--to", v1)[0] == 2
    status, _, err = registry(capsys, "rollback", NAME, "--to", v3, "--reason", "x")
    assert status == 2 and "never champion" in err
    status, _, _ = registry(capsys, "rollback", NAME, "--to", v1, "--reason", "v2 regresses on site B")
    assert status == 0 and champion() == v1 and stage(NAME, v1) == "Production" and stage(NAME, v2) == "Archived"
    assert registry(capsys, "check", NAME)[0] == 0  # the records now name v1
    # v2's passed decision is superseded by the rollback: promoting it again needs a gate (or --force).
    assert registry(capsys, "promote", NAME, v2)[0] == 2


def test_promote_reapplies_a_standing_gate_decision_after_a_hand_move(mlflow_store, capsys):
    v1, v2, _ = gated_pair()
    move_by_hand(alias_to=v1)
    status, out, _ = registry(capsys, "promote", NAME, v2)
    assert status == 0 and "standing gate decision" in out and "beats champion" in out
    assert champion() == v2 and registry(capsys, "check", NAME)[0] == 0
    last = decision_history(NAME, v2)[-1]
    assert (last.kind, last.decision, last.backed_by) == ("promote", "promoted", 1)


def test_show_and_history_print_the_evidence_and_every_decision_in_order(mlflow_store, capsys):
    v1, v2, v3 = gated_pair()
    promote_if_better(RegistryConfig(name=NAME), v2)  # re-gate the champion: kept, appended
    status, out, _ = registry(capsys, "show", NAME)
    assert status == 0 and f"champion -> v{v2}" in out and f"v{v3}  stage None" in out
    status, out, _ = registry(capsys, "show", NAME, v2)
    assert status == 0 and "stage Production, aliases champion" in out and "[PASS] mean Δ val/mAP > 0.01" in out
    assert "candidate v2 val/mAP: best=0.6" in out and "2 decision(s)" in out
    status, out, _ = registry(capsys, "history", NAME)
    heads = [line for line in out.splitlines() if not line.startswith(" ")]
    assert heads[0].startswith(f"v{v1} #1 gate: promoted") and heads[1].startswith(f"v{v2} #1 gate: promoted")
    assert heads[2].startswith(f"v{v2} #2 gate: kept") and len(heads) == 3
    assert registry(capsys, "show", NAME, "9")[0] == 2
