"""Device-side helpers of the Triton kernel: rounding to the storage dtype (to nearest
even and stochastically, with the specification's random bits), quantized moments
decoded and encoded block by block, IEEE square root and division, param loads (Kahan,
split masters), and the compile-time constants the element math compares with."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...algorithms import Denominator, FirstMoment, SecondMoment
from ...rule import DECOUPLED_DECAY, L2_DECAY
from ...specs import quantization, rounding
from ..host import (
    COLUMNS,
    TENSOR_SCALARS,
)

_MIX_FIRST, _MIX_SECOND = (tl.constexpr(m) for m in rounding.MIX_MULTIPLIERS)
_DIVISOR_LIMIT = tl.constexpr(quantization.DIVISOR_EXPONENT_LIMIT)
_ROOT_TWO, _ROOT_HALF = tl.constexpr(float(quantization.ROOT_TWO)), tl.constexpr(float(quantization.ROOT_HALF))
_ROOT_MAP_SHARE = tl.constexpr(quantization.ROOT_MAP_SHARE)
_L2_DECAY, _DECOUPLED_DECAY = tl.constexpr(L2_DECAY), tl.constexpr(DECOUPLED_DECAY)
_BFLOAT16_LARGEST, _HALF_LARGEST = (tl.constexpr(rounding.LARGEST_FINITE[d]) for d in (torch.bfloat16, torch.float16))
_BFLOAT16_INFINITY, _HALF_INFINITY = (tl.constexpr(rounding.INFINITY[d]) for d in (torch.bfloat16, torch.float16))
_BFLOAT16_OVERFLOW = tl.constexpr(rounding.BFLOAT16_OVERFLOW_BITS)
_ROW_LENGTH = tl.constexpr(len(COLUMNS))
_TENSOR_SCALAR_COUNT = tl.constexpr(len(TENSOR_SCALARS))
# the element math's forms (adamkit.algorithms), as FORMS packs them
_NORMALIZED_CLIPPED = tl.constexpr(int(FirstMoment.NORMALIZED_CLIPPED))
_WEIGHT_SEQUENCE = tl.constexpr(int(FirstMoment.WEIGHT_SEQUENCE))
_INFINITY_NORM, _AVERAGE_AFTER = (
    tl.constexpr(int(f)) for f in (SecondMoment.INFINITY_NORM, SecondMoment.AVERAGE_AFTER)
)
_RECTIFIED_ROOT, _NORM, _NO_DENOMINATOR = (
    tl.constexpr(int(d)) for d in (Denominator.RECTIFIED_ROOT, Denominator.NORM, Denominator.NONE)
)


@triton.jit
def _to_storage(x, STORAGE: tl.constexpr):
    """Round ``x`` to the storage dtype; bf16 explicitly to nearest even (NaN stays a
    quiet NaN), as torch rounds, whatever the backend's own conversion does."""
    if STORAGE == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    else:
        return x.to(STORAGE)


@triton.jit
def _random16(key, index):
    """r = lowbias32(key ^ index) >> 16, in uint32 arithmetic (see adamkit.rounding)."""
    x = (key ^ index).to(tl.uint32)
    x = x ^ (x >> 16)
    x = x * _MIX_FIRST
    x = x ^ (x >> 15)
    x = x * _MIX_SECOND
    x = x ^ (x >> 16)
    return x >> 16


@triton.jit
def _to_storage_stochastic(x, bits16, STORAGE: tl.constexpr):
    """Round ``x`` to a 16-bit storage dtype stochastically (the spec's rule)."""
    x = x.to(tl.float32)
    if STORAGE == tl.bfloat16:  # add r to the low half of |x|, truncate, stop at the largest finite
        bits = x.to(tl.uint32, bitcast=True)
        magnitude = bits & 0x7FFFFFFF
        rounded = tl.minimum((magnitude + bits16) >> 16, _BFLOAT16_LARGEST)
        rounded = tl.where(magnitude >= _BFLOAT16_OVERFLOW, _BFLOAT16_INFINITY, rounded)
        rounded = tl.where(x != x, 0x7FC0, rounded | ((bits >> 16) & 0x8000)).to(tl.uint16)
        return rounded.to(tl.bfloat16, bitcast=True)
    elif STORAGE == tl.float16:
        nearest = x.to(tl.float16)
        pattern = nearest.to(tl.uint16, bitcast=True).to(tl.int32)
        toward_zero = pattern - (tl.abs(nearest.to(tl.float32)) > tl.abs(x)).to(tl.int32)
        exponent = tl.maximum((toward_zero >> 10) & 0x1F, 1)
        spacing = ((exponent + (127 - 25)) << 23).to(tl.float32, bitcast=True)
        lower = toward_zero.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
        fraction = _exact_div(tl.abs(x) - tl.abs(lower), spacing)  # exact: spacing is a power of 2
        away = ((fraction * 65536.0 >= 65536.0 - bits16.to(tl.float32)) & ((toward_zero & 0x7FFF) != _HALF_LARGEST)).to(
            tl.int32
        )
        rounded = (toward_zero + away).to(tl.uint16).to(tl.float16, bitcast=True)
        # inf (where nearest rounding overflows, or x is infinite) and NaN keep the conversion
        return tl.where((pattern & _HALF_INFINITY) == _HALF_INFINITY, nearest, rounded)
    else:
        return x.to(STORAGE)


@triton.jit
def _put(pointer, offsets, mask, value, key, shift, STORAGE: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Store a value: stochastically under stochastic rounding in 16 bits, else
    to nearest (32 and 64 bits take the value as it is)."""
    if STOCHASTIC and (STORAGE == tl.bfloat16 or STORAGE == tl.float16):
        bits16 = _random16(key, offsets + shift)
        tl.store(pointer + offsets, _to_storage_stochastic(value, bits16, STORAGE), mask=mask)
    else:
        tl.store(pointer + offsets, _to_storage(value, STORAGE), mask=mask)


@triton.jit
def _signed_level(k, LEVELS: tl.constexpr):
    """The signed map's level L_k = (k c)^2, c = fp32(1/K), each product rounded
    (see adamkit.quantization.signed_magnitudes): no division, no table."""
    t = k.to(tl.float32) * tl.full((), 1.0 / LEVELS, tl.float32)  # fp32(1/K) for K = 7, 127
    return t * t


@triton.jit
def _dequantize(
    codes,
    scales,
    offsets,
    mask,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    SIGNED: tl.constexpr,
    FLOAT_MAPS: tl.constexpr,
):
    """The spec's fp32 values of elements ``offsets`` (see adamkit.quantization); a
    second moment's float maps are ``FLOAT_MAPS`` (see :func:`float_maps`), the second
    one where its block's scale is negative."""
    if BITS == 8:
        code = tl.load(codes + offsets, mask=mask, other=0).to(tl.int32)
    else:
        code = (tl.load(codes + offsets // 2, mask=mask, other=0).to(tl.int32) >> ((offsets & 1) * 4)) & 0xF
    scale = tl.load(scales + offsets // QBLOCK, mask=mask, other=0).to(tl.float32)
    if SIGNED:
        k = code - ((1 << (BITS - 1)) - 1)
        value = scale * _signed_level(tl.abs(k), (1 << (BITS - 1)) - 1)
        return tl.where(k < 0, -value, value)
    else:
        return tl.abs(scale) * _unsigned_level(code, scale < 0, BITS, FLOAT_MAPS)


@triton.jit
def _unsigned_level(code, marked, BITS: tl.constexpr, FLOAT_MAPS: tl.constexpr):
    """A second moment's level: the float map's, or where ``marked`` the second map's
    (a finer float map's, or the root map's: the float map's level squared, exact)."""
    WIDE: tl.constexpr = FLOAT_MAPS % 16
    FINE: tl.constexpr = (FLOAT_MAPS // 16) % 16
    ROOT: tl.constexpr = FLOAT_MAPS // 256
    level = _float_level(code, BITS, WIDE)
    if FINE != 0:
        level = tl.where(marked, _float_level(code, BITS, FINE), level)
    if ROOT != 0:
        level = tl.where(marked, level * level, level)
    return level


@triton.jit
def _float_level(code, BITS: tl.constexpr, E: tl.constexpr):
    """A float map's level: E exponent bits and M = BITS - E fraction bits, from 2^(1 - 2^E)."""
    MANTISSA: tl.constexpr = BITS - E
    level = ((code + ((128 - (1 << E)) << MANTISSA)) << (23 - MANTISSA)).to(tl.int32)
    return level.to(tl.float32, bitcast=True)


@triton.jit
def _float_code(ratio, bits16, BITS: tl.constexpr, E: tl.constexpr):
    """A float map's stochastically rounded code of r: its fp32 bits (r <= 1: no int32
    overflow), the random bits added at the top of the dropped fraction."""
    MANTISSA: tl.constexpr = BITS - E
    DROPPED: tl.constexpr = 23 - MANTISSA
    bits = ratio.to(tl.int32, bitcast=True) + (bits16.to(tl.int32) << (DROPPED - 16))
    kept = (bits >> DROPPED) - ((128 - (1 << E)) << MANTISSA)
    return tl.minimum(tl.maximum(kept, 0), (1 << BITS) - 1)


@triton.jit
def _code(ratio, negative, bits16, marked, BITS: tl.constexpr, SIGNED: tl.constexpr, FLOAT_MAPS: tl.constexpr):
    """The spec's stochastically rounded code of a value whose ratio to its block's
    scale is ``ratio`` (r = |x| / s, the one division, made by the caller) and whose
    sign is ``negative``; a second moment's float maps are ``FLOAT_MAPS``, the second
    one where ``marked`` (a root map's: the float map's code of sqrt r)."""
    if SIGNED:  # L_k <= r < L_{k+1} from floor(K sqrt r), corrected either side
        LEVELS: tl.constexpr = (1 << (BITS - 1)) - 1
        k = tl.minimum(tl.floor(float(LEVELS) * tl.math.sqrt_rn(ratio)).to(tl.int32), LEVELS)
        k = k - (ratio < _signed_level(k, LEVELS)).to(tl.int32)
        k = k + (ratio >= _signed_level(k + 1, LEVELS)).to(tl.int32)  # L_{K+1} > 1 >= r
        lo = _signed_level(k, LEVELS)
        gap = _signed_level(k + 1, LEVELS) - lo
        k = k + (((ratio - lo) * 65536.0 >= gap * (65536.0 - bits16.to(tl.float32))) & (k < LEVELS)).to(tl.int32)
        return tl.where(negative, -k, k) + LEVELS
    else:
        WIDE: tl.constexpr = FLOAT_MAPS % 16
        FINE: tl.constexpr = (FLOAT_MAPS // 16) % 16
        ROOT: tl.constexpr = FLOAT_MAPS // 256
        code = _float_code(ratio, bits16, BITS, WIDE)
        if FINE != 0:
            code = tl.where(marked, _float_code(ratio, bits16, BITS, FINE), code)
        if ROOT != 0:
            code = tl.where(marked, _float_code(tl.math.sqrt_rn(ratio), bits16, BITS, WIDE), code)
        return code


@triton.jit
def _requantize(
    value,
    codes,
    scales,
    offsets,
    mask,
    first,
    end,
    key,
    shift,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    SIGNED: tl.constexpr,
    EXACT: tl.constexpr,
    FLOAT_MAPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Quantize a program's new values (``first`` on a block boundary): per block, a
    second moment held at its ceiling (an overflowed square), the absmax over bit patterns (NaN and infinity sort above every finite value),
    exact (fp32) where ``EXACT`` and else rounded up to bf16 (a second moment's exact
    scale negated where its block takes the second map: a finer float map where its
    smallest ratio reaches that map's lowest level, the root map where more than a
    quarter of its nonzero ratios lie below the float map's lowest level),
    then each element's code, rounded stochastically with the bits of step key
    ``key``; int4 codes two to a byte."""
    x = tl.where(mask, value.to(tl.float32), 0.0)
    # held at the ceiling, fp32's largest number under an exact scale and bf16's under a bf16
    # one: a second moment's overflowed square, a first moment's finite value (an infinity
    # poisons its block; NaN stays NaN)
    if EXACT:
        CEILING: tl.constexpr = 3.4028234663852886e38
    else:
        CEILING: tl.constexpr = 3.3895313892515355e38
    if not SIGNED:
        x = tl.where(x > CEILING, CEILING, x)
    else:
        beyond = (tl.abs(x) > CEILING) & (tl.abs(x) < float("inf"))
        x = tl.where(beyond, tl.where(x > 0, CEILING, -CEILING), x)
    patterns = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    largest = tl.max(tl.reshape(patterns, [BLOCK // QBLOCK, QBLOCK]), axis=1)
    largest = tl.minimum(largest, 0x7F800000)
    marked_block = largest < 0  # (all False: the second map, where there is one, is decided below)
    block_index = first // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
    in_tensor = block_index * QBLOCK < end
    if not EXACT:  # the absmax rounded up to bf16
        rounded_up = (largest + 0xFFFF) >> 16
        finite = (largest < 0x7F800000) & (rounded_up < 0x7F80)
        scale_bits = tl.where(finite, rounded_up, 0x7FC0).to(tl.uint16)
        tl.store(scales + block_index, scale_bits.to(tl.bfloat16, bitcast=True), mask=in_tensor)
        block_scale = (tl.where(finite, rounded_up, 0) << 16).to(tl.float32, bitcast=True)
    else:  # the absmax itself
        finite = largest < 0x7F800000
        block_scale = tl.where(finite, largest, 0).to(tl.float32, bitcast=True)
    usable = tl.where(finite, 1, 0)
    scale = tl.reshape(tl.broadcast_to(block_scale[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
    ok = tl.reshape(tl.broadcast_to(usable[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
    x = tl.where(ok == 1, x, 0.0)  # a non-finite block stores codes 0: no NaN reaches a cast
    ratio = tl.math.div_rn(tl.abs(x), scale + (scale == 0).to(tl.float32))  # the one division
    if EXACT:
        stored = tl.where(finite, largest, 0x7FC00000).to(tl.float32, bitcast=True)
        FINE: tl.constexpr = (FLOAT_MAPS // 16) % 16
        ROOT: tl.constexpr = FLOAT_MAPS // 256
        if not SIGNED and FINE != 0:  # the finer map holds the block: its smallest ratio is at its lowest level
            lowest = tl.min(tl.reshape(tl.where(mask, ratio, float("inf")), [BLOCK // QBLOCK, QBLOCK]), axis=1)
            marked_block = (
                finite & (block_scale > 0) & (lowest.to(tl.int32, bitcast=True) >= ((128 - (1 << FINE)) << 23))
            )  # (r >= 0: its bits order as its values)
        # the root map: more than a quarter of the block's nonzero ratios below the float map's lowest level
        if not SIGNED and ROOT != 0:
            WIDE: tl.constexpr = FLOAT_MAPS % 16
            pattern = tl.reshape(ratio, [BLOCK // QBLOCK, QBLOCK]).to(
                tl.int32, bitcast=True
            )  # r >= 0: bits order as values
            nonzero = tl.reshape(mask, [BLOCK // QBLOCK, QBLOCK]) & (pattern > 0)
            below = nonzero & (pattern < ((128 - (1 << WIDE)) << 23))
            count = tl.sum(below.to(tl.int32), axis=1)
            marked_block = finite & (block_scale > 0) & (_ROOT_MAP_SHARE * count > tl.sum(nonzero.to(tl.int32), axis=1))
        if not SIGNED:
            stored = tl.where(marked_block, -stored, stored)
        tl.store(scales + block_index, stored, mask=in_tensor)
    marked = tl.reshape(tl.broadcast_to(marked_block[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
    code = _code(ratio, x < 0, _random16(key, offsets + shift), marked, BITS, SIGNED, FLOAT_MAPS)
    code = tl.where(mask, code * ok, 0)
    if BITS == 8:
        tl.store(codes + offsets, code.to(tl.uint8), mask=mask)
    else:
        even, odd = tl.split(tl.reshape(code, [BLOCK // 2, 2]))
        byte_index = first // 2 + tl.arange(0, BLOCK // 2)
        tl.store(codes + byte_index, (even | (odd << 4)).to(tl.uint8), mask=byte_index * 2 < end)
    if SIGNED:  # (nothing reads a first moment back)
        stored = x
    else:  # the values as stored, as _dequantize reads them (NaN in a non-finite block)
        stored = tl.where(ok == 1, scale * _unsigned_level(code, marked, BITS, FLOAT_MAPS), float("nan"))
    return stored


@triton.jit
def _load_moment(
    pointer,
    scales,
    offsets,
    mask,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    SIGNED: tl.constexpr,
    FLOAT_MAPS: tl.constexpr,
):
    """A moment's values: loaded in its dtype, or dequantized to fp32 (``BITS`` 0: not quantized)."""
    if BITS == 0:
        return tl.load(pointer + offsets, mask=mask)
    else:
        return _dequantize(pointer, scales, offsets, mask, BITS, QBLOCK, SIGNED, FLOAT_MAPS)


@triton.jit
def _put_moment(
    pointer,
    scales,
    value,
    key,
    place,
    BITS: tl.constexpr,
    QBLOCK: tl.constexpr,
    SIGNED: tl.constexpr,
    EXACT: tl.constexpr,
    FLOAT_MAPS: tl.constexpr,
):
    """Store a new moment at ``place`` (the chunk's offsets, mask, rounding shift, first
    and end): in its dtype (stochastically in 16 bits), or quantized (``BITS`` > 0, from
    the unrounded value); a quantized second moment's values as stored are returned
    (fp32; otherwise ``value``)."""
    offsets, mask, shift, first, end = place
    if BITS == 0:
        _put(pointer, offsets, mask, value, key, shift, pointer.dtype.element_ty, True)
        stored = value
    else:
        BLOCK: tl.constexpr = offsets.shape[0]
        stored = _requantize(
            value,
            pointer,
            scales,
            offsets,
            mask,
            first,
            end,
            key,
            shift,
            BITS,
            QBLOCK,
            SIGNED,
            EXACT,
            FLOAT_MAPS,
            BLOCK,
        )
    return stored


@triton.jit
def _first_moment_divisor(second, NORMALIZE: tl.constexpr, RECIPROCAL: tl.constexpr):
    """d (or the factor r that stores a first moment, ``RECIPROCAL``): 2^k (2^-k), k =
    floor(e / 2) (``NORMALIZE`` 1; times fl(sqrt 2), or fl(1 / sqrt 2), for odd e) or e
    (2), e the exponent of v, held to [-126, 126] (see
    adamkit.quantization.first_moment_divisor)."""
    bits = second.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    e = (bits >> 23) - 127
    if NORMALIZE == 1:
        k = e >> 1
    else:
        k = e
    k = tl.minimum(tl.maximum(k, -_DIVISOR_LIMIT), _DIVISOR_LIMIT)
    if RECIPROCAL:
        power = ((127 - k) << 23).to(tl.float32, bitcast=True)
        odd_factor = _ROOT_HALF
    else:
        power = ((127 + k) << 23).to(tl.float32, bitcast=True)
        odd_factor = _ROOT_TWO
    if NORMALIZE == 1:
        power = tl.where((e & 1) != 0, power * odd_factor, power)
    return power


@triton.jit
def _exact_sqrt(x):
    """IEEE square root, rounded to nearest (in fp32, ``tl.sqrt`` is an approximation)."""
    if x.dtype == tl.float32:
        return tl.math.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _exact_div(x, y):
    """IEEE division, rounded to nearest (in fp32, ``/`` is an approximation)."""
    x, y = tl.broadcast(x, y)
    if x.dtype == tl.float32:
        return tl.math.div_rn(x, y)
    else:
        return x / y


@triton.jit
def _load_param(param, compensation, offsets, mask, COMPUTE: tl.constexpr, KAHAN: tl.constexpr, MASTER: tl.constexpr):
    """The weight theta: the param, or with its Kahan compensation, or the split
    master weight (the bf16 param's bits over its 16 or 8 low bits)."""
    if MASTER != 0:  # the bf16 param's bits over the int16 low bits (fp32), or int8 ones shifted by 8 (24-bit)
        wide = tl.load(param + offsets, mask=mask).to(tl.uint16, bitcast=True).to(tl.int32) << 16
        if MASTER == 16:
            rest = tl.load(compensation.to(tl.pointer_type(tl.int16)) + offsets, mask=mask).to(tl.int32)
        else:
            rest = tl.load(compensation.to(tl.pointer_type(tl.int8)) + offsets, mask=mask).to(tl.int32) << 8
        joined = wide + rest
        p = tl.where((joined ^ wide) < 0, wide, joined).to(tl.float32, bitcast=True)  # (the param's sign kept)
    else:
        p = tl.load(param + offsets, mask=mask).to(COMPUTE)
    if KAHAN:
        p = p + tl.load(compensation + offsets, mask=mask).to(COMPUTE)
    return p


@triton.jit
def _store_param(
    param,
    compensation,
    offsets,
    mask,
    p,
    key,
    shift,
    PARAM_STORAGE: tl.constexpr,
    COMPUTE: tl.constexpr,
    KAHAN: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    """Store the new weight theta as :func:`_load_param` reads it: split into the bf16
    param and its low bits (rounded stochastically to 24 bits first), as a Kahan pair,
    or rounded to the param's dtype (stochastically under stochastic rounding)."""
    if MASTER == 16:  # split again: high half rounded half away from zero, and what it drops
        low_bits = compensation.to(tl.pointer_type(tl.int16))
        bits = tl.where(p != p, 0x7FC00000, p.to(tl.int32, bitcast=True))  # (a NaN's payload could carry into the sign)
        high = (bits + 0x8000) >> 16
        tl.store(param + offsets, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(low_bits + offsets, (bits - (high << 16)).to(tl.int16), mask=mask)
    elif MASTER == 8:  # round to 16 significant bits stochastically, then split
        low_bytes = compensation.to(tl.pointer_type(tl.int8))
        carry = (_random16(key, offsets + shift) >> 8).to(tl.int32)
        exact = p.to(tl.int32, bitcast=True)
        bits = (exact + carry) & -256
        # a pattern carried onto the point where its bf16 half overflows, from below: one unit back
        onto = ((exact & 0x7FFFFFFF) < _BFLOAT16_OVERFLOW) & ((bits & 0x7FFFFFFF) >= _BFLOAT16_OVERFLOW)
        bits = tl.where(p != p, 0x7FC00000, bits - onto.to(tl.int32) * 0x100)
        high = (bits + 0x8000) >> 16
        tl.store(param + offsets, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
        tl.store(low_bytes + offsets, ((bits - (high << 16)) >> 8).to(tl.int8), mask=mask)
    elif KAHAN:  # p = rn(theta), c = rn(theta - p); c = 0 where p is not finite (it stays infinite)
        stored = _to_storage(p, PARAM_STORAGE)
        tl.store(param + offsets, stored, mask=mask)
        rest = tl.where(tl.abs(stored.to(COMPUTE)) < float("inf"), p - stored.to(COMPUTE), 0.0)
        tl.store(compensation + offsets, _to_storage(rest, PARAM_STORAGE), mask=mask)
    else:
        _put(param, offsets, mask, p, key, shift, PARAM_STORAGE, STOCHASTIC)
