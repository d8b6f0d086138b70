"""Gradient release: step each param as soon as its gradient is ready, inside
backward, and free the gradient, so a full set of gradients never exists at once.

    >>> handle = adamkit.gradient_release(model, optimizer)
    >>> loss.backward()      # every param is stepped here, its .grad freed
    >>> optimizer.step()     # steps only what no hook released (see below)
    >>> scheduler.step()     # takes effect at the next backward
    >>> handle.remove()      # back to normal stepping

Each param is stepped with its param group *as it is at that moment*: the group is
looked up in ``optimizer.param_groups`` at every hook, so LR schedulers, hand edits
and ``optimizer.load_state_dict`` (which replaces the group dicts) keep taking
effect.  State lives in ``optimizer.state`` as usual, so state dicts are unchanged.
The update is the one ``optimizer.step()`` would make: the kernels treat every
tensor on its own, so stepping params one at a time gives the same bits.

``optimizer.step()`` steps, as usual, any param that has a gradient no hook released:
one frozen (``requires_grad=False``) when the handle was attached and trained since,
or one of the optimizer's params not passed to :func:`gradient_release` (refused, by
name, with a GradScaler or ``max_grad_norm``, which cannot treat it with the others).

Mixed precision: pass the ``torch.amp.GradScaler`` (``gradient_release(model,
optimizer, scaler=scaler)``) and keep the usual loop, ``scaler.scale(loss).backward();
scaler.step(optimizer); scaler.update()``.  Each hook unscales its gradient; a param
whose gradient holds an inf or NaN is not stepped, and the scaler is told, so
``update()`` backs off.  Params stepped earlier in the same backward keep their
update: a step made inside backward cannot wait for the last gradient (torch's
scaler would have skipped the whole step).  This fills in the scaler's
per-optimizer record (as its ``unscale_`` would), so ``scaler.unscale_`` and
gradient clipping are not available, as there are no gradients left to clip.
``skip_nonfinite=True`` likewise skips each param whose own gradient holds an inf or
a NaN, not its whole group.

Offloaded groups (``offload="cpu"``, :mod:`adamkit.offload`): each hook copies the
param and its gradient to the host and frees the device gradient; a host thread steps
the param and copies it back while backward goes on, and the backward's end waits for
every param of the step to be back (``optimizer.step()`` waits too, where the backward
raised or compiled autograd ran it).  Gradient clipping by
global norm is available there: ``gradient_release(model, optimizer,
max_grad_norm=1.0)`` keeps the host gradients until ``step()``, which computes their
total norm as ``torch.nn.utils.clip_grad_norm_`` does (the same reductions, on the host
copies), scales them by ``min(1, max_grad_norm / (norm + 1e-6))``, copies the params as
they are then, and only then runs the host steps (so they no longer overlap backward);
``handle.last_grad_norm`` is the norm.  A state loaded or replaced between the backward
and ``step()`` is refused there (the held steps were planned for the old one).

Nothing depends on how the host thread keeps pace:

- a forward, a read or an edit after ``backward()`` meets weights that are back: the
  backward's end waits for them; where a backward raised before its end, ``step()``,
  ``zero_grad()`` and the given module's forward (its pre-hook) wait;
- with a GradScaler, ``scaler.step()`` calls ``optimizer.step()`` even when it finds an
  inf (the optimizer declares ``_step_supports_amp_scaling`` while the handle is
  attached), so no host step is still running when ``scaler.update()`` changes the
  scale;
- a param whose host step is still to be waited for (after a backward that raised,
  or under compiled autograd) gets a second gradient: refused by name (its forward
  may have read the weight before it came back), as is a param that shares memory
  with another (tied weights: a host copy of each would be stepped and copied back;
  views are compared byte by byte);
- with ``max_grad_norm``, a backward that raises (in a hook or in any other node)
  has its held host steps dropped at the next ``step()`` or forward (nothing of that
  step is applied), and ``optimizer.zero_grad()`` drops them too: autograd runs the
  callback that marks a backward ended only when it ends without raising (compiled
  autograd runs none, and there the held steps are kept);
- a param whose hook fires twice in one backward (a layer shared under reentrant
  activation checkpointing: the first firing carried part of its gradient) is refused
  by name.
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Iterable

import torch
from torch import Tensor
from torch.amp.grad_scaler import OptState

from . import sharding
from .algorithms import is_real_number
from .guard import extent, share_memory
from .offload import HostStep
from .user_warnings import warn_at_user


class GradientRelease:
    """The handle :func:`gradient_release` returns; ``remove()`` detaches it."""

    def __init__(
        self,
        params: list[Tensor],
        optimizer,
        scaler=None,
        max_grad_norm: float | None = None,
        module: torch.nn.Module | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.scaler = scaler
        self.max_grad_norm = max_grad_norm
        #: the total gradient norm of the last step, when clipping (``max_grad_norm``)
        self.last_grad_norm: Tensor | None = None
        self._order = {id(p): i for i, p in enumerate(params)}
        self._held: list[tuple[int, Tensor, HostStep]] = []  # host steps waiting for the norm
        self._pending = PendingMemory()  # the params with a host step not yet waited for
        self._stepped: set[int] = set()  # the params stepped in the backward under way
        self._in_backward = False  # a backward has run a hook and not yet reported its end
        self._scale: Tensor | None = None  # the GradScaler's scale when this step's backward began
        self._views: dict[int, dict] = {}  # per param: a one-param group kept in step with its group
        self._groups: tuple = ((), {})  # (ids of the param-group dicts, param id -> group index)
        optimizer.attach_gradient_release(self)
        self._hooks = [p.register_post_accumulate_grad_hook(self._step_param) for p in params]
        if module is not None:
            self._hooks.append(module.register_forward_pre_hook(self._before_forward))

    def _group_of(self, param: Tensor) -> tuple[int, dict]:
        groups = self.optimizer.param_groups
        identity = tuple(map(id, groups))
        if self._groups[0] != identity:
            index = {id(p): i for i, g in enumerate(groups) for p in g["params"]}
            self._groups = (identity, index)
        i = self._groups[1][id(param)]
        return i, groups[i]

    @torch.compiler.disable
    def _step_param(self, param: Tensor) -> None:
        """The post-accumulate-grad hook: step ``param`` with its group.  Run eagerly
        inside a compiled train step too (like ``step()``, a graph break: nothing in it
        is traced or guarded on, so a scheduler's lr does not recompile)."""
        index, group = self._group_of(param)
        view = self._views.setdefault(id(param), {"params": [param]})
        if self.max_grad_norm is not None and group.get("offload") is None:
            raise RuntimeError(
                f"gradient_release(max_grad_norm={self.max_grad_norm}) clips offloaded params only, but "
                f"param_groups[{index}] is not offloaded now (set offload='cpu' on it)"
            )
        self._check_first_gradient(param, index, group)  # (first: this backward's own, named as such)
        self._check_not_pending(param, index, group)  # (before: what is held belongs to an earlier backward)
        self._enter_backward()
        try:
            amp = self._amp(param.grad) if self.scaler is not None and self.scaler.is_enabled() else (None, None)
            host_step = self.optimizer.step_param(index, group, view, amp, hold=self.max_grad_norm is not None)
        except BaseException:
            self.discard_held()  # (clipping: nothing of a step whose backward failed is applied)
            raise
        if self._in_backward:
            self._stepped.add(id(param))
        if host_step is not None:
            self._pending.add(param)
            if self.max_grad_norm is None:
                self.optimizer.submit_host_step(host_step)
            else:
                self._held.append((self._order[id(param)], param, host_step))
        param.grad = None

    def _enter_backward(self) -> None:
        """At a backward's first hook, ask autograd to report its end: a callback it runs
        only when the backward ends without raising, which closes the record of the
        params stepped in it.  Compiled autograd runs no such callback: there nothing
        is recorded (no second gradient is refused, no held step dropped)."""
        if self._in_backward or _in_compiled_autograd():
            return
        self._in_backward = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        """The end of a backward: close its record, and wait for its host steps (not
        held for clipping), so that the weights are back when ``backward()`` returns, as
        they are without offload: a forward, a read or an in-place edit of a weight
        between ``backward()`` and ``step()`` meets the stepped weight."""
        self._in_backward = False
        self._stepped.clear()
        if _inside_another_backward():  # a reentrant checkpoint's inner backward ended, not the whole one
            return  # (its host steps stay pending: a shared layer's second, partial gradient is refused)
        self.wait_for_submitted(from_any_thread=True)  # (autograd's thread may run this)

    def wait_for_submitted(self, from_any_thread: bool = False) -> None:
        """Wait for the host steps submitted so far (those held for clipping have changed
        nothing yet); ``optimizer.zero_grad()`` calls it too."""
        if self.max_grad_norm is None and self._pending:
            try:
                self.optimizer.wait_for_host_steps(from_any_thread=from_any_thread)
            finally:
                self._pending.clear()

    def _drop_unfinished(self) -> None:
        """After a backward that raised (in any node, not only in these hooks), whose end
        never came: its held steps are dropped (with clipping, nothing of that step is
        applied) and its record of stepped params closed."""
        if self._in_backward:
            self.discard_held()

    def _check_not_pending(self, param: Tensor, index: int, group: dict) -> None:
        """Refuse a param whose memory a host step not yet waited for reads or writes: its
        own from an earlier backward, or another param's (they share memory)."""
        other = self._pending.find(param)
        if other is None:
            return
        where = f"params[{_position(param, group)}] of param_groups[{index}]"
        if other == id(param):
            raise RuntimeError(
                f"{where} got a second gradient while its host step from an earlier backward was still to be waited "
                "for (offload under gradient release): its forward may have read the weight before the step came "
                "back. Call optimizer.step() after each backward (or pass the module to gradient_release, whose "
                "forward then waits)" + (", or optimizer.zero_grad() to drop the held steps" if self._held else "")
            )
        raise ValueError(
            f"{where} shares memory with a param stepped on the host in this backward (tied weights): an offloaded "
            "param is stepped from its own host copy and copied back, so one of the two updates would be lost. "
            "Tie them as one Parameter, or leave offload=None for their groups"
        )

    def _check_first_gradient(self, param: Tensor, index: int, group: dict) -> None:
        """Refuse a param's second gradient in one backward: the hook fires each time
        autograd accumulates into ``.grad``, and a second time means that the first step
        used part of the gradient (a layer shared under reentrant activation
        checkpointing, whose inner backwards each accumulate)."""
        if id(param) in self._stepped:
            raise RuntimeError(
                f"params[{_position(param, group)}] of param_groups[{index}] got a second gradient in one backward, "
                "and gradient release had stepped it with the first, part of its gradient: a layer shared under "
                "reentrant activation checkpointing (use torch.utils.checkpoint with use_reentrant=False, where a "
                "param's gradient is whole when its hook fires), or step without gradient release. (After a "
                "backward that raised, call optimizer.zero_grad() first.)"
            )

    @torch.compiler.disable
    def _before_forward(self, module, args) -> None:
        """The module's forward pre-hook: wait for the host steps submitted so far, so
        that the forward reads updated weights (held steps, with ``max_grad_norm``, have
        changed nothing yet and stay held for ``step()``; those of a backward that raised
        are dropped)."""
        self._drop_unfinished()
        self.wait_for_submitted()

    def discard_held(self) -> None:
        """Drop the host steps held for clipping (``max_grad_norm``): their params are
        not stepped (``optimizer.zero_grad()`` under release calls it); and close the
        record of the backward under way."""
        self._in_backward = False
        self._stepped.clear()
        if self._held:
            self._held = []
            self._pending.clear()

    def finish(self) -> None:
        """``optimizer.step()`` under release: clip the held host gradients (if
        ``max_grad_norm``), run the host steps, and wait until every param is back.  The
        steps held from a backward that raised are dropped instead."""
        self._drop_unfinished()
        held, self._held = sorted(self._held, key=lambda entry: entry[0]), []
        self._pending.clear()
        if held:
            self._check_unchanged(held)
            for *_, host_step in held:
                host_step.gradients_in()  # (copied from the device on a side stream)
            grads = [g for *_, host_step in held for g in host_step.grads]
            self.last_grad_norm = torch.nn.utils.get_total_norm(grads, 2.0)
            coefficient = torch.clamp(self.max_grad_norm / (self.last_grad_norm + 1e-6), max=1.0)
            torch._foreach_mul_(grads, coefficient)
            for *_, host_step in held:
                host_step.pull_params()  # the params as they are now (edits since backward included)
                self.optimizer.submit_host_step(host_step)
        self.optimizer.wait_for_host_steps()

    def _check_unchanged(self, held: list[tuple[int, Tensor, HostStep]]) -> None:
        """Refuse held steps whose plan no longer holds: a param's state replaced
        (``optimizer.load_state_dict`` between ``backward()`` and ``step()``), an option
        that shapes it changed, the param gone from the optimizer or recast.  They are
        dropped, all of them, before anything is stepped."""
        for _, param, host_step in held:
            try:
                index, group = self._group_of(param)
            except KeyError:
                index, group, why = None, None, "it is no longer in the optimizer's param groups"
            else:
                why = host_step.changed_since(group)
            if why is not None:
                where = f"params[{_position(param, group)}] of param_groups[{index}]" if group else "a param"
                raise RuntimeError(
                    f"gradient_release(max_grad_norm={self.max_grad_norm}) held {where}'s host step from the last "
                    f"backward until step(), and since then {why}: the step was planned for what was there. The "
                    "held steps are dropped (nothing of this step is applied); call step() before loading or "
                    "changing the optimizer's state, or zero_grad() to drop the held steps yourself"
                )

    def _amp(self, grad: Tensor) -> tuple[Tensor, Tensor]:
        """The scale and this gradient's inf flag, recorded in the scaler's per-optimizer
        state (opened at the first hook after ``update()``) for ``step``/``update``."""
        record = self.scaler._per_optimizer_states[id(self.optimizer)]
        if record["stage"] is OptState.READY or self._scale is None:
            # a copy: host steps may still run after the scaler's update() has changed the scale
            self._scale = self.scaler._scale.detach().clone()
        scale = self._scale
        if record["stage"] is OptState.READY:
            record["found_inf_per_device"] = {scale.device: torch.zeros((), device=scale.device)}
            record["stage"] = OptState.UNSCALED
        found_inf = grad.detach().isfinite().logical_not().any().float()
        found_any = record["found_inf_per_device"][scale.device]
        torch.maximum(found_any, found_inf.to(scale.device), out=found_any)
        return scale, found_inf

    def remove(self) -> None:
        """Detach: host steps still waiting run first (the hooks are removed, and the
        optimizer's GradScaler declaration put back, even if one of them raises)."""
        try:
            self.finish()
        finally:
            for hook in self._hooks:
                hook.remove()
            self._hooks = []
            self.optimizer.detach_gradient_release(self)

    def view_ids(self) -> list[int]:
        """The ids of the one-param groups the hooks step their params in."""
        return list(map(id, self._views.values()))

    def unreleased(self) -> list[tuple[int, int]]:
        """(group, index) of each param of the optimizer that has a gradient no hook
        released: frozen when the handle was attached, or not passed to it."""
        return [
            (i, j)
            for i, group in enumerate(self.optimizer.param_groups)
            for j, p in enumerate(group["params"])
            if p.grad is not None and id(p) not in self._order
        ]


def gradient_release(
    model_or_params: torch.nn.Module | Iterable[Tensor],
    optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> GradientRelease:
    """Step ``optimizer``'s params in their post-accumulate-grad hooks (see the module).

    ``model_or_params``: a module or an iterable of params, each of which that requires
    grad must be in one of ``optimizer``'s param groups (an adamkit optimizer; a frozen
    backbone's params need not be).  A DDP module is refused: DDP averages the gradients
    after the hooks would have stepped each rank with its own (its params given alone
    cannot be told from a rank's own model: in a process group of several ranks, params
    that are not FSDP2 shards get a warning).  ``scaler``: the
    ``torch.amp.GradScaler`` that scales the loss, if any.  ``max_grad_norm``: clip the
    gradients' global norm to it (groups with ``offload="cpu"`` only; not with a scaler).
    """
    optimizer = _unwrapped(optimizer)
    if not hasattr(optimizer, "attach_gradient_release"):
        raise TypeError(f"gradient_release needs an adamkit optimizer, got {type(optimizer).__name__}")
    given = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    params = list({id(p): p for p in given}.values())  # one hook per param, however often it is listed
    owned = {id(p) for g in optimizer.param_groups for p in g["params"]}
    strangers = [i for i, p in enumerate(params) if p.requires_grad and id(p) not in owned]
    if strangers:
        raise ValueError(f"params {strangers} of model_or_params are not in the optimizer's param groups")
    _check_not_data_parallel(model_or_params, [p for p in params if p.requires_grad])
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler or None, got {type(scaler).__name__}")
    if max_grad_norm is not None:
        _check_max_grad_norm(max_grad_norm, optimizer, scaler)
    module = model_or_params if isinstance(model_or_params, torch.nn.Module) else None
    return GradientRelease([p for p in params if p.requires_grad], optimizer, scaler, max_grad_norm, module)


class PendingMemory:
    """The memory of the params whose host steps are not yet waited for: per device,
    clusters of their extents (:func:`adamkit.guard.extent`; params whose extents meet
    share a cluster), disjoint and sorted, so that a param's candidates are found by
    bisection and then compared byte by byte (:func:`adamkit.guard.share_memory`: column
    blocks of one matrix interleave without sharing an element)."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, tuple[list[int], list[int], list[list]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_device)

    def find(self, param: Tensor) -> int | None:
        """The id of a pending param whose memory overlaps ``param``'s, if any."""
        start, end = extent(param)
        starts, ends, members = self._by_device.get(param.device, ((), (), ()))
        k = self._first_meeting(starts, ends, start)
        while start != end and k < len(starts) and starts[k] < end:
            for pending_id, pending in members[k]:
                if share_memory(param, pending):
                    return pending_id
            k += 1
        return None

    def add(self, param: Tensor) -> None:
        """Note ``param`` (its memory as it is now), joining the clusters its extent meets."""
        start, end = extent(param)
        if start == end:
            return
        starts, ends, members = self._by_device.setdefault(param.device, ([], [], []))
        first = last = self._first_meeting(starts, ends, start)
        joined = [(id(param), param.detach())]
        while last < len(starts) and starts[last] < end:
            start, end = min(start, starts[last]), max(end, ends[last])
            joined += members[last]
            last += 1
        starts[first:last], ends[first:last], members[first:last] = [start], [end], [joined]

    @staticmethod
    def _first_meeting(starts, ends, start: int) -> int:
        """The first cluster that may meet an extent from ``start`` on."""
        k = bisect.bisect_right(starts, start)
        return k - 1 if k and ends[k - 1] > start else k

    def clear(self) -> None:
        self._by_device.clear()


def _inside_another_backward() -> bool:
    """Whether a backward's end callback runs inside another backward (the inner
    backward of a reentrant activation checkpoint: a node of the outer one is running)."""
    current = getattr(torch._C, "_current_autograd_node", None)
    return current is not None and current() is not None


def _unwrapped(optimizer):
    """The adamkit optimizer inside a training framework's wrapper of it (Lightning's
    ``LightningOptimizer`` holds it as ``_optimizer``, accelerate's ``AcceleratedOptimizer``
    as ``optimizer``), which is what the framework steps; else ``optimizer`` itself."""
    for name in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, name, None)
        if inner is not None and inner is not optimizer and hasattr(inner, "attach_gradient_release"):
            return _unwrapped(inner)
    return optimizer


def _in_compiled_autograd() -> bool:
    """Whether this hook runs inside compiled autograd (whose backward runs no callback)."""
    compiled = sys.modules.get("torch._dynamo.compiled_autograd")
    return compiled is not None and bool(getattr(compiled, "in_compiled_autograd_region", False))


def _check_not_data_parallel(model_or_params, params: list[Tensor]) -> None:
    """Refuse a DDP module: each rank's hooks would step with its own gradient, before
    the all-reduce averages it, and the replicas would part silently.  Its params given
    without the wrapper cannot be told apart from a rank's own model: where a process
    group of more than one rank runs and a param is a plain tensor (not an FSDP2
    shard, whose gradient is reduced before its hook), warn."""
    if isinstance(model_or_params, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            "gradient_release steps each param in backward as soon as its local gradient is ready, before "
            "DistributedDataParallel averages the gradients across ranks: every rank would step with its own and "
            "the replicas would part. Step after backward, with optimizer.step(), without gradient release"
        )
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_world_size() > 1 and not all(map(sharding.is_sharded, params)):
        warn_at_user(
            f"gradient_release in a process group of {torch.distributed.get_world_size()} ranks, with params that "
            "are not FSDP2 shards: each rank steps its own local gradient as soon as it is ready. If these params "
            "are replicated under DistributedDataParallel, its all-reduce comes too late and the replicas part; "
            "step after backward with optimizer.step() instead",
            UserWarning,
        )


def _position(param: Tensor, group: dict) -> int:
    return next(j for j, p in enumerate(group["params"]) if p is param)


def _check_max_grad_norm(max_grad_norm, optimizer, scaler) -> None:
    if not is_real_number(max_grad_norm) or not max_grad_norm > 0:
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
