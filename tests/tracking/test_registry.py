import os
import threading
import warnings

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR
from postgres import postgres_fixture, registry_store_fixture  # noqa: F401  (sqlite and PostgreSQL stores)

from avlm.errors import ConfigError, TrainingError
from avlm.tracking.registry import (
    METRIC_VALUE_TAG,
    RegistryConfig,
    _registered_model_lock,
    current_champion,
    promote_if_better,
    promotion_lock,
    register_reference,
)


def add_version(name, value):
    """A registered version whose run logged `value` as its best val/mAP (what log_and_register tags)."""
    with mlflow.start_run() as run:
        mlflow.log_metric("best/val/mAP", value)
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        version = client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id)
    client.set_model_version_tag(name, version.version, METRIC_VALUE_TAG, repr(value))
    return str(version.version), run.info.run_id


def stage(name, version):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return MlflowClient().get_model_version(name, version).current_stage


def test_promotion_gate_with_margin_keeps_an_audit_trail(registry_store):
    cfg = RegistryConfig(name="gate-test", promote_metric="val/mAP", promote_margin=0.01)
    client = MlflowClient()

    v1, run1 = add_version(cfg.name, 0.50)
    first = promote_if_better(cfg, v1)
    assert first.promoted and first.reason == "no current champion"
    assert str(current_champion(cfg.name).version) == v1 and stage(cfg.name, v1) == "Production"

    v2, run2 = add_version(cfg.name, 0.45)  # worse
    second = promote_if_better(cfg, v2)
    assert not second.promoted and str(current_champion(cfg.name).version) == v1
    tags = client.get_model_version(cfg.name, v2).tags
    assert tags["promotion.decision"] == "rejected"
    assert tags["promotion.champion_version"] == v1 and tags["promotion.champion_value"] == "0.5"
    assert tags["promotion.compared_run_ids"] == f"{run2},{run1}"
    assert tags["promotion.metric"] == "val/mAP" and tags["promotion.margin"] == "0.01"
    assert "@" in tags["promotion.by"] and tags["promotion.at"].endswith("+00:00")
    assert stage(cfg.name, v2) == "None"

    v3, _ = add_version(cfg.name, 0.505)  # better, but not by the margin
    assert not promote_if_better(cfg, v3).promoted
    assert str(current_champion(cfg.name).version) == v1

    v4, _ = add_version(cfg.name, 0.52)  # better by more than the margin
    fourth = promote_if_better(cfg, v4)
    assert fourth.promoted and fourth.champion_version == v1
    assert str(current_champion(cfg.name).version) == v4
    assert stage(cfg.name, v4) == "Production" and stage(cfg.name, v1) == "Archived"
    assert client.get_model_version(cfg.name, v1).tags["promotion.superseded_by"] == v4
    assert client.get_model_version(cfg.name, v4).tags["promotion.decision"] == "promoted"


def test_min_mode_prefers_lower_values(registry_store):
    cfg = RegistryConfig(name="loss-gate", promote_metric="val/loss", promote_mode="min")
    v1, _ = add_version(cfg.name, 0.30)
    promote_if_better(cfg, v1)
    v2, _ = add_version(cfg.name, 0.20)
    assert promote_if_better(cfg, v2).promoted


def test_negative_margin_is_refused():
    with pytest.raises(ConfigError, match="registry.promote_margin"):
        RegistryConfig(promote_margin=-0.1)


def test_register_reference_points_at_external_weights_and_moves_its_alias(registry_store):
    with mlflow.start_run() as run:
        pass
    first = register_reference(
        "probe-ref", source="/ckpts/ssl_step6000.safetensors", run_id=run.info.run_id, tags={"gate": "PASS"},
        alias="probe-pass", description="delta 0.03",
    )  # fmt: skip
    second = register_reference(
        "probe-ref",
        source="hf://facebook/vjepa2-vitl-fpc16-256-ssv2",
        run_id=run.info.run_id,
        tags={},
        alias="probe-pass",
    )
    client = MlflowClient()
    assert (int(first.version), int(second.version)) == (1, 2)
    assert first.source == "/ckpts/ssl_step6000.safetensors" and first.tags == {"gate": "PASS"}
    assert first.description == "delta 0.03" and first.run_id == run.info.run_id
    assert str(client.get_model_version_by_alias("probe-ref", "probe-pass").version) == str(second.version)


def hold_and_contend(lock, contender):
    """Enter ``lock``, run ``contender`` in another thread meanwhile; returns what the contender raised."""
    raised = []

    def contend():
        try:
            with contender():
                pass
        except Exception as e:  # handed back to the test
            raised.append(e)

    with lock:
        thread = threading.Thread(target=contend)
        thread.start()
        thread.join(30)
    return raised


def test_a_held_promotion_lock_stops_the_next_promoter_with_a_clear_error(registry_store):
    raised = hold_and_contend(promotion_lock("locked"), lambda: promotion_lock("locked", timeout_s=0.5))
    assert len(raised) == 1 and isinstance(raised[0], TrainingError)
    assert "still held after 0.5 s" in str(raised[0])
    with promotion_lock("locked", timeout_s=5):  # released on exit
        pass


def test_registered_model_lock_for_http_servers_names_its_holder_and_leaves_nothing(registry_store):
    """The lock used where the client cannot reach the database: a registered model created and deleted."""
    raised = hold_and_contend(_registered_model_lock("m", 5), lambda: _registered_model_lock("m", 0.5))
    assert len(raised) == 1 and isinstance(raised[0], TrainingError)
    assert "'m.promotion-lock'" in str(raised[0]) and f"pid {os.getpid()}" in str(raised[0])
    assert MlflowClient().search_registered_models() == []
    with _registered_model_lock("m", 5):
        assert [m.name for m in MlflowClient().search_registered_models()] == ["m.promotion-lock"]


def test_a_failing_registry_read_is_not_taken_for_no_champion(mlflow_store, monkeypatch):
    """Reading the champion fails for a reason other than "no champion": nothing may be promoted."""
    cfg = RegistryConfig(name="flaky")
    v1, _ = add_version(cfg.name, 0.5)

    def store_down(self, name, alias):
        raise MlflowException("database is locked", error_code=INTERNAL_ERROR)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", store_down)
    with pytest.raises(MlflowException, match="database is locked"):
        promote_if_better(cfg, v1)
    assert "promotion.decision" not in MlflowClient().get_model_version(cfg.name, v1).tags


def test_the_gate_compares_like_with_like_and_says_why_it_refuses(mlflow_store):
    """A value of another metric (CIDEr-D where SPICE was unavailable vs a SPIDEr champion) or of another dataset
    is never compared: the candidate is refused, with the reason on its tags, and the champion stays."""
    client = MlflowClient()
    spider = RegistryConfig(name="caption-gate", promote_metric="val/SPIDEr")
    cider = RegistryConfig(name="caption-gate", promote_metric="val/CIDEr_D")
    v1, _ = add_version(spider.name, 0.30)
    client.set_model_version_tag(spider.name, v1, "avlm.metric", "val/SPIDEr")
    client.set_model_version_tag(spider.name, v1, "dataset", "audiocaps")
    assert promote_if_better(spider, v1).promoted

    v2, _ = add_version(cider.name, 0.90)  # a much larger number, of another metric
    client.set_model_version_tag(cider.name, v2, "avlm.metric", "val/CIDEr_D")
    client.set_model_version_tag(cider.name, v2, "dataset", "audiocaps")
    refused = promote_if_better(cider, v2)
    assert not refused.promoted and str(current_champion(spider.name).version) == v1
    reason = client.get_model_version(cider.name, v2).tags["promotion.reason"]
    assert reason.startswith("refused:") and "val/SPIDEr" in reason and "val/CIDEr_D" in reason

    v3, _ = add_version(spider.name, 0.90)  # the champion's metric, but Clotho
    client.set_model_version_tag(spider.name, v3, "avlm.metric", "val/SPIDEr")
    client.set_model_version_tag(spider.name, v3, "dataset", "clotho")
    assert not promote_if_better(spider, v3).promoted
    reason = client.get_model_version(spider.name, v3).tags["promotion.reason"]
    assert "dataset='audiocaps'" in reason and "dataset='clotho'" in reason

    v4, _ = add_version(spider.name, 0.35)  # like with like, better: promoted
    client.set_model_version_tag(spider.name, v4, "avlm.metric", "val/SPIDEr")
    client.set_model_version_tag(spider.name, v4, "dataset", "audiocaps")
    assert promote_if_better(spider, v4).promoted and str(current_champion(spider.name).version) == v4
