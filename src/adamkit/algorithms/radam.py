r"""RAdam (Liu et al., 2020): Adam whose adaptive step is rectified by the variance of
its moving average, and momentum SGD while that variance is undefined (:math:`\rho_t \le 5`).

.. math::

    \theta \leftarrow \theta - \alpha\, m / d, \qquad
    d = \sqrt{v} + \epsilon, \ \alpha = \frac{\eta\, r_t \sqrt{1 - \beta_2^t}}{1 - \beta_1^t}
    \ \text{once } \rho_t > 5; \quad d = 1, \ \alpha = \frac{\eta}{1 - \beta_1^t} \text{ before}
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .base import AlgorithmSpec, Denominator, StepScalars, as_number, register


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


RADAM = register(
    AlgorithmSpec(
        name="radam",
        class_name="RAdam",
        step_scalars=radam_step_scalars,
        denominator=Denominator.RECTIFIED_ROOT,
        tensor_columns=radam_tensor_columns,
        read_back=radam_read_back,
    )
)

__all__ = ["RADAM", "radam_read_back", "radam_step_scalars", "radam_tensor_columns"]
