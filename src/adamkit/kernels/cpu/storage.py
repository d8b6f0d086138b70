"""Device-side helpers of the CPU kernel: loads and stores per storage dtype (16-bit
patterns, stochastic rounding), quantized moments decoded and encoded block by block,
and the param storage policies (plain, Kahan, stochastic, split masters).  Imported
only where numba is."""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.core.extending import overload

from ...specs import quantization
from ...specs.quantization import QuantFormat
from ..intrinsics import (
    as_bytes,
    bfloat16_to_float,
    count_if,
    float_map_code,
    float_map_level,
    float_of_bits,
    float_to_bfloat16,
    float_to_half,
    half_to_float,
    join_master,
    join_master24,
    magnitude_bits,
    nibble,
    nibbles,
    random16,
    split_master,
    split_master24,
    stochastic_bfloat16,
    stochastic_half,
    store_byte,
    typed_pointer,
)


def _load(pointer, index):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


def _store(pointer, index, value):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


def _compute(pointer, value):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


def _rounded(pointer, value):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


def _store_stochastic(pointer, index, value, bits16):  # pragma: no cover - replaced by the overload
    raise NotImplementedError


@overload(_load, inline="always")
def _load_impl(pointer, index):
    dtype = pointer.dtype
    if dtype in (types.float32, types.float64):
        return lambda pointer, index: pointer[index]
    if dtype == types.uint16:  # bfloat16: the high half of a float32
        return lambda pointer, index: bfloat16_to_float(pointer[index])
    if dtype == types.int16:
        return lambda pointer, index: half_to_float(pointer[index])
    return None


@overload(_store, inline="always")
def _store_impl(pointer, index, value):
    dtype = pointer.dtype
    if dtype in (types.float32, types.float64):

        def store(pointer, index, value):
            pointer[index] = value

        return store
    if dtype == types.uint16:

        def store_bfloat16(pointer, index, value):
            pointer[index] = float_to_bfloat16(value)

        return store_bfloat16
    if dtype == types.int16:

        def store_half(pointer, index, value):
            pointer[index] = float_to_half(value)

        return store_half
    return None


@overload(_store_stochastic, inline="always")
def _store_stochastic_impl(pointer, index, value, bits16):
    """Store with stochastic rounding; fp32/fp64 storage is written as it is."""
    dtype = pointer.dtype
    if dtype in (types.float32, types.float64):

        def store(pointer, index, value, bits16):
            pointer[index] = value

        return store
    if dtype == types.uint16:

        def store_bfloat16(pointer, index, value, bits16):
            pointer[index] = stochastic_bfloat16(np.float32(value), bits16)

        return store_bfloat16
    if dtype == types.int16:

        def store_half(pointer, index, value, bits16):
            pointer[index] = stochastic_half(np.float32(value), bits16)

        return store_half
    return None


@overload(_rounded, inline="always")
def _rounded_impl(pointer, value):
    """``value`` rounded to nearest in ``pointer``'s storage, as a compute-type number
    (computed in registers: no store-then-load, which blocks vectorization)."""
    dtype = pointer.dtype
    if dtype == types.uint16:
        return lambda pointer, value: bfloat16_to_float(float_to_bfloat16(value))
    if dtype == types.int16:
        return lambda pointer, value: half_to_float(float_to_half(value))
    return lambda pointer, value: value


@overload(_compute, inline="always")
def _compute_impl(pointer, value):
    """A float64 scalar in the compute type of ``pointer``'s storage."""
    if pointer.dtype == types.float64:
        return lambda pointer, value: np.float64(value)
    return lambda pointer, value: np.float32(value)


def _format_of(state_witness, sign_witness):
    """(format, signed) named by a quantized state witness and a sign witness."""
    from ...specs.quantization import FORMATS

    return FORMATS["int8" if state_witness.dtype == types.int8 else "int4"], sign_witness.dtype == types.int8


def _dequantize(codes_address, scales_address, state_witness, sign_witness, out, first, end, spread):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


def _requantize(
    codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread, as_stored
):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@njit(inline="always", nogil=True)
def _power_level(k, step):
    """The signed map's level L_k = (k c)^2 of a whole fp32 number k >= 0 (``step``
    is c = fl(1 / K)): the spec's two fp32 products, so no table and no gather."""
    t = k * step
    return t * t


@njit(inline="always", nogil=True)
def _signed_code(x, r, top, step, bits16):
    """The spec's stochastically rounded first-moment code of x (r = |x| / s): the
    level L_k <= r found from floor(K sqrt r) and a comparison either side, up to
    k + 1 when 2^16 (r - L_k) >= g_k (2^16 - u), never past K.  k stays an fp32
    whole number throughout (AVX2 has no int64 <-> float vector conversions)."""
    k = min(np.floor(top * np.sqrt(r)), top)
    k = k - np.float32(r < _power_level(k, step)) + np.float32(r >= _power_level(k + np.float32(1), step))
    low = _power_level(k, step)
    gap = _power_level(k + np.float32(1), step) - low
    threshold = gap * (np.float32(65536.0) - np.float32(bits16))
    k = k + np.float32(((r - low) * np.float32(65536.0) >= threshold) & (k < top))
    return np.int32(top - k if x < 0 else top + k)


def _moment_map(fmt: QuantFormat, signed: bool, marked: bool = False):
    """(level of a code, stochastically rounded code of x given its ratio r = |x| / s
    to its block's scale and 16 random bits) of one moment's map (a second moment's second map
    where ``marked``: a finer float map, or a root map, the float map applied to
    sqrt r with its levels squared), as inlined compiled functions whose format
    constants are compile-time."""
    top, step = np.float32(fmt.signed_levels), np.float32(1) / np.float32(fmt.signed_levels)
    marked = marked and not signed and fmt.marks_map
    rooted = marked and fmt.root_map
    mantissa, lowest = fmt.float_map(marked)
    dropped, first = 23 - mantissa, (127 + lowest) << mantissa
    last = (1 << fmt.bits) - 1
    assert not fmt.snaps_to_top(signed), "the kernels step the current formats, none of which snaps"

    @njit(inline="always", nogil=True)
    def level(code):
        if signed:
            k = np.float32(code) - top
            magnitude = _power_level(abs(k), step)
            return -magnitude if k < 0 else magnitude
        if rooted:  # a power of two squared: exact
            root = float_map_level(code, dropped, first)
            return root * root
        return float_map_level(code, dropped, first)

    @njit(inline="always", nogil=True)
    def code(x, r, bits16):
        if signed:
            return _signed_code(x, r, top, step, bits16)
        if rooted:
            return float_map_code(np.sqrt(r), bits16, dropped, first, last)
        return float_map_code(r, bits16, dropped, first, last)

    return level, code


@overload(_dequantize)
def _dequantize_impl(codes_address, scales_address, state_witness, sign_witness, out, first, end, spread):
    """out[i - first] = scale * level(code) for elements [first, end), each level
    computed from its code (the spec's fp32 products).  Packed codes are first
    spread one to a byte (``spread``, a byte scratch row), so that both loops
    vectorize."""
    fmt, signed = _format_of(state_witness, sign_witness)
    (level, _), (marked_level, _) = _moment_map(fmt, signed), _moment_map(fmt, signed, marked=True)
    block, packed = fmt.block_of(signed), fmt.bits == 4
    log2_block = block.bit_length() - 1
    read_scale = _exact_scale if fmt.exact_scales(signed) else _bfloat16_scale

    def dequantize(codes_address, scales_address, state_witness, sign_witness, out, first, end, spread):
        codes = typed_pointer(codes_address, _BYTE_WITNESS)
        values = typed_pointer(np.int64(out.ctypes.data) - 4 * first, _FLOAT32_WITNESS)
        if packed:  # pairs: the one past a ragged end lands in the spare element
            codes = typed_pointer(np.int64(spread.ctypes.data) - first, _BYTE_WITNESS)
            packs = typed_pointer(codes_address, _BYTE_WITNESS)
            for j in range(first >> 1, (end + 1) >> 1):
                codes[2 * j] = nibble(packs[j], False)
                codes[2 * j + 1] = nibble(packs[j], True)
        for b in range(first >> log2_block, (end + block - 1) >> log2_block):
            scale = read_scale(scales_address, b)
            if not signed and scale < 0:  # a second moment's second map: one loop per map, both vectorize
                for i in range(b * block, min(b * block + block, end)):
                    values[i] = -scale * marked_level(codes[i])
            else:
                for i in range(b * block, min(b * block + block, end)):
                    values[i] = scale * level(codes[i])

    return dequantize


@njit(inline="always", nogil=True)
def _bfloat16_scale(scales_address, b):
    return bfloat16_to_float(typed_pointer(scales_address, _BFLOAT16_WITNESS)[b])


@njit(inline="always", nogil=True)
def _exact_scale(scales_address, b):
    return typed_pointer(scales_address, _FLOAT32_WITNESS)[b]


@njit(inline="always", nogil=True)
def _put_bfloat16_scale(scales_address, b, largest):
    """Store the block's absmax (its fp32 bit pattern, NaN and infinity above every
    finite one) rounded up to bf16, and return the scale; NaN where that is not finite."""
    rounded_up = (np.int64(largest) + 0xFFFF) >> 16
    finite = (largest < np.int32(0x7F800000)) & (rounded_up < 0x7F80)
    bits = np.uint16(rounded_up) if finite else np.uint16(0x7FC0)
    typed_pointer(scales_address, _BFLOAT16_WITNESS)[b] = bits
    return bfloat16_to_float(bits)


@njit(inline="always", nogil=True)
def _put_exact_scale(scales_address, b, largest):
    """Store the block's absmax itself (fp32, as its bit pattern; NaN for a non-finite
    block) and return it."""
    finite = largest < np.int32(0x7F800000)
    typed_pointer(scales_address, _INT32_WITNESS)[b] = largest if finite else np.int32(0x7FC00000)
    return typed_pointer(scales_address, _FLOAT32_WITNESS)[b]


@overload(_requantize)
def _requantize_impl(
    codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread, as_stored
):
    """Quantize values[i - first] for elements [first, end) (``first`` on a block
    boundary): per block, a second moment held at its ceiling (an overflowed square,
    see :func:`~adamkit.specs.quantization.second_moment_ceiling`), the absmax over
    bit patterns (NaN and infinity sort above every finite value), exact or rounded up
    to bf16 as the moment's format keeps it, then each element's code, rounded
    stochastically with the bits of step key ``key`` (element indices counted from
    ``shift``).  A second moment's scale is negated where its block takes the second
    map: a finer map where its smallest magnitude (an integer min over bit patterns)
    over the scale is at least that map's lowest level, decided before the codes; a
    root map where more than a quarter of its nonzero ratios lie below the float map's
    lowest level, counted while the float map's codes are made, which the root map's
    then replace.  A second moment of a format that normalizes first moments is also
    written to ``as_stored[i - first]`` as stored (what :func:`_dequantize` reads
    back: the divisor's source), unless ``as_stored`` is empty.  Packed codes are made
    one to a byte in ``spread`` and paired afterwards."""
    fmt, signed = _format_of(state_witness, sign_witness)
    (level, code), (marked_level, marked_code) = _moment_map(fmt, signed), _moment_map(fmt, signed, marked=True)
    block, packed = fmt.block_of(signed), int(fmt.bits == 4)
    log2_block = block.bit_length() - 1
    put_scale = _put_exact_scale if fmt.exact_scales(signed) else _put_bfloat16_scale
    # a moment beyond its ceiling is held there (quantization.held_at_ceiling): a second
    # moment's overflowed square, a first moment's finite value (an infinity poisons)
    saturates, bounded = not (signed or fmt.legacy), signed and not fmt.legacy
    ceiling = quantization.moment_ceiling(fmt, signed)
    ceiling_bits = np.float32(ceiling).view(np.int32)
    has_fine, has_root = not signed and fmt.fine_exponent_bits is not None, not signed and fmt.root_map
    fine_lowest = np.float32(2.0 ** fmt.float_map(marked=True)[1]) if has_fine else np.float32(0)
    lowest_bits, share = np.int32((127 + fmt.min_exponent) << 23), np.int32(quantization.ROOT_MAP_SHARE)
    keeps = not signed and fmt.normalized_first_moment

    def requantize(
        codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread, as_stored
    ):
        packs = typed_pointer(codes_address, _BYTE_WITNESS)
        codes = typed_pointer(np.int64(spread.ctypes.data) - first, _BYTE_WITNESS) if packed else packs
        # raw pointers, addressed by element index: array indexing keeps LLVM from vectorizing
        fresh = typed_pointer(np.int64(values.ctypes.data) - 4 * first, _FLOAT32_WITNESS)
        out = typed_pointer(np.int64(as_stored.ctypes.data) - 4 * first, _FLOAT32_WITNESS)
        writes = keeps and as_stored.size > 0
        for b in range(first >> log2_block, (end + block - 1) >> log2_block):
            low, high = b * block, min(b * block + block, end)
            largest, smallest = np.int32(0), np.int32(0x7F800000)
            for i in range(low, high):
                if saturates and fresh[i] > ceiling:  # (compile-time; NaN stays NaN)
                    fresh[i] = ceiling
                largest = max(largest, magnitude_bits(fresh[i]))
                if has_fine:  # (compile-time: the other formats skip it)
                    smallest = min(smallest, magnitude_bits(fresh[i]))
            if bounded and ceiling_bits < largest < np.int32(0x7F800000):  # (rare) a finite first moment past it
                for i in range(low, high):
                    if abs(fresh[i]) > ceiling:
                        fresh[i] = ceiling if fresh[i] > 0 else -ceiling
                largest = ceiling_bits
            scale = put_scale(scales_address, b, largest)
            if np.isnan(scale):  # a non-finite block: codes 0
                for i in range(low, high):
                    codes[i] = np.uint8(0)
                    if writes:
                        out[i] = scale
                continue
            divisor = scale + np.float32(scale == 0)  # a zero scale: the block is all zeros
            if has_fine and scale > 0 and float_of_bits(smallest) / scale >= fine_lowest:
                # the finer map holds the block: its scale's sign bit says so
                typed_pointer(scales_address, _FLOAT32_WITNESS)[b] = -scale
                for i in range(low, high):
                    stored = np.uint8(marked_code(fresh[i], abs(fresh[i]) / divisor, random16(key, i + shift)))
                    codes[i] = stored
                    if writes:  # (compile-time False for int8, which normalizes nothing)
                        out[i] = scale * marked_level(stored)
                continue
            below, zeros = np.int32(0), np.int32(0)  # (zeros among those below)
            for i in range(low, high):
                r = abs(fresh[i]) / divisor
                stored = np.uint8(code(fresh[i], r, random16(key, i + shift)))
                codes[i] = stored
                if has_root:  # (compile-time; r >= 0: its bits order as its values)
                    below = count_if(below, magnitude_bits(r) < lowest_bits)
                    zeros = count_if(zeros, magnitude_bits(r) == 0)
                if writes:
                    out[i] = scale * level(stored)
            if has_root and scale > 0 and share * (below - zeros) > high - low - zeros:
                # the block spreads below the float map: the root map's codes, the sign bit says so
                typed_pointer(scales_address, _FLOAT32_WITNESS)[b] = -scale
                for i in range(low, high):
                    stored = np.uint8(marked_code(fresh[i], abs(fresh[i]) / divisor, random16(key, i + shift)))
                    codes[i] = stored
                    if writes:
                        out[i] = scale * marked_level(stored)
        if packed:
            codes[end] = np.uint8(0)  # a ragged end's partner
            for j in range(first >> 1, (end + 1) >> 1):
                packs[j] = nibbles(codes[2 * j], codes[2 * j + 1])

    return requantize


@njit(inline="always", nogil=True)
def _load_param(param, compensation, i):
    return _load(param, i)


@njit(inline="always", nogil=True)
def _load_kahan_param(param, compensation, i):
    """theta = p + c."""
    return _load(param, i) + _load(compensation, i)


@njit(inline="always", nogil=True)
def _put_stochastic(pointer, i, value, key, shift):
    _store_stochastic(pointer, i, value, random16(key, i + shift))


@njit(inline="always", nogil=True)
def _put_kahan_param(param, compensation, i, value, key, shift):
    """p = rn(theta), c = rn(theta - p); c = 0 where p is not finite (it stays infinite)."""
    rounded = _rounded(param, value)
    _store(param, i, rounded)
    _store(compensation, i, value - rounded if abs(rounded) < np.inf else np.float32(0.0))


@njit(inline="always", nogil=True)
def _load_master_param(param, low, i):
    """theta = the fp32 master weight, exactly (param: bf16 bits; low: int16 bits)."""
    return join_master(param[i], low[i])


@njit(inline="always", nogil=True)
def _put_master_param(param, low, i, value, key, shift):
    """Split theta back into the bf16 param and its low bits."""
    param[i] = split_master(value, False)
    low[i] = split_master(value, True)


@njit(inline="always", nogil=True)
def _load_master24_param(param, low, i):
    """theta = the 24-bit master weight (param: bf16 bits; low: int8 bits)."""
    return join_master24(param[i], as_bytes(low)[i])


@njit(inline="always", nogil=True)
def _put_master24_param(param, low, i, value, key, shift):
    """Round theta stochastically to the 24-bit grid and split it."""
    bits16 = random16(key, i + shift)
    param[i] = split_master24(value, bits16, False)
    store_byte(low, np.int64(i), split_master24(value, bits16, True))


@njit(inline="always", nogil=True)
def _put_param(param, compensation, i, value, key, shift):
    _store(param, i, value)


@njit(inline="always", nogil=True)
def _put_stochastic_param(param, compensation, i, value, key, shift):
    _store_stochastic(param, i, value, random16(key, i + shift))


_BYTE_WITNESS = np.empty(0, dtype=np.uint8)
_FLOAT32_WITNESS = np.empty(0, dtype=np.float32)
_FLOAT64_WITNESS = np.empty(0, dtype=np.float64)
_INT32_WITNESS = np.empty(0, dtype=np.int32)
_BFLOAT16_WITNESS = np.empty(0, dtype=np.uint16)

#: per param rounding mode: (load param, store param, store a moment); a moment is
#: stored stochastically in 16 bits and as it is in 32 or 64 (the bits go unused)
_STORAGE_POLICIES = {
    "nearest": (_load_param, _put_param, _put_stochastic),
    "kahan": (_load_kahan_param, _put_kahan_param, _put_stochastic),
    "stochastic": (_load_param, _put_stochastic_param, _put_stochastic),
    "master": (_load_master_param, _put_master_param, _put_stochastic),
    "master24": (_load_master24_param, _put_master24_param, _put_stochastic),
}
