"""The host side shared by the fused kernels (:mod:`adamkit.kernels.cpu` and
:mod:`adamkit.kernels.triton`): the table of chunks a launch covers and the CPU
``step`` counters, advanced together."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

try:  # numba is a dependency, but the rest of adamkit works without it
    from numba import njit

    from .intrinsics import typed_pointer
except ImportError:  # pragma: no cover - exercised only where numba is missing
    njit = None


def chunk_table(numels: np.ndarray, size: int) -> np.ndarray:
    """Rows (tensor, first, end) covering every element in pieces of at most ``size``;
    every piece starts on a multiple of ``size``."""
    numels = np.asarray(numels, dtype=np.int64)
    counts = (numels + size - 1) // size
    tensor_index = np.repeat(np.arange(len(numels)), counts)
    first_chunk = np.repeat(np.cumsum(counts) - counts, counts)
    first = (np.arange(counts.sum()) - first_chunk) * size
    end = np.minimum(first + size, numels[tensor_index])
    return np.stack([tensor_index, first, end], axis=1).astype(np.int64)


class HostCounters:
    """CPU ``step`` counters advanced together: one compiled loop over their addresses
    (a Python call per tensor costs microseconds: tens of ms a step for 10,000 tensors).

    Needs numba and one dtype for every counter; otherwise each counter is advanced
    and read as torch does (``torch._foreach_add_``, then ``item()``)."""

    def __init__(self, steps: list[Tensor]):
        self.steps = steps
        dtypes = {s.dtype for s in steps}
        self.compiled = njit is not None and len(dtypes) == 1 and all(s.device.type == "cpu" for s in steps)
        if self.compiled:
            self.addresses = np.array([s.data_ptr() for s in steps], dtype=np.int64)
            self.witness = np.empty(0, dtype=np.float64 if dtypes == {torch.float64} else np.float32)

    def advance(self) -> np.ndarray:
        """``step += 1`` for every counter; the new counts as float64."""
        if self.compiled:
            return _advance_steps(self.addresses, self.witness)
        torch._foreach_add_(self.steps, 1)
        return np.array([s.item() for s in self.steps], dtype=np.float64)


if njit is not None:

    @njit(cache=True, nogil=True)
    def _advance_steps(addresses, witness):
        """``step += 1`` for every step counter; returns the new counts (float64)."""
        counts = np.empty(addresses.shape[0], dtype=np.float64)
        for t in range(addresses.shape[0]):
            step = typed_pointer(addresses[t], witness)
            step[0] += 1
            counts[t] = step[0]
        return counts
