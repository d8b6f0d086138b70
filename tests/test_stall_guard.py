"""The stall guard (adamkit.stalls): what it reads back from the state as lost is what
the step really rounded away.  The oracle is the optimizer itself: after a step, the
elements whose stored value did not change (though their exact change was not zero)."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

import adamkit
from adamkit.stalls import StallWarning, last_changes


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().view(torch.int16 if t.element_size() == 2 else torch.int32).clone()


def _off_threshold(changes, theta: torch.Tensor, holder: torch.Tensor) -> torch.Tensor:
    """Elements whose fate the read-back decides: the kernel computes the new weight in
    fp32, so a change within a few fp32 spacings of theta of the threshold (half the
    holder's spacing) may go either way; the guard's float64 reading cannot tell."""
    fp32_spacing = (torch.nextafter(theta.abs(), torch.tensor(float("inf"))) - theta.abs()).double()
    half = changes.margin.new_tensor(0.0) + _half_spacing_of(holder)
    return (changes.margin - 1).abs() > 4 * fp32_spacing / half + 0.01


def _half_spacing_of(holder: torch.Tensor) -> torch.Tensor:
    magnitude = holder.detach().abs()
    up = (magnitude.view(torch.int16).to(torch.int32) + 1).to(torch.int16).view(holder.dtype)
    return (up.double() - magnitude.double()) / 2


def _model(dtype: torch.dtype) -> torch.nn.Module:
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(64, 48).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype))
    return model


def _step_with(opt, model, g: torch.Generator, scale: float = 1.0) -> None:
    for p in model.parameters():
        p.grad = (scale * torch.randn(p.shape, generator=g, dtype=torch.float64)).to(p.dtype)
    opt.step()


@pytest.mark.parametrize("rounding", ["nearest", "kahan"])
@pytest.mark.parametrize("algorithm", [adamkit.AdamW, adamkit.AdaMax, adamkit.RAdam, adamkit.ADOPT])
def test_the_changes_read_back_as_lost_are_those_the_step_rounded_away(algorithm, rounding):
    model = _model(torch.bfloat16)
    # fp32 moments: the update the kernel made is the one read back from the state
    opt = algorithm(model.parameters(), lr=2e-3, weight_decay=0.01, rounding=rounding, state_precision="fp32")
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        _step_with(opt, model, g)

    def stored(p):  # what the step writes: the param, and under Kahan its compensation
        return (_bits(p), _bits(opt.state[p].get("kahan_compensation", p)))

    before = {p: stored(p) for p in model.parameters()}
    _step_with(opt, model, g)
    lost_somewhere = kept_somewhere = False
    for p in model.parameters():
        changes = last_changes(p, opt.state[p], opt.param_groups[0], opt.algorithm)
        after = stored(p)
        unchanged = (after[0] == before[p][0]) & (after[1] == before[p][1])
        theta = p.detach().float() + opt.state[p].get("kahan_compensation", torch.zeros_like(p)).float()
        clear = changes.moving & _off_threshold(changes, theta, opt.state[p].get("kahan_compensation", p))
        assert int(clear.sum()) > 0.5 * int(changes.moving.sum())
        assert torch.equal(changes.lost[clear], unchanged[clear])
        lost_somewhere |= bool(changes.lost.any())
        kept_somewhere |= bool((changes.moving & ~changes.lost).any())
    assert lost_somewhere and kept_somewhere  # the case tells the two apart


def test_bf16_weight_decay_at_fine_tuning_rates_is_lost_and_the_guard_names_the_param():
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    guard = adamkit.stall_guard(opt, every=10, names=model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    before = {p: _bits(p) for p in model.parameters()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(30):
            opt.step()
    stalls = [w for w in caught if issubclass(w.category, StallWarning)]
    assert len(stalls) == 2  # once per param, not once per check
    assert {w.filename for w in stalls} == {__file__}  # the user's step() (it once named torch's wrapper)
    assert {str(w.message).split(":")[0] for w in stalls} == {"weight", "bias"}
    assert all("weight decay alone" in str(w.message) and "100%" in str(w.message) for w in stalls)
    for p in model.parameters():  # the oracle: 30 decay steps left every bf16 weight as it was
        assert torch.equal(_bits(p), before[p])
    assert guard.check() == {"weight": 1.0, "bias": 1.0}
    guard.remove()


def test_a_stall_found_by_calling_check_points_at_that_call():
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    guard = adamkit.stall_guard(opt, every=10**6, names=model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        guard.check()
    assert [(w.filename, w.lineno) for w in caught if issubclass(w.category, StallWarning)] == [(__file__, line)] * 2


def test_a_share_equal_to_the_threshold_warns():
    """A param's share of lost change reaching the threshold warns ("reaches": 100 % of
    a step lost at threshold=1.0)."""
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    guard = adamkit.stall_guard(opt, every=1, threshold=1.0, names=model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert len([w for w in caught if issubclass(w.category, StallWarning)]) == 2
    guard.remove()


def test_kahan_loses_fine_tuning_decay_once_its_compensation_has_grown():
    """The compensation is 16 bits too: once it holds ~2^8 decay steps, the next one is
    below its half spacing (the 'weaker form' of the lost-decay bug)."""
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, rounding="kahan")
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    first = last_changes(model.weight, opt.state[model.weight], opt.param_groups[0], opt.algorithm)
    assert first.lost_share == 0.0  # a zero compensation takes any change
    for _ in range(600):
        opt.step()
    compensation = opt.state[model.weight]["kahan_compensation"]
    before = _bits(compensation), _bits(model.weight)
    opt.step()
    later = last_changes(model.weight, opt.state[model.weight], opt.param_groups[0], opt.algorithm)
    assert later.lost_share > 0.9
    unchanged = (_bits(compensation) == before[0]) & (_bits(model.weight) == before[1])
    clear = later.moving & _off_threshold(later, model.weight.detach().float() + compensation.float(), compensation)
    assert int(clear.sum()) > 0.5 * int(later.moving.sum())
    assert torch.equal(later.lost[clear], unchanged[clear])


@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.bfloat16, {"rounding": "stochastic"}),
        (torch.float32, {}),
        (torch.bfloat16, {"state_precision": "int8"}),
        (torch.bfloat16, {"master_weights": "fp32"}),
    ],
    ids=["bf16-stochastic", "fp32", "bf16-int8", "bf16-master"],
)
def test_no_warning_where_training_steps_are_kept(dtype, options):
    model = _model(dtype)
    opt = adamkit.AdamW(model.parameters(), lr=1e-1, **options)
    adamkit.stall_guard(opt, every=1)
    g = torch.Generator().manual_seed(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StallWarning)
        for _ in range(3):
            _step_with(opt, model, g)


def test_the_guard_checks_every_nth_step_and_stops_when_removed():
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1)
    guard = adamkit.stall_guard(opt, every=3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
        opt.step()
        assert not caught
        opt.step()
        names = sorted(str(w.message).split(":")[0] for w in caught)
    assert names == [
        "param 0 of group 0 (torch.bfloat16, shape (48, 64))",
        "param 1 of group 0 (torch.bfloat16, shape (48,))",
    ]
    guard.remove()
    guard.warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error", StallWarning)
        for _ in range(6):
            opt.step()


@pytest.mark.parametrize(
    "arguments, error, words",
    [
        ({"every": 0}, ValueError, "every must be a positive int, got 0"),
        ({"every": 2.5}, ValueError, "every must be a positive int, got 2.5"),
        ({"every": True}, ValueError, "every must be a positive int, got True"),
        ({"threshold": 0}, ValueError, "threshold must be a number in (0, 1], got 0"),
        ({"threshold": 1.5}, ValueError, "threshold must be a number in (0, 1], got 1.5"),
        ({"names": 42}, TypeError, "names must be a module or a mapping from param to name, got int"),
    ],
)
def test_bad_arguments_are_named(arguments, error, words):
    opt = adamkit.AdamW(_model(torch.float32).parameters())
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")):
        adamkit.stall_guard(opt, **arguments)
    assert not opt._optimizer_step_post_hooks  # nothing attached


@pytest.mark.parametrize("cls", [adamkit.NAdam, adamkit.StableAdamW])
def test_optimizers_whose_step_cannot_be_read_back_are_refused(cls):
    with pytest.raises(ValueError, match=f"{cls.__name__}'s step depended on that step's gradient"):
        adamkit.stall_guard(cls(_model(torch.float32).parameters()))


def test_a_torch_optimizer_is_refused():
    with pytest.raises(TypeError, match="optimizer must be an adamkit optimizer, got AdamW"):
        adamkit.stall_guard(torch.optim.AdamW(_model(torch.float32).parameters()))


def test_split_master_weights_keep_fine_tuning_decay():
    """Where bf16 loses every decay step (above), the split fp32 master keeps them."""
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-5, weight_decay=0.1, master_weights="fp32")
    guard = adamkit.stall_guard(opt, every=10)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StallWarning)
        for _ in range(30):
            opt.step()
    assert set(guard.check().values()) == {0.0}


def test_between_micro_batches_nothing_is_read_or_warned():
    """With accumulation_steps the weights are not written before an update's last
    micro-batch: the guard reads no step there (it once read 94 % lost)."""
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-2, accumulation_steps=2)
    guard = adamkit.stall_guard(opt, every=1)
    g = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", StallWarning)
        for _ in range(3):  # two updates' micro-batches and one more
            _step_with(opt, model, g)
    assert all(share == 0.0 for share in guard.check().values())
    guard.remove()


def test_the_reading_is_the_step_s_own_after_a_scheduler_moved_the_lr():
    """``check()`` after ``scheduler.step()`` (the usual loop order) reads the step with
    the lr it used, not the scheduler's next one (a 100x cut once read 86 % lost)."""
    model = _model(torch.bfloat16)
    opt = adamkit.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.01)
    guard = adamkit.stall_guard(opt, every=1000)
    _step_with(opt, model, torch.Generator().manual_seed(2))
    before = guard.check()
    scheduler.step()
    assert guard.check() == before
    guard.remove()
