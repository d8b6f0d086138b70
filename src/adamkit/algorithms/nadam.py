r"""NAdam (Dozat, 2016): Adam with Nesterov momentum, its coefficient warmed up as
:math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t \psi})`.

.. math::

    \theta \leftarrow \theta - \frac{\alpha\, m + \gamma\, g}{\sqrt{v / (1 - \beta_2^t)} + \epsilon},
    \qquad \alpha = \frac{\eta\,\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i}, \quad
    \gamma = \frac{\eta (1 - \mu_t)}{1 - \prod_{i \le t} \mu_i}
"""

from __future__ import annotations

import math

from .base import AlgorithmSpec, StepScalars, number_of, register


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


NADAM = register(
    AlgorithmSpec(
        name="nadam",
        class_name="NAdam",
        step_scalars=nadam_step_scalars,
        nesterov=True,
        keeps_mu_product=True,
        steps_with_mean_gradient=True,
        tensor_columns=nadam_tensor_columns,
        hyperparameters={"momentum_decay": 4e-3},
        checks={"momentum_decay": check_momentum_decay},
    )
)

__all__ = ["NADAM", "check_momentum_decay", "nadam_step_scalars", "nadam_tensor_columns"]
