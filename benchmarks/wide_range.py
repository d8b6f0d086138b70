"""Quantized second moments across a wide dynamic range (issue 37's measurement).

Decaying gradient streams as in ``tests/test_lean_tracking.py`` (every gradient shrinking
21x over 2,000 steps), with per-element scales log-uniform over D = 0 to 4 decades, and a
per-block mixture (in every block of 256, four elements at scale 1 among 252 at 1e-3:
rare busy units beside quiet ones).  Each contender steps its own param with Adam (lr
1e-4) on the very same gradients as the fp32 oracle (``torch.optim.Adam``); after the
last step, per contender and stream:

- ``v median``: the median over elements of stored v / fp32 v (dequantized);
- ``v >2x off``: the share of elements whose stored v is more than 2x off fp32's (or
  less than half of it);
- ``weight dev``: rms(theta - theta_fp32) / rms(theta_fp32 - theta_0), the weights'
  deviation from the fp32 run relative to how far fp32 moved (on streams that carry no
  signal this measures per-step noise, not training quality).

Contenders: adamkit int8 and int4 states, and bitsandbytes' ``Adam8bit`` and torchao's
``Adam8bit`` where they import (``pip install bitsandbytes torchao`` with torch pinned).

    python benchmarks/wide_range.py                     # 65,536 elements, 2,000 steps
    python benchmarks/wide_range.py --steps 500 --elements 16384
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator

import torch

import adamkit
from adamkit.state import moment_value

LR = 1e-4
BLOCK = 256


def scales_for(stream: str, n: int, generator: torch.Generator) -> torch.Tensor:
    """Per-element gradient scales (float64): ``"D=k"``: log-uniform over k decades;
    ``"mixture"``: four elements at 1 in every block of 256, the rest at 1e-3."""
    if stream == "mixture":
        scales = torch.full((n,), 1e-3, dtype=torch.float64)
        blocks = n // BLOCK
        busy = torch.rand(blocks, BLOCK, generator=generator).argsort(dim=1)[:, :4]
        scales.view(blocks, BLOCK).scatter_(1, busy, 1.0)
        return scales
    decades = float(stream.partition("=")[2])
    return 10.0 ** (-decades * torch.rand(n, generator=generator, dtype=torch.float64))


def gradients(stream: str, n: int, steps: int) -> Iterator[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    scales = scales_for(stream, n, g)
    for t in range(steps):
        yield (scales * torch.randn(n, generator=g, dtype=torch.float64) / (1 + t / 100)).float()


def _adamkit_v(opt, p) -> torch.Tensor:
    return moment_value(opt.state[p], "exp_avg_sq", p)


def _bitsandbytes_v(opt, p) -> torch.Tensor:
    state = opt.state[p]
    codes, levels, absmax = state["state2"].long(), state["qmap2"], state["absmax2"]
    return levels[codes] * absmax.repeat_interleave(BLOCK)[: codes.numel()]


def _torchao_v(opt, p) -> torch.Tensor:
    return opt.state[p]["exp_avg_sq"].dequantize()


def contenders(peers: bool = True) -> dict[str, tuple[Callable, Callable]]:
    """name -> (make an optimizer for [param], read its v); the peers where they import."""
    found = {
        "adamkit int8": (lambda ps: adamkit.Adam(ps, lr=LR, state_precision="int8", seed=0), _adamkit_v),
        "adamkit int4": (lambda ps: adamkit.Adam(ps, lr=LR, state_precision="int4", seed=0), _adamkit_v),
    }
    if not peers:
        return found
    try:
        import bitsandbytes

        found["bitsandbytes Adam8bit"] = (
            lambda ps: bitsandbytes.optim.Adam8bit(ps, lr=LR, min_8bit_size=0),
            _bitsandbytes_v,
        )
    except ImportError as error:
        print(f"bitsandbytes: not run ({error})")
    try:
        from torchao.optim import Adam8bit

        found["torchao Adam8bit"] = (lambda ps: Adam8bit(ps, lr=LR), _torchao_v)
    except ImportError as error:
        print(f"torchao: not run ({error})")
    return found


def run(stream: str, n: int, steps: int, who: dict) -> dict[str, tuple[float, float, float]]:
    start = torch.randn(n, generator=torch.Generator().manual_seed(1))
    exact = torch.nn.Parameter(start.clone())
    oracle = torch.optim.Adam([exact], lr=LR)
    params = {name: torch.nn.Parameter(start.clone()) for name in who}
    optimizers = {name: make([params[name]]) for name, (make, _) in who.items()}
    for grad in gradients(stream, n, steps):
        exact.grad = grad.clone()
        oracle.step()
        for name, p in params.items():
            p.grad = grad.clone()
            optimizers[name].step()
    fp32_v = oracle.state[exact]["exp_avg_sq"].double()
    moved = (exact.detach() - start).double().square().mean().sqrt()
    results = {}
    for name, (_, read_v) in who.items():
        ratio = read_v(optimizers[name], params[name]).double() / fp32_v
        off = ((ratio > 2) | (ratio < 0.5)).double().mean().item()
        deviation = (params[name].detach() - exact.detach()).double().square().mean().sqrt() / moved
        results[name] = (ratio.median().item(), off, deviation.item())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--elements", type=int, default=65536)
    parser.add_argument("--streams", default="D=0,D=1,D=2,D=3,D=4,mixture")
    args = parser.parse_args()
    who = contenders()
    print(
        f"{args.elements:,} elements, {args.steps:,} steps, Adam lr {LR}, every contender on the fp32 oracle's gradients"
    )
    print(f"\n{'stream':8s} {'contender':22s} {'v median':>9s} {'v >2x off':>10s} {'weight dev':>11s}")
    for stream in args.streams.split(","):
        for name, (median, off, deviation) in run(stream, args.elements, args.steps, who).items():
            print(f"{stream:8s} {name:22s} {median:9.3f} {100 * off:9.1f}% {deviation:11.3f}", flush=True)


if __name__ == "__main__":
    main()
