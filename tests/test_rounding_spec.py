"""The rounding specification (adamkit.rounding) against independent oracles: torch's
own conversions for round-to-nearest, closed-form probabilities for stochastic
rounding, and the NumPy spec for the torch implementation the list kernels use."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from adamkit import rounding
from adamkit.kernels import KERNELS, storage

try:  # the Triton kernel's device function (run by Triton's CPU interpreter here)
    import triton
    import triton.language as tl

    from adamkit.kernels.triton.device import _store_param, _to_storage, _to_storage_stochastic
except ImportError:
    triton = None

FORMATS = [torch.bfloat16, torch.float16]


def awkward_float32(n: int = 200_000, seed: int = 0) -> np.ndarray:
    """Values over the whole fp32 range, plus the special and boundary cases."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-100, 87, n))).astype(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.3895e38, -3.39e38, 65504, 65519, 65520, 1e6]
    special += [2.0**-24, 1.5 * 2.0**-24, 2.0**-25, 2.0**-133, 3 * 2.0**-134, 1.00390625, 1 + 2.0**-9]
    return np.concatenate([x, np.array(special + [-v for v in special], dtype=np.float32)])


@pytest.mark.parametrize("dtype", FORMATS)
def test_round_nearest_is_torchs_conversion(dtype):
    x = awkward_float32()
    ours = rounding.round_nearest(x.astype(np.float64), dtype)
    theirs = torch.from_numpy(x).to(dtype).double().numpy()
    assert np.array_equal(ours, theirs, equal_nan=True)


@pytest.mark.parametrize("dtype", FORMATS)
def test_stochastic_rounding_probability_is_exact(dtype):
    """Over all 2^16 values of r, x rounds away from zero floor(fraction * 2^16) times:
    the mean of the results is x itself, up to 2^-16 of the spacing (exactly x when
    the fraction has at most 16 bits, as for every fp32 value bound for bf16)."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(40) * np.exp(rng.uniform(-10, 10, 40))).astype(np.float32).astype(np.float64)
    every_r = np.arange(65536)
    for value in x:
        results = rounding.round_stochastic(np.full(65536, value), dtype, every_r)
        lo, hi = np.min(np.abs(results)), np.max(np.abs(results))
        assert set(np.abs(results)) <= {lo, hi}
        neighbours = rounding.to_float(rounding.toward_zero(np.array([value]), dtype), dtype)
        assert lo == abs(neighbours[0])
        gap = rounding.spacing(rounding.toward_zero(np.array([value]), dtype), dtype)[0]
        assert abs(np.mean(results) - value) <= gap * 2.0**-16
        if dtype == torch.bfloat16:
            assert np.mean(results) == value


@pytest.mark.parametrize("dtype", FORMATS)
def test_torch_implementation_follows_the_spec(dtype):
    x = awkward_float32(seed=2)
    keys = rounding.step_keys(rounding.stream_key(12345, 7), 3)
    bits = rounding.random_bits(int(keys), x.size)
    key = storage.step_key(rounding.stream_key(12345, 7), torch.tensor(3.0))
    torch_bits = storage.random_bits(key, torch.Size([x.size]), torch.device("cpu"))
    assert np.array_equal(torch_bits.numpy(), bits.astype(np.int64))
    expected = rounding.round_stochastic(x.astype(np.float64), dtype, bits)
    ours = storage.round_stochastic(torch.from_numpy(x), dtype, torch_bits).double().numpy()
    assert np.array_equal(ours, expected, equal_nan=True)


def test_mix32_is_lowbias32_and_torch_agrees():
    """Check values of lowbias32 computed here with plain Python integers."""

    def lowbias32(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xDEADBEEF]
    expected = [lowbias32(v) for v in values]
    assert [int(v) for v in rounding.mix32(values)] == expected
    assert storage.mix32(torch.tensor(values, dtype=torch.int64)).tolist() == expected


def test_random_bits_are_uniform_and_independent_of_stream():
    a = rounding.random_bits(int(rounding.step_keys(rounding.stream_key(0, 0), 1)), 1 << 16)
    b = rounding.random_bits(int(rounding.step_keys(rounding.stream_key(0, 1), 1)), 1 << 16)
    c = rounding.random_bits(int(rounding.step_keys(rounding.stream_key(0, 0), 2)), 1 << 16)
    for bits in (a, b, c):
        assert 0 <= bits.min() and bits.max() < 65536
        assert abs(bits.mean() / 65535 - 0.5) < 0.01
        histogram = np.bincount(bits >> 12, minlength=16)
        assert histogram.min() > 0.9 * (1 << 12)
    assert np.mean(a == b) < 0.01 and np.mean(a == c) < 0.01


@pytest.mark.parametrize("dtype", FORMATS)
def test_a_kahan_split_that_overflows_keeps_no_compensation(dtype):
    """Where p = rn(theta) overflows, c = 0 (as every kernel stores it), so p + c stays
    the infinity nearest rounding gives; c = theta - p would be -inf and p + c NaN."""
    top = float(torch.finfo(dtype).max)
    theta = np.array([top * 1.01, -top * 1.01, 1.0 + 2.0**-12, np.inf])
    p, c = rounding.kahan_split(theta, dtype)
    assert np.array_equal(p[[0, 1, 3]], [np.inf, -np.inf, np.inf]) and np.array_equal(c[[0, 1, 3]], [0.0, 0.0, 0.0])
    assert np.array_equal(p + c, [np.inf, -np.inf, p[2] + c[2], np.inf]) and c[2] != 0


@pytest.mark.parametrize("dtype", FORMATS)
def test_kahan_split_keeps_what_rounding_loses(dtype):
    rng = np.random.default_rng(3)
    theta = rng.standard_normal(100_000)
    p, c = rounding.kahan_split(theta, dtype)
    assert np.array_equal(p, rounding.round_nearest(theta, dtype))
    mantissa = 8 if dtype == torch.bfloat16 else 11
    # two 16-bit numbers: about twice the precision of one, down to half the
    # smallest subnormal (fp16's narrow exponent range)
    smallest = rounding.spacing(np.zeros(1, dtype=np.uint16), dtype)[0]
    assert np.all(np.abs(p + c - theta) <= 2.0 ** (-2 * mantissa) * np.abs(theta) + smallest / 2)


def near_the_top(dtype: torch.dtype) -> np.ndarray:
    """fp32 values from two spacings below the format's largest finite number to two
    above (every fp32 pattern for fp16, every 64th for bf16), fp32's largest, the
    infinities and NaN, with their negatives."""
    top = np.float32(torch.finfo(dtype).max).view(np.int32)
    spacing = 1 << (13 if dtype == torch.float16 else 16)  # in fp32 patterns
    patterns = np.arange(top - 2 * spacing, min(top + 2 * spacing, 0x7F7FFFFF), 1 if dtype == torch.float16 else 64)
    x = np.concatenate([patterns.astype(np.int32).view(np.float32), [np.finfo(np.float32).max, np.inf, np.nan]])
    return np.concatenate([x, -x]).astype(np.float32)


@pytest.mark.parametrize("dtype", FORMATS)
def test_stochastic_rounding_overflows_exactly_where_nearest_rounding_does(dtype):
    """A value that nearest rounding keeps finite is never carried to infinity (an fp16
    weight at 65505 once was, one time in 32); one it overflows is always infinite,
    whatever the random bits."""
    x = near_the_top(dtype).astype(np.float64)
    nearest = rounding.round_nearest(x, dtype)
    top = float(torch.finfo(dtype).max)
    for r in (0, 1, 32767, 32768, 65535):
        rounded = rounding.round_stochastic(x, dtype, np.full(x.size, r))
        assert np.array_equal(np.isinf(rounded), np.isinf(nearest))
        assert np.array_equal(np.isnan(rounded), np.isnan(x))
        finite = np.isfinite(rounded)
        assert np.all(np.abs(rounded[finite]) <= top) and np.all(np.signbit(rounded) == np.signbit(nearest))
    below = x[np.isfinite(nearest) & (np.abs(x) < top)]  # unbiased up to the largest finite number
    every_r = np.arange(65536)
    for value in below[:: max(1, below.size // 20)]:
        assert np.mean(rounding.round_stochastic(np.full(65536, value), dtype, every_r)) == pytest.approx(
            value, rel=1e-9
        )


def _numba_rounding(x: np.ndarray, dtype: torch.dtype, bits: np.ndarray) -> np.ndarray:
    numba = pytest.importorskip("numba")
    from adamkit.kernels.intrinsics import stochastic_bfloat16, stochastic_half

    convert = stochastic_bfloat16 if dtype == torch.bfloat16 else stochastic_half

    @numba.njit
    def round_all(x, bits, out):
        for i in range(x.size):
            out[i] = convert(x[i], np.int32(bits[i]))

    out = np.empty(x.size, dtype=np.uint16 if dtype == torch.bfloat16 else np.int16)
    round_all(x, bits.astype(np.int32), out)
    return torch.from_numpy(out.view(np.int16)).view(dtype).double().numpy()


def _skip_without_the_interpreter() -> None:
    """The Triton device functions run here on CPU tensors, under Triton's interpreter."""
    if triton is None or not KERNELS["triton"].supports(torch.device("cpu")):
        pytest.skip("Triton's CPU interpreter is not available")


def _triton_rounding(x: np.ndarray, dtype: torch.dtype, bits: np.ndarray) -> np.ndarray:
    _skip_without_the_interpreter()
    source, out = torch.from_numpy(x), torch.empty(x.size, dtype=dtype)
    storage_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    grid = (triton.cdiv(x.size, 1024),)
    _round_all[grid](source, torch.from_numpy(bits.astype(np.uint32)), out, x.size, storage_dtype, 1024)
    return out.double().numpy()


if triton is not None:

    @triton.jit
    def _round_all(x_ptr, bits_ptr, out_ptr, n, STORAGE: tl.constexpr, BLOCK: tl.constexpr):
        """Every element rounded by the Triton kernel's device function."""
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        bits16 = tl.load(bits_ptr + offsets, mask=mask)
        tl.store(
            out_ptr + offsets, _to_storage_stochastic(tl.load(x_ptr + offsets, mask=mask), bits16, STORAGE), mask=mask
        )


def _ties(dtype: torch.dtype) -> np.ndarray:
    """Every value half-way between two neighbours of ``dtype`` in [1, 2) (even and odd
    lower neighbours alike), both signs, and the same scaled into its subnormals."""
    kept = 10 if dtype == torch.float16 else 7
    k = np.arange(1 << kept)
    ties = (1.0 + k * 2.0**-kept + 2.0 ** -(kept + 1)).astype(np.float32)
    scale = np.float32(2.0**-20 if dtype == torch.float16 else 2.0**-130)
    return np.concatenate([ties, -ties, ties * scale, -ties * scale]).astype(np.float32)


@pytest.mark.parametrize("dtype", FORMATS)
def test_the_triton_kernel_rounds_to_nearest_as_torch_converts(dtype):
    """The device function that stores every 16-bit value without stochastic rounding,
    against torch's own conversion (ties to even), ties written out rather than met by
    chance, and NaNs whose payloads a carry would turn into an infinity or a zero."""
    _skip_without_the_interpreter()
    payloads = np.array([0x7F800001, 0xFFFFFFFF, 0x7FFFFFFF, 0xFFC00001], dtype=np.uint32).view(np.float32)  # NaNs
    x = torch.from_numpy(np.concatenate([_ties(dtype), payloads, awkward_float32(20_000, seed=6)]))
    out = torch.empty(x.numel(), dtype=dtype)
    storage_dtype = tl.bfloat16 if dtype == torch.bfloat16 else tl.float16
    _round_all_nearest[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), storage_dtype, 1024)
    expected = x.to(dtype)
    assert torch.equal(out.view(torch.int16)[~expected.isnan()], expected.view(torch.int16)[~expected.isnan()])
    assert out[expected.isnan()].isnan().all()


def test_the_triton_kernel_splits_an_exact_master_as_the_spec_does():
    """``master_weights="fp32"``: the bf16 param (nearest, ties away from zero) and the
    int16 low bits the Triton kernel stores, against :func:`adamkit.specs.master.split`,
    on every bf16 tie and awkward values."""
    _skip_without_the_interpreter()
    from adamkit.specs import master

    x = np.concatenate([_ties(torch.bfloat16), awkward_float32(20_000, seed=7)])
    high, low = torch.empty(x.size, dtype=torch.bfloat16), torch.empty(x.size, dtype=torch.int16)
    _split_all[(triton.cdiv(x.size, 1024),)](torch.from_numpy(x), high, low, x.size, 1024)
    expected_high, expected_low = master.split(x)
    assert np.array_equal(high.view(torch.int16).numpy().view(np.uint16), expected_high)
    assert np.array_equal(low.numpy(), expected_low)


if triton is not None:

    @triton.jit
    def _round_all_nearest(x_ptr, out_ptr, n, STORAGE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        tl.store(out_ptr + offsets, _to_storage(tl.load(x_ptr + offsets, mask=mask), STORAGE), mask=mask)

    @triton.jit
    def _split_all(x_ptr, high_ptr, low_ptr, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(x_ptr + offsets, mask=mask)
        _store_param(high_ptr, low_ptr, offsets, mask, p, 0, 0, tl.bfloat16, tl.float32, False, 16, False)


def _torch_rounding(x: np.ndarray, dtype: torch.dtype, bits: np.ndarray) -> np.ndarray:
    return (
        storage.round_stochastic(torch.from_numpy(x), dtype, torch.from_numpy(bits.astype(np.int64))).double().numpy()
    )


@pytest.mark.parametrize(
    "implementation", [_torch_rounding, _numba_rounding, _triton_rounding], ids=["torch", "numba", "triton"]
)
@pytest.mark.parametrize("dtype", FORMATS)
def test_every_implementation_rounds_the_top_of_the_range_as_the_spec_does(implementation, dtype):
    """The list kernels' torch arithmetic, the CPU kernel's intrinsics and the Triton
    kernel's device function, element by element, where a carry reaches infinity."""
    x = np.concatenate([near_the_top(dtype), awkward_float32(20_000, seed=4)])
    bits = np.random.default_rng(5).integers(0, 65536, x.size)
    bits[:5] = [0, 1, 32768, 65534, 65535]
    expected = rounding.round_stochastic(x.astype(np.float64), dtype, bits)
    assert np.array_equal(implementation(x, dtype, bits), expected, equal_nan=True)


def at_the_threshold(dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Values whose discarded fraction f (in units of 2^-16 of a spacing) is met by the
    random bits exactly (r = 2^16 - f: rounds away) and one short of it (r - 1: toward
    zero), for every fraction the format discards above 1 (fp16 keeps 10 of fp32's 23
    mantissa bits, bf16 7), both signs; then the same values scaled into the format's
    subnormal range, where fewer bits are kept, by the same bits."""
    discarded = 23 - (10 if dtype == torch.float16 else 7)
    j = np.arange(1, 1 << discarded, dtype=np.int64)
    fraction = j << (16 - discarded)
    values = (1.0 + j * 2.0**-23).astype(np.float32)
    values = np.concatenate([values, -values])
    bits = np.tile(65536 - fraction, 2)
    values, bits = np.concatenate([values, values]), np.concatenate([bits, bits - 1])
    tiny = (values * np.float32(2.0**-20 if dtype == torch.float16 else 2.0**-130)).astype(np.float32)
    return np.concatenate([values, tiny]), np.concatenate([bits, bits])


@pytest.mark.parametrize(
    "implementation", [_torch_rounding, _numba_rounding, _triton_rounding], ids=["torch", "numba", "triton"]
)
@pytest.mark.parametrize("dtype", FORMATS)
def test_every_implementation_rounds_at_the_threshold_as_the_spec_does(implementation, dtype):
    """Away from zero exactly when r >= 2^16 - f: random bits that meet the fraction, and
    one short of it (no other test puts the bits there: a > for the >= passed them)."""
    x, bits = at_the_threshold(dtype)
    expected = rounding.round_stochastic(x.astype(np.float64), dtype, bits)
    assert np.array_equal(implementation(x, dtype, bits), expected, equal_nan=True)
    up = expected[: x.size // 4] != x[: x.size // 4].astype(np.float64)  # met: every one of them rounded away
    assert up.all()
