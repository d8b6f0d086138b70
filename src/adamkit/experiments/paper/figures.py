"""Figures of the paper reproductions (Agg backend, no pyplot state)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ..plots import new_figure
from .training import Curve

OPTIMIZER_COLORS = {
    "Adam": "tab:blue",
    "SGD-Nesterov": "tab:red",
    "AdaGrad": "tab:green",
    "RMSProp": "tab:purple",
    "AdaDelta": "tab:brown",
    "AMSGrad": "tab:orange",
    "ADOPT": "tab:cyan",
}
BETA2_COLORS = {0.99: "tab:green", 0.999: "tab:blue", 0.9999: "tab:red"}


def plot_training_costs(
    curves: Mapping[str, Curve], test_accuracy: Mapping[str, float], path: Path, *, title: str, ylabel: str
) -> None:
    """Training cost per epoch (log scale) of each optimizer at its best rate."""
    fig = new_figure(7.5, 5)
    ax = fig.subplots()
    for name, curve in curves.items():
        epochs = np.arange(1, len(curve.costs) + 1)
        label = f"{name} (lr {curve.lr:g}; test acc. {test_accuracy[name]:.3f})"
        ax.plot(epochs, curve.costs, color=OPTIMIZER_COLORS[name], label=label, linewidth=2, marker=".")
    ax.set(yscale="log", xlabel="epoch", ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


def plot_bias_correction(
    losses: Mapping[tuple[float, float, bool, float], np.ndarray],
    lrs: Sequence[float],
    checkpoints: Sequence[int],
    path: Path,
) -> None:
    """The paper's Figure 4: loss after the early and the late checkpoint against log10(lr),
    one row per beta1, one colour per beta2, solid with bias correction, dashed without.
    A diverged run is drawn as an x on the top edge."""
    beta1s = sorted({key[0] for key in losses})
    beta2s = sorted({key[1] for key in losses})
    fig = new_figure(11, 4 * len(beta1s))
    axes = fig.subplots(len(beta1s), len(checkpoints), squeeze=False)
    finite = np.array([v for v in losses.values() for v in v if np.isfinite(v)])
    top = np.quantile(finite, 0.98) if finite.size else 1.0
    bottom = finite.min() if finite.size else 0.0
    x = np.log10(lrs)
    for row, beta1 in enumerate(beta1s):
        for col, epoch in enumerate(checkpoints):
            ax = axes[row, col]
            for beta2 in beta2s:
                for corrected in (True, False):
                    y = np.array([losses[beta1, beta2, corrected, lr][col] for lr in lrs])
                    style = (
                        dict(linestyle="-", marker="o") if corrected else dict(linestyle="--", marker="s", mfc="none")
                    )
                    label = f"beta2={beta2:g}, {'with' if corrected else 'no'} correction"
                    ax.plot(x, np.minimum(y, top), color=BETA2_COLORS[beta2], label=label, **style)
                    bad = ~np.isfinite(y)
                    ax.plot(x[bad], np.full(bad.sum(), top), "x", color=BETA2_COLORS[beta2], markersize=12, mew=2)
            ax.set(
                title=f"beta1={beta1:g}, after {epoch} epochs",
                xlabel="log10(learning rate)",
                ylabel="loss (negative ELBO)",
                ylim=(bottom - 0.02 * (top - bottom), top + 0.05 * (top - bottom)),
            )
            ax.grid(True, alpha=0.3)
    axes[0, 0].legend(fontsize="x-small")
    fig.suptitle("VAE: bias correction on and off (x on the top edge: diverged)")
    fig.savefig(path, dpi=100)


def plot_amsgrad(runs: Mapping[str, Mapping[str, np.ndarray]], names: Sequence[str], path: Path) -> None:
    """Per setting: the iterate x_t of each optimizer ``names``, and the average regret R_t / t."""
    fig = new_figure(11, 4 * len(runs))
    axes = fig.subplots(len(runs), 2, squeeze=False)
    for row, (setting, series) in enumerate(runs.items()):
        ax_x, ax_regret = axes[row]
        for name in names:
            t = np.arange(1, len(series[f"{name} x"]) + 1)
            style = {"color": OPTIMIZER_COLORS.get(name.split(",")[0]), "label": name}
            if "," in name:  # a variant of an optimizer: its color, dashed
                style["linestyle"] = "--"
            ax_x.plot(t, series[f"{name} x"], **style)
            ax_regret.plot(t, series[f"{name} regret"] / t, **style)
        ax_x.axhline(-1, color="0.3", linestyle=":", label="optimum x = -1")
        ax_x.set(xscale="log", xlabel="t", ylabel="x_t", title=f"{setting}: iterate", ylim=(-1.1, 1.1))
        ax_regret.set(xscale="log", xlabel="t", ylabel="R_t / t", title=f"{setting}: average regret")
        ax_regret.set_yscale("symlog", linthresh=1e-2)
        for ax in (ax_x, ax_regret):
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=100)


__all__ = ["plot_amsgrad", "plot_bias_correction", "plot_training_costs"]
