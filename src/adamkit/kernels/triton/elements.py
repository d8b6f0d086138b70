"""The Triton kernel's element math: one chunk's update (specialised at compile time from
the algorithm's forms, :mod:`adamkit.algorithms`, in the CPU kernel's order), the fused
step over a bucket's chunks, and StableAdamW's clipping sums."""

from __future__ import annotations

import triton
import triton.language as tl

from .device import (
    _AVERAGE_AFTER,
    _DECOUPLED_DECAY,
    _INFINITY_NORM,
    _L2_DECAY,
    _NO_DENOMINATOR,
    _NORM,
    _NORMALIZED_CLIPPED,
    _RECTIFIED_ROOT,
    _ROW_LENGTH,
    _TENSOR_SCALAR_COUNT,
    _WEIGHT_SEQUENCE,
    _exact_div,
    _exact_sqrt,
    _first_moment_divisor,
    _load_moment,
    _load_param,
    _put,
    _put_moment,
    _store_param,
)


@triton.jit
def _lerp(start, end, weight):
    """start + weight (end - start) as torch's ``lerp`` (and the CPU kernel) forms it:
    from the nearer end, so that a weight of 1 gives ``end`` exactly."""
    return tl.where(weight < 0.5, start + weight * (end - start), end - (end - start) * (1.0 - weight))


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
    NORMALIZE: tl.constexpr,
    CAUTIOUS: tl.constexpr,
    COUNTING: tl.constexpr,
):
    r"""One chunk's update, elements ``offsets`` where ``mask``:

    .. math::
        m \leftarrow \operatorname{lerp}(m, g, 1-\beta_1), \quad
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
    param, grad, exp_avg, second, max_second, compensation, exp_avg_scales, second_scales, max_second_scales = tensors
    (
        step_size,
        bias_correction2_sqrt,
        gradient_step_size,
        adaptive,
        clip,
        second_weight,
        decay_factor,
        cautious_scale,
        slow_step_size,
        one_minus_beta3,
        average_weight,
        point_step_size,
        point_decay,
        bias_correction2,
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
    COMPUTE: tl.constexpr = step_size.dtype
    FIRST_MOMENT: tl.constexpr = FORMS % 4
    SECOND_MOMENT: tl.constexpr = FORMS // 4 % 4
    DENOMINATOR: tl.constexpr = FORMS // 16 % 4
    NESTEROV: tl.constexpr = FORMS // 64 % 2
    SLOW: tl.constexpr = FORMS // 128  # a slow first moment (AdEMAMix), in the maximum's place
    place = (offsets, mask, shift, first, end)  # where a moment is stored, and its rounding bits
    p = _load_param(param, compensation, offsets, mask, COMPUTE, KAHAN, MASTER)
    g = tl.load(grad + offsets, mask=mask).to(COMPUTE) * gradient_factor  # exact: +-1 or +-1/grad_scale
    if FIRST_MOMENT == _WEIGHT_SEQUENCE:  # schedule-free: z in the first moment's place; its decay at the param
        p = _schedule_free_point(
            p,
            g,
            place,
            exp_avg,
            second,
            second_scales,
            (step_size, average_weight, point_step_size, point_decay, bias_correction2, beta2, one_minus_beta2, eps),
            (key_exp_avg, key_second),
            QUANT_BITS,
            QBLOCK_SECOND,
            EXACT_SECOND,
            FLOAT_MAPS_SECOND,
        )
        total = 0.0
    else:
        if DECAY == _L2_DECAY:
            g = g + l2_weight_decay * p
        if DECAY == _DECOUPLED_DECAY:  # a per-tensor factor (ADOPT's first step: 1; StableAdamW: clipped)
            p = p * decay_factor
        second_value = _load_moment(
            second, second_scales, offsets, mask, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND
        )
        m = _load_moment(exp_avg, exp_avg_scales, offsets, mask, QUANT_BITS, QBLOCK, True, 0)
        if NORMALIZE != 0:  # stored over the divisor of v as stored: multiplied back (fp32)
            m = m * _first_moment_divisor(second_value, NORMALIZE, False)
        m = m.to(COMPUTE)
        if FIRST_MOMENT == _NORMALIZED_CLIPPED:  # m follows g over the previous v's root, clipped to [-c, c]
            root = _exact_sqrt(second_value.to(COMPUTE))
            target = _exact_div(g, tl.where(root < eps, eps, root))
            target = tl.where(target > clip, clip, tl.where(target < -clip, -clip, target))
            m = _lerp(m, target, one_minus_beta1)
        else:
            m = _lerp(m, g, one_minus_beta1)
        if SECOND_MOMENT == _INFINITY_NORM:
            new_second = tl.maximum(
                beta2 * second_value.to(COMPUTE), tl.abs(g) + eps, propagate_nan=tl.PropagateNan.ALL
            )
        elif SECOND_MOMENT == _AVERAGE_AFTER:
            new_second = beta2 * second_value.to(COMPUTE) + second_weight * g * g
        else:
            new_second = beta2 * second_value.to(COMPUTE) + one_minus_beta2 * g * g
        if not COUNTING:  # (the agreement pass stores nothing)
            stored_second = _put_moment(
                second,
                second_scales,
                new_second,
                key_second,
                place,
                QUANT_BITS,
                QBLOCK_SECOND,
                False,
                EXACT_SECOND,
                FLOAT_MAPS_SECOND,
            )
            stored_first = m
            if NORMALIZE != 0:  # over the divisor of v as just stored (fp32)
                stored_first = m.to(tl.float32) * _first_moment_divisor(stored_second, NORMALIZE, True)
            _put_moment(exp_avg, exp_avg_scales, stored_first, key_exp_avg, place, QUANT_BITS, QBLOCK, True, False, 0)
        slow_m = 0.0
        if SLOW:  # AdEMAMix's slow average: a first moment, stored as the first is
            slow_m = _load_moment(max_second, max_second_scales, offsets, mask, QUANT_BITS, QBLOCK, True, 0)
            if NORMALIZE != 0:
                slow_m = slow_m * _first_moment_divisor(second_value, NORMALIZE, False)
            slow_m = slow_m.to(COMPUTE)
            slow_m = _lerp(slow_m, g, one_minus_beta3)
            if not COUNTING:
                stored_slow = slow_m
                if NORMALIZE != 0:
                    stored_slow = slow_m.to(tl.float32) * _first_moment_divisor(stored_second, NORMALIZE, True)
                _put_moment(
                    max_second, max_second_scales, stored_slow, key_max, place, QUANT_BITS, QBLOCK, True, False, 0
                )
        if DENOMINATOR == _NORM:
            denom = new_second
        elif DENOMINATOR == _NO_DENOMINATOR:
            denom = 1.0
        else:
            v = new_second
            if AMSGRAD:
                v_max = _load_moment(
                    max_second, max_second_scales, offsets, mask, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND
                )
                v = tl.maximum(v_max.to(COMPUTE), v, propagate_nan=tl.PropagateNan.ALL)  # (a NaN is kept, as torch's)
                if not COUNTING:  # (the agreement pass stores nothing)
                    _put_moment(
                        max_second,
                        max_second_scales,
                        v,
                        key_max,
                        place,
                        QUANT_BITS,
                        QBLOCK_SECOND,
                        False,
                        EXACT_SECOND,
                        FLOAT_MAPS_SECOND,
                    )
            if DENOMINATOR == _RECTIFIED_ROOT:  # before rectification: momentum SGD, no denominator
                denom = tl.where(adaptive != 0, _exact_sqrt(v) + eps, 1.0)
            else:
                denom = _exact_div(_exact_sqrt(v), bias_correction2_sqrt) + eps
        if NESTEROV:
            update = _exact_div(step_size * m + gradient_step_size * g, denom)
        elif SLOW:
            update = _exact_div(step_size * m + slow_step_size * slow_m, denom)
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
            total = 0.0
    if not COUNTING:
        _store_param(
            param, compensation, offsets, mask, p, key_param, shift, PARAM_STORAGE, COMPUTE, KAHAN, MASTER, STOCHASTIC
        )
    return total


@triton.jit
def _schedule_free_point(
    p,
    g,
    place,
    z_pointer,
    second,
    second_scales,
    scalars,
    keys,
    QUANT_BITS: tl.constexpr,
    QBLOCK_SECOND: tl.constexpr,
    EXACT_SECOND: tl.constexpr,
    FLOAT_MAPS_SECOND: tl.constexpr,
):
    r"""Schedule-free's step at the param :math:`y` (``p``), as the CPU kernel's loop takes it:
    :math:`v \leftarrow \beta_2 v + (1 - \beta_2) g^2`,
    :math:`d = g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda y`,
    :math:`z \leftarrow z - \gamma d` (stored here, stochastically in 16 bits); returns
    :math:`\operatorname{lerp}(y, z, c) + a d` with the old :math:`z` (the lerp as torch
    forms it for one element); ``place`` as :func:`_update_chunk` forms it."""
    offsets, mask, shift, _, _ = place
    step_size, average_weight, point_step_size, point_decay, bias_correction2, beta2, one_minus_beta2, eps = scalars
    key_z, key_second = keys
    COMPUTE: tl.constexpr = step_size.dtype
    z = tl.load(z_pointer + offsets, mask=mask).to(COMPUTE)
    v = _load_moment(second, second_scales, offsets, mask, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND)
    v = beta2 * v.to(COMPUTE) + one_minus_beta2 * g * g
    _put_moment(
        second, second_scales, v, key_second, place, QUANT_BITS, QBLOCK_SECOND, False, EXACT_SECOND, FLOAT_MAPS_SECOND
    )
    d = _exact_div(g, _exact_sqrt(_exact_div(v, bias_correction2)) + eps)
    if point_decay != 0.0:
        d = d + point_decay * p
    y = _lerp(p, z, average_weight)
    _put(z_pointer, offsets, mask, z - step_size * d, key_z, shift, z_pointer.dtype.element_ty, True)
    return y + point_step_size * d


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
    NORMALIZE: tl.constexpr,
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
        if FORMS % 4 == _WEIGHT_SEQUENCE:  # a second weight sequence: fp32 beside an exact value, else the param's
            if KAHAN or MASTER != 0:
                exp_avg = tl.load(row + 2).to(tl.pointer_type(tl.float32))
            else:
                exp_avg = tl.load(row + 2).to(param_pointer)
        else:
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
        if FORMS // 128:  # the three moments' block scales (a slow first moment's: the first's kind)
            scales += (tl.load(row + 8).to(first_scales_pointer),)
        else:
            scales += (tl.load(row + 8).to(scales_pointer),)
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
            tl.load(tensor_row + 9).to(COMPUTE),  # a slow first moment's step size
            tl.load(tensor_row + 10).to(COMPUTE),  # its weight 1 - beta3(t) of g
            tl.load(tensor_row + 11).to(COMPUTE),  # schedule-free's c_{t+1}
            tl.load(tensor_row + 12).to(COMPUTE),  # its step of the param along the direction
            tl.load(tensor_row + 13).to(COMPUTE),  # its weight decay at the param
            tl.load(tensor_row + 7).to(COMPUTE),  # 1 - beta2^t
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
                NORMALIZE,
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
                NORMALIZE,
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
    v = _load_moment(second, second_scales, offsets, mask, QUANT_BITS, QBLOCK_SECOND, False, FLOAT_MAPS_SECOND)
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
            grad, second, second_scales, offsets, whole, constants, QUANT_BITS, QBLOCK_SECOND, FLOAT_MAPS_SECOND
        )
    else:
        tail = offsets < end
        total = _clipping_sum(
            grad, second, second_scales, offsets, tail, constants, QUANT_BITS, QBLOCK_SECOND, FLOAT_MAPS_SECOND
        )
    tl.store(sums_ptr + chunk, total)
