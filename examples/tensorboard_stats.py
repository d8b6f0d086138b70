"""Log what Adam is doing to TensorBoard: ``optimizer.stats()`` every few steps.

A small MLP learns a synthetic classification task (made up here, nothing is
downloaded) with AdamW, ``diagnostics=True`` and a cosine schedule.  Each param
group (weights with decay, biases without) gets its own curves: gradient norm, update
RMS, update-to-weight RMS ratio, effective step size and the fraction of elements
where eps dominates the denominator.

Usage: python examples/tensorboard_stats.py [--steps 300] [--logdir runs/adamkit]
then: tensorboard --logdir runs/adamkit
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import adamkit


def make_task(n: int = 2048, features: int = 20, classes: int = 5, seed: int = 0):
    """Gaussian inputs labelled by a random teacher network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    teacher = torch.randn(features, classes, generator=g)
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


def train(steps: int, logdir: str, log_every: int = 10) -> list[dict[str, float]]:
    """Train and log; returns the last stats logged (one dict per param group)."""
    from torch.utils.tensorboard import SummaryWriter

    torch.manual_seed(0)
    x, y = make_task()
    model = nn.Sequential(nn.Linear(20, 64), nn.GELU(), nn.Linear(64, 5))
    weights = [p for p in model.parameters() if p.dim() > 1]
    biases = [p for p in model.parameters() if p.dim() <= 1]
    groups = [{"params": weights, "weight_decay": 0.05}, {"params": biases, "weight_decay": 0.0}]
    opt = adamkit.AdamW(groups, lr=3e-3, diagnostics=True)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    names = ["weights", "biases"]
    stats = []
    with SummaryWriter(logdir) as writer:
        for step in range(1, steps + 1):
            batch = torch.randint(0, len(x), (128,))
            loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % log_every == 0 or step == steps:
                writer.add_scalar("loss", loss.item(), step)
                stats = opt.stats()
                for name, figures in zip(names, stats):
                    for key, value in figures.items():
                        writer.add_scalar(f"{name}/{key}", value, step)
            schedule.step()
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--logdir", default="runs/adamkit")
    args = parser.parse_args()
    stats = train(args.steps, args.logdir)
    for name, figures in zip(["weights", "biases"], stats):
        print(name, "  ".join(f"{k}={v:.4g}" for k, v in figures.items()))
    print(f"logged to {args.logdir}: tensorboard --logdir {args.logdir}")


if __name__ == "__main__":
    main()
