r"""What a step may touch: every param and gradient checked at every step, before anything is written.

A param group's params are validated in depth when they change (:mod:`adamkit.stepping`);
between those moments a user may still have changed any of them in place:
``model.half()`` or ``.to()`` (new data under the same ``Parameter``), ``p.data = ...``,
``p.grad.data = ...``, a resize.  The fused kernels address raw memory, so at every step
:class:`StepGuard` reads each param's address, size in bytes, dtype, shape and strides,
and each gradient's address, shape, dtype, device and strides, compares them value by
value with what it last validated, and each one's extent with the end of its storage: a
few C-level passes over the group, no Python loop, when nothing changed (the common
case).  A gradient must have its param's shape and strides, dtype and device.  Anything else goes through :meth:`StepGuard.validate`, row by
row, which either accepts the change (a param whose data was replaced by a tensor of the
same kind; a gradient laid out unlike its param, which the kernels then stage) or raises
a ``RuntimeError`` that names the param, what changed and what to do, with nothing
touched.  It also refuses a param or gradient that reaches past the end of its storage
(one shrunk in place by ``untyped_storage().resize_()``, which moves the memory) and a
param whose elements share memory (an expanded view).

A param keeps its address from step to step (the kernels update it in place), but an
unchanged address, shape and strides is not enough: ``untyped_storage().resize_()``
shrinks or frees the memory under a view without changing the view (and an allocator may
hand the same address back), so every step also compares each param's and gradient's
extent with the end of its storage.  A param that moved (``model.half()``, ``.to()``,
``.data = ...``) or was re-viewed in place as another dtype is checked in full.

Lazily negated or conjugated tensors (``is_neg()``, ``is_conj()``: ``z.conj().imag``,
or the gradient autograd leaves for a complex param used as ``p.conj()``) hold their
values' negation in memory: the front resolves such gradients before the guard sees them
(:func:`resolved`), and a param with the flag is refused (a kernel writing its memory
would write the negation).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from functools import cached_property
from operator import add, attrgetter, eq, le, mul

import numpy as np
import torch
from torch import Tensor

_data_ptr = Tensor.data_ptr
_numel = Tensor.numel
_stride = Tensor.stride
_get_device = Tensor.get_device
_dtype_of = attrgetter("dtype")
_size = attrgetter("shape")  # (5x faster than Tensor.size, which goes through torch function dispatch)
_nbytes_of = attrgetter("nbytes")
_storage_of = Tensor.untyped_storage
_storage_offset = Tensor.storage_offset
_storage_nbytes = torch.UntypedStorage.nbytes
_is_conj = Tensor.is_conj
_is_neg = Tensor.is_neg


@dataclass
class Layout:
    """The params of a group as last validated (one entry per param, in order)."""

    ids: tuple
    param_ptrs: list[int]
    #: element counts times element sizes
    nbytes: list[int]
    dtypes: list[torch.dtype]
    devices: list[int]
    shapes: list[torch.Size]
    strides: list[tuple]
    #: pairs of rows whose params share memory (their updates would race in a fused kernel)
    overlapping: list[tuple[int, int]]
    #: the bytes from each param's first element to just past its last
    spans: list[int]
    #: each param's element size in bytes
    itemsizes: list[int]

    @cached_property
    def complex(self) -> bool:
        return any(dtype.is_complex for dtype in self.dtypes)


@dataclass
class CheckedTensors:
    """One step's params and gradients as the guard let them through."""

    param_ptrs: list[int]
    grad_ptrs: list[int]
    #: rows whose gradient is not laid out like its param (kernels stage them)
    mismatched_rows: list[int]
    #: pairs of rows whose params share memory (see :attr:`Layout.overlapping`)
    overlapping: list[tuple[int, int]] = ()


class StepGuard:
    """One param group's per-step check (see the module docstring).

    ``generation`` counts the times the params' layout changed (not their addresses):
    kernels key what they derived from the layout on it."""

    def __init__(self) -> None:
        self.layout: Layout | None = None
        self.generation = 0
        #: each param's (dtype, shape, device) as last validated, by identity
        self.known: dict[int, tuple] = {}

    def check(self, params: list[Tensor], grads: list[Tensor], where: str, state_of, sparse_message: str):
        """The step's :class:`CheckedTensors`, or a ``RuntimeError`` (``where``: the
        group, for messages; ``state_of(j)``: param ``j``'s state, empty if none)."""
        layout = self.layout
        try:
            param_ptrs = list(map(_data_ptr, params))
            grad_ptrs = list(map(_data_ptr, grads))
            unchanged = (
                layout is not None
                and param_ptrs == layout.param_ptrs
                # what each param and gradient must still be (a gradient: its param's layout)
                and _all_equal(_nbytes_of, params, layout.nbytes)
                and _all_equal(_dtype_of, params, layout.dtypes)
                and _all_equal(_size, params, layout.shapes)
                and _all_equal(_stride, params, layout.strides)
                and _all_equal(_size, grads, layout.shapes)
                and _all_equal(_dtype_of, grads, layout.dtypes)
                and _all_equal(_get_device, grads, layout.devices)
                and _all_equal(_stride, grads, layout.strides)
                and (0 not in grad_ptrs or _empty_where_null(grad_ptrs, layout.nbytes))
                and _within_storages(params, layout)
                and _within_storages(grads, layout)
                and not (layout.complex and any(map(_is_conj, params)))
            )
        except (RuntimeError, TypeError):  # a sparse or storage-less tensor: row by row
            unchanged = False
        if unchanged:
            return CheckedTensors(param_ptrs, grad_ptrs, [], layout.overlapping)
        return self.validate(params, grads, where, state_of, sparse_message)

    def validate(self, params: list[Tensor], grads: list[Tensor], where: str, state_of, sparse_message: str):
        """Row by row: raise for what cannot be stepped, else remember the params as they are."""
        mismatched = []
        for j, (p, g) in enumerate(zip(params, grads)):
            name = f"params[{j}]{where}"
            self._check_unchanged_param(p, j, name, state_of)
            _check_gradient(p, g, name, sparse_message)
            _check_within_storage(p, name)
            if p.is_neg() or p.is_conj():
                raise RuntimeError(
                    f"{name} is a lazily {'conjugated' if p.is_conj() else 'negated'} view (is_conj() or is_neg(): "
                    "its memory holds other values than it shows), which a kernel cannot write in place; "
                    "resolve it first: p.data = p.data.resolve_conj().resolve_neg()"
                )
            if overlaps_itself(p):
                raise RuntimeError(
                    f"{name} has elements that share memory (shape {_shown(p.shape)}, strides {p.stride()}: an "
                    "expanded view?); torch.optim cannot step it either: give each element memory of its own (clone())"
                )
            _check_within_storage(g, f"the gradient of {name}")
            if g.stride() != p.stride() or not is_dense(g):  # the kernels stage it
                mismatched.append(j)
        layout = _layout_of(params)
        if self.layout is None or _kind(layout) != _kind(self.layout):
            self.generation += 1
        self.layout = layout
        for p in params:
            self.known[id(p)] = (weakref.ref(p), _kind_of(p))
        return CheckedTensors(layout.param_ptrs, list(map(_data_ptr, grads)), mismatched, layout.overlapping)

    def _check_unchanged_param(self, p: Tensor, j: int, name: str, state_of) -> None:
        """A param with state may move (new data of the same kind), but not change dtype,
        shape or device: its state was made for what it was (torch.optim fails there too)."""
        known = self.known.get(id(p))
        if known is None or known[0]() is not p or known[1] == _kind_of(p) or not state_of(j):
            return
        changes = [
            f"{what} {_shown(old)} -> {_shown(new)}"
            for what, old, new in zip(("dtype", "shape", "device"), known[1], _kind_of(p))
            if old != new
        ]
        raise RuntimeError(
            f"{name} changed since the optimizer last stepped it ({', '.join(changes)}; model.half(), .to() or "
            f"`.data = ...`?), but its optimizer state was made for it as it was. Convert the model before creating "
            f"the optimizer, or convert the state with it: optimizer.load_state_dict(optimizer.state_dict()) casts "
            f"every state to its param's dtype and device (a param of a new shape needs a fresh state: "
            f"optimizer.state.pop(param))"
        )


def _all_equal(read, tensors: list[Tensor], expected: list) -> bool:
    """Whether ``read(tensors[i]) == expected[i]`` for every i: C-level passes, each value
    compared and dropped as it is made (a list of thousands of shapes or strides, held at
    once, sets off the garbage collector's passes, which doubled the check's time)."""
    return all(map(eq, map(read, tensors), expected))


def _within_storages(tensors: list[Tensor], layout: Layout) -> bool:
    """Whether each tensor's extent (its storage offset, then the span of its row of
    ``layout``: a gradient is laid out as its param) ends within its storage (C-level
    passes, as :func:`_all_equal`)."""
    needed = map(add, map(mul, map(_storage_offset, tensors), layout.itemsizes), layout.spans)
    return all(map(le, needed, map(_storage_nbytes, map(_storage_of, tensors))))


def resolved(grads: list[Tensor], complex_params: bool = True) -> list[Tensor]:
    """``grads`` with any lazy conjugation or negation applied (a copy of those that
    have one; the others as they are): the kernels read memory, not the flags.  (Reading
    the flags costs a quarter of resolving every gradient; only a complex tensor is ever
    conjugated, so ``complex_params=False`` skips that flag.)"""
    if any(map(_is_neg, grads)) or (complex_params and any(map(_is_conj, grads))):
        return list(map(Tensor.resolve_neg, map(Tensor.resolve_conj, grads)))
    return grads


def _empty_where_null(ptrs: list[int], nbytes: list[int]) -> bool:
    """Whether every null address belongs to an empty tensor (which is never read)."""
    return all(nbytes[i] == 0 for i, ptr in enumerate(ptrs) if ptr == 0)


def is_dense(t: Tensor) -> bool:
    """True when ``t`` covers one block of memory with no gaps or overlaps (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda pair: pair[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def overlaps_itself(t: Tensor) -> bool:
    """Whether elements of ``t`` certainly share memory (a stride 0 over more than one
    element: an expanded view), as torch's in-place ops refuse them."""
    return t.numel() > 1 and any(stride == 0 and size > 1 for size, stride in zip(t.shape, t.stride()))


def _layout_of(params: list[Tensor]) -> Layout:
    ptrs, numels = list(map(_data_ptr, params)), list(map(_numel, params))
    return Layout(
        ids=tuple(map(id, params)),
        param_ptrs=ptrs,
        nbytes=list(map(_nbytes_of, params)),
        dtypes=list(map(_dtype_of, params)),
        devices=list(map(_get_device, params)),
        shapes=list(map(_size, params)),
        strides=list(map(_stride, params)),
        overlapping=_overlapping(params, ptrs, numels),
        spans=[_end(p, ptr) - ptr if n else 0 for p, ptr, n in zip(params, ptrs, numels)],
        itemsizes=list(map(Tensor.element_size, params)),
    )


def _kind_of(p: Tensor) -> tuple:
    return (p.dtype, p.shape, p.device)


def _kind(layout: Layout) -> tuple:
    """Everything of a layout but the addresses."""
    return (layout.nbytes, layout.dtypes, layout.devices, layout.strides, layout.overlapping)


#: the most bytes of interleaved strided views compared byte by byte (beyond it, views
#: whose extents interleave are taken to share memory)
COMPARED_SPAN_LIMIT = 1 << 28


def _overlapping(params: list[Tensor], ptrs: list[int], numels: list[int]) -> list[tuple[int, int]]:
    """Pairs of rows (in order) whose memory intersects.  Each param's extent (from its first to its
    last element, by address) finds the candidates: dense params whose extents meet share
    memory.  A cluster of extents that holds a strided view (column blocks of one matrix
    interleave without sharing an element) is compared byte by byte, up to
    :data:`COMPARED_SPAN_LIMIT` bytes; a larger one is taken to share memory."""
    extents = sorted((ptr, _end(p, ptr), j) for j, (p, ptr, n) in enumerate(zip(params, ptrs, numels)) if n)
    pairs, cluster, reach, owner = [], [], 0, -1
    for start, end, j in extents:
        if start >= reach:
            pairs += _shared_in(cluster, params, ptrs)
            cluster = []
        cluster.append((start, end, j, owner if start < reach else -1))
        if end > reach:
            reach, owner = end, j
    return sorted((min(pair), max(pair)) for pair in pairs + _shared_in(cluster, params, ptrs))


def _shared_in(cluster: list[tuple[int, int, int, int]], params: list[Tensor], ptrs: list[int]):
    """The pairs of a cluster of chained extents (start, end, row, the row reaching
    farthest before it or -1) that share memory."""
    if len(cluster) < 2:
        return []
    base, span = cluster[0][0], max(end for _, end, _, _ in cluster) - cluster[0][0]
    if all(is_dense(params[j]) for _, _, j, _ in cluster) or span > COMPARED_SPAN_LIMIT:
        return [(before, j) for _, _, j, before in cluster if before >= 0]
    marked = np.zeros(span, dtype=np.uint8)
    pairs = []
    for position, (_, _, j, _) in enumerate(cluster):
        if _bytes_of(params[j], ptrs[j] - base, marked).any():
            earlier = (k for _, _, k, _ in cluster[:position])
            pairs.append((next(k for k in earlier if _share_bytes(params, ptrs, k, j, base, span)), j))
        _bytes_of(params[j], ptrs[j] - base, marked)[...] = 1
    return pairs


def _bytes_of(t: Tensor, offset: int, marked: np.ndarray) -> np.ndarray:
    """The bytes of ``marked`` that ``t``'s elements cover, ``t`` starting ``offset``
    bytes in (a view, one row of bytes per element)."""
    size = t.element_size()
    return np.lib.stride_tricks.as_strided(
        marked[offset:], shape=(*t.shape, size), strides=(*(stride * size for stride in t.stride()), 1)
    )


def _share_bytes(params: list[Tensor], ptrs: list[int], k: int, j: int, base: int, span: int) -> bool:
    """Whether rows ``k`` and ``j`` (of a cluster starting at address ``base`` and
    ``span`` bytes long) cover a byte in common."""
    marked = np.zeros(span, dtype=np.uint8)
    _bytes_of(params[k], ptrs[k] - base, marked)[...] = 1
    return bool(_bytes_of(params[j], ptrs[j] - base, marked).any())


def share_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (on one device) cover a byte in common, compared as the
    step's check compares params (strided views whose extents interleave, byte by byte)."""
    return bool(_overlapping([a, b], [_data_ptr(a), _data_ptr(b)], [a.numel(), b.numel()]))


def extent(t: Tensor) -> tuple[int, int]:
    """The addresses from ``t``'s first element to just past its last (equal when ``t``
    is empty): the memory any strided view of it may touch."""
    ptr = _data_ptr(t)
    return (ptr, _end(t, ptr)) if t.numel() else (ptr, ptr)


def _end(t: Tensor, ptr: int) -> int:
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return ptr + (last + 1) * t.element_size()


def _check_within_storage(t: Tensor, name: str) -> None:
    """Raise if ``t`` reaches past the end of its storage (a storage shrunk in place by
    ``untyped_storage().resize_()``: torch's own ops would run past it too)."""
    if t.numel() == 0 or t.device.type == "meta":
        return
    storage, ptr = t.untyped_storage(), _data_ptr(t)
    start, span = ptr - storage.data_ptr(), _end(t, ptr) - ptr
    if storage.data_ptr() == 0 or start + span > storage.nbytes():
        raise RuntimeError(
            f"{name} reaches past the end of its memory: it spans {span} bytes from byte {start} of a storage "
            f"of {storage.nbytes()} bytes (was its storage resized with untyped_storage().resize_()?); "
            "it cannot be stepped"
        )


def _shown(value) -> str:
    return str(tuple(value)) if isinstance(value, torch.Size) else str(value)


def _check_gradient(p: Tensor, g: Tensor, name: str, sparse_message: str) -> None:
    if g.is_sparse:
        raise RuntimeError(sparse_message)
    if g.layout != torch.strided:
        raise RuntimeError(f"the gradient of {name} has layout {g.layout}; only dense (torch.strided) gradients step")
    mismatch = [
        f"{what} {_shown(mine)}, but the param's is {_shown(its)}"
        for what, mine, its in (
            ("shape", g.shape, p.shape),
            ("dtype", g.dtype, p.dtype),
            ("device", g.device, p.device),
        )
        if mine != its
    ]
    if mismatch:
        raise RuntimeError(
            f"the gradient of {name} has {'; '.join(mismatch)} (was `.grad.data` replaced or resized, or the "
            f"param changed after backward?); a gradient must have its param's shape, dtype and device"
        )


__all__ = ["CheckedTensors", "Layout", "StepGuard", "extent", "is_dense", "overlaps_itself", "resolved"]
