"""Kingma & Ba section 6.4: the bias-correction sweep on a VAE (see ``uncorrected`` for why
the correction matters)."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

import numpy as np

import adamkit

from . import data, models
from .figures import plot_bias_correction
from .outcome import Outcome, Tick
from .training import train
from .uncorrected import UncorrectedAdam

BETA1S = (0.0, 0.9)
BETA2S = (0.99, 0.999, 0.9999)
LRS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
QUICK_LRS = (1e-4, 1e-3, 1e-2, 1e-1)
CHECKPOINTS = (10, 100)  # epochs, as in the paper's Figure 4
QUICK_CHECKPOINTS = (2, 10)


def _optimizer(beta1: float, beta2: float, corrected: bool):
    if corrected:
        return lambda ps, lr: adamkit.Adam(ps, lr=lr, betas=(beta1, beta2))
    return lambda ps, lr: UncorrectedAdam(ps, lr=lr, betas=(beta1, beta2), bias_correction=False)


def _vae_loss(model, x):
    return model(x)


class BiasCorrectionSweep:
    """Section 6.4: a VAE trained with beta1 in {0, 0.9}, beta2 in {0.99, 0.999, 0.9999} and
    a range of rates, with and without bias correction; losses after an early and a late
    number of epochs."""

    name = "bias_correction"
    title = "Bias correction"
    substitute = (
        "scikit-learn's 8x8 digits (1437 train images, 12 minibatches an epoch) instead of MNIST; "
        "a VAE with 128 hidden units and 8 latents instead of 500 and 50"
    )
    paper = (
        "Figure 4 (VAE): without bias correction, beta2 close to 1 makes training unstable at the larger "
        "step sizes, especially early on; with bias correction training stays stable, and the best "
        "losses come with bias correction and small 1 - beta2."
    )

    def units(self, quick: bool) -> int:
        return len(BETA1S) * len(BETA2S) * 2 * len(QUICK_LRS if quick else LRS)

    def run(self, out_dir: Path, quick: bool, tick: Tick) -> Outcome:
        lrs, checkpoints = (QUICK_LRS, QUICK_CHECKPOINTS) if quick else (LRS, CHECKPOINTS)
        x = data.digits().x_train
        losses: dict[tuple[float, float, bool, float], np.ndarray] = {}
        for beta1, beta2, corrected, lr in itertools.product(BETA1S, BETA2S, (True, False), lrs):
            curve = train(
                lambda: models.VAE(x.shape[1]),
                _vae_loss,
                (x,),
                _optimizer(beta1, beta2, corrected),
                lr,
                checkpoints[-1],
            )
            losses[beta1, beta2, corrected, lr] = curve.costs[[c - 1 for c in checkpoints]]
            tick(f"beta1={beta1:g} beta2={beta2:g} {'corrected' if corrected else 'uncorrected'} lr={lr:g}")
        figure = out_dir / f"{self.name}.png"
        plot_bias_correction(losses, lrs, checkpoints, figure)
        table = out_dir / f"{self.name}.csv"
        with table.open("w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["beta1", "beta2", "bias_correction", "lr", *(f"loss_after_{c}_epochs" for c in checkpoints)])
            for (beta1, beta2, corrected, lr), values in losses.items():
                out.writerow([beta1, beta2, corrected, lr, *(f"{v:.6g}" for v in values)])
        holds, found, figures = _verdict(losses, lrs, checkpoints)
        return Outcome(self.name, self.title, self.substitute, self.paper, found, holds, [figure, table], figures)


def _verdict(losses, lrs, checkpoints) -> tuple[bool, str, dict]:
    late = {key: values[-1] for key, values in losses.items()}
    unstable = lambda v: not math.isfinite(v)  # noqa: E731
    corrected_diverged = [k for k, v in late.items() if k[2] and unstable(v)]
    uncorrected_diverged = sorted({(k[1], k[3]) for k, v in late.items() if not k[2] and unstable(v)})
    top = lrs[-1]
    # at the largest rate and beta2 = 0.9999, is the uncorrected run worse (or diverged)?
    worse_at_top = all(
        unstable(late[b1, BETA2S[-1], False, top]) or late[b1, BETA2S[-1], False, top] > late[b1, BETA2S[-1], True, top]
        for b1 in BETA1S
    )
    best = {c: min((v, k) for k, v in late.items() if k[2] == c and not unstable(v)) for c in (True, False)}
    slow_decay_best = best[True][1][1] >= BETA2S[1]  # the best corrected run has beta2 close to 1
    holds = not corrected_diverged and worse_at_top and best[True][0] < best[False][0] and slow_decay_best

    def where(entry):
        _, (b1, b2, _, lr) = entry
        return f"beta1={b1:g}, beta2={b2:g}, lr={lr:g}"

    found = (
        f"After {checkpoints[-1]} epochs: {len(corrected_diverged)} of {len(late) // 2} corrected runs diverged; "
        f"uncorrected runs diverged at (beta2, lr) = {', '.join(f'({b:g}, {r:g})' for b, r in uncorrected_diverged) or 'none'}. "
        f"At beta2={BETA2S[-1]:g} and the largest rate {top:g} the uncorrected run is "
        f"{'worse or diverged' if worse_at_top else 'not worse'} for every beta1. "
        f"Best loss with correction {best[True][0]:.3f} ({where(best[True])}), "
        f"without {best[False][0]:.3f} ({where(best[False])})."
    )
    figures = {
        "best loss with correction": best[True][0],
        "best loss without correction": best[False][0],
        "diverged with correction": len(corrected_diverged),
        "diverged without correction": sum(1 for k, v in late.items() if not k[2] and unstable(v)),
    }
    return holds, found, figures


__all__ = ["BiasCorrectionSweep"]
