"""Analytic test objectives for optimizer demos.

Every objective works on float64 ``torch`` tensors.  ``value(x)`` and
``grad(x)`` accept a point of shape ``(d,)`` and, for plotting, also a batch of
points of shape ``(d, *batch)`` (coordinate first), returning a tensor of
shape ``batch`` (a 0-dim tensor for a single point) and ``(d, *batch)``
respectively.  Gradients are written out by hand; the test-suite checks them
against ``torch.autograd``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Objective", "Quadratic", "Rosenbrock", "Beale", "Himmelblau", "Saddle", "Rastrigin", "OBJECTIVES"]

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


def _newton(grad, hessian, point: Point, steps: int = 8) -> Point:
    """A minimizer known to a few digits, refined to float64 precision by Newton's method."""
    x = torch.tensor(point, dtype=torch.float64)
    for _ in range(steps):
        x = x - torch.linalg.solve(hessian(x), grad(x))
    return tuple(x.tolist())


@dataclass(frozen=True)
class Himmelblau(Objective):
    """Himmelblau's function: four global minima.

    ``f(x, y) = (x^2 + y - 11)^2 + (x + y^2 - 7)^2``, so
    ``∂f/∂x = 4 x a + 2 b`` and ``∂f/∂y = 2 a + 4 y b`` with ``a = x^2 + y - 11``,
    ``b = x + y^2 - 7``.  ``f = 0`` at (3, 2) and three irrational points.
    """

    start: Point = (-0.3, -0.9)  # near the local maximum (-0.2708, -0.9230)
    window: Window = ((-5.0, 5.0), (-5.0, 5.0))
    name: str = "himmelblau"

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        rough = ((3.0, 2.0), (-2.805118, 3.131313), (-3.779310, -3.283186), (3.584428, -1.848127))
        return tuple(_newton(self.grad, self._hessian, p) for p in rough)

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def value(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        return (u**2 + v - 11) ** 2 + (u + v**2 - 7) ** 2

    def grad(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        a, b = u**2 + v - 11, u + v**2 - 7
        return torch.stack((4 * u * a + 2 * b, 2 * a + 4 * v * b))

    def _hessian(self, x: Tensor) -> Tensor:
        u, v = x[0], x[1]
        a, b = u**2 + v - 11, u + v**2 - 7
        cross = 4 * u + 4 * v
        return torch.stack((torch.stack((4 * a + 8 * u**2 + 2, cross)), torch.stack((cross, 2 + 4 * b + 8 * v**2))))


@dataclass(frozen=True)
class Saddle(Objective):
    """A saddle between two minima: ``f(x, y) = x^2 + (y^2 - 1)^2 / 4``.

    ``∇f = (2 x, y (y^2 - 1))``; the origin is a saddle point (``f = 1/4``, curvature
    -1 along y), the minima ``f = 0`` are at ``(0, ±1)``.  Starting almost on the
    ridge, a method must amplify a tiny gradient to leave it.
    """

    start: Point = (1.5, 1e-3)
    window: Window = ((-2.0, 2.0), (-1.6, 1.6))
    name: str = "saddle"

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        return ((0.0, 1.0), (0.0, -1.0))

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def value(self, x: Tensor) -> Tensor:
        return x[0] ** 2 + (x[1] ** 2 - 1) ** 2 / 4

    def grad(self, x: Tensor) -> Tensor:
        return torch.stack((2 * x[0], x[1] * (x[1] ** 2 - 1)))


@dataclass(frozen=True)
class Rastrigin(Objective):
    """Rastrigin's function in 2-D: a bowl covered in local minima.

    ``f(x) = 20 + Σ_i (x_i^2 - 10 cos(2π x_i))``, ``∂f/∂x_i = 2 x_i + 20π sin(2π x_i)``;
    the global minimum ``f(0, 0) = 0`` sits among local minima near every integer point.
    """

    start: Point = (2.2, -1.7)
    window: Window = ((-3.0, 3.0), (-3.0, 3.0))
    name: str = "rastrigin"

    @property
    def minimizers(self) -> tuple[Point, ...]:  # type: ignore[override]
        return ((0.0, 0.0),)

    @property
    def min_value(self) -> float:  # type: ignore[override]
        return 0.0

    def value(self, x: Tensor) -> Tensor:
        return 20 + sum(x[i] ** 2 - 10 * torch.cos(2 * math.pi * x[i]) for i in range(2))

    def grad(self, x: Tensor) -> Tensor:
        return torch.stack([2 * x[i] + 20 * math.pi * torch.sin(2 * math.pi * x[i]) for i in range(2)])


#: Every objective, by name (the demo uses the first three; ``adamkit viz`` all of them).
OBJECTIVES: dict[str, Objective] = {
    f.name: f for f in (Quadratic(), Rosenbrock(), Beale(), Himmelblau(), Saddle(), Rastrigin())
}
