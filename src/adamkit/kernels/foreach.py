"""Multi-tensor ``torch._foreach_*`` ops: each algorithm's foreach path
(:attr:`AlgorithmSpec.foreach <adamkit.algorithms.AlgorithmSpec.foreach>`, written in its
module in :mod:`adamkit.algorithms` from the building blocks of
:mod:`adamkit.algorithms.foreach_ops`): the same element-wise sequence as its
single-tensor path, issued once per list instead of once per tensor, so on CPU the
results are bit-identical.
"""

from __future__ import annotations

from ..algorithms import REGISTRY
from ..algorithms.base import ListStepFn
from ..rule import UpdateRule
from .types import GroupTensors


def _tensor_by_tensor_when_cautious(run: ListStepFn, per_tensor: ListStepFn) -> ListStepFn:
    """``run``, or the single-tensor ``per_tensor`` for a cautious group (each tensor's
    mask is a reduction of its own)."""

    def step(tensors: GroupTensors, rule: UpdateRule, group_scalars, steps) -> None:
        (per_tensor if rule.cautious else run)(tensors, rule, group_scalars, steps)

    return step


#: the per-list function of each algorithm
ALGORITHMS = {
    name: _tensor_by_tensor_when_cautious(spec.foreach, spec.single_tensor) for name, spec in REGISTRY.items()
}
