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

#: every backend, plain and with quantized states; fused=True as torch spells it
AMP_PATHS = [
    {"fused": True},
    *({"backend": backend} for backend in ("single_tensor", "foreach", "cpu", "triton")),
    {"backend": "cpu", "state_precision": "int8"},
    {"backend": "triton", "state_precision": "int4"},
    {"backend": "foreach", "state_precision": "int8"},
]


def scaled_run(path: dict, poison_step: int | None, scale: float = 1024.0, hand_over: bool | None = None):
    """4 steps of a tiny regression under a GradScaler; optionally an inf gradient.
    ``hand_over=False`` makes the scaler unscale ``.grad`` itself, as for torch's
    non-fused optimizers."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 1)
    opt = adamkit.Adam(model.parameters(), lr=0.05, **path)
    if hand_over is False:
        opt._step_supports_amp_scaling = False
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
    return model, opt, scaler


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


def assert_same_training(model, opt, other_model, other_opt):
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
        assert opt.state[p].keys() == other_opt.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, other_opt.state[q][key]), key


def test_fused_backends_take_the_scale_and_the_others_leave_it_to_the_scaler():
    params = [torch.nn.Parameter(torch.ones(2))]
    for backend in ("cpu", "triton"):
        assert adamkit.Adam(params, backend=backend)._step_supports_amp_scaling
    assert adamkit.Adam(params, fused=True)._step_supports_amp_scaling
    for backend in (None, "single_tensor", "foreach"):  # torch.optim.Adam's default behaviour
        assert not getattr(adamkit.Adam(params, backend=backend), "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("path", AMP_PATHS, ids=str)
def test_grad_scaler_matches_unscaled_training(path):
    """Scaling by a power of two and unscaling are exact: bit-identical to training
    without AMP, params and every state tensor."""
    scaled, opt, _ = scaled_run(path, poison_step=None)
    plain, plain_opt = plain_run(path, steps=4)
    assert_same_training(scaled, opt, plain, plain_opt)


@pytest.mark.parametrize("path", AMP_PATHS, ids=str)
def test_found_inf_step_leaves_params_and_state_untouched(path):
    """An inf gradient on the last step: params, moments and step counts equal a run
    that stopped one step earlier, and the scaler backs off."""
    poisoned, opt, scaler = scaled_run(path, poison_step=3)
    three, three_opt = plain_run(path, steps=3)
    assert_same_training(poisoned, opt, three, three_opt)
    assert opt.state[poisoned.weight]["step"].item() == 3
    assert scaler.get_scale() == 512.0


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_in_kernel_unscaling_equals_the_scalers_own_unscaling(backend):
    """With a scale that is not a power of two, unscaling rounds: the fused kernels
    multiply by fp32(1 / s) exactly as ``scaler.unscale_`` does (a division would
    differ in the last bit)."""
    in_kernel, opt, _ = scaled_run({"backend": backend}, poison_step=None, scale=1000.0)
    by_scaler, scaler_opt, _ = scaled_run({"backend": backend}, poison_step=None, scale=1000.0, hand_over=False)
    assert_same_training(in_kernel, opt, by_scaler, scaler_opt)


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
    assert kernels.default_backend({torch.device("cpu")}, differentiable=True) == "single_tensor"


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
    ref_opt = adamkit.Adam([reference], backend="single_tensor")
    reference.grad = torch.full_like(reference, 2.0)
    ref_opt.step()
    torch.testing.assert_close(after, reference.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(after_inf, before_inf)
