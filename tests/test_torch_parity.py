"""adamkit against torch.optim (foreach=False): params and state bit for bit after
100 steps, for every combination of the shared matrix."""

from __future__ import annotations

import pytest
import torch
from matrix import OPTIMIZERS, Case, clone_groups, make_params, run, torch_comparable_cases

STEPS = 100


def build_pair(case: Case):
    ours_cls, torch_cls, _ = OPTIMIZERS[case.optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs = torch_cls(torch_groups, foreach=False, **case.torch_kwargs())
    ours = ours_cls(our_groups, **case.adamkit_kwargs())
    return ours, our_groups, theirs, torch_groups


def assert_same_state(ours, our_groups, theirs, torch_groups, check_strides=True):
    for og, tg in zip(our_groups, torch_groups):
        for p_ours, p_torch in zip(og["params"], tg["params"]):
            assert p_ours.stride() == p_torch.stride() or not check_strides
            assert torch.equal(p_ours, p_torch), "param differs"
            s_ours, s_torch = ours.state[p_ours], theirs.state[p_torch]
            assert s_ours.keys() == s_torch.keys()
            for key, value in s_torch.items():
                assert s_ours[key].dtype == value.dtype and s_ours[key].device == value.device, key
                assert torch.equal(s_ours[key], value), f"state {key!r} differs"


@pytest.mark.parametrize("case", torch_comparable_cases(), ids=lambda c: c.id)
def test_bit_identical_to_torch(case: Case):
    ours, our_groups, theirs, torch_groups = build_pair(case)
    run(ours, our_groups, STEPS)
    run(theirs, torch_groups, STEPS)
    assert_same_state(ours, our_groups, theirs, torch_groups)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", ["reference", "foreach"])
def test_tensor_betas_bit_identical(optimizer, backend):
    case = Case(optimizer, backend=backend, tensor_lr=True)
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    betas = (torch.tensor(0.8), torch.tensor(0.99))
    theirs = torch_cls(torch_groups, betas=betas, foreach=False)
    ours = ours_cls(our_groups, betas=betas, backend=backend)
    run(ours, our_groups, 30)
    run(theirs, torch_groups, 30)
    assert_same_state(ours, our_groups, theirs, torch_groups)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("flag", ["foreach", "fused"])
def test_torch_flags_map_to_adamkit_paths(optimizer, flag):
    """foreach=True / fused=True run and agree bit for bit with torch's for-loop."""
    if optimizer == "AdaMax" and flag == "fused":
        pytest.skip("torch.optim.Adamax has no fused argument")
    case = Case(optimizer)
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs = torch_cls(torch_groups, foreach=False)
    ours = ours_cls(our_groups, **{flag: True})
    run(ours, our_groups, 20)
    run(theirs, torch_groups, 20)
    assert_same_state(ours, our_groups, theirs, torch_groups)
