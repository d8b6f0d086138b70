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

import torch
from torch import Tensor

from .base import AlgorithmSpec, Denominator, FirstMoment, SecondMoment, StepScalars, as_number, number_of, register


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


ADOPT = register(
    AlgorithmSpec(
        name="adopt",
        class_name="ADOPT",
        step_scalars=adopt_step_scalars,
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

__all__ = ["ADOPT", "check_clip_exponent", "adopt_read_back", "adopt_step_scalars", "adopt_tensor_columns"]
