"""``rounding``, ``state_precision`` and ``seed`` as a user meets them: weight decay on
bf16 weights, reproducibility, state_dicts, untouched gradients and clear errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
from matrix import CPU_BACKENDS

import adamkit

MODES = ("nearest", "kahan", "stochastic")


def zero_gradient_run(dtype, backend, rounding, steps=100, n=None):  # the acceptance test
    """AdamW, lr 1e-3, weight decay 1e-2, zero gradients: the update is pure decay,
    theta_t = theta_0 (1 - lr * wd)^t (closed form).  10,000 elements (2,000 under
    Triton's interpreter, which is slow)."""
    n = n or (2_000 if backend == "triton" else 10_000)
    g = torch.Generator().manual_seed(0)
    start = (torch.rand(n, generator=g) * 1.5 + 0.5).to(torch.bfloat16)  # in [0.5, 2]
    param = torch.nn.Parameter(start.to(dtype))
    opt = adamkit.AdamW([param], lr=1e-3, weight_decay=1e-2, backend=backend, rounding=rounding, seed=7)
    for _ in range(steps):
        param.grad = torch.zeros_like(param)
        opt.step()
    return start.double(), param.detach(), opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_gradient_decay_on_bf16_weights(backend):
    factor = (1 - 1e-3 * 1e-2) ** 100  # 0.999
    start, fp32, _ = zero_gradient_run(torch.float32, backend, "nearest")
    # per step: the fp32 decay factor (half an ulp off) and the rounded product
    assert torch.allclose(fp32.double(), start * factor, rtol=100 * 2 * 2.0**-24, atol=0)

    _, nearest, _ = zero_gradient_run(torch.bfloat16, backend, "nearest")
    assert torch.equal(nearest.double(), start)  # every decay step rounds back: stalled

    _, kahan, opt = zero_gradient_run(torch.bfloat16, backend, "kahan")
    represented = kahan.double() + opt.state[opt.param_groups[0]["params"][0]]["kahan_compensation"].double()
    # Kahan's weight is the pair p + c: it decays as fp32 does, element by element,
    # while p stays the bf16 number nearest to it (0.999 x is mostly closer to x
    # than to x's neighbours, whose spacing is 0.4 to 0.8 % of x).  The pair holds each
    # step's product to c's rounding, |c| <= 2^-9 |p| rounded to 8 bits: 2^-18 of the
    # weight a step, 100 steps at worst 3.8e-4 (measured: 9.6e-5); the whole decay is
    # 1e-3, which a compensation never added back loses
    assert torch.allclose(represented, fp32.double(), rtol=100 * 2.0**-18, atol=0)
    assert torch.equal(kahan, represented.to(torch.bfloat16))

    _, stochastic, _ = zero_gradient_run(torch.bfloat16, backend, "stochastic")
    # unbiased on average: each element's 100 steps each jump one spacing (2^-8 to 2^-7
    # of it) down with probability 1e-5 / spacing, so its end value's spread is about
    # half a spacing, the mean's 2e-3 / sqrt(n) (4.5e-5 for Triton's 2,000): 2e-4 is
    # over four of those, and a fifth of the decay (rounding to nearest stalls: 1e-3 off)
    assert abs(stochastic.double().mean() / fp32.double().mean() - 1) < 2e-4
    assert not torch.equal(stochastic.double(), start)


def small_model_run(backend, rounding, state_precision=None, seed=3, steps=5, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in [(300,), (20, 30), ()]]
    opt = adamkit.AdamW(params, lr=1e-2, backend=backend, rounding=rounding, state_precision=state_precision, seed=seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_stochastic_rounding_is_reproducible_from_the_seed(backend):
    a, _ = small_model_run(backend, "stochastic", seed=3)
    b, _ = small_model_run(backend, "stochastic", seed=3)
    c, _ = small_model_run(backend, "stochastic", seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_stochastic_rounding_is_the_same_on_every_backend():
    """The random bits are a function of (seed, param, step, element): no backend,
    thread count or chunking changes them."""
    results = {backend: small_model_run(backend, "stochastic", "bf16")[0] for backend in CPU_BACKENDS}
    for backend, params in results.items():
        assert all(torch.equal(x, y) for x, y in zip(params, results["cpu"])), backend


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_does_not_carry_the_largest_weight_to_infinity(backend, dtype):
    """A weight at the format's largest number pushed up by less than half a spacing
    stays there, as nearest rounding keeps it (fp16 weights at 65504 once became inf,
    383 of 4096 in three steps); pushed up by a spacing it overflows, as under nearest."""
    top = torch.finfo(dtype).max
    for push, overflows in ((0.25, False), (2.0, True)):
        spacing = 2.0 ** math.floor(math.log2(top)) * torch.finfo(dtype).eps  # the largest number's spacing
        p = torch.nn.Parameter(torch.full((4096,), top, dtype=dtype))
        opt = adamkit.Adam([p], lr=push * spacing, backend=backend, rounding="stochastic", seed=1)
        for _ in range(3):
            p.grad = torch.full_like(p, -1.0)  # each step moves the weights up by lr
            opt.step()
        assert bool(p.isinf().all()) if overflows else not bool(p.isinf().any()), (push, int(p.isinf().sum()))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_kahan_weight_that_overflows_stays_infinite_not_nan(backend):
    """An fp16 Kahan pair whose exact value passes the format's range rounds to inf, as
    nearest rounding does, and stays there: its compensation had become -inf, and the
    next step's p + c was NaN."""
    p = torch.nn.Parameter(torch.full((8,), 65504.0, dtype=torch.float16))
    opt = adamkit.Adam([p], lr=10.0, rounding="kahan", backend=backend)
    for _ in range(4):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
    assert bool(p.isposinf().all()) and not bool(opt.state[p]["kahan_compensation"].isnan().any())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128], ids=str)
def test_fp64_params_with_fp32_moments_keep_fp64_arithmetic(backend, dtype):
    """A float64 or complex128 param whose moments are fp32 (``state_precision="fp32"``)
    is still updated in its own precision: steps of 1e-9 on weights of 1e3 (an fp32
    update would move them by its rounding, 3e-5 here) land where torch.optim.Adam's
    land with fp64 moments (the moments' fp32 rounding moves them by far less than an
    ulp of the weights)."""
    g = torch.Generator().manual_seed(0)

    def draw():
        real = torch.randn(64, dtype=torch.float64, generator=g)
        return torch.complex(real, torch.randn(64, dtype=torch.float64, generator=g)) if dtype.is_complex else real

    start, grads = draw() * 1e3 + 1, [draw() for _ in range(3)]
    ours_param, torch_param = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ours = adamkit.Adam([ours_param], lr=1e-9, backend=backend, state_precision="fp32")
    theirs = torch.optim.Adam([torch_param], lr=1e-9, foreach=False)
    for grad in grads:
        ours_param.grad, torch_param.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    assert ours.state[ours_param]["exp_avg"].dtype == (torch.complex64 if dtype.is_complex else torch.float32)
    torch.testing.assert_close(ours_param.detach(), torch_param.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_kahan_compensation_converted_with_its_param_is_kept(backend):
    """An fp16 Kahan param cast to bf16 (``.data`` replaced, then the state loaded again as
    the step's error asks) keeps its compensation, converted to bf16: a step with lr = 0
    leaves p + c at the cast param plus the old compensation, not at the param alone."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, generator=g).half())
    opt = adamkit.Adam([p], lr=1e-3, rounding="kahan", backend=backend)
    for _ in range(3):
        p.grad = torch.randn(8, generator=g).half()
        opt.step()
    held = opt.state[p]["kahan_compensation"].clone()
    assert held.abs().min() > 0
    p.data = p.data.to(torch.bfloat16)
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.0
    cast, p.grad = p.detach().clone(), torch.zeros(8, dtype=torch.bfloat16)
    opt.step()
    compensation = opt.state[p]["kahan_compensation"]
    assert compensation.dtype == torch.bfloat16 and torch.equal(p.detach(), cast)
    assert torch.equal(compensation, held.to(torch.bfloat16))


def test_seed_none_draws_from_torch_generator_only_when_needed():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    adamkit.Adam([param], rounding="kahan", state_precision="fp32")  # nothing rounds stochastically: no draw
    adamkit.Adam([torch.nn.Parameter(torch.zeros(3))], rounding="kahan")  # fp32 params and moments
    assert torch.equal(torch.rand(1), expected)
    assert adamkit.Adam([param], rounding="kahan").param_groups[0]["seed"] is not None  # bf16 moments
    torch.manual_seed(5)
    first = adamkit.Adam([param], rounding="stochastic").param_groups[0]["seed"]
    torch.manual_seed(5)
    second = adamkit.Adam([param], rounding="stochastic").param_groups[0]["seed"]
    assert isinstance(first, int) and first == second


@pytest.mark.parametrize(
    "groups,kwargs",
    [
        ([{}, {"lr": -1.0}], {}),  # the second group is refused after the first is in
        ([{}], {"fused": True, "foreach": True}),  # refused after every group is in
    ],
    ids=["bad-later-group", "fused-and-foreach"],
)
def test_a_refused_constructor_draws_no_seed(groups, kwargs):
    """A constructor that raises leaves torch's random stream where it was, even for
    groups that passed their checks and would draw a seed."""
    params = [{"params": [torch.nn.Parameter(torch.zeros(3))], **group} for group in groups]
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    with pytest.raises((ValueError, RuntimeError)):
        adamkit.AdamW(params, state_precision="int8", **kwargs)
    assert torch.equal(torch.rand(1), expected)
    torch.manual_seed(0)  # an accepted constructor draws each group's seed, in order
    seeds = [g["seed"] for g in adamkit.AdamW(params[:1], state_precision="int8").param_groups]
    torch.manual_seed(0)
    assert seeds == [int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rounding", MODES)
@pytest.mark.parametrize("state_precision", [None, "fp32", "bf16"])
def test_gradients_are_never_scratch(backend, rounding, state_precision):
    g = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(40, 30, generator=g).to(torch.bfloat16).t()),
        torch.nn.Parameter(torch.randn(50)),
    ]
    opt = adamkit.Adam(
        params, backend=backend, rounding=rounding, state_precision=state_precision, weight_decay=0.1, maximize=True
    )
    for _ in range(2):
        grads = [torch.randn(p.shape, generator=g).to(p.dtype) for p in params]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opt.step()
        assert all(torch.equal(p.grad, grad) for p, grad in zip(params, grads))


def round_trip(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rounding, state_precision", [("kahan", None), ("stochastic", "bf16"), ("kahan", "fp32")])
def test_state_dict_round_trip_continues_bit_for_bit(backend, rounding, state_precision):
    params, opt = small_model_run(backend, rounding, state_precision)
    saved = round_trip(opt)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = adamkit.AdamW(copies, lr=1e-2, backend=backend, rounding="nearest")  # overwritten by the load
    restored.load_state_dict(saved)
    assert restored.param_groups[0]["rounding"] == rounding and restored.param_groups[0]["seed"] == 3
    for p, q in zip(params, copies):
        for key, value in opt.state[p].items():
            assert restored.state[q][key].dtype == value.dtype and torch.equal(restored.state[q][key], value), key
    g = torch.Generator().manual_seed(9)
    for _ in range(3):
        for p, q in zip(params, copies):
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
            q.grad = p.grad.clone()
        opt.step()
        restored.step()
    assert all(torch.equal(p, q) for p, q in zip(params, copies))
    assert all(torch.equal(opt.state[p]["exp_avg"], restored.state[q]["exp_avg"]) for p, q in zip(params, copies))


def test_fp32_moments_of_bf16_params_survive_torch_style_casting():
    """torch.optim casts loaded states to the param's dtype; fp32 moments must not be
    squeezed through bf16 on the way in."""
    params, opt = small_model_run("cpu", "nearest", "fp32")
    restored = adamkit.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], state_precision="fp32")
    restored.load_state_dict(round_trip(opt))
    for p, q in zip(params, restored.param_groups[0]["params"]):
        assert restored.state[q]["exp_avg"].dtype == torch.float32
        assert torch.equal(restored.state[q]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


def test_checkpoints_move_to_and_from_torch():
    """A Kahan checkpoint loads into torch.optim.AdamW (the extra key is carried along
    unused); a torch checkpoint loads into a Kahan optimizer with zero compensation."""
    params, opt = small_model_run("cpu", "kahan")
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1e-2)
    theirs.load_state_dict(round_trip(opt))
    for q in theirs.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    theirs.step()

    ours = adamkit.AdamW(
        [torch.nn.Parameter(p.detach().clone()) for p in theirs.param_groups[0]["params"]], rounding="kahan"
    )
    ours.load_state_dict(theirs.state_dict())
    for q in ours.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    ours.step()
    assert all("kahan_compensation" in ours.state[q] for q in ours.param_groups[0]["params"])


def test_changing_storage_options_mid_run_converts_the_state():
    params, opt = small_model_run("cpu", "nearest")
    group = opt.param_groups[0]
    group["state_precision"], group["rounding"] = "fp32", "kahan"
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    state = opt.state[params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["kahan_compensation"].dtype == torch.bfloat16
    group["state_precision"], group["rounding"] = None, "nearest"
    opt.step()
    assert state is opt.state[params[0]] and state["exp_avg"].dtype == torch.bfloat16
    assert "kahan_compensation" not in state


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_rounding_leaves_fp32_params_alone(backend, rounding):
    a, opt_a = small_model_run(backend, "nearest", dtype=torch.float32)
    b, opt_b = small_model_run(backend, rounding, dtype=torch.float32)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all("kahan_compensation" not in opt_b.state[p] for p in b)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rounding": "up"}, "Invalid rounding: 'up' (allowed: 'nearest', 'kahan', 'stochastic')"),
        (
            {"state_precision": "int3"},
            "Invalid state_precision: 'int3' (allowed: None, 'fp32', 'bf16', 'int8', 'int4')",
        ),
        ({"seed": -1}, "Invalid seed: -1 (seed must be None or an int in [0, 2**64))"),
        ({"seed": 1.5}, "Invalid seed: 1.5"),
        ({"seed": True}, "Invalid seed: True"),
        ({"seed": 2**64}, "Invalid seed"),
        ({"rounding": "kahan", "differentiable": True}, "rounding='kahan' does not support differentiable=True"),
    ],
)
def test_bad_storage_options_are_named(kwargs, message):
    with pytest.raises(ValueError) as error:
        adamkit.Adam([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert message in str(error.value)


def test_bad_storage_option_at_step_time_touches_nothing():
    params, opt = small_model_run("cpu", "kahan")
    before = [p.detach().clone() for p in params]
    states = {k: v.clone() for k, v in opt.state[params[0]].items()}
    opt.param_groups[0]["rounding"] = "round-half-up"
    with pytest.raises(ValueError, match=r"Invalid rounding: 'round-half-up' in param_groups\[0\]"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in states.items())


def test_bf16_states_need_real_params():
    param = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    opt = adamkit.Adam([param], state_precision="bf16")
    param.grad = torch.ones_like(param)
    with pytest.raises(ValueError, match=r"state_precision='bf16' needs real params.*params\[0\] in param_groups\[0\]"):
        opt.step()
    assert not opt.state[param]
