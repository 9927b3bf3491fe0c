import pytest
import torch

from avlm.train import (
    LoopState,
    build_optimizer,
    build_scheduler,
    load_state,
    load_trainable,
    restore_optimization,
    save_checkpoint,
)


def make(seed=0):
    torch.manual_seed(seed)
    head, body = torch.nn.Linear(4, 2), torch.nn.Linear(4, 4)
    opt = build_optimizer(
        [
            {"name": "head", "params": list(head.parameters()), "lr": 1e-2, "weight_decay": 0.0},
            {"name": "backbone", "params": list(body.parameters()), "lr": 1e-3, "weight_decay": 0.1},
        ]
    )
    return head, body, opt


def test_staged_schedule_keeps_backbone_at_zero_then_warms_up():
    _, _, opt = make()
    sched = build_scheduler(opt, name="cosine", num_training_steps=20, warmup_ratio=0.1, frozen_steps_by_group=[0, 10])
    lrs = []
    for _ in range(20):
        lrs.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert all(lr[1] == 0.0 for lr in lrs[:10])  # stage 1: backbone untouched
    assert lrs[11][1] == pytest.approx(1e-3)  # stage 2: its own 1-step warmup, then cosine from the peak
    assert lrs[2][0] == pytest.approx(1e-2 * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 0 / 18)).item()))
    assert lrs[19][0] < lrs[5][0]  # head follows one cosine over the whole run


def test_plain_schedule_is_transformers_cosine():
    _, _, opt = make()
    sched = build_scheduler(opt, name="cosine", num_training_steps=10, warmup_ratio=0.2)
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 2)


def train_steps(head, body, opt, sched, n, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen)
        loss = head(body(x)).pow(2).mean()
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_checkpoint_round_trip_resumes_bit_exactly(tmp_path):
    head, body, opt = make()
    sched = build_scheduler(opt, name="linear", num_training_steps=12, warmup_ratio=0.25)
    train_steps(head, body, opt, sched, 5, seed=1)
    trainable = {f"head.{k}": v.detach().clone() for k, v in head.state_dict().items()}
    trainable.update({f"body.{k}": v.detach().clone() for k, v in body.state_dict().items()})
    state = LoopState(epoch=1, global_step=5, best_value=0.5, history=[{"epoch": 1, "val/mAP": 0.5}], run_id="abc")
    save_checkpoint(
        tmp_path / "last", trainable=trainable, config_yaml="a: 1\n", state=state, optimizer=opt, scheduler=sched
    )
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == [
        "config.yaml", "optimizer.json", "optimizer.safetensors", "scheduler.json", "state.json",
        "trainable.safetensors",
    ]  # fmt: skip
    train_steps(head, body, opt, sched, 4, seed=2)
    expected = [p.detach().clone() for p in [*head.parameters(), *body.parameters()]]

    head2, body2, opt2 = make(seed=99)
    sched2 = build_scheduler(opt2, name="linear", num_training_steps=12, warmup_ratio=0.25)
    weights = load_trainable(tmp_path / "last")
    head2.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("head.")})
    body2.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("body.")})
    restore_optimization(tmp_path / "last", opt2, sched2)
    assert load_state(tmp_path / "last") == state
    train_steps(head2, body2, opt2, sched2, 4, seed=2)
    for a, b in zip(expected, [*head2.parameters(), *body2.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_checkpoint_write_replaces_previous_atomically(tmp_path):
    for epoch in (1, 2):
        save_checkpoint(
            tmp_path / "best",
            trainable={"w": torch.full((2,), float(epoch))},
            config_yaml="",
            state=LoopState(epoch=epoch),
        )
    assert load_state(tmp_path / "best").epoch == 2
    assert load_trainable(tmp_path / "best")["w"].tolist() == [2.0, 2.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
