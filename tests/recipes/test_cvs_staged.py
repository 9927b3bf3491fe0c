"""Staged fine-tuning as the CVS log ran it (Exp9): stage 2 starts from stage 1's best checkpoint."""

import pytest
import torch
from cvs_runs import run_cvs
from mlflow import MlflowClient
from safetensors.torch import load_file

from avlm.models import trainable_state_dict
from avlm.train.lifecycle import RecipeRun

STAGED = ("data.limit_clips=64", "registry.register=false", "model.adaptation=staged", "model.unfreeze_last_n=1")


def run(*overrides):
    return run_cvs(*STAGED, *overrides)


def test_stage_two_starts_from_stage_one_best_weights_with_its_own_lr(mlflow_store, monkeypatch):
    seen = []
    real_load_best = RecipeRun.load_best

    def recording_load_best(self, model):
        # what the best and last checkpoints hold when the weights are loaded, and what the model then holds
        best = load_file(str(self.checkpoint_dir / "best" / "trainable.safetensors"))
        last = load_file(str(self.checkpoint_dir / "last" / "trainable.safetensors"))
        net = real_load_best(self, model)
        seen.append((best, last, {k: v.detach().clone() for k, v in trainable_state_dict(net).items()}))
        return net

    monkeypatch.setattr(RecipeRun, "load_best", recording_load_best)
    result = run(
        "model.stage1_epochs=3", "train.epochs=4", "train.lr=0.02", "model.stage2_lr=1e-5", "train.backbone_lr=1e-5",
        "train.monitor=val/loss", "train.monitor_mode=min", "seed=3",
    )  # fmt: skip
    history = result.state.history
    assert [row["stage"] for row in history] == [1, 1, 1, 2]
    # the first load is the stage transition; the second the final evaluation
    best, last, loaded = seen[0]
    assert loaded.keys() == best.keys()
    assert all(torch.equal(loaded[k], best[k]) for k in best)
    stage1_best_epoch = min(range(3), key=lambda i: history[i]["val/loss"]) + 1
    if stage1_best_epoch < 3:  # the last stage-1 weights differ from the best: stage 2 did not go on from them
        assert any(not torch.equal(last[k], best[k]) for k in best)
    # stage 1: the blocks never moved; stage 2: they did, at stage 2's rates
    block_keys = [k for k in best if k.startswith("backbone.")]
    assert block_keys
    final = load_file(str(result.output_dir / "checkpoints/last/trainable.safetensors"))
    assert any(not torch.equal(final[k], best[k]) for k in block_keys)
    assert history[3]["lr"] <= 1e-5 < history[2]["lr"] or history[2]["lr"] == 0
    client = MlflowClient()
    assert client.get_run(result.run_id).data.metrics["stage1/best_val/loss"] == pytest.approx(
        history[stage1_best_epoch - 1]["val/loss"]
    )


def test_an_early_stop_in_stage_one_does_not_end_the_run_unless_configured(mlflow_store):
    # no improvement can reach min_delta: stage 1 stops after its first 2 epochs (patience 1)
    settings = ("model.stage1_epochs=4", "model.stage1_patience=1", "train.epochs=5", "train.min_delta=10",
                "train.patience=2")  # fmt: skip
    going_on = run(*settings)
    assert [row["stage"] for row in going_on.state.history] == [1, 1, 2, 2]  # stage 2 has its own patience
    ending = run(*settings, "model.stage1_stop_ends_run=true")
    assert [row["stage"] for row in ending.state.history] == [1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("crash_epoch", [2, 3], ids=["at-the-stage-boundary", "inside-stage-2"])
def test_a_staged_run_resumed_after_a_crash_reaches_the_same_result(mlflow_store, monkeypatch, crash_epoch):
    from avlm.train import loop

    settings = ("model.stage1_epochs=2", "train.epochs=4", "model.stage2_lr=1e-3", "seed=7")
    reference = run(*settings)
    real_epoch_seed = loop.epoch_seed

    def crash(seed, epoch):
        if epoch == crash_epoch:
            raise RuntimeError("simulated crash")
        return real_epoch_seed(seed, epoch)

    monkeypatch.setattr(loop, "epoch_seed", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*settings)
    monkeypatch.setattr(loop, "epoch_seed", real_epoch_seed)
    client = MlflowClient()
    crashed = client.search_runs(
        client.get_experiment_by_name("avlm-cvs").experiment_id, order_by=["attributes.start_time DESC"]
    )[0]
    resumed = run(f"resume={crashed.info.run_id}")
    assert [r["stage"] for r in resumed.state.history] == [1, 1, 2, 2]
    for a, b in zip(reference.state.history, resumed.state.history, strict=True):
        for key in ("train/loss", "val/loss", "val/mAP", "lr"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (a["epoch"], key)
    assert resumed.final_metrics == pytest.approx(reference.final_metrics, abs=1e-6)
