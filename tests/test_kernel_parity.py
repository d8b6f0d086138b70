"""The two fused kernels are one computation: the Triton kernel (on ``DEVICE``: a GPU
with Triton's real compiler under ``ADAMKIT_TEST_DEVICE=cuda``, else the CPU under
Triton's interpreter) and the numba CPU kernel, fed the same params and gradients,
store bit-identical params and state after every step, in every param dtype, state
precision and master-weight/rounding mode.

Both compute each element op by op in IEEE arithmetic (fp32, fp64 for fp64 params),
with no fused multiply-adds, and store with the same rounding rules and random bits,
so nothing may differ, not even in the last bit.  The CPU kernel is held to the NumPy
reference by the conformance suites; this holds the GPU to the CPU kernel."""

from __future__ import annotations

import pytest
import torch
from matrix import DEVICE

import adamkit
from adamkit.kernels import KERNELS

pytestmark = pytest.mark.skipif(
    not (KERNELS["triton"].available() and KERNELS["triton"].supports(DEVICE) and KERNELS["cpu"].available()),
    reason="needs the Triton kernel on the test device and the numba CPU kernel",
)

#: (optimizer, param dtype, options): every storage path of the kernels
CASES = {
    "adamw-fp32": (adamkit.AdamW, torch.float32, {}),
    "adam-fp32-amsgrad-l2-maximize": (adamkit.Adam, torch.float32, {"amsgrad": True, "maximize": True}),  # L2 decay
    "adamax-fp32": (adamkit.AdaMax, torch.float32, {}),
    "adamw-fp64": (adamkit.AdamW, torch.float64, {}),
    "adamw-fp64-amsgrad": (adamkit.AdamW, torch.float64, {"amsgrad": True}),
    "adamw-fp32-bf16-states": (adamkit.AdamW, torch.float32, {"state_precision": "bf16"}),
    "adamw-bf16-nearest": (adamkit.AdamW, torch.bfloat16, {}),
    "adamw-bf16-kahan": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan"}),
    "adamw-bf16-kahan-fp32-states": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan", "state_precision": "fp32"}),
    "adamw-bf16-stochastic": (adamkit.AdamW, torch.bfloat16, {"rounding": "stochastic"}),
    "adamw-fp16-nearest-fp32-states": (adamkit.AdamW, torch.float16, {"state_precision": "fp32"}),
    "adamw-fp16-kahan": (adamkit.AdamW, torch.float16, {"rounding": "kahan"}),
    "adamw-fp16-stochastic": (adamkit.AdamW, torch.float16, {"rounding": "stochastic"}),
    "adamw-fp32-int8": (adamkit.AdamW, torch.float32, {"state_precision": "int8"}),
    "adamw-fp32-int4-amsgrad": (adamkit.AdamW, torch.float32, {"state_precision": "int4", "amsgrad": True}),
    "adamw-bf16-kahan-int8": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan", "state_precision": "int8"}),
    "adamax-bf16-stochastic-int4": (
        adamkit.AdaMax,
        torch.bfloat16,
        {"rounding": "stochastic", "state_precision": "int4"},
    ),
}

#: a chunk and a ragged tail (several quantization blocks), a matrix, a 0-d param
SHAPES = [(3000,), (48, 70), ()]
STEPS = 4


def stepped(case: str, backend: str, device: torch.device):
    """``STEPS`` steps from the same start with the same gradients; params and state on
    the CPU."""
    cls, dtype, options = CASES[case]
    g = torch.Generator().manual_seed(11)
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype)) for s in SHAPES]
    opt = cls(params, lr=1e-2, weight_decay=0.1, seed=5, backend=backend, **options)
    for _ in range(STEPS):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, dtype)
        opt.step()
    return [p.detach().cpu() for p in params], [{k: v.cpu() for k, v in opt.state[p].items()} for p in params]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bit patterns (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


@pytest.mark.parametrize("case", list(CASES))
def test_triton_stores_the_cpu_kernels_bits(case):
    triton_params, triton_state = stepped(case, "triton", DEVICE)
    cpu_params, cpu_state = stepped(case, "cpu", torch.device("cpu"))
    for ours, theirs in zip(triton_params, cpu_params):
        assert torch.equal(bits(ours), bits(theirs))
    for ours, theirs in zip(triton_state, cpu_state):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.equal(bits(ours[key].reshape(-1)), bits(theirs[key].reshape(-1))), key
