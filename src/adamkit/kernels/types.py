"""What the front hands a kernel: the group's tensors as parallel lists, and the rule."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..rule import GroupScalars, StepScalars, UpdateRule


@dataclass
class GroupTensors:
    """Parallel lists, one entry per param that has a gradient this step.

    ``exp_avg_sqs`` holds the second moment v (Adam) or the infinity norm u (AdaMax);
    ``max_exp_avg_sqs`` is empty unless AMSGrad is on.  Step counts are already
    incremented and folded into the :class:`StepScalars`.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)


class KernelFn(Protocol):
    def __call__(
        self,
        tensors: GroupTensors,
        rule: UpdateRule,
        group: GroupScalars,
        steps: Sequence[StepScalars],
    ) -> None: ...


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as a (..., 2) real view: the rule acts on real and imaginary parts."""
    return torch.view_as_real(t) if t.is_complex() else t


__all__ = ["GroupTensors", "KernelFn", "as_real"]
