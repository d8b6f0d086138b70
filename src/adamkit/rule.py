r"""The Adam update rule: validated hyperparameters and the per-step scalars.

Kernels do the element-wise work only; every scalar they need is computed here,
once per group and step, on the host:

.. math::

    \text{bias\_correction}_1 = 1 - \beta_1^t, \qquad
    \text{step\_size} = \frac{\eta_t}{1 - \beta_1^t}, \qquad
    \text{bias\_correction2\_sqrt} = \sqrt{1 - \beta_2^t}

and the weight-decay factor applied before the update,

.. math::

    \text{decay\_factor} =
    \begin{cases}
      1 - \eta_t \lambda & \text{decoupled (AdamW)} \\
      1 - \frac{\eta_t}{\eta_{max}} \lambda & \text{fully decoupled (``decouple_lr``)}
    \end{cases}

Python floats are float64, so float hyperparameters give float64 scalars.  A
hyperparameter given as a tensor (``lr=torch.tensor(1e-3)``) is used with tensor
arithmetic in its own dtype, exactly as ``torch.optim.Adam`` does, so results stay
bit-identical to torch; pass a float64 tensor to keep float64 scalars.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from .master import MASTER_WEIGHTS
from .reference import WeightDecayMode
from .rounding import ROUNDINGS

Algorithm = Literal["adam", "adamax"]

#: The execution paths a param group may ask for; ``None`` picks per device.
BACKENDS = (None, "reference", "foreach", "cpu", "triton")

#: The dtype of ``exp_avg`` and the second moments: ``None`` is the param's dtype.
STATE_PRECISIONS = (None, "fp32", "bf16", "int8", "int4")

Scalar = float | Tensor


def as_number(x: Scalar) -> float:
    """A hyperparameter's value as a Python float (tensors are read, never differentiated)."""
    return float(x.detach().item()) if isinstance(x, Tensor) else float(x)


def _number_of(name: str, value: Any, where: str, read_tensors: bool) -> float | None:
    """The value of a hyperparameter, or ``None`` for a tensor that must not be read
    (a capturable group's step: reading an accelerator tensor would sync)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {name} must be 1-element, got shape {tuple(value.shape)}{where}")
        return as_number(value) if read_tensors else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a 1-element tensor{where}, got {value!r}")
    return float(value)


def check_hyperparameters(
    *,
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: float,
    where: str = "",
    read_tensors: bool = True,
) -> None:
    """Raise ``ValueError`` (with ``torch.optim``'s message text) for a bad value.

    Torch's checks (``not 0.0 <= lr`` and so on) already reject NaN; on top of
    them infinite values are rejected, since no step can use them.  Values are
    formatted as torch formats them (a 0-d tensor prints as its number).
    ``where`` names the param group when the check runs at step time; with
    ``read_tensors=False`` tensors are checked for shape only.
    """
    checks = (
        ("learning rate", "lr", lr, "a finite number >= 0"),
        ("epsilon value", "eps", eps, "a finite number >= 0"),
    )
    for label, name, value, allowed in checks:
        number = _number_of(name, value, where, read_tensors)
        if number is not None and (not 0.0 <= number or math.isinf(number)):
            raise ValueError(f"Invalid {label}: {value} ({name} must be {allowed}{where})")
    for index, beta in enumerate(betas):
        number = _number_of(f"betas[{index}]", beta, where, read_tensors)
        if number is not None and not 0.0 <= number < 1.0:
            raise ValueError(
                f"Invalid beta parameter at index {index}: {beta} (betas[{index}] must be in [0, 1){where})"
            )
    number = _number_of("weight_decay", weight_decay, where, read_tensors)
    if number is not None and (not 0.0 <= number or math.isinf(number)):
        raise ValueError(
            f"Invalid weight_decay value: {weight_decay} (weight_decay must be a finite number >= 0{where})"
        )


def check_constructor_arguments(
    lr: Scalar,
    betas: tuple[Scalar, Scalar],
    eps: float,
    weight_decay: float,
    *,
    foreach: bool | None,
    capturable: bool,
    adam_checks: bool,
) -> tuple[Scalar, Scalar]:
    """torch.optim's constructor checks, in torch's order and with its messages.

    Returns the betas to store: torch.optim.Adam makes 1-element tensors 0-d,
    torch.optim.Adamax keeps what it was given.

    ``adam_checks``: torch.optim.Adam also rejects tensor hyperparameters with
    ``foreach=True`` and mixed float/tensor betas; torch.optim.Adamax does not.
    """
    if isinstance(lr, Tensor):
        if foreach and not capturable and adam_checks:
            raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
    for index, beta in enumerate(betas):  # before the range checks, which need one element
        if isinstance(beta, Tensor) and beta.numel() != 1:
            raise ValueError(f"Tensor betas[{index}] must be 1-element, got shape {tuple(beta.shape)}")
    check_hyperparameters(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if not adam_checks:
        return betas
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for index, beta in enumerate(betas):
        if isinstance(beta, Tensor) and foreach and not capturable:
            raise ValueError(f"betas[{index}] as a Tensor is not supported for capturable=False and foreach=True")
    return tuple(to_scalar(b) for b in betas)


def check_max_lr(max_lr: Any, *, where: str = "") -> None:
    """``max_lr`` scales fully decoupled weight decay: it must be a finite number > 0."""
    if isinstance(max_lr, bool) or not isinstance(max_lr, (int, float, Tensor)):
        raise TypeError(f"max_lr must be a float > 0 or None{where}, got {max_lr!r}")
    number = as_number(max_lr)
    if not (number > 0.0 and math.isfinite(number)):
        raise ValueError(
            f"Invalid max_lr value: {number} (with decouple_lr=True, max_lr must be a "
            f"finite number > 0{where}; it defaults to the group's initial lr, so pass "
            "max_lr explicitly when lr starts at 0)"
        )


def check_backend(backend: Any, *, where: str = "") -> None:
    if backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"Invalid backend: {backend!r}{where} (allowed: {allowed})")


def check_training_options(
    *, skip_nonfinite: Any, diagnostics: Any, accumulation_steps: Any, differentiable: bool, where: str = ""
) -> None:
    """The training-loop options: ``skip_nonfinite``, ``diagnostics`` and ``accumulation_steps``."""
    for name, value in (("skip_nonfinite", skip_nonfinite), ("diagnostics", diagnostics)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False{where}, got {value!r}")
    if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
        raise ValueError(f"Invalid accumulation_steps: {accumulation_steps!r}{where} (an int >= 1)")
    if differentiable and accumulation_steps > 1:
        raise ValueError(
            f"accumulation_steps={accumulation_steps} does not support differentiable=True{where} "
            "(use accumulation_steps=1)"
        )


def check_storage(
    rounding: Any, state_precision: Any, seed: Any, *, differentiable: bool, master_weights: Any = None, where: str = ""
) -> None:
    """``rounding``, ``state_precision``, ``seed`` (the stochastic-rounding seed) and
    ``master_weights``."""
    if rounding not in ROUNDINGS:
        allowed = ", ".join(repr(r) for r in ROUNDINGS)
        raise ValueError(f"Invalid rounding: {rounding!r}{where} (allowed: {allowed})")
    if master_weights not in MASTER_WEIGHTS:
        allowed = ", ".join(repr(m) for m in MASTER_WEIGHTS)
        raise ValueError(f"Invalid master_weights: {master_weights!r}{where} (allowed: {allowed})")
    if master_weights is not None and rounding != "nearest":
        raise ValueError(
            f"master_weights={master_weights!r} and rounding={rounding!r} both say how a 16-bit weight keeps "
            f"its updates{where}: pick one (master_weights with rounding='nearest')"
        )
    if master_weights is not None and differentiable:
        raise ValueError(
            f"master_weights={master_weights!r} does not support differentiable=True{where} "
            "(splitting bits is not differentiable)"
        )
    if state_precision not in STATE_PRECISIONS:
        allowed = ", ".join(repr(p) for p in STATE_PRECISIONS)
        raise ValueError(f"Invalid state_precision: {state_precision!r}{where} (allowed: {allowed})")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64):
        raise ValueError(f"Invalid seed: {seed!r}{where} (seed must be None or an int in [0, 2**64))")
    if differentiable and state_precision in ("int8", "int4"):
        raise ValueError(
            f"state_precision={state_precision!r} does not support differentiable=True{where} "
            "(quantized states are not differentiable; use state_precision=None or 'fp32')"
        )
    if differentiable and rounding != "nearest":
        raise ValueError(
            f"rounding={rounding!r} does not support differentiable=True{where} "
            "(rounding is not differentiable; use rounding='nearest')"
        )


@dataclass(frozen=True)
class GroupScalars:
    """Scalars shared by every tensor of a param group in one step.

    Python floats, except where a tensor hyperparameter must stay a tensor: on the
    differentiable path (gradients flow through it) and the capturable path
    (reading it would sync with the host).
    """

    algorithm: Algorithm
    beta1: Scalar
    beta2: Scalar
    one_minus_beta2: Scalar
    eps: float
    #: coefficient of the L2 penalty added to the gradient (0 when decay is decoupled)
    l2_weight_decay: float
    #: factor multiplying the param before the update, or ``None`` for no decoupled decay
    decay_factor: Scalar | None
    keep_tensors: bool = False

    @property
    def decay_kind(self) -> int:
        """What fused kernels do with weight decay: 0 nothing, 1 add the L2 term to the
        gradient, 2 multiply the param by :attr:`decay_factor` (decoupled)."""
        if self.decay_factor is not None:
            return 2
        return 1 if self.l2_weight_decay != 0 else 0

    def one_minus_beta1(self, param: Tensor) -> Scalar:
        """The weight of ``exp_avg.lerp_(grad, weight)`` for ``param``, as torch forms it:
        torch.optim.Adam casts a tensor beta1 to the param's device and dtype before
        taking ``1 - beta1``; torch.optim.Adamax uses ``1 - beta1`` as it is."""
        beta1 = self.beta1
        if not isinstance(beta1, Tensor):
            return 1 - beta1
        if self.algorithm == "adam":
            beta1 = beta1.to(device=param.device, dtype=param.dtype)
        weight = 1 - beta1
        if self.keep_tensors or self.algorithm == "adamax":
            return weight
        return weight.item()


@dataclass(frozen=True)
class StepScalars:
    """Scalars that depend on the step count t of one tensor."""

    step_size: Scalar  # lr / (1 - beta1^t)
    bias_correction2_sqrt: Scalar  # sqrt(1 - beta2^t); 1 for AdaMax (unused)


#: the update rule's param rounding under each ``master_weights`` mode
_MASTER_ROUNDING = {"fp32": "master", "24bit": "master24"}


@dataclass(frozen=True)
class UpdateRule:
    """One param group's update rule for one step: what a kernel is told to do."""

    algorithm: Algorithm
    lr: Scalar
    beta1: Scalar
    beta2: Scalar
    eps: float
    weight_decay: float
    weight_decay_mode: WeightDecayMode
    max_lr: Scalar | None
    amsgrad: bool
    maximize: bool
    differentiable: bool
    capturable: bool = False
    #: how 16-bit params are stored: "nearest", "kahan", "stochastic", or "master" /
    #: "master24" (bf16 params with split master weights, ``master_weights="fp32"`` / ``"24bit"``)
    rounding: str = "nearest"
    #: the states' dtype: None (the param's), "fp32" or "bf16"
    state_precision: str | None = None
    #: the stochastic-rounding seed
    seed: int | None = None
    #: micro-batches folded into the moments per update (optimizer accumulation)
    accumulation_steps: int = 1

    @classmethod
    def from_group(cls, group: dict, algorithm: Algorithm) -> UpdateRule:
        if group.get("decouple_lr", False):
            mode: WeightDecayMode = "fully_decoupled"
        elif group.get("decoupled_weight_decay", False):
            mode = "decoupled"
        else:
            mode = "l2"
        beta1, beta2 = (to_scalar(b) for b in group["betas"])
        return cls(
            algorithm=algorithm,
            lr=to_scalar(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=group["weight_decay"],
            weight_decay_mode=mode,
            max_lr=group.get("max_lr"),
            amsgrad=bool(group.get("amsgrad", False)),
            maximize=bool(group["maximize"]),
            differentiable=bool(group["differentiable"]),
            capturable=bool(group.get("capturable", False)),
            rounding=_MASTER_ROUNDING.get(group.get("master_weights"), group.get("rounding", "nearest")),
            state_precision=group.get("state_precision"),
            seed=group.get("seed"),
            accumulation_steps=group.get("accumulation_steps", 1),
        )

    @property
    def keeps_tensors(self) -> bool:
        """Differentiable and capturable groups keep tensor scalars as tensors."""
        return self.differentiable or self.capturable

    def _finish(self, value: Scalar) -> Scalar:
        """Scalars reach kernels as Python floats unless :attr:`keeps_tensors`.
        ``.item()`` of a 0-d tensor is what ``addcdiv_(value=tensor)`` uses in torch."""
        if self.keeps_tensors or not isinstance(value, Tensor):
            return value
        return value.detach().item()

    def group_scalars(self) -> GroupScalars:
        decay_factor: Scalar | None = None
        if self.weight_decay != 0 and self.weight_decay_mode == "decoupled":
            decay_factor = 1 - self.lr * self.weight_decay
        elif self.weight_decay != 0 and self.weight_decay_mode == "fully_decoupled":
            decay_factor = 1 - (self.lr / self.max_lr) * self.weight_decay
        return GroupScalars(
            algorithm=self.algorithm,
            beta1=self.beta1,
            beta2=self._finish(self.beta2),
            one_minus_beta2=self._finish(1 - self.beta2),
            eps=self.eps,
            l2_weight_decay=self.weight_decay if self.weight_decay_mode == "l2" else 0.0,
            decay_factor=None if decay_factor is None else self._finish(decay_factor),
            keep_tensors=self.keeps_tensors,
        )

    def step_scalars(self, step: Scalar) -> StepScalars:
        """Bias-corrected step size for step count ``step`` (t >= 1): a float, or a
        float64 device tensor on the capturable path (no host sync)."""
        bias_correction1 = 1 - self.beta1**step
        step_size = self.lr / bias_correction1
        if self.algorithm == "adamax":
            return StepScalars(self._finish(step_size), 1.0)
        bias_correction2 = 1 - self.beta2**step
        return StepScalars(self._finish(step_size), self._finish(bias_correction2**0.5))

    def step_scalars_for(self, steps: list[Tensor]) -> list[StepScalars]:
        """One :class:`StepScalars` per tensor, computed once per distinct step count.

        Capturable groups never read their step tensors on the host: each tensor's
        scalars are computed on its device, in float64."""
        if self.capturable:
            return [self.step_scalars(step_t.to(torch.float64)) for step_t in steps]
        cache: dict[float, StepScalars] = {}
        out = []
        for step_t in steps:
            step = step_t.item()
            if step not in cache:
                cache[step] = self.step_scalars(step)
            out.append(cache[step])
        return out


def step_scalar_arrays(rule: UpdateRule, steps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(step_size, bias_correction2_sqrt)`` as float64 arrays aligned with ``steps``,
    each computed once per distinct step count by :meth:`UpdateRule.step_scalars`."""
    if (steps == steps[0]).all():  # the usual case: one step count for the whole group
        scalars = rule.step_scalars(float(steps[0]))
        return (
            np.full(steps.shape, as_number(scalars.step_size)),
            np.full(steps.shape, as_number(scalars.bias_correction2_sqrt)),
        )
    distinct, position = np.unique(steps, return_inverse=True)
    scalars = [rule.step_scalars(float(step)) for step in distinct]
    step_size = np.array([as_number(s.step_size) for s in scalars], dtype=np.float64)
    bias_correction2_sqrt = np.array([as_number(s.bias_correction2_sqrt) for s in scalars], dtype=np.float64)
    return step_size[position], bias_correction2_sqrt[position]


def to_scalar(x: Scalar) -> Scalar:
    """A 1-element tensor hyperparameter becomes 0-d (as torch stores betas)."""
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


__all__ = [
    "BACKENDS",
    "STATE_PRECISIONS",
    "GroupScalars",
    "StepScalars",
    "UpdateRule",
    "as_number",
    "check_backend",
    "check_constructor_arguments",
    "check_hyperparameters",
    "check_max_lr",
    "check_storage",
    "check_training_options",
    "step_scalar_arrays",
    "to_scalar",
]
