"""Split master weights (``master_weights="fp32"`` and ``"24bit"``, adamkit.specs.master): a bf16 param plus
16 bits of state *is* an fp32 weight, so the run is bit for bit the run on fp32 params
fed the same gradients, on every backend; the oracle is that run (and on the reference
backend torch.optim.AdamW(foreach=False) itself)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from matrix import DEVICE, DEVICE_BACKENDS

import adamkit
from adamkit import master, rounding
from adamkit.kernels import KERNELS
from adamkit.specs import master as spec_master
from adamkit.specs.master import MASTER_KEY, join_tensors

#: the interpreter runs the Triton kernel in NumPy: fewer steps there
STEPS = {"triton": 60}
SHAPES = [(3000,), (48, 70), ()]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32 if t.element_size() == 4 else torch.int16)


def _pair(backend: str, cls=adamkit.AdamW, mode: str = "fp32", **options):
    """bf16 params with split master weights, and fp32 params from the same values."""
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(torch.bfloat16) for s in SHAPES]
    split = [torch.nn.Parameter(t.to(DEVICE)) for t in start]
    full = [torch.nn.Parameter(t.float().to(DEVICE)) for t in start]
    kwargs = {"lr": 1e-3, "weight_decay": 0.1, "backend": backend, "seed": 3, **options}
    state_precision = kwargs.pop("state_precision", "fp32")
    ours = cls(split, master_weights=mode, state_precision=state_precision, **kwargs)
    theirs = cls(full, state_precision=None if state_precision == "fp32" else state_precision, **kwargs)
    return ours, split, theirs, full


def _run(ours, split, theirs, full, steps: int, zero_grads: bool = False) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p, q in zip(split, full):
            grad = torch.zeros(p.shape) if zero_grads else torch.randn(p.shape, generator=g)
            grad = grad.to(torch.bfloat16)  # the same gradients: values bf16 can hold
            p.grad, q.grad = grad.to(DEVICE), grad.float().to(DEVICE)
        ours.step()
        theirs.step()


def _assert_same_run(ours, split, theirs, full) -> None:
    for p, q in zip(split, full):
        assert torch.equal(_bits(join_tensors(p, ours.state[p][MASTER_KEY])), _bits(q))
        for key, value in theirs.state[q].items():
            assert torch.equal(ours.state[p][key], value), key


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_the_split_master_weight_runs_the_fp32_run_bit_for_bit(backend):
    ours, split, theirs, full = _pair(backend)
    _run(ours, split, theirs, full, STEPS.get(backend, 1000))
    _assert_same_run(ours, split, theirs, full)
    for p in split:  # the model computes with the master rounded to bf16 (half away from zero)
        high, _ = master.split(join_tensors(p, ours.state[p][MASTER_KEY]).cpu().numpy())
        assert np.array_equal(p.detach().cpu().view(torch.int16).numpy().view(np.uint16), high)


def test_on_the_reference_backend_it_is_torch_adamw_on_fp32_weights():
    ours, split, _, _ = _pair("single_tensor")
    full = [torch.nn.Parameter(p.detach().float()) for p in split]
    theirs = torch.optim.AdamW(full, lr=1e-3, weight_decay=0.1, foreach=False)
    _run(ours, split, theirs, full, 1000)
    _assert_same_run(ours, split, theirs, full)


@pytest.mark.parametrize("backend", ["single_tensor", "foreach", "cpu"])
@pytest.mark.parametrize("name", ["NAdam", "RAdam", "ADOPT"])
def test_the_family_on_split_masters_is_the_run_on_fp32_weights(backend, name):
    """torch.optim's own run where the backend keeps torch's bits (and torch has the
    algorithm), else the backend's."""
    ours, split, theirs, full = _pair(backend, cls=getattr(adamkit, name))
    if KERNELS[backend].torch_exact and hasattr(torch.optim, name):
        full = [torch.nn.Parameter(p.detach().float()) for p in split]
        theirs = getattr(torch.optim, name)(full, lr=1e-3, weight_decay=0.1, foreach=False)
    _run(ours, split, theirs, full, 300)
    _assert_same_run(ours, split, theirs, full)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize(
    "cls, options",
    [(adamkit.Adam, {"amsgrad": True, "state_precision": "int8"}), (adamkit.AdaMax, {"state_precision": "int4"})],
    ids=["adam-amsgrad-l2-int8", "adamax-int4"],
)
def test_with_quantized_states_and_amsgrad_or_adamax(backend, cls, options):
    ours, split, theirs, full = _pair(backend, cls, **options)
    _run(ours, split, theirs, full, 4 if backend == "triton" else 30)  # the interpreter is slow
    _assert_same_run(ours, split, theirs, full)


def test_fine_tuning_decay_is_kept_where_bf16_loses_it():
    """Zero gradients, lr 1e-5, weight decay 0.1: the weight shrinks by 1e-6 of itself
    per step, far below bf16's half spacing; the master weight decays as fp32 does."""
    ours, split, theirs, full = _pair(None, lr=1e-5)
    nearest = [torch.nn.Parameter(p.detach().clone()) for p in split]
    started = [p.detach().clone() for p in split]
    plain = adamkit.AdamW(nearest, lr=1e-5, weight_decay=0.1)
    _run(ours, split, theirs, full, 1000, zero_grads=True)
    for p in nearest:
        p.grad = torch.zeros_like(p)
    for _ in range(1000):
        plain.step()
    _assert_same_run(ours, split, theirs, full)  # bit for bit the fp32 weights' decay
    for p, q, start in zip(split, nearest, started):
        assert torch.equal(q.detach(), start)  # bf16 rounded to nearest: not one weight moved
        decayed = join_tensors(p, ours.state[p][MASTER_KEY]).double()
        ratio = (decayed / start.double())[start != 0]
        factor = float(torch.tensor(1 - 1e-5 * 0.1, dtype=torch.float32)) ** 1000  # fp32's decay factor
        # each fp32 step rounds theta * factor by at most half an ulp, 2^-24 of it
        assert float((ratio - factor).abs().max()) <= 1000 * 2.0**-24


def test_the_master_weights_round_trip_through_a_state_dict_and_fp32_weights():
    ours, split, theirs, full = _pair("cpu")
    _run(ours, split, theirs, full, 20)
    saved = copy.deepcopy(ours.state_dict())
    weights = adamkit.precision.master_weights(ours)
    assert all(w.dtype == torch.float32 for w in weights)
    assert all(torch.equal(_bits(w), _bits(q)) for w, q in zip(weights, full))

    def bf16_run(params):
        opt = adamkit.AdamW(params, lr=1e-3, weight_decay=0.1, master_weights="fp32", state_precision="fp32")
        opt.load_state_dict(copy.deepcopy(saved))
        return opt

    resumed = [torch.nn.Parameter(p.detach().clone()) for p in split]  # a checkpoint: params and state dict
    again = bf16_run(resumed)
    rebuilt = [torch.nn.Parameter(w.to(torch.bfloat16)) for w in weights]  # fp32 weights alone
    third = bf16_run(rebuilt)
    for p in rebuilt:
        third.state[p][MASTER_KEY].zero_()
    adamkit.precision.load_master_weights(third, weights)
    g = torch.Generator().manual_seed(7)
    for _ in range(5):  # all four runs go on with the same gradients
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in split]
        for params in (split, full, resumed, rebuilt):
            for p, grad in zip(params, grads):
                p.grad = grad.to(p.dtype)
        for opt in (ours, theirs, again, third):
            opt.step()
    for opt, params in ((ours, split), (again, resumed), (third, rebuilt)):
        _assert_same_run(opt, params, theirs, full)


def test_a_resume_loading_the_model_after_the_optimizer_is_exact_and_new_weights_go_through_load_master_weights():
    """The low bits a loaded state brings stay when the model's values are written into
    the params afterwards (the resume is the uninterrupted run, bit for bit), and other
    weights written in place meet those low bits (a master within one bf16 unit of them,
    as docs/lean-memory.md says) until ``load_master_weights`` sets them exactly."""
    ours, split, theirs, full = _pair("cpu")
    _run(ours, split, theirs, full, 10)
    saved_state, saved_values = copy.deepcopy(ours.state_dict()), [p.detach().clone() for p in split]
    resumed = [torch.nn.Parameter(torch.zeros_like(p)) for p in split]  # a model built anew
    again = adamkit.AdamW(resumed, lr=1e-3, weight_decay=0.1, master_weights="fp32", state_precision="fp32", seed=3)
    again.load_state_dict(saved_state)
    with torch.no_grad():  # then the model's own load_state_dict
        for p, value in zip(resumed, saved_values):
            p.copy_(value)
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in split]
        for params in (split, full, resumed):
            for p, grad in zip(params, grads):
                p.grad = grad.to(p.dtype)
        for opt in (ours, theirs, again):
            opt.step()
    _assert_same_run(again, resumed, theirs, full)

    other = [torch.randn(p.shape, generator=g).to(torch.bfloat16) for p in resumed]  # a pretrained model, say
    with torch.no_grad():
        for p, value in zip(resumed, other):
            p.copy_(value)
    for joined, value in zip(adamkit.precision.master_weights(again), other):
        unit = value.float().abs() * 2.0**-7  # one bf16 unit is at most this (and at least half of it)
        assert (joined != value.float()).any() and ((joined - value.float()).abs() < unit).all()
    adamkit.precision.load_master_weights(again, [value.float() for value in other])
    for joined, value in zip(adamkit.precision.master_weights(again), other):
        assert torch.equal(_bits(joined), _bits(value.float()))


def test_torch_adamw_loads_the_state_dict_and_ignores_the_low_bits():
    ours, split, _, _ = _pair("cpu")
    _run(ours, split, *_pair("cpu")[2:], 3)
    torch_opt = torch.optim.AdamW([torch.nn.Parameter(p.detach().float()) for p in split], lr=1e-3)
    torch_opt.load_state_dict(ours.state_dict())
    for p in torch_opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    torch_opt.step()


def test_switching_master_weights_on_adds_zero_low_bits_and_off_drops_them():
    p = torch.nn.Parameter(torch.randn(10).to(torch.bfloat16))
    opt = adamkit.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    opt.param_groups[0]["master_weights"] = "fp32"
    before = p.detach().clone()
    opt.step()
    assert opt.state[p][MASTER_KEY].dtype == torch.bfloat16  # holding int16 bit patterns
    assert not torch.equal(p.detach(), before)
    opt.param_groups[0]["master_weights"] = None
    opt.step()
    assert MASTER_KEY not in opt.state[p]


@pytest.mark.parametrize(
    "options, dtype, words",
    [
        ({"master_weights": "fp16"}, torch.bfloat16, "Invalid master_weights: 'fp16' (allowed: None, 'fp32', '24bit')"),
        ({"master_weights": True}, torch.bfloat16, "Invalid master_weights: True (allowed: None, 'fp32', '24bit')"),
        (
            {"master_weights": "fp32", "rounding": "kahan"},
            torch.bfloat16,
            "master_weights='fp32' and rounding='kahan' both say how a 16-bit weight keeps its updates",
        ),
        (
            {"master_weights": "fp32", "differentiable": True},
            torch.bfloat16,
            "master_weights='fp32' does not support differentiable=True",
        ),
        ({"master_weights": "fp32"}, torch.float16, "splits bf16 params, but params[0] in param_groups[0] is float16"),
    ],
)
def test_bad_master_weights_are_refused_by_name(options, dtype, words):
    p = torch.nn.Parameter(torch.ones(4, dtype=dtype))
    with pytest.raises(ValueError) as raised:
        adamkit.AdamW([p], **options)
    assert words in str(raised.value)


def test_a_group_edited_to_a_bad_value_fails_the_step_and_changes_nothing():
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    opt = adamkit.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    before, state = p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}
    opt.param_groups[0]["master_weights"] = "fp32"
    with pytest.raises(ValueError, match="is float16"):
        opt.step()
    assert torch.equal(p.detach(), before)
    assert all(torch.equal(opt.state[p][k], v) for k, v in state.items()) and opt.state[p].keys() == state.keys()


def test_fp32_params_in_a_master_group_are_plain_fp32():
    p = torch.nn.Parameter(torch.randn(8))
    q = torch.nn.Parameter(p.detach().clone())
    ours, theirs = adamkit.AdamW([p], master_weights="fp32"), adamkit.AdamW([q])
    for _ in range(3):
        p.grad = q.grad = torch.ones(8)
        ours.step()
        theirs.step()
    assert torch.equal(p, q) and MASTER_KEY not in ours.state[p]


# ----------------------------------------------------------------------------- 24-bit


def _relative_errors(ours, split, full) -> torch.Tensor:
    masters = [join_tensors(p, ours.state[p][MASTER_KEY]).double().reshape(-1) for p in split]
    exact = [q.detach().double().reshape(-1) for q in full]
    return torch.cat([(m - e) / e.abs() for m, e in zip(masters, exact)])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_the_24bit_master_follows_the_fp32_run_within_its_stochastic_rounding(backend):
    """Each step rounds the fp32 result to 16 significant bits stochastically: an
    unbiased error of variance at most spacing^2 / 4 (spacing <= 2^-15 of the weight),
    so after T steps the relative error's RMS is at most sqrt(T) 2^-16 and its mean over
    n elements within a few sqrt(T) 2^-16 / sqrt(n) of zero."""
    steps = STEPS.get(backend, 1000)
    ours, split, theirs, full = _pair(backend, mode="24bit")
    _run(ours, split, theirs, full, steps)
    errors = _relative_errors(ours, split, full)
    bound = steps**0.5 * 2.0**-16
    assert float(errors.square().mean().sqrt()) <= bound
    assert abs(float(errors.mean())) <= 4 * bound / errors.numel() ** 0.5
    assert ours.state[split[0]][MASTER_KEY].dtype == torch.int8
    for p, q in zip(split, full):  # the moments see the same gradients: fp32's, bit for bit
        assert torch.equal(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_the_24bit_master_is_stored_as_its_spec_says(backend):
    """Each step stores ``master.split24`` of the fp32 result, with the param stream's
    random bits (:mod:`adamkit.specs.rounding`): the fp32 run is put on the 24-bit
    master before each step, so its result is the one the split master rounds."""
    ours, split, theirs, full = _pair(backend, mode="24bit")
    g = torch.Generator().manual_seed(1)
    for step in (1, 2, 3):
        for p, q in zip(split, full):
            with torch.no_grad():  # before the first step the master is the bf16 param
                q.copy_(join_tensors(p, ours.state[p][MASTER_KEY]) if ours.state[p] else p.float())
            grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            p.grad, q.grad = grad.to(DEVICE), grad.float().to(DEVICE)
        ours.step()
        theirs.step()
        for index, (p, q) in enumerate(zip(split, full)):
            stream = rounding.stream_key(3, rounding.SLOTS * index + rounding.PARAM_SLOT)
            bits = rounding.random_bits(int(rounding.step_keys(stream, step)), q.numel())
            high, low = master.split24(q.detach().cpu().numpy(), bits.reshape(q.shape))
            assert np.array_equal(_bits(p).cpu().numpy().view(np.uint16), high), f"param {index}, step {step}"
            assert np.array_equal(ours.state[p][MASTER_KEY].cpu().numpy(), low), f"low bits {index}, step {step}"


def test_24bit_keeps_fine_tuning_decay_in_expectation():
    ours, split, theirs, full = _pair(None, mode="24bit", lr=1e-5)
    _run(ours, split, theirs, full, 1000, zero_grads=True)
    errors = _relative_errors(ours, split, full)
    bound = 1000**0.5 * 2.0**-16
    assert abs(float(errors.mean())) <= 4 * bound / errors.numel() ** 0.5  # decayed as fp32, on average
    decayed = join_tensors(split[0], ours.state[split[0]][MASTER_KEY]).double()
    assert float((decayed / full[0].detach().double()).median()) == pytest.approx(1.0, abs=2.0**-15)


@pytest.mark.parametrize("state_precision, most", [("int8", 5.05), ("int4", 4.1)])
def test_bf16_with_a_24bit_master_and_quantized_states_fits_its_bytes(state_precision, most):
    """Weights plus optimizer state per param on transformer shapes (gradients aside)."""
    shapes = [(768, 768), (3072, 768), (768, 3072), (768,), (50257 // 7, 768)]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=torch.bfloat16)) for s in shapes]
    opt = adamkit.AdamW(params, master_weights="24bit", state_precision=state_precision)
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    count = sum(p.numel() for p in params)
    held = sum(p.numel() * p.element_size() for p in params)
    held += sum(v.numel() * v.element_size() for p in params for k, v in opt.state[p].items() if k != "step")
    assert held / count <= most


def test_switching_between_fp32_and_24bit_keeps_the_master_to_nearest():
    ours, split, theirs, full = _pair("cpu")
    _run(ours, split, theirs, full, 10)
    before = [join_tensors(p, ours.state[p][MASTER_KEY]).clone() for p in split]
    ours.param_groups[0]["master_weights"] = "24bit"
    ours.param_groups[0]["lr"] = 0.0  # a step that converts the state and moves nothing
    for p in split:
        p.grad = torch.zeros_like(p)
    ours.step()
    for p, b in zip(split, before):
        after = join_tensors(p, ours.state[p][MASTER_KEY])
        assert ours.state[p][MASTER_KEY].dtype == torch.int8
        assert float(((after.double() - b.double()) / b.double().abs()).abs().max()) <= 2.0**-16


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("mode", ["fp32", "24bit"])
def test_a_weight_zeroed_in_place_stays_zero_under_stale_low_bits(backend, mode):
    """``p.data.mul_(mask)`` (pruning) leaves the master's low bits from before; joined to
    a zeroed weight, a negative low half once crossed the sign bit and made the master a
    NaN.  The join keeps the param's sign, so a zeroed weight's master is a denormal at
    most, and an lr=0 step leaves every weight as the user left it."""
    p = torch.nn.Parameter(torch.randn(64, generator=torch.Generator().manual_seed(0)).to(DEVICE, torch.bfloat16))
    opt = adamkit.AdamW([p], lr=1e-2, master_weights=mode, backend=backend, seed=1)
    for _ in range(3):
        p.grad = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(DEVICE, torch.bfloat16)
        opt.step()
    mask = torch.arange(64, device=DEVICE) % 3 != 0
    with torch.no_grad():
        p.data.mul_(mask)
    pruned = p.detach().clone()
    weights = adamkit.precision.master_weights(opt)[0]
    assert torch.isfinite(weights).all() and weights[~mask].abs().max() < 1e-37
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(DEVICE, torch.bfloat16)
    opt.step()
    assert torch.equal(p.detach(), pruned)


def test_no_split_of_a_finite_master_crosses_the_sign_when_joined():
    """The sign guard never changes a stepped run's bits: every finite fp32 pattern near
    zero, the denormals and a random sample round-trip through split and join."""
    g = np.random.default_rng(0)
    patterns = np.concatenate(
        [np.arange(0, 1 << 17), np.arange(0, 1 << 17) | 0x80000000, g.integers(0, 0x7F800000, 100_000)]
    ).astype(np.uint32)
    theta = patterns.view(np.float32)
    theta = theta[np.isfinite(theta)]
    high, low = spec_master.split(theta)
    assert np.array_equal(spec_master.join(high, low).view(np.uint32), theta.view(np.uint32))
    bits = (g.integers(0, 65536, theta.size)).astype(np.int64)
    high24, low24 = spec_master.split24(theta, bits)
    joined = spec_master.join(high24, low24)
    assert np.all(np.abs(joined.astype(np.float64) - theta) <= np.abs(theta) * 2.0**-15 + 2.0**-133)


def test_a_nan_master_stays_nan_whatever_its_payload():
    """Every NaN pattern whose payload fills the top bits (a sum of NaNs can make them)
    splits and joins to a NaN: adding half the dropped range carried such a payload into
    the sign, and the join's sign guard then gave 0.0 (a NaN weight silently zeroed);
    the list kernels' torch form splits as the spec does."""
    top = np.arange(0x7FFF8000, 0x80000000, dtype=np.int64)
    patterns = np.concatenate([top, top | 0x80000000, [0x7FC00000, 0xFFC00000, 0x7F800001]]).astype(np.uint32)
    theta = patterns.view(np.float32)
    high, low = spec_master.split(theta)
    assert np.all(np.isnan(spec_master.join(high, low)))
    param, low_bits = torch.empty(theta.size, dtype=torch.bfloat16), torch.empty(theta.size, dtype=torch.bfloat16)
    master.split_into(torch.from_numpy(theta), param, low_bits)
    assert np.array_equal(param.view(torch.int16).numpy().view(np.uint16), high)
    assert np.array_equal(low_bits.view(torch.int16).numpy(), low)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_a_nan_gradient_leaves_nan_weights_not_zeros(backend):
    """One NaN gradient element under AMSGrad with int4 states poisons its blocks; the
    poisoned masters' NaN payloads once joined to 0.0 on the torch-op paths, which then
    trained on from zero (32 NaN, 96 zeros, where the fused kernels had 128 NaN)."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(256).to(torch.bfloat16).to(DEVICE))
    opt = adamkit.Adam([p], lr=1e-3, amsgrad=True, master_weights="fp32", state_precision="int4", backend=backend)
    for step in range(4):
        grad = torch.randn(256) * 0.1
        if step == 0:
            grad[5] = float("nan")
        p.grad = grad.to(torch.bfloat16).to(DEVICE)
        opt.step()
    weights = join_tensors(p, opt.state[p][MASTER_KEY]).cpu()
    assert not bool((weights == 0).any()), int((weights == 0).sum())
    assert int(weights.isnan().sum()) == 128


def test_the_24bit_grid_never_carries_a_weight_past_bf16s_largest_number():
    """Every fp32 pattern from the top of bf16's range to infinity, both signs, with
    extreme and random bits: the bf16 half is infinite exactly where nearest rounding of
    the weight is (about half of those just below the overflow point were carried onto
    it), the master stays within a grid unit of the weight, and the torch form (the list
    kernels') splits as the spec does."""
    top = int(np.float32(torch.finfo(torch.bfloat16).max).view(np.uint32))
    patterns = np.arange(top - (1 << 16), 0x7F800001, dtype=np.int64)
    theta = np.concatenate([patterns, patterns | 0x80000000]).astype(np.uint32).view(np.float32)
    nearest = torch.from_numpy(theta).to(torch.bfloat16).float().numpy()
    for bits in (
        np.zeros(theta.size),
        np.full(theta.size, 65535),
        np.random.default_rng(0).integers(0, 65536, theta.size),
    ):
        high, low = spec_master.split24(theta, bits.astype(np.int64))
        weights = torch.from_numpy(high.view(np.int16)).view(torch.bfloat16).float().numpy()
        assert np.array_equal(np.isinf(weights), np.isinf(nearest))
        finite = np.isfinite(nearest)  # (beyond it the weight overflows, and the grid may carry to inf)
        joined = spec_master.join(high, low).astype(np.float64)
        assert np.all(np.abs(joined[finite] - theta[finite]) <= np.abs(theta[finite]) * 2.0**-15)
        param, low_bits = torch.empty(theta.size, dtype=torch.bfloat16), torch.empty(theta.size, dtype=torch.int8)
        master.split_into(torch.from_numpy(theta), param, low_bits, torch.from_numpy(bits.astype(np.int64)))
        assert np.array_equal(param.view(torch.int16).numpy().view(np.uint16), high)
        assert np.array_equal(low_bits.numpy(), low)


@pytest.mark.parametrize("backend", DEVICE_BACKENDS)
def test_a_24bit_master_at_the_top_of_bf16s_range_overflows_where_nearest_rounding_does(backend):
    """bf16 weights at bf16's largest number pushed up by just under half its spacing
    stay there, as nearest rounding and the fp32 master's split keep them (the 24-bit
    grid's carry took about 3 in 4 of them to inf); pushed up by two spacings they
    overflow, as under nearest rounding."""
    top = torch.finfo(torch.bfloat16).max
    spacing = 2.0**120
    for push, overflows in ((0.499, False), (2.0, True)):
        p = torch.nn.Parameter(torch.full((4096,), top, dtype=torch.bfloat16, device=DEVICE))
        opt = adamkit.Adam([p], lr=push * spacing, master_weights="24bit", backend=backend, seed=1)
        p.grad = torch.full_like(p, -1.0)
        opt.step()
        assert bool(p.isinf().all()) if overflows else not bool(p.isinf().any()), (push, int(p.isinf().sum()))


@pytest.mark.parametrize("mode", ["fp32", "24bit"])
@pytest.mark.parametrize("torch_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("export", ["state_dict", "to_full_precision"])
def test_the_master_survives_a_pass_through_torch_optim_bit_for_bit(mode, torch_dtype, export):
    """A bf16 run's state loaded into torch.optim (which casts every state tensor to its
    params' dtype: int8 low bits become numbers, bf16 patterns fp32 values) and back:
    the low bits are restored by the saved group's master_weights, the master is the
    same bits, and where torch kept the moments in fp32 the run goes on as if it had
    never left (24-bit int8 values read as bf16 patterns had moved 99.5 % of the
    masters; fp32 values refused the load)."""
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(40, 33, generator=g).to(torch.bfloat16))
    twin = torch.nn.Parameter(p.detach().clone())
    precision = "int8" if export == "to_full_precision" else "fp32"  # (raw int8 codes would be cast too)
    options = {"lr": 1e-2, "weight_decay": 0.1, "master_weights": mode, "state_precision": precision, "seed": 1}
    ours, uninterrupted = adamkit.AdamW([p], **options), adamkit.AdamW([twin], **options)
    for _ in range(3):
        p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        twin.grad = p.grad.clone()
        ours.step()
        uninterrupted.step()
    master = adamkit.precision.master_weights(ours)[0].clone()
    saved = ours.state_dict()
    if export == "to_full_precision":
        saved = adamkit.convert.to_full_precision(saved, [p])
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().to(torch_dtype))], lr=1e-2)
    theirs.load_state_dict(saved)
    back = adamkit.AdamW([p], **options)
    through_torch = theirs.state_dict()
    if export == "to_full_precision":
        through_torch = adamkit.convert.to_quantized(through_torch, [p], "int8")
    back.load_state_dict(through_torch)
    assert torch.equal(_bits(adamkit.precision.master_weights(back)[0]), _bits(master))
    if export == "state_dict" and torch_dtype == torch.float32:  # fp32 moments came back unrounded
        for _ in range(3):
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
            twin.grad = p.grad.clone()
            back.step()
            uninterrupted.step()
        assert torch.equal(_bits(p), _bits(twin))
        low, twin_low = back.state[p][MASTER_KEY], uninterrupted.state[twin][MASTER_KEY]
        assert low.dtype == twin_low.dtype and torch.equal(low.view(torch.int8), twin_low.view(torch.int8))


def test_low_bits_no_cast_could_make_are_refused_by_name_and_load_master_weights_mends_them():
    """Low bits that are not a cast of the group's (fp32 values with bits below bf16's)
    are refused when loading, with the optimizer as it was; load_master_weights sets the
    weights exactly."""
    g = torch.Generator().manual_seed(0)
    b = torch.nn.Parameter(torch.randn(6, generator=g).to(torch.bfloat16))
    ours = adamkit.AdamW([b], lr=1e-2, master_weights="fp32", state_precision="fp32")
    for _ in range(2):
        b.grad = torch.randn(6, generator=g).to(torch.bfloat16)
        ours.step()
    saved = copy.deepcopy(ours.state_dict())
    saved["state"][0][MASTER_KEY] = torch.randn(6, generator=g)
    held = copy.deepcopy(ours.state_dict())
    with pytest.raises(ValueError, match=r"state\[0\]\['master_low_bits'\] holds torch.float32 values that no cast"):
        ours.load_state_dict(saved)
    assert torch.equal(ours.state[b][MASTER_KEY], held["state"][0][MASTER_KEY])
    weights = torch.randn(6, generator=g)
    adamkit.precision.load_master_weights(ours, [weights])
    assert torch.equal(adamkit.precision.master_weights(ours)[0], weights)


@pytest.mark.parametrize("offload", [None, "cpu"])
@pytest.mark.parametrize("mode", ["fp32", "24bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_model_cast_up_from_bf16_takes_its_master(mode, dtype, offload):
    """model.float() after a bf16 run with split masters, then the state converted as the
    step's error says (load_state_dict of state_dict()): the next step starts from the
    master, not from the bf16 value the param holds; a param set since to a value bf16
    cannot hold keeps it."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(50, generator=g).to(torch.bfloat16)) for _ in range(2)]
    opt = adamkit.AdamW(params, lr=1e-2, master_weights=mode, state_precision="fp32", offload=offload)
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(torch.bfloat16)
        opt.step()
    master = adamkit.precision.master_weights(opt)[0].clone()
    for p in params:
        p.data = p.data.to(dtype)
    edited = torch.randn(50, generator=g, dtype=dtype)
    params[1].data.copy_(edited)
    opt.load_state_dict(opt.state_dict())
    opt.param_groups[0]["lr"] = 0.0
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.equal(params[0].detach(), master.to(dtype))
    assert torch.equal(params[1].detach(), edited)
    assert MASTER_KEY not in opt.state[params[0]]


@pytest.mark.parametrize("switch", [("fp32", "24bit"), ("24bit", "fp32")])
def test_a_state_saved_between_a_switch_of_master_weights_and_the_next_step_loads(switch):
    """The low bits are still the old mode's when the state is saved right after
    master_weights was switched: they load as they are (not as a cast), and the next
    step converts them to the new mode, the master to nearest."""
    first, second = switch
    g = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(300, generator=g).to(torch.bfloat16))
    opt = adamkit.AdamW([p], lr=1e-2, master_weights=first, state_precision="fp32")
    for _ in range(3):
        p.grad = torch.randn(300, generator=g).to(torch.bfloat16)
        opt.step()
    master = adamkit.precision.master_weights(opt)[0].clone()
    opt.param_groups[0]["master_weights"] = second
    opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.state[p][MASTER_KEY].dtype == spec_master.LOW_BITS_DTYPE[second]
    moved = (adamkit.precision.master_weights(opt)[0] - master).abs()
    assert torch.all(moved <= master.abs() * 2.0**-16)  # to nearest on the coarser grid, or exact
