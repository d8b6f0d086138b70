"""Gradient release: step each param as soon as its gradient is ready, inside
backward, and free the gradient, so a full set of gradients never exists at once.

    >>> handle = adamkit.gradient_release(model, optimizer)
    >>> loss.backward()      # every param is stepped here, its .grad freed
    >>> optimizer.step()     # a no-op while the handle is attached
    >>> scheduler.step()     # takes effect at the next backward
    >>> handle.remove()      # back to normal stepping

Each param is stepped with its param group *as it is at that moment*: the group is
looked up in ``optimizer.param_groups`` at every hook, so LR schedulers, hand edits
and ``optimizer.load_state_dict`` (which replaces the group dicts) keep taking
effect.  State lives in ``optimizer.state`` as usual, so state dicts are unchanged.
The update is the one ``optimizer.step()`` would make: the kernels treat every
tensor on its own, so stepping params one at a time gives the same bits.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class GradientRelease:
    """The handle :func:`gradient_release` returns; ``remove()`` detaches it."""

    def __init__(self, params: list[Tensor], optimizer) -> None:
        self.optimizer = optimizer
        self._views: dict[int, dict] = {}  # per param: a one-param group kept in step with its group
        self._groups: tuple = ((), {})  # (ids of the param-group dicts, param id -> group index)
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_param) for p in params]
        optimizer._gradient_release = self

    def _group_of(self, param: Tensor) -> tuple[int, dict]:
        groups = self.optimizer.param_groups
        identity = tuple(map(id, groups))
        if self._groups[0] != identity:
            index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            self._groups = (identity, index)
        i = self._groups[1][id(param)]
        return i, groups[i]

    def _step_param(self, param: Tensor) -> None:
        index, group = self._group_of(param)
        view = self._views.setdefault(id(param), {"params": [param]})
        self.optimizer._step_one_param(index, group, view)
        param.grad = None

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if getattr(self.optimizer, "_gradient_release", None) is self:
            del self.optimizer._gradient_release


def gradient_release(model_or_params: torch.nn.Module | Iterable[Tensor], optimizer) -> GradientRelease:
    """Step ``optimizer``'s params in their post-accumulate-grad hooks (see the module).

    ``model_or_params``: a module or an iterable of params, each of which must be in
    one of ``optimizer``'s param groups (an adamkit optimizer).
    """
    if not hasattr(optimizer, "_step_one_param"):
        raise TypeError(f"gradient_release needs an adamkit optimizer, got {type(optimizer).__name__}")
    if getattr(optimizer, "_gradient_release", None) is not None:
        raise RuntimeError("this optimizer already has gradient release attached (call handle.remove() first)")
    params = list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params)
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    strangers = [i for i, p in enumerate(params) if id(p) not in owned]
    if strangers:
        raise ValueError(f"params {strangers} of model_or_params are not in the optimizer's param groups")
    return GradientRelease([p for p in params if p.requires_grad], optimizer)


__all__ = ["GradientRelease", "gradient_release"]
