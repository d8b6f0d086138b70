r"""RAdam (Liu et al., 2020): Adam whose adaptive step is rectified by the variance of
its moving average, and momentum SGD while that variance is undefined (:math:`\rho_t \le 5`).

.. math::

    \theta \leftarrow \theta - \alpha\, m / d, \qquad
    d = \sqrt{v} + \epsilon, \ \alpha = \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
    \ \text{once } \rho_t > 5; \quad d = 1, \ \alpha = \frac{\eta}{1 - \beta_1^t} \text{ before}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import AlgorithmSpec, Denominator, StepScalars, as_number, register
from .foreach_ops import buckets, moment_updates, number
from .single_tensor_ops import as_real, decayed_gradient, descend_cautiously, second_moment_update, totals_of

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def radam_step_scalars(rule, step) -> StepScalars:
    r""":math:`1 - \beta_1^t`, :math:`\sqrt{1 - \beta_2^t}` and the rectification
    :math:`r_t` (``None`` while :math:`\rho_t \le 5`), in torch.optim.RAdam's arithmetic."""
    bias_correction1 = 1 - rule.beta1**step
    bias_correction2 = 1 - rule.beta2**step
    rho_inf = 2 / (1 - rule.beta2) - 1
    rho_t = rho_inf - 2 * step * (rule.beta2**step) / bias_correction2

    def rectification():  # defined once rho_t > 5 (rho_inf is then above 5 too: no zero divides)
        return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5

    scalars = StepScalars(rule.lr, bias_correction2**0.5, bias_correction1=bias_correction1)
    if isinstance(step, Tensor):  # a step count on the device: decided there (the other branch's inf unused)
        return replace(scalars, rectification=rectification(), rectified=rho_t > 5.0)
    # (a tensor beta2 with a host step: the test reads rho_t, as torch's does)
    return replace(scalars, rectification=rectification() if rho_t > 5.0 else None)


def radam_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The rectified step size where rho_t > 5 (adaptive), momentum SGD's before."""
    adaptive = lr * s.rectification * s.bias_correction2_sqrt / s.bias_correction1
    columns["step_size"] = where(s.rectified, adaptive, lr / s.bias_correction1)
    columns.update(bias_correction2_sqrt=1.0, adaptive=1.0 * s.rectified)


def radam_read_back(second, rule, scalars: StepScalars):
    r"""Momentum SGD's :math:`\eta / (1 - \beta_1^t)` before rectification, else
    :math:`\eta\, r_t \sqrt{1 - \beta_2^t} / ((1 - \beta_1^t)(\sqrt{v} + \epsilon))`."""
    momentum_step = as_number(rule.lr) / as_number(scalars.bias_correction1)
    if scalars.rectification is None:  # momentum SGD: no denominator
        return torch.full_like(second, momentum_step), torch.zeros_like(second, dtype=torch.bool)
    root = second.sqrt()
    rectified = momentum_step * as_number(scalars.rectification) * as_number(scalars.bias_correction2_sqrt)
    return rectified / (root + rule.eps), rule.eps > root


def radam_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """RAdam as torch.optim.RAdam steps it: the bias-corrected m times lr, times
    sqrt(1 - beta2^t) / (sqrt(v) + eps) and the rectification once rho_t > 5."""
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])  # torch decays the real views
        grad = decayed_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        second_moment_update(exp_avg_sq, grad, group_scalars)
        update = radam_update(exp_avg, exp_avg_sq, step, rule, group_scalars.eps)
        if rule.cautious:
            descend_cautiously(param, update, grad, totals_of(tensors, i))
        else:
            param.add_(update, alpha=-1.0)


def radam_update(exp_avg: Tensor, exp_avg_sq: Tensor, step: StepScalars, rule: UpdateRule, eps: float) -> Tensor:
    """RAdam's update from the new moments: the bias-corrected m times lr, times the
    rectification and sqrt(1 - beta2^t) / (sqrt(v) + eps) once rho_t > 5."""
    corrected = (exp_avg.clone() if rule.differentiable else exp_avg) / step.bias_correction1  # (m moves in place)
    if step.rectified is not None:  # capturable: both branches, picked on the device
        adaptive = step.rectification * _radam_adaptive_lr(exp_avg_sq, step, eps, rule)
        return corrected * rule.lr * torch.where(step.rectified, adaptive, 1.0)
    if step.rectification is not None:
        return corrected * rule.lr * _radam_adaptive_lr(exp_avg_sq, step, eps, rule) * step.rectification
    return corrected * rule.lr


def _radam_adaptive_lr(exp_avg_sq: Tensor, step: StepScalars, eps: float, rule: UpdateRule) -> Tensor:
    """sqrt(1 - beta2^t) / (sqrt(v) + eps)."""
    root = exp_avg_sq.sqrt()
    root = root.add(eps) if rule.differentiable else root.add_(eps)
    return step.bias_correction2_sqrt / root


def radam_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`radam_single_tensor`'s arithmetic, op by op, over lists
    (a capturable group, whose rectification is chosen on the device, tensor by tensor)."""
    if rule.capturable:
        return radam_single_tensor(tensors, rule, group_scalars, steps)
    for t, bucket_steps in buckets(tensors, steps):
        params, _, exp_avgs, exp_avg_sqs = moment_updates(t, rule, group_scalars)
        updates = torch._foreach_div(exp_avgs, [s.bias_correction1 for s in bucket_steps])
        torch._foreach_mul_(updates, rule.lr)
        rectified = [i for i, s in enumerate(bucket_steps) if s.rectification is not None]
        if rectified:
            roots = torch._foreach_sqrt([exp_avg_sqs[i] for i in rectified])
            torch._foreach_add_(roots, group_scalars.eps)
            adaptive = [bucket_steps[i].bias_correction2_sqrt / root for i, root in zip(rectified, roots)]
            chosen = [updates[i] for i in rectified]
            torch._foreach_mul_(chosen, adaptive)
            torch._foreach_mul_(chosen, [number(bucket_steps[i].rectification) for i in rectified])
        torch._foreach_add_(params, updates, alpha=-1.0)


RADAM = register(
    AlgorithmSpec(
        name="radam",
        class_name="RAdam",
        code=3,
        step_scalars=radam_step_scalars,
        single_tensor=radam_single_tensor,
        foreach=radam_foreach,
        denominator=Denominator.RECTIFIED_ROOT,
        tensor_columns=radam_tensor_columns,
        read_back=radam_read_back,
    )
)

__all__ = [
    "RADAM",
    "radam_foreach",
    "radam_read_back",
    "radam_single_tensor",
    "radam_step_scalars",
    "radam_tensor_columns",
]
