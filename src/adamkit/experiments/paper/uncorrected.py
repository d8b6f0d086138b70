"""Adam with and without bias correction (Kingma & Ba, section 6.4).

The moments start at zero, so early on ``m_t`` and ``v_t`` are biased towards it:
``E[v_t] = (1 - beta2^t) E[g^2]`` for a stationary gradient.  Adam divides the bias
out.  Without the correction the step is

    x_t = x_{t-1} - alpha * m_t / (sqrt(v_t) + eps),

and while ``1 - beta2^t`` is small (``t << 1 / (1 - beta2)``) ``sqrt(v_t)`` is too
small and the early steps are far too large (by up to ``(1 - beta1) / sqrt(1 - beta2)``,
100x at ``beta2 = 0.9999, beta1 = 0``).  The paper shows this on a VAE: without
correction, ``beta2`` close to 1 (which sparse gradients need) makes training unstable
unless the rate is small; with correction the best losses come with ``beta2`` close to 1.

``UncorrectedAdam`` is the paper's Algorithm 1 with the two corrections taken out,
written out so that the experiment compares exactly what the paper compares;
``bias_correction=True`` gives plain Adam, which the tests check against adamkit.Adam.
"""

from __future__ import annotations

import torch


class UncorrectedAdam(torch.optim.Optimizer):
    """Adam (Algorithm 1 of Kingma & Ba) with the bias corrections optional.

    ``bias_correction=True`` computes ``alpha * m_hat / (sqrt(v_hat) + eps)`` with
    ``m_hat = m_t / (1 - beta1^t)``, ``v_hat = v_t / (1 - beta2^t)``; ``False`` uses
    ``m_t`` and ``v_t`` as they are.
    """

    def __init__(
        self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, *, bias_correction: bool = False
    ):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
        if not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must lie in [0, 1), got {betas!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, bias_correction=bias_correction))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t, m, v = state["step"], state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(p.grad, 1 - beta1)
                v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                if group["bias_correction"]:
                    m_hat, v_hat = m / (1 - beta1**t), v / (1 - beta2**t)
                else:
                    m_hat, v_hat = m, v
                p.sub_(group["lr"] * m_hat / (v_hat.sqrt() + group["eps"]))
        return loss


__all__ = ["UncorrectedAdam"]
