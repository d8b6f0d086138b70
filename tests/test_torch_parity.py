"""adamkit against torch.optim (foreach=False): params and state bit for bit after
100 steps, for every combination of the shared matrix."""

from __future__ import annotations

import pytest
import torch
from matrix import OPTIMIZERS, Case, clone_groups, make_params, run, torch_comparable_cases

STEPS = 100
PAIRS = {name: OPTIMIZERS[name][:2] for name in ("Adam", "AdaMax")}


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
@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_tensor_betas_bit_identical(optimizer, backend):
    case = Case(optimizer=optimizer, backend=backend, tensor_lr=True)
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
def test_foreach_flag_maps_to_foreach_path(optimizer):
    """foreach=True runs adamkit's foreach path, bit-identical to torch's for-loop."""
    case = Case(optimizer=optimizer)
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs = torch_cls(torch_groups, foreach=False)
    ours = ours_cls(our_groups, foreach=True)
    run(ours, our_groups, 20)
    run(theirs, torch_groups, 20)
    assert_same_state(ours, our_groups, theirs, torch_groups)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])
def test_fused_flag_runs_adamkits_fused_cpu_kernel(optimizer):
    """fused=True on CPU params is adamkit's fused kernel: the same bits as backend="cpu"."""
    case = Case(optimizer=optimizer)
    ours_cls = OPTIMIZERS[optimizer][0]
    fused_groups = make_params(case)
    cpu_groups = clone_groups(fused_groups)
    fused, cpu = ours_cls(fused_groups, fused=True), ours_cls(cpu_groups, backend="cpu")
    run(fused, fused_groups, 20)
    run(cpu, cpu_groups, 20)
    assert_same_state(fused, fused_groups, cpu, cpu_groups)


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
    opt_ours = ours_cls([ours], betas=betas, backend="single_tensor")
    opt_torch = torch_cls([theirs], betas=betas, foreach=False)
    for _ in range(30):
        grad = torch.randn(6, 4, generator=g).to(param_dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_torch.step()
    assert torch.equal(ours, theirs)
    assert torch.equal(opt_ours.state[ours]["exp_avg"], opt_torch.state[theirs]["exp_avg"])
