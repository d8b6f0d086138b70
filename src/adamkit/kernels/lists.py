"""The adapter shared by the list-based kernels (reference and foreach): from
per-list element functions to a kernel's ``step``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from ..algorithms import REGISTRY
from ..rule import GroupScalars, StepScalars, UpdateRule
from . import storage
from .types import GroupBatch, GroupTensors, StepFn


class ListKernelFn(Protocol):
    def __call__(
        self, tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
    ) -> None: ...


def named_after_algorithms(namespace: Mapping[str, object]) -> dict[str, ListKernelFn]:
    """A list kernel's per-list function of every registered algorithm: the function
    ``namespace`` (a module's globals) holds under the algorithm's name."""
    missing = [name for name in REGISTRY if not callable(namespace.get(name))]
    if missing:
        raise ImportError(f"{namespace['__name__']} has no per-list function for {missing}")
    return {name: namespace[name] for name in REGISTRY}


def list_kernel(algorithms: Mapping[str, ListKernelFn]) -> StepFn:
    """A kernel's ``step`` from per-list functions, one per algorithm: advance each ``step`` counter (as
    torch does, one per tensor), get the scalars from the rule, run the element math
    (on widened copies where the storage policy asks, see :mod:`.storage`: 16-bit
    values are rounded once per update, as the fused kernels round them)."""

    def step(batch: GroupBatch, rule: UpdateRule) -> None:
        states = batch.states
        steps = [s["step"] for s in states]
        for step_t in steps:
            step_t += 1
        run = algorithms[rule.algorithm]
        work, store = storage.widened(
            batch.params, batch.grads, states, steps, rule, batch.param_indices, batch.element_offsets
        )
        work.shards = batch.shards
        run(work, rule, rule.group_scalars(), rule.step_scalars_for(steps))
        store()

    return step


__all__ = ["ListKernelFn", "list_kernel", "named_after_algorithms"]
