r"""What every path does with a ``torch.amp.GradScaler``'s ``grad_scale``.

A scaler multiplies the loss by :math:`s`; gradients are unscaled by multiplying
with :math:`s^{-1}` rounded to fp32 (the reciprocal formed in float64, as the scaler
itself forms it), so an optimizer that unscales in its kernel gives the bits of
``scaler.unscale_`` followed by a plain step.  Scales are powers of two in practice,
which makes unscaling exact.
"""

from __future__ import annotations

import torch
from torch import Tensor


def inverse_scale(grad_scale: Tensor) -> Tensor:
    r""":math:`\mathrm{fp32}(1 / s)`, as a 0-d fp32 tensor on the scale's device."""
    return grad_scale.double().reciprocal().float()


def unscaled(grads: list[Tensor], grad_scale: Tensor) -> list[Tensor]:
    """New, unscaled gradients (the user's ``.grad`` is left as it is)."""
    return torch._foreach_mul(grads, inverse_scale(grad_scale))


__all__ = ["inverse_scale", "unscaled"]
