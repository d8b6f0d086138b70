r"""Adam (Kingma & Ba, 2015, Algorithm 1) and AdamW: the family's base.

.. math::

    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import AlgorithmSpec, StepScalars, as_number, register
from .foreach_ops import apply_updates, buckets, first_moment_updates, number, real_views
from .single_tensor_ops import adam_denominator, as_real, decayed_gradient, descend, second_moment_update, totals_of

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def adam_step_scalars(rule, step) -> StepScalars:
    r"""The step size :math:`\eta / (1 - \beta_1^t)` and :math:`\sqrt{1 - \beta_2^t}`, in
    torch.optim.Adam's arithmetic."""
    step_size = rule.lr / (1 - rule.beta1**step)
    bias_correction2 = 1 - rule.beta2**step
    return StepScalars(rule.finish(step_size), rule.finish(bias_correction2**0.5))


def adam_read_back(second, rule, scalars: StepScalars):
    r""":math:`\eta^{eff} = \alpha / (\sqrt{v} / c_2 + \epsilon)`, and where :math:`\epsilon`
    dominated the denominator."""
    root = second.sqrt() / as_number(scalars.bias_correction2_sqrt)
    return as_number(scalars.step_size) / (root + rule.eps), rule.eps > root


def adam_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """Adam and AdamW as ``torch.optim.Adam(foreach=False)`` steps them (the sequence in
    :mod:`.single_tensor_ops`), AMSGrad's running maximum included."""
    for i, param in enumerate(tensors.params):
        grad = decayed_gradient(param, tensors.grads[i], rule, group_scalars)
        param, grad = as_real(param), as_real(grad)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        second_moment_update(exp_avg_sq, grad, group_scalars)
        second_moment = exp_avg_sq
        if rule.amsgrad:
            max_exp_avg_sq = as_real(tensors.max_exp_avg_sqs[i])
            if rule.differentiable:  # maximum saves both inputs; both change in place later
                max_exp_avg_sq.copy_(torch.maximum(max_exp_avg_sq.clone(), exp_avg_sq.clone()))
            else:
                torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            second_moment = max_exp_avg_sq

        denom = adam_denominator(second_moment, steps[i], group_scalars.eps)
        descend(param, exp_avg, denom, steps[i].step_size, grad, rule, totals_of(tensors, i))


def adam_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`adam_single_tensor`'s arithmetic, op by op, over lists."""
    for t, bucket_steps in buckets(tensors, steps):
        params, grads, exp_avgs = first_moment_updates(t, rule, group_scalars)
        exp_avg_sqs = real_views(t.exp_avg_sqs)
        torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, number(group_scalars.one_minus_beta2))
        second_moments = exp_avg_sqs
        if rule.amsgrad:
            second_moments = real_views(t.max_exp_avg_sqs)
            torch._foreach_maximum_(second_moments, exp_avg_sqs)

        denoms = torch._foreach_sqrt(second_moments)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        apply_updates(params, exp_avgs, denoms, bucket_steps)


ADAM = register(
    AlgorithmSpec(
        name="adam",
        class_name="Adam",
        code=0,
        step_scalars=adam_step_scalars,
        single_tensor=adam_single_tensor,
        foreach=adam_foreach,
        amsgrad=True,
        read_back=adam_read_back,
        tensor_beta1="cast",
        tensor_hyperparameter_checks=True,
    )
)

__all__ = ["ADAM", "adam_foreach", "adam_read_back", "adam_single_tensor", "adam_step_scalars"]
