"""How many bits a stochastically rounded second moment needs to follow fp32 Adam's v
near convergence, and what its block scale's rounding costs.

The decaying stream of ``tests/test_lean_tracking.py`` (per-element gradient scales
log-uniform over two decades, every gradient shrinking as 1 / (1 + t / 100), 2000
steps), fed to the second-moment recursion alone,

.. math::

    v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) g_t^2, \\qquad
    \\hat v_t = Q(\\beta_2 \\hat v_{t-1} + (1 - \\beta_2) g_t^2),

once exactly (float64) and once through the format of :mod:`adamkit.quantization`
(its NumPy reference: float map e4mM relative to the block scale, rounded
stochastically with fresh random bits) with M = 0 (int4's e4m0) to 4 (int8's e4m4)
and blocks of 128, under three block scales: exact (fp32; int4's second moments), the
absmax rounded up to bf16 with ratios within 2^-8 of the top stored as the top (int8's),
and rounded up to bf16 alone (adamkit's earlier format).  Prints the
median of stored v / exact v and the share of elements more than 2x off, the two
numbers the test bounds (int8: median in [0.8, 1.25], at most 5 % off; int4: [0.67,
1.5], at most 10 %).

    python benchmarks/second_moment_bits.py [--steps 2000]
"""

from __future__ import annotations

import argparse

import numpy as np

from adamkit import quantization
from adamkit.specs.quantization import QuantFormat

N, BLOCK, BETA2 = 64 * 256, 128, 0.999


#: scale -> (the format's scales exact?, snap ratios near the top?)
SCALES = {"fp32": (True, False), "bf16+snap": (False, True), "bf16": (False, False)}


def tracked(bits: int, scale: str, steps: int, seed: int = 0) -> tuple[float, float]:
    """(median stored v / exact v, share off by more than 2x) after ``steps``."""
    exact_scales, snap = SCALES[scale]
    fmt = QuantFormat(f"e4m{bits - 4}", bits=bits, block=BLOCK, exact_second_scales=exact_scales or not snap)
    rng = np.random.default_rng(seed)
    scales = 10.0 ** (-2.0 * rng.random(N))
    exact = np.zeros(N)
    stored = np.zeros(N, dtype=np.float32)
    for t in range(steps):
        g = scales * rng.standard_normal(N) / (1 + t / 100)
        exact = BETA2 * exact + (1 - BETA2) * g * g
        new = (BETA2 * stored.astype(np.float64) + (1 - BETA2) * g * g).astype(np.float32)
        block_scales = quantization.block_scales(new, BLOCK, exact=exact_scales)
        codes = quantization.level_codes(new, block_scales, fmt, False, rng.integers(0, 1 << 16, N))
        stored = quantization.level_values(codes, block_scales, fmt, False)
    ratio = stored / exact
    return float(np.median(ratio)), float(np.mean((ratio > 2) | (ratio < 0.5)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    args = parser.parse_args()
    print(f"{'v bits':>6} {'map':>5} {'scale':>10} {'median v/fp32 v':>16} {'off by >2x':>11}")
    for bits in (4, 5, 6, 7, 8):
        for scale in SCALES:
            median, off = tracked(bits, scale, args.steps)
            print(f"{bits:>6} {f'e4m{bits - 4}':>5} {scale:>10} {median:>16.3f} {100 * off:>10.1f}%", flush=True)


if __name__ == "__main__":
    main()
