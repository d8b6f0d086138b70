"""Hostile inputs that must behave exactly as torch.optim does: mixed dtypes in one
group (fp32 and fp64 as torch; bf16 and fp16 as they step alone), NaN/Inf gradients
(default: propagate, as torch), empty param groups, groups of zero-size tensors,
params frozen mid-run."""

from __future__ import annotations

import math

import pytest
import torch
from matrix import CPU_BACKENDS

import adamkit

PAIRS = [(adamkit.Adam, torch.optim.Adam), (adamkit.AdamW, torch.optim.AdamW), (adamkit.AdaMax, torch.optim.Adamax)]
BACKENDS = ["single_tensor", "foreach"]
#: the running maxima a NaN must stay in: (pair, options, state key)
RUNNING_MAXIMA = [
    ((adamkit.Adam, torch.optim.Adam), {"amsgrad": True}, "max_exp_avg_sq"),
    ((adamkit.AdaMax, torch.optim.Adamax), {}, "exp_inf"),
]


def twin_params(*tensors):
    return [torch.nn.Parameter(t.clone()) for t in tensors], [torch.nn.Parameter(t.clone()) for t in tensors]


def step_both(ours, theirs, opt_ours, opt_torch, grads):
    for a, b, g in zip(ours, theirs, grads):
        a.grad = None if g is None else g.clone()
        b.grad = None if g is None else g.clone()
    opt_ours.step()
    opt_torch.step()


def assert_identical(ours, theirs):
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_in_one_group(pair, backend):
    """fp32, fp64, bf16 and fp16 params in one group: the fp32 and fp64 ones against
    torch's matching implementation, bit for bit; all of them exactly as when each
    dtype has a group of its own (the 16-bit ones round their moments stochastically,
    unlike torch; their random streams follow the param's index in the optimizer)."""
    g = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
    ours, theirs = twin_params(*(torch.randn(5, 3, generator=g).to(d) for d in dtypes))
    split = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt_ours = pair[0](ours, lr=1e-2, backend=backend, seed=3)
    opt_torch = pair[1](theirs[:2], lr=1e-2, foreach=backend == "foreach")
    opt_split = pair[0]([{"params": split[:2]}, {"params": split[2:]}], lr=1e-2, backend=backend, seed=3)
    for _ in range(50):
        grads = [torch.randn(5, 3, generator=g).to(p.dtype) for p in ours]
        for params in (ours, theirs[:2], split):
            for p, grad in zip(params, grads):
                p.grad = grad.clone()
        for opt in (opt_ours, opt_torch, opt_split):
            opt.step()
    assert_identical(ours[:2], theirs[:2])
    assert_identical(ours, split)


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_gradients_propagate_like_torch(pair, backend, bad):
    ours, theirs = twin_params(torch.linspace(-1, 1, 6), torch.ones(4))
    opt_ours, opt_torch = pair[0](ours, backend=backend), pair[1](theirs, foreach=False)
    for step in range(6):
        grads = [torch.linspace(0.1, 0.6, 6), torch.ones(4)]
        if step == 2:
            grads[0][3] = bad
        step_both(ours, theirs, opt_ours, opt_torch, grads)
    assert_identical(ours, theirs)
    assert not torch.isfinite(ours[0]).all()  # torch's default: the bad element is poisoned
    for key in opt_torch.state[theirs[0]]:
        torch.testing.assert_close(
            opt_ours.state[ours[0]][key], opt_torch.state[theirs[0]][key], rtol=0, atol=0, equal_nan=True
        )


@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: p[0].__name__)
def test_empty_group_and_zero_size_params(pair):
    ours, theirs = twin_params(torch.randn(3), torch.empty(0), torch.empty(2, 0, 4))
    opt_ours = pair[0]([{"params": []}, {"params": ours}])
    opt_torch = pair[1]([{"params": []}, {"params": theirs}], foreach=False)
    for _ in range(3):
        step_both(ours, theirs, opt_ours, opt_torch, [torch.ones_like(p) for p in ours])
    assert_identical(ours, theirs)
    assert opt_ours.state_dict()["state"].keys() == opt_torch.state_dict()["state"].keys()


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_frozen_mid_run_keeps_its_state(backend):
    """A param whose grad is None stops stepping: its step count and moments freeze."""
    ours, theirs = twin_params(torch.randn(4), torch.randn(4))
    opt_ours, opt_torch = adamkit.Adam(ours, backend=backend), torch.optim.Adam(theirs, foreach=False)
    for step in range(10):
        step_both(ours, theirs, opt_ours, opt_torch, [torch.ones(4), torch.ones(4) if step < 4 else None])
    assert_identical(ours, theirs)
    assert opt_ours.state[ours[1]]["step"].item() == 4 and opt_ours.state[ours[0]]["step"].item() == 10


def test_optimizer_with_no_params_is_rejected_like_torch():
    with pytest.raises(ValueError) as theirs:
        torch.optim.Adam([])
    with pytest.raises(ValueError) as ours:
        adamkit.Adam([])
    assert str(theirs.value) in str(ours.value)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pair,options,key", RUNNING_MAXIMA, ids=["amsgrad", "adamax"])
def test_a_nan_gradient_poisons_a_running_maximum_on_every_backend(pair, options, key, backend):
    """AMSGrad's maximum and AdaMax's infinity norm keep a NaN, as torch's maximum does
    (a fused kernel's ``max`` once kept the other operand, so the NaN was forgotten)."""
    ours, theirs = twin_params(torch.linspace(-1, 1, 6))
    opt_ours, opt_torch = pair[0](ours, backend=backend, **options), pair[1](theirs, **options)
    for step in range(4):
        grads = [torch.linspace(0.1, 0.6, 6)]
        if step == 1:
            grads[0][3] = math.nan
        step_both(ours, theirs, opt_ours, opt_torch, grads)
    expected = opt_torch.state[theirs[0]][key].isnan()
    assert expected.tolist() == [False, False, False, True, False, False]
    assert torch.equal(opt_ours.state[ours[0]][key].isnan(), expected)
    assert torch.equal(ours[0].isnan(), theirs[0].isnan())
