r"""Fused multi-tensor Triton kernel for CUDA: one launch per param group and dtype.

Each program updates one chunk of at most :data:`BLOCK` elements of one tensor; a
table of raw addresses (param, grad, exp_avg, second moment, max second moment,
Kahan compensation and, for quantized states, the moments' block scales) and
a table of chunks let a single launch cover every tensor of the group, whatever
their sizes.  The element math is the CPU kernel's (see :mod:`adamkit.kernels.cpu`),
in fp32 (fp64 for fp64 params), with bf16/fp16 rounded to nearest even on store.
Quantized moments (``state_precision="int8"``/``"int4"``) are dequantized on load
and quantized again from the new fp32 values; a chunk covers whole blocks.

Per-tensor step sizes and bias corrections come from :class:`adamkit.rule.UpdateRule`
as device arrays.  With ``capturable=True`` they are computed on the device from the
step counters, so neither a tensor lr changed by a scheduler nor the step count
needs the host: nothing syncs, nothing recompiles (lr and betas are runtime values).

AMP: when a ``torch.amp.GradScaler`` drives the optimizer, ``grad_scale`` and
``found_inf`` are read inside the kernel: gradients are unscaled on the fly, and a
step with ``found_inf`` leaves params and state untouched (the step counters are
rolled back, as torch's fused optimizers do).

Without a GPU the same kernel runs on CPU tensors under ``TRITON_INTERPRET=1``;
that is how the conformance suite tests it in CI.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from .. import blockwise, rounding
from ..quantization import QuantFormat
from ..rule import UpdateRule, step_scalar_arrays
from ..state import COMPENSATION_KEY, moment_keys, moment_storage
from . import foreach, storage
from .amp import unscaled
from .lists import list_kernel
from .types import GroupBatch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

#: elements per program
BLOCK = 1024

#: the interpreter runs programs on the CPU with NumPy: slow, but exact, for tests
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def device_types() -> frozenset[str]:
    return frozenset({"cuda", "cpu"}) if INTERPRETED else frozenset({"cuda"})


if triton is not None:

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
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x846CA68B
        x = x ^ (x >> 16)
        return x >> 16

    @triton.jit
    def _to_storage_stochastic(x, bits16, STORAGE: tl.constexpr):
        """Round ``x`` to a 16-bit storage dtype stochastically (the spec's rule); wider
        storage takes the value as it is."""
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
            fraction = (tl.abs(x) - tl.abs(lower)) / spacing
            away = (fraction * 65536.0 >= 65536.0 - bits16.to(tl.float32)).to(tl.int32)
            rounded = (toward_zero + away).to(tl.uint16).to(tl.float16, bitcast=True)
            return tl.where(x != x, nearest, rounded)
        else:
            return x.to(STORAGE)

    @triton.jit
    def _put(pointer, offsets, mask, value, key, STORAGE: tl.constexpr, STOCHASTIC: tl.constexpr):
        """Store a value: stochastically under stochastic rounding, else to nearest."""
        if STOCHASTIC:
            tl.store(pointer + offsets, _to_storage_stochastic(value, _random16(key, offsets), STORAGE), mask=mask)
        else:
            tl.store(pointer + offsets, _to_storage(value, STORAGE), mask=mask)

    @triton.jit
    def _dequantize(codes, scales, offsets, mask, BITS: tl.constexpr, QBLOCK: tl.constexpr, SIGNED: tl.constexpr):
        """The spec's fp32 values of elements ``offsets`` (see adamkit.quantization)."""
        if BITS == 8:
            code = tl.load(codes + offsets, mask=mask, other=0).to(tl.int32)
        else:
            code = (tl.load(codes + offsets // 2, mask=mask, other=0).to(tl.int32) >> ((offsets & 1) * 4)) & 0xF
        scale = tl.load(scales + offsets // QBLOCK, mask=mask, other=0).to(tl.float32)
        if SIGNED:
            k = code - ((1 << (BITS - 1)) - 1)
            t = tl.math.div_rn(tl.abs(k).to(tl.float32), float((1 << (BITS - 1)) - 1))
            value = scale * (t * t)
            return tl.where(k < 0, -value, value)
        else:
            t = tl.math.div_rn((code + 1).to(tl.float32), float(1 << BITS))
            return scale * (t * t)

    @triton.jit
    def _requantize(
        value,
        codes,
        scales,
        offsets,
        mask,
        first,
        end,
        BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        SIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Quantize a program's new values (``first`` on a block boundary): per block,
        the absmax over bit patterns (NaN and infinity sort above every finite value)
        rounded up to bf16, then each element's code; int4 codes two to a byte."""
        x = tl.where(mask, value.to(tl.float32), 0.0)
        patterns = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        largest = tl.max(tl.reshape(patterns, [BLOCK // QBLOCK, QBLOCK]), axis=1)
        largest = tl.minimum(largest, 0x7F800000)
        rounded_up = (largest + 0xFFFF) >> 16
        finite = (largest < 0x7F800000) & (rounded_up < 0x7F80)
        block_index = first // QBLOCK + tl.arange(0, BLOCK // QBLOCK)
        scale_bits = tl.where(finite, rounded_up, 0x7FC0).to(tl.uint16)
        tl.store(scales + block_index, scale_bits.to(tl.bfloat16, bitcast=True), mask=block_index * QBLOCK < end)
        block_scale = (tl.where(finite, rounded_up, 0) << 16).to(tl.float32, bitcast=True)
        usable = tl.where(finite, 1, 0)
        scale = tl.reshape(tl.broadcast_to(block_scale[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        ok = tl.reshape(tl.broadcast_to(usable[:, None], [BLOCK // QBLOCK, QBLOCK]), [BLOCK])
        x = tl.where(ok == 1, x, 0.0)  # a non-finite block stores codes 0: no NaN reaches a cast
        ratio = tl.math.div_rn(tl.abs(x), scale + (scale == 0).to(tl.float32))
        if SIGNED:
            levels = (1 << (BITS - 1)) - 1
            nearest = tl.floor(levels * tl.math.sqrt_rn(ratio) + 0.5).to(tl.int32)
            code = tl.where(x < 0, -nearest, nearest) + levels
        else:
            nearest = tl.floor((1 << BITS) * tl.math.sqrt_rn(ratio) + 0.5).to(tl.int32)
            code = tl.maximum(nearest - 1, 0)
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
    ):
        """A moment's values: loaded in its dtype, or dequantized to fp32."""
        if BITS == 0:
            return tl.load(pointer + offsets, mask=mask)
        else:
            return _dequantize(pointer, scales, offsets, mask, BITS, QBLOCK, SIGNED)

    @triton.jit
    def _put_moment(
        pointer,
        scales,
        offsets,
        mask,
        value,
        key,
        first,
        end,
        STORAGE: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        SIGNED: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """Store a new moment: in its dtype, or quantized (from the unrounded value)."""
        if BITS == 0:
            _put(pointer, offsets, mask, value, key, STORAGE, STOCHASTIC)
        else:
            _requantize(value, pointer, scales, offsets, mask, first, end, BITS, QBLOCK, SIGNED, BLOCK)

    @triton.jit
    def _fused_step(
        table_ptr,
        chunk_ptr,
        step_size_ptr,
        bias_correction2_sqrt_ptr,
        grad_scale_ptr,
        found_inf_ptr,
        key_ptr,
        one_minus_beta1,
        beta2,
        one_minus_beta2,
        eps,
        l2_weight_decay,
        decay_factor_ptr,
        PARAM_STORAGE: tl.constexpr,
        STATE_STORAGE: tl.constexpr,
        COMPUTE: tl.constexpr,
        ADAMAX: tl.constexpr,
        AMSGRAD: tl.constexpr,
        MAXIMIZE: tl.constexpr,
        DECAY: tl.constexpr,
        AMP: tl.constexpr,
        KAHAN: tl.constexpr,
        STOCHASTIC: tl.constexpr,
        QUANT_BITS: tl.constexpr,
        QBLOCK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        t = tl.load(chunk_ptr + 3 * chunk)
        first = tl.load(chunk_ptr + 3 * chunk + 1)
        end = tl.load(chunk_ptr + 3 * chunk + 2)
        skip = False
        inverse_scale = 1.0
        if AMP:  # fp32(1 / s), as adamkit.kernels.amp forms it
            skip = tl.load(found_inf_ptr) != 0
            inverse_scale = tl.math.div_rn(1.0, tl.load(grad_scale_ptr).to(tl.float32)).to(COMPUTE)
        if not skip:
            param_pointer = tl.pointer_type(PARAM_STORAGE)
            state_pointer = tl.pointer_type(STATE_STORAGE)  # uint8 codes when quantized
            scales_pointer = tl.pointer_type(tl.bfloat16)
            param = tl.load(table_ptr + 9 * t).to(param_pointer)
            grad = tl.load(table_ptr + 9 * t + 1).to(param_pointer)
            exp_avg = tl.load(table_ptr + 9 * t + 2).to(state_pointer)
            second = tl.load(table_ptr + 9 * t + 3).to(state_pointer)
            max_second = tl.load(table_ptr + 9 * t + 4).to(state_pointer)
            compensation = tl.load(table_ptr + 9 * t + 5).to(param_pointer)
            exp_avg_scales = tl.load(table_ptr + 9 * t + 6).to(scales_pointer)
            second_scales = tl.load(table_ptr + 9 * t + 7).to(scales_pointer)
            max_second_scales = tl.load(table_ptr + 9 * t + 8).to(scales_pointer)
            step_size = tl.load(step_size_ptr + t).to(COMPUTE)
            bias_correction2_sqrt = tl.load(bias_correction2_sqrt_ptr + t).to(COMPUTE)
            key_param = 0
            key_exp_avg = 0
            key_second = 0
            key_max = 0
            if STOCHASTIC:
                key_param = tl.load(key_ptr + 4 * t)
                key_exp_avg = tl.load(key_ptr + 4 * t + 1)
                key_second = tl.load(key_ptr + 4 * t + 2)
                key_max = tl.load(key_ptr + 4 * t + 3)

            offsets = first + tl.arange(0, BLOCK)
            mask = offsets < end
            p = tl.load(param + offsets, mask=mask).to(COMPUTE)
            if KAHAN:
                p = p + tl.load(compensation + offsets, mask=mask).to(COMPUTE)
            g = tl.load(grad + offsets, mask=mask).to(COMPUTE)
            if AMP:
                g = g * inverse_scale
            if MAXIMIZE:
                g = -g
            if DECAY == 1:
                g = g + l2_weight_decay * p
            if DECAY == 2:
                p = p * tl.load(decay_factor_ptr).to(COMPUTE)
            m = _load_moment(exp_avg, exp_avg_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK, True).to(
                COMPUTE
            )
            m = m + one_minus_beta1 * (g - m)
            _put_moment(
                exp_avg,
                exp_avg_scales,
                offsets,
                mask,
                m,
                key_exp_avg,
                first,
                end,
                STATE_STORAGE,
                STOCHASTIC,
                QUANT_BITS,
                QBLOCK,
                True,
                BLOCK,
            )
            second_value = _load_moment(second, second_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK, False)
            if ADAMAX:
                new_second = tl.maximum(beta2 * second_value.to(COMPUTE), tl.abs(g) + eps)
            else:
                new_second = beta2 * second_value.to(COMPUTE) + one_minus_beta2 * g * g
            _put_moment(
                second,
                second_scales,
                offsets,
                mask,
                new_second,
                key_second,
                first,
                end,
                STATE_STORAGE,
                STOCHASTIC,
                QUANT_BITS,
                QBLOCK,
                False,
                BLOCK,
            )
            if ADAMAX:
                denom = new_second
            else:
                v = new_second
                if AMSGRAD:
                    v_max = _load_moment(
                        max_second, max_second_scales, offsets, mask, STATE_STORAGE, QUANT_BITS, QBLOCK, False
                    )
                    v = tl.maximum(v_max.to(COMPUTE), v)
                    _put_moment(
                        max_second,
                        max_second_scales,
                        offsets,
                        mask,
                        v,
                        key_max,
                        first,
                        end,
                        STATE_STORAGE,
                        STOCHASTIC,
                        QUANT_BITS,
                        QBLOCK,
                        False,
                        BLOCK,
                    )
                denom = tl.sqrt(v) / bias_correction2_sqrt + eps
            p = p - step_size * (m / denom)
            if KAHAN:  # p = rn(theta), c = rn(theta - p)
                stored = _to_storage(p, PARAM_STORAGE)
                tl.store(param + offsets, stored, mask=mask)
                tl.store(compensation + offsets, _to_storage(p - stored.to(COMPUTE), PARAM_STORAGE), mask=mask)
            else:
                _put(param, offsets, mask, p, key_param, PARAM_STORAGE, STOCHASTIC)


def _triton_dtype(dtype: torch.dtype):
    return {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.bfloat16: tl.bfloat16,
        torch.float16: tl.float16,
        torch.uint8: tl.uint8,
    }[dtype]


def _chunk_table(numels: list[int]) -> np.ndarray:
    counts = [(n + BLOCK - 1) // BLOCK for n in numels]
    rows = [
        (t, start, min(start + BLOCK, n))
        for t, (n, c) in enumerate(zip(numels, counts))
        for start in range(0, c * BLOCK, BLOCK)
    ]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _real(t: torch.Tensor) -> torch.Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


class _Bucket:
    """One (device, param dtype, state storage) bucket of a group: what stays fixed
    between steps.  Quantized moments are held as uint8 codes and bf16 scales."""

    def __init__(self, members: list[int], batch: GroupBatch, rule: UpdateRule, state_storage):
        self.members = members
        params = [_real(batch.params[i]) for i in members]
        states = [batch.states[i] for i in members]
        self.device = params[0].device
        self.storage = params[0].dtype
        self.quantized = state_storage if isinstance(state_storage, QuantFormat) else None
        self.state_storage = torch.uint8 if self.quantized else state_storage
        moment_dtype = torch.float32 if self.quantized else state_storage
        self.mode = rounding.effective_rounding(rule.rounding, self.storage, moment_dtype)
        moments = moment_keys(rule.algorithm, rule.amsgrad)
        if self.quantized:
            moments = [blockwise.stored_keys(key, self.quantized)[0] for key in moments] + [
                blockwise.stored_keys(key, self.quantized)[1] for key in moments
            ]
        keys = moments + ([COMPENSATION_KEY] if self.mode == "kahan" else [])
        self.state_tensors = [[_real(s[key]) for key in keys] for s in states]
        self.steps = [s["step"] for s in states]
        for p, tensors in zip(params, self.state_tensors):
            if not (p.is_contiguous() and all(t.is_contiguous() for t in tensors)):
                raise _NeedsStaging
        n = len(moment_keys(rule.algorithm, rule.amsgrad))
        rows = []
        for tensors in self.state_tensors:
            addresses = [t.data_ptr() for t in tensors]
            # unused slots repeat the second moment (the kernel variant never touches them)
            row = addresses[:n] + addresses[1:2] * (3 - n) + [addresses[-1] if self.mode == "kahan" else 0]
            row += (addresses[n : 2 * n] + addresses[n + 1 : n + 2] * (3 - n)) if self.quantized else [0, 0, 0]
            rows.append(row)
        self.state_addresses = np.array(rows, dtype=np.int64).reshape(len(members), 7)
        self.chunks = torch.from_numpy(_chunk_table([p.numel() for p in params])).to(self.device)
        self.stream_keys: tuple | None = None

    def table(self, batch: GroupBatch) -> torch.Tensor:
        params = [_real(batch.params[i]) for i in self.members]
        grads = [_real(batch.grads[i]) for i in self.members]
        if not all(t.is_contiguous() for t in params + grads):
            raise _NeedsStaging
        table = np.empty((len(self.members), 9), dtype=np.int64)
        table[:, 0] = [p.data_ptr() for p in params]
        table[:, 1] = [g.data_ptr() for g in grads]
        table[:, 2:] = self.state_addresses
        return torch.from_numpy(table).to(self.device, non_blocking=True)

    def step_keys(self, rule: UpdateRule, param_indices: list[int] | None, counts) -> torch.Tensor | None:
        """Stochastic rounding's keys k_{s,t} as an int64[T, 4] device array; ``counts``
        are host step counts (NumPy) or device step tensors (never read on the host)."""
        if self.mode != "stochastic":
            return None
        indices = [param_indices[i] for i in self.members]
        if self.stream_keys is None or self.stream_keys[0] != (rule.seed, indices):
            keys = rounding.param_stream_keys(rule.seed, indices).astype(np.int64)
            self.stream_keys = ((rule.seed, indices), keys, torch.from_numpy(keys).to(self.device))
        if isinstance(counts, np.ndarray):
            keys = rounding.step_keys(self.stream_keys[1], counts[:, None]).astype(np.int64)
            return torch.from_numpy(keys).to(self.device, non_blocking=True)
        steps = torch.stack(counts).to(self.device, torch.int64)[:, None]
        return storage.mix32(self.stream_keys[2] ^ steps)


class _NeedsStaging(Exception):
    """A non-contiguous param, gradient or state: this group goes through foreach ops."""


def _buckets(batch: GroupBatch, rule: UpdateRule) -> list[_Bucket]:
    key = (batch.key, rule.algorithm, rule.amsgrad)
    cached = batch.cache.get("triton")
    if cached is not None and cached[0] == key:
        return cached[1]
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(batch.params):
        by_kind.setdefault((p.device, _real(p).dtype, moment_storage(batch.states[i], p)), []).append(i)
    buckets = [_Bucket(members, batch, rule, kind[2]) for kind, members in by_kind.items()]
    batch.cache["triton"] = (key, buckets)
    return buckets


def _device_array(value, length: int, device: torch.device) -> torch.Tensor:
    """A float64 device array of ``length`` from a float, a 0-d or a [length] tensor."""
    return torch.as_tensor(value, dtype=torch.float64, device=device).expand(length).contiguous()


def _step_scalars(bucket: _Bucket, rule: UpdateRule) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Advance the bucket's step counters; per-tensor step sizes and sqrt(1 - beta2^t)
    as float64 device arrays, and the step counts (host array, or the device tensors).
    Counters on the device (capturable or fused, as torch places them) never go
    through the host."""
    torch._foreach_add_(bucket.steps, 1)
    count = len(bucket.steps)
    if bucket.steps[0].device.type != "cpu" or rule.capturable:
        scalars = rule.step_scalars(torch.stack(bucket.steps).to(bucket.device, torch.float64))
        return (
            _device_array(scalars.step_size, count, bucket.device),
            _device_array(scalars.bias_correction2_sqrt, count, bucket.device),
            bucket.steps,
        )
    counts = np.array([s.item() for s in bucket.steps], dtype=np.float64)
    step_size, bias_correction2_sqrt = step_scalar_arrays(rule, counts)
    return (
        torch.from_numpy(step_size).to(bucket.device, non_blocking=True),
        torch.from_numpy(bias_correction2_sqrt).to(bucket.device, non_blocking=True),
        counts,
    )


def _constant(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


_foreach_step = list_kernel(foreach.adam, foreach.adamax, fused=True)


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
    """Advance the steps and update every tensor of the group, one launch per bucket."""
    try:
        buckets = _buckets(batch, rule)
        tables = [bucket.table(batch) for bucket in buckets]
    except _NeedsStaging:
        _foreach_fallback(batch, rule)
        return
    group = rule.group_scalars()
    grad_scale, found_inf = batch.grad_scale, batch.found_inf
    amp = grad_scale is not None
    for bucket, table in zip(buckets, tables):
        step_size, bias_correction2_sqrt, counts = _step_scalars(bucket, rule)
        keys = bucket.step_keys(rule, batch.param_indices, counts)
        compute = tl.float64 if bucket.storage == torch.float64 else tl.float32
        decay_factor = _device_array(1.0 if group.decay_factor is None else group.decay_factor, 1, bucket.device)
        unused = table  # any pointer: read only when AMP is on
        grid = (bucket.chunks.shape[0],)
        _fused_step[grid](
            table,
            bucket.chunks,
            step_size,
            bias_correction2_sqrt,
            grad_scale if amp else unused,
            found_inf if amp else unused,
            table if keys is None else keys,
            1.0 - _constant(group.beta1),
            _constant(group.beta2),
            _constant(group.one_minus_beta2),
            group.eps,
            group.l2_weight_decay,
            decay_factor,
            PARAM_STORAGE=_triton_dtype(bucket.storage),
            STATE_STORAGE=_triton_dtype(bucket.state_storage),
            COMPUTE=compute,
            ADAMAX=rule.algorithm == "adamax",
            AMSGRAD=rule.amsgrad,
            MAXIMIZE=rule.maximize,
            DECAY=group.decay_kind,
            AMP=amp,
            KAHAN=bucket.mode == "kahan",
            STOCHASTIC=bucket.mode == "stochastic",
            QUANT_BITS=bucket.quantized.bits if bucket.quantized else 0,
            QBLOCK=bucket.quantized.block if bucket.quantized else 1,
            BLOCK=BLOCK,
        )
        if amp:
            torch._foreach_sub_(bucket.steps, [found_inf.to(s.device) for s in bucket.steps])
