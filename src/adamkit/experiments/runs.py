"""What an optimizer experiment is and what a run of one leaves behind: shared by the
code that runs experiments and the code that draws them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .functions import Objective

#: A run "reaches the minimum" at the first step ``t`` with ``f(x_t) - f_min <= TOLERANCE``.
TOLERANCE = 1e-3


@dataclass(frozen=True)
class Trajectory:
    """The iterates of one run: ``points[t] = x_t`` and ``losses[t] = f(x_t)``, ``t = 0..steps``."""

    points: np.ndarray
    losses: np.ndarray

    @property
    def steps(self) -> int:
        """Number of optimizer steps taken."""
        return len(self.points) - 1

    def steps_to_reach(self, min_value: float, tol: float = TOLERANCE) -> int | None:
        """First ``t`` with ``f(x_t) - min_value <= tol``, or ``None`` if never reached."""
        hits = np.flatnonzero(self.losses - min_value <= tol)
        return int(hits[0]) if hits.size else None


@dataclass(frozen=True)
class Experiment:
    """One objective, the optimizers to race on it with their learning rates, and a step budget."""

    objective: Objective
    lrs: Mapping[str, float]
    steps: int

    @property
    def filename(self) -> str:
        """Name of the figure written for this experiment."""
        return f"{self.objective.name}.png"
