"""The hostile-use fuzzer (run by ``tests/test_fuzz.py`` in a subprocess of its own).

Hypothesis draws an optimizer (class, param dtype, storage options, backend under test,
state on the host or not: ``offload="cpu"``), its params' layout (each in memory of its
own, side by side in one buffer, or interleaved element by element in one: strided
views whose extents overlap without sharing an element)
and a sequence of steps and of the mutations users really make between them: the model
cast (``.half()``, ``.bfloat16()``, ``.double()``), a param's ``.data`` replaced by data
of the same or another shape (or its 16 bits re-viewed as the other 16-bit float), params
tied to one buffer, gradients dropped, replaced through ``.data`` by another shape, dtype
or layout, their storage cut under them, or lazily negated, ``optimizer.state`` edited in
place (entries replaced, re-pointed, moved to shared memory, popped, expanded; a step
count that cannot count), hand-edited state dicts loaded, and param groups edited
(their backend or offload switched by hand among them).  Every tensor a kernel may
address — params, gradients and the state adamkit issues — ends where a page ends,
followed by a page that cannot be read or written, so a read or write one byte past any
of them kills the process (the test sees the signal).

After each step one of two things must hold:

- the step raised a ``RuntimeError``, ``ValueError`` or ``TypeError`` from one of
  adamkit's own checks (a ``raise`` in adamkit's code, not an error torch or numba met mid-step),
  whose message names the param group it refuses, and params, state and counters are
  exactly as they were; or
- it stepped, and so did a twin on the ``single_tensor`` path given the same params,
  state and mutations and the same gradient values (as plain tensors: the twin is an
  oracle of what the values give, not of how adamkit reads a hostile layout), to the
  same result: params, dense state entries and the exact weight a split master or a
  Kahan pair keeps, each within its own rounding (the twin is then set to the result,
  and kept on ``single_tensor`` however the state dict it loads was saved, so every
  step is compared from the same start).

    python tests/hostile_fuzz.py BACKEND EXAMPLES [DEVICE]   # ADAMKIT_FUZZ_TRACE=1: print each sequence
"""

from __future__ import annotations

import copy
import ctypes
import itertools
import mmap
import os
import sys
import traceback

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from oracle import load_into_oracle

import adamkit
from adamkit import statekeeping
from adamkit.guard import is_dense
from adamkit.kernels import KERNELS
from adamkit.specs.master import MASTER_KEY, join_tensors
from adamkit.state import COMPENSATION_KEY

PAGE = mmap.PAGESIZE
#: print each sequence before running it (``ADAMKIT_FUZZ_TRACE=1``)
TRACE = os.environ.get("ADAMKIT_FUZZ_TRACE") == "1"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


#: where the fuzzed tensors live: the CPU (guard pages), or ``cuda`` (the GPU check's
#: subset: an access outside a tensor is then a CUDA error, which the run reports)
DEVICE = torch.device("cpu")


def _extent(shape, strides) -> int:
    """Elements from a view's first to its last, inclusive (0 for an empty view)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides)) if all(shape) else 0


def guarded_empty(shape, dtype: torch.dtype, strides=None) -> torch.Tensor:
    """An uninitialised CPU tensor whose memory ends where a page ends, followed by a page
    with no access: reading or writing past its last byte is a segmentation fault.  (On
    ``cuda``: a plain allocation.)"""
    shape = tuple(shape)
    if strides is None:
        strides = torch.empty(shape, device="meta").stride()
    if DEVICE.type != "cpu":
        return torch.empty_strided(shape, strides, dtype=dtype, device=DEVICE)
    extent = _extent(shape, strides)
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = extent * itemsize
    if nbytes == 0:
        return torch.empty_strided(shape, strides, dtype=dtype)
    pages = -(-nbytes // PAGE)
    region = mmap.mmap(-1, (pages + 1) * PAGE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    if _libc.mprotect(address + pages * PAGE, PAGE, 0) != 0:  # PROT_NONE
        raise OSError(ctypes.get_errno(), "mprotect failed")
    flat = torch.frombuffer(region, dtype=dtype, count=extent, offset=pages * PAGE - nbytes)
    return flat.as_strided(shape, strides)


def guarded_like(tensor: torch.Tensor) -> torch.Tensor:
    """A guarded tensor with ``tensor``'s shape, dtype and (dense) strides."""
    if tensor.device.type != "cpu":
        return torch.empty_like(tensor, memory_format=torch.preserve_format)
    strides = tensor.stride() if is_dense(tensor) else None
    return guarded_empty(tensor.shape, tensor.dtype, strides)


def guarded_copy(tensor: torch.Tensor) -> torch.Tensor:
    return guarded_like(tensor).copy_(tensor)


# ------------------------------------------------------------------------- scenarios

CLASSES = {
    "Adam": adamkit.Adam,
    "AdamW": adamkit.AdamW,
    "AdaMax": adamkit.AdaMax,
    "NAdam": adamkit.NAdam,
    "RAdam": adamkit.RAdam,
    "ADOPT": adamkit.ADOPT,
    "StableAdamW": adamkit.StableAdamW,
    "AdEMAMix": adamkit.AdEMAMix,
    "ScheduleFreeAdamW": adamkit.ScheduleFreeAdamW,
}
SHAPES = [(), (7,), (3, 5), (130,), (2, 3, 4), (5, 2)]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


#: the optimizers drawn from: every storage option and every algorithm at least once (a
#: few, so that the compiled kernels they need are built once: each costs seconds cold)
OPTIMIZERS = [
    ("Adam", "fp32", {}),
    # a slow first moment in the third place and a weight sequence z beside int8 v (new kernel
    # addressing), early in the list: hypothesis draws the first entries most
    ("AdEMAMix", "bf16", {"state_precision": "int8", "alpha_warmup": 3}),
    ("ScheduleFreeAdamW", "bf16", {"master_weights": "24bit", "state_precision": "int8", "warmup_steps": 2}),
    ("AdamW", "fp32", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", "bf16", {"rounding": "kahan", "weight_decay": 0.1}),
    ("AdamW", "bf16", {"master_weights": "fp32", "state_precision": "fp32"}),
    ("AdamW", "bf16", {"master_weights": "24bit", "state_precision": "int8"}),
    ("Adam", "fp32", {"state_precision": "int4", "cautious": True}),
    ("NAdam", "fp16", {"rounding": "stochastic", "state_precision": "bf16"}),
    ("AdaMax", "fp64", {"weight_decay": 0.1}),
    ("RAdam", "fp32", {"state_precision": "int8"}),
    ("ADOPT", "bf16", {}),
    ("StableAdamW", "fp32", {"weight_decay": 0.1}),
]


def runnable(backend: str) -> list[tuple]:
    """The rows of :data:`OPTIMIZERS` whose algorithm ``backend`` runs."""
    return [row for row in OPTIMIZERS if KERNELS[backend].runs(CLASSES[row[0]].algorithm)]


def offloadable(name: str) -> bool:
    return "offload" not in CLASSES[name].unavailable_options


@st.composite
def configs(draw, backend: str):
    """An optimizer the ``backend`` runs, its params and how they are laid out."""
    name, dtype, options = draw(st.sampled_from(runnable(backend)))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4))
    transposed = draw(st.lists(st.booleans(), min_size=len(shapes), max_size=len(shapes)))
    return {
        "name": name,
        "dtype": dtype,
        "options": {"seed": 7, **options},
        "shapes": shapes,
        "transposed": transposed,
        "layout": draw(st.sampled_from(["apart", "one_buffer", "interleaved"])),
        "offload": offloadable(name) and draw(st.booleans()),
    }


#: the mutations, by kind: each kind's variants (a param index comes first where it takes one)
GRAD_CHANGES = ("shape", "dtype", "strided", "expanded", "reshaped", "storage_shrunk", "negated")
CASTS = ("half", "bfloat16", "double", "float")
PARAM_CHANGES = ("same", "shape", "dtype", "expanded", "re_viewed")
STATE_CHANGES = (
    "replace",
    "data",
    "set_",
    "share_memory_",
    "pop",
    "wrong_shape",
    "expanded",
    "other_device",
    "negative_step",
)
STATE_DICT_CHANGES = ("round_trip", "truncate", "drop_key", "step_pair")
GROUP_CHANGES = ("lr", "weight_decay", "precision", "rounding", "amsgrad", "bad_lr", "backend", "offload")

INDICES = st.integers(0, 3)
MUTATIONS = st.one_of(
    st.just(("step",)),
    st.just(("step",)),
    st.just(("step",)),
    st.tuples(st.just("grad_none"), INDICES),
    st.tuples(st.just("grad_data"), INDICES, st.sampled_from(GRAD_CHANGES)),
    st.tuples(st.just("cast"), st.sampled_from(CASTS)),
    st.tuples(st.just("param_data"), INDICES, st.sampled_from(PARAM_CHANGES)),
    st.tuples(st.just("tie"), INDICES, INDICES),
    st.tuples(st.just("state"), INDICES, st.sampled_from(STATE_CHANGES)),
    st.tuples(st.just("state_dict"), st.sampled_from(STATE_DICT_CHANGES)),
    st.tuples(st.just("group"), st.sampled_from(GROUP_CHANGES)),
    st.just(("clear_state",)),
)

#: every variant of every mutation once, for :func:`sweep` (on param 0, or params 0 and 1)
EVERY_MUTATION = (
    ("grad_none", 0),
    *(("grad_data", 0, how) for how in GRAD_CHANGES),
    *(("cast", how) for how in CASTS),
    *(("param_data", 0, how) for how in PARAM_CHANGES),
    ("tie", 0, 1),
    *(("state", 0, how) for how in STATE_CHANGES),
    *(("state_dict", how) for how in STATE_DICT_CHANGES),
    *(("group", how) for how in GROUP_CHANGES),
    ("clear_state",),
)


class Run:
    """One optimizer under test and its single-tensor twin, stepped and mutated alike."""

    def __init__(self, config: dict, backend: str):
        self.config = config
        dtype = DTYPES[config["dtype"]]
        generator = torch.Generator().manual_seed(0)
        values = [torch.randn(shape, generator=generator).to(DEVICE, dtype) for shape in config["shapes"]]
        self.ours = self._params(values)
        self.theirs = self._params(values)
        cls, options = CLASSES[config["name"]], config["options"]
        offload = "cpu" if config["offload"] and backend != "triton" else None  # the host step: offload="cpu"
        self.opt = cls(self.ours, lr=1e-2, backend=backend, offload=offload, **options)
        #: whether two params share memory (a ``tie``): the foreach path then steps them as
        #: torch.optim's foreach does (every param decayed before any update), which the
        #: single-tensor twin does not (test_memory_safety.py holds it to torch's foreach)
        self.tied = False
        self.backend = backend
        self.twin = cls(self.theirs, lr=1e-2, backend="single_tensor", **options)
        self.generator = torch.Generator().manual_seed(1)
        #: params whose gradient a mutation set since the last step (a step keeps it)
        self.kept_grads: set[int] = set()

    def _params(self, values):
        config = self.config
        if config["layout"] == "interleaved":  # strided views of one guarded buffer, element by element
            k = len(values)
            buffer = guarded_empty((k * max(v.numel() for v in values),), values[0].dtype)
            params = []
            for i, v in enumerate(values):
                strides = [k * s for s in torch.empty(v.shape).stride()]
                view = torch.as_strided(buffer, v.shape, strides, storage_offset=i)
                view.copy_(v)
                params.append(torch.nn.Parameter(view))
            return params
        if config["layout"] == "one_buffer":  # views of one guarded buffer, side by side
            total = sum(v.numel() for v in values)
            buffer = guarded_empty((total,), values[0].dtype)
            params, start = [], 0
            for v in values:
                view = buffer[start : start + v.numel()].view(v.shape)
                view.copy_(v)
                params.append(torch.nn.Parameter(view))
                start += v.numel()
            return params
        params = []
        for v, transposed in zip(values, config["transposed"]):
            if transposed and v.dim() >= 2:  # a param laid out as a transpose
                held = guarded_empty((v.shape[1], v.shape[0], *v.shape[2:]), v.dtype).transpose(0, 1)
                params.append(torch.nn.Parameter(held.copy_(v)))
            else:
                params.append(torch.nn.Parameter(guarded_copy(v)))
        return params

    # the same change to both runs ---------------------------------------------------

    def both(self, change) -> None:
        for params, opt in ((self.ours, self.opt), (self.theirs, self.twin)):
            change(params, opt)

    def apply(self, mutation: tuple) -> None:
        kind, *args = mutation
        getattr(self, f"_{kind}")(*args)

    def _grad_none(self, i):
        def change(params, opt):
            params[i % len(params)].grad = None

        self.kept_grads.add(i % len(self.ours))
        self.both(change)

    def _grad_data(self, i, how):
        self.kept_grads.add(i % len(self.ours))

        def change(params, opt):
            p = params[i % len(params)]
            if p.grad is None or not _readable(p.grad):
                return
            if how == "shape":  # one element short (a kernel reading all of it would fault), or one more
                p.grad.data = guarded_empty((max(p.numel() - 1, 0) or 2,), p.dtype).fill_(0.5)
            elif how == "dtype":
                other = torch.float64 if p.dtype != torch.float64 else torch.float32
                p.grad.data = guarded_copy(p.grad.to(other))
            elif how == "strided" and p.dim() >= 2:
                shape = (p.shape[1], p.shape[0], *p.shape[2:])
                p.grad.data = guarded_empty(shape, p.dtype).transpose(0, 1).copy_(p.grad)
            elif how == "expanded":
                p.grad.data = guarded_empty((1,), p.dtype).fill_(0.25).expand(p.shape)
            elif how == "reshaped" and p.dim() >= 2 and p.shape[0] != p.shape[1]:
                # the param's size and strides, another shape: a kernel that took the strides
                # for the shape would read past the end (its memory is only as long as the view)
                shape = (p.shape[1], p.shape[0], *p.shape[2:])
                held = guarded_empty(shape, p.dtype, p.stride()).fill_(0.5)
                p.grad.set_(held.untyped_storage(), held.storage_offset(), shape, p.stride())
            elif how == "storage_shrunk":  # the view kept, the memory under it cut to 4 bytes
                grad = p.grad.detach().clone()
                grad.untyped_storage().resize_(4)
                p.grad = grad
            elif how == "negated":  # the same values, their negation in memory (is_neg())
                p.grad = torch._neg_view(guarded_copy(-p.grad.detach()))

        self.both(change)

    def _cast(self, how):
        dtype = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64, "float": torch.float32}

        def change(params, opt):
            for p in params:
                p.data = guarded_copy(p.data.to(dtype[how]))
                if p.grad is not None and _readable(p.grad):  # (a cut storage stays as it is: refused)
                    p.grad.data = guarded_copy(p.grad.data.to(dtype[how]))

        self.both(change)

    def _param_data(self, i, how):
        def change(params, opt):
            p = params[i % len(params)]
            if how == "same":
                p.data = guarded_copy(p.data)
            elif how == "shape":
                p.data = guarded_empty((p.numel() + 1,), p.dtype).fill_(0.5)
            elif how == "expanded":  # every element at one address: no step may write it
                p.data = guarded_empty((1,), p.dtype).fill_(0.5).expand(p.shape)
            elif how == "re_viewed":  # 16-bit bits re-viewed in place as the other 16-bit float
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.data = p.data.view(torch.bfloat16 if p.dtype == torch.float16 else torch.float16)
            else:
                p.data = guarded_copy(p.data.to(torch.float64 if p.dtype != torch.float64 else torch.float32))

        self.both(change)

    def _tie(self, i, j):
        def change(params, opt):
            a, b = params[i % len(params)], params[j % len(params)]
            if a is not b and a.shape == b.shape and a.dtype == b.dtype:
                b.data = a.data
                self.tied = True

        self.both(change)

    def _state(self, i, how):
        def change(params, opt):
            state = opt.state.get(params[i % len(params)])
            if not state:
                return
            tensors = [k for k, v in state.items() if torch.is_tensor(v) and v.numel() > 1 and k != "step"]
            key = tensors[0] if tensors else "step"
            if key not in state:  # (an earlier mutation popped it)
                return
            value = state[key]
            if how == "replace":
                state[key] = guarded_copy(value).fill_(1)
            elif how == "data":
                value.data = guarded_copy(value).fill_(1)
            elif how == "set_":
                value.set_(guarded_copy(value).fill_(1))
            elif how == "share_memory_":
                value.share_memory_()
            elif how == "pop":
                state.pop(key)
            elif how == "wrong_shape":
                state[key] = guarded_empty((value.numel() + 5,), value.dtype).fill_(1)
            elif how == "expanded":  # one element under every index
                state[key] = guarded_empty((1,), value.dtype).fill_(1).expand(value.shape)
            elif how == "other_device":  # no memory at all here (a meta tensor's address is 0)
                state[key] = torch.zeros_like(value, device="meta")
            else:
                state["step"] = torch.tensor(-3.0)

        self.both(change)

    def _state_dict(self, how):
        def change(params, opt):
            saved = copy.deepcopy(opt.state_dict())
            if saved["state"]:
                first = saved["state"][min(saved["state"])]
                tensors = [k for k, v in first.items() if torch.is_tensor(v) and v.numel() > 1]
                if how == "truncate" and tensors:
                    first[tensors[0]] = first[tensors[0]].flatten()[:-1].clone()
                elif how == "drop_key" and tensors:
                    del first[tensors[-1]]
                elif how == "step_pair":
                    first["step"] = torch.tensor([1.0, 2.0])
            opt.load_state_dict(saved)

        self.both(change)

    def _group(self, how):
        def change(params, opt):
            group = opt.param_groups[0]
            if how == "lr":
                group["lr"] = 3e-3
            elif how == "weight_decay":
                group["weight_decay"] = 0.05
            elif how == "precision" and group["state_precision"] is not None:
                group["state_precision"] = {"int8": "int4", "int4": "fp32", "fp32": "int8", "bf16": "int8"}[
                    group["state_precision"]
                ]
            elif how == "rounding" and "rounding" in self.config["options"]:
                group["rounding"] = "stochastic"
            elif how == "amsgrad" and "amsgrad" in group:
                group["amsgrad"] = not group["amsgrad"]
            elif how == "bad_lr":
                group["lr"] = -1.0
            elif opt is self.twin:  # (how the checked optimizer runs: the oracle runs as it did)
                return
            elif how == "backend":  # another path from the next step on, its state as it stands
                group["backend"] = "cpu" if group["backend"] != "cpu" else "foreach"
            elif how == "offload":  # the state moved to or from the host
                group["offload"] = None if group["offload"] is not None else "cpu"

        self.both(change)

    def _clear_state(self):
        self.both(lambda params, opt: opt.state.clear())

    # a step -------------------------------------------------------------------------

    def _step(self):
        for i, (p, q) in enumerate(zip(self.ours, self.theirs)):
            if i not in self.kept_grads and p.dtype == q.dtype and p.shape == q.shape:
                grad = torch.randn(p.shape, generator=self.generator).to(DEVICE, p.dtype)
                p.grad, q.grad = guarded_copy(grad), guarded_copy(grad)
        self.kept_grads.clear()
        before = snapshot(self.opt, self.ours)
        try:
            self.opt.step()
        except (RuntimeError, ValueError, TypeError) as error:
            assert_refused_by_a_check(error)
            assert_unchanged(self.opt, self.ours, before, error)
            return
        for q in self.theirs:  # the oracle reads plain gradients: their values, in memory of their own
            if q.grad is not None:
                q.grad = q.grad.detach().resolve_conj().resolve_neg().clone(memory_format=torch.contiguous_format)
        self.twin.step()  # the oracle must step too
        compared = [] if self.tied and self.backend == "foreach" else zip(self.ours, self.theirs)
        for p, q in compared:
            assert p.dtype == q.dtype and p.shape == q.shape
            torch.testing.assert_close(p.detach(), q.detach(), **_tolerance(p.dtype), equal_nan=True)
            # and the state the step wrote: a moment fed a wrong gradient moves far more than
            # the param it steps (one step's m takes 10 % of g; the param, 10 % of a step)
            ours, theirs = self.opt.state.get(p, {}), self.twin.state.get(q, {})
            exact, other_exact = _exact_weight(p, ours), _exact_weight(q, theirs)
            if exact is not None and other_exact is not None:
                torch.testing.assert_close(exact, other_exact, **_exact_tolerance(ours), equal_nan=True)
            for key, value in ours.items():
                other = theirs.get(key)
                if _dense_values(key, value, p) and _dense_values(key, other, q) and value.dtype == other.dtype:
                    torch.testing.assert_close(
                        value.cpu(), other.cpu(), **_state_tolerance(other), equal_nan=True, msg=f"state[{key!r}]"
                    )
        for p, q in zip(self.ours, self.theirs):  # the next step starts from the same place
            if 0 not in q.stride() or q.numel() <= 1:  # (an expanded param without a gradient: never written)
                q.data.copy_(p.data)
        load_into_oracle(self.twin, self.opt.state_dict())


def _tolerance(dtype: torch.dtype) -> dict:
    """How far a fused kernel's fp32 arithmetic (rounded once into 16 bits) may land from
    the single-tensor path's op by op."""
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 2e-2)
    return {"rtol": tolerance, "atol": tolerance}


def _readable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s storage holds all of it (after ``storage_shrunk`` it does not:
    torch's own copy would read past it, and the fuzzer must not read what no kernel may)."""
    extent = _extent(tensor.shape, tensor.stride())
    needed = (tensor.storage_offset() + extent) * tensor.element_size() if extent else 0
    return tensor.untyped_storage().nbytes() >= needed


def _state_tolerance(expected: torch.Tensor) -> dict:
    """How far a state entry may land from the oracle's: its dtype's relative rounding,
    and an absolute floor scaled to the entry (a second moment is ~1e-3 of g²: a fixed
    floor of the params' would never see it)."""
    rtol = _tolerance(expected.dtype)["rtol"]
    finite = expected[expected.isfinite()].detach().cpu()
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    return {"rtol": rtol, "atol": rtol * 1e-2 * largest + 1e-30}


def _exact_weight(param: torch.Tensor, state: dict) -> torch.Tensor | None:
    """The exact weight a 16-bit param's state keeps beside it (its split master joined
    to it, or its Kahan compensation added), in fp32; ``None`` without one.  (The low
    bits alone are bit patterns, and a compensation is the small remainder of a
    rounding: neither is a value to compare within a tolerance.)"""
    low, compensation = state.get(MASTER_KEY), state.get(COMPENSATION_KEY)
    if low is not None and low.shape == param.shape:
        return join_tensors(param.detach().cpu(), low.cpu())
    if compensation is not None and compensation.shape == param.shape:
        return param.detach().float().cpu() + compensation.float().cpu()
    return None


def _exact_tolerance(state: dict) -> dict:
    """fp32 arithmetic for an fp32 master or a Kahan pair; for the 24-bit master, two
    units of its 16-bit significand (a fused kernel and torch's ops may round the last
    one apart)."""
    low = state.get(MASTER_KEY)
    tolerance = 2.0**-15 if low is not None and low.dtype == torch.int8 else 1e-5
    return {"rtol": tolerance, "atol": 1e-5}


def _dense_values(key: str, value, param) -> bool:
    """Whether a state entry holds one value per element of ``param`` in a float dtype (a
    moment, z; not quantized codes, their scales, a counter, master low bits or a
    compensation: those are compared through :func:`_exact_weight`)."""
    return (
        key not in (MASTER_KEY, COMPENSATION_KEY)
        and torch.is_tensor(value)
        and value.is_floating_point()
        and value.shape == param.shape
        and param.dim() > 0
    )


#: where adamkit's own code lives: a refusal is raised there
PACKAGE = os.path.dirname(adamkit.__file__) + os.sep


def assert_refused_by_a_check(error: BaseException) -> None:
    """``error`` is a refusal: raised by a ``raise`` of adamkit's own (an error that
    torch or numba met mid-step is a check adamkit lacks) and naming what it refuses."""
    where = traceback.extract_tb(error.__traceback__)[-1]
    assert where.filename.startswith(PACKAGE) and where.line.startswith("raise"), (
        f"raised at {where.filename}:{where.lineno} ({where.line!r}), not by a check of adamkit's: {error!r}"
    )
    assert "param_groups[" in str(error), f"a refusal that names no param group: {error!r}"


def snapshot(opt, params) -> tuple:
    return copy.deepcopy(opt.state_dict()), [(p.dtype, p.shape, p.detach().clone()) for p in params]


def assert_unchanged(opt, params, before, error) -> None:
    state_dict, values = before
    now = opt.state_dict()
    assert now["state"].keys() == state_dict["state"].keys(), error
    for index, state in state_dict["state"].items():
        assert now["state"][index].keys() == state.keys(), error
        for key, value in state.items():
            held = now["state"][index][key]
            if torch.is_tensor(value):
                assert held.dtype == value.dtype and held.shape == value.shape, (key, error)
                torch.testing.assert_close(held, value, rtol=0, atol=0, equal_nan=True, msg=f"{key}: {error}")
            else:
                assert held == value, (key, error)
    for p, (dtype, shape, value) in zip(params, values):
        assert p.dtype == dtype and p.shape == shape, error
        torch.testing.assert_close(p.detach(), value, rtol=0, atol=0, equal_nan=True, msg=str(error))


def run_sequence(config: dict, mutations: list[tuple], backend: str) -> None:
    """A first step, then ``mutations`` (steps among them), then a last step."""
    if TRACE:  # the last line printed before a crash is the sequence that crashed
        print(config, mutations, flush=True)
    run = Run(config, backend)
    run.apply(("step",))
    for mutation in mutations:
        if mutation[0] == "step":
            run.apply(mutation)
            continue
        try:
            run.apply(mutation)
        except (RuntimeError, ValueError, TypeError):
            return  # torch or adamkit refused the mutation itself (a bad state dict...): the runs part here
    run.apply(("step",))


def sweep(backend: str) -> None:
    """Every optimizer row with every mutation variant alone between steps, each on
    params of two shapes and a scalar, the layouts and offload taken in turn.  (Random
    sequences mostly stack refusals: a gradient of the wrong dtype before a negated one
    hides it, and a variant met once in a hundred sequences is met too seldom.)"""
    layouts = ("apart", "one_buffer", "interleaved")
    for n, ((name, dtype, options), mutation) in enumerate(itertools.product(runnable(backend), EVERY_MUTATION)):
        config = {
            "name": name,
            "dtype": dtype,
            "options": {"seed": 7, **options},
            "shapes": [(3, 5), (3, 5), (7,), ()],
            "transposed": [n % 4 == 1, False, False, False],
            "layout": layouts[n % 3],
            "offload": offloadable(name) and n % 2 == 0,
        }
        try:
            run_sequence(config, [mutation, ("step",)], backend)
        except BaseException:
            print(f"the sweep's failing sequence: {config} {[mutation, ('step',)]}", flush=True)
            raise


def fuzz(backend: str, examples: int, device: str = "cpu") -> None:
    global DEVICE
    DEVICE = torch.device(device)
    if DEVICE.type == "cpu":
        statekeeping.allocator = guarded_like  # every issued state tensor is guarded too

    sweep(backend)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(config=configs(backend), mutations=st.lists(MUTATIONS, min_size=1, max_size=10))
    def sequence(config, mutations):
        run_sequence(config, mutations, backend)

    sequence()
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()  # an illegal address in any launch raises here at the latest


if __name__ == "__main__":
    fuzz(sys.argv[1], int(sys.argv[2]), *sys.argv[3:4])
    print("ok")
