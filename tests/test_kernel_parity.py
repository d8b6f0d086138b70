"""The two fused kernels are one computation: the Triton kernel (on ``DEVICE``: a GPU
with Triton's real compiler under ``ADAMKIT_TEST_DEVICE=cuda``, else the CPU under
Triton's interpreter) and the numba CPU kernel, fed the same params and gradients,
store bit-identical params and state after every step, in every param dtype, state
precision and master-weight/rounding mode.

Both compute each element op by op in IEEE arithmetic (fp32, fp64 for fp64 params),
with no fused multiply-adds, and store with the same rounding rules and random bits,
so nothing may differ, not even in the last bit.  (StableAdamW's per-tensor clipping
sums are added in different orders by the two kernels: float64 sums of the same fp32
terms, whose last-bit differences would have to cross an fp32 rounding boundary of the
step size to show; in these cases none does.)  The CPU kernel is held to the NumPy
reference by the conformance suites; this holds the GPU to the CPU kernel."""

from __future__ import annotations

import os

import pytest
import torch
from matrix import DEVICE, FAMILY, OPTION_SAMPLES, refused

import adamkit
from adamkit.kernels import FUSED_ALGORITHMS, KERNELS

pytestmark = pytest.mark.skipif(
    not (KERNELS["triton"].available() and KERNELS["triton"].supports(DEVICE) and KERNELS["cpu"].available()),
    reason="needs the Triton kernel on the test device and the numba CPU kernel",
)

#: (optimizer, param dtype, options): every storage path of the kernels
CASES = {
    "adamw-fp32": (adamkit.AdamW, torch.float32, {}),
    "adam-fp32-amsgrad-l2-maximize": (adamkit.Adam, torch.float32, {"amsgrad": True, "maximize": True}),  # L2 decay
    "adamax-fp32": (adamkit.AdaMax, torch.float32, {}),
    "adamw-fp64": (adamkit.AdamW, torch.float64, {}),
    "adamw-fp64-amsgrad": (adamkit.AdamW, torch.float64, {"amsgrad": True}),
    "adamw-fp32-bf16-states": (adamkit.AdamW, torch.float32, {"state_precision": "bf16"}),
    "adamw-bf16-nearest": (adamkit.AdamW, torch.bfloat16, {}),
    "adamw-bf16-kahan": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan"}),
    "adamw-bf16-kahan-fp32-states": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan", "state_precision": "fp32"}),
    "adamw-bf16-stochastic": (adamkit.AdamW, torch.bfloat16, {"rounding": "stochastic"}),
    "adamw-bf16-master": (adamkit.AdamW, torch.bfloat16, {"master_weights": "fp32"}),
    "adamw-bf16-master24-int8": (adamkit.AdamW, torch.bfloat16, {"master_weights": "24bit", "state_precision": "int8"}),
    "adam-bf16-master-int4-amsgrad": (
        adamkit.Adam,
        torch.bfloat16,
        {"master_weights": "fp32", "state_precision": "int4", "amsgrad": True},
    ),
    "adamw-fp16-nearest-fp32-states": (adamkit.AdamW, torch.float16, {"state_precision": "fp32"}),
    "adamw-fp16-kahan": (adamkit.AdamW, torch.float16, {"rounding": "kahan"}),
    "adamw-fp16-stochastic": (adamkit.AdamW, torch.float16, {"rounding": "stochastic"}),
    "adamw-fp32-int8": (adamkit.AdamW, torch.float32, {"state_precision": "int8"}),
    "adamw-fp32-int4-amsgrad": (adamkit.AdamW, torch.float32, {"state_precision": "int4", "amsgrad": True}),
    "adamw-bf16-kahan-int8": (adamkit.AdamW, torch.bfloat16, {"rounding": "kahan", "state_precision": "int8"}),
    "adamax-bf16-stochastic-int4": (
        adamkit.AdaMax,
        torch.bfloat16,
        {"rounding": "stochastic", "state_precision": "int4"},
    ),
    "nadam-fp32-l2": (adamkit.NAdam, torch.float32, {}),
    "nadam-bf16-master24-int8-decoupled": (
        adamkit.NAdam,
        torch.bfloat16,
        {"master_weights": "24bit", "state_precision": "int8", "decoupled_weight_decay": True},
    ),
    "radam-fp32-l2": (adamkit.RAdam, torch.float32, {}),
    "radam-fp16-stochastic-int4-decoupled": (
        adamkit.RAdam,
        torch.float16,
        {"rounding": "stochastic", "state_precision": "int4", "decoupled_weight_decay": True},
    ),
    "adopt-fp32-decoupled": (adamkit.ADOPT, torch.float32, {"decoupled_weight_decay": True}),
    "adopt-bf16-master-int8-l2-unclipped": (
        adamkit.ADOPT,
        torch.bfloat16,
        {"master_weights": "fp32", "state_precision": "int8", "clip_exponent": None},
    ),
    "stable_adamw-fp32": (adamkit.StableAdamW, torch.float32, {}),
    # lerp weights of 1/2 and more (beta1 = 0; a beta3 below 1/2) take the lerp from its far end
    "adam-fp32-beta1-zero": (adamkit.Adam, torch.float32, {"betas": (0.0, 0.99)}),
    # a weight of exactly 1/2, the boundary between the two ends (both forms differ where m, g differ 2x)
    "adam-fp32-beta1-half": (adamkit.Adam, torch.float32, {"betas": (0.5, 0.999)}),
    "adopt-bf16-master-beta1-zero": (adamkit.ADOPT, torch.bfloat16, {"betas": (0.0, 0.99), "master_weights": "fp32"}),
    "ademamix-fp32-beta3-below-half": (adamkit.AdEMAMix, torch.float32, {"betas": (0.3, 0.99), "beta3": 0.4}),
    # cautious: the agreement pass (L2 decay reads the Kahan-compensated weight) and the masked update
    "nadam-bf16-kahan-int8-l2-cautious": (
        adamkit.NAdam,
        torch.bfloat16,
        {"rounding": "kahan", "state_precision": "int8", "cautious": True},
    ),
    "adopt-fp32-maximize-cautious": (adamkit.ADOPT, torch.float32, {"maximize": True, "cautious": True}),
    "stable_adamw-bf16-master24-int4-decouple_lr": (
        adamkit.StableAdamW,
        torch.bfloat16,
        {"master_weights": "24bit", "state_precision": "int4", "decouple_lr": True},
    ),
    # a slow first moment in the maximum's place, warming up over the steps
    "ademamix-fp32-warmup": (adamkit.AdEMAMix, torch.float32, {"alpha_warmup": 2, "beta3_warmup": 3}),
    "ademamix-bf16-stochastic-int4": (
        adamkit.AdEMAMix,
        torch.bfloat16,
        {"rounding": "stochastic", "state_precision": "int4", "beta3_warmup": 2},
    ),
    "ademamix-bf16-master-int8-cautious": (
        adamkit.AdEMAMix,
        torch.bfloat16,
        {"master_weights": "fp32", "state_precision": "int8", "cautious": True},
    ),
    "ademamix-fp16-kahan-bf16-states": (
        adamkit.AdEMAMix,
        torch.float16,
        {"rounding": "kahan", "state_precision": "bf16", "alpha_warmup": 3},
    ),
    # a second weight sequence z in the first moment's place: in the param's dtype (bf16:
    # stored stochastically), or fp32 beside a split master or a Kahan compensation
    "schedule_free-fp32-warmup-r": (adamkit.ScheduleFreeAdamW, torch.float32, {"warmup_steps": 2, "r": 0.5}),
    "schedule_free-fp64": (adamkit.ScheduleFreeAdamW, torch.float64, {}),
    "schedule_free-bf16-nearest-int4": (adamkit.ScheduleFreeAdamW, torch.bfloat16, {"state_precision": "int4"}),
    "schedule_free-bf16-master24-int8": (
        adamkit.ScheduleFreeAdamW,
        torch.bfloat16,
        {"master_weights": "24bit", "state_precision": "int8", "warmup_steps": 2},
    ),
    "schedule_free-fp16-kahan-maximize": (
        adamkit.ScheduleFreeAdamW,
        torch.float16,
        {"rounding": "kahan", "maximize": True, "weight_lr_power": 0.0},
    ),
}

#: the options whose samples (``tests/matrix.py`` :data:`OPTION_SAMPLES`) are not kernel
#: paths: the backend is the test's choice, and offload steps on the host (never Triton)
NOT_KERNEL_OPTIONS = ("backend", "offload")


def generated_cases() -> dict:
    """One case per sample of every other option, each with a fused class drawn in
    rotation (the next one that takes it), so that a new option's samples, or an
    algorithm the fused kernels newly run, is stepped on both kernels without an edit
    here; named ``class-option-index``."""
    fused = [name for name, (_, _, algorithm) in FAMILY.items() if algorithm in FUSED_ALGORITHMS]
    samples = [
        (option, index, settings, dtype)
        for option, rows in OPTION_SAMPLES.items()
        if option not in NOT_KERNEL_OPTIONS
        for index, (settings, dtype) in enumerate(rows)
    ]
    cases = {}
    for k, (option, index, settings, dtype) in enumerate(samples):
        takers = [fused[(k + shift) % len(fused)] for shift in range(len(fused))]
        name = next(name for name in takers if not set(settings) & refused(name))
        cases[f"{name.lower()}-{option}-{index}"] = (FAMILY[name][0], dtype, dict(settings))
    return cases


CASES |= generated_cases()

#: a chunk and a ragged tail (several quantization blocks), a matrix, a 0-d param (small:
#: under the interpreter every chunk costs a fraction of a second)
SHAPES = [(1500,), (24, 70), ()]
STEPS = 3  # (ADOPT's first step only sets v: its second and third move)
#: RAdam's steps are rectified from the sixth on (rho_t > 5 with beta2 = 0.999)
RADAM_STEPS = 7


#: the first param's values and gradients spread over eight decades, so that its
#: quantized second moments span more than a finer map holds (int8's blocks take e5m3,
#: the others' e4m4; int4's take the root map, the others' e4m0)
SPREAD = 10.0 ** (-8 * torch.rand(SHAPES[0], generator=torch.Generator().manual_seed(10), dtype=torch.float64))


def _spread(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [tensors[0] * SPREAD, *tensors[1:]]


def _optimizer(case: str, backend: str, device: torch.device, **extra):
    """The case's optimizer (its options updated by ``extra``) on ``device`` and its
    params, from the same start."""
    cls, dtype, options = CASES[case]
    options = {**options, **extra}
    g = torch.Generator().manual_seed(11)
    start = _spread([torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES])
    params = [torch.nn.Parameter(p.to(device, dtype)) for p in start]
    return cls(params, **{"lr": 1e-2, "weight_decay": 0.1, "seed": 5, **options, "backend": backend}), params


def bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bit patterns (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def _stored(opt, params) -> dict[str, torch.Tensor]:
    """Every param and state tensor, on the CPU, by a readable name."""
    stored = {}
    for i, p in enumerate(params):
        stored[f"param {i}"] = p.detach().cpu().clone()  # (a copy: the history keeps every step's)
        for key, value in opt.state[p].items():
            value = value if isinstance(value, torch.Tensor) else torch.tensor(value)  # (accumulation's count)
            stored[f"param {i} {key}"] = value.detach().cpu().reshape(-1).clone()
    return stored


def _first_difference(ours: dict, theirs: dict) -> str | None:
    """A description of the first stored tensor whose bits differ, or None."""
    if ours.keys() != theirs.keys():
        return f"state keys differ: {sorted(ours)} and {sorted(theirs)}"
    for name in ours:
        differ = (bits(ours[name]) != bits(theirs[name])).reshape(-1)
        if differ.any():
            where = differ.nonzero().reshape(-1)[:4].tolist()
            a, b = ours[name].reshape(-1), theirs[name].reshape(-1)
            pairs = ", ".join(f"[{i}] {a[i].item()!r} vs {b[i].item()!r}" for i in where)
            return f"{name}: {int(differ.sum())} of {differ.numel()} elements differ, e.g. {pairs}"
    return None


def _step_side_by_side(case: str, shape_gradients=lambda drawn: drawn, **options) -> list:
    """Both kernels stepped side by side on the same gradients (``shape_gradients`` may
    rescale or zero the drawn ones), failing at the first step after which some param or
    state tensor's bits differ; the history of (gradients, ours, theirs) per step.
    ``ADAMKIT_PARITY_DUMP=DIR`` saves a failing case's inputs and both sides' tensors for
    study on another machine."""
    ours, our_params = _optimizer(case, "triton", DEVICE, **options)
    theirs, their_params = _optimizer(case, "cpu", torch.device("cpu"), **options)
    g = torch.Generator().manual_seed(12)
    history = []
    for step in range(1, (RADAM_STEPS if case.startswith("radam") else STEPS) + 1):
        drawn = shape_gradients(_spread([torch.randn(p.shape, generator=g, dtype=torch.float64) for p in their_params]))
        grads = [grad.to(p.dtype) for grad, p in zip(drawn, their_params)]
        for p, q, grad in zip(our_params, their_params, grads):
            p.grad, q.grad = grad.to(DEVICE), grad.clone()
        ours.step()
        theirs.step()
        history.append((grads, _stored(ours, our_params), _stored(theirs, their_params)))
        difference = _first_difference(history[-1][1], history[-1][2])
        if difference is not None:
            dump = os.environ.get("ADAMKIT_PARITY_DUMP")
            if dump:
                os.makedirs(dump, exist_ok=True)
                torch.save(history, os.path.join(dump, f"{case}.pt"))
            pytest.fail(f"step {step}: {difference}")
    return history


@pytest.mark.parametrize("case", list(CASES))
def test_triton_stores_the_cpu_kernels_bits(case):
    """After every step each param and state tensor holds the same bits on both kernels."""
    history = _step_side_by_side(case)
    for name in history[-1][2]:  # int8's two second-moment maps were stepped (e5m3 at least once)
        if name.endswith("_e5m3_e4m4_scales"):
            held = [stored[name] for _, _, stored in history]
            assert any(bool((v > 0).any() if name.startswith("param 0") else (v < 0).any()) for v in held), name


def test_triton_counts_zero_gradients_as_the_cpu_kernel_does():
    """A cautious update keeps an element only where update x gradient > 0, so an exact
    zero gradient counts as disagreeing, in the count that scales the kept ones too
    (decoupled decay: the zeros reach the kernel as zeros)."""

    def every_third_zero(grads):
        return [
            grad.reshape(-1).index_fill(0, torch.arange(0, grad.numel(), 3), 0.0).reshape(grad.shape) for grad in grads
        ]

    _step_side_by_side("adamw-fp32", every_third_zero, cautious=True)


def test_triton_normalizes_first_moments_over_subnormal_norms_as_the_cpu_kernel_does():
    """int4 stores AdaMax's first moment over a power of two near its norm u, held to
    2^-126 .. 2^126; with eps = 0 and gradients near 1e-40, u is subnormal or zero and the
    lower bound decides the divisor."""
    _step_side_by_side(
        "adamax-fp32", lambda grads: [grad * 1e-32 for grad in grads], state_precision="int4", eps=0.0, weight_decay=0.0
    )


def _strided_params(dtype: torch.dtype, device: torch.device) -> list[torch.nn.Parameter]:
    """A transposed matrix, a channels_last weight (dense, not contiguous), every other
    row of a matrix (not dense) and a contiguous vector."""
    g = torch.Generator().manual_seed(13)
    shapes = [(8, 6), (2, 3, 4, 5), (12, 7), (1500,)]
    bases = [torch.randn(shape, generator=g, dtype=torch.float64).to(device, dtype) for shape in shapes]
    views = [bases[0].t(), bases[1].to(memory_format=torch.channels_last), bases[2][::2], bases[3]]
    return [torch.nn.Parameter(view) for view in views]


@pytest.mark.parametrize(
    "case", ["adamw-fp32", "adamw-bf16-stochastic", "adamw-bf16-kahan", "adamw-fp32-int8", "nadam-fp32-l2"]
)
def test_triton_stages_strided_params_as_the_cpu_kernel_does(case, monkeypatch):
    """Params and gradients the kernel does not address in place (and a contiguous
    param's strided gradient) are staged through contiguous copies, as the CPU kernel
    stages them, so both store the same bits; the group no longer goes through foreach
    ops for one strided param (it once did, silently: within rounding of the kernel,
    and with foreach's temporaries, a whole fp32 moment per int8 one)."""
    cls, dtype, options = CASES[case]

    def no_fallback(batch, rule):
        raise AssertionError("the group went through foreach ops")

    monkeypatch.setattr(adamkit.kernels.triton.launch, "_foreach_fallback", no_fallback)
    settings = {"lr": 1e-2, "weight_decay": 0.1, "seed": 5, **options}
    ours, theirs = _strided_params(dtype, DEVICE), _strided_params(dtype, torch.device("cpu"))
    opt_ours, opt_theirs = cls(ours, backend="triton", **settings), cls(theirs, backend="cpu", **settings)
    g = torch.Generator().manual_seed(14)
    for _ in range(STEPS):
        for p, q in zip(ours, theirs):
            grad = torch.randn(q.shape, generator=g, dtype=torch.float64).to(dtype)
            if q.dim() == 1:  # a gradient laid out otherwise than its param
                grad = torch.stack([grad, grad], dim=1)[:, 0]
            p.grad, q.grad = grad.to(DEVICE), grad.clone()
        opt_ours.step()
        opt_theirs.step()
        difference = _first_difference(_stored(opt_ours, ours), _stored(opt_theirs, theirs))
        assert difference is None, difference
