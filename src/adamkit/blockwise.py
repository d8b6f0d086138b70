"""Block-wise quantized moments in torch: quantize and dequantize tensors on any
device, bit for bit as :mod:`adamkit.quantization` specifies, and the state keys
that hold them (``{key}_{format}``, uint8 codes; ``{key}_{format}_scales``, bf16)."""

from __future__ import annotations

import torch
from torch import Tensor

from .quantization import FORMATS, SIGNED_KEYS, QuantFormat, codes_key, scales_key


def stored_format(state: dict, key: str, numel: int) -> QuantFormat | None:
    """The format moment ``key`` is quantized in, if ``state`` holds it quantized
    (codes and scales of the right sizes for ``numel`` elements)."""
    for fmt in FORMATS.values():
        codes, scales = stored_keys(key, fmt)
        if codes in state and scales in state:
            if state[codes].numel() == fmt.code_bytes(numel) and state[scales].numel() == fmt.blocks(numel):
                return fmt
    return None


def drop(state: dict, key: str, fmt: QuantFormat) -> None:
    for stored in stored_keys(key, fmt):
        state.pop(stored, None)


def stored_keys(key: str, fmt: QuantFormat) -> tuple[str, str]:
    """The state keys holding moment ``key`` when it is quantized in ``fmt``."""
    return codes_key(key, fmt), scales_key(key, fmt)


def allocate(state: dict, key: str, param: Tensor, fmt: QuantFormat) -> None:
    """Zero codes and scales for ``param``'s moment ``key`` (they dequantize to zeros)."""
    numel = param.numel()
    codes, scales = stored_keys(key, fmt)
    state[codes] = torch.zeros(fmt.code_bytes(numel), dtype=torch.uint8, device=param.device)
    state[scales] = torch.zeros(fmt.blocks(numel), dtype=torch.bfloat16, device=param.device)


def _per_element(scales: Tensor, fmt: QuantFormat, numel: int) -> Tensor:
    return scales.float().repeat_interleave(fmt.block)[:numel]


def _bfloat16_ceil(x: Tensor) -> Tensor:
    """Non-negative fp32 values rounded up to bf16 (NaN where ``x`` is NaN)."""
    bits = x.view(torch.int32).to(torch.int64)
    up = ((bits + 0xFFFF) >> 16).clamp(max=0x7F80).to(torch.int16).view(torch.bfloat16)
    return torch.where(x.isnan(), torch.nan, up)


def scales_of(x: Tensor, fmt: QuantFormat) -> Tensor:
    """Each block's absmax rounded up to bf16; NaN for a non-finite block."""
    flat = x.reshape(-1).float()
    padded = torch.zeros(fmt.blocks(flat.numel()) * fmt.block, dtype=torch.float32, device=x.device)
    padded[: flat.numel()] = flat
    rows = padded.view(-1, fmt.block)
    scales = _bfloat16_ceil(rows.abs().amax(dim=1))
    finite = rows.isfinite().all(dim=1) & scales.isfinite()
    return torch.where(finite, scales, torch.nan).to(torch.bfloat16)


def _level_codes(flat: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """Each element's code (int64, unpacked) given its block's scale."""
    s = _per_element(scales, fmt, flat.numel())
    usable = s.isfinite() & (s > 0)
    ratio = torch.where(usable, flat.abs() / torch.where(usable, s, 1.0), 0.0)
    levels = fmt.signed_levels if signed else fmt.unsigned_levels
    nearest = torch.floor(levels * ratio.sqrt() + 0.5).to(torch.int64)
    if signed:
        code = torch.where(flat < 0, -nearest, nearest) + fmt.signed_levels
    else:
        code = (nearest - 1).clamp(min=0)
    return torch.where(s.isnan(), 0, code)


def _packed(code: Tensor, fmt: QuantFormat) -> Tensor:
    code = code.to(torch.uint8)
    if fmt.bits == 4:
        if code.numel() % 2:
            code = torch.cat([code, code.new_zeros(1)])
        code = code[0::2] | (code[1::2] << 4)
    return code


def _unpacked(codes: Tensor, fmt: QuantFormat, numel: int) -> Tensor:
    code = codes.to(torch.int64)
    if fmt.bits == 4:
        code = torch.stack([code & 0xF, code >> 4], dim=1).reshape(-1)
    return code[:numel]


def _values(code: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """fp32 values of unpacked codes (flat)."""
    s = _per_element(scales, fmt, code.numel())
    if signed:
        k = code - fmt.signed_levels
        t = k.abs().float() / fmt.signed_levels
        return torch.where(k < 0, -(s * (t * t)), s * (t * t))
    t = (code + 1).float() / fmt.unsigned_levels
    return s * (t * t)


def quantize_into(x: Tensor, codes: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool) -> None:
    """Store ``x`` (read in row-major order) in ``codes`` and ``scales``."""
    flat = x.reshape(-1).float()
    new_scales = scales_of(flat, fmt)
    codes.copy_(_packed(_level_codes(flat, new_scales, fmt, signed), fmt))
    scales.copy_(new_scales)


def _reproduced(code: Tensor, scales: Tensor, flat: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """Per block: whether the codes and scales dequantize to ``flat`` exactly (or the block is non-finite)."""
    same = _values(code, scales, fmt, signed) == flat
    padded = torch.ones(fmt.blocks(flat.numel()) * fmt.block, dtype=torch.bool, device=flat.device)
    padded[: flat.numel()] = same
    return padded.view(-1, fmt.block).all(dim=1) | scales.float().isnan()


def restore_into(x: Tensor, codes: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool) -> None:
    """Like :func:`quantize_into`, but if ``x`` holds dequantized values (a quantized
    moment exported at full precision, see :mod:`adamkit.sharding`), store the codes
    and scales they came from, so the values are kept bit for bit.

    A block's scale is its absmax rounded *up* to bf16, so the largest element's code
    may be one below the top and the absmax of dequantized values can round to a
    smaller scale: a block that the usual scale does not reproduce exactly tries the
    next two bf16 values up.  For any other ``x``, this is :func:`quantize_into`.
    """
    flat = x.reshape(-1).float()
    best_scales = scales_of(flat, fmt)
    best_code = _level_codes(flat, best_scales, fmt, signed)
    trial = best_scales
    for _ in range(2):
        exact = _reproduced(best_code, best_scales, flat, fmt, signed)
        if bool(exact.all()):
            break
        positive = trial.float() > 0
        trial = torch.where(positive, (trial.view(torch.int16) + positive.to(torch.int16)).view(torch.bfloat16), trial)
        code = _level_codes(flat, trial, fmt, signed)
        better = ~exact & _reproduced(code, trial, flat, fmt, signed)
        best_scales = torch.where(better, trial, best_scales)
        best_code = torch.where(_per_element(better.float(), fmt, flat.numel()) > 0, code, best_code)
    codes.copy_(_packed(best_code, fmt))
    scales.copy_(best_scales)


def dequantize(codes: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool, shape: torch.Size) -> Tensor:
    """A new fp32 tensor of ``shape`` (row-major) from ``codes`` and ``scales``."""
    return _values(_unpacked(codes, fmt, shape.numel()), scales, fmt, signed).view(shape)


def load_moment(state: dict, key: str, shape: torch.Size, fmt: QuantFormat) -> Tensor:
    codes, scales = stored_keys(key, fmt)
    return dequantize(state[codes], state[scales], fmt, key in SIGNED_KEYS, shape)


def store_moment(state: dict, key: str, value: Tensor, fmt: QuantFormat, *, restore: bool = False) -> None:
    """Quantize ``value`` into the state's codes and scales (``restore``: keep
    dequantized values bit for bit, see :func:`restore_into`)."""
    codes, scales = stored_keys(key, fmt)
    (restore_into if restore else quantize_into)(value, state[codes], state[scales], fmt, key in SIGNED_KEYS)


__all__ = [
    "allocate",
    "dequantize",
    "load_moment",
    "drop",
    "quantize_into",
    "restore_into",
    "scales_of",
    "store_moment",
    "stored_format",
    "stored_keys",
]
