"""adamkit under torch.distributed, 2 processes on CPU (gloo): FSDP2 (DTensor params,
every backend and state precision stepping each rank's shard), DDP and
ZeroRedundancyOptimizer each equal single-process training; distributed checkpoints
(``torch.distributed.checkpoint`` with get/set_state_dict) round-trip exactly, from 2
processes to 1 and from 1 to 2.

The ranks run ``distributed_worker.py``; the oracles run here, in one process.
Every rank trains on the same batch, so the gradients FSDP2 averages equal the
single-process gradients and the runs must agree to fp32 rounding.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adamkit
from adamkit.convert import full_precision_export
from adamkit.specs.master import MASTER_KEY, join_tensors
from adamkit.state import moment_value

pytest.importorskip("torch.distributed.fsdp")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

import distributed_worker as worker  # noqa: E402  (tests/ is on sys.path)

WORKER = Path(worker.__file__)
TOTAL = worker.STEPS_BEFORE_SAVE + worker.STEPS_AFTER_SAVE


def _run_ranks(phase: str, out: Path) -> dict:
    init_file = out / f"init-{phase}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, str(WORKER), phase, str(rank), "2", str(init_file), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
        )
        for rank in range(2)
    ]
    try:
        logs = [rank.communicate(timeout=300)[0].decode() for rank in ranks]
    finally:  # a rank that hangs (its peer died) must not outlive the test
        for rank in ranks:
            rank.kill()
    for rank, log in zip(ranks, logs):
        assert rank.returncode == 0, f"a rank failed (exit {rank.returncode}):\n{log[-4000:]}"
    return torch.load(out / f"{phase}.pt", weights_only=False)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def sharded(out) -> dict:
    return _run_ranks("train", out)


@pytest.fixture(scope="module")
def single(out) -> dict:
    """The oracle: each setting trained in one process (plain tensors), with a DCP
    checkpoint after the same step as the sharded runs."""
    import torch.distributed.checkpoint as dcp

    results = {}
    for setting, (_, _, dtype) in worker.SETTINGS.items():
        model = worker.build_model(dtype, worker.WIDTHS.get(setting, worker.WIDTH))
        optimizer = worker.build_optimizer(model.parameters(), setting, oracle=True)
        losses = worker.train(model, optimizer, range(worker.STEPS_BEFORE_SAVE), dtype)
        if setting in worker.CHECKPOINTED:  # quantized moments at fp32, as sharded ranks save them
            with full_precision_export(optimizer):
                dcp.save(worker._dcp_state(model, optimizer), checkpoint_id=str(out / f"dcp-single-{setting}"))
            plain = {"model": model.state_dict(), "optim": optimizer.state_dict()}
            torch.save(plain, out / f"plain-{setting}.pt")
        losses += worker.train(model, optimizer, range(worker.STEPS_BEFORE_SAVE, TOTAL), dtype)
        results[setting] = {"losses": losses, "params": worker.full_params(model), "state": _state(model, optimizer)}
    return results


def _state(model, optimizer) -> dict:
    """Each param's state by name, moments as values (dequantized if quantized)."""
    names = {p: name for name, p in model.named_parameters()}
    keys = (
        "exp_avg",
        "exp_avg_sq",
        "exp_inf",
        "max_exp_avg_sq",
        "kahan_compensation",
        "master_low_bits",
        "accumulated_grad",
    )
    scalars = ("mu_product",)  # NAdam's 0-d state tensor
    result = {}
    for p, state in optimizer.state.items():
        values = {key: moment_value(state, key, p) for key in keys}
        counters = {
            k: v for k, v in state.items() if not torch.is_tensor(v) or k in scalars
        }  # e.g. accumulation's count
        result[names[p]] = {
            "step": state["step"],
            **counters,
            **{k: v.clone() for k, v in values.items() if v is not None},
        }
    return result


def _moments(state: dict) -> dict:
    """Full-state entries as values: torch's keys (quantized ones are exported as fp32)."""
    return {
        name: {k: v for k, v in s.items() if not k.endswith(("_int8", "_int4", "_scales"))} for name, s in state.items()
    }


def _assert_close(actual: dict, expected: dict, exact: bool = False) -> None:
    """``master_low_bits`` (int16 patterns in bf16 tensors) are compared as bits when
    ``exact``, else through the master weights (:func:`_assert_masters_close`)."""
    assert actual.keys() == expected.keys()
    for name in expected:
        a, e = actual[name], expected[name]
        if isinstance(e, dict):
            _assert_close(a, e, exact)
        elif name == MASTER_KEY:
            if exact:
                bits = torch.int8 if a.dtype == torch.int8 else torch.int16
                assert torch.equal(a.view(bits), e.view(bits)), name
        elif exact:
            assert torch.equal(torch.as_tensor(a), torch.as_tensor(e)), name
        else:  # fp32 rounding: summation order may differ between a shard and the whole
            torch.testing.assert_close(torch.as_tensor(a).float(), torch.as_tensor(e).float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("setting", [s for s in worker.SETTINGS if s not in worker.NOT_EQUAL])
def test_fsdp2_training_equals_single_process(sharded, single, setting):
    ours, oracle = sharded[setting], single[setting]
    assert ours["losses"] == pytest.approx(oracle["losses"], rel=1e-6)
    _assert_close(ours["params"], oracle["params"])
    _assert_close(_moments(ours["state"]), oracle["state"])
    _assert_close(_masters(ours), _masters(oracle))


def _masters(run: dict) -> dict:
    """The split fp32 master weights of a run's bf16 params, by name (none without)."""
    return {
        name: join_tensors(run["params"][name], state[MASTER_KEY])
        for name, state in run["state"].items()
        if MASTER_KEY in state
    }


def test_unaligned_shards_are_quantized_shard_by_shard(sharded, single):
    """Shards that start mid-block: each rank's blocks start at its shard's first
    element, so no block straddles the boundary, and a block cut in two keeps two
    scales: the moments differ from one process's (whose blocks run across the
    boundary) by the quantization of the cut blocks only.  So the run stays within
    the format's noise of one process, without equalling it."""
    setting = "int8-unaligned"
    ours, whole = sharded[setting], single[setting]
    assert any(not torch.equal(ours["params"][name], whole["params"][name]) for name in whole["params"])
    assert ours["losses"] == pytest.approx(whole["losses"], rel=1e-2)
    for name, value in whole["params"].items():
        torch.testing.assert_close(ours["params"][name], value, rtol=0, atol=TOTAL * 1e-2 * 0.05)


def test_stochastic_rounding_draws_each_shards_bits_by_global_index(sharded):
    """One step from the same weights and gradients: each rank's shard draws the bits of
    its elements' indices in the whole param, so both round exactly as one process does."""
    setting = "bf16-stochastic-cpu"
    model = worker.build_model(torch.bfloat16)
    worker.train(model, worker.build_optimizer(model.parameters(), setting), range(1), torch.bfloat16)
    ours, oracle = sharded[setting]["first_params"], worker.full_params(model)
    for name in oracle:
        assert torch.equal(ours[name], oracle[name]), name


@pytest.mark.parametrize("setting", worker.CHECKPOINTED)
def test_dcp_round_trip_is_exact(sharded, setting):
    """Save with 2 processes, load into a fresh FSDP2 model and optimizer: the state
    is bit for bit what was saved and training continues exactly as without the break."""
    ours = sharded[setting]
    _assert_close(ours["loaded_state"], ours["saved_state"], exact=True)
    assert ours["resumed_losses"] == ours["losses"][worker.STEPS_BEFORE_SAVE :]
    _assert_close(ours["resumed_params"], ours["params"], exact=True)


@pytest.mark.parametrize("setting", worker.CHECKPOINTED)
def test_dcp_two_processes_to_one(sharded, out, setting):
    """A 2-process checkpoint loaded into one process (plain tensors, no process group)."""
    dtype = worker.SETTINGS[setting][2]
    model = worker.build_model(dtype)
    optimizer = worker.build_optimizer(model.parameters(), setting)
    with full_precision_export(optimizer):  # the sharded checkpoint's form of quantized moments
        worker._dcp_load(model, optimizer, out / f"dcp-{setting}")
    _assert_close(worker.full_params(model), sharded[setting]["saved_params"], exact=True)
    _assert_close(_state(model, optimizer), _moments(sharded[setting]["saved_state"]), exact=True)
    losses = worker.train(model, optimizer, range(worker.STEPS_BEFORE_SAVE, TOTAL), dtype)
    assert losses == pytest.approx(sharded[setting]["losses"][worker.STEPS_BEFORE_SAVE :], rel=1e-6)
    _assert_close(worker.full_params(model), sharded[setting]["params"])


def test_one_process_to_two(single, out):
    """Single-process checkpoints resumed by 2 FSDP2 ranks end where one process ends:
    a DCP checkpoint (``full_precision_export``), and plain ``torch.save`` state dicts
    of whole tensors loaded with ``optimizer.load_state_dict``."""
    resumed = _run_ranks("resume", out)
    for setting in worker.CHECKPOINTED:
        for run in (resumed[setting], resumed[f"plain-{setting}"]):
            assert run["losses"] == pytest.approx(single[setting]["losses"][worker.STEPS_BEFORE_SAVE :], rel=1e-6)
            _assert_close(run["params"], single[setting]["params"])


def test_skip_nonfinite_and_stats_agree_across_ranks(sharded):
    """A NaN in one rank's shard: every rank skips the step (a rank stepping alone
    would tear the model apart), and stats() adds the shards up: both as in one process."""
    model = worker.build_model()
    optimizer = adamkit.Adam(model.parameters(), lr=1e-2, **worker.FEATURES)

    def poison(grad) -> None:
        grad[worker.WIDTH // 2, 0] = float("nan")

    oracle = worker.train_with_a_nan(model, optimizer, poison)
    ours = sharded["features"]
    assert ours["skipped"] == oracle["skipped"] == 1
    _assert_close(ours["params"], oracle["params"])
    for key, value in oracle["stats"][0].items():
        assert ours["stats"][0][key] == pytest.approx(value, rel=1e-6), key  # grad norms are fp32


def test_gradient_release_warns_about_replicated_params_but_not_shards(sharded):
    """Given a DDP module's params (the module itself is refused), the hooks would step
    each rank's own gradient before the all-reduce: it cannot tell, so it warns; FSDP2's
    shards are reduced before their hooks, and nothing is said."""
    caught = sharded["release-warnings"]
    assert len(caught["ddp-params"]) == 1 and "process group of 2 ranks" in caught["ddp-params"][0]
    assert "DistributedDataParallel" in caught["ddp-params"][0]
    assert caught["fsdp2"] == []


@pytest.mark.parametrize("wrapper", ["fsdp2", "ddp"])
def test_each_rank_on_its_share_of_the_batch_equals_torch_optim(sharded, wrapper):
    """Data parallelism proper (each rank on half the rows): the averaged gradient is
    the whole batch's only up to fp32 summation order, so the oracle is torch.optim.AdamW
    in the same distributed run; adamkit's torch-exact path equals it bit for bit."""
    _assert_close(sharded[f"split-{wrapper}-adamkit"], sharded[f"split-{wrapper}-torch"], exact=True)


def _single_params(setting: str, **overrides) -> dict:
    """A setting's params after TOTAL steps in one process, with optimizer arguments overridden."""
    name, kwargs, dtype = worker.SETTINGS[setting]
    model = worker.build_model(dtype, worker.WIDTHS.get(setting, worker.WIDTH))
    optimizer = getattr(adamkit, name)(model.parameters(), lr=1e-2, **{**kwargs, **overrides})
    worker.train(model, optimizer, range(TOTAL), dtype)
    return worker.full_params(model)


@pytest.mark.parametrize("wrapper", ["ddp", "zero"])
@pytest.mark.parametrize("setting", ["fp32-cpu", "int8-cpu"])
def test_ddp_and_zero_equal_single_process(sharded, single, wrapper, setting):
    """(Under ZeRO each rank's optimizer holds only its partition of the params, so their
    indices, which key the random streams of stochastic rounding, are not one process's:
    int8 states round with other bits there.  The oracle for that run is the noise
    itself: it differs from the single process no more than a single process with
    another seed does, on average and at its largest difference.)"""
    if wrapper == "zero" and setting == "int8-cpu":
        reseeded = _single_params(setting, seed=1)
        for name, value in single[setting]["params"].items():
            ours, noise = (sharded[f"zero-{setting}"][name] - value).abs(), (reseeded[name] - value).abs()
            assert 0 < ours.mean() <= 1.25 * noise.mean() and ours.max() <= 1.5 * noise.max(), name
        return
    _assert_close(sharded[f"{wrapper}-{setting}"], single[setting]["params"])


def test_adamkit_is_what_ran(sharded):
    """The ranks' optimizers are adamkit's (not a silent fallback to torch.optim)."""
    assert adamkit.Adam is worker.adamkit.Adam
    assert set(sharded) >= set(worker.SETTINGS)
