"""The ``adamkit demo``: Adam and friends against SGD on three analytic objectives.

Experiments
-----------
(a) The seed experiment, reproduced exactly: ``f(x) = (x - 2)^2`` from
    ``x0 = 8``, 50 steps, learning rate ``alpha = 0.1`` for both Adam
    (``beta1 = 0.9, beta2 = 0.999, eps = 1e-8``) and plain SGD.  Adam takes
    steps of size about ``alpha`` regardless of the gradient's scale,

        m_t = beta1 m_{t-1} + (1 - beta1) g_t
        v_t = beta2 v_{t-1} + (1 - beta2) g_t^2
        x_t = x_{t-1} - alpha * m_hat_t / (sqrt(v_hat_t) + eps),
        m_hat_t = m_t / (1 - beta1^t),  v_hat_t = v_t / (1 - beta2^t),

    while SGD's step ``alpha * f'(x) = 0.2 (x - 2)`` shrinks the error by a
    factor ``0.8`` per step.
(b) Rosenbrock and Beale in 2-D with Adam, AdamW, AMSGrad and SGD with
    momentum 0.9, trajectories drawn over log-scaled contour plots.

Each optimizer acts on a single float64 parameter tensor whose ``.grad`` is
set to the objective's analytic gradient before every ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import adamkit

from .functions import Beale, Objective, Quadratic, Rosenbrock
from .plots import plot_experiment
from .runs import TOLERANCE, Experiment, Trajectory

__all__ = [
    "Experiment",
    "Row",
    "Trajectory",
    "EXPERIMENTS",
    "TOLERANCE",
    "format_table",
    "make_optimizer",
    "plot_paths",
    "run_demo",
    "run_experiment",
    "run_optimizer",
]


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 1e-2
SGD_MOMENTUM = 0.9

OptimizerFactory = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]


# --------------------------------------------------------------------------- optimizers


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def _adamw(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAMW_WEIGHT_DECAY)


def _amsgrad(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, amsgrad=True)


def _nadam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.NAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def _radam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.RAdam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def _adopt(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.ADOPT(params, lr=lr)  # its authors' betas (0.9, 0.9999) and eps 1e-6


def _sgd(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _sgd_momentum(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "Adam": _adam,
    "AdamW": _adamw,
    "AMSGrad": _amsgrad,
    "NAdam": _nadam,
    "RAdam": _radam,
    "ADOPT": _adopt,
    "SGD": _sgd,
    "SGD+momentum": _sgd_momentum,
}


def make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """Build the optimizer called ``name`` (a key of ``OPTIMIZERS``) over ``params``."""
    try:
        factory = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; choose from {sorted(OPTIMIZERS)}") from None
    return factory(params, lr)


# --------------------------------------------------------------------------- running


def run_optimizer(objective: Objective, optimizer: str, lr: float, steps: int) -> Trajectory:
    """Run ``steps`` steps of ``optimizer`` on ``objective`` from its start point.

    The parameter is a float64 leaf tensor; before each ``step()`` its ``.grad``
    is set to the analytic gradient ``∇f(x_{t-1})``.  Once an iterate stops
    being finite the remaining iterates are recorded as NaN.
    """
    x = objective.start_tensor().requires_grad_(True)
    opt = make_optimizer(optimizer, [x], lr)
    points = np.full((steps + 1, objective.dim), np.nan)
    points[0] = objective.start
    for t in range(1, steps + 1):
        x.grad = objective.grad(x.detach())
        opt.step()
        points[t] = x.detach().numpy()
        if not np.all(np.isfinite(points[t])):
            break
    losses = objective.value(torch.from_numpy(points.T.copy())).numpy()
    return Trajectory(points=points, losses=losses)


EXPERIMENTS: tuple[Experiment, ...] = (
    # (a) The seed experiment, verbatim: alpha = 0.1 for both, 50 steps.
    Experiment(Quadratic(), {"SGD": 0.1, "Adam": 0.1}, steps=50),
    # (b) Learning rates are picked per function, one for the Adam family and
    # one for SGD + momentum, from a sweep over 1e-4 .. 1e-1 (3000 steps each):
    # the largest "round" rate at which every method is stable and gets within
    # TOLERANCE of the minimum inside the step budget, so the pictures compare
    # how (not whether) they get there.
    #   * Rosenbrock, Adam family lr = 0.03.  At lr = 0.1 Adam and AdamW end up
    #     bouncing around the valley floor near (1, 1); at lr <= 3e-3 they are
    #     still crawling along the valley after 3000 steps.  AdamW's decoupled
    #     weight decay (1e-2) pulls towards the origin, so it is the slowest
    #     over the last stretch.
    #   * Rosenbrock, SGD + momentum lr = 1e-3.  The curvature across the
    #     valley at the start is f_xx ~ 1900, and heavy-ball momentum 0.9 is
    #     stable only for lr < 2 (1 + 0.9) / 1900 ~ 2e-3; lr = 3e-3 diverges
    #     within ten steps.
    Experiment(
        Rosenbrock(),
        {"Adam": 0.03, "AdamW": 0.03, "AMSGrad": 0.03, "SGD+momentum": 1e-3},
        steps=2500,
    ),
    #   * Beale, Adam family lr = 0.1.  At 0.03-0.05 AdamW, slowed down by the
    #     weight decay in Beale's flat valley, does not reach TOLERANCE within
    #     a few thousand steps; Adam and AMSGrad get there either way.
    #   * Beale, SGD + momentum lr = 1e-3 (1e-2 diverges off the steep walls).
    Experiment(
        Beale(),
        {"Adam": 0.1, "AdamW": 0.1, "AMSGrad": 0.1, "SGD+momentum": 1e-3},
        steps=2000,
    ),
)


def run_experiment(experiment: Experiment) -> dict[str, Trajectory]:
    """Run every optimizer of ``experiment``; trajectories keyed by optimizer name."""
    return {
        name: run_optimizer(experiment.objective, name, lr, experiment.steps) for name, lr in experiment.lrs.items()
    }


# --------------------------------------------------------------------------- results table


@dataclass(frozen=True)
class Row:
    """One line of the results table; ``trajectory`` holds every iterate of the run."""

    function: str
    optimizer: str
    lr: float
    final_point: tuple[float, ...]
    final_loss: float
    steps_to_tol: int | None
    trajectory: Trajectory = field(repr=False, compare=False)


def _rows(experiment: Experiment, runs: Mapping[str, Trajectory]) -> list[Row]:
    obj = experiment.objective
    return [
        Row(
            function=obj.name,
            optimizer=name,
            lr=experiment.lrs[name],
            final_point=tuple(float(c) for c in traj.points[-1]),
            final_loss=float(traj.losses[-1]),
            steps_to_tol=traj.steps_to_reach(obj.min_value),
            trajectory=traj,
        )
        for name, traj in runs.items()
    ]


def _format_point(point: Sequence[float]) -> str:
    """``2.0001`` in 1-D, ``(1.0000, 1.0000)`` otherwise."""
    cells = [f"{c:.4f}" for c in point]
    return cells[0] if len(cells) == 1 else "(" + ", ".join(cells) + ")"


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table with aligned columns."""
    header = ("function", "optimizer", "lr", "final point", "final loss", f"steps to {TOLERANCE:g}")
    body = [
        (
            r.function,
            r.optimizer,
            f"{r.lr:g}",
            _format_point(r.final_point),
            f"{r.final_loss:.3e}",
            "never" if r.steps_to_tol is None else str(r.steps_to_tol),
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (header, *body)) for i in range(len(header))]
    numeric = {2, 4, 5}  # right-align numbers

    def fmt(line: Sequence[str]) -> str:
        cells = (c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([fmt(header), rule, *(fmt(line) for line in body)])


# --------------------------------------------------------------------------- entry point


def plot_paths(out_dir: Path) -> list[Path]:
    """The figures ``run_demo(out_dir)`` writes, in order."""
    return [Path(out_dir) / e.filename for e in EXPERIMENTS]


def run_demo(out_dir: Path, *, quiet: bool = False) -> list[Row]:
    """Run all ``EXPERIMENTS``, write one PNG each into ``out_dir`` and return the results.

    ``out_dir`` is created if missing; existing figures of the same name are
    overwritten.  Unless ``quiet``, the results table is printed.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for experiment, path in zip(EXPERIMENTS, plot_paths(out_dir)):
        runs = run_experiment(experiment)
        plot_experiment(experiment, runs, path, tolerance=TOLERANCE)
        rows.extend(_rows(experiment, runs))
    if not quiet:
        print(format_table(rows))
    return rows
