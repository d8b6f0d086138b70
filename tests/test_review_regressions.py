"""Cases a code review found: each fails without its fix.

* tensor betas whose dtype differs from the params' (torch casts per param dtype);
* differentiable groups with tensor betas that require grad, and a 1-element lr;
* a step that would fail on bad *state* fails before touching anything;
* capturable groups never read a tensor on the host;
* ``foreach=False`` always means the per-tensor path;
* AdaMax accepts a tensor lr with ``foreach=True`` as torch.optim.Adamax does;
* OneCycleLR's peak becomes ``max_lr`` for fully decoupled decay;
* from the second step on, nothing is validated or rebuilt again (a CUDA graph is
  captured after one eager step), and a state emptied by hand is noticed.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_errors import assert_untouched, snapshot, two_group_optimizer

import adamkit
from adamkit import kernels

PAIRS = {"Adam": (adamkit.Adam, torch.optim.Adam), "AdaMax": (adamkit.AdaMax, torch.optim.Adamax)}


@pytest.mark.parametrize("name", list(PAIRS))
@pytest.mark.parametrize(
    "param_dtype,beta_dtype",
    # (16-bit params no longer take torch's op-by-op rounding: their moments are stored
    # stochastically, see adamkit.rounding; a casting error shows in fp32 and fp64 alike)
    [(torch.float32, torch.float64), (torch.float64, torch.float32)],
)
def test_tensor_betas_of_another_dtype_bit_identical(name, param_dtype, beta_dtype):
    ours_cls, torch_cls = PAIRS[name]
    g = torch.Generator().manual_seed(0)
    start = torch.randn(6, 4, generator=g).to(param_dtype)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    betas = (torch.tensor(0.85, dtype=beta_dtype), torch.tensor(0.995, dtype=beta_dtype))
    opt_ours = ours_cls([ours], betas=betas, backend="reference")
    opt_torch = torch_cls([theirs], betas=betas, foreach=False)
    for _ in range(30):
        grad = torch.randn(6, 4, generator=g).to(param_dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_torch.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(opt_ours.state[ours]["exp_avg"], opt_torch.state[theirs]["exp_avg"])


def unrolled(beta1, beta2, lr, w0, steps=4):
    w = w0.clone()
    opt = adamkit.Adam([w], lr=lr, betas=(beta1, beta2), differentiable=True)
    for _ in range(steps):
        w.grad = w * torch.tensor(3.0, dtype=w.dtype)
        opt.step()
    return (w**2).sum()


def test_differentiable_tensor_betas_requiring_grad():
    """Hypergradients w.r.t. beta1 and beta2 (as tensors), checked by central differences."""
    w0 = torch.tensor([0.7, -1.2], dtype=torch.float64)
    b1 = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    b2 = torch.tensor(0.95, dtype=torch.float64, requires_grad=True)
    grads = torch.autograd.grad(unrolled(b1, b2, 0.1, w0), (b1, b2))
    h = 1e-6
    with torch.no_grad():
        numeric = [
            (unrolled(b1 + h, b2, 0.1, w0) - unrolled(b1 - h, b2, 0.1, w0)) / (2 * h),
            (unrolled(b1, b2 + h, 0.1, w0) - unrolled(b1, b2 - h, 0.1, w0)) / (2 * h),
        ]
    for analytic, finite_difference in zip(grads, numeric):
        torch.testing.assert_close(analytic, finite_difference, rtol=1e-6, atol=1e-9)


def test_differentiable_one_element_lr_with_0d_param():
    w0 = torch.tensor(0.5, dtype=torch.float64)
    lr = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    loss = unrolled(0.9, 0.999, lr, w0)
    (grad,) = torch.autograd.grad(loss, lr)
    assert grad.shape == (1,) and torch.isfinite(grad).all()


def test_differentiable_leaf_param_fails_before_touching_state():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.Adam([p], differentiable=True)
    p.grad = torch.randn(3)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="leaf Variable"):
        opt.step()
    assert_untouched(opt, before)
    assert not opt.state


def test_amsgrad_switched_on_after_first_step_fails_cleanly():
    opt, a, b = two_group_optimizer()
    opt.param_groups[1]["amsgrad"] = True
    before = snapshot(opt)
    with pytest.raises(ValueError, match="max_exp_avg_sq.*amsgrad was switched on"):
        opt.step()
    assert_untouched(opt, before)


def test_wrong_shaped_loaded_state_fails_cleanly():
    opt, a, b = two_group_optimizer()
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["state"][1]["exp_avg"] = torch.zeros(2)
    opt.load_state_dict(state_dict)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"exp_avg.*shape \(2,\).*shape \(4,\)"):
        opt.step()
    assert_untouched(opt, before)


def test_adam_state_loaded_into_adamax_fails_cleanly():
    p = torch.nn.Parameter(torch.randn(3))
    adam = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    adam.step()
    adamax = adamkit.AdaMax([p])
    adamax.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="exp_inf.*different optimizer"):
        adamax.step()


@pytest.mark.parametrize("lr", ["abc", None, torch.tensor([0.1, 0.2])])
def test_bad_lr_in_added_group_leaves_no_group(lr):
    opt = adamkit.Adam([torch.nn.Parameter(torch.randn(2))])
    with pytest.raises((TypeError, ValueError), match="lr"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lr": lr})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW, adamkit.AdaMax])
@pytest.mark.parametrize("backend", ["reference", "foreach", "triton"])
def test_capturable_step_never_reads_a_tensor_on_the_host(cls, backend, monkeypatch):
    """The capturable contract: no ``.item()``/``float()``/``bool()`` of a tensor during
    step (on CUDA each would be a host sync, forbidden inside graph capture)."""
    params = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64)), torch.nn.Parameter(torch.randn(5))]
    lr = torch.tensor(0.01, dtype=torch.float64)
    opt = cls(params, lr=lr, weight_decay=0.1, capturable=True, backend=backend, decouple_lr=True)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # state initialisation may read; the steady-state step may not

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor inside a capturable step")

    for name in ("item", "__float__", "__bool__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    opt.step()
    opt.step()
    monkeypatch.undo()
    assert all(opt.state[p]["step"].item() == 3 for p in params)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_foreach_false_means_per_tensor_path_on_any_device(device):
    devices = {torch.device(device)}
    opt = adamkit.Adam([torch.nn.Parameter(torch.randn(2))], foreach=False)
    name = opt._backend_name(opt.param_groups[0], devices)
    assert kernels.resolve(name, devices, differentiable=False).name == "reference"


def test_adamax_tensor_lr_with_foreach_runs():
    """torch.optim.Adamax accepts a tensor lr with foreach=True (Adam does not).  torch's
    foreach Adamax then divides lr.item() in float64 while its for-loop divides in the
    tensor's float32; adamkit's paths all follow the for-loop, and match it bit for bit."""
    start = torch.randn(5)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = adamkit.AdaMax([ours], lr=torch.tensor(0.01), foreach=True)
    opt_torch = torch.optim.Adamax([theirs], lr=torch.tensor(0.01), foreach=False)
    for _ in range(5):
        grad = torch.randn(5)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_torch.step()
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_one_cycle_peak_becomes_max_lr_for_fully_decoupled_decay():
    """OneCycleLR writes its peak into ``group["max_lr"]``: exactly the eta_max that
    fully decoupled decay divides by, so decay follows lr_t / peak."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = adamkit.AdamW([p], lr=1e-3, weight_decay=0.1, decouple_lr=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=20)
    assert opt.param_groups[0]["max_lr"] == 0.05
    expected = 1.0
    for _ in range(10):
        expected *= 1 - (opt.param_groups[0]["lr"] / 0.05) * 0.1
        p.grad = torch.zeros_like(p)
        opt.step()
        sched.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), expected, dtype=torch.float64), rtol=1e-14, atol=0)


def test_decay_factor_that_would_flip_sign_is_rejected():
    opt = adamkit.AdamW([torch.nn.Parameter(torch.randn(2))], lr=1e-3, weight_decay=0.5, decouple_lr=True)
    opt.param_groups[0]["lr"] = 1.0  # lr / max_lr * wd = 500
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="flip the params' sign"):
        opt.step()


@pytest.mark.parametrize("backend", ["cpu", "foreach"])
def test_the_second_step_rebuilds_nothing_and_a_cleared_state_is_noticed(backend):
    """A step's first run initialises every group's state before any group steps and
    keys the groups on it: the second step finds every key (and the fused kernels'
    buckets) as the first left them.  Found on a GPU: the keys counted the state table
    before it was filled, so the second step rebuilt its address tables, which copies
    from the host and fails inside CUDA graph capture."""
    torch.manual_seed(0)
    groups = [{"params": [torch.nn.Parameter(torch.randn(5, 3))]}, {"params": [torch.nn.Parameter(torch.randn(4))]}]
    opt = adamkit.AdamW(groups, lr=0.1, backend=backend)
    params = [p for g in groups for p in g["params"]]

    def step():
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        return [dict(opt._group_cache(g)) for g in opt.param_groups]

    first = step()
    second = step()
    for before, after in zip(first, second):
        assert before["validated_key"] == after["validated_key"]
        assert all(after[name] is before[name] for name in ("cpu", "triton") if name in before)
    fresh = adamkit.AdamW([{"params": [p.detach().clone() for p in g["params"]]} for g in groups], lr=0.1)
    opt.state.clear()  # start again from zero moments: the next step must not use the old ones
    step()
    for p in [p for g in fresh.param_groups for p in g["params"]]:
        p.grad = torch.ones_like(p)
    fresh.step()
    for p, q in zip(params, [p for g in fresh.param_groups for p in g["params"]]):
        assert torch.equal(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"])
        assert torch.equal(p, q)
