"""Multi-tensor ``torch._foreach_*`` ops: the same element-wise sequence as
:mod:`adamkit.kernels.single_tensor`, issued once per list instead of once per tensor.

Each op is applied to every tensor before the next op starts, so the arithmetic per
element is exactly the single-tensor kernel's; on CPU the results are bit-identical.
Tensors are grouped by (device, dtype) so accelerators take their fused list paths.
Tensor step scalars (the capturable path) are applied with tensor-list ops, without
reading them on the host.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
from torch import Tensor

from ..rule import GroupScalars, StepScalars, UpdateRule
from . import single_tensor
from .lists import named_after_algorithms
from .types import GroupTensors, as_real


def _select(tensors: list[Tensor], members: list[int]) -> list[Tensor]:
    return [tensors[i] for i in members] if tensors else []


def _buckets(tensors: GroupTensors, steps: Sequence[StepScalars]):
    """Split the group by (device, dtype); yield (GroupTensors, StepScalars) per bucket."""
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, p in enumerate(tensors.params):
        index[(p.device, p.dtype)].append(i)
    for members in index.values():
        bucket = GroupTensors(
            params=_select(tensors.params, members),
            grads=_select(tensors.grads, members),
            exp_avgs=_select(tensors.exp_avgs, members),
            exp_avg_sqs=_select(tensors.exp_avg_sqs, members),
            max_exp_avg_sqs=_select(tensors.max_exp_avg_sqs, members),
            mu_products=_select(tensors.mu_products, members),
            shards=_select(tensors.shards, members) or None,
        )
        yield bucket, [steps[i] for i in members]


def _decayed_gradients(t: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars) -> list[Tensor]:
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


def _real(lst: list[Tensor]) -> list[Tensor]:
    return [as_real(x) for x in lst]


def _number(value):
    """foreach ops take Python numbers for these weights (a rare tensor beta is read)."""
    return value.item() if isinstance(value, Tensor) else value


def _apply_updates(params: list[Tensor], exp_avgs: list[Tensor], denoms: list[Tensor], steps) -> None:
    """theta <- theta - step_size * m / denom, per tensor."""
    step_sizes = [s.step_size for s in steps]
    if isinstance(step_sizes[0], Tensor):
        updates = torch._foreach_div(exp_avgs, denoms)
        torch._foreach_mul_(updates, step_sizes)
        torch._foreach_sub_(params, updates)
    else:
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-s for s in step_sizes])


def adam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    for t, bucket_steps in _buckets(tensors, steps):
        grads = _real(_decayed_gradients(t, rule, group_scalars))
        params, exp_avgs, exp_avg_sqs = _real(t.params), _real(t.exp_avgs), _real(t.exp_avg_sqs)

        torch._foreach_lerp_(exp_avgs, grads, _number(group_scalars.one_minus_beta1(params[0])))
        torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _number(group_scalars.one_minus_beta2))
        second_moments = exp_avg_sqs
        if rule.amsgrad:
            second_moments = _real(t.max_exp_avg_sqs)
            torch._foreach_maximum_(second_moments, exp_avg_sqs)

        denoms = torch._foreach_sqrt(second_moments)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        _apply_updates(params, exp_avgs, denoms, bucket_steps)


def adamax(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    for t, bucket_steps in _buckets(tensors, steps):
        grads = _real(_decayed_gradients(t, rule, group_scalars))
        params, exp_avgs, exp_infs = _real(t.params), _real(t.exp_avgs), _real(t.exp_avg_sqs)

        torch._foreach_lerp_(exp_avgs, grads, _number(group_scalars.one_minus_beta1(params[0])))
        norms = torch._foreach_abs(grads)
        torch._foreach_add_(norms, group_scalars.eps)
        torch._foreach_mul_(exp_infs, _number(group_scalars.beta2))
        torch._foreach_maximum_(exp_infs, norms)
        _apply_updates(params, exp_avgs, exp_infs, bucket_steps)


def _moment_updates(t: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars) -> tuple[list, list, list, list]:
    """The decayed gradients and Adam's moment updates, on real views from the start
    (as torch's NAdam and RAdam decay them); (params, grads, exp_avgs, exp_avg_sqs)."""
    real = GroupTensors(_real(t.params), _real(t.grads), _real(t.exp_avgs), _real(t.exp_avg_sqs))
    grads = _decayed_gradients(real, rule, group_scalars)
    params, exp_avgs, exp_avg_sqs = real.params, real.exp_avgs, real.exp_avg_sqs
    torch._foreach_lerp_(exp_avgs, grads, _number(group_scalars.one_minus_beta1(params[0])))
    torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _number(group_scalars.one_minus_beta2))
    return params, grads, exp_avgs, exp_avg_sqs


def nadam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    """:func:`adamkit.kernels.single_tensor.nadam`'s arithmetic, op by op, over lists
    (a capturable group, which must not read ``mu_product`` on the host, tensor by tensor)."""
    if rule.capturable:
        return single_tensor.nadam(tensors, rule, group_scalars, steps)
    lr = rule.lr
    for t, bucket_steps in _buckets(tensors, steps):
        for mu_product, step in zip(t.mu_products, bucket_steps):
            mu_product.mul_(step.mu)
        params, grads, exp_avgs, exp_avg_sqs = _moment_updates(t, rule, group_scalars)
        denoms = torch._foreach_div(exp_avg_sqs, [s.bias_correction2 for s in bucket_steps])
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group_scalars.eps)
        products = [mu_product.item() for mu_product in t.mu_products]
        gradient_weights = [_number(-lr * (1.0 - s.mu) / (1.0 - p)) for s, p in zip(bucket_steps, products)]
        momentum_weights = [_number((-lr * s.mu_next) / (1.0 - p * s.mu_next)) for s, p in zip(bucket_steps, products)]
        torch._foreach_addcdiv_(params, grads, denoms, gradient_weights)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, momentum_weights)


def radam(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    """:func:`adamkit.kernels.single_tensor.radam`'s arithmetic, op by op, over lists
    (a capturable group, whose rectification is chosen on the device, tensor by tensor)."""
    if rule.capturable:
        return single_tensor.radam(tensors, rule, group_scalars, steps)
    for t, bucket_steps in _buckets(tensors, steps):
        params, _, exp_avgs, exp_avg_sqs = _moment_updates(t, rule, group_scalars)
        updates = torch._foreach_div(exp_avgs, [s.bias_correction1 for s in bucket_steps])
        torch._foreach_mul_(updates, rule.lr)
        rectified = [i for i, s in enumerate(bucket_steps) if s.rectification is not None]
        if rectified:
            roots = torch._foreach_sqrt([exp_avg_sqs[i] for i in rectified])
            torch._foreach_add_(roots, group_scalars.eps)
            adaptive = [bucket_steps[i].bias_correction2_sqrt / root for i, root in zip(rectified, roots)]
            chosen = [updates[i] for i in rectified]
            torch._foreach_mul_(chosen, adaptive)
            torch._foreach_mul_(chosen, [_number(bucket_steps[i].rectification) for i in rectified])
        torch._foreach_add_(params, updates, alpha=-1.0)


def adopt(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]) -> None:
    """:func:`adamkit.kernels.single_tensor.adopt`'s arithmetic, op by op, over lists
    (a capturable group, whose first step is told apart on the device, tensor by tensor)."""
    if rule.capturable:
        return single_tensor.adopt(tensors, rule, group_scalars, steps)
    for t, bucket_steps in _buckets(tensors, steps):
        params, exp_avgs, exp_avg_sqs = _real(t.params), _real(t.exp_avgs), _real(t.exp_avg_sqs)
        grads = _real(t.grads)
        if rule.maximize:
            grads = torch._foreach_neg(grads)
        if group_scalars.decay_factor is not None:
            factor = _number(group_scalars.decay_factor)
            torch._foreach_mul_(params, [1.0 if s.first else factor for s in bucket_steps])
        elif group_scalars.l2_weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=group_scalars.l2_weight_decay)

        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_clamp_min_(denoms, group_scalars.eps)
        normalized = torch._foreach_div(grads, denoms)
        clips = [s.clip for s in bucket_steps]
        torch._foreach_clamp_min_(normalized, [-c for c in clips])
        torch._foreach_clamp_max_(normalized, clips)
        torch._foreach_lerp_(exp_avgs, normalized, _number(group_scalars.one_minus_beta1(params[0])))
        torch._foreach_sub_(params, torch._foreach_mul(exp_avgs, [s.step_size for s in bucket_steps]))
        torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, [s.second_weight for s in bucket_steps])


def stable_adamw(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """:func:`adamkit.kernels.single_tensor.stable_adamw`'s arithmetic over lists: the
    moments and updates as list ops, each tensor's clipping from its own reduction
    (a capturable group tensor by tensor)."""
    if rule.capturable:
        return single_tensor.stable_adamw(tensors, rule, group_scalars, steps)
    decay_rate = rule.decay_rate()
    for t, bucket_steps in _buckets(tensors, steps):
        real = GroupTensors(_real(t.params), _real(t.grads), _real(t.exp_avgs), _real(t.exp_avg_sqs))
        params, exp_avgs, exp_avg_sqs = real.params, real.exp_avgs, real.exp_avg_sqs
        grads = real.grads
        if rule.maximize:
            grads = torch._foreach_neg(grads)
        if group_scalars.l2_weight_decay != 0:
            grads = torch._foreach_add(grads, params, alpha=group_scalars.l2_weight_decay)
        torch._foreach_lerp_(exp_avgs, grads, _number(group_scalars.one_minus_beta1(params[0])))
        torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _number(group_scalars.one_minus_beta2))
        shards = t.shards or [None] * len(grads)
        scales = [
            single_tensor.update_clipping(g, v, s, group_scalars.eps, shard)
            for g, v, s, shard in zip(grads, exp_avg_sqs, bucket_steps, shards)
        ]
        if decay_rate is not None:
            torch._foreach_mul_(params, [1 - s * decay_rate for s in scales])
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        torch._foreach_addcdiv_(params, exp_avgs, denoms, [-s.step_size * c for s, c in zip(bucket_steps, scales)])


def ademamix(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """AdEMAMix (see :func:`adamkit.kernels.single_tensor.ademamix`) with foreach ops."""
    for t, bucket_steps in _buckets(tensors, steps):
        grads = _real(_decayed_gradients(t, rule, group_scalars))
        params, exp_avgs, exp_avg_sqs = _real(t.params), _real(t.exp_avgs), _real(t.exp_avg_sqs)
        exp_avg_slows = _real(t.exp_avg_slows)
        torch._foreach_lerp_(exp_avgs, grads, _number(group_scalars.one_minus_beta1(params[0])))
        for slow, grad, step in zip(exp_avg_slows, grads, bucket_steps):  # (beta3_t may differ per tensor)
            slow.lerp_(grad, _number(1 - step.slow_decay))
        torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, _number(group_scalars.one_minus_beta2))
        directions = torch._foreach_div(exp_avgs, [s.bias_correction1 for s in bucket_steps])
        torch._foreach_add_(directions, torch._foreach_mul(exp_avg_slows, [s.slow_weight for s in bucket_steps]))
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denoms, [s.bias_correction2_sqrt for s in bucket_steps])
        torch._foreach_add_(denoms, group_scalars.eps)
        _apply_updates(params, directions, denoms, bucket_steps)


def schedule_free_adamw(
    tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps: Sequence[StepScalars]
) -> None:
    """Schedule-free AdamW (see :func:`adamkit.kernels.single_tensor.schedule_free_adamw`)
    with foreach ops, as the ``schedulefree`` package's foreach path issues them (every
    scalar is the group's: one per bucket)."""
    for t, bucket_steps in _buckets(tensors, steps):
        step = bucket_steps[0]
        ys, zs, exp_avg_sqs = _real(t.params), _real(t.exp_avgs), _real(t.exp_avg_sqs)
        grads = _real(torch._foreach_neg(t.grads) if rule.maximize else t.grads)
        torch._foreach_mul_(exp_avg_sqs, _number(group_scalars.beta2))
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=_number(group_scalars.one_minus_beta2))
        denoms = torch._foreach_div(exp_avg_sqs, step.bias_correction2)
        torch._foreach_sqrt_(denoms)
        torch._foreach_add_(denoms, group_scalars.eps)
        directions = torch._foreach_div(grads, denoms)
        if step.point_decay != 0:
            torch._foreach_add_(directions, ys, alpha=step.point_decay)
        torch._foreach_lerp_(ys, zs, weight=step.average_weight)
        torch._foreach_add_(ys, directions, alpha=step.point_step_size)
        torch._foreach_sub_(zs, directions, alpha=step.step_size)


def _tensor_by_tensor_when_cautious(run, per_tensor):
    """``run``, or the single-tensor ``per_tensor`` for a cautious group (each tensor's
    mask is a reduction of its own)."""

    def step(tensors: GroupTensors, rule: UpdateRule, group_scalars: GroupScalars, steps) -> None:
        (per_tensor if rule.cautious else run)(tensors, rule, group_scalars, steps)

    return step


#: the per-list function of each algorithm: the function above named after it
ALGORITHMS = {
    name: _tensor_by_tensor_when_cautious(run, single_tensor.ALGORITHMS[name])
    for name, run in named_after_algorithms(globals()).items()
}
