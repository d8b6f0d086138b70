"""Lean storage follows fp32 near convergence, not just after one step.

A decaying gradient stream: per-element gradient scales spread log-uniformly over two
decades (so second moments over four), every gradient shrinking steadily (21x over
2000 steps, as late in training).  Each lean mode steps a param on that stream next
to fp32 AdamW fed the same gradients; after 2000 steps its stored second moment
(dequantized, or upcast from 16 bits) is compared element by element with fp32's.

A moment stored with round-to-nearest cannot follow this: v must decay by 1 - beta2
(0.1 %) per step, less than half a storage spacing, so it freezes (before the
stochastic rounding of moments, int8 kept v at 14 times fp32's, and 16-bit moments
of bf16 params at 5.5 times).  Stochastic rounding makes every stored value exact
in expectation; what remains is its noise, which grows with the spacing of the
storage at the value (the element's level, relative to its block's scale).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit import blockwise
from adamkit.specs.master import MASTER_KEY, join_tensors
from adamkit.specs.quantization import FORMATS
from adamkit.state import moment_value

N = 64 * 256  # 64 int8 blocks
STEPS = 2000
DECADES = 2.0


def gradient_stream(steps: int, seed: int = 0):
    """Per step, fp32 gradients of N elements: scale_i * a(t) * z, with scales
    log-uniform over DECADES decades and a(t) = 1 / (1 + t / 100)."""
    g = torch.Generator().manual_seed(seed)
    scales = 10.0 ** (-DECADES * torch.rand(N, generator=g, dtype=torch.float64))
    for t in range(steps):
        yield (scales * torch.randn(N, generator=g, dtype=torch.float64) / (1 + t / 100)).float()


def second_moment(opt: torch.optim.Optimizer, p: torch.Tensor) -> torch.Tensor:
    return moment_value(opt.state[p], "exp_avg_sq", p).double()


def tracked(dtype: torch.dtype, name: str = "AdamW", **options) -> tuple[float, float]:
    """(median of v / fp32 v, share of elements off by more than 2x) after STEPS, next
    to torch.optim's ``name`` on fp32 (adamkit's fp32 single-tensor path where torch has
    no ``name``; ADOPT with Adam's beta2, whose v decays by 0.1 % a step)."""
    start = torch.randn(N, generator=torch.Generator().manual_seed(1))
    lean = torch.nn.Parameter(start.to(dtype))
    exact = torch.nn.Parameter(start.clone())
    if name == "ADOPT":
        options = {**options, "betas": (0.9, 0.999)}
    lean_opt = getattr(adamkit, name)([lean], lr=1e-4, seed=0, backend="cpu", **options)
    if hasattr(torch.optim, name):
        exact_opt = getattr(torch.optim, name)([exact], lr=1e-4)
    else:
        exact_opt = getattr(adamkit, name)([exact], lr=1e-4, backend="single_tensor", betas=options["betas"])
    for grad in gradient_stream(STEPS):
        lean.grad, exact.grad = grad.to(dtype), grad.clone()
        lean_opt.step()
        exact_opt.step()
    ratio = second_moment(lean_opt, lean) / exact_opt.state[exact]["exp_avg_sq"].double()
    return ratio.median().item(), ((ratio > 2) | (ratio < 0.5)).double().mean().item()


MODES = {
    "int8": (torch.float32, {"state_precision": "int8"}, (0.8, 1.25), 0.05),
    "bf16 states": (torch.float32, {"state_precision": "bf16"}, (0.8, 1.25), 0.05),
    "bf16 params, nearest": (torch.bfloat16, {}, (0.8, 1.25), 0.05),
    "bf16 params, kahan": (torch.bfloat16, {"rounding": "kahan"}, (0.8, 1.25), 0.05),
    "bf16 params, stochastic": (torch.bfloat16, {"rounding": "stochastic"}, (0.8, 1.25), 0.05),
    "bf16 params, kahan, int8": (torch.bfloat16, {"rounding": "kahan", "state_precision": "int8"}, (0.8, 1.25), 0.05),
}

INT4_MISS = (
    "int4's 16 levels are too coarse to follow v element by element: stochastic rounding keeps it unbiased, "
    "but its noise over beta2's memory grows with the spacing of the levels, and e4m0's factor 2 leaves a "
    "median ratio near 0.81 with about 30 % of the elements off by more than 2x on this stream; "
    "benchmarks/second_moment_bits.py measures 13 % off with 5 bits, 3 % with 6"
)


@pytest.mark.parametrize("mode", list(MODES))
def test_lean_second_moments_track_fp32_on_a_decaying_stream(mode):
    dtype, options, (low, high), off_limit = MODES[mode]
    median, off = tracked(dtype, **options)
    assert low <= median <= high, f"median stored v / fp32 v = {median:.3f}"
    assert off <= off_limit, f"{100 * off:.1f} % of elements off by more than 2x"


@pytest.mark.parametrize("name, mode", [("NAdam", "int8"), ("RAdam", "bf16 params, kahan"), ("ADOPT", "bf16 states")])
def test_the_family_s_second_moments_track_fp32_on_a_decaying_stream(name, mode):
    """(The storage is the same code for every algorithm: one lean mode each.)"""
    dtype, options, (low, high), off_limit = MODES[mode]
    median, off = tracked(dtype, name, **options)
    assert low <= median <= high, f"median stored v / fp32 v = {median:.3f}"
    assert off <= off_limit, f"{100 * off:.1f} % of elements off by more than 2x"


@pytest.mark.xfail(strict=True, reason=INT4_MISS)
def test_int4_second_moments_track_fp32_on_a_decaying_stream():
    median, off = tracked(torch.float32, state_precision="int4")
    assert 0.67 <= median <= 1.5 and off <= 0.10, (median, off)


def test_nearest_rounding_would_freeze_the_second_moment():
    """The failure the stochastic rounding removes, shown with the format itself: the
    largest element of each block is held steady by its gradients while every other
    element gets none; requantized to nearest each step, v stays where it was while
    fp32's decays (with the exact block scales, a block that decays as a whole would
    follow: the scale carries it)."""
    fmt = FORMATS["int8"]
    v = torch.rand(N, dtype=torch.float64).float() + 0.5
    held = torch.arange(N) % fmt.block_of(False) == 0
    v[held] = 2.0
    codes = torch.zeros(fmt.code_bytes(N), dtype=torch.uint8)
    scales = torch.zeros(fmt.blocks(N, False), dtype=blockwise.scale_dtype(fmt, False))
    blockwise.quantize_into(v, codes, scales, fmt, signed=False)
    start = blockwise.dequantize(codes, scales, fmt, False, v.shape)
    stored, exact = start.clone(), start.double()
    for _ in range(500):  # v_t = beta2^t v_0, but for the held elements
        blockwise.quantize_into(torch.where(held, stored, 0.999 * stored), codes, scales, fmt, signed=False)
        stored = blockwise.dequantize(codes, scales, fmt, False, v.shape)
        exact = torch.where(held, exact, 0.999 * exact)
    assert torch.equal(stored, start)  # frozen
    assert math.isclose((exact / start.double())[~held].median().item(), 0.999**500, rel_tol=1e-6)


@pytest.mark.parametrize("mode", ["fp32", "24bit"])
def test_split_master_weights_track_fp32_weights_on_a_decaying_stream(mode):
    """The weights themselves on the same stream: bf16 params with split master weights
    against torch.optim.AdamW on fp32 weights fed the same (bf16-representable)
    gradients.  "fp32" is that run bit for bit; "24bit" rounds each step's result
    stochastically to 16 significant bits, so its relative error has RMS at most
    sqrt(T) 2^-16 and mean within noise of zero, however small the late updates get."""
    start = torch.randn(N, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    lean = torch.nn.Parameter(start.clone())
    exact = torch.nn.Parameter(start.float())
    options = {"master_weights": mode, "state_precision": "fp32", "backend": "single_tensor", "seed": 0}
    lean_opt = adamkit.AdamW([lean], lr=1e-4, **options)
    exact_opt = torch.optim.AdamW([exact], lr=1e-4, foreach=False)
    for grad in gradient_stream(STEPS):
        grad = grad.to(torch.bfloat16)
        lean.grad, exact.grad = grad, grad.float()
        lean_opt.step()
        exact_opt.step()
    master = join_tensors(lean, lean_opt.state[lean][MASTER_KEY])
    if mode == "fp32":
        assert torch.equal(master.view(torch.int32), exact.detach().view(torch.int32))
        return
    errors = (master.double() - exact.detach().double()) / exact.detach().double().abs()
    bound = STEPS**0.5 * 2.0**-16
    assert float(errors.square().mean().sqrt()) <= bound
    assert abs(float(errors.mean())) <= 4 * bound / N**0.5


# ---------------------------------------------------------------------------- wide range

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
WIDE_RANGE_STREAMS = ("D=0", "D=1", "D=2", "D=3", "D=4", "mixture")


def wide_range(stream: str, precisions: tuple[str, ...]) -> dict[str, tuple[float, float, float]]:
    """``benchmarks/wide_range.py``'s measurement (its streams, the same gradients for
    every contender): per adamkit precision, (median stored v / fp32 v, share of
    elements more than 2x off, weight deviation from the fp32 run)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import wide_range as family
    finally:
        sys.path.remove(str(BENCHMARKS))
    who = {p: family.contenders(peers=False)[f"adamkit {p}"] for p in precisions}
    return family.run(stream, N, STEPS, who)


@pytest.mark.parametrize("stream", WIDE_RANGE_STREAMS)
def test_int8_second_moments_follow_fp32_across_a_wide_dynamic_range(stream):
    """Issue 37: int8's share of v elements more than 2x off fp32's no worse than the
    better of bitsandbytes' and torchao's 8-bit Adam plus one point at every spread
    (their best, measured by benchmarks/wide_range.py: 0.0 % at D = 0 and 1)."""
    median, off, _ = wide_range(stream, ("int8",))["int8"]
    assert 0.9 <= median <= 1.1, f"median stored v / fp32 v = {median:.3f}"
    assert off <= 0.01, f"{100 * off:.1f} % of elements off by more than 2x"


@pytest.mark.parametrize("stream", WIDE_RANGE_STREAMS)
def test_int4_second_moments_keep_their_median_across_a_wide_dynamic_range(stream):
    """Issue 37: int4's median stored v within [0.67, 1.5] of fp32's at every spread.
    e4m0 alone spans 4.5 decades of v (2^-15 of a block's largest), and held the
    elements below it at that floor: medians 1.7x (D = 4) and 34x (mixture) fp32's.
    A block more than a quarter of which lies below that floor takes the root map
    (e4m0 of sqrt(v), to 2^-30)."""
    median, _, _ = wide_range(stream, ("int4",))["int4"]
    assert 0.67 <= median <= 1.5, f"median stored v / fp32 v = {median:.3f}"


#: the largest step of any element, in units of lr, that each storage may take on
#: the wide-range streams (500 steps; fp32 Adam's is 1.01; measured: int8 4.9 at D = 4
#: and 2.2 in the mixture, int4 3.7 and 3.6 with its root map, 1.7 and 1.5 with e4m0
#: alone; int4 before its first moment was normalized, 19.5 and 15.6)
STEP_BOUND = {"int8": 10.0, "int4": 4.0}


@pytest.mark.parametrize("precision", list(STEP_BOUND))
@pytest.mark.parametrize("stream", ("D=4", "mixture"))
def test_quantized_steps_stay_bounded_across_a_wide_dynamic_range(precision, stream):
    """Adam moves an element by about lr at most; a quantized state may move it further
    where a quiet element's first moment is stored at a level of its block (unbiased,
    but a kick) and divided by its own small second moment.  int8's 255 levels keep
    that kick small, and int4 stores its first moment over a power of two near
    sqrt(v) (every element's stored value of the order of its update).  Before that,
    int4's m was stored as 0 or 1/49 of its block's largest, only the second moment's
    lowest level bounded the kick (19.5 lr at D = 4), and the root map, reaching
    further down (tried then in issue 37), took it to 560 lr."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import wide_range as family
    finally:
        sys.path.remove(str(BENCHMARKS))
    p = torch.nn.Parameter(torch.zeros(N))
    optimizer = adamkit.Adam([p], lr=family.LR, state_precision=precision, seed=0)
    largest = 0.0
    for grad in family.gradients(stream, N, 500):
        before = p.detach().clone()
        p.grad = grad
        optimizer.step()
        largest = max(largest, float((p.detach() - before).abs().max()) / family.LR)
    assert largest <= STEP_BOUND[precision], f"an element moved {largest:.1f} lr in one step"
