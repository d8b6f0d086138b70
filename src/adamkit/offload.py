r"""Optimizer state in host memory (``offload="cpu"``): the device keeps only the params.

A group with ``offload="cpu"`` keeps every state tensor (moments, a master weight's low
bits, a Kahan compensation, accumulation buffers, the step counters) in host memory,
and is stepped there by a CPU kernel (the fused ``cpu`` kernel unless the group names
``"foreach"`` or ``"single_tensor"``).  Each step of such a group

1. *pulls*: copies each gradient and each param into the param's host buffers
   (:class:`HostBuffers`: pinned when the param is on CUDA, copied on a side stream
   after the work the current stream has queued);
2. steps the host copies with the group's state, as the kernel would step the params;
3. *pushes*: copies each param's new value back (the current stream waits for it),

bucket by bucket (:func:`buckets`): all pulls are queued at once, and each bucket is
stepped as soon as its copies are in, while the next ones are still on the way and the
previous ones go back.

The update is elementwise and the CPU kernel computes what the Triton kernel computes
bit for bit, so an offloaded run equals the device-resident run with the same options.
The param is read back at every step rather than trusted to be what the host last
wrote: in-place edits that torch does not count (``p.data.mul_(...)``,
``p.data = ...``) are seen.  That costs the param's bytes once more per step over the
bus (see ``docs/offload.md``).

With :func:`adamkit.gradient_release`, each param is pulled in its gradient's hook
(its device gradient is then freed) and stepped by :class:`HostWorker`, one thread
stepping params in the order their gradients arrived, while backward goes on; the
backward's end waits for it (a step held for clipping pulls its param at ``step()``).
Params are independent (their state and random bits are their own), so the result does
not depend on how the threads interleave.
"""

from __future__ import annotations

import collections
import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import statekeeping

#: where an offloaded group's state may live (``None``: with the params)
OFFLOADS = (None, "cpu")
HOST = torch.device("cpu")


@dataclass
class HostBuffers:
    """One param's copies in host memory: ``param`` (the kernel steps it) and ``grad``
    (the gradient it steps with); both contiguous, of the param's shape and dtype."""

    param: Tensor
    grad: Tensor

    @classmethod
    def for_param(cls, p: Tensor) -> HostBuffers:
        pinned = p.device.type == "cuda"
        made = [torch.empty(p.shape, dtype=p.dtype, device=HOST, pin_memory=pinned) for _ in range(2)]
        if statekeeping.allocator is not None and not pinned:  # the fuzzer's guard-paged memory
            made = list(map(statekeeping.allocator, made))
        return cls(*made)

    def fits(self, p: Tensor) -> bool:
        return self.param.dtype == p.dtype and self.param.shape == p.shape


class HostWorker:
    """Runs submitted jobs in order on one thread (see the module docstring).  The first
    error a job raises is raised again by :meth:`join`; jobs submitted after it are
    dropped, as a failed ``step()`` would have stopped there.

    The thread lives only while there is work: it ends once the queue is empty, holding
    no job (a finished job's closure holds the optimizer and its host buffers), and
    :meth:`submit` starts another when it is needed, so an optimizer that is dropped
    takes no thread with it."""

    def __init__(self) -> None:
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._draining = False  # a thread is running the queue
        self._pending = 0  # jobs submitted and not yet finished
        self._idle = threading.Condition()
        self._error: BaseException | None = None

    def submit(self, job: Callable[[], None]) -> None:
        with self._idle:
            self._jobs.append(job)
            self._pending += 1
            if self._draining:
                return
            self._draining = True
        try:
            threading.Thread(target=self._drain, name="adamkit-offload", daemon=True).start()
        except BaseException:  # no thread: the job was never taken, so nothing waits for it
            with self._idle:
                self._jobs.remove(job)
                self._pending -= 1
                self._draining = False
            raise

    def _drain(self) -> None:
        while True:
            with self._idle:
                if not self._jobs:
                    self._draining = False
                    return
                job = self._jobs.popleft()
            try:
                if self._error is None:
                    job()
            except BaseException as error:  # handed to join(), in the caller's thread
                self._error = error
            finally:
                job = None  # (not held while the thread waits for the lock)
                with self._idle:
                    self._pending -= 1
                    if not self._pending:
                        self._idle.notify_all()

    def join(self) -> None:
        """Wait until every submitted job has run; raise the first error one raised."""
        with self._idle:
            self._idle.wait_for(lambda: not self._pending)
        error, self._error = self._error, None
        if error is not None:
            raise error


class Offload:
    """One optimizer's host side: each param's :class:`HostBuffers`, the copy stream and
    the :class:`HostWorker`.  Bookkeeping, not state: made again when needed."""

    def __init__(self) -> None:
        self._buffers: dict[int, tuple[weakref.ref, HostBuffers]] = {}
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self.worker = HostWorker()

    def buffers(self, params: Sequence[Tensor]) -> list[HostBuffers]:
        """Each param's host buffers, allocated where missing or no longer fitting (and
        let go of when the param itself is)."""
        found = []
        for p in params:
            entry = self._buffers.get(id(p))
            if entry is None or entry[0]() is not p or not entry[1].fits(p):
                held = weakref.ref(p, functools.partial(_forget, self._buffers, id(p)))
                entry = self._buffers[id(p)] = (held, HostBuffers.for_param(p))
            found.append(entry[1])
        return found

    def pull(
        self,
        params: Sequence[Tensor] | None,
        grads: Sequence[Tensor] | None,
        hosts: Sequence[HostBuffers],
        *,
        wait: bool = True,
    ) -> Callable[[], None]:
        """Copy each param and gradient into its host buffers (``None``: not that one),
        after the work the current stream has queued.  ``wait``: return once they are
        there; else return what waits for them (a released gradient's memory is kept
        until its copy is done)."""
        copies = [(p, host.param) for p, host in zip(params, hosts)] if params is not None else []
        released = list(grads) if grads is not None else []
        copies += [(g, host.grad) for g, host in zip(released, hosts)]
        stream = self._copy_stream([source for source, _ in copies])
        if stream is None:
            for source, host in copies:
                host.copy_(source.detach())
            return _nothing
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for source, host in copies:
                host.copy_(source.detach(), non_blocking=True)
            for g in released:
                g.record_stream(stream)
        copied = torch.cuda.Event()
        copied.record(stream)
        if wait:
            copied.synchronize()
        return copied.synchronize

    def push(self, params: Sequence[Tensor], hosts: Sequence[HostBuffers]) -> None:
        """Copy each param's stepped host copy back into the param (on the copy stream:
        :meth:`settle`, from the thread that goes on to use the params, makes its stream
        wait for them, so the next forward sees the new weights)."""
        stream = self._copy_stream(params)
        with torch.no_grad():
            if stream is None:
                for p, host in zip(params, hosts):
                    p.copy_(host.param)
                return
            with torch.cuda.stream(stream):
                for p, host in zip(params, hosts):
                    p.copy_(host.param, non_blocking=True)

    def settle(self) -> None:
        """Make the calling thread's current streams wait for every copy pushed so far."""
        for device, stream in self._streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def wait_for_pushes(self) -> None:
        """Return when every copy pushed so far is in its param (a host-side wait, right
        from any thread)."""
        for stream in self._streams.values():
            stream.synchronize()

    def _copy_stream(self, params: Sequence[Tensor]) -> torch.cuda.Stream | None:
        """The side stream of the params' CUDA device; ``None`` for host params."""
        device = params[0].device if params else HOST
        if device.type != "cuda":
            return None
        stream = self._streams.get(device)
        if stream is None:
            stream = self._streams[device] = torch.cuda.Stream(device)
        return stream


#: the param bytes an offloaded group is stepped in at a time (whole params; see
#: :meth:`adamkit.stepping.Stepper.run`)
BUCKET_BYTES = 64 * 2**20


def buckets(hosts: Sequence[HostBuffers]) -> list[slice]:
    """Consecutive runs of params of about :data:`BUCKET_BYTES` each (a bigger param is a
    bucket of its own)."""
    spans, start, held = [], 0, 0
    for j, host in enumerate(hosts):
        held += host.param.nbytes
        if held >= BUCKET_BYTES:
            spans.append(slice(start, j + 1))
            start, held = j + 1, 0
    if start < len(hosts) or not spans:
        spans.append(slice(start, len(hosts)))
    return spans


def _nothing() -> None:
    pass


def _forget(buffers: dict, key: int, gone: weakref.ref) -> None:
    """A param's weakref callback: drop its host buffers (unless its id now names another's)."""
    entry = buffers.get(key)
    if entry is not None and entry[0] is gone:
        del buffers[key]


@dataclass
class HostStep:
    """One param's host step under gradient release, pulled and waiting to run:
    ``run()`` steps the host copies and pushes the param back; ``grads`` are the host
    gradients it will step with (clipping scales them first).  A step held until
    ``step()`` (clipping) has its gradient pulled only: ``gradients_in()`` waits for
    that copy (before the norm reads it), ``changed_since(group)`` says what changed
    since (``None``: nothing its plan depends on), and ``pull_params()`` then copies the
    param as it is now."""

    run: Callable[[], None]
    grads: list[Tensor]
    gradients_in: Callable[[], None] = _nothing
    changed_since: Callable[[dict], str | None] | None = None
    pull_params: Callable[[], None] | None = None


def host_view(hosts: Sequence[HostBuffers], params: Sequence[Tensor], state_table) -> tuple[list, list, dict]:
    """The host copies the kernel steps: params, gradients, and a state table keyed by
    the host params whose entries are the params' states."""
    return [h.param for h in hosts], [h.grad for h in hosts], {h.param: state_table[p] for h, p in zip(hosts, params)}


def host_device_of(group: dict, device: torch.device) -> torch.device:
    """Where the state of a param on ``device`` lives in ``group``."""
    return HOST if group.get("offload") is not None else device


__all__ = [
    "BUCKET_BYTES",
    "HOST",
    "OFFLOADS",
    "buckets",
    "HostBuffers",
    "HostStep",
    "HostWorker",
    "Offload",
    "host_device_of",
    "host_view",
]
