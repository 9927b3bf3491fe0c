"""The probe recipe end to end, in-process: the PASS and FAIL demos reach their decisions honestly, the MLflow run
tree and the report are as described, PASS registers the backbone's reference and FAIL registers nothing, and
bad input (a group shared across splits, a mismatched checkpoint) fails as it should. Bad manifests, refused
before any run exists, are in test_probe_parts.py.

Every test here trains the probe grid and its sanity suite: the module is in the slow tier."""

import csv
import json
import os
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from avlm.data import write_cvs_demo_manifest
from avlm.errors import ModelError
from avlm.recipes import probe

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
# Two poolings, one optimizer, two seeds, short budgets: the demo's method at a tenth of its cost.
TINY = [
    "tracking.system_metrics=false",
    "grid.poolings=[mean_all,mean_excluding_cls,mean_visible]",  # V-JEPA 2 has no CLS: skipped, with the reason
    "grid.optimizers=[adamw]",
    "grid.seeds=[1,2]",
    "train.epochs=15",
    "sanity.epochs=30",
]


def run(tmp, *overrides, config="examples/probe/demo.yaml"):
    cfg = probe.load_probe_config(REPO / config, [*TINY, f"output_dir={tmp / 'outputs'}", *overrides])
    return probe.main(cfg)


@pytest.fixture(scope="module")
def store(tmp_path_factory, avlm_cache):
    """One sqlite store for the module (the PASS run is shared by several tests)."""
    path = tmp_path_factory.mktemp("probe_store")
    uri = f"sqlite:///{path / 'mlflow.db'}"
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    mlflow.tracking.fluent._active_experiment_id = None
    mlflow.set_tracking_uri(uri)
    yield path
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    mlflow.tracking.fluent._active_experiment_id = None


@pytest.fixture(scope="module")
def passed(store):
    """The PASS demo (a 300-step pretext instead of 600)."""
    return run(store, "backbone.pretext.steps=300")


def test_pass_demo_passes_on_the_held_out_split(passed):
    decision = passed.decision
    assert decision.passed and decision.sanity_passed
    assert (decision.selected_on, decision.evaluated_on, decision.seeds) == ("val", "test", [1, 2])
    assert decision.delta_mean >= decision.required_delta == 0.01
    assert passed.poolings == ["mean_all", "mean_visible"]
    assert len(passed.cells) == 4 and all(c.pre_test is not None for c in passed.cells)
    chosen = [c for c in passed.cells if (c.pooling, c.optimizer) == (decision.gate_pooling, decision.gate_optimizer)]
    assert decision.delta_mean == pytest.approx(sum(c.pre_test - c.rand_test for c in chosen) / 2)
    assert [r.name for r in passed.sanity] == [
        "split_hygiene_seed1", "split_hygiene_seed2", "split_hygiene_train_test", "tiny_subset_overfit",
        "shuffled_label", "label_provenance",
    ]  # fmt: skip
    assert all(r.passed for r in passed.sanity)


def test_run_tree_tags_and_report(passed):
    client = MlflowClient()
    parent = client.get_run(passed.run_id)
    tags, params = parent.data.tags, parent.data.params
    assert parent.info.status == "FINISHED" and tags["gate"] == "PASS" and tags["sanity.all_passed"] == "True"
    assert tags["gate.declared"].startswith("PASS iff every sanity check passes")
    assert params["gate.required_delta"] == "0.01" and params["gate.evaluate_on"] == "test"
    assert tags["gate.pooling"] == passed.decision.gate_pooling and "met" in tags["gate.reasoning"]
    assert tags["pretrained_status"] == "pretext masked_pixels 300 steps"
    assert "no CLS" in tags["pooling_skipped.mean_excluding_cls"] and tags["sanity.shuffled_label"] == "PASS"
    assert parent.data.metrics["gate/delta_mean"] == pytest.approx(passed.decision.delta_mean)
    assert parent.data.metrics["params/trainable"] == 48 * 3 + 3  # the largest probe here: linear, 48-d, 3 labels

    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{passed.run_id}'"
    )
    assert sorted(c.info.run_name for c in children) == [
        "mean_all-adamw-seed1", "mean_all-adamw-seed2", "mean_visible-adamw-seed1", "mean_visible-adamw-seed2",
    ]  # fmt: skip
    cells = {(c.pooling, c.seed): c for c in passed.cells}
    for child in children:
        assert child.info.status == "FINISHED"
        cell = cells[(child.data.tags["pooling"], int(child.data.tags["seed"]))]
        assert child.data.metrics["pre_val_mAP"] == pytest.approx(cell.pre_val)
        assert child.data.metrics["delta_test_mAP"] == pytest.approx(cell.pre_test - cell.rand_test)
        for backbone in ("pretrained", "random"):  # both probes' curves, one point per epoch
            assert len(client.get_metric_history(child.info.run_id, f"{backbone}/val/mAP")) == 15

    artifacts = {a.path for a in client.list_artifacts(passed.run_id, "report")}
    assert artifacts == {"report/probe_report.md", "report/probe_report.json"}
    assert "plots/probe_cells.png" in {a.path for a in client.list_artifacts(passed.run_id, "plots")}
    assert "backbone/pretrained.safetensors" in {a.path for a in client.list_artifacts(passed.run_id, "backbone")}
    report = json.loads(mlflow.artifacts.load_text(f"runs:/{passed.run_id}/report/probe_report.json"))
    assert report["decision"] == "PASS" and report["gate"]["delta_mean"] == pytest.approx(passed.decision.delta_mean)
    assert [(r["pooling"], r["optimizer"]) for r in report["ablation"]] == [
        ("mean_all", "adamw"),
        ("mean_visible", "adamw"),
    ]
    assert [(r["pooling"], r["seed"]) for r in report["runs"]] == [
        ("mean_all", 1), ("mean_all", 2), ("mean_visible", 1), ("mean_visible", 2),
    ]  # fmt: skip
    assert report["config_snapshot"]["backbone.pretext.steps"] == 300
    markdown = mlflow.artifacts.load_text(f"runs:/{passed.run_id}/report/probe_report.md")
    assert markdown == passed.report_markdown
    for heading in ("Config Snapshot", "Sanity Checks", "PASS/FAIL Gate", "Ablation Summary", "Run Metrics"):
        assert f"## {heading}" in markdown
    assert "| mean_visible | adamw | 2 |" in markdown and "- result: **PASS**" in markdown


def test_pass_registers_the_backbone_reference_with_the_evidence(passed):
    client = MlflowClient()
    version = client.get_model_version_by_alias("avlm-probe-backbone", "probe-pass")
    assert str(version.version) == passed.model_version and version.run_id == passed.run_id
    artifact_uri = client.get_run(passed.run_id).info.artifact_uri
    assert version.source == f"{artifact_uri}/backbone"  # this run's pretext checkpoint, logged as an artifact
    assert version.tags["gate"] == "PASS" and float(version.tags["gate.delta_mean"]) == passed.decision.delta_mean
    assert version.tags["gate.required_delta"] == "0.01" and version.tags["gate.seeds"] == "1,2"
    assert version.tags["gate.report"].endswith("report/probe_report.md")


def test_fail_demo_fails_with_a_zero_delta_and_registers_nothing(store):
    result = run(store, config="examples/probe/demo_fail.yaml")
    decision = result.decision
    assert not decision.passed and decision.sanity_passed  # the sanity suite passes: the delta fails the gate
    assert all(c.pre_val == c.rand_val and c.pre_test == c.rand_test for c in result.cells)  # same weights
    assert decision.delta_mean == 0.0 and "(not met)" in decision.reasons[-2]
    assert result.model_version is None
    client = MlflowClient()
    assert client.get_run(result.run_id).data.tags["gate"] == "FAIL"
    assert result.run_id not in {v.run_id for v in client.search_model_versions("name='avlm-probe-backbone'")}


@pytest.fixture(scope="module")
def demo_rows(avlm_cache, tmp_path_factory):
    """The rows of the demo's manifest (frames as absolute paths), to edit into bad manifests."""
    path = write_cvs_demo_manifest(avlm_cache, tmp_path_factory.mktemp("manifest") / "demo.csv")
    return list(csv.DictReader(path.open()))


def write_rows(path, rows):
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def leaky_manifest(tmp, rows):
    """The demo manifest with one val clip moved into a train clip's group."""
    rows = [dict(r) for r in rows]
    train_group = next(r["group"] for r in rows if r["split"] == "train")
    leaked = next(r for r in rows if r["split"] == "val")
    leaked["group"] = train_group
    return write_rows(tmp / "leaky.csv", rows), train_group


def test_a_group_shared_across_splits_fails_hygiene_and_the_gate(store, passed, demo_rows, tmp_path):
    manifest, group = leaky_manifest(tmp_path, demo_rows)
    checkpoint = passed.output_dir / "backbone" / "pretrained.safetensors"
    result = run(
        store, f"data.manifest={manifest}", f"backbone.checkpoint={checkpoint}", "backbone.pretext.steps=0",
        "grid.poolings=[mean_visible]",
    )  # fmt: skip
    hygiene = {r.name: r for r in result.sanity}
    for seed in (1, 2):
        check = hygiene[f"split_hygiene_seed{seed}"]
        assert not check.passed and check.figures["group_overlap"] == 1 and repr(group) in check.message
    assert not result.decision.passed and "split_hygiene_seed1" in result.decision.reasons[0]
    assert result.decision.delta_mean > 0.01  # the same features as the PASS run: only the hygiene fails it
    assert result.model_version is None
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags["gate"] == "FAIL" and tags["sanity.split_hygiene_seed1"] == "FAIL"
    assert tags["pretrained_status"] == f"checkpoint {checkpoint}"
    # The check reports, it does not repair: the leaked clip is still among the val clips probed.
    assert hygiene["split_hygiene_seed1"].figures["val_ids"] == sum(r["split"] == "val" for r in demo_rows)


def test_a_checkpoint_of_another_architecture_is_refused_naming_keys(store, passed):
    checkpoint = passed.output_dir / "backbone" / "pretrained.safetensors"
    with pytest.raises(ModelError, match=r"does not match backbone 'timm-tiny'.*missing key") as caught:
        run(store, "backbone.spec=timm-tiny", f"backbone.checkpoint={checkpoint}", "data.input_mask_ratio=0")
    assert str(checkpoint) in str(caught.value)
    failed = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("avlm-probe").experiment_id], filter_string="attributes.status = 'FAILED'"
    )
    assert failed and failed[0].data.tags["gate"] == "PENDING"  # the gate was declared, nothing was decided


def test_a_timm_vit_is_probed_with_and_without_its_cls_tokens(store):
    result = run(
        store, "backbone.spec=timm-tiny", "backbone.frame_tokens=all", "backbone.pretext.steps=0",
        "data.limit_clips=120", "data.input_mask_ratio=0", "grid.poolings=[mean_all,mean_excluding_cls]",
        "grid.seeds=[1]",
        "sanity.pooling=mean_excluding_cls", "train.epochs=3", "sanity.epochs=3", "sanity.overfit_threshold=0",
        "sanity.shuffle_min_drop=-1", "gate.evaluate_on=val",
    )  # fmt: skip
    assert result.poolings == ["mean_all", "mean_excluding_cls"] and result.skipped_poolings == {}
    by_pooling = {c.pooling: c for c in result.cells}
    assert by_pooling["mean_all"].pre_val != by_pooling["mean_excluding_cls"].pre_val  # different features
    assert result.decision.delta_mean == 0.0 and not result.decision.passed  # no pretraining: nothing to gain
    assert {r.figures.get("train_ids") for r in result.sanity if r.name.startswith("split_hygiene")} == {120}
