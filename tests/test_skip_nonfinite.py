"""``skip_nonfinite``: a group with a NaN or infinite gradient is not stepped at all and
the skip is counted; the default follows torch.optim (non-finite values flow in)."""

from __future__ import annotations

import copy
import pickle
import re

import pytest
import torch
from matrix import CPU_BACKENDS

import adamkit


def batches(n_steps, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) for s in shapes] for _ in range(n_steps)]


def run(opt, params, grads_per_step):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()


CASES = [(adamkit.AdamW, backend) for backend in CPU_BACKENDS]
CASES += [(cls, "cpu") for cls in (adamkit.NAdam, adamkit.RAdam, adamkit.ADOPT)]


@pytest.mark.parametrize("cls,backend", CASES, ids=lambda x: getattr(x, "__name__", x))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("precision", [None, "int8"])
def test_a_nonfinite_batch_mid_run_is_skipped_as_if_it_never_came(cls, backend, bad, precision):
    shapes = [(50, 3), (7,), ()]
    good = batches(6, shapes)
    poisoned = [[g.clone() for g in grads] for grads in good[:3]]
    poisoned[2][1][4] = bad  # a third batch with one bad element, then the rest
    start = [torch.randn(s, generator=torch.Generator().manual_seed(1)) for s in shapes]

    clean = [torch.nn.Parameter(x.clone()) for x in start]
    opt = cls(clean, lr=1e-2, backend=backend, state_precision=precision, skip_nonfinite=True, seed=0)
    run(opt, clean, good[:2] + good[3:])

    skipped = [torch.nn.Parameter(x.clone()) for x in start]
    other = cls(skipped, lr=1e-2, backend=backend, state_precision=precision, skip_nonfinite=True, seed=0)
    run(other, skipped, good[:2] + [poisoned[2]] + good[3:])

    assert other.skipped_steps == 1 and opt.skipped_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(clean, skipped))
    for a, b in zip(clean, skipped):
        assert all(torch.equal(opt.state[a][k], other.state[b][k]) for k in opt.state[a])


def test_only_the_group_with_the_bad_gradient_is_skipped():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], lr=0.1, skip_nonfinite=True)
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.ones(3)
    opt.step()
    assert torch.equal(a.detach(), torch.ones(3)) and not opt.state[a]  # untouched, not even initialised
    assert torch.all(b < 1) and int(opt.state[b]["step"]) == 1
    assert opt.skipped_steps == 1


def test_a_group_can_opt_in_alone():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([{"params": [a], "skip_nonfinite": True}, {"params": [b]}], lr=0.1)
    a.grad = b.grad = torch.tensor([float("inf"), 1.0])
    opt.step()
    assert torch.equal(a.detach(), torch.ones(2)) and b.isnan().any()


@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_the_default_follows_torch(backend):
    ours, theirs = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = adamkit.Adam([ours], lr=0.1, backend=backend)
    torch_opt = torch.optim.Adam([theirs], lr=0.1, foreach=backend == "foreach")
    for grad in (torch.tensor([1.0, float("nan"), float("inf"), 2.0]), torch.ones(4)):
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours[~ours.isnan()], theirs[~theirs.isnan()])
    assert opt.skipped_steps == 0


def test_half_precision_gradients_with_large_finite_values_are_not_skipped():
    p = torch.nn.Parameter(torch.ones(1000, dtype=torch.float16))
    opt = adamkit.Adam([p], lr=1e-3, skip_nonfinite=True)
    p.grad = torch.full((1000,), 60000.0, dtype=torch.float16)  # its 2-norm would overflow fp16
    opt.step()
    assert opt.skipped_steps == 0 and torch.all(p < 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_float64_gradients_beyond_fp32_s_largest_number_are_finite_and_step(backend, dtype):
    """Their norms were once judged in fp32, where 1e39 is infinite: the step was
    skipped.  Oracle: torch.optim.Adam, which steps them."""
    grad = torch.tensor([1e39, 1.0, -1.0], dtype=torch.float64).to(dtype)
    ours, theirs = torch.nn.Parameter(torch.ones(3, dtype=dtype)), torch.nn.Parameter(torch.ones(3, dtype=dtype))
    opt = adamkit.Adam([ours], lr=0.1, skip_nonfinite=True, backend=backend)
    oracle = torch.optim.Adam([theirs], lr=0.1, foreach=False)
    ours.grad, theirs.grad = grad.clone(), grad.clone()
    opt.step()
    oracle.step()
    assert opt.skipped_steps == 0
    torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_an_empty_param_steps_beside_the_others(backend):
    """An empty gradient's max-abs norm has no value: torch's norm raised on it, naming
    nothing, at every step.  Oracle: the same step without the empty param."""
    runs = []
    for with_empty in (True, False):
        p = torch.nn.Parameter(torch.ones(3))
        params = [p, torch.nn.Parameter(torch.zeros(0))] if with_empty else [p]
        opt = adamkit.Adam(params, lr=0.1, skip_nonfinite=True, backend=backend)
        for q in params:
            q.grad = torch.ones_like(q)
        opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)


def test_the_count_survives_copies_and_the_option_is_checked():
    p = torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([p], skip_nonfinite=True)
    p.grad = torch.tensor([float("nan"), 0.0])
    opt.step()
    assert copy.deepcopy(opt).skipped_steps == 1 and pickle.loads(pickle.dumps(opt)).skipped_steps == 1
    with pytest.raises(TypeError, match="skip_nonfinite must be True or False, got 'yes'"):
        adamkit.Adam([p], skip_nonfinite="yes")
    opt.param_groups[0]["skip_nonfinite"] = 1
    with pytest.raises(TypeError, match=r"skip_nonfinite must be True or False in param_groups\[0\], got 1"):
        opt.step()


def test_the_count_survives_a_state_dict_and_a_bad_count_is_refused():
    """A group's skipped steps travel in its saved group, as ``skipped_steps``: a load
    restores them (they used to restart at 0), a torch.optim state dict (no such key)
    starts them at 0, and a count that is no whole number >= 0 is refused by name,
    leaving the optimizer as it was."""
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], skip_nonfinite=True)
    for _ in range(2):
        a.grad, b.grad = torch.tensor([float("nan"), 0.0]), torch.ones(2)
        opt.step()
    saved = opt.state_dict()
    assert [g["skipped_steps"] for g in saved["param_groups"]] == [2, 0]

    fresh = adamkit.Adam([{"params": [a]}, {"params": [b]}], skip_nonfinite=True)
    fresh.load_state_dict(copy.deepcopy(saved))
    assert fresh.skipped_steps == 2 and [s["skipped_steps"] for s in fresh.stats()] == [2, 0]
    assert all("skipped_steps" not in group for group in fresh.param_groups)

    torch_opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}])
    fresh.load_state_dict(torch_opt.state_dict())
    assert fresh.skipped_steps == 0

    fresh.load_state_dict(copy.deepcopy(saved))
    for bad in (-1, 1.5, "2", True, None):
        edited = copy.deepcopy(saved)
        edited["param_groups"][1]["skipped_steps"] = bad
        with pytest.raises(ValueError, match=rf"skipped_steps = {re.escape(repr(bad))} in param_groups\[1\]"):
            fresh.load_state_dict(edited)
        assert fresh.skipped_steps == 2 and fresh.state_dict()["param_groups"] == saved["param_groups"]
