"""Fused kernels on bf16 and fp16 params: element math in fp32, each value rounded
once when stored: the param to nearest even, the 16-bit moments stochastically.

Oracle: one step from identical low-precision state, computed by the NumPy float64
reference.  The fused kernel computes in fp32, a few roundings of 2^-24 relative to
the operands it combines, then rounds once to the dtype.  So each value must lie
within one ulp of the dtype at the result plus 4 fp32 roundings at the operands'
magnitude (the latter matters only under cancellation, e.g. m_new = 0.9 m + 0.1 g
with g = -9 m), and since the fp32 error is tiny next to a bf16/fp16 ulp, almost
every param must be the exact result rounded to nearest, and almost every moment one
of the exact result's two neighbours, chosen without bias.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from matrix import CONFIGS, CPU_FUSED_BACKENDS, reference_setup

import adamkit
from adamkit import reference, rounding

N = 200_000


def as_f64(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy().copy()


MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}
SMALLEST_SUBNORMAL = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}


def ulp(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The spacing of ``dtype`` numbers at |x| (subnormal spacing near zero)."""
    _, exponent = np.frexp(np.abs(x))
    return np.maximum(np.ldexp(1.0, exponent - 1 - MANTISSA_BITS[dtype]), SMALLEST_SUBNORMAL[dtype])


def check_close(actual: torch.Tensor, expected: np.ndarray, operand_scale: np.ndarray, *, stochastic=False) -> None:
    got = as_f64(actual)
    spacing = ulp(expected, actual.dtype)
    bound = spacing + 4 * 2.0**-24 * operand_scale
    assert np.all(np.abs(got - expected) <= bound)
    if not stochastic:
        rounded = torch.from_numpy(expected).to(actual.dtype)
        assert (actual == rounded).float().mean() >= 0.999
        return
    lower = rounding.toward_zero(expected, actual.dtype)
    neighbours = (rounding.to_float(lower, actual.dtype), rounding.to_float(lower + 1, actual.dtype))
    signed = [np.copysign(n, expected) for n in neighbours]
    assert np.mean((got == signed[0]) | (got == signed[1])) >= 0.999
    assert abs(np.mean((got - expected) / spacing)) < 0.02  # unbiased


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_one_step_matches_rounded_reference(backend, dtype, config):
    cls, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    n = N if backend != "triton" else N // 10  # Triton's CPU interpreter is slow
    param = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype))
    # a fixed rounding seed: the moments' random bits do not depend on which tests ran
    # before in this process (a seed drawn from torch's generator would)
    opt = cls([param], lr=1e-2, backend=backend, seed=0, **kwargs)
    for _ in range(3):  # non-trivial state
        param.grad = torch.randn(n, generator=g).to(dtype)
        opt.step()

    group, state = opt.param_groups[0], opt.state[param]
    second = "exp_inf" if cls is adamkit.AdaMax else "exp_avg_sq"
    ref_state = reference.ReferenceState(
        step=int(state["step"].item()),
        exp_avg=as_f64(state["exp_avg"]),
        exp_avg_sq=as_f64(state[second]),
        max_exp_avg_sq=as_f64(state["max_exp_avg_sq"]) if kwargs.get("amsgrad") else None,
    )
    algorithm, hp = reference_setup(config, group["lr"], group["max_lr"])
    grad = torch.randn(n, generator=g).to(dtype)
    before = {"param": as_f64(param), "m": ref_state.exp_avg.copy(), "v": ref_state.exp_avg_sq.copy()}
    step = reference.STEP_FUNCTIONS[algorithm]
    expected_param = step(before["param"], as_f64(grad), ref_state, hp)
    param.grad = grad
    opt.step()

    effective_grad = np.abs(as_f64(grad)) + np.abs(before["param"]) * kwargs.get("weight_decay", 0.0)
    check_close(param.detach(), expected_param, np.maximum(np.abs(before["param"]), np.abs(expected_param)))
    check_close(state["exp_avg"], ref_state.exp_avg, np.maximum(np.abs(before["m"]), effective_grad), stochastic=True)
    check_close(
        state[second],
        ref_state.exp_avg_sq,
        np.maximum(np.abs(before["v"]), effective_grad**2 + effective_grad),
        stochastic=True,
    )


THREADS_SCRIPT = """
import numba, torch, adamkit
from adamkit.kernels import cpu

during = []  # nothing of numba's thread pool is touched before the first step
launch = cpu.launch._launch
cpu.launch._launch = lambda *args: (during.append(numba.get_num_threads()), launch(*args))
for threads in (1, 2, 1):
    torch.set_num_threads(threads)
    p = torch.nn.Parameter(torch.randn(100_000))
    opt = adamkit.AdamW([p], backend="cpu", state_precision="int8")
    p.grad = torch.randn_like(p)
    opt.step()
    print(threads, torch.get_num_threads(), during[-1], numba.get_num_threads(), numba.config.NUMBA_NUM_THREADS)
"""


def test_the_cpu_kernel_runs_on_torchs_threads_and_leaves_them_as_the_user_set_them():
    """In a fresh process: the first time numba's thread pool is touched, its OpenMP
    layer initialises the OpenMP runtime torch shares, which used to turn a user's
    torch.set_num_threads(1) into numba's count.  After each step torch's and numba's settings are what they
    were, and the kernel ran on min(torch's threads, numba's pool)."""
    import numba

    result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    for line in result.stdout.splitlines():
        threads, torch_after, during, numba_after, numba_default = map(int, line.split())
        assert torch_after == threads, line
        assert during == min(threads, numba.config.NUMBA_NUM_THREADS) and numba_after == numba_default, line
