"""A corrupt or truncated checkpoint file gives a ModelError naming the file, the folder to delete and what to
resume instead, not a raw safetensors / JSON traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avlm.errors import ModelError
from avlm.train import (
    LoopState,
    build_optimizer,
    build_scheduler,
    load_state,
    load_trainable,
    restore_optimization,
    save_checkpoint,
)


def optimization() -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    optimizer = build_optimizer([{"params": list(layer.parameters()), "lr": 1e-2, "weight_decay": 0.0}])
    layer(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # so that the optimizer has tensors to save
    return optimizer, build_scheduler(optimizer, name="linear", num_training_steps=10, warmup_ratio=0.0)


def last_checkpoint(tmp_path: Path) -> Path:
    optimizer, scheduler = optimization()
    return save_checkpoint(
        tmp_path / "checkpoints" / "last",
        trainable={"w": torch.arange(64.0)},
        config_yaml="x: 1\n",
        state=LoopState(epoch=2, global_step=8, run_id="0123abcd"),
        optimizer=optimizer,
        scheduler=scheduler,
    )


def truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def restore(folder: Path) -> None:
    restore_optimization(folder, *optimization())


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.95], ids=["empty", "half", "tail-cut"])
@pytest.mark.parametrize(
    ("file", "loader"),
    [
        ("trainable.safetensors", load_trainable),
        ("optimizer.safetensors", restore),
        ("optimizer.json", restore),
        ("scheduler.json", restore),
    ],
)
def test_truncated_file_names_itself_the_folder_and_the_run_to_resume(tmp_path, file, loader, keep):
    folder = last_checkpoint(tmp_path)
    truncate(folder / file, keep)
    with pytest.raises(ModelError) as caught:
        loader(folder)
    message = str(caught.value)
    assert f"checkpoint file {folder / file} is corrupt or truncated" in message
    assert f"delete the checkpoint folder {folder}" in message
    assert "resume=0123abcd" in message  # state.json is intact: the run can continue from MLflow's copy


@pytest.mark.parametrize("keep", [0.0, 0.5, 0.95], ids=["empty", "half", "tail-cut"])
def test_truncated_state_json_is_a_model_error(tmp_path, keep):
    folder = last_checkpoint(tmp_path)
    truncate(folder / "state.json", keep)
    with pytest.raises(ModelError, match=r"state\.json is corrupt or truncated .*then start the run again"):
        load_state(folder)


def test_state_json_of_another_shape_is_a_model_error(tmp_path):
    folder = last_checkpoint(tmp_path)
    (folder / "state.json").write_text('{"epoch": 2, "learning": "unknown key"}')
    with pytest.raises(ModelError, match=r"state\.json is corrupt or truncated \(TypeError"):
        load_state(folder)


def test_missing_optimizer_file_is_a_model_error(tmp_path):
    folder = last_checkpoint(tmp_path)
    (folder / "scheduler.json").unlink()
    with pytest.raises(ModelError, match=r"has no scheduler\.json"):
        restore(folder)


def test_intact_checkpoint_still_loads(tmp_path):
    folder = last_checkpoint(tmp_path)
    assert load_trainable(folder)["w"].tolist() == list(range(64))
    assert load_state(folder).global_step == 8
    restore(folder)
