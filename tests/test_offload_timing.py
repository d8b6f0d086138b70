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
from test_offload import FailingBackward, batches, model

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


def test_the_host_worker_drops_the_jobs_after_a_failed_one_and_raises_its_error_once():
    """As a failed ``step()`` stops there: the jobs queued behind the failed one never
    run, ``join()`` raises its error, and the worker then runs new jobs again."""
    worker = adamkit.offload.HostWorker()
    ran: list[int] = []

    def fails() -> None:
        time.sleep(0.05)  # (the next job is queued behind it)
        raise RuntimeError("a host step failed")

    worker.submit(fails)
    worker.submit(lambda: ran.append(1))
    with pytest.raises(RuntimeError, match="a host step failed"):
        worker.join()
    assert ran == []
    worker.submit(lambda: ran.append(2))
    worker.join()  # the error was raised once
    assert ran == [2]


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


@pytest.mark.parametrize("given", ["module", "params"])
def test_backwards_without_step_between_them_read_stepped_weights(slowed_worker, given):
    """Backwards without ``step()`` between them: each backward's end waits for its host
    steps (and with the module given, so does its forward), so the run is the resident
    one bit for bit, whichever was given."""
    resident = _two_backwards(None, given)
    offloaded = _two_backwards("cpu", given)
    assert all(torch.equal(a, b) for a, b in zip(resident, offloaded))


def _after_a_backward_that_raised(offload) -> list[torch.Tensor]:
    """A backward that raises after its last layer's params were released (submitted to
    the host, with offload); a second backward right away is refused by name; after
    ``zero_grad()`` two normal steps."""
    torch.manual_seed(0)
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload=offload)
    handle = adamkit.gradient_release(net.parameters(), opt)
    (x, y), (x2, y2) = list(batches(torch.float32, 2))
    with pytest.raises(RuntimeError, match="backward failed"):
        (net[4](FailingBackward.apply(net[:4](x))) - y).square().mean().backward()
    with pytest.raises(RuntimeError, match=r"params\[\d+\] of param_groups\[0\] got a second gradient.*zero_grad"):
        (net(x) - y).square().mean().backward()
    opt.zero_grad()
    for xs, ys in ((x, y), (x2, y2)):
        (net(xs) - ys).square().mean().backward()
        opt.step()
        opt.zero_grad()
    handle.remove()
    return [p.detach().clone() for p in net.parameters()]


def test_after_a_backward_that_raised_zero_grad_waits_and_the_run_goes_on(slowed_worker):
    """Given as params, nothing waited at the end of a backward that raised: a second
    gradient before ``zero_grad()`` is refused by name, and ``zero_grad()`` waits for the
    host steps its later layers had submitted, so the run goes on as the resident one."""
    resident = _after_a_backward_that_raised(None)
    offloaded = _after_a_backward_that_raised("cpu")
    assert all(torch.equal(a, b) for a, b in zip(resident, offloaded))


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


def _between_backward_and_step(release: str, edit) -> list[torch.Tensor]:
    """Three steps of the test model with ``edit(net, opt)`` between each backward and its
    step: ``release`` is "none" (plain offload; clipping by clip_grad_norm_ before step()),
    "resident" (resident release), "offload" or "clipped" (offloaded release, the latter
    with max_grad_norm)."""
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload=None if release == "resident" else "cpu")
    clip = release in ("none", "clipped") and edit is not _no_edit
    handle = None
    if release != "none":
        handle = adamkit.gradient_release(net.parameters(), opt, max_grad_norm=0.05 if release == "clipped" else None)
    for x, y in batches(torch.float32, 3):
        (net(x) - y).square().mean().backward()
        if release == "none" and clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        edit(net, opt)
        opt.step()
        opt.zero_grad()
    if handle is not None:
        handle.remove()
    return [p.detach().clone() for p in net.parameters()]


def _no_edit(net, opt) -> None:
    pass


def _clamp(net, opt) -> None:
    with torch.no_grad():
        for p in net.parameters():
            p.clamp_(-0.05, 0.05)


def _clamp_data(net, opt) -> None:
    for p in net.parameters():
        p.data.clamp_(-0.05, 0.05)  # (no version counter sees it)


def _evaluate(net, opt) -> None:
    """A forward between backward and step(), whose output moves the weights (so that a
    forward reading weights not yet back would show)."""
    with torch.no_grad():
        out = net(torch.ones(2, 12))
        for p in net.parameters():
            p.add_(out.mean() * 1e-3)


@pytest.mark.parametrize("edit", [_clamp, _clamp_data, _evaluate], ids=["clamp", "data-clamp", "forward"])
def test_weights_read_or_written_between_backward_and_step_are_the_stepped_ones(slowed_worker, edit):
    """Under release the weights are back when ``backward()`` returns (its end waits for
    the host steps), as without offload: an edit or a forward between backward and
    step() meets the stepped weights, however slow the worker (the copy back once
    overwrote the edit, or the forward read weights not yet back)."""
    resident = _between_backward_and_step("resident", edit)
    offloaded = _between_backward_and_step("offload", edit)
    assert all(torch.equal(a, b) for a, b in zip(resident, offloaded))


@pytest.mark.parametrize("edit", [_clamp, _clamp_data], ids=["clamp", "data-clamp"])
def test_held_clipped_steps_read_the_params_at_step(edit):
    """With max_grad_norm the host steps wait for step(), which reads each param as it is
    then, as plain offload with clip_grad_norm_ before step() does (a param read in its
    hook lost an edit made between backward and step())."""
    plain = _between_backward_and_step("none", edit)
    held = _between_backward_and_step("clipped", edit)
    assert all(torch.equal(a, b) for a, b in zip(plain, held))


def test_a_scheduler_s_lr_set_between_backward_and_step_reaches_the_held_steps():
    def lowered(net, opt) -> None:
        for group in opt.param_groups:
            group["lr"] *= 0.5

    plain = _between_backward_and_step("none", lowered)
    held = _between_backward_and_step("clipped", lowered)
    assert all(torch.equal(a, b) for a, b in zip(plain, held))


def test_a_state_loaded_between_a_clipped_backward_and_step_is_refused_by_name():
    """The held steps were planned for the state there was at the hooks: loading another
    (or replacing a state tensor) before step() is refused, the held steps dropped, the
    loaded state and the params untouched (they once stepped the replaced state)."""
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload="cpu")
    handle = adamkit.gradient_release(net, opt, max_grad_norm=0.05)
    data = list(batches(torch.float32, 3))
    for x, y in data[:2]:
        (net(x) - y).square().mean().backward()
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    (net(data[2][0]) - data[2][1]).square().mean().backward()
    opt.load_state_dict(saved)
    weights = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"params\[\d\] of param_groups\[0\].*its state was replaced.*dropped"):
        opt.step()
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    assert all(s["step"].item() == 2 for s in opt.state.values())
    (net(data[2][0]) - data[2][1]).square().mean().backward()  # (nothing is held: the loop goes on)
    opt.step()
    assert all(s["step"].item() == 3 for s in opt.state.values())
    handle.remove()


def test_column_blocks_of_one_matrix_are_not_taken_for_tied_weights():
    """Two params that are column blocks of one matrix interleave without sharing an
    element: released one by one, the hook's check compares their bytes (it compared
    their extents and refused them as tied weights)."""

    def run(release: bool) -> list[torch.Tensor]:
        matrix = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
        left, right = torch.nn.Parameter(matrix[:, :4]), torch.nn.Parameter(matrix[:, 4:])
        opt = adamkit.AdamW([left, right], lr=1e-2, offload="cpu")
        handle = adamkit.gradient_release([left, right], opt) if release else None
        x = torch.linspace(-1, 1, 4)
        for _ in range(3):
            ((left @ x).square().sum() + (right @ x).sin().sum()).backward()
            opt.step()
            opt.zero_grad()
        if handle is not None:
            handle.remove()
        return [left.detach().clone(), right.detach().clone()]

    assert all(torch.equal(a, b) for a, b in zip(run(False), run(True)))


def test_params_and_groups_let_go_of_are_not_kept_alive():
    """A param dropped from the optimizer takes its host buffers with it, and a group
    popped from ``param_groups`` its params (the step's caches held both)."""
    opt = adamkit.AdamW([torch.nn.Parameter(torch.randn(5))], offload="cpu")
    gone = []
    for _ in range(70):  # (past the caches' first sweep)
        p = torch.nn.Parameter(torch.randn(1000))
        opt.add_param_group({"params": [p]})
        p.grad = torch.ones_like(p)
        opt.step()
        opt.state.pop(p)
        opt.param_groups.pop()
        gone.append(weakref.ref(p))
        del p
    gc.collect()
    # the caches of dropped groups are let go of in sweeps, at most 2 x 2 live + 8 caches
    assert sum(ref() is not None for ref in gone) <= 10
    held = opt._stepper.offload._buffers.values()
    assert all(param() is not None for param, _ in held)  # the host buffers went with their params


def test_a_layer_shared_by_reentrant_checkpoints_is_not_stepped_twice():
    """Its hook fires in each segment's inner backward with part of its gradient; the
    first inner backward's end (inside the whole one) does not close its pending host
    step, so the second partial gradient is refused by name (it was once stepped twice)."""
    shared = torch.nn.Linear(8, 8)
    opt = adamkit.AdamW(shared.parameters(), lr=1e-2, offload="cpu")
    handle = adamkit.gradient_release(shared.parameters(), opt)
    x = torch.randn(4, 8, requires_grad=True)
    y = torch.utils.checkpoint.checkpoint(shared, x, use_reentrant=True)
    z = torch.utils.checkpoint.checkpoint(shared, torch.tanh(y), use_reentrant=True)
    with pytest.raises(RuntimeError, match=r"params\[\d\] of param_groups\[0\] got a second gradient"):
        z.square().sum().backward()
    opt.zero_grad()
    handle.remove()


def test_the_clipping_norm_reads_host_gradients_only_once_their_copies_are_in(monkeypatch):
    """The held steps' gradients are copied to the host on a side stream (on CUDA): the
    norm waits for every copy first (it once read the buffers before any wait)."""
    arrived, pull = set(), adamkit.offload.Offload.pull

    def noted_pull(self, params, grads, hosts, *, wait=True):
        waiter = pull(self, params, grads, hosts, wait=wait)
        if grads is None:
            return waiter

        def wait_for_them() -> None:
            waiter()
            arrived.update(id(h.grad) for h in hosts)

        return wait_for_them

    def checked_norm(grads, *args, **kwargs):
        assert all(id(g) in arrived for g in grads), "the norm read a gradient whose copy was not waited for"
        return get_total_norm(grads, *args, **kwargs)

    get_total_norm = torch.nn.utils.get_total_norm
    monkeypatch.setattr(adamkit.offload.Offload, "pull", noted_pull)
    monkeypatch.setattr(torch.nn.utils, "get_total_norm", checked_norm)
    net = model(torch.float32)
    opt = adamkit.AdamW(net.parameters(), lr=1e-2, offload="cpu")
    handle = adamkit.gradient_release(net, opt, max_grad_norm=0.05)
    x, y = next(batches(torch.float32, 1))
    (net(x) - y).square().mean().backward()
    opt.step()
    assert handle.last_grad_norm is not None
    handle.remove()
