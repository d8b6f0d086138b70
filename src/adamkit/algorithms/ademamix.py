r"""AdEMAMix (Pagliardini et al., 2024, "The AdEMAMix Optimizer: Better, Faster, Older"):
AdamW whose direction mixes a fast and a slow exponential average of the gradient.

.. math::

    m_1 &\leftarrow \beta_1 m_1 + (1 - \beta_1) g, \qquad
    m_2 \leftarrow \beta_3(t)\, m_2 + (1 - \beta_3(t))\, g, \qquad
    v \leftarrow \beta_2 v + (1 - \beta_2) g^2 \\
    \theta &\leftarrow \theta (1 - \eta\lambda)
        - \eta\, \frac{m_1 / (1 - \beta_1^t) + \alpha(t)\, m_2}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}

The slow average is not bias-corrected (it fills slowly on purpose).  Its weight and its
decay are warmed up over ``alpha_warmup`` and ``beta3_warmup`` steps (``None``: none),
as the paper's Algorithm 1 does, with :math:`a = \min(t / T, 1)`:

.. math::

    \alpha(t) = a\,\alpha, \qquad
    \beta_3(t) = \min\Bigl(\exp\Bigl(\frac{\ln\beta_1 \ln\beta_3}
        {(1 - a)\ln\beta_3 + a\ln\beta_1}\Bigr), \beta_3\Bigr)

(:math:`\beta_3(t)` moves linearly in the half-life :math:`\ln\tfrac12 / \ln\beta` from
:math:`\beta_1`'s to :math:`\beta_3`'s; for :math:`\beta_1 = 0`, whose half-life is 0, that
is :math:`\beta_3^{1/a}`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import AlgorithmSpec, StepScalars, as_number, number_of, register
from .foreach_ops import apply_updates, buckets, first_moment_updates, number, real_views
from .single_tensor_ops import (
    adam_denominator,
    as_real,
    decayed_gradient,
    descend,
    lerp_weight,
    second_moment_update,
    totals_of,
)

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def _warmed_up(step, warmup: int | None):
    """:math:`\\min(t / T, 1)` (1 without a warm-up), a float or a device tensor."""
    if warmup is None:
        return 1.0
    if isinstance(step, Tensor):
        return torch.clamp(step / warmup, max=1.0)
    return min(step / warmup, 1.0)


def slow_decay(step, beta1: float, beta3: float, warmup: int | None):
    r""":math:`\beta_3(t)`, warmed up from :math:`\beta_1` (see the module docstring)."""
    a = _warmed_up(step, warmup)
    if warmup is None or beta3 <= 0.0:  # (beta3 = 0: the min below keeps it 0 throughout)
        return beta3
    if beta1 <= 0.0:  # ln beta1 = -inf, a half-life of 0: the closed form's limit beta3^(1/a)
        if isinstance(a, Tensor):
            return torch.pow(beta3, 1.0 / a)  # (a = 0: beta3^inf = 0 = beta1)
        return beta3 ** (1.0 / a) if a > 0 else beta1
    log1, log3 = math.log(beta1), math.log(beta3)
    if isinstance(a, Tensor):  # (beta3 itself once warm: the closed form may round past it)
        warming = torch.clamp(torch.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), max=beta3)
        return torch.where(a >= 1.0, torch.full_like(warming, beta3), warming)
    return beta3 if a >= 1.0 else min(math.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), beta3)


def ademamix_step_scalars(rule, step) -> StepScalars:
    r""":math:`1 - \beta_1^t`, :math:`\sqrt{1 - \beta_2^t}`, :math:`\alpha(t)` and :math:`\beta_3(t)`."""
    beta1 = as_number(rule.beta1)
    return StepScalars(
        rule.finish(rule.lr),
        rule.finish((1 - rule.beta2**step) ** 0.5),
        bias_correction1=rule.finish(1 - rule.beta1**step),
        slow_weight=rule.alpha * _warmed_up(step, rule.alpha_warmup),
        slow_decay=slow_decay(step, beta1, rule.beta3, rule.beta3_warmup),
    )


def ademamix_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    r"""The fused kernels' step sizes of :math:`m_1` (:math:`\eta / (1 - \beta_1^t)`) and
    of :math:`m_2` (:math:`\eta\, \alpha(t)`), and the slow average's weight
    :math:`1 - \beta_3(t)` of g."""
    columns["step_size"] = lr / s.bias_correction1
    columns["slow_step_size"] = lr * s.slow_weight
    columns["one_minus_beta3"] = 1.0 - s.slow_decay


def check_alpha(alpha, where: str = "") -> None:
    """``alpha``, the slow average's weight: a finite number >= 0."""
    number = number_of("alpha", alpha, where)
    if not 0.0 <= number or math.isinf(number):
        raise ValueError(f"Invalid alpha value: {alpha!r} (alpha must be a finite number >= 0{where})")


def check_beta3(beta3, where: str = "") -> None:
    """``beta3``, the slow average's decay: in [0, 1)."""
    if not 0.0 <= number_of("beta3", beta3, where) < 1.0:
        raise ValueError(f"Invalid beta3 value: {beta3!r} (beta3 must be in [0, 1){where})")


def check_warmup(name: str):
    """The check of warm-up length ``name``: ``None`` (none) or a whole number of steps >= 1."""

    def check(warmup, where: str = "") -> None:
        if warmup is not None and (isinstance(warmup, bool) or not isinstance(warmup, numbers.Integral) or warmup < 1):
            raise ValueError(
                f"Invalid {name} value: {warmup!r} ({name} must be None, for no warm-up, or an int >= 1 "
                f"of steps{where})"
            )

    return check


def ademamix_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""AdEMAMix: Adam's moments and a slow first moment :math:`m_2` (decay :math:`\beta_3(t)`,
    not bias-corrected); the direction is
    :math:`(m_1 / (1 - \beta_1^t) + \alpha(t) m_2) / (\sqrt{v} / \sqrt{1 - \beta_2^t} + \epsilon)`."""
    for i, param in enumerate(tensors.params):
        grad = decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        exp_avg_slow, step = as_real(tensors.exp_avg_slows[i]), steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        exp_avg_slow.lerp_(grad, lerp_weight(1 - step.slow_decay, exp_avg_slow))
        second_moment_update(exp_avg_sq, grad, group_scalars)
        denom = adam_denominator(exp_avg_sq, step, group_scalars.eps)
        if rule.differentiable:  # (both move in place next step)
            exp_avg, exp_avg_slow = exp_avg.clone(), exp_avg_slow.clone()
        direction = exp_avg / step.bias_correction1 + exp_avg_slow * step.slow_weight
        descend(param, direction, denom, step.step_size, grad, rule, totals_of(tensors, i))


def ademamix_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """AdEMAMix (see :func:`ademamix_single_tensor`) with foreach ops."""
    for t, bucket_steps in buckets(tensors, steps):
        params, grads, exp_avgs = first_moment_updates(t, rule, group_scalars)
        exp_avg_sqs, exp_avg_slows = real_views(t.exp_avg_sqs), real_views(t.exp_avg_slows)
        for slow, grad, step in zip(exp_avg_slows, grads, bucket_steps):  # (beta3_t may differ per tensor)
            slow.lerp_(grad, number(1 - step.slow_decay))
        torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, number(group_scalars.one_minus_beta2))
        directions = torch._foreach_div(exp_avgs, [s.bias_correction1 for s in bucket_steps])
        torch._foreach_add_(directions, torch._foreach_mul(exp_avg_slows, [s.slow_weight for s in bucket_steps]))
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        apply_updates(params, directions, denoms, bucket_steps)


ADEMAMIX = register(
    AlgorithmSpec(
        name="ademamix",
        class_name="AdEMAMix",
        code=6,
        step_scalars=ademamix_step_scalars,
        single_tensor=ademamix_single_tensor,
        foreach=ademamix_foreach,
        slow_first_moment=True,
        steps_with_mean_gradient=True,
        tensor_columns=ademamix_tensor_columns,
        hyperparameters={"beta3": 0.9999, "alpha": 5.0, "alpha_warmup": None, "beta3_warmup": None},
        checks={
            "beta3": check_beta3,
            "alpha": check_alpha,
            "alpha_warmup": check_warmup("alpha_warmup"),
            "beta3_warmup": check_warmup("beta3_warmup"),
        },
    )
)

__all__ = [
    "ADEMAMIX",
    "ademamix_foreach",
    "ademamix_single_tensor",
    "ademamix_step_scalars",
    "ademamix_tensor_columns",
    "slow_decay",
]
