"""The process around the CPU kernel: whether numba can run here (installed; not a
child forked from a GNU OpenMP pool), threads that stay safe in such a child, and
torch's vector math settled before numba's pool first runs."""

from __future__ import annotations

try:  # numba is a dependency, but the rest of adamkit works without it
    import numba
except ImportError:  # pragma: no cover - exercised only where numba is missing
    numba = None

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def available() -> bool:
    return numba is not None and not _forked_from_gnu_openmp


def unavailable_reason() -> str | None:
    """Why the kernel cannot run in this process, if it cannot."""
    if numba is None:
        return "numba is not installed"
    if _forked_from_gnu_openmp:
        return (
            "this process was forked from one whose numba thread pool had run (GNU OpenMP, numba's "
            "'omp' threading layer, cannot run parallel code in a forked child: the process would be killed). "
            "Start workers with multiprocessing's 'spawn' or 'forkserver' method, or set "
            "NUMBA_THREADING_LAYER=workqueue (or tbb, after pip install tbb) before the parent's first step"
        )
    return None


#: whether this process was forked after numba's GNU OpenMP thread pool had started
_forked_from_gnu_openmp = False


@contextmanager
def fork_safe_threads() -> Iterator[None]:
    """Where this process was forked after numba's GNU OpenMP pool had run, no parallel
    region can start here (numba's would kill the process, torch's hang): run what is
    inside on one torch thread (the fused kernel is then unavailable: see
    :func:`unavailable_reason`), and leave the setting as it was."""
    if not _forked_from_gnu_openmp:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _note_fork() -> None:
    """In a forked child: remember whether the parent's numba pool was GNU OpenMP."""
    global _forked_from_gnu_openmp
    if numba is None or not sys.platform.startswith("linux"):
        return
    try:
        layer = numba.threading_layer()
    except ValueError:  # the pool never started: the child may start its own
        return
    _forked_from_gnu_openmp = layer == "omp"


os.register_at_fork(after_in_child=_note_fork)


def _settle_torch_vector_math() -> None:
    """Make torch's first call of its MKL vector-math functions (sqrt, exp, log on fp32
    and fp64) here, on one thread, on a few elements.

    In a process where numba's OpenMP pool has run, torch's *first* such call made on two
    threads at once (a tensor of 4,096 elements or more) can compute the second thread's
    half one ulp differently from every later call: 1 to 5 fresh processes in 15 did, for
    each function (issue 35: the single-tensor backend's ``sqrt(v)`` made a bf16 param's
    master weight differ from the fp32 run's).  After one call made on one thread, none
    of 90 did; ``tests/test_determinism.py`` checks it in 20 fresh processes."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((8,), 2.0, dtype=dtype)
        x.sqrt(), x.exp(), x.log()


if numba is not None:
    _settle_torch_vector_math()
