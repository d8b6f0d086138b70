r"""What an algorithm of the Adam family is, as every consumer reads it.

One :class:`AlgorithmSpec` per algorithm, registered in :data:`REGISTRY` by its module
in this package.  The declaration holds data, small host-side functions and the
algorithm's two torch paths (per tensor and foreach, written op by op for torch.optim's
bits; no fused kernel code, no torch optimizer): the option checks, state creation and
checkpoint conversion, the per-tensor and fused kernels, accumulation, diagnostics and
the stall guard read it instead of comparing names.

The element math every kernel runs is one form, specialised by three choices
(:class:`FirstMoment`, :class:`SecondMoment`, :class:`Denominator`) and whether the
direction is Nesterov's:

.. math::

    m \leftarrow m + (1 - \beta_1)(x - m), \qquad
    x = \begin{cases} g & \text{average} \\
        \operatorname{clip}(g / \max(\sqrt{v_{t-1}}, \epsilon), c) & \text{normalized and clipped (ADOPT)}
    \end{cases}

.. math::

    v \leftarrow \begin{cases} \beta_2 v + (1 - \beta_2) g^2 & \text{average} \\
        \max(\beta_2 u, |g| + \epsilon) & \text{infinity norm (AdaMax)} \\
        \beta_2 v + w g^2 & \text{average, read before it is updated (ADOPT)} \end{cases}

.. math::

    \theta \leftarrow \theta - (\alpha m\ [+\ \gamma g]) / d, \qquad
    d = \begin{cases} \sqrt{v} / c_2 + \epsilon & \text{bias-corrected root} \\
        \sqrt{v} + \epsilon \text{ once adaptive, else } 1 & \text{rectified root (RAdam)} \\
        u & \text{the norm itself} \\ 1 & \text{none} \end{cases}

with the per-tensor scalars (:math:`\alpha, c_2, \gamma, c, w`) from the algorithm's
host-side functions (:attr:`AlgorithmSpec.step_scalars`,
:attr:`AlgorithmSpec.tensor_columns`).  A slow first moment
(:attr:`AlgorithmSpec.slow_first_moment`, AdEMAMix's
:math:`m_2 \leftarrow m_2 + (1 - \beta_3(t))(g - m_2)`, added to the direction with weight
:math:`\alpha(t)`) is a fourth choice: the direction is then
:math:`(\alpha m + \alpha_2 m_2) / d`, with :math:`\alpha_2 = \eta\,\alpha(t)`.
A second weight sequence in the first moment's place (:attr:`AlgorithmSpec.weight_copy`,
:attr:`FirstMoment.WEIGHT_SEQUENCE`: schedule-free's :math:`z`) replaces the update
itself: :math:`d = g / (\sqrt{v / (1 - \beta_2^t)} + \epsilon) + \lambda\theta`,
:math:`\theta \leftarrow \operatorname{lerp}(\theta, z, c) + a d`,
:math:`z \leftarrow z - \gamma d` (:mod:`adamkit.algorithms.schedule_free`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

Scalar = float | Tensor


def as_number(x: Scalar) -> float:
    """A hyperparameter's value as a Python float (tensors are read, never differentiated)."""
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


class FirstMoment(IntEnum):
    """What the first moment averages."""

    AVERAGE = 0  #: the gradient
    NORMALIZED_CLIPPED = 1  #: the gradient over the previous second moment's root, clipped (ADOPT)
    #: none: its place holds a second weight sequence z, and the step is schedule-free's
    #: (:attr:`AlgorithmSpec.weight_copy`; see :mod:`adamkit.algorithms.schedule_free`)
    WEIGHT_SEQUENCE = 2


class SecondMoment(IntEnum):
    """How the second moment is formed."""

    AVERAGE = 0  #: an exponential average of g^2, updated before the direction reads it
    INFINITY_NORM = 1  #: ``max(beta2 u, |g| + eps)`` (AdaMax)
    AVERAGE_AFTER = 2  #: an average of g^2 with a per-tensor weight, read before it is updated (ADOPT)


class FirstMomentScale(IntEnum):
    """What a quantized format that normalizes first moments divides them by
    (:func:`adamkit.specs.quantization.first_moment_divisor`)."""

    NONE = 0  #: nothing: the first moment is normalized already (ADOPT's), and stored plain
    ROOT = 1  #: the root of the second moment, an average of g^2
    NORM = 2  #: the second moment itself, an infinity norm (AdaMax's)


class Denominator(IntEnum):
    """What the direction divides by."""

    BIAS_CORRECTED_ROOT = 0  #: sqrt(v) / sqrt(1 - beta2^t) + eps
    RECTIFIED_ROOT = 1  #: sqrt(v) + eps where the step is adaptive, else 1 (RAdam)
    NORM = 2  #: the infinity norm u itself (AdaMax)
    NONE = 3  #: 1: the first moment is already normalized (ADOPT)


#: the state key of a slow first moment (:attr:`AlgorithmSpec.slow_first_moment`)
SLOW_MOMENT_KEY = "exp_avg_slow"

#: the (first moment, second moment, denominator) forms both fused kernels implement
#: (:mod:`adamkit.kernels.cpu`, :mod:`adamkit.kernels.triton`), Nesterov or not with each,
#: with a slow first moment or without
KERNEL_FORMS = frozenset(
    {
        (FirstMoment.AVERAGE, SecondMoment.AVERAGE, Denominator.BIAS_CORRECTED_ROOT),
        (FirstMoment.AVERAGE, SecondMoment.AVERAGE, Denominator.RECTIFIED_ROOT),
        (FirstMoment.AVERAGE, SecondMoment.INFINITY_NORM, Denominator.NORM),
        (FirstMoment.NORMALIZED_CLIPPED, SecondMoment.AVERAGE_AFTER, Denominator.NONE),
        (FirstMoment.WEIGHT_SEQUENCE, SecondMoment.AVERAGE, Denominator.BIAS_CORRECTED_ROOT),
    }
)


@dataclass(frozen=True)
class StepScalars:
    """Scalars that depend on the step count t of one tensor (NAdam's and RAdam's
    as torch.optim forms them, so their single-tensor path keeps torch's bits)."""

    step_size: Scalar  # lr / (1 - beta1^t)
    bias_correction2_sqrt: Scalar  # sqrt(1 - beta2^t); 1 for AdaMax (unused)
    #: 1 - beta1^t (RAdam)
    bias_correction1: Scalar | None = None
    #: 1 - beta2^t (NAdam)
    bias_correction2: Scalar | None = None
    #: NAdam's momentum coefficients mu_t and mu_{t+1}
    mu: Scalar | None = None
    mu_next: Scalar | None = None
    #: RAdam's variance rectification r_t; ``None`` while rho_t <= 5 (a momentum-SGD
    #: step).  For step counts on a device a tensor, NaN where rho_t <= 5, and
    #: ``rectified`` says where it applies.
    rectification: Scalar | None = None
    rectified: Tensor | None = None
    #: ADOPT: whether this is the first step (which only measures v), the clipping
    #: value c_t of the normalized gradient (0 on the first step: m stays 0), and the
    #: weight of g^2 in v (1 on the first step, where v = g^2; else 1 - beta2)
    first: Scalar | bool | None = None
    clip: Scalar | None = None
    second_weight: Scalar | None = None
    #: a slow first moment's weight in the direction and its decay at step t (AdEMAMix's
    #: alpha_t and beta3_t)
    slow_weight: Scalar | None = None
    slow_decay: Scalar | None = None
    #: the weight of the new point in an iterate average (schedule-free's
    #: :math:`c_{t+1}`, the param's pull towards its second weight sequence)
    average_weight: Scalar | None = None
    #: schedule-free's step of the param along the direction, :math:`\gamma_t(\beta_1(1 -
    #: c_{t+1}) - 1)`, and its weight decay :math:`\lambda`, added to the direction at the param
    point_step_size: Scalar | None = None
    point_decay: Scalar | None = None


#: ``step_scalars(rule, step)``: the :class:`StepScalars` of step count ``step`` (a float,
#: or a float64 device tensor on the capturable path) under an
#: :class:`adamkit.rule.UpdateRule` ``rule``
StepScalarsFn = Callable[[Any, Scalar], StepScalars]
#: ``tensor_columns(columns, lr, scalars, mu_products, where)``: the algorithm's changes,
#: in place, to the fused kernels' per-tensor scalar ``columns`` (a dict by
#: :data:`adamkit.kernels.host.TENSOR_SCALARS` name, filled with Adam's values) from the
#: tensors' ``scalars`` (arrays or device tensors), NAdam's new ``mu_products``; ``where``
#: is ``numpy.where`` or ``torch.where``
TensorColumnsFn = Callable[[dict, Any, StepScalars, Any, Callable], None]
#: ``read_back(second, rule, scalars)``: per element, the factor by which the step moved
#: the weight along its new m, and where eps dominated (see :mod:`adamkit.diagnostics`)
ReadBackFn = Callable[[Tensor, Any, StepScalars], tuple[Tensor, Tensor]]
#: ``step(tensors, rule, group_scalars, steps)``: one torch path of the update over a
#: group's :class:`adamkit.kernels.types.GroupTensors` (their step counts advanced), with
#: the rule's :class:`adamkit.rule.GroupScalars` and each tensor's :class:`StepScalars`
ListStepFn = Callable[[Any, Any, Any, Sequence[StepScalars]], None]


def is_real_number(value: Any) -> bool:
    """Whether ``value`` is a number as torch.optim takes one for a float
    hyperparameter: any real (Python and NumPy ints and floats, ``np.float32``
    included), or a 0-d NumPy array of one; not a bool."""
    if isinstance(value, np.ndarray):
        return value.ndim == 0 and value.dtype.kind in "iuf"
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def number_of(name: str, value: Any, where: str = "", *, read_tensors: bool = True) -> float | None:
    """A hyperparameter's value as a float (a 1-element tensor is read; with
    ``read_tensors=False`` it is checked for shape only and ``None`` returned: reading
    an accelerator tensor would sync); ``TypeError`` naming it for anything else."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}{where}")
        if value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"Tensor {name} must hold a real number{where}, got a {value.dtype} tensor")
        if value.device.type == "meta":
            raise ValueError(f"Tensor {name} is on the meta device{where}, which holds no value; give a real tensor")
        return as_number(value) if read_tensors else None
    if not is_real_number(value):
        raise TypeError(f"{name} must be a float or a 1-element tensor{where}, got {value!r}")
    return float(value)


def no_tensor_columns(columns: dict, lr, scalars: StepScalars, mu_products, where) -> None:
    """Adam's per-tensor scalars need no change."""


@dataclass(frozen=True)
class AlgorithmSpec:
    """One algorithm, declared once (see the module docstring)."""

    #: the name the optimizer class carries (``optimizer.algorithm``) and code reads
    name: str
    #: the optimizer class's name in :mod:`adamkit` (AdamW is Adam's with decoupled decay)
    class_name: str
    #: its compile-time index, and its place in :data:`REGISTRY`: unique and never reused
    #: (the CPU kernel's disk-cached loops are keyed on it); a new algorithm takes the next
    code: int
    #: the host-side step scalars (see :data:`StepScalarsFn`)
    step_scalars: StepScalarsFn
    #: the per-tensor path (``foreach=False``): torch ops tensor by tensor, in the order of
    #: the torch.optim counterpart (see :data:`ListStepFn` and :mod:`.single_tensor_ops`)
    single_tensor: ListStepFn
    #: the foreach path: the same element-wise sequence over lists (see
    #: :mod:`.foreach_ops`); a cautious group runs :attr:`single_tensor` instead
    foreach: ListStepFn
    #: the element math's forms
    first_moment: FirstMoment = FirstMoment.AVERAGE
    second_moment: SecondMoment = SecondMoment.AVERAGE
    denominator: Denominator = Denominator.BIAS_CORRECTED_ROOT
    #: the direction adds the gradient's own term (NAdam: (alpha m + gamma g) / d)
    nesterov: bool = False
    #: the state key of the second moment, as torch.optim names it
    second_moment_key: str = "exp_avg_sq"
    #: keeps NAdam's running product of momentum coefficients (``mu_product``) beside ``step``
    keeps_mu_product: bool = False
    #: keeps a second, slow first moment (AdEMAMix: ``exp_avg_slow``, third in kernel
    #: order, where AMSGrad's maximum would be: the two never meet)
    slow_first_moment: bool = False
    #: the state key of a second weight sequence kept in the first moment's place
    #: (schedule-free's ``z``), or ``None``: it starts as a copy of the param, is held at
    #: the precision of the param's own value whatever ``state_precision`` says (the
    #: param's dtype, fp32 beside a split master or a Kahan compensation: a weight is
    #: never quantized), and a 16-bit one is stored back stochastically, as 16-bit
    #: moments are
    weight_copy: str | None = None
    #: values the algorithm keeps per param group, with their initial values (schedule-free's
    #: step count and running weight sum): held in ``param_groups`` (so they are saved and
    #: loaded with it), read on the rule as its hyperparameters are
    group_state: Mapping[str, Any] = field(default_factory=dict)
    #: ``advance(group)``: move :attr:`group_state` on by one step, once per ``step()`` for
    #: every group that is not skipped (one without gradients too; not one that
    #: ``skip_nonfinite`` or a GradScaler skips), before any kernel runs (``None``: nothing
    #: to move)
    advance: Callable[[dict], None] | None = None
    #: has an AMSGrad variant (a running maximum of the second moment)
    amsgrad: bool = False
    #: a per-tensor reduction before the update (StableAdamW's update clipping)
    clips_update: bool = False
    #: the update reads the step's gradient beyond the moments, so optimizer
    #: accumulation steps with the micro-batches' mean gradient
    steps_with_mean_gradient: bool = False
    #: the fused kernels' per-tensor scalars (see :data:`TensorColumnsFn`)
    tensor_columns: TensorColumnsFn = no_tensor_columns
    #: how the last step is read back from the state (``None``: it cannot be, as it
    #: depended on that step's gradient), for diagnostics and the stall guard
    read_back: ReadBackFn | None = None
    #: hyperparameters of its own, with their defaults (also the constructor's)
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    #: their checks, ``check(value, where)``: raise ``ValueError`` naming the argument, its
    #: value and what is allowed (``where`` names the param group at step time)
    checks: Mapping[str, Callable[[Any, str], None]] = field(default_factory=dict)
    #: how a tensor beta1 becomes the weight 1 - beta1, as the torch.optim counterpart
    #: forms it: cast to the param's dtype and device first (Adam), kept a tensor
    #: (Adamax), or read as a number
    tensor_beta1: Literal["cast", "tensor", "item"] = "item"
    #: torch.optim.Adam's checks of tensor hyperparameters (refused with foreach,
    #: both betas alike, 1-element betas made 0-d)
    tensor_hyperparameter_checks: bool = False
    #: what the rule reads by name, with its default: the hyperparameters, then the group
    #: state (derived from both)
    rule_values: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "hyperparameters", MappingProxyType(dict(self.hyperparameters)))
        object.__setattr__(self, "checks", MappingProxyType(dict(self.checks)))
        object.__setattr__(self, "group_state", MappingProxyType(dict(self.group_state)))
        object.__setattr__(self, "rule_values", MappingProxyType({**self.hyperparameters, **self.group_state}))
        if (self.advance is None) != (not self.group_state):
            raise ValueError(f"{self.name}: group state and its advance come together")
        if not set(self.checks) <= set(self.hyperparameters):
            raise ValueError(
                f"{self.name}: checks of undeclared hyperparameters {set(self.checks) - set(self.hyperparameters)}"
            )
        if self.slow_first_moment and self.amsgrad:
            raise ValueError(f"{self.name}: a slow first moment takes AMSGrad's place in the kernels' order")
        if (self.weight_copy is not None) != (self.first_moment == FirstMoment.WEIGHT_SEQUENCE):
            raise ValueError(f"{self.name}: a second weight sequence is held where the first moment's form says so")

    @property
    def fused(self) -> bool:
        """Whether the fused kernels run it: its forms are among :data:`KERNEL_FORMS`
        (the state they hold: Adam's moments, a slow first moment in the third place, or
        a second weight sequence in the first)."""
        return (self.first_moment, self.second_moment, self.denominator) in KERNEL_FORMS

    @property
    def first_moment_scale(self) -> FirstMomentScale:
        """What a quantized format that normalizes first moments divides them by
        (:func:`adamkit.specs.quantization.first_moment_divisor`): nothing where the
        first moment is normalized already (ADOPT) or there is none (a second weight
        sequence, never quantized, in its place), the second moment itself where it is
        a norm (AdaMax), else its root."""
        if self.first_moment in (FirstMoment.NORMALIZED_CLIPPED, FirstMoment.WEIGHT_SEQUENCE):
            return FirstMomentScale.NONE
        return FirstMomentScale.NORM if self.second_moment == SecondMoment.INFINITY_NORM else FirstMomentScale.ROOT

    @property
    def forms(self) -> int:
        """The element math's choices packed in one int (the fused kernels' compile-time key)."""
        forms = int(self.first_moment) + 4 * int(self.second_moment) + 16 * int(self.denominator)
        return forms + 64 * self.nesterov + 128 * self.slow_first_moment

    def default(self, name: str) -> Any:
        """The default of hyperparameter ``name`` of this algorithm."""
        return self.hyperparameters[name]

    def moment_keys(self, amsgrad: bool) -> list[str]:
        """The state keys holding moments, in kernel order (first, or the second weight
        sequence in its place; second; then AMSGrad's maximum or the slow first moment)."""
        third = ["max_exp_avg_sq"] if amsgrad else []
        first = self.weight_copy or "exp_avg"
        return [first, self.second_moment_key] + third + ([SLOW_MOMENT_KEY] if self.slow_first_moment else [])


#: every algorithm, by name, in the order registered
REGISTRY: dict[str, AlgorithmSpec] = {}


def register(spec: AlgorithmSpec) -> AlgorithmSpec:
    """Add ``spec`` to :data:`REGISTRY` (once per name and per code), in the place of its
    code."""
    if spec.name in REGISTRY:
        raise ValueError(f"algorithm {spec.name!r} is registered already")
    if isinstance(spec.code, bool) or not isinstance(spec.code, int) or spec.code < 0:
        raise ValueError(f"algorithm {spec.name!r}: code {spec.code!r} is not an int >= 0")
    for other in REGISTRY.values():
        if other.code == spec.code:
            raise ValueError(f"algorithm {spec.name!r}: code {spec.code} is {other.name!r}'s already")
    ordered = sorted([*REGISTRY.values(), spec], key=lambda each: each.code)
    REGISTRY.clear()
    REGISTRY.update((each.name, each) for each in ordered)
    return spec


def lookup(name: str) -> AlgorithmSpec:
    """The declaration of algorithm ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r} (registered: {', '.join(REGISTRY)})") from None
