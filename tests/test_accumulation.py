"""Optimizer accumulation (``accumulation_steps=N``): checked against the NumPy
reference's ``accumulated_step``, against a plain Adam step when the micro-batches
agree, against gradient accumulation's first moment, and for what it must not do
(move weights before the last micro-batch)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matrix import CONFIGS, CPU_BACKENDS, reference_setup

import adamkit
from adamkit import reference
from adamkit.kernels import KERNELS
from adamkit.specs.master import join_tensors

N = 4
CYCLES = 3
SHAPES = [(30, 4), (9,), ()]


def micro_batches(seed=0, cycles=CYCLES, shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(N)] for _ in range(cycles)]


def starting_params(shapes=SHAPES, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def run(opt, params, cycles):
    """Every micro-batch is one ``step()``; returns the params after each micro-batch."""
    history = []
    for cycle in cycles:
        for grads in cycle:
            for p, g in zip(params, grads):
                p.grad = g.clone()
            opt.step()
            history.append([p.detach().clone() for p in params])
    return history


def reference_run(name: str, lr: float, start_dtype=torch.float32):
    algorithm, hp = reference_setup(name, lr)
    thetas = [p.detach().double().numpy() for p in starting_params(dtype=start_dtype)]
    states = [reference.ReferenceState() for _ in thetas]
    for cycle in micro_batches():
        for i in range(len(thetas)):
            grads = [batch[i].double().numpy() for batch in cycle]
            thetas[i] = reference.accumulated_step(thetas[i], grads, states[i], hp, algorithm)
    return thetas, states


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", CONFIGS)
def test_matches_the_numpy_reference_and_moves_weights_only_on_the_last_micro_batch(backend, name):
    cls, options = CONFIGS[name]
    params = starting_params()
    start = [p.detach().clone() for p in params]
    opt = cls(params, lr=0.01, backend=backend, accumulation_steps=N, **options)
    history = run(opt, params, micro_batches())
    for k, snapshot in enumerate(history):
        previous = start if k < N else history[(k // N) * N - 1]
        moved = (k + 1) % N == 0
        for now, before in zip(snapshot, previous):
            assert torch.equal(now, before) != moved or now.numel() == 0, f"micro-batch {k}"
    thetas, states = reference_run(name, lr=0.01)
    for p, theta, st in zip(params, thetas, states):
        np.testing.assert_allclose(p.detach().double().numpy(), theta, rtol=2e-6, atol=1e-7)
        np.testing.assert_allclose(opt.state[p]["exp_avg"].double().numpy(), st.exp_avg, rtol=2e-5, atol=1e-7)
        second = opt.state[p]["exp_inf" if cls is adamkit.AdaMax else "exp_avg_sq"]
        np.testing.assert_allclose(second.double().numpy(), st.exp_avg_sq, rtol=2e-5, atol=1e-9)
        assert opt.state[p]["step"].item() == CYCLES and opt.state[p]["accumulated"] == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_radam_accumulates_as_the_reference_before_and_after_rectification(backend):
    """RAdam folds the micro-batches like Adam and takes its own update from the folded
    moments: momentum SGD for five updates, rectified from the sixth (beta2 = 0.999)."""
    params = starting_params()
    start = [p.detach().double().numpy() for p in params]
    opt = adamkit.RAdam(
        params, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, backend=backend, accumulation_steps=N
    )
    cycles = micro_batches(seed=3, cycles=8)
    run(opt, params, cycles)
    hp = reference.Hyperparameters(lr=0.01, weight_decay=0.1, weight_decay_mode="decoupled")
    states = [reference.ReferenceState() for _ in start]
    thetas = start
    for cycle in cycles:
        thetas = [
            reference.accumulated_step(theta, [batch[i].double().numpy() for batch in cycle], states[i], hp, "radam")
            for i, theta in enumerate(thetas)
        ]
    for p, theta in zip(params, thetas):
        np.testing.assert_allclose(p.detach().double().numpy(), theta, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdaMax, adamkit.RAdam])
def test_equal_micro_batches_give_the_plain_step(cls):
    """N copies of the same gradient: exactly one step of torch.optim's optimizer (up
    to the rounding of summing N terms), for seven updates (RAdam's rectified from the sixth)."""
    torch_cls = {adamkit.Adam: torch.optim.Adam, adamkit.AdaMax: torch.optim.Adamax, adamkit.RAdam: torch.optim.RAdam}[
        cls
    ]
    params = starting_params()
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = cls(params, lr=0.05, accumulation_steps=N)
    torch_opt = torch_cls(plain, lr=0.05)
    g = torch.Generator().manual_seed(3)
    for _ in range(7):
        grads = [torch.randn(p.shape, generator=g) for p in params]
        run(opt, params, [[grads] * N])
        for q, grad in zip(plain, grads):
            q.grad = grad.clone()
        torch_opt.step()
    for p, q in zip(params, plain):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


def test_first_moment_equals_gradient_accumulation_and_second_moment_is_not_smaller():
    params = starting_params()
    accumulated = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = adamkit.Adam(params, lr=0.01, accumulation_steps=N)
    grad_accumulation = adamkit.Adam(accumulated, lr=0.01)
    for cycle in micro_batches(cycles=1):
        run(opt, params, [cycle])
        for i, q in enumerate(accumulated):
            q.grad = sum(batch[i] for batch in cycle) / N
        grad_accumulation.step()
    for p, q in zip(params, accumulated):
        torch.testing.assert_close(opt.state[p]["exp_avg"], grad_accumulation.state[q]["exp_avg"])
        assert torch.all(opt.state[p]["exp_avg_sq"] >= grad_accumulation.state[q]["exp_avg_sq"] * (1 - 1e-6))


def assert_gradient_release_equals_stepping_after_backward(make_optimizer) -> None:
    """A small model trained for two updates and a third under way (accumulation_steps=3),
    with and without :func:`adamkit.gradient_release`: equal weights and state."""

    def train(release: bool):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        opt = make_optimizer(model.parameters())
        handle = adamkit.gradient_release(model, opt) if release else None
        data = torch.Generator().manual_seed(5)
        for _ in range(7):
            model(torch.randn(16, 6, generator=data)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        if handle:
            handle.remove()
        return model, opt

    (released, released_opt), (plain, plain_opt) = train(True), train(False)
    for p, q in zip(released.parameters(), plain.parameters()):
        assert torch.equal(p, q)
        for key, value in plain_opt.state[q].items():
            assert torch.equal(torch.as_tensor(released_opt.state[p][key]), torch.as_tensor(value)), key


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("precision", [None, "int8"])
def test_with_gradient_release_equals_stepping_after_backward(backend, precision):
    assert_gradient_release_equals_stepping_after_backward(
        lambda ps: adamkit.AdamW(ps, lr=0.02, backend=backend, state_precision=precision, accumulation_steps=3)
    )


def saved_and_loaded(opt: torch.optim.Optimizer) -> dict:
    """``opt``'s state dict through ``torch.save`` and ``torch.load``."""
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer)


def test_a_checkpoint_mid_cycle_resumes_bit_for_bit():
    cycles = micro_batches()
    flat = [batch for cycle in cycles for batch in cycle]
    params = starting_params()
    opt = adamkit.Adam(params, lr=0.01, accumulation_steps=N)
    run(opt, params, [flat[:6]])  # one update and two micro-batches of the next
    saved = saved_and_loaded(opt)
    assert [saved["state"][i]["accumulated"] for i in range(len(params))] == [2, 2, 2]
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = adamkit.Adam(resumed_params, lr=0.01, accumulation_steps=N)
    resumed.load_state_dict(saved)
    run(opt, params, [flat[6:]])
    run(resumed, resumed_params, [flat[6:]])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)


def test_one_accumulation_step_is_the_plain_path():
    params = starting_params()
    plain = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = adamkit.Adam(params, lr=0.01, accumulation_steps=1, backend="single_tensor")
    torch_opt = torch.optim.Adam(plain, lr=0.01, foreach=False)
    for cycle in micro_batches(cycles=1):
        for grads in cycle:
            for p, q, g in zip(params, plain, grads):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            torch_opt.step()
    for p, q in zip(params, plain):
        assert torch.equal(p, q) and "accumulated" not in opt.state[p]


@pytest.mark.parametrize(
    "options",
    [
        {"rounding": "kahan"},
        {"rounding": "stochastic", "seed": 3},
        {"state_precision": "int8"},
        {"master_weights": "fp32"},
    ],
    ids=str,
)
def test_low_precision_storage_follows_the_reference(options):
    """bf16 weights (Kahan, stochastic) and int8 moments are rounded after every
    micro-batch: close to the float64 reference (which starts from the same values),
    within 5% of the most the weights can move (lr per update) or, for stochastic
    rounding, a few bf16 ulps."""
    dtype = torch.bfloat16 if "rounding" in options or "master_weights" in options else torch.float32
    params = starting_params(dtype=dtype)
    opt = adamkit.Adam(params, lr=0.01, accumulation_steps=N, **options)
    run(opt, params, [[[g.to(dtype) for g in batch] for batch in cycle] for cycle in micro_batches()])
    thetas, _ = reference_run("adam", lr=0.01, start_dtype=dtype)
    for p, theta in zip(params, thetas):
        value = p.detach().double().numpy()
        if options.get("rounding") == "kahan":
            value = value + opt.state[p]["kahan_compensation"].double().numpy()
        if "master_weights" in options:
            value = join_tensors(p, opt.state[p]["master_low_bits"]).double().numpy()
        if options.get("rounding") == "stochastic":
            np.testing.assert_allclose(value, theta, rtol=3 * 2.0**-8, atol=1e-6)
        else:
            np.testing.assert_allclose(value, theta, rtol=0, atol=0.05 * 0.01 * CYCLES)


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "4"])
def test_accumulation_steps_must_be_a_positive_int(value):
    with pytest.raises(ValueError, match=f"Invalid accumulation_steps: {value!r} \\(an int >= 1\\)"):
        adamkit.Adam([torch.nn.Parameter(torch.ones(2))], accumulation_steps=value)


def test_accumulation_is_not_differentiable():
    with pytest.raises(ValueError, match="accumulation_steps=2 does not support differentiable=True"):
        adamkit.Adam([torch.nn.Parameter(torch.ones(2))], accumulation_steps=2, differentiable=True)


# ------------------------------------------- updates that read their gradient: the mean

READS_ITS_GRADIENT = {
    "nadam": (adamkit.NAdam, {}),
    "adopt": (adamkit.ADOPT, {}),
    "stable_adamw-decay": (adamkit.StableAdamW, {"weight_decay": 0.1}),
    "adamw-cautious": (adamkit.AdamW, {"cautious": True, "weight_decay": 0.1}),
    "nadam-int8": (adamkit.NAdam, {"state_precision": "int8", "seed": 1}),
    "ademamix-int8": (adamkit.AdEMAMix, {"state_precision": "int8", "seed": 1, "alpha_warmup": 3, "beta3_warmup": 3}),
}


def mean_gradients(cycle, dtype=torch.float32):
    """Each param's sum of its micro-batch gradients times 1/N, added in order (fp32)."""
    means = []
    for i in range(len(cycle[0])):
        mean = torch.zeros_like(cycle[0][i], dtype=torch.float32)
        for batch in cycle:
            mean.add_(batch[i].float(), alpha=1.0 / N)
        means.append(mean.to(dtype))
    return means


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", READS_ITS_GRADIENT)
def test_updates_that_read_their_gradient_step_with_the_micro_batches_mean(backend, name):
    """NAdam, ADOPT, StableAdamW and cautious updates accumulate the gradients, not the
    moments: bit for bit the class's own step (single-tensor path) fed the mean, the
    weights moving only on the last micro-batch, and no buffer left after an update."""
    cls, options = READS_ITS_GRADIENT[name]
    if not KERNELS[backend].runs(cls.algorithm):
        pytest.skip(f"the {backend} kernel does not run {cls.__name__}")
    cycles = micro_batches()
    params, plain = starting_params(), starting_params()
    opt = cls(params, lr=0.01, backend=backend, accumulation_steps=N, **options)
    oracle = cls(plain, lr=0.01, backend="single_tensor", **options)
    history = run(opt, params, cycles)
    for k in range(len(history)):
        if k % N != N - 1:  # not the last micro-batch: nothing moved since the last update
            before = history[k - 1] if k % N else (history[k - 1] if k else starting_params())
            assert all(torch.equal(a, b) for a, b in zip(history[k], before)), k
    for cycle in cycles:
        for q, mean in zip(plain, mean_gradients(cycle)):
            q.grad = mean
        oracle.step()
    for p, q in zip(params, plain):
        assert torch.equal(p, q)
        assert opt.state[p]["accumulated"] == 0 and "accumulated_grad" not in opt.state[p]
        for key, value in oracle.state[q].items():
            assert torch.equal(torch.as_tensor(opt.state[p][key]), torch.as_tensor(value)), key


def test_nadam_accumulating_is_torch_nadam_on_the_mean_gradient():
    cycles = micro_batches()
    params, plain = starting_params(), starting_params()
    opt = adamkit.NAdam(params, lr=0.01, accumulation_steps=N, backend="foreach")
    torch_opt = torch.optim.NAdam(plain, lr=0.01, foreach=False)
    run(opt, params, cycles)
    for cycle in cycles:
        for q, mean in zip(plain, mean_gradients(cycle)):
            q.grad = mean
        torch_opt.step()
    for p, q in zip(params, plain):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["exp_avg_sq"], torch_opt.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "cls, options, algorithm, hp",
    [
        (adamkit.NAdam, {}, "nadam", {}),
        (adamkit.ADOPT, {"eps": 1e-8, "betas": (0.9, 0.999)}, "adopt", {}),
        (adamkit.StableAdamW, {"weight_decay": 0.1}, "stable_adamw", {"weight_decay": 0.1}),
        (adamkit.Adam, {"cautious": True}, "adam", {"cautious": True}),
        (
            adamkit.AdEMAMix,
            {"weight_decay": 0.1, "alpha_warmup": 3},
            "ademamix",
            {"weight_decay": 0.1, "alpha_warmup": 3},
        ),
    ],
    ids=["nadam", "adopt", "stable_adamw", "adam-cautious", "ademamix"],
)
def test_accumulating_the_mean_follows_the_numpy_reference_in_float64(
    backend, cls, options, algorithm, hp, float64_default
):
    if not KERNELS[backend].runs(cls.algorithm):
        pytest.skip(f"the {backend} kernel does not run {cls.__name__}")
    mode = "decoupled" if cls in (adamkit.StableAdamW, adamkit.AdEMAMix) else "l2"
    hyperparameters = reference.Hyperparameters(lr=0.01, weight_decay_mode=mode, **hp)
    params = starting_params(dtype=torch.float64)
    opt = cls(params, lr=0.01, backend=backend, accumulation_steps=N, **options)
    cycles = micro_batches(dtype=torch.float64)
    run(opt, params, cycles)
    thetas = [p.detach().numpy().copy() for p in starting_params(dtype=torch.float64)]
    states = [reference.ReferenceState() for _ in thetas]
    for cycle in cycles:
        for i in range(len(thetas)):
            grads = [batch[i].numpy() for batch in cycle]
            thetas[i] = reference.accumulated_step(thetas[i], grads, states[i], hyperparameters, algorithm)
    for p, theta in zip(params, thetas):
        np.testing.assert_allclose(p.detach().numpy(), theta, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [adamkit.NAdam, adamkit.StableAdamW])
def test_the_mean_under_gradient_release_equals_stepping_after_backward(cls):
    assert_gradient_release_equals_stepping_after_backward(lambda ps: cls(ps, lr=0.02, accumulation_steps=3))


def test_a_checkpoint_mid_cycle_keeps_the_fp32_sum_of_bf16_gradients():
    cycles = micro_batches(dtype=torch.bfloat16)
    flat = [batch for cycle in cycles for batch in cycle]
    params = starting_params(dtype=torch.bfloat16)
    opt = adamkit.StableAdamW(params, lr=0.01, accumulation_steps=N)
    run(opt, params, [flat[:6]])  # one update and two micro-batches of the next
    saved = saved_and_loaded(opt)
    assert saved["state"][0]["accumulated_grad"].dtype == torch.float32
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = adamkit.StableAdamW(resumed_params, lr=0.01, accumulation_steps=N)
    resumed.load_state_dict(saved)
    assert resumed.state[resumed_params[0]]["accumulated_grad"].dtype == torch.float32
    run(opt, params, [flat[6:]])
    run(resumed, resumed_params, [flat[6:]])
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
