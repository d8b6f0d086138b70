"""What LLVM emitted for the fused CPU kernel's quantized step: the vector width of
its float and integer arithmetic, per specialization, on this machine.

Compiles each specialization afresh (an empty numba cache: cached code cannot be
inspected), runs one step, and counts in numba's assembly the packed (vector)
and scalar forms of the float arithmetic, the integer multiplies of the random-bit
hash, the register width they use (``ymm``: 256-bit AVX2, ``zmm``: 512-bit AVX-512)
and any gathers (a table lookup per element).  The hot loops are vectorized when
the packed counts dominate and no gathers appear.

    python benchmarks/kernel_asm.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections import Counter

PROBE = r"""
import re, sys, torch, adamkit
from adamkit.kernels import cpu
params = [torch.nn.Parameter(torch.randn(5000, dtype=DTYPE)) for _ in range(2)]
for p in params:
    p.grad = torch.randn_like(p)
adamkit.AdamW(params, backend="cpu", **OPTIONS).step()
for asm in cpu._fused_quantized_step.inspect_asm().values():
    sys.stdout.write(asm)
"""

SETTINGS = {
    "fp32 params, int8 states": ("torch.float32", {"state_precision": "int8"}),
    "fp32 params, int4 states": ("torch.float32", {"state_precision": "int4"}),
    "bf16, 24-bit master, int8": ("torch.bfloat16", {"state_precision": "int8", "master_weights": "24bit"}),
}

#: mnemonic pattern -> what it counts
KINDS = {
    r"v(add|sub|mul|div|sqrt|max|min)ps": "packed float",
    r"v(add|sub|mul|div|sqrt|max|min)ss": "scalar float",
    r"vpmull[dq]": "packed int multiply",
    r"v(p)?gather": "gather",
}


def assembly(dtype: str, options: dict) -> str:
    with tempfile.TemporaryDirectory() as cache:
        code = PROBE.replace("DTYPE", dtype).replace("OPTIONS", repr(options))
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout


def census(asm: str) -> Counter:
    counts: Counter = Counter()
    for line in asm.splitlines():
        match = re.match(r"\s+(v[a-z0-9]+)\s+(.*)", line)
        if not match:
            continue
        mnemonic, operands = match.groups()
        for pattern, kind in KINDS.items():
            if re.fullmatch(pattern, mnemonic):
                width = "zmm" if "zmm" in operands else "ymm" if "ymm" in operands else "xmm"
                counts[kind if kind.startswith("scalar") else f"{kind} ({width})"] += 1
    return counts


def main() -> None:
    for name, (dtype, options) in SETTINGS.items():
        counts = census(assembly(dtype, options))
        print(f"{name}: " + ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
