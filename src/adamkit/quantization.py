r"""Block-wise quantized optimizer states (``state_precision="int8"`` or ``"int4"``):
the format's specification and its NumPy reference.

A moment tensor :math:`x` is read in row-major order and cut into blocks of
:math:`B` elements (the last block of a tensor may be shorter: ragged tails and
one-element tensors are quantized like everything else).  Each block keeps one
*scale* :math:`s`, its absolute maximum rounded up to bf16, and a :math:`b`-bit code per
element.  Codes index a *power map*: levels evenly spaced in
:math:`c = (|x| / s)^{1/p}`, so that the map is finest near zero, where most moment
values lie, and needs no table (a code is computed, not searched for).

Signed map (``exp_avg``), :math:`K = 2^{b-1} - 1`:

.. math::

    k = \operatorname{sign}(x) \lfloor K c + \tfrac12 \rfloor \in [-K, K], \qquad
    \text{code} = k + K, \qquad \hat x = s \operatorname{sign}(k) (|k| / K)^p

Unsigned map *without zero* (``exp_avg_sq``, ``exp_inf``, ``max_exp_avg_sq``),
:math:`N = 2^b`:

.. math::

    \text{code} = \max(\lfloor N c + \tfrac12 \rfloor - 1, 0) \in [0, N - 1], \qquad
    \hat x = s \left(\frac{\text{code} + 1}{N}\right)^p

The second moment has no zero level: a :math:`v` rounded to zero while :math:`m` is
not would make :math:`m / (\sqrt{\hat v} + \epsilon)` explode (the "zero-point
problem" of Li et al., 2023, *Memory Efficient Optimizers with 4-bit States*).  Its
smallest level is :math:`s / N^p`: small second moments are overestimated, which
only shrinks their updates.

Arithmetic is fp32 and correctly rounded at every operation (``|x| / s``, the square
root, ``K c``, ``+ 1/2``), so every backend produces the same codes; with
:math:`p = 2`, :math:`c = \sqrt{|x| / s}`.  A block whose scale is zero stores
codes 0 (it dequantizes to zeros); a block holding a NaN or an infinity stores the
scale NaN (every element dequantizes to NaN: a non-finite moment poisons its block).

Packing: int8 codes are one byte each; int4 codes two to a byte, element
:math:`2j` in the low nibble and :math:`2j + 1` in the high one.  A state holds
``{key}_{format}`` (the codes, uint8, flat; e.g. ``exp_avg_int8``) and
``{key}_{format}_scales`` (bf16, one per block: the absmax rounded *up* to bf16,
so that no value exceeds its scale and a scale costs 2 bytes, not 4).

The maps' power and the block sizes were chosen by measured error on the moments of
a real model (``benchmarks/quantization_error.py``; see the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: the moment slots that take the signed map; the others are non-negative
SIGNED_KEYS = frozenset({"exp_avg"})


@dataclass(frozen=True)
class QuantFormat:
    """One quantized-state format: bits per code, elements per block, the map's power."""

    name: str
    bits: int
    block: int
    power: int = 2

    @property
    def signed_levels(self) -> int:
        """K: the signed map's codes run over [-K, K]."""
        return (1 << (self.bits - 1)) - 1

    @property
    def unsigned_levels(self) -> int:
        """N: the unsigned map's levels are 1/N, ..., N/N in the companded domain."""
        return 1 << self.bits

    def code_bytes(self, numel: int) -> int:
        return numel if self.bits == 8 else (numel + 1) // 2

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def bytes_per_state(self, numel: int) -> int:
        """Bytes held for one quantized moment of ``numel`` elements (codes, bf16 scales)."""
        return self.code_bytes(numel) + 2 * self.blocks(numel)


FORMATS = {"int8": QuantFormat("int8", bits=8, block=256), "int4": QuantFormat("int4", bits=4, block=128)}


def is_quantized(state_precision: str | None) -> bool:
    return state_precision in FORMATS


def codes_key(key: str, fmt: QuantFormat) -> str:
    """The state key of moment ``key``'s codes, e.g. ``exp_avg_int8``."""
    return f"{key}_{fmt.name}"


def scales_key(key: str, fmt: QuantFormat) -> str:
    """The state key of moment ``key``'s block scales, e.g. ``exp_avg_int8_scales``."""
    return f"{key}_{fmt.name}_scales"


# ---------------------------------------------------------------------------- reference


def _compand(magnitude: np.ndarray, power: int) -> np.ndarray:
    """c = r^(1/p) in fp32; p = 2 is one correctly rounded square root."""
    if power == 1:
        return magnitude
    if power == 2:
        return np.sqrt(magnitude)
    if power == 4:
        return np.sqrt(np.sqrt(magnitude))
    return (magnitude.astype(np.float64) ** (1.0 / power)).astype(np.float32)


def _blocked(x: np.ndarray, block: int) -> np.ndarray:
    """x (flat) as rows of ``block`` elements, the ragged tail padded with zeros."""
    rows = -(-x.size // block)
    padded = np.zeros(rows * block, dtype=np.float32)
    padded[: x.size] = x
    return padded.reshape(rows, block)


def bfloat16_ceil(x: np.ndarray) -> np.ndarray:
    """Non-negative fp32 values rounded *up* to the next bfloat16 (as fp32 values)."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    up = np.where(bits & 0xFFFF, (bits + 0x10000) & 0xFFFF0000, bits).astype(np.uint32)
    return up.view(np.float32)


def block_scales(x: np.ndarray, block: int) -> np.ndarray:
    """Each block's absmax rounded up to bf16 (as fp32 values); NaN for a block
    holding a NaN or an infinity, or whose absmax rounds up past bf16's range."""
    rows = _blocked(np.asarray(x, dtype=np.float32).ravel(), block)
    with np.errstate(invalid="ignore"):
        scales = bfloat16_ceil(np.abs(rows).max(axis=1))
    scales[~np.isfinite(rows).all(axis=1) | ~np.isfinite(scales)] = np.nan
    return scales


def level_codes(x: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool) -> np.ndarray:
    """Each element's code (int64, unpacked), given its block's scale."""
    x = np.asarray(x, dtype=np.float32).ravel()
    s = np.repeat(scales, fmt.block)[: x.size]
    usable = np.isfinite(s) & (s > 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(usable, np.abs(x) / np.where(usable, s, np.float32(1)), np.float32(0)).astype(np.float32)
    companded = _compand(ratio, fmt.power)
    levels = fmt.signed_levels if signed else fmt.unsigned_levels
    nearest = np.floor(np.float32(levels) * companded + np.float32(0.5)).astype(np.int64)
    if signed:
        return np.where(x < 0, -nearest, nearest) + fmt.signed_levels
    return np.maximum(nearest - 1, 0)


def level_values(codes: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool) -> np.ndarray:
    """The dequantized fp32 values of unpacked codes."""
    codes = np.asarray(codes, dtype=np.int64)
    if signed:
        k = codes - fmt.signed_levels
        level = np.sign(k) * (np.abs(k).astype(np.float32) / np.float32(fmt.signed_levels)) ** fmt.power
    else:
        level = ((codes + 1).astype(np.float32) / np.float32(fmt.unsigned_levels)) ** fmt.power
    s = np.repeat(scales, fmt.block)[: codes.size]
    return (s * level.astype(np.float32)).astype(np.float32)


def level_table(fmt: QuantFormat, signed: bool) -> np.ndarray:
    """fp32 level of every code (``sign(k) (|k|/K)^2`` or ``((u+1)/N)^2``); a value is
    ``scale * level`` (the same product as :func:`level_values`)."""
    codes = np.arange(1 << fmt.bits)
    return level_values(
        codes, np.ones(1, dtype=np.float32), QuantFormat(fmt.name, fmt.bits, codes.size, fmt.power), signed
    )


def pack(codes: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Unpacked codes as the stored uint8 bytes (two per byte for int4)."""
    codes = np.asarray(codes, dtype=np.uint8).ravel()
    if fmt.bits == 8:
        return codes
    pairs = np.zeros(2 * fmt.code_bytes(codes.size), dtype=np.uint8)
    pairs[: codes.size] = codes
    return pairs[0::2] | (pairs[1::2] << 4)


def unpack(stored: np.ndarray, fmt: QuantFormat, numel: int) -> np.ndarray:
    stored = np.asarray(stored, dtype=np.uint8).ravel()
    if fmt.bits == 8:
        return stored[:numel].astype(np.int64)
    both = np.stack([stored & 0xF, stored >> 4], axis=1).ravel()
    return both[:numel].astype(np.int64)


def quantize(x: np.ndarray, fmt: QuantFormat, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """(stored codes, scales) of ``x`` (any shape; read in row-major order)."""
    scales = block_scales(x, fmt.block)
    codes = level_codes(x, scales, fmt, signed)
    codes[np.repeat(~np.isfinite(scales), fmt.block)[: codes.size]] = 0
    return pack(codes, fmt), scales


def dequantize(stored: np.ndarray, scales: np.ndarray, fmt: QuantFormat, signed: bool, shape) -> np.ndarray:
    """fp32 values of ``shape`` from stored codes and scales."""
    numel = int(np.prod(shape, dtype=np.int64))
    return level_values(unpack(stored, fmt, numel), scales, fmt, signed).reshape(shape)


__all__ = [
    "FORMATS",
    "SIGNED_KEYS",
    "QuantFormat",
    "block_scales",
    "codes_key",
    "dequantize",
    "is_quantized",
    "level_codes",
    "level_table",
    "level_values",
    "pack",
    "quantize",
    "scales_key",
    "unpack",
]
