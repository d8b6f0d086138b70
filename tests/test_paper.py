"""The pieces of ``adamkit reproduce`` against independent oracles: the uncorrected Adam
against adamkit.Adam and the closed-form first step, the regret against its closed form,
Reddi et al.'s theorem on the counterexample, and the verdicts on made-up curves both
ways (so a verdict can fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adamkit
from adamkit.experiments.paper import amsgrad, bias_correction, comparisons, data, models
from adamkit.experiments.paper.outcome import Outcome
from adamkit.experiments.paper.training import Curve, best_curve, cross_entropy, train
from adamkit.experiments.paper.uncorrected import UncorrectedAdam


def _steps(make, steps=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(50, dtype=torch.float64, generator=g).requires_grad_(True)
    opt = make([x])
    for _ in range(steps):
        x.grad = torch.randn(50, dtype=torch.float64, generator=g)
        opt.step()
    return x.detach()


@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.0, 0.9999), (0.5, 0.99)])
def test_corrected_variant_is_adam(betas):
    ours = _steps(lambda ps: UncorrectedAdam(ps, lr=1e-2, betas=betas, bias_correction=True))
    theirs = _steps(lambda ps: adamkit.Adam(ps, lr=1e-2, betas=betas, backend="single_tensor"))
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)


def test_uncorrected_first_step_is_closed_form():
    lr, (beta1, beta2), eps = 0.1, (0.9, 0.9999), 1e-8
    g = torch.tensor([2.0, -0.5, 1e-3], dtype=torch.float64)
    x = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    x.grad = g.clone()
    UncorrectedAdam([x], lr=lr, betas=(beta1, beta2), eps=eps).step()
    expected = -lr * (1 - beta1) * g / (math.sqrt(1 - beta2) * g.abs() + eps)  # 10x alpha, not alpha
    torch.testing.assert_close(x.detach(), expected, rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", [dict(lr=0.0), dict(lr=-1.0), dict(betas=(0.9, 1.0))])
def test_uncorrected_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        UncorrectedAdam([torch.zeros(1, requires_grad=True)], **bad)


@pytest.mark.parametrize("problem", [amsgrad.THEOREM_1, amsgrad.SYNTHETIC], ids=lambda p: p.label)
def test_regret_closed_form(problem):
    periods = 7
    steps = periods * problem.period
    per_period = problem.large - (problem.period - 1) * problem.small
    assert per_period > 0  # the optimum is x = -1
    assert problem.regret(np.full(steps, -1.0))[-1] == pytest.approx(0.0, abs=1e-9)
    assert problem.regret(np.full(steps, 1.0))[-1] == pytest.approx(2 * periods * per_period)
    assert problem.regret(np.zeros(steps))[-1] == pytest.approx(periods * per_period)


def test_theorem_1_adam_goes_to_the_worst_point_amsgrad_and_adopt_to_the_best():
    problem = amsgrad.THEOREM_1
    played = amsgrad.play_all((problem,), ("Adam", "AMSGrad", "ADOPT"), steps=3000)
    adam, ams, adopt = (played[problem.label, name] for name in ("Adam", "AMSGrad", "ADOPT"))
    assert all(np.all(np.abs(xs) <= 1) for xs in (adam, ams, adopt))  # projected
    assert adam[-3:].mean() > 0.95 and ams[-3:].mean() < -0.95 and adopt[-3:].mean() < -0.95
    assert problem.regret(ams)[-1] / 3000 < 0.05 < problem.regret(adam)[-1] / 3000
    assert problem.regret(adopt)[-1] / 3000 < 0.05


def test_play_all_equals_one_run_per_optimizer():
    """Groups sharing an optimizer are stepped as if each had its own."""
    together = amsgrad.play_all((amsgrad.THEOREM_1, amsgrad.SYNTHETIC), tuple(amsgrad.VARIANTS), steps=300)
    for (label, name), xs in together.items():
        problem = next(p for p in (amsgrad.THEOREM_1, amsgrad.SYNTHETIC) if p.label == label)
        np.testing.assert_array_equal(xs, amsgrad.play(problem, name, steps=300))


def _curve(name, costs, lr=0.1):
    return Curve(name, lr, np.asarray(costs, dtype=float), model=None)


def test_logistic_regression_verdict_both_ways():
    holds, found = comparisons._sgd_and_adam_beat_adagrad(
        {
            "Adam": _curve("Adam", [1, 0.5]),
            "SGD-Nesterov": _curve("SGD-Nesterov", [1, 0.6]),
            "AdaGrad": _curve("AdaGrad", [1, 0.9]),
        }
    )
    assert holds and "AdaGrad is the slowest" in found
    holds, _ = comparisons._sgd_and_adam_beat_adagrad(
        {
            "Adam": _curve("Adam", [1, 0.5]),
            "SGD-Nesterov": _curve("SGD-Nesterov", [1, 0.95]),
            "AdaGrad": _curve("AdaGrad", [1, 0.9]),
        }
    )
    assert not holds


def test_sparse_verdict_needs_a_large_margin():
    curves = {
        "Adam": _curve("Adam", [0.5]),
        "AdaGrad": _curve("AdaGrad", [0.5]),
        "SGD-Nesterov": _curve("SGD-Nesterov", [0.55]),
    }
    assert not comparisons._adagrad_beats_sgd_and_adam_keeps_up(curves)[0]  # 0.91 > 0.8
    curves["SGD-Nesterov"] = _curve("SGD-Nesterov", [1.0])
    assert comparisons._adagrad_beats_sgd_and_adam_keeps_up(curves)[0]


def test_mlp_verdict_and_divergence():
    curves = {"Adam": _curve("Adam", [0.3, np.nan]), "RMSProp": _curve("RMSProp", [0.9, 0.8])}
    holds, found = comparisons._adam_fastest(curves)  # a diverged Adam is never fastest
    assert not holds and "Fastest first: RMSProp, Adam" in found
    curves["Adam"] = _curve("Adam", [0.3, 0.2])
    assert comparisons._adam_fastest(curves)[0]


def test_cnn_verdict_uses_the_final_cost():
    curves = {
        "Adam": _curve("Adam", [0.1, 0.01]),
        "SGD-Nesterov": _curve("SGD-Nesterov", [2.0, 0.02]),
        "AdaGrad": _curve("AdaGrad", [0.1, 0.05]),
    }
    assert comparisons._adam_and_sgd_end_below_adagrad(curves)[0]  # SGD slow at first, lower at the end
    curves["SGD-Nesterov"] = _curve("SGD-Nesterov", [2.0, 0.06])
    assert not comparisons._adam_and_sgd_end_below_adagrad(curves)[0]


def _sweep(corrected_best: float, uncorrected_top: float):
    lrs = (1e-3, 1e-1)
    losses = {}
    for b1 in bias_correction.BETA1S:
        for b2 in bias_correction.BETA2S:
            for lr in lrs:
                losses[b1, b2, True, lr] = np.array([30.0, 25.0])
                losses[b1, b2, False, lr] = np.array([30.0, 26.0])
            losses[b1, b2, False, lrs[-1]] = np.array([np.nan, uncorrected_top if b2 == 0.9999 else 26.0])
        losses[b1, 0.9999, True, lrs[0]] = np.array([30.0, corrected_best])
    return losses, lrs


def test_bias_correction_verdict_both_ways():
    holds, found, figures = bias_correction._verdict(*_sweep(24.0, np.nan), checkpoints=(10, 100))
    assert holds and figures["best loss with correction"] == 24.0 and "(0.9999, 0.1)" in found
    assert not bias_correction._verdict(*_sweep(24.0, 20.0), checkpoints=(10, 100))[0]  # uncorrected better at top
    assert not bias_correction._verdict(*_sweep(26.5, np.nan), checkpoints=(10, 100))[0]  # best is uncorrected


def test_outcome_verdict_is_a_plain_bool():
    assert type(Outcome("x", "X", "s", "p", "f", np.bool_(True)).holds) is bool


def test_bundled_data():
    digits = data.digits()
    assert (len(digits.x_train), len(digits.x_test), digits.classes, digits.features) == (1437, 360, 10, 64)
    assert 0 <= float(digits.x_train.min()) and float(digits.x_train.max()) <= 1
    assert torch.bincount(digits.y_test).min() >= 35  # stratified
    words = data.sparse_bag_of_words()
    present = float((words.x_train > 0).float().mean())
    assert present < 0.02  # sparse
    assert 0.4 < float(words.y_train.float().mean()) < 0.6
    counts = words.x_train.sum(dim=0)
    assert float(counts[:10].mean()) > 50 * float(counts[1000:].mean())  # Zipf: a few words carry most mass


def test_vae_loss_is_the_negative_elbo():
    torch.manual_seed(0)
    vae = models.VAE(64)
    x = data.digits().x_train[:32]
    h = vae.encoder(x)
    mu, log_var = vae.mean(h), vae.log_variance(h)
    torch.manual_seed(1)
    loss = vae(x)
    torch.manual_seed(1)
    z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    p = torch.sigmoid(vae.decoder(z))
    reconstruction = -(x * p.log() + (1 - x) * (1 - p).log()).sum(1)
    kl = 0.5 * (mu**2 + log_var.exp() - 1 - log_var).sum(1)
    torch.testing.assert_close(loss, (reconstruction + kl).mean(), rtol=1e-5, atol=1e-4)


def _digits_run(lr, make, epochs=2, **kw):
    split = data.digits()
    return train(
        lambda: models.logistic_regression(64, 10),
        cross_entropy,
        (split.x_train, split.y_train),
        make,
        lr,
        epochs,
        **kw,
    )


def test_training_is_deterministic_and_detects_divergence():
    adam = lambda ps, lr: adamkit.Adam(ps, lr=lr)  # noqa: E731
    before = torch.get_rng_state()
    first = _digits_run(0.01, adam)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state, as it was
    torch.rand(7)  # (and a run does not depend on it)
    again = _digits_run(0.01, adam)
    np.testing.assert_array_equal(first.costs, again.costs)
    assert first.costs[1] < first.costs[0] and not first.diverged
    blown = _digits_run(1e38, lambda ps, lr: torch.optim.SGD(ps, lr=lr), epochs=3)
    assert blown.diverged and blown.mean_cost == math.inf
    picked = best_curve("x", [1e38, 0.01], lambda name, lr: first if lr == 0.01 else blown)
    assert picked is first


class _RecordingSGD(torch.optim.SGD):
    """SGD that records the rate of every step."""

    seen: list[float] = []

    def step(self, closure=None):
        self.seen.append(self.param_groups[0]["lr"])
        return super().step(closure)


def test_sqrt_decay_schedule():
    _RecordingSGD.seen = []
    _digits_run(0.5, lambda ps, lr: _RecordingSGD(ps, lr=lr), epochs=1, sqrt_decay=True)
    seen = _RecordingSGD.seen
    assert len(seen) == 12  # ceil(1437 / 128) minibatches
    expected = [0.5 / math.sqrt(t) for t in range(1, len(seen) + 1)]
    np.testing.assert_allclose(seen, expected, rtol=1e-12)


def test_a_quick_run_that_does_not_show_a_result_says_so_and_no_more():
    from adamkit.experiments.paper.report import verdict

    assert verdict(True, quick=True) == verdict(True, quick=False) == "yes"
    assert verdict(False, quick=False) == "no"
    assert verdict(False, quick=True) == "not shown by this quick run"
