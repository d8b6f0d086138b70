r"""StableAdamW (Wortsman et al., 2023): AdamW whose step is clipped per tensor by the
root mean square of the gradient over its second moment.

.. math::

    s = 1 / \max\bigl(1, \sqrt{\operatorname{mean}(g^2 / \max(v / b_2, \epsilon^2))}\bigr),
    \qquad \alpha \leftarrow s\,\alpha, \quad \text{decay factor} = 1 - s\,\eta\lambda

(:math:`b_2 = 1 - \beta_2^t`, :math:`v` the new second moment), then Adam's update.  The
sums behind :math:`s` are a reduction over each whole tensor, a pass of its own before
the update in the fused kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .adam import adam_step_scalars
from .base import AlgorithmSpec, StepScalars, register
from .foreach_ops import buckets, number, real_views
from .single_tensor_ops import (
    adam_denominator,
    as_real,
    descend,
    effective_gradient,
    second_moment_update,
    totals_of,
)

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def stable_adamw_step_scalars(rule, step) -> StepScalars:
    r"""Adam's, and :math:`1 - \beta_2^t` for the update clipping's :math:`v / b_2`."""
    return replace(adam_step_scalars(rule, step), bias_correction2=rule.finish(1 - rule.beta2**step))


def stable_adamw_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The step size and decay factor before clipping, and 1 - beta2^t for the clipping pass."""
    columns["bias_correction2"] = s.bias_correction2


def stable_adamw_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""StableAdamW: Adam's moments, then per tensor :math:`s = 1 / \max(1, \mathrm{RMS})`
    with :math:`\mathrm{RMS} = \sqrt{\operatorname{mean}(g^2 / \max(\hat v, \epsilon^2))}`
    (:func:`update_clipping`); the step size and the decoupled decay are scaled by s."""
    decay_rate = rule.decay_rate()
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])
        grad = effective_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        step = steps[i]

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        second_moment_update(exp_avg_sq, grad, group_scalars)
        scale = update_clipping(grad, exp_avg_sq, step, group_scalars.eps, totals_of(tensors, i), rule.differentiable)
        if decay_rate is not None:
            param.mul_(1 - scale * decay_rate)
        denom = adam_denominator(exp_avg_sq, step, group_scalars.eps)
        descend(param, exp_avg, denom, step.step_size * scale, grad, rule, totals_of(tensors, i))


def update_clipping(grad: Tensor, exp_avg_sq: Tensor, step: StepScalars, eps: float, totals=None, keep=False):
    r""":math:`1 / \max(1, \mathrm{RMS})` of one tensor (1 for an empty one): a float read
    from the device, or a 0-d tensor where the step scalars are tensors (no host read).
    ``totals``: where ``grad`` is a sharded param's local shard, the function that sums
    per-shard values over the whole param (the mean is then over the whole param: a
    collective), else ``None``.  ``keep``: read a copy of v (autograd keeps what it
    reads, and v moves in place next step)."""
    if grad.numel() == 0 and totals is None:
        return 1.0
    v_hat = ((exp_avg_sq.clone() if keep else exp_avg_sq) / step.bias_correction2).clamp_(min=eps * eps)
    total = (grad * grad / v_hat).sum(dtype=torch.float64)  # (float64, as the fused kernels add)
    if totals is None:
        rms = (total / grad.numel()).sqrt()
    else:
        total, count = totals(torch.stack([total, total.new_tensor(grad.numel())]))
        rms = (total / count.clamp(min=1.0)).sqrt()
    if isinstance(step.bias_correction2, Tensor):
        return 1.0 / rms.to(torch.float64).clamp(min=1.0)
    return 1.0 / max(1.0, rms.item())


def stable_adamw_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`stable_adamw_single_tensor`'s arithmetic over lists: the
    moments and updates as list ops, each tensor's clipping from its own reduction
    (a capturable group tensor by tensor)."""
    if rule.capturable:
        return stable_adamw_single_tensor(tensors, rule, group_scalars, steps)
    decay_rate = rule.decay_rate()
    for t, bucket_steps in buckets(tensors, steps):
        params, grads = real_views(t.params), real_views(t.grads)
        exp_avgs, exp_avg_sqs = real_views(t.exp_avgs), real_views(t.exp_avg_sqs)
        if rule.maximize:
            grads = torch._foreach_neg(grads)
        if group_scalars.l2_weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=group_scalars.l2_weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, number(group_scalars.one_minus_beta1(params[0])))
        torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, number(group_scalars.one_minus_beta2))
        totals = t.totals or [None] * len(grads)
        scales = [
            update_clipping(g, v, s, group_scalars.eps, whole)
            for g, v, s, whole in zip(grads, exp_avg_sqs, bucket_steps, totals)
        ]
        if decay_rate is not None:
            torch._foreach_mul_(params, [1 - s * decay_rate for s in scales])
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-s.step_size * c for s, c in zip(bucket_steps, scales)])


STABLE_ADAMW = register(
    AlgorithmSpec(
        name="stable_adamw",
        class_name="StableAdamW",
        code=5,
        step_scalars=stable_adamw_step_scalars,
        single_tensor=stable_adamw_single_tensor,
        foreach=stable_adamw_foreach,
        clips_update=True,
        steps_with_mean_gradient=True,
        tensor_columns=stable_adamw_tensor_columns,
    )
)

__all__ = [
    "STABLE_ADAMW",
    "stable_adamw_foreach",
    "stable_adamw_single_tensor",
    "stable_adamw_step_scalars",
    "stable_adamw_tensor_columns",
]
