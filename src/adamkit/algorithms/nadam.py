r"""NAdam (Dozat, 2016): Adam with Nesterov momentum, its coefficient warmed up as
:math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t \psi})`.

.. math::

    \theta \leftarrow \theta - \frac{\alpha\, m + \gamma\, g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon},
    \qquad \alpha = \frac{\eta\,\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i}, \quad
    \gamma = \frac{\eta (1 - \mu_t)}{1 - \prod_{i \le t} \mu_i}
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import AlgorithmSpec, StepScalars, number_of, register
from .foreach_ops import buckets, moment_updates, number
from .single_tensor_ops import as_real, decayed_gradient, descend_cautiously, second_moment_update, totals_of

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def nadam_step_scalars(rule, step) -> StepScalars:
    r""":math:`\mu_t = \beta_1 (1 - \tfrac12 0.96^{t\psi})`, :math:`\mu_{t+1}` and
    :math:`1 - \beta_2^t`, in torch.optim.NAdam's arithmetic."""
    bias_correction2 = 1 - rule.beta2**step
    mu = rule.beta1 * (1.0 - 0.5 * (0.96 ** (step * rule.momentum_decay)))
    mu_next = rule.beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * rule.momentum_decay)))
    return StepScalars(
        rule.lr, rule.finish(bias_correction2**0.5), bias_correction2=bias_correction2, mu=mu, mu_next=mu_next
    )


def nadam_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The step sizes of m and of g from each tensor's new ``mu_product``."""
    columns["step_size"] = lr * s.mu_next / (1.0 - mu_products * s.mu_next)
    columns["gradient_step_size"] = lr * (1.0 - s.mu) / (1.0 - mu_products)


def check_momentum_decay(momentum_decay, where: str = "") -> None:
    """NAdam's ``momentum_decay`` (torch's message; infinity and NaN rejected too)."""
    number = number_of("momentum_decay", momentum_decay, where)
    if not 0.0 <= number or math.isinf(number):
        raise ValueError(
            f"Invalid momentum_decay value: {momentum_decay} (momentum_decay must be a finite number >= 0{where})"
        )


def nadam_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """NAdam as torch.optim.NAdam steps it: ``mu_product`` is a 0-d state tensor
    multiplied by mu_t in its own dtype, the update two ``addcdiv`` terms over
    sqrt(v / (1 - beta2^t)) + eps."""
    tensor_scalars = rule.differentiable or rule.capturable
    for i, param in enumerate(tensors.params):
        param, grad = as_real(param), as_real(tensors.grads[i])  # torch decays the real views
        grad = decayed_gradient(param, grad, rule, group_scalars)
        exp_avg, exp_avg_sq = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i])
        mu_product, step = tensors.mu_products[i], steps[i]
        mu_product *= step.mu
        if rule.differentiable:  # (autograd keeps what it reads; the state moves in place next step)
            mu_product = mu_product.clone()

        exp_avg.lerp_(grad, group_scalars.one_minus_beta1(param))
        second_moment_update(exp_avg_sq, grad, group_scalars)
        denom = (exp_avg_sq.clone() if rule.differentiable else exp_avg_sq).div(step.bias_correction2).sqrt()
        lr, mu, mu_next = rule.lr, step.mu, step.mu_next
        if rule.cautious:  # the two terms as one update, masked
            product = mu_product if tensor_scalars else mu_product.item()
            momentum = exp_avg.clone() if rule.differentiable else exp_avg  # (m changes in place next step)
            gradient_part = grad * (lr * (1.0 - mu) / (1.0 - product))
            update = (gradient_part + momentum * (lr * mu_next / (1.0 - product * mu_next))) / denom.add(
                group_scalars.eps
            )
            descend_cautiously(param, update, grad, totals_of(tensors, i))
        elif tensor_scalars:  # no host read; autograd sees the products
            denom = denom.add(group_scalars.eps)
            grad = grad * (-lr * (1.0 - mu) / (1.0 - mu_product))
            momentum = (exp_avg.clone() if rule.differentiable else exp_avg) * (
                -lr * mu_next / (1.0 - mu_product * mu_next)
            )
            param.addcdiv_(grad, denom)
            param.addcdiv_(momentum, denom)
        else:
            product = mu_product.item()
            denom.add_(group_scalars.eps)
            param.addcdiv_(grad, denom, value=-lr * (1.0 - mu) / (1.0 - product))
            param.addcdiv_(exp_avg, denom, value=(-lr * mu_next) / (1.0 - product * mu_next))


def nadam_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`nadam_single_tensor`'s arithmetic, op by op, over lists
    (a capturable group, which must not read ``mu_product`` on the host, tensor by tensor)."""
    if rule.capturable:
        return nadam_single_tensor(tensors, rule, group_scalars, steps)
    lr = rule.lr
    for t, bucket_steps in buckets(tensors, steps):
        for mu_product, step in zip(t.mu_products, bucket_steps):
            mu_product.mul_(step.mu)
        params, grads, exp_avgs, exp_avg_sqs = moment_updates(t, rule, group_scalars)
        denoms = torch._foreach_div(exp_avg_sqs, [s.bias_correction2 for s in bucket_steps])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group_scalars.eps)
        products = [mu_product.item() for mu_product in t.mu_products]
        gradient_weights = [number(-lr * (1.0 - s.mu) / (1.0 - p)) for s, p in zip(bucket_steps, products)]
        momentum_weights = [number((-lr * s.mu_next) / (1.0 - p * s.mu_next)) for s, p in zip(bucket_steps, products)]
        torch._foreach_addcdiv_(params, grads, denoms, gradient_weights)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, momentum_weights)


NADAM = register(
    AlgorithmSpec(
        name="nadam",
        class_name="NAdam",
        code=2,
        step_scalars=nadam_step_scalars,
        single_tensor=nadam_single_tensor,
        foreach=nadam_foreach,
        nesterov=True,
        keeps_mu_product=True,
        steps_with_mean_gradient=True,
        tensor_columns=nadam_tensor_columns,
        hyperparameters={"momentum_decay": 4e-3},
        checks={"momentum_decay": check_momentum_decay},
    )
)

__all__ = [
    "NADAM",
    "check_momentum_decay",
    "nadam_foreach",
    "nadam_single_tensor",
    "nadam_step_scalars",
    "nadam_tensor_columns",
]
