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

Mixed precision: pass the ``torch.amp.GradScaler`` (``gradient_release(model,
optimizer, scaler=scaler)``) and keep the usual loop, ``scaler.scale(loss).backward();
scaler.step(optimizer); scaler.update()``.  Each hook unscales its gradient; a param
whose gradient holds an inf or NaN is not stepped, and the scaler is told, so
``update()`` backs off.  Params stepped earlier in the same backward keep their
update: a step made inside backward cannot wait for the last gradient (torch's
scaler would have skipped the whole step).  This fills in the scaler's
per-optimizer record (as its ``unscale_`` would), so ``scaler.unscale_`` and
gradient clipping are not available, as there are no gradients left to clip.

Offloaded groups (``offload="cpu"``, :mod:`adamkit.offload`): each hook copies the
param and its gradient to the host and frees the device gradient; a host thread steps
the param and copies it back while backward goes on, and ``optimizer.step()`` is
where the loop waits for every param of the step to be back.  Gradient clipping by
global norm is available there: ``gradient_release(model, optimizer,
max_grad_norm=1.0)`` keeps the host gradients until ``step()``, which computes their
total norm as ``torch.nn.utils.clip_grad_norm_`` does (the same reductions, on the host
copies), scales them by ``min(1, max_grad_norm / (norm + 1e-6))`` and only then runs the
host steps (so they no longer overlap backward); ``handle.last_grad_norm`` is the norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from .offload import HostStep


class GradientRelease:
    """The handle :func:`gradient_release` returns; ``remove()`` detaches it."""

    def __init__(self, params: list[Tensor], optimizer, scaler=None, max_grad_norm: float | None = None) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        #: the total gradient norm of the last step, when clipping (``max_grad_norm``)
        self.last_grad_norm: Tensor | None = None
        self._order = {id(p): i for i, p in enumerate(params)}
        self._held: list[tuple[int, HostStep]] = []  # host steps waiting for the norm
        self._views: dict[int, dict] = {}  # per param: a one-param group kept in step with its group
        self._groups: tuple = ((), {})  # (ids of the param-group dicts, param id -> group index)
        optimizer.attach_gradient_release(self)
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_param) for p in params]

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
        if self.max_grad_norm is not None and group.get("offload") is None:
            raise RuntimeError(
                f"gradient_release(max_grad_norm={self.max_grad_norm}) clips offloaded params only, but "
                f"param_groups[{index}] is not offloaded now (set offload='cpu' on it)"
            )
        amp = self._amp(param.grad) if self.scaler is not None and self.scaler.is_enabled() else (None, None)
        host_step = self.optimizer.step_param(index, group, view, amp)
        if host_step is not None and self.max_grad_norm is not None:
            self._held.append((self._order[id(param)], host_step))
        elif host_step is not None:
            self.optimizer.submit_host_step(host_step)
        param.grad = None

    def finish(self) -> None:
        """``optimizer.step()`` under release: clip the held host gradients (if
        ``max_grad_norm``), run the host steps, and wait until every param is back."""
        held, self._held = sorted(self._held, key=lambda pair: pair[0]), []
        if held:
            grads = [g for _, host_step in held for g in host_step.grads]
            self.last_grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)
            coefficient = torch.clamp(self.max_grad_norm / (self.last_grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient)
            for _, host_step in held:
                self.optimizer.submit_host_step(host_step)
        self.optimizer.wait_for_host_steps()

    def _amp(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """The scale and this gradient's inf flag, recorded in the scaler's per-optimizer
        state (opened at the first hook after ``update()``) for ``step``/``update``."""
        scale = self.scaler._scale
        record = self.scaler._per_optimizer_states[id(self.optimizer)]
        if record["stage"] is OptState.READY:
            record["found_inf_per_device"] = {scale.device: torch.zeros((), device=scale.device)}
            record["stage"] = OptState.UNSCALED
        found_inf = grad.detach().isfinite().logical_not().any().float()
        found_any = record["found_inf_per_device"][scale.device]
        torch.maximum(found_any, found_inf.to(scale.device), out=found_any)
        return scale, found_inf

    def remove(self) -> None:
        """Detach: host steps still waiting run first."""
        self.finish()
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self.optimizer.detach_gradient_release(self)


def gradient_release(
    model_or_params: torch.nn.Module | Iterable[Tensor],
    optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> GradientRelease:
    """Step ``optimizer``'s params in their post-accumulate-grad hooks (see the module).

    ``model_or_params``: a module or an iterable of params, each of which must be in
    one of ``optimizer``'s param groups (an adamkit optimizer).  ``scaler``: the
    ``torch.amp.GradScaler`` that scales the loss, if any.  ``max_grad_norm``: clip the
    gradients' global norm to it (groups with ``offload="cpu"`` only; not with a scaler).
    """
    if not hasattr(optimizer, "attach_gradient_release"):
        raise TypeError(f"gradient_release needs an adamkit optimizer, got {type(optimizer).__name__}")
    params = list(model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params)
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    strangers = [i for i, p in enumerate(params) if id(p) not in owned]
    if strangers:
        raise ValueError(f"params {strangers} of model_or_params are not in the optimizer's param groups")
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if max_grad_norm is not None:
        _check_max_grad_norm(max_grad_norm, optimizer, scaler)
    return GradientRelease([p for p in params if p.requires_grad], optimizer, scaler, max_grad_norm)


def _check_max_grad_norm(max_grad_norm, optimizer, scaler) -> None:
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm > 0:
        raise ValueError(f"max_grad_norm must be a number > 0 or None, got {max_grad_norm!r}")
    if max_grad_norm == float("inf"):
        raise ValueError("max_grad_norm must be finite (None: no clipping)")
    if scaler is not None:
        raise ValueError("max_grad_norm with a GradScaler is not supported: the scaled gradients would be clipped")
    resident = [i for i, g in enumerate(optimizer.param_groups) if g.get("offload") is None]
    if resident:
        raise ValueError(
            f"max_grad_norm clips gradients kept in host memory until step(): param_groups {resident} are not "
            "offloaded (offload='cpu'), and their gradients are freed in backward"
        )


__all__ = ["GradientRelease", "gradient_release"]
