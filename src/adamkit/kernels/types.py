"""What the front hands a kernel."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor

from ..algorithms.single_tensor_ops import as_real
from ..guard import CheckedTensors
from ..rule import UpdateRule


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
    #: each param's position in the optimizer: its stochastic-rounding stream (set
    #: for groups that round stochastically: they have a ``seed``)
    param_indices: list[int] | None = None
    #: per param, the row-major index in the whole param of its first element: a
    #: shard's offset, so that its random bits are those of the unsharded param
    #: (``None``: every param is whole)
    element_offsets: list[int] | None = None
    #: the params as the optimizer holds them (DTensors) where the kernel steps their
    #: local shards, for per-tensor reductions (:func:`adamkit.sharding.per_tensor_totals`);
    #: ``None`` when nothing is sharded
    shards: list | None = None
    #: what :class:`adamkit.guard.StepGuard` checked this step: the params' and
    #: gradients' addresses, and the rows whose gradient is not laid out like its param
    checked: CheckedTensors | None = None

    @cached_property
    def states(self) -> list[dict]:
        return list(map(self.state_table.__getitem__, self.params))


@dataclass
class GroupTensors:
    """Parallel lists, one entry per param that has a gradient this step.

    ``exp_avg_sqs`` holds the second moment v (Adam, NAdam, RAdam) or the infinity
    norm u (AdaMax); ``max_exp_avg_sqs``, the third moment in kernel order, is AMSGrad's
    maximum or AdEMAMix's slow first moment (:attr:`exp_avg_slows`), else empty; and
    ``mu_products`` (0-d state tensors) is empty unless the algorithm is NAdam.
    """

    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor] = field(default_factory=list)
    mu_products: list[Tensor] = field(default_factory=list)
    #: per tensor, the function that sums a 1-D float64 tensor of per-shard values over
    #: the whole param the tensor is a local shard of (the identity where it is whole:
    #: :func:`adamkit.sharding.whole_param_totals`), for per-tensor reductions (a
    #: cautious update's count, StableAdamW's clipping); ``None``: nothing is sharded
    totals: list[Callable[[Tensor], Tensor]] | None = None

    @property
    def exp_avg_slows(self) -> list[Tensor]:
        """A slow first moment (AdEMAMix), held where AMSGrad's maximum would be."""
        return self.max_exp_avg_sqs


StepFn = Callable[[GroupBatch, UpdateRule], None]


__all__ = ["GroupBatch", "GroupTensors", "StepFn", "as_real"]
