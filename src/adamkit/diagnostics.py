r"""What Adam is doing to a model: ``optimizer.stats()``, one dict per param group.

The figures describe the last step each param took, computed on demand from the
optimizer's state (nothing is kept per step except, with ``diagnostics=True``, one
gradient norm per param).  For a param with step count :math:`t`, learning rate
:math:`\eta` at that step, moments :math:`m, v` (:math:`v^{max}` with AMSGrad; the
infinity norm :math:`u` for AdaMax):

.. math::

    \hat v = v / (1 - \beta_2^t), \qquad
    \eta^{eff}_i = \frac{\eta}{(1 - \beta_1^t)(\sqrt{\hat v_i} + \epsilon)}
    \ \ \Big(\text{AdaMax: } \frac{\eta}{(1 - \beta_1^t)\, u_i}\Big), \qquad
    \Delta_i = \eta^{eff}_i\, m_i

RAdam: :math:`\eta^{eff}_i = \eta\, r_t \sqrt{1 - \beta_2^t} / ((1 - \beta_1^t)(\sqrt{v_i} + \epsilon))`
once rectified, :math:`\eta / (1 - \beta_1^t)` before (no denominator, so no element is
eps-dominated); ADOPT: :math:`\eta^{eff}_i = \eta` (its m is already normalized), and an
element is eps-dominated where :math:`\epsilon > \sqrt{v_i}` (the normalization's floor).
NAdam, StableAdamW, AdEMAMix and ScheduleFreeAdamW have no ``diagnostics``, nor have
cautious updates: their last update depended on that step's gradient (NAdam's g term,
StableAdamW's clipping, the cautious mask) or on more than the moments; ``stats()``
gives NaN for the figures read from the state there (``step``, ``grad_norm`` and
``skipped_steps`` stand).  The lr is the one the last step used (a scheduler moves it
after the step), with or without ``diagnostics``.  A step that ``skip_nonfinite`` or a
GradScaler skipped is not recorded: the figures stay those of the last step taken.
Between the micro-batches of an update (``accumulation_steps``), moments that fold
each micro-batch at once describe no update: the figures read from them are NaN.

``update_rms``
    :math:`\sqrt{\operatorname{mean}_i \Delta_i^2}` over the group's elements: the
    Adam update (weight decay not included).
``update_to_weight_rms``
    ``update_rms`` over the RMS of the params as they are now.
``effective_step_size``
    the geometric mean of :math:`\eta^{eff}_i` (a plain mean would be ruled by the
    few elements whose :math:`\hat v` is still about zero, where it is :math:`\eta/\epsilon`).
``eps_dominated_fraction``
    the fraction of elements whose denominator is mostly :math:`\epsilon`:
    :math:`\epsilon > \sqrt{\hat v_i}` (AdaMax: :math:`2\epsilon > u_i`).
``grad_norm``
    the L2 norm of the group's gradients at their last step (unscaled when a
    GradScaler hands its scale over); NaN unless the group has ``diagnostics=True``.
``skipped_steps``
    steps of this group skipped under ``skip_nonfinite``; a group of ``state_dict()``
    carries its count under this key, so it survives a save and load (a torch.optim
    state dict has none: the count starts at 0).
``step``
    the largest step count in the group; figures are 0 (NaN for ratios) before it.

With ``diagnostics=True`` each step costs one extra norm per gradient tensor (no
host sync); ``stats()`` itself reads every param and moment once and syncs.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter, deque
from dataclasses import replace

import torch
from torch import Tensor

from . import sharding
from .accumulation import mid_update
from .algorithms import REGISTRY, lookup
from .kernels.amp import inverse_scale
from .kernels.types import as_real
from .rule import UpdateRule, as_number
from .state import moment_keys, moment_value

#: the key under which each group of ``state_dict()`` carries its count of skipped steps
SKIPPED_STEPS_KEY = "skipped_steps"


def saved_skip_counts(groups: list[dict]) -> Counter[int]:
    """Take each loaded group's count of skipped steps (:data:`SKIPPED_STEPS_KEY`) out of
    it, by group index; a count that is not a whole number >= 0 is refused by name
    (``ValueError``)."""
    counts: Counter[int] = Counter()
    for index, group in enumerate(groups):
        if SKIPPED_STEPS_KEY not in group:
            continue
        value = group.pop(SKIPPED_STEPS_KEY)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
            raise ValueError(
                f"{SKIPPED_STEPS_KEY} = {value!r} in param_groups[{index}] of the state dict: it must be a whole "
                "number >= 0 (the steps this group skipped)"
            )
        counts[index] = int(value)
    return counts


class Recorder:
    """Per-step records of the groups with ``diagnostics=True``, and the skip counts."""

    def __init__(self) -> None:
        self.grad_norms: dict[Tensor, Tensor] = {}  # param -> its last gradient's L2 norm
        self.lrs: dict[Tensor, object] = {}  # param -> the learning rate of its last step
        #: group index -> the learning rates of its last steps, each with the GradScaler's inf
        #: flag of a step the kernel may have skipped (read only when asked for: no sync)
        self.group_lrs: dict[int, deque] = {}
        self.skips: Counter[int] = Counter()  # group index -> skipped steps

    def record_lr(self, index: int, group: dict, found_inf=None) -> None:
        """Record the lr of a step of ``param_groups[index]`` (every step, diagnostics or
        not: a scheduler moves the group's lr after the step); ``found_inf`` as in
        :meth:`record`: a step the kernel skips keeps the last step's lr, which
        :meth:`lr_of` finds.  No host read and no host-to-device copy: a tensor lr is copied
        where it is (a scheduler fills it in place)."""
        history = self.group_lrs.get(index)
        if history is None:
            history = self.group_lrs[index] = deque(maxlen=LR_HISTORY)
        if found_inf is None:  # a step taken: the history before it no longer matters
            history.clear()
        history.append((_held(group["lr"]), found_inf))

    def lr_of(self, param: Tensor, index: int, group: dict):
        """The learning rate of ``param``'s last step in ``param_groups[index]`` (past
        the steps a GradScaler skipped, :data:`LR_HISTORY` of them at most)."""
        if param in self.lrs:
            return self.lrs[param]
        history = self.group_lrs.get(index)
        if not history:
            return group["lr"]
        taken = (lr for lr, found_inf in reversed(history) if found_inf is None or not bool(found_inf.any()))
        return next(taken, history[0][0])

    def record(
        self, group: dict, params: list[Tensor], grads: list[Tensor], grad_scale: Tensor | None, found_inf=None
    ) -> None:
        """Record a step of ``params`` in ``group``.  ``found_inf``: a GradScaler's inf
        flag where the kernel skips the step itself; a step it skips keeps the last
        step's figures, chosen on the device (no host sync)."""
        norms = _norms([sharding.local(g).detach() for g in grads])  # a shard's norm, for DTensors
        if grad_scale is not None:
            norms = torch._foreach_mul(norms, inverse_scale(grad_scale))
        lr = _held(group["lr"])
        lrs = [lr] * len(params)
        if found_inf is not None:
            skipped = found_inf.reshape(()) != 0
            norms = [
                torch.where(skipped, self.grad_norms.get(p, torch.full_like(norm, math.nan)), norm)
                for p, norm in zip(params, norms)
            ]
            lrs = [
                lr if p not in self.lrs else torch.where(skipped, _on(self.lrs[p], skipped), _on(lr, skipped))
                for p in params
            ]
        self.grad_norms.update(zip(params, norms))
        self.lrs.update(zip(params, lrs))


def _norms(grads: list[Tensor]) -> list[Tensor]:
    """Each gradient's L2 norm, summed in fp32 at least (a 16-bit sum is off by about
    1e-3 of the norm)."""
    if not any(g.dtype in (torch.float16, torch.bfloat16) for g in grads):
        return list(torch._foreach_norm(grads))
    return [torch.linalg.vector_norm(g, dtype=torch.float32 if g.dtype.itemsize == 2 else None) for g in grads]


def _held(lr):
    """``lr`` as it is now (schedulers fill tensors in place)."""
    return lr.detach().clone() if isinstance(lr, Tensor) else lr


def _on(number, like: Tensor) -> Tensor:
    """``number`` (a float or a tensor) as a float64 tensor on ``like``'s device (a
    float filled there: no host-to-device copy, which would sync)."""
    if isinstance(number, Tensor):
        return number.to(dtype=torch.float64, device=like.device)
    return torch.full((), number, dtype=torch.float64, device=like.device)


#: how many of a group's last learning rates are kept for steps a GradScaler may have
#: skipped (a longer run of skipped steps reads the oldest)
LR_HISTORY = 16


#: the algorithms whose last update can be read back from the state (those whose
#: declaration has a ``read_back``: NAdam's and StableAdamW's step depended on that step's
#: gradient, which the state does not keep)
READ_BACK = frozenset(name for name, spec in REGISTRY.items() if spec.read_back is not None)


def effective_step_sizes(second: Tensor, rule: UpdateRule, t: float) -> tuple[Tensor, Tensor]:
    r"""Per element, the factor :math:`\eta^{eff}` by which step ``t`` of ``rule`` moved
    the weight along its new m (:math:`\theta \leftarrow \theta - \eta^{eff} m`, decay
    aside), and where :math:`\epsilon` dominated the denominator, read back from the
    second moment ``second`` (float64, the maximum under AMSGrad) stored by that step
    (see the module docstring), by the algorithm's
    :attr:`~adamkit.algorithms.AlgorithmSpec.read_back` (``None`` for NAdam and
    StableAdamW: their step depended on that step's gradient, which the state does not keep)."""
    read_back = rule.spec.read_back
    if read_back is None:
        raise ValueError(f"{rule.algorithm}'s step depended on that step's gradient: it cannot be read back")
    return read_back(second, rule, rule.step_scalars(t))


def _param_sums(param: Tensor, state: dict, lr: float, group: dict, algorithm: str) -> tuple[float, ...]:
    """(elements, sum of squared updates, sum of squared weights, sum of log step sizes,
    elements where eps dominates) for one param, in float64."""
    t = as_number(state["step"])
    rule = replace(UpdateRule.from_group(group, algorithm), lr=lr)  # the lr of that step
    second_key = moment_keys(algorithm, bool(group.get("amsgrad")))[-1]
    m = as_real(moment_value(state, "exp_avg", param)).double()
    second = as_real(moment_value(state, second_key, param)).double()
    effective, eps_dominated = effective_step_sizes(second, rule, t)
    update = effective * m
    weight = as_real(param.detach()).double()
    return (
        float(m.numel()),
        float(update.square().sum()),
        float(weight.square().sum()),
        float(effective.log().sum()),
        float(eps_dominated.sum()),
    )


def _local_state(state: dict, param: Tensor):
    return sharding.LocalState(state, param) if sharding.is_sharded(param) else state


def _over_shards(sums, param: Tensor) -> list[float]:
    """Per-shard sums of a sharded param added up over its ranks (a collective: every
    rank must call ``stats()``); a plain param's as they are."""
    if not sharding.is_sharded(param):
        return list(sums)
    return sharding.sum_over_shards(torch.tensor(sums, dtype=torch.float64), param).tolist()


def group_stats(optimizer, index: int, recorder: Recorder) -> dict[str, float]:
    """The figures of ``param_groups[index]`` (see the module docstring).  A group some
    of whose params have folded part of an update's micro-batches into their moments
    (``accumulation_steps``) reads NaN for the figures taken from the state, which then
    describes no update, until the update's last micro-batch."""
    group = optimizer.param_groups[index]
    stepped = [p for p in group["params"] if optimizer.state.get(p) and as_number(optimizer.state[p]["step"]) > 0]
    norms = [
        _over_shards([float(recorder.grad_norms[p].double().square())], p)[0]
        for p in group["params"]
        if p in recorder.grad_norms
    ]
    figures = {
        "step": max((as_number(optimizer.state[p]["step"]) for p in stepped), default=0.0),
        "grad_norm": math.sqrt(sum(norms)) if norms else math.nan,
    }
    read = ("update_rms", "update_to_weight_rms", "effective_step_size", "eps_dominated_fraction")
    unreadable = lookup(optimizer.algorithm).read_back is None or group.get("cautious")  # (the module docstring)
    if unreadable or any(mid_update(optimizer.state[p], optimizer.algorithm) for p in stepped):
        return {**figures, **dict.fromkeys(read, math.nan), "skipped_steps": float(recorder.skips[index])}
    totals = [0.0] * 5
    for p in stepped:
        lr = as_number(recorder.lr_of(p, index, group))
        sums = _param_sums(sharding.local(p), _local_state(optimizer.state[p], p), lr, group, optimizer.algorithm)
        totals = [a + b for a, b in zip(totals, _over_shards(sums, p))]
    count, update_sq, weight_sq, log_effective, eps_dominated = totals
    update_rms = math.sqrt(update_sq / count) if count else 0.0
    weight_rms = math.sqrt(weight_sq / count) if count else 0.0
    return {
        **figures,
        "update_rms": update_rms,
        "update_to_weight_rms": update_rms / weight_rms if weight_rms else math.nan,
        "effective_step_size": math.exp(log_effective / count) if count else 0.0,
        "eps_dominated_fraction": eps_dominated / count if count else 0.0,
        "skipped_steps": float(recorder.skips[index]),
    }


__all__ = ["SKIPPED_STEPS_KEY", "Recorder", "group_stats", "saved_skip_counts"]
