r"""How a value computed in fp32 is stored in a 16-bit float (bf16 or fp16): the
specification every kernel implements, and its NumPy reference.

Three rounding modes for 16-bit *params* (the ``rounding`` option):

``"nearest"``
    Round to nearest, ties to even, as torch does.  An update smaller than half the
    spacing of the 16-bit numbers at :math:`\theta` is lost, so a bf16 weight with
    ``lr=1e-3`` stops moving once :math:`|\Delta\theta| < 2^{-9}|\theta|`.
``"kahan"``
    The param is kept as an unevaluated sum :math:`\theta = p + c` of two 16-bit
    numbers (Kahan-compensated summation): after the update,
    :math:`p \leftarrow \operatorname{rn}(\theta')`,
    :math:`c \leftarrow \operatorname{rn}(\theta' - p)`.  What nearest rounding
    loses is carried in ``c`` and added back next step.  Costs one 16-bit buffer per
    param.
``"stochastic"``
    Round to one of the two neighbours :math:`lo \le |x| < hi` (toward and away from
    zero) with :math:`P(hi) = (|x| - lo) / (hi - lo)`, so :math:`E[\text{stored}] = x`:
    updates survive in expectation.

*Moments* stored in 16 bits (``state_precision="bf16"``, or the states of 16-bit
params) are always rounded stochastically, whatever ``rounding`` says: they are
exponential moving averages, and near convergence the second moment must decay by
:math:`1 - \beta_2` (0.1 %) per step, below half a bf16 spacing (0.2 % to 0.4 %), so
a moment rounded to nearest stops following its gradients (it freezes at a value many
times too large, and the updates shrink).  Quantized moments are rounded the same way
(:mod:`adamkit.specs.quantization`).

Stochastic rounding draws its random numbers from a counter-based generator: the
16 random bits for element :math:`i` of stream :math:`s` at step :math:`t` are a
hash of ``(seed, s, t, i)``, so results are reproducible from the seed, do not
depend on threads, chunking or backend, and the generator's whole state is the seed
plus the step counts already in the optimizer state.  Stream :math:`s = 4j + k` for
the optimizer's :math:`j`-th param (its index in ``state_dict``) and slot :math:`k`
(0 param, 1 ``exp_avg``, 2 second moment, 3 its AMSGrad maximum); :math:`i` is the
element's row-major index in the param (in its real view, for complex params; in the
whole param, for a rank's shard of a sharded one, so that sharded training rounds as
the unsharded run does).

The hash is Wellons' *lowbias32* integer mixer :func:`mix32`:

.. math::

    k_s = \text{mix}(\text{mix}(\text{seed}_{lo} \oplus \text{mix}(\text{seed}_{hi})) \oplus s), \quad
    k_{s,t} = \text{mix}(k_s \oplus t), \quad
    r_i = \text{mix}(k_{s,t} \oplus i) \gg 16

and the element rounds away from zero iff :math:`2^{16}(|x| - lo)/(hi - lo) \ge 2^{16} - r_i`
(for bf16 that is "add :math:`r_i` to the low 16 bits of the fp32 pattern, then
truncate").  :math:`hi - lo` is the spacing at :math:`lo`.  Overflow is exactly
nearest rounding's: a value that rounds to infinity to nearest (:math:`|x| \ge`
the largest finite number plus half its spacing, 65520 for fp16) is stored as
infinity, and below that stochastic rounding never steps past the largest finite
number (it would reach infinity one time in 32 for an fp16 weight at 65505 that
nearest rounding keeps at 65504).  NaN stays NaN.  A value computed in fp64 (fp64
params with 16-bit states) is rounded to fp32 first.

Everything here takes float64 values, so the reference can round its float64
results exactly as a kernel rounds its fp32 ones.
"""

from __future__ import annotations

import numpy as np
import torch

ROUNDINGS: tuple[str, ...] = ("nearest", "kahan", "stochastic")

#: the 16-bit storage formats the rounding modes apply to
LOW_PRECISION = (torch.bfloat16, torch.float16)

#: slots of the random streams of one param
PARAM_SLOT, EXP_AVG_SLOT, SECOND_SLOT, MAX_SECOND_SLOT = range(4)
SLOTS = 4

MASK32 = 0xFFFFFFFF
#: lowbias32's multipliers (Wellons, "Prospecting for hash functions", 2018)
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)

#: (mantissa bits, exponent bias) of each 16-bit format
_FORMATS = {torch.bfloat16: (7, 127), torch.float16: (10, 15)}

#: the magnitude pattern of each 16-bit format's largest finite number (and its infinity's)
LARGEST_FINITE = {torch.bfloat16: 0x7F7F, torch.float16: 0x7BFF}
INFINITY = {torch.bfloat16: 0x7F80, torch.float16: 0x7C00}
#: the fp32 magnitude pattern from which rounding to nearest bf16 overflows: the largest
#: finite bf16 number plus half its spacing (a tie, which goes to the even infinity)
BFLOAT16_OVERFLOW_BITS = 0x7F7F8000


def mix32(x):
    """lowbias32: a bijection of 32-bit integers with good avalanche (uint64 in, uint64 out)."""
    x = np.asarray(x, dtype=np.uint64) & np.uint64(MASK32)
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(MIX_MULTIPLIERS[0])) & np.uint64(MASK32)
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(MIX_MULTIPLIERS[1])) & np.uint64(MASK32)
    x ^= x >> np.uint64(16)
    return x


def stream_key(seed: int, stream):
    """k_s: the key of random stream(s) ``stream`` (seed in [0, 2^64)); an int for an int."""
    base = mix32((seed & MASK32) ^ int(mix32(seed >> 32)))
    keys = mix32(base ^ (np.asarray(stream, dtype=np.uint64) & np.uint64(MASK32)))
    return int(keys) if keys.ndim == 0 else keys


def param_stream_keys(seed: int, param_indices) -> np.ndarray:
    """k_s for every slot of every param: uint64[len(param_indices), SLOTS]."""
    streams = SLOTS * np.asarray(param_indices, dtype=np.uint64)[:, None] + np.arange(SLOTS, dtype=np.uint64)
    return stream_key(seed, streams)


def step_keys(stream_keys, steps):
    """k_{s,t} for aligned arrays of stream keys and step counts (uint64)."""
    steps = np.asarray(steps).astype(np.uint64) & np.uint64(MASK32)
    return mix32(np.asarray(stream_keys, dtype=np.uint64) ^ steps)


def random_bits(key: int, count: int) -> np.ndarray:
    """r_i, the 16 random bits of elements 0..count-1 under step key ``key``."""
    index = np.arange(count, dtype=np.uint64) & np.uint64(MASK32)
    return mix32(np.uint64(key) ^ index) >> np.uint64(16)


# ----------------------------------------------------------------- 16-bit formats


def to_float(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The float64 values of 16-bit patterns of ``dtype``."""
    bits = np.asarray(bits, dtype=np.uint16)
    if dtype == torch.bfloat16:
        return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def toward_zero(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The 16-bit patterns of ``x`` rounded toward zero (NaN in, a NaN pattern out)."""
    x = np.asarray(x, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond the largest finite: inf, then stepped back
        narrow = x.astype(np.float32 if dtype == torch.bfloat16 else np.float16)  # to nearest
    too_far = np.abs(narrow.astype(np.float64)) > np.abs(x)
    narrow[too_far] = np.nextafter(narrow[too_far], narrow.dtype.type(0))
    if dtype == torch.bfloat16:  # fp32 toward zero, then drop the low 16 bits
        return (narrow.view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    return narrow.view(np.uint16)


def spacing(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """The distance from ``|value|`` to the next number away from zero, from the exponent field."""
    mantissa, bias = _FORMATS[dtype]
    exponent = (np.asarray(bits, dtype=np.int64) >> mantissa) & ((1 << (15 - mantissa)) - 1)
    return np.ldexp(1.0, np.maximum(exponent, 1) - bias - mantissa)


def _neighbours(x: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(patterns toward zero, fraction of the way to the next number away from zero)."""
    lo = toward_zero(x, dtype)
    with np.errstate(invalid="ignore"):
        fraction = (np.abs(x) - np.abs(to_float(lo, dtype))) / spacing(lo, dtype)
    return lo, fraction


def round_nearest(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """``x`` rounded to nearest ``dtype`` number, ties to even (float64 values)."""
    x = np.asarray(x, dtype=np.float64)
    lo, fraction = _neighbours(x, dtype)
    up = (fraction > 0.5) | ((fraction == 0.5) & (lo & 1 == 1))
    return np.where(np.isnan(x), np.nan, to_float(lo + up, dtype))


def round_stochastic(x: np.ndarray, dtype: torch.dtype, bits16: np.ndarray) -> np.ndarray:
    """``x`` rounded away from zero iff 2^16 * fraction >= 2^16 - r and the number away
    from zero is finite; infinity where nearest rounding overflows (float64 values)."""
    x = np.asarray(x, dtype=np.float64)
    lo, fraction = _neighbours(x, dtype)
    up = fraction * 65536.0 >= 65536.0 - np.asarray(bits16, dtype=np.float64).reshape(x.shape)
    up &= (lo & 0x7FFF) < LARGEST_FINITE[dtype]  # never past the largest finite number
    nearest = round_nearest(x, dtype)
    return np.where(np.isfinite(nearest), to_float(lo + up, dtype), nearest)


def kahan_split(theta: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(p, c): p = rn(theta), c = rn(theta - p), the compensated pair for ``theta``; c =
    0 where p is not finite (an overflowed weight stays infinite, as under nearest
    rounding: c = -inf made the next step's p + c NaN)."""
    p = round_nearest(theta, dtype)
    with np.errstate(invalid="ignore"):
        rest = round_nearest(np.asarray(theta, dtype=np.float64) - p, dtype)
    return p, np.where(np.isfinite(p), rest, 0.0)


def is_low_precision(dtype: torch.dtype) -> bool:
    return dtype in LOW_PRECISION


def effective_rounding(rounding: str, param_dtype: torch.dtype) -> str:
    """What an update rule's ``rounding`` does to params of ``param_dtype``: Kahan and
    stochastic rounding apply to 16-bit params, split master weights ("master", see
    :mod:`adamkit.specs.master`) to bf16 ones; everything else is rounded to nearest."""
    if rounding in ("kahan", "stochastic") and is_low_precision(param_dtype):
        return rounding
    if rounding in ("master", "master24") and param_dtype == torch.bfloat16:
        return rounding
    return "nearest"


def rounds_stochastically(moment_storage) -> bool:
    """Whether moments held as ``moment_storage`` (a dtype, or a quantized format) are
    rounded stochastically: 16-bit and quantized moments are."""
    return not isinstance(moment_storage, torch.dtype) or is_low_precision(moment_storage)


def needs_random_bits(rounding: str, param_dtype: torch.dtype, moment_storage) -> bool:
    """Whether a step on such a param draws random bits (for its param or its moments)."""
    stochastic = effective_rounding(rounding, param_dtype) in ("stochastic", "master24")  # 24-bit masters round so
    return stochastic or rounds_stochastically(moment_storage)


__all__ = [
    "LOW_PRECISION",
    "ROUNDINGS",
    "effective_rounding",
    "is_low_precision",
    "kahan_split",
    "mix32",
    "needs_random_bits",
    "param_stream_keys",
    "random_bits",
    "round_nearest",
    "round_stochastic",
    "rounds_stochastically",
    "spacing",
    "step_keys",
    "stream_key",
    "to_float",
    "toward_zero",
]
