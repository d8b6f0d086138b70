r"""Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled"): no learning-rate
schedule; the weights the loss is evaluated at during training (:math:`y`) interpolate
between a plain AdamW-normalized SGD sequence (:math:`z`) and its running average
(:math:`x`), which is what one evaluates and keeps.

With :math:`t` the group's step count, :math:`\gamma_t` the warmed-up learning rate
(:math:`\gamma \min(t / T_w, 1)`), :math:`\gamma_{max}` its running maximum and
:math:`\lambda` the weight decay:

.. math::

    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2, \qquad
    d = \frac{g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon} + \lambda y \\
    w_t &= t^r \gamma_{max}^{p}, \qquad c_{t+1} = w_t / \textstyle\sum_{i \le t} w_i \\
    z &\leftarrow z - \gamma_t d, \qquad
    x \leftarrow (1 - c_{t+1})\, x + c_{t+1} z, \qquad
    y = (1 - \beta_1) z + \beta_1 x

The param holds :math:`y` while training (``optimizer.train()``) and :math:`x` for
evaluation (``optimizer.eval()``); :math:`x` is never stored: :math:`y` is moved to its
next value directly, :math:`y \leftarrow \operatorname{lerp}(y, z, c_{t+1}) +
\gamma_t(\beta_1(1 - c_{t+1}) - 1)\, d` with the old :math:`z`, then :math:`z` steps
(the ``schedulefree`` package's arithmetic, in its order).

The state is ``z``, a weight (:attr:`~.base.AlgorithmSpec.weight_copy`: in the param's
dtype whatever ``state_precision`` says), and ``exp_avg_sq``.  The group keeps its step
count ``k``, ``weight_sum``, ``lr_max``, ``scheduled_lr`` and ``train_mode``, as that
package keeps them (so its checkpoints load): :attr:`~.base.AlgorithmSpec.group_state`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .base import AlgorithmSpec, FirstMoment, StepScalars, as_number, is_real_number, register
from .foreach_ops import buckets, number, real_views
from .single_tensor_ops import as_real, second_moment_update

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


#: the values the group keeps, with their initial values (the schedulefree package's, but
#: for ``train_mode``: a new optimizer here starts in train mode, see
#: :class:`adamkit.ScheduleFreeAdamW`)
GROUP_STATE = {"k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0, "train_mode": True}


def _average_weight(step: int, lr_max: float, r: float, weight_lr_power: float) -> float:
    r""":math:`w_t = t^r \gamma_{max}^p`."""
    return (step**r) * (lr_max**weight_lr_power)


def advance_schedule(group: dict) -> None:
    r"""One step of the group's running values: the warmed-up rate :math:`\gamma_t`
    (``scheduled_lr``), its maximum, the running sum of :math:`w_t`, the step count."""
    k, warmup = group["k"], group["warmup_steps"]
    lr = as_number(group["lr"]) * ((k + 1) / warmup if k < warmup else 1.0)
    group["scheduled_lr"] = lr
    group["lr_max"] = lr_max = max(lr, group["lr_max"])
    group["weight_sum"] = group["weight_sum"] + _average_weight(k + 1, lr_max, group["r"], group["weight_lr_power"])
    group["k"] = k + 1


def schedule_free_step_scalars(rule, step) -> StepScalars:
    r"""The group's step (``step``, a param's own count, is not read: every scalar is the
    group's): :math:`\gamma_t`, :math:`1 - \beta_2^t`, :math:`c_{t+1}` (0 while every
    weight so far is 0), the param's step along the direction
    :math:`\gamma_t(\beta_1(1 - c_{t+1}) - 1)` and the weight decay :math:`\lambda`."""
    t = rule.k
    weight = _average_weight(t, rule.lr_max, rule.r, rule.weight_lr_power)
    bias_correction2 = 1 - as_number(rule.beta2) ** t
    average_weight = weight / rule.weight_sum if rule.weight_sum != 0 else 0.0
    return StepScalars(
        step_size=rule.scheduled_lr,
        bias_correction2_sqrt=math.sqrt(bias_correction2),
        bias_correction2=bias_correction2,
        average_weight=average_weight,
        point_step_size=rule.scheduled_lr * (as_number(rule.beta1) * (1 - average_weight) - 1),
        point_decay=rule.weight_decay,
    )


def schedule_free_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The fused kernels' :math:`1 - \beta_2^t` (under the root, as the package divides),
    :math:`c_{t+1}`, the param's step along the direction and the weight decay at it."""
    columns["bias_correction2"] = s.bias_correction2
    columns["average_weight"] = s.average_weight
    columns["point_step_size"] = s.point_step_size
    columns["point_decay"] = s.point_decay


def check_warmup_steps(warmup_steps, where: str = "") -> None:
    """``warmup_steps``: a finite number of steps >= 0, as the ``schedulefree`` package
    takes it (a NumPy int, or a float such as ``0.05 * total_steps``, in its checkpoints)."""
    if not is_real_number(warmup_steps) or not 0 <= warmup_steps < math.inf:
        raise ValueError(
            f"Invalid warmup_steps value: {warmup_steps!r} (warmup_steps must be a finite number >= 0 of steps{where})"
        )


def check_finite_at_least_zero(name: str):
    """The check of ``name``: a finite float >= 0."""

    def check(value, where: str = "") -> None:
        if not is_real_number(value) or not 0.0 <= value < math.inf:
            raise ValueError(f"Invalid {name} value: {value!r} ({name} must be a finite float >= 0{where})")

    return check


def schedule_free_single_tensor(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    r"""Schedule-free AdamW (:mod:`adamkit.algorithms.schedule_free`) as the ``schedulefree``
    package steps it, its arithmetic in its order: :math:`d = g / (\sqrt{v / (1 - \beta_2^t)}
    + \epsilon) + \lambda y`, :math:`y \leftarrow \operatorname{lerp}(y, z, c) +
    \gamma(\beta_1(1 - c) - 1)\, d`, :math:`z \leftarrow z - \gamma d`.  The second weight
    sequence :math:`z` is held in the first moment's place; ``.grad`` is not written."""
    for i, param in enumerate(tensors.params):
        y, grad = as_real(param), as_real(tensors.grads[i])
        grad = -grad if rule.maximize else grad
        z, exp_avg_sq, step = as_real(tensors.exp_avgs[i]), as_real(tensors.exp_avg_sqs[i]), steps[i]
        second_moment_update(exp_avg_sq, grad, group_scalars)
        direction = grad.div(exp_avg_sq.div(step.bias_correction2).sqrt_().add_(group_scalars.eps))
        if step.point_decay != 0:
            direction.add_(y, alpha=step.point_decay)
        y.lerp_(z, step.average_weight)
        y.add_(direction, alpha=step.point_step_size)
        z.sub_(direction, alpha=step.step_size)


def schedule_free_foreach(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """Schedule-free AdamW (see :func:`schedule_free_single_tensor`)
    with foreach ops, as the ``schedulefree`` package's foreach path issues them (every
    scalar is the group's: one per bucket)."""
    for t, bucket_steps in buckets(tensors, steps):
        step = bucket_steps[0]
        ys, zs, exp_avg_sqs = real_views(t.params), real_views(t.exp_avgs), real_views(t.exp_avg_sqs)
        grads = real_views(torch._foreach_neg(t.grads) if rule.maximize else t.grads)
        torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=number(group_scalars.one_minus_beta2))
        denoms = torch._foreach_div(exp_avg_sqs, step.bias_correction2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group_scalars.eps)
        directions = torch._foreach_div(grads, denoms)
        if step.point_decay != 0:
            torch._foreach_add_(directions, ys, alpha=step.point_decay)
        torch._foreach_lerp_(ys, zs, weight=step.average_weight)
        torch._foreach_add_(ys, directions, alpha=step.point_step_size)
        torch._foreach_sub_(zs, directions, alpha=step.step_size)


SCHEDULE_FREE_ADAMW = register(
    AlgorithmSpec(
        name="schedule_free_adamw",
        class_name="ScheduleFreeAdamW",
        code=7,
        step_scalars=schedule_free_step_scalars,
        single_tensor=schedule_free_single_tensor,
        foreach=schedule_free_foreach,
        first_moment=FirstMoment.WEIGHT_SEQUENCE,
        weight_copy="z",
        tensor_columns=schedule_free_tensor_columns,
        group_state=GROUP_STATE,
        advance=advance_schedule,
        hyperparameters={"warmup_steps": 0, "r": 0.0, "weight_lr_power": 2.0},
        checks={
            "warmup_steps": check_warmup_steps,
            "r": check_finite_at_least_zero("r"),
            "weight_lr_power": check_finite_at_least_zero("weight_lr_power"),
        },
    )
)

__all__ = [
    "GROUP_STATE",
    "SCHEDULE_FREE_ADAMW",
    "advance_schedule",
    "schedule_free_foreach",
    "schedule_free_single_tensor",
    "schedule_free_step_scalars",
    "schedule_free_tensor_columns",
]
