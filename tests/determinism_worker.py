"""One fresh process's results for ``tests/test_determinism.py``: every backend under every
storage mode steps the same params with the same gradients, and prints one digest of the
params and state per run (``name digest`` lines).  First of all, it checks that torch's first
vector-math calls after a fused step compute what later calls do (``first-vector-math-calls``:
``same``, or the functions that differed)."""

from __future__ import annotations

import hashlib
import sys

import torch

import adamkit

#: storage modes: param dtype and options
MODES = {
    "fp32": (torch.float32, {}),
    "fp32-int8": (torch.float32, {"state_precision": "int8"}),
    "fp32-int4": (torch.float32, {"state_precision": "int4"}),
    "bf16-nearest": (torch.bfloat16, {}),
    "bf16-kahan": (torch.bfloat16, {"rounding": "kahan"}),
    "bf16-stochastic": (torch.bfloat16, {"rounding": "stochastic"}),
    "bf16-master-fp32": (torch.bfloat16, {"master_weights": "fp32", "state_precision": "fp32"}),
    "bf16-master-24bit": (torch.bfloat16, {"master_weights": "24bit", "state_precision": "int8"}),
    "bf16-states": (torch.float32, {"state_precision": "bf16"}),
}
#: the interpreted Triton kernel is slow: two modes on small tensors
TRITON_MODES = ("fp32", "bf16-master-24bit")


def digest(opt, params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(_bytes(p))
        for key, value in sorted(opt.state[p].items()):
            if torch.is_tensor(value):
                h.update(key.encode() + _bytes(value))
    return h.hexdigest()[:16]


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()


def run(backend: str, mode: str) -> str:
    dtype, options = MODES[mode]
    size, rows = (512, 16) if backend == "triton" else (4096, 64)
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter((torch.randn(size, generator=g) * 0.02).to(dtype)),
        torch.nn.Parameter(torch.randn(rows, 48, generator=g).to(dtype)),
    ]
    opt = adamkit.AdamW(params, lr=1e-3, weight_decay=0.01, backend=backend, seed=3, **options)
    for _ in range(3):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-3).to(dtype)
        opt.step()
    return digest(opt, params)


def first_vector_math_calls() -> str:
    """After the fused CPU kernel's first step (numba's pool has run): do torch's first
    sqrt, exp and log on 4,096 elements (two threads) equal their second calls?"""
    param = torch.nn.Parameter(torch.zeros(4096))
    param.grad = torch.ones(4096)
    adamkit.AdamW([param], lr=1e-3).step()
    x = torch.rand(4096, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    differed = [
        f"{name}/{dtype}".replace("torch.", "")
        for dtype in (torch.float32, torch.float64)
        for name in ("sqrt", "exp", "log")
        if not torch.equal(getattr(x.to(dtype), name)(), getattr(x.to(dtype), name)())
    ]
    return ",".join(differed) or "same"


if __name__ == "__main__":
    print(f"first-vector-math-calls {first_vector_math_calls()}", flush=True)
    for backend in sys.argv[1:]:
        for mode in TRITON_MODES if backend == "triton" else MODES:
            print(f"{backend}/{mode} {run(backend, mode)}", flush=True)
