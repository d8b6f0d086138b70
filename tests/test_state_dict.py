"""state_dict: torch's structure and keys, checkpoints moving both ways with
bit-identical continuations, extra keys defaulting, torch.save round trips."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from matrix import OPTIMIZERS, Case, clone_groups, make_params, run
from test_torch_parity import assert_same_state

import adamkit

CASES = [
    Case(optimizer="Adam", amsgrad=True, weight_decay="l2"),
    Case(optimizer="Adam", dtype=torch.float64, maximize=True, complex_params=True),
    Case(optimizer="AdamW", weight_decay="decoupled", tensor_lr=True),
    Case(optimizer="AdaMax", weight_decay="l2"),
]


def constructed(case: Case, source: str):
    """(optimizer, groups) built by torch.optim or adamkit for ``case``."""
    ours_cls, torch_cls, _ = OPTIMIZERS[case.optimizer]
    groups = make_params(case)
    if source == "torch":
        return torch_cls(groups, foreach=False, **case.torch_kwargs()), groups
    return ours_cls(groups, **case.adamkit_kwargs()), groups


def strip_extras(group: dict, optimizer_cls) -> dict:
    return {k: v for k, v in group.items() if k not in optimizer_cls.extra_group_keys}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_same_structure_as_torch(case):
    ours, our_groups = constructed(case, "adamkit")
    theirs, torch_groups = constructed(case, "torch")
    run(ours, our_groups, 3)
    run(theirs, torch_groups, 3)
    sd_ours, sd_torch = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_torch.keys()
    assert sd_ours["state"].keys() == sd_torch["state"].keys()
    for index, torch_state in sd_torch["state"].items():
        our_state = sd_ours["state"][index]
        assert our_state.keys() == torch_state.keys()
        step = our_state["step"]
        assert step.dim() == 0 and step.dtype == torch.float32 and step.device.type == "cpu"
        for key, value in torch_state.items():
            assert our_state[key].dtype == value.dtype and our_state[key].shape == value.shape
    for ours_group, torch_group in zip(sd_ours["param_groups"], sd_torch["param_groups"]):
        assert set(torch_group) <= set(ours_group)
        assert set(ours_group) - set(torch_group) <= set(type(ours).extra_group_keys)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
def test_checkpoint_moves_and_continues_bit_identically(case, direction):
    """Run 7 steps in one library, load its state_dict into the other, continue 13 steps;
    compare with the source library's own continuation."""
    source, target = direction.split("->")
    first, groups = constructed(case, source)
    run(first, groups, 7, seed=3)

    continued_groups = clone_groups(groups)
    ours_cls, torch_cls, _ = OPTIMIZERS[case.optimizer]
    if target == "torch":
        second = torch_cls(continued_groups, foreach=False, **case.torch_kwargs())
    else:
        second = ours_cls(continued_groups, **case.adamkit_kwargs())
    state_dict = copy.deepcopy(first.state_dict())  # a checkpoint, not live tensors
    if target == "torch":
        state_dict = {**state_dict, "param_groups": [strip_extras(g, type(first)) for g in state_dict["param_groups"]]}
    second.load_state_dict(state_dict)

    run(first, groups, 13, seed=4)
    run(second, continued_groups, 13, seed=4)
    assert_same_state(second, continued_groups, first, groups)


def test_torch_state_dict_keeps_constructor_extras():
    """Loading a torch.optim checkpoint keeps this optimizer's adamkit-only settings."""
    params = [torch.nn.Parameter(torch.randn(3))]
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    ours = adamkit.AdamW(params, lr=0.1, decouple_lr=True, max_lr=2.0, backend="foreach")
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["lr"] == 0.5
    assert (group["decouple_lr"], group["max_lr"], group["backend"]) == (True, 2.0, "foreach")


def test_extra_keys_default_when_absent():
    """A state dict lacking adamkit's keys, loaded via __setstate__, gets defaults."""
    opt = adamkit.Adam([torch.nn.Parameter(torch.randn(2))], lr=0.3)
    state = opt.__getstate__()
    for group in state["param_groups"]:
        for key in adamkit.Adam.extra_group_keys:
            group.pop(key)
    opt.__setstate__(state)
    assert opt.param_groups[0]["backend"] is None
    assert opt.param_groups[0]["decouple_lr"] is False
    assert opt.param_groups[0]["max_lr"] == 0.3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_save_and_weights_only_load_round_trip(case):
    ours, groups = constructed(case, "adamkit")
    run(ours, groups, 5)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    continued = clone_groups(groups)
    other = type(ours)(continued, **case.adamkit_kwargs())
    other.load_state_dict(loaded)
    run(ours, groups, 5, seed=9)
    run(other, continued, 5, seed=9)
    assert_same_state(other, continued, ours, groups)


def test_legacy_float_step_becomes_tensor():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    state_dict = opt.state_dict()
    state_dict["state"][0]["step"] = 1.0  # checkpoints from torch < 1.12
    fresh = adamkit.Adam([p])
    fresh.load_state_dict(state_dict)
    step = fresh.state[p]["step"]
    assert torch.is_tensor(step) and step.item() == 1.0 and step.dtype == torch.float32
