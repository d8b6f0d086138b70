"""The CPU kernel's compiled loops: one element loop per algorithm (specialised from
its forms, :mod:`adamkit.algorithms`), rounding mode and cautious-or-not, the fused
steps over a bucket's chunks (plain and quantized), the pre-passes (StableAdamW's
clipping sums, a cautious update's agreement counts) and the window-by-window step.
Imported only where numba is.

Each parallel loop's body is one call of a chunk function compiled on its own
(:data:`_chunk_function`).  numba compiles a ``prange`` body twice: in the function's
type inference, then again as the gufunc its parfor lowering outlines, where the
functions the body calls are specialized anew.  A body of one call keeps that second
compile to the call; with the element loop inlined into the body, a kernel took 1.3 to
1.5x as long to compile (docs/performance.md, first-step latency)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.core.extending import overload

from ...algorithms import REGISTRY, AlgorithmSpec, Denominator, FirstMoment, FirstMomentScale, SecondMoment
from ...rule import DECOUPLED_DECAY, L2_DECAY
from ...specs.quantization import FORMATS
from .. import compile_cache
from ..host import (
    CAUTIOUS_SCALE_COLUMN,
    DECAY_FACTOR_COLUMN,
    EXACT_MODES,
    STEP_SIZE_COLUMN,
)
from ..intrinsics import (
    first_moment_divisor,
    typed_pointer,
)
from .layout import _ALGORITHM_WITNESS, _QUANTIZED_STORAGE, _ROUNDING_WITNESS, _VARIANT_WITNESS
from .storage import _FLOAT32_WITNESS, _FLOAT64_WITNESS, _STORAGE_POLICIES, _compute, _dequantize, _load, _requantize

compile_cache.install()  # (before the first cached function: stamped with the whole package's source)

#: how a chunk function (and the element loop it calls) is compiled: numpy's error
#: model, as numba's gufuncs have it (IEEE division: no ZeroDivisionError branch in the
#: loop, which LLVM would not vectorize past), the GIL released
_CHUNK_OPTIONS = {"nogil": True, "error_model": "numpy"}
_chunk_function = njit(**_CHUNK_OPTIONS)


@njit(inline="always", nogil=True)
def _maximum(a, b):
    """The larger of a and b as ``torch.maximum`` takes it: a NaN in either is the
    result (Python's ``max`` would keep the other operand)."""
    return a if a > b or a != a else b


def _element_loop(spec: AlgorithmSpec, amsgrad: bool, rounding_mode: str, cautious: bool, counting: bool = False):
    """The element loop of one algorithm and rounding variant.  The algorithm's
    forms (:mod:`adamkit.algorithms`), ``amsgrad`` and the storage functions are
    fixed here, in Python: the variants
    differ in which memory they read and write, and LLVM only vectorizes a loop with
    conditional stores after unswitching it, which it refuses for the larger bf16
    bodies (and code that is never run is then never compiled either).  Decay and
    maximize only select values and stay runtime flags, as does whether the step is
    adaptive (RAdam: rectified; ADOPT: past its first step; one per tensor).
    StableAdamW's loop is Adam's: its clipping is in the per-tensor scalars.  A slow
    first moment (AdEMAMix) is held in the maximum's place and adds its own term to the
    direction's numerator.  Schedule-free's loop holds its second weight sequence z in
    the first moment's place (``exp_avg`` then points at z, in its own dtype), takes its
    weight decay at the param instead of the rounding rule's decay, and moves the param
    to lerp(y, z, c) + a d (the lerp as torch forms it for one element).  The
    forms are taken in the order of :class:`~adamkit.kernels.triton`'s twin.  A
    ``cautious`` loop keeps an element's update u only where u g > 0, as the
    reference does (u [u g > 0] n / (kept + 1): a NaN update stays NaN), and a
    ``counting`` loop is the agreement pass: the same arithmetic, nothing stored, the
    number of elements with u g > 0 returned (:func:`_agreement_counts`)."""
    load_param, put_param, put = _STORAGE_POLICIES[rounding_mode]
    infinity_norm = spec.second_moment == SecondMoment.INFINITY_NORM
    average_after = spec.second_moment == SecondMoment.AVERAGE_AFTER
    rectified = spec.denominator == Denominator.RECTIFIED_ROOT
    reads_previous_second = spec.first_moment == FirstMoment.NORMALIZED_CLIPPED
    nesterov = spec.nesterov
    slow = spec.slow_first_moment
    schedule_free = spec.first_moment == FirstMoment.WEIGHT_SEQUENCE
    first_moment = _adopt_first_moment if reads_previous_second else _adam_first_moment
    if counting:  # nothing is stored
        put_param, put = _put_nothing, _put_nothing_stochastic

    @njit(inline="always", nogil=True)
    def loop(pointers, first, end, scalars, maximize, decay, keys):
        param, grad, exp_avg, second, max_second, compensation = pointers
        one_minus_beta1, beta2, one_minus_beta2, eps, l2, inverse_scale = scalars[0:6]
        step_size, bias_correction2_sqrt, gradient_step_size, adaptive, clip, second_weight = scalars[6:12]
        decay_factor, cautious_scale, slow_step_size, one_minus_beta3 = scalars[12:16]
        average_weight, point_step_size, point_decay, bias_correction2 = scalars[16:20]
        one = _compute(param, 1.0)
        zero = _compute(param, 0.0)
        half = _compute(param, 0.5)
        agree = 0
        for i in range(first, end):
            p = load_param(param, compensation, i)
            g = _load(grad, i) * inverse_scale
            if maximize:
                g = -g
            if schedule_free:  # (its weight decay is at the param: no decay of the rule's)
                z = _compute(param, _load(exp_avg, i))
                v = beta2 * _load(second, i) + one_minus_beta2 * g * g
                put(second, i, v, keys[2], keys[4])
                d = g / (np.sqrt(v / bias_correction2) + eps)
                d = d + point_decay * p if point_decay != zero else d
                y = _lerp(p, z, average_weight, one, half)
                put(exp_avg, i, z - step_size * d, keys[1], keys[4])
                put_param(param, compensation, i, y + point_step_size * d, keys[0], keys[4])
                continue
            if decay == L2_DECAY:
                g = g + l2 * p
            elif decay == DECOUPLED_DECAY:
                p = p * decay_factor
            m = _compute(param, _load(exp_avg, i))
            v = _load(second, i) if reads_previous_second else zero  # (ADOPT: g over the previous v)
            m = first_moment(m, g, v, one_minus_beta1, eps, clip, one, half)
            put(exp_avg, i, m, keys[1], keys[4])
            slow_m = zero
            if slow:  # AdEMAMix's slow average, in the maximum's place
                slow_m = _compute(param, _load(max_second, i))
                slow_m = _lerp(slow_m, g, one_minus_beta3, one, half)
                put(max_second, i, slow_m, keys[3], keys[4])
            if infinity_norm:
                u = _maximum(beta2 * _load(second, i), abs(g) + eps)
                put(second, i, u, keys[2], keys[4])
                denom = u
            elif average_after:
                put(second, i, beta2 * v + second_weight * g * g, keys[2], keys[4])
                denom = one
            else:
                v = beta2 * _load(second, i) + one_minus_beta2 * g * g
                put(second, i, v, keys[2], keys[4])
                if amsgrad:
                    v = _maximum(_load(max_second, i), v)
                    put(max_second, i, v, keys[3], keys[4])
                if rectified:  # before rectification: momentum SGD, no denominator
                    denom = np.sqrt(v) + eps if adaptive else one
                else:
                    denom = np.sqrt(v) / bias_correction2_sqrt + eps
            if nesterov:
                update = (step_size * m + gradient_step_size * g) / denom
            elif slow:
                update = (step_size * m + slow_step_size * slow_m) / denom
            else:
                update = step_size * (m / denom)
            if counting:
                agree += np.int64(update * g > zero)
            elif cautious:
                update = update * (one if update * g > zero else zero) * cautious_scale
            put_param(param, compensation, i, p - update, keys[0], keys[4])
        return agree

    return loop


@njit(inline="always", nogil=True)
def _put_nothing(param, compensation, i, value, key, shift):
    pass


@njit(inline="always", nogil=True)
def _put_nothing_stochastic(pointer, i, value, key, shift):
    pass


@njit(inline="always", nogil=True)
def _lerp(start, end, weight, one, half):
    """start + weight (end - start) as torch's ``lerp`` forms it for one element: from
    the nearer end (end - (end - start)(1 - weight) for a weight of 1/2 or more), so that
    a weight of 1 (beta1 = 0) gives ``end`` exactly; taken from ``start``, m + (g - m)
    would lose every bit of a small g below a large m's last place."""
    return start + weight * (end - start) if weight < half else end - (end - start) * (one - weight)


@njit(inline="always", nogil=True)
def _adam_first_moment(m, g, v, one_minus_beta1, eps, clip, one, half):
    """lerp(m, g, 1 - beta1)."""
    return _lerp(m, g, one_minus_beta1, one, half)


@njit(inline="always", nogil=True)
def _adopt_first_moment(m, g, v, one_minus_beta1, eps, clip, one, half):
    """ADOPT's: m follows g normalized by the previous v, clipped to [-c, c]."""
    root = np.sqrt(v)
    target = g / (eps if root < eps else root)
    if target > clip:
        target = clip
    elif target < -clip:
        target = -clip
    return _lerp(m, target, one_minus_beta1, one, half)


#: (plain, amsgrad) loops per (algorithm, rounding mode, cautious); the AMSGrad loop only
#: where the algorithm has an AMSGrad variant (else ``None``: one loop is compiled, not two)
_LOOPS = {
    (spec.name, mode, cautious): (
        _element_loop(spec, amsgrad=False, rounding_mode=mode, cautious=cautious),
        _element_loop(spec, amsgrad=True, rounding_mode=mode, cautious=cautious) if spec.amsgrad else None,
    )
    for spec in REGISTRY.values()
    if spec.fused
    for mode in _ROUNDING_WITNESS
    for cautious in (False, True)
}
#: the agreement pass's (plain, amsgrad) counting loops per (algorithm, rounding mode)
_COUNTING_LOOPS = {
    (spec.name, mode): (
        _element_loop(spec, amsgrad=False, rounding_mode=mode, cautious=False, counting=True),
        _element_loop(spec, amsgrad=True, rounding_mode=mode, cautious=False, counting=True) if spec.amsgrad else None,
    )
    for spec in REGISTRY.values()
    if spec.fused
    for mode in _ROUNDING_WITNESS
}
_MODE_OF_WITNESS = {
    types.int8: "nearest",
    types.int16: "kahan",
    types.int32: "stochastic",
    types.int64: "master",
    types.uint32: "master24",
}
_ALGORITHM_OF_WITNESS = {(getattr(types, dtype.name), ndim): name for name, (dtype, ndim) in _ALGORITHM_WITNESS.items()}


def _algorithm_of(algorithm_witness) -> str:
    """The name of the algorithm a witness type names (a compile-time lookup)."""
    return _ALGORITHM_OF_WITNESS[algorithm_witness.dtype, algorithm_witness.ndim]


def _spec_of(algorithm_witness) -> AlgorithmSpec:
    """The declaration of the algorithm a witness type names (a compile-time lookup)."""
    return REGISTRY[_algorithm_of(algorithm_witness)]


#: (cautious, keeps AMSGrad's maximum) per variant witness type
_VARIANT_OF_WITNESS = {getattr(types, np.dtype(witness).name): variant for variant, witness in _VARIANT_WITNESS.items()}
_FORMAT_OF_WITNESS = {
    getattr(types, np.dtype(witness).name): FORMATS[name] for name, witness in _QUANTIZED_STORAGE.items()
}


def _normalizes(sw, aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_normalizes, inline="always")
def _normalizes_impl(sw, aw):
    """Whether the format (``sw``) normalizes the algorithm's (``aw``) first moment: a constant."""
    fmt = _FORMAT_OF_WITNESS[sw.dtype]
    scale = _spec_of(aw).first_moment_scale
    answer = fmt.normalized_first_moment and scale != FirstMomentScale.NONE
    return lambda sw, aw: answer


def _first_pointer(address, pw, sw, rw, aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_first_pointer, inline="always")
def _first_pointer_impl(address, pw, sw, rw, aw):
    """The first moment's place as a typed pointer: the moments' storage (``sw``), or
    a second weight sequence's dtype (:func:`adamkit.kernels.host.weight_copy_dtype`:
    fp32 beside a Kahan compensation or a split master, else the param's, ``pw``)."""
    if _spec_of(aw).weight_copy is None:
        return lambda address, pw, sw, rw, aw: typed_pointer(address, sw)
    if _MODE_OF_WITNESS[rw.dtype] in EXACT_MODES:
        return lambda address, pw, sw, rw, aw: typed_pointer(address, _FLOAT32_WITNESS)
    return lambda address, pw, sw, rw, aw: typed_pointer(address, pw)


def _span_first_pointer(address, base, pw, sw, rw, aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_span_first_pointer, inline="always")
def _span_first_pointer_impl(address, base, pw, sw, rw, aw):
    """A quantized span's first place: the decoded first moment in the scratch at
    ``base``, or a second weight sequence where it is (never quantized)."""
    if _spec_of(aw).weight_copy is None:
        return lambda address, base, pw, sw, rw, aw: typed_pointer(base, _FLOAT32_WITNESS)
    return lambda address, base, pw, sw, rw, aw: _first_pointer(address, pw, sw, rw, aw)


def _holds_copy(aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_holds_copy, inline="always")
def _holds_copy_impl(aw):
    """Whether the algorithm (``aw``) holds a second weight sequence in the first moment's place: a constant."""
    answer = _spec_of(aw).weight_copy is not None
    return lambda aw: answer


def _holds_slow(aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_holds_slow, inline="always")
def _holds_slow_impl(aw):
    """Whether the algorithm (``aw``) keeps a slow first moment in the maximum's place: a constant."""
    answer = _spec_of(aw).slow_first_moment
    return lambda aw: answer


def _update_chunk(
    pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw
):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_update_chunk, jit_options=_CHUNK_OPTIONS)
def _update_chunk_impl(
    pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw
):
    """The one loop a specialization runs, compiled alone (called, not inlined: numba
    compiles an overload's implementation once to type it, and inlining compiled it a
    second time): the algorithm's, the rounding mode's, and cautious or not and keeping
    AMSGrad's maximum or not, as the variant witness (``cw``) says."""
    algorithm = _algorithm_of(algorithm_witness)
    cautious, keeps_maximum = _VARIANT_OF_WITNESS[cw.dtype]
    plain_loop, amsgrad_loop = _LOOPS[algorithm, _MODE_OF_WITNESS[rounding_witness.dtype], cautious]
    loop = amsgrad_loop if keeps_maximum else plain_loop

    def update(pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw):
        loop(pointers, first, end, scalars, maximize, decay, keys)

    return update


@njit(parallel=True, cache=True, nogil=True)
def _fused_step(
    addresses,
    chunks,
    tensor_scalars,
    constants,
    flags,
    keys,
    param_witness,
    state_witness,
    rounding_witness,
    algorithm_witness,
    variant_witness,
):
    """The update for every chunk of every tensor of one (param dtype, state dtype) bucket.

    addresses: int64[T, 9] param, grad, exp_avg, exp_avg_sq (or exp_inf),
        max_exp_avg_sq, Kahan compensation, and for quantized states the three
        moments' block scales (the moment columns then hold their codes)
    chunks: int64[C, 3] tensor index, first element, end element
    tensor_scalars: float64[T, 8] each tensor's :data:`host.TENSOR_SCALARS`
    constants: float64[6] the group's constants (:data:`host.GROUP_CONSTANTS`), then
        the gradients' multiplier (a GradScaler's 1 / scale, else 1)
    flags: int64[3] maximize, amsgrad, weight decay kind
    keys: int64[T, 5] stochastic rounding's step keys (param, exp_avg, second, max)
        and the tensor's element offset (a shard's first index in its whole param)
    witnesses: the param and state storage types (a quantized format: int8 for
        "int8", uint8 for "int4"); the rounding mode, the algorithm, and whether the
        update is cautious and keeps AMSGrad's maximum (their dtypes)
    """
    maximize, amsgrad, decay = flags[0] != 0, flags[1] != 0, flags[2]
    witnesses = (param_witness, state_witness, rounding_witness, algorithm_witness, variant_witness)
    for c in prange(chunks.shape[0]):
        t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _fused_chunk(addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, keys, *witnesses)


@_chunk_function
def _fused_chunk(
    addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, keys, pw, sw, rw, aw, cw
):
    """Elements [first, end) of tensor ``t``: a chunk of :func:`_fused_step`."""
    scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, pw)
    pointers = (
        typed_pointer(addresses[t, 0], pw),
        typed_pointer(addresses[t, 1], pw),
        _first_pointer(addresses[t, 2], pw, sw, rw, aw),
        typed_pointer(addresses[t, 3], sw),
        typed_pointer(addresses[t, 4], sw),
        typed_pointer(addresses[t, 5], pw),
    )
    _update_chunk(pointers, first, end, scalars, maximize, decay, _chunk_keys(keys, t), amsgrad, aw, rw, cw)


@njit(parallel=True, cache=True, nogil=True)
def _fused_quantized_step(
    addresses,
    chunks,
    tensor_scalars,
    constants,
    flags,
    keys,
    param_witness,
    state_witness,
    rounding_witness,
    algorithm_witness,
    variant_witness,
):
    """:func:`_fused_step` for quantized states (``state_witness`` names the format)."""
    maximize, amsgrad, decay = flags[0] != 0, flags[1] != 0, flags[2]
    witnesses = (param_witness, state_witness, rounding_witness, algorithm_witness, variant_witness)
    for c in prange(chunks.shape[0]):
        t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _fused_quantized_chunk(
            addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, keys, *witnesses
        )


@_chunk_function
def _fused_quantized_chunk(
    addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, keys, pw, sw, rw, aw, cw
):
    """Elements [first, end) of tensor ``t``: a chunk of :func:`_fused_quantized_step`."""
    scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, pw)
    _quantized_chunk(
        addresses[t], first, end, scalars, maximize, decay, _chunk_keys(keys, t), amsgrad, pw, sw, rw, aw, cw
    )


@njit(inline="always", nogil=True)
def _chunk_scalars(addresses, t, tensor_scalars, constants, param_witness):
    """Tensor ``t``'s scalars in its compute type: the group's constants, the
    gradients' multiplier, then the tensor's own (``adaptive`` a bool), in
    :data:`~adamkit.kernels.host.TENSOR_SCALARS` order but for 1 - beta2^t, last (read
    by schedule-free's loop; StableAdamW's clipping pass reads its column)."""
    param = typed_pointer(addresses[t, 0], param_witness)
    return (
        _compute(param, constants[0]),
        _compute(param, constants[1]),
        _compute(param, constants[2]),
        _compute(param, constants[3]),
        _compute(param, constants[4]),
        _compute(param, constants[5]),
        _compute(param, tensor_scalars[t, 0]),
        _compute(param, tensor_scalars[t, 1]),
        _compute(param, tensor_scalars[t, 2]),
        tensor_scalars[t, 3] != 0,
        _compute(param, tensor_scalars[t, 4]),
        _compute(param, tensor_scalars[t, 5]),
        _compute(param, tensor_scalars[t, 6]),
        _compute(param, tensor_scalars[t, 8]),
        _compute(param, tensor_scalars[t, 9]),
        _compute(param, tensor_scalars[t, 10]),
        _compute(param, tensor_scalars[t, 11]),
        _compute(param, tensor_scalars[t, 12]),
        _compute(param, tensor_scalars[t, 13]),
        _compute(param, tensor_scalars[t, 7]),
    )


@njit(inline="always", nogil=True)
def _chunk_keys(keys, t):
    """Tensor ``t``'s stochastic-rounding keys and element offset (one dummy row when unused)."""
    row = t if keys.shape[0] > 1 else 0
    return (keys[row, 0], keys[row, 1], keys[row, 2], keys[row, 3], keys[row, 4])


#: elements per scratch pass of a quantized chunk: the fp32 scratch (3 rows) stays
#: in cache and below malloc's mmap threshold (a fresh mapping per chunk would fault)
QUANTIZED_SPAN = 4096


def _scale_first_moment(scratch, second, count, sw, aw, divide):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_scale_first_moment, inline="always")
def _scale_first_moment_impl(scratch, second, count, sw, aw, divide):
    """Where the format normalizes the algorithm's first moments: the first ``count``
    values of scratch row 0 (m, and row 2: a slow first moment's) multiplied by the
    factor r that stores them (``divide``)
    or by the divisor d that reads them back, d near sqrt(v) (AdaMax: near v) of
    ``second`` (v as stored, see
    :func:`adamkit.specs.quantization.first_moment_divisor`); else nothing."""
    fmt = _FORMAT_OF_WITNESS[sw.dtype]
    scale = _spec_of(aw).first_moment_scale
    if not fmt.normalized_first_moment or scale == FirstMomentScale.NONE:
        return lambda scratch, second, count, sw, aw, divide: None
    root = scale == FirstMomentScale.ROOT
    divisor, reciprocal = first_moment_divisor(root, False), first_moment_divisor(root, True)
    slow = _spec_of(aw).slow_first_moment

    def apply(scratch, second, count, sw, aw, divide):
        first, third = scratch[0], scratch[2]
        if divide:  # stored as fl(m r)
            for j in range(count):
                first[j] = first[j] * reciprocal(second[j])
            if slow:
                for j in range(count):
                    third[j] = third[j] * reciprocal(second[j])
        else:
            for j in range(count):
                first[j] = first[j] * divisor(second[j])
            if slow:
                for j in range(count):
                    third[j] = third[j] * divisor(second[j])

    return apply


@njit(inline="always", nogil=True)
def _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw, rw, aw):
    """Decode elements [low, high) of a row's quantized moments into the fp32
    ``scratch`` rows (m, v, and v's maximum under AMSGrad or a slow first moment;
    normalized first moments multiplied back by v's divisor); the element loop's
    pointers, with the moments addressed in the scratch by element index."""
    signed, unsigned = np.empty(0, dtype=np.int8), np.empty(0, dtype=np.uint8)
    slow, copy = _holds_slow(aw), _holds_copy(aw)
    if not copy:  # (a second weight sequence is addressed where it is)
        _dequantize(row[2], row[6], sw, signed, scratch[0], low, high, spread)
    _dequantize(row[3], row[7], sw, unsigned, scratch[1], low, high, spread)
    if amsgrad:
        _dequantize(row[4], row[8], sw, unsigned, scratch[2], low, high, spread)
    elif slow:
        _dequantize(row[4], row[8], sw, signed, scratch[2], low, high, spread)
    _scale_first_moment(scratch, scratch[1], high - low, sw, aw, False)
    base = np.int64(scratch.ctypes.data) - 4 * low
    stride = 4 * QUANTIZED_SPAN
    return (
        typed_pointer(row[0], pw),
        typed_pointer(row[1], pw),
        _span_first_pointer(row[2], base, pw, sw, rw, aw),
        typed_pointer(base + stride, _FLOAT32_WITNESS),
        typed_pointer(base + (2 * stride if amsgrad or slow else stride), _FLOAT32_WITNESS),
        typed_pointer(row[5], pw),
    )


@njit(inline="always", nogil=True)
def _quantized_chunk(row, first, end, scalars, maximize, decay, keys, amsgrad, pw, sw, rw, aw, cw):
    """One chunk (it starts on a block boundary) with quantized moments, span by
    span: dequantize into fp32 scratch rows, run the plain element loop on those,
    quantize the new values (the update itself used them unrounded): the second
    moment first, so that normalized first moments are divided by the divisor of v as
    stored (which quantizing writes to a row of its own)."""
    scratch = np.empty((3, QUANTIZED_SPAN), dtype=np.float32)
    spread = np.empty(QUANTIZED_SPAN + 2, dtype=np.uint8)  # int4 codes, one a byte
    signed, unsigned = np.empty(0, dtype=np.int8), np.empty(0, dtype=np.uint8)
    normalizes, slow, copy = _normalizes(sw, aw), _holds_slow(aw), _holds_copy(aw)
    as_stored = np.empty(QUANTIZED_SPAN if normalizes else 0, dtype=np.float32)  # v as stored: m's divisor
    nothing = np.empty(0, dtype=np.float32)
    for low in range(first, end, QUANTIZED_SPAN):
        high = min(low + QUANTIZED_SPAN, end)
        pointers = _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw, rw, aw)
        _update_chunk(pointers, low, high, scalars, maximize, decay, keys, amsgrad, aw, rw, cw)
        _requantize(row[3], row[7], sw, unsigned, scratch[1], low, high, keys[2], keys[4], spread, as_stored)
        _scale_first_moment(scratch, as_stored, high - low, sw, aw, True)
        if not copy:  # (a second weight sequence was stored by the loop itself)
            _requantize(row[2], row[6], sw, signed, scratch[0], low, high, keys[1], keys[4], spread, nothing)
        if amsgrad:
            _requantize(row[4], row[8], sw, unsigned, scratch[2], low, high, keys[3], keys[4], spread, nothing)
        elif slow:
            _requantize(row[4], row[8], sw, signed, scratch[2], low, high, keys[3], keys[4], spread, nothing)


#: elements per step of the clipping pass: their terms (float64) stay in L1
CLIPPING_SPAN = 2048


@njit(nogil=True, fastmath={"reassoc"})
def _sum(values, count):
    """The sum of values[:count] in whatever order LLVM vectorizes it: "reassoc" is
    the only liberty, and its flags stay on this function's additions (the terms
    themselves are computed without it)."""
    total = 0.0
    for i in range(count):
        total += values[i]
    return total


@njit(inline="always", nogil=True)
def _clipping_sum(grad, second, first, end, tensor_scalars, constants, t):
    """The float64 sum over elements [first, end) of tensor ``t`` of
    g^2 / max(v / (1 - beta2^t), eps^2), v the second moment the update is about to
    compute (Adam's, before any rounding), each term in the param's compute type
    (NaN stays NaN), span by span: a vectorized loop writes the terms, :func:`_sum`
    adds them."""
    beta2, one_minus_beta2 = _compute(grad, constants[1]), _compute(grad, constants[2])
    eps_squared, inverse_scale = _compute(grad, constants[3] * constants[3]), _compute(grad, constants[5])
    bias_correction2 = _compute(grad, tensor_scalars[t, 7])
    terms = np.empty(CLIPPING_SPAN, dtype=np.float64)
    total = 0.0
    for low in range(first, end, CLIPPING_SPAN):
        high = min(low + CLIPPING_SPAN, end)
        out = typed_pointer(np.int64(terms.ctypes.data) - 8 * low, _FLOAT64_WITNESS)  # by element index
        for i in range(low, high):
            g = _load(grad, i) * inverse_scale
            v_hat = (beta2 * _load(second, i) + one_minus_beta2 * g * g) / bias_correction2
            out[i] = np.float64(g * g / (eps_squared if v_hat < eps_squared else v_hat))
        total += _sum(terms, high - low)
    return total


@njit(parallel=True, cache=True, nogil=True)
def _clipping_sums(addresses, chunks, tensor_scalars, constants, param_witness, state_witness):
    """StableAdamW's clipping pass: :func:`_clipping_sum` of every chunk (float64[C])."""
    sums = np.empty(chunks.shape[0], dtype=np.float64)
    for c in prange(chunks.shape[0]):
        t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        grad = typed_pointer(addresses[t, 1], param_witness)
        second = typed_pointer(addresses[t, 3], state_witness)
        sums[c] = _clipping_sum(grad, second, first, end, tensor_scalars, constants, t)
    return sums


@njit(parallel=True, cache=True, nogil=True)
def _quantized_clipping_sums(addresses, chunks, tensor_scalars, constants, param_witness, state_witness):
    """:func:`_clipping_sums` for quantized states: each span's second moment decoded
    into an fp32 scratch row first."""
    sums = np.empty(chunks.shape[0], dtype=np.float64)
    for c in prange(chunks.shape[0]):
        t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        scratch = np.empty(QUANTIZED_SPAN, dtype=np.float32)
        spread = np.empty(QUANTIZED_SPAN + 2, dtype=np.uint8)
        unsigned = np.empty(0, dtype=np.uint8)
        grad = typed_pointer(addresses[t, 1], param_witness)
        total = 0.0
        for low in range(first, end, QUANTIZED_SPAN):
            high = min(low + QUANTIZED_SPAN, end)
            _dequantize(addresses[t, 3], addresses[t, 7], state_witness, unsigned, scratch, low, high, spread)
            second = typed_pointer(np.int64(scratch.ctypes.data) - 4 * low, _FLOAT32_WITNESS)
            total += _clipping_sum(grad, second, low, high, tensor_scalars, constants, t)
        sums[c] = total
    return sums


@njit(parallel=True, cache=True, nogil=True)
def _agreement_counts(addresses, chunks, tensor_scalars, constants, flags, pw, sw, rw, aw):
    """The cautious pass: per chunk, how many elements' update u agrees in sign with
    the gradient (u g > 0), computed by the element loop itself with nothing stored
    (float64[C]; quantized moments decoded span by span)."""
    maximize, amsgrad, decay = flags[0] != 0, flags[1] != 0, flags[2]
    counts = np.empty(chunks.shape[0], dtype=np.float64)
    for c in prange(chunks.shape[0]):
        t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        counts[c] = _agreement_count(
            addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, pw, sw, rw, aw
        )
    return counts


@_chunk_function
def _agreement_count(addresses, t, first, end, tensor_scalars, constants, maximize, amsgrad, decay, pw, sw, rw, aw):
    """Elements [first, end) of tensor ``t``: a chunk of :func:`_agreement_counts`."""
    scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, pw)
    return np.float64(_chunk_agreement(addresses[t], first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw))


def _chunk_agreement(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_chunk_agreement, jit_options=_CHUNK_OPTIONS)
def _chunk_agreement_impl(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
    plain_loop, amsgrad_loop = _COUNTING_LOOPS[_algorithm_of(aw), _MODE_OF_WITNESS[rw.dtype]]

    def count(pointers, first, end, scalars, maximize, decay, amsgrad):
        if amsgrad_loop is not None and amsgrad:
            return amsgrad_loop(pointers, first, end, scalars, maximize, decay, _NO_STREAM)
        return plain_loop(pointers, first, end, scalars, maximize, decay, _NO_STREAM)

    count = njit(inline="always", nogil=True)(count)
    if sw.dtype in (types.int8, types.uint8):  # quantized: the moments decoded first

        def quantized(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
            scratch = np.empty((3, QUANTIZED_SPAN), dtype=np.float32)
            spread = np.empty(QUANTIZED_SPAN + 2, dtype=np.uint8)
            agree = 0
            for low in range(first, end, QUANTIZED_SPAN):
                high = min(low + QUANTIZED_SPAN, end)
                pointers = _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw, rw, aw)
                agree += count(pointers, low, high, scalars, maximize, decay, amsgrad)
            return agree

        return quantized

    def plain(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
        pointers = (
            typed_pointer(row[0], pw),
            typed_pointer(row[1], pw),
            typed_pointer(row[2], sw),
            typed_pointer(row[3], sw),
            typed_pointer(row[4], sw),
            typed_pointer(row[5], pw),
        )
        return count(pointers, first, end, scalars, maximize, decay, amsgrad)

    return plain


#: the keys argument of a counting loop (its stores, and so its random bits, never happen)
_NO_STREAM = (np.int64(0), np.int64(0), np.int64(0), np.int64(0), np.int64(0))


@njit(inline="always", nogil=True)
def _window_totals(chunks, values, first_tensor, end_tensor):
    """``values`` of a window's chunks added up per tensor, in chunk order."""
    totals = np.zeros(end_tensor - first_tensor, dtype=np.float64)
    for c in range(chunks.shape[0]):
        totals[chunks[c, 0] - first_tensor] += values[c]
    return totals


def _clip_window(addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_clip_window, inline="always")
def _clip_window_impl(addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw):
    """StableAdamW's clipping of tensors [first, end), as
    :func:`~adamkit.kernels.host.clip_update_sizes` computes it (nothing for the
    other algorithms: the choice is made when compiling)."""
    if not _spec_of(aw).clips_update:
        return lambda addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw: None
    clipping_sums = _quantized_clipping_sums if sw.dtype in (types.int8, types.uint8) else _clipping_sums

    def clip(addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw):
        sums = _window_totals(window, clipping_sums(addresses, window, tensor_scalars, constants, pw, sw), first, end)
        for t in range(first, end):
            rms = np.sqrt(sums[t - first] / max(numels[t], 1.0))
            scale = 1.0 / (rms if rms > 1.0 else 1.0)
            tensor_scalars[t, STEP_SIZE_COLUMN] *= scale
            if not np.isnan(decay_rate):
                tensor_scalars[t, DECAY_FACTOR_COLUMN] = 1.0 - scale * decay_rate

    return clip


def _caution_window(addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_caution_window, inline="always")
def _caution_window_impl(addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw):
    """A cautious update's scale n / (kept + 1) for tensors [first, end), as
    :func:`~adamkit.kernels.host.set_cautious_scales` computes it (nothing when the
    update is not cautious)."""
    if not _VARIANT_OF_WITNESS[cw.dtype][0]:
        return lambda addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw: None

    def caution(addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw):
        counts = _agreement_counts(addresses, window, tensor_scalars, constants, flags, pw, sw, rw, aw)
        kept = _window_totals(window, counts, first, end)
        for t in range(first, end):
            tensor_scalars[t, CAUTIOUS_SCALE_COLUMN] = numels[t] / (kept[t - first] + 1.0)

    return caution


def _update_window(addresses, window, tensor_scalars, constants, flags, keys, pw, sw, rw, aw, cw):
    raise NotImplementedError  # pragma: no cover - replaced by the overload


@overload(_update_window, inline="always")
def _update_window_impl(addresses, window, tensor_scalars, constants, flags, keys, pw, sw, rw, aw, cw):
    """The update of a window's chunks (:func:`_fused_step`, or its quantized form)."""
    update = _fused_quantized_step if sw.dtype in (types.int8, types.uint8) else _fused_step
    return lambda addresses, window, tensor_scalars, constants, flags, keys, pw, sw, rw, aw, cw: update(
        addresses, window, tensor_scalars, constants, flags, keys, pw, sw, rw, aw, cw
    )


@njit(cache=True, nogil=True)
def _windowed_step(
    addresses, chunks, windows, tensor_scalars, constants, flags, keys, numels, decay_rate, pw, sw, rw, aw, cw
):
    """A bucket whose tensors need a pass before their update (StableAdamW's
    clipping, a cautious update's count of agreeing elements), window by window:
    each window's pre-pass, its tensors' scalars, then its update, while what the
    pre-pass read is still in cache.

    windows: int64[W, 4] first chunk, end chunk, first tensor, end tensor
    numels: float64[T] each tensor's real elements; decay_rate: eta * lambda, NaN
    without decoupled decay; the rest (witnesses abbreviated) as :func:`_fused_step`
    takes them."""
    for w in range(windows.shape[0]):
        first, end = windows[w, 2], windows[w, 3]
        window = chunks[windows[w, 0] : windows[w, 1]]
        _clip_window(addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw)
        _caution_window(addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw)
        _update_window(addresses, window, tensor_scalars, constants, flags, keys, pw, sw, rw, aw, cw)
