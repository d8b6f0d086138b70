"""``optimizer.stats()``: every figure checked against the same figure computed by hand,
in float64 NumPy, from a run of the NumPy reference over the same gradients."""

from __future__ import annotations

import copy
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matrix import FAMILY, refused

import adamkit
from adamkit import reference
from adamkit.algorithms import lookup

SHAPES = [(40, 5), (17,), ()]
STEPS = 7  # past RAdam's rectification (from the sixth step with beta2 = 0.999)
LRS = [0.02, 0.005]  # group 0, group 1 (the scheduler halves them after each step)


def gradient_batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g) * (i + 1) for i, s in enumerate(SHAPES)] for _ in range(STEPS)]


def starting_params():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=g) for s in SHAPES]


def expected_stats(algorithm: str, amsgrad: bool, eps: float, groups_of: list[int]):
    """Run the NumPy reference, then compute each group's figures from its definitions."""
    step_fn = reference.STEP_FUNCTIONS[algorithm]
    thetas = [p.double().numpy() for p in starting_params()]
    states = [reference.ReferenceState() for _ in thetas]
    for t, grads in enumerate(gradient_batches()):
        for i, grad in enumerate(grads):
            lr = LRS[groups_of[i]] * 0.5**t
            hp = reference.Hyperparameters(
                lr=lr, eps=eps, amsgrad=amsgrad, weight_decay=0.1, weight_decay_mode="decoupled"
            )
            thetas[i] = step_fn(thetas[i], grad.double().numpy(), states[i], hp)
    return figures_of(states, thetas, algorithm, amsgrad, eps, groups_of)


def figures_of(states: list, thetas: list, algorithm: str, amsgrad: bool, eps: float, groups_of: list[int]):
    """Each group's figures, by their definitions, from the moments and weights after
    the last step (float64; ``states`` need ``exp_avg``, ``exp_avg_sq`` and, for
    AMSGrad, ``max_exp_avg_sq``)."""
    norms = [float(np.sqrt(np.sum(g.double().numpy() ** 2))) for g in gradient_batches()[-1]]
    figures = []
    for group in sorted(set(groups_of)):
        members = [i for i in range(len(thetas)) if groups_of[i] == group]
        lr = LRS[group] * 0.5 ** (STEPS - 1)  # the lr of the last step, not the scheduler's next one
        effective, updates, weights, dominated = [], [], [], []
        for i in members:
            st = states[i]
            bias1 = 1 - 0.9**STEPS
            if algorithm == "adamax":
                u = st.exp_avg_sq
                step = lr / bias1 / u
                dominated.append(2 * eps > u)
            elif algorithm == "adopt":  # the update is lr m: m is already normalized
                step = np.full_like(st.exp_avg, lr)
                dominated.append(eps > np.sqrt(st.exp_avg_sq))
            elif algorithm == "radam":  # rectified at step 7: r_t from rho_t (Liu et al., 2020)
                rho_inf = 2 / (1 - 0.999) - 1
                rho_t = rho_inf - 2 * STEPS * 0.999**STEPS / (1 - 0.999**STEPS)
                assert rho_t > 5
                r = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
                root = np.sqrt(st.exp_avg_sq)
                step = lr / bias1 * r * math.sqrt(1 - 0.999**STEPS) / (root + eps)
                dominated.append(eps > root)
            else:
                v = st.max_exp_avg_sq if amsgrad else st.exp_avg_sq
                root = np.sqrt(v / (1 - 0.999**STEPS))
                step = lr / bias1 / (root + eps)
                dominated.append(eps > root)
            effective.append(np.ravel(step))
            updates.append(np.ravel(step * st.exp_avg))
            weights.append(np.ravel(thetas[i]))
            dominated[-1] = np.ravel(dominated[-1])
        effective, updates, weights, dominated = map(np.concatenate, (effective, updates, weights, dominated))
        update_rms = np.sqrt(np.mean(updates**2))
        figures.append(
            {
                "step": float(STEPS),
                "grad_norm": math.sqrt(sum(norms[i] ** 2 for i in members)),
                "update_rms": update_rms,
                "update_to_weight_rms": update_rms / np.sqrt(np.mean(weights**2)),
                "effective_step_size": float(np.exp(np.mean(np.log(effective)))),
                "eps_dominated_fraction": float(np.mean(dominated)),
                "skipped_steps": 0.0,
            }
        )
    return figures


def run_optimizer(cls, backend, precision=None, **options):
    params = [torch.nn.Parameter(x.clone()) for x in starting_params()]
    groups = [{"params": params[:2], "lr": LRS[0]}, {"params": params[2:], "lr": LRS[1]}]
    opt = cls(
        groups,
        weight_decay=0.1,
        decoupled_weight_decay=True,
        backend=backend,
        state_precision=precision,
        diagnostics=True,
        **options,
    )
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for grads in gradient_batches():
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        scheduler.step()
    return opt


CASES = [
    (adamkit.Adam, "adam", {}),
    (adamkit.Adam, "adam", {"amsgrad": True}),
    (adamkit.AdaMax, "adamax", {}),
    # eps large enough that it dominates some elements and not others
    (adamkit.Adam, "adam", {"eps": 0.5}),
    (adamkit.AdaMax, "adamax", {"eps": 2.0}),
    (adamkit.RAdam, "radam", {"eps": 0.05}),  # (its sqrt(v) is not bias-corrected)
    (adamkit.ADOPT, "adopt", {"betas": (0.9, 0.999), "eps": 0.5}),
]


@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "cpu", "triton"])
@pytest.mark.parametrize("cls,algorithm,options", CASES, ids=lambda c: str(c) if isinstance(c, dict) else None)
def test_stats_equal_the_figures_computed_by_hand_from_the_reference(backend, cls, algorithm, options):
    opt = run_optimizer(cls, backend, **options)
    expected = expected_stats(algorithm, options.get("amsgrad", False), options.get("eps", 1e-8), [0, 0, 1])
    for got, want in zip(opt.stats(), expected, strict=True):
        assert got.keys() == want.keys()
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-12), key
    fractions = [s["eps_dominated_fraction"] for s in expected]
    if "eps" in options:  # the figure is exercised, not trivially 0
        assert 0 < fractions[0] < 1


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_stats_of_quantized_states_come_from_the_dequantized_moments(precision):
    """The figures of a quantized run are those of its own moments, dequantized (the
    oracle reads them through adamkit.convert, in float64), to the fp32 run's tolerance."""
    opt = run_optimizer(adamkit.Adam, "cpu", precision=precision)
    params = [p for g in opt.param_groups for p in g["params"]]
    full = adamkit.convert.to_full_precision(opt.state_dict(), params)["state"]
    states = [
        SimpleNamespace(**{key: full[i][key].double().numpy() for key in ("exp_avg", "exp_avg_sq")})
        for i in range(len(params))
    ]
    thetas = [p.detach().double().numpy() for p in params]
    expected = figures_of(states, thetas, "adam", False, 1e-8, [0, 0, 1])
    for got, want in zip(opt.stats(), expected, strict=True):
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-12), key


def test_diagnostics_off_by_default_gives_no_gradient_norm():
    p = torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([p])
    assert opt.param_groups[0]["diagnostics"] is False
    p.grad = torch.ones(3)
    opt.step()
    (stats,) = opt.stats()
    assert math.isnan(stats["grad_norm"]) and stats["update_rms"] > 0


def test_stats_before_any_step_and_skipped_steps_per_group():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = adamkit.Adam([{"params": [a]}, {"params": [b]}], skip_nonfinite=True, diagnostics=True)
    assert opt.stats()[0]["step"] == 0 and opt.stats()[0]["update_rms"] == 0
    a.grad, b.grad = torch.tensor([1.0, float("nan"), 1.0]), torch.ones(3)
    opt.step()
    first, second = opt.stats()
    assert first["skipped_steps"] == 1 and second["skipped_steps"] == 0 and opt.skipped_steps == 1
    assert math.isnan(first["grad_norm"]) and second["grad_norm"] == pytest.approx(math.sqrt(3))
    for copied in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert [s["skipped_steps"] for s in copied.stats()] == [1, 0]


def test_grad_norm_is_unscaled_when_a_grad_scaler_hands_its_scale_over():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = adamkit.Adam(model.parameters(), backend="cpu", diagnostics=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    x = torch.randn(8, 4)
    scaler.scale(model(x).square().mean()).backward()
    expected = torch.cat([p.grad.flatten() / 256 for p in model.parameters()]).norm().item()
    scaler.step(opt)
    assert opt.stats()[0]["grad_norm"] == pytest.approx(expected, rel=1e-6)


def test_the_grad_norm_of_16_bit_gradients_is_summed_in_fp32():
    """A norm summed in bf16 was 3.8e-4 off (and a sharded run's differed from one
    process's). Oracle: the fp64 norm of the same bf16 gradients."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256).bfloat16()) for _ in range(2)]
    opt = adamkit.AdamW(params, lr=1e-3, rounding="kahan", diagnostics=True)
    for p in params:
        p.grad = (torch.randn(256, 256) * 1e-3).bfloat16()
    exact = math.sqrt(sum(float(p.grad.double().square().sum()) for p in params))
    opt.step()
    assert opt.stats()[0]["grad_norm"] == pytest.approx(exact, rel=1e-5)


def test_diagnostics_must_be_a_bool():
    with pytest.raises(TypeError, match="diagnostics must be True or False, got 1"):
        adamkit.Adam([torch.nn.Parameter(torch.ones(2))], diagnostics=1)


def test_a_step_skip_nonfinite_skipped_leaves_the_last_step_s_figures():
    """The skipped step's gradient norm and lr were once recorded before the skip, so the
    figures described a step that never happened."""
    p = torch.nn.Parameter(torch.ones(8))
    opt = adamkit.Adam([p], lr=0.1, diagnostics=True, skip_nonfinite=True)
    p.grad = torch.linspace(0.1, 0.8, 8)
    opt.step()
    before = opt.stats()[0]
    opt.param_groups[0]["lr"] = 1.0
    p.grad = torch.full((8,), math.nan)
    opt.step()
    after = opt.stats()[0]
    assert after.pop("skipped_steps") == before.pop("skipped_steps") + 1
    assert after == before


@pytest.mark.parametrize("diagnostics", [True, False])
@pytest.mark.parametrize("release", [False, True], ids=["step", "gradient-release"])
@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "cpu"])
def test_a_step_a_grad_scaler_skips_leaves_the_last_step_s_figures(backend, release, diagnostics):
    """The fused kernel skips a GradScaler's inf itself (no host sync); its gradient norm
    and lr were once recorded all the same, and under gradient release a per-tensor
    backend recorded before it skipped.  Without diagnostics the lr of the step taken
    is found past the skipped one too (read when asked for: no device work per step)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    opt = adamkit.Adam(model.parameters(), lr=0.1, backend=backend, diagnostics=diagnostics)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    handle = adamkit.gradient_release(model, opt, scaler=scaler) if release else None
    x = torch.randn(8, 4)
    for poison in (1.0, math.inf):
        scaler.scale(model(x).square().mean() * poison).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        if poison == 1.0:
            before = opt.stats()[0]
            opt.param_groups[0]["lr"] = 1.0
    assert scaler.get_scale() == 128.0  # the second step was skipped
    assert opt.stats()[0] == before
    if handle is not None:
        handle.remove()


@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdaMax, adamkit.RAdam, adamkit.ADOPT])
def test_between_micro_batches_the_figures_read_from_folded_moments_are_nan(cls):
    """With ``accumulation_steps`` the moments fold each micro-batch at once: between an
    update's micro-batches they describe no update, and once it is done the figures are
    those of plain stepping with the mean gradient (here every micro-batch of an update
    has the same gradient, so the two runs are the same run).  ADOPT steps with the mean
    gradient: its moments stand between micro-batches."""
    torch.manual_seed(0)
    accumulated, plain = torch.nn.Parameter(torch.randn(16)), torch.nn.Parameter(torch.randn(16))
    plain.data.copy_(accumulated)
    opt = cls([accumulated], lr=0.01, diagnostics=True, accumulation_steps=2)
    twin = cls([plain], lr=0.01, diagnostics=True)
    read = ("update_rms", "update_to_weight_rms", "effective_step_size", "eps_dominated_fraction")
    for step in range(1, 9):
        gradient = torch.randn(16)
        accumulated.grad = gradient.clone()
        opt.step()
        mid = opt.stats()[0]
        assert mid["grad_norm"] == pytest.approx(gradient.norm().item(), rel=1e-6)
        if step > 1 and cls is not adamkit.ADOPT:
            assert mid["step"] == step - 1 and all(math.isnan(mid[key]) for key in read)
        accumulated.grad = gradient.clone()
        opt.step()
        plain.grad = gradient.clone()
        twin.step()
        done, want = opt.stats()[0], twin.stats()[0]
        assert done["step"] == want["step"] == step
        for key in read:
            assert done[key] == pytest.approx(want[key], rel=1e-5, abs=1e-12), key


def test_cautious_updates_have_no_diagnostics():
    """A cautious update's mask came from that step's gradient, which the state does not
    keep: the figures read back would be off (0.83 of the real update's RMS)."""
    with pytest.raises(ValueError, match="diagnostics=True with cautious=True.*a cautious update"):
        adamkit.Adam([torch.nn.Parameter(torch.ones(3))], cautious=True, diagnostics=True)


@pytest.mark.parametrize("name", list(FAMILY))
def test_stats_of_every_class_after_a_step(name):
    """Classes whose last update cannot be read back from the state (and cautious
    groups) report NaN for those figures, with their step and skip counts, rather than
    failing at the first step of a logging loop; the others report numbers."""
    cls = FAMILY[name][0]
    readable = lookup(FAMILY[name][2]).read_back is not None
    for cautious in (False, True) if "cautious" not in refused(name) else (False,):
        p = torch.nn.Parameter(torch.ones(3))
        opt = cls([p], skip_nonfinite=True, cautious=cautious)
        p.grad = torch.tensor([1.0, float("nan"), 1.0])
        opt.step()
        p.grad = torch.ones(3)
        opt.step()
        (stats,) = opt.stats()
        assert stats["step"] == 1 and stats["skipped_steps"] == 1
        read = [stats[key] for key in ("update_rms", "effective_step_size", "eps_dominated_fraction")]
        assert all(math.isnan(x) for x in read) if cautious or not readable else all(x >= 0 for x in read)


def test_stats_take_the_lr_of_the_last_step_with_or_without_diagnostics():
    """A scheduler moves the lr after the step: the figures are the step's, equal to the
    weights' real change (they once took the halved lr without diagnostics)."""
    for diagnostics in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(64))
        opt = adamkit.Adam([p], lr=0.01, diagnostics=diagnostics)
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            before = p.detach().clone()
            p.grad = torch.randn(64)
            opt.step()
            scheduler.step()
        moved = (p.detach() - before).double().square().mean().sqrt().item()
        assert opt.stats()[0]["update_rms"] == pytest.approx(moved, rel=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "foreach", "single_tensor", None])
def test_a_grad_scaler_s_skipped_step_is_not_counted_by_skip_nonfinite_on_any_backend(backend):
    """The inf was the scaler's to skip (where the fused kernels take its flag, and where
    it skips step() itself): skipped_steps stays 0 on every backend (it was 1 on the
    fused kernel alone)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = adamkit.AdamW(model.parameters(), backend=backend, skip_nonfinite=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    x = torch.randn(8, 4)
    for blow_up in (False, True, False):
        loss = model(x).square().mean() * (float("inf") if blow_up else 1.0)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.skipped_steps == 0 and scaler.get_scale() == 512.0
    assert opt.state[model.weight]["step"].item() == 2
