"""First-step latency of the fused kernel, cold (an empty compile cache) and warm
(compiled code loaded from the on-disk cache), each in a fresh process.

On CPU (the numba kernel, ``NUMBA_CACHE_DIR``): fp32 and bf16 params with states in
the param's dtype, fp32 params with int8 and int4 states, and bf16 params with 24-bit
master weights and int8 states (each storage combination is its own specialization).
On CUDA (the Triton kernel, ``TRITON_CACHE_DIR``): fp32, bf16 with fp32 master weights,
and fp32 with int8 states.

    python benchmarks/first_step_latency.py                 # CPU
    python benchmarks/first_step_latency.py --device cuda   # the GPU twin
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

PROBE = r"""
import time
t0 = time.perf_counter()
import torch, adamkit
t1 = time.perf_counter()
device = torch.device(DEVICE)
params = [torch.nn.Parameter(torch.randn(1000, dtype=DTYPE, device=device)) for _ in range(4)]
for p in params:
    p.grad = torch.randn_like(p)
opt = adamkit.Adam(params, backend=BACKEND, **OPTIONS)
sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
sync()
t2 = time.perf_counter()
opt.step(); sync()
t3 = time.perf_counter()
opt.step(); sync()
t4 = time.perf_counter()
print(f"{t1 - t0:.2f} {t3 - t2:.3f} {(t4 - t3) * 1e3:.3f}")
"""

#: per device: its backend, the cache variable, and (param dtype, states as printed, options)
SETTINGS = {
    "cpu": (
        "cpu",
        "NUMBA_CACHE_DIR",
        (
            ("float32", "param", {}),
            ("bfloat16", "param", {}),
            ("float32", "int8", {"state_precision": "int8"}),
            ("float32", "int4", {"state_precision": "int4"}),
            ("bfloat16", "24-bit master + int8", {"state_precision": "int8", "master_weights": "24bit"}),
        ),
    ),
    "cuda": (
        "triton",
        "TRITON_CACHE_DIR",
        (
            ("float32", "param", {}),
            ("bfloat16", "fp32 master + fp32", {"state_precision": "fp32", "master_weights": "fp32"}),
            ("float32", "int8", {"state_precision": "int8"}),
        ),
    ),
}


def probe(device: str, cache_dir: str, dtype: str, options: dict) -> list[float]:
    backend, cache_variable, _ = SETTINGS[device]
    env = {**os.environ, cache_variable: cache_dir}
    code = (
        PROBE.replace("DEVICE", repr(device))
        .replace("DTYPE", f"torch.{dtype}")
        .replace("BACKEND", repr(backend))
        .replace("OPTIONS", repr(options))
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=sorted(SETTINGS), default="cpu")
    device = parser.parse_args().device
    print(f"{'params':10s} {'states':21s} {'run':6s} {'import s':>9s} {'first step s':>13s} {'second step ms':>15s}")
    with tempfile.TemporaryDirectory() as cache_dir:
        for dtype, states, options in SETTINGS[device][2]:
            for run in ("cold", "warm"):
                imported, first, second = probe(device, cache_dir, dtype, options)
                print(f"{dtype:10s} {states:21s} {run:6s} {imported:9.2f} {first:13.3f} {second:15.3f}")


if __name__ == "__main__":
    main()
