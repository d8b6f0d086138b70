"""torch.optim machinery behaves as with torch.optim.Adam: LR schedulers, hooks,
zero_grad, closures, deepcopy, pickling, printing, named params, param groups,
the differentiable path and capturable."""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch
from matrix import CPU_BACKENDS, FAMILY, OPTIMIZERS, Case, clone_groups, make_params, refused, run
from test_torch_parity import assert_same_state
from torch.optim import lr_scheduler
from torch.optim.optimizer import register_optimizer_step_pre_hook

import adamkit

SCHEDULERS = {
    "StepLR": lambda opt: lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "CosineAnnealingLR": lambda opt: lr_scheduler.CosineAnnealingLR(opt, T_max=20),
    "OneCycleLR": lambda opt: lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=40),  # edits betas too
    "LambdaLR": lambda opt: lr_scheduler.LambdaLR(opt, lambda epoch: 1 / (1 + epoch)),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_lr_schedulers_bit_identical(optimizer, scheduler, tensor_lr):
    case = Case(optimizer=optimizer, tensor_lr=tensor_lr)
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs, ours = torch_cls(torch_groups, foreach=False), ours_cls(our_groups, backend="single_tensor")
    schedules = [SCHEDULERS[scheduler](theirs), SCHEDULERS[scheduler](ours)]
    for _ in range(30):
        run(theirs, torch_groups, 1)
        run(ours, our_groups, 1)
        for s in schedules:
            s.step()
    assert_same_state(ours, our_groups, theirs, torch_groups)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


#: NumPy values of float hyperparameters, as torch.optim takes them
NUMPY_HYPERPARAMETERS = {
    "lr float32": {"lr": np.float32(3e-3)},
    "lr 0-d array": {"lr": np.array(3e-3)},
    "eps float32": {"eps": np.float32(1e-6)},
    "weight_decay float32": {"weight_decay": np.float32(0.05)},
    "betas array": {"betas": np.array([0.8, 0.99])},
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("given", list(NUMPY_HYPERPARAMETERS))
def test_numpy_hyperparameters_are_the_numbers_they_hold(optimizer, given):
    """NumPy numbers (a float32 lr, a 0-d array, an array of betas), given to the
    constructor and written into the group by a schedule between steps, step as the
    Python floats of their values do in torch.optim: the host's step scalars stay
    float64 (torch's own arithmetic with an ``np.float32`` lr is float32's)."""
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    values = NUMPY_HYPERPARAMETERS[given]
    as_floats = {k: tuple(map(float, v)) if k == "betas" else float(v) for k, v in values.items()}
    case = Case(optimizer=optimizer)
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs = torch_cls(torch_groups, foreach=False, **as_floats)
    ours = ours_cls(our_groups, backend="single_tensor", **values)
    for step in range(6):
        run(theirs, torch_groups, 1, seed=step)
        run(ours, our_groups, 1, seed=step)
        for group in theirs.param_groups:
            group["lr"] = float(np.float32(group["lr"]) * np.float32(0.8))
        for group in ours.param_groups:
            group["lr"] = np.float32(group["lr"]) * np.float32(0.8)
    assert_same_state(ours, our_groups, theirs, torch_groups)


@pytest.mark.parametrize(
    "given,error,named",
    [
        ({"lr": np.bool_(True)}, TypeError, "lr"),
        ({"lr": np.array([1e-3, 1e-3])}, TypeError, "lr"),
        ({"eps": np.array(["1e-8"])}, TypeError, "eps"),
        ({"weight_decay": np.float32(-1.0)}, ValueError, "weight_decay"),
        ({"betas": np.array(0.9)}, TypeError, "betas"),
        ({"betas": np.array([0.9, 0.99, 0.5])}, ValueError, "betas"),
        ({"betas": torch.tensor([0.9, 1.5])}, ValueError, "betas"),
    ],
)
def test_numpy_values_that_are_not_numbers_are_refused_by_name(given, error, named):
    with pytest.raises(error, match=named):
        adamkit.Adam([torch.nn.Parameter(torch.zeros(3))], **given)


def one_param_optimizer(**kwargs):
    p = torch.nn.Parameter(torch.randn(3))
    p.grad = torch.randn(3)
    return adamkit.Adam([p], **kwargs), p


def test_step_hooks_called_in_order():
    opt, _ = one_param_optimizer()
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o)))
    handle = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("global", o)))
    try:
        opt.step()
    finally:
        handle.remove()
    assert calls == [("global", opt), ("pre", opt), ("post", opt)]


def test_state_dict_hooks():
    opt, _ = one_param_optimizer()
    opt.step()
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: seen.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: seen.append("load-post"))
    state_dict = opt.state_dict()
    assert state_dict["extra"] == 1
    opt.load_state_dict({k: v for k, v in state_dict.items() if k != "extra"})
    assert seen == ["sd-pre", "load-pre", "load-post"]


def _two_param_run(**options):
    """An optimizer over two params of different scales after three steps, and its state dict."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))]
    opt = adamkit.AdamW(params, lr=1e-2, **options)
    for _ in range(3):
        params[0].grad, params[1].grad = torch.randn(300) * 1e-2, torch.randn(300) * 10
        opt.step()
    return opt, params


def _loaded_with_hooks(make) -> tuple:
    """A one-param optimizer's own state dict loaded back under a pre-hook zeroing the
    first moment and post-hooks reading and doubling the second: what the state holds."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(30))]
    opt = make(params, lr=1e-2)
    params[0].grad = torch.randn(30)
    opt.step()
    saved = opt.state_dict()

    def zero_first_moment(optimizer, state_dict):
        state_dict["state"][0] = {**state_dict["state"][0], "exp_avg": torch.zeros(30)}

    seen = []
    opt.register_load_state_dict_pre_hook(zero_first_moment)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[params[0]]["exp_avg_sq"].dtype))
    opt.register_load_state_dict_post_hook(lambda o: o.state[params[0]]["exp_avg_sq"].mul_(2))
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    return state["exp_avg"].abs().sum().item(), state["exp_avg_sq"].sum().item(), seen


def test_what_load_hooks_change_stays_changed():
    """Oracle: torch.optim.AdamW with the same hooks.  adamkit's own part of the load
    once ran after torch's, on the dict as given: it undid a pre-hook's edit and a
    post-hook's, and post-hooks saw moments not yet in their final dtype."""
    ours = _loaded_with_hooks(adamkit.AdamW)
    assert ours == _loaded_with_hooks(torch.optim.AdamW)
    assert ours[0] == 0


def test_load_hooks_see_and_keep_moments_held_in_their_own_dtype():
    """bf16 moments beside fp32 params (torch casts them to fp32, adamkit restores them):
    a pre-hook's zeros, a post-hook's doubling and its option edit stay, and the
    post-hooks see bf16, the state as the load leaves it."""
    opt, params = _two_param_run(state_precision="bf16")
    saved = opt.state_dict()
    seen = []

    def zero_first_moment(optimizer, state_dict):
        state_dict["state"][0] = {**state_dict["state"][0], "exp_avg": torch.zeros(300, dtype=torch.bfloat16)}

    opt.register_load_state_dict_pre_hook(zero_first_moment)
    opt.register_load_state_dict_post_hook(lambda o: seen.append(o.state[params[0]]["exp_avg_sq"].dtype))
    opt.register_load_state_dict_post_hook(lambda o: o.state[params[0]]["exp_avg_sq"].mul_(2))
    opt.register_load_state_dict_post_hook(lambda o: o.param_groups[0].update(decouple_lr=True))
    opt.load_state_dict(saved)
    state = opt.state[params[0]]
    assert seen == [torch.bfloat16]
    assert torch.equal(state["exp_avg"], torch.zeros(300, dtype=torch.bfloat16))
    assert torch.equal(state["exp_avg_sq"], saved["state"][0]["exp_avg_sq"] * 2)
    assert opt.param_groups[0]["decouple_lr"] is True


@pytest.mark.parametrize("state_precision", [None, "int8", "bf16"])
def test_a_pre_hook_that_remaps_params_by_name_gives_each_its_own_state(state_precision):
    """torch's docs remap a checkpoint by ``param_names`` with a pre-hook returning a new
    dict; adamkit once copied its quantized and 16-bit moments from the dict as given, by
    position, so that each param got the other's codes with its own scales.  Oracle: the
    state saved under each name."""
    source, _ = _two_param_run(state_precision=state_precision)
    saved = source.state_dict()
    torch.manual_seed(1)
    swapped = [torch.nn.Parameter(torch.randn(300)), torch.nn.Parameter(torch.randn(300))]
    opt = adamkit.AdamW(swapped, lr=1e-2, state_precision=state_precision)

    def remap(optimizer, state_dict):  # the checkpoint's params 0 and 1 are this model's 1 and 0
        return {**state_dict, "state": {1 - index: state for index, state in state_dict["state"].items()}}

    opt.register_load_state_dict_pre_hook(remap)
    opt.load_state_dict(saved)
    for index, param in enumerate(swapped):
        for key, value in saved["state"][1 - index].items():
            assert torch.equal(opt.state[param][key], value), (index, key)


def test_a_loaded_group_without_its_hyperparameters_is_refused_and_nothing_changes():
    """torch.optim fails at its step (KeyError: 'betas'); adamkit once filled in the class
    defaults, and training went on with other hyperparameters than it was made with."""
    opt, params = _two_param_run(betas=(0.5, 0.6), eps=1e-3, weight_decay=0.25)
    saved = opt.state_dict()
    for key in ("betas", "eps", "weight_decay"):
        del saved["param_groups"][0][key]
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"\['betas', 'eps', 'weight_decay'\] are missing in param_groups\[0\]"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert all(torch.equal(after["state"][i][k], v) for i in before["state"] for k, v in before["state"][i].items())


def test_a_loaded_group_with_no_lr_is_refused_by_name():
    opt, _ = _two_param_run()
    saved = opt.state_dict()
    saved["param_groups"][0]["lr"] = None
    with pytest.raises(TypeError, match=r"lr must be a float or a 1-element tensor in param_groups\[0\], got None"):
        opt.load_state_dict(saved)


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(set_to_none):
    opt, p = one_param_optimizer()
    opt.zero_grad(set_to_none=set_to_none)
    assert (p.grad is None) if set_to_none else torch.equal(p.grad, torch.zeros(3))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_closure_like_torch(optimizer):
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    x, target = torch.randn(16, 4), torch.randn(16, 1)

    def train(cls, **kwargs):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        opt = cls(model.parameters(), lr=0.05, **kwargs)

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            return loss

        losses = [opt.step(closure).item() for _ in range(10)]
        return losses, [p.detach().clone() for p in model.parameters()]

    results = [train(ours_cls, backend="single_tensor"), train(torch_cls, foreach=False)]
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_deepcopy_is_independent_and_identical():
    case = Case(optimizer="Adam", amsgrad=True)
    groups = make_params(case)
    opt = adamkit.Adam(groups, **case.adamkit_kwargs())
    run(opt, groups, 4)
    bundle = copy.deepcopy({"groups": groups, "opt": opt})
    run(opt, groups, 6, seed=7)
    run(bundle["opt"], bundle["groups"], 6, seed=7)
    # Parameter.__deepcopy__ makes strided views contiguous, so strides are not compared
    assert_same_state(bundle["opt"], bundle["groups"], opt, groups, check_strides=False)
    assert bundle["opt"].state is not opt.state


def test_pickle_round_trip_continues_identically():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = adamkit.AdamW(model.parameters(), lr=0.01, decouple_lr=True)
    x = torch.randn(8, 3)

    def train(model, opt, steps):
        for _ in range(steps):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()

    train(model, opt, 3)
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert repr(opt2) == repr(opt)
    train(model, opt, 4)
    train(model2, opt2, 4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_printing_shows_torch_lines_plus_ours(optimizer):
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    p = [torch.nn.Parameter(torch.randn(2))]
    ours, theirs = repr(ours_cls(p)).splitlines(), repr(torch_cls(p)).splitlines()
    assert ours[0] == f"{ours_cls.__name__} ("
    assert set(theirs[1:]) <= set(ours[1:])
    extra = {line.split(":")[0].strip() for line in set(ours[1:]) - set(theirs[1:])}
    assert extra <= set(ours_cls.extra_group_keys)


def test_named_parameters_and_state_dict_to_torch():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ours = adamkit.Adam(model.named_parameters())
    model(torch.randn(4, 3)).sum().backward()
    ours.step()
    state_dict = ours.state_dict()
    assert state_dict["param_groups"][0]["param_names"] == ["weight", "bias"]
    theirs = torch.optim.Adam(model.named_parameters())
    theirs.load_state_dict(state_dict)
    assert theirs.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]


def test_max_lr_defaults_to_each_groups_initial_lr():
    a, b, c = (torch.nn.Parameter(torch.randn(2)) for _ in range(3))
    opt = adamkit.AdamW([{"params": [a], "lr": 0.1}, {"params": [b]}], lr=0.01, decouple_lr=True)
    opt.add_param_group({"params": [c], "lr": torch.tensor(0.5)})
    assert [g["max_lr"] for g in opt.param_groups] == [0.1, 0.01, 0.5]
    explicit = adamkit.AdamW([a], lr=0.01, decouple_lr=True, max_lr=0.1)
    assert explicit.param_groups[0]["max_lr"] == 0.1


@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "cpu"])
def test_fully_decoupled_decay_closed_form(backend):
    r"""With zero gradients the moments stay 0 and only decay acts:
    theta_t = theta_0 \prod_s (1 - (lr_s / max_lr) wd), independent of lr's magnitude;
    max_lr the initial lr or given apart from it."""
    wd, steps = 1e-2, 40
    for lr, max_lr in ((1e-3, None), (1.0, None), (1e-3, 0.05)):
        p = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))
        opt = adamkit.AdamW([p], lr=lr, weight_decay=wd, decouple_lr=True, max_lr=max_lr, backend=backend)
        sched = lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
        expected = 1.0
        for _ in range(steps):
            expected *= 1 - (opt.param_groups[0]["lr"] / (max_lr or lr)) * wd
            p.grad = torch.zeros_like(p)
            opt.step()
            sched.step()
        torch.testing.assert_close(p.detach(), torch.full((5,), expected, dtype=torch.float64), rtol=1e-14, atol=0)


def unrolled_loss(cls, w0, lr, amsgrad):
    """Final loss after 5 differentiable steps on sum(c w^2 / 2) from w0."""
    w = w0.clone()
    opt = cls([w], lr=lr, differentiable=True, weight_decay=0.1, amsgrad=amsgrad)
    curvature = torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)
    for _ in range(5):
        w.grad = w.mul(curvature)  # the gradient; saves nothing of w
        opt.step()
    return (w**2).sum()


def leaves():
    w0 = torch.tensor([0.5, -1.5, 2.0], dtype=torch.float64, requires_grad=True)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    return w0, lr


@pytest.mark.parametrize("amsgrad", [False, True])
def test_differentiable_hypergradients(amsgrad):
    """Gradients w.r.t. the initial weights and a tensor lr through 5 steps, checked
    against float64 central finite differences; the loss equals the non-differentiable
    path's. (torch's own differentiable AMSGrad raises an in-place autograd error.)"""
    w0, lr = leaves()
    loss = unrolled_loss(adamkit.Adam, w0, lr, amsgrad)
    grads = torch.autograd.grad(loss, (w0, lr))

    with torch.no_grad():
        plain = [w0.detach().clone()]
        opt = adamkit.Adam(plain, lr=0.1, weight_decay=0.1, amsgrad=amsgrad)
        for _ in range(5):
            plain[0].grad = plain[0] * torch.tensor([2.0, 4.0, 6.0], dtype=torch.float64)
            opt.step()
    torch.testing.assert_close(loss.detach(), (plain[0] ** 2).sum(), rtol=1e-13, atol=0)

    def loss_at(w0_value, lr_value):
        with torch.no_grad():
            return unrolled_loss(adamkit.Adam, w0_value, lr_value, amsgrad).item()

    h = 1e-6
    w_base, lr_base = w0.detach(), lr.detach()
    numeric_w = [
        (loss_at(w_base + h * e, lr_base) - loss_at(w_base - h * e, lr_base)) / (2 * h)
        for e in torch.eye(3, dtype=torch.float64)
    ]
    numeric_lr = (loss_at(w_base, lr_base + h) - loss_at(w_base, lr_base - h)) / (2 * h)
    torch.testing.assert_close(grads[0], torch.tensor(numeric_w, dtype=torch.float64), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(grads[1], torch.tensor(numeric_lr, dtype=torch.float64), rtol=1e-6, atol=1e-8)


def test_differentiable_agrees_with_torch():
    """torch's differentiable path computes bias corrections in float32 (beta ** step
    on a float32 step tensor), so agreement is to float32 precision."""
    (w0a, lra), (w0t, lrt) = leaves(), leaves()
    ours = torch.autograd.grad(unrolled_loss(adamkit.Adam, w0a, lra, False), (w0a, lra))
    theirs = torch.autograd.grad(unrolled_loss(torch.optim.Adam, w0t, lrt, False), (w0t, lrt))
    for a, t in zip(ours, theirs):  # normwise: max |a - t| relative to max |t|
        assert (a - t).abs().max() <= 1e-5 * t.abs().max()


def test_capturable_keeps_step_on_param_device():
    opt, p = one_param_optimizer(capturable=True)
    opt.step()
    assert opt.state[p]["step"].device == p.device and opt.state[p]["step"].item() == 1.0


def test_torch_save_whole_optimizer_is_loadable():
    opt, p = one_param_optimizer(amsgrad=True)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    assert torch.load(buffer, weights_only=True)["param_groups"][0]["amsgrad"] is True


def unrolled(beta1, beta2, lr, w0, steps=4, cls=adamkit.Adam):
    w = w0.clone()
    opt = cls([w], lr=lr, betas=(beta1, beta2), differentiable=True)
    for _ in range(steps):
        w.grad = w * torch.tensor(3.0, dtype=w.dtype)
        opt.step()
    return (w**2).sum()


@pytest.mark.parametrize("name", [name for name in FAMILY if "differentiable" not in refused(name)])
def test_differentiable_tensor_hyperparameters_requiring_grad(name):
    """Hypergradients through four steps w.r.t. the initial weights, lr, beta1 and beta2
    (tensors that require grad), every class, checked by central differences in float64.
    (torch's NAdam and RAdam fail here with an in-place error, and so did adamkit's NAdam,
    RAdam, AdEMAMix and ADOPT, whose terms read moments that the next step moves in place.)"""
    cls = FAMILY[name][0]
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in ([0.7, -1.2], 0.1, 0.8, 0.95)]
    w0, lr, b1, b2 = leaves
    grads = torch.autograd.grad(unrolled(b1, b2, lr, w0, cls=cls), leaves, allow_unused=True)
    # NAdam keeps mu_product in float32 (torch's state), whose rounding a step of 1e-6
    # would read as a slope: a wider one
    h = 1e-3 if name == "NAdam" else 1e-6

    def at(index: int, shift) -> float:
        moved = [leaf.detach() + (shift if k == index else 0.0) for k, leaf in enumerate(leaves)]
        with torch.no_grad():
            return unrolled(moved[2], moved[3], moved[1], moved[0], cls=cls).item()

    for index, (leaf, analytic) in enumerate(zip(leaves, grads)):
        directions = torch.eye(2, dtype=torch.float64) if leaf.dim() else [torch.tensor(1.0, dtype=torch.float64)]
        numeric = [(at(index, h * e) - at(index, -h * e)) / (2 * h) for e in directions]
        expected = torch.tensor(numeric if leaf.dim() else numeric[0], dtype=torch.float64)
        analytic = torch.zeros_like(expected) if analytic is None else analytic  # (not read: beta2 in AdaMax's max)
        torch.testing.assert_close(analytic, expected, rtol=1e-5, atol=1e-8, msg=f"{name}: leaf {index}")


def test_differentiable_one_element_lr_with_0d_param():
    w0 = torch.tensor(0.5, dtype=torch.float64)
    lr = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    loss = unrolled(0.9, 0.999, lr, w0)
    (grad,) = torch.autograd.grad(loss, lr)
    assert grad.shape == (1,) and torch.isfinite(grad).all()


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


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_step_between_forward_and_backward_fails_the_backward(backend):
    """The fused kernels write params through raw addresses; the step advances their
    autograd version counters, so a backward through a graph that saved a param before
    the step fails, as after torch.optim's for-loop step (it had run silently at the
    new weights)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, backend=backend)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    loss = model(torch.randn(3, 4)).square().sum()
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
