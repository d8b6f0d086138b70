"""The numba LLVM intrinsics of the fused CPU kernel (:mod:`adamkit.kernels.cpu`):
typed pointers from raw addresses, exact 16-bit float conversions and their
stochastic rounding, the counter-based random bits of :mod:`adamkit.specs.rounding`, the
bit arithmetic of the quantized maps (:mod:`adamkit.specs.quantization`) and of split
master weights (:mod:`adamkit.specs.master`).

Each is straight-line IR with at most a select, so that the element loops that inline
them vectorize; integer work is done in 32 bits (numba widens integer arithmetic to
int64, and AVX2 can neither multiply nor convert int64 vectors).  Importing this
module needs numba.
"""

from __future__ import annotations

import llvmlite.ir as ir
import numpy as np
import torch
from numba import njit, types
from numba.core.extending import intrinsic

from ..specs.quantization import DIVISOR_EXPONENT_LIMIT, ROOT_HALF, ROOT_TWO
from ..specs.rounding import BFLOAT16_OVERFLOW_BITS, INFINITY, LARGEST_FINITE, MIX_MULTIPLIERS

_HALF_LARGEST, _HALF_INFINITY = LARGEST_FINITE[torch.float16], INFINITY[torch.float16]


@intrinsic
def typed_pointer(typingctx, address, witness):
    """An int64 address as a typed pointer to the witness array's dtype."""
    pointer_type = types.CPointer(witness.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(pointer_type))

    return pointer_type(types.int64, witness), codegen


@intrinsic
def half_to_float(typingctx, bits):
    """IEEE half (as int16 bits) to float32, exactly."""

    def codegen(context, builder, signature, args):
        half = builder.bitcast(args[0], ir.HalfType())
        return builder.fpext(half, ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def float_to_half(typingctx, value):
    """float32 to IEEE half bits (int16), rounding to nearest even."""

    def codegen(context, builder, signature, args):
        half = builder.fptrunc(args[0], ir.HalfType())
        return builder.bitcast(half, ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def bfloat16_to_float(typingctx, bits):
    """bfloat16 (as uint16 bits) to float32, exactly: the high half of a float32."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def float_to_bfloat16(typingctx, value):
    """float32 to bfloat16 bits, rounding to nearest even as torch does; NaN becomes
    the quiet NaN 0x7FC0.  Straight-line integer IR with one select: vectorizes."""

    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        bits = builder.bitcast(args[0], i32)
        lsb = builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 1))
        biased = builder.add(builder.add(bits, ir.Constant(i32, 0x7FFF)), lsb)
        rounded = builder.trunc(builder.lshr(biased, ir.Constant(i32, 16)), i16)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(i16, 0x7FC0), rounded)

    return types.uint16(types.float32), codegen


@intrinsic
def random16(typingctx, key, index):
    """u = lowbias32(key ^ index) >> 16 (see adamkit.rounding), an int32 in [0, 2^16)
    computed in 32-bit integer IR: numba's own integer arithmetic widens to int64,
    which AVX2 cannot multiply a vector of."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        x = builder.xor(builder.trunc(args[0], i32), builder.trunc(args[1], i32))
        for shift, multiplier in zip((16, 15), MIX_MULTIPLIERS):
            x = builder.xor(x, builder.lshr(x, ir.Constant(i32, shift)))
            x = builder.mul(x, ir.Constant(i32, multiplier))
        x = builder.xor(x, builder.lshr(x, ir.Constant(i32, 16)))
        return builder.lshr(x, ir.Constant(i32, 16))

    return types.int32(types.int64, types.int64), codegen


@intrinsic
def stochastic_bfloat16(typingctx, value, bits16):
    """float32 to bfloat16 bits, stochastically: add r to the low half of |x|'s
    pattern, truncate, and stop at the largest finite number; infinity from where
    nearest rounding overflows; the sign put back."""

    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        bits = builder.bitcast(args[0], i32)
        magnitude = builder.and_(bits, ir.Constant(i32, 0x7FFFFFFF))
        rounded = builder.lshr(builder.add(magnitude, args[1]), ir.Constant(i32, 16))
        largest = ir.Constant(i32, LARGEST_FINITE[torch.bfloat16])
        # (signed compares: both sides are non-negative, and AVX2 compares only signed lanes)
        rounded = builder.select(builder.icmp_signed("<", rounded, largest), rounded, largest)
        overflows = builder.icmp_signed(">=", magnitude, ir.Constant(i32, BFLOAT16_OVERFLOW_BITS))
        rounded = builder.select(overflows, ir.Constant(i32, INFINITY[torch.bfloat16]), rounded)
        signed = builder.or_(rounded, builder.and_(builder.lshr(bits, ir.Constant(i32, 16)), ir.Constant(i32, 0x8000)))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        return builder.select(is_nan, ir.Constant(i16, 0x7FC0), builder.trunc(signed, i16))

    return types.uint16(types.float32, types.int32), codegen


@intrinsic
def magnitude_bits(typingctx, value):
    """|x|'s fp32 bit pattern as an int32: ordered as the magnitudes, NaN and infinity
    above every finite value (a block's absmax as an integer max, which vectorizes
    and keeps a NaN)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        return builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))

    return types.int32(types.float32), codegen


def first_moment_divisor(root: bool, reciprocal: bool):
    """An intrinsic: the divisor d of a normalized first moment from the second moment v
    as stored (or the factor r that stores one, ``reciprocal``): 2^k (2^-k), k = floor(e
    / 2) (``root``; times fl(sqrt 2), or fl(1 / sqrt 2), for odd e) or e, e the exponent
    of v, held to [-126, 126]; see :func:`adamkit.specs.quantization.first_moment_divisor`.
    Integer work on v's bits, a select and a multiply."""
    limit = DIVISOR_EXPONENT_LIMIT
    odd_factor = float(ROOT_HALF if reciprocal else ROOT_TWO)

    @intrinsic
    def divisor(typingctx, value):
        def codegen(context, builder, signature, args):
            i32, f32 = ir.IntType(32), ir.FloatType()
            bits = builder.and_(builder.bitcast(args[0], i32), ir.Constant(i32, 0x7FFFFFFF))
            e = builder.sub(builder.lshr(bits, ir.Constant(i32, 23)), ir.Constant(i32, 127))
            k = builder.ashr(e, ir.Constant(i32, 1)) if root else e
            low, high = ir.Constant(i32, -limit), ir.Constant(i32, limit)
            k = builder.select(builder.icmp_signed("<", k, low), low, k)
            k = builder.select(builder.icmp_signed(">", k, high), high, k)
            exponent = builder.sub(ir.Constant(i32, 127), k) if reciprocal else builder.add(ir.Constant(i32, 127), k)
            power = builder.bitcast(builder.shl(exponent, ir.Constant(i32, 23)), f32)
            if not root:
                return power
            odd = builder.icmp_signed("!=", builder.and_(e, ir.Constant(i32, 1)), ir.Constant(i32, 0))
            factor = builder.select(odd, ir.Constant(f32, odd_factor), ir.Constant(f32, 1.0))
            return builder.fmul(power, factor)

        return types.float32(types.float32), codegen

    return divisor


@intrinsic
def float_of_bits(typingctx, bits):
    """The fp32 number whose bit pattern is the int32 ``bits`` (the inverse of
    :func:`magnitude_bits` on non-negative numbers)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def count_if(typingctx, total, flag):
    """``total`` (int32) plus 1 where ``flag``: a count kept in 32-bit integer IR, so that
    a loop counting beside fp32 arithmetic vectorizes eight lanes wide (numba would
    widen it to int64)."""

    def codegen(context, builder, signature, args):
        return builder.add(args[0], builder.zext(args[1], ir.IntType(32)))

    return types.int32(types.int32, types.boolean), codegen


@intrinsic
def float_map_code(typingctx, ratio, bits16, dropped, first, top):
    """The float map's code of ``ratio`` in [0, 1], rounded stochastically: the 16
    random bits added at the top of the ``dropped`` fraction bits of its fp32
    pattern, which is then truncated; less ``first``, clamped to [0, top].  32-bit
    integer IR (the constants are compile-time ints)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        dropped_, first_, top_ = (builder.trunc(a, i32) for a in args[2:])
        carry = builder.shl(args[1], builder.sub(dropped_, ir.Constant(i32, 16)))
        kept = builder.lshr(builder.add(builder.bitcast(args[0], i32), carry), dropped_)
        code = builder.sub(kept, first_)
        code = builder.select(builder.icmp_signed("<", code, ir.Constant(i32, 0)), ir.Constant(i32, 0), code)
        return builder.select(builder.icmp_signed(">", code, top_), top_, code)

    return types.int32(ratio, bits16, dropped, first, top), codegen


@intrinsic
def float_map_level(typingctx, code, dropped, first):
    """The float map's level of a code: the fp32 number with pattern
    (code + first) << dropped."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.zext(args[0], i32)
        pattern = builder.shl(builder.add(wide, builder.trunc(args[2], i32)), builder.trunc(args[1], i32))
        return builder.bitcast(pattern, ir.FloatType())

    return types.float32(code, dropped, first), codegen


@intrinsic
def nibble(typingctx, byte, high):
    """The low (``high`` false) or high nibble of a byte, as a byte."""

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        low = builder.and_(args[0], ir.Constant(i8, 0xF))
        return builder.select(args[1], builder.lshr(args[0], ir.Constant(i8, 4)), low)

    return types.uint8(types.uint8, types.boolean), codegen


@intrinsic
def nibbles(typingctx, low, high):
    """Two 4-bit codes (bytes) as one byte, ``low`` in the low nibble."""

    def codegen(context, builder, signature, args):
        return builder.or_(args[0], builder.shl(args[1], ir.Constant(ir.IntType(8), 4)))

    return types.uint8(types.uint8, types.uint8), codegen


@njit(inline="always", nogil=True)
def stochastic_half(value, bits16):
    """float32 to IEEE half bits, stochastically (the neighbours method of the spec);
    written without branches, so that it vectorizes."""
    nearest = float_to_half(value)
    toward_zero = (np.int64(nearest) & 0xFFFF) - np.int64(abs(half_to_float(nearest)) > abs(value))
    spacing = np.float32(2.0 ** (max((toward_zero >> 10) & 0x1F, 1) - 25))
    fraction = (abs(value) - abs(half_to_float(np.int16(toward_zero)))) / spacing
    away = np.int64(fraction * np.float32(65536.0) >= np.float32(65536 - np.int64(bits16)))
    away *= np.int64((toward_zero & 0x7FFF) != _HALF_LARGEST)  # never past the largest finite
    # inf (where nearest rounding overflows, or x is infinite) and NaN keep the conversion
    keep = np.int64((np.int64(nearest) & _HALF_INFINITY) == _HALF_INFINITY)
    return np.int16((toward_zero + away) * (1 - keep) + (np.int64(nearest) & 0xFFFF) * keep)


def _same_sign(builder, wide, joined):
    """``joined``, or ``wide`` where the two differ in their sign bit (IR: xor, compare, select)."""
    crossed = builder.icmp_signed("<", builder.xor(joined, wide), ir.Constant(ir.IntType(32), 0))
    return builder.select(crossed, wide, joined)


@intrinsic
def join_master(typingctx, high, low):
    """The fp32 master weight of bf16 bits ``high`` and int16 bits ``low`` (both held
    as uint16): (high << 16) + low, sign-extending low, or high << 16 where that sum
    would change the sign (see adamkit.specs.master.join)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        return builder.bitcast(_same_sign(builder, wide, builder.add(wide, builder.sext(args[1], i32))), ir.FloatType())

    return types.float32(types.uint16, types.uint16), codegen


@intrinsic
def split_master(typingctx, value, low_half):
    """The bf16 bits of fp32 ``value`` rounded half away from zero, (bits + 2^15) >> 16,
    or (``low_half`` true) what that drops, bits - (high << 16), as uint16 (a NaN as the
    quiet NaN 0x7FC00000: a payload in the top bits would carry into the sign)."""

    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        bits = builder.select(is_nan, ir.Constant(i32, 0x7FC00000), builder.bitcast(args[0], i32))
        high = builder.lshr(builder.add(bits, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        low = builder.sub(bits, builder.shl(high, ir.Constant(i32, 16)))
        return builder.trunc(builder.select(args[1], low, high), i16)

    return types.uint16(types.float32, types.boolean), codegen


@intrinsic
def as_bytes(typingctx, pointer):
    """The same address as a pointer to int8 (the 24-bit master's low bits)."""
    result = types.CPointer(types.int8)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(result))

    return result(pointer), codegen


@intrinsic
def join_master24(typingctx, high, low):
    """The 24-bit master weight: (high << 16) + (low << 8), low an int8, or high << 16
    where that sum would change the sign (see adamkit.specs.master.join)."""

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        wide = builder.shl(builder.zext(args[0], i32), ir.Constant(i32, 16))
        rest = builder.shl(builder.sext(args[1], i32), ir.Constant(i32, 8))
        return builder.bitcast(_same_sign(builder, wide, builder.add(wide, rest)), ir.FloatType())

    return types.float32(types.uint16, types.int8), codegen


@intrinsic
def split_master24(typingctx, value, bits16, low_half):
    """fp32 ``value`` rounded stochastically to 16 significant bits (the top 8 of the
    random bits added to its pattern, the low 8 cleared, one unit back where that
    carried it onto the bf16 overflow point from below; NaN: 0x7FC00000), then its
    bf16 high half, or (``low_half``) the int8 rest, as uint16."""

    def codegen(context, builder, signature, args):
        i32, i16 = ir.IntType(32), ir.IntType(16)
        carry = builder.lshr(args[1], ir.Constant(i32, 8))
        exact = builder.bitcast(args[0], i32)
        bits = builder.and_(builder.add(exact, carry), ir.Constant(i32, -256))
        # a pattern carried onto the point where its bf16 half overflows, from below: one unit back
        magnitude, overflow = ir.Constant(i32, 0x7FFFFFFF), ir.Constant(i32, BFLOAT16_OVERFLOW_BITS)
        below = builder.icmp_unsigned("<", builder.and_(exact, magnitude), overflow)
        onto = builder.icmp_unsigned(">=", builder.and_(bits, magnitude), overflow)
        back = builder.select(builder.and_(below, onto), ir.Constant(i32, 0x100), ir.Constant(i32, 0))
        bits = builder.sub(bits, back)
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        bits = builder.select(is_nan, ir.Constant(i32, 0x7FC00000), bits)
        high = builder.lshr(builder.add(bits, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
        low = builder.ashr(builder.sub(bits, builder.shl(high, ir.Constant(i32, 16))), ir.Constant(i32, 8))
        return builder.trunc(builder.select(args[2], low, high), i16)

    return types.uint16(types.float32, types.int32, types.boolean), codegen


@intrinsic
def store_byte(typingctx, pointer, index, value):
    """pointer (reinterpreted as int8*)[index] = the low byte of ``value``: a store the
    parallel loop's dead-code pass cannot drop, as it drops a setitem on a pointer
    made inside the loop."""

    def codegen(context, builder, signature, args):
        i8 = ir.IntType(8)
        address = builder.gep(builder.bitcast(args[0], i8.as_pointer()), [args[1]])
        builder.store(builder.trunc(args[2], i8), address)
        return context.get_dummy_value()

    return types.none(pointer, types.int64, types.uint16), codegen
