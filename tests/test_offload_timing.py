"""Offload under gradient release, used the ways a training loop really uses it, with
the host worker slowed on purpose: nothing may depend on how it keeps pace, and an
optimizer that is dropped takes no thread or host memory with it (issue 36; the cases a
review of the worker found)."""

from __future__ import annotations

import copy
import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
from matrix import DEVICE
from test_offload import batches, model

import adamkit


@pytest.fixture
def slowed_worker(monkeypatch):
    """Every host step sleeps first, so a loop that does not wait for it reads old values."""
    run_pulled = adamkit.stepping.Stepper.run_pulled

    def slowed(self, plan, amp, span=None):
        if threading.current_thread() is not threading.main_thread():
            time.sleep(0.02)
        run_pulled(self, plan, amp, span)

    monkeypatch.setattr(adamkit.stepping.Stepper, "run_pulled", slowed)


def _offload_threads() -> int:
    return sum(t.name == "adamkit-offload" for t in threading.enumerate())


def test_a_dropped_optimizer_takes_no_thread_or_host_memory_with_it():
    """The worker's thread ends when its queue does, holding no job (a job's closure
    holds the optimizer, its host buffers and the device gradients)."""
    refs = []
    for _ in range(3):
        net = model(torch.float32)
        opt = adamkit.AdamW(net.parameters(), offload="cpu")
        handle = adamkit.gradient_release(net, opt)
        for x, y in batches(torch.float32, 2):
            (net(x) - y).square().mean().backward()
            opt.step()
        opt.load_state_dict(opt.state_dict())  # (a new stepper, with a worker of its own)
        (net(x) - y).square().mean().backward()
        opt.step()
        handle.remove()
        refs.append(weakref.ref(opt))
        del net, opt, handle
    gc.collect()
    assert [ref() for ref in refs] == [None] * 3
    assert _offload_threads() == 0


def _two_backwards(offload, params_or_module: str) -> list[torch.Tensor]:
    torch.manual_seed(0)
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload=offload)
    handle = adamkit.gradient_release(net if params_or_module == "module" else net.parameters(), opt)
    x, y = next(batches(torch.float32, 1))
    for _ in range(3):  # no step() between the backwards
        (net(x) - y).square().mean().backward()
    opt.step()
    handle.remove()
    return [p.detach().clone() for p in net.parameters()]


def test_the_module_s_forward_waits_for_the_host_steps(slowed_worker):
    """Backwards without ``step()`` between them: with the module given, its forward waits
    for the weights to come back, so the run is the resident one bit for bit."""
    resident = _two_backwards(None, "module")
    offloaded = _two_backwards("cpu", "module")
    assert all(torch.equal(a, b) for a, b in zip(resident, offloaded))


def test_a_second_gradient_before_the_host_step_was_waited_for_is_refused_by_name(slowed_worker):
    """Given as params, nothing can wait before the forward: the second gradient of a param
    whose host step was not waited for is refused (however fast the worker was)."""
    with pytest.raises(
        RuntimeError, match=r"params\[\d+\] of param_groups\[0\] got a second gradient.*optimizer\.step"
    ):
        _two_backwards("cpu", "params")


def test_tied_params_under_release_are_refused_by_name():
    """``b.data = a.data``: released one by one, the plan's tied-weights check never sees
    both, so the hook refuses the second (which copy came back last was up to the worker)."""
    a = torch.nn.Parameter(torch.randn(4))
    b = torch.nn.Parameter(torch.randn(4))
    b.data = a.data
    opt = adamkit.AdamW([a, b], offload="cpu")
    handle = adamkit.gradient_release([a, b], opt)
    with pytest.raises(ValueError, match=r"params\[\d\] of param_groups\[0\] shares memory with a param stepped"):
        (a * torch.arange(4.0)).sum().add((b * b).sum()).backward()
    handle.remove()


def _scaled_run(offload) -> tuple:
    """Two steps under a GradScaler, the first with an inf gradient in one param (the
    scaler skips that step and halves its scale)."""
    torch.manual_seed(0)
    w1, w2 = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    opt = adamkit.AdamW([w1, w2], lr=0.1, offload=offload)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    handle = adamkit.gradient_release([w1, w2], opt, scaler=scaler)
    x = torch.linspace(-1, 1, 8)
    for bad in (True, False):
        loss = (w1 * x * (1.0 if bad else 3.0)).sum() + (w2 * (float("inf") if bad else 1.0)).sum()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    handle.remove()
    assert opt.__dict__.get("_step_supports_amp_scaling") is None  # put back as it was
    return w1.detach().clone(), opt.state[w1]["exp_avg"].clone(), scaler.get_scale()


def test_a_grad_scaler_s_skipped_step_still_waits_for_the_host_steps(slowed_worker):
    """``scaler.step()`` skips ``optimizer.step()`` when it finds an inf, unless the
    optimizer declares its own scaling: under release it does, so the host steps are
    waited for before ``update()`` halves the scale they unscale by."""
    (w_a, m_a, scale_a), (w_b, m_b, scale_b) = _scaled_run(None), _scaled_run("cpu")
    assert scale_a == scale_b == 2.0**9
    assert torch.equal(w_a, w_b) and torch.equal(m_a, m_b)


def test_a_failed_backward_applies_nothing_of_its_clipped_step():
    """With ``max_grad_norm`` the host steps are held until ``step()``: a hook that raises
    drops them, so the backward done again is the only one applied."""

    def run(fail_once: bool) -> tuple:
        torch.manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
        opt = adamkit.AdamW([{"params": [a]}, {"params": [b]}], lr=0.1, offload="cpu")
        handle = adamkit.gradient_release([a, b], opt, max_grad_norm=1.0)
        if fail_once:
            opt.param_groups[0]["betas"] = (0.9, 1.5)
            with pytest.raises(ValueError, match="betas"):
                ((a * 2).sum() + (b * 3).sum()).backward()
            opt.param_groups[0]["betas"] = (0.9, 0.999)
            assert b.grad is None and a.grad is not None  # b's hook ran (held), a's raised
            a.grad = None  # (not zero_grad(), which would drop the held steps itself)
        ((a * 2).sum() + (b * 3).sum()).backward()
        opt.step()
        handle.remove()
        return a.detach().clone(), b.detach().clone(), opt.state[a]["step"].item(), handle.last_grad_norm

    (a1, b1, step1, norm1), (a2, b2, step2, norm2) = run(False), run(True)
    assert torch.equal(a1, a2) and torch.equal(b1, b2) and step1 == step2 == 1 and torch.equal(norm1, norm2)


def test_a_second_clipped_backward_before_step_is_refused_and_the_first_stays_held():
    """The refusal is not the new backward's failure: the earlier backward's held steps
    stay, and step() applies them (as without the second backward)."""

    def run(second_backward: bool) -> torch.Tensor:
        torch.manual_seed(0)
        a = torch.nn.Parameter(torch.randn(3))
        opt = adamkit.AdamW([a], lr=0.1, offload="cpu")
        handle = adamkit.gradient_release([a], opt, max_grad_norm=1.0)
        (a * 2).sum().backward()
        if second_backward:
            with pytest.raises(RuntimeError, match=r"params\[0\] of param_groups\[0\] got a second gradient"):
                (a * 5).sum().backward()
            a.grad = None
        opt.step()
        handle.remove()
        return a.detach().clone()

    assert torch.equal(run(True), run(False))


def test_zero_grad_drops_the_held_clipped_steps():
    a = torch.nn.Parameter(torch.randn(3))
    opt = adamkit.AdamW([a], lr=0.1, offload="cpu")
    handle = adamkit.gradient_release([a], opt, max_grad_norm=1.0)
    before = a.detach().clone()
    (a * 2).sum().backward()
    opt.zero_grad()
    opt.step()
    assert torch.equal(a.detach(), before) and handle.last_grad_norm is None
    (a * 2).sum().backward()  # (no second gradient refused: nothing is held)
    opt.step()
    assert not torch.equal(a.detach(), before)
    handle.remove()


@pytest.mark.parametrize("offload", [None, "cpu"])
def test_params_no_hook_released_are_stepped_by_step(offload):
    """A param frozen when the handle was attached and trained since (gradual unfreezing)
    has a gradient no hook released: ``step()`` steps it, as without release."""

    def run(release: bool) -> list[torch.Tensor]:
        net = model(torch.float32)
        net[0].weight.requires_grad_(False)
        opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload=offload)
        handle = adamkit.gradient_release(net, opt) if release else None
        net[0].weight.requires_grad_(True)
        for x, y in batches(torch.float32, 3):
            (net(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        return [p.detach().clone() for p in net.parameters()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_unreleased_params_with_a_scaler_are_refused_by_name_before_anything_moves():
    net = model(torch.float32)
    net[0].weight.requires_grad_(False)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload="cpu")
    scaler = torch.amp.GradScaler("cpu")
    handle = adamkit.gradient_release(net, opt, scaler=scaler)
    net[0].weight.requires_grad_(True)
    before = net[0].weight.detach().clone()
    x, y = next(batches(torch.float32, 1))
    scaler.scale((net(x) - y).square().mean()).backward()
    with pytest.raises(
        RuntimeError, match=r"params \[\(0, 0\)\] \(group, index\) have gradients that gradient_release"
    ):
        opt.step()
    assert torch.equal(net[0].weight.detach(), before) and net[0].weight not in opt.state
    handle.remove()


def test_a_param_listed_twice_is_released_once():
    """One hook per param (a second one found the gradient already freed)."""

    def run(listed: int) -> torch.Tensor:
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(5))
        opt = adamkit.AdamW([w], lr=0.1, offload="cpu")
        scaler = torch.amp.GradScaler("cpu")
        handle = adamkit.gradient_release([w] * listed, opt, scaler=scaler)
        for _ in range(2):
            scaler.scale((w * w).sum()).backward()
            scaler.step(opt)
            scaler.update()
        handle.remove()
        return w.detach().clone()

    assert torch.equal(run(1), run(2))


def test_a_copy_of_the_optimizer_waits_for_its_host_steps(slowed_worker):
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), offload="cpu")
    handle = adamkit.gradient_release(net, opt)
    x, y = next(batches(torch.float32, 1))
    (net(x) - y).square().mean().backward()
    copied = copy.deepcopy(opt)  # (host steps were still running)
    opt.step()
    assert all(copied.state[q]["step"] == 1 for q in copied.state)
    assert [s["exp_avg"].sum() for s in copied.state.values()] == [s["exp_avg"].sum() for s in opt.state.values()]
    handle.remove()


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the host kernel's threading layer")
def test_two_offloaded_optimizers_step_under_numba_s_workqueue_layer():
    """The workqueue layer (which adamkit's fork message suggests) aborts the process on
    concurrent parallel regions: two optimizers' host workers take turns in the kernel."""
    script = """
import torch, adamkit, numba
torch.manual_seed(0)
nets = [torch.nn.Sequential(*[torch.nn.Linear(256, 256) for _ in range(4)]) for _ in range(2)]
opts = [adamkit.AdamW(n.parameters(), offload="cpu") for n in nets]
handles = [adamkit.gradient_release(n, o) for n, o in zip(nets, opts)]
for _ in range(15):
    x = torch.randn(4, 256)
    (nets[0](x).sum() + nets[1](x).sum()).backward()
    for o in opts:
        o.step()
print(numba.threading_layer())
"""
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["workqueue"]
