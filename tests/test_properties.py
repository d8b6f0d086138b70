"""Property-based tests: random shapes, hyperparameters and step counts.

float64: adamkit equals the NumPy reference to 1e-12 (normwise relative).
float32: adamkit equals torch.optim (foreach=False) bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from oracle import max_relative_error

import adamkit
from adamkit import reference

OURS = {"Adam": adamkit.Adam, "AdamW": adamkit.AdamW, "AdaMax": adamkit.AdaMax}
TORCH = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "AdaMax": torch.optim.Adamax}

shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)


@st.composite
def configurations(draw):
    name = draw(st.sampled_from(list(OURS)))
    kwargs = {
        "lr": draw(st.floats(1e-5, 0.5)),
        "betas": (draw(st.floats(0.0, 0.99)), draw(st.floats(0.5, 0.9999))),
        "eps": draw(st.floats(1e-10, 1e-2)),
        "weight_decay": draw(st.sampled_from([0.0, draw(st.floats(1e-4, 0.5))])),
        "maximize": draw(st.booleans()),
    }
    if name != "AdaMax":
        kwargs["amsgrad"] = draw(st.booleans())
    if name == "Adam":
        kwargs["decoupled_weight_decay"] = draw(st.booleans())
    backend = draw(st.sampled_from(["single_tensor", "foreach"]))
    return name, kwargs, backend


@settings(max_examples=60, deadline=None)
@given(configurations(), st.lists(shapes, min_size=1, max_size=3), st.integers(1, 25), st.integers(0, 2**31 - 1))
def test_float32_bit_identical_to_torch(config, param_shapes, steps, seed):
    name, kwargs, backend = config
    g = torch.Generator().manual_seed(seed)
    start = [torch.randn(shape, generator=g) for shape in param_shapes]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    theirs = [torch.nn.Parameter(p.clone()) for p in start]
    opt_ours = OURS[name](ours, backend=backend, **kwargs)
    opt_torch = TORCH[name](theirs, foreach=False, **kwargs)
    for _ in range(steps):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        opt_ours.step()
        opt_torch.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)


@settings(max_examples=60, deadline=None)
@given(configurations(), shapes, st.integers(1, 25), st.integers(0, 2**31 - 1), st.booleans())
def test_float64_matches_reference(config, shape, steps, seed, decouple_lr):
    name, kwargs, backend = config
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(shape)
    param = torch.nn.Parameter(torch.tensor(theta))
    if decouple_lr:
        kwargs = {**kwargs, "decouple_lr": True, "max_lr": kwargs["lr"] * 2}
    opt = OURS[name]([param], backend=backend, **kwargs)

    decoupled = name == "AdamW" or kwargs.get("decoupled_weight_decay", False)
    hp = reference.Hyperparameters(
        lr=kwargs["lr"],
        beta1=kwargs["betas"][0],
        beta2=kwargs["betas"][1],
        eps=kwargs["eps"],
        weight_decay=kwargs["weight_decay"],
        weight_decay_mode="fully_decoupled" if decouple_lr else ("decoupled" if decoupled else "l2"),
        max_lr=kwargs.get("max_lr"),
        amsgrad=kwargs.get("amsgrad", False),
        maximize=kwargs["maximize"],
    )
    step = reference.STEP_FUNCTIONS["adamax" if name == "AdaMax" else "adam"]
    state = reference.ReferenceState()
    for _ in range(steps):
        grad = rng.standard_normal(shape)
        param.grad = torch.tensor(grad)
        opt.step()
        theta = step(theta, grad, state, hp)
    assert max_relative_error(param.detach().numpy(), theta) <= 1e-12
