r"""Adam (Kingma & Ba, 2015, Algorithm 1) and AdamW: the family's base.

.. math::

    \theta \leftarrow \theta - \frac{\eta}{1 - \beta_1^t} \frac{m}{\sqrt{v / (1 - \beta_2^t)} + \epsilon}
"""

from __future__ import annotations

from .base import AlgorithmSpec, StepScalars, as_number, register


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


ADAM = register(
    AlgorithmSpec(
        name="adam",
        class_name="Adam",
        step_scalars=adam_step_scalars,
        amsgrad=True,
        read_back=adam_read_back,
        tensor_beta1="cast",
        tensor_hyperparameter_checks=True,
    )
)

__all__ = ["ADAM", "adam_read_back", "adam_step_scalars"]
