r"""Split master weights (``master_weights="fp32"``): an fp32 master weight kept as the
bf16 param the model computes with plus 16 more bits in the optimizer state, the
format's specification, its NumPy reference and its torch form.

An fp32 number's bit pattern :math:`b` (32 bits) is cut into

.. math::

    p = \lfloor (b + 2^{15}) / 2^{16} \rfloor, \qquad
    \ell = b - 2^{16} p \in [-2^{15}, 2^{15})

(integer arithmetic on the two's-complement pattern, modulo :math:`2^{32}`): :math:`p`
is the bf16 param's bit pattern, the fp32 value rounded to bf16 *half away from zero*
(adding half the dropped range to a sign-magnitude pattern rounds its magnitude), and
:math:`\ell`, an int16 in ``state["master_low_bits"]``, is what rounding dropped, as a
signed offset.  The state tensor's dtype is bf16, holding :math:`\ell`'s bit pattern
(read it with ``.view(torch.int16)``): collectives move 16-bit floats bit for bit, but
neither gloo nor NCCL moves int16, and FSDP2 gathers state to save a full checkpoint.  Joining gives :math:`b = 2^{16} p + \ell` back exactly, for every
pattern (NaN and infinity included), so the master weight *is* an fp32 number: a step
joins, runs the fp32 element math, and splits again, and the run is bit for bit the
one on fp32 params fed the same gradients.  Rounding half away rather than to even
keeps :math:`\ell` in 16 bits (ties to even would need :math:`+2^{15}`); the bf16
param differs from torch's ``.to(torch.bfloat16)`` of the master only at exact ties.

Memory: 2 bytes per param more than the bf16 weight, 4 in all: an fp32 master copy's
bytes, without a copy the model cannot see (the param is the master's high half).
Only bf16 params split this way: fp16's 5-bit exponent is not the top of an fp32
pattern.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

#: the state key of the master weight's low 16 bits (int16 bits in a bf16 tensor, shaped like the param)
MASTER_KEY = "master_low_bits"
#: the values of the ``master_weights`` option
MASTER_WEIGHTS = (None, "fp32")


def split(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 param bit patterns as uint16, low bits as int16) of fp32 values ``theta``."""
    bits = np.asarray(theta, dtype=np.float32).view(np.uint32).astype(np.int64)
    high = ((bits + 0x8000) >> 16) & 0xFFFF
    low = bits - (high << 16)
    low = np.where(low >= 0x8000, low - (1 << 32), low)  # modulo 2^32, into [-2^15, 2^15)
    return high.astype(np.uint16), low.astype(np.int16)


def join(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """fp32 values from bf16 bit patterns ``high`` and int16 ``low`` bits."""
    bits = (np.asarray(high, dtype=np.int64) << 16) + np.asarray(low, dtype=np.int64)
    return (bits & 0xFFFFFFFF).astype(np.uint32).view(np.float32)


def join_tensors(param: Tensor, low: Tensor) -> Tensor:
    """The fp32 master weight of a bf16 ``param`` and its ``low`` bits (a bf16 tensor
    holding int16 bit patterns, as the state keeps them)."""
    high = param.detach().view(torch.int16).to(torch.int32) & 0xFFFF
    return ((high << 16) + low.view(torch.int16).to(torch.int32)).view(torch.float32)


def split_into(theta: Tensor, param: Tensor, low: Tensor) -> None:
    """Store fp32 ``theta`` as the bf16 ``param`` and its ``low`` bits (int16 patterns in
    a bf16 tensor)."""
    bits = theta.to(torch.float32).view(torch.int32)
    high = (bits + 0x8000) >> 16  # arithmetic: the sign bits fill in, the low 16 are p
    low.view(torch.int16).copy_((bits - (high << 16)).to(torch.int16))
    param.copy_(high.to(torch.int16).view(torch.bfloat16))


__all__ = ["MASTER_KEY", "MASTER_WEIGHTS", "join", "join_tensors", "split", "split_into"]
