r"""ADOPT (Taniguchi et al., 2024): Adam that converges for any :math:`\beta_2`.  The
gradient is normalized by the *previous* second moment, clipped, then averaged; the
first step only measures :math:`v`.

.. math::

    m \leftarrow m + (1 - \beta_1)
        \bigl(\operatorname{clip}(g / \max(\sqrt{v}, \epsilon), c) - m\bigr), \quad
    \theta \leftarrow \theta - \eta\, m, \quad v \leftarrow \beta_2 v + w g^2

with :math:`c = (t - 1)^p` and :math:`w = 1 - \beta_2`, except on the first step:
:math:`c = 0` and :math:`w = 1` (so :math:`m` stays 0 and :math:`v = g^2`), which is not
adaptive: its decoupled decay factor is 1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import AlgorithmSpec, Denominator, FirstMoment, SecondMoment, StepScalars, as_number, number_of, register
from .foreach_ops import buckets, number, real_views
from .single_tensor_ops import as_real, descend_cautiously, effective_gradient, totals_of

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def adopt_step_scalars(rule, step) -> StepScalars:
    r"""ADOPT's clipping value :math:`c_t = (t - 1)^p` and the weight of :math:`g^2`
    in :math:`v`, both chosen so that the first step only sets :math:`v = g^2`."""
    clip = math.inf if rule.clip_exponent is None else (step - 1) ** rule.clip_exponent
    first = step == 1
    if isinstance(step, Tensor):  # a step count on the device: decided there
        clip = torch.where(first, torch.zeros_like(step), clip)  # in the step's dtype (float64)
        second_weight = torch.where(first, torch.ones_like(step), 1 - rule.beta2)
    else:
        clip = 0.0 if first else clip
        second_weight = 1.0 if first else rule.finish(1 - rule.beta2)
    return StepScalars(rule.finish(rule.lr), 1.0, first=first, clip=clip, second_weight=second_weight)


def adopt_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The first step moves nothing, decay included."""
    columns.update(bias_correction2_sqrt=1.0, adaptive=where(s.first, 0.0, 1.0), clip=s.clip)
    columns["second_weight"] = s.second_weight
    columns["decay_factor"] = where(s.first, 1.0, columns["decay_factor"])


def adopt_read_back(second, rule, scalars: StepScalars):
    r"""``theta -= lr m``: m is already normalized, so :math:`\eta^{eff} = \eta`."""
    return torch.full_like(second, as_number(rule.lr)), rule.eps > second.sqrt()


def check_clip_exponent(clip_exponent, where: str = "") -> None:
    """ADOPT's ``clip_exponent``: ``None`` (no clipping) or a finite number >= 0."""
    if clip_exponent is None:
        return
    number = number_of("clip_exponent", clip_exponent, where)
    if not 0.0 <= number or math.isinf(number):
        raise ValueError(
            f"Invalid clip_exponent value: {clip_exponent!r} (clip_exponent must be None, for no "
            f"clipping, or a finite number >= 0{where}; the clipping value at step t is (t - 1) ** clip_exponent)"
        )


def adopt_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""ADOPT: m follows the gradient normalized by the *previous* v, clipped to
    :math:`[-c_t, c_t]`; the param moves by :math:`-\eta m`; then v is updated.  The
    first step's scalars (:meth:`~adamkit.rule.UpdateRule.step_scalars`: :math:`c = 0`,
    weight 1 for :math:`g^2`, no decay) leave m and the param as they are and set
    :math:`v = g^2`, without a branch (a device step count is never read)."""
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])
        grad = effective_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]
        if group_scalars.decay_factor is not None:
            param.mul_(_unless_first(step, group_scalars.decay_factor))

        root = exp_avg_sq.sqrt()  # (autograd keeps the root: clamped out of place where it flows)
        normalized = grad / (
            root.clamp(min=group_scalars.eps) if rule.differentiable else root.clamp_(min=group_scalars.eps)
        )
        normalized.clamp_(-step.clip, step.clip)
        exp_avg.lerp_(normalized, group_scalars.one_minus_beta1(param))
        update = (exp_avg.clone() if rule.differentiable else exp_avg) * step.step_size
        if rule.cautious:
            descend_cautiously(param, update, grad, totals_of(tensors, i))
        else:
            param.sub_(update)
        if isinstance(step.second_weight, Tensor):
            exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad * step.second_weight, grad)
        else:
            exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad, grad, value=step.second_weight)


def _unless_first(step: StepScalars, factor):
    """``factor``, or 1 on ADOPT's first step."""
    if isinstance(step.first, Tensor):
        return torch.where(step.first, 1.0, factor)
    return 1.0 if step.first else factor


def adopt_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`adopt_single_tensor`'s arithmetic, op by op, over lists
    (a capturable group, whose first step is told apart on the device, tensor by tensor)."""
    if rule.capturable:
        return adopt_single_tensor(tensors, rule, group_scalars, steps)
    for t, bucket_steps in buckets(tensors, steps):
        params, exp_avgs, exp_avg_sqs = real_views(t.params), real_views(t.exp_avgs), real_views(t.exp_avg_sqs)
        grads = real_views(t.grads)
        if rule.maximize:
            grads = torch._foreach_neg(grads)
        if group_scalars.decay_factor is not None:
            factor = number(group_scalars.decay_factor)
            torch._foreach_mul_(params, [1.0 if s.first else factor for s in bucket_steps])
        elif group_scalars.l2_weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=group_scalars.l2_weight_decay)

        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_clamp_min_(denoms, group_scalars.eps)
        normalized = torch._foreach_div(grads, denoms)
        clips = [s.clip for s in bucket_steps]
        torch._foreach_clamp_min_(normalized, [-c for c in clips])
        torch._foreach_clamp_max_(normalized, clips)
        torch._foreach_lerp_(exp_avgs, normalized, number(group_scalars.one_minus_beta1(params[0])))
        torch._foreach_sub_(params, torch._foreach_mul(exp_avgs, [s.step_size for s in bucket_steps]))
        torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, [s.second_weight for s in bucket_steps])


ADOPT = register(
    AlgorithmSpec(
        name="adopt",
        class_name="ADOPT",
        code=4,
        step_scalars=adopt_step_scalars,
        single_tensor=adopt_single_tensor,
        foreach=adopt_foreach,
        first_moment=FirstMoment.NORMALIZED_CLIPPED,
        second_moment=SecondMoment.AVERAGE_AFTER,
        denominator=Denominator.NONE,
        steps_with_mean_gradient=True,
        tensor_columns=adopt_tensor_columns,
        read_back=adopt_read_back,
        hyperparameters={"clip_exponent": 0.25},
        checks={"clip_exponent": check_clip_exponent},
    )
)

__all__ = [
    "ADOPT",
    "adopt_foreach",
    "adopt_read_back",
    "adopt_single_tensor",
    "adopt_step_scalars",
    "adopt_tensor_columns",
    "check_clip_exponent",
]
