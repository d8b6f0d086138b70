r"""The stall guard: a warning when steps are too small for a param's storage to keep.

A weight stored in 16 bits and rounded to nearest keeps a change only if the change
reaches half the spacing of its dtype at that value: smaller changes are rounded away,
step after step, and the weight silently stops training.  This happens late in
training and in fine-tuning, when the learning rate is small: AdamW's decoupled decay
at lr 1e-5 and weight decay 0.1 shrinks a weight by 1e-6 of itself per step, far below
bf16's half spacing (2^-9 of the weight), so bf16 weights never decay.

After a step, the change of every element can be read back from the optimizer's state
(Adam's update at step :math:`t` uses the moments stored by that step):

.. math::

    \Delta_i = (1 - d)\,\theta_i + \eta^{eff}_i\, m_i, \qquad
    \eta^{eff}_i = \frac{\alpha_t}{\sqrt{v_i} / \sqrt{1 - \beta_2^t} + \epsilon}
    \quad (\text{AdaMax: } \alpha_t / v_i)

with :math:`d` the decoupled decay factor (1 without), :math:`\alpha_t` the bias-corrected
step size at the lr that step used (a scheduler moves the group's after it), and :math:`\theta` the weight; RAdam's and ADOPT's
:math:`\eta^{eff}` are their own (:func:`adamkit.diagnostics.effective_step_sizes`).
NAdam and StableAdamW are not guarded: their steps depended on that step's gradient.  The change is
*lost* when rounding the new value gives back the old one:

* ``rounding="nearest"`` (and fp32/fp64 params, at their own precision): when
  :math:`|\Delta_i|` is below half the spacing of the param's dtype next to
  :math:`\theta_i`, on the side the change moves it to;
* ``rounding="kahan"``: the compensation :math:`c` takes the change, so it is lost when
  :math:`|\Delta_i|` is below half the spacing next to :math:`c_i` (a compensation of
  zero keeps any change);
* ``rounding="stochastic"``: never: a change rounds up with the probability that
  makes it exact in expectation;
* ``master_weights="fp32"``: at fp32's precision, next to the master weight
  (``"24bit"``: never, its master is rounded stochastically).

Moments need no guard: adamkit rounds 16-bit and quantized moments stochastically, and
an fp32 moment changes by at least :math:`1 - \beta_2` of itself per step when the
gradients shrink, far above fp32's spacing.

    >>> guard = adamkit.stall_guard(optimizer, every=100, names=model)
    >>> ...                        # every 100th optimizer.step() checks each param once
    >>> guard.check()              # or check now: {name: fraction of changes lost}
    >>> guard.remove()

The reading is in float64 while the kernels compute the new weight in fp32: a change
within a few fp32 spacings of the threshold may go either way (``tests/test_stall_guard.py``
holds every other element to what the step really kept).

A param whose share of lost changes reaches ``threshold`` gets one
:class:`StallWarning`, naming it.  Checking reads every param and moment once (in
float64); between checks the guard costs nothing.  With gradient release the steps
happen inside backward, not in ``optimizer.step()``: call ``guard.check()`` yourself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from . import sharding
from .accumulation import mid_update
from .algorithms import is_real_number, lookup
from .diagnostics import effective_step_sizes
from .kernels.types import as_real
from .rule import UpdateRule, as_number
from .specs.master import MASTER_KEY, join_tensors
from .specs.rounding import is_low_precision
from .state import COMPENSATION_KEY, moment_keys, moment_value
from .user_warnings import warn_at_user


class StallWarning(UserWarning):
    """A param's steps are too small for its storage to keep (see :mod:`adamkit.stalls`)."""


def _spacing(value: Tensor, upward: Tensor) -> Tensor:
    """The distance from each element of ``value`` (in its dtype) to the next
    representable number away from zero where ``upward``, toward zero elsewhere (float64)."""
    magnitude = value.abs()
    if value.dtype in (torch.float32, torch.float64):
        toward = torch.where(upward, torch.full_like(magnitude, torch.inf), torch.zeros_like(magnitude))
        neighbour = torch.nextafter(magnitude, toward)
    else:  # 16-bit: step the bit pattern (sign bit clear)
        bits = magnitude.view(torch.int16).to(torch.int32)
        step = torch.where(upward | (bits == 0), 1, -1)
        neighbour = (bits + step).to(torch.int16).view(value.dtype)
    return (neighbour.double() - magnitude.double()).abs()


@dataclass(frozen=True)
class Changes:
    r"""One param's last step, element by element (boolean masks, and the margin
    :math:`|\Delta_i|` over the half spacing: below 1 is lost)."""

    moving: Tensor  # the change is not zero
    lost: Tensor  # ... and rounding it gave back the stored value
    margin: Tensor
    decaying: Tensor  # decoupled weight decay changes the element
    decay_lost: Tensor  # ... by less than the half spacing

    @property
    def lost_share(self) -> float:
        """The share of the moving elements whose change was lost (0 if none moves)."""
        return float(self.lost.sum() / self.moving.sum().clamp(min=1))

    @property
    def decay_lost_share(self) -> float:
        """The share of the decaying elements whose decay alone would be lost."""
        return float(self.decay_lost.sum() / self.decaying.sum().clamp(min=1))


def last_changes(param: Tensor, state: dict, group: dict, algorithm: str, lr=None) -> Changes | None:
    """What one param's last step did, read back from its state; ``None`` where the
    param has not stepped, rounds stochastically (nothing is lost in expectation) or is
    between the micro-batches of an update (its moments describe no step).  ``lr``:
    the learning rate of that step (default: the group's now)."""
    rule = UpdateRule.from_group(group, algorithm)
    if lr is not None:
        rule = replace(rule, lr=as_number(lr))
    rounding = rule.rounding if is_low_precision(param.dtype) else "nearest"
    steps = as_number(state.get("step", 0))
    m = moment_value(state, "exp_avg", param)
    if rounding in ("stochastic", "master24") or steps < 1 or m is None or mid_update(state, algorithm):
        return None
    m = as_real(m).double()
    second = as_real(moment_value(state, moment_keys(algorithm, rule.amsgrad)[-1], param)).double()
    effective, _ = effective_step_sizes(second, rule, steps)
    stored = as_real(param.detach())
    theta = stored.double()
    decay_factor = rule.group_scalars().decay_factor
    decay = torch.zeros_like(theta) if decay_factor is None else (1 - as_number(decay_factor)) * theta
    change = decay + effective * m  # theta_new = theta - change
    holder = stored
    if rounding == "kahan":  # the compensation takes the change
        holder = as_real(state[COMPENSATION_KEY])
    elif rounding == "master":  # the split fp32 master weight does
        holder = join_tensors(stored, state[MASTER_KEY])
    margin = change.abs() / _half_spacing(holder, change)
    moving, decaying = change != 0, decay != 0
    decay_lost = decaying & (decay.abs() < _half_spacing(holder, decay))
    return Changes(moving, moving & (margin < 1), margin, decaying, decay_lost)


def _half_spacing(holder: Tensor, change: Tensor) -> Tensor:
    """Half the spacing next to the stored ``holder`` on the side that subtracting
    ``change`` moves it to: a smaller change rounds back to the stored value."""
    return _spacing(holder, (holder >= 0) != (change >= 0)) / 2


class StallGuard:
    """The handle :func:`stall_guard` returns."""

    def __init__(self, optimizer, every: int, threshold: float, names) -> None:
        self.optimizer, self.every, self.threshold = optimizer, every, threshold
        self.names = names
        self.steps = 0
        self.warned: set[int] = set()  # ids of params warned about
        self._hook = optimizer.register_step_post_hook(self._after_step)

    def _after_step(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        if self.steps % self.every == 0:
            self.check()

    def _name(self, param: Tensor, group_index: int, index: int) -> str:
        if self.names is not None and param in self.names:
            return self.names[param]
        return f"param {index} of group {group_index} ({param.dtype}, shape {tuple(param.shape)})"

    def check(self) -> dict[str, float]:
        """Each stepped param's share of lost changes at its last step; warns once per
        param whose share reaches the threshold."""
        shares = {}
        for group_index, group in enumerate(self.optimizer.param_groups):
            for index, param in enumerate(group["params"]):
                state = self.optimizer.state.get(param)
                if not state:
                    continue
                local = sharding.LocalState(state, param) if sharding.is_sharded(param) else state
                lr = self.optimizer._recorder.lr_of(param, group_index, group)  # (a scheduler moves it after)
                changes = last_changes(sharding.local(param), local, group, self.optimizer.algorithm, lr)
                name = self._name(param, group_index, index)
                shares[name] = 0.0 if changes is None else changes.lost_share
                if shares[name] >= self.threshold and id(param) not in self.warned:
                    self.warned.add(id(param))
                    message = _message(name, param, group, shares[name], changes.decay_lost_share)
                    warn_at_user(message, StallWarning)
        return shares

    def remove(self) -> None:
        """Stop checking after steps."""
        self._hook.remove()


def _message(name: str, param: Tensor, group: dict, share: float, decay_share: float) -> str:
    low = is_low_precision(param.dtype)
    rounding = group.get("rounding", "nearest") if low else "nearest"
    storage = f"{str(param.dtype).removeprefix('torch.')} storage (rounding={rounding!r})"
    if low and group.get("master_weights") == "fp32":
        storage = "fp32 master weight (master_weights='fp32')"
    text = f"{name}: {share:.0%} of its elements' changes at the last step were below what its {storage} keeps"
    text += ", so they were rounded away"
    if decay_share >= 0.5:
        text += f"; weight decay alone (lr x weight_decay) is lost for {decay_share:.0%} of them"
    if low and group.get("master_weights") != "fp32":
        text += ". rounding='stochastic' keeps small changes in expectation"
    return text + "."


def stall_guard(optimizer, *, every: int = 100, threshold: float = 0.5, names=None) -> StallGuard:
    """Check every ``every``-th ``optimizer.step()`` whether each param's changes were
    kept by its storage, and warn (a :class:`StallWarning`, once per param) when the
    share rounded away reaches ``threshold``.  ``names``: a module (its
    ``named_parameters()``) or a mapping from param to name, to name params in warnings."""
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"stall_guard: every must be a positive int, got {every!r}")
    if not is_real_number(threshold) or not 0 < threshold <= 1:
        raise ValueError(f"stall_guard: threshold must be a number in (0, 1], got {threshold!r}")
    if not hasattr(optimizer, "algorithm"):
        raise TypeError(f"stall_guard: optimizer must be an adamkit optimizer, got {type(optimizer).__name__}")
    if lookup(optimizer.algorithm).read_back is None:
        raise ValueError(
            f"stall_guard reads each step back from the optimizer's state; {type(optimizer).__name__}'s step "
            "depended on that step's gradient, which the state does not keep"
        )
    if isinstance(names, torch.nn.Module):
        names = {p: n for n, p in names.named_parameters()}
    elif names is not None and not isinstance(names, Mapping):
        raise TypeError(
            f"stall_guard: names must be a module or a mapping from param to name, got {type(names).__name__}"
        )
    return StallGuard(optimizer, every, float(threshold), names)


__all__ = ["Changes", "StallGuard", "StallWarning", "last_changes", "stall_guard"]
