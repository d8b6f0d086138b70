"""The NumPy reference's NAdam and RAdam (:mod:`adamkit.specs.reference`) against
torch.optim.NAdam and torch.optim.RAdam in float64, every weight-decay mode, maximize
and complex params, over enough steps to cross RAdam's switch from its momentum-SGD
warm-up to the rectified update.  torch keeps its scalar state (step, NAdam's
``mu_product``) in the default dtype: float64 here, so nothing is rounded to fp32."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from adamkit.specs import reference

STEPS = 60
VARIANTS = {"nadam": torch.optim.NAdam, "radam": torch.optim.RAdam}


def _run_both(algorithm: str, decay: str, maximize: bool, complex_param: bool, lr: float = 2e-2):
    g = torch.Generator().manual_seed(0)
    dtype = torch.complex128 if complex_param else torch.float64
    start = torch.randn(7, 3, generator=g, dtype=dtype)
    param = torch.nn.Parameter(start.clone())
    weight_decay = 0.0 if decay == "none" else 0.1
    kwargs = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize, "foreach": False}
    kwargs["decoupled_weight_decay"] = decay == "decoupled"
    optimizer = VARIANTS[algorithm]([param], **kwargs)
    hp = reference.Hyperparameters(
        lr=lr,
        weight_decay=weight_decay,
        weight_decay_mode="decoupled" if decay == "decoupled" else "l2",
        maximize=maximize,
    )
    theta, state = start.numpy().copy(), reference.ReferenceState()
    for _ in range(STEPS):
        grad = torch.randn(7, 3, generator=g, dtype=dtype)
        param.grad = grad.clone()
        optimizer.step()
        theta = reference.STEP_FUNCTIONS[algorithm](theta, grad.numpy(), state, hp)
    return param.detach().numpy(), theta, optimizer.state[param], state


@pytest.mark.usefixtures("float64_default")
@pytest.mark.parametrize(
    "algorithm,decay,maximize,complex_param",
    list(itertools.product(VARIANTS, ("none", "l2", "decoupled"), (False, True), (False, True))),
)
def test_reference_matches_torch(algorithm, decay, maximize, complex_param):
    theirs, ours, torch_state, state = _run_both(algorithm, decay, maximize, complex_param)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-14)
    moments = reference.moments_as(state, theirs)
    np.testing.assert_allclose(moments["exp_avg"], torch_state["exp_avg"].numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(moments["exp_avg_sq"], torch_state["exp_avg_sq"].numpy(), rtol=1e-12, atol=1e-15)
    if algorithm == "nadam":
        assert state.mu_product == pytest.approx(float(torch_state["mu_product"]), rel=1e-15)


def test_radam_warms_up_as_momentum_sgd_then_rectifies():
    """rho_1 = 1 for beta2 = 0.999: the first steps are momentum SGD with bias-corrected
    m (theta moves by lr * m_hat exactly); rho_t passes 5 at t = 6."""
    hp = reference.Hyperparameters(lr=0.1)
    state, theta = reference.ReferenceState(), np.zeros(3)
    grad = np.array([1.0, -2.0, 0.5])
    for t in range(1, 7):
        before = theta
        theta = reference.radam_step(theta, grad, state, hp)
        rho_inf = 2 / (1 - hp.beta2) - 1
        rho_t = rho_inf - 2 * t * hp.beta2**t / (1 - hp.beta2**t)
        m_hat = state.exp_avg / (1 - hp.beta1**t)
        if t < 6:
            assert rho_t <= 5 and np.array_equal(theta, before - hp.lr * m_hat)
        else:
            assert rho_t > 5 and not np.allclose(theta, before - hp.lr * m_hat)


@pytest.mark.parametrize("clip_exponent", [0.25, None])
def test_adopt_by_hand(clip_exponent):
    """ADOPT's first steps written out (Taniguchi et al., 2024, Algorithm 1 with the
    authors' clipping): step 1 only sets v = g1^2; step 2 moves by
    -lr (1 - beta1) clip(g2 / max(|g1|, eps), 1); step 3 normalizes by the v of step 2."""
    beta1, beta2, lr, eps = 0.9, 0.99, 0.1, 1e-6
    hp = reference.Hyperparameters(lr=lr, beta1=beta1, beta2=beta2, eps=eps, clip_exponent=clip_exponent)
    state, theta = reference.ReferenceState(), np.array([1.0, -2.0, 0.5])
    g1, g2, g3 = np.array([0.5, 4.0, 0.0]), np.array([2.0, -1.0, 3e-7]), np.array([1.0, 1.0, 1.0])
    after1 = reference.adopt_step(theta, g1, state, hp)
    np.testing.assert_array_equal(after1, theta)
    np.testing.assert_array_equal(state.exp_avg_sq, g1 * g1)
    np.testing.assert_array_equal(state.exp_avg, 0.0)
    after2 = reference.adopt_step(after1, g2, state, hp)
    normalized = np.array([2.0 / 0.5, -1.0 / 4.0, 3e-7 / eps])  # the third: |g1| = 0 < eps
    if clip_exponent is not None:  # c_2 = 1^p = 1
        normalized = np.clip(normalized, -1.0, 1.0)
    m2 = (1 - beta1) * normalized
    np.testing.assert_allclose(after2, theta - lr * m2, rtol=1e-15)
    v2 = beta2 * g1 * g1 + (1 - beta2) * g2 * g2
    np.testing.assert_allclose(state.exp_avg_sq, v2, rtol=1e-15)
    after3 = reference.adopt_step(after2, g3, state, hp)
    normalized = g3 / np.maximum(np.sqrt(v2), eps)
    if clip_exponent is not None:  # c_3 = 2^(1/4)
        normalized = np.clip(normalized, -(2.0**0.25), 2.0**0.25)
    np.testing.assert_allclose(after3, after2 - lr * (beta1 * m2 + (1 - beta1) * normalized), rtol=1e-14)


@pytest.mark.parametrize("clip_exponent", [0.25, None])
def test_adopt_matches_optax(clip_exponent):
    """optax's ``contrib.adopt`` (a peer implementation, in JAX's float64) over 200 steps
    of gradients whose scale drifts: the NumPy reference and adamkit.ADOPT agree with it
    to a few ulps, clipped (optax's default clip value t^(1/4)) and unclipped."""
    optax = pytest.importorskip("optax")
    import jax

    import adamkit

    rng = np.random.default_rng(0)
    start = rng.standard_normal(500)
    grads = [rng.standard_normal(500) * (1 + 0.5 * np.sin(k / 10)) for k in range(200)]
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # (JAX computes in float32 otherwise)
    try:
        transform = optax.contrib.adopt(1e-2, use_clipping=clip_exponent is not None)
        theirs = jax.numpy.asarray(start)
        state = transform.init(theirs)
        for g in grads:
            updates, state = transform.update(jax.numpy.asarray(g), state, theirs)
            theirs = optax.apply_updates(theirs, updates)
        theirs = np.asarray(theirs)
    finally:
        jax.config.update("jax_enable_x64", x64)
    assert theirs.dtype == np.float64
    hp = reference.Hyperparameters(lr=1e-2, beta1=0.9, beta2=0.9999, eps=1e-6, clip_exponent=clip_exponent)
    spec, spec_state = start.copy(), reference.ReferenceState()
    param = torch.nn.Parameter(torch.tensor(start))
    ours = adamkit.ADOPT([param], lr=1e-2, clip_exponent=clip_exponent)
    for g in grads:
        spec = reference.adopt_step(spec, g, spec_state, hp)
        param.grad = torch.tensor(g)
        ours.step()
    scale = np.abs(theirs - start).max()  # how far the run moved
    assert scale > 0.5
    assert np.abs(spec - theirs).max() <= 1e-13 * np.abs(theirs).max()
    assert np.abs(param.detach().numpy() - theirs).max() <= 1e-13 * np.abs(theirs).max()


@pytest.mark.parametrize(
    "theta,grad,state_shape,amsgrad,words",
    [
        ((2,), (3, 2), None, False, r"grad has shape \(3, 2\), but theta has \(2,\)"),
        ((2, 2), (2,), None, False, r"grad has shape \(2,\), but theta has \(2, 2\)"),
        ((3,), (3,), (2,), False, r"the state's moments have shape \(2,\), but theta has \(3,\)"),
        ((2,), (2,), (2,), True, r"amsgrad=True after steps without it"),
    ],
)
def test_the_reference_refuses_mismatched_shapes_and_states(theta, grad, state_shape, amsgrad, words):
    """(It once broadcast a (3, 2) gradient against a (2,) theta and returned a (3, 2) theta.)"""
    state = reference.ReferenceState()
    if state_shape is not None:
        reference.adam_step(np.zeros(state_shape), np.ones(state_shape), state, reference.Hyperparameters(lr=0.1))
    with pytest.raises(ValueError, match=words):
        reference.adam_step(np.zeros(theta), np.ones(grad), state, reference.Hyperparameters(lr=0.1, amsgrad=amsgrad))


@pytest.mark.parametrize("step", [reference.adam_step, reference.stable_adamw_step])
def test_fully_decoupled_decay_takes_the_lr_given_as_max_lr_when_none_is_set(step):
    """As the torch classes take their initial lr (it once divided by None); a later lr
    keeps the first as the peak, so the decay follows the schedule's shape."""
    unset = reference.Hyperparameters(lr=0.1, weight_decay=0.5, weight_decay_mode="fully_decoupled")
    assert unset.max_lr == 0.1
    theta, grad = np.array([1.0, -2.0]), np.array([0.3, 0.2])
    given = reference.Hyperparameters(lr=0.1, weight_decay=0.5, weight_decay_mode="fully_decoupled", max_lr=0.1)
    first, second = reference.ReferenceState(), reference.ReferenceState()
    np.testing.assert_array_equal(step(theta, grad, first, unset), step(theta, grad, second, given))
    unset.lr = given.lr = 0.05  # a schedule's later rate: the peak stays 0.1
    np.testing.assert_array_equal(step(theta, grad, first, unset), step(theta, grad, second, given))
