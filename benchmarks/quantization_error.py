"""How the quantized-state format was chosen: the error of candidate maps and block
sizes on the moments of a real model.

Trains the byte-level transformer of train_storage.py with fp32 AdamW, takes its
moments (m, v) at a few steps, and for every candidate format quantizes and
dequantizes them (NumPy reference of :mod:`adamkit.quantization`) and measures the
relative RMS error of what matters, Adam's update direction m / (sqrt(v) + eps),
with bias correction, over all params.  Candidates:

* power maps (levels evenly spaced in (|x|/s)^(1/p)), p = 1 (linear), 2, 3, 4, for
  m and v alike; v's map has no zero level;
* a dynamic-exponent table map for comparison (sign, an exponent in unary, a linear
  fraction: Dettmers, 2016), with a zero level for v as such maps have, and with
  the power-2 map for v.

Also the state bytes per param of each block size (two moments, bf16 scales).

    python benchmarks/quantization_error.py [--steps 20,400]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from train_storage import ByteTransformer, batch, corpus, loss_of

from adamkit import quantization
from adamkit.specs.quantization import QuantFormat

BETA1, BETA2, EPS = 0.9, 0.999, 1e-8


def moments_at(steps: list[int]) -> dict[int, list[tuple[np.ndarray, np.ndarray]]]:
    """(m, v) of every param of the model, after each of ``steps`` fp32 AdamW steps."""
    torch.manual_seed(0)
    data, _ = corpus()
    model = ByteTransformer()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    generator = torch.Generator().manual_seed(1)
    taken = {}
    for step in range(1, max(steps) + 1):
        loss_of(model, *batch(data, generator)).backward()
        optimizer.step()
        optimizer.zero_grad()
        if step in steps:
            taken[step] = [
                (s["exp_avg"].numpy().copy(), s["exp_avg_sq"].numpy().copy()) for s in optimizer.state.values()
            ]
    return taken


def dynamic_levels(bits: int, signed: bool) -> np.ndarray:
    """A dynamic-exponent map: for each exponent e, 2^f linear fractions in (0.1, 1] of
    10^-e, f shrinking as e grows; plus zero (and the negatives when signed)."""
    width = bits - 1 if signed else bits
    values = {0.0}
    for e in range(width):
        f = width - 1 - e
        values.update(10.0**-e * (0.1 + 0.9 * (j + 1) / 2**f) for j in range(2**f))
    levels = np.array(sorted(values), dtype=np.float32)
    return np.concatenate([-levels[:0:-1], levels]) if signed else levels


def table_roundtrip(x: np.ndarray, block: int, levels: np.ndarray) -> np.ndarray:
    scales = quantization.block_scales(x, block)
    s = np.repeat(scales, block)[: x.size].reshape(x.shape)
    ratio = np.where(s > 0, x / np.where(s > 0, s, 1), 0)
    midpoints = (levels[1:] + levels[:-1]) / 2
    return levels[np.searchsorted(midpoints, ratio)] * s


def power_roundtrip(x: np.ndarray, fmt: QuantFormat, signed: bool) -> np.ndarray:
    return quantization.dequantize(*quantization.quantize(x, fmt, signed), fmt, signed, x.shape)


def candidate_formats(bits: int, block: int) -> dict:
    """name -> (round trip of m, round trip of v) for every candidate at this size."""
    candidates = {}
    for p in (1, 2, 3, 4):
        fmt = QuantFormat(f"power {p}", bits, block, power=p)
        candidates[f"power p={p}"] = (
            lambda x, f=fmt: power_roundtrip(x, f, True),
            lambda x, f=fmt: power_roundtrip(x, f, False),
        )
    signed, unsigned = dynamic_levels(bits, True), dynamic_levels(bits, False)
    dynamic_m = lambda x: table_roundtrip(x, block, signed)  # noqa: E731
    candidates["dynamic, zero in v"] = (dynamic_m, lambda x: table_roundtrip(x, block, unsigned))
    candidates["dynamic m, power-2 v"] = (dynamic_m, candidates["power p=2"][1])
    return candidates


def update_error(moments, step: int, quantize_m, quantize_v) -> float:
    """Relative RMS error of the bias-corrected update m_hat / (sqrt(v_hat) + eps)."""
    c1, c2 = 1 - BETA1**step, 1 - BETA2**step
    error = norm = 0.0
    for m, v in moments:
        exact = (m / c1) / (np.sqrt(v / c2) + EPS)
        approx = (quantize_m(m) / c1) / (np.sqrt(quantize_v(v) / c2) + EPS)
        error += float(((approx - exact) ** 2).sum())
        norm += float((exact**2).sum())
    return (error / norm) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", default="20,400", help="comma-separated training steps to take moments at")
    args = parser.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))
    torch.set_num_threads(os.cpu_count() or 1)
    taken = moments_at(steps)
    print("relative RMS error of Adam's update direction after quantizing m and v (lower is better)\n")
    for bits, blocks in ((8, (128, 256, 512)), (4, (64, 128, 256))):
        print(f"{bits}-bit codes" + "".join(f"  {'step ' + str(s):>12s}" for s in steps) + "  state B/param")
        for block in blocks:
            fmt = QuantFormat("x", bits, block, exact_second_scales=False)  # bf16 scales
            bytes_per_param = (fmt.bytes_per_state(1 << 20, True) + fmt.bytes_per_state(1 << 20, False)) / (1 << 20)
            candidates = candidate_formats(bits, block)
            for name, (quantize_m, quantize_v) in candidates.items():
                errors = [update_error(taken[s], s, quantize_m, quantize_v) for s in steps]
                cells = "".join(f"  {e:12.4f}" for e in errors)
                print(f"  block {block:3d} {name:22s}{cells}  {bytes_per_param:13.3f}")
        print()
    chosen = ", ".join(f"{f.name}: block {f.block} (v: {f.block_of(False)})" for f in quantization.FORMATS.values())
    print(f"adamkit's formats: {chosen} (bf16 scales, v without a zero level)")


if __name__ == "__main__":
    main()
