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

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

import adamkit

from .functions import Beale, Objective, Quadratic, Rosenbrock

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

#: A run "reaches the minimum" at the first step ``t`` with ``f(x_t) - f_min <= TOLERANCE``.
TOLERANCE = 1e-3

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAMW_WEIGHT_DECAY = 1e-2
SGD_MOMENTUM = 0.9

# Colour and line style stay fixed per optimizer across all figures; the
# styles differ so that coinciding trajectories stay visible on top of each other.
COLORS = {
    "Adam": "tab:blue",
    "AdamW": "tab:orange",
    "AMSGrad": "tab:green",
    "SGD": "tab:red",
    "SGD+momentum": "tab:red",
}
LINES = {
    "Adam": dict(linestyle="-", linewidth=3.0),
    "AdamW": dict(linestyle="--", linewidth=2.0),
    "AMSGrad": dict(linestyle=":", linewidth=2.2),
    "SGD": dict(linestyle="-", linewidth=1.4),
    "SGD+momentum": dict(linestyle="-", linewidth=1.4),
}

OptimizerFactory = Callable[[list[torch.Tensor], float], torch.optim.Optimizer]


# --------------------------------------------------------------------------- optimizers


def _adam(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS)


def _adamw(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.AdamW(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, weight_decay=ADAMW_WEIGHT_DECAY)


def _amsgrad(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return adamkit.Adam(params, lr=lr, betas=ADAM_BETAS, eps=ADAM_EPS, amsgrad=True)


def _sgd(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr)


def _sgd_momentum(params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM)


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "Adam": _adam,
    "AdamW": _adamw,
    "AMSGrad": _amsgrad,
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


EXPERIMENTS: tuple[Experiment, ...] = (
    # (a) The seed experiment, verbatim: alpha = 0.1 for both, 50 steps.
    Experiment(Quadratic(), {"SGD": 0.1, "Adam": 0.1}, steps=50),
    # (b) Learning rates are picked per function, one for the Adam family and
    # one for SGD, from a sweep over 1e-4 .. 1e-1 (3000 steps each), such that
    # every method gets to the minimum within the budget and the pictures
    # show how differently they get there:
    #   * Adam family, lr = 0.03: lr = 0.1 is faster for Adam/AMSGrad but then
    #     AdamW (weight decay pulls towards the origin) stalls short of the
    #     minimum; lr <= 3e-3 never gets there within a few thousand steps.
    #   * SGD + momentum, lr = 1e-3: the gradient at the start is ~ 1e3, so
    #     lr >= 3e-3 diverges within ten steps; 1e-3 is safely stable.
    Experiment(
        Rosenbrock(),
        {"Adam": 0.03, "AdamW": 0.03, "AMSGrad": 0.03, "SGD+momentum": 1e-3},
        steps=2500,
    ),
    #   * Beale: same choice, lr = 0.03 for the Adam family.  SGD + momentum
    #     with lr = 1e-3 (1e-2 diverges at the steep wall near y = 1.5).
    Experiment(
        Beale(),
        {"Adam": 0.03, "AdamW": 0.03, "AMSGrad": 0.03, "SGD+momentum": 1e-3},
        steps=2500,
    ),
)


def run_experiment(experiment: Experiment) -> dict[str, Trajectory]:
    """Run every optimizer of ``experiment``; trajectories keyed by optimizer name."""
    return {
        name: run_optimizer(experiment.objective, name, lr, experiment.steps)
        for name, lr in experiment.lrs.items()
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


def format_table(rows: Sequence[Row]) -> str:
    """The rows as a plain-text table with aligned columns."""
    header = ("function", "optimizer", "lr", "final point", "final loss", f"steps to {TOLERANCE:g}")
    body = [
        (
            r.function,
            r.optimizer,
            f"{r.lr:g}",
            "(" + ", ".join(f"{c:.4f}" for c in r.final_point) + ")",
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


# --------------------------------------------------------------------------- plotting


def _new_figure(width: float, height: float) -> Figure:
    """A figure rendered by the Agg backend (no display, no pyplot state)."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _label(name: str, lr: float) -> str:
    return f"{name} (lr={lr:g})"


def _point(point: Sequence[float]) -> str:
    """``x0 = 8`` for 1-D points, ``(x, y) = (-1.5, 2)`` for 2-D ones."""
    if len(point) == 1:
        return f"x0 = {point[0]:g}"
    return "(x, y) = " + _coords(point)


def _coords(point: Sequence[float]) -> str:
    return "(" + ", ".join(f"{c:g}" for c in point) + ")"


def _plot_gap(ax, experiment: Experiment, runs: Mapping[str, Trajectory], lines: Mapping[str, dict]) -> None:
    """Log-scale plot of the optimality gap ``f(x_t) - f_min`` against the step ``t``."""
    f_min = experiment.objective.min_value
    for name, traj in runs.items():
        ax.plot(
            np.arange(traj.steps + 1),
            traj.losses - f_min,
            color=COLORS[name],
            label=_label(name, experiment.lrs[name]),
            **lines[name],
        )
    ax.axhline(TOLERANCE, color="0.4", linestyle="--", linewidth=1, label=f"tolerance {TOLERANCE:g}")
    ax.set_yscale("log", nonpositive="mask")
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$f(x_t) - f_{\min}$ (log scale)")
    ax.set_title(f"Loss vs. step ({experiment.steps} steps from {_point(experiment.objective.start)})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()


def plot_quadratic(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path) -> None:
    """The seed figure: the iterates ``(x_t, f(x_t))`` on the loss curve, plus loss vs. step."""
    obj = experiment.objective
    lines = {"SGD": dict(marker="o", linestyle="-"), "Adam": dict(marker="s", linestyle="-")}
    fig = _new_figure(12, 5)
    ax_path, ax_loss = fig.subplots(1, 2)

    ((lo, hi),) = obj.window
    xs = np.linspace(lo, hi, 100)
    ax_path.plot(xs, obj.value(torch.from_numpy(xs)[None]).numpy(), color="0.3", label="Loss Function")
    for name, traj in runs.items():
        label = _label(name, experiment.lrs[name])
        ax_path.plot(traj.points[:, 0], traj.losses, color=COLORS[name], label=label, markersize=4, **lines[name])
    ((x_min,),) = obj.minimizers
    ax_path.plot(x_min, obj.min_value, "*", color="gold", markeredgecolor="k", markersize=16, label="minimum")
    ax_path.set_xlabel("x")
    ax_path.set_ylabel(r"$f(x) = (x - 2)^2$")
    ax_path.set_title("Adam vs. SGD Parameter Updates")
    ax_path.legend()
    ax_path.grid(True, alpha=0.3)

    _plot_gap(ax_loss, experiment, runs, {name: dict(kw, markersize=4) for name, kw in lines.items()})
    fig.savefig(path, dpi=110)


def _grid(obj: Objective, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X, Y, f(X, Y)`` on an ``n x n`` grid spanning ``obj.window``."""
    (x_lo, x_hi), (y_lo, y_hi) = obj.window
    X, Y = np.meshgrid(np.linspace(x_lo, x_hi, n), np.linspace(y_lo, y_hi, n))
    Z = obj.value(torch.from_numpy(np.stack([X, Y]))).numpy()
    return X, Y, Z


def plot_contour(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path) -> None:
    """Trajectories over log-spaced contours of ``f`` (left) and loss vs. step (right)."""
    obj = experiment.objective
    fig = _new_figure(13, 5.5)
    ax_map, ax_loss = fig.subplots(1, 2, width_ratios=[1.15, 1])

    X, Y, Z = _grid(obj)
    gap = Z - obj.min_value
    lo_exp = -2
    hi_exp = math.ceil(math.log10(gap.max()))
    levels = np.logspace(lo_exp, hi_exp, 4 * (hi_exp - lo_exp) + 1)
    filled = ax_map.contourf(
        X, Y, np.maximum(gap, 10.0**lo_exp), levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.75
    )
    ax_map.contour(X, Y, gap, levels=levels[::4], colors="0.35", linewidths=0.5)
    fig.colorbar(filled, ax=ax_map, label=r"$f(x, y) - f_{\min}$ (log scale)", ticks=levels[::4])

    for name, traj in runs.items():
        pts = traj.points[np.all(np.isfinite(traj.points), axis=1)]
        label = _label(name, experiment.lrs[name])
        ax_map.plot(pts[:, 0], pts[:, 1], color=COLORS[name], label=label, **LINES[name])
        ax_map.plot(*pts[-1], "o", color=COLORS[name], markeredgecolor="k", markersize=7)

    ax_map.plot(*obj.start, "o", color="white", markeredgecolor="k", markersize=9, label=f"start {_coords(obj.start)}")
    for point in obj.minimizers:
        ax_map.plot(*point, "*", color="gold", markeredgecolor="k", markersize=16, label=f"minimum {_coords(point)}")
    (x_lo, x_hi), (y_lo, y_hi) = obj.window
    ax_map.set_xlim(x_lo, x_hi)
    ax_map.set_ylim(y_lo, y_hi)
    ax_map.set_xlabel("x")
    ax_map.set_ylabel("y")
    ax_map.set_title(f"{obj.name.capitalize()}: optimizer trajectories (dots: final points)")
    ax_map.legend(loc="lower right", fontsize="small", framealpha=0.9)

    _plot_gap(ax_loss, experiment, runs, LINES)
    fig.savefig(path, dpi=110)


def _plot(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path) -> None:
    if experiment.objective.dim == 1:
        plot_quadratic(experiment, runs, path)
    else:
        plot_contour(experiment, runs, path)


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
        _plot(experiment, runs, path)
        rows.extend(_rows(experiment, runs))
    if not quiet:
        print(format_table(rows))
    return rows
