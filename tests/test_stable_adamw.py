"""StableAdamW's update clipping against a hand computation and against optimi's
StableAdamW (a peer library, where it installs).  The conformance suite holds every
backend that runs it to the NumPy reference; here the reference itself is checked."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adamkit
from adamkit.kernels import KERNELS

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


def test_the_fused_kernels_do_not_run_it_and_none_takes_foreach():
    p = torch.nn.Parameter(torch.randn(4))
    p.grad = torch.randn(4)
    with pytest.raises(ValueError, match="backend='cpu' does not run stable_adamw .*'single_tensor', 'foreach'"):
        adamkit.StableAdamW([p], backend="cpu").step()
    opt = adamkit.StableAdamW([p])
    opt.step()
    assert np.isfinite(p.detach().numpy()).all() and int(opt.state[p]["step"]) == 1
