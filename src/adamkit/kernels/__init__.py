"""Ways of executing the update rule, and the registry that picks among them.

A kernel is a plug-in: one module exposing ``adam(tensors, rule, group, steps)`` and
``adamax(...)`` plus one :class:`Kernel` entry below.  The shared conformance suite
(``tests/test_conformance.py``) runs every registered kernel against the NumPy
reference, so a new kernel inherits all tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import foreach, reference
from .types import GroupTensors, KernelFn


@dataclass(frozen=True)
class Kernel:
    name: str
    adam: KernelFn
    adamax: KernelFn
    #: device types the kernel runs on; ``None`` means any device torch supports
    device_types: frozenset[str] | None = None
    #: whether autograd can flow through the step (``differentiable=True``)
    differentiable: bool = False
    #: extra availability check (e.g. an optional dependency is importable)
    available: Callable[[], bool] = lambda: True

    def supports(self, device: torch.device) -> bool:
        return self.device_types is None or device.type in self.device_types


KERNELS: dict[str, Kernel] = {
    "reference": Kernel("reference", reference.adam, reference.adamax, differentiable=True),
    "foreach": Kernel("foreach", foreach.adam, foreach.adamax),
}


def default_backend(devices: set[torch.device], *, differentiable: bool) -> str:
    """The backend used when a group says ``backend=None``.

    On CPU the per-tensor loop is torch's own default and measured faster than
    foreach ops; on accelerators (or a group spread over several devices) the
    multi-tensor foreach path wins.  Autograd needs the reference path.
    """
    if differentiable or devices == {torch.device("cpu")}:
        return "reference"
    return "foreach"


def resolve(backend: str | None, devices: set[torch.device], *, differentiable: bool) -> Kernel:
    """The kernel for a group whose params live on ``devices``.

    Raises ``ValueError`` naming the backend when it cannot run this group.
    """
    name = backend or default_backend(devices, differentiable=differentiable)
    kernel = KERNELS[name]
    if differentiable and not kernel.differentiable:
        raise ValueError(f"backend={name!r} does not support differentiable=True (use backend='reference' or None)")
    if not kernel.available():
        raise ValueError(f"backend={name!r} is not available in this installation")
    for device in devices:
        if not kernel.supports(device):
            raise ValueError(f"backend={name!r} cannot run params on device {device}")
    return kernel


__all__ = ["GroupTensors", "KERNELS", "Kernel", "default_backend", "resolve"]
