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
pattern (infinity included; a NaN is split as the quiet NaN ``0x7FC00000``, since a
payload in its top bits would carry into the sign), so the master weight *is* an fp32 number: a step
joins, runs the fp32 element math, and splits again, and the run is bit for bit the
one on fp32 params fed the same gradients.  Rounding half away rather than to even
keeps :math:`\ell` in 16 bits (ties to even would need :math:`+2^{15}`); the bf16
param differs from torch's ``.to(torch.bfloat16)`` of the master only at exact ties.

Memory: 2 bytes per param more than the bf16 weight, 4 in all: an fp32 master copy's
bytes, without a copy the model cannot see (the param is the master's high half).
Only bf16 params split this way: fp16's 5-bit exponent is not the top of an fp32
pattern.

``master_weights="24bit"`` keeps 8 bits instead of 16 (an int8 :math:`\ell_8`, 1 byte
per param): the master weight is an fp32 number whose low 8 bits are zero (16
significant bits, 8 more than bf16), :math:`b = 2^{16} p + 2^8 \ell_8`.  After the
fp32 update the new pattern is rounded to that grid *stochastically*, with the param
slot's random bits :math:`u` (see :mod:`adamkit.specs.rounding`): :math:`b' = (b + \lfloor
u / 2^8 \rfloor)` with its low 8 bits cleared (adding to a sign-magnitude pattern
rounds the magnitude away from zero with the dropped fraction's probability), then
split as above, :math:`\ell_8 = (b' - 2^{16} p) / 2^8 \in [-2^7, 2^7)`.  A NaN stays
the quiet NaN ``0x7FC00000``.  The bf16 param overflows exactly where nearest rounding
of the fp32 weight does (:math:`|b| \ge` ``0x7F7F8000``, the largest bf16 number plus
half its spacing): a :math:`b'` carried onto that point from below is stepped back one
unit of the grid (its bf16 half would be infinity, as it was for about half the
weights at the top of bf16's range).  Updates far below the grid's spacing (:math:`2^{-15}` of
the weight) are kept in expectation, where rounding to nearest would drop them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .rounding import BFLOAT16_OVERFLOW_BITS

#: the state key of the master weight's low 16 bits (int16 bits in a bf16 tensor, shaped like the param)
MASTER_KEY = "master_low_bits"
#: the values of the ``master_weights`` option
MASTER_WEIGHTS = (None, "fp32", "24bit")
#: the state dtype of each mode's low bits: int16 patterns held in bf16 (collectives
#: move 16-bit floats, not int16), and int8
LOW_BITS_DTYPE = {"fp32": torch.bfloat16, "24bit": torch.int8}
QUIET_NAN = 0x7FC00000


def split(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 param bit patterns as uint16, low bits as int16) of fp32 values ``theta``
    (a NaN as the quiet NaN: a payload in the top bits would carry into the sign)."""
    theta = np.asarray(theta, dtype=np.float32)
    bits = np.where(np.isnan(theta), QUIET_NAN, theta.view(np.uint32).astype(np.int64))
    high = ((bits + 0x8000) >> 16) & 0xFFFF
    low = bits - (high << 16)
    low = np.where(low >= 0x8000, low - (1 << 32), low)  # modulo 2^32, into [-2^15, 2^15)
    return high.astype(np.uint16), low.astype(np.int16)


def join(high: np.ndarray, low: np.ndarray) -> np.ndarray:
    """fp32 values from bf16 bit patterns ``high`` and ``low`` bits (int16; int8 for
    the 24-bit master, which stands for ``low * 2^8``): (high << 16) + low, or high << 16
    where that sum would cross the sign bit.

    No split of a finite master gives such a pair (the sums that cross are NaN patterns),
    so a stepped run never takes that branch; it is for low bits gone stale under a param
    the user edited in place (``p.data.zero_()``, a pruning mask, ``load_state_dict`` of
    the model), where a negative low half under a zeroed weight would make its master a
    NaN.  Elsewhere a stale low half moves the master by less than half a bf16 step of the
    edited param."""
    low = np.asarray(low)
    shift = 8 if low.dtype == np.int8 else 0
    wide = np.asarray(high, dtype=np.int64) << 16
    bits = (wide + (low.astype(np.int64) << shift)) & 0xFFFFFFFF
    bits = np.where((bits ^ wide) & 0x80000000, wide, bits)  # (the param's sign kept)
    return bits.astype(np.uint32).view(np.float32)


def _carried_to_overflow(exact, rounded):
    """Where rounding to the 24-bit grid carried a pattern whose bf16 half nearest
    rounding keeps finite onto the point where it overflows (integer patterns, NumPy
    or torch)."""
    return ((exact & 0x7FFFFFFF) < BFLOAT16_OVERFLOW_BITS) & ((rounded & 0x7FFFFFFF) >= BFLOAT16_OVERFLOW_BITS)


def split24(theta: np.ndarray, bits16: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bf16 bit patterns, int8 low bits) of fp32 ``theta`` rounded stochastically to
    16 significant bits with the 16 random bits ``bits16`` (their top 8 are used)."""
    theta = np.asarray(theta, dtype=np.float32)
    exact = theta.view(np.uint32).astype(np.int64)
    bits = ((exact + (np.asarray(bits16, dtype=np.int64).reshape(exact.shape) >> 8)) & 0xFFFFFF00) & 0xFFFFFFFF
    bits -= 0x100 * _carried_to_overflow(exact, bits)
    bits = np.where(np.isnan(theta), QUIET_NAN, bits)
    high, low = split(bits.astype(np.uint32).view(np.float32))
    return high, (low.astype(np.int64) >> 8).astype(np.int8)


def join_tensors(param: Tensor, low: Tensor) -> Tensor:
    """The fp32 master weight of a bf16 ``param`` and its ``low`` bits as the state
    keeps them (int16 patterns in a bf16 tensor; int8 for the 24-bit master); the
    param's bits alone where the sum would change its sign (see :func:`join`)."""
    wide = (param.detach().view(torch.int16).to(torch.int32) & 0xFFFF) << 16
    if low.dtype == torch.int8:
        joined = wide + (low.to(torch.int32) << 8)
    else:
        joined = wide + low.view(torch.int16).to(torch.int32)
    return torch.where((joined ^ wide) < 0, wide, joined).view(torch.float32)


def split_into(theta: Tensor, param: Tensor, low: Tensor, bits16: Tensor | None = None) -> None:
    """Store fp32 ``theta`` as the bf16 ``param`` and its ``low`` bits (int16 patterns in
    a bf16 tensor; or int8, the 24-bit master: rounded stochastically with ``bits16``,
    to nearest without, as a conversion does)."""
    theta = theta.to(torch.float32)
    bits = theta.view(torch.int32)
    if low.dtype == torch.int8:
        carry = 0x80 if bits16 is None else (bits16.to(torch.int32) >> 8)
        bits = (bits + carry) & -256
        bits -= 0x100 * _carried_to_overflow(theta.view(torch.int32), bits).to(torch.int32)
    bits = torch.where(theta.isnan(), QUIET_NAN, bits)
    high = (bits + 0x8000) >> 16  # arithmetic: the sign bits fill in, the low 16 are p
    if low.dtype == torch.int8:
        low.copy_(((bits - (high << 16)) >> 8).to(torch.int8))
    else:
        low.view(torch.int16).copy_((bits - (high << 16)).to(torch.int16))
    param.copy_(high.to(torch.int16).view(torch.bfloat16))


def uncast_low_bits(low: Tensor, mode: str) -> Tensor | None:
    """The low bits ``low`` as the state of a group with ``master_weights=mode`` keeps
    them: ``low`` itself where it is a split's own (int8, or bf16 patterns: the step
    converts either to the group's mode), restored where another optimizer cast it to
    its params' dtype, ``None`` where neither.

    torch.optim casts every loaded state tensor by value: the 24-bit master's int8
    values become numbers (integers, exact in any float type), and the fp32 master's
    patterns held in bf16 become fp32 or fp64 values of those bf16 numbers, whose bits
    come back by truncation (through fp64, a signalling-NaN pattern comes back quieted:
    one bit, 64 fp32 units in the last place of the master).  A 24-bit group's bf16
    tensor is taken for such a cast where every value is an int8 value: a cast of int8
    makes nothing else, and the fp32 master's patterns (under a group switched to
    24-bit since) read as such values only when all zero, which mean the same either
    way, or by a chance of 1 in 256 per element."""
    if low.dtype == torch.int8:
        return low
    if not low.is_floating_point():
        return None
    as_int8 = low.to(torch.int8)
    int8_values = torch.equal(as_int8.to(low.dtype), low)
    if low.dtype == torch.bfloat16 and mode == "24bit" and int8_values:
        return as_int8
    if low.dtype == torch.bfloat16:
        return low
    if mode == "24bit":
        return as_int8 if int8_values else None
    if low.dtype == torch.float64:
        low = low.to(torch.float32)  # exact for a bf16 value
    if low.dtype != torch.float32:
        return None
    bits = low.view(torch.int32)
    if torch.any(bits & 0xFFFF):
        return None
    return (bits >> 16).to(torch.int16).view(torch.bfloat16)


__all__ = [
    "LOW_BITS_DTYPE",
    "MASTER_KEY",
    "MASTER_WEIGHTS",
    "join",
    "join_tensors",
    "split",
    "split24",
    "split_into",
    "uncast_low_bits",
]
