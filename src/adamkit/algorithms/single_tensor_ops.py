r"""The torch ops the algorithms' per-tensor paths share (``foreach=False``: torch's
for-loop, the readable path, the one autograd can flow through; and every tensor whose
step the foreach path hands back).

Each algorithm's own per-tensor function (``<name>_single_tensor``, in its module in
this package) strings these together in the order its torch.optim counterpart uses,
so results are bit-identical to it; Adam's, for instance:

.. math::

    g &\leftarrow -g \ \text{if maximize}; \quad
        \theta \leftarrow \theta \cdot \text{decay\_factor} \ \text{or}\
        g \leftarrow g + \lambda\theta \\
    m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1) \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2
        \quad (v^{max} \leftarrow \max(v^{max}, v) \text{ with AMSGrad}) \\
    \theta &\leftarrow \theta - \text{step\_size} \cdot
        m / (\sqrt{v} / \text{bias\_correction2\_sqrt} + \epsilon)

Scalars arrive as Python floats, or as tensors on the differentiable path (gradients
flow through them) and the capturable path (no host sync).  With tensor scalars the
ops that need a Python number are written as tensor ops instead, and on the
differentiable path tensors that autograd saves are cloned before their next
in-place update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import StepScalars

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as a (..., 2) real view: the rule acts on real and imaginary parts."""
    return torch.view_as_real(t) if t.is_complex() else t


def effective_gradient(param: Tensor, grad: Tensor, rule: UpdateRule, group_scalars: GroupScalars) -> Tensor:
    """``maximize`` and L2 weight decay applied to the gradient (a new tensor if either is on)."""
    if rule.maximize:
        grad = -grad
    if group_scalars.decay_factor is None and group_scalars.l2_weight_decay != 0:
        grad = grad.add(param, alpha=group_scalars.l2_weight_decay)
    return grad


def decay_param(param: Tensor, group_scalars: GroupScalars) -> None:
    """Decoupled weight decay: theta <- theta * decay_factor."""
    if group_scalars.decay_factor is not None:
        param.mul_(group_scalars.decay_factor)


def decayed_gradient(param: Tensor, grad: Tensor, rule: UpdateRule, group_scalars: GroupScalars) -> Tensor:
    """Apply ``maximize`` and weight decay (decoupled: to the param; L2: to the gradient)."""
    decay_param(param, group_scalars)
    return effective_gradient(param, grad, rule, group_scalars)


def second_moment_update(exp_avg_sq: Tensor, grad: Tensor, group_scalars: GroupScalars) -> None:
    """v <- beta2 v + (1 - beta2) g^2; as ``lerp`` towards g^2 when (1 - beta2) is a tensor."""
    if isinstance(group_scalars.one_minus_beta2, Tensor):
        weight = group_scalars.one_minus_beta2.to(device=exp_avg_sq.device, dtype=exp_avg_sq.dtype)
        exp_avg_sq.lerp_(grad.square(), weight)
    else:
        exp_avg_sq.mul_(group_scalars.beta2).addcmul_(grad, grad, value=group_scalars.one_minus_beta2)


def adam_denominator(second_moment: Tensor, step: StepScalars, eps: float) -> Tensor:
    """sqrt(v) / sqrt(1 - beta2^t) + eps, as a new tensor."""
    return (second_moment.sqrt() / step.bias_correction2_sqrt).add_(eps)


def apply_update(param: Tensor, exp_avg: Tensor, denom: Tensor, step_size, differentiable: bool = False) -> None:
    """theta <- theta - step_size * m / denom."""
    if isinstance(step_size, Tensor) or differentiable:
        param.sub_((exp_avg.clone() if differentiable else exp_avg) / denom * step_size)
    else:
        param.addcdiv_(exp_avg, denom, value=-step_size)


def descend_cautiously(param: Tensor, update: Tensor, grad: Tensor, totals=None) -> None:
    r"""Cautious updates (Liang et al., 2024): :math:`\theta \leftarrow \theta - u \odot \phi
    \cdot n / (\lVert\phi\rVert_0 + 1)`, :math:`\phi = [u \odot g > 0]`: only the elements whose
    update (``update``, the amount subtracted) agrees in sign with the gradient move, the
    kept ones scaled up so the update keeps about its size.  The scale is a float64
    device tensor (no host read).  ``totals``: where ``param`` is the local shard of a
    sharded param, the function that sums per-shard values over the whole param (see
    :attr:`adamkit.kernels.types.GroupTensors.totals`; the count and n are then the whole
    param's), else ``None``."""
    agree = update * grad > 0
    if totals is None:
        scale = update.numel() / (agree.sum().to(torch.float64) + 1.0)
    else:
        kept, total = totals(
            torch.stack([agree.sum().to(torch.float64), torch.tensor(float(update.numel()), device=agree.device)])
        )
        scale = total / (kept + 1.0)
    param.sub_(update * agree * scale)


def descend(
    param: Tensor, exp_avg: Tensor, denom: Tensor, step_size, grad: Tensor, rule: UpdateRule, totals=None
) -> None:
    """theta <- theta - step_size * m / denom, cautiously if the rule says so."""
    if rule.cautious:  # (autograd saves m: a copy, as m changes in place next step)
        update = (exp_avg.clone() if rule.differentiable else exp_avg) / denom * step_size
        descend_cautiously(param, update, grad, totals)
    else:
        apply_update(param, exp_avg, denom, step_size, rule.differentiable)


def totals_of(tensors: GroupTensors, i: int):
    """How per-shard sums of ``tensors.params[i]`` become its whole param's, or ``None``."""
    return tensors.totals[i] if tensors.totals else None


def lerp_weight(value, like: Tensor):
    """A lerp weight: a float, or a device tensor in ``like``'s dtype."""
    return value.to(like.dtype) if isinstance(value, Tensor) else value
