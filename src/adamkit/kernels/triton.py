r"""Fused multi-tensor Triton kernel for CUDA: one launch per param group and dtype.

Each program updates one chunk of at most :data:`BLOCK` elements of one tensor; a
table of raw addresses (param, grad, exp_avg, second moment, max second moment,
Kahan compensation and, for quantized states, the moments' block scales) and
a table of chunks let a single launch cover every tensor of the group_scalars, whatever
their sizes.  The element math is the CPU kernel's (see :mod:`adamkit.kernels.cpu`),
in fp32 (fp64 for fp64 params), with bf16/fp16 rounded to nearest even on store.
Quantized moments (``state_precision="int8"``/``"int4"``) are dequantized on load
and quantized again from the new fp32 values; a chunk covers whole blocks.

As compiled for a GPU, the arithmetic is IEEE, operation by operation, as in the
interpreter and the NumPy reference: division and square root rounded to nearest
(Triton's ``/`` and ``tl.sqrt`` are approximations in fp32), no fused multiply-adds
(:data:`COMPILE_OPTIONS`), and the group's constants reach the kernel as float64 (a
Python float argument would arrive as fp32).  A whole chunk runs with an all-true mask
and 16-byte-aligned addresses the compiler is told of, so it loads and stores vectors;
only a tensor's last chunk is masked element by element.  ``tests/test_triton_compile.py``
reads all of this from the PTX.

Per-tensor step sizes and bias corrections (:data:`adamkit.kernels.host.TENSOR_SCALARS`)
come from :class:`adamkit.rule.UpdateRule` as a device array.  With ``capturable=True`` they are computed on the device from the
step counters, so neither a tensor lr changed by a scheduler nor the step count
needs the host: nothing syncs, nothing recompiles (lr and betas are runtime values),
and the address table is uploaded only when an address changes, so a captured CUDA
graph replays with no host-to-device copy.  Step counters on the host are advanced
in one compiled pass (:class:`adamkit.kernels.host.HostCounters`).

AMP: when a ``torch.amp.GradScaler`` drives the optimizer, ``grad_scale`` and
``found_inf`` are read inside the kernel: gradients are unscaled on the fly, and a
step with ``found_inf`` leaves params and state untouched (the step counters are
rolled back, as torch's fused optimizers do).

Without a GPU the same kernel runs on CPU tensors under ``TRITON_INTERPRET=1``;
that is how the conformance suite tests it in CI.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ..algorithms import Denominator, FirstMoment, SecondMoment
from ..rule import DECOUPLED_DECAY, L2_DECAY, GroupScalars, UpdateRule
from ..sharding import per_tensor_totals
from ..specs import rounding
from ..specs.quantization import QuantFormat
from ..state import MU_PRODUCT_KEY, PARAM_EXTRA_KEY, moment_storage
from . import foreach, storage
from .amp import unscaled
from .host import (
    COLUMNS,
    STATE_COLUMNS,
    TENSOR_SCALARS,
    HostCounters,
    addressed_forms,
    check_addressed,
    chunk_table,
    clip_update_sizes,
    group_constants,
    set_cautious_scales,
    state_keys,
    state_row,
    tensor_scalar_columns,
)
from .lists import list_kernel
from .types import GroupBatch, as_real

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

#: elements per program, and the warps that run them: a bucket takes the values these
#: have when it is built (``benchmarks/bench_gpu.py --sweep`` times other choices)
BLOCK = 1024
NUM_WARPS = 4
#: quantized states take several times the arithmetic per element, and registers with
#: it: four elements per thread rather than eight (sm_90, int8: 55 registers rather
#: than 96) let more programs share an SM.  Measured on an H100 (``--sweep``), 512 x 4
#: warps: int8 0.84x and int4 0.74x torch's fused fp32 step, 1024 x 4: 0.95x and 1.06x
QUANTIZED_BLOCK = 512
QUANTIZED_NUM_WARPS = 4

#: the interpreter runs programs on the CPU with NumPy: slow, but exact, for tests
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: how the kernel is compiled: IEEE operations one by one (no fused multiply-adds), as
#: the NumPy reference and the interpreter compute, whatever the Triton version's default
COMPILE_OPTIONS = {"enable_fp_fusion": False}


def available() -> bool:
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def device_types() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if INTERPRETED else frozenset({"cuda"})


if triton is not None:
    _MIX_FIRST, _MIX_SECOND = (tl.constexpr(m) for m in rounding.MIX_MULTIPLIERS)
    _L2_DECAY, _DECOUPLED_DECAY = tl.constexpr(L2_DECAY), tl.constexpr(DECOUPLED_DECAY)
    _ROW_LENGTH = tl.constexpr(len(COLUMNS))
    _TENSOR_SCALAR_COUNT = tl.constexpr(len(TENSOR_SCALARS))
    # the element math's forms (adamkit.algorithms), as FORMS packs them
    _NORMALIZED_CLIPPED = tl.constexpr(int(FirstMoment.NORMALIZED_CLIPPED))
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
        if STORAGE == tl.bfloat16:  # add r to the low half, truncate
            rounded = ((x.to(tl.uint32, bitcast=True) + bits16) >> 16).to(tl.uint16)
            rounded = tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)
            return rounded.to(tl.bfloat16, bitcast=True)
        elif STORAGE == tl.float16:
            nearest = x.to(tl.float16)
            pattern = nearest.to(tl.uint16, bitcast=True).to(tl.int32)
            toward_zero = pattern - (tl.abs(nearest.to(tl.float32)) > tl.abs(x)).to(tl.int32)
            exponent = tl.maximum((toward_zero >> 10) & 0x1F, 1)
            spacing = ((exponent + (127 - 25)) << 23).to(tl.float32, bitcast=True)
            lower = toward_zero.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
            fraction = _exact_div(tl.abs(x) - tl.abs(lower), spacing)  # exact: spacing is a power of 2
            away = (fraction * 65536.0 >= 65536.0 - bits16.to(tl.float32)).to(tl.int32)
            rounded = (toward_zero + away).to(tl.uint16).to(tl.float16, bitcast=True)
            return tl.where(x != x, nearest, rounded)
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
        second moment's float maps are ``FLOAT_MAPS`` (see :func:`float_maps`), the finer
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
            WIDE: tl.constexpr = FLOAT_MAPS % 16
            FINE: tl.constexpr = FLOAT_MAPS // 16
            level = _float_level(code, BITS, WIDE)
            if FINE != 0:
                level = tl.where(scale < 0, _float_level(code, BITS, FINE), level)
            return tl.abs(scale) * level

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
    def _code(x, scale, bits16, fine, BITS: tl.constexpr, SIGNED: tl.constexpr, FLOAT_MAPS: tl.constexpr):
        """The spec's stochastically rounded code of ``x`` in a block of ``scale`` (> 0),
        with one division (r = |x| / s); a second moment's float maps are ``FLOAT_MAPS``,
        the finer one where ``fine``."""
        ratio = tl.math.div_rn(tl.abs(x), scale + (scale == 0).to(tl.float32))
        if SIGNED:  # L_k <= r < L_{k+1} from floor(K sqrt r), corrected either side
            LEVELS: tl.constexpr = (1 << (BITS - 1)) - 1
            k = tl.minimum(tl.floor(float(LEVELS) * tl.math.sqrt_rn(ratio)).to(tl.int32), LEVELS)
            k = k - (ratio < _signed_level(k, LEVELS)).to(tl.int32)
            k = k + (ratio >= _signed_level(k + 1, LEVELS)).to(tl.int32)  # L_{K+1} > 1 >= r
            lo = _signed_level(k, LEVELS)
            gap = _signed_level(k + 1, LEVELS) - lo
            k = k + (((ratio - lo) * 65536.0 >= gap * (65536.0 - bits16.to(tl.float32))) & (k < LEVELS)).to(tl.int32)
            return tl.where(x < 0, -k, k) + LEVELS
        else:
            WIDE: tl.constexpr = FLOAT_MAPS % 16
            FINE: tl.constexpr = FLOAT_MAPS // 16
            code = _float_code(ratio, bits16, BITS, WIDE)
            if FINE != 0:
                code = tl.where(fine, _float_code(ratio, bits16, BITS, FINE), code)
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
        scale negated where its block takes the finer float map), then each element's
        code, rounded stochastically with the bits of step key ``key``; int4 codes two to a byte."""
        x = tl.where(mask, value.to(tl.float32), 0.0)
        if not SIGNED:  # an overflowed square is held at the ceiling (NaN stays NaN)
            if EXACT:  # fp32's largest number
                x = tl.where(x > 3.4028234663852886e38, 3.4028234663852886e38, x)
            else:  # bf16's
                x = tl.where(x > 3.3895313892515355e38, 3.3895313892515355e38, x)
        patterns = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        largest = tl.max(tl.reshape(patterns, [BLOCK // QBLOCK, QBLOCK]), axis=1)
        largest = tl.minimum(largest, 0x7F800000)
        fine_block = largest < 0  # (all False: the finer map, where there is one, is decided below)
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
            stored = tl.where(finite, largest, 0x7FC00000).to(tl.float32, bitcast=True)
            FINE: tl.constexpr = FLOAT_MAPS // 16
            if not SIGNED and FINE != 0:  # the finer map holds the block: its smallest ratio is at its lowest level
                smallest = tl.min(tl.reshape(tl.where(mask, patterns, 0x7F800000), [BLOCK // QBLOCK, QBLOCK]), axis=1)
                divisor = block_scale + (block_scale == 0).to(tl.float32)
                lowest = tl.math.div_rn(smallest.to(tl.float32, bitcast=True), divisor)  # >= 0: bits order as values
                fine_block = (
                    finite & (block_scale > 0) & (lowest.to(tl.int32, bitcast=True) >= ((128 - (1 << FINE)) << 23))
                )
                stored = tl.where(fine_block, -stored, stored)
            tl.store(scales + block_index, stored, mask=in_tensor)
        usable = tl.where(finite, 1, 0)
        scale = tl.reshape(tl.broadcast_to(block_scale[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        ok = tl.reshape(tl.broadcast_to(usable[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        x = tl.where(ok == 1, x, 0.0)  # a non-finite block stores codes 0: no NaN reaches a cast
        fine = tl.reshape(tl.broadcast_to(fine_block[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        code = _code(x, scale, _random16(key, offsets + shift), fine, BITS, SIGNED, FLOAT_MAPS)
        code = tl.where(mask, code * ok, 0)
        if BITS == 8:
            tl.store(codes + offsets, code.to(tl.uint8), mask=mask)
        else:
            even, odd = tl.split(tl.reshape(code, [BLOCK // 2, 2]))
            byte_index = first // 2 + tl.arange(0, BLOCK // 2)
            tl.store(codes + byte_index, (even | (odd << 4)).to(tl.uint8), mask=byte_index * 2 < end)

    @triton.jit
    def _load_moment(
        pointer,
        scales,
        offsets,
        mask,
        STORAGE: tl.constexpr,
        BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        SIGNED: tl.constexpr,
        FLOAT_MAPS: tl.constexpr,
    ):
        """A moment's values: loaded in its dtype, or dequantized to fp32."""
        if BITS == 0:
            return tl.load(pointer + offsets, mask=mask)
        else:
            return _dequantize(pointer, scales, offsets, mask, BITS, QBLOCK, SIGNED, FLOAT_MAPS)

    @triton.jit
    def _put_moment(
        pointer,
        scales,
        offsets,
        mask,
        value,
        key,
        shift,
        first,
        end,
        STORAGE: tl.constexpr,
        BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        SIGNED: tl.constexpr,
        EXACT: tl.constexpr,
        FLOAT_MAPS: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Store a new moment: in its dtype (stochastically in 16 bits), or quantized
        (from the unrounded value)."""
        if BITS == 0:
            _put(pointer, offsets, mask, value, key, shift, STORAGE, True)
        else:
            _requantize(
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
    def _load_param(
        param, compensation, offsets, mask, COMPUTE: tl.constexpr, KAHAN: tl.constexpr, MASTER: tl.constexpr
    ):
        """The weight theta: the param, or with its Kahan compensation, or the split
        master weight (the bf16 param's bits over its 16 or 8 low bits)."""
        if MASTER == 16:  # the fp32 master weight: the bf16 param's bits over the int16 low bits
            low_bits = compensation.to(tl.pointer_type(tl.int16))
            high = tl.load(param + offsets, mask=mask).to(tl.uint16, bitcast=True).to(tl.int32)
            p = ((high << 16) + tl.load(low_bits + offsets, mask=mask).to(tl.int32)).to(tl.float32, bitcast=True)
        elif MASTER == 8:  # the 24-bit master: int8 low bits, shifted by 8
            low_bytes = compensation.to(tl.pointer_type(tl.int8))
            high = tl.load(param + offsets, mask=mask).to(tl.uint16, bitcast=True).to(tl.int32)
            rest = tl.load(low_bytes + offsets, mask=mask).to(tl.int32) << 8
            p = ((high << 16) + rest).to(tl.float32, bitcast=True)
        else:
            p = tl.load(param + offsets, mask=mask).to(COMPUTE)
        if KAHAN:
            p = p + tl.load(compensation + offsets, mask=mask).to(COMPUTE)
        return p

    @triton.jit
    def _update_chunk(
        offsets,
        mask,
        bounds,
        tensors,
        scalars,
        FORMS: tl.constexpr,
        AMSGRAD: tl.constexpr,
        DECAY: tl.constexpr,
        KAHAN: tl.constexpr,
        MASTER: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        QUANT_BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        QBLOCK_SECOND: tl.constexpr,
        EXACT_SECOND: tl.constexpr,
        FLOAT_MAPS_SECOND: tl.constexpr,
        CAUTIOUS: tl.constexpr,
        COUNTING: tl.constexpr,
    ):
        r"""One chunk's update, elements ``offsets`` where ``mask``:

        .. math::
            m \leftarrow m + (1-\beta_1)(g - m), \quad
            v \leftarrow \beta_2 v + (1-\beta_2) g^2, \quad
            \theta \leftarrow \theta - \alpha_t \, m / (\sqrt{\hat v} / \sqrt{1-\beta_2^t} + \epsilon)

        (the other forms, ``FORMS`` as :attr:`adamkit.algorithms.AlgorithmSpec.forms` packs
        them, as :mod:`adamkit.algorithms` writes them, in the CPU kernel's order), with L2 (``DECAY == L2_DECAY``) or decoupled (``DECAY == DECOUPLED_DECAY``)
        weight decay, in ``COMPUTE`` precision with IEEE division and square root.
        ``CAUTIOUS``: the update u kept only where u g > 0, scaled by the tensor's
        n / (kept + 1) (as the reference: u [u g > 0] n / (kept + 1), a NaN update stays
        NaN).  ``COUNTING``: the agreement pass: nothing is stored, and the number of
        elements with u g > 0 is returned (float64)."""
        first, end = bounds
        param, grad, exp_avg, second, max_second, compensation, exp_avg_scales, second_scales, max_second_scales = (
            tensors
        )
        (
            step_size,
            bias_correction2_sqrt,
            gradient_step_size,
            adaptive,
            clip,
            second_weight,
            decay_factor,
            cautious_scale,
            gradient_factor,
            one_minus_beta1,
            beta2,
            one_minus_beta2,
            eps,
            l2_weight_decay,
            key_param,
            key_exp_avg,
            key_second,
            key_max,
            shift,
        ) = scalars
        PARAM_STORAGE: tl.constexpr = param.dtype.element_ty
        STATE_STORAGE: tl.constexpr = exp_avg.dtype.element_ty  # uint8 codes when quantized
        COMPUTE: tl.constexpr = step_size.dtype
        BLOCK: tl.constexpr = offsets.shape[0]
        FIRST_MOMENT: tl.constexpr = FORMS % 4
        SECOND_MOMENT: tl.constexpr = FORMS // 4 % 4
        DENOMINATOR: tl.constexpr = FORMS // 16 % 4
        NESTEROV: tl.constexpr = FORMS // 64
        p = _load_param(param, compensation, offsets, mask, COMPUTE, KAHAN, MASTER)
        g = tl.load(grad + offsets, mask=mask).to(COMPUTE) * gradient_factor  # exact: +-1 or +-1/grad_scale
        if DECAY == _L2_DECAY:
            g = g + l2_weight_decay * p
        if DECAY == _DECOUPLED_DECAY:  # a per-tensor factor (ADOPT's first step: 1; StableAdamW: clipped)
            p = p * decay_factor
        second_value = _load_moment(
            second, second_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND
        )
        m = _load_moment(exp_avg, exp_avg_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK, True, 0)
        m = m.to(COMPUTE)
        if FIRST_MOMENT == _NORMALIZED_CLIPPED:  # m follows g over the previous v's root, clipped to [-c, c]
            root = _exact_sqrt(second_value.to(COMPUTE))
            target = _exact_div(g, tl.where(root < eps, eps, root))
            target = tl.where(target > clip, clip, tl.where(target < -clip, -clip, target))
            m = m + one_minus_beta1 * (target - m)
        else:
            m = m + one_minus_beta1 * (g - m)
        if not COUNTING:  # (the agreement pass stores nothing)
            _put_moment(
                exp_avg,
                exp_avg_scales,
                offsets,
                mask,
                m,
                key_exp_avg,
                shift,
                first,
                end,
                STATE_STORAGE,
                QUANT_BITS,
                QBLOCK,
                True,
                False,
                0,
                BLOCK,
            )
        if SECOND_MOMENT == _INFINITY_NORM:
            new_second = tl.maximum(beta2 * second_value.to(COMPUTE), tl.abs(g) + eps)
        elif SECOND_MOMENT == _AVERAGE_AFTER:
            new_second = beta2 * second_value.to(COMPUTE) + second_weight * g * g
        else:
            new_second = beta2 * second_value.to(COMPUTE) + one_minus_beta2 * g * g
        if not COUNTING:  # (the agreement pass stores nothing)
            _put_moment(
                second,
                second_scales,
                offsets,
                mask,
                new_second,
                key_second,
                shift,
                first,
                end,
                STATE_STORAGE,
                QUANT_BITS,
                QBLOCK_SECOND,
                False,
                EXACT_SECOND,
                FLOAT_MAPS_SECOND,
                BLOCK,
            )
        if DENOMINATOR == _NORM:
            denom = new_second
        elif DENOMINATOR == _NO_DENOMINATOR:
            denom = 1.0
        else:
            v = new_second
            if AMSGRAD:
                v_max = _load_moment(
                    max_second,
                    max_second_scales,
                    offsets,
                    mask,
                    STATE_STORAGE,
                    QUANT_BITS,
                    QBLOCK_SECOND,
                    False,
                    FLOAT_MAPS_SECOND,
                )
                v = tl.maximum(v_max.to(COMPUTE), v)
                if not COUNTING:  # (the agreement pass stores nothing)
                    _put_moment(
                        max_second,
                        max_second_scales,
                        offsets,
                        mask,
                        v,
                        key_max,
                        shift,
                        first,
                        end,
                        STATE_STORAGE,
                        QUANT_BITS,
                        QBLOCK_SECOND,
                        False,
                        EXACT_SECOND,
                        FLOAT_MAPS_SECOND,
                        BLOCK,
                    )
            if DENOMINATOR == _RECTIFIED_ROOT:  # before rectification: momentum SGD, no denominator
                denom = tl.where(adaptive != 0, _exact_sqrt(v) + eps, 1.0)
            else:
                denom = _exact_div(_exact_sqrt(v), bias_correction2_sqrt) + eps
        if NESTEROV:
            update = _exact_div(step_size * m + gradient_step_size * g, denom)
        elif DENOMINATOR == _NO_DENOMINATOR:
            update = step_size * m
        else:
            update = step_size * _exact_div(m, denom)
        if COUNTING:
            total = tl.sum(((update * g > 0.0) & mask).to(tl.int32), axis=0).to(tl.float64)
        else:
            if CAUTIOUS:
                update = update * tl.where(update * g > 0.0, 1.0, 0.0) * cautious_scale
            p = p - update
            if MASTER == 16:  # split again: high half rounded half away from zero, and what it drops
                low_bits = compensation.to(tl.pointer_type(tl.int16))
                bits = p.to(tl.int32, bitcast=True)
                high = (bits + 0x8000) >> 16
                tl.store(param + offsets, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
                tl.store(low_bits + offsets, (bits - (high << 16)).to(tl.int16), mask=mask)
            elif MASTER == 8:  # round to 16 significant bits stochastically, then split
                low_bytes = compensation.to(tl.pointer_type(tl.int8))
                carry = (_random16(key_param, offsets + shift) >> 8).to(tl.int32)
                bits = tl.where(p != p, 0x7FC00000, (p.to(tl.int32, bitcast=True) + carry) & -256)
                high = (bits + 0x8000) >> 16
                tl.store(param + offsets, high.to(tl.int16).to(tl.bfloat16, bitcast=True), mask=mask)
                tl.store(low_bytes + offsets, ((bits - (high << 16)) >> 8).to(tl.int8), mask=mask)
            elif KAHAN:  # p = rn(theta), c = rn(theta - p)
                stored = _to_storage(p, PARAM_STORAGE)
                tl.store(param + offsets, stored, mask=mask)
                tl.store(compensation + offsets, _to_storage(p - stored.to(COMPUTE), PARAM_STORAGE), mask=mask)
            else:
                _put(param, offsets, mask, p, key_param, shift, PARAM_STORAGE, STOCHASTIC)
            total = 0.0
        return total

    @triton.jit
    def _fused_step(
        table_ptr,
        chunk_ptr,
        tensor_scalar_ptr,
        grad_scale_ptr,
        found_inf_ptr,
        key_ptr,
        constants_ptr,
        counts_ptr,
        PARAM_STORAGE: tl.constexpr,
        STATE_STORAGE: tl.constexpr,
        COMPUTE: tl.constexpr,
        FORMS: tl.constexpr,
        AMSGRAD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        DECAY: tl.constexpr,
        AMP: tl.constexpr,
        KAHAN: tl.constexpr,
        MASTER: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        RANDOM: tl.constexpr,
        QUANT_BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        QBLOCK_SECOND: tl.constexpr,
        EXACT_SECOND: tl.constexpr,
        FLOAT_MAPS_SECOND: tl.constexpr,
        ALIGNED: tl.constexpr,
        CAUTIOUS: tl.constexpr,
        COUNTING: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One program per chunk: chunk row (tensor t, first, end), then tensor t's
        addresses (param, grad, exp_avg, second moment, max second moment, Kahan
        compensation, the three moments' scales) and its row of the tensor scalars
        (:data:`host.TENSOR_SCALARS`)."""
        chunk = tl.program_id(0)
        t = tl.load(chunk_ptr + 3 * chunk)
        first = tl.multiple_of(tl.load(chunk_ptr + 3 * chunk + 1), BLOCK)
        end = tl.load(chunk_ptr + 3 * chunk + 2)
        skip = False
        gradient_factor = 1.0
        if AMP:  # fp32(1 / s), as adamkit.kernels.amp forms it
            skip = tl.load(found_inf_ptr) != 0
            gradient_factor = tl.math.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32))
        if MAXIMIZE:
            gradient_factor = -gradient_factor
        if not skip:
            row = table_ptr + _ROW_LENGTH * t  # the columns of host.COLUMNS
            param_pointer = tl.pointer_type(PARAM_STORAGE)
            state_pointer = tl.pointer_type(STATE_STORAGE)  # uint8 codes when quantized
            first_scales_pointer = tl.pointer_type(tl.bfloat16)  # the first moment's
            if EXACT_SECOND:  # the second moments' scales
                scales_pointer = tl.pointer_type(tl.float32)
            else:
                scales_pointer = tl.pointer_type(tl.bfloat16)
            param = tl.load(row).to(param_pointer)
            grad = tl.load(row + 1).to(param_pointer)
            exp_avg = tl.load(row + 2).to(state_pointer)
            second = tl.load(row + 3).to(state_pointer)
            max_second = tl.load(row + 4).to(state_pointer)
            compensation = tl.load(row + 5).to(param_pointer)
            if ALIGNED:  # every address is a multiple of 16 bytes: whole chunks move in vectors
                param = tl.multiple_of(param, 16)
                grad = tl.multiple_of(grad, 16)
                exp_avg = tl.multiple_of(exp_avg, 16)
                second = tl.multiple_of(second, 16)
                max_second = tl.multiple_of(max_second, 16)
                compensation = tl.multiple_of(compensation, 16)
            scales = (tl.load(row + 6).to(first_scales_pointer), tl.load(row + 7).to(scales_pointer))
            scales += (tl.load(row + 8).to(scales_pointer),)  # the three moments' block scales
            tensors = (param, grad, exp_avg, second, max_second, compensation) + scales
            keys = (0, 0, 0, 0, 0)
            if RANDOM:  # stochastic rounding's step keys (param, exp_avg, second moment, max)
                keys = (
                    tl.load(key_ptr + 5 * t),
                    tl.load(key_ptr + 5 * t + 1),
                    tl.load(key_ptr + 5 * t + 2),
                    tl.load(key_ptr + 5 * t + 3),
                    tl.load(key_ptr + 5 * t + 4),  # the element offset of a shard
                )
            tensor_row = tensor_scalar_ptr + _TENSOR_SCALAR_COUNT * t
            scalars = (
                tl.load(tensor_row).to(COMPUTE),  # step size
                tl.load(tensor_row + 1).to(COMPUTE),  # sqrt(1 - beta2^t)
                tl.load(tensor_row + 2).to(COMPUTE),  # NAdam's gradient step size
                tl.load(tensor_row + 3),  # adaptive (RAdam: rectified; ADOPT: not the first step)
                tl.load(tensor_row + 4).to(COMPUTE),  # ADOPT's clipping value
                tl.load(tensor_row + 5).to(COMPUTE),  # ADOPT's weight of g^2
                tl.load(tensor_row + 6).to(COMPUTE),  # decoupled decay factor
                tl.load(tensor_row + 8).to(COMPUTE),  # a cautious update's n / (kept + 1)
                gradient_factor.to(COMPUTE),
                tl.load(constants_ptr).to(COMPUTE),  # 1 - beta1
                tl.load(constants_ptr + 1).to(COMPUTE),  # beta2
                tl.load(constants_ptr + 2).to(COMPUTE),  # 1 - beta2
                tl.load(constants_ptr + 3).to(COMPUTE),  # eps
                tl.load(constants_ptr + 4).to(COMPUTE),  # L2 weight decay
            ) + keys
            # a whole chunk is told to the compiler as such (an all-true mask: vector
            # loads and stores); only the tail of a tensor is masked element by element
            offsets = first + tl.arange(0, BLOCK)
            bounds = (first, end)
            if end - first == BLOCK:
                whole = tl.full([BLOCK], True, tl.int1)
                total = _update_chunk(
                    offsets,
                    whole,
                    bounds,
                    tensors,
                    scalars,
                    FORMS,
                    AMSGRAD,
                    DECAY,
                    KAHAN,
                    MASTER,
                    STOCHASTIC,
                    QUANT_BITS,
                    QBLOCK,
                    QBLOCK_SECOND,
                    EXACT_SECOND,
                    FLOAT_MAPS_SECOND,
                    CAUTIOUS,
                    COUNTING,
                )
            else:
                tail = offsets < end
                total = _update_chunk(
                    offsets,
                    tail,
                    bounds,
                    tensors,
                    scalars,
                    FORMS,
                    AMSGRAD,
                    DECAY,
                    KAHAN,
                    MASTER,
                    STOCHASTIC,
                    QUANT_BITS,
                    QBLOCK,
                    QBLOCK_SECOND,
                    EXACT_SECOND,
                    FLOAT_MAPS_SECOND,
                    CAUTIOUS,
                    COUNTING,
                )
            if COUNTING:  # the agreement pass: this chunk's count
                tl.store(counts_ptr + chunk, total)

    @triton.jit
    def _clipping_sum(
        grad,
        second,
        second_scales,
        offsets,
        mask,
        constants,
        STATE_STORAGE: tl.constexpr,
        QUANT_BITS: tl.constexpr,
        QBLOCK_SECOND: tl.constexpr,
        FLOAT_MAPS_SECOND: tl.constexpr,
    ):
        """The float64 sum of g^2 / max(v / (1 - beta2^t), eps^2) over elements
        ``offsets`` where ``mask``, v the second moment the update is about to compute
        (before any rounding)."""
        gradient_factor, beta2, one_minus_beta2, eps_squared, bias_correction2 = constants
        COMPUTE: tl.constexpr = beta2.dtype
        g = tl.load(grad + offsets, mask=mask, other=0.0).to(COMPUTE) * gradient_factor
        v = _load_moment(
            second, second_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND
        )
        v_hat = _exact_div(beta2 * v.to(COMPUTE) + one_minus_beta2 * g * g, bias_correction2)
        term = _exact_div(g * g, tl.where(v_hat < eps_squared, eps_squared, v_hat))  # NaN stays NaN
        return tl.sum(tl.where(mask, term, 0.0).to(tl.float64), axis=0)

    @triton.jit
    def _clipping_sums(
        table_ptr,
        chunk_ptr,
        tensor_scalar_ptr,
        grad_scale_ptr,
        constants_ptr,
        sums_ptr,
        PARAM_STORAGE: tl.constexpr,
        STATE_STORAGE: tl.constexpr,
        COMPUTE: tl.constexpr,
        AMP: tl.constexpr,
        QUANT_BITS: tl.constexpr,
        QBLOCK_SECOND: tl.constexpr,
        EXACT_SECOND: tl.constexpr,
        FLOAT_MAPS_SECOND: tl.constexpr,
        ALIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """StableAdamW's clipping pass, one program per chunk: :func:`_clipping_sum` of
        the chunk into ``sums_ptr`` (whole chunks with an all-true mask, as the update)."""
        chunk = tl.program_id(0)
        t = tl.load(chunk_ptr + 3 * chunk)
        first = tl.multiple_of(tl.load(chunk_ptr + 3 * chunk + 1), BLOCK)
        end = tl.load(chunk_ptr + 3 * chunk + 2)
        gradient_factor = 1.0
        if AMP:  # fp32(1 / s), as the update forms it
            gradient_factor = tl.math.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32))
        row = table_ptr + _ROW_LENGTH * t
        grad = tl.load(row + 1).to(tl.pointer_type(PARAM_STORAGE))
        second = tl.load(row + 3).to(tl.pointer_type(STATE_STORAGE))
        if ALIGNED:
            grad = tl.multiple_of(grad, 16)
            second = tl.multiple_of(second, 16)
        if EXACT_SECOND:
            second_scales = tl.load(row + 7).to(tl.pointer_type(tl.float32))
        else:
            second_scales = tl.load(row + 7).to(tl.pointer_type(tl.bfloat16))
        eps = tl.load(constants_ptr + 3)
        constants = (
            gradient_factor.to(COMPUTE),
            tl.load(constants_ptr + 1).to(COMPUTE),  # beta2
            tl.load(constants_ptr + 2).to(COMPUTE),  # 1 - beta2
            (eps * eps).to(COMPUTE),
            tl.load(tensor_scalar_ptr + _TENSOR_SCALAR_COUNT * t + 7).to(COMPUTE),  # 1 - beta2^t
        )
        offsets = first + tl.arange(0, BLOCK)
        if end - first == BLOCK:
            whole = tl.full([BLOCK], True, tl.int1)
            total = _clipping_sum(
                grad,
                second,
                second_scales,
                offsets,
                whole,
                constants,
                STATE_STORAGE,
                QUANT_BITS,
                QBLOCK_SECOND,
                FLOAT_MAPS_SECOND,
            )
        else:
            tail = offsets < end
            total = _clipping_sum(
                grad,
                second,
                second_scales,
                offsets,
                tail,
                constants,
                STATE_STORAGE,
                QUANT_BITS,
                QBLOCK_SECOND,
                FLOAT_MAPS_SECOND,
            )
        tl.store(sums_ptr + chunk, total)


def _triton_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.uint8: tl.uint8,
    }[dtype]


class _Bucket:
    """One (device, param dtype, state storage) bucket of a group_scalars: what stays fixed
    between steps.  Quantized moments are held as uint8 codes and bf16 or fp32 scales."""

    def __init__(self, members: list[int], batch: GroupBatch, rule: UpdateRule, state_storage):
        self.members = members
        params = [as_real(batch.params[i]) for i in members]
        states = [batch.states[i] for i in members]
        self.device = params[0].device
        self.param_dtype = params[0].dtype
        self.quantized = state_storage if isinstance(state_storage, QuantFormat) else None
        self.state_storage = torch.uint8 if self.quantized else state_storage
        self.mode = rounding.effective_rounding(rule.rounding, self.param_dtype)
        self.random = rounding.needs_random_bits(rule.rounding, self.param_dtype, state_storage)
        keys, moment_count = state_keys(rule.algorithm, rule.amsgrad, self.quantized, self.mode)
        self.state_tensors = [[as_real(s[key]) for key in keys] for s in states]
        moment_dtype = torch.float32 if self.quantized else state_storage
        forms = [
            addressed_forms(rule.algorithm, rule.amsgrad, self.quantized, self.mode, moment_dtype, p) for p in params
        ]
        check_addressed(params, self.state_tensors, keys, forms, members)
        self.steps = [s["step"] for s in states]
        for p, tensors in zip(params, self.state_tensors):
            if not (p.is_contiguous() and all(t.is_contiguous() for t in tensors)):
                raise _NeedsStaging
        extra, quantized = self.mode in PARAM_EXTRA_KEY, self.quantized is not None
        rows = [
            state_row([t.data_ptr() for t in tensors], moment_count, extra, quantized) for tensors in self.state_tensors
        ]
        self.state_addresses = np.array(rows, dtype=np.int64).reshape(len(members), STATE_COLUMNS)
        self.block, self.num_warps = (QUANTIZED_BLOCK, QUANTIZED_NUM_WARPS) if self.quantized else (BLOCK, NUM_WARPS)
        chunks = chunk_table([p.numel() for p in params], self.block)
        self.chunks = torch.from_numpy(chunks).to(self.device)
        reduced = rule.spec.clips_update or rule.cautious  # a per-tensor reduction before the update
        self.totals = _ChunkTotals(chunks, [p.numel() for p in params], self.device) if reduced else None
        self.products = [s[MU_PRODUCT_KEY] for s in states] if rule.spec.keeps_mu_product else []
        on_host = self.steps[0].device.type == "cpu" and not rule.capturable
        self.counters = HostCounters(states, rule.algorithm) if on_host else None
        self.whole_group = members == list(range(len(batch.params)))
        self.member_set = frozenset(members)
        self.stream_keys: tuple | None = None
        self.moving: np.ndarray | None = None  # the param and grad addresses of the table on the device
        self.aligned = False  # whether every address in that table is a multiple of 16 bytes
        self.no_inf = torch.zeros((), device=self.device)  # found_inf when a scaler gives only grad_scale
        self.constants: tuple | None = None  # the group's constants as last uploaded

    def table(self, batch: GroupBatch) -> torch.Tensor:
        """The address table on the device, uploaded again only when a param or gradient
        address changed (so a CUDA graph replays with no host-to-device copy).  The
        addresses are those the step's guard read and checked
        (:class:`adamkit.guard.StepGuard`)."""
        checked = batch.checked
        if self.whole_group:  # (a complex tensor's address and layout are its real view's)
            param_ptrs, grad_ptrs = checked.param_ptrs, checked.grad_ptrs
            mismatched = bool(checked.mismatched_rows)
        else:
            param_ptrs = [checked.param_ptrs[i] for i in self.members]
            grad_ptrs = [checked.grad_ptrs[i] for i in self.members]
            mismatched = not self.member_set.isdisjoint(checked.mismatched_rows)
        if mismatched:  # a gradient not laid out like its (contiguous) param
            raise _NeedsStaging
        moving = np.array([param_ptrs, grad_ptrs], dtype=np.int64).T
        if self.moving is None or not np.array_equal(moving, self.moving):
            table = np.concatenate([moving, self.state_addresses], axis=1)
            self.aligned = bool((table % 16 == 0).all())  # unused slots hold 0
            self.device_table = torch.from_numpy(table).to(self.device, non_blocking=True)
            self.moving = moving
        return self.device_table

    def step_keys(self, rule: UpdateRule, batch: GroupBatch, counts) -> torch.Tensor | None:
        """Stochastic rounding's keys k_{s,t} and each tensor's element offset, as an
        int64[T, 5] device array; ``counts`` are host step counts (NumPy) or device step
        tensors (never read on the host)."""
        if not self.random:
            return None
        indices = [batch.param_indices[i] for i in self.members]
        offsets = (
            [0] * len(indices) if batch.element_offsets is None else [batch.element_offsets[i] for i in self.members]
        )
        if self.stream_keys is None or self.stream_keys[0] != (rule.seed, indices, offsets):
            keys = rounding.param_stream_keys(rule.seed, indices).astype(np.int64)
            shifts = np.array(offsets, dtype=np.int64)[:, None]
            self.stream_keys = (
                (rule.seed, indices, offsets),
                keys,
                shifts,
                torch.from_numpy(keys).to(self.device),
                torch.from_numpy(shifts).to(self.device),
            )
        _, keys, shifts, device_keys, device_shifts = self.stream_keys
        if isinstance(counts, np.ndarray):
            step_keys = rounding.step_keys(keys, counts[:, None]).astype(np.int64)
            return torch.from_numpy(np.concatenate([step_keys, shifts], axis=1)).to(self.device, non_blocking=True)
        steps = torch.stack(counts).to(self.device, torch.int64)[:, None]
        return torch.cat([storage.mix32(device_keys ^ steps), device_shifts], dim=1)


class _ChunkTotals:
    """Each tensor's sum of its chunks' sums (StableAdamW's clipping sums, cautious
    counts), in a fixed order (so on every run the same bits): the chunk sums are laid
    out as a [tensors, most chunks] matrix whose rows are summed."""

    def __init__(self, chunks: np.ndarray, numels: list[int], device: torch.device):
        tensors = chunks[:, 0]
        count, self.tensors = len(numels), len(numels)
        first_chunk = np.searchsorted(tensors, np.arange(count))
        self.width = max(1, int(np.bincount(tensors, minlength=count).max(initial=0)))
        positions = tensors * self.width + (np.arange(len(chunks)) - first_chunk[tensors])
        self.positions = torch.from_numpy(positions).to(device)
        self.numels = torch.tensor(numels, dtype=torch.float64, device=device)

    def per_tensor(self, chunk_sums: torch.Tensor) -> torch.Tensor:
        padded = chunk_sums.new_zeros(self.tensors * self.width)
        padded[self.positions] = chunk_sums
        return padded.view(self.tensors, self.width).sum(dim=1)


class _NeedsStaging(Exception):
    """A non-contiguous param, gradient or state: this group goes through foreach ops."""


def _buckets(batch: GroupBatch, rule: UpdateRule) -> list[_Bucket]:
    key = (batch.key, rule.algorithm, rule.amsgrad, rule.cautious)
    cached = batch.cache.get("triton")
    if cached is not None and cached[0] == key:
        return cached[1]
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(batch.params):
        by_kind.setdefault((p.device, as_real(p).dtype, moment_storage(batch.states[i], p)), []).append(i)
    buckets = [_Bucket(members, batch, rule, kind[2]) for kind, members in by_kind.items()]
    batch.cache["triton"] = (key, buckets)
    return buckets


def _device_array(value, length: int, device: torch.device) -> torch.Tensor:
    """A float64 device array of ``length`` from a float (filled on the device: no
    host-to-device copy), a 0-d or a [length] tensor."""
    if not isinstance(value, torch.Tensor):
        return torch.full((length,), value, dtype=torch.float64, device=device)
    return value.to(device, torch.float64).expand(length).contiguous()


def _tensor_scalars(bucket: _Bucket, rule: UpdateRule, decay_factor, found_inf) -> tuple[torch.Tensor, object]:
    """Advance the bucket's step counters (and NAdam's products); the tensors'
    :data:`host.TENSOR_SCALARS` as a float64 device array, and the step counts (host
    array, or the device tensors).  Counters on the device (capturable or fused, as
    torch places them) never go through the host (a GradScaler's ``found_inf`` keeps
    the products as they are; the step counts are rolled back after the launch);
    counters on the host are advanced in one compiled pass."""
    if bucket.counters is not None:
        counts, table = bucket.counters.advance(rule, decay_factor)
        return torch.from_numpy(table).to(bucket.device, non_blocking=True), counts
    torch._foreach_add_(bucket.steps, 1)
    count = len(bucket.steps)
    scalars = rule.step_scalars(torch.stack(bucket.steps).to(bucket.device, torch.float64))
    products = None
    if bucket.products:  # mu_product *= mu_t in the product's dtype, as torch's capturable NAdam
        factors = scalars.mu if found_inf is None else torch.where(found_inf.to(bucket.device) != 0, 1.0, scalars.mu)
        factors = factors.to(bucket.products[0].dtype)
        torch._foreach_mul_(bucket.products, list(factors.to(bucket.products[0].device).unbind()))
        products = torch.stack(bucket.products).to(bucket.device, torch.float64)
    columns = tensor_scalar_columns(rule.algorithm, rule.lr, scalars, products, decay_factor, torch.where)
    return torch.stack([_device_array(c, count, bucket.device) for c in columns], dim=1), bucket.steps


def _group_constants(bucket: _Bucket, group_scalars: GroupScalars) -> torch.Tensor:
    """The group's constants (:data:`host.GROUP_CONSTANTS`) as a float64 device array,
    which the kernel rounds to its compute dtype (a Python float argument would reach a
    compiled kernel as fp32).  Floats are uploaded when they change; tensors
    (capturable groups) are combined on the device, never read on the host."""
    values = group_constants(group_scalars)
    if any(isinstance(v, torch.Tensor) for v in values):
        return torch.stack([_device_array(v, 1, bucket.device)[0] for v in values])
    if bucket.constants is None or bucket.constants[0] != values:
        bucket.constants = (values, torch.tensor(values, dtype=torch.float64).to(bucket.device, non_blocking=True))
    return bucket.constants[1]


#: the split master weight's extra bits per rounding mode (0: none)
_MASTER_BITS = {"master": 16, "master24": 8}


def float_maps(fmt: QuantFormat) -> int:
    """The second moments' float maps as one compile-time number: E + 16 F, E the
    exponent bits of the map and F those of the finer map (0: none)."""
    return fmt.exponent_bits + 16 * (fmt.fine_exponent_bits or 0)


def _bucket_options(bucket: _Bucket) -> dict:
    """What every launch over a bucket is compiled for (storage, compute type, the
    second moment's quantization, alignment) and its launch shape."""
    quantized = bucket.quantized
    return {
        "PARAM_STORAGE": _triton_dtype(bucket.param_dtype),
        "STATE_STORAGE": _triton_dtype(bucket.state_storage),
        "COMPUTE": tl.float64 if bucket.param_dtype == torch.float64 else tl.float32,
        "QUANT_BITS": quantized.bits if quantized else 0,
        "QBLOCK_SECOND": quantized.block_of(False) if quantized else 1,
        "EXACT_SECOND": bool(quantized and quantized.exact_scales(False)),
        "FLOAT_MAPS_SECOND": float_maps(quantized) if quantized else 0,
        "ALIGNED": bucket.aligned,
        "BLOCK": bucket.block,
        "num_warps": bucket.num_warps,
        **COMPILE_OPTIONS,
    }


def _clip_update_sizes(bucket: _Bucket, table, tensor_scalars, grad_scale, constants, rule: UpdateRule, shards) -> None:
    """StableAdamW: the clipping pass over every chunk, then each tensor's step size and
    decay factor scaled on the device (:func:`adamkit.kernels.host.clip_update_sizes`)."""
    sums = torch.empty(bucket.chunks.shape[0], dtype=torch.float64, device=bucket.device)
    _clipping_sums[(bucket.chunks.shape[0],)](
        table,
        bucket.chunks,
        tensor_scalars,
        table if grad_scale is None else grad_scale,  # any pointer: read only under AMP
        constants,
        sums,
        AMP=grad_scale is not None,
        **_bucket_options(bucket),
    )
    rate = rule.decay_rate()
    if isinstance(rate, torch.Tensor):
        rate = rate.to(bucket.device, torch.float64)
    totals = _totals(bucket, sums, shards)
    clip_update_sizes(tensor_scalars, totals[:, 0], totals[:, 1].clamp(min=1.0), rate)


def _totals(bucket: _Bucket, chunk_sums: torch.Tensor, shards) -> torch.Tensor:
    """Chunk sums added up per tensor, next to each tensor's size: float64[T, 2] on the
    device, over the ranks that hold a sharded param's other shards."""
    totals = torch.stack([bucket.totals.per_tensor(chunk_sums), bucket.totals.numels], dim=1)
    if shards is not None:  # the whole params' sums and sizes
        totals = per_tensor_totals(totals, [shards[i] for i in bucket.members])
    return totals


def _launch_update(
    bucket: _Bucket,
    rule: UpdateRule,
    decay_kind: int,
    table,
    tensor_scalars,
    keys,
    constants,
    grad_scale,
    found_inf,
    counts=None,
) -> None:
    """The update kernel over one bucket; with ``counts`` (a float64 array, one entry per
    chunk), its agreement pass instead: nothing stored, each chunk's count written."""
    _fused_step[(bucket.chunks.shape[0],)](
        table,
        bucket.chunks,
        tensor_scalars,
        table if grad_scale is None else grad_scale,  # any pointer: read only under AMP
        bucket.no_inf if found_inf is None else found_inf,
        table if keys is None else keys,
        constants,
        table if counts is None else counts,  # any pointer: written only when counting
        FORMS=rule.spec.forms,
        AMSGRAD=rule.amsgrad,
        MAXIMIZE=rule.maximize,
        DECAY=decay_kind,
        AMP=grad_scale is not None,
        KAHAN=bucket.mode == "kahan",
        MASTER=_MASTER_BITS.get(bucket.mode, 0),
        STOCHASTIC=bucket.mode == "stochastic",
        RANDOM=bucket.random,
        QBLOCK=bucket.quantized.block if bucket.quantized else 1,
        CAUTIOUS=rule.cautious and counts is None,
        COUNTING=counts is not None,
        **_bucket_options(bucket),
    )


def _set_cautious_scales(bucket: _Bucket, tensor_scalars, launch, shards) -> None:
    """Cautious updates: the agreement pass (the update kernel with nothing stored,
    counting each chunk's elements whose update agrees in sign with the gradient), then
    each tensor's n / (kept + 1) on the device (:func:`adamkit.kernels.host.set_cautious_scales`)."""
    counts = torch.zeros(bucket.chunks.shape[0], dtype=torch.float64, device=bucket.device)
    launch(counts)
    totals = _totals(bucket, counts, shards)
    set_cautious_scales(tensor_scalars, totals[:, 0], totals[:, 1])


_foreach_step = list_kernel(foreach.ALGORITHMS)


def _foreach_fallback(batch: GroupBatch, rule: UpdateRule) -> None:
    """Layouts the kernel does not take (non-contiguous params, gradients or state) go
    through foreach ops, with the GradScaler's work done here instead of in-kernel and
    the kernel's storage semantics (16-bit values rounded once per update)."""
    if batch.found_inf is not None:
        if batch.found_inf.item():
            return
        batch.grads = unscaled(batch.grads, batch.grad_scale)
    _foreach_step(batch, rule)


def step(batch: GroupBatch, rule: UpdateRule) -> None:
    """Advance the steps and update every tensor of the group_scalars, one launch per bucket.

    A GradScaler's ``found_inf`` is read in the kernel; where the step counters live
    on the host, it is read once on the host instead, before anything moves."""
    try:
        buckets = _buckets(batch, rule)
        tables = [bucket.table(batch) for bucket in buckets]
    except _NeedsStaging:
        _foreach_fallback(batch, rule)
        return
    group_scalars = rule.group_scalars()
    grad_scale, found_inf = batch.grad_scale, batch.found_inf
    amp = grad_scale is not None
    if amp and found_inf is not None and any(b.counters is not None for b in buckets) and found_inf.item():
        return
    for bucket, table in zip(buckets, tables):
        tensor_scalars, counts = _tensor_scalars(bucket, rule, group_scalars.decay_factor, found_inf if amp else None)
        keys = bucket.step_keys(rule, batch, counts)
        constants = _group_constants(bucket, group_scalars)
        if rule.spec.clips_update:
            _clip_update_sizes(
                bucket, table, tensor_scalars, grad_scale if amp else None, constants, rule, batch.shards
            )

        update = functools.partial(
            _launch_update,
            bucket,
            rule,
            group_scalars.decay_kind,
            table,
            tensor_scalars,
            keys,
            constants,
            grad_scale if amp else None,
            found_inf,
        )
        if rule.cautious:
            _set_cautious_scales(bucket, tensor_scalars, update, batch.shards)
        update()
        if amp and found_inf is not None and bucket.counters is None:  # a skipped step does not count
            torch._foreach_sub_(bucket.steps, [found_inf.to(bucket.steps[0].device)] * len(bucket.steps))
