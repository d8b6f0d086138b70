r"""Fused multi-tensor Triton kernel for CUDA: one launch per param group and dtype.

Each program updates one chunk of at most :data:`BLOCK` elements of one tensor; a
table of raw addresses (param, grad, exp_avg, second moment, max second moment) and
a table of chunks let a single launch cover every tensor of the group, whatever
their sizes.  The element math is the CPU kernel's (see :mod:`adamkit.kernels.cpu`),
in fp32 (fp64 for fp64 params), with bf16/fp16 rounded to nearest even on store.

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

from .. import rounding
from ..rule import UpdateRule, step_scalar_arrays
from ..state import COMPENSATION_KEY, moment_keys
from . import foreach, storage
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
        BLOCK: tl.constexpr,
    ):
        chunk = tl.program_id(0)
        t = tl.load(chunk_ptr + 3 * chunk)
        first = tl.load(chunk_ptr + 3 * chunk + 1)
        end = tl.load(chunk_ptr + 3 * chunk + 2)
        skip = False
        grad_scale = 1.0
        if AMP:
            skip = tl.load(found_inf_ptr) != 0
            grad_scale = tl.load(grad_scale_ptr).to(COMPUTE)
        if not skip:
            param_pointer = tl.pointer_type(PARAM_STORAGE)
            state_pointer = tl.pointer_type(STATE_STORAGE)
            param = tl.load(table_ptr + 6 * t).to(param_pointer)
            grad = tl.load(table_ptr + 6 * t + 1).to(param_pointer)
            exp_avg = tl.load(table_ptr + 6 * t + 2).to(state_pointer)
            second = tl.load(table_ptr + 6 * t + 3).to(state_pointer)
            max_second = tl.load(table_ptr + 6 * t + 4).to(state_pointer)
            compensation = tl.load(table_ptr + 6 * t + 5).to(param_pointer)
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
                g = g / grad_scale
            if MAXIMIZE:
                g = -g
            if DECAY == 1:
                g = g + l2_weight_decay * p
            if DECAY == 2:
                p = p * tl.load(decay_factor_ptr).to(COMPUTE)
            m = tl.load(exp_avg + offsets, mask=mask).to(COMPUTE)
            m = m + one_minus_beta1 * (g - m)
            _put(exp_avg, offsets, mask, m, key_exp_avg, STATE_STORAGE, STOCHASTIC)
            if ADAMAX:
                u = tl.maximum(beta2 * tl.load(second + offsets, mask=mask).to(COMPUTE), tl.abs(g) + eps)
                _put(second, offsets, mask, u, key_second, STATE_STORAGE, STOCHASTIC)
                denom = u
            else:
                v = beta2 * tl.load(second + offsets, mask=mask).to(COMPUTE) + one_minus_beta2 * g * g
                _put(second, offsets, mask, v, key_second, STATE_STORAGE, STOCHASTIC)
                if AMSGRAD:
                    v = tl.maximum(tl.load(max_second + offsets, mask=mask).to(COMPUTE), v)
                    _put(max_second, offsets, mask, v, key_max, STATE_STORAGE, STOCHASTIC)
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
    """One (device, param dtype, state dtype) bucket of a group: what stays fixed between steps."""

    def __init__(self, members: list[int], batch: GroupBatch, rule: UpdateRule):
        self.members = members
        params = [_real(batch.params[i]) for i in members]
        states = [batch.states[i] for i in members]
        self.device = params[0].device
        self.storage = params[0].dtype
        self.state_storage = _real(states[0]["exp_avg"]).dtype
        self.mode = rounding.effective_rounding(rule.rounding, self.storage, self.state_storage)
        keys = moment_keys(rule.algorithm, rule.amsgrad) + ([COMPENSATION_KEY] if self.mode == "kahan" else [])
        self.state_tensors = [[_real(s[key]) for key in keys] for s in states]
        self.steps = [s["step"] for s in states]
        for p, tensors in zip(params, self.state_tensors):
            if not (p.is_contiguous() and all(t.is_contiguous() for t in tensors)):
                raise _NeedsStaging
        rows = []
        for tensors in self.state_tensors:
            addresses = [t.data_ptr() for t in tensors]
            maximum = addresses[2] if rule.amsgrad else addresses[1]
            rows.append([addresses[0], addresses[1], maximum, addresses[-1] if self.mode == "kahan" else 0])
        self.state_addresses = np.array(rows, dtype=np.int64).reshape(len(members), 4)
        self.chunks = torch.from_numpy(_chunk_table([p.numel() for p in params])).to(self.device)
        self.stream_keys: tuple | None = None

    def table(self, batch: GroupBatch) -> torch.Tensor:
        params = [_real(batch.params[i]) for i in self.members]
        grads = [_real(batch.grads[i]) for i in self.members]
        if not all(t.is_contiguous() for t in params + grads):
            raise _NeedsStaging
        table = np.empty((len(self.members), 6), dtype=np.int64)
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
        state_dtype = _real(batch.states[i]["exp_avg"]).dtype
        by_kind.setdefault((p.device, _real(p).dtype, state_dtype), []).append(i)
    buckets = [_Bucket(members, batch, rule) for members in by_kind.values()]
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
        batch.grads = torch._foreach_div(batch.grads, batch.grad_scale)
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
            BLOCK=BLOCK,
        )
        if amp:
            torch._foreach_sub_(bucket.steps, [found_inf.to(s.device) for s in bucket.steps])
