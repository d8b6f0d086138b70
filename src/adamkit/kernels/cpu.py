r"""Fused multi-tensor CPU kernel (numba): one pass over each element, one parallel
region per param group and step.

Per element, in fp32 (fp64 for fp64 params; bf16 and fp16 are loaded to fp32 and
stored back with round-to-nearest-even):

.. math::

    g &\leftarrow g \cdot s^{-1} \text{ (a GradScaler's scale)}; \quad
    g \leftarrow -g \text{ if maximize}; \quad
        g \leftarrow g + \lambda\theta \text{ (L2)} \ \text{or}\
        \theta \leftarrow \theta \cdot \text{decay\_factor} \\
    m &\leftarrow m + (1 - \beta_1)(g - m) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \ \text{(Adam)}, \qquad
    u \leftarrow \max(\beta_2 u, |g| + \epsilon) \ \text{(AdaMax)} \\
    \theta &\leftarrow \theta - \text{step\_size} \cdot m /
        (\sqrt{\max(v^{max}, v)} / \text{bias\_correction2\_sqrt} + \epsilon)
        \ \text{or}\ m / u

and NAdam's, RAdam's and ADOPT's updates in the form :mod:`adamkit.kernels.host`
writes for the whole family (per-tensor scalars; the algorithm is a compile-time choice).

Storage (:mod:`adamkit.specs.rounding`): states may have their own dtype
(``state_precision``); a bf16/fp16 param is stored to nearest, with a Kahan
compensation (:math:`\theta = p + c`, :math:`p = rn(\theta')`,
:math:`c = rn(\theta' - p)`) or stochastically; 16-bit and quantized moments are
always stored stochastically, with the counter-based random bits of the
specification (so results equal the other backends' bit for bit).

How many tensors a group has barely matters: the kernel gets a table of raw
addresses (param, grad, exp_avg, second moment, max second moment, compensation) and a table of
chunks of at most :data:`CHUNK` elements, and runs one ``prange`` over the chunks,
so small tensors share threads and large ones are split.  StableAdamW's clipping and a
cautious update's count need a pass over each whole tensor before it moves: those buckets
are stepped window by window (:data:`PRE_PASS_WINDOW`), each window's pre-pass then its
update, so that the update re-reads the gradient and moments from cache.  The step counters are
advanced by a small compiled loop over their addresses, and the per-tensor scalars
come from :class:`adamkit.rule.UpdateRule`, computed once per distinct step count.
The state's addresses are cached per group, keyed on the optimizer's state epoch
(:mod:`adamkit.statekeeping`: every state tensor addressed is issued memory that no user
action can free or move while the table holds it); the param and gradient addresses come,
at every step, from the step's guard (:mod:`adamkit.guard`), which has checked them.

Params whose memory is not dense in the same layout as their gradient and state (a
sliced view, say) are staged through contiguous copies, so nothing outside a view
is ever written.  Compiled code is cached on disk (numba's ``cache=True``).

Quantized states are stepped span by span (:data:`QUANTIZED_SPAN` elements): their
codes decoded into fp32 scratch rows, the element loop run on those, the new values
encoded.  Every one of those loops vectorizes: levels are computed from codes (the
spec's fp32 products; no table gathers), codes are computed in fp32 and 32-bit integer
IR (numba widens integer arithmetic to int64, and AVX2 can neither multiply nor
convert int64 vectors), a block's absmax is an int32 max over bit patterns, and int4
codes are spread one to a byte and paired in passes of their own.  What LLVM emitted
was read with ``benchmarks/kernel_asm.py`` (numba's ``inspect_asm``) on this
project's AVX2 machines (AMD EPYC, no AVX-512): the float arithmetic of the int8,
int4 and 24-bit-master specializations is packed in 256-bit ``ymm`` registers (92-96
packed instructions beside the scalar remainder loops), the hash's multiplies are
``vpmulld ymm``, and there are no gathers.  Where the CPU has AVX-512, LLVM picks the
width; the loops have nothing width-specific.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from ..algorithms import REGISTRY, AlgorithmSpec, Denominator, FirstMoment, SecondMoment, lookup
from ..guard import is_dense
from ..rule import DECOUPLED_DECAY, L2_DECAY, GroupScalars, UpdateRule, as_number
from ..sharding import per_tensor_totals
from ..specs import quantization, rounding
from ..specs.quantization import QuantFormat
from ..state import PARAM_EXTRA_KEY, moment_storage
from .amp import inverse_scale
from .host import (
    CAUTIOUS_SCALE_COLUMN,
    COLUMNS,
    DECAY_FACTOR_COLUMN,
    STATE_COLUMNS,
    STEP_SIZE_COLUMN,
    HostCounters,
    addressed_forms,
    check_addressed,
    chunk_table,
    clip_update_sizes,
    group_constants,
    set_cautious_scales,
    state_keys,
    state_row,
)
from .types import GroupBatch, as_real

try:  # numba is a dependency, but the rest of adamkit works without it
    import numba
    from numba import njit, prange, types
    from numba.core.extending import overload

    from .intrinsics import (
        as_bytes,
        bfloat16_to_float,
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
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

#: elements per parallel work item: large enough to amortise the loop set-up,
#: small enough to balance two to a few dozen threads
CHUNK = 1 << 15

#: elements per pre-pass window: StableAdamW's clipping and a cautious update need a
#: pass over each tensor before its update, so a bucket with one of them is stepped
#: window by window (whole tensors, at least this many elements unless the bucket ends),
#: its pre-pass then its update, while the gradient and moments the pre-pass read
#: (8-12 bytes an element in fp32, 8-12 MB a window) are still in the last-level cache
PRE_PASS_WINDOW = 1 << 20


#: storage "witness" dtypes: what the kernel loads and stores for each param dtype.
#: bf16 and fp16 travel as their 16-bit patterns (uint16 and int16 respectively).
_STORAGE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
}

#: quantized-state formats as state witnesses (the codes are bytes either way)
_QUANTIZED_STORAGE = {"int8": np.int8, "int4": np.uint8}

#: the algorithm travels as a witness type too, by its code (:attr:`AlgorithmSpec.code`)
_ALGORITHM_WITNESS = {
    name: (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)[spec.code]
    for name, spec in REGISTRY.items()
}

#: whether the update is cautious, as a witness type
_CAUTIOUS_WITNESS = {False: np.int8, True: np.uint8}

#: the rounding mode travels as a witness type, so each mode is its own specialization
_ROUNDING_WITNESS = {
    "nearest": np.int8,
    "kahan": np.int16,
    "stochastic": np.int32,
    "master": np.int64,
    "master24": np.uint32,
}


def available() -> bool:
    return numba is not None and not _forked_from_gnu_openmp


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process, if it cannot."""
    if numba is None:
        return "numba is not installed"
    if _forked_from_gnu_openmp:
        return (
            "this process was forked from one whose numba thread pool had run (GNU OpenMP, numba's "
            "'omp' threading layer, cannot run parallel code in a forked child: the process would be killed). "
            "Start workers with multiprocessing's 'spawn' or 'forkserver' method, or set "
            "NUMBA_THREADING_LAYER=workqueue (or tbb, after pip install tbb) before the parent's first step"
        )
    return None


#: whether this process was forked after numba's GNU OpenMP thread pool had started
_forked_from_gnu_openmp = False


@contextmanager
def fork_safe_threads() -> Iterator[None]:
    """Where this process was forked after numba's GNU OpenMP pool had run, no parallel
    region can start here (numba's would kill the process, torch's hang): run what is
    inside on one torch thread (the fused kernel is then unavailable: see
    :func:`unavailable_reason`), and leave the setting as it was."""
    if not _forked_from_gnu_openmp:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _note_fork() -> None:
    """In a forked child: remember whether the parent's numba pool was GNU OpenMP."""
    global _forked_from_gnu_openmp
    if numba is None or not sys.platform.startswith("linux"):
        return
    try:
        layer = numba.threading_layer()
    except ValueError:  # the pool never started: the child may start its own
        return
    _forked_from_gnu_openmp = layer == "omp"


os.register_at_fork(after_in_child=_note_fork)


def _settle_torch_vector_math() -> None:
    """Make torch's first call of its MKL vector-math functions (sqrt, exp, log on fp32
    and fp64) here, on one thread, on a few elements.

    In a process where numba's OpenMP pool has run, torch's *first* such call made on two
    threads at once (a tensor of 4,096 elements or more) can compute the second thread's
    half one ulp differently from every later call: 1 to 5 fresh processes in 15 did, for
    each function (issue 35: the single-tensor backend's ``sqrt(v)`` made a bf16 param's
    master weight differ from the fp32 run's).  After one call made on one thread, none
    of 90 did; ``tests/test_determinism.py`` checks it in 20 fresh processes."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((8,), 2.0, dtype=dtype)
        x.sqrt(), x.exp(), x.log()


if numba is not None:
    _settle_torch_vector_math()


if numba is not None:

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
        from ..specs.quantization import FORMATS

        return FORMATS["int8" if state_witness.dtype == types.int8 else "int4"], sign_witness.dtype == types.int8

    def _dequantize(codes_address, scales_address, state_witness, sign_witness, out, first, end, spread):
        raise NotImplementedError  # pragma: no cover - replaced by the overload

    def _requantize(codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread):
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

    def _moment_map(fmt: QuantFormat, signed: bool, fine: bool = False):
        """(level of a code, stochastically rounded code of x given its block's
        divisor and 16 random bits) of one moment's map (a second moment's finer map
        where ``fine``), as inlined compiled functions whose format constants are
        compile-time."""
        top, step = np.float32(fmt.signed_levels), np.float32(1) / np.float32(fmt.signed_levels)
        mantissa, lowest = fmt.float_map(fine and not signed and fmt.fine_exponent_bits is not None)
        dropped, first = 23 - mantissa, (127 + lowest) << mantissa
        last = (1 << fmt.bits) - 1
        assert not fmt.snaps_to_top(signed), "the kernels step the current formats, none of which snaps"

        @njit(inline="always", nogil=True)
        def level(code):
            if signed:
                k = np.float32(code) - top
                magnitude = _power_level(abs(k), step)
                return -magnitude if k < 0 else magnitude
            return float_map_level(code, dropped, first)

        @njit(inline="always", nogil=True)
        def code(x, divisor, bits16):
            r = abs(x) / divisor
            if signed:
                return _signed_code(x, r, top, step, bits16)
            return float_map_code(r, bits16, dropped, first, last)

        return level, code

    @overload(_dequantize)
    def _dequantize_impl(codes_address, scales_address, state_witness, sign_witness, out, first, end, spread):
        """out[i - first] = scale * level(code) for elements [first, end), each level
        computed from its code (the spec's fp32 products).  Packed codes are first
        spread one to a byte (``spread``, a byte scratch row), so that both loops
        vectorize."""
        fmt, signed = _format_of(state_witness, sign_witness)
        (level, _), (fine_level, _) = _moment_map(fmt, signed), _moment_map(fmt, signed, fine=True)
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
                if not signed and scale < 0:  # a second moment's finer map: one loop per map, both vectorize
                    for i in range(b * block, min(b * block + block, end)):
                        values[i] = -scale * fine_level(codes[i])
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
        codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread
    ):
        """Quantize values[i - first] for elements [first, end) (``first`` on a block
        boundary): per block, a second moment held at its ceiling (an overflowed square,
        see :func:`~adamkit.specs.quantization.second_moment_ceiling`), the absmax over
        bit patterns (NaN and infinity sort above every finite value), exact or rounded up to bf16 as the moment's
        format keeps it (a second moment's negated where its block takes the finer
        float map: its smallest magnitude, an integer min over bit patterns, over the
        scale at least that map's lowest level), then each element's code, rounded
        stochastically with the bits of step key ``key`` (element indices counted from
        ``shift``).  Packed codes are made one to a byte in ``spread`` and paired
        afterwards."""
        fmt, signed = _format_of(state_witness, sign_witness)
        (_, code), (_, fine_code) = _moment_map(fmt, signed), _moment_map(fmt, signed, fine=True)
        block, packed = fmt.block_of(signed), int(fmt.bits == 4)
        log2_block = block.bit_length() - 1
        put_scale = _put_exact_scale if fmt.exact_scales(signed) else _put_bfloat16_scale
        saturates = not (signed or fmt.legacy)  # a second moment: an overflowed square is held at the ceiling
        ceiling = quantization.second_moment_ceiling(fmt)
        has_fine = not signed and fmt.fine_exponent_bits is not None
        fine_lowest = np.float32(2.0 ** fmt.float_map(fine=True)[1]) if has_fine else np.float32(0)

        def requantize(
            codes_address, scales_address, state_witness, sign_witness, values, first, end, key, shift, spread
        ):
            packs = typed_pointer(codes_address, _BYTE_WITNESS)
            codes = typed_pointer(np.int64(spread.ctypes.data) - first, _BYTE_WITNESS) if packed else packs
            # raw pointers, addressed by element index: array indexing keeps LLVM from vectorizing
            fresh = typed_pointer(np.int64(values.ctypes.data) - 4 * first, _FLOAT32_WITNESS)
            for b in range(first >> log2_block, (end + block - 1) >> log2_block):
                low, high = b * block, min(b * block + block, end)
                if saturates:
                    for i in range(low, high):
                        if fresh[i] > ceiling:  # (NaN stays NaN)
                            fresh[i] = ceiling
                largest, smallest = np.int32(0), np.int32(0x7F800000)
                for i in range(low, high):
                    largest = max(largest, magnitude_bits(fresh[i]))
                    if has_fine:  # (compile-time: the other formats skip it)
                        smallest = min(smallest, magnitude_bits(fresh[i]))
                scale = put_scale(scales_address, b, largest)
                if np.isnan(scale):  # a non-finite block: codes 0
                    for i in range(low, high):
                        codes[i] = np.uint8(0)
                    continue
                divisor = scale + np.float32(scale == 0)  # a zero scale: the block is all zeros
                if has_fine and scale > 0 and float_of_bits(smallest) / scale >= fine_lowest:
                    # the finer map holds the block: its scale's sign bit says so
                    typed_pointer(scales_address, _FLOAT32_WITNESS)[b] = -scale
                    for i in range(low, high):
                        codes[i] = np.uint8(fine_code(fresh[i], divisor, random16(key, i + shift)))
                    continue
                for i in range(low, high):
                    codes[i] = np.uint8(code(fresh[i], divisor, random16(key, i + shift)))
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
        """p = rn(theta), c = rn(theta - p)."""
        rounded = _rounded(param, value)
        _store(param, i, rounded)
        _store(compensation, i, value - rounded)

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

    def _element_loop(spec: AlgorithmSpec, amsgrad: bool, rounding_mode: str, cautious: bool, counting: bool = False):
        """The element loop of one algorithm and rounding variant.  The algorithm's
        forms (:mod:`adamkit.algorithms`), ``amsgrad`` and the storage functions are
        fixed here, in Python: the variants
        differ in which memory they read and write, and LLVM only vectorizes a loop with
        conditional stores after unswitching it, which it refuses for the larger bf16
        bodies (and code that is never run is then never compiled either).  Decay and
        maximize only select values and stay runtime flags, as does whether the step is
        adaptive (RAdam: rectified; ADOPT: past its first step; one per tensor).
        StableAdamW's loop is Adam's: its clipping is in the per-tensor scalars.  The
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
        first_moment = _adopt_first_moment if reads_previous_second else _adam_first_moment
        if counting:  # nothing is stored
            put_param, put = _put_nothing, _put_nothing_stochastic

        @njit(inline="always", nogil=True)
        def loop(pointers, first, end, scalars, maximize, decay, keys):
            param, grad, exp_avg, second, max_second, compensation = pointers
            one_minus_beta1, beta2, one_minus_beta2, eps, l2, inverse_scale = scalars[0:6]
            step_size, bias_correction2_sqrt, gradient_step_size, adaptive, clip, second_weight = scalars[6:12]
            decay_factor, cautious_scale = scalars[12], scalars[13]
            one = _compute(param, 1.0)
            zero = _compute(param, 0.0)
            agree = 0
            for i in range(first, end):
                p = load_param(param, compensation, i)
                g = _load(grad, i) * inverse_scale
                if maximize:
                    g = -g
                if decay == L2_DECAY:
                    g = g + l2 * p
                elif decay == DECOUPLED_DECAY:
                    p = p * decay_factor
                m = _compute(param, _load(exp_avg, i))
                v = _load(second, i) if reads_previous_second else zero  # (ADOPT: g over the previous v)
                m = first_moment(m, g, v, one_minus_beta1, eps, clip)
                put(exp_avg, i, m, keys[1], keys[4])
                if infinity_norm:
                    u = max(beta2 * _load(second, i), abs(g) + eps)
                    put(second, i, u, keys[2], keys[4])
                    denom = u
                elif average_after:
                    put(second, i, beta2 * v + second_weight * g * g, keys[2], keys[4])
                    denom = one
                else:
                    v = beta2 * _load(second, i) + one_minus_beta2 * g * g
                    put(second, i, v, keys[2], keys[4])
                    if amsgrad:
                        v = max(_load(max_second, i), v)
                        put(max_second, i, v, keys[3], keys[4])
                    if rectified:  # before rectification: momentum SGD, no denominator
                        denom = np.sqrt(v) + eps if adaptive else one
                    else:
                        denom = np.sqrt(v) / bias_correction2_sqrt + eps
                if nesterov:
                    update = (step_size * m + gradient_step_size * g) / denom
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
    def _adam_first_moment(m, g, v, one_minus_beta1, eps, clip):
        """m + (1 - beta1)(g - m)."""
        return m + one_minus_beta1 * (g - m)

    @njit(inline="always", nogil=True)
    def _adopt_first_moment(m, g, v, one_minus_beta1, eps, clip):
        """ADOPT's: m follows g normalized by the previous v, clipped to [-c, c]."""
        root = np.sqrt(v)
        target = g / (eps if root < eps else root)
        if target > clip:
            target = clip
        elif target < -clip:
            target = -clip
        return m + one_minus_beta1 * (target - m)

    #: (plain, amsgrad) loops per (algorithm, rounding mode, cautious); AMSGrad where the algorithm has it
    _LOOPS = {
        (spec.name, mode, cautious): (
            _element_loop(spec, amsgrad=False, rounding_mode=mode, cautious=cautious),
            _element_loop(spec, amsgrad=spec.amsgrad, rounding_mode=mode, cautious=cautious),
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
            _element_loop(spec, amsgrad=spec.amsgrad, rounding_mode=mode, cautious=False, counting=True),
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
    _ALGORITHM_OF_WITNESS = {
        getattr(types, np.dtype(witness).name): name for name, witness in _ALGORITHM_WITNESS.items()
    }

    def _update_chunk(
        pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw
    ):
        raise NotImplementedError  # pragma: no cover - replaced by the overload

    @overload(_update_chunk, inline="always")
    def _update_chunk_impl(
        pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw
    ):
        """Only the algorithm's, rounding mode's and cautious-or-not loops are compiled
        for a specialization (``cw``: the cautious witness, uint8 when cautious)."""
        algorithm = _ALGORITHM_OF_WITNESS[algorithm_witness.dtype]
        cautious = cw.dtype == types.uint8
        plain_loop, amsgrad_loop = _LOOPS[algorithm, _MODE_OF_WITNESS[rounding_witness.dtype], cautious]

        def update(
            pointers, first, end, scalars, maximize, decay, keys, amsgrad, algorithm_witness, rounding_witness, cw
        ):
            if amsgrad:
                amsgrad_loop(pointers, first, end, scalars, maximize, decay, keys)
            else:
                plain_loop(pointers, first, end, scalars, maximize, decay, keys)

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
        cautious_witness,
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
            "int8", uint8 for "int4"); the rounding mode, the algorithm and whether the
            update is cautious (their dtypes)
        """
        maximize, amsgrad, decay = flags[0] != 0, flags[1] != 0, flags[2]
        for c in prange(chunks.shape[0]):
            t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, param_witness)
            tensor_keys = _chunk_keys(keys, t)
            pointers = (
                typed_pointer(addresses[t, 0], param_witness),
                typed_pointer(addresses[t, 1], param_witness),
                typed_pointer(addresses[t, 2], state_witness),
                typed_pointer(addresses[t, 3], state_witness),
                typed_pointer(addresses[t, 4], state_witness),
                typed_pointer(addresses[t, 5], param_witness),
            )
            _update_chunk(
                pointers,
                first,
                end,
                scalars,
                maximize,
                decay,
                tensor_keys,
                amsgrad,
                algorithm_witness,
                rounding_witness,
                cautious_witness,
            )

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
        cautious_witness,
    ):
        """:func:`_fused_step` for quantized states (``state_witness`` names the format)."""
        maximize, amsgrad, decay = flags[0] != 0, flags[1] != 0, flags[2]
        for c in prange(chunks.shape[0]):
            t, first, end = chunks[c, 0], chunks[c, 1], chunks[c, 2]
            scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, param_witness)
            tensor_keys = _chunk_keys(keys, t)
            _quantized_chunk(
                addresses[t],
                first,
                end,
                scalars,
                maximize,
                decay,
                tensor_keys,
                amsgrad,
                param_witness,
                state_witness,
                rounding_witness,
                algorithm_witness,
                cautious_witness,
            )

    @njit(inline="always", nogil=True)
    def _chunk_scalars(addresses, t, tensor_scalars, constants, param_witness):
        """Tensor ``t``'s scalars in its compute type: the group's constants, the
        gradients' multiplier, then the tensor's own (``adaptive`` a bool; 1 - beta2^t,
        read by the clipping pass only, is left out)."""
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
        )

    @njit(inline="always", nogil=True)
    def _chunk_keys(keys, t):
        """Tensor ``t``'s stochastic-rounding keys and element offset (one dummy row when unused)."""
        row = t if keys.shape[0] > 1 else 0
        return (keys[row, 0], keys[row, 1], keys[row, 2], keys[row, 3], keys[row, 4])

    #: elements per scratch pass of a quantized chunk: the fp32 scratch (3 rows) stays
    #: in cache and below malloc's mmap threshold (a fresh mapping per chunk would fault)
    QUANTIZED_SPAN = 4096

    @njit(inline="always", nogil=True)
    def _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw):
        """Decode elements [low, high) of a row's quantized moments into the fp32
        ``scratch`` rows (m, v, and v's maximum under AMSGrad); the element loop's
        pointers, with the moments' addressed in the scratch by element index."""
        signed, unsigned = np.empty(0, dtype=np.int8), np.empty(0, dtype=np.uint8)
        _dequantize(row[2], row[6], sw, signed, scratch[0], low, high, spread)
        _dequantize(row[3], row[7], sw, unsigned, scratch[1], low, high, spread)
        if amsgrad:
            _dequantize(row[4], row[8], sw, unsigned, scratch[2], low, high, spread)
        base = np.int64(scratch.ctypes.data) - 4 * low
        stride = 4 * QUANTIZED_SPAN
        return (
            typed_pointer(row[0], pw),
            typed_pointer(row[1], pw),
            typed_pointer(base, _FLOAT32_WITNESS),
            typed_pointer(base + stride, _FLOAT32_WITNESS),
            typed_pointer(base + (2 * stride if amsgrad else stride), _FLOAT32_WITNESS),
            typed_pointer(row[5], pw),
        )

    @njit(inline="always", nogil=True)
    def _quantized_chunk(row, first, end, scalars, maximize, decay, keys, amsgrad, pw, sw, rw, aw, cw):
        """One chunk (it starts on a block boundary) with quantized moments, span by
        span: dequantize into fp32 scratch rows, run the plain element loop on those,
        quantize the new values (the update itself used them unrounded)."""
        scratch = np.empty((3, QUANTIZED_SPAN), dtype=np.float32)
        spread = np.empty(QUANTIZED_SPAN + 2, dtype=np.uint8)  # int4 codes, one a byte
        signed, unsigned = np.empty(0, dtype=np.int8), np.empty(0, dtype=np.uint8)
        for low in range(first, end, QUANTIZED_SPAN):
            high = min(low + QUANTIZED_SPAN, end)
            pointers = _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw)
            _update_chunk(pointers, low, high, scalars, maximize, decay, keys, amsgrad, aw, rw, cw)
            _requantize(row[2], row[6], sw, signed, scratch[0], low, high, keys[1], keys[4], spread)
            _requantize(row[3], row[7], sw, unsigned, scratch[1], low, high, keys[2], keys[4], spread)
            if amsgrad:
                _requantize(row[4], row[8], sw, unsigned, scratch[2], low, high, keys[3], keys[4], spread)

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
            scalars = _chunk_scalars(addresses, t, tensor_scalars, constants, pw)
            row = addresses[t]
            counts[c] = _chunk_agreement(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw)
        return counts

    def _chunk_agreement(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
        raise NotImplementedError  # pragma: no cover - replaced by the overload

    @overload(_chunk_agreement, inline="always")
    def _chunk_agreement_impl(row, first, end, scalars, maximize, decay, amsgrad, pw, sw, rw, aw):
        plain_loop, amsgrad_loop = _COUNTING_LOOPS[_ALGORITHM_OF_WITNESS[aw.dtype], _MODE_OF_WITNESS[rw.dtype]]

        def count(pointers, first, end, scalars, maximize, decay, amsgrad):
            if amsgrad:
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
                    pointers = _decoded_span(row, low, high, amsgrad, scratch, spread, pw, sw)
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
        if not lookup(_ALGORITHM_OF_WITNESS[aw.dtype]).clips_update:
            return lambda addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw: None
        clipping_sums = _quantized_clipping_sums if sw.dtype in (types.int8, types.uint8) else _clipping_sums

        def clip(addresses, window, first, end, tensor_scalars, constants, numels, decay_rate, pw, sw, aw):
            sums = _window_totals(
                window, clipping_sums(addresses, window, tensor_scalars, constants, pw, sw), first, end
            )
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
    def _caution_window_impl(
        addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw
    ):
        """A cautious update's scale n / (kept + 1) for tensors [first, end), as
        :func:`~adamkit.kernels.host.set_cautious_scales` computes it (nothing when the
        update is not cautious)."""
        if cw.dtype != types.uint8:
            return lambda addresses, window, first, end, tensor_scalars, constants, flags, numels, pw, sw, rw, aw, cw: (
                None
            )

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


class _Bucket:
    """The cached, validated addresses of one (param dtype, state dtype) bucket of a group_scalars.

    ``direct`` tensors are updated in place; the others are staged: their param,
    gradient and state are copied into contiguous buffers, updated there, and copied
    back (never touching memory outside a view).  Under stochastic rounding a param
    must also be in row-major order (its random bits follow the row-major index).
    """

    def __init__(self, members: list[int], batch: GroupBatch, rule: UpdateRule, dtypes: tuple):
        param_dtype, moment_storage = dtypes
        quantized = isinstance(moment_storage, QuantFormat)
        moment_dtype = torch.float32 if quantized else moment_storage
        self.members = members
        self.amsgrad = rule.amsgrad
        self.mode = rounding.effective_rounding(rule.rounding, param_dtype)
        self.random = rounding.needs_random_bits(rule.rounding, param_dtype, moment_storage)
        self.param_witness = np.empty(0, dtype=_STORAGE[param_dtype])
        self.state_witness = np.empty(
            0, dtype=_QUANTIZED_STORAGE[moment_storage.name] if quantized else _STORAGE[moment_dtype]
        )
        self.rounding_witness = np.empty(0, dtype=_ROUNDING_WITNESS[self.mode])
        self.counters = HostCounters([batch.states[i] for i in members], rule.algorithm)
        self.algorithm_witness = np.empty(0, dtype=_ALGORITHM_WITNESS[rule.algorithm])
        keys, self.moment_count = state_keys(
            rule.algorithm, rule.amsgrad, moment_storage if quantized else None, self.mode
        )
        states = [[batch.states[i][key] for key in keys] for i in members]
        params = [batch.params[i] for i in members]
        fmt = moment_storage if quantized else None
        forms = [addressed_forms(rule.algorithm, rule.amsgrad, fmt, self.mode, moment_dtype, p) for p in params]
        check_addressed(params, states, keys, forms, members)
        in_order = not self.random and not quantized  # random bits and codes follow the row-major index
        self.direct = [
            (p.is_contiguous() or (in_order and is_dense(p)))
            and (quantized or all(s.stride() == p.stride() for s in tensors))
            for p, tensors in zip(params, states)
        ]
        self.quantized = quantized
        self.state_tensors = states
        self.numels = [p.numel() for p in params]
        self.real_numels = np.array([n * (2 if p.is_complex() else 1) for n, p in zip(self.numels, params)])
        self.real_sizes = self.real_numels.astype(np.float64)  # the pre-pass's n per tensor
        self.state_addresses = np.array(
            [self._state_row(tensors) if d else [0] * STATE_COLUMNS for tensors, d in zip(states, self.direct)],
            dtype=np.int64,
        ).reshape(len(members), STATE_COLUMNS)
        self.chunks = chunk_table(self.real_numels, CHUNK)
        self.windows = np.array(window_table(self.chunks, PRE_PASS_WINDOW), dtype=np.int64).reshape(-1, 4)
        self.clipped = rule.spec.clips_update
        self.cautious = rule.cautious
        self.cautious_witness = np.empty(0, dtype=_CAUTIOUS_WITNESS[rule.cautious])
        self.whole_group = members == list(range(len(batch.params)))
        #: the rows always staged (their param or state is not laid out for the kernel)
        self.staged_rows = [row for row, direct in enumerate(self.direct) if not direct]
        self.restaged_last = False
        self.table = np.empty((len(members), len(COLUMNS)), dtype=np.int64)
        self.table[:, 2:] = self.state_addresses
        self.stream_keys: tuple | None = None

    def _state_row(self, tensors: list[Tensor]) -> list[int]:
        addresses = [t.data_ptr() for t in tensors]
        return state_row(addresses, self.moment_count, self.mode in PARAM_EXTRA_KEY, self.quantized)

    def step_keys(self, rule: UpdateRule, batch: GroupBatch, counts: np.ndarray) -> np.ndarray:
        """Stochastic rounding's keys k_{s,t} and each tensor's element offset,
        int64[T, 5]; a dummy row otherwise."""
        if not self.random:
            return _NO_KEYS
        indices = [batch.param_indices[i] for i in self.members]
        if self.stream_keys is None or self.stream_keys[0] != (rule.seed, indices):
            self.stream_keys = ((rule.seed, indices), rounding.param_stream_keys(rule.seed, indices))
        offsets = np.zeros(len(self.members), dtype=np.int64)
        if batch.element_offsets is not None:
            offsets[:] = [batch.element_offsets[i] for i in self.members]
        keys = rounding.step_keys(self.stream_keys[1], counts[:, None]).astype(np.int64)
        return np.concatenate([keys, offsets[:, None]], axis=1)

    def addresses(self, batch: GroupBatch) -> tuple[np.ndarray, list]:
        """The address table for this step, and the staged tensors to copy back.

        The params' and gradients' addresses are those the step's guard read and checked
        (:class:`adamkit.guard.StepGuard`); rows whose param is not laid out for the
        kernel, or whose gradient is not laid out like its param, are staged."""
        checked = batch.checked
        if self.whole_group:
            param_ptrs, grad_ptrs = checked.param_ptrs, checked.grad_ptrs
        else:
            param_ptrs = [checked.param_ptrs[i] for i in self.members]
            grad_ptrs = [checked.grad_ptrs[i] for i in self.members]
        self.table[:, 0] = param_ptrs
        self.table[:, 1] = grad_ptrs
        if self.restaged_last:  # the last step staged rows that are direct now: their state's own addresses
            self.table[:, 2:] = self.state_addresses
            self.restaged_last = False
        restaged = self.staged_rows
        if checked.mismatched_rows:
            rows = {member: row for row, member in enumerate(self.members)}
            extra = [rows[i] for i in checked.mismatched_rows if i in rows]
            restaged = sorted(set(restaged).union(extra))
        if not restaged:
            return self.table, []
        self.restaged_last = True
        return self.table, self._stage(restaged, batch)

    def _stage(self, rows: list[int], batch: GroupBatch) -> list:
        """Contiguous copies of the params, gradients and state of ``rows``, addressed in
        the table (which is restored to the state's own addresses first)."""
        table = self.table
        table[:, 2:] = self.state_addresses
        staged = []
        for row in rows:
            param, grad = batch.params[self.members[row]], batch.grads[self.members[row]]
            # the buffers must outlive the kernel call: they are kept in ``staged``
            param_buffer, grad_buffer = param.contiguous(), grad.contiguous()
            state_buffers = [t.contiguous() for t in self.state_tensors[row]]
            table[row, 0], table[row, 1] = param_buffer.data_ptr(), grad_buffer.data_ptr()
            table[row, 2:] = self._state_row(state_buffers)
            staged.append((param, param_buffer, grad_buffer, self.state_tensors[row], state_buffers))
        return staged


#: the keys argument of a launch without stochastic rounding (never read)
_NO_KEYS = np.zeros((1, 5), dtype=np.int64)


def _buckets(batch: GroupBatch, rule: UpdateRule) -> list[_Bucket]:
    """The group's (param dtype, state storage) buckets, rebuilt when the params or
    their state changed."""
    key = (batch.key, rule.algorithm, rule.amsgrad, rule.cautious)
    cached = batch.cache.get("cpu")
    if cached is not None and cached[0] == key:
        return cached[1]
    by_storage: dict[tuple, list[int]] = {}
    for i, p in enumerate(batch.params):
        by_storage.setdefault((as_real(p).dtype, moment_storage(batch.states[i], p)), []).append(i)
    buckets = [_Bucket(members, batch, rule, dtypes) for dtypes, members in by_storage.items()]
    batch.cache["cpu"] = (key, buckets)
    return buckets


def _flags_and_constants(rule: UpdateRule, group_scalars: GroupScalars, grad_scale: Tensor | None):
    flags = np.array([rule.maximize, rule.amsgrad, group_scalars.decay_kind], dtype=np.int64)
    gradient_factor = 1.0 if grad_scale is None else inverse_scale(grad_scale).item()
    constants = np.array([*map(float, group_constants(group_scalars)), gradient_factor], dtype=np.float64)
    return flags, constants


def step(batch: GroupBatch, rule: UpdateRule) -> None:
    """Advance the steps and update every tensor of the group_scalars, one compiled call per bucket.

    A GradScaler's ``found_inf`` skips the step before anything moves (reading it
    costs nothing on the CPU); its ``grad_scale`` is divided out in the kernel."""
    if batch.found_inf is not None and batch.found_inf.item():
        return
    with _following_torch_threads():
        _launch(batch, rule)


@contextmanager
def _following_torch_threads() -> Iterator[None]:
    """Run numba's parallel loops on the threads torch is set to use, and leave both
    settings as they were: the first time numba's thread pool is touched, its OpenMP
    layer initialises the OpenMP runtime torch shares with numba's own thread count,
    which would turn a user's ``torch.set_num_threads(1)`` into numba's count (an
    oversubscribed multi-process job)."""
    torch_threads, numba_threads = torch.get_num_threads(), numba.get_num_threads()
    numba.set_num_threads(min(torch_threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        numba.set_num_threads(numba_threads)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def window_table(chunks: np.ndarray, elements: int) -> list[tuple[int, int, int, int]]:
    """Consecutive windows of whole tensors over a chunk table: (first chunk, end chunk,
    first tensor, end tensor), each closed at a tensor's end once it holds at least
    ``elements`` elements (the last one wherever the table ends)."""
    if len(chunks) == 0:
        return []
    sizes = np.cumsum(chunks[:, 2] - chunks[:, 1])
    tensor_ends = [*(np.flatnonzero(np.diff(chunks[:, 0])) + 1).tolist(), len(chunks)]
    windows, first = [], 0
    for end in tensor_ends:
        held = sizes[end - 1] - (sizes[first - 1] if first else 0)
        if held >= elements or end == len(chunks):
            windows.append((first, end, int(chunks[first, 0]), int(chunks[end - 1, 0]) + 1))
            first = end
    return windows


def _per_tensor_totals(batch, bucket, chunk_values: np.ndarray) -> np.ndarray:
    """Chunk values added up per tensor, next to each tensor's size: float64[T, 2], over
    the ranks that hold a sharded param's other shards."""
    per_tensor = np.bincount(bucket.chunks[:, 0], weights=chunk_values, minlength=len(bucket.members))
    totals = np.stack([per_tensor, bucket.real_numels.astype(np.float64)], axis=1)
    if batch.shards is not None:  # the whole params' sums and sizes
        totals = per_tensor_totals(torch.from_numpy(totals), [batch.shards[i] for i in bucket.members]).numpy()
    return totals


def _sharded_pre_pass(batch, bucket, table, tensor_scalars, constants, flags, witnesses, decay_rate) -> None:
    """What sharded tensors need before their update, over the whole bucket (each rank
    holds its own shards, so all of them total every tensor at once): StableAdamW's
    clipping sums, then a cautious update's count of agreeing elements, added up over
    the ranks and turned into the tensors' scalars by
    :func:`~adamkit.kernels.host.clip_update_sizes` and
    :func:`~adamkit.kernels.host.set_cautious_scales`."""
    if bucket.clipped:
        clipping_sums = _quantized_clipping_sums if bucket.quantized else _clipping_sums
        sums = clipping_sums(table, bucket.chunks, tensor_scalars, constants, *witnesses[:2])
        totals = _per_tensor_totals(batch, bucket, sums)
        clip_update_sizes(tensor_scalars, totals[:, 0], np.maximum(totals[:, 1], 1), decay_rate)
    if bucket.cautious:
        counts = _agreement_counts(table, bucket.chunks, tensor_scalars, constants, flags, *witnesses)
        totals = _per_tensor_totals(batch, bucket, counts)
        set_cautious_scales(tensor_scalars, totals[:, 0], totals[:, 1])


def _launch(batch: GroupBatch, rule: UpdateRule) -> None:
    group_scalars = rule.group_scalars()
    flags, constants = _flags_and_constants(rule, group_scalars, batch.grad_scale)
    decay_rate = rule.decay_rate()
    decay_rate = None if decay_rate is None else as_number(decay_rate)
    for bucket in _buckets(batch, rule):
        table, staged = bucket.addresses(batch)
        counts, tensor_scalars = bucket.counters.advance(rule, group_scalars.decay_factor)
        keys = bucket.step_keys(rule, batch, counts)
        witnesses = (bucket.param_witness, bucket.state_witness, bucket.rounding_witness, bucket.algorithm_witness)
        launch = _fused_quantized_step if bucket.quantized else _fused_step
        if (bucket.clipped or bucket.cautious) and batch.shards is None:
            decay = np.nan if decay_rate is None else decay_rate
            arguments = (keys, bucket.real_sizes, decay, *witnesses, bucket.cautious_witness)
            _windowed_step(table, bucket.chunks, bucket.windows, tensor_scalars, constants, flags, *arguments)
        else:
            if bucket.clipped or bucket.cautious:
                _sharded_pre_pass(batch, bucket, table, tensor_scalars, constants, flags, witnesses, decay_rate)
            launch(table, bucket.chunks, tensor_scalars, constants, flags, keys, *witnesses, bucket.cautious_witness)
        for param, param_buffer, _grad_buffer, state_tensors, state_buffers in staged:
            param.copy_(param_buffer)
            for state, buffer in zip(state_tensors, state_buffers):
                if state.data_ptr() != buffer.data_ptr():
                    state.copy_(buffer)
