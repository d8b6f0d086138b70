"""The conformance suite: every registered kernel against the NumPy reference, for
every option (including those torch lacks), dtype and layout.

float64 params must match the float64 reference to 1e-12 (normwise relative);
float32 params are compared with the reference run from the same float32 start,
allowing a few float32 roundings per step.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import numpy as np
import pytest
import torch
from matrix import FAMILY, Case, clone_groups, make_params, numpy_of, reference_cases, run
from oracle import max_relative_error, run_reference

STEPS = 100
#: Triton under its CPU interpreter (CI without a GPU) costs about a second a step; there
#: its cases run 12 steps (past RAdam's rectification at step 6 and ADOPT's first step),
#: while ``test_kernel_parity.py`` holds its bits to the numba kernel's.  On a GPU
#: (``ADAMKIT_TEST_DEVICE=cuda``) it runs all of them.
INTERPRETED_STEPS = 12


def steps_for(case: Case) -> int:
    interpreted = case.backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return INTERPRETED_STEPS if interpreted else STEPS


@contextmanager
def scalar_state_dtype_for(case: Case) -> Iterator[None]:
    """NAdam keeps ``mu_product`` in torch's scalar dtype, float64 only under a float64
    default dtype (torch's rule, followed bit for bit): a float64 case runs under it."""
    previous = torch.get_default_dtype()
    if case.algorithm == "nadam" and case.dtype == torch.float64:
        torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def run_both(case: Case, steps: int):
    ours_cls = FAMILY[case.optimizer][0]
    groups = make_params(case)
    start = clone_groups(groups)
    initial = [numpy_of(p) for g in start for p in g["params"]]
    with scalar_state_dtype_for(case):
        optimizer = ours_cls(groups, **case.adamkit_kwargs())
        run(optimizer, groups, steps)
    expected_params, expected_states = run_reference(case, start, steps)
    params = [p for g in groups for p in g["params"]]
    return optimizer, params, expected_params, expected_states, initial


@pytest.mark.parametrize("case", reference_cases(), ids=lambda c: c.id)
def test_float64_matches_reference(case: Case):
    optimizer, params, expected_params, expected_states, _ = run_both(case, steps_for(case))
    second = "exp_inf" if case.algorithm == "adamax" else "exp_avg_sq"
    for p, theta, ref_state in zip(params, expected_params, expected_states):
        assert max_relative_error(numpy_of(p), theta) <= 1e-12
        state = optimizer.state[p]
        assert int(state["step"].item()) == ref_state.step
        assert max_relative_error(numpy_of(state["exp_avg"]), reference_moments(ref_state, theta, "exp_avg")) <= 1e-12
        assert max_relative_error(numpy_of(state[second]), reference_moments(ref_state, theta, "exp_avg_sq")) <= 1e-12
        if case.amsgrad:
            expected = reference_moments(ref_state, theta, "max_exp_avg_sq")
            assert max_relative_error(numpy_of(state["max_exp_avg_sq"]), expected) <= 1e-12


def reference_moments(ref_state, like, name):
    from adamkit.specs.reference import moments_as

    return moments_as(ref_state, like)[name]


FLOAT32_STEPS = 10


@pytest.mark.parametrize(
    "case",
    # the float64 cases in float32, once each (without their capturable twins)
    list(dict.fromkeys(replace(c, dtype=torch.float32, tensor_lr=False, capturable=False) for c in reference_cases())),
    ids=lambda c: c.id,
)
def test_float32_tracks_reference(case: Case):
    """float32 element math: each step adds a few float32 roundings (2^-24 relative) at
    the magnitude the param had along its path; allow 4 per step."""
    _, params, expected_params, _, initial = run_both(case, FLOAT32_STEPS)
    for p, theta, theta0 in zip(params, expected_params, initial):
        assert p.dtype in (torch.float32, torch.complex64)
        if theta.size == 0:
            continue
        path_scale = max(np.max(np.abs(theta0)), np.max(np.abs(theta)))
        error = np.max(np.abs(numpy_of(p).astype(theta.dtype) - theta))
        assert error <= 4 * FLOAT32_STEPS * 2.0**-24 * path_scale
