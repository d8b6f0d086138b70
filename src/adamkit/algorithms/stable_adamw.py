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

from dataclasses import replace

from .adam import adam_step_scalars
from .base import AlgorithmSpec, StepScalars, register


def stable_adamw_step_scalars(rule, step) -> StepScalars:
    r"""Adam's, and :math:`1 - \beta_2^t` for the update clipping's :math:`v / b_2`."""
    return replace(adam_step_scalars(rule, step), bias_correction2=rule.finish(1 - rule.beta2**step))


def stable_adamw_tensor_columns(columns: dict, lr, s: StepScalars, mu_products, where) -> None:
    """The step size and decay factor before clipping, and 1 - beta2^t for the clipping pass."""
    columns["bias_correction2"] = s.bias_correction2


STABLE_ADAMW = register(
    AlgorithmSpec(
        name="stable_adamw",
        class_name="StableAdamW",
        step_scalars=stable_adamw_step_scalars,
        clips_update=True,
        steps_with_mean_gradient=True,
        tensor_columns=stable_adamw_tensor_columns,
    )
)

__all__ = ["STABLE_ADAMW", "stable_adamw_step_scalars", "stable_adamw_tensor_columns"]
