"""Training runs for the paper experiments: the contenders, a minibatch loop that records
the training cost per epoch, and the learning-rate search that picks each contender's
best rate (the paper chose hyperparameters by a dense grid search; so do we, on a
coarser grid).

The training cost of an epoch is the mean of its minibatch losses, as the paper's
figures plot it.  A run whose loss stops being finite is marked diverged: its later
costs are NaN and it is never chosen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

import adamkit

OptimizerFactory = Callable[[list[nn.Parameter], float], torch.optim.Optimizer]

#: the optimizers the paper compares Adam with, at their customary defaults besides the rate
CONTENDERS: dict[str, OptimizerFactory] = {
    "Adam": lambda ps, lr: adamkit.Adam(ps, lr=lr),
    "SGD-Nesterov": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9, nesterov=True),
    "AdaGrad": lambda ps, lr: torch.optim.Adagrad(ps, lr=lr),
    "RMSProp": lambda ps, lr: torch.optim.RMSprop(ps, lr=lr),
    "AdaDelta": lambda ps, lr: torch.optim.Adadelta(ps, lr=lr),
}

#: learning rates searched: half-decades from 1e-4 to 10 (``--quick``: whole decades)
LR_GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0)
QUICK_LR_GRID = (1e-3, 1e-2, 0.1, 1.0, 10.0)

BATCH_SIZE = 128

#: ``loss(model, *batch)``: the mean loss of one minibatch
LossFunction = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Curve:
    """Training cost per epoch of one optimizer at one learning rate."""

    optimizer: str
    lr: float
    costs: np.ndarray  # costs[e] = mean minibatch loss of epoch e + 1; NaN after divergence
    model: nn.Module

    @property
    def diverged(self) -> bool:
        return not np.all(np.isfinite(self.costs))

    @property
    def mean_cost(self) -> float:
        """Mean cost over all epochs (the area under the curve: lower = faster); inf if diverged."""
        return math.inf if self.diverged else float(self.costs.mean())


def train(
    build_model: Callable[[], nn.Module],
    loss: LossFunction,
    data: Sequence[torch.Tensor],
    make_optimizer: OptimizerFactory,
    lr: float,
    epochs: int,
    *,
    name: str = "",
    sqrt_decay: bool = False,
    seed: int = 0,
) -> Curve:
    """Train a fresh model for ``epochs`` passes over ``data`` in shuffled minibatches of 128.

    The model's initial weights, the minibatch order and dropout noise depend on ``seed``
    only, so every optimizer starts from the same point and sees the same batches.  With
    ``sqrt_decay`` the rate at iteration ``t`` (from 1) is ``lr / sqrt(t)``.  torch's
    global random state (drawn from for the weights and dropout) is the caller's again
    afterwards.
    """
    with torch.random.fork_rng(devices=[]):  # (the CPU's: these runs train on it)
        torch.random.default_generator.manual_seed(seed)
        model = build_model()
        optimizer = make_optimizer(list(model.parameters()), lr)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 1 / math.sqrt(t + 1)) if sqrt_decay else None
        order = torch.Generator().manual_seed(seed)
        n = len(data[0])
        costs = np.full(epochs, np.nan)
        model.train()
        for epoch in range(epochs):
            total = 0.0
            batches = torch.randperm(n, generator=order).split(BATCH_SIZE)
            for index in batches:
                value = loss(model, *(tensor[index] for tensor in data))
                if not math.isfinite(value.item()):
                    return Curve(name, lr, costs, model)
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
                if schedule is not None:
                    schedule.step()
                total += value.item()
            costs[epoch] = total / len(batches)
        model.eval()
        return Curve(name, lr, costs, model)


def best_curve(
    name: str,
    lrs: Sequence[float],
    run: Callable[[str, float], Curve],
    tick: Callable[[str], None] = lambda label: None,
) -> Curve:
    """``run(name, lr)`` for every rate; the curve with the lowest mean cost (the fastest)."""
    curves = []
    for lr in lrs:
        curves.append(run(name, lr))
        tick(f"{name} lr={lr:g}")
    return min(curves, key=lambda c: c.mean_cost)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy of a classifier on one minibatch."""
    return nn.functional.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` the model labels correctly (in eval mode: no dropout)."""
    model.eval()
    return float((model(x).argmax(dim=1) == y).float().mean())


__all__ = [
    "BATCH_SIZE",
    "CONTENDERS",
    "LR_GRID",
    "QUICK_LR_GRID",
    "Curve",
    "accuracy",
    "best_curve",
    "cross_entropy",
    "train",
]
