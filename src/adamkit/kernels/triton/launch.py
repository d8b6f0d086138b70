"""The Triton kernel's host side: a group's buckets (addresses, chunk tables, counters,
the staging of layouts the kernel does not address in place, as the CPU kernel stages
them), the per-tensor scalars and keys, and the launches (with a foreach fallback for a
group to stage while a CUDA graph is captured)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton.language as tl

from ...guard import is_dense
from ...rule import GroupScalars, UpdateRule
from ...sharding import per_tensor_totals
from ...specs import rounding
from ...specs.quantization import QuantFormat
from ...state import MU_PRODUCT_KEY, PARAM_EXTRA_KEY, moment_storage
from .. import foreach, storage
from ..amp import unscaled
from ..host import (
    STATE_COLUMNS,
    HostCounters,
    addressed_forms,
    check_addressed,
    chunk_table,
    clip_update_sizes,
    copy_back,
    draws_random_bits,
    group_constants,
    set_cautious_scales,
    stage_rows,
    state_keys,
    state_row,
    tensor_scalar_columns,
)
from ..lists import list_kernel
from ..types import GroupBatch, as_real
from . import config
from .config import COMPILE_OPTIONS
from .elements import _clipping_sums, _fused_step


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
        self.random = draws_random_bits(rule.algorithm, rule.rounding, self.param_dtype, state_storage)
        keys, moment_count = state_keys(rule.algorithm, rule.amsgrad, self.quantized, self.mode)
        self.state_tensors = [[as_real(s[key]) for key in keys] for s in states]
        moment_dtype = torch.float32 if self.quantized else state_storage
        forms = [
            addressed_forms(rule.algorithm, rule.amsgrad, self.quantized, self.mode, moment_dtype, p) for p in params
        ]
        check_addressed(params, self.state_tensors, keys, forms, members)
        self.steps = [s["step"] for s in states]
        in_order = not self.random and not self.quantized  # random bits and codes follow the row-major index
        #: per row: updated in place (else staged, as the CPU kernel stages it: its param,
        #: gradient and state copied into contiguous buffers, updated there, copied back)
        self.direct = [
            (p.is_contiguous() or (in_order and is_dense(p)))
            and (self.quantized is not None or all(t.stride() == p.stride() for t in tensors))
            for p, tensors in zip(params, self.state_tensors)
        ]
        self.staged_rows = [row for row, direct in enumerate(self.direct) if not direct]
        self._state_row = functools.partial(  # (of the tensors' addresses)
            state_row,
            moment_count=moment_count,
            extra=self.mode in PARAM_EXTRA_KEY,
            quantized=self.quantized is not None,
            copied=bool(rule.spec.weight_copy),
        )
        rows = [
            self._state_row_of(tensors) if direct else [0] * STATE_COLUMNS
            for tensors, direct in zip(self.state_tensors, self.direct)
        ]
        self.state_addresses = np.array(rows, dtype=np.int64).reshape(len(members), STATE_COLUMNS)
        quantized_shape, shape = (config.QUANTIZED_BLOCK, config.QUANTIZED_NUM_WARPS), (config.BLOCK, config.NUM_WARPS)
        self.block, self.num_warps = quantized_shape if self.quantized else shape
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

    def _state_row_of(self, tensors: list[torch.Tensor]) -> list[int]:
        return self._state_row([t.data_ptr() for t in tensors])

    def table(self, batch: GroupBatch) -> tuple[torch.Tensor, list]:
        """The address table on the device, and the staged tensors to copy back after
        the launches.  Without staging the table is uploaded again only when a param or
        gradient address changed (so a CUDA graph replays with no host-to-device copy).
        The addresses are those the step's guard read and checked
        (:class:`adamkit.guard.StepGuard`); rows whose param or state is not laid out
        for the kernel, or whose gradient is not laid out like its param, are staged."""
        checked = batch.checked
        if self.whole_group:  # (a complex tensor's address and layout are its real view's)
            param_ptrs, grad_ptrs = checked.param_ptrs, checked.grad_ptrs
        else:
            param_ptrs = [checked.param_ptrs[i] for i in self.members]
            grad_ptrs = [checked.grad_ptrs[i] for i in self.members]
        moving = np.array([param_ptrs, grad_ptrs], dtype=np.int64).T
        staged_rows = self.staged_rows
        if checked.mismatched_rows:
            rows = {member: row for row, member in enumerate(self.members)}
            staged_rows = sorted({*staged_rows, *(rows[i] for i in checked.mismatched_rows if i in rows)})
        if staged_rows:
            return self._staged(batch, moving, staged_rows)
        if self.moving is None or not np.array_equal(moving, self.moving):
            table = np.concatenate([moving, self.state_addresses], axis=1)
            self.aligned = bool((table % 16 == 0).all())  # unused slots hold 0
            self.device_table = torch.from_numpy(table).to(self.device, non_blocking=True)
            self.moving = moving
        return self.device_table, []

    def _staged(self, batch: GroupBatch, moving: np.ndarray, rows: list[int]) -> tuple[torch.Tensor, list]:
        """A table addressing contiguous copies of ``rows``' params, gradients and state
        (kept in the list returned until they are copied back).  Not while a CUDA graph
        is captured: the copies' addresses would be fixed in the graph's table."""
        if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise _NeedsStaging
        table = np.concatenate([moving, self.state_addresses], axis=1)
        params = [as_real(batch.params[i]) for i in self.members]
        grads = [as_real(batch.grads[i]) for i in self.members]
        staged = stage_rows(table, rows, params, grads, self.state_tensors, self._state_row_of)
        self.moving = None  # (the next step without staging uploads its own table)
        self.aligned = bool((table % 16 == 0).all())
        return torch.from_numpy(table).to(self.device, non_blocking=True), staged

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
    """Rows to stage while a CUDA graph is captured: this group goes through foreach ops."""


def _buckets(batch: GroupBatch, rule: UpdateRule) -> list[_Bucket]:
    key = (batch.key, rule.algorithm, rule.amsgrad, rule.cautious)
    cached = batch.cache.get("triton")
    if cached is not None and cached[0] == key:
        return cached[1]
    by_kind: dict[tuple, list[int]] = {}
    for i, p in enumerate(batch.params):
        storage = moment_storage(batch.states[i], p, rule.algorithm)
        by_kind.setdefault((p.device, as_real(p).dtype, storage), []).append(i)
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


def normalization(fmt: QuantFormat | None, spec) -> int:
    """How the first moment is stored, as a compile-time number: 0 as it is, else
    divided by the second moment's divisor (:class:`adamkit.algorithms.FirstMomentScale`:
    1 its root, 2 the norm itself)."""
    return int(spec.first_moment_scale) if fmt is not None and fmt.normalized_first_moment else 0


def float_maps(fmt: QuantFormat) -> int:
    """The second moments' float maps as one compile-time number: E + 16 F + 256 R, E
    the exponent bits of the map, F those of the finer map (0: none), R 1 where the
    second map is the root map."""
    return fmt.exponent_bits + 16 * (fmt.fine_exponent_bits or 0) + 256 * int(fmt.root_map)


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
        NORMALIZE=normalization(bucket.quantized, rule.spec),
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


_foreach_step = list_kernel(foreach.ALGORITHMS, one_by_one=False)


def _foreach_fallback(batch: GroupBatch, rule: UpdateRule) -> None:
    """A group with rows to stage while a CUDA graph is captured goes through foreach
    ops, with the GradScaler's work done here instead of in-kernel and the kernel's
    storage semantics (16-bit values rounded once per update)."""
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
        laid_out = [bucket.table(batch) for bucket in buckets]
    except _NeedsStaging:
        _foreach_fallback(batch, rule)
        return
    group_scalars = rule.group_scalars()
    grad_scale, found_inf = batch.grad_scale, batch.found_inf
    amp = grad_scale is not None
    if amp and found_inf is not None and any(b.counters is not None for b in buckets) and found_inf.item():
        return
    for bucket, (table, staged) in zip(buckets, laid_out):
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
        copy_back(staged)  # (in the kernel's stream order)
