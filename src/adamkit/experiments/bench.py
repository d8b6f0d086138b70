"""Step benchmarks on this machine: adamkit's kernels against torch.optim's, measured in
the same process.

Every contender steps in interleaved rounds (one step of each in turn), so drift in the
machine's memory bandwidth hits them all alike.  Per case: median ms per step, the
ratio to torch's fused kernel, effective bandwidth (the bytes an Adam step must move
per param, over the time) and that as a share of an in-place ``add_`` timed in the
same rounds.  ``adamkit bench`` and the scripts in ``benchmarks/`` use this module.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

import adamkit
from adamkit.memory import tensor_bytes

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

#: the same kinds of case, about ten times smaller (a few seconds in all)
QUICK_CASES = {
    "a": Case("(a) 5M fp32 params in 5 tensors", [(1_000_000,)] * 5),
    "b": Case("(b) 1M fp32 params in 200 tensors", [(5_000,)] * 200),
    "c": Case("(c) GPT-2 shapes at 1/4 width, fp32", gpt2_shapes(n_layer=4, d_model=192, vocab=8192, n_ctx=256)),
    "d": Case("(d) 5M bf16 params in 5 tensors", [(1_000_000,)] * 5, torch.bfloat16),
}

CONTENDERS: dict[str, Callable] = {
    "torch for-loop": lambda ps: torch.optim.Adam(ps, foreach=False),
    "torch foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "adamkit cpu": lambda ps: adamkit.Adam(ps, backend="cpu"),
}

#: on a CUDA device (``benchmarks/bench_gpu.py`` times these with CUDA events at ~1B params)
CUDA_CONTENDERS: dict[str, Callable] = {
    "torch foreach": lambda ps: torch.optim.Adam(ps, foreach=True),
    "torch fused": lambda ps: torch.optim.Adam(ps, fused=True),
    "adamkit triton": lambda ps: adamkit.Adam(ps, backend="triton"),
}


def make_params(case: Case, seed: int, device: str = "cpu") -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    params = []
    for shape in case.shapes:
        p = torch.nn.Parameter(torch.randn(shape, generator=g).to(device, case.dtype))
        p.grad = torch.randn(shape, generator=g).to(device, case.dtype)
        params.append(p)
    return params


def run_case(
    case: Case,
    rounds: int,
    contenders: dict[str, Callable] = CONTENDERS,
    add_elements: int = 50_000_000,
    *,
    device: str = "cpu",
    tick: Callable[[str], None] = lambda label: None,
) -> tuple[dict[str, float], float]:
    """Median seconds per step for every contender, and the GB/s of the ``add_`` anchor
    (``x.add_(y)`` on ``add_elements`` fp32 values: 12 bytes each), all measured in the
    same interleaved rounds; ``tick`` is called after each round.  On CUDA every timed
    call is bracketed by device synchronisations."""
    with torch.random.fork_rng(devices=[]):  # (contenders that round stochastically draw their seeds)
        optimizers = {name: make(make_params(case, seed=0, device=device)) for name, make in contenders.items()}
    generator = torch.Generator(device=device).manual_seed(0)
    x, y = (torch.randn(add_elements, device=device, generator=generator) for _ in range(2))
    steps = {name: opt.step for name, opt in optimizers.items()} | {"add_": lambda: x.add_(y)}
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up: state allocation, first touch, compilation
        step()
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for round_ in range(rounds):
        for name, step in steps.items():
            sync()
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
        tick(f"round {round_ + 1}")
    medians = {name: statistics.median(t) for name, t in times.items()}
    return medians, 12 * add_elements / medians.pop("add_") / 1e9


def state_bytes_per_param(case: Case, make: Callable, device: str = "cpu") -> float:
    """Bytes of optimizer state per param that ``make``'s optimizer holds after one step
    on the case's shapes (moments, codes, block scales, master low bits, compensations:
    everything beyond ``step``)."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=case.dtype, device=device)) for s in case.shapes]
    optimizer = make(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    return held_state_bytes(optimizer)


def held_state_bytes(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of state beyond ``step`` that ``optimizer`` holds, per param of its groups."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    held = sum(
        tensor_bytes(t)
        for p in params
        for key, t in optimizer.state.get(p, {}).items()
        if key != "step" and isinstance(t, torch.Tensor)
    )
    return held / sum(p.numel() for p in params)


def bytes_moved_per_param(case: Case, state_bytes: float) -> float:
    """What one step must move per param: the param read and written, the gradient
    read, and the state read and written."""
    size = torch.empty(0, dtype=case.dtype).element_size()
    return 3 * size + 2 * state_bytes


def format_case(
    case: Case,
    medians: dict[str, float],
    bandwidth: float,
    anchor: str = "torch fused",
    state_bytes: dict[str, float] | None = None,
) -> str:
    """One case's table: ms, ratio to ``anchor``, bytes moved per param, GB/s and share
    of the ``add_`` bandwidth.  Each contender's bytes follow from its ``state_bytes``
    (see :func:`state_bytes_per_param`) where given, else from an Adam step's
    (:data:`BYTES_PER_PARAM`: a variant with a third moment moves more than that)."""
    width = max(16, *(len(name) for name in medians))
    lines = [
        f"{case.name}: {case.params / 1e6:.1f}M params",
        f"  in-place add_ bandwidth, interleaved in the same rounds: {bandwidth:.1f} GB/s",
        f"  ratio: time over {anchor}'s; B/param: what the step must move (param, gradient, state)",
        f"  {'contender':{width}s} {'ms':>8s} {'ratio':>9s} {'B/param':>8s} {'GB/s':>7s} {'% of add_':>10s}",
    ]
    for name, seconds in medians.items():
        if state_bytes is None:
            moved = BYTES_PER_PARAM[case.dtype]
        else:
            moved = bytes_moved_per_param(case, state_bytes[name])
        rate = moved * case.params / seconds / 1e9
        ratio = seconds / medians[anchor]
        lines.append(
            f"  {name:{width}s} {seconds * 1e3:8.2f} {ratio:9.2f} {moved:8.1f} {rate:7.1f} {100 * rate / bandwidth:9.0f}%"
        )
    return "\n".join(lines)


def versions() -> str:
    return f"torch {torch.__version__}, adamkit {adamkit.__version__}, threads {torch.get_num_threads()}"


__all__ = [
    "BYTES_PER_PARAM",
    "CASES",
    "CONTENDERS",
    "CUDA_CONTENDERS",
    "QUICK_CASES",
    "Case",
    "bytes_moved_per_param",
    "format_case",
    "gpt2_shapes",
    "held_state_bytes",
    "make_params",
    "run_case",
    "state_bytes_per_param",
    "versions",
]
