"""The algorithm registry: each member of the Adam family declared once.

An algorithm is an :class:`AlgorithmSpec` (:mod:`.base`): its name, its state (the
second moment's key, whether it keeps NAdam's ``mu_product``, whether it has an AMSGrad
variant), the forms of its element math (first moment, second moment, denominator,
Nesterov or not), its host-side step scalars and the fused kernels' per-tensor columns,
what it needs beyond one pass (StableAdamW's update clipping; whether accumulation
steps with the mean gradient), how diagnostics read its last step back, and its own
hyperparameters with their defaults.  Every consumer reads it from :data:`REGISTRY`:
the option checks, state creation and checkpoint conversion, the per-tensor and
foreach paths, both fused kernels (compiled per :attr:`AlgorithmSpec.forms`: every
algorithm registered here runs in them),
accumulation, diagnostics and the stall guard.

Adding an algorithm (see docs/architecture.md):

1. a module here declaring it (``register(AlgorithmSpec(...))``), imported below;
2. its per-tensor functions, named after it, in :mod:`adamkit.kernels.single_tensor`
   and :mod:`adamkit.kernels.foreach`;
3. where its element math needs a form the fused kernels lack, that form in both
   (:mod:`adamkit.kernels.cpu`, :mod:`adamkit.kernels.triton`), in the same order;
4. its step in the NumPy reference (:mod:`adamkit.specs.reference`);
5. its optimizer class in :mod:`adamkit.optim`.
"""

# isort: skip_file
from __future__ import annotations

from .base import (
    KERNEL_FORMS,
    REGISTRY,
    SLOW_MOMENT_KEY,
    AlgorithmSpec,
    Denominator,
    FirstMoment,
    FirstMomentScale,
    SecondMoment,
    StepScalars,
    as_number,
    is_real_number,
    lookup,
    register,
)

# Registered in this order, a new algorithm last: an algorithm's code is its place
# (AlgorithmSpec.code), and the CPU kernel's disk-cached loops are keyed on it.
from .adam import ADAM
from .adamax import ADAMAX
from .nadam import NADAM
from .radam import RADAM
from .adopt import ADOPT
from .stable_adamw import STABLE_ADAMW
from .ademamix import ADEMAMIX
from .schedule_free import SCHEDULE_FREE_ADAMW

__all__ = [
    "ADAM",
    "ADEMAMIX",
    "ADAMAX",
    "ADOPT",
    "NADAM",
    "RADAM",
    "SCHEDULE_FREE_ADAMW",
    "KERNEL_FORMS",
    "REGISTRY",
    "SLOW_MOMENT_KEY",
    "STABLE_ADAMW",
    "AlgorithmSpec",
    "Denominator",
    "FirstMoment",
    "FirstMomentScale",
    "SecondMoment",
    "StepScalars",
    "as_number",
    "is_real_number",
    "lookup",
    "register",
]
