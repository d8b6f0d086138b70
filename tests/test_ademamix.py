"""AdEMAMix (Pagliardini et al., 2024), added through the algorithm registry: held to
optax's ``contrib.ademamix`` (a peer implementation, JAX float64), to the NumPy
reference, and with int8/int4 states for all three moments to fp32 fed the same gradients."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import adamkit
from adamkit import kernels, reference
from adamkit.algorithms import lookup
from adamkit.algorithms.ademamix import slow_decay
from adamkit.convert import to_full_precision, to_quantized
from adamkit.state import moment_value

SIZE = 1024
#: the backends the oracles are run on: both per-tensor paths and the fused CPU kernel
CPU_BACKENDS = ("single_tensor", "foreach") + (("cpu",) if kernels.KERNELS["cpu"].available() else ())
LR, WEIGHT_DECAY, ALPHA, BETA3, WARMUP = 1e-2, 0.1, 5.0, 0.999, 50


def _gradients(steps: int, size: int, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(size)
    return start, [rng.standard_normal(size) * (1 + 0.5 * np.sin(k / 10)) for k in range(steps)]


def _optax_run(start, grads, warmup):
    optax = pytest.importorskip("optax")
    import jax
    import jax.numpy as jnp

    def alpha(count):  # optax counts from 0 before the step (an int32: made float64 first); the paper's t from 1
        return ALPHA if warmup is None else ALPHA * jnp.minimum((count.astype(jnp.float64) + 1) / warmup, 1.0)

    def beta3(count):
        if warmup is None:
            return BETA3
        a = jnp.minimum((count.astype(jnp.float64) + 1) / warmup, 1.0)
        log1, log3 = math.log(0.9), math.log(BETA3)
        return jnp.where(a >= 1.0, BETA3, jnp.minimum(jnp.exp(log1 * log3 / ((1 - a) * log3 + a * log1)), BETA3))

    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # (JAX computes in float32 otherwise)
    try:
        transform = optax.contrib.ademamix(LR, b3=beta3, alpha=alpha, weight_decay=WEIGHT_DECAY)
        theirs = jnp.asarray(start)
        state = transform.init(theirs)
        for g in grads:
            updates, state = transform.update(jnp.asarray(g), state, theirs)
            theirs = optax.apply_updates(theirs, updates)
        return np.asarray(theirs)
    finally:
        jax.config.update("jax_enable_x64", x64)


@pytest.mark.parametrize("warmup", [None, WARMUP])
def test_matches_optax_and_the_reference(warmup):
    """300 steps of drifting gradients, the warm-ups running through step 50: the NumPy
    reference and adamkit.AdEMAMix on both per-tensor paths and the fused CPU kernel agree
    with optax to a few ulps of the distance moved."""
    start, grads = _gradients(300, 400)
    theirs = _optax_run(start, grads, warmup)
    assert theirs.dtype == np.float64
    hp = reference.Hyperparameters(
        lr=LR,
        weight_decay=WEIGHT_DECAY,
        weight_decay_mode="decoupled",
        max_lr=LR,
        beta3=BETA3,
        alpha=ALPHA,
        alpha_warmup=warmup,
        beta3_warmup=warmup,
    )
    spec, spec_state = start.copy(), reference.ReferenceState()
    for g in grads:
        spec = reference.ademamix_step(spec, g, spec_state, hp)
    scale = np.abs(theirs - start).max()  # how far the run moved
    np.testing.assert_allclose(spec, theirs, rtol=0, atol=1e-12 * scale)
    for backend in CPU_BACKENDS:
        param = torch.nn.Parameter(torch.tensor(start))
        ours = adamkit.AdEMAMix(
            [param],
            lr=LR,
            weight_decay=WEIGHT_DECAY,
            beta3=BETA3,
            alpha=ALPHA,
            alpha_warmup=warmup,
            beta3_warmup=warmup,
            backend=backend,
        )
        for g in grads:
            param.grad = torch.tensor(g)
            ours.step()
        np.testing.assert_allclose(param.detach().numpy(), theirs, rtol=0, atol=1e-12 * scale, err_msg=backend)


#: runs in a fresh process: bitsandbytes registers its own ops on import, which this
#: worker's other tests should not see
_BITSANDBYTES_RUN = """
import sys, torch, adamkit, bitsandbytes as bnb
torch.manual_seed(0)
ours_kw = dict(alpha_warmup=30, beta3_warmup=40)
for backend in sys.argv[1:]:
    for decay in (0.0, 0.1):
        start = torch.randn(1000)
        a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        ours = adamkit.AdEMAMix([a], lr=1e-2, betas=(0.9, 0.999), beta3=0.999, alpha=5.0, weight_decay=decay,
                                backend=backend, **ours_kw)
        theirs = bnb.optim.AdEMAMix([b], lr=1e-2, betas=(0.9, 0.999, 0.999), alpha=5.0, weight_decay=decay,
                                    t_alpha=30, t_beta3=40, optim_bits=32)
        for _ in range(100):
            g = torch.randn(1000)
            a.grad, b.grad = g.clone(), g.clone()
            ours.step(), theirs.step()
        print(backend, decay, float((a - b).norm() / (a - start).norm()))
"""


def test_matches_bitsandbytes_ademamix():
    """A second independent implementation: bitsandbytes' 32-bit AdEMAMix (on CPU), 100
    steps through both warm-ups, with and without decay, agrees to fp32 rounding (1e-6 of
    the distance moved; measured 3e-7 to 5e-7).  Its default decay is 0.01 (ours and
    optax's: 0), so decay is given to both."""
    pytest.importorskip("bitsandbytes")
    run = subprocess.run(
        [sys.executable, "-c", _BITSANDBYTES_RUN, *CPU_BACKENDS], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split() for line in run.stdout.splitlines()]
    assert len(rows) == 2 * len(CPU_BACKENDS)
    for backend, decay, deviation in rows:
        assert float(deviation) <= 1e-6, (backend, decay, deviation)


def test_slow_decay_warms_up_from_beta1_by_half_life():
    """beta3(t) moves linearly in the half-life ln(1/2) / ln(beta), from beta1's to beta3's."""

    def half_life(beta):
        return math.log(0.5) / math.log(beta)

    for t in (0, 10, 25, 49):
        a = t / WARMUP
        expected = (1 - a) * half_life(0.9) + a * half_life(BETA3)
        assert half_life(slow_decay(float(t), 0.9, BETA3, WARMUP)) == pytest.approx(expected, rel=1e-12)
    assert slow_decay(50.0, 0.9, BETA3, WARMUP) == BETA3 and slow_decay(7.0, 0.9, BETA3, None) == BETA3
    device_step = torch.tensor([10.0, 50.0, 80.0], dtype=torch.float64)
    on_device = slow_decay(device_step, 0.9, BETA3, WARMUP)
    assert on_device.tolist() == [slow_decay(10.0, 0.9, BETA3, WARMUP), BETA3, BETA3]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_zero_beta1_still_warms_beta3_up(backend):
    """beta1 = 0 has a half-life of 0, so beta3(t) = beta3^(1/a), the closed form's limit
    (beta1 = 1e-12 comes within 1e-3 of it); the warm-up was skipped there, and the slow
    average took only (1 - beta3) of the first gradient where it takes about 10 %."""
    assert slow_decay(1.0, 0.0, BETA3, 100) == BETA3**100
    assert (
        slow_decay(0.0, 0.0, BETA3, 100) == 0.0 == slow_decay(torch.tensor(0.0, dtype=torch.float64), 0.0, BETA3, 100)
    )
    assert slow_decay(1.0, 1e-12, BETA3, 100) == pytest.approx(BETA3**100, abs=1e-3)
    assert slow_decay(100.0, 0.0, BETA3, 100) == BETA3 and slow_decay(
        torch.tensor(50.0, dtype=torch.float64), 0.0, BETA3, 100
    ).item() == pytest.approx(BETA3**2, rel=1e-15)
    start, grads = _gradients(5, SIZE)
    p = torch.nn.Parameter(torch.from_numpy(start))
    opt = adamkit.AdEMAMix(
        [p], lr=LR, betas=(0.0, 0.999), weight_decay=0.0, beta3=BETA3, beta3_warmup=100, backend=backend
    )
    hp = reference.Hyperparameters(lr=LR, beta1=0.0, beta2=0.999, max_lr=LR, beta3=BETA3, alpha=5.0, beta3_warmup=100)
    theta, state = start.copy(), reference.ReferenceState()
    for g in grads:
        p.grad = torch.from_numpy(g)
        opt.step()
        theta = reference.ademamix_step(theta, g, state, hp)
    np.testing.assert_allclose(opt.state[p]["exp_avg_slow"].numpy(), state.exp_avg_slow, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-12, atol=1e-15)
    assert np.abs(state.exp_avg_slow).mean() > 0.05 * np.abs(grads[0]).mean()


def test_state_holds_three_moments_in_each_precision():
    param = torch.nn.Parameter(torch.randn(1000))
    for precision, keys in [
        (None, {"exp_avg", "exp_avg_sq", "exp_avg_slow"}),
        ("bf16", {"exp_avg", "exp_avg_sq", "exp_avg_slow"}),
        ("int8", {"exp_avg_int8", "exp_avg_slow_int8"}),
        ("int4", {"exp_avg_int4_normalized", "exp_avg_slow_int4_normalized"}),
    ]:
        opt = adamkit.AdEMAMix([param], state_precision=precision)
        param.grad = torch.randn(1000)
        opt.step()
        held = set(opt.state[param])
        assert keys <= held, (precision, held)
        if precision in ("int8", "int4"):
            assert {"exp_avg_sq", "exp_avg", "exp_avg_slow"}.isdisjoint(held)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_conversion_to_full_precision_and_back_keeps_the_slow_moment(precision):
    """``to_full_precision`` dequantizes all three moments (the slow one was once left
    quantized), ``to_quantized`` stores them again, and a run loaded from the round trip
    goes on as the original."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(300, generator=g)) for _ in range(2)]
    opt = adamkit.AdEMAMix(params, lr=1e-2, state_precision=precision, seed=3)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(300, generator=g)
        opt.step()
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    full = to_full_precision(opt.state_dict(), params)
    for i, p in enumerate(params):
        assert {"exp_avg", "exp_avg_sq", "exp_avg_slow"} <= full["state"][i].keys()
        assert torch.equal(full["state"][i]["exp_avg_slow"], moment_value(opt.state[p], "exp_avg_slow", p))
        assert not any(key.startswith("exp_avg_slow_") for key in full["state"][i])
    twin = adamkit.AdEMAMix(twins, lr=1e-2, state_precision=precision, seed=3)
    twin.load_state_dict(to_quantized(full, params, precision))
    for _ in range(2):
        for p, q in zip(params, twins):
            p.grad = torch.randn(300, generator=g)
            q.grad = p.grad.clone()
        opt.step()
        twin.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))


def _shadowed_run(precision: str, steps: int, seed: int = 0) -> tuple[float, float, float, float]:
    """A quantized AdEMAMix and an fp32 shadow fed the same decaying gradients (their scale
    falls 100x, as late in training): the relative error of the stored slow average and
    second moment, and of the last update, against the shadow's."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(SIZE, generator=gen)
    scales = torch.exp(torch.randn(SIZE, generator=gen))  # a spread of per-element scales
    lean = torch.nn.Parameter(start.clone())
    shadow = torch.nn.Parameter(start.clone())
    kwargs = dict(lr=1e-3, beta3=0.999, alpha=5.0, alpha_warmup=500, beta3_warmup=500)
    lean_opt = adamkit.AdEMAMix([lean], state_precision=precision, seed=1, **kwargs)
    shadow_opt = adamkit.AdEMAMix([shadow], **kwargs)
    for k in range(steps):
        decay = 100.0 ** (-k / steps)
        g = (torch.randn(SIZE, generator=gen) + 0.3) * scales * decay
        before_lean, before_shadow = lean.detach().clone(), shadow.detach().clone()
        lean.grad, shadow.grad = g.clone(), g.clone()
        lean_opt.step()
        shadow_opt.step()
        lean_opt_state = lean_opt.state[lean]
    from adamkit.state import moment_value

    def relative(key):
        ours, fp32 = moment_value(lean_opt_state, key, lean), shadow_opt.state[shadow][key]
        return float((ours - fp32).norm() / fp32.norm())

    moved, shadow_moved = lean.detach() - before_lean, shadow.detach() - before_shadow
    update = float((moved - shadow_moved).norm() / shadow_moved.norm())
    return relative("exp_avg"), relative("exp_avg_sq"), relative("exp_avg_slow"), update


@pytest.fixture(scope="module")
def shadowed():
    """Both lean runs, once for the tests below (1,500 steps, about 10 s each)."""
    return {precision: _shadowed_run(precision, 1500) for precision in ("int8", "int4")}


@pytest.mark.parametrize("precision, fast_bound, second_bound", [("int8", 0.06, 0.1), ("int4", 0.5, 0.3)])
def test_quantized_fast_and_second_moments_follow_fp32(shadowed, precision, fast_bound, second_bound):
    """Gradients 100x smaller at the end: m and v, stored quantized, still follow fp32's
    (measured: int8 0.029 and 0.057, int4 0.32 and 0.17)."""
    fast, second, _, _ = shadowed[precision]
    assert fast < fast_bound and second < second_bound, shadowed[precision]


@pytest.mark.parametrize("precision, bound", [("int8", 0.4), ("int4", 1.5)])
def test_quantized_slow_moment_moves_with_fp32(shadowed, precision, bound):
    """The slow average does not freeze (rounded to nearest it would: its step, 0.1 % of
    g, is far below half a level, and its error would be 1.0); stochastic rounding keeps
    it unbiased but noisy (measured: int8 0.26, int4 1.08; see the next test)."""
    assert shadowed[precision][2] < bound, shadowed[precision]


@pytest.mark.xfail(
    strict=True,
    reason="the floor of a low-bit slow EMA: stochastic rounding adds independent noise of "
    "variance about spacing^2 / 6 every step, which an average with decay beta3 keeps as "
    "spacing^2 / (6 (1 - beta3^2)): 22x the per-step noise at beta3 = 0.999, so int8's "
    "levels leave the slow average 26 % off fp32's (and the update, which weighs it by "
    "alpha = 5, 56 %); following within 10 % needs about 3 more bits than int8 has",
)
def test_int8_slow_moment_within_ten_percent(shadowed):
    _, _, slow, update = shadowed["int8"]
    assert slow < 0.1 and update < 0.15, shadowed["int8"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": -1.0}, r"Invalid alpha value: -1.0 \(alpha must be a finite number >= 0\)"),
        ({"alpha": math.inf}, r"alpha must be a finite number >= 0"),
        ({"beta3": 1.0}, r"Invalid beta3 value: 1.0 \(beta3 must be in \[0, 1\)\)"),
        ({"beta3_warmup": 0}, r"Invalid beta3_warmup value: 0 \(beta3_warmup must be None, for no warm-up"),
        ({"alpha_warmup": 2.5}, r"Invalid alpha_warmup value: 2.5"),
        ({"alpha_warmup": True}, r"Invalid alpha_warmup value: True"),
        ({"diagnostics": True}, r"diagnostics=True: AdEMAMix does not run this option yet"),
    ],
)
def test_bad_input_names_the_argument(kwargs, message):
    param = torch.nn.Parameter(torch.randn(4))
    with pytest.raises(ValueError, match=message):
        opt = adamkit.AdEMAMix([param], **kwargs)
        param.grad = torch.randn(4)
        opt.step()


def test_a_bad_group_value_leaves_params_and_state_untouched():
    param = torch.nn.Parameter(torch.randn(8))
    opt = adamkit.AdEMAMix([param])
    param.grad = torch.randn(8)
    opt.step()
    before = param.detach().clone(), {k: v.clone() for k, v in opt.state[param].items()}
    opt.param_groups[0]["beta3"] = 1.5
    with pytest.raises(ValueError, match=r"beta3 must be in \[0, 1\) in param_groups\[0\]"):
        opt.step()
    assert torch.equal(param.detach(), before[0])
    assert all(torch.equal(opt.state[param][k], v) for k, v in before[1].items())


def test_every_kernel_runs_it_and_foreach_keeps_the_single_tensor_bits():
    """The registry declares AdEMAMix fused: both fused kernels run it (the slow average
    in the maximum's place), ``fused=True`` is offered as for the other classes, and the
    CPU default is the fused kernel; foreach keeps the single-tensor path's bits."""
    import inspect

    assert "fused" in inspect.signature(adamkit.AdEMAMix).parameters
    assert lookup("ademamix").fused
    assert all(kernels.KERNELS[name].runs("ademamix") for name in kernels.KERNELS)
    if kernels.KERNELS["cpu"].available():
        assert kernels.fused_backend({torch.device("cpu")}, "ademamix") == "cpu"
    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(64)) for _ in range(2))
    b.data.copy_(a.data)
    default, single = (
        adamkit.AdEMAMix([a], weight_decay=0.1, backend="foreach"),
        adamkit.AdEMAMix([b], weight_decay=0.1, backend="single_tensor"),
    )
    for _ in range(20):
        g = torch.randn(64)
        a.grad, b.grad = g.clone(), g.clone()
        default.step()
        single.step()
    assert torch.equal(a, b)


def test_a_numpy_count_is_a_warm_up_length():
    """``np.int64`` counts (from a config computed with NumPy) are whole numbers of steps."""
    runs = []
    for count in (5, np.int64(5)):
        p = torch.nn.Parameter(torch.linspace(-1, 1, 8))
        opt = adamkit.AdEMAMix([p], alpha_warmup=count, beta3_warmup=count)
        for step in range(8):
            p.grad = torch.full_like(p, 0.1 * step - 0.3)
            opt.step()
        runs.append(p.detach())
    assert torch.equal(*runs)
