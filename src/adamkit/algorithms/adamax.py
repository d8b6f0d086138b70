r"""AdaMax (Kingma & Ba, 2015, Algorithm 2): the second moment an infinity norm.

.. math::

    u \leftarrow \max(\beta_2 u, |g| + \epsilon), \qquad
    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{u}
"""

from __future__ import annotations

from .base import AlgorithmSpec, Denominator, SecondMoment, StepScalars, as_number, register


def adamax_step_scalars(rule, step) -> StepScalars:
    r"""The step size :math:`\eta / (1 - \beta_1^t)` (no second bias correction), in
    torch.optim.Adamax's arithmetic."""
    return StepScalars(rule.finish(rule.lr / (1 - rule.beta1**step)), 1.0)


def adamax_read_back(second, rule, scalars: StepScalars):
    r""":math:`\eta^{eff} = \alpha / u`; :math:`\epsilon` dominates where :math:`u < 2\epsilon`."""
    return as_number(scalars.step_size) / second, 2 * rule.eps > second


ADAMAX = register(
    AlgorithmSpec(
        name="adamax",
        class_name="AdaMax",
        step_scalars=adamax_step_scalars,
        second_moment=SecondMoment.INFINITY_NORM,
        denominator=Denominator.NORM,
        second_moment_key="exp_inf",
        read_back=adamax_read_back,
        tensor_beta1="tensor",
    )
)

__all__ = ["ADAMAX", "adamax_read_back", "adamax_step_scalars"]
