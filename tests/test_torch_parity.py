"""adamkit against torch.optim (foreach=False): params and state bit for bit after
100 steps, for every combination of the shared matrix."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from matrix import DEVICE_BACKENDS, OPTIMIZERS, Case, clone_groups, make_params, run, torch_comparable_cases

import adamkit
from adamkit.kernels import KERNELS

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


def recording(monkeypatch, name: str) -> list[str]:
    """A list that the kernel registered as ``name`` appends its name to at each step
    it runs (the single-tensor and foreach paths give the same bits: only this tells
    which ran)."""
    calls: list[str] = []
    kernel = KERNELS[name]

    def step(*args, **kwargs):
        calls.append(name)
        return kernel.step(*args, **kwargs)

    monkeypatch.setitem(KERNELS, name, dataclasses.replace(kernel, step=step))
    return calls


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_foreach_flag_maps_to_foreach_path(optimizer, monkeypatch):
    """foreach=True runs adamkit's foreach path, bit-identical to torch's for-loop."""
    case = Case(optimizer=optimizer)
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    torch_groups = make_params(case)
    our_groups = clone_groups(torch_groups)
    theirs = torch_cls(torch_groups, foreach=False)
    ours = ours_cls(our_groups, foreach=True)
    ran = recording(monkeypatch, "foreach")
    run(ours, our_groups, 20)
    run(theirs, torch_groups, 20)
    assert_same_state(ours, our_groups, theirs, torch_groups)
    assert len(ran) == 20 * len(our_groups)


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW", "StableAdamW"])
def test_fused_flag_runs_adamkits_fused_cpu_kernel(optimizer, monkeypatch):
    """fused=True on CPU params is adamkit's fused kernel: the same bits as backend="cpu"
    (StableAdamW takes AdamW's flag too)."""
    case = Case(optimizer="AdamW" if optimizer == "StableAdamW" else optimizer)
    ours_cls = getattr(adamkit, optimizer)
    fused_groups = make_params(case)
    cpu_groups = clone_groups(fused_groups)
    fused, cpu = ours_cls(fused_groups, fused=True), ours_cls(cpu_groups, backend="cpu")
    ran = recording(monkeypatch, "cpu")
    run(fused, fused_groups, 20)
    assert len(ran) == 20 * len(fused_groups)
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


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_beta1_zero_keeps_the_gradient_as_the_first_moment(optimizer, backend, dtype):
    """With beta1 = 0 (GAN recipes, betas=(0, 0.99)) torch's m = lerp(m, g, 1) is g
    exactly; a kernel forming m + (g - m) lost a small gradient below a large m's
    last place (m came out 6.1e-5 for g = 3.7e-5 after a step at 1e3, and the step
    was 65 % too large).  Every backend keeps m = g bit for bit, so its updates
    follow torch's to within rounding."""
    ours_cls, torch_cls, _ = OPTIMIZERS[optimizer]
    g = torch.Generator().manual_seed(3)
    start = torch.randn(300, generator=g, dtype=torch.float64).to(dtype)
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = ours_cls([ours], lr=1e-2, betas=(0.0, 0.99), backend=backend)
    opt_torch = torch_cls([theirs], lr=1e-2, betas=(0.0, 0.99), foreach=False)
    for scale in (1e3, 3.7e-5, 1e-3, 1e4, 1e-6):
        grad = (scale * torch.randn(300, generator=g, dtype=torch.float64)).to(dtype)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_torch.step()
        assert torch.equal(opt_ours.state[ours]["exp_avg"], grad)
        assert torch.equal(opt_torch.state[theirs]["exp_avg"], grad)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=8 * torch.finfo(dtype).eps)


@pytest.mark.parametrize(
    "cls,options,key",
    [
        (adamkit.ADOPT, {"clip_exponent": None}, "exp_avg"),
        (adamkit.ADOPT, {}, "exp_avg"),
        (adamkit.AdEMAMix, {"beta3": 0.0}, "exp_avg_slow"),
    ],
    ids=["ADOPT", "ADOPT-clipped", "AdEMAMix"],
)
@pytest.mark.parametrize("backend", [name for name in DEVICE_BACKENDS if name != "single_tensor"])
def test_beta_zero_moments_follow_their_targets_on_every_backend(cls, options, key, backend):
    """The classes torch.optim lacks, at a lerp weight of 1 (beta1 = 0; AdEMAMix's
    beta3 = 0): AdEMAMix's slow average is the gradient, bit for bit as the torch-op
    path (``lerp``) stores it; ADOPT's m is its normalized, clipped gradient (which
    the two paths form within an ulp of each other)."""
    g = torch.Generator().manual_seed(4)
    start = torch.randn(300, generator=g)
    ours, oracle = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    settings = {"lr": 1e-2, "betas": (0.0, 0.99), **options}
    opt_ours = cls([ours], backend=backend, **settings)
    opt_oracle = cls([oracle], backend="single_tensor", **settings)
    exact = key == "exp_avg_slow"
    for scale in (1e3, 3.7e-5, 1e-3, 1e4, 1e-6):
        grad = scale * torch.randn(300, generator=g)
        ours.grad, oracle.grad = grad.clone(), grad.clone()
        opt_ours.step()
        opt_oracle.step()
        ulp = 0 if exact else torch.finfo(torch.float32).eps
        torch.testing.assert_close(opt_ours.state[ours][key], opt_oracle.state[oracle][key], rtol=2 * ulp, atol=0)
        if exact:
            assert torch.equal(opt_oracle.state[oracle][key], grad)
    torch.testing.assert_close(ours, oracle, rtol=0, atol=8 * torch.finfo(torch.float32).eps)


@pytest.mark.parametrize("beta2", [0.6, 1 / 3 + 2**-54, 0.5], ids=["rho_inf=4", "rho_inf=2", "rho_inf=3"])
@pytest.mark.parametrize("backend", [*DEVICE_BACKENDS, "capturable"])
def test_radam_with_a_short_second_moment_average_is_momentum_sgd_as_torchs(beta2, backend):
    """A beta2 whose rho_inf = 2 / (1 - beta2) - 1 is at most 5 never rectifies: RAdam is
    momentum SGD throughout.  The rectification's denominator (rho_inf - 4)(rho_inf - 2)
    is 0 at rho_inf = 4 and 2, and computing it there anyway raised ZeroDivisionError
    on every backend (torch computes it only once rho_t > 5)."""
    options = {"capturable": True} if backend == "capturable" else {"backend": backend}
    start = torch.tensor([1.0, 2.0, -3.0])
    ours, theirs = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    opt_ours = adamkit.RAdam([ours], lr=1e-3, betas=(0.9, beta2), **options)
    opt_torch = torch.optim.RAdam([theirs], lr=1e-3, betas=(0.9, beta2), foreach=False)
    for i in range(5):
        ours.grad = torch.tensor([0.5, -1.0, 2.0]) * (i + 1)
        theirs.grad = ours.grad.clone()
        opt_ours.step()
        opt_torch.step()
    assert torch.equal(ours, theirs)
