r"""AdaMax (Kingma & Ba, 2015, Algorithm 2): the second moment an infinity norm.

.. math::

    u \leftarrow \max(\beta_2 u, |g| + \epsilon), \qquad
    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{u}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import AlgorithmSpec, Denominator, SecondMoment, StepScalars, as_number, register
from .foreach_ops import apply_updates, buckets, first_moment_updates, number, real_views
from .single_tensor_ops import as_real, decayed_gradient, descend, totals_of

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def adamax_step_scalars(rule, step) -> StepScalars:
    r"""The step size :math:`\eta / (1 - \beta_1^t)` (no second bias correction), in
    torch.optim.Adamax's arithmetic."""
    return StepScalars(rule.finish(rule.lr / (1 - rule.beta1**step)), 1.0)


def adamax_read_back(second, rule, scalars: StepScalars):
    r""":math:`\eta^{eff} = \alpha / u`; :math:`\epsilon` dominates where :math:`u < 2\epsilon`."""
    return as_number(scalars.step_size) / second, 2 * rule.eps > second


def adamax_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""AdaMax as ``torch.optim.Adamax(foreach=False)`` steps it: :math:`u \leftarrow
    \max(\beta_2 u, |g| + \epsilon)`, the update :math:`m / u` times the step size."""
    for i, param in enumerate(tensors.params):
        grad = decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_inf = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        norm = grad.abs().add_(group_scalars.eps)
        if rule.differentiable:
            exp_inf.copy_(torch.maximum(exp_inf.clone().mul(group_scalars.beta2), norm))  # (mul keeps its input)
        else:
            torch.maximum(exp_inf.mul_(group_scalars.beta2), norm, out=exp_inf)
        denom = exp_inf.clone() if rule.differentiable else exp_inf
        descend(param, exp_avg, denom, steps[i].step_size, grad, rule, totals_of(tensors, i))


def adamax_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`adamax_single_tensor`'s arithmetic, op by op, over lists."""
    for t, bucket_steps in buckets(tensors, steps):
        params, grads, exp_avgs = first_moment_updates(t, rule, group_scalars)
        exp_infs = real_views(t.exp_avg_sqs)
        norms = torch._foreach_abs(grads)
        torch._foreach_add_(norms, group_scalars.eps)
        torch._foreach_mul_(exp_infs, number(group_scalars.beta2))
        torch._foreach_maximum_(exp_infs, norms)
        apply_updates(params, exp_avgs, exp_infs, bucket_steps)


ADAMAX = register(
    AlgorithmSpec(
        name="adamax",
        class_name="AdaMax",
        code=1,
        step_scalars=adamax_step_scalars,
        single_tensor=adamax_single_tensor,
        foreach=adamax_foreach,
        second_moment=SecondMoment.INFINITY_NORM,
        denominator=Denominator.NORM,
        second_moment_key="exp_inf",
        read_back=adamax_read_back,
        tensor_beta1="tensor",
    )
)

__all__ = ["ADAMAX", "adamax_foreach", "adamax_read_back", "adamax_single_tensor", "adamax_step_scalars"]
