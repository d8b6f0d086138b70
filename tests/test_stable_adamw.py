"""StableAdamW's update clipping against a hand computation and against optimi's
StableAdamW (a peer library, where it installs).  The conformance suite holds every
backend that runs it to the NumPy reference; here the reference itself is checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adamkit
from adamkit.kernels import KERNELS, default_backend

BACKENDS = [
    name
    for name, kernel in KERNELS.items()
    if "stable_adamw" in kernel.algorithms and kernel.supports(torch.device("cpu"))
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_gradient_spike_is_clipped_by_hand(backend, weight_decay):
    """Step 1 with g: v_hat = g^2 exactly, so RMS = 1 and the step is AdamW's.  Step 2
    with k g: v_hat_2 = (beta2 + k^2) g^2 / (1 + beta2), so
    RMS^2 = k^2 (1 + beta2) / (beta2 + k^2), and the lr is lr / RMS."""
    beta1, beta2, lr, eps, k = 0.9, 0.99, 0.1, 1e-8, 30.0
    g = torch.tensor([0.5, -2.0, 1.5, 0.25], dtype=torch.float64)
    theta0 = torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    p = torch.nn.Parameter(theta0.clone())
    opt = adamkit.StableAdamW([p], lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay, backend=backend)
    p.grad = g.clone()
    opt.step()
    theta1 = theta0 * (1 - lr * weight_decay) - lr * g / (g.abs() + eps)  # m_hat = g, v_hat = g^2
    torch.testing.assert_close(p.detach(), theta1, rtol=1e-14, atol=0)
    p.grad = k * g
    opt.step()
    rms = math.sqrt(k * k * (1 + beta2) / (beta2 + k * k))
    assert rms > 1  # the clipping is engaged
    clipped = lr / rms
    m_hat = (beta1 * (1 - beta1) * g + (1 - beta1) * k * g) / (1 - beta1**2)
    v_hat = (beta2 * (1 - beta2) + (1 - beta2) * k * k) * g * g / (1 - beta2**2)
    theta2 = theta1 * (1 - clipped * weight_decay) - clipped * m_hat / (v_hat.sqrt() + eps)
    torch.testing.assert_close(p.detach(), theta2, rtol=1e-13, atol=0)


@pytest.mark.filterwarnings("ignore:You are using weight_decay")  # optimi's advice on decouple_lr
def test_matches_optimi_stableadamw_through_spikes():
    """optimi uses debiased betas where adamkit bias-corrects: the same numbers in exact
    arithmetic, so in float64 the two runs agree to a few ulps over 200 steps with
    gradient spikes that engage the clipping."""
    optimi = pytest.importorskip("optimi")
    g = torch.Generator().manual_seed(3)
    for weight_decay, decouple_lr in [(0.0, False), (0.1, False), (0.1, True)]:
        a = torch.nn.Parameter(torch.randn(1000, generator=g, dtype=torch.float64))
        b = torch.nn.Parameter(a.detach().clone())
        options = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": weight_decay}
        ours = adamkit.StableAdamW([a], decouple_lr=decouple_lr, **options)
        theirs = optimi.StableAdamW([b], decouple_lr=decouple_lr, foreach=False, **options)
        for step in range(200):
            grad = torch.randn(1000, generator=g, dtype=torch.float64) * (50.0 if step in (50, 120) else 1.0)
            a.grad, b.grad = grad.clone(), grad.clone()
            ours.step()
            theirs.step()
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-13
        assert not torch.equal(a, b) or weight_decay == 0  # (two implementations, not one)


def test_the_fused_cpu_kernel_runs_it_by_default():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    opt = adamkit.StableAdamW([p])
    opt.step()
    fused = "cpu" if KERNELS["cpu"].available() else "foreach"
    assert default_backend({p.device}, differentiable=False, algorithm="stable_adamw") == fused
    assert np.isfinite(p.detach().numpy()).all() and int(opt.state[p]["step"]) == 1


def test_every_backend_follows_the_single_tensor_path_through_spikes():
    """Several tensors, one empty, spanning several chunks of the fused kernels, through
    gradient spikes that engage the clipping: every backend within fp32 rounding of the
    single-tensor path.  (Quantized states are held to the reference by the conformance
    suites: there an fp32 rounding may flip a stochastically rounded code.)"""

    def run(backend):
        g = torch.Generator().manual_seed(5)
        shapes = [(70_000,), (3, 0), (40_000,), (5,)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        opt = adamkit.StableAdamW(params, lr=1e-2, backend=backend)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g) * (40.0 if step == 3 else 1.0)
            opt.step()
        return [p.detach().clone() for p in params]

    expected = run("single_tensor")
    for backend in BACKENDS:
        for ours, theirs in zip(run(backend), expected):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_the_pre_pass_windows_hold_whole_tensors():
    from adamkit.kernels.cpu import window_table
    from adamkit.kernels.host import chunk_table

    chunks = chunk_table(np.array([5, 0, 3, 9, 1, 2]), 4)  # tensor 1 has no chunks
    assert window_table(chunks, 6) == [(0, 3, 0, 3), (3, 6, 3, 4), (6, 8, 4, 6)]
    assert window_table(chunks, 1) == [(0, 2, 0, 1), (2, 3, 2, 3), (3, 6, 3, 4), (6, 7, 4, 5), (7, 8, 5, 6)]
    assert window_table(chunks, 10**9) == [(0, 8, 0, 6)]
    assert window_table(chunk_table(np.array([0, 0]), 4), 1) == []


@pytest.mark.skipif(not KERNELS["cpu"].available(), reason="needs numba")
@pytest.mark.parametrize(
    "name, cautious, state_precision, dtype",
    [
        ("StableAdamW", False, None, torch.float32),
        ("StableAdamW", False, "int8", torch.bfloat16),
        ("AdamW", True, None, torch.bfloat16),
        ("StableAdamW", True, "int8", torch.float32),
    ],
)
def test_stepping_window_by_window_changes_no_bit(monkeypatch, name, cautious, state_precision, dtype):
    """The fused CPU kernel runs StableAdamW's clipping and a cautious update's count
    window by window (the update re-reads what the pre-pass read while it is in cache):
    a window per tensor ends bit for bit where one window for the whole group does,
    through gradient spikes that engage the clipping."""
    from adamkit.kernels import cpu

    def run(window):
        monkeypatch.setattr(cpu.layout, "PRE_PASS_WINDOW", window)
        g = torch.Generator().manual_seed(7)
        shapes = [(70_000,), (3, 0), (40_000,), (5,), (300, 200)]
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]
        opt = getattr(adamkit, name)(
            params,
            lr=1e-2,
            weight_decay=0.1,
            cautious=cautious,
            state_precision=state_precision,
            seed=3,
            backend="cpu",
        )
        for step in range(5):
            for p in params:
                p.grad = (torch.randn(p.shape, generator=g) * (40.0 if step == 2 else 1.0)).to(dtype)
            opt.step()
        return [p.detach().clone() for p in params], opt.state_dict()["state"]

    per_tensor, state_per_tensor = run(1)
    whole, state_whole = run(10**12)
    for ours, theirs in zip(per_tensor, whole):
        assert torch.equal(ours, theirs)
    for index, state in state_whole.items():
        for key, value in state.items():
            assert torch.equal(state_per_tensor[index][key], value), (index, key)
