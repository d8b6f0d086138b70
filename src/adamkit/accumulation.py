r"""Optimizer accumulation (Zhang et al., 2023, "Adam Accumulation"): each micro-batch's
gradient is folded into the moments as soon as it exists, and the weights move once
every :math:`N` = ``accumulation_steps`` micro-batches, so no gradient has to be kept
between micro-batches (with :func:`adamkit.gradient_release`, none is kept at all).

For the micro-batch gradients :math:`g_1, \dots, g_N` of one update (each the gradient
of its own micro-batch's mean loss; maximize and L2 decay applied as usual):

.. math::

    m_t &= \beta_1 m_{t-1} + (1 - \beta_1) \tfrac{1}{N} \textstyle\sum_k g_k \\
    v_t &= \beta_2 v_{t-1} + (1 - \beta_2) \tfrac{1}{N} \textstyle\sum_k g_k^2
        \qquad \text{(AdaMax: } u_t = \max(\beta_2 u_{t-1}, \max_k |g_k| + \epsilon)) \\
    \theta_t &= \theta_{t-1} - \eta\, \hat m_t / (\sqrt{\hat v_t} + \epsilon)
        \quad \text{(decoupled decay, AMSGrad and bias corrections as in a normal step;
        RAdam: its rectified update)}

Against gradient accumulation (``N`` backward passes into ``.grad``, one step with
:math:`G = \frac1N \sum_k g_k`): :math:`m_t` is the same; :math:`v_t` holds the mean of
the squares instead of the square of the mean, larger by the variance of the
micro-batch gradients, :math:`\frac1N \sum_k g_k^2 = G^2 + \frac1N \sum_k (g_k - G)^2`,
so steps are a little more cautious where micro-batches disagree (AdaMax likewise
takes :math:`\max_k |g_k| \ge |G|`).  With equal micro-batch gradients the two agree.
Dividing the loss by :math:`N`, as gradient accumulation does, only rescales the
gradients, which Adam's update ignores (up to :math:`\epsilon` and L2 decay).

Each ``optimizer.step()`` (or, under gradient release, each param's hook) is one
micro-batch; a param counts its own micro-batches in ``state["accumulated"]`` and
its ``step`` counts updates.  Before its last micro-batch a param's weights are not
written.  The fold runs on torch ops (every device, dtype and ``state_precision``:
moments stored in bf16 or int8/int4 are rounded after every micro-batch); the fused
kernels are not used for these groups.

Adam, AdaMax and RAdam fold.  NAdam, ADOPT, StableAdamW and cautious updates need the
update's gradient beside the moments (NAdam's update has a g term, ADOPT normalizes g by
the *previous* v, StableAdamW's clipping reads g^2 against the new v, a cautious update
compares its sign with g), which a fold does not keep.  They accumulate the gradients
instead, in the state (``state["accumulated_grad"]``, fp32, or fp64 for fp64 params,
while an update's micro-batches are under way) and take their own step with the mean

.. math::

    G = \textstyle\sum_k \tfrac{1}{N} g_k \quad\text{(added in that order)},

which is gradient accumulation (a gradient-sized buffer between micro-batches), also
under :func:`adamkit.gradient_release`, where ``.grad`` cannot accumulate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import statekeeping
from .algorithms import REGISTRY, Denominator, SecondMoment
from .algorithms.radam import radam_update
from .algorithms.single_tensor_ops import adam_denominator, apply_update, decay_param, effective_gradient
from .kernels import KERNELS, Kernel
from .kernels.storage import widened
from .kernels.types import GroupBatch, as_real
from .rule import GroupScalars, UpdateRule
from .state import ACCUMULATED_GRAD_KEY

#: the state key counting the micro-batches folded since the last update
COUNT_KEY = "accumulated"

#: the state key of the gradient sum of the algorithms that step with the mean gradient
GRADIENT_KEY = ACCUMULATED_GRAD_KEY

statekeeping.untracked(COUNT_KEY, GRADIENT_KEY)  # written at every micro-batch; no kernel caches them

#: the algorithms whose update reads its gradient (besides any cautious update), from the registry
STEP_WITH_MEAN = frozenset(name for name, spec in REGISTRY.items() if spec.steps_with_mean_gradient)


def mid_update(state: dict, algorithm: str) -> bool:
    """Whether ``state``'s moments hold some of an update's micro-batches and not yet all
    (folded since the last update: they describe neither that update nor the next)."""
    return not REGISTRY[algorithm].steps_with_mean_gradient and bool(state.get(COUNT_KEY, 0))


def _add_scaled(target: Tensor, value: Tensor, weight) -> None:
    """target += weight * value (weight a number, or a tensor on the capturable path)."""
    if isinstance(weight, Tensor):
        target.add_(value * weight.to(target.device))
    else:
        target.add_(value, alpha=weight)


def _fold(
    moments: list[Tensor], grad: Tensor, group_scalars: GroupScalars, first: bool, weight: float, adamax: bool
) -> None:
    """Fold one micro-batch gradient into (m, v or u[, v_max]); the first of an update
    also decays the moments by beta."""
    exp_avg, second = moments[0], moments[1]
    if first:
        exp_avg.mul_(group_scalars.beta1)
    _add_scaled(exp_avg, grad, (1 - group_scalars.beta1) * weight)
    if adamax:
        norm = grad.abs().add_(group_scalars.eps)
        torch.maximum(second.mul_(group_scalars.beta2) if first else second, norm, out=second)
        return
    if first:
        second.mul_(group_scalars.beta2)
    _add_scaled(second, grad * grad, group_scalars.one_minus_beta2 * weight)


def _update(
    param: Tensor, moments: list[Tensor], rule: UpdateRule, group_scalars: GroupScalars, step_t: Tensor
) -> None:
    """The weight update from the accumulated moments (decoupled decay first)."""
    step_t += 1
    scalars = rule.step_scalars(step_t.to(torch.float64) if rule.capturable else step_t.item())
    decay_param(param, group_scalars)
    if rule.spec.denominator == Denominator.RECTIFIED_ROOT:
        as_real(param).sub_(radam_update(moments[0], moments[1], scalars, rule, group_scalars.eps))
        return
    if rule.spec.denominator == Denominator.NORM:
        apply_update(as_real(param), moments[0], moments[1], scalars.step_size)
        return
    second = moments[1]
    if rule.amsgrad:
        torch.maximum(moments[2], second, out=moments[2])
        second = moments[2]
    apply_update(
        as_real(param),
        moments[0],
        adam_denominator(second, scalars, group_scalars.eps),
        scalars.step_size,
    )


def steps_with_mean(rule: UpdateRule) -> bool:
    """Whether ``rule``'s update needs its gradient: it accumulates gradients, not moments."""
    return rule.spec.steps_with_mean_gradient or rule.cautious


def _step_with_mean(batch: GroupBatch, rule: UpdateRule) -> None:
    """One micro-batch: each gradient added, times 1/N, to its param's sum; the params at
    their last micro-batch take the algorithm's own step with that mean (the
    single-tensor path, as the fold's updates use torch ops)."""
    n = rule.accumulation_steps
    finished = []
    for i, (grad, state) in enumerate(zip(batch.grads, batch.states)):
        count = state.get(COUNT_KEY, 0)
        real = as_real(grad)
        wide = torch.float64 if real.dtype == torch.float64 else torch.float32
        if count == 0 or GRADIENT_KEY not in state:
            state[GRADIENT_KEY] = torch.zeros_like(real, dtype=wide)
        state[GRADIENT_KEY].add_(real.to(wide), alpha=1.0 / n)
        state[COUNT_KEY] = count + 1
        if count + 1 >= n:
            finished.append(i)
    if not finished:
        return
    means = []
    for i in finished:
        mean = batch.states[i].pop(GRADIENT_KEY).to(as_real(batch.grads[i]).dtype)
        means.append(torch.view_as_complex(mean) if batch.grads[i].is_complex() else mean)
        batch.states[i][COUNT_KEY] = 0

    def pick(values):
        return None if values is None else [values[i] for i in finished]

    update = GroupBatch(
        params=pick(batch.params),
        grads=means,
        state_table=batch.state_table,
        key=(batch.key, "mean of the micro-batches", tuple(finished)),
    )
    update.param_indices, update.element_offsets, update.shards = (
        pick(batch.param_indices),
        pick(batch.element_offsets),
        pick(batch.shards),
    )
    KERNELS["single_tensor"].step(update, rule)


def step(batch: GroupBatch, rule: UpdateRule) -> None:
    """One micro-batch for every param of the group_scalars."""
    if steps_with_mean(rule):
        _step_with_mean(batch, rule)
        return
    states = batch.states
    steps = [s["step"] for s in states]
    counts = [s.get(COUNT_KEY, 0) for s in states]
    n = rule.accumulation_steps
    # stochastic rounding draws fresh bits per micro-batch: key on (updates, micro-batch)
    micro_steps = [t * n + c for t, c in zip(steps, counts)]
    work, store = widened(
        batch.params, batch.grads, states, micro_steps, rule, batch.param_indices, batch.element_offsets
    )
    group_scalars = rule.group_scalars()
    adamax = rule.spec.second_moment == SecondMoment.INFINITY_NORM
    last = [c + 1 >= n for c in counts]
    for i, param in enumerate(work.params):
        moments = [as_real(m[i]) for m in (work.exp_avgs, work.exp_avg_sqs, work.max_exp_avg_sqs) if m]
        grad = as_real(effective_gradient(param, work.grads[i], rule, group_scalars))
        _fold(moments, grad, group_scalars, first=counts[i] == 0, weight=1.0 / n, adamax=adamax)
        if last[i]:
            _update(param, moments, rule, group_scalars, steps[i])
        states[i][COUNT_KEY] = 0 if last[i] else counts[i] + 1
    store(last)


#: how the front runs a group with ``accumulation_steps > 1``
KERNEL = Kernel("accumulation", step)

__all__ = ["COUNT_KEY", "GRADIENT_KEY", "KERNEL", "STEP_WITH_MEAN", "mid_update", "step", "steps_with_mean"]
