"""The shared run lifecycle: resume on any machine from a run's artifacts, refusals that change nothing."""

import dataclasses

import pytest
import torch
from mlflow import MlflowClient

from avlm.errors import ConfigError
from avlm.recipes.cvs import CVSConfig
from avlm.train import LoopState, ensure_writable, resume_from, save_checkpoint
from avlm.train.lifecycle import Resume, _seed_checkpoints, checkpoint_config_yaml


def crashed_run_with_checkpoints(tmp_path, status="FAILED", best_epoch=2, last_epoch=3):
    """An MLflow run as a crashed training leaves it: checkpoints/last and checkpoints/best uploaded, status set."""
    client = MlflowClient()
    experiment = client.create_experiment("avlm-cvs-test")
    run_id = client.create_run(experiment).info.run_id
    cfg = CVSConfig(seed=3)
    cfg.train.epochs = 5
    for kind, epoch in (("best", best_epoch), ("last", last_epoch)):
        folder = save_checkpoint(
            tmp_path / "elsewhere" / kind,
            trainable={"w": torch.full((2,), float(epoch))},
            config_yaml=checkpoint_config_yaml(cfg),
            state=LoopState(epoch=epoch, global_step=10 * epoch, best_epoch=best_epoch, run_id=run_id),
        )
        client.log_artifacts(run_id, str(folder), f"checkpoints/{kind}")
    client.set_terminated(run_id, status)
    return run_id


def test_resume_by_run_id_downloads_last_and_best_on_a_fresh_machine(mlflow_store, tmp_path):
    run_id = crashed_run_with_checkpoints(tmp_path)
    fresh = tmp_path / "fresh-machine-outputs"
    cfg, resume = resume_from(CVSConfig(resume=run_id, output_dir=str(fresh)))
    assert resume.state.epoch == 3 and resume.state.run_id == run_id
    assert resume.best is not None and (resume.best / "trainable.safetensors").is_file()
    assert resume.last.is_relative_to(fresh) and resume.best.is_relative_to(fresh)
    # the crashed run's own config comes back, with resume kept so the run continues
    assert (cfg.seed, cfg.train.epochs, cfg.resume) == (3, 5, run_id)
    assert MlflowClient().get_run(run_id).info.status == "FAILED"  # downloading changes nothing


def test_resuming_a_finished_run_is_refused_and_changes_nothing(mlflow_store, tmp_path):
    run_id = crashed_run_with_checkpoints(tmp_path, status="FINISHED")
    client = MlflowClient()
    before = client.get_run(run_id)
    out = tmp_path / "outputs"
    with pytest.raises(ConfigError, match=f"run {run_id} is FINISHED; there is nothing to resume"):
        resume_from(CVSConfig(resume=run_id, output_dir=str(out)))
    after = client.get_run(run_id)
    assert (after.info.status, after.info.end_time) == (before.info.status, before.info.end_time)
    assert not out.exists()


def test_resume_from_a_checkpoint_folder_of_a_finished_run_is_refused(mlflow_store, tmp_path):
    run_id = crashed_run_with_checkpoints(tmp_path, status="FINISHED")
    with pytest.raises(ConfigError, match="FINISHED"):
        resume_from(CVSConfig(resume=str(tmp_path / "elsewhere" / "last"), output_dir=str(tmp_path / "o")))
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_resume_path_escaping_the_output_folder_creates_nothing(mlflow_store, tmp_path):
    out = tmp_path / "outputs"
    with pytest.raises(ConfigError, match="resume"):
        resume_from(CVSConfig(resume="../..", output_dir=str(out)))
    assert not out.exists() and not (tmp_path / "resumed").exists()


def test_an_unwritable_output_folder_is_refused_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"config key 'output_dir': cannot write to .*a-file/runs"):
        ensure_writable(blocker / "runs")
    assert ensure_writable(tmp_path / "new" / "runs").is_dir()


def test_downloaded_checkpoints_seed_the_runs_folder_unless_a_newer_copy_is_there(tmp_path):
    def checkpoint(path, epoch):
        return save_checkpoint(path, trainable={"w": torch.zeros(1)}, config_yaml="{}", state=LoopState(epoch=epoch))

    resume = Resume(last=checkpoint(tmp_path / "dl" / "last", 3), best=checkpoint(tmp_path / "dl" / "best", 2),
                    state=LoopState(epoch=3))  # fmt: skip
    run_dir = tmp_path / "run" / "checkpoints"
    _seed_checkpoints(resume, run_dir)
    assert (run_dir / "best" / "trainable.safetensors").is_file() and (run_dir / "last" / "state.json").is_file()

    newer = checkpoint(tmp_path / "run2" / "checkpoints" / "last", 4)  # this machine got further than the upload
    _seed_checkpoints(dataclasses.replace(resume, best=None), newer.parent)
    assert LoopState.from_json((newer / "state.json").read_text()).epoch == 4
