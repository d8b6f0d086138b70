"""``state_precision="int8"`` / ``"int4"``: the format against its specification, every
kernel against the float64 reference, the issue's one-step accuracy criterion
against torch.optim, state dicts, conversions and errors.

Oracles: the NumPy reference of the format (:mod:`adamkit.quantization`), the
closed-form error bound of its maps, the float64 reference step
(:func:`oracle.stored_reference_step`) and torch.optim.AdamW itself.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from matrix import CONFIGS, CPU_BACKENDS, FAMILY, reference_setup, refused
from oracle import stored_reference_step
from test_storage_conformance import check_stored, oracle_names, snapshot_then_step, warmed_up

import adamkit
from adamkit import blockwise, quantization
from adamkit.algorithms import FirstMomentScale, lookup
from adamkit.convert import to_full_precision, to_quantized
from adamkit.specs.quantization import FORMATS
from adamkit.state import init_state, moment_value

PRECISIONS = tuple(FORMATS)


def error_bounds(fmt: quantization.QuantFormat, signed: bool, x, s, *, stochastic: bool):
    """Elementwise bounds of |x_hat - x| for values ``x`` in blocks of scale ``s``
    (arrays or tensors alike), rounded to nearest or stochastically.

    Signed power map: a level step in c = sqrt(|x|/s) moves the value by at most
    (c + d)^2 - c^2 <= 2d + d^2 at c = 1, with d = 1/(2K) (half a step, nearest) or
    1/K (a whole step, stochastic).  Unsigned float map (int8's finer e4m4 where the
    stored scale is negative): the spacing at x is at most 2^-M |x|, half of it to
    nearest; below the smallest level, 2^(1 - 2^E) |s| (the value stored is that level;
    2^-31 |s| for e5m3).  A root map (int4's, where the scale is negative): levels 4x
    apart, so 3 |x| stochastically and 7/9 |x| to nearest, down to 2^-30 |s|."""
    if signed:
        d = (1.0 if stochastic else 0.5) / fmt.signed_levels
        return (2 * d + d * d) * s
    where = torch.where if isinstance(s, torch.Tensor) else np.where
    bounds = []
    for marked in (False, True):
        mantissa, lowest = fmt.float_map(marked)
        if marked and fmt.root_map:  # levels 4x apart, rounded in sqrt(r): nearest splits them at 2.25x the lower
            relative, floor = (3.0 if stochastic else 7 / 9), 2.0 ** (2 * lowest)
        else:
            relative, floor = 2.0 ** -(mantissa + (0 if stochastic else 1)), 2.0**lowest
        bounds.append(relative * abs(x) + floor * abs(s))
    return where(s < 0, bounds[1], bounds[0])


def hostile_values(rng: np.random.Generator, n: int, signed: bool) -> np.ndarray:
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-12, 3, n)).astype(np.float32)
    x[rng.integers(0, n, max(1, n // 50))] = 0.0
    return x if signed else np.abs(x)


# ---------------------------------------------------------------------------- format


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
@pytest.mark.parametrize("n", [1, 2, 127, 128, 129, 255, 256, 257, 1000, 4097])
def test_torch_quantizer_equals_the_numpy_specification(precision, signed, n):
    fmt = FORMATS[precision]
    rng = np.random.default_rng(n)
    x = hostile_values(rng, n, signed)
    if n > 300:  # a non-finite block poisons only itself
        x[260] = np.nan
        x[-1] = np.inf
    codes, scales = quantization.quantize(x, fmt, signed)
    stored_codes = torch.zeros(fmt.code_bytes(n), dtype=torch.uint8)
    stored_scales = torch.zeros(fmt.blocks(n, signed), dtype=blockwise.scale_dtype(fmt, signed))
    blockwise.quantize_into(torch.from_numpy(x), stored_codes, stored_scales, fmt, signed)
    assert np.array_equal(stored_codes.numpy(), codes)
    assert np.array_equal(stored_scales.float().numpy(), scales, equal_nan=True)
    back = blockwise.dequantize(stored_codes, stored_scales, fmt, signed, torch.Size([n])).numpy()
    assert np.array_equal(back, quantization.dequantize(codes, scales, fmt, signed, (n,)), equal_nan=True)
    assert stored_codes.numel() + stored_scales.nbytes == fmt.bytes_per_state(n, signed)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "unsigned"])
def test_dequantized_values_are_within_the_closed_form_bound(precision, signed):
    fmt = FORMATS[precision]
    x = hostile_values(np.random.default_rng(1), 50_000, signed)
    codes, scales = quantization.quantize(x, fmt, signed)
    back = quantization.dequantize(codes, scales, fmt, signed, x.shape)
    block = fmt.block_of(signed)
    s = np.repeat(scales, block)[: x.size].astype(np.float64)
    # rounded up (the sign names a second moment's map): no overflow
    assert np.all(np.abs(scales) >= np.abs(quantization._blocked(x, block)).max(axis=1))
    error = np.abs(back.astype(np.float64) - x)
    bound = error_bounds(fmt, signed, x.astype(np.float64), s, stochastic=False) * (1 + 2.0**-20)
    assert np.all(error <= bound)
    assert np.max(error / bound) > 0.4  # the bound is tight, not vacuous
    if not signed:  # no zero level: a positive v never dequantizes to 0
        assert np.all(back[(x > 0)] > 0)


def test_non_finite_values_poison_only_their_block():
    fmt = FORMATS["int8"]
    x = np.ones(3 * fmt.block, dtype=np.float32)
    x[fmt.block + 5] = np.inf
    codes, scales = quantization.quantize(x, fmt, True)
    back = quantization.dequantize(codes, scales, fmt, True, x.shape)
    assert np.isnan(scales[1]) and np.all(np.isnan(back[fmt.block : 2 * fmt.block]))
    assert np.all(back[: fmt.block] == 1) and np.all(back[2 * fmt.block :] == 1)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("how", ["switch", "to_quantized", "torch_checkpoint"])
def test_an_overflowed_square_converts_to_the_ceiling_and_the_weights_stay_finite(precision, how):
    """A second moment that overflowed (+inf, as fp32 Adam and torch.optim keep it), put
    into quantized states by a mid-run switch, ``to_quantized`` or loading torch's
    checkpoint, is held at the ceiling as a step holds it: the conversion left its
    block's scale NaN, and all 128 weights of the block NaN two steps later."""
    grad = torch.full((256,), 0.1)
    grad[5] = 1e22  # its square overflows fp32
    p = torch.nn.Parameter(torch.ones(256))
    opt = (torch.optim.Adam if how == "torch_checkpoint" else adamkit.Adam)([p], lr=1e-3)
    p.grad = grad
    opt.step()
    assert opt.state[p]["exp_avg_sq"][5].isinf()
    if how == "switch":
        opt.param_groups[0]["state_precision"] = precision
    else:
        saved = copy.deepcopy(opt.state_dict())
        opt = adamkit.Adam([p], lr=1e-3, state_precision=precision)
        opt.load_state_dict(to_quantized(saved, [p], precision) if how == "to_quantized" else saved)
    for _ in range(2):
        p.grad = torch.full((256,), 0.1)
        opt.step()
    assert bool(p.isfinite().all())
    assert all(bool(v.float().isfinite().all()) for k, v in opt.state[p].items() if k.endswith("scales"))


def test_restoring_a_block_at_the_ceiling_keeps_its_scale_finite():
    """restore_into's neighbouring-scale trials stepped fp32's largest number up to inf
    and NaN, and counted a NaN scale as reproducing a block without a NaN."""
    fmt = FORMATS["int8"]
    x = torch.full((128,), 1e-5)
    x[0] = torch.finfo(torch.float32).max
    codes = torch.empty(fmt.code_bytes(128), dtype=torch.uint8)
    scales = torch.empty(fmt.blocks(128, False), dtype=blockwise.scale_dtype(fmt, False))
    blockwise.restore_into(x, codes, scales, fmt, signed=False)
    assert bool(scales.float().isfinite().all())


def test_bytes_per_param_meet_the_budget():
    # optimizer-state bytes (two moments) per param of a large tensor, within the
    # budgets of issue 37 (int8 <= 2.05, int4 <= 1.10); exactly what the formats cost
    n = 1 << 20
    both = {name: fmt.bytes_per_state(n, True) + fmt.bytes_per_state(n, False) for name, fmt in FORMATS.items()}
    assert both["int8"] / n <= 2.05 and both["int4"] / n <= 1.10
    assert both["int8"] / n == 1 + 2 / 256 + 1 + 4 / 128  # m: bf16 scales / 256; v: fp32 scales / 128
    assert both["int4"] / n == 0.5 + 2 / 32 + 0.5 + 4 / 128  # m: bf16 scales / 32; v: fp32 scales / 128


# ---------------------------------------------------------------------------- kernels


def conformance_cases():
    for backend in CPU_BACKENDS:
        for precision in PRECISIONS:
            for dtype, mode in [
                (torch.float32, "nearest"),
                (torch.bfloat16, "nearest"),
                (torch.bfloat16, "kahan"),
                (torch.bfloat16, "stochastic"),
            ]:
                for config in CONFIGS:
                    yield pytest.param(
                        backend, precision, dtype, mode, config, id=f"{backend}-{precision}-{dtype}-{mode}-{config}"
                    )


def near_a_rounding_threshold(exact: np.ndarray, scales: np.ndarray, fmt, signed: bool, bits16, tolerance: float):
    """Elements whose code changes when the exact value moves by ``tolerance`` (relative):
    those within fp32 error of their rounding threshold, where a kernel computing in
    fp32 may fall on the other side."""
    x = exact.ravel().astype(np.float64)
    low = quantization.level_codes((x * (1 - tolerance)).astype(np.float32), scales, fmt, signed, bits16)
    high = quantization.level_codes((x * (1 + tolerance)).astype(np.float32), scales, fmt, signed, bits16)
    return low != high


def moment_bits(seed: int, param_index: int, slot: int, step: int, numel: int) -> np.ndarray:
    """The random bits a quantized moment was rounded with (see adamkit.rounding)."""
    from adamkit import rounding

    key = int(rounding.step_keys(rounding.stream_key(seed, rounding.SLOTS * param_index + slot), step))
    return rounding.random_bits(key, numel)


def storing_factor(state: dict, p: torch.Tensor, algorithm: str) -> np.ndarray:
    """The factor r a normalized first moment is stored with (u = fl(m r)): the spec's,
    from the second moment as stored."""
    key = lookup(algorithm).second_moment_key
    second = blockwise.load_moment(state, key, p.shape, blockwise.stored_format(state, key, p.numel()))
    root = lookup(algorithm).first_moment_scale == FirstMomentScale.ROOT
    return quantization.first_moment_divisor(second.numpy(), root, reciprocal=True)


@pytest.mark.parametrize("backend, precision, dtype, mode, config", list(conformance_cases()))
def test_one_step_matches_the_reference_then_the_format(backend, precision, dtype, mode, config):
    """The update uses the new moments before quantization: params match the float64
    reference stepped from the dequantized state (stored per the rounding spec);
    the new moments are the format's quantization of the exact ones, except where an
    exact value lies within fp32 error of a code boundary."""
    cls, kwargs = CONFIGS[config]
    g = torch.Generator().manual_seed(0)
    shapes = [(3000,), (40, 50), ()]
    # the first param's values and gradients spread over eight decades (AdaMax's norm too,
    # and L2 decay's term): its second moments span more than the finer map holds (int8's
    # e4m4: the blocks take e5m3; int4's e4m0: they take the root map), the others' do not
    scales = [10.0 ** (-8 * torch.rand(3000, generator=g)), None, None]
    params = [torch.randn(s, generator=g) for s in shapes]
    params = [torch.nn.Parameter((p * scales[0] if p.numel() == 3000 else p).to(dtype)) for p in params]
    opt = warmed_up(
        cls, params, g, dtype, grad_scales=scales, backend=backend, rounding=mode, state_precision=precision, **kwargs
    )
    group = opt.param_groups[0]
    algorithm, hp = reference_setup(config, group["lr"], group["max_lr"])
    moment_names = oracle_names(lookup(algorithm).second_moment_key)
    fmt = quantization.format_for(precision, lookup(algorithm).first_moment_scale != FirstMomentScale.NONE)

    def dequantized(state: dict, p: torch.Tensor) -> dict:
        assert "exp_avg" not in state  # no silent full-precision fallback, whatever the size
        held = {
            k: name
            for k, name in moment_names.items()
            if (held_as := blockwise.stored_format(state, k, p.numel())) is not None
            and held_as.holds_like(fmt, k in quantization.SIGNED_KEYS)
        }
        return {name: blockwise.load_moment(state, k, p.shape, fmt).double().numpy() for k, name in held.items()}

    before, grads = snapshot_then_step(opt, params, g, dtype, dequantized, grad_scales=scales)
    if fmt.marks_map:  # both maps were stepped
        second = [opt.state[p][blockwise.stored_keys(lookup(algorithm).second_moment_key, fmt)[1]] for p in params]
        signs = torch.cat([s.reshape(-1) for s in second])
        assert bool((signs > 0).any()) and bool((signs < 0).any())

    for index, (p, stored, grad) in enumerate(zip(params, before, grads)):
        expected = stored_reference_step(
            algorithm,
            stored,
            grad,
            hp,
            param_dtype=dtype,
            state_dtype=torch.float32,
            rounding_mode=mode,
            seed=99,
            param_index=index,
        )
        state = opt.state[p]
        theta = stored["param"] + stored.get("compensation", 0.0)
        step_size = group["lr"] / (1 - 0.9 ** expected["step"])
        param_scale = np.abs(theta) + np.abs(expected["exact"]["param"]) + 4 * step_size
        check_stored(p, expected, "param", param_scale)
        for slot, (key, name) in enumerate(moment_names.items(), start=1):
            if name not in expected:
                continue
            signed = key in quantization.SIGNED_KEYS
            codes_key, scales_key = blockwise.stored_keys(key, fmt)
            exact = expected["exact"][name].astype(np.float32)
            if blockwise.normalizes(key, fmt):  # stored as fl(m r), r from the new second moment as stored
                exact = exact * storing_factor(state, p, algorithm)
            bits16 = moment_bits(99, index, slot, expected["step"], p.numel())
            want_codes, want_scales = quantization.quantize(exact, fmt, signed, bits16)
            got_scales = state[scales_key].float().numpy()
            if fmt.exact_scales(signed):  # the absmax itself (its sign: the block's map): the fp32 moment's error shows
                scale_ok = np.abs(got_scales - want_scales) <= 1e-5 * np.abs(want_scales)
            else:  # rounded up to bf16: equal but where the absmax is within fp32 error of a bf16 value
                scale_ok = got_scales == want_scales
            assert scale_ok.mean() > 0.99, f"{name}: {np.sum(~scale_ok)} block scales differ"
            got = quantization.unpack(state[codes_key].numpy(), fmt, p.numel())
            want = quantization.unpack(want_codes, fmt, p.numel())
            in_good_block = np.repeat(scale_ok, fmt.block_of(signed))[: p.numel()]
            differs = (got != want) & in_good_block
            assert np.all(near_a_rounding_threshold(exact, want_scales, fmt, signed, bits16, 1e-4)[differs]), name
            assert np.all(np.abs(got - want)[in_good_block] <= 1), name
            back = blockwise.dequantize(state[codes_key], state[scales_key], fmt, signed, p.shape).double().numpy()
            s_each = np.repeat(got_scales, fmt.block_of(signed))[: p.numel()].reshape(p.shape)
            bound = error_bounds(fmt, signed, exact.astype(np.float64), s_each, stochastic=True)
            assert np.all(np.abs(back - exact) <= bound * 1.001 + 1e-30), name
        assert int(state["step"].item()) == expected["step"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_fused_kernels_and_torch_ops_store_the_same_codes_for_the_same_values(precision):
    """Quantization itself is exact arithmetic on fp32 values: given equal new moments
    (AdaMax with integer-valued gradients keeps them exact), every backend stores
    identical codes and scales."""
    results = []
    for backend in CPU_BACKENDS:
        g = torch.Generator().manual_seed(5)
        p = torch.nn.Parameter(torch.randn(5000, generator=g))
        opt = adamkit.AdaMax(
            [p], lr=1e-3, betas=(0.5, 0.5), eps=1.0, backend=backend, state_precision=precision, seed=0
        )
        p.grad = torch.randint(-8, 8, (5000,), generator=g).float()
        opt.step()
        results.append({k: v.clone() for k, v in opt.state[p].items() if k != "step"})
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


def _root_map_gradient() -> torch.Tensor:
    """Integer gradients (Adam with betas (0.5, 0.5) keeps v = g^2 / 2 exact) whose
    first blocks of 128 decide int4's map at the rule's edges: a g of 1 gives a v ratio
    of 2^-18 to a g of 512, below e4m0's lowest level 2^-15."""
    g = torch.randint(1, 512, (1000,), generator=torch.Generator().manual_seed(7)).float()
    blocks = g[:640].view(5, 128)
    blocks[0, :100], blocks[0, 100:118], blocks[0, 118:] = 0, 512, 1  # 10 of 28 nonzero below: root
    blocks[1, :96], blocks[1, 96:] = 512, 1  # exactly a quarter below: e4m0
    blocks[2, :95], blocks[2, 95:] = 512, 1  # 33 below: root
    blocks[3] = 0  # all zero: a zero scale, e4m0
    blocks[4, :127], blocks[4, 127] = 0, 512  # one nonzero, none below: e4m0
    # the last block holds 104 elements: 30 below is more than a quarter of them (root),
    # though no more than a quarter of a whole block's 128
    g[896:926], g[926:] = 1, 512
    return g


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_second_moment_takes_its_root_map_where_a_quarter_of_its_nonzero_ratios_sit_below_e4m0(backend):
    """The rule at its edges, the same on every backend as in the spec: more than a
    quarter of a block's nonzero ratios below 2^-15 (zeros, params with no gradient,
    need no range) and the scale is negated; the codes are the spec's."""
    g = _root_map_gradient()
    p = torch.nn.Parameter(torch.zeros(1000))
    opt = adamkit.Adam([p], lr=1e-3, betas=(0.5, 0.5), backend=backend, state_precision="int4", seed=0)
    p.grad = g.clone()
    opt.step()
    fmt = FORMATS["int4"]
    codes, scales = (opt.state[p][k] for k in blockwise.stored_keys("exp_avg_sq", fmt))
    v = (g * g * 0.5).numpy()
    marked = quantization.root_blocks(v, np.abs(scales.numpy()), fmt)
    assert np.array_equal(marked[:5], [True, False, True, False, False]) and marked[-1]
    assert np.array_equal(scales.numpy() < 0, quantization.marked_blocks(v, np.abs(scales.numpy()), fmt))
    bits16 = moment_bits(0, 0, 2, 1, 1000)
    want_codes, want_scales = quantization.quantize(v, fmt, False, bits16)
    assert np.array_equal(scales.numpy(), want_scales) and np.array_equal(codes.numpy(), want_codes)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int8_second_moment_takes_e4m4_down_to_a_ratio_of_exactly_its_lowest_level(backend):
    """A block whose smallest v is exactly 2^-15 of its largest (e4m4's lowest level)
    takes e4m4; one just below takes e5m3; codes and scales are the spec's.  AdaMax with
    eps = 0 stores u = |g| exactly; 17408 is a level of e4m4's, not of e5m3's."""
    g = torch.full((256,), 32768.0)
    g[:40], g[64] = 1.0, 17408.0  # block 0: ratio 2^-15 exactly
    g[128:168] = 0.75  # block 1: ratio below 2^-15
    p = torch.nn.Parameter(torch.zeros(256))
    opt = adamkit.AdaMax([p], lr=1e-3, eps=0.0, backend=backend, state_precision="int8", seed=0)
    p.grad = g.clone()
    opt.step()
    fmt = FORMATS["int8"]
    codes, scales = (opt.state[p][k] for k in blockwise.stored_keys("exp_inf", fmt))
    want_codes, want_scales = quantization.quantize(g.numpy(), fmt, False, moment_bits(0, 0, 2, 1, 256))
    assert np.array_equal(scales.numpy(), want_scales) and np.array_equal(codes.numpy(), want_codes)
    assert np.array_equal(np.sign(want_scales), [-1, 1])  # the two maps, by the scale's sign
    assert moment_value(opt.state[p], "exp_inf", p)[64] == 17408.0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_a_finite_first_moment_beyond_the_scale_s_range_is_held_at_the_ceiling(precision):
    """|m| near fp32's largest number (above bf16's largest scale) is held at the
    ceiling as the spec holds it, on every backend alike: without the ceiling, the CPU
    kernel's block scale became NaN and the weights NaN at the next step."""
    states = []
    for backend in CPU_BACKENDS:
        p = torch.nn.Parameter(torch.ones(256))
        opt = adamkit.Adam([p], lr=1e-3, betas=(0.0, 0.999), backend=backend, state_precision=precision, seed=0)
        for first in (3.4e38, 1.0):
            p.grad = torch.ones(256)
            p.grad[5] = first
            opt.step()
            scales = [v for k, v in opt.state[p].items() if k.endswith("scales")]
            assert all(bool(v.float().isfinite().all()) for v in scales) and bool(p.isfinite().all()), backend
        states.append({k: v.clone() for k, v in opt.state[p].items()})
    for other in states[1:]:
        assert all(torch.equal(states[0][k], other[k]) for k in states[0])


# ---------------------------------------------------------------------------- the criteria


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_one_step_from_identical_state_against_torch(backend, precision):
    """The issue's criterion: from identical state (adamkit's dequantized state, given
    to torch.optim.AdamW through the converter), one step: dequantized states within
    atol 3e-3 / rtol 1e-3 of fp32 AdamW's with fewer than 20 per million outside,
    param mean absolute error < 6e-5.  Gradients of std 0.01 (the anchors' test
    scale), where that tolerance is loose; so the states are also held to the
    format's closed-form bound relative to each block's scale, which does not
    depend on the gradients' scale.  A million params (16k under the Triton
    interpreter, which is slow; its bits are the numba kernel's, test_kernel_parity.py)."""
    grad_scale = 1e-2
    g = torch.Generator().manual_seed(0)
    shape = (64, 256) if backend == "triton" else (1000, 1000)
    ours = torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1)
    opt = adamkit.AdamW([ours], lr=1e-3, backend=backend, state_precision=precision)
    for _ in range(10):
        ours.grad = torch.randn(shape, generator=g) * grad_scale
        opt.step()
    theirs = torch.nn.Parameter(ours.detach().clone())
    torch_opt = torch.optim.AdamW([theirs], lr=1e-3)
    torch_opt.load_state_dict(to_full_precision(opt.state_dict(), [ours]))
    grad = torch.randn(shape, generator=g) * grad_scale
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    torch_opt.step()

    mine = to_full_precision(opt.state_dict(), [ours])["state"][0]
    fmt = FORMATS[precision]
    for key in ("exp_avg", "exp_avg_sq"):
        want = torch_opt.state[theirs][key]
        outside = ~torch.isclose(mine[key], want, rtol=1e-3, atol=3e-3)
        assert outside.sum().item() < 20 * want.numel() / 1e6, key
        block = fmt.block_of(key == "exp_avg")
        scales = opt.state[ours][blockwise.stored_keys(key, fmt)[1]].float().repeat_interleave(block)
        scales = scales[: want.numel()]
        bound = error_bounds(fmt, key == "exp_avg", want, scales.view(shape), stochastic=True) * 1.001
        assert torch.all((mine[key] - want).abs() <= bound + 2.0**-20 * want.abs()), key  # + fp32 op order
    assert (ours - theirs).abs().mean().item() < 6e-5


@pytest.mark.parametrize("precision", PRECISIONS)
def test_small_and_ragged_tensors_are_quantized_too(precision):
    fmt = FORMATS[precision]
    params = [torch.nn.Parameter(torch.randn(n)) for n in (1, 3, fmt.block - 1, fmt.block + 1, 4095)]
    opt = adamkit.Adam(params, state_precision=precision)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        state = opt.state[p]
        assert sorted(state) == sorted(
            ["step", *blockwise.stored_keys("exp_avg", fmt), *blockwise.stored_keys("exp_avg_sq", fmt)]
        )
        assert state[blockwise.stored_keys("exp_avg", fmt)[0]].numel() == fmt.code_bytes(p.numel())


def test_a_param_group_can_opt_out():
    embedding, weight = torch.nn.Parameter(torch.randn(50, 8)), torch.nn.Parameter(torch.randn(8, 8))
    opt = adamkit.AdamW(
        [{"params": [embedding], "state_precision": None}, {"params": [weight]}], state_precision="int8"
    )
    embedding.grad, weight.grad = torch.randn_like(embedding), torch.randn_like(weight)
    opt.step()
    assert opt.state[embedding]["exp_avg"].dtype == torch.float32
    assert "exp_avg_int8" in opt.state[weight]


# ---------------------------------------------------------------------------- state dicts and conversion


def trained(backend="cpu", precision="int8", steps=3, **kwargs):
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300,), (20, 30), ()]]
    opt = adamkit.AdamW(params, lr=1e-2, backend=backend, state_precision=precision, **kwargs)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_state_dict_round_trips_codes_and_scales_exactly(backend, precision):
    params, opt = trained(backend, precision, amsgrad=True)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = adamkit.AdamW(copies, lr=1e-2, backend=backend, state_precision=precision, amsgrad=True)
    other.load_state_dict(torch.load(buffer))
    for p, q in zip(params, copies):
        a, b = opt.state[p], other.state[q]
        assert sorted(a) == sorted(b)
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    step_both(opt, params, other, copies, steps=1)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))


def step_both(opt, params, other, copies, steps: int) -> None:
    """Step two optimizers on the same random gradients."""
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        other.step()


def test_conversion_to_torch_and_back():
    params, opt = trained("cpu", "int8")
    full = to_full_precision(opt.state_dict(), params)
    assert all(full["state"][i]["exp_avg"].shape == p.shape for i, p in enumerate(params))
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    torch_opt = torch.optim.AdamW(copies, lr=1e-2)
    torch_opt.load_state_dict(full)
    for i, p in enumerate(params):
        want = blockwise.load_moment(opt.state[p], "exp_avg_sq", p.shape, FORMATS["int8"])
        assert torch.equal(torch_opt.state[copies[i]]["exp_avg_sq"], want)
    fmt = FORMATS["int8"]
    back = to_quantized(torch_opt.state_dict(), copies, "int8")
    for i, p in enumerate(params):  # values that were codes come back as the same values, exactly
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(blockwise.load_moment(back["state"][i], key, p.shape, fmt), full["state"][i][key])
    assert back["param_groups"][0]["state_precision"] == "int8"
    for q in copies:  # a step of torch's: moments that were never codes
        q.grad = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))
    torch_opt.step()
    fresh = torch_opt.state_dict()
    stepped_back = to_quantized(fresh, copies, "int8")
    rounded = []
    for i, p in enumerate(params):  # within the format's bound of the full-precision moments
        for key in ("exp_avg", "exp_avg_sq"):
            got = blockwise.load_moment(stepped_back["state"][i], key, p.shape, fmt)
            rounded.append(not torch.equal(got, fresh["state"][i][key]))
            block = fmt.block_of(key == "exp_avg")
            scales = stepped_back["state"][i][blockwise.stored_keys(key, fmt)[1]].float().repeat_interleave(block)
            bound = error_bounds(
                fmt, key == "exp_avg", fresh["state"][i][key], scales[: p.numel()].view(p.shape), stochastic=False
            )
            assert torch.all((got - fresh["state"][i][key]).abs() <= bound * 1.001)
    assert all(rounded[:2])  # (the bound is met by values that moved: a block of one holds its value)
    with pytest.raises(ValueError, match="params has 2 entries"):
        to_full_precision(opt.state_dict(), params[:2])
    with pytest.raises(ValueError, match="Invalid state_precision: 'int2'"):
        to_quantized(full, params, "int2")


def test_to_quantized_refuses_a_complex_param_s_state_by_name():
    """It once dropped the imaginary part (with only torch's cast warning)."""
    p = torch.nn.Parameter(torch.randn(300, dtype=torch.complex64))
    opt = torch.optim.Adam([p])
    p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match=r"state\[0\]\['exp_avg_sq'\] is torch.complex64: quantized states need real"):
        to_quantized(opt.state_dict(), [p], "int8")


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_to_full_precision_given_params_in_another_order_names_the_mismatch(precision):
    """Params of other sizes than the state's (a model's order instead of the state
    dict's) once left those moments quantized while the groups were marked full
    precision: torch.optim then failed with KeyError 'exp_avg'."""
    params = [torch.nn.Parameter(torch.randn(4, 8)), torch.nn.Parameter(torch.randn(4))]
    opt = adamkit.AdamW(params, state_precision=precision)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    with pytest.raises(ValueError, match=r"exp_avg is held in .* in state\[0\] \(given a param of shape \(4,\)\)"):
        to_full_precision(opt.state_dict(), params[::-1])


@pytest.mark.parametrize("name", [name for name in FAMILY if "state_precision" not in refused(name)])
@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_to_quantized_stores_what_the_class_itself_would(name, precision):
    """``to_quantized`` of a class's fp32 state dict holds the very codes and scales that
    class converts the same moments to (ADOPT's first moment, normalized already, is
    stored plain: once it was normalized a second time, 4x the error)."""
    cls = FAMILY[name][0]
    g = torch.Generator().manual_seed(5)
    params = [torch.nn.Parameter(torch.randn(300, generator=g)), torch.nn.Parameter(torch.randn(7, 9, generator=g))]
    opt = cls(params, lr=1e-2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * torch.logspace(-2, 2, p.numel()).view(p.shape)
        opt.step()
    converted = to_quantized(opt.state_dict(), params, precision)
    twin = cls([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    twin.param_groups[0]["state_precision"] = precision
    for p in twin.param_groups[0]["params"]:
        init_state(twin.state[p], p, twin.param_groups[0], twin.algorithm)  # the class's own conversion
    for i, p in enumerate(twin.param_groups[0]["params"]):
        ours, theirs = converted["state"][i], twin.state[p]
        assert sorted(ours) == sorted(theirs)
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), name


def test_a_torch_checkpoint_loads_into_a_quantized_optimizer_and_is_quantized_at_the_next_step():
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(500, generator=g))]
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    params[0].grad = torch.randn(500, generator=g)
    torch_opt.step()
    opt = adamkit.AdamW(params, lr=1e-2, state_precision="int4")
    opt.load_state_dict(copy.deepcopy(torch_opt.state_dict()))
    expected = to_quantized(torch_opt.state_dict(), params, "int4")["state"][0]
    params[0].grad = torch.zeros(500)
    before = {k: v.clone() for k, v in expected.items()}
    opt.step()  # the loaded fp32 moments are quantized first, then stepped
    codes = blockwise.stored_keys("exp_avg", FORMATS["int4"])[0]
    assert "exp_avg" not in opt.state[params[0]] and codes in opt.state[params[0]]
    assert before[codes].shape == opt.state[params[0]][codes].shape


def test_an_adamkit_checkpoint_brings_its_state_precision_and_setting_it_after_loading_converts():
    """As torch.optim's load brings every option of the saved groups, an fp32 run's
    checkpoint loaded into an int8 optimizer goes on in fp32 (the docs say so); setting
    ``state_precision`` after loading quantizes the moments at the next step."""
    g = torch.Generator().manual_seed(3)
    params = [torch.nn.Parameter(torch.randn(500, generator=g))]
    fp32 = adamkit.AdamW(params, lr=1e-2)
    params[0].grad = torch.randn(500, generator=g)
    fp32.step()
    opt = adamkit.AdamW(params, lr=1e-2, state_precision="int8")
    opt.load_state_dict(copy.deepcopy(fp32.state_dict()))
    assert opt.param_groups[0]["state_precision"] is None
    opt.param_groups[0]["state_precision"] = "int8"
    params[0].grad = torch.zeros(500)
    opt.step()
    assert "exp_avg" not in opt.state[params[0]] and "exp_avg_int8" in opt.state[params[0]]


#: checkpoints of earlier adamkit formats: (precision, moment, its format, scale dtype)
OLDER_FORMATS = {
    "int8 power map": ("int8", "exp_avg_sq", quantization.LEGACY_FORMATS["int8"][0], torch.bfloat16),
    "int8 e4m4 in blocks of 128, bf16 scales": (
        "int8",
        "exp_avg_sq",
        quantization.LEGACY_FORMATS["int8"][1],
        torch.bfloat16,
    ),
    "int8 blocks of 256, bf16 scales": ("int8", "exp_avg_sq", quantization.LEGACY_FORMATS["int8"][2], torch.bfloat16),
    "int8 blocks of 256, fp32 scales": ("int8", "exp_avg_sq", quantization.LEGACY_FORMATS["int8"][2], torch.float32),
    "int4 power map": ("int4", "exp_avg_sq", quantization.LEGACY_FORMATS["int4"][0], torch.bfloat16),
    "int4 bf16 scales": ("int4", "exp_avg_sq", FORMATS["int4"], torch.bfloat16),
    "int4 first moment in blocks of 128": ("int4", "exp_avg", quantization.LEGACY_FORMATS["int4"][1], torch.bfloat16),
    "int4 first moment not normalized": ("int4", "exp_avg", quantization.PLAIN_FORMATS["int4"], torch.bfloat16),
    "int4 second moment in e4m0 alone": ("int4", "exp_avg_sq", quantization.LEGACY_FORMATS["int4"][3], torch.float32),
}


def _write_as(state: dict, key: str, x: np.ndarray, fmt, dtype: torch.dtype) -> np.ndarray:
    """Hold moment ``key``'s values ``x`` in ``state`` as format ``fmt`` keeps them (to
    nearest, scales of ``dtype``) in place of the current format's; the values it holds."""
    signed = key in quantization.SIGNED_KEYS
    for stored in blockwise.stored_keys(key, FORMATS[fmt.name]):
        del state[stored]
    scales = quantization.block_scales(x, fmt.block_of(signed), exact=dtype == torch.float32)
    codes = quantization.level_codes(x, scales, fmt, signed)
    state[quantization.codes_key(key, fmt)] = torch.from_numpy(quantization.pack(codes, fmt))
    state[quantization.scales_key(key, fmt)] = torch.from_numpy(scales).to(dtype)
    return quantization.level_values(codes, scales, fmt, signed)


#: gradient scales: the first half spread over eight decades, the rest 1
HALF_SPREAD = torch.cat([10.0 ** (-8 * torch.rand(500, generator=torch.Generator().manual_seed(3))), torch.ones(500)])


def _older_checkpoint(backend: str, older: str):
    """A quantized optimizer's state dict as an older adamkit wrote it, with the
    moment's values as the spec dequantizes them (int4's first moment plain, as every
    older int4 format kept it, or normalized by the older second moment where the older
    format normalizes it).  The gradients are scaled by :data:`HALF_SPREAD`, so that the
    current second moments take both maps: int4's root map and e4m0, int8's e5m3 and
    e4m4."""
    precision, key, fmt, dtype = OLDER_FORMATS[older]
    p = torch.nn.Parameter(torch.randn(1000, generator=torch.Generator().manual_seed(4)))
    opt = adamkit.AdamW([p], lr=1e-2, backend=backend, state_precision=precision, seed=0)
    p.grad = torch.randn(1000, generator=torch.Generator().manual_seed(5)) * HALF_SPREAD
    opt.step()
    values = {k: moment_value(opt.state[p], k, p).numpy() for k in ("exp_avg", "exp_avg_sq")}
    old = copy.deepcopy(opt.state_dict())
    held = _write_as(old["state"][0], key, values[key], fmt, dtype)
    if FORMATS[precision].normalized_first_moment and key != "exp_avg":
        if fmt.normalized_first_moment:  # stored over the older second moment's divisor, as the older format did
            factor = quantization.first_moment_divisor(held, root=True, reciprocal=True)
            _write_as(old["state"][0], "exp_avg", values["exp_avg"] * factor, fmt, torch.bfloat16)
        else:
            plain = quantization.PLAIN_FORMATS[precision]
            _write_as(old["state"][0], "exp_avg", values["exp_avg"], plain, torch.bfloat16)
    return p, old, precision, key, held


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("older", list(OLDER_FORMATS))
def test_older_checkpoints_load_keep_their_values_and_step_in_the_current_format(backend, older):
    """Loaded, the old second moment reads back as the values it held; the next step
    converts it to the current format (bf16 scales that the format keeps in fp32 widen
    exactly, codes and all; other formats are quantized again, to nearest) and steps
    exactly as an optimizer loading those values converted to the current format does."""
    p, old, precision, key, values = _older_checkpoint(backend, older)
    signed = key in quantization.SIGNED_KEYS
    steps = []
    for checkpoint in (old, to_quantized(to_full_precision(old, [p]), [p], precision)):
        q = torch.nn.Parameter(p.detach().clone())
        opt = adamkit.AdamW([q], lr=1e-2, backend=backend, state_precision=precision, seed=0)
        opt.load_state_dict(copy.deepcopy(checkpoint))
        if checkpoint is old:
            assert np.array_equal(moment_value(opt.state[q], key, q).numpy(), values)
        q.grad = torch.randn(1000, generator=torch.Generator().manual_seed(6)) * HALF_SPREAD
        opt.step()
        fmt = FORMATS[precision]
        scales = opt.state[q][quantization.scales_key(key, fmt)]
        assert scales.dtype == blockwise.scale_dtype(fmt, signed) and scales.numel() == fmt.blocks(1000, signed)
        if not (signed or OLDER_FORMATS[older][2].legacy):  # both maps (a power map's floor, 2^-8, holds v up)
            assert bool((scales < 0).any()) and bool((scales > 0).any())
        steps.append((q.detach().clone(), moment_value(opt.state[q], key, q)))
    assert torch.equal(steps[0][0], steps[1][0]) and torch.equal(steps[0][1], steps[1][1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_switching_state_precision_mid_run_converts_the_state(backend):
    params, opt = trained(backend, None)
    m = opt.state[params[0]]["exp_avg"].clone()
    for precision, next_precision in (("int8", "int4"), ("int4", None)):
        opt.param_groups[0]["state_precision"] = precision
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        assert blockwise.stored_keys("exp_avg", FORMATS[precision])[0] in opt.state[params[0]]
        opt.param_groups[0]["state_precision"] = next_precision
    opt.step()
    back = opt.state[params[0]]["exp_avg"]
    assert back.dtype == torch.float32 and torch.allclose(back, m * 0.9**3, atol=0.2 * m.abs().max().item())


# ---------------------------------------------------------------------------- errors


def test_quantized_states_reject_complex_params_and_differentiable():
    z = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    opt = adamkit.Adam([z], state_precision="int8")
    z.grad = torch.randn_like(z)
    with pytest.raises(ValueError, match="state_precision='int8' needs real params"):
        opt.step()
    with pytest.raises(ValueError, match="state_precision='int4' does not support differentiable=True"):
        adamkit.Adam([torch.nn.Parameter(torch.randn(3))], state_precision="int4", differentiable=True)
    with pytest.raises(ValueError, match="allowed: None, 'fp32', 'bf16', 'int8', 'int4'"):
        adamkit.Adam([torch.nn.Parameter(torch.randn(3))], state_precision="int2")


# ---------------------------------------------------------------------------- hostile layouts and values


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_awkward_layouts_match_the_torch_op_path_and_stay_inside_views(backend, precision):
    """Empty, transposed, 0-d and sliced-view params: the same results as the foreach
    path (codes follow the row-major index whatever the memory order), and nothing
    outside a view is written."""
    base = torch.randn(40, 60, generator=torch.Generator().manual_seed(0))
    results = []
    for name in (backend, "foreach"):
        g = torch.Generator().manual_seed(1)
        whole = base.clone()
        view = whole[:, ::3]
        params = [torch.zeros(0), torch.randn(30, 20, generator=g).t(), torch.randn((), generator=g), view]
        opt = adamkit.AdamW(params, lr=1e-2, backend=name, state_precision=precision, seed=0)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append((params, whole, opt))
    (mine, whole, opt), (theirs, _, other) = results
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(mine, theirs))
    assert torch.equal(whole[:, 1::3], base[:, 1::3]) and torch.equal(whole[:, 2::3], base[:, 2::3])
    for a, b in zip(mine, theirs):  # the same blocks (exact scales may differ by the fp32 rounding of v)
        scales = [k for k in opt.state[a] if k.endswith("_scales")]
        assert all(torch.allclose(opt.state[a][k], other.state[b][k], rtol=1e-6, atol=0) for k in scales)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_gradient_poisons_only_its_block(backend):
    fmt = FORMATS["int8"]
    p = torch.nn.Parameter(torch.randn(3 * fmt.block, generator=torch.Generator().manual_seed(0)))
    opt = adamkit.Adam([p], backend=backend, state_precision="int8")
    p.grad = torch.ones_like(p)
    p.grad[fmt.block + 7] = float("nan")
    opt.step()
    scales = opt.state[p]["exp_avg_int8_scales"].float()
    assert scales[1].isnan() and scales[[0, 2]].isfinite().all()
    m = blockwise.load_moment(opt.state[p], "exp_avg", p.shape, fmt)
    assert m[fmt.block : 2 * fmt.block].isnan().all() and m[: fmt.block].isfinite().all()
    assert p[fmt.block + 7].isnan() and p[: fmt.block].isfinite().all()  # the update itself is per element


# ---------------------------------------------------------------------------- exact full-precision export


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("signed", [True, False])
def test_dequantized_values_are_restored_to_the_same_codes_and_scales(precision, signed):
    """restore_into(dequantize(q)) == q for every block (ragged tail, zero, NaN and
    tiny blocks included, and blocks of subnormals: there a neighbouring scale is far
    from the block's, and a trial's codes passed the top level and indexed past the
    map), for codes rounded stochastically as a step rounds them: a
    first moment's scale is its absmax rounded *up* to bf16 and its largest element
    may have gone down to the level below the top, so the absmax of the dequantized
    values can round to a smaller scale, and plain re-quantization would pick it (a
    second moment's exact scale keeps its largest element at the top).  The oracle is
    the NumPy reference of the format."""
    fmt = FORMATS[precision]
    g = np.random.default_rng(0)
    n = 400 * fmt.block + 7
    x = (g.standard_normal(n) * np.exp(g.uniform(-30, 5, n))).astype(np.float32)
    x = np.abs(x) if not signed else x
    x[: fmt.block] = 0.0  # a zero block
    x[fmt.block + 3] = np.nan  # a non-finite block
    block = fmt.block_of(signed)  # blocks of fp32 subnormals, whose scales' neighbours are far apart
    x[4 * block : 8 * block] = (g.standard_normal(4 * block) * 1.3e-40).astype(np.float32)
    x = np.abs(x) if not signed else x
    stored, scales = quantization.quantize(x, fmt, signed, g.integers(0, 65536, n))
    values = torch.from_numpy(quantization.dequantize(stored, scales, fmt, signed, x.shape))
    codes = torch.empty(fmt.code_bytes(x.size), dtype=torch.uint8)
    restored_scales = torch.empty(fmt.blocks(x.size, signed), dtype=blockwise.scale_dtype(fmt, signed))
    blockwise.restore_into(values, codes, restored_scales, fmt, signed)
    back = blockwise.dequantize(codes, restored_scales, fmt, signed, torch.Size([n]))
    assert torch.equal(back.isnan(), values.isnan()) and torch.equal(back[~back.isnan()], values[~values.isnan()])
    blockwise.quantize_into(values, codes, restored_scales, fmt, signed)
    plain = blockwise.dequantize(codes, restored_scales, fmt, signed, torch.Size([n]))
    same = torch.equal(plain[~plain.isnan()], values[~values.isnan()])
    assert same == fmt.exact_scales(signed)  # why restore_into exists


def test_a_root_map_block_whose_low_elements_were_rounded_up_is_restored_exactly():
    """An int4 block that took its root map (40 of 127 nonzero ratios below 2^-15), whose
    stochastic rounding lifted enough of them out of that range that its values alone
    would choose e4m0 at the same scale: only the scale negated gives them back (the
    NumPy reference quantizes, 20 draws of the rounding bits)."""
    fmt = FORMATS["int4"]
    block = fmt.block_of(False)
    x = np.full(block, 0.5, np.float32)
    x[0] = 1.0
    x[1:41] = np.float32(2.0**-15.1)
    assert quantization.root_blocks(x, quantization.block_scales(x, block, exact=True), fmt)[0]
    lifted = 0
    for key in range(20):
        bits = np.random.default_rng(key).integers(0, 65536, block)
        stored, scales = quantization.quantize(x, fmt, False, bits)
        values = torch.from_numpy(quantization.dequantize(stored, scales, fmt, False, x.shape))
        lifted += int((values < 2.0**-15).sum()) * 4 <= 127
        codes, restored = torch.empty(block // 2, dtype=torch.uint8), torch.empty(1)
        blockwise.restore_into(values, codes, restored, fmt, False)
        assert restored.item() == scales[0] < 0
        assert torch.equal(blockwise.dequantize(codes, restored, fmt, False, torch.Size([block])), values)
    assert lifted > 0  # (the case this is about was drawn)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_restore_quantizes_values_that_were_never_quantized_as_usual(precision):
    fmt = FORMATS[precision]
    x = torch.randn(5 * fmt.block + 3, generator=torch.Generator().manual_seed(3))
    expected = [
        torch.empty(fmt.code_bytes(x.numel()), dtype=torch.uint8),
        torch.empty(fmt.blocks(x.numel(), True), dtype=torch.bfloat16),
    ]
    restored = [torch.empty_like(t) for t in expected]
    blockwise.quantize_into(x, *expected, fmt, True)
    blockwise.restore_into(x, *restored, fmt, True)
    assert all(torch.equal(a, b) for a, b in zip(expected, restored))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("precision", PRECISIONS)
def test_full_precision_export_round_trips_exactly(backend, precision):
    """Within full_precision_export the state dict holds fp32 moments under torch's
    keys (loadable by torch.optim); loading it quantizes again, and training goes on
    bit for bit as without the round trip."""
    params, opt = trained(backend, precision, amsgrad=True)
    with adamkit.convert.full_precision_export(opt):
        exported = opt.state_dict()
    assert any(key.endswith("_scales") for key in opt.state_dict()["state"][0])  # the context ended
    for i, p in enumerate(params):
        assert {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"} <= exported["state"][i].keys()
        assert not any(key.endswith("_scales") for key in exported["state"][i])
        assert (
            exported["state"][i]["exp_avg"].dtype == torch.float32 and exported["state"][i]["exp_avg"].shape == p.shape
        )
    torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], amsgrad=True).load_state_dict(
        copy.deepcopy(exported)
    )
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = adamkit.AdamW(copies, lr=1e-2, backend=backend, state_precision=precision, amsgrad=True)
    other.load_state_dict(copy.deepcopy(exported))
    step_both(opt, params, other, copies, steps=2)
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    assert all(torch.equal(opt.state[p][k], other.state[q][k]) for p, q in zip(params, copies) for k in opt.state[p])


@pytest.mark.parametrize("name", ["NAdam", "RAdam"])
@pytest.mark.parametrize("precision", ["int8", "int4"])
@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_nadam_and_radam_step_from_their_dequantized_moments(name, precision, backend):
    """A quantized NAdam/RAdam step is torch.optim's fp32 step from the dequantized
    moments, bit for bit (its state dict, converted to full precision, loads there)."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3000, generator=g)), torch.nn.Parameter(torch.randn(40, 50, generator=g))]
    ours = getattr(adamkit, name)(params, lr=1e-2, weight_decay=0.1, backend=backend, state_precision=precision)
    for _ in range(8):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        ours.step()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    theirs = getattr(torch.optim, name)(twins, lr=1e-2, weight_decay=0.1, foreach=False)
    theirs.load_state_dict(adamkit.convert.to_full_precision(ours.state_dict(), params))
    for p, q in zip(params, twins):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = p.grad.clone()
    ours.step()
    theirs.step()
    for p, q in zip(params, twins):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------- int4's normalized first moment


def test_the_first_moment_divisor_follows_the_second_moment_s_root_block_by_block():
    """d <= sqrt(v) < sqrt(2) d (a norm: d <= v < 2 d) wherever v and d are normal, r d
    is 1 within fp32 rounding; and over a block of int4's v (its scale times powers of
    two) sqrt(v) / d is one number, so the first moment is scaled as by sqrt(v)."""
    g = np.random.default_rng(0)
    v = (10.0 ** g.uniform(-30, 30, 100_000)).astype(np.float32)
    for root, reference, spread in ((True, np.sqrt(v.astype(np.float64)), np.sqrt(2)), (False, v, 2.0)):
        d = quantization.first_moment_divisor(v, root).astype(np.float64)
        r = quantization.first_moment_divisor(v, root, reciprocal=True).astype(np.float64)
        assert np.all((d <= reference) & (reference < spread * d))
        assert np.all(np.abs(d * r - 1) < 2.0**-23)
    fmt = FORMATS["int4"]
    second = (10.0 ** g.uniform(-12, 0, 128 * 64)).astype(np.float32)
    codes, scales = quantization.quantize(second, fmt, False, g.integers(0, 65536, second.size))
    stored = quantization.dequantize(codes, scales, fmt, False, second.shape).astype(np.float64)
    ratio = (np.sqrt(stored) / quantization.first_moment_divisor(stored.astype(np.float32), True)).reshape(-1, 128)
    assert np.all(np.abs(ratio / ratio[:, :1] - 1) < 2.0**-22)  # per block: one number (fl(sqrt 2) aside)
    extremes = np.array([0, 1e-45, np.inf, np.nan, np.finfo(np.float32).max], dtype=np.float32)
    for root in (True, False):
        for reciprocal in (False, True):
            x = quantization.first_moment_divisor(extremes, root, reciprocal)
            assert np.all(np.isfinite(x) & (x >= np.finfo(np.float32).tiny))
            scale = FirstMomentScale.ROOT if root else FirstMomentScale.NORM  # the torch paths' own copy
            torch_x = blockwise.first_moment_divisor(torch.from_numpy(extremes), scale, reciprocal).numpy()
            assert np.array_equal(torch_x.view(np.int32), x.view(np.int32))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_int4_stores_the_first_moment_over_the_divisor_of_the_stored_second_moment(backend):
    """The first moment reads back as fl(u d), d from v as stored, u of an update's
    size, and ADOPT's first moment, normalized already, is stored as it is."""
    g = torch.Generator().manual_seed(1)
    for cls, normalized in ((adamkit.AdamW, True), (adamkit.Adamax, True), (adamkit.ADOPT, False)):
        p = torch.nn.Parameter(torch.randn(3000, generator=g) * 10.0 ** (-6 * torch.rand(3000, generator=g)))
        opt = cls([p], lr=1e-3, backend=backend, state_precision="int4", seed=0)
        for _ in range(3):
            p.grad = torch.randn(3000, generator=g) * 10.0 ** (-6 * torch.rand(3000, generator=g))
            opt.step()
        state, spec = opt.state[p], lookup(opt.algorithm)
        fmt = quantization.format_for("int4", normalized)
        assert blockwise.stored_format(state, "exp_avg", p.numel()) == fmt
        u = blockwise.dequantize(*(state[k] for k in blockwise.stored_keys("exp_avg", fmt)), fmt, True, p.shape)
        m = moment_value(state, "exp_avg", p)
        if normalized:
            second = moment_value(state, spec.second_moment_key, p).numpy()
            divisor = quantization.first_moment_divisor(second, spec.first_moment_scale == FirstMomentScale.ROOT)
            assert np.array_equal(m.numpy(), u.numpy() * divisor)  # m = fl(u d)
            # of an update's size: m spans decades, u = m / d (d within sqrt(2) of sqrt(v as stored);
            # a norm's: of v) does not.  Largest over median, AdamW and AdaMax on the single-tensor
            # path, 30 rounding seeds: m 80 or more, u at most 11.3.  (A bound on |u| itself from
            # |m| / sqrt(v) <= 7.27 would hold for fp32's v, not for one rebuilt each step from v
            # as stored, which stochastic rounding may lower: |u| reached 23.1 in those seeds.)
            spread = {name: float(x.abs().max() / x.abs()[x != 0].median()) for name, x in (("u", u), ("m", m))}
            assert spread["u"] < 16 and spread["m"] > 50, spread
        else:
            assert torch.equal(m, u)
