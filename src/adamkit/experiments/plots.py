"""Figures for optimizer experiments: the seed's loss-curve picture for 1-D objectives,
trajectories over log-scaled contour maps for 2-D ones, and loss-vs-step panels.

Rendering uses the Agg backend directly (no display, no pyplot global state).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .functions import Objective
from .runs import Experiment, Trajectory

if TYPE_CHECKING:  # matplotlib (the ``cli`` extra) is imported when a figure is drawn
    from matplotlib.figure import Figure

#: Lower limit of the log-scaled loss axes.
GAP_FLOOR = 1e-14


# Colour and line style stay fixed per optimizer across all figures; the
# styles differ so that coinciding trajectories stay visible on top of each other.
COLORS = {
    "Adam": "tab:blue",
    "AdamW": "tab:orange",
    "AMSGrad": "tab:green",
    "NAdam": "tab:purple",
    "RAdam": "tab:brown",
    "ADOPT": "tab:pink",
    "SGD": "tab:red",
    "SGD+momentum": "tab:red",
}
LINES = {
    "Adam": dict(linestyle="-", linewidth=3.0),
    "AdamW": dict(linestyle="--", linewidth=2.0),
    "AMSGrad": dict(linestyle=":", linewidth=2.2),
    "NAdam": dict(linestyle="-.", linewidth=1.8),
    "RAdam": dict(linestyle="--", linewidth=1.6),
    "ADOPT": dict(linestyle="-", linewidth=1.6),
    "SGD": dict(linestyle="-", linewidth=1.4),
    "SGD+momentum": dict(linestyle="-", linewidth=1.4),
}
MARKERS = {
    "Adam": "o",
    "AdamW": "s",
    "AMSGrad": "^",
    "NAdam": "v",
    "RAdam": "P",
    "ADOPT": "X",
    "SGD": "D",
    "SGD+momentum": "D",
}

Window2D = tuple[tuple[float, float], tuple[float, float]]


def new_figure(width: float, height: float) -> Figure:
    """A figure rendered by the Agg backend (no display, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def run_label(name: str, lr: float) -> str:
    return f"{name} (lr={lr:g})"


def _point(point: Sequence[float]) -> str:
    """``x0 = 8`` for 1-D points, ``(x, y) = (-1.5, 2)`` for 2-D ones."""
    if len(point) == 1:
        return f"x0 = {point[0]:g}"
    return "(x, y) = " + _coords(point)


def _coords(point: Sequence[float]) -> str:
    return "(" + ", ".join(f"{c:g}" for c in point) + ")"


def _plot_gap(
    ax, experiment: Experiment, runs: Mapping[str, Trajectory], lines: Mapping[str, dict], tolerance: float
) -> None:
    """Log-scale plot of the optimality gap ``f(x_t) - f_min`` against the step ``t``."""
    f_min = experiment.objective.min_value
    for name, traj in runs.items():
        ax.plot(
            np.arange(traj.steps + 1),
            traj.losses - f_min,
            color=COLORS[name],
            label=run_label(name, experiment.lrs[name]),
            **lines[name],
        )
    ax.axhline(tolerance, color="0.4", linestyle="--", linewidth=1, label=f"tolerance {tolerance:g}")
    ax.set_yscale("log", nonpositive="mask")
    # Below ~1e-14 the gap is float64 round-off, not progress: don't let it squash the plot.
    ax.set_ylim(bottom=max(ax.get_ylim()[0], GAP_FLOOR))
    ax.set_xlabel("step t")
    ax.set_ylabel(r"$f(x_t) - f_{\min}$ (log scale)")
    ax.set_title(f"Loss vs. step ({experiment.steps} steps from {_point(experiment.objective.start)})")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()


def plot_quadratic(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path, tolerance: float) -> None:
    """The seed figure: the iterates ``(x_t, f(x_t))`` on the loss curve, plus loss vs. step."""
    obj = experiment.objective
    lines = {"SGD": dict(marker="o", linestyle="-"), "Adam": dict(marker="s", linestyle="-")}
    fig = new_figure(12, 5)
    ax_path, ax_loss = fig.subplots(1, 2)

    ((lo, hi),) = obj.window
    xs = np.linspace(lo, hi, 100)
    ax_path.plot(xs, obj.value(torch.from_numpy(xs)[None]).numpy(), color="0.3", label="Loss Function")
    for name, traj in runs.items():
        label = run_label(name, experiment.lrs[name])
        x, fx = traj.points[:, 0], traj.losses
        ax_path.plot(x, fx, color=COLORS[name], label=label, markersize=4, **lines[name])
    ((x_min,),) = obj.minimizers
    ax_path.plot(x_min, obj.min_value, "*", color="gold", markeredgecolor="k", markersize=16, label="minimum")
    ax_path.set_xlabel("x")
    ax_path.set_ylabel(r"$f(x) = (x - 2)^2$")
    ax_path.set_title("Adam vs. SGD Parameter Updates")
    ax_path.legend()
    ax_path.grid(True, alpha=0.3)

    _plot_gap(ax_loss, experiment, runs, {name: dict(kw, markersize=4) for name, kw in lines.items()}, tolerance)
    fig.savefig(path, dpi=110)


def _grid(obj: Objective, window: Window2D, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``X, Y, f(X, Y)`` on an ``n x n`` grid spanning ``window``."""
    (x_lo, x_hi), (y_lo, y_hi) = window
    X, Y = np.meshgrid(np.linspace(x_lo, x_hi, n), np.linspace(y_lo, y_hi, n))
    Z = obj.value(torch.from_numpy(np.stack([X, Y]))).numpy()
    return X, Y, Z


def draw_contours(fig: Figure, ax, obj: Objective, window: Window2D) -> None:
    """Filled contours of ``f - f_min`` over ``window``, 4 log-spaced levels per decade, plus colour bar.

    The levels run from the decade of the grid's 1% quantile (everything below
    gets the darkest shade) up to the decade of its maximum.
    """
    from matplotlib.colors import LogNorm

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
    """A square window around the final points of the runs that end at the most popular place.

    Each finite final point is assigned its nearest minimizer; the minimizer most runs
    ended nearest to wins, and the window is centred on it when those runs are close to
    it (within a tenth of the full window), otherwise on their mean (runs stuck in a
    local minimum), wide enough to hold them all with a ``margin``.
    """
    finals = np.array([t.points[-1] for t in runs.values() if np.all(np.isfinite(t.points[-1]))])
    minimizers = np.asarray(obj.minimizers, dtype=float)
    if not finals.size:
        centre, cluster = minimizers[0], minimizers[:1]
    else:
        nearest = np.linalg.norm(finals[:, None, :] - minimizers[None], axis=2).argmin(axis=1)
        popular = np.bincount(nearest).argmax()
        cluster = finals[nearest == popular]
        centre = minimizers[popular]
        (x_lo, x_hi), _ = obj.window
        if np.abs(cluster - centre).max() > 0.1 * (x_hi - x_lo):
            centre = cluster.mean(axis=0)
    half = max(margin * np.abs(cluster - centre).max(), 0.01)
    return ((centre[0] - half, centre[0] + half), (centre[1] - half, centre[1] + half))


def _draw_map(
    fig: Figure, ax, experiment: Experiment, runs: Mapping[str, Trajectory], window: Window2D, every: int
) -> None:
    """Contours over ``window`` with every run's path (a mark every ``every`` steps, a large one
    at the final point), the start point and the minimizers."""
    obj = experiment.objective
    draw_contours(fig, ax, obj, window)
    for name, traj in runs.items():
        pts = traj.points[np.all(np.isfinite(traj.points), axis=1)]
        style = dict(color=COLORS[name], marker=MARKERS[name], markeredgecolor="k", markeredgewidth=0.5)
        label = run_label(name, experiment.lrs[name])
        ax.plot(pts[:, 0], pts[:, 1], label=label, markevery=every, markersize=5, **style, **LINES[name])
        ax.plot(*pts[-1], markersize=10, **style)
    start_label = f"start {_coords(obj.start)}"
    ax.plot(*obj.start, "o", color="white", markeredgecolor="k", markersize=10, label=start_label)
    for i, point in enumerate(obj.minimizers):
        many = len(obj.minimizers) > 1
        min_label = f"{len(obj.minimizers)} minima" if many else f"minimum {_coords(point)}"
        ax.plot(*point, "*", color="gold", markeredgecolor="k", markersize=18, label=None if i else min_label)
    (x_lo, x_hi), (y_lo, y_hi) = window
    ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="x", ylabel="y")


def plot_contour(
    experiment: Experiment, runs: Mapping[str, Trajectory], path: Path, tolerance: float, n_marks: int = 10
) -> None:
    """Three panels: trajectories over log-spaced contours of ``f`` in the objective's window,
    the same zoomed in on the minimizer, and loss vs. step."""
    obj = experiment.objective
    fig = new_figure(20, 6)
    fig.get_layout_engine().set(wspace=0.05)
    ax_map, ax_zoom, ax_loss = fig.subplots(1, 3, width_ratios=[1.2, 1, 1])

    every = max(experiment.steps // n_marks, 1)
    _draw_map(fig, ax_map, experiment, runs, obj.window, every)
    title = f"{obj.name.capitalize()}: trajectories (a mark every {every} steps, large: final point)"
    ax_map.set_title(title)
    ax_map.legend(loc="best", fontsize="small", framealpha=0.9)

    _draw_map(fig, ax_zoom, experiment, runs, _zoom_window(obj, runs), every)
    ax_zoom.set_title("Zoom on where most runs end (final points)")

    _plot_gap(ax_loss, experiment, runs, LINES, tolerance)
    fig.savefig(path, dpi=100)


def plot_experiment(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path, *, tolerance: float) -> None:
    """Draw one experiment: the seed's picture for 1-D objectives, contour maps for 2-D ones."""
    if experiment.objective.dim == 1:
        plot_quadratic(experiment, runs, path, tolerance)
    else:
        plot_contour(experiment, runs, path, tolerance)
