"""Cautious updates (``cautious=True``, Liang et al., 2024) on every class and every
backend that runs them, against the NumPy reference in float64; and what makes them
cautious: no element moves against its gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from matrix import ALWAYS_DECOUPLED, FAMILY, refused

from adamkit import reference
from adamkit.kernels import KERNELS

BACKENDS = [name for name, kernel in KERNELS.items() if kernel.supports(torch.device("cpu"))]
STEPS = 25

#: the rows whose class runs cautious updates
CAUTIOUS = [name for name in FAMILY if "cautious" not in refused(name)]


def _skip_unless_it_runs(name: str, backend: str) -> None:
    if not KERNELS[backend].runs(FAMILY[name][2]):
        pytest.skip(f"the {backend} kernel does not run {name}")


def _run(name: str, backend: str, weight_decay: float, cautious: bool = True):
    """The class ``name`` and the reference over the same float64 gradients (a vector
    and a complex param, a group each); returns (params, reference thetas)."""
    cls, _, algorithm = FAMILY[name]
    g = torch.Generator().manual_seed(5)
    starts = [torch.randn(40, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g, dtype=torch.complex128)]
    params = [torch.nn.Parameter(s.clone()) for s in starts]
    kwargs = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": weight_decay}
    if name not in ALWAYS_DECOUPLED:
        kwargs["decoupled_weight_decay"] = True
    optimizer = cls([{"params": [p]} for p in params], backend=backend, cautious=cautious, **kwargs)
    hp = reference.Hyperparameters(lr=1e-2, weight_decay=weight_decay, weight_decay_mode="decoupled", cautious=cautious)
    thetas = [s.numpy().copy() for s in starts]
    states = [reference.ReferenceState() for _ in starts]
    for _ in range(STEPS):
        grads = [torch.randn(s.shape, generator=g, dtype=s.dtype) for s in starts]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        optimizer.step()
        for i, grad in enumerate(grads):
            thetas[i] = reference.STEP_FUNCTIONS[algorithm](thetas[i], grad.numpy(), states[i], hp)
    return params, thetas


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CAUTIOUS)
def test_cautious_matches_the_reference(name, backend, float64_default):
    _skip_unless_it_runs(name, backend)
    params, thetas = _run(name, backend, weight_decay=0.1)
    plain, plain_thetas = _run(name, backend, weight_decay=0.1, cautious=False)
    for p, theta, q in zip(params, thetas, plain):
        expected = theta
        scale = np.max(np.abs(expected))
        assert np.max(np.abs(p.detach().numpy() - expected)) <= 1e-12 * scale
        assert not torch.equal(p, q)  # the masks did something


@pytest.mark.parametrize("against", [-1.0, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CAUTIOUS)
def test_no_element_moves_against_its_gradient(name, backend, against):
    """One cautious step from a state whose momentum disagrees with the new gradient in
    half the elements, or whose gradient there is exactly zero (an update agrees only
    where u g > 0): those stay where they were (no decay here)."""
    _skip_unless_it_runs(name, backend)
    cls = FAMILY[name][0]
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
    optimizer = cls([p], lr=1e-2, weight_decay=0.0, cautious=True, backend=backend)
    for grad in (torch.ones(64, dtype=torch.float64), torch.ones(64, dtype=torch.float64)):
        p.grad = grad.clone()
        optimizer.step()  # (ADOPT's first step only measures v)
    before = p.detach().clone()
    flip = torch.arange(64) % 2 == 0
    p.grad = torch.where(flip, against, 1.0).to(torch.float64) * 1e-3  # small: m keeps its sign
    optimizer.step()
    moved = p.detach() - before
    assert torch.all(moved[flip] == 0)
    assert torch.all(moved[~flip] < 0)


def test_the_fused_kernels_run_it_by_default():
    import adamkit
    from adamkit.kernels import default_backend

    p = torch.nn.Parameter(torch.randn(8))
    p.grad = torch.randn(8)
    fused = "cpu" if KERNELS["cpu"].available() else "foreach"
    assert default_backend({p.device}, differentiable=False) == fused
    for options in ({}, {"fused": True}):
        before = p.detach().clone()
        adamkit.AdamW([p], cautious=True, **options).step()
        assert not torch.equal(p.detach(), before)


@pytest.mark.parametrize("name", CAUTIOUS)
def test_gradients_flow_through_cautious_steps(name, float64_default):
    """``differentiable=True``: d(loss)/d(lr) through three cautious steps equals a central
    finite difference (the masks are piecewise constant in lr)."""
    cls = FAMILY[name][0]
    g = torch.Generator().manual_seed(2)
    start = torch.randn(30, generator=g, dtype=torch.float64)
    grads = [torch.randn(30, generator=g, dtype=torch.float64) for _ in range(3)]

    def loss_after(lr: torch.Tensor) -> torch.Tensor:
        p = start.clone().requires_grad_(False)
        p = p + 0 * lr  # a non-leaf the optimizer may step in place
        optimizer = cls([p], lr=lr, differentiable=True, cautious=True)
        for grad in grads:
            p.grad = grad.clone()
            optimizer.step()
        return (p * p).sum()

    lr = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss_after(lr).backward()
    h = 1e-6
    with torch.no_grad():
        numeric = (loss_after(torch.tensor(0.05 + h)) - loss_after(torch.tensor(0.05 - h))) / (2 * h)
    assert lr.grad is not None
    torch.testing.assert_close(lr.grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (NumPy, under the interpreter)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["AdamW", "NAdam", "StableAdamW"])
def test_nan_and_inf_gradients_do_what_the_single_tensor_path_does(name, backend):
    """A NaN and two infinite gradient elements one step: the update there is NaN
    (inf / inf), not counted as agreeing and not masked away (NaN times 0 is NaN, as in
    the reference), so every backend leaves NaN in the same places, and the other
    elements (whose scale depends on the count) within fp32 rounding of single_tensor."""
    cls = FAMILY[name][0]
    options = {} if name == "StableAdamW" else {"cautious": True}

    def run(backend):
        g = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(40, generator=g))]
        optimizer = cls(params, lr=1e-2, backend=backend, **options)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            if step == 2:
                params[0].grad[5], params[0].grad[7], params[1].grad[3] = math.nan, math.inf, -math.inf
            optimizer.step()
        return params

    expected = run("single_tensor")
    for ours, theirs in zip(run(backend), expected):
        assert torch.equal(ours.isnan(), theirs.isnan()) and int(theirs.isnan().sum()) >= 1
        finite = theirs.isfinite()
        torch.testing.assert_close(ours[finite], theirs[finite], rtol=2e-6, atol=1e-6)
