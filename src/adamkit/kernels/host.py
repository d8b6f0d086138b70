"""The host side shared by the fused kernels (:mod:`adamkit.kernels.cpu` and
:mod:`adamkit.kernels.triton`): one layout of the address table and of the group's
constants, the state tensors a bucket addresses, the table of chunks a launch covers,
and the CPU ``step`` counters, advanced together.

The address table has one row per tensor and these columns (:data:`COLUMNS`)::

    param, grad, exp_avg, second moment, its maximum, extra, and three block scales

``extra`` is the param's own buffer (a Kahan compensation or a split master's low
bits) or 0; the scales are the quantized moments' (their columns then hold codes) or
0.  A moment the variant never touches (the maximum without AMSGrad) repeats the
second moment's address.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .. import blockwise
from ..rule import Algorithm, GroupScalars
from ..specs.quantization import QuantFormat
from ..state import PARAM_EXTRA_KEY, moment_keys

#: the address table's columns (see the module docstring)
COLUMNS = (
    "param",
    "grad",
    "exp_avg",
    "second",
    "max_second",
    "extra",
    "exp_avg_scales",
    "second_scales",
    "max_second_scales",
)
#: how many of them come from the state (fixed while the state is)
STATE_COLUMNS = len(COLUMNS) - 2

#: the group's constants as both kernels read them, in this order (float64 on the
#: host; each kernel rounds them to its compute dtype)
GROUP_CONSTANTS = ("decay_factor", "one_minus_beta1", "beta2", "one_minus_beta2", "eps", "l2_weight_decay")


def group_constants(group_scalars: GroupScalars) -> tuple:
    """:data:`GROUP_CONSTANTS` of a group; a tensor hyperparameter (a capturable
    group's) stays a tensor, in float64."""
    beta1 = group_scalars.beta1.to(torch.float64) if isinstance(group_scalars.beta1, Tensor) else group_scalars.beta1
    decay_factor = 1.0 if group_scalars.decay_factor is None else group_scalars.decay_factor
    return (
        decay_factor,
        1.0 - beta1,
        group_scalars.beta2,
        group_scalars.one_minus_beta2,
        group_scalars.eps,
        group_scalars.l2_weight_decay,
    )


def state_keys(algorithm: Algorithm, amsgrad: bool, fmt: QuantFormat | None, mode: str) -> tuple[list[str], int]:
    """The state keys a bucket's rows address, in order: the moments (quantized: their
    codes, then their scales), then the param's extra buffer under rounding ``mode``;
    and the number of moments."""
    moments = moment_keys(algorithm, amsgrad)
    keys = list(moments)
    if fmt is not None:
        keys = [blockwise.stored_keys(k, fmt)[0] for k in moments] + [blockwise.stored_keys(k, fmt)[1] for k in moments]
    if mode in PARAM_EXTRA_KEY:
        keys.append(PARAM_EXTRA_KEY[mode])
    return keys, len(moments)


def state_row(addresses: list[int], moment_count: int, extra: bool, quantized: bool) -> list[int]:
    """A row's :data:`STATE_COLUMNS` from the addresses of the tensors under
    :func:`state_keys` (in that order)."""
    n = moment_count
    moments = addresses[:n] + addresses[1:2] * (3 - n)
    scales = (addresses[n : 2 * n] + addresses[n + 1 : n + 2] * (3 - n)) if quantized else [0, 0, 0]
    return moments + [addresses[-1] if extra else 0] + scales


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
