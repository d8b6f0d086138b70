"""Kingma & Ba sections 6.1-6.3: Adam against the other stochastic optimizers on
logistic regression, a multilayer perceptron with dropout and a convolutional network.

Each contender is trained at every rate of the grid with the same initial weights and
minibatch order; the rate with the lowest mean training cost (the fastest) represents
it.  The paper's claim is then checked on those best curves.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from torch import nn

from . import data, models
from .figures import plot_training_costs
from .outcome import AS_FAST_AS, LARGE_MARGIN, Outcome, Tick
from .training import CONTENDERS, LR_GRID, QUICK_LR_GRID, Curve, accuracy, best_curve, cross_entropy, train

#: ``claim(best curves) -> (holds, what we found)``
Claim = Callable[[Mapping[str, Curve]], tuple[bool, str]]


def _costs(curves: Mapping[str, Curve], final: bool = False) -> str:
    which = "final-epoch" if final else "mean"
    cells = [f"{n} {c.costs[-1] if final else c.mean_cost:.4f} (lr {c.lr:g})" for n, c in curves.items()]
    return f"{which} training cost: " + ", ".join(cells)


def _sgd_and_adam_beat_adagrad(curves: Mapping[str, Curve]) -> tuple[bool, str]:
    adam, sgd, adagrad = (curves[n].mean_cost for n in ("Adam", "SGD-Nesterov", "AdaGrad"))
    holds = adam < adagrad and sgd < adagrad and adam <= AS_FAST_AS * sgd
    return holds, (
        f"{_costs(curves)}. Adam/SGD-Nesterov = {adam / sgd:.2f} (as fast: <= {AS_FAST_AS}); "
        f"AdaGrad is {'the slowest' if max(adam, sgd) < adagrad else 'not the slowest'}."
    )


def _adagrad_beats_sgd_and_adam_keeps_up(curves: Mapping[str, Curve]) -> tuple[bool, str]:
    adam, sgd, adagrad = (curves[n].mean_cost for n in ("Adam", "SGD-Nesterov", "AdaGrad"))
    holds = adagrad <= LARGE_MARGIN * sgd and adam <= AS_FAST_AS * adagrad
    return holds, (
        f"{_costs(curves)}. AdaGrad/SGD-Nesterov = {adagrad / sgd:.2f} (large margin: <= {LARGE_MARGIN}); "
        f"Adam/AdaGrad = {adam / adagrad:.2f} (as fast: <= {AS_FAST_AS})."
    )


def _adam_fastest(curves: Mapping[str, Curve]) -> tuple[bool, str]:
    ranking = sorted(curves, key=lambda n: curves[n].mean_cost)
    return ranking[0] == "Adam", f"{_costs(curves)}. Fastest first: {', '.join(ranking)}."


def _adam_and_sgd_end_below_adagrad(curves: Mapping[str, Curve]) -> tuple[bool, str]:
    adam, sgd, adagrad = (curves[n].costs[-1] for n in ("Adam", "SGD-Nesterov", "AdaGrad"))
    ranking = sorted(curves, key=lambda n: curves[n].costs[-1])
    return adam < adagrad and sgd < adagrad, f"{_costs(curves, final=True)}. Lowest first: {', '.join(ranking)}."


@dataclass(frozen=True)
class Comparison:
    """One of the paper's optimizer comparisons, rebuilt on bundled data."""

    name: str
    title: str
    substitute: str
    paper: str
    dataset: Callable[[], data.Split]
    model: Callable[[data.Split], nn.Module]
    contenders: tuple[str, ...]
    epochs: int
    quick_epochs: int
    claim: Claim
    sqrt_decay: bool = False
    images: bool = False

    def units(self, quick: bool) -> int:
        return len(self.contenders) * len(QUICK_LR_GRID if quick else LR_GRID)

    def run(self, out_dir: Path, quick: bool, tick: Tick) -> Outcome:
        split = self.dataset()
        shape = data.as_images if self.images else (lambda x: x)
        x_train, x_test = shape(split.x_train), shape(split.x_test)
        epochs = self.quick_epochs if quick else self.epochs
        grid = QUICK_LR_GRID if quick else LR_GRID

        def run_at(name: str, lr: float) -> Curve:
            build = partial(self.model, split)
            return train(
                build,
                cross_entropy,
                (x_train, split.y_train),
                CONTENDERS[name],
                lr,
                epochs,
                name=name,
                sqrt_decay=self.sqrt_decay,
            )

        searched: dict[str, list[Curve]] = {}

        def run_and_keep(name: str, lr: float) -> Curve:
            curve = run_at(name, lr)
            searched.setdefault(name, []).append(curve)
            return curve

        best = {name: best_curve(name, grid, run_and_keep, tick) for name in self.contenders}
        test_accuracy = {name: accuracy(c.model, x_test, split.y_test) for name, c in best.items()}
        holds, found = self.claim(best)
        at_edge = [n for n, c in best.items() if c.lr in (grid[0], grid[-1])]
        if at_edge:
            found += f" Best rate at the edge of the grid for: {', '.join(at_edge)}."
        figure = out_dir / f"{self.name}.png"
        plot_training_costs(
            best,
            test_accuracy,
            figure,
            title=f"{self.title} ({split.name}, {len(x_train)} train)",
            ylabel="training cost (cross-entropy)",
        )
        files = [
            figure,
            _write_curves(best, out_dir / f"{self.name}.csv"),
            _write_search(searched, out_dir / f"{self.name}_lr_search.csv"),
        ]
        figures = {f"{n} lr": c.lr for n, c in best.items()}
        figures |= {f"{n} mean cost": c.mean_cost for n, c in best.items()}
        figures |= {f"{n} final cost": float(c.costs[-1]) for n, c in best.items()}
        figures |= {f"{n} test accuracy": a for n, a in test_accuracy.items()}
        return Outcome(self.name, self.title, self.substitute, self.paper, found, holds, files, figures)


def _write_curves(curves: Mapping[str, Curve], path: Path) -> Path:
    """``epoch, <optimizer>...``: each best curve's training cost per epoch."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["epoch", *(f"{n} (lr {c.lr:g})" for n, c in curves.items())])
        for epoch, row in enumerate(np.column_stack([c.costs for c in curves.values()]), start=1):
            out.writerow([epoch, *(f"{v:.6g}" for v in row)])
    return path


def _write_search(searched: Mapping[str, list[Curve]], path: Path) -> Path:
    """Every run of the rate search: optimizer, lr, mean and final cost, diverged."""
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["optimizer", "lr", "mean_cost", "final_cost", "diverged"])
        for name, curves in searched.items():
            for c in curves:
                out.writerow([name, f"{c.lr:g}", f"{c.mean_cost:.6g}", f"{c.costs[-1]:.6g}", c.diverged])
    return path


_DIGITS = "scikit-learn's 8x8 digits (1437 train / 360 test images) instead of {0}"

COMPARISONS: tuple[Comparison, ...] = (
    Comparison(
        name="logreg",
        title="Logistic regression",
        substitute=_DIGITS.format("MNIST (60,000 28x28 images)"),
        paper=(
            "Figure 1 (MNIST), rate alpha/sqrt(t), minibatch 128: Adam converges as fast as SGD with "
            "Nesterov momentum, and both faster than AdaGrad."
        ),
        dataset=data.digits,
        model=lambda s: models.logistic_regression(s.features, s.classes),
        contenders=("Adam", "SGD-Nesterov", "AdaGrad"),
        epochs=30,
        quick_epochs=5,
        claim=_sgd_and_adam_beat_adagrad,
        sqrt_decay=True,
    ),
    Comparison(
        name="logreg_sparse",
        title="Logistic regression on sparse features",
        substitute=(
            "a synthetic sparse bag-of-words sentiment task (2000 train / 500 test documents, "
            "5000 Zipf-distributed words, binary presence features) instead of IMDB"
        ),
        paper=(
            "Figure 1 (IMDB bag-of-words), rate alpha/sqrt(t): AdaGrad beats SGD with Nesterov momentum "
            "by a large margin on sparse features, and Adam converges as fast as AdaGrad."
        ),
        dataset=data.sparse_bag_of_words,
        model=lambda s: models.logistic_regression(s.features, s.classes),
        contenders=("Adam", "SGD-Nesterov", "AdaGrad"),
        epochs=30,
        quick_epochs=5,
        claim=_adagrad_beats_sgd_and_adam_keeps_up,
        sqrt_decay=True,
    ),
    Comparison(
        name="mlp",
        title="Multilayer perceptron with dropout",
        substitute=_DIGITS.format("MNIST") + "; 2 x 256 ReLU units instead of 2 x 1000",
        paper=(
            "Figure 2 (MNIST, 2 x 1000 ReLU, dropout): Adam lowers the training cost faster than "
            "AdaGrad, RMSProp, SGD with Nesterov momentum and AdaDelta."
        ),
        dataset=data.digits,
        model=lambda s: models.mlp(s.features, s.classes),
        contenders=("Adam", "AdaGrad", "RMSProp", "SGD-Nesterov", "AdaDelta"),
        epochs=30,
        quick_epochs=5,
        claim=_adam_fastest,
    ),
    Comparison(
        name="cnn",
        title="Convolutional network",
        substitute=_DIGITS.format("CIFAR-10 (50,000 32x32 colour images)")
        + "; c16-c32-fc64 instead of c64-c64-c128-fc1000",
        paper=(
            "Figure 3 (CIFAR-10): Adam and SGD with Nesterov momentum eventually reach a considerably "
            "lower training cost than AdaGrad (Adam marginally ahead of SGD)."
        ),
        dataset=data.digits,
        model=lambda s: models.cnn(s.classes),
        contenders=("Adam", "SGD-Nesterov", "AdaGrad"),
        epochs=30,
        quick_epochs=5,
        claim=_adam_and_sgd_end_below_adagrad,
        images=True,
    ),
)

__all__ = ["COMPARISONS", "Comparison"]
