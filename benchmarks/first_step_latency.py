"""First-step latency of the fused CPU kernel, cold (empty numba cache: compiles)
and warm (compiled code loaded from numba's on-disk cache), each in a fresh process,
for fp32 and bf16 params with states in the param's dtype, fp32 params with int8 and
int4 states, and bf16 params with 24-bit master weights and int8 states (each
storage combination is its own specialization).

    python benchmarks/first_step_latency.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

PROBE = r"""
import time
t0 = time.perf_counter()
import torch, adamkit
t1 = time.perf_counter()
params = [torch.nn.Parameter(torch.randn(1000, dtype=DTYPE)) for _ in range(4)]
for p in params:
    p.grad = torch.randn_like(p)
opt = adamkit.Adam(params, backend="cpu", **OPTIONS)
t2 = time.perf_counter()
opt.step()
t3 = time.perf_counter()
opt.step()
t4 = time.perf_counter()
print(f"{t1 - t0:.2f} {t3 - t2:.3f} {(t4 - t3) * 1e3:.3f}")
"""


#: (param dtype, states as printed, optimizer options)
SETTINGS = (
    ("float32", "param", {}),
    ("bfloat16", "param", {}),
    ("float32", "int8", {"state_precision": "int8"}),
    ("float32", "int4", {"state_precision": "int4"}),
    ("bfloat16", "24-bit master + int8", {"state_precision": "int8", "master_weights": "24bit"}),
)


def probe(cache_dir: str, dtype: str, options: dict) -> list[float]:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    code = PROBE.replace("DTYPE", f"torch.{dtype}").replace("OPTIONS", repr(options))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    print(f"{'params':10s} {'states':21s} {'run':6s} {'import s':>9s} {'first step s':>13s} {'second step ms':>15s}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for dtype, states, options in SETTINGS:
            for run in ("cold", "warm"):
                imported, first, second = probe(cache_dir, dtype, options)
                print(f"{dtype:10s} {states:21s} {run:6s} {imported:9.2f} {first:13.3f} {second:15.3f}")


if __name__ == "__main__":
    main()
