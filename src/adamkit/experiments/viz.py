"""``adamkit viz``: optimizer trajectories on test functions, over contour plots,
optionally animated.

Functions: the seed's quadratic, Rosenbrock, Beale, Himmelblau (four minima), a saddle
between two minima, and Rastrigin (a bowl of local minima).  Each runs Adam, AdamW,
AMSGrad and SGD with momentum (plain SGD for the 1-D quadratic; on the saddle NAdam,
RAdam and ADOPT too, where RAdam's built-in warm-up shows) at learning rates
picked per function from a sweep over 1e-3 .. 0.3: the largest round rate at which
each method is stable.  On Rastrigin every method, at every rate of the sweep, stops
in the local minimum next to the start: adaptive steps do not make a local method
global.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
from matplotlib.animation import FuncAnimation, PillowWriter

from .demo import EXPERIMENTS, run_experiment
from .functions import OBJECTIVES
from .plots import COLORS, MARKERS, draw_contours, new_figure, plot_experiment, run_label
from .runs import TOLERANCE, Experiment, Trajectory

_ADAM_FAMILY = ("Adam", "AdamW", "AMSGrad")
#: the rest of the family, where it makes a point
_VARIANTS = ("NAdam", "RAdam", "ADOPT")


def _race(function: str, adam_lr: float, sgd_lr: float, steps: int, family=_ADAM_FAMILY) -> Experiment:
    lrs = {name: adam_lr for name in family} | {"SGD+momentum": sgd_lr}
    return Experiment(OBJECTIVES[function], lrs, steps)


#: one experiment per function (the first three are the demo's)
VIZ_EXPERIMENTS: dict[str, Experiment] = {e.objective.name: e for e in EXPERIMENTS} | {
    # Adam's family reaches the minimum at (-2.81, 3.13); SGD + momentum the one at
    # (-3.78, -3.28) (0.03 diverges)
    "himmelblau": _race("himmelblau", adam_lr=0.03, sgd_lr=3e-3, steps=400),
    # from 1e-3 off the ridge, steps until |y| > 0.5: Adam and AMSGrad 17, NAdam 15, ADOPT 20
    # (normalised steps), SGD + momentum 105, and RAdam 88: RAdam warms its step up, five
    # momentum-SGD steps, then the rectification r_t scales it (0.026 at step 6, 0.22 at 100)
    "saddle": _race("saddle", adam_lr=0.03, sgd_lr=0.01, steps=300, family=_ADAM_FAMILY + _VARIANTS),
    # every method stops in the local minimum at (1.99, -1.99); SGD + momentum diverges from 0.01
    "rastrigin": _race("rastrigin", adam_lr=0.1, sgd_lr=1e-3, steps=300),
}


def animate_experiment(experiment: Experiment, runs: Mapping[str, Trajectory], path: Path, frames: int = 60) -> None:
    """A GIF of the trajectories growing over the contour map of a 2-D function."""
    obj = experiment.objective
    fig = new_figure(7, 5.5)
    ax = fig.subplots()
    draw_contours(fig, ax, obj, obj.window)
    (x_lo, x_hi), (y_lo, y_hi) = obj.window
    ax.set(xlim=(x_lo, x_hi), ylim=(y_lo, y_hi), xlabel="x", ylabel="y")
    for point in obj.minimizers:
        ax.plot(*point, "*", color="gold", markeredgecolor="k", markersize=16)
    ax.plot(*obj.start, "o", color="white", markeredgecolor="k", markersize=9)
    lines = {}
    for name in runs:
        (line,) = ax.plot([], [], color=COLORS[name], label=run_label(name, experiment.lrs[name]), linewidth=2)
        (head,) = ax.plot([], [], MARKERS[name], color=COLORS[name], markeredgecolor="k", markersize=8)
        lines[name] = (line, head)
    ax.legend(loc="best", fontsize="small", framealpha=0.9)
    title = ax.set_title("")
    ends = np.linspace(1, experiment.steps, frames).astype(int)

    def draw(frame: int):
        end = ends[frame]
        for name, traj in runs.items():
            pts = traj.points[: end + 1]
            pts = pts[np.all(np.isfinite(pts), axis=1)]
            line, head = lines[name]
            line.set_data(pts[:, 0], pts[:, 1])
            head.set_data(pts[-1:, 0], pts[-1:, 1])
        title.set_text(f"{obj.name.capitalize()}: step {end} of {experiment.steps}")
        return [artist for pair in lines.values() for artist in pair] + [title]

    FuncAnimation(fig, draw, frames=frames, blit=False).save(path, writer=PillowWriter(fps=12), dpi=80)


def run_viz(
    functions: Sequence[str],
    out_dir: Path,
    *,
    animate: bool = False,
    steps: int | None = None,
    progress: Callable[[str], None] = lambda note: None,
) -> list[Path]:
    """Run and draw each function's race; returns the files written.  ``steps``
    overrides every function's step budget; ``progress`` is told each file written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in functions:
        experiment = VIZ_EXPERIMENTS[name]
        if steps is not None:
            experiment = replace(experiment, steps=steps)
        runs = run_experiment(experiment)
        path = out_dir / experiment.filename
        plot_experiment(experiment, runs, path, tolerance=TOLERANCE)
        written.append(path)
        progress(path.name)
        if animate and experiment.objective.dim == 2:
            gif = out_dir / f"{name}.gif"
            animate_experiment(experiment, runs, gif)
            written.append(gif)
            progress(gif.name)
    return written


__all__ = ["VIZ_EXPERIMENTS", "animate_experiment", "run_viz"]
