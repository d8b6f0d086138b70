"""ScheduleFreeAdamW (Defazio et al., 2024): bit for bit the ``schedulefree`` package's
``AdamWScheduleFree`` on its two paths, the NumPy reference's three sequences in float64,
checkpoints both ways, lean storage of v (z is a weight: never quantized), train/eval
modes, and what it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import adamkit
from adamkit import reference
from adamkit.algorithms import SCHEDULE_FREE_ADAMW, lookup
from adamkit.kernels import KERNELS

schedulefree = pytest.importorskip("schedulefree")

#: the per-tensor paths, which do the package's arithmetic op by op (its bits)
BACKENDS = ("single_tensor", "foreach")
#: and the fused CPU kernel, one pass per element (held to the package within fp32 rounding)
ALL_BACKENDS = BACKENDS + (("cpu",) if KERNELS["cpu"].available() else ())
SETTINGS = {
    "defaults": {},
    "decay-warmup-r": {"weight_decay": 0.1, "warmup_steps": 5, "r": 0.5},
    "no-lr-weighting": {"weight_lr_power": 0.0, "betas": (0.95, 0.99)},
    # as the package takes a warm-up (a fraction of the steps; a NumPy count)
    "fractional-warmup": {"warmup_steps": 4.5},
    "numpy-warmup": {"warmup_steps": np.int64(5), "weight_decay": 0.1},
}


def _params(seed: int = 0, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (7,), (), (0, 3)]
    return [torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for shape in shapes]


def _groups(params: list[torch.Tensor]) -> list[dict]:
    """Two groups of different learning rates, fresh leaves of ``params``' values."""
    leaves = [p.clone().requires_grad_() for p in params]
    return [{"params": leaves[:2], "lr": 1e-2}, {"params": leaves[2:], "lr": 3e-3}]


def _gradients(params: list[torch.Tensor], steps: int, seed: int = 1, skip_first_every: int | None = None):
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        yield [
            None
            if (i == 0 and skip_first_every and step % skip_first_every == skip_first_every - 1)
            else torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)
            for i, p in enumerate(params)
        ]


def _train(optimizer, groups: list[dict], gradients) -> None:
    params = [p for g in groups for p in g["params"]]
    for grads in gradients:
        for p, grad in zip(params, grads):
            p.grad = None if grad is None else grad.clone()
        optimizer.step()


def _equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.equal(a, b)


def _within_float32_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    if b.numel():  # (an empty param has nothing to compare)
        assert (a - b).abs().max().item() <= 1e-6 * b.abs().max().item()


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_the_schedulefree_package(backend, setting):
    """The per-tensor paths do its arithmetic in its order, bit for bit, on the path of
    the same kind (``foreach`` against its foreach path); the fused CPU kernel computes
    each element in one pass (the lerp as torch's scalar loop forms it, where torch's
    vectorized lerp fuses a multiply-add), within 1e-6 of the values of its foreach path.
    Params (train and eval points), z, v and the group's running values, through
    eval/train switches and a param that misses every third gradient."""
    options, start = SETTINGS[setting], _params()
    ours_groups, theirs_groups = _groups(start), _groups(start)
    ours = adamkit.ScheduleFreeAdamW(ours_groups, backend=backend, **options)
    theirs = schedulefree.AdamWScheduleFree(theirs_groups, foreach=backend != "single_tensor", **options)
    agree = _equal if backend in BACKENDS else _within_float32_rounding
    ours.train(), theirs.train()
    for phase in range(3):
        grads = list(_gradients(start, 15, seed=phase + 1, skip_first_every=3))
        _train(ours, ours_groups, grads)
        _train(theirs, theirs_groups, grads)
        ours.eval(), theirs.eval()
        for a, b in zip(ours.param_groups, theirs.param_groups):
            for p, q in zip(a["params"], b["params"]):
                agree(p.detach(), q.detach())
                agree(ours.state[p]["z"], theirs.state[q]["z"])
                agree(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"])
            assert {k: a[k] for k in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")} == {
                k: b[k] for k in ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")
            }
        ours.train(), theirs.train()


def test_positional_arguments_are_the_package_s_foreach_included():
    """A call written for the package, ``foreach`` as its ninth positional argument,
    builds the same optimizer here, on the package's path of that kind (its bits)."""
    start = _params()
    ours_groups, theirs_groups = _groups(start), _groups(start)
    arguments = (0.0025, (0.9, 0.999), 1e-8, 0.1, 4, 0.5, 2.0, False)
    ours = adamkit.ScheduleFreeAdamW(ours_groups, *arguments)
    theirs = schedulefree.AdamWScheduleFree(theirs_groups, *arguments)
    assert ours.param_groups[0]["foreach"] is False and ours.param_groups[0]["r"] == 0.5
    ours.train(), theirs.train()
    grads = list(_gradients(start, 8))
    _train(ours, ours_groups, grads)
    _train(theirs, theirs_groups, grads)
    for a, b in zip(ours_groups, theirs_groups):
        for p, q in zip(a["params"], b["params"]):
            _equal(p.detach(), q.detach())


def test_a_group_without_gradients_moves_its_clock_as_the_package_does():
    """In the package every group's step count and weight sum move at every ``step()``,
    whether or not its params have gradients; so here, and the params stay equal when
    gradients return to a group that had none."""
    start = _params()
    ours_groups, theirs_groups = _groups(start), _groups(start)
    ours = adamkit.ScheduleFreeAdamW(ours_groups, warmup_steps=4, backend="foreach")
    theirs = schedulefree.AdamWScheduleFree(theirs_groups, warmup_steps=4)
    theirs.train()
    for step, grads in enumerate(_gradients(start, 12)):
        if step % 4 in (1, 2):  # group 1 (params 2, 3) without gradients
            grads = grads[:2] + [None, None]
        _train(ours, ours_groups, [grads])
        _train(theirs, theirs_groups, [grads])
    assert [g["k"] for g in ours.param_groups] == [g["k"] for g in theirs.param_groups] == [12, 12]
    for a, b in zip(ours.param_groups, theirs.param_groups):
        assert a["weight_sum"] == b["weight_sum"]
        for p, q in zip(a["params"], b["params"]):
            assert torch.equal(p, q)


def test_a_step_skip_nonfinite_skips_does_not_move_the_clock():
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = adamkit.ScheduleFreeAdamW([p], skip_nonfinite=True)
    p.grad = torch.randn(4)
    optimizer.step()
    group = optimizer.param_groups[0]
    clock = {k: group[k] for k in ("k", "weight_sum", "lr_max", "scheduled_lr")}
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, float("inf"), 0.0, 1.0])
    optimizer.step()
    assert {k: group[k] for k in clock} == clock and torch.equal(p, before) and optimizer.skipped_steps == 1


def test_a_grad_scaler_s_skipped_step_does_not_move_the_clock():
    """A fused kernel skips a GradScaler's inf step in the kernel; the group's running
    values once moved all the same, so the next step differed from foreach's (whose
    step the scaler never calls)."""
    runs = []
    for backend in ("cpu", "foreach"):
        p = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(0)))
        optimizer = adamkit.ScheduleFreeAdamW([p], lr=0.01, backend=backend)
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        for bad in (False, True, False):
            scaler.scale((p * (math.inf if bad else 1.0)).sum() + (p * p).sum()).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        group = optimizer.param_groups[0]
        runs.append((group["k"], group["weight_sum"], optimizer.state[p]["step"].item(), p.detach()))
    (k, weight_sum, step, p), (k_foreach, weight_sum_foreach, step_foreach, q) = runs
    assert k == k_foreach == step == step_foreach == 2 and weight_sum == weight_sum_foreach
    torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_float64_follows_the_reference_sequences(backend, setting, maximize):
    """The reference keeps z and the average x explicitly (the paper's form; the kernels
    move y directly): in float64, y while training, x after ``eval()``, z and v agree to
    1e-12 of their size, with complex params viewed as pairs of reals."""
    options = dict(SETTINGS[setting])
    start = _params(dtype=torch.float64) + [torch.randn(3, 2, dtype=torch.complex128)]
    groups = _groups(start)
    optimizer = adamkit.ScheduleFreeAdamW(groups, backend=backend, maximize=maximize, **options)
    beta1, beta2 = options.pop("betas", (0.9, 0.999))
    references = []
    for group in groups:
        hp = reference.Hyperparameters(
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay_mode="decoupled", maximize=maximize, **options
        )
        references += [(hp, p.detach().numpy().copy(), reference.ReferenceState()) for p in group["params"]]
    grads = list(_gradients(start, 40))
    for step_grads in grads:
        for (hp, theta, state), grad in zip(references, step_grads):
            theta[...] = reference.schedule_free_adamw_step(theta, grad.numpy(), state, hp)
    _train(optimizer, groups, grads)

    def close(actual: torch.Tensor, expected: np.ndarray) -> None:
        actual = actual.detach().numpy()
        scale = max(np.max(np.abs(expected), initial=0.0), 1e-300)
        assert np.max(np.abs(actual - expected), initial=0.0) / scale <= 1e-12

    params = [p for g in groups for p in g["params"]]
    for p, (_, theta, state) in zip(params, references):
        close(p, theta)
        close(optimizer.state[p]["z"], reference.moments_as(state, theta)["z"])
        close(optimizer.state[p]["exp_avg_sq"], reference.moments_as(state, theta)["exp_avg_sq"])
    optimizer.eval()
    for p, (_, theta, state) in zip(params, references):
        close(p, reference.schedule_free_average(state, theta))


@pytest.mark.parametrize("warmup", [3, 0.05 * 150])
def test_checkpoints_load_both_ways_and_training_goes_on_bit_for_bit(warmup):
    """A state dict saved here loads into the package's optimizer and one saved there
    (in eval mode, as it advises; no ``step`` in its param states) loads here (on the
    foreach path, whose bits are the package's), a fractional warm-up included (the
    package takes ``0.05 * total_steps``; its checkpoint loaded here, then failed at the
    first step)."""
    start = _params()
    first = list(_gradients(start, 10, seed=1))
    then = list(_gradients(start, 10, seed=2))
    runs = {}
    for saver in ("adamkit", "schedulefree"):
        groups = _groups(start)
        make = {
            "adamkit": lambda g: adamkit.ScheduleFreeAdamW(g, weight_decay=0.1, warmup_steps=warmup, backend="foreach"),
            "schedulefree": lambda g: schedulefree.AdamWScheduleFree(g, weight_decay=0.1, warmup_steps=warmup),
        }
        optimizer = make[saver](groups)
        optimizer.train()
        _train(optimizer, groups, first)
        optimizer.eval()
        saved = optimizer.state_dict()
        loader = "schedulefree" if saver == "adamkit" else "adamkit"
        resumed_groups = [{**g, "params": [p.detach().clone().requires_grad_() for p in g["params"]]} for g in groups]
        resumed = make[loader](resumed_groups)
        resumed.load_state_dict(saved)
        if loader == "adamkit":  # each param's step is its group's k (it picks the random bits of lean storage)
            for group in resumed.param_groups:
                assert all(resumed.state[p]["step"].item() == group["k"] == 10 for p in group["params"])
        resumed.train()
        _train(resumed, resumed_groups, then)
        resumed.eval()
        runs[saver] = [p.detach().clone() for g in resumed_groups for p in g["params"]]
    reference_groups = _groups(start)
    straight = adamkit.ScheduleFreeAdamW(reference_groups, weight_decay=0.1, warmup_steps=warmup, backend="foreach")
    _train(straight, reference_groups, first + then)
    straight.eval()
    for name, params in runs.items():
        for p, q in zip(params, [p for g in reference_groups for p in g["params"]]):
            assert torch.equal(p, q), name


def _decaying(numel: int, steps: int, seed: int = 3):
    """Gradients whose size shrinks 100-fold over the run, as late in training."""
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        yield [torch.randn(numel, generator=g) * (1.0 - 0.99 * step / steps)]


LEAN_STEPS, LEAN_NUMEL = 1500, 2048


def _final_weights(cls, precision: str | None, grads) -> torch.Tensor:
    """The final weights (schedule-free: in eval mode) of a run with ``precision`` states."""
    groups = [{"params": [torch.zeros(LEAN_NUMEL).requires_grad_()]}]
    optimizer = cls(groups, lr=1e-3, seed=5, state_precision=precision)
    _train(optimizer, groups, grads)
    if cls is adamkit.ScheduleFreeAdamW:
        assert optimizer.state[groups[0]["params"][0]]["z"].dtype == torch.float32  # a weight: never quantized
        optimizer.eval()
    return groups[0]["params"][0].detach().clone()


@pytest.fixture(scope="module")
def decaying_run():
    """Gradients shrinking 100-fold over the run, and each class's fp32 result on them."""
    grads = list(_decaying(LEAN_NUMEL, LEAN_STEPS))
    return grads, {cls: _final_weights(cls, None, grads) for cls in (adamkit.ScheduleFreeAdamW, adamkit.AdamW)}


@pytest.mark.parametrize("precision", ["bf16", "int8", "int4"])
def test_lean_second_moments_cost_no_more_than_they_cost_adamw(precision, decaying_run):
    """``state_precision`` holds v only.  Over 1,500 steps of gradients shrinking 100-fold
    (no signal: the deviation is the per-step rounding noise summed), the final weights'
    deviation from the fp32 run, relative to the distance that run moved, is at most
    AdamW's with the same storage on the same gradients."""
    grads, fp32 = decaying_run
    deviation = {}
    for cls in fp32:
        deviation[cls] = float((_final_weights(cls, precision, grads) - fp32[cls]).norm() / fp32[cls].norm())
    assert deviation[adamkit.ScheduleFreeAdamW] <= deviation[adamkit.AdamW], deviation


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_bf16_z_is_stored_stochastically_and_keeps_moving(rounding):
    """bf16 params: z is a bf16 weight.  Its steps (lr 1e-4 times a normalized gradient,
    about 1e-4) are far below half a bf16 ulp of weights near 1 (2^-8), so rounding to
    nearest would freeze it; stored stochastically (whatever the param's ``rounding``),
    its mean follows the fp32 run's z."""
    assert torch.ones(1, dtype=torch.bfloat16).sub(1e-4).item() == 1.0  # to nearest: frozen
    start = torch.ones(8192)
    grads = [
        [torch.full((8192,), 1.0) * (1 + 0.1 * torch.randn(8192, generator=torch.Generator().manual_seed(s)))]
        for s in range(300)
    ]
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        groups = [{"params": [start.to(dtype).detach().clone().requires_grad_()]}]
        optimizer = adamkit.ScheduleFreeAdamW(groups, lr=1e-4, seed=9, rounding=rounding)
        _train(optimizer, groups, [[g[0].to(dtype)] for g in grads])
        assert optimizer.state[groups[0]["params"][0]]["z"].dtype == dtype
        finals[dtype] = optimizer.state[groups[0]["params"][0]]["z"].double()
    moved = (1.0 - finals[torch.float32]).mean()
    assert moved > 0.02  # z moved by 300 steps of about lr
    assert abs((1.0 - finals[torch.bfloat16]).mean() - moved) / moved < 0.02


@pytest.mark.parametrize("master", ["fp32", "24bit", "kahan"])
def test_bf16_params_with_an_exact_value_keep_z_in_fp32_and_follow_the_fp32_run(master):
    """bf16 params with a split master (``master_weights``) or a Kahan compensation:
    z is held in fp32, and train()/eval() move the exact value.  With the fp32 master and
    fp32 v the run is the fp32 run's, bit for bit, through eval/train switches; the 24-bit
    master and Kahan's bf16 pair (16 significant bits) stay within one spacing of such a
    significand per rounding of the fp32 run's values (a bf16 z would be 2^7 times off)."""
    start = _params()[:2]
    options = {"master_weights": master} if master != "kahan" else {"rounding": "kahan"}
    runs = {}
    for dtype, extra in ((torch.float32, {}), (torch.bfloat16, options)):
        groups = [{"params": [p.to(torch.bfloat16).to(dtype).requires_grad_() for p in start]}]
        optimizer = adamkit.ScheduleFreeAdamW(
            groups, lr=1e-2, weight_decay=0.1, state_precision="fp32", seed=3, **extra
        )
        exact = []
        for phase in range(3):
            grads = [[g.to(torch.bfloat16).to(dtype) for g in step] for step in _gradients(start, 10, seed=phase)]
            _train(optimizer, groups, grads)
            optimizer.eval()
            exact.append([_exact(p, optimizer.state[p]) for p in groups[0]["params"]])
            optimizer.train()
        for p in groups[0]["params"]:
            assert optimizer.state[p]["z"].dtype == torch.float32
        runs[dtype] = exact
    for ours, fp32 in zip(runs[torch.bfloat16], runs[torch.float32]):
        for a, b in zip(ours, fp32):
            if master == "fp32":
                assert torch.equal(a, b)
            else:  # each of 30 steps and 6 switches rounds within one spacing of a 16-bit significand
                assert ((a - b).abs() <= 36 * 2.0**-15 * b.abs()).all(), float(((a - b).abs() / b.abs()).max())


def _exact(param: torch.Tensor, state: dict) -> torch.Tensor:
    """A param's exact value: its split master, or its value plus its Kahan compensation."""
    from adamkit.specs.master import MASTER_KEY, join_tensors

    if MASTER_KEY in state:
        return join_tensors(param, state[MASTER_KEY])
    if "kahan_compensation" in state:
        return param.detach().float() + state["kahan_compensation"].float()
    return param.detach().float().clone()


def test_train_and_eval_move_the_params_between_y_and_x_and_step_refuses_eval_mode():
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = adamkit.ScheduleFreeAdamW([p], lr=0.1)
    assert optimizer.param_groups[0]["train_mode"]  # starts in train mode (the package: eval)
    before = p.detach().clone()
    optimizer.eval(), optimizer.train()  # no state yet: nothing moves
    assert torch.equal(p, before)
    for _ in range(3):
        p.grad = torch.randn(5)
        optimizer.step()
    y = p.detach().clone()
    optimizer.eval()
    x = p.detach().clone()
    optimizer.eval()  # twice: nothing more
    assert torch.equal(p, x) and not torch.equal(x, y)
    z = optimizer.state[p]["z"]
    torch.testing.assert_close(y, 0.1 * z + 0.9 * x, rtol=0, atol=1e-6)  # y = (1 - beta1) z + beta1 x
    p.grad = torch.randn(5)
    state = {k: v.clone() for k, v in optimizer.state[p].items()}
    with pytest.raises(RuntimeError, match=r"param_groups\[0\] in eval mode: call optimizer.train\(\)"):
        optimizer.step()
    assert torch.equal(p, x)
    assert all(torch.equal(v, optimizer.state[p][k]) for k, v in state.items())
    optimizer.train()
    torch.testing.assert_close(p.detach(), y, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cautious": True}, "cautious=True: ScheduleFreeAdamW does not run this option yet"),
        ({"accumulation_steps": 2}, "accumulation_steps=2: ScheduleFreeAdamW does not run this option yet"),
        ({"capturable": True}, "capturable=True: ScheduleFreeAdamW does not run it; leave it False"),
        ({"differentiable": True}, "differentiable=True: ScheduleFreeAdamW does not run it; leave it False"),
        ({"warmup_steps": -1}, r"Invalid warmup_steps value: -1 \(warmup_steps must be a finite number >= 0"),
        ({"warmup_steps": math.inf}, r"Invalid warmup_steps value: inf"),
        ({"warmup_steps": "5"}, r"Invalid warmup_steps value: '5'"),
        ({"r": float("nan")}, r"Invalid r value: nan \(r must be a finite float >= 0"),
        ({"weight_lr_power": -1.0}, r"Invalid weight_lr_power value: -1.0"),
    ],
)
def test_bad_arguments_are_refused_by_name(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adamkit.ScheduleFreeAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


@pytest.mark.parametrize("flag", ["capturable", "differentiable"])
def test_a_flag_it_does_not_run_is_refused_in_a_new_group_and_when_set_by_hand(flag):
    """Refused in the constructor, and so in ``add_param_group`` and at step time (both
    were accepted, and the step ran without the flag)."""
    p, q = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    optimizer = adamkit.ScheduleFreeAdamW([p])
    with pytest.raises(ValueError, match=rf"{flag}=True in param_groups\[1\]: ScheduleFreeAdamW does not run it"):
        optimizer.add_param_group({"params": [q], flag: True})
    assert len(optimizer.param_groups) == 1
    p.grad = torch.randn(4)
    optimizer.step()
    optimizer.param_groups[0][flag] = True
    before = p.detach().clone()
    with pytest.raises(ValueError, match=rf"{flag}=True in param_groups\[0\]"):
        optimizer.step()
    assert torch.equal(p, before)


def test_a_bad_group_value_at_step_time_changes_nothing():
    p = torch.nn.Parameter(torch.randn(4))
    optimizer = adamkit.ScheduleFreeAdamW([p])
    p.grad = torch.randn(4)
    optimizer.step()
    optimizer.param_groups[0]["warmup_steps"] = -3
    before, state = p.detach().clone(), {k: v.clone() for k, v in optimizer.state[p].items()}
    k = optimizer.param_groups[0]["k"]
    with pytest.raises(ValueError, match=r"Invalid warmup_steps value: -3 .* in param_groups\[0\]"):
        optimizer.step()
    assert torch.equal(p, before) and optimizer.param_groups[0]["k"] == k
    assert all(torch.equal(v, optimizer.state[p][key]) for key, v in state.items())


def test_gradient_release_is_refused_and_the_fused_kernels_run_it():
    model = torch.nn.Linear(3, 2)
    optimizer = adamkit.ScheduleFreeAdamW(model.parameters())
    with pytest.raises(TypeError, match="keeps running values per param group .*gradient release"):
        adamkit.gradient_release(model, optimizer)
    assert SCHEDULE_FREE_ADAMW.fused and lookup("schedule_free_adamw") is SCHEDULE_FREE_ADAMW
    assert all(kernel.runs("schedule_free_adamw") for kernel in KERNELS.values())


def test_eval_with_beta1_zero_is_refused():
    p = torch.nn.Parameter(torch.randn(3))
    optimizer = adamkit.ScheduleFreeAdamW([p], betas=(0.0, 0.999))
    p.grad = torch.randn(3)
    optimizer.step()
    with pytest.raises(ValueError, match=r"eval\(\) with betas\[0\] = 0 in param_groups\[0\]"):
        optimizer.eval()


@pytest.mark.parametrize("bad_beta1", [0.0, 1.0, "high"])
def test_eval_refused_by_a_later_group_moves_no_group(bad_beta1):
    """Every group that would move is checked before any moves: a refusal leaves each
    param at its training point and each group in train mode."""
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    optimizer = adamkit.ScheduleFreeAdamW([{"params": [a]}, {"params": [b]}], lr=0.1)
    a.grad, b.grad = torch.randn(3), torch.randn(3)
    optimizer.step()
    optimizer.param_groups[1]["betas"] = (bad_beta1, 0.999)
    before = [a.detach().clone(), b.detach().clone()]
    with pytest.raises(ValueError, match=r"betas\[0\] = \S+ in param_groups\[1\]"):
        optimizer.eval()
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert all(group["train_mode"] for group in optimizer.param_groups)
