"""state_dict: torch's structure and keys, checkpoints moving both ways with
bit-identical continuations, extra keys defaulting, torch.save round trips."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from matrix import FAMILY, OPTIMIZERS, OPTION_SAMPLES, Case, clone_groups, make_params, option_cases, run
from test_torch_parity import assert_same_state

import adamkit
from adamkit.diagnostics import SKIPPED_STEPS_KEY
from adamkit.options import OPTIONS

CASES = [
    Case(optimizer="Adam", amsgrad=True, weight_decay="l2"),
    Case(optimizer="Adam", dtype=torch.float64, maximize=True, complex_params=True),
    Case(optimizer="AdamW", weight_decay="decoupled", tensor_lr=True),
    Case(optimizer="AdaMax", weight_decay="l2"),
]


def constructed(case: Case, source: str):
    """(optimizer, groups) built by torch.optim or adamkit for ``case``."""
    ours_cls, torch_cls, _ = OPTIMIZERS[case.optimizer]
    groups = make_params(case)
    if source == "torch":
        return torch_cls(groups, foreach=False, **case.torch_kwargs()), groups
    return ours_cls(groups, **case.adamkit_kwargs()), groups


def strip_extras(group: dict, optimizer_cls) -> dict:
    return {k: v for k, v in group.items() if k not in optimizer_cls.extra_group_keys}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_same_structure_as_torch(case):
    ours, our_groups = constructed(case, "adamkit")
    theirs, torch_groups = constructed(case, "torch")
    run(ours, our_groups, 3)
    run(theirs, torch_groups, 3)
    sd_ours, sd_torch = ours.state_dict(), theirs.state_dict()
    assert sd_ours.keys() == sd_torch.keys()
    assert sd_ours["state"].keys() == sd_torch["state"].keys()
    for index, torch_state in sd_torch["state"].items():
        our_state = sd_ours["state"][index]
        assert our_state.keys() == torch_state.keys()
        step = our_state["step"]
        assert step.dim() == 0 and step.dtype == torch.float32 and step.device.type == "cpu"
        for key, value in torch_state.items():
            assert our_state[key].dtype == value.dtype and our_state[key].shape == value.shape
    for ours_group, torch_group in zip(sd_ours["param_groups"], sd_torch["param_groups"]):
        assert set(torch_group) <= set(ours_group)
        saved_only = {SKIPPED_STEPS_KEY}  # (a count, not an option: see adamkit.diagnostics)
        assert set(ours_group) - set(torch_group) <= set(type(ours).extra_group_keys) | saved_only


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("direction", ["torch->adamkit", "adamkit->torch"])
def test_checkpoint_moves_and_continues_bit_identically(case, direction):
    """Run 7 steps in one library, load its state_dict into the other, continue 13 steps;
    compare with the source library's own continuation."""
    source, target = direction.split("->")
    first, groups = constructed(case, source)
    run(first, groups, 7, seed=3)

    continued_groups = clone_groups(groups)
    ours_cls, torch_cls, _ = OPTIMIZERS[case.optimizer]
    if target == "torch":
        second = torch_cls(continued_groups, foreach=False, **case.torch_kwargs())
    else:
        second = ours_cls(continued_groups, **case.adamkit_kwargs())
    state_dict = copy.deepcopy(first.state_dict())  # a checkpoint, not live tensors
    if target == "torch":
        state_dict = {**state_dict, "param_groups": [strip_extras(g, type(first)) for g in state_dict["param_groups"]]}
    second.load_state_dict(state_dict)

    run(first, groups, 13, seed=4)
    run(second, continued_groups, 13, seed=4)
    assert_same_state(second, continued_groups, first, groups)


def test_torch_state_dict_keeps_constructor_extras():
    """Loading a torch.optim checkpoint keeps this optimizer's adamkit-only settings."""
    params = [torch.nn.Parameter(torch.randn(3))]
    theirs = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    ours = adamkit.AdamW(params, lr=0.1, decouple_lr=True, max_lr=2.0, backend="foreach")
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["lr"] == 0.5
    assert (group["decouple_lr"], group["max_lr"], group["backend"]) == (True, 2.0, "foreach")


def test_extra_keys_default_when_absent():
    """A state dict lacking adamkit's keys, loaded via __setstate__, gets defaults."""
    opt = adamkit.Adam([torch.nn.Parameter(torch.randn(2))], lr=0.3)
    state = opt.__getstate__()
    for group in state["param_groups"]:
        for key in adamkit.Adam.extra_group_keys:
            group.pop(key)
    opt.__setstate__(state)
    assert opt.param_groups[0]["backend"] is None
    assert opt.param_groups[0]["decouple_lr"] is False
    assert opt.param_groups[0]["max_lr"] == 0.3


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_torch_save_and_weights_only_load_round_trip(case):
    ours, groups = constructed(case, "adamkit")
    run(ours, groups, 5)
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    continued = clone_groups(groups)
    other = type(ours)(continued, **case.adamkit_kwargs())
    other.load_state_dict(loaded)
    run(ours, groups, 5, seed=9)
    run(other, continued, 5, seed=9)
    assert_same_state(other, continued, ours, groups)


def test_a_torch_optim_dcp_checkpoint_loads_with_a_partial_load_planner(tmp_path):
    """docs/distributed.md's recipe, on one process: DCP's default planner refuses the
    checkpoint (adamkit's groups hold options torch's lack); with ``allow_partial_load``
    the options keep this optimizer's values.  Oracle: a plain ``load_state_dict`` of
    torch's state dict, then three more steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def trained(make, steps, seed):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        opt = make(model.parameters())
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.randn(5, 4, generator=generator)).square().sum().backward()
            opt.step()
        return model, opt

    model, theirs = trained(lambda p: torch.optim.AdamW(p, lr=1e-2), 3, 0)
    model_state, optim_state = get_state_dict(model, theirs)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(tmp_path))

    def ours(params):
        return adamkit.AdamW(params, lr=0.5, backend="single_tensor", decouple_lr=True, max_lr=2.0)

    loaded_model, loaded = trained(ours, 0, 0)
    model_state, optim_state = get_state_dict(loaded_model, loaded)
    state = {"model": model_state, "optim": optim_state}
    with pytest.raises(BaseException, match="Missing key in checkpoint state_dict"):  # (a CheckpointException)
        dcp.load(copy.deepcopy(state), checkpoint_id=str(tmp_path))
    dcp.load(state, checkpoint_id=str(tmp_path), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(loaded_model, loaded, model_state_dict=state["model"], optim_state_dict=state["optim"])
    group = loaded.param_groups[0]
    assert (group["lr"], group["decouple_lr"], group["max_lr"], group["backend"]) == (1e-2, True, 2.0, "single_tensor")

    oracle_model, oracle = trained(ours, 0, 0)
    oracle_model.load_state_dict(model.state_dict())
    oracle.load_state_dict(theirs.state_dict())
    for opt, net in ((loaded, loaded_model), (oracle, oracle_model)):
        generator = torch.Generator().manual_seed(1)
        for _ in range(3):
            opt.zero_grad()
            net(torch.randn(5, 4, generator=generator)).square().sum().backward()
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(loaded_model.parameters(), oracle_model.parameters()))


def test_legacy_float_step_becomes_tensor():
    p = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.Adam([p])
    p.grad = torch.ones(3)
    opt.step()
    state_dict = opt.state_dict()
    state_dict["state"][0]["step"] = 1.0  # checkpoints from torch < 1.12
    fresh = adamkit.Adam([p])
    fresh.load_state_dict(state_dict)
    step = fresh.state[p]["step"]
    assert torch.is_tensor(step) and step.item() == 1.0 and step.dtype == torch.float32


@pytest.mark.parametrize("saved_step", ["int64", "int"])
@pytest.mark.parametrize("backend", ["single_tensor", "foreach"])
def test_a_count_beyond_float32_keeps_counting(saved_step, backend):
    """A checkpoint whose ``step`` float32 cannot hold (an int64 tensor, or a number as
    torch < 1.12 saved it, past 2^24) is loaded in float64, not rounded: 2^24 + 1 became
    2^24 and stopped counting, and the bias corrections and updates followed.  The
    oracle is torch loading the int64 tensor, which it keeps and counts on (torch
    itself rounds a saved number to float32 and stops at 2^24)."""
    count = 2**24 + 1
    ours, theirs = (torch.nn.Parameter(torch.tensor([1.0, 2.0, -3.0])) for _ in range(2))
    opt_ours = adamkit.Adam([ours], lr=1e-3, betas=(0.9, 1 - 1e-9), backend=backend)
    opt_torch = torch.optim.Adam([theirs], lr=1e-3, betas=(0.9, 1 - 1e-9), foreach=False)
    for opt, p, saved_count in (
        (opt_ours, ours, torch.tensor(count) if saved_step == "int64" else count),
        (opt_torch, theirs, torch.tensor(count)),
    ):
        p.grad = torch.ones(3)
        opt.step()
        saved = opt.state_dict()
        saved["state"][0]["step"] = saved_count
        opt.load_state_dict(saved)
    for i in range(3):
        ours.grad = torch.tensor([0.5, -1.0, 2.0]) * (i + 1)
        theirs.grad = ours.grad.clone()
        opt_ours.step()
        opt_torch.step()
    assert opt_ours.state[ours]["step"].item() == count + 3 == opt_torch.state[theirs]["step"].item()
    assert torch.equal(ours, theirs)


def test_a_legacy_mu_product_is_rounded_as_torch_rounds_it():
    """NAdam's ``mu_product`` saved as a Python float (torch < 1.12) is a product of
    factors below 1, not a count: it is loaded in torch's dtype, rounded as torch rounds
    it, and training goes on bit for bit (only ``step`` keeps a value float32 cannot
    hold in float64)."""
    start = torch.randn(5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def resumed(cls, **options):
        p = torch.nn.Parameter(start.clone())
        opt = cls([p], lr=1e-2, **options)
        for i in range(3):
            p.grad = torch.sin(torch.arange(5.0, dtype=torch.float64) + i)
            opt.step()
        saved = opt.state_dict()
        saved["state"][0]["step"] = 3.0
        saved["state"][0]["mu_product"] = math.prod(0.9 * (1.0 - 0.5 * 0.96 ** (t * 0.004)) for t in range(1, 4))
        q = torch.nn.Parameter(p.detach().clone())
        resumed = cls([q], lr=1e-2, **options)
        resumed.load_state_dict(saved)
        for i in range(3, 6):
            q.grad = torch.sin(torch.arange(5.0, dtype=torch.float64) + i)
            resumed.step()
        return q.detach(), resumed.state[q]["mu_product"]

    (ours, our_mu), (theirs, their_mu) = (
        resumed(adamkit.NAdam, backend="single_tensor"),
        resumed(torch.optim.NAdam, foreach=False),
    )
    assert our_mu.dtype == their_mu.dtype and torch.equal(our_mu, their_mu)
    assert torch.equal(ours, theirs)


# ---------------------------------------------------------------------------- every option


def test_every_option_has_samples():
    assert set(OPTION_SAMPLES) == {option.name for option in OPTIONS}


def _option_run(row: str, settings: dict, dtype: torch.dtype, steps: range, params=None, saved=None):
    """``steps`` of the row's class with ``settings`` on three params (from ``params``
    and ``saved`` where given; under ``skip_nonfinite`` a NaN gradient on step 4).
    Returns (params, optimizer)."""
    cls = FAMILY[row][0]
    if params is None:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in ((40,), (6, 9), ())]
    optimizer = cls(params, lr=1e-2, **{"seed": 3, **settings})  # (the same random bits in every run)
    if saved is not None:
        optimizer.load_state_dict(saved)
    for step in steps:
        g = torch.Generator().manual_seed(100 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        if step == 4 and settings.get("skip_nonfinite"):
            params[0].grad[3] = torch.nan
        optimizer.step()
    return params, optimizer


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The stored bytes (so that -0.0 and 0.0, or two NaNs, are told apart)."""
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("row, settings, dtype", option_cases())
def test_every_option_resumes_from_a_checkpoint_bit_for_bit(row, settings, dtype):
    """Every class with every option's sample values: stopped after three steps, saved
    through torch.save, loaded into a fresh optimizer over copies of the params, and
    stepped on, it ends where the uninterrupted run does, bit for bit (params and every
    state tensor)."""
    whole, uninterrupted = _option_run(row, settings, dtype, range(7))
    first, stopped = _option_run(row, settings, dtype, range(3))
    buffer = io.BytesIO()
    torch.save(stopped.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in first]
    resumed_params, resumed = _option_run(
        row, settings, dtype, range(3, 7), copies, torch.load(buffer, weights_only=True)
    )
    for p, q in zip(whole, resumed_params):
        assert torch.equal(_bits(p.detach()), _bits(q.detach()))
    ours, theirs = uninterrupted.state_dict()["state"], resumed.state_dict()["state"]
    assert ours.keys() == theirs.keys()
    for index in ours:
        assert ours[index].keys() == theirs[index].keys()
        for key, value in ours[index].items():
            other = theirs[index][key]
            if isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and torch.equal(_bits(value), _bits(other)), key
            else:
                assert value == other, key
