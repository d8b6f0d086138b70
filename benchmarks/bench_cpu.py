"""CPU step benchmark: adamkit's fused kernel against torch.optim.Adam's three paths.

Every contender is measured in the same process, in interleaved rounds (one step of
each in turn), so drift in the machine's memory bandwidth hits them all alike.
Prints, per case: median ms per step, the ratio to torch's fused kernel, effective
bandwidth (bytes an Adam step must move per param / time) and that as a percentage of
an in-place ``add_`` timed in the same interleaved rounds.

    python benchmarks/bench_cpu.py                 # all cases
    python benchmarks/bench_cpu.py --cases a,b --rounds 30
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import adamkit

#: bytes an Adam step moves per param: read param, grad, exp_avg, exp_avg_sq, write three
BYTES_PER_PARAM = {torch.float32: 28, torch.bfloat16: 14}


def gpt2_shapes(n_layer: int = 12, d_model: int = 768, vocab: int = 50257, n_ctx: int = 1024) -> list[tuple]:
    """Parameter shapes of a GPT-2-small-like transformer (124M params at the defaults)."""
    shapes: list[tuple] = [(vocab, d_model), (n_ctx, d_model)]
    for _ in range(n_layer):
        shapes += [(d_model,), (d_model,)]  # ln_1
        shapes += [(d_model, 3 * d_model), (3 * d_model,)]  # attention qkv
        shapes += [(d_model, d_model), (d_model,)]  # attention out
        shapes += [(d_model,), (d_model,)]  # ln_2
        shapes += [(d_model, 4 * d_model), (4 * d_model,)]  # mlp in
        shapes += [(4 * d_model, d_model), (d_model,)]  # mlp out
    return shapes + [(d_model,), (d_model,)]  # ln_f


@dataclass
class Case:
    name: str
    shapes: list[tuple]
    dtype: torch.dtype = torch.float32

    @property
    def params(self) -> int:
        return sum(torch.Size(s).numel() for s in self.shapes)


CASES = {
    "a": Case("(a) 50M fp32 params in 50 tensors", [(1_000_000,)] * 50),
    "b": Case("(b) 10M fp32 params in 2000 tensors", [(5_000,)] * 2000),
    "c": Case("(c) GPT-2-small shapes, fp32 (148 tensors)", gpt2_shapes()),
    "d": Case("(d) 50M bf16 params in 50 tensors", [(1_000_000,)] * 50, torch.bfloat16),
}

CONTENDERS: dict[str, Callable] = {
    "torch for-loop": lambda ps: torch.optim.Adam(ps, foreach=False),
    "torch foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "adamkit cpu": lambda ps: adamkit.Adam(ps, backend="cpu"),
}


def make_params(case: Case, seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(case.dtype))
        p.grad = torch.randn(shape, generator=g).to(case.dtype)
        params.append(p)
    return params


#: the bandwidth anchor: ``x.add_(y)`` on 50M fp32 reads 8 and writes 4 bytes per element
ADD_ELEMENTS = 50_000_000
ADD_BYTES = 12 * ADD_ELEMENTS


def run_case(case: Case, rounds: int, contenders: dict[str, Callable] = CONTENDERS) -> tuple[dict[str, float], float]:
    """Median seconds per step for every contender, and of the ``add_`` anchor, all
    measured in the same interleaved rounds."""
    optimizers = {name: make(make_params(case, seed=0)) for name, make in contenders.items()}
    x, y = torch.randn(ADD_ELEMENTS), torch.randn(ADD_ELEMENTS)
    steps = {name: opt.step for name, opt in optimizers.items()} | {"add_": lambda: x.add_(y)}
    for step in steps.values():  # warm-up: state allocation, first touch, compilation
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians, ADD_BYTES / medians.pop("add_") / 1e9


def parse_arguments(doc: str, cases: dict[str, Case], argv: list[str] | None) -> tuple[list[Case], int]:
    """``--cases`` and ``--rounds`` of a step benchmark; prints the versions line."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(cases), help=f"comma-separated subset of {','.join(cases)}")
    parser.add_argument("--rounds", type=int, default=20, help="timed steps per contender")
    args = parser.parse_args(argv)
    unknown = set(args.cases.split(",")) - set(cases)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {','.join(cases)}")
    print(f"torch {torch.__version__}, adamkit {adamkit.__version__}, threads {torch.get_num_threads()}\n")
    return [cases[key] for key in args.cases.split(",")], args.rounds


def main(argv: list[str] | None = None) -> None:
    cases, rounds = parse_arguments(__doc__, CASES, argv)
    for case in cases:
        medians, bandwidth = run_case(case, rounds)
        fused = medians["torch fused"]
        moved = BYTES_PER_PARAM[case.dtype] * case.params
        print(f"{case.name}: {case.params / 1e6:.1f}M params, {moved / 1e9:.2f} GB moved per step")
        print(f"  in-place add_ bandwidth, interleaved in the same rounds: {bandwidth:.1f} GB/s")
        print(f"  {'contender':16s} {'ms':>8s} {'vs fused':>9s} {'GB/s':>7s} {'% of add_':>10s}")
        for name, seconds in medians.items():
            rate = moved / seconds / 1e9
            print(
                f"  {name:16s} {seconds * 1e3:8.2f} {seconds / fused:9.2f} {rate:7.1f} {100 * rate / bandwidth:9.0f}%"
            )
        print()


if __name__ == "__main__":
    main()
