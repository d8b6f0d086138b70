"""Bad input: torch's exception types and message text where torch checks, clear
errors naming argument, value and what is allowed where it does not, and a step
that raises leaves every param and state tensor as it was."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import adamkit

TORCH = {"Adam": torch.optim.Adam, "AdamW": torch.optim.AdamW, "AdaMax": torch.optim.Adamax}
OURS = {"Adam": adamkit.Adam, "AdamW": adamkit.AdamW, "AdaMax": adamkit.AdaMax}

TORCH_CHECKED = [
    ("Adam", {"lr": -1.0}),
    ("Adam", {"lr": math.nan}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"eps": math.nan}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, -0.5)}),
    ("Adam", {"betas": (math.nan, 0.999)}),
    ("Adam", {"weight_decay": -0.1}),
    ("Adam", {"weight_decay": math.nan}),
    ("Adam", {"lr": torch.tensor(0.1), "foreach": True}),
    ("Adam", {"lr": torch.tensor([0.1, 0.2])}),
    ("Adam", {"betas": (torch.tensor(0.9), 0.999)}),
    ("Adam", {"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}),
    ("Adam", {"fused": True, "foreach": True}),
    ("Adam", {"fused": True, "differentiable": True}),
    ("AdamW", {"lr": -1e-3}),
    ("AdamW", {"betas": (0.9, 1.0)}),
    ("AdamW", {"lr": torch.tensor(0.1), "foreach": True}),
    ("AdamW", {"fused": True, "foreach": True}),
    ("AdaMax", {"lr": -2e-3}),
    ("AdaMax", {"eps": -1.0}),
    ("AdaMax", {"betas": (0.9, 1.5)}),
    ("AdaMax", {"weight_decay": -1.0}),
    ("AdaMax", {"lr": torch.tensor([1.0, 2.0])}),
]


def params():
    return [torch.nn.Parameter(torch.randn(3, 2))]


def torch_error(name, kwargs):
    with pytest.raises(Exception) as info:
        TORCH[name](params(), **kwargs)
    return info.value


@pytest.mark.parametrize("name,kwargs", TORCH_CHECKED, ids=lambda x: str(x))
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


@pytest.mark.parametrize(
    "kwargs,words",
    [
        ({"lr": math.inf}, ["learning rate", "inf", "finite"]),
        ({"eps": math.inf}, ["epsilon", "inf", "finite"]),
        ({"weight_decay": math.inf}, ["weight_decay", "inf", "finite"]),
        ({"decouple_lr": True, "max_lr": 0.0}, ["max_lr", "0.0", "> 0"]),
        ({"decouple_lr": True, "max_lr": -1.0}, ["max_lr", "-1.0", "> 0"]),
        ({"decouple_lr": True, "max_lr": math.nan}, ["max_lr", "nan", "> 0"]),
        ({"decouple_lr": True, "lr": 0.0}, ["max_lr", "0.0", "lr"]),
        ({"backend": "cuda-magic"}, ["backend", "cuda-magic", "'foreach'"]),
        # torch fails here by accident ("Boolean value of Tensor ... is ambiguous")
        ({"betas": (torch.tensor([0.9, 0.8]), torch.tensor(0.99))}, ["betas[0]", "1-element", "(2,)"]),
    ],
)
def test_adamkit_checks_name_argument_value_and_allowed(kwargs, words):
    with pytest.raises(ValueError) as info:
        adamkit.Adam(params(), **kwargs)
    for word in words:
        assert word in str(info.value)


def test_max_lr_must_be_a_number():
    with pytest.raises(TypeError, match="max_lr"):
        adamkit.AdamW(params(), decouple_lr=True, max_lr="big")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.uint8])
def test_non_floating_params_rejected(dtype):
    with pytest.raises(TypeError) as info:
        adamkit.Adam([torch.zeros(3, dtype=dtype)])
    assert str(dtype) in str(info.value) and "floating-point" in str(info.value)


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
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_failed_step_leaves_everything_untouched(cls, backend):
    opt, a, b = two_group_optimizer(cls, backend=backend)
    b.grad = b.grad.to_sparse()  # group 1 is bad; group 0 must not be stepped either
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert_untouched(opt, before)


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("lr", math.nan, "learning rate"),
        ("lr", -0.5, "learning rate"),
        ("eps", math.inf, "epsilon"),
        ("betas", (0.9, 1.0), "beta"),
        ("weight_decay", -1.0, "weight_decay"),
        ("backend", "gpu", "backend"),
    ],
)
def test_group_edited_to_bad_value_fails_before_touching_anything(key, value, match):
    opt, a, b = two_group_optimizer()
    opt.param_groups[1][key] = value
    before = snapshot(opt)
    with pytest.raises(ValueError, match=match) as info:
        opt.step()
    assert "param_groups[1]" in str(info.value)
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
