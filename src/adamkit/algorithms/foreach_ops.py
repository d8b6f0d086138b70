"""The ``torch._foreach_*`` ops the algorithms' foreach paths share: each algorithm's
``<name>_foreach`` (in its module in this package) issues the same element-wise
sequence as its ``<name>_single_tensor``, once per list instead of once per tensor.

Each op is applied to every tensor before the next op starts, so the arithmetic per
element is exactly the single-tensor path's; on CPU the results are bit-identical.
Tensors are grouped by (device, dtype) (:func:`buckets`) so accelerators take their
fused list paths.  Tensor step scalars (the capturable path) are applied with
tensor-list ops, without reading them on the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .base import StepScalars
from .single_tensor_ops import as_real

if TYPE_CHECKING:
    from ..kernels.types import GroupTensors
    from ..rule import GroupScalars, UpdateRule


def _select(tensors: list[Tensor], members: list[int]) -> list[Tensor]:
    return [tensors[i] for i in members] if tensors else []


def buckets(tensors: GroupTensors, steps: Sequence[StepScalars]):
    """Split the group by (device, dtype); yield (GroupTensors, StepScalars) per bucket."""
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(tensors.params):
        index[(p.device, p.dtype)].append(i)
    for members in index.values():
        bucket = replace(
            tensors,
            params=_select(tensors.params, members),
            grads=_select(tensors.grads, members),
            exp_avgs=_select(tensors.exp_avgs, members),
            exp_avg_sqs=_select(tensors.exp_avg_sqs, members),
            max_exp_avg_sqs=_select(tensors.max_exp_avg_sqs, members),
            mu_products=_select(tensors.mu_products, members),
            totals=_select(tensors.totals, members) or None,
        )
        yield bucket, [steps[i] for i in members]


def decayed_gradients(t: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars) -> list[Tensor]:
    """Apply ``maximize`` and weight decay; the user's ``.grad`` tensors are never written."""
    grads = t.grads
    if rule.maximize:
        grads = torch._foreach_neg(grads)
    if group_scalars.decay_factor is not None:
        torch._foreach_mul_(t.params, group_scalars.decay_factor)
    elif group_scalars.l2_weight_decay != 0:
        if rule.maximize:
            torch._foreach_add_(grads, t.params, alpha=group_scalars.l2_weight_decay)
        else:
            grads = torch._foreach_add(grads, t.params, alpha=group_scalars.l2_weight_decay)
    return grads


def real_views(lst: list[Tensor]) -> list[Tensor]:
    """Each tensor as :func:`~adamkit.algorithms.single_tensor_ops.as_real` views it."""
    return [as_real(x) for x in lst]


def number(value):
    """foreach ops take Python numbers for these weights (a rare tensor beta is read)."""
    return value.item() if isinstance(value, Tensor) else value


def apply_updates(params: list[Tensor], exp_avgs: list[Tensor], denoms: list[Tensor], steps) -> None:
    """theta <- theta - step_size * m / denom, per tensor."""
    step_sizes = [s.step_size for s in steps]
    if isinstance(step_sizes[0], Tensor):
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-s for s in step_sizes])


def first_moment_updates(t: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars) -> tuple[list, list, list]:
    r"""The decayed gradients (decayed before the real views are taken, as torch's Adam and
    Adamax decay them) and the first moments moved towards them:
    :math:`m \leftarrow \operatorname{lerp}(m, g, 1 - \beta_1)`; (params, grads, exp_avgs) as real views."""
    grads = real_views(decayed_gradients(t, rule, group_scalars))
    params, exp_avgs = real_views(t.params), real_views(t.exp_avgs)
    torch._foreach_lerp_(exp_avgs, grads, number(group_scalars.one_minus_beta1(params[0])))
    return params, grads, exp_avgs


def moment_updates(t: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars) -> tuple[list, list, list, list]:
    """The decayed gradients and Adam's moment updates, on real views from the start
    (as torch's NAdam and RAdam decay them); (params, grads, exp_avgs, exp_avg_sqs)."""
    real = replace(t, **{key: real_views(getattr(t, key)) for key in ("params", "grads", "exp_avgs", "exp_avg_sqs")})
    grads = decayed_gradients(real, rule, group_scalars)
    params, exp_avgs, exp_avg_sqs = real.params, real.exp_avgs, real.exp_avg_sqs
    torch._foreach_lerp_(exp_avgs, grads, number(group_scalars.one_minus_beta1(params[0])))
    torch._foreach_mul_(exp_avg_sqs, number(group_scalars.beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, number(group_scalars.one_minus_beta2))
    return params, grads, exp_avgs, exp_avg_sqs
