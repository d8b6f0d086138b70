r"""``torch.optim.Optimizer`` front: Adam, AdamW and AdaMax.

The front is thin: it validates a group, collects its tensors and state, advances
the step counters, asks :mod:`adamkit.rule` for the step's scalars and hands
everything to a kernel from :mod:`adamkit.kernels`.  Every group is validated
before any tensor is touched, so a step that raises leaves params and state as
they were.

Constructors take every argument of torch 2.13's ``torch.optim.Adam`` / ``AdamW`` /
``Adamax`` with the same defaults and meaning; adamkit's own options are
keyword-only:

``decouple_lr`` (fully decoupled weight decay)
    :math:`\theta \leftarrow \theta (1 - \frac{\eta_t}{\eta_{max}} \lambda)`: the decay
    follows the learning-rate *schedule* but not its magnitude.
``max_lr``
    :math:`\eta_{max}` for ``decouple_lr``, per param group; defaults to the
    group's initial lr.
``backend``
    ``None`` (pick per device), ``"reference"`` (per-tensor torch ops),
    ``"foreach"`` (multi-tensor ops), ``"cpu"`` (numba) or ``"triton"``.
    ``foreach=True`` and ``fused=True`` map onto the matching adamkit path.
    With a fused backend (``"cpu"``, ``"triton"`` or ``fused=True``) a
    ``torch.amp.GradScaler`` hands over its scale and inf flag, as it does to
    torch's fused optimizers: gradients are unscaled inside the kernel and left
    scaled in ``.grad``; on other paths the scaler unscales ``.grad`` in place.
``rounding``
    How bf16/fp16 params are stored after each update: ``"nearest"`` (torch's
    behaviour), ``"kahan"`` (a compensation buffer carries what rounding lost) or
    ``"stochastic"`` (unbiased random rounding, reproducible from ``seed``).  See
    :mod:`adamkit.rounding`.  fp32/fp64 params are unaffected.
``master_weights``
    ``"fp32"``: each bf16 param is the high half of an fp32 master weight whose low
    16 bits the optimizer keeps (``state["master_low_bits"]``, +2 bytes per param): the
    step runs on the fp32 master, and its bits are those of the same run on fp32
    params.  ``"24bit"``: 8 more bits (+1 byte), the master rounded stochastically to
    16 significant bits after each update.  ``None`` (the default): the param is the
    weight.  See
    :mod:`adamkit.master`; needs ``rounding="nearest"``; fp32/fp64 params are
    unaffected, fp16 params cannot split.
``state_precision``
    The moments' storage: ``None`` (the param's dtype, as torch), ``"fp32"``,
    ``"bf16"``, or block-wise quantized ``"int8"`` / ``"int4"`` (about 2 and 1 bytes
    per param for both moments; see :mod:`adamkit.quantization`).  Per param group,
    so a group (embeddings, say) can opt out.
``seed``
    The stochastic-rounding seed (an int in [0, 2**64)); ``None`` draws one from
    torch's default generator when a group first asks for stochastic rounding.
``skip_nonfinite``
    ``True``: a group whose gradients hold any NaN or infinity is not stepped at
    all (params, moments and step counters stay as they were) and the skip is
    counted in ``optimizer.skipped_steps``.  ``False`` (the default) follows
    torch.optim: non-finite gradients flow into the update.  The check reads one
    flag per group on the host (a sync on an accelerator).
``diagnostics``
    ``True``: record each gradient's norm at every step, for ``optimizer.stats()``
    (see :mod:`adamkit.diagnostics`); one extra norm per tensor, no host sync.
``accumulation_steps``
    N > 1: optimizer accumulation (:mod:`adamkit.accumulation`): each ``step()``
    folds one micro-batch's gradient into the moments, and the weights move on
    every N-th.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import repeat
from operator import attrgetter
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from . import accumulation, kernels, sharding
from .diagnostics import Recorder, group_stats
from .kernels import GroupBatch, Kernel
from .kernels.amp import unscaled
from .quantization import FORMATS
from .rounding import is_low_precision
from .rule import (
    Algorithm,
    UpdateRule,
    as_number,
    check_backend,
    check_constructor_arguments,
    check_hyperparameters,
    check_max_lr,
    check_storage,
    check_training_options,
)
from .state import check_state, init_state, moment_keys, state_dtype, upgrade_step

_grad_of = attrgetter("grad")
_is_sparse = attrgetter("is_sparse")
_device_of = attrgetter("device")


def _fused_devices() -> list[str]:
    """torch's list of devices with fused optimizer kernels (quoted in its error)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return _get_fused_kernels_supported_devices()
    except ImportError:  # pragma: no cover - older torch
        return ["mps", "cuda", "xpu", "hpu", "cpu", "mtia"]


def _all_finite(params: list[Tensor], grads: list[Tensor], sharded: bool) -> bool:
    """Whether no gradient holds a NaN or an infinity (max-abs norms: exact, no
    overflow).  Sharded gradients are checked shard by shard and the ranks agree (a
    collective), so that every rank skips the same steps."""
    if sharded:
        grads = list(map(sharding.local, grads))
    norms = torch._foreach_norm([g.detach() for g in grads], float("inf"))
    nonfinite = (~torch.stack([n.to(torch.float32) for n in norms]).isfinite()).sum(dtype=torch.float64)
    if sharded:
        nonfinite = sharding.sum_over_shards(nonfinite.reshape(1).cpu(), next(filter(sharding.is_sharded, params)))
    return not bool(nonfinite.item())


def _draw_seed_if_needed(group: dict, dtypes: set | None = None) -> None:
    """A group that rounds stochastically (a ``"stochastic"`` param rounding, or
    moments held in 16 bits or quantized) and has no seed gets one from torch's
    default generator (so ``torch.manual_seed`` makes runs reproducible); other groups
    draw nothing, leaving the user's random stream as torch.optim leaves it."""
    if group.get("seed") is None and _rounds_stochastically(group, dtypes):
        group["seed"] = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _rounds_stochastically(group: dict, dtypes: set | None) -> bool:
    """``dtypes``: the group's param dtypes (read from the group when not given)."""
    precision = group.get("state_precision")
    if group.get("rounding") == "stochastic" or precision in ("bf16", *FORMATS):
        return True
    if group.get("master_weights") == "24bit":
        return True
    if dtypes is None:
        dtypes = {p.dtype for p in group["params"]}
    return precision is None and any(map(is_low_precision, dtypes))


class _AdamFamily(Optimizer):
    """Shared machinery of :class:`Adam`, :class:`AdamW` and :class:`AdaMax`."""

    algorithm: ClassVar[Algorithm]
    #: torch.optim's message for a sparse gradient
    sparse_gradient_message: ClassVar[str]
    #: param-group keys adamkit adds to those of the torch.optim counterpart
    extra_group_keys: ClassVar[tuple[str, ...]] = (
        "backend",
        "decouple_lr",
        "max_lr",
        "rounding",
        "master_weights",
        "state_precision",
        "seed",
        "skip_nonfinite",
        "diagnostics",
        "accumulation_steps",
    )

    #: bookkeeping that is not state (so not pickled: torch's ``__getstate__`` keeps
    #: defaults, state and groups), with its defaults here: a changed state's epoch and
    #: count (in every group's cache key), the per-group caches, the params' indices
    _state_epoch: int = 0
    _state_changes: int = 0
    _group_caches: dict | None = None
    _param_index_cache: tuple | None = None
    #: the attached :class:`adamkit.release.GradientRelease` (see :meth:`attach_gradient_release`)
    _gradient_release = None
    #: whether :meth:`state_dict` exports every param's moments at full precision
    _export_full_precision: bool = False

    def _construct(
        self, params, torch_defaults: dict, *, backend, decouple_lr: bool, max_lr, storage: dict, training: dict
    ) -> None:
        """Validate (torch's checks first, then adamkit's), then build the optimizer."""
        d = torch_defaults
        betas = check_constructor_arguments(
            d["lr"],
            d["betas"],
            d["eps"],
            d["weight_decay"],
            foreach=d["foreach"],
            capturable=d["capturable"],
            adam_checks=self.algorithm == "adam",
        )
        check_backend(backend)
        if decouple_lr and max_lr is not None:
            check_max_lr(max_lr)
        check_storage(**storage, differentiable=d["differentiable"])
        check_training_options(**training, differentiable=d["differentiable"])
        defaults = {
            **d,
            "betas": betas,
            "backend": backend,
            "decouple_lr": decouple_lr,
            "max_lr": max_lr,
            **storage,
            **training,
        }
        self._recorder = Recorder()
        super().__init__(params, defaults)
        if d.get("fused"):  # after the params are in, as torch.optim.Adam checks
            if d["differentiable"]:
                raise RuntimeError("`fused` does not support `differentiable`")
            if d["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if d.get("fused") or (backend is not None and kernels.KERNELS[backend].amp):
            # like torch's fused optimizers: a GradScaler hands over grad_scale and
            # found_inf instead of unscaling the gradients in place
            self._step_supports_amp_scaling = True

    # ------------------------------------------------------------------ groups

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._check_new_group(group, len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()
            raise

    def _check_new_group(self, group: dict, index: int) -> None:
        where = f" in param_groups[{index}]"
        for j, p in enumerate(group["params"]):
            if not (p.is_floating_point() or p.is_complex()):
                raise TypeError(
                    f"{type(self).__name__} can only optimize floating-point or complex tensors, "
                    f"but params[{j}]{where} has dtype {p.dtype}"
                )
        if group.get("max_lr") is None:  # once lr itself is known to be good
            check_hyperparameters(
                lr=group["lr"], betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"], where=where
            )
            group["max_lr"] = as_number(group["lr"])
        self._check_group(group, where)
        _draw_seed_if_needed(group)

    def _check_group(self, group: dict, where: str) -> None:
        """Step-time checks: a scheduler or a hand edit may have changed the group.
        A capturable group's tensors are not read: on an accelerator that would sync."""
        lr, weight_decay = group["lr"], group["weight_decay"]
        check_hyperparameters(
            lr=lr,
            betas=group["betas"],
            eps=group["eps"],
            weight_decay=weight_decay,
            where=where,
            read_tensors=not group.get("capturable"),
        )
        check_backend(group.get("backend"), where=where)
        check_training_options(
            skip_nonfinite=group.get("skip_nonfinite", False),
            diagnostics=group.get("diagnostics", False),
            accumulation_steps=group.get("accumulation_steps", 1),
            differentiable=group["differentiable"],
            where=where,
        )
        check_storage(
            group.get("rounding", "nearest"),
            group.get("state_precision"),
            group.get("seed"),
            differentiable=group["differentiable"],
            master_weights=group.get("master_weights"),
            where=where,
        )
        if group.get("master_weights") is not None:
            for j, p in enumerate(group["params"]):
                if p.dtype == torch.float16:
                    raise ValueError(
                        f"master_weights={group['master_weights']!r} splits bf16 params, but params[{j}]{where} "
                        "is float16 (its exponent is not an fp32's): use bf16, or rounding='kahan' or 'stochastic'"
                    )
        if not group.get("decouple_lr"):
            return
        max_lr = group["max_lr"]
        check_max_lr(max_lr, where=where)
        if not isinstance(lr, Tensor) and (lr / max_lr) * weight_decay > 1:
            raise ValueError(
                f"fully decoupled weight decay would flip the params' sign{where}: "
                f"1 - (lr / max_lr) * weight_decay = 1 - ({lr} / {max_lr}) * {weight_decay} < 0 "
                "(keep lr <= max_lr / weight_decay)"
            )

    @property
    def skipped_steps(self) -> int:
        """Group steps skipped under ``skip_nonfinite``, all groups together."""
        return sum(self._recorder.skips.values())

    def stats(self) -> list[dict[str, float]]:
        """Per param group: what the last step did (see :mod:`adamkit.diagnostics`)."""
        return [group_stats(self, i, self._recorder) for i in range(len(self.param_groups))]

    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "skipped_steps_by_group": dict(self._recorder.skips)}

    def __setstate__(self, state: dict) -> None:
        skips = state.pop("skipped_steps_by_group", {})
        super().__setstate__(state)
        self._state_epoch += 1  # state may be new: validate again
        self._recorder = Recorder()
        self._recorder.skips.update(skips)
        for group in self.param_groups:
            for key, default in self._torch_group_defaults().items():
                group.setdefault(key, default)
            group.setdefault("backend", None)
            group.setdefault("decouple_lr", False)
            group.setdefault("max_lr", as_number(group["lr"]))
            group.setdefault("rounding", "nearest")
            group.setdefault("master_weights", None)
            group.setdefault("state_precision", None)
            group.setdefault("seed", None)
            group.setdefault("skip_nonfinite", False)
            group.setdefault("diagnostics", False)
            group.setdefault("accumulation_steps", 1)
            for p in group["params"]:
                upgrade_step(self.state.get(p, {}), p, group)

    def _torch_group_defaults(self) -> dict[str, Any]:
        return {"maximize": False, "foreach": None, "capturable": False, "differentiable": False}

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict.  A sharded (DTensor) param's quantized moments are
        exported as fp32 DTensors under torch's keys, so the checkpoint does not depend
        on the number of ranks (see :mod:`adamkit.sharding`); within
        :func:`adamkit.convert.full_precision_export`, every param's are."""
        state_dict = super().state_dict()
        states, moments = state_dict["state"], moment_keys(self.algorithm, True)
        every_param = self._export_full_precision
        for index, param in enumerate(p for g in self.param_groups for p in g["params"]):
            if index in states and (every_param or sharding.is_sharded(param)):
                states[index] = sharding.exported_state(states[index], param, moments)
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from adamkit or torch.optim.

        A torch.optim state dict lacks adamkit's group keys; those keep the values
        this optimizer was constructed with rather than falling back to defaults.
        For sharded (DTensor) params, full tensors (a single-process checkpoint) are
        cut to this rank's shard.
        """
        previous = [{k: g[k] for k in self.extra_group_keys if k in g} for g in self.param_groups]
        saved_groups = state_dict["param_groups"]
        super().load_state_dict(state_dict)
        for group, saved, before in zip(self.param_groups, saved_groups, previous):
            for key, value in before.items():
                if key not in saved:
                    group[key] = value
        self._restore_stored_dtypes(state_dict)
        moments = moment_keys(self.algorithm, True)
        for param in (p for g in self.param_groups for p in g["params"]):
            if sharding.is_sharded(param) and self.state.get(param):
                sharding.shard_loaded_state(self.state[param], param, moments)

    def _restore_stored_dtypes(self, state_dict: dict[str, Any]) -> None:
        """torch casts every loaded state tensor to its param's dtype.  Tensors adamkit
        keeps in their own dtype (quantized codes and scales; moments under a
        ``state_precision``) are copied again from the saved tensors, so nothing is
        rounded on the way in.  The step converts any remaining mismatch."""
        saved_states = state_dict["state"]
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (param, group) in zip(saved_ids, params):
            saved, state = saved_states.get(saved_id), self.state.get(param)
            if not saved or not state:
                continue
            moments = moment_keys(self.algorithm, True)
            for key, value in saved.items():
                if key == "step" or not torch.is_tensor(value) or key not in state:
                    continue
                if key in moments and group.get("state_precision") is None:
                    continue  # torch's behaviour: moments follow the param's dtype
                if state[key].dtype != value.dtype:
                    state[key] = value.to(device=param.device, copy=True)

    # ------------------------------------------------------------------ step

    def _backend_name(self, group: dict, devices: set[torch.device]) -> str | None:
        """``backend`` if given; else torch's flags mapped onto adamkit's paths."""
        backend = group.get("backend")
        if backend is not None:
            return backend
        if group.get("fused"):
            return kernels.fused_backend(devices)
        if group.get("foreach"):
            return "foreach"
        if group.get("foreach") is False:
            return "reference"
        return None

    def _group_cache(self, group: dict) -> dict:
        """A per-group scratch dict for validation keys and kernels' derived data;
        not part of the optimizer's state (rebuilt after pickling or deepcopy)."""
        if self._group_caches is None:
            self._group_caches = {}
        caches = self._group_caches
        entry = caches.get(id(group))
        if entry is None or entry[0] is not group:
            entry = caches[id(group)] = (group, {})
        return entry[1]

    def _plan_group(self, index: int, group: dict) -> tuple[dict, list[Tensor], list[Tensor], Kernel] | None:
        """Validate one group, its params and their state, and pick its kernel; touches nothing.

        Per-param work is kept to a few C-level passes (this runs every step, for
        groups of thousands of tensors); state is validated again only when the set of
        params, ``amsgrad`` or the optimizer's state may have changed.
        """
        where = f" in param_groups[{index}]"
        self._check_group(group, where)
        params = group["params"]
        grads = list(map(_grad_of, params))
        if any(map(operator.is_, grads, repeat(None))):  # identity: ``None in`` would call Tensor.__eq__
            params = [p for p, g in zip(params, grads) if g is not None]
            grads = [g for g in grads if g is not None]
        if not params:
            return None
        if any(map(_is_sparse, grads)):
            raise RuntimeError(self.sparse_gradient_message)
        differentiable = group["differentiable"]
        cache = self._group_cache(group)
        key = self._state_key(group, params)
        if cache.get("validated_key") != key or differentiable:
            self._check_params_and_state(group, params, where)
            cache["validated_key"], cache["devices"] = key, set(map(_device_of, params))
            cache["dtypes"] = set(map(attrgetter("dtype"), params))
            cache["sharded"] = any(map(sharding.is_sharded, params))
            cache["offsets"] = {id(p): sharding.element_offset(p) for p in params} if cache["sharded"] else None
        _draw_seed_if_needed(group, cache["dtypes"])  # rounding or state_precision may have changed
        if (
            self.algorithm == "adam"
            and group.get("foreach")
            and isinstance(group["lr"], Tensor)
            and not group.get("capturable")
        ):
            raise RuntimeError("lr as a Tensor is not supported for capturable=False and foreach=True")
        devices = cache["devices"]
        kernel = kernels.resolve(self._backend_name(group, devices), devices, differentiable=differentiable)
        if group.get("accumulation_steps", 1) > 1:
            kernel = accumulation.KERNEL
        return group, params, grads, kernel

    def _check_params_and_state(self, group: dict, params: list[Tensor], where: str) -> None:
        differentiable = group["differentiable"]
        for j, p in enumerate(params):
            try:
                state_dtype(p, group.get("state_precision"))
            except ValueError as error:
                raise ValueError(f"{error} (params[{j}]{where})") from None
            state = self.state.get(p)
            if state and sharding.is_sharded(p):  # the kernels see the local shard
                state, p = sharding.LocalState(state, p), sharding.local(p)
            if state:
                check_state(state, p, self.algorithm, amsgrad=bool(group.get("amsgrad")), where=f" of {where[4:]}")
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
        the params' identities, ``amsgrad``, and the state table's identity, size and
        epoch (``load_state_dict`` bumps it).  Replacing individual state tensors by
        hand is not tracked: reset state with ``load_state_dict`` or ``state.clear()``.
        ``rounding`` and ``state_precision`` shape the state too."""
        return (
            tuple(map(id, params)),
            bool(group.get("amsgrad")),
            group.get("rounding"),
            group.get("master_weights"),
            group.get("state_precision"),
            id(self.state),
            len(self.state),
            self._state_epoch,
            self._state_changes,
        )

    def _initialize_states(self, plans: list[tuple]) -> None:
        """Bring the state of every planned group in line with it (allocate, convert),
        before any group steps; then key each group on its state as it now stands, so
        that the next step finds the same keys and validates and rebuilds nothing (a
        CUDA graph of ``step()`` can be captured after one eager step, as with
        torch.optim).  A change counts in every key: a state emptied by hand and
        filled again is never mistaken for the old one."""
        changed = False
        for group, params, grads, _ in plans:
            cache = self._group_cache(group)
            if cache.get("initialized_key") == cache["validated_key"]:
                continue
            state_table = self.state
            if cache["sharded"]:  # DTensors: the local shards' state
                params, _, state_table = sharding.local_view(params, grads, self.state)
            for p in params:
                changed |= init_state(state_table[p], p, group, self.algorithm)
        if changed:
            self._state_changes += 1
        for group, params, _, _ in plans:
            cache = self._group_cache(group)
            if changed or cache.get("initialized_key") != cache["validated_key"]:
                cache["validated_key"] = cache["initialized_key"] = self._state_key(group, params)

    def _run_group(self, group: dict, params: list[Tensor], grads: list[Tensor], kernel: Kernel, amp: tuple) -> None:
        cache = self._group_cache(group)
        key = cache["validated_key"]
        grad_scale, found_inf = amp
        indices = self._param_indices(params) if group.get("seed") is not None else None
        offsets = cache["offsets"]
        offsets = [offsets[id(p)] for p in params] if offsets is not None and indices is not None else None
        state_table = self.state
        if cache["sharded"]:  # DTensors: the kernels step each rank's local shard
            params, grads, state_table = sharding.local_view(params, grads, self.state)
        if found_inf is not None and not kernel.amp and grad_scale is not None:
            grads = unscaled(grads, grad_scale)
        batch = GroupBatch(params=params, grads=grads, state_table=state_table, cache=cache, key=key)
        batch.param_indices, batch.element_offsets = indices, offsets
        if kernel.amp:
            batch.grad_scale, batch.found_inf = grad_scale, found_inf
            if found_inf is not None and grad_scale is None:
                batch.grad_scale = torch.ones((), device=found_inf.device)
        kernel.step(batch, UpdateRule.from_group(group, self.algorithm))

    def _param_indices(self, params: list[Tensor]) -> list[int]:
        """Each param's position in the optimizer (its ``state_dict`` index): the
        stream of its stochastic rounding."""
        everything = [p for g in self.param_groups for p in g["params"]]
        cached = self._param_index_cache
        identity = tuple(map(id, everything))
        if cached is None or cached[0] != identity:
            cached = self._param_index_cache = (identity, {id(p): i for i, p in enumerate(everything)})
        return [cached[1][id(p)] for p in params]

    @torch.compiler.disable
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one optimization step.

        Inside ``torch.compile``d code the step is a graph break: it runs as it runs
        eagerly (its paths are fused already), so nothing in it is traced or guarded
        on, and a learning rate changed by a scheduler (a float or a tensor) never
        causes a recompilation.

        Args:
            closure (Callable, optional): re-evaluates the model and returns the loss.
        """
        health_check = getattr(self, "_accelerator_graph_capture_health_check", None) or getattr(
            self, "_cuda_graph_capture_health_check", lambda: None
        )
        health_check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._gradient_release is not None:
            return loss  # params were stepped in backward (adamkit.gradient_release)
        plans = [(i, plan) for i, g in enumerate(self.param_groups) if (plan := self._plan_group(i, g)) is not None]
        # A torch.amp.GradScaler sets these when _step_supports_amp_scaling (fused=True).
        amp = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if amp[1] is not None and not all(plan[3].amp for _, plan in plans) and amp[1].item():
            return loss  # a kernel that cannot skip in-kernel: skip the whole step, touching nothing
        admitted = [plan for index, plan in plans if self._admit(index, plan, amp[0])]
        self._initialize_states(admitted)
        for plan in admitted:
            self._run_group(*plan, amp)
        return loss

    def _admit(self, index: int, plan: tuple, grad_scale: Tensor | None) -> bool:
        """Record diagnostics, then whether the group may step (``skip_nonfinite``)."""
        group, params, grads, _ = plan
        if group.get("diagnostics"):
            self._recorder.record(group, params, grads, grad_scale)
        sharded = self._group_cache(group).get("sharded", False)
        if group.get("skip_nonfinite") and not _all_finite(params, grads, sharded):
            self._recorder.skips[index] += 1
            return False
        return True

    def attach_gradient_release(self, release) -> None:
        """Hook for :func:`adamkit.gradient_release`: while ``release`` is attached, it
        steps each param in backward (with :meth:`step_param`) and ``step()`` only runs
        its closure."""
        if self._gradient_release is not None:
            raise RuntimeError("this optimizer already has gradient release attached (call handle.remove() first)")
        self._gradient_release = release

    def detach_gradient_release(self, release) -> None:
        """Undo :meth:`attach_gradient_release` (nothing if ``release`` is not attached)."""
        if self._gradient_release is release:
            self._gradient_release = None

    @contextmanager
    def full_precision_state_dict(self) -> Iterator[None]:
        """Hook for :func:`adamkit.convert.full_precision_export`: within it,
        :meth:`state_dict` exports every param's quantized moments as fp32."""
        previous, self._export_full_precision = self._export_full_precision, True
        try:
            yield
        finally:
            self._export_full_precision = previous

    def step_param(self, index: int, group: dict, view: dict, amp: tuple = (None, None)) -> None:
        """Step one param as ``step()`` would step it in ``param_groups[index]``
        (``group``): ``view`` is that param's one-param group, brought up to date with
        ``group`` first.  ``amp``: a GradScaler's scale and this param's inf flag.
        Gradient release calls it from each param's post-accumulate-grad hook."""
        _draw_seed_if_needed(group, {p.dtype for p in view["params"]})  # the group's seed, not one per view
        view.update((key, value) for key, value in group.items() if key != "params")
        plan = self._plan_group(index, view)
        if plan is None or not self._admit(index, plan, amp[0]):
            return
        if amp[1] is not None and not plan[3].amp and amp[1].item():
            return  # a kernel that cannot skip in-kernel: skip here
        self._initialize_states([plan])
        self._run_group(*plan, amp)


class Adam(_AdamFamily):
    r"""Adam (Kingma & Ba, 2015), a drop-in for ``torch.optim.Adam``.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    Args are those of ``torch.optim.Adam`` (same defaults, same meaning), plus the
    keyword-only ``decouple_lr``, ``max_lr``, ``backend``, ``rounding``,
    ``master_weights``, ``state_precision``, ``seed``, ``skip_nonfinite``,
    ``diagnostics`` and ``accumulation_steps`` described in :mod:`adamkit.optim`.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    """

    algorithm = "adam"
    sparse_gradient_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        torch_defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        storage = {
            "rounding": rounding,
            "master_weights": master_weights,
            "state_precision": state_precision,
            "seed": seed,
        }
        self._construct(
            params,
            torch_defaults,
            backend=backend,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            storage=storage,
            training={
                "skip_nonfinite": skip_nonfinite,
                "diagnostics": diagnostics,
                "accumulation_steps": accumulation_steps,
            },
        )

    def _torch_group_defaults(self) -> dict[str, Any]:
        return {
            **super()._torch_group_defaults(),
            "amsgrad": False,
            "decoupled_weight_decay": False,
            "fused": None,
        }


class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, 2019), a drop-in for ``torch.optim.AdamW``.

    Adam with decoupled weight decay :math:`\theta \leftarrow \theta (1 - \eta\lambda)`
    applied before the update, so decay never enters the moments.  Default
    ``weight_decay=1e-2`` as in torch.
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            foreach=foreach,
            maximize=maximize,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
            decoupled_weight_decay=True,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            backend=backend,
            rounding=rounding,
            master_weights=master_weights,
            state_precision=state_precision,
            seed=seed,
            skip_nonfinite=skip_nonfinite,
            diagnostics=diagnostics,
            accumulation_steps=accumulation_steps,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class AdaMax(_AdamFamily):
    r"""AdaMax (Kingma & Ba, 2015, Algorithm 2), a drop-in for ``torch.optim.Adamax``.

    .. math::

        m_t = \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        u_t = \max(\beta_2 u_{t-1}, |g_t| + \epsilon), \qquad
        \theta_t = \theta_{t-1} - \frac{\eta}{1 - \beta_1^t} \frac{m_t}{u_t}

    Args are those of ``torch.optim.Adamax``; beyond torch, keyword-only
    ``decoupled_weight_decay`` and those described in :mod:`adamkit.optim`.
    """

    algorithm = "adamax"
    sparse_gradient_message = "Adamax does not support sparse gradients"
    extra_group_keys = _AdamFamily.extra_group_keys + ("decoupled_weight_decay",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        capturable: bool = False,
        decoupled_weight_decay: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
    ) -> None:
        torch_defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "foreach": foreach,
            "maximize": maximize,
            "differentiable": differentiable,
            "capturable": capturable,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        storage = {
            "rounding": rounding,
            "master_weights": master_weights,
            "state_precision": state_precision,
            "seed": seed,
        }
        self._construct(
            params,
            torch_defaults,
            backend=backend,
            decouple_lr=decouple_lr,
            max_lr=max_lr,
            storage=storage,
            training={
                "skip_nonfinite": skip_nonfinite,
                "diagnostics": diagnostics,
                "accumulation_steps": accumulation_steps,
            },
        )

    def _torch_group_defaults(self) -> dict[str, Any]:
        return {**super()._torch_group_defaults(), "decoupled_weight_decay": False}


#: torch.optim's spelling, for drop-in imports
Adamax = AdaMax

__all__ = ["Adam", "AdamW", "AdaMax", "Adamax"]
