"""The algorithm registry: each member of the Adam family declared once.

An algorithm is an :class:`AlgorithmSpec` (:mod:`.base`): its name, its code, its state
(the second moment's key, whether it keeps NAdam's ``mu_product``, whether it has an
AMSGrad variant), the forms of its element math (first moment, second moment,
denominator, Nesterov or not), its host-side step scalars and the fused kernels'
per-tensor columns, its two torch paths (per tensor and foreach), what it needs beyond
one pass (StableAdamW's update clipping; whether accumulation steps with the mean
gradient), how diagnostics read its last step back, and its own hyperparameters with
their defaults.  Every consumer reads it from :data:`REGISTRY`: the option checks,
state creation and checkpoint conversion, the per-tensor and foreach kernels, both
fused kernels (compiled per :attr:`AlgorithmSpec.forms`: every algorithm registered
here runs in them), accumulation, diagnostics and the stall guard.

Every module of this package but the shared ones (:data:`SHARED_MODULES`) declares one
algorithm and is imported, so registered, when the package is: adding an algorithm
(see docs/architecture.md) is

1. a module here declaring it (``register(AlgorithmSpec(...))``, with the next free
   code), its torch paths included;
2. where its element math needs a form the fused kernels lack, that form in both
   (:mod:`adamkit.kernels.cpu.loops`, :mod:`adamkit.kernels.triton.elements`), in the
   same order;
3. its step in the NumPy reference (:mod:`adamkit.specs.reference`);
4. its optimizer class in :mod:`adamkit.optim` (and in that module's ``__all__``,
   which ``adamkit`` exports).
"""

# isort: skip_file
from __future__ import annotations

import importlib
import pkgutil

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

# The declarations of the algorithms adamkit first shipped, importable from here too (each
# module registers its own; any other is found below).
from .adam import ADAM
from .adamax import ADAMAX
from .nadam import NADAM
from .radam import RADAM
from .adopt import ADOPT
from .stable_adamw import STABLE_ADAMW
from .ademamix import ADEMAMIX
from .schedule_free import SCHEDULE_FREE_ADAMW

#: the modules of this package that declare no algorithm: what the declarations share
SHARED_MODULES = frozenset({"base", "single_tensor_ops", "foreach_ops"})


def _register_every_algorithm() -> None:
    """Import every declaring module of this package (each registers its algorithm)."""
    for module in pkgutil.iter_modules(__path__):
        if module.name not in SHARED_MODULES:
            importlib.import_module(f"{__name__}.{module.name}")


_register_every_algorithm()

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
    "SHARED_MODULES",
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
