"""``adamkit.gradient_release``: params stepped in backward equal normal stepping, bit for
bit, with a scheduler, across a save/load, and with gradients freed."""

from __future__ import annotations

import io

import pytest
import torch

import adamkit
from adamkit.kernels import KERNELS

BACKENDS = [name for name, kernel in KERNELS.items() if kernel.supports(torch.device("cpu")) and kernel.available()]


def model_and_data(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)) for _ in range(8)]
    return model, data


def make_optimizer(model, backend, **options):
    decay, rest = [model[0].weight, model[2].weight], [model[0].bias, model[2].bias]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0, "lr": 3e-3}]
    opt = adamkit.AdamW(groups, lr=1e-2, backend=backend, **options)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def train(model, opt, scheduler, data, release: bool, reload_at: int | None = None):
    handle = adamkit.gradient_release(model, opt) if release else None
    for step, (x, y) in enumerate(data):
        if step == reload_at:  # save and load mid-run, into the same (attached) optimizer
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer))
        torch.nn.functional.mse_loss(model(x), y).backward()
        if release:
            assert all(p.grad is None for p in model.parameters())  # freed in backward
        opt.step()
        opt.zero_grad()
        scheduler.step()
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("options", [{}, {"state_precision": "int8"}], ids=["fp32", "int8"])
@pytest.mark.parametrize("reload_at", [None, 4])
def test_release_equals_normal_stepping(backend, options, reload_at):
    normal_model, data = model_and_data()
    opt, scheduler = make_optimizer(normal_model, backend, **options)
    train(normal_model, opt, scheduler, data, release=False, reload_at=reload_at)

    released_model, _ = model_and_data()
    released_opt, released_scheduler = make_optimizer(released_model, backend, **options)
    train(released_model, released_opt, released_scheduler, data, release=True, reload_at=reload_at)

    assert all(torch.equal(a, b) for a, b in zip(normal_model.parameters(), released_model.parameters()))
    assert opt.state_dict()["param_groups"] == released_opt.state_dict()["param_groups"]
    mine, theirs = opt.state_dict()["state"], released_opt.state_dict()["state"]
    assert all(torch.equal(mine[i][k], theirs[i][k]) for i in mine for k in mine[i])


def test_a_state_dict_saved_under_release_loads_into_torch():
    model, data = model_and_data()
    opt, scheduler = make_optimizer(model, "cpu")
    train(model, opt, scheduler, data[:3], release=True)
    torch_opt = torch.optim.AdamW(
        [{"params": [model[0].weight, model[2].weight]}, {"params": [model[0].bias, model[2].bias]}]
    )
    torch_opt.load_state_dict(opt.state_dict())
    assert torch.equal(torch_opt.state[model[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])


def test_remove_restores_normal_stepping_and_errors_are_clear():
    model, data = model_and_data()
    opt, _ = make_optimizer(model, "cpu")
    handle = adamkit.gradient_release(model, opt)
    with pytest.raises(RuntimeError, match="already has gradient release attached"):
        adamkit.gradient_release(model, opt)
    handle.remove()
    x, y = data[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    assert all(p.grad is not None for p in model.parameters())
    before = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[0].weight)
    with pytest.raises(TypeError, match="needs an adamkit optimizer, got SGD"):
        adamkit.gradient_release(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"params \[0\] of model_or_params are not in the optimizer"):
        adamkit.gradient_release([torch.nn.Parameter(torch.ones(1))], opt)
