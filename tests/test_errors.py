"""Bad input: torch's exception types and message text where torch checks, clear
errors naming argument, value and what is allowed where it does not, and a step
that raises leaves every param and state tensor as it was."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
from matrix import ADAMKIT_ERROR_INPUTS, OPTIMIZERS, TORCH_ERROR_INPUTS

import adamkit
from adamkit.kernels import KERNELS
from adamkit.options import OPTIONS

OURS = {name: classes[0] for name, classes in OPTIMIZERS.items()}
TORCH = {name: classes[1] for name, classes in OPTIMIZERS.items()}
#: the bad inputs that also fail when written into a param group by hand
GROUP_EDITS = [
    (k, v, error, words) for kwargs, error, words in ADAMKIT_ERROR_INPUTS if len(kwargs) == 1 for k, v in kwargs.items()
]


def params():
    return [torch.nn.Parameter(torch.randn(3, 2))]


def torch_error(name, kwargs):
    with pytest.raises(Exception) as info:
        TORCH[name](params(), **kwargs)
    return info.value


@pytest.mark.parametrize("name,kwargs", TORCH_ERROR_INPUTS, ids=lambda x: str(x))
def test_same_error_as_torch(name, kwargs):
    expected = torch_error(name, kwargs)
    with pytest.raises(type(expected)) as info:
        OURS[name](params(), **kwargs)
    assert str(expected) in str(info.value)


@pytest.mark.parametrize("name", list(OURS))
def test_sparse_gradient_same_error_as_torch(name):
    for cls in (TORCH[name], OURS[name]):
        p = torch.nn.Parameter(torch.randn(4))
        p.grad = torch.randn(4).to_sparse()
        with pytest.raises(RuntimeError) as info:
            cls([p]).step()
        if cls is TORCH[name]:
            expected = str(info.value)
    assert expected in str(info.value)


@pytest.mark.parametrize("kwargs,error,words", ADAMKIT_ERROR_INPUTS, ids=lambda x: str(x))
def test_adamkit_checks_name_argument_value_and_allowed(kwargs, error, words):
    with pytest.raises(error) as info:
        adamkit.Adam(params(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_every_option_has_a_bad_input():
    tried = {key for kwargs, _, _ in ADAMKIT_ERROR_INPUTS for key in kwargs}
    assert {option.name for option in OPTIONS} <= tried


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_floating_params_rejected(dtype):
    with pytest.raises(TypeError) as info:
        adamkit.Adam([torch.zeros(3, dtype=dtype)])
    assert str(dtype) in str(info.value) and "floating-point" in str(info.value)


def test_a_non_floating_param_is_named_by_its_place_in_its_group():
    opt = adamkit.Adam(params())
    added = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2)), torch.zeros(2, dtype=torch.int64)]
    with pytest.raises(TypeError, match=r"but params\[2\] in param_groups\[1\] has dtype torch.int64"):
        opt.add_param_group({"params": added})
    assert len(opt.param_groups) == 1


def test_bad_added_group_is_not_added():
    opt = adamkit.Adam(params())
    with pytest.raises(ValueError, match=r"param_groups\[1\]"):
        opt.add_param_group({"params": params(), "lr": -1.0})
    assert len(opt.param_groups) == 1


def test_differentiable_needs_a_differentiable_backend():
    p = torch.randn(3)
    p.grad = torch.ones(3)
    opt = adamkit.Adam([p], differentiable=True, backend="foreach")
    with pytest.raises(ValueError, match="differentiable"):
        opt.step()


def snapshot(opt):
    return copy.deepcopy(opt.state_dict()), [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def assert_untouched(opt, before):
    state_dict, values = before
    now = opt.state_dict()
    assert now["state"].keys() == state_dict["state"].keys()
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            assert torch.equal(now["state"][index][key], value)
    for p, value in zip((p for g in opt.param_groups for p in g["params"]), values):
        assert torch.equal(p, value)


def two_group_optimizer(cls=adamkit.Adam, **kwargs):
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4))
    opt = cls([{"params": [a]}, {"params": [b]}], **kwargs)
    a.grad, b.grad = torch.randn(3), torch.randn(4)
    opt.step()  # state exists from here on
    a.grad, b.grad = torch.randn(3), torch.randn(4)
    return opt, a, b


@pytest.mark.parametrize("cls", list(OURS.values()))
@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_failed_step_leaves_everything_untouched(cls, backend):
    opt, a, b = two_group_optimizer(cls, backend=backend)
    b.grad = b.grad.to_sparse()  # group 1 is bad; group 0 must not be stepped either
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_untouched(opt, before)


@pytest.mark.parametrize(
    "key,value,error,words",
    [
        ("lr", math.nan, ValueError, ["learning rate"]),
        ("lr", -0.5, ValueError, ["learning rate"]),
        ("betas", (0.9, 1.0), ValueError, ["beta"]),
        ("weight_decay", -1.0, ValueError, ["weight_decay"]),
        *GROUP_EDITS,
    ],
    ids=str,
)
def test_group_edited_to_bad_value_fails_before_touching_anything(key, value, error, words):
    opt, a, b = two_group_optimizer()
    opt.param_groups[1][key] = value
    before = snapshot(opt)
    with pytest.raises(error) as info:
        opt.step()
    assert "param_groups[1]" in str(info.value)
    for word in words:
        assert word in str(info.value)
    assert_untouched(opt, before)


def test_fused_rejects_complex_params_like_torch():
    for cls in (torch.optim.Adam, adamkit.Adam):
        p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
        p.grad = torch.randn(3, dtype=torch.complex64)
        with pytest.raises(RuntimeError) as info:
            cls([p], fused=True).step()
        if cls is torch.optim.Adam:
            expected = str(info.value)
    assert expected.split(" but ")[0] in str(info.value)


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


@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "cpu"])
def test_a_state_tensor_on_another_device_fails_cleanly(backend):
    """A state tensor moved by hand to another device (``meta`` here) is refused by name
    before any param moves (the foreach path once stepped params[0], then met torch's
    own device error at params[1])."""
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    opt = adamkit.Adam([a, b], backend=backend)
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt.step()
    opt.state[b]["exp_avg"] = torch.zeros(4, device="meta")
    params, state_of_a = [a.detach().clone(), b.detach().clone()], copy.deepcopy(dict(opt.state[a]))
    with pytest.raises(ValueError, match=r"exp_avg'\] of params\[1\] in param_groups\[0\] is shape \(4,\) on meta"):
        opt.step()
    assert torch.equal(a, params[0]) and torch.equal(b, params[1])
    assert all(torch.equal(opt.state[a][key], value) for key, value in state_of_a.items())


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


@pytest.mark.parametrize(
    "name,value,words",
    [
        ("lr", torch.tensor(1e-3, device="meta"), r"Tensor lr is on the meta device"),
        ("lr", torch.tensor(1e-3 + 0j), r"Tensor lr must hold a real number, got a torch.complex64"),
        ("betas", (torch.tensor(0.9, device="meta"), 0.99), r"Tensor betas\[0\] is on the meta device"),
    ],
    ids=["meta lr", "complex lr", "meta beta1"],
)
def test_a_tensor_hyperparameter_without_a_real_value_is_refused_by_name(name, value, words):
    """These once surfaced as torch's own errors (``Tensor.item() cannot be called on meta
    tensors``, ``float() argument must be ... not 'complex'``), naming no argument."""
    with pytest.raises((TypeError, ValueError), match=words):
        adamkit.Adam([torch.nn.Parameter(torch.randn(2))], **{name: value})


def test_decay_factor_that_would_flip_sign_is_rejected():
    opt = adamkit.AdamW([torch.nn.Parameter(torch.randn(2))], lr=1e-3, weight_decay=0.5, decouple_lr=True)
    opt.param_groups[0]["lr"] = 1.0  # lr / max_lr * wd = 500
    opt.param_groups[0]["params"][0].grad = torch.ones(2)
    with pytest.raises(ValueError, match="flip the params' sign"):
        opt.step()


def test_a_decay_factor_of_exactly_zero_is_allowed():
    """(lr / max_lr) * weight_decay = 1 decays the weights to zero, which flips no sign."""
    p = torch.nn.Parameter(torch.randn(2))
    opt = adamkit.AdamW([p], lr=1e-3, weight_decay=1.0, decouple_lr=True)
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.equal(p.detach(), torch.zeros(2))


@pytest.mark.parametrize(
    "cls,kwargs,error,words",
    [
        (adamkit.NAdam, {"momentum_decay": math.inf}, ValueError, ["momentum_decay", "inf", "finite"]),
        (adamkit.NAdam, {"diagnostics": True}, ValueError, ["diagnostics=True", "NAdam", "not run"]),
        (adamkit.ADOPT, {"clip_exponent": -0.25}, ValueError, ["clip_exponent", "-0.25", ">= 0", "None"]),
        (adamkit.ADOPT, {"clip_exponent": math.nan}, ValueError, ["clip_exponent", "nan", "finite"]),
        (adamkit.ADOPT, {"clip_exponent": math.inf}, ValueError, ["clip_exponent", "inf", "finite"]),
        (adamkit.ADOPT, {"clip_exponent": "quarter"}, TypeError, ["clip_exponent", "'quarter'"]),
        (adamkit.ADOPT, {"amsgrad": True}, TypeError, ["amsgrad"]),
        (adamkit.StableAdamW, {"diagnostics": True}, ValueError, ["diagnostics=True", "StableAdamW", "option yet"]),
    ],
    ids=str,
)
def test_the_family_names_what_it_does_not_take(cls, kwargs, error, words):
    with pytest.raises(error) as info:
        cls(params(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_a_bad_clip_exponent_written_into_a_group_fails_before_touching_anything():
    opt, a, b = two_group_optimizer(adamkit.ADOPT)
    opt.param_groups[1]["clip_exponent"] = -1.0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"clip_exponent value: -1.0 .* in param_groups\[1\]"):
        opt.step()
    assert_untouched(opt, before)


def test_a_backend_asked_for_an_algorithm_it_lacks_fails_before_touching_anything(monkeypatch):
    """(Every registered kernel runs every algorithm today; a plug-in may not.)"""
    opt, a, b = two_group_optimizer(adamkit.NAdam)
    adam_only = dataclasses.replace(KERNELS["cpu"], algorithms=frozenset({"adam"}))
    monkeypatch.setitem(KERNELS, "cpu", adam_only)
    opt.param_groups[1]["backend"] = "cpu"
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"backend='cpu' does not run nadam .*'single_tensor', 'foreach'"):
        opt.step()
    assert_untouched(opt, before)


@pytest.mark.parametrize("cls,key", [(adamkit.AdamW, "step"), (adamkit.NAdam, "mu_product")])
@pytest.mark.parametrize("value", [None, [7]])
def test_a_state_dict_with_a_bad_counter_is_refused_and_loads_nothing(cls, key, value):
    """torch swaps in the loaded groups and state before adamkit can read the counters:
    a refused load must put the optimizer back as it was, groups included."""
    opt, a, b = two_group_optimizer(cls, state_precision="int8")
    twin = copy.deepcopy(opt)
    state_dict = copy.deepcopy(opt.state_dict())
    state_dict["param_groups"][0]["lr"] = 0.5
    state_dict["state"][1][key] = value
    before = snapshot(opt)
    with pytest.raises(
        ValueError, match=rf"state\['{key}'\] = {re.escape(repr(value))} of params\[0\] in param_groups\[1\]"
    ):
        opt.load_state_dict(state_dict)
    assert_untouched(opt, before)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in twin.param_groups]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for _ in range(2):
        for p, q in zip((a, b), twin_params):
            p.grad = q.grad = torch.randn(p.shape)
        opt.step()
        twin.step()
    for p, q in zip((p for g in opt.param_groups for p in g["params"]), twin_params):
        assert torch.equal(p, q)
