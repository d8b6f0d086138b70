"""GradScaler integration the way torch's fused optimizers do it, and which kernel a
group gets by default.

With ``fused=True`` an optimizer declares ``_step_supports_amp_scaling``: the scaler
hands over ``grad_scale`` and ``found_inf`` instead of unscaling the gradients itself.
Kernels with in-kernel AMP (Triton) unscale on the fly and skip on ``found_inf``
(rolling the step counters back); for the others the front skips the whole step
before touching anything, or unscales into new tensors.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

import adamkit
from adamkit import kernels

AMP_PATHS = [{"fused": True}, {"fused": True, "backend": "triton"}]


def scaled_run(path: dict, poison_step: int | None, scale: float = 1024.0):
    """4 steps of a tiny regression under a GradScaler; optionally an inf gradient."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = adamkit.Adam(model.parameters(), lr=0.05, **path)
    scaler = torch.amp.GradScaler("cpu", init_scale=scale, growth_interval=1000)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for step in range(4):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        scaler.scale(loss).backward()
        if step == poison_step:
            model.weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return model, opt


def plain_run(path: dict, steps: int):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = adamkit.Adam(model.parameters(), lr=0.05, **path)
    x, y = torch.randn(32, 6), torch.randn(32, 1)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("path", AMP_PATHS, ids=str)
def test_grad_scaler_matches_unscaled_training(path):
    """Scaling by a power of two and unscaling are exact: bit-identical to training without AMP."""
    scaled, opt = scaled_run(path, poison_step=None)
    assert opt._step_supports_amp_scaling
    plain, _ = plain_run(path, steps=4)
    for a, b in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("path", AMP_PATHS, ids=str)
def test_found_inf_step_leaves_params_and_state_untouched(path):
    """An inf gradient on the last step: params, moments and step counts equal a run
    that stopped one step earlier."""
    poisoned, opt = scaled_run(path, poison_step=3)
    three, three_opt = plain_run(path, steps=3)
    for p, q in zip(poisoned.parameters(), three.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p]["step"].item() == 3 == three_opt.state[q]["step"].item()
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], three_opt.state[q][key])


def test_users_grads_are_not_unscaled_in_place_by_the_front():
    """fused=True on CPU (no in-kernel AMP): the front unscales into new tensors."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p], fused=True)
    grad = torch.full((3,), 8.0)
    p.grad = grad
    opt.grad_scale, opt.found_inf = torch.tensor(4.0), torch.tensor(0.0)
    opt.step()
    assert torch.equal(p.grad, torch.full((3,), 8.0)) and p.grad is grad


def test_default_on_cuda_is_triton_else_foreach_with_one_warning(monkeypatch):
    cuda = {torch.device("cuda")}
    if kernels.KERNELS["triton"].available():
        assert kernels.default_backend(cuda, differentiable=False) == "triton"
    unavailable = dataclasses.replace(kernels.KERNELS["triton"], available=lambda: False)
    monkeypatch.setitem(kernels.KERNELS, "triton", unavailable)
    monkeypatch.setattr(kernels, "_warned", set())
    with pytest.warns(UserWarning, match="'triton' kernel is not available"):
        assert kernels.default_backend(cuda, differentiable=False) == "foreach"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        assert kernels.default_backend(cuda, differentiable=False) == "foreach"


def test_default_on_cpu_is_the_fused_cpu_kernel():
    assert kernels.default_backend({torch.device("cpu")}, differentiable=False) == "cpu"
    assert kernels.default_backend({torch.device("cpu")}, differentiable=True) == "reference"


def test_triton_fallback_for_strided_params_still_honours_the_scaler():
    """A sliced (non-contiguous) param sends the Triton path to foreach ops: the
    GradScaler's found_inf must still skip, and grad_scale still unscale."""
    base = torch.randn(4, 6)
    results = []
    for scale, found in ((4.0, 0.0), (4.0, 1.0)):
        p = torch.nn.Parameter(base[:, ::2].clone().t().contiguous().t())  # transposed: non-contiguous
        opt = adamkit.Adam([p], fused=True, backend="triton")
        p.grad = torch.full_like(p, 2.0) * scale
        opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(found)
        before = p.detach().clone()
        opt.step()
        results.append((before, p.detach().clone(), opt.state[p].get("step")))
    (before, after, step), (before_inf, after_inf, step_inf) = results
    reference = torch.nn.Parameter(before.clone())
    ref_opt = adamkit.Adam([reference], backend="reference")
    reference.grad = torch.full_like(reference, 2.0)
    ref_opt.step()
    torch.testing.assert_close(after, reference.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(after_inf, before_inf)
