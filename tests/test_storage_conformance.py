"""Conformance of every kernel's storage policies: ``rounding`` x ``state_precision``
x param dtype, against the float64 reference followed by the rounding specification
(:func:`oracle.stored_reference_step`), with the same random bits.

One step from identical stored state (after a few warm-up steps).  A kernel computes
in fp32, a few roundings of 2^-24 relative to its operands (``err``), then stores
once.  So every stored value lies within one spacing of the storage dtype plus
``err`` of the oracle's, and a 16-bit value may differ from the oracle's only where
the exact result lies within ``err`` of the point where its rounding flips (the
midpoint of its neighbours, or stochastic rounding's threshold for its random bits).
A Kahan pair must represent the unrounded result: |p + c - theta| within a spacing
of c plus ``err``.

The torch-exact kernels step params whose state is in their own dtype with nearest
rounding as torch does (op by op); those cases are torch parity's, not this suite's.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from matrix import CONFIGS, CPU_BACKENDS, reference_setup
from oracle import stored_reference_step

from adamkit import rounding
from adamkit.algorithms import lookup
from adamkit.kernels import KERNELS
from adamkit.state import state_dtype

SHAPES = [(6000,), (40, 50), ()]  # a vector, a matrix stepped through its transpose, a 0-d param


def cases():
    for backend, dtype, mode, precision, config in itertools.product(
        CPU_BACKENDS,
        [torch.bfloat16, torch.float16, torch.float32],
        rounding.ROUNDINGS,
        (None, "fp32", "bf16"),
        CONFIGS,
    ):
        widened = precision is not None and state_dtype(torch.empty(0, dtype=dtype), precision) != dtype
        widened = widened or (rounding.is_low_precision(dtype) and mode != "nearest")
        if KERNELS[backend].torch_exact and not widened:
            continue  # torch's op-by-op arithmetic: held to torch parity instead
        if dtype == torch.float32 and mode == "kahan":
            continue  # the same as nearest for fp32 params (tested in test_storage_features)
        yield pytest.param(backend, dtype, mode, precision, config, id=f"{backend}-{dtype}-{mode}-{precision}-{config}")


def warmed_up(cls, params, generator, dtype, grad_scales=None, **options):
    """An optimizer over ``params`` after three steps (non-trivial state), seed 99;
    ``grad_scales``: per param, None or per-element scales of its gradients."""
    opt = cls(params, lr=1e-2, seed=99, **options)
    for _ in range(3):
        for p, scale in zip(params, grad_scales or [None] * len(params)):
            p.grad = _gradient(p, generator, dtype, scale)
        opt.step()
    return opt


def _gradient(p, generator, dtype, scale=None) -> torch.Tensor:
    g = torch.randn(p.shape, generator=generator)
    return (g if scale is None else g * scale).to(dtype)


def oracle_names(second: str) -> dict[str, str]:
    """State key -> the oracle's name for each moment."""
    return {"exp_avg": "exp_avg", second: "second", "max_exp_avg_sq": "max_second"}


def snapshot_then_step(
    opt, params, generator, dtype, moments_of, grad_scales=None
) -> tuple[list[dict], list[np.ndarray]]:
    """Each param's stored values as float64 (param, step count, ``moments_of(state,
    param)`` under the oracle's names, Kahan compensation), then one more step with
    fresh gradients (scaled as in :func:`warmed_up`); returns the snapshots and those
    gradients."""
    before, grads = [], []
    for p, scale in zip(params, grad_scales or [None] * len(params)):
        state = opt.state[p]
        stored = {"param": as_f64(p), "step": int(state["step"].item()), **moments_of(state, p)}
        if "kahan_compensation" in state:
            stored["compensation"] = as_f64(state["kahan_compensation"])
        before.append(stored)
        p.grad = _gradient(p, generator, dtype, scale)
        grads.append(as_f64(p.grad))
    opt.step()
    return before, grads


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


def spacing_at(values: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.float32:
        return np.maximum(np.abs(values) * 2.0**-23, 2.0**-149)
    if dtype == torch.float64:
        return np.abs(values) * 2.0**-52
    return rounding.spacing(rounding.toward_zero(values, dtype), dtype)


def flip_distance(exact: np.ndarray, dtype: torch.dtype, bits: np.ndarray | None) -> np.ndarray:
    """How far ``exact`` is from the value where its rounding to ``dtype`` flips."""
    lo = rounding.toward_zero(exact, dtype)
    gap = rounding.spacing(lo, dtype)
    fraction = (np.abs(exact) - np.abs(rounding.to_float(lo, dtype))) / gap
    threshold = 0.5 if bits is None else 1.0 - bits / 65536.0
    return np.abs(fraction - threshold) * gap


def check_stored(actual: torch.Tensor, expected: dict, name: str, operand_scale: np.ndarray) -> None:
    got, want, exact = as_f64(actual), expected[name], expected["exact"][name]
    err = 4 * 2.0**-24 * operand_scale
    assert np.all(np.abs(got - want) <= spacing_at(want, actual.dtype) + err), name
    if rounding.is_low_precision(actual.dtype):
        differs = got != want
        near_flip = flip_distance(exact, actual.dtype, expected["bits"].get(name)) <= err
        assert np.all(near_flip[differs]), f"{name}: {differs.sum()} values differ away from a rounding flip"


@pytest.mark.parametrize("backend, dtype, mode, precision, config", list(cases()))
def test_one_step_matches_stored_reference(backend, dtype, mode, precision, config):
    cls, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(
            torch.randn(s[::-1], generator=g).to(dtype).t() if len(s) == 2 else torch.randn(s, generator=g).to(dtype)
        )
        for s in SHAPES
    ]
    opt = warmed_up(cls, params, g, dtype, backend=backend, rounding=mode, state_precision=precision, **kwargs)
    group = opt.param_groups[0]
    algorithm, hp = reference_setup(config, group["lr"], group["max_lr"])
    second = lookup(algorithm).second_moment_key
    names = oracle_names(second)
    before, grads = snapshot_then_step(
        opt, params, g, dtype, lambda state, p: {name: as_f64(state[k]) for k, name in names.items() if k in state}
    )

    for index, (p, stored, grad) in enumerate(zip(params, before, grads)):
        moments = state_dtype(p, precision)
        expected = stored_reference_step(
            algorithm,
            stored,
            grad,
            hp,
            param_dtype=dtype,
            state_dtype=moments,
            rounding_mode=mode,
            seed=99,
            param_index=index,
        )
        state = opt.state[p]
        theta = stored["param"] + stored.get("compensation", 0.0)
        step_size = group["lr"] / (1 - 0.9 ** expected["step"])
        param_scale = np.abs(theta) + np.abs(expected["exact"]["param"]) + 4 * step_size  # |update| <~ 4 step sizes
        effective = np.abs(grad) + 0.1 * np.abs(theta)
        moment_scale = np.maximum(np.abs(stored["exp_avg"]), effective)
        second_scale = np.maximum(np.abs(stored["second"]), effective**2 + effective)
        if "compensation" in expected:
            got = as_f64(p) + as_f64(state["kahan_compensation"])
            bound = spacing_at(expected["compensation"], dtype) + 4 * 2.0**-24 * param_scale
            assert np.all(np.abs(got - expected["exact"]["param"]) <= bound), "kahan pair"
        check_stored(p, expected, "param", param_scale)
        check_stored(state["exp_avg"], expected, "exp_avg", moment_scale)
        check_stored(state[second], expected, "second", second_scale)
        if "max_second" in expected:
            check_stored(state["max_exp_avg_sq"], expected, "max_second", second_scale)
        assert state["exp_avg"].dtype == moments and int(state["step"].item()) == expected["step"]
