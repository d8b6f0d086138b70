"""Analytic test objectives for optimizer demos.

Every objective works on float64 ``torch`` tensors.  ``value(x)`` and
``grad(x)`` accept a point of shape ``(d,)`` and, for plotting, also a batch of
points of shape ``(d, *batch)`` (coordinate first), returning a tensor of
shape ``batch`` (a 0-dim tensor for a single point) and ``(d, *batch)``
respectively.  Gradients are written out by hand; the test-suite checks them
against ``torch.autograd``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Objective", "Quadratic", "Rosenbrock", "Beale", "OBJECTIVES"]

Point = tuple[float, ...]
Window = tuple[tuple[float, float], ...]


class Objective(ABC):
    """A differentiable function ``f: R^d -> R`` with a known global minimum.

    Attributes
    ----------
    name:
        Short lower-case identifier (also used for file names).
    start:
        The starting point used by the demo.
    minimizers:
        All global minimizers ``x*`` (one tuple per point).
    min_value:
        ``f(x*)``.
    window:
        ``(lo, hi)`` per coordinate: the plotting window.
    """

    name: str
    start: Point
    minimizers: tuple[Point, ...]
    min_value: float
    window: Window

    @abstractmethod
    def value(self, x: Tensor) -> Tensor:
        """``f(x)``."""

    @abstractmethod
    def grad(self, x: Tensor) -> Tensor:
        """``∇f(x)``, same shape as ``x``."""

    @property
    def dim(self) -> int:
        """Number of coordinates ``d``."""
        return len(self.start)

    def start_tensor(self) -> Tensor:
        """The start point as a fresh float64 tensor of shape ``(d,)``."""
        return torch.tensor(self.start, dtype=torch.float64)


@dataclass(frozen=True)
class Quadratic(Objective):
    """The 1-D seed problem ``f(x) = (x - c)^2`` with ``f'(x) = 2 (x - c)``.

    Minimum ``f(c) = 0``; the defaults (``c = 2``, start ``8``) are the
    original Adam-vs-SGD seed experiment.
    """

    center: float = 2.0
    start: Point = (8.0,)
    window: Window = ((-2.0, 8.0),)
    name: str = "quadratic"

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        return ((self.center,),)

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def value(self, x: Tensor) -> Tensor:
        return (x[0] - self.center) ** 2

    def grad(self, x: Tensor) -> Tensor:
        return 2.0 * (x - self.center)


@dataclass(frozen=True)
class Rosenbrock(Objective):
    """Rosenbrock's banana valley.

    ``f(x, y) = (a - x)^2 + b (y - x^2)^2``

    ``∂f/∂x = -2 (a - x) - 4 b x (y - x^2)``,  ``∂f/∂y = 2 b (y - x^2)``.

    Global minimum ``f(a, a^2) = 0`` at the end of a long, curved, flat-bottomed
    valley; the start ``(-1.5, 2)`` lies on the far side of the valley.
    """

    a: float = 1.0
    b: float = 100.0
    start: Point = (-1.5, 2.0)
    window: Window = ((-2.0, 2.0), (-1.0, 3.0))
    name: str = "rosenbrock"

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        return ((self.a, self.a**2),)

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def value(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        return (self.a - u) ** 2 + self.b * (v - u**2) ** 2

    def grad(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        r = v - u**2
        return torch.stack((-2.0 * (self.a - u) - 4.0 * self.b * u * r, 2.0 * self.b * r))


@dataclass(frozen=True)
class Beale(Objective):
    """Beale's function.

    ``f(x, y) = t1^2 + t2^2 + t3^2`` with ``t_k = c_k - x + x y^k`` and
    ``(c_1, c_2, c_3) = (1.5, 2.25, 2.625)``, so

    ``∂f/∂x = Σ_k 2 t_k (y^k - 1)``,  ``∂f/∂y = Σ_k 2 t_k k x y^(k-1)``.

    Global minimum ``f(3, 0.5) = 0``; sharp walls and flat plateaus (and a
    saddle at ``(0, 1)``) make step-size adaptation matter.
    """

    start: Point = (1.0, 1.5)
    window: Window = ((-1.0, 4.5), (-1.5, 2.0))
    name: str = "beale"

    _C = (1.5, 2.25, 2.625)

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        return ((3.0, 0.5),)

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def _terms(self, x: Tensor) -> list[Tensor]:
        u, v = x[0], x[1]
        return [c - u + u * v**k for k, c in enumerate(self._C, start=1)]

    def value(self, x: Tensor) -> Tensor:
        return sum(t**2 for t in self._terms(x))  # type: ignore[return-value]

    def grad(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        terms = self._terms(x)
        du = sum(2.0 * t * (v**k - 1.0) for k, t in enumerate(terms, start=1))
        dv = sum(2.0 * t * k * u * v ** (k - 1) for k, t in enumerate(terms, start=1))
        return torch.stack((du, dv))  # type: ignore[arg-type]


#: The objectives of the demo, by name.
OBJECTIVES: dict[str, Objective] = {f.name: f for f in (Quadratic(), Rosenbrock(), Beale())}
