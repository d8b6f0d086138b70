"""What a user does between steps never makes a kernel touch memory outside its tensors,
and a step that fails changes nothing (issue 35).

Each reproduction of the issue is a test here, on every backend that runs on the CPU
(the Triton kernel under its interpreter): casting the model after a step, replacing a
gradient's data, a loaded ``step`` that cannot count, state tensors replaced, re-pointed
or moved, params that share memory, overflowing squares in quantized states, the random
stream past fp32's 2^24, and a process forked after a step.  Oracles: torch.optim (which
raises for the same casts), the ``single_tensor`` path fed the same state, fp32 Adam for
the overflow, and the step counter's exact value.  The hostile-use fuzzer, with tensors
at the end of pages followed by guard pages, is ``tests/test_fuzz.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from matrix import CPU_BACKENDS, CPU_FUSED_BACKENDS, FAMILY
from oracle import load_into_oracle

import adamkit
from adamkit import guard
from adamkit.specs import quantization
from adamkit.specs.quantization import FORMATS, codes_key
from adamkit.statekeeping import is_issued

#: the Triton interpreter is slow: small tensors everywhere
SIZE = 300


def snapshot(opt, params) -> tuple:
    """Everything a step may change: the state dict (deep), the params, the groups' options."""
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params], groups


def assert_unchanged(opt, params, before) -> None:
    state_dict, values, groups = before
    now = opt.state_dict()
    assert now["state"].keys() == state_dict["state"].keys()
    for index, state in state_dict["state"].items():
        assert now["state"][index].keys() == state.keys()
        for key, value in state.items():
            held = now["state"][index][key]
            if torch.is_tensor(value):
                assert held.dtype == value.dtype and held.shape == value.shape, key
                torch.testing.assert_close(held, value, rtol=0, atol=0, equal_nan=True, msg=key)
            else:
                assert held == value, key
    for p, value in zip(params, values):
        assert p.dtype == value.dtype and p.shape == value.shape
        assert torch.equal(p.detach(), value)
    for group, options in zip(opt.param_groups, groups):
        assert {k: v for k, v in group.items() if k != "params"}.keys() == options.keys()
        assert group["seed"] == options["seed"]


def stepped(backend: str, cls=adamkit.AdamW, steps: int = 2, **options):
    """A two-layer model and its optimizer after ``steps`` steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(SIZE // 10, 10), torch.nn.Linear(10, 3))
    opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend, **options)
    for _ in range(steps):
        backward(model)
        opt.step()
    return model, opt


def backward(model) -> None:
    model.zero_grad()
    first = model[0]
    model(torch.randn(4, first.in_features, dtype=first.weight.dtype)).square().sum().backward()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("cast", ["bfloat16", "half", "double"])
def test_casting_the_model_after_a_step_raises_as_torch_does_and_changes_nothing(backend, cast):
    model, opt = stepped(backend)
    getattr(model, cast)()
    backward(model)
    params = list(model.parameters())
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"params\[0\] in param_groups\[0\] changed since .*dtype torch.float32 ->"):
        opt.step()
    assert_unchanged(opt, params, before)
    # torch.optim refuses it too
    model, _ = stepped(backend)
    theirs = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
    backward(model)
    theirs.step()
    getattr(model, cast)()
    backward(model)
    with pytest.raises(RuntimeError):
        theirs.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_remedy_the_error_names_works(backend):
    """After ``model.double()``, ``load_state_dict(state_dict())`` casts the state with
    it and training goes on."""
    model, opt = stepped(backend)
    model.double()
    opt.load_state_dict(opt.state_dict())
    backward(model)
    opt.step()
    assert all(p.dtype == torch.float64 and torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "bad,words",
    [
        (lambda g: torch.ones(10), r"has shape \(10,\), but the param's is \(10, 30\)"),
        (
            lambda g: torch.ones_like(g, dtype=torch.float64),
            r"has dtype torch.float64, but the param's is torch.float32",
        ),
        (lambda g: torch.ones(g.numel() + 1)[1:].view_as(g), None),  # a view of a bigger buffer: fine
        (lambda g: g.t().contiguous().t(), None),  # strided like the param's transpose: staged, fine
        (lambda g: torch.ones(1).expand_as(g), None),  # an expanded gradient: staged, fine
    ],
    ids=["shape", "dtype", "view", "transposed", "expanded"],
)
def test_a_gradient_whose_data_was_replaced_is_checked_before_anything_moves(backend, bad, words):
    model, opt = stepped(backend)
    backward(model)
    weight = model[0].weight
    weight.grad.data = bad(weight.grad)
    params = list(model.parameters())
    if words is None:  # a gradient of the param's shape and dtype: the step is the single-tensor path's
        twin_model, twin = stepped("single_tensor")
        load_into_oracle(twin, opt.state_dict())
        twin_model.load_state_dict(model.state_dict())
        for p, q in zip(params, twin_model.parameters()):
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
        for p, q in zip(params, twin_model.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        return
    before = snapshot(opt, params)
    with pytest.raises(RuntimeError, match=r"the gradient of params\[0\] in param_groups\[0\] " + words):
        opt.step()
    assert_unchanged(opt, params, before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_failing_group_leaves_every_group_as_it_was(backend):
    """The first group is valid, the second's gradient has the wrong shape: nothing moves
    (single_tensor and foreach used to decay the first group's params before raising)."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(SIZE)), torch.nn.Parameter(torch.randn(SIZE))
    opt = adamkit.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, weight_decay=0.5, backend=backend)
    a.grad, b.grad = torch.randn(SIZE), torch.randn(SIZE)
    opt.step()
    a.grad, b.grad = torch.randn(SIZE), torch.randn(SIZE)
    b.grad.data = torch.randn(SIZE - 1)
    before = snapshot(opt, [a, b])
    for _ in range(2):  # and again: a failed step counts nothing
        with pytest.raises(RuntimeError, match=r"params\[0\] in param_groups\[1\]"):
            opt.step()
        assert_unchanged(opt, [a, b], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "step,words",
    [
        (-3.0, "a step count is one number >= 0"),
        (float("nan"), "a step count"),
        (torch.tensor([1.0, 2.0]), "shape"),
        (torch.tensor(True), "tensor\\(True\\): a step count"),  # (once counted as step 1; torch fails)
    ],
    ids=["negative", "nan", "two-elements", "bool"],
)
def test_a_loaded_step_that_cannot_count_is_refused_and_counts_nothing(backend, step, words):
    model, opt = stepped(backend)
    saved = opt.state_dict()
    saved["state"][0]["step"] = step if torch.is_tensor(step) else torch.tensor(step)
    opt.load_state_dict(saved)
    backward(model)
    params = list(model.parameters())
    before = snapshot(opt, params)
    for _ in range(2):
        with pytest.raises(ValueError, match=r"state\['step'\] of params\[0\] in param_groups\[0\] is .*" + words):
            opt.step()
        assert_unchanged(opt, params, before)


def test_a_loaded_step_that_is_no_number_is_refused_by_name_at_the_load():
    """torch's load turns a string into a generator, which the error once showed."""
    model, opt = stepped("single_tensor")
    saved = opt.state_dict()
    saved["state"][0]["step"] = "5"
    before = snapshot(opt, list(model.parameters()))
    with pytest.raises(
        ValueError, match=r"state\['step'\] = '5' of params\[0\] in param_groups\[0\]: a counter must be a number"
    ):
        opt.load_state_dict(saved)
    assert_unchanged(opt, list(model.parameters()), before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [{}, {"state_precision": "int8"}, {"master_weights": "fp32"}], ids=str)
@pytest.mark.parametrize("how", ["dict entry", "data", "set_", "share_memory_", "pop"])
def test_state_tensors_replaced_re_pointed_or_moved_are_what_the_next_step_uses(backend, options, how):
    """Whatever is done to ``optimizer.state``, the next step reads it as it now stands:
    the result equals the single-tensor path given the same state."""
    dtype = torch.bfloat16 if "master_weights" in options else torch.float32
    model, opt = stepped(backend, **options)
    model.to(dtype)
    opt.load_state_dict(opt.state_dict())
    twin_model = copy.deepcopy(model)
    twin = adamkit.AdamW(twin_model.parameters(), lr=1e-2, weight_decay=0.1, backend="single_tensor", **options)
    load_into_oracle(twin, opt.state_dict())
    backward(model)
    opt.step()  # every state tensor issued, the kernel's tables built
    twin_model.load_state_dict(model.state_dict())
    load_into_oracle(twin, opt.state_dict())
    for target in (opt, twin):  # the same change to both
        state = target.state[next(iter(target.param_groups[0]["params"]))]
        key = next(k for k in state if k.startswith("exp_avg") and not k.endswith("_scales"))
        replacement = (
            state[key].detach().clone().fill_(state[key].flatten()[0] if state[key].dtype != torch.uint8 else 3)
        )
        if how == "dict entry":
            state[key] = replacement
        elif how == "data":
            state[key].data = replacement
        elif how == "set_":
            state[key].set_(replacement)
        elif how == "share_memory_":
            state[key].share_memory_()
        else:
            state.pop("step")
            state["step"] = torch.tensor(7.0, dtype=torch.float64 if options else torch.float32)
    backward(model)
    for p, q in zip(model.parameters(), twin_model.parameters()):
        q.grad = p.grad.clone()
    opt.step()
    twin.step()
    for p, q in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if backend in CPU_FUSED_BACKENDS:
        for state in opt.state.values():
            assert all(is_issued(v, opt.state_epoch) for v in state.values() if torch.is_tensor(v))


def test_every_mutator_of_a_param_s_state_advances_the_epoch():
    """The epoch is what tells a kernel its cached state addresses may be stale: each
    way of changing a param's state dict advances it (popping a missing key does not;
    the popped tensors are kept alive, so no release of theirs advances it instead)."""
    p = torch.nn.Parameter(torch.randn(4))
    opt = adamkit.Adam([p], lr=1e-2)
    p.grad = torch.randn(4)
    opt.step()
    state, kept = opt.state[p], []
    changes = {
        "pop": lambda: kept.append(state.pop("exp_avg")),
        "del": lambda: kept.append(state.get("exp_avg_sq")) or state.__delitem__("exp_avg_sq"),
        "setitem": lambda: state.__setitem__("exp_avg", torch.zeros(4)),
        "setdefault": lambda: state.setdefault("exp_avg_sq", torch.zeros(4)),
        "update": lambda: state.update(exp_avg=torch.ones(4)),
        "popitem": lambda: kept.append(state.popitem()),
        "clear": lambda: kept.append(dict(state)) or state.clear(),
    }
    for name, change in changes.items():
        before = opt.state_epoch.value
        change()
        assert opt.state_epoch.value != before, name
    before = opt.state_epoch.value
    assert state.pop("missing", None) is None and opt.state_epoch.value == before


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_params_that_share_memory_are_refused_by_a_fused_kernel(backend):
    buffer = torch.randn(2 * SIZE)
    a, b = torch.nn.Parameter(buffer[:SIZE]), torch.nn.Parameter(buffer[SIZE // 2 : SIZE // 2 + SIZE])
    opt = adamkit.Adam([a, b], lr=1e-2, backend=backend)
    a.grad, b.grad = torch.randn(SIZE), torch.randn(SIZE)
    before = snapshot(opt, [a, b])
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] in param_groups\[0\] share memory"):
        opt.step()
    assert_unchanged(opt, [a, b], before)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("held", ["the state dict", "a storage object", "a DLPack alias"])
def test_a_loaded_state_is_copied_whatever_else_reaches_its_memory(backend, held):
    """A fused kernel addresses memory only the optimizer holds: a loaded tensor is copied
    at the first step, so that freeing its memory from wherever else it is reachable
    cannot reach the kernel (a review's takeover of loaded tensors "nothing else held",
    judged by reference counts, wrote freed memory after a kept storage object's or a
    DLPack alias's owner was resized to 0)."""
    torch.manual_seed(0)
    source = torch.nn.Parameter(torch.randn(SIZE))
    first = adamkit.AdamW([source], lr=1e-2)
    source.grad = torch.randn(SIZE)
    first.step()
    saved = copy.deepcopy(first.state_dict())
    original = saved["state"][0]["exp_avg"]
    if held == "a storage object":
        reach = original.untyped_storage()
    elif held == "a DLPack alias":
        reach, saved["state"][0]["exp_avg"] = original, torch.from_dlpack(original)
    else:
        reach = saved
    p = torch.nn.Parameter(source.detach().clone())
    opt = adamkit.AdamW([p], lr=1e-2, backend=backend)
    opt.load_state_dict(saved)
    del saved, original
    p.grad = torch.randn(SIZE)
    opt.step()
    state = opt.state[p]
    assert is_issued(state["exp_avg"], opt.state_epoch)
    if held == "a storage object":
        reach.resize_(0)
    elif held == "a DLPack alias":
        reach.untyped_storage().resize_(0)
    for _ in range(3):
        p.grad = torch.randn(SIZE)
        opt.step()
    assert torch.isfinite(state["exp_avg"]).all()


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_a_param_listed_twice_is_refused_by_a_fused_kernel_as_such(backend):
    p = torch.nn.Parameter(torch.randn(SIZE))
    with pytest.warns(UserWarning, match="duplicate parameters"):
        opt = adamkit.Adam([p, p], lr=1e-2, backend=backend)
    p.grad = torch.randn(SIZE)
    with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] in param_groups\[0\] are the same param"):
        opt.step()


def _tied(tie: str, start: torch.Tensor) -> tuple:
    a = torch.nn.Parameter(start.clone())
    b = a if tie == "one param listed twice" else torch.nn.Parameter(torch.empty(0, dtype=start.dtype))
    b.data = a.data
    return a, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tie", ["two params on one tensor", "one param listed twice"])
def test_single_tensor_steps_params_that_share_memory_one_after_the_other_as_torch_does(tie, dtype):
    """Three steps.  Oracles: torch.optim.Adam's for-loop (foreach=False) in fp32; in
    bf16 (which torch rounds op by op), one optimizer per param stepped in turn (a param
    listed twice: stepped twice a step).  A 16-bit param's update runs on an fp32 copy:
    both copies were once made before either update, and the last write won; a param
    listed twice once had its counter advanced twice before its first update."""
    torch.manual_seed(0)
    start, grads = torch.randn(SIZE).to(dtype), [torch.randn(SIZE).to(dtype) for _ in range(3)]
    options = {"lr": 1e-1, "backend": "single_tensor", "state_precision": "fp32"}
    a, b = _tied(tie, start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's warning about duplicate params
        opt = adamkit.Adam([a, b], **options)
    x, y = _tied(tie, start)
    if dtype == torch.float32:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oracles = [torch.optim.Adam([x, y], lr=1e-1, foreach=False)]
    else:
        oracles = (
            [adamkit.Adam([x], **options)] * 2
            if x is y
            else [adamkit.Adam([x], **options), adamkit.Adam([y], **options)]
        )
    for grad in grads:
        a.grad, b.grad, x.grad, y.grad = (grad.clone() for _ in range(4))
        opt.step()
        for oracle in oracles:
            oracle.step()
    assert torch.equal(a.detach(), x.detach())


@pytest.mark.parametrize("name", ["Adam", "AdamW", "AdaMax", "NAdam", "RAdam"])
def test_foreach_steps_params_that_share_memory_as_torch_s_foreach_does(name):
    """torch.optim's foreach path decays every param of a group before any update, so
    two params on one tensor are not stepped one after the other there (with decay the
    results differ from the for-loop's by about lr x decay of an update: 3e-5 to 3e-4
    here).  Oracle: torch.optim's foreach path (fp64, decay, three steps), to 1e-12:
    adamkit's foreach path keeps the for-loop's rounding, which for NAdam and RAdam is
    an ulp or two from torch's foreach arithmetic even on params of their own."""
    ours_cls, torch_cls, _ = FAMILY[name]
    g = torch.Generator().manual_seed(0)
    start, grads = torch.randn(SIZE, dtype=torch.float64, generator=g), []
    for _ in range(3):
        grads.append([torch.randn(SIZE, dtype=torch.float64, generator=g) for _ in range(2)])
    runs = []
    for make in (
        lambda params: ours_cls(params, lr=1e-2, weight_decay=0.1, backend="foreach"),
        lambda params: torch_cls(params, lr=1e-2, weight_decay=0.1, foreach=True),
    ):
        a, b = _tied("two params on one tensor", start)
        optimizer = make([a, b])
        for first, second in grads:
            a.grad, b.grad = first.clone(), second.clone()
            optimizer.step()
        runs.append(a.detach())
    torch.testing.assert_close(*runs, rtol=0, atol=1e-12)


#: views of one (6, 8) matrix as two params: disjoint (their extents interleave) or sharing elements
INTERLEAVED_VIEWS = {
    "column blocks": (lambda w: (w[:, :4], w[:, 4:]), False),
    "even and odd rows": (lambda w: (w[0::2], w[1::2]), False),
    "even and odd columns": (lambda w: (w[:, 0::2], w[:, 1::2]), False),
    "a column block and the transpose's rows": (lambda w: (w[:, :3], w.t()[3:]), False),
    "column blocks sharing a column": (lambda w: (w[:, :5], w[:, 4:]), True),
    "rows and columns": (lambda w: (w[0::2], w[:, 1::2]), True),
    "a contiguous row block and a column block": (lambda w: (w[2:3], w[:, 6:]), True),
}


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("views", list(INTERLEAVED_VIEWS))
def test_interleaved_views_step_when_disjoint_and_are_refused_when_they_share(backend, views):
    """Strided views of one matrix whose extents interleave are compared element by
    element: disjoint ones step as the same kernel steps the same views of matrices of
    their own; ones that share an element are refused, with nothing changed."""
    make, share = INTERLEAVED_VIEWS[views]
    w = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    ours = [torch.nn.Parameter(v) for v in make(w)]
    apart = [torch.nn.Parameter(make(w.clone())[i]) for i in range(len(ours))]
    opt, reference = (adamkit.Adam(params, lr=1e-2, backend=backend) for params in (ours, apart))
    for step in range(3):
        for p, q in zip(ours, apart):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            q.grad = p.grad.clone()
        if share:
            before = snapshot(opt, ours)
            with pytest.raises(RuntimeError, match=r"params\[0\] and params\[1\] in param_groups\[0\] share memory"):
                opt.step()
            assert_unchanged(opt, ours, before)
            return
        opt.step()
        reference.step()
    for p, q in zip(ours, apart):
        assert torch.equal(p.detach(), q.detach())


def test_interleaved_views_beyond_the_compared_span_are_taken_to_share(monkeypatch):
    """Extents that interleave over more than COMPARED_SPAN_LIMIT bytes are not compared
    byte by byte: such views are refused as sharing memory (the conservative answer)."""
    monkeypatch.setattr(guard, "COMPARED_SPAN_LIMIT", 64)
    w = torch.randn(6, 8)
    opt = adamkit.Adam([torch.nn.Parameter(w[:, :4]), torch.nn.Parameter(w[:, 4:])], lr=1e-2, backend="cpu")
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones(p.shape)
    with pytest.raises(RuntimeError, match="share memory"):
        opt.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "change,words",
    [
        # the storage shrunk in place (torch.optim's own ops would run past it: a crash)
        (lambda p: p.untyped_storage().resize_(16), r"params\[0\] in param_groups\[0\] reaches past the end"),
        # every element at one address (its old memory freed: malloc may hand the same
        # address to the smaller tensor, which once passed the per-step check)
        (lambda p: setattr(p, "data", torch.ones(1).expand(p.shape)), r"params\[0\] .* share memory .*expanded"),
        # the gradient's size and strides kept, its shape not: its memory is shorter than
        # a param-shaped read (the per-step check once compared sizes and strides only)
        (
            lambda p: p.grad.set_(torch.ones(SIZE).untyped_storage(), 0, (p.shape[1], p.shape[0]), p.stride()),
            r"the gradient of params\[0\] .* has shape \(30, 10\), but the param's is \(10, 30\)",
        ),
        # a stepped gradient's storage shrunk under it (the per-step check once read no
        # gradient's storage: the kernel read 4 bytes' storage as a whole gradient)
        (lambda p: p.grad.untyped_storage().resize_(16), r"the gradient of params\[0\] .* reaches past the end"),
        # the storage freed and made again, smaller: the allocator may hand back the same
        # address, and address, shape and strides once passed as the same extent
        (
            lambda p: [p.untyped_storage().resize_(n) for n in (0, p.nbytes - 8)],
            r"params\[0\] in param_groups\[0\] (reaches past the end|changed since)",
        ),
    ],
    ids=["storage-shrunk", "param-expanded", "grad-reshaped", "grad-storage-shrunk", "storage-remade-smaller"],
)
def test_a_param_or_gradient_whose_memory_no_longer_holds_it_is_refused(backend, change, words):
    model, opt = stepped(backend)
    backward(model)
    weight = model[0].weight
    params = list(model.parameters())
    before = snapshot(opt, params)
    change(weight)
    with pytest.raises(RuntimeError, match=words):
        opt.step()
    assert_unchanged(opt, params[1:], (before[0], before[1][1:], before[2]))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_param_re_viewed_in_place_as_another_dtype_is_refused(backend):
    """bf16 bits re-viewed as fp16 keep the address, size, shape and strides; the kernel
    once stepped them as bf16 (a silently wrong value)."""
    model, opt = stepped(backend)
    model.bfloat16()
    opt.load_state_dict(opt.state_dict())
    backward(model)
    opt.step()
    backward(model)
    params = list(model.parameters())
    before = snapshot(opt, params[1:])
    weight = model[0].weight
    weight.data = weight.data.view(torch.float16)
    with pytest.raises(RuntimeError, match=r"params\[0\] .* changed since .*dtype torch.bfloat16 -> torch.float16"):
        opt.step()
    assert_unchanged(opt, params[1:], (before[0], before[1], before[2]))


def lazily_negated(values: torch.Tensor) -> torch.Tensor:
    """``values`` as a contiguous tensor whose memory holds their negation
    (``is_neg()``).  Public ops make one as the imaginary part of a conjugate (strided,
    which the kernels stage by copying, resolving it; or of one element, addressed
    directly): ``torch._neg_view`` makes the contiguous case of any size."""
    lazy = torch._neg_view(-values)
    assert lazy.is_neg() and lazy.is_contiguous() and torch.equal(lazy, values)
    return lazy


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_lazily_negated_gradient_steps_with_its_values(backend):
    """Oracle: torch.optim.AdamW's for-loop with the same gradients (a kernel reading
    memory once stepped with the negated gradient)."""
    torch.manual_seed(0)
    start, grads = torch.randn(SIZE), [torch.randn(SIZE) for _ in range(3)]
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt = adamkit.AdamW([ours], lr=1e-2, backend=backend)
    oracle = torch.optim.AdamW([theirs], lr=1e-2, foreach=False)
    for grad in grads:
        ours.grad, theirs.grad = lazily_negated(grad), grad.clone()
        opt.step()
        oracle.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_lazily_conjugated_gradient_of_a_conjugated_complex_param_steps_with_its_values(backend):
    """Autograd leaves ``p.conj()``'s gradient as a lazy conjugate (``is_conj()``):
    torch.optim's step refuses it, a kernel reading memory stepped with its conjugate.
    Oracle: the same run with the gradient resolved."""
    torch.manual_seed(0)
    start, x = torch.randn(SIZE, dtype=torch.complex64), torch.randn(SIZE, dtype=torch.complex64)
    runs = []
    for resolve in (False, True):
        p = torch.nn.Parameter(start.clone())
        opt = adamkit.Adam([p], lr=1e-2, backend=backend)
        for _ in range(3):
            p.grad = None
            (p.conj() * x).real.sum().backward()
            assert p.grad.is_conj()
            if resolve:
                p.grad = p.grad.resolve_conj()
            opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_lazily_conjugated_param_is_refused(backend):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(SIZE, dtype=torch.complex64))
    opt = adamkit.Adam([p], lr=1e-2, backend=backend)
    p.grad = torch.randn_like(p)
    opt.step()
    before = snapshot(opt, [])
    p.data = p.data.conj()
    p.grad = torch.randn_like(p)
    with pytest.raises(RuntimeError, match=r"params\[0\] in param_groups\[0\] is a lazily conjugated view"):
        opt.step()
    assert_unchanged(opt, [], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_state_tensor_whose_elements_share_memory_is_refused_before_any_group_steps(backend):
    """An expanded view as a moment (a broadcast "reset") holds one value for many
    elements: the step once raised midway, after the first group had moved."""
    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(SIZE)), torch.nn.Parameter(torch.randn(SIZE))
    opt = adamkit.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
    a.grad, b.grad = torch.randn(SIZE), torch.randn(SIZE)
    opt.step()
    opt.state[b]["exp_avg"] = torch.zeros(()).expand(SIZE)
    before = snapshot(opt, [a, b])
    for _ in range(2):
        with pytest.raises(ValueError, match=r"state\['exp_avg'\] of params\[0\] in param_groups\[1\] .* share memory"):
            opt.step()
        assert_unchanged(opt, [a, b], before)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_state_made_in_a_step_under_inference_mode_steps_outside_it(backend):
    """The state a param gets in a step under ``torch.inference_mode()`` is an ordinary
    tensor (it outlives the mode: torch.optim's own state then fails its next in-place
    update, midway through the groups).  Oracle: the same steps without the mode."""
    runs = []
    for inference in (False, True):
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(SIZE)), torch.nn.Parameter(torch.randn(SIZE))
        opt = adamkit.AdamW([{"params": [a]}, {"params": [b]}], lr=1e-2, backend=backend)
        a.grad = torch.randn(SIZE)
        opt.step()
        a.grad, b.grad = None, torch.randn(SIZE)
        with torch.inference_mode(inference):
            opt.step()
        assert not opt.state[b]["exp_avg"].is_inference()
        a.grad, b.grad = torch.randn(SIZE), torch.randn(SIZE)
        opt.step()
        runs.append(torch.cat([a.detach(), b.detach()]))
    assert torch.equal(*runs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_views_of_one_buffer_that_do_not_overlap_step_as_separate_tensors(backend):
    buffer = torch.randn(2 * SIZE)
    ours = [torch.nn.Parameter(buffer[:SIZE]), torch.nn.Parameter(buffer[SIZE:])]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt, twin = adamkit.Adam(ours, lr=1e-2, backend=backend), adamkit.Adam(theirs, lr=1e-2, backend="single_tensor")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(SIZE)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("state_precision", ["int8", "int4"])
def test_an_overflowing_square_keeps_the_weights_finite_as_in_fp32_adam(backend, state_precision):
    """A finite gradient of 1e22 (its square overflows fp32): fp32 Adam's v is +inf and
    its update 0; quantized states hold v at their ceiling, so the overflowing step moves
    the element by 0 too and every weight stays finite (the issue: NaN in the whole
    block).  Blocks other than the element's step exactly as without the overflow."""
    runs = []
    for overflow in (True, False):
        p, q = torch.nn.Parameter(torch.ones(2 * SIZE)), torch.nn.Parameter(torch.ones(2 * SIZE))
        ours = adamkit.Adam([p], lr=1e-3, state_precision=state_precision, backend=backend, seed=1)
        fp32 = adamkit.Adam([q], lr=1e-3, backend="single_tensor")
        for step in range(4):
            grad = torch.linspace(0.05, 0.15, 2 * SIZE)
            if step == 1 and overflow:
                grad[5] = 1e22
            p.grad, q.grad = grad.clone(), grad.clone()
            before = p.detach().clone()
            ours.step()
            fp32.step()
            assert torch.isfinite(p).all()
            if step == 1 and overflow:
                assert p[5] == before[5] == q[5]  # the overflowing step moves it by 0, as fp32 Adam
                assert torch.isinf(fp32.state[q]["exp_avg_sq"][5])
        runs.append(p.detach())
    assert torch.equal(runs[0][256:], runs[1][256:])  # past the element's blocks (256 for int8's m)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_first_moment_beyond_bf16_s_largest_number_keeps_the_weights_finite(backend):
    """A finite gradient of 3.4e38 (within 0.4 % of fp32's largest number): m passes
    bf16's largest number, where int8's first-moment scale, rounded up, would be
    infinite and its block NaN; m is held at that ceiling with its sign, and the weights
    stay finite, as in fp32 Adam.  An infinite gradient still poisons."""
    for bad, finite in ((3.4e38, True), (float("inf"), False)):
        p = torch.nn.Parameter(torch.zeros(2 * SIZE))
        opt = adamkit.Adam([p], lr=1e-3, state_precision="int8", backend=backend, seed=1)
        for _ in range(80):  # (m passes the ceiling at about step 55)
            p.grad = torch.linspace(-1, 1, 2 * SIZE)
            p.grad[3] = bad
            opt.step()
        assert bool(torch.isfinite(p).all()) == finite
        if finite:
            scales = opt.state[p]["exp_avg_int8_scales"]
            assert scales[0].float() == float(quantization.moment_ceiling(FORMATS["int8"], True))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("options", [{"rounding": "stochastic"}, {"state_precision": "int8"}], ids=str)
def test_the_random_stream_keeps_moving_past_fp32s_last_count(backend, options):
    """A group that rounds stochastically counts steps in float64 (fp32 stops at 2^24,
    and its random bits would repeat at every step): from the same state, steps 2^24,
    2^24 + 1 and 2^31 draw different bits, and the counter holds each count exactly."""
    dtype = torch.bfloat16 if "rounding" in options else torch.float32
    start = torch.randn(SIZE).to(dtype)
    grad = (1e-4 * (torch.arange(SIZE) % 7 + 1)).to(dtype)  # ratios between levels: the bits decide
    second_moment = codes_key("exp_avg_sq", FORMATS["int8"])
    results = []
    for count in (2**24, 2**24 + 1, 2**31):
        p = torch.nn.Parameter(start.clone())
        opt = adamkit.Adam([p], lr=1e-3, backend=backend, seed=5, **options)
        p.grad = grad.clone()
        opt.step()
        opt.state[p]["step"].fill_(count - 1)
        p.data.copy_(start)
        p.grad = grad.clone()
        opt.step()
        assert opt.state[p]["step"].dtype == torch.float64 and opt.state[p]["step"].item() == count
        stored = p.detach().clone() if "rounding" in options else opt.state[p][second_moment].clone()
        results.append(stored)
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])


def test_a_torch_checkpoint_gives_a_stochastic_group_a_float64_counter():
    p = torch.nn.Parameter(torch.randn(SIZE))
    theirs = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.randn(SIZE)
    theirs.step()
    ours = adamkit.Adam([p], lr=1e-3, state_precision="int8")
    ours.load_state_dict(theirs.state_dict())
    p.grad = torch.randn(SIZE)
    ours.step()
    assert ours.state[p]["step"].dtype == torch.float64 and ours.state[p]["step"].item() == 2


FORK_CHILD = textwrap.dedent(
    """
    import os, sys, warnings
    import torch, adamkit
    backend = sys.argv[1] if sys.argv[1] != "None" else None
    p = torch.nn.Parameter(torch.zeros(100_000))
    opt = adamkit.AdamW([p], lr=1e-3, backend=backend)
    p.grad = torch.ones(100_000)
    opt.step()  # numba's thread pool (GNU OpenMP) has run in the parent
    pid = os.fork()
    if pid == 0:
        warnings.simplefilter("ignore")
        try:
            opt.step()
            print("stepped", float(p[0]), flush=True)
            os._exit(0)
        except Exception as error:
            print("raised", type(error).__name__, error, flush=True)
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    print("signal" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}", torch.get_num_threads())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="GNU OpenMP's fork hazard is Linux's")
@pytest.mark.parametrize("backend", [None, "cpu"])
def test_a_process_forked_after_a_step_can_step_or_is_told_why(backend):
    """numba's GNU OpenMP pool cannot run in a forked child (the child used to die of
    SIGTERM; torch's own OpenMP hangs there): the default backend steps on foreach ops
    on one thread, an explicit ``backend='cpu'`` raises a ValueError saying why."""
    run = subprocess.run([sys.executable, "-c", FORK_CHILD, str(backend)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stderr
    if backend is None:
        assert lines[0].startswith("stepped") and lines[-1].startswith("exit 0")
        assert float(lines[0].split()[1]) < -0.0019  # the second step moved it
    else:
        assert lines[0].startswith("raised ValueError backend='cpu' is not available here: this process was forked")
        assert lines[-1].startswith("exit 3")


@pytest.mark.parametrize(
    "cls, precision, codes, needed",
    [
        (adamkit.Adam, "int8", "exp_avg_int8", "1000 code bytes and 4 block scales"),
        (adamkit.Adam, "int4", "exp_avg_int4_normalized", "500 code bytes and 32 block scales"),
        (adamkit.ADOPT, "int4", "exp_avg_int4", "500 code bytes and 32 block scales"),  # stored plain
    ],
)
def test_quantized_codes_of_another_size_are_reported_as_such(cls, precision, codes, needed):
    p = torch.nn.Parameter(torch.randn(1000))
    opt = cls([p], lr=1e-3, state_precision=precision)
    p.grad = torch.randn(1000)
    opt.step()
    saved = opt.state_dict()
    saved["state"][0][codes] = saved["state"][0][codes][:100].clone()
    opt.load_state_dict(saved)
    with pytest.raises(ValueError, match=rf"exp_avg is held in {precision}.*holds 100.*needs {needed}"):
        opt.step()


@pytest.mark.parametrize("betas,error", [((0.9,), ValueError), ((0.9, 0.99, 0.5), ValueError), (0.9, TypeError)])
def test_betas_must_be_a_pair_from_the_constructor_on(betas, error):
    with pytest.raises(error, match="betas must be a pair"):
        adamkit.Adam([torch.nn.Parameter(torch.zeros(3))], betas=betas)
