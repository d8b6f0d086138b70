"""Ways of executing the update rule, and the registry that picks among them.

A kernel is a plug-in: a ``step(batch, rule)`` function (:data:`StepFn`: one param
group's tensors as a :class:`GroupBatch`, and its :class:`~adamkit.rule.UpdateRule`)
plus one :class:`Kernel` entry below.  Per-tensor kernels (``single_tensor``, ``foreach``)
write each algorithm for a list of tensors and are lifted to a step by
:func:`~adamkit.kernels.lists.list_kernel`; the fused kernels (``cpu``, ``triton``)
take the whole group, sharing their host side (:mod:`~adamkit.kernels.host`).  The
shared conformance suite (``tests/test_conformance.py``) runs every registered kernel
against the NumPy reference, so a new kernel inherits all tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..algorithms import REGISTRY
from ..user_warnings import warn_at_user
from . import cpu, foreach, single_tensor
from . import triton as triton_kernel
from .lists import list_kernel
from .types import GroupBatch, GroupTensors, StepFn


@dataclass(frozen=True)
class Kernel:
    name: str
    step: StepFn
    #: device types the kernel runs on; ``None`` means any device torch supports
    device_types: frozenset[str] | None = None
    #: whether autograd can flow through the step (``differentiable=True``)
    differentiable: bool = False
    #: whether results equal torch.optim's for-loop bit for bit (else: the reference's,
    #: within the rounding of the element dtype)
    torch_exact: bool = False
    #: one pass per element in fp32 (fp64 for fp64 params): bf16/fp16 params and
    #: states are rounded once per update, not after every op as torch's for-loop does
    fused: bool = False
    #: takes a GradScaler's ``grad_scale`` / ``found_inf`` (unscales and skips in-kernel)
    amp: bool = False
    #: extra availability check (e.g. an optional dependency is importable)
    available: Callable[[], bool] = lambda: True
    #: why the kernel is not available here (None: it is, or no reason is known)
    unavailable_reason: Callable[[], str | None] = lambda: None
    #: the algorithms it runs (the list kernels have a function per algorithm; the fused
    #: kernels compile the forms of those declared :attr:`~adamkit.algorithms.AlgorithmSpec.fused`)
    algorithms: frozenset[str] = frozenset(REGISTRY)

    def supports(self, device: torch.device) -> bool:
        return self.device_types is None or device.type in self.device_types

    def runs(self, algorithm: str) -> bool:
        """Whether the kernel runs ``algorithm``."""
        return algorithm in self.algorithms


#: the algorithms the fused kernels run
FUSED_ALGORITHMS = frozenset(name for name, spec in REGISTRY.items() if spec.fused)

KERNELS: dict[str, Kernel] = {
    "single_tensor": Kernel(
        "single_tensor",
        list_kernel(single_tensor.ALGORITHMS, one_by_one=True),
        differentiable=True,
        torch_exact=True,
    ),
    "foreach": Kernel("foreach", list_kernel(foreach.ALGORITHMS, one_by_one=False), torch_exact=True),
    "cpu": Kernel(
        "cpu",
        cpu.step,
        device_types=frozenset({"cpu"}),
        fused=True,
        amp=True,
        available=cpu.available,
        unavailable_reason=cpu.unavailable_reason,
        algorithms=FUSED_ALGORITHMS,
    ),
    "triton": Kernel(
        "triton",
        triton_kernel.step,
        device_types=triton_kernel.device_types(),
        fused=True,
        amp=True,
        available=triton_kernel.available,
        algorithms=FUSED_ALGORITHMS,
    ),
}

#: what a fused path means per device type
FUSED = {"cpu": "cpu", "cuda": "triton"}


_warned: set[str] = set()


def _fallback(wanted: str, instead: str) -> str:
    if wanted not in _warned:
        _warned.add(wanted)
        reason = KERNELS[wanted].unavailable_reason()
        because = f" ({reason})" if reason else ""
        warn_at_user(f"adamkit: the {wanted!r} kernel is not available here{because}; using {instead!r}")
    return instead


def fused_backend(devices: set[torch.device], algorithm: str = "adam") -> str:
    """The fused kernel for these devices (``fused=True``), or foreach where there is
    none (or it does not run ``algorithm``)."""
    types = {d.type for d in devices}
    name = FUSED.get(types.pop()) if len(types) == 1 else None
    if name is None or not KERNELS[name].runs(algorithm):
        return "foreach"
    return name if KERNELS[name].available() else _fallback(name, "foreach")


def default_backend(devices: set[torch.device], *, differentiable: bool, algorithm: str = "adam") -> str:
    """The backend used when a group says ``backend=None``: autograd needs the single-tensor
    path; otherwise the device's fused kernel, else multi-tensor foreach ops."""
    if differentiable:
        return "single_tensor"
    return fused_backend(devices, algorithm)


def resolve(
    backend: str | None,
    devices: set[torch.device],
    *,
    differentiable: bool,
    algorithm: str = "adam",
) -> Kernel:
    """The kernel for a group of ``algorithm`` whose params live on ``devices``.

    Raises ``ValueError`` naming the backend when it cannot run this group.
    """
    name = backend or default_backend(devices, differentiable=differentiable, algorithm=algorithm)
    kernel = KERNELS[name]
    if not kernel.runs(algorithm):
        runs = ", ".join(repr(n) for n, k in KERNELS.items() if k.runs(algorithm))
        raise ValueError(f"backend={name!r} does not run {algorithm} (backends that do: {runs}, or None)")
    if differentiable and not kernel.differentiable:
        raise ValueError(f"backend={name!r} does not support differentiable=True (use backend='single_tensor' or None)")
    if not kernel.available():
        reason = kernel.unavailable_reason()
        raise ValueError(f"backend={name!r} is not available {f'here: {reason}' if reason else 'in this installation'}")
    for device in devices:
        if not kernel.supports(device):
            raise ValueError(f"backend={name!r} cannot run params on device {device}")
    return kernel


__all__ = ["GroupBatch", "GroupTensors", "KERNELS", "Kernel", "default_backend", "fused_backend", "resolve"]
