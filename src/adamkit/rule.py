r"""The Adam update rule: a param group's hyperparameters and the per-step scalars.

The values are checked by :mod:`adamkit.options`; here they become numbers.

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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .algorithms import REGISTRY, AlgorithmSpec, StepScalars, as_number, is_real_number, lookup
from .specs.reference import WeightDecayMode

#: an algorithm's name, a key of :data:`adamkit.algorithms.REGISTRY`
Algorithm = str

Scalar = float | Tensor

#: what the fused kernels do with weight decay (:attr:`GroupScalars.decay_kind`): nothing,
#: add the L2 term to the gradient, or multiply the param by the decay factor
NO_DECAY, L2_DECAY, DECOUPLED_DECAY = 0, 1, 2


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
    keeps_tensors: bool = False

    @property
    def decay_kind(self) -> int:
        """What fused kernels do with weight decay: :data:`NO_DECAY`, :data:`L2_DECAY`
        (add the L2 term to the gradient) or :data:`DECOUPLED_DECAY` (multiply the param
        by :attr:`decay_factor`)."""
        if self.decay_factor is not None:
            return DECOUPLED_DECAY
        return L2_DECAY if self.l2_weight_decay != 0 else NO_DECAY

    def one_minus_beta1(self, param: Tensor) -> Scalar:
        """The weight of ``exp_avg.lerp_(grad, weight)`` for ``param``, as torch forms it:
        torch.optim.Adam casts a tensor beta1 to the param's device and dtype before
        taking ``1 - beta1``; torch.optim.Adamax uses ``1 - beta1`` as it is."""
        beta1 = self.beta1
        if not isinstance(beta1, Tensor):
            return 1 - beta1
        spec = lookup(self.algorithm)
        if spec.tensor_beta1 == "cast":
            beta1 = beta1.to(device=param.device, dtype=param.dtype)
        weight = 1 - beta1
        if self.keeps_tensors or spec.tensor_beta1 == "tensor":
            return weight
        return weight.item()


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
    #: cautious updates: only the elements whose update agrees in sign with the gradient
    cautious: bool = False
    #: the algorithm's own hyperparameters (:attr:`AlgorithmSpec.hyperparameters`, e.g.
    #: NAdam's ``momentum_decay``) and group state (:attr:`AlgorithmSpec.group_state`) as
    #: (name, value) pairs; each reads as an attribute (``rule.momentum_decay``), its
    #: registry default where the pairs lack it
    hyperparameters: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("__"):
            for key, value in self.__dict__.get("hyperparameters", ()):
                if key == name:
                    return value
            spec = REGISTRY.get(self.__dict__.get("algorithm"))
            if spec is not None and name in spec.rule_values:
                return spec.rule_values[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @classmethod
    def from_group(cls, group: dict, algorithm: Algorithm) -> UpdateRule:
        """The rule of a param group as the optimizer keeps it (every option present)."""
        if group["decouple_lr"]:
            mode: WeightDecayMode = "fully_decoupled"
        elif group["decoupled_weight_decay"]:
            mode = "decoupled"
        else:
            mode = "l2"
        beta1, beta2 = (host_scalar(b) for b in group["betas"])
        spec = lookup(algorithm)
        return cls(
            algorithm=algorithm,
            lr=host_scalar(group["lr"]),
            beta1=beta1,
            beta2=beta2,
            eps=host_scalar(group["eps"]),
            weight_decay=host_scalar(group["weight_decay"]),
            weight_decay_mode=mode,
            max_lr=host_scalar(group["max_lr"]),
            amsgrad=bool(group.get("amsgrad", False)),
            maximize=bool(group["maximize"]),
            differentiable=bool(group["differentiable"]),
            capturable=bool(group["capturable"]),
            rounding=_MASTER_ROUNDING.get(group["master_weights"], group["rounding"]),
            state_precision=group["state_precision"],
            seed=group["seed"],
            accumulation_steps=group["accumulation_steps"],
            cautious=bool(group.get("cautious", False)),
            hyperparameters=tuple(
                (key, host_scalar(group.get(key, default))) for key, default in spec.rule_values.items()
            ),
        )

    @property
    def spec(self) -> AlgorithmSpec:
        """The algorithm's declaration (:mod:`adamkit.algorithms`)."""
        return lookup(self.algorithm)

    @property
    def keeps_tensors(self) -> bool:
        """Differentiable and capturable groups keep tensor scalars as tensors."""
        return self.differentiable or self.capturable

    def finish(self, value: Scalar) -> Scalar:
        """Scalars reach kernels as Python floats unless :attr:`keeps_tensors`.
        ``.item()`` of a 0-d tensor is what ``addcdiv_(value=tensor)`` uses in torch."""
        if self.keeps_tensors or not isinstance(value, Tensor):
            return value
        return value.detach().item()

    def decay_rate(self) -> Scalar | None:
        r"""How much decoupled weight decay takes off the param per step:
        :math:`\eta\lambda`, or :math:`(\eta / \eta_{max})\lambda` fully decoupled; ``None``
        without decoupled decay."""
        if self.weight_decay != 0 and self.weight_decay_mode == "decoupled":
            return self.lr * self.weight_decay
        if self.weight_decay != 0 and self.weight_decay_mode == "fully_decoupled":
            return (self.lr / self.max_lr) * self.weight_decay
        return None

    def group_scalars(self) -> GroupScalars:
        rate = self.decay_rate()
        decay_factor = None if rate is None else 1 - rate
        return GroupScalars(
            algorithm=self.algorithm,
            beta1=self.beta1,
            beta2=self.finish(self.beta2),
            one_minus_beta2=self.finish(1 - self.beta2),
            eps=self.eps,
            l2_weight_decay=self.weight_decay if self.weight_decay_mode == "l2" else 0.0,
            decay_factor=None if decay_factor is None else self.finish(decay_factor),
            keeps_tensors=self.keeps_tensors,
        )

    def step_scalars(self, step: Scalar) -> StepScalars:
        """The algorithm's scalars for step count ``step`` (t >= 1): floats, or float64
        device tensors on the capturable path (no host sync); see
        :attr:`adamkit.algorithms.AlgorithmSpec.step_scalars`."""
        return self.spec.step_scalars(self, step)

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


def to_scalar(x: Scalar) -> Scalar:
    """A 1-element tensor hyperparameter becomes 0-d (as torch stores betas)."""
    if isinstance(x, Tensor) and x.dim() != 0:
        return x.squeeze()
    return x


def host_scalar(x: Any) -> Any:
    """A param group's value as a rule holds it: a 1-element tensor 0-d
    (:func:`to_scalar`), a NumPy number (or any other real that is not an int or a
    float, such as a ``Fraction``) a Python float, so that the host computes step
    scalars in float64 (NumPy would keep an ``np.float32`` lr's arithmetic in float32,
    and torch ops take no ``Fraction``).  Anything else as it is."""
    if isinstance(x, (np.generic, np.ndarray)) or (not isinstance(x, (int, float, Tensor)) and is_real_number(x)):
        return float(x)
    return to_scalar(x)


__all__ = [
    "DECOUPLED_DECAY",
    "L2_DECAY",
    "NO_DECAY",
    "GroupScalars",
    "StepScalars",
    "UpdateRule",
    "as_number",
    "to_scalar",
]
