"""Per-family champions (``registry.family_alias``: ``champion-lora``, ``champion-frozen``) beside the overall
``champion``, each through the gate; and a LoRA version that reloads through pyfunc and predicts as it did."""

import multiprocessing
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file, save_file
from test_promotion_race import RACE_TIMEOUT_S, START_TIMEOUT_S
from test_registry import add_version

from avlm.__main__ import main
from avlm.config import config_to_dict
from avlm.errors import ConfigError, TrainingError
from avlm.models import save_lora_adapter, trainable_state_dict
from avlm.recipes import cvs
from avlm.tracking.registry import (
    RegistryConfig,
    alias_holder,
    check_registry,
    decision_history,
    family_alias_of,
    log_and_register,
    promote_if_better,
    rollback,
)

NAME = "family-cvs"
TINY = ["model.head_hidden=16", "model.head_queries=1", "model.head_heads=2", "model.lora_r=2"]


def tiny_checkpoint(folder, adaptation, steps=0):
    """A CVS checkpoint folder as the recipe writes it (config.yaml, trainable.safetensors, lora_adapter/) of a tiny
    classifier after ``steps`` SGD steps on random clips (so LoRA's B matrices are no longer zero)."""
    cfg = cvs.load_cvs_config(None, [*TINY, f"model.adaptation={adaptation}"])
    model = cvs.build_cvs_model(cfg.model, num_frames=cfg.data.clip_frames)
    size = model.backbone.image_size
    generator = torch.Generator().manual_seed(1)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    for _ in range(steps):
        clips = torch.randn(2, cfg.data.clip_frames, 3, size, size, generator=generator)
        targets = torch.randint(0, 2, (2, 3), generator=generator).float()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(pixel_values=clips).logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump({**config_to_dict(cfg), "resume": ""}, sort_keys=False))
    save_file(trainable_state_dict(model), str(folder / "trainable.safetensors"))
    save_lora_adapter(model, folder / "lora_adapter")
    return model, cfg


def register(tmp_path, adaptation, value, family_alias, steps=0):
    """log_and_register + promote_if_better, as the recipe's lifecycle does; returns (version, decision, model)."""
    checkpoint = tmp_path / f"{adaptation}-{value}" / "best"
    model, cfg = tiny_checkpoint(checkpoint, adaptation, steps)
    size = model.backbone.image_size
    clips = np.random.default_rng(0).standard_normal((2, cfg.data.clip_frames, 3, size, size)).astype(np.float32)
    registry = RegistryConfig(name=NAME, family_alias=family_alias)
    with mlflow.start_run() as run:
        pass
    version = log_and_register(
        registry,
        checkpoint_dir=checkpoint,
        recipe="cvs",
        run_id=run.info.run_id,
        metric_value=value,
        input_example=clips[:1],
        output_example=cvs.load_predictor(checkpoint)(clips[:1]),
        extra_tags={"adaptation": adaptation, "dataset": "demo"},
    )
    return str(version.version), promote_if_better(registry, version.version), model, clips


def holders(name, *aliases):
    return [str(alias_holder(name, alias).version) for alias in aliases]


@pytest.mark.slow
def test_family_aliases_each_hold_the_best_version_of_their_family_with_records(mlflow_store, tmp_path):
    v1, d1, _, _ = register(tmp_path, "frozen", 0.60, "champion-frozen")
    v2, d2, _, _ = register(tmp_path, "lora", 0.50, "champion-{adaptation}")  # worse than v1, best LoRA
    v3, d3, _, _ = register(tmp_path, "lora", 0.45, "champion-{adaptation}")  # worse LoRA

    assert holders(NAME, "champion", "champion-frozen", "champion-lora") == [v1, v1, v2]
    assert [(d.decision, d.family.decision) for d in (d1, d2, d3)] == [
        ("promoted", "promoted"),
        ("rejected", "promoted"),
        ("rejected", "rejected"),
    ]
    assert d3.family.alias == "champion-lora" and d3.family.champion_version == v2 and d3.family.champion_value == 0.5
    assert d3.family.reason == (
        "val/mAP 0.45 does not beat champion-lora v2 0.5 by more than margin 0 (max; gain -0.05)"
    )
    assert d2.family.reason == "no current champion-lora" and d2.reason.startswith(
        "val/mAP 0.5 does not beat champion v1"
    )

    # Each version: the overall decision, then the family one naming its alias; the flat tags mirror the overall.
    history = decision_history(NAME)
    assert [(r.version, r.alias, r.decision, r.champion_before) for r in history] == [
        (v1, "champion", "promoted", None),
        (v1, "champion-frozen", "promoted", None),
        (v2, "champion", "rejected", v1),
        (v2, "champion-lora", "promoted", None),
        (v3, "champion", "rejected", v1),
        (v3, "champion-lora", "rejected", v2),
    ]
    assert [r.seq for r in history] == [1, 2, 3, 4, 5, 6] and [r.index for r in history] == [1, 2] * 3
    assert history[-1].values["baseline"] == {"val/mAP": {"best": 0.5}} and history[-1].passed is False
    assert history[-1].artifact.endswith(f"promotion/v{v3}/decision_2.json")
    tags = MlflowClient().get_model_version(NAME, v2).tags
    assert tags["promotion.2.alias"] == "champion-lora" and "promotion.1.alias" not in tags
    assert tags["promotion.decision"] == "rejected" and tags["promotion.champion_version"] == v1

    state = check_registry(NAME)
    assert state.consistent, state.issues
    assert [(f.alias, f.holder, f.gate_holder) for f in state.families] == [
        ("champion-frozen", v1, v1),
        ("champion-lora", v2, v2),
    ]

    # Moved by hand outside the gate: flagged like the champion, and restored by a rollback.
    MlflowClient().set_registered_model_alias(NAME, "champion-lora", v3)
    state = check_registry(NAME)
    assert state.issues == [
        f"the champion-lora v{v3} has no passed gate decision (the alias was moved outside the gate)"
    ]
    assert state.champion_issues == []
    (restored,) = rollback(NAME)
    assert (restored.alias, restored.version, restored.decision, restored.champion_before) == (
        "champion-lora",
        v2,
        "restored",
        v3,
    )
    assert holders(NAME, "champion", "champion-lora") == [v1, v2] and check_registry(NAME).consistent
    assert rollback(NAME) == []


def test_family_alias_is_validated():
    assert RegistryConfig(family_alias="champion-lora").family_alias == "champion-lora"
    assert RegistryConfig(family_alias="champion-{adaptation}").family_alias == "champion-{adaptation}"
    assert RegistryConfig().family_alias == ""
    for bad, why in (
        ("champion", "overall gate"),
        ("candidate", "overall gate"),
        ("latest", "reserved"),
        ("v3", "reserved"),
        ("champion lora", "Invalid alias name"),
        ("champion-{", "not a template"),
        ("champion-{a b}", "names a version tag"),
    ):
        with pytest.raises(ConfigError, match=f"registry.family_alias.*{why}"):
            RegistryConfig(family_alias=bad)


def test_family_alias_template_is_filled_from_the_version_tags(mlflow_store):
    cfg = RegistryConfig(name="fam", family_alias="champion-{adaptation}")
    v1, _ = add_version("fam", 0.40)
    with pytest.raises(TrainingError, match="version 1 has no tag 'adaptation'"):
        promote_if_better(cfg, v1)
    assert decision_history("fam") == []  # refused before anything was recorded
    MlflowClient().set_model_version_tag("fam", v1, "adaptation", "lora")
    assert family_alias_of(cfg, MlflowClient().get_model_version("fam", v1)) == "champion-lora"
    assert promote_if_better(cfg, v1).family.alias == "champion-lora"
    assert holders("fam", "champion", "champion-lora") == [v1, v1]


def test_family_gate_compares_like_with_like_and_leaves_champion_untouched(mlflow_store):
    frozen = RegistryConfig(name="fam", family_alias="champion-frozen")
    v1, _ = add_version("fam", 0.40)
    v2, _ = add_version("fam", 0.70)
    for version, dataset in ((v1, "demo"), (v2, "other")):
        MlflowClient().set_model_version_tag("fam", version, "dataset", dataset)
    assert promote_if_better(frozen, v1).family.promoted
    second = promote_if_better(frozen, v2)
    assert (second.decision, second.family.decision) == ("rejected", "rejected")
    assert "dataset='other'" in second.family.reason and holders("fam", "champion", "champion-frozen") == [v1, v1]
    # Without a family alias the gate writes no family record, as before.
    v3, _ = add_version("fam", 0.50)
    third = promote_if_better(RegistryConfig(name="fam"), v3)
    assert third.promoted and third.family is None
    assert [r.alias for r in decision_history("fam", v3)] == ["champion"]
    assert holders("fam", "champion", "champion-frozen") == [v3, v1]


def test_cli_shows_checks_and_restores_a_family_alias(mlflow_store, capsys):
    lora = RegistryConfig(name="fam", family_alias="champion-lora")
    v1, _ = add_version("fam", 0.60)
    v2, _ = add_version("fam", 0.50)
    promote_if_better(RegistryConfig(name="fam"), v1)
    assert promote_if_better(lora, v2).family.promoted
    v3, _ = add_version("fam", 0.40)
    MlflowClient().set_registered_model_alias("fam", "champion-lora", v3)  # by hand

    assert main(["registry", "check", "fam"]) == 1
    out = capsys.readouterr().out
    assert f"  champion-lora v{v3}, by the gate's records v{v2}\n" in out
    assert f"INCONSISTENT: the champion-lora v{v3} has no passed gate decision" in out
    assert main(["registry", "history", "fam", v2]) == 0
    out = capsys.readouterr().out
    assert f"v{v2} #1 gate: rejected (rule failed)" in out and f"v{v2} #2 gate champion-lora: promoted" in out
    assert main(["registry", "rollback", "fam"]) == 0
    out = capsys.readouterr().out
    assert f"v{v2} #3 rollback champion-lora: restored" in out and f"champion-lora then: v{v3}" in out
    assert main(["registry", "check", "fam"]) == 0 and holders("fam", "champion", "champion-lora") == [v1, v2]


def promote_family_in_child(uri, barrier, jobs):
    """Child process: wait until every child is ready, then promote each version through the family gate at once."""
    import mlflow

    from avlm.tracking.registry import RegistryConfig, promote_if_better

    mlflow.set_tracking_uri(uri)
    for name, version in jobs:
        barrier.wait(timeout=START_TIMEOUT_S)
        promote_if_better(RegistryConfig(name=name, family_alias="champion-lora"), version)


@pytest.mark.slow
def test_two_processes_racing_on_one_family_alias_end_consistent(mlflow_store):
    values = {}
    for value in (0.30, 0.50, 0.60, 0.40):  # pairs raced at once: (0.3, 0.5), then (0.6, 0.4)
        version, _ = add_version(NAME, value)
        values[version] = value
    versions = list(values)
    jobs = [versions[0::2], versions[1::2]]
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    children = [
        context.Process(target=promote_family_in_child, args=(mlflow_store, barrier, [(NAME, v) for v in job]))
        for job in jobs
    ]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(START_TIMEOUT_S + RACE_TIMEOUT_S)
        assert [child.exitcode for child in children] == [0, 0]
    finally:
        for child in children:
            if child.is_alive():
                child.kill()

    best = max(values, key=values.get)
    assert holders(NAME, "champion", "champion-lora") == [best, best]
    state = check_registry(NAME)
    assert state.consistent, state.issues
    # Serial: each family promotion beat the holder it read, and each holder was displaced at most once.
    family = [r for r in decision_history(NAME) if r.alias == "champion-lora"]
    assert sorted(r.version for r in family) == sorted(versions)
    promoted = [r for r in family if r.decision == "promoted"]
    assert promoted[0].champion_before is None
    for before, after in zip(promoted, promoted[1:], strict=False):
        assert after.champion_before == before.version and values[after.version] > values[before.version]
    for record in family:
        if record.decision == "rejected":
            assert values[record.champion_before] >= values[record.version]
    assert [r.seq for r in decision_history(NAME)] == list(range(1, 2 * len(versions) + 1))


@pytest.mark.slow
def test_lora_version_reloads_through_pyfunc_and_predicts_the_same_probabilities(mlflow_store, tmp_path):
    version, _, model, clips = register(tmp_path, "lora", 0.5, "champion-lora", steps=3)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().max() > 0 for p in lora_b)
    with torch.no_grad():
        expected = torch.sigmoid(model(pixel_values=torch.from_numpy(clips)).logits).numpy()
        with model.backbone.model.disable_adapter():
            without_lora = torch.sigmoid(model(pixel_values=torch.from_numpy(clips)).logits).numpy()
    assert np.abs(expected - without_lora).max() > 1e-4  # the adapter matters to the answer

    loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion-lora")
    assert str(loaded.metadata.run_id) and holders(NAME, "champion-lora") == [version]
    predicted = loaded.predict(clips)
    assert list(predicted.columns) == ["prob_C1", "prob_C2", "prob_C3"]
    np.testing.assert_allclose(predicted.to_numpy(), expected, rtol=0, atol=1e-6)
    # The peft adapter travels with the version and holds the trained LoRA weights.
    adapter = Path(mlflow.artifacts.download_artifacts(f"models:/{NAME}/{version}")) / "artifacts/best/lora_adapter"
    assert (adapter / "adapter_config.json").is_file()
    saved = load_file(str(adapter / "adapter_model.safetensors"))
    trained = {
        n.removeprefix("backbone.model.").replace(".default", ""): p
        for n, p in model.named_parameters()
        if "lora_" in n
    }
    assert sorted(saved) == sorted(trained)
    assert all(torch.equal(saved[k], trained[k].detach()) for k in saved)
