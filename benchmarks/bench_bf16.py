"""bf16 step benchmark: adamkit's storage policies against torch's fused bf16 AdamW.

torch's fused kernel keeps bf16 states and rounds to nearest.  adamkit adds Kahan
compensation (one more bf16 buffer), stochastic rounding (random bits computed in
the kernel) and fp32 states.  All contenders and an in-place ``add_`` run in the same
interleaved rounds (see bench_cpu.py).  Prints ms per step, the ratio to torch fused,
the bytes each step must move per param and the effective bandwidth, and the
optimizer's memory per param (param + states + compensation).

    python benchmarks/bench_bf16.py [--cases d,e] [--rounds 20]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from bench_cpu import parse_arguments

import adamkit
from adamkit.experiments.bench import Case, gpt2_shapes, run_case

CASES = {
    "d": Case("(d) 50M bf16 params in 50 tensors", [(1_000_000,)] * 50, torch.bfloat16),
    "e": Case("(e) GPT-2-small shapes, bf16 (148 tensors)", gpt2_shapes(), torch.bfloat16),
}


def adamkit_adamw(**options) -> Callable:
    return lambda ps: adamkit.AdamW(ps, backend="cpu", **options)


CONTENDERS: dict[str, Callable] = {
    "torch fused (bf16 states)": lambda ps: torch.optim.AdamW(ps, fused=True),
    "adamkit nearest": adamkit_adamw(rounding="nearest"),
    "adamkit kahan": adamkit_adamw(rounding="kahan"),
    "adamkit stochastic": adamkit_adamw(rounding="stochastic", seed=0),
    "adamkit nearest, fp32 states": adamkit_adamw(state_precision="fp32"),
    "adamkit kahan, fp32 states": adamkit_adamw(rounding="kahan", state_precision="fp32"),
}


def bytes_held_per_param(make: Callable) -> float:
    """Param + optimizer state bytes per param, measured on a small model after a step."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in [(1000,), (30, 40)]]
    optimizer = make(params)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    held = sum(p.numel() * p.element_size() for p in params)
    held += sum(t.numel() * t.element_size() for p in params for k, t in optimizer.state[p].items() if k != "step")
    return held / sum(p.numel() for p in params)


def main(argv: list[str] | None = None) -> None:
    cases, rounds = parse_arguments(__doc__, CASES, argv)
    for case in cases:
        medians, bandwidth = run_case(case, rounds, CONTENDERS)
        fused = medians["torch fused (bf16 states)"]
        print(f"{case.name}: {case.params / 1e6:.1f}M params; add_ bandwidth in the same rounds {bandwidth:.1f} GB/s")
        print(
            f"  {'contender':30s} {'ms':>8s} {'vs fused':>9s} {'B held':>7s} {'B moved':>8s} {'GB/s':>6s} {'% add_':>7s}"
        )
        for name, seconds in medians.items():
            held = bytes_held_per_param(CONTENDERS[name])
            moved = 2 * held + 2  # everything held is read and written; the bf16 grad is read
            rate = moved * case.params / seconds / 1e9
            print(
                f"  {name:30s} {seconds * 1e3:8.2f} {seconds / fused:9.2f} {held:7.1f} {moved:8.1f} {rate:6.1f}"
                f" {100 * rate / bandwidth:6.0f}%"
            )
        print()


if __name__ == "__main__":
    main()
