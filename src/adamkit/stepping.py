"""How an optimizer steps a param group: plan, admit, initialize state, run a kernel.

:class:`Stepper` is the optimizer's step engine.  For each group it validates the
group, its params and their state, checks every param and gradient against what it
last validated (:class:`~adamkit.guard.StepGuard`) and picks the kernel
(:meth:`Stepper.plan`, touching nothing); records diagnostics and applies
``skip_nonfinite`` (:meth:`Stepper.admit`); allocates or converts the states of every
admitted group before any of them moves, issuing the tensors a fused kernel will
address (:meth:`Stepper.initialize`); then hands each group to its kernel with the
step's :class:`~adamkit.rule.UpdateRule` (:meth:`Stepper.run`).  Every group is
planned before anything is written, so a step that raises changes nothing.

Its caches (validation keys, guards, the kernels' derived data, the params' indices)
are bookkeeping, not state: an optimizer makes a new stepper when it is unpickled,
copied or loads a state dict.  They are keyed on the optimizer's
:class:`~adamkit.statekeeping.StateEpoch`, which advances whenever the state changes.
"""

from __future__ import annotations

import operator
from contextlib import contextmanager
from itertools import repeat
from operator import attrgetter
from typing import NamedTuple

import torch
from torch import Tensor
from torch.autograd.graph import increment_version

from . import accumulation, kernels, offload, sharding, statekeeping
from .algorithms import lookup
from .diagnostics import Recorder
from .guard import CheckedTensors, StepGuard, resolved
from .kernels import GroupBatch, Kernel
from .kernels.amp import unscaled
from .options import check_group
from .rule import UpdateRule
from .specs.quantization import FORMATS
from .specs.rounding import is_low_precision
from .state import check_state, init_state, state_dtype

_grad_of = attrgetter("grad")
_device_of = attrgetter("device")
_dtype_of = attrgetter("dtype")


def mark_written(tensors: list[Tensor]) -> None:
    """Advance the autograd version counters of tensors a fused kernel wrote through raw
    addresses, as torch's in-place ops advance them: a backward through a graph that
    saved a param before the step then fails, as after torch.optim's for-loop step,
    instead of differentiating silently at the new weights."""
    try:
        increment_version(tensors)
    except TypeError:  # an older torch takes one tensor at a time
        for t in tensors:
            increment_version(t)


class GroupPlan(NamedTuple):
    """One param group's step: the params with a gradient, their gradients, the kernel,
    what the guard let through for the kernel (the local shards' for sharded params, the
    host buffers' for an offloaded group), and an offloaded group's host buffers."""

    group: dict
    params: list[Tensor]
    grads: list[Tensor]
    kernel: Kernel
    checked: CheckedTensors
    hosts: list[offload.HostBuffers] | None = None


def draw_seed_if_needed(group: dict, dtypes: set | None = None) -> None:
    """A group that rounds stochastically (a ``"stochastic"`` param rounding, moments
    held in 16 bits or quantized, a 24-bit master) and has no seed gets one from
    torch's default generator (so ``torch.manual_seed`` makes runs reproducible);
    other groups draw nothing, leaving the user's random stream as torch.optim leaves
    it.  ``dtypes``: the group's param dtypes (read from the group when not given)."""
    if group["seed"] is not None:
        return
    precision = group["state_precision"]
    stochastic = group["rounding"] == "stochastic" or group["master_weights"] == "24bit"
    stochastic |= precision in ("bf16", *FORMATS)
    if not stochastic and precision is None:  # moments in the params' dtype
        stochastic = any(map(is_low_precision, dtypes or {p.dtype for p in group["params"]}))
    if stochastic:
        group["seed"] = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _fused_devices() -> list[str]:
    """torch's list of devices with fused optimizer kernels (quoted in its error)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older torch
        return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia"]


def _all_finite(params: list[Tensor], grads: list[Tensor], sharded: bool) -> bool:
    """Whether no gradient holds a NaN or an infinity (max-abs norms, each judged in its
    own dtype: exact, and no overflow where an fp64 one would pass fp32's largest number).
    Empty gradients hold nothing (and their max-abs norm has no value).  Sharded gradients
    are checked shard by shard and the ranks agree (a collective), so that every rank
    skips the same steps."""
    if sharded:
        grads = list(map(sharding.local, grads))
    held = [g.detach() for g in grads if g.numel()]
    finite = [n.isfinite() for n in torch._foreach_norm(held, float("inf"))] if held else []
    nonfinite = (~torch.stack(finite)).sum(dtype=torch.float64) if finite else torch.zeros((), dtype=torch.float64)
    if sharded:
        nonfinite = sharding.sum_over_shards(nonfinite.reshape(1).cpu(), next(filter(sharding.is_sharded, params)))
    return not bool(nonfinite.item())


def backend_name(group: dict, devices: set[torch.device], algorithm: str = "adam") -> str | None:
    """``backend`` if given; else torch's ``fused`` / ``foreach`` flags mapped onto
    adamkit's paths; ``None`` lets the registry pick."""
    if group["backend"] is not None:
        return group["backend"]
    if group.get("fused"):
        return kernels.fused_backend(devices, algorithm)
    if group.get("foreach"):
        return "foreach"
    if group.get("foreach") is False:
        return "single_tensor"
    return None


class Stepper:
    """The step engine of one optimizer (see the module docstring)."""

    def __init__(self, optimizer, recorder: Recorder):
        self.optimizer = optimizer
        #: the attached :class:`adamkit.release.GradientRelease`, if any
        self.release = None
        self.restart(recorder)

    def restart(self, recorder: Recorder) -> None:
        """Forget what was validated and the host buffers (after ``load_state_dict``, the
        state may be new), keeping the engine itself, which a framework's wrapper of the
        optimizer shares, and an attached gradient release."""
        self.recorder = recorder
        self._caches: dict[int, tuple[dict, dict]] = {}
        self._sweep_at = 16  # the number of caches at which those of dropped groups are let go of
        self._param_index_cache: tuple | None = None
        #: offloaded groups' host buffers, copy stream and worker thread
        self.offload = offload.Offload()

    def cache(self, group: dict) -> dict:
        """A per-group scratch dict for validation keys and kernels' derived data."""
        entry = self._caches.get(id(group))
        if entry is None or entry[0] is not group:
            if len(self._caches) >= self._sweep_at:
                self._forget_dropped_groups()
            entry = self._caches[id(group)] = (group, {})
        return entry[1]

    def _forget_dropped_groups(self) -> None:
        """Let go of the caches of groups the optimizer no longer has (a cache holds its
        group, and with it the params: ``param_groups.pop()`` would keep them alive), at
        twice the number of live caches (plus 8), so that the sweeps cost O(1) per cache
        made and at most that many dropped groups wait for one."""
        live = {id(g) for g in self.optimizer.param_groups}
        release = self.release
        if release is not None:  # its one-param groups
            live.update(release.view_ids())
        self._caches = {key: entry for key, entry in self._caches.items() if key in live}
        self._sweep_at = 2 * len(self._caches) + 8

    def plan(self, index: int, group: dict) -> GroupPlan | None:
        """Validate one group, its params, their gradients and their state, and pick its
        kernel; touches nothing.  ``None``: no param of the group has a gradient.

        Per-param work is kept to a few C-level passes (this runs every step, for
        groups of thousands of tensors); state is validated again only when the set of
        params, the options that shape the state or the state itself may have changed
        (the optimizer's :class:`~adamkit.statekeeping.StateEpoch`).
        """
        where = f" in param_groups[{index}]"
        check_group(group, where)
        self.optimizer._refuse_unavailable(group, where)
        params = group["params"]
        grads = list(map(_grad_of, params))
        if any(map(operator.is_, grads, repeat(None))):  # identity: ``None in`` would call Tensor.__eq__
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            return None
        differentiable = group["differentiable"]
        cache = self.cache(group)
        key = self._state_key(group, params)
        hosts = self.offload.buffers(params) if group["offload"] is not None else None
        if cache.get("validated_key") != key or differentiable:
            if any(map(operator.attrgetter("is_sparse"), grads)):
                raise RuntimeError(self.optimizer.sparse_gradient_message)
            if hosts is not None and any(map(sharding.is_sharded, params)):
                raise ValueError(f"offload={group['offload']!r}{where}: sharded (DTensor) params are not offloaded yet")
            self._check_params_and_state(group, params, where, hosts)
            cache["validated_key"], cache["devices"] = key, set(map(_device_of, params))
            cache["dtypes"] = set(map(_dtype_of, params))
            cache["complex"] = any(dtype.is_complex for dtype in cache["dtypes"])
            cache["sharded"] = any(map(sharding.is_sharded, params))
            cache["offsets"] = {id(p): sharding.element_offset(p) for p in params} if cache["sharded"] else None
        grads = resolved(grads, cache["complex"])  # (lazily negated or conjugated ones: their values in memory)
        if (
            lookup(self.optimizer.algorithm).tensor_hyperparameter_checks
            and group.get("foreach")
            and isinstance(group["lr"], Tensor)
            and not group["capturable"]
        ):
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        devices = cache["devices"] if hosts is None else {offload.HOST}
        algorithm = self.optimizer.algorithm
        name = backend_name(group, devices, algorithm)
        kernel = kernels.resolve(name, devices, differentiable=differentiable, algorithm=algorithm)
        if group["accumulation_steps"] > 1:
            kernel = accumulation.KERNEL
        checked = self._guard(group, params, grads, where, kernel)
        if hosts is not None and cache["guard"].layout.overlapping:
            first, second = cache["guard"].layout.overlapping[0]
            raise ValueError(
                f"params[{first}] and params[{second}]{where} share memory (tied weights), but offload="
                f"{group['offload']!r} steps each param from its own host copy and copies both back: the last copy "
                "would win. Tie them as one Parameter, or leave offload=None for this group"
            )
        if hosts is not None:  # the kernel addresses the host buffers: what it is handed is checked
            host_params, host_grads = [h.param for h in hosts], [h.grad for h in hosts]
            checked = self._guard(group, host_params, host_grads, where, kernel, "host_guard")
        return GroupPlan(group, params, grads, kernel, checked, hosts)

    def _guard(
        self, group: dict, params: list[Tensor], grads: list[Tensor], where: str, kernel, name: str = "guard"
    ) -> CheckedTensors:
        """The group's :class:`~adamkit.guard.StepGuard` check of this step's params and
        gradients (their local shards when sharded); a fused kernel refuses params that
        share memory (their updates would race).  An offloaded group has a second guard,
        ``"host_guard"``, over the host buffers the kernel steps."""
        cache = self.cache(group)
        guard = cache.get(name)
        if guard is None:
            guard = cache[name] = StepGuard()
        state_table = self.optimizer.state
        if cache["sharded"]:
            held = params
            params, grads = list(map(sharding.local, params)), list(map(sharding.local, grads))

            def state_of(j: int):
                return state_table.get(held[j])

        else:

            def state_of(j: int):
                return state_table.get(params[j])

        checked = guard.check(params, grads, where, state_of, self.optimizer.sparse_gradient_message)
        if kernel.fused and guard.layout.overlapping:
            first, second = guard.layout.overlapping[0]
            if params[first] is params[second]:
                raise RuntimeError(
                    f"params[{first}] and params[{second}]{where} are the same param, listed twice (torch.optim "
                    f"warns, and steps it twice a step): list each param once, or step this group with "
                    f"backend='single_tensor' (or 'foreach'), which step it twice as torch.optim does"
                )
            raise RuntimeError(
                f"params[{first}] and params[{second}]{where} share memory: the {kernel.name!r} kernel updates "
                f"tensors in parallel, and their updates would race. Give each param its own memory, or step "
                f"this group with backend='single_tensor' (or 'foreach')"
            )
        return checked

    def _check_params_and_state(self, group: dict, params: list[Tensor], where: str, hosts=None) -> None:
        """Each param's dtype against ``state_precision``, and its state against it (an
        offloaded group's against its host buffer, which the state lives beside)."""
        differentiable, state_table = group["differentiable"], self.optimizer.state
        for j, p in enumerate(params):
            try:
                state_dtype(p, group["state_precision"])
            except ValueError as error:
                raise ValueError(f"{error} (params[{j}]{where})") from None
            state = state_table.get(p)
            if state and sharding.is_sharded(p):  # the kernels see the local shard
                state, p = sharding.LocalState(state, p), sharding.local(p)
            if state:
                amsgrad = bool(group.get("amsgrad"))
                held = hosts[j].param if hosts is not None else p
                check_state(state, held, self.optimizer.algorithm, amsgrad=amsgrad, where=f" of params[{j}]{where}")
                if differentiable and state["step"].requires_grad:
                    raise RuntimeError("`requires_grad` is not supported for `step` in differentiable mode")
            elif group.get("fused"):
                devices = _fused_devices()
                if not (p.is_floating_point() and p.device.type in devices):
                    raise RuntimeError(
                        "`fused=True` requires all the params to be floating point Tensors of "
                        f"supported devices: {devices} but {p.dtype} and {p.device.type}"
                    )
            if differentiable and p.is_leaf and p.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(
                    "a leaf Variable that requires grad is being used in an in-place operation: with "
                    f"differentiable=True, optimize a non-leaf copy (e.g. w = w0.clone()), not params[{j}]{where}"
                )

    def _state_key(self, group: dict, params: list[Tensor]) -> tuple:
        """Equal keys mean the same params with the same, already validated state tensors:
        the params' identities, ``amsgrad``, the options that shape or place the state, and the
        state's epoch (every write to ``optimizer.state``, and every issued state tensor
        that lets go of its memory, advances it)."""
        optimizer = self.optimizer
        if (
            not isinstance(optimizer.state, statekeeping.StateTable)
            or optimizer.state.epoch is not optimizer.state_epoch
        ):
            optimizer.state = statekeeping.tracked(optimizer.state, optimizer.state_epoch)  # replaced by hand
        return (tuple(map(id, params)), *_state_options(group), optimizer.state_epoch.value)

    def made_for(self, group: dict, params: list[Tensor]) -> tuple:
        """What a plan of ``group`` made now depends on: the options that shape the
        state, and each param's dtype, shape and device, state dict and state tensors
        (by identity), for :meth:`changed_since`."""
        table = self.optimizer.state
        held = [(_kind(p), table.get(p), _tensors_of(table.get(p))) for p in params]
        return _state_options(group), held

    def changed_since(self, group: dict, params: list[Tensor], made_for: tuple) -> str | None:
        """What changed since :meth:`made_for` gave ``made_for`` (``None``: nothing)."""
        options, held = made_for
        if _state_options(group) != options:
            return (
                "an option that shapes its state (amsgrad, rounding, master_weights, state_precision, offload) changed"
            )
        table = self.optimizer.state
        for p, (kind, state, tensors) in zip(params, held):
            if _kind(p) != kind:
                return "its dtype, shape or device changed"
            now = table.get(p)
            if now is not state or _tensors_of(now).keys() != tensors.keys():
                return "its state was replaced (optimizer.load_state_dict, or by hand)"
            if any(now[key] is not tensor for key, tensor in tensors.items()):
                return "a tensor of its state was replaced"
        return None

    def admit(self, index: int, plan: GroupPlan, amp: tuple) -> bool:
        """Whether the group may step (``skip_nonfinite``); if it does, record its
        diagnostics (a skipped step leaves the last step's figures as they were, a
        GradScaler's inf that the kernel skips included).  ``amp``: a GradScaler's scale
        and inf flag."""
        grad_scale, found_inf = amp
        group, params, grads = plan.group, plan.params, plan.grads
        sharded = self.cache(group).get("sharded", False)
        # (under a GradScaler an inf is the scaler's to skip, in the kernel: not counted here,
        # as where the scaler skips step() itself)
        if group["skip_nonfinite"] and found_inf is None and not _all_finite(params, grads, sharded):
            self.recorder.skips[index] += 1
            return False
        in_kernel = found_inf if plan.kernel.amp else None
        self.recorder.record_lr(index, group, in_kernel)
        if group["diagnostics"]:
            self.recorder.record(group, params, grads, grad_scale, in_kernel)
        return True

    def initialize(self, plans: list[GroupPlan]) -> None:
        """Bring the state of every planned group in line with it (allocate, convert,
        and issue what a fused kernel will address: see :mod:`adamkit.statekeeping`),
        before any group steps; then key each group on its state as it now stands, so
        that the next step finds the same keys and validates and rebuilds nothing (a
        CUDA graph of ``step()`` can be captured after one eager step, as with
        torch.optim)."""
        epoch = self.optimizer.state_epoch
        for group, params, grads, kernel, _, hosts in plans:
            cache = self.cache(group)
            if cache.get("initialized_key") == cache["validated_key"]:
                continue
            state_table = self.optimizer.state
            if cache["sharded"]:  # DTensors: the local shards' state
                params, _, state_table = sharding.local_view(params, grads, state_table)
            elif hosts is not None:  # offloaded: the state is made beside the host buffers
                params, _, state_table = offload.host_view(hosts, params, state_table)
            with _outside_inference_mode():  # state made in a step under inference_mode outlives it
                for p in params:
                    init_state(state_table[p], p, group, self.optimizer.algorithm)
                    if kernel.fused:
                        statekeeping.issue_all(state_table[p], epoch)
        for group, params, *_ in plans:
            cache = self.cache(group)
            if cache.get("initialized_key") != cache["validated_key"] or cache["validated_key"][-1] != epoch.value:
                cache["validated_key"] = cache["initialized_key"] = self._state_key(group, params)

    def run(self, plan: GroupPlan, amp: tuple) -> None:
        """Hand the group to its kernel.  ``amp``: a GradScaler's scale and inf flag.

        An offloaded group is stepped in buckets of whole params
        (:func:`adamkit.offload.buckets`): every bucket's copies to the host are queued at
        once, and each bucket is stepped as soon as its copies are in and pushed back
        while the next one steps, so that copies and host work overlap."""
        if plan.hosts is None:
            self.run_pulled(plan, amp)
            return
        spans = offload.buckets(plan.hosts)
        arrivals = [self.offload.pull(plan.params[s], plan.grads[s], plan.hosts[s], wait=False) for s in spans]
        for span, arrived in zip(spans, arrivals):
            arrived()
            self.run_pulled(_part_of(plan, span), amp, span if len(spans) > 1 else None)
        self.offload.settle()  # the caller's stream waits for the params' copies back

    def run_pulled(self, plan: GroupPlan, amp: tuple, span: slice | None = None) -> None:
        """:meth:`run`, for a group whose host buffers (if offloaded) hold this step's
        params and gradients already (gradient release pulls them in backward).
        ``span``: the plan is that part of its group (a bucket, with a kernel cache of
        its own)."""
        group, params, grads, kernel, checked, hosts = plan
        cache = group_cache = self.cache(group)
        if span is not None:
            cache = group_cache.setdefault(("bucket", span.start, span.stop), {})
        indices = self._param_indices(params) if group["seed"] is not None else None
        offsets = group_cache["offsets"]
        offsets = [offsets[id(p)] for p in params] if offsets is not None and indices is not None else None
        state_table, shards, held = self.optimizer.state, None, params
        if group_cache["sharded"]:  # DTensors: the kernels step each rank's local shard
            shards = params
            params, grads, state_table = sharding.local_view(params, grads, state_table)
        elif hosts is not None:
            params, grads, state_table = offload.host_view(hosts, params, state_table)
            amp = tuple(None if t is None else t.to(offload.HOST) for t in amp)
        grad_scale, found_inf = amp
        if found_inf is not None and not kernel.amp and grad_scale is not None:
            grads = unscaled(grads, grad_scale)
        guard = group_cache["host_guard" if hosts is not None else "guard"]
        key = (group_cache["validated_key"], guard.generation, span)
        batch = GroupBatch(params=params, grads=grads, state_table=state_table, cache=cache, key=key, checked=checked)
        batch.param_indices, batch.element_offsets, batch.shards = indices, offsets, shards
        if kernel.amp:
            batch.grad_scale, batch.found_inf = grad_scale, found_inf
            if found_inf is not None and grad_scale is None:
                batch.grad_scale = torch.ones((), device=found_inf.device)
        kernel.step(batch, UpdateRule.from_group(group, self.optimizer.algorithm))
        if kernel.fused:
            mark_written(params)
        if hosts is not None:
            self.offload.push(held, hosts)

    def _param_indices(self, params: list[Tensor]) -> list[int]:
        """Each param's position in the optimizer (its ``state_dict`` index): the
        stream of its stochastic rounding."""
        everything = [p for g in self.optimizer.param_groups for p in g["params"]]
        cached = self._param_index_cache
        identity = tuple(map(id, everything))
        if cached is None or cached[0] != identity:
            cached = self._param_index_cache = (identity, {id(p): i for i, p in enumerate(everything)})
        return [cached[1][id(p)] for p in params]


@contextmanager
def _outside_inference_mode():
    """Out of ``torch.inference_mode()`` where it is on (its tensors cannot be updated in
    place outside it), grad mode as it was; nothing otherwise."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    grad = torch.is_grad_enabled()
    with torch.inference_mode(False):
        with torch.set_grad_enabled(grad):  # (made once out: it sets the mode when made, not entered)
            yield


def _state_options(group: dict) -> tuple:
    """The options that shape or place a param's state."""
    return (
        bool(group.get("amsgrad")),
        group["rounding"],
        group["master_weights"],
        group["state_precision"],
        group["offload"],
    )


def _kind(p: Tensor) -> tuple:
    return (p.dtype, p.shape, p.device)


def _tensors_of(state: dict | None) -> dict:
    return {key: value for key, value in (state or {}).items() if isinstance(value, Tensor)}


def _part_of(plan: GroupPlan, span: slice) -> GroupPlan:
    """The params ``span`` of an offloaded group's plan, as a plan of their own."""
    checked = plan.checked
    rows = [row - span.start for row in checked.mismatched_rows if span.start <= row < span.stop]
    pairs = [(a - span.start, b - span.start) for a, b in checked.overlapping if span.start <= a and b < span.stop]
    part = CheckedTensors(checked.param_ptrs[span], checked.grad_ptrs[span], rows, pairs)
    return plan._replace(params=plan.params[span], grads=plan.grads[span], checked=part, hosts=plan.hosts[span])


__all__ = ["GroupPlan", "Stepper", "backend_name", "draw_seed_if_needed"]
