"""The CPU kernel's host side: a group's buckets (validated addresses, staging of
layouts the loops do not take, counters), the per-step scalars and keys, and the
launch of the compiled loops.  Imported only where numba is."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numba
import numpy as np
import torch
from torch import Tensor

from ...guard import is_dense
from ...rule import GroupScalars, UpdateRule, as_number
from ...sharding import per_tensor_totals
from ...specs import rounding
from ...specs.quantization import QuantFormat
from ...state import PARAM_EXTRA_KEY, moment_storage
from ..amp import inverse_scale
from ..host import (
    COLUMNS,
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
)
from ..types import GroupBatch, as_real
from . import layout
from .layout import _QUANTIZED_STORAGE, _ROUNDING_WITNESS, _STORAGE, _VARIANT_WITNESS, CHUNK, algorithm_witness
from .loops import (
    _agreement_counts,
    _clipping_sums,
    _fused_quantized_step,
    _fused_step,
    _quantized_clipping_sums,
    _windowed_step,
)


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
        self.random = draws_random_bits(rule.algorithm, rule.rounding, param_dtype, moment_storage)
        self.copied = rule.spec.weight_copy is not None
        self.param_witness = np.empty(0, dtype=_STORAGE[param_dtype])
        self.state_witness = np.empty(
            0, dtype=_QUANTIZED_STORAGE[moment_storage.name] if quantized else _STORAGE[moment_dtype]
        )
        self.rounding_witness = np.empty(0, dtype=_ROUNDING_WITNESS[self.mode])
        self.counters = HostCounters([batch.states[i] for i in members], rule.algorithm)
        self.algorithm_witness = algorithm_witness(rule.algorithm)
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
        self.windows = np.array(window_table(self.chunks, layout.PRE_PASS_WINDOW), dtype=np.int64).reshape(-1, 4)
        self.clipped = rule.spec.clips_update
        self.cautious = rule.cautious
        keeps_maximum = bool(rule.amsgrad and rule.spec.amsgrad)
        self.variant_witness = np.empty(0, dtype=_VARIANT_WITNESS[rule.cautious, keeps_maximum])
        self.whole_group = members == list(range(len(batch.params)))
        #: the rows always staged (their param or state is not laid out for the kernel)
        self.staged_rows = [row for row, direct in enumerate(self.direct) if not direct]
        self.restaged_last = False
        self.table = np.empty((len(members), len(COLUMNS)), dtype=np.int64)
        self.table[:, 2:] = self.state_addresses
        self.stream_keys: tuple | None = None

    def _state_row(self, tensors: list[Tensor]) -> list[int]:
        addresses = [t.data_ptr() for t in tensors]
        return state_row(addresses, self.moment_count, self.mode in PARAM_EXTRA_KEY, self.quantized, self.copied)

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
        self.table[:, 2:] = self.state_addresses
        params, grads = [batch.params[i] for i in self.members], [batch.grads[i] for i in self.members]
        return stage_rows(self.table, rows, params, grads, self.state_tensors, self._state_row)


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
        by_storage.setdefault((as_real(p).dtype, moment_storage(batch.states[i], p, rule.algorithm)), []).append(i)
    buckets = [_Bucket(members, batch, rule, dtypes) for dtypes, members in by_storage.items()]
    batch.cache["cpu"] = (key, buckets)
    return buckets


def _flags_and_constants(rule: UpdateRule, group_scalars: GroupScalars, grad_scale: Tensor | None):
    flags = np.array([rule.maximize, rule.amsgrad, group_scalars.decay_kind], dtype=np.int64)
    gradient_factor = 1.0 if grad_scale is None else inverse_scale(grad_scale).item()
    constants = np.array([*map(float, group_constants(group_scalars)), gradient_factor], dtype=np.float64)
    return flags, constants


#: the kernel runs in one thread at a time (an offloaded step on the host worker, another
#: optimizer's in the caller's): numba's workqueue threading layer aborts the process on
#: concurrent parallel regions, and the thread settings below are the process's
_ONE_LAUNCH_AT_A_TIME = threading.Lock()


def step(batch: GroupBatch, rule: UpdateRule) -> None:
    """Advance the steps and update every tensor of the group_scalars, one compiled call per bucket.

    A GradScaler's ``found_inf`` skips the step before anything moves (reading it
    costs nothing on the CPU); its ``grad_scale`` is divided out in the kernel."""
    if batch.found_inf is not None and batch.found_inf.item():
        return
    with _ONE_LAUNCH_AT_A_TIME, _following_torch_threads():
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
            arguments = (keys, bucket.real_sizes, decay, *witnesses, bucket.variant_witness)
            _windowed_step(table, bucket.chunks, bucket.windows, tensor_scalars, constants, flags, *arguments)
        else:
            if bucket.clipped or bucket.cautious:
                _sharded_pre_pass(batch, bucket, table, tensor_scalars, constants, flags, witnesses, decay_rate)
            launch(table, bucket.chunks, tensor_scalars, constants, flags, keys, *witnesses, bucket.variant_witness)
        copy_back(staged)
