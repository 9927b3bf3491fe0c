"""The weights a checkpoint saves are the full (unsharded) trainable parameters, gathered through accelerate.

Run as a script by ``torchrun`` (the FSDP test below), this file is also the two processes' worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from avlm.tracking import NullLogger
from avlm.train import StepOutput, TrainConfig, build_scheduler, fit, load_trainable, make_accelerator
from avlm.train.checkpoint import gather_trainable_state


def partly_frozen_model() -> torch.nn.Module:
    """A frozen "backbone" layer under two trainable ones, nested as the recipes' heads are."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 1))
    )
    model[0].requires_grad_(False)
    return model


def trainable_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_fit_saves_exactly_the_trainable_parameters_as_they_are_after_training(tmp_path):
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, monitor="val/constant", patience=0)
    accelerator = make_accelerator(cfg)
    model = partly_frozen_model()
    frozen_before = model[0].weight.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scheduler = build_scheduler(optimizer, name="constant_with_warmup", num_training_steps=8, warmup_ratio=0.0)
    inputs = torch.randn(32, 4, generator=torch.Generator().manual_seed(1))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(inputs, inputs.sum(1)), batch_size=8)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    def step(model: torch.nn.Module, batch: Any, generator: torch.Generator) -> StepOutput:
        x, y = batch
        return StepOutput(loss=((model(x).squeeze(-1) - y) ** 2).mean())

    fit(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_loader=loader,
        train_step=step,
        train_metrics=None,
        evaluate=lambda model: {"val/constant": 1.0},
        cfg=cfg,
        seed=0,
        run_logger=NullLogger(),
        checkpoint_dir=tmp_path,
        config_yaml="x: 1\n",
    )
    saved = load_trainable(tmp_path / "last")
    expected = trainable_copy(accelerator.unwrap_model(model))
    assert sorted(saved) == ["1.0.bias", "1.0.weight", "1.1.bias", "1.1.weight"]  # the frozen layer is not saved
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=0, atol=0)
    assert not torch.equal(saved["1.1.weight"], partly_frozen_model()[1][1].weight)  # it trained
    torch.testing.assert_close(model[0].weight, frozen_before, rtol=0, atol=0)


def test_gathered_state_is_a_copy_that_later_steps_do_not_change():
    accelerator = make_accelerator(TrainConfig())
    model = accelerator.prepare(partly_frozen_model())
    state = gather_trainable_state(accelerator, model)
    before = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    for name, value in state.items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_fsdp_sharded_parameters_are_gathered_whole_on_the_main_process():
    """Two CPU processes (gloo) with torch's FSDP, sharded and nested-wrapped, through accelerate's FSDP branch
    of ``get_state_dict``. accelerate itself only enables FSDP on GPUs, so the worker sets the distributed type
    on the CPU state; the model wrapping, the gathering collective and the names are FSDP's own."""
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(free_port()), str(Path(__file__)),
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:  # timed out: stop torchrun and its workers
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, output[-3000:]
    assert "rank 0: gathered 4 trainable tensors equal to the unsharded model" in output
    assert "rank 1: gathered nothing" in output


def _fsdp_worker() -> None:
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    accelerator = Accelerator(cpu=True)
    model = partly_frozen_model()
    expected = trainable_copy(model)
    sharded = FSDP(
        model, device_id=torch.device("cpu"), use_orig_params=True, auto_wrap_policy=ModuleWrapPolicy({torch.nn.Linear})
    )
    local = {name: p for name, p in sharded.named_parameters() if p.requires_grad}
    assert all("_fsdp_wrapped_module" in name for name in local)  # FSDP's names, not the state dict's
    assert sum(p.numel() for p in local.values()) < sum(v.numel() for v in expected.values())  # really sharded
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin(fsdp_version=1)
    gathered = gather_trainable_state(accelerator, sharded)  # collective: every rank calls it
    if not accelerator.is_main_process:
        assert gathered == {}
        print(f"rank {accelerator.process_index}: gathered nothing", flush=True)
        return
    assert gathered.keys() == expected.keys(), (sorted(gathered), sorted(expected))
    for name, value in expected.items():
        torch.testing.assert_close(gathered[name], value, rtol=0, atol=0)
    print(f"rank 0: gathered {len(gathered)} trainable tensors equal to the unsharded model", flush=True)


if __name__ == "__main__":
    _fsdp_worker()
