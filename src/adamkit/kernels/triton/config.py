"""How the Triton kernel is built and where it runs: the launch shapes, the interpreter,
the compile options, and whether Triton is importable here (decided once)."""

from __future__ import annotations

import os

import torch

try:
    import triton
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

#: elements per program, and the warps that run them: a bucket takes the values these
#: have when it is built (``benchmarks/bench_gpu.py --sweep`` times other choices)
BLOCK = 1024
NUM_WARPS = 4
#: quantized states take several times the arithmetic per element, and registers with
#: it: four elements per thread rather than eight (sm_90, int8: 55 registers rather
#: than 96) let more programs share an SM.  Measured on an H100 (``--sweep``), 512 x 4
#: warps: int8 0.84x and int4 0.74x torch's fused fp32 step, 1024 x 4: 0.95x and 1.06x
QUANTIZED_BLOCK = 512
QUANTIZED_NUM_WARPS = 4

#: the interpreter runs programs on the CPU with NumPy: slow, but exact, for tests
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: how the kernel is compiled: IEEE operations one by one (no fused multiply-adds), as
#: the NumPy reference and the interpreter compute, whatever the Triton version's default
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def available() -> bool:
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def device_types() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if INTERPRETED else frozenset({"cuda"})
