"""How a group is stepped (:mod:`adamkit.stepping`): which path torch's flags pick,
capturable groups never reading a tensor on the host, and the step's caches: from the
second step on nothing is validated or rebuilt again (a CUDA graph is captured after
one eager step), and a state emptied by hand is noticed."""

from __future__ import annotations

import pytest
import torch

import adamkit
from adamkit import kernels, stepping


@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW, adamkit.AdaMax])
@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "triton"])
def test_capturable_step_never_reads_a_tensor_on_the_host(cls, backend, monkeypatch):
    """The capturable contract: no ``.item()``/``float()``/``bool()`` of a tensor during
    step (on CUDA each would be a host sync, forbidden inside graph capture)."""
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5))]
    lr = torch.tensor(0.01, dtype=torch.float64)
    opt = cls(params, lr=lr, weight_decay=0.1, capturable=True, backend=backend, decouple_lr=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state initialisation may read; the steady-state step may not

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor inside a capturable step")

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert all(opt.state[p]["step"].item() == 3 for p in params)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_foreach_false_means_per_tensor_path_on_any_device(device):
    devices = {torch.device(device)}
    opt = adamkit.Adam([torch.nn.Parameter(torch.randn(2))], foreach=False)
    name = stepping.backend_name(opt.param_groups[0], devices)
    assert kernels.resolve(name, devices, differentiable=False).name == "single_tensor"


@pytest.mark.parametrize("backend", ["cpu", "foreach"])
def test_the_second_step_rebuilds_nothing_and_a_cleared_state_is_noticed(backend):
    """A step's first run initialises every group's state before any group steps and
    keys the groups on it: the second step finds every key (and the fused kernels'
    buckets) as the first left them.  Found on a GPU: the keys counted the state table
    before it was filled, so the second step rebuilt its address tables, which copies
    from the host and fails inside CUDA graph capture."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(5, 3))]}, {"params": [torch.nn.Parameter(torch.randn(4))]}]
    opt = adamkit.AdamW(groups, lr=0.1, backend=backend)
    params = [p for g in groups for p in g["params"]]

    def step():
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return [dict(opt._stepper.cache(g)) for g in opt.param_groups]

    first = step()
    second = step()
    for before, after in zip(first, second):
        assert before["validated_key"] == after["validated_key"]
        assert all(after[name] is before[name] for name in ("cpu", "triton") if name in before)
    fresh = adamkit.AdamW([{"params": [p.detach().clone() for p in g["params"]]} for g in groups], lr=0.1)
    opt.state.clear()  # start again from zero moments: the next step must not use the old ones
    step()
    for p in [p for g in fresh.param_groups for p in g["params"]]:
        p.grad = torch.ones_like(p)
    fresh.step()
    for p, q in zip(params, [p for g in fresh.param_groups for p in g["params"]]):
        assert torch.equal(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
        assert torch.equal(p, q)
