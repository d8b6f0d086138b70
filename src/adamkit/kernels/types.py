"""What the front hands a kernel, and the adapter shared by the list-based kernels."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import torch
from torch import Tensor

from ..rule import GroupScalars, StepScalars, UpdateRule
from ..state import SECOND_MOMENT_KEY


@dataclass
class GroupBatch:
    """One param group's work for one step: the params that have a gradient, their
    gradients, and (through ``state_table``) their initialised, validated state.

    ``key`` identifies the params and their state: while it stays equal, so do the
    param and state tensors' identities and layouts (only param data and gradients
    change), and ``cache``, a dict the optimizer keeps for this group, is where a
    kernel may keep what it derived from them (addresses, layouts) between steps.
    """

    params: list[Tensor]
    grads: list[Tensor]
    state_table: Mapping[Tensor, dict]
    cache: dict = field(default_factory=dict)
    key: tuple = ()
    #: a GradScaler's scale and inf flag, for kernels that unscale and skip themselves
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
    #: each param's position in the optimizer: its stochastic-rounding stream
    #: (set for groups with ``rounding="stochastic"``)
    param_indices: list[int] | None = None

    @cached_property
    def states(self) -> list[dict]:
        return list(map(self.state_table.__getitem__, self.params))


@dataclass
class GroupTensors:
    """Parallel lists, one entry per param that has a gradient this step.

    ``exp_avg_sqs`` holds the second moment v (Adam) or the infinity norm u (AdaMax);
    ``max_exp_avg_sqs`` is empty unless AMSGrad is on.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)


class ListKernelFn(Protocol):
    def __call__(
        self, tensors: GroupTensors, rule: UpdateRule, group: GroupScalars, steps: Sequence[StepScalars]
    ) -> None: ...


StepFn = Callable[[GroupBatch, UpdateRule], None]


def list_kernel(adam: ListKernelFn, adamax: ListKernelFn, *, fused: bool = False) -> StepFn:
    """A kernel's ``step`` from per-list functions: advance each ``step`` counter (as
    torch does, one per tensor), get the scalars from the rule, run the element math
    (on widened copies where the storage policy asks, see :mod:`.storage`).

    ``fused``: also widen every bf16/fp16 param, so each value is rounded once per
    update as the fused kernels round it (for a fused kernel's fallback path)."""
    from . import storage  # storage builds on GroupTensors, defined above

    def step(batch: GroupBatch, rule: UpdateRule) -> None:
        second = SECOND_MOMENT_KEY[rule.algorithm]
        states = batch.states
        tensors = GroupTensors(
            params=batch.params,
            grads=batch.grads,
            exp_avgs=[s["exp_avg"] for s in states],
            exp_avg_sqs=[s[second] for s in states],
            max_exp_avg_sqs=[s["max_exp_avg_sq"] for s in states] if rule.amsgrad else [],
        )
        steps = [s["step"] for s in states]
        for step_t in steps:
            step_t += 1
        run = adam if rule.algorithm == "adam" else adamax
        work, store = storage.widened(tensors, states, steps, rule, batch.param_indices, widen_16_bit=fused)
        run(work, rule, rule.group_scalars(), rule.step_scalars_for(steps))
        store()

    return step


def as_real(t: Tensor) -> Tensor:
    """A complex tensor as a (..., 2) real view: the rule acts on real and imaginary parts."""
    return torch.view_as_real(t) if t.is_complex() else t


__all__ = ["GroupBatch", "GroupTensors", "StepFn", "as_real", "list_kernel"]
