r"""``torch.optim.Optimizer`` front: Adam, AdamW, AdaMax, NAdam, RAdam, ADOPT and StableAdamW.

The front keeps the signatures and ``step``.  How a group is stepped (validated,
its state initialized, handed to a kernel from :mod:`adamkit.kernels` with the
scalars of :mod:`adamkit.rule`) is :mod:`adamkit.stepping`'s; what a checkpoint
holds is :mod:`adamkit.convert`'s.  Every group is validated before any tensor is
touched, so a step that raises leaves params and state as they were.

Constructors take every argument of torch 2.13's ``torch.optim.Adam`` / ``AdamW`` /
``Adamax`` with the same defaults and meaning; adamkit's own options are
keyword-only:

``decouple_lr``, ``max_lr``, ``backend``, ``rounding``, ``master_weights``,
``state_precision``, ``seed``, ``skip_nonfinite``, ``cautious``, ``diagnostics``,
``accumulation_steps`` and ``offload``, each described (with its default and its check) in the
option table of :mod:`adamkit.options`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _use_grad_for_differentiable

from . import convert, kernels, options
from .algorithms import ADAM, ADAMAX, ADEMAMIX, ADOPT, NADAM, RADAM, SCHEDULE_FREE_ADAMW, STABLE_ADAMW, lookup
from .algorithms.base import number_of
from .diagnostics import SKIPPED_STEPS_KEY, Recorder, group_stats, saved_skip_counts
from .kernels.cpu import fork_safe_threads
from .offload import HostStep
from .rule import Algorithm, as_number
from .specs.master import MASTER_KEY, join_tensors, split_into
from .state import COMPENSATION_KEY, check_saved_counters, upgrade_step
from .statekeeping import StateEpoch, tracked
from .stepping import Stepper, draw_seed_if_needed

#: the group flags torch.optim's ``__setstate__`` fills where a loaded group lacks them
TORCH_DEFAULTED_FLAGS = (
    "amsgrad",
    "maximize",
    "foreach",
    "capturable",
    "differentiable",
    "fused",
    "decoupled_weight_decay",
)


class _AdamFamily(Optimizer):
    """Shared machinery of :class:`Adam`, :class:`AdamW` and :class:`AdaMax`."""

    algorithm: ClassVar[Algorithm]
    #: torch.optim's message for a sparse gradient
    sparse_gradient_message: ClassVar[str]
    #: param-group keys adamkit adds to those of the torch.optim counterpart
    extra_group_keys: ClassVar[tuple[str, ...]] = tuple(options.DEFAULTS)
    #: options this algorithm does not run yet (they must keep their defaults)
    unavailable_options: ClassVar[tuple[str, ...]] = ()
    #: torch.optim arguments (``capturable``, ``differentiable``) it does not run: they must be False
    unavailable_arguments: ClassVar[tuple[str, ...]] = ()

    #: whether :meth:`state_dict` exports every param's moments at full precision
    _export_full_precision: bool = False
    #: whether an added group draws its seed at once (not while the constructor checks)
    _drawing_seeds: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # adamkit's own classes are held to the option table; a subclass written
        # elsewhere (a user's, or the class Lightning derives to wrap an optimizer) may
        # take whatever arguments it likes
        if cls.__module__.partition(".")[0] == __name__.partition(".")[0]:
            options.check_signature(cls)

    def _construct(self, params, arguments: dict[str, Any]) -> None:
        """Validate a constructor's ``arguments`` (torch's checks first, then adamkit's),
        then build the optimizer."""
        torch_arguments, values = options.split_arguments(arguments)
        options.renew_values(values)
        betas = options.check_constructor_arguments(
            torch_arguments, adam_checks=lookup(self.algorithm).tensor_hyperparameter_checks
        )
        differentiable = torch_arguments["differentiable"]
        options.check_options(values, differentiable=differentiable)
        self._refuse_unavailable({**torch_arguments, **values})
        self._recorder = Recorder()
        self._stepper = Stepper(self, self._recorder)
        self._drawing_seeds = False  # until every check has passed: a refused constructor draws nothing
        super().__init__(params, {**torch_arguments, "betas": betas, **values})
        #: advances whenever the state changes (see :mod:`adamkit.statekeeping`)
        self.state_epoch = StateEpoch()
        self.state = tracked(self.state, self.state_epoch)
        fused = torch_arguments.get("fused")
        if fused:  # after the params are in, as torch.optim.Adam checks
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if torch_arguments["foreach"]:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        if fused or (values["backend"] is not None and kernels.KERNELS[values["backend"]].amp):
            # like torch's fused optimizers: a GradScaler hands over grad_scale and
            # found_inf instead of unscaling the gradients in place
            self._step_supports_amp_scaling = True
        del self._drawing_seeds
        for group in self.param_groups:
            draw_seed_if_needed(group)

    def _refuse_unavailable(self, values: Mapping[str, Any], where: str = "") -> None:
        """Raise ``ValueError`` naming an adamkit option (``unavailable_options``) or a
        torch.optim flag (``unavailable_arguments``) this class does not run, whether
        given to the constructor, to ``add_param_group`` or set in a group by hand."""
        options.check_available(values, self.unavailable_options, type(self).__name__, where)
        for name in self.unavailable_arguments:
            if values.get(name):
                raise ValueError(
                    f"{name}={values[name]!r}{where}: {type(self).__name__} does not run it; leave it False"
                )

    @classmethod
    def _group_defaults(cls) -> dict[str, Any]:
        """Every key of a param group with its default (the constructor's), for groups
        pickled by an older version; ``max_lr`` follows the group's lr.  The constructor
        read is adamkit's own class's: a subclass's (a user's, with its own arguments, or
        the one Lightning derives to wrap an optimizer) need not name the options."""
        own = next(k for k in cls.__mro__ if k.__module__ == __name__ and "__init__" in vars(k))
        parameters = inspect.signature(own.__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty}
        del defaults["max_lr"]
        return defaults

    @classmethod
    def _defaulted_group_keys(cls) -> frozenset[str]:
        """The group keys a loaded or unpickled group may lack, filled with their defaults:
        adamkit's options (an older adamkit, or torch.optim, saved none) and the flags
        torch.optim's own ``__setstate__`` fills.  The hyperparameters are never filled."""
        return frozenset((*options.DEFAULTS, *cls.extra_group_keys, *TORCH_DEFAULTED_FLAGS))

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group, index = self.param_groups[-1], len(self.param_groups) - 1
        where = f" in param_groups[{index}]"
        try:
            for j, p in enumerate(group["params"]):
                if not (p.is_floating_point() or p.is_complex()):
                    raise TypeError(
                        f"{type(self).__name__} can only optimize floating-point or complex tensors, "
                        f"but params[{j}]{where} has dtype {p.dtype}"
                    )
            if group["max_lr"] is None:  # once lr itself is known to be good
                lr, betas, eps, weight_decay = (group[k] for k in ("lr", "betas", "eps", "weight_decay"))
                options.check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, where=where)
                group["max_lr"] = as_number(group["lr"])
            options.check_group(group, where)
            self._refuse_unavailable(group, where)
            if self._drawing_seeds:
                draw_seed_if_needed(group)
        except Exception:
            self.param_groups.pop()
            raise

    @property
    def skipped_steps(self) -> int:
        """Group steps skipped under ``skip_nonfinite``, all groups together."""
        return sum(self._recorder.skips.values())

    def stats(self) -> list[dict[str, float]]:
        """Per param group: what the last step did (see :mod:`adamkit.diagnostics`)."""
        return [group_stats(self, i, self._recorder) for i in range(len(self.param_groups))]

    def __getstate__(self) -> dict:
        self.wait_for_host_steps()  # (a copy or a pickle of a state still being stepped would be torn)
        return {**super().__getstate__(), "skipped_steps_by_group": dict(self._recorder.skips)}

    def __setstate__(self, state: dict) -> None:
        skips = state.pop("skipped_steps_by_group", None)
        if skips is None:  # load_state_dict: each saved group may carry its count (see state_dict)
            skips = saved_skip_counts(state.get("param_groups", []))
        super().__setstate__(state)
        self.state_epoch = self.__dict__.get("state_epoch") or StateEpoch()
        self.state = tracked(self.state, self.state_epoch)
        self._recorder = Recorder()
        self._recorder.skips.update(skips)
        stepper = self.__dict__.get("_stepper")
        if stepper is None:  # unpickled
            self._stepper = Stepper(self, self._recorder)
        else:  # load_state_dict: the state may be new, so validate again (an attached release stays)
            stepper.restart(self._recorder)
        defaults = self._group_defaults()
        for i, group in enumerate(self.param_groups):
            where = f" in param_groups[{i}]"
            missing = [key for key in defaults if key not in group and key not in self._defaulted_group_keys()]
            if missing:
                raise ValueError(
                    f"the hyperparameters {missing} are missing{where}: a group loaded without them would step with "
                    "the class defaults, not the values this optimizer was made with (torch.optim fails at its "
                    "step); was the state dict edited, or saved by an optimizer without them?"
                )
            for key, default in defaults.items():
                group.setdefault(key, default)
            options.renew_values(group, where)
            group.setdefault("max_lr", number_of("lr", group["lr"], where))
            for j, p in enumerate(group["params"]):
                upgrade_step(self.state.get(p, {}), p, group, f" of params[{j}] in param_groups[{i}]")

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, finished by :func:`adamkit.convert.export_state`:
        a sharded (DTensor) param's quantized moments are exported as fp32 DTensors
        under torch's keys; within :func:`adamkit.convert.full_precision_export`,
        every param's are.  Each group carries its count of skipped steps
        (``skipped_steps``, see :mod:`adamkit.diagnostics`).  Host steps still running
        (offload under gradient release) finish first."""
        self.wait_for_host_steps()
        state_dict = convert.export_state(self, super().state_dict(), full_precision=self._export_full_precision)
        for index, group in enumerate(state_dict["param_groups"]):  # (torch's copies of the groups)
            group[SKIPPED_STEPS_KEY] = self._recorder.skips[index]
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from adamkit or torch.optim (see :func:`adamkit.convert.import_state`):
        adamkit's options missing from a torch.optim state dict keep this optimizer's values.
        An offloaded group's state is loaded into host memory (never through the device).
        As with torch.optim, a tensor already of its param's dtype and device is kept, not
        copied: to load another optimizer's ``state_dict()`` while that one goes on
        stepping, load ``copy.deepcopy`` of it.  A fused kernel addresses only memory the
        optimizer alone holds (:mod:`adamkit.statekeeping`): its first step copies each
        loaded tensor into such memory, one at a time, so a checkpoint the caller keeps
        (``ckpt = torch.load(...)`` left in scope) holds a second copy of the state: drop
        it after loading."""
        self.wait_for_host_steps()
        before = [{k: g[k] for k in self.extra_group_keys if k in g} for g in self.param_groups]
        loading = {}

        def take_hooked(optimizer, hooked: dict) -> dict:
            """The last pre-hook: adamkit's part of the load reads the state dict as the
            user's pre-hooks left it (one remapped by param name, say)."""
            check_saved_counters(hooked)
            torch_part, loading["host_states"] = convert.split_offloaded(self, hooked, before)
            loading["state_dict"] = hooked
            return torch_part

        def finish(optimizer) -> None:
            """The first post-hook: the user's post-hooks see (and may change) the loaded state."""
            convert.load_offloaded(self, loading["host_states"])
            convert.import_state(self, loading["state_dict"], before)

        # torch replaces the optimizer's groups and state with new objects, so keeping the
        # old ones puts everything back where a malformed state dict fails half-way
        attributes = dict(self.__dict__)
        handles = (
            self.register_load_state_dict_pre_hook(take_hooked),
            self.register_load_state_dict_post_hook(finish, prepend=True),
        )
        try:
            super().load_state_dict(state_dict)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(attributes)
            raise
        finally:
            for handle in handles:
                handle.remove()

    @torch.compiler.disable
    @_use_grad_for_differentiable
    def step(self, closure=None):
        """Perform one optimization step.

        Inside code compiled by ``torch.compile`` the step is a graph break: it runs as
        it runs eagerly (its paths are fused already), so nothing in it is traced or
        guarded on, and a learning rate changed by a scheduler (a float or a tensor)
        never causes a recompilation.

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
        release = self._gradient_release
        if release is not None:  # params were stepped in backward (adamkit.gradient_release)
            unreleased = release.unreleased()
            if unreleased and (release.scaler is not None or release.max_grad_norm is not None):
                raise RuntimeError(
                    f"params {unreleased} (group, index) have gradients that gradient_release did not release "
                    "(they were frozen when it was attached, or not passed to it), and with its "
                    f"{'scaler' if release.scaler is not None else 'max_grad_norm'} they cannot be stepped with the "
                    "others: attach it again (handle.remove(), then gradient_release(...)) after unfreezing them"
                )
            release.finish()  # offloaded params: their host steps are done and copied back
            if not unreleased:
                return loss
        with fork_safe_threads():
            self._step_groups()
        return loss

    def _step_groups(self) -> None:
        """Plan every group (nothing is written until all are valid), then step them."""
        stepper = self._stepper
        plans = [(i, plan) for i, g in enumerate(self.param_groups) if (plan := stepper.plan(i, g)) is not None]
        # A torch.amp.GradScaler sets these when _step_supports_amp_scaling (fused=True).
        amp = (getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        if amp[1] is not None and not all(plan.kernel.amp for _, plan in plans) and amp[1].item():
            return  # a kernel that cannot skip in-kernel: skip the whole step, touching nothing
        advance, idle = lookup(self.algorithm).advance, []
        if advance is not None:  # groups without gradients move their running values too
            planned = {id(plan.group) for _, plan in plans}
            idle = [(i, g) for i, g in enumerate(self.param_groups) if id(g) not in planned]
        for i, group in idle:  # (valid first)
            options.check_group(group, f" in param_groups[{i}]")
        for _, plan in plans:  # every group is valid: only now draw what a group lacks
            draw_seed_if_needed(plan.group, stepper.cache(plan.group)["dtypes"])
        admitted = [plan for index, plan in plans if stepper.admit(index, plan, amp)]
        stepper.initialize(admitted)
        if advance is not None and amp[1] is not None and amp[1].item():
            advance = None  # a GradScaler's inf, skipped in the kernel: the running values stay too
        if advance is not None:  # the groups' own running values (schedule-free's), once per step
            for group in [g for _, g in idle] + [plan.group for plan in admitted]:
                advance(group)
        for plan in admitted:
            stepper.run(plan, amp)

    def step_param(
        self, index: int, group: dict, view: dict, amp: tuple = (None, None), hold: bool = False
    ) -> HostStep | None:
        """Step one param as ``step()`` would step it in ``param_groups[index]``
        (``group``): ``view`` is that param's one-param group, brought up to date with
        ``group`` first.  ``amp``: a GradScaler's scale and this param's inf flag.
        Gradient release calls it from each param's post-accumulate-grad hook.

        An offloaded param is validated and its gradient copied to the host here, and
        its :class:`~adamkit.offload.HostStep` returned, to be run
        (:meth:`submit_host_step`) once its gradient may be used as it is; the param is
        copied too, unless ``hold``: a step held until ``step()`` (clipping) reads the
        param then, as ``step()`` without release would."""
        with fork_safe_threads():
            return self._step_view(index, group, view, amp, hold)

    def submit_host_step(self, host_step: HostStep) -> None:
        """Run ``host_step`` on the host worker thread (see :mod:`adamkit.offload`)."""
        self._stepper.offload.worker.submit(host_step.run)

    def wait_for_host_steps(self, *, from_any_thread: bool = False) -> None:
        """Return when every submitted host step has run and its params are copied back
        (the current CUDA streams wait for the copies, or with ``from_any_thread`` the
        host waits for them); raise the first error one raised."""
        offload = self._stepper.offload
        offload.worker.join()
        if from_any_thread:
            offload.wait_for_pushes()
        else:
            offload.settle()

    def _step_view(self, index: int, group: dict, view: dict, amp: tuple, hold: bool) -> HostStep | None:
        view.update((key, value) for key, value in group.items() if key != "params")
        stepper = self._stepper
        plan = stepper.plan(index, view)
        if plan is None:
            return
        draw_seed_if_needed(group, {p.dtype for p in view["params"]})  # the group's seed, not one per view
        view["seed"] = group["seed"]
        if amp[1] is not None and not plan.kernel.amp and amp[1].item():
            return None  # a kernel that cannot skip in-kernel: skip here (recording nothing)
        if not stepper.admit(index, plan, amp):
            return
        stepper.initialize([plan])
        if plan.hosts is None:
            stepper.run(plan, amp)
            return None
        arrived = [stepper.offload.pull(None if hold else plan.params, plan.grads, plan.hosts, wait=False)]

        def run() -> None:
            for ready in arrived:
                ready()
            with fork_safe_threads():
                stepper.run_pulled(plan, amp)

        if not hold:
            return HostStep(run, [h.grad for h in plan.hosts])
        made_for = stepper.made_for(view, plan.params)

        def changed_since(now: dict) -> str | None:
            view.update((key, value) for key, value in now.items() if key != "params")
            return stepper.changed_since(view, plan.params, made_for)

        def pull_params() -> None:
            arrived.append(stepper.offload.pull(plan.params, None, plan.hosts, wait=False))

        return HostStep(run, [h.grad for h in plan.hosts], arrived[0], changed_since, pull_params)

    @property
    def _gradient_release(self):
        """The attached :class:`adamkit.release.GradientRelease` (see
        :meth:`attach_gradient_release`), kept by the step engine: a framework's wrapper
        made a subclass of this optimizer's class that forwards the attributes it lacks
        (Lightning's ``LightningOptimizer``) reaches the same engine, so its ``step`` and
        ``zero_grad`` see the handle too (a class-level default had shadowed it there)."""
        return self._stepper.release

    def attach_gradient_release(self, release) -> None:
        """Hook for :func:`adamkit.gradient_release`: while ``release`` is attached, it
        steps each param in backward (with :meth:`step_param`) and ``step()`` only runs
        its closure."""
        if self._gradient_release is not None:
            raise RuntimeError("this optimizer already has gradient release attached (call handle.remove() first)")
        running = ", ".join(lookup(self.algorithm).group_state)
        if running:
            raise TypeError(
                f"{type(self).__name__} keeps running values per param group ({running}), which one step moves "
                "once for the whole group: gradient release, which steps each param on its own, cannot run it"
            )
        self._stepper.release = release
        if release.scaler is not None:  # scaler.step() then calls step() even when it finds an inf
            self._amp_declaration = self.__dict__.get("_step_supports_amp_scaling")
            self._step_supports_amp_scaling = True

    def detach_gradient_release(self, release) -> None:
        """Undo :meth:`attach_gradient_release` (nothing if ``release`` is not attached)."""
        if self._gradient_release is release:
            self._stepper.release = None
            if release.scaler is not None:
                declared = self.__dict__.pop("_amp_declaration")
                if declared is None:
                    del self._step_supports_amp_scaling
                else:
                    self._step_supports_amp_scaling = declared

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's ``zero_grad``; under gradient release with ``max_grad_norm``, the host
        steps held for clipping are dropped too (their gradients are), and the host steps
        submitted are waited for (after a backward that raised, none had waited)."""
        if self._gradient_release is not None:
            self._gradient_release.discard_held()
            self._gradient_release.wait_for_submitted()
        super().zero_grad(set_to_none)

    @contextmanager
    def full_precision_state_dict(self) -> Iterator[None]:
        """Hook for :func:`adamkit.convert.full_precision_export`: within it,
        :meth:`state_dict` exports every param's quantized moments as fp32."""
        previous, self._export_full_precision = self._export_full_precision, True
        try:
            yield
        finally:
            self._export_full_precision = previous


class Adam(_AdamFamily):
    r"""Adam (Kingma & Ba, 2015), a drop-in for ``torch.optim.Adam``.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) g_t, \qquad
        v_t = \beta_2 v_{t-1} + (1 - \beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \eta \frac{m_t / (1 - \beta_1^t)}{\sqrt{v_t / (1 - \beta_2^t)} + \epsilon}

    Args are those of ``torch.optim.Adam`` (same defaults, same meaning), plus the
    keyword-only ``decouple_lr``, ``max_lr``, ``backend``, ``rounding``,
    ``master_weights``, ``state_precision``, ``seed``, ``skip_nonfinite``, ``cautious``,
    ``diagnostics``, ``accumulation_steps`` and ``offload`` described in :mod:`adamkit.options`.

    Example::

        >>> model = torch.nn.Linear(4, 1)
        >>> opt = adamkit.Adam(model.parameters(), lr=1e-3)
        >>> model(torch.randn(8, 4)).sum().backward(); opt.step(); opt.zero_grad()
    """

    algorithm = ADAM.name
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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, locals())


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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, {**locals(), "decoupled_weight_decay": True})

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
    ``decoupled_weight_decay`` and those described in :mod:`adamkit.options`.
    """

    algorithm = ADAMAX.name
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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, locals())


#: torch.optim's spelling, for drop-in imports
Adamax = AdaMax


class NAdam(_AdamFamily):
    r"""NAdam (Dozat, 2016), a drop-in for ``torch.optim.NAdam``: Adam with Nesterov
    momentum, its momentum coefficient warmed up as
    :math:`\mu_t = \beta_1 (1 - \tfrac12\, 0.96^{t \psi})` (``momentum_decay`` :math:`\psi`).

    .. math::

        \theta_t = \theta_{t-1}
            - \eta \frac{1 - \mu_t}{1 - \prod_{i \le t} \mu_i} \frac{g_t}{d_t}
            - \eta \frac{\mu_{t+1}}{1 - \prod_{i \le t+1} \mu_i} \frac{m_t}{d_t},
        \qquad d_t = \sqrt{v_t / (1 - \beta_2^t)} + \epsilon

    Args are those of ``torch.optim.NAdam`` (same defaults and meaning) plus those
    described in :mod:`adamkit.options` (except ``diagnostics``, which NAdam does not run
    yet; with ``accumulation_steps`` it steps with the micro-batches' mean gradient, see
    :mod:`adamkit.accumulation`).
    """

    algorithm = NADAM.name
    sparse_gradient_message = "NAdam does not support sparse gradients"
    unavailable_options = ("diagnostics",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 2e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        momentum_decay: float = NADAM.default("momentum_decay"),
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, locals())


class RAdam(_AdamFamily):
    r"""RAdam (Liu et al., 2020), a drop-in for ``torch.optim.RAdam``: Adam whose
    adaptive step is rectified by the variance of its moving average, and plain
    momentum SGD while that variance is undefined (:math:`\rho_t \le 5`).

    .. math::

        \theta_t = \theta_{t-1} - \eta\, \frac{m_t}{1 - \beta_1^t}
            \begin{cases} r_t \sqrt{1 - \beta_2^t} / (\sqrt{v_t} + \epsilon) & \rho_t > 5 \\
            1 & \text{otherwise} \end{cases}

    with :math:`\rho_t` and :math:`r_t` as in :mod:`adamkit.specs.reference`.  Args are
    those of ``torch.optim.RAdam`` (same defaults and meaning) plus those described in
    :mod:`adamkit.options`.
    """

    algorithm = RADAM.name
    sparse_gradient_message = "RAdam does not support sparse gradients"

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, locals())


class ADOPT(_AdamFamily):
    r"""ADOPT (Taniguchi et al., 2024): Adam that converges for any :math:`\beta_2`.  The
    gradient is normalized by the *previous* second moment (so it does not shrink its
    own step), clipped, then averaged; the first step only measures :math:`v`.

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)
            \operatorname{clip}\Bigl(\frac{g_t}{\max(\sqrt{v_{t-1}}, \epsilon)}, (t-1)^p\Bigr), \qquad
        \theta_t = \theta_{t-1} - \eta\, m_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) g_t^2, \qquad v_1 = g_1^2

    Defaults are the authors' (``betas=(0.9, 0.9999)``, ``eps=1e-6``, clipping at
    :math:`(t-1)^{1/4}`).  Their ``clip_lambda=lambda step: step ** p`` is
    ``clip_exponent=p`` here (``None``: no clipping, the paper's first version), and
    their ``decouple=True`` is ``decoupled_weight_decay=True`` (:math:`\theta \leftarrow
    \theta (1 - \eta\lambda)`, from the second step on).  The other arguments are those of
    torch.optim's Adam family, plus those described in :mod:`adamkit.options` (with
    ``accumulation_steps`` it steps with the micro-batches' mean gradient: see
    :mod:`adamkit.accumulation`).
    """

    algorithm = ADOPT.name
    sparse_gradient_message = "ADOPT does not support sparse gradients"
    unavailable_options = ()

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.9999),
        eps: float = 1e-6,
        weight_decay: float = 0,
        decoupled_weight_decay: bool = False,
        *,
        clip_exponent: float | None = ADOPT.default("clip_exponent"),
        foreach: bool | None = None,
        maximize: bool = False,
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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, locals())


class StableAdamW(_AdamFamily):
    r"""StableAdamW (Wortsman et al., 2023): AdamW whose step is clipped per tensor by
    the root mean square of the gradient over its second moment, so a tensor whose
    gradient jumps far above its history (a loss spike) takes a smaller step.

    .. math::

        \mathrm{RMS}_t = \sqrt{\operatorname{mean}\bigl(g_t^2 / \max(\hat v_t, \epsilon^2)\bigr)},
        \qquad \eta'_t = \frac{\eta}{\max(1, \mathrm{RMS}_t)}, \qquad
        \theta_t = \theta_{t-1} (1 - \eta'_t \lambda) - \eta'_t \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}

    A class of its own rather than an option of AdamW: its step is no longer an
    element-wise function of the state (each tensor's RMS is a reduction), and a
    checkpoint says which rule produced it.  Arguments and defaults are AdamW's (decay
    always decoupled; ``decouple_lr`` for optimi's fully decoupled form), less
    ``amsgrad`` (it has no AMSGrad variant), plus those
    described in :mod:`adamkit.options` (except ``diagnostics``; with
    ``accumulation_steps`` it steps with the micro-batches' mean gradient, see
    :mod:`adamkit.accumulation`).  Every backend runs it; the fused kernels sum each tensor's
    :math:`g^2 / \max(\hat v, \epsilon^2)` in a pass of their own before the update, and
    under FSDP2 the sums are totalled over the ranks holding a param's shards.
    """

    algorithm = STABLE_ADAMW.name
    sparse_gradient_message = "StableAdamW does not support sparse gradients"
    unavailable_options = ("diagnostics",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, {**locals(), "decoupled_weight_decay": True})

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class AdEMAMix(_AdamFamily):
    r"""AdEMAMix (Pagliardini et al., 2024): AdamW whose direction adds a slow
    exponential average of the gradient, weighted by :math:`\alpha`, to Adam's fast one.

    .. math::

        m^{(2)}_t = \beta_3(t)\, m^{(2)}_{t-1} + (1 - \beta_3(t))\, g_t, \qquad
        \theta_t = \theta_{t-1}(1 - \eta\lambda)
            - \eta\, \frac{\hat m_t + \alpha(t)\, m^{(2)}_t}{\sqrt{\hat v_t} + \epsilon}

    ``beta3`` (the slow average's decay) and ``alpha`` (its weight) are warmed up over
    ``beta3_warmup`` and ``alpha_warmup`` steps as in the paper (``None``: no warm-up; the
    paper advises both, as long as training, for large ``beta3``); see
    :mod:`adamkit.algorithms.ademamix`.  Defaults are optax's (``alpha=5``,
    ``beta3=0.9999``, ``weight_decay=0``); weight decay is always decoupled (``decouple_lr``
    for the fully decoupled form).  The state holds ``exp_avg``, ``exp_avg_sq`` and
    ``exp_avg_slow``, each in any ``state_precision`` (int8/int4: the slow average in the
    first moment's signed format).  Every backend runs it (the fused kernels hold the slow
    average where AMSGrad's maximum would be), ``offload`` too; with ``accumulation_steps``
    it steps with the micro-batches' mean gradient; ``diagnostics`` it does not run yet.
    """

    algorithm = ADEMAMIX.name
    sparse_gradient_message = "AdEMAMix does not support sparse gradients"
    unavailable_options = ("diagnostics",)

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        beta3: float = ADEMAMIX.default("beta3"),
        alpha: float = ADEMAMIX.default("alpha"),
        alpha_warmup: int | None = ADEMAMIX.default("alpha_warmup"),
        beta3_warmup: int | None = ADEMAMIX.default("beta3_warmup"),
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
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, {**locals(), "decoupled_weight_decay": True})

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True


class ScheduleFreeAdamW(_AdamFamily):
    r"""Schedule-free AdamW (Defazio et al., 2024, "The Road Less Scheduled"), a drop-in
    for the ``schedulefree`` package's ``AdamWScheduleFree`` (same arguments in the same
    order, same defaults but ``foreach``'s, state and param-group keys: its checkpoints
    load here and ours there).  ``foreach=None`` (the default; the package's is ``True``)
    lets adamkit choose its path, the fused kernel on CPU; ``foreach=True`` and ``False``
    take the package's own two paths, bit for bit.

    .. math::

        z_{t+1} = z_t - \gamma_t \Bigl(\frac{g_t}{\sqrt{\hat v_t} + \epsilon} + \lambda y_t\Bigr), \qquad
        x_{t+1} = (1 - c_{t+1})\, x_t + c_{t+1} z_{t+1}, \qquad
        y_{t+1} = (1 - \beta_1) z_{t+1} + \beta_1 x_{t+1}

    No learning-rate schedule is needed: ``warmup_steps`` warms the rate up linearly,
    and the average weights :math:`c_{t+1} \propto t^r \gamma_{max}^{p}` (``r``,
    ``weight_lr_power``); see :mod:`adamkit.algorithms.schedule_free`.  The params hold
    :math:`y` in train mode and :math:`x` in eval mode: call :meth:`train` before training
    steps and :meth:`eval` before evaluating or saving, as with that package.  A new
    optimizer starts in train mode (the package's starts in eval mode, where its first
    ``step()`` raises; before the first step both points are the params themselves, so
    ``train()`` first is allowed and changes nothing); :meth:`step` in eval mode raises.

    Storage: ``state_precision`` holds the second moment (``"bf16"``, ``"int8"``,
    ``"int4"``); ``z`` is a weight, not a moment: it is held at the precision of the
    param's own value, fp32 beside a split master (``master_weights``) or a Kahan
    compensation (``rounding="kahan"``), else the param's dtype (a 16-bit ``z`` is
    stored back stochastically, as a 16-bit moment is, so that its small steps are not
    rounded away); :meth:`train` and :meth:`eval` move the param's exact value.
    Refused, each by name: ``decouple_lr``, ``cautious``, ``accumulation_steps``,
    ``diagnostics``, ``offload``, ``capturable``, ``differentiable`` and gradient release
    (the group's running values move once per step of the whole group).  Every
    backend runs it: the per-tensor paths with the package's arithmetic op by op (its
    bits), the fused kernels in one pass per element (z in the first moment's place;
    within fp32 rounding of the package; ``backend=None`` picks them).
    """

    algorithm = SCHEDULE_FREE_ADAMW.name
    sparse_gradient_message = "ScheduleFreeAdamW does not support sparse gradients"
    unavailable_options = (
        "decouple_lr",
        "cautious",
        "accumulation_steps",
        "diagnostics",
        "offload",
    )
    #: its step's scalars come from the groups' running values, on the host
    unavailable_arguments = ("capturable", "differentiable")

    def __init__(
        self,
        params,
        lr: float | Tensor = 0.0025,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        warmup_steps: float = SCHEDULE_FREE_ADAMW.default("warmup_steps"),
        r: float = SCHEDULE_FREE_ADAMW.default("r"),
        weight_lr_power: float = SCHEDULE_FREE_ADAMW.default("weight_lr_power"),
        foreach: bool | None = None,  # (the package's ninth positional argument)
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        decouple_lr: bool = False,
        max_lr: float | None = None,
        backend: str | None = None,
        rounding: str = "nearest",
        master_weights: str | None = None,
        state_precision: str | None = None,
        seed: int | None = None,
        skip_nonfinite: bool = False,
        cautious: bool = False,
        diagnostics: bool = False,
        accumulation_steps: int = 1,
        offload: str | None = None,
    ) -> None:
        self._construct(params, {**locals(), **SCHEDULE_FREE_ADAMW.group_state, "decoupled_weight_decay": True})

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

    @torch.compiler.disable
    def step(self, closure=None):
        """One step of every group, which must be in train mode (see :meth:`train`)."""
        for index, group in enumerate(self.param_groups):
            if not group["train_mode"]:
                raise RuntimeError(
                    f"ScheduleFreeAdamW.step() with param_groups[{index}] in eval mode: call optimizer.train() "
                    "before training steps (and optimizer.eval() before evaluating or saving)"
                )
        return super().step(closure)

    @torch.no_grad()
    def train(self) -> None:
        r"""Put the params at the training point :math:`y = (1 - \beta_1) z + \beta_1 x`
        (from :math:`x`, where :meth:`eval` left them); nothing for groups in train mode."""
        self._move_params(train=True)

    @torch.no_grad()
    def eval(self) -> None:
        r"""Put the params at the average :math:`x`, the point to evaluate and keep (from
        :math:`y`: :math:`x = y + (1 - 1/\beta_1)(z - y)`); nothing for groups in eval mode."""
        self._move_params(train=False)

    def _move_params(self, train: bool) -> None:
        # every group that moves is checked before any moves
        moving = [(i, g, _beta1(g, i)) for i, g in enumerate(self.param_groups) if g["train_mode"] != train]
        for index, _, beta1 in moving:
            if not train and beta1 == 0:
                raise ValueError(
                    f"eval() with betas[0] = 0 in param_groups[{index}]: the training point is z itself and the "
                    "average x cannot be recovered from it (use betas[0] > 0)"
                )
        for _, group, beta1 in moving:
            weight = 1 - beta1 if train else 1 - 1 / beta1
            for p in group["params"]:
                state = self.state[p] if p in self.state else {}
                z = state.get(SCHEDULE_FREE_ADAMW.weight_copy)
                if z is not None:
                    _move_towards(p, state, z.to(p.device), weight)
            group["train_mode"] = train

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of the ``schedulefree`` package's
        ``AdamWScheduleFree`` (whose param states have no ``step``: each param's is its
        group's step count ``k``)."""
        groups = state_dict.get("param_groups", [])
        states = state_dict.get("state", {})
        if any("step" not in states.get(i, {"step": 0}) for g in groups for i in g.get("params", [])):
            states = dict(states)
            for group in groups:
                for i in group.get("params", []):
                    if i in states and "step" not in states[i]:
                        states[i] = {**states[i], "step": torch.tensor(float(group.get("k", 0)))}
            state_dict = {**state_dict, "state": states}
        super().load_state_dict(state_dict)


def _beta1(group: dict, index: int) -> float:
    """A group's ``betas[0]`` as a number in [0, 1), or ``ValueError`` naming it."""
    value = group["betas"][0]
    try:
        beta1 = as_number(value)
    except (TypeError, ValueError, RuntimeError):
        beta1 = math.nan
    if not 0 <= beta1 < 1:
        raise ValueError(f"betas[0] = {value!r} in param_groups[{index}]: it must be a number in [0, 1)")
    return beta1


def _move_towards(param: Tensor, state: dict, target: Tensor, weight: float) -> None:
    """``param <- lerp(param, target, weight)`` on the param's exact value: its split master
    (stored back to nearest) or its value plus its Kahan compensation where it keeps one."""
    low, compensation = state.get(MASTER_KEY), state.get(COMPENSATION_KEY)
    if low is not None:
        split_into(join_tensors(param, low).lerp_(target, weight), param, low)
    elif compensation is not None:
        exact = (param.float() + compensation.float()).lerp_(target, weight)
        param.copy_(exact)
        compensation.copy_(exact - param.float())
    else:
        param.lerp_(target, weight)


__all__ = [
    "ADOPT",
    "AdEMAMix",
    "Adam",
    "AdamW",
    "AdaMax",
    "Adamax",
    "NAdam",
    "RAdam",
    "ScheduleFreeAdamW",
    "StableAdamW",
]
