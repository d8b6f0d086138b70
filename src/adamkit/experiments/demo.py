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

#: Lower limit of the log-scaled loss axes.
GAP_FLOOR = 1e-14

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
MARKERS = {"Adam": "o", "AdamW": "s", "AMSGrad": "^", "SGD": "D", "SGD+momentum": "D"}

Window2D = tuple[tuple[float, float], tuple[float, float]]
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
    # Below ~1e-14 the gap is float64 round-off, not progress: don't let it squash the plot.
    ax.set_ylim(bottom=max(ax.get_ylim()[0], GAP_FLOOR))
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
        x, fx = traj.points[:, 0], traj.losses
        ax_path.plot(x, fx, color=COLORS[name], label=label, markersize=4, **lines[name])
    ((x_min,),) = obj.minimizers
    ax_path.plot(x_min, obj.min_value, "*", color="gold", markeredgecolor="k", markersize=16, label="minimum")
    ax_path.set_xlabel("x")
    ax_path.set_ylabel(r"$f(x) = (x - 2)^2$")
    ax_path.set_title("Adam vs. SGD Parameter Updates")
    ax_path.legend()
    ax_path.grid(True, alpha=0.3)

    _plot_gap(ax_loss, experiment, runs, {name: dict(kw, markersize=4) for name, kw in lines.items()})
    fig.savefig(path, dpi=110)


def _grid(obj: Objective, window: Window2D, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X, Y, f(X, Y)`` on an ``n x n`` grid spanning ``window``."""
    (x_lo, x_hi), (y_lo, y_hi) = window
    X, Y = np.meshgrid(np.linspace(x_lo, x_hi, n), np.linspace(y_lo, y_hi, n))
    Z = obj.value(torch.from_numpy(np.stack([X, Y]))).numpy()
    return X, Y, Z


def _draw_contours(fig: Figure, ax, obj: Objective, window: Window2D) -> None:
    """Filled contours of ``f - f_min`` over ``window``, 4 log-spaced levels per decade, plus colour bar.

    The levels run from the decade of the grid's 1% quantile (everything below
    gets the darkest shade) up to the decade of its maximum.
    """
    X, Y, Z = _grid(obj, window)
    gap = Z - obj.min_value
    lo_exp = math.floor(math.log10(max(np.quantile(gap, 0.01), 1e-12)))
    hi_exp = max(math.ceil(math.log10(gap.max())), lo_exp + 1)
    levels = np.logspace(lo_exp, hi_exp, 4 * (hi_exp - lo_exp) + 1)
    shown = np.maximum(gap, levels[0])
    filled = ax.contourf(X, Y, shown, levels=levels, norm=LogNorm(), cmap="Greys_r", alpha=0.75)
    ax.contour(X, Y, gap, levels=levels[::4], colors="0.35", linewidths=0.5)
    fig.colorbar(filled, ax=ax, label=r"$f(x, y) - f_{\min}$", ticks=levels[::4], pad=0.02)


def _zoom_window(obj: Objective, runs: Mapping[str, Trajectory], margin: float = 1.4) -> Window2D:
    """A window centred on the minimizer that contains every run's final point (with a margin)."""
    centre = np.asarray(obj.minimizers[0])
    finals = np.array([t.points[-1] for t in runs.values() if np.all(np.isfinite(t.points[-1]))])
    spread = np.abs(finals - centre).max() if finals.size else 0.0
    half = max(margin * spread, 0.01)
    return ((centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half))


def _draw_map(
    fig: Figure, ax, experiment: Experiment, runs: Mapping[str, Trajectory], window: Window2D, every: int
) -> None:
    """Contours over ``window`` with every run's path (a mark every ``every`` steps, a large one
    at the final point), the start point and the minimizers."""
    obj = experiment.objective
    _draw_contours(fig, ax, obj, window)
    for name, traj in runs.items():
        pts = traj.points[np.all(np.isfinite(traj.points), axis=1)]
        style = dict(color=COLORS[name], marker=MARKERS[name], markeredgecolor="k", markeredgewidth=0.5)
        label = _label(name, experiment.lrs[name])
        ax.plot(pts[:, 0], pts[:, 1], label=label, markevery=every, markersize=5, **style, **LINES[name])
        ax.plot(*pts[-1], markersize=10, **style)
    start_label = f"start {_coords(obj.start)}"
    ax.plot(*obj.start, "o", color="white", markeredgecolor="k", markersize=10, label=start_label)
    for point in obj.minimizers:
        min_label = f"minimum {_coords(point)}"
        ax.plot(*point, "*", color="gold", markeredgecolor="k", markersize=18, label=min_label)
    (x_lo, x_hi), (y_lo, y_hi) = window
    ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="x", ylabel="y")


def plot_contour(
    experiment: Experiment, runs: Mapping[str, Trajectory], path: Path, n_marks: int = 10
) -> None:
    """Three panels: trajectories over log-spaced contours of ``f`` in the objective's window,
    the same zoomed in on the minimizer, and loss vs. step."""
    obj = experiment.objective
    fig = _new_figure(20, 6)
    fig.get_layout_engine().set(wspace=0.05)
    ax_map, ax_zoom, ax_loss = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])

    every = max(experiment.steps // n_marks, 1)
    _draw_map(fig, ax_map, experiment, runs, obj.window, every)
    title = f"{obj.name.capitalize()}: trajectories (a mark every {every} steps, large: final point)"
    ax_map.set_title(title)
    ax_map.legend(loc="lower right", fontsize="small", framealpha=0.9)

    _draw_map(fig, ax_zoom, experiment, runs, _zoom_window(obj, runs), every)
    ax_zoom.set_title("Zoom on the minimum (final points)")

    _plot_gap(ax_loss, experiment, runs, LINES)
    fig.savefig(path, dpi=100)


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
