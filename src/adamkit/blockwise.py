"""Block-wise quantized moments in torch: quantize and dequantize tensors on any
device, bit for bit as :mod:`adamkit.specs.quantization` specifies (stochastically, given
each element's random bits, or to nearest), and the state keys that hold them
(codes, uint8; scales, bf16 or fp32; see :func:`adamkit.specs.quantization.codes_key`)."""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .algorithms import REGISTRY, FirstMomentScale
from .specs import quantization
from .specs.quantization import (
    DIVISOR_EXPONENT_LIMIT,
    FORMATS,
    LEGACY_FORMATS,
    PLAIN_FORMATS,
    ROOT_HALF,
    ROOT_MAP_SHARE,
    ROOT_TWO,
    SIGNED_KEYS,
    SNAP_TO_TOP,
    QuantFormat,
    codes_key,
    moment_ceiling,
    scales_key,
)

#: the second moment a normalized first moment is divided by, by its state key, and how
#: (:attr:`adamkit.algorithms.AlgorithmSpec.first_moment_scale`; an algorithm whose first
#: moment is normalized already stores it plain, so one key names one way)
DIVISOR_MOMENTS = {
    spec.second_moment_key: spec.first_moment_scale
    for spec in REGISTRY.values()
    if spec.first_moment_scale != FirstMomentScale.NONE
}


def stored_format(state: dict, key: str, numel: int) -> QuantFormat | None:
    """The format moment ``key`` is quantized in, if ``state`` holds it quantized
    (codes and scales of the right sizes for ``numel`` elements); a second moment of
    an older checkpoint comes back as its :data:`~adamkit.specs.quantization.LEGACY_FORMATS` entry."""
    signed = key in SIGNED_KEYS
    current = (*FORMATS.values(), *PLAIN_FORMATS.values())  # before the older ones: a small tensor's sizes agree
    for fmt in (*current, *(old for formats in LEGACY_FORMATS.values() for old in formats)):
        codes, scales = stored_keys(key, fmt)
        if codes in state and scales in state:
            if state[codes].numel() == fmt.code_bytes(numel) and state[scales].numel() == fmt.blocks(numel, signed):
                return fmt
    return None


def drop(state: dict, key: str, fmt: QuantFormat) -> None:
    for stored in stored_keys(key, fmt):
        state.pop(stored, None)


def stored_keys(key: str, fmt: QuantFormat) -> tuple[str, str]:
    """The state keys holding moment ``key`` when it is quantized in ``fmt``."""
    return codes_key(key, fmt), scales_key(key, fmt)


def scale_dtype(fmt: QuantFormat, signed: bool) -> torch.dtype:
    """The dtype of a moment's block scales: fp32 where they are exact, else bf16."""
    return torch.float32 if fmt.exact_scales(signed) else torch.bfloat16


def allocate(state: dict, key: str, param: Tensor, fmt: QuantFormat) -> None:
    """Zero codes and scales for ``param``'s moment ``key`` (they dequantize to zeros)."""
    numel = param.numel()
    codes, scales = stored_keys(key, fmt)
    state[codes] = torch.zeros(fmt.code_bytes(numel), dtype=torch.uint8, device=param.device)
    signed = key in SIGNED_KEYS
    state[scales] = torch.zeros(fmt.blocks(numel, signed), dtype=scale_dtype(fmt, signed), device=param.device)


def scales_held_as(state: dict, key: str, fmt: QuantFormat) -> bool:
    """Hold moment ``key``'s scales in their format's dtype where that keeps every value:
    a checkpoint written when int4's second moments kept bf16 scales has them in bf16,
    which fp32 holds exactly (the codes stand as they are).  Returns False where the
    held scales cannot be kept as they are (the moment must be quantized again)."""
    scales = scales_key(key, fmt)
    dtype = scale_dtype(fmt, key in SIGNED_KEYS)
    if state[scales].dtype != dtype:
        if dtype != torch.float32:
            return False
        state[scales] = state[scales].to(dtype)
    return True


def _per_element(scales: Tensor, fmt: QuantFormat, signed: bool, numel: int) -> Tensor:
    return scales.float().repeat_interleave(fmt.block_of(signed))[:numel]


def _bfloat16_ceil(x: Tensor) -> Tensor:
    """Non-negative fp32 values rounded up to bf16 (NaN where ``x`` is NaN)."""
    bits = x.view(torch.int32).to(torch.int64)
    up = ((bits + 0xFFFF) >> 16).clamp(max=0x7F80).to(torch.int16).view(torch.bfloat16)
    return torch.where(x.isnan(), torch.nan, up)


def scales_of(x: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """Each block's absmax, exact (fp32) or rounded up to bf16 as the moment's format
    keeps it; NaN for a non-finite block."""
    flat = x.reshape(-1).float()
    block = fmt.block_of(signed)
    padded = torch.zeros(fmt.blocks(flat.numel(), signed) * block, dtype=torch.float32, device=x.device)
    padded[: flat.numel()] = flat
    rows = padded.view(-1, block)
    absmax = rows.abs().amax(dim=1)
    exact = fmt.exact_scales(signed)
    scales = absmax if exact else _bfloat16_ceil(absmax)
    finite = rows.isfinite().all(dim=1) & scales.isfinite()
    return torch.where(finite, scales, torch.nan).to(scale_dtype(fmt, signed))


def marked(flat: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """Scales as stored: a second moment's negative where its block takes the format's
    second map (see :func:`adamkit.specs.quantization.marked_blocks`)."""
    if signed or not fmt.marks_map:
        return scales
    block = fmt.block_of(False)
    usable = scales.isfinite() & (scales > 0)
    if fmt.root_map:  # more than a quarter of the block's nonzero ratios below the float map's lowest level
        padded = torch.zeros(scales.numel() * block, dtype=torch.float32, device=flat.device)
        padded[: flat.numel()] = flat.abs() / _per_element(torch.where(usable, scales, 1.0), fmt, False, flat.numel())
        rows = padded.view(-1, block)
        below = ((rows > 0) & (rows < 2.0**fmt.min_exponent)).sum(dim=1)
        chosen = usable & (ROOT_MAP_SHARE * below > (rows > 0).sum(dim=1))
    else:  # the block's smallest ratio at least the finer map's lowest level
        padded = torch.full((scales.numel() * block,), torch.inf, dtype=torch.float32, device=flat.device)
        padded[: flat.numel()] = flat.abs()
        smallest = padded.view(-1, block).amin(dim=1)
        ratio = smallest / torch.where(usable, scales, 1.0)
        chosen = usable & (ratio >= 2.0 ** fmt.float_map(marked=True)[1])
    return torch.where(chosen, -scales, scales)


def _level_codes(flat: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool, bits16: Tensor | None) -> Tensor:
    """Each element's code (int64, unpacked) given its block's scale as stored (a
    negative second-moment scale: the second map): stochastically rounded with
    ``bits16`` (int64, one per element), or to nearest without."""
    s = _per_element(scales, fmt, signed, flat.numel())
    marked_map = s < 0
    s = s.abs()
    usable = s.isfinite() & (s > 0)
    r = torch.where(usable, flat.abs() / torch.where(usable, s, 1.0), 0.0)
    if fmt.snaps_to_top(signed):
        r = torch.where(r >= float(SNAP_TO_TOP), 1.0, r)
    if signed:
        code = _signed_codes(flat, r, fmt, bits16)
    elif fmt.legacy:
        code = (torch.floor(fmt.unsigned_levels * r.sqrt() + 0.5).to(torch.int64) - 1).clamp(min=0)
    else:
        code = _float_codes(r, fmt, bits16, marked_map)
    return torch.where(s.isnan(), 0, code)


@functools.cache
def signed_tables(fmt: QuantFormat, device: torch.device) -> tuple[Tensor, Tensor]:
    """The signed map's levels L_0..L_K, +inf and gaps g_0..g_K on ``device`` (see
    :func:`adamkit.specs.quantization.signed_magnitudes`), made once per device."""
    levels = torch.from_numpy(quantization.signed_magnitudes(fmt)).to(device)
    return levels, torch.from_numpy(quantization.signed_gaps(fmt)).to(device)


def _signed_codes(flat: Tensor, r: Tensor, fmt: QuantFormat, bits16: Tensor | None) -> Tensor:
    K = fmt.signed_levels
    if bits16 is None:  # (r <= 1 under the block's own scale; a smaller scale restore_into tries is held at the top)
        k = torch.floor(K * r.sqrt() + 0.5).to(torch.int64).clamp(max=K)
    else:  # the level L_k <= r < L_{k+1}, up with probability (r - L_k) / g_k
        levels, gaps = signed_tables(fmt, r.device)
        k = torch.floor(K * r.sqrt()).to(torch.int64).clamp(max=K)
        k = k - (r < levels[k]).to(torch.int64) + (r >= levels[k + 1]).to(torch.int64)
        up = (r - levels[k]) * 65536.0 >= gaps[k] * (65536.0 - bits16.float())
        k = k + up.to(torch.int64)
    return torch.where(flat < 0, -k, k) + K


def _float_codes(r: Tensor, fmt: QuantFormat, bits16: Tensor | None, marked_map: Tensor) -> Tensor:
    """The float map's code of r (the second map's where ``marked_map``; a root map's:
    of sqrt(r)): its fp32 bits, the dropped fraction bits rounded (stochastically:
    ``bits16`` added at their top; else half of them added)."""
    code = torch.zeros_like(r, dtype=torch.int64)
    for which in (False, True) if fmt.marks_map else (False,):
        mantissa, lowest = fmt.float_map(which)
        dropped = 23 - mantissa
        rooted = r.sqrt() if which and fmt.root_map else r
        bits = rooted.view(torch.int32).to(torch.int64)
        bits = bits + ((1 << (dropped - 1)) if bits16 is None else (bits16 << (dropped - 16)))
        first = (127 + lowest) << mantissa
        code = torch.where(marked_map == which, ((bits >> dropped) - first).clamp(0, (1 << fmt.bits) - 1), code)
    return code


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
    s = _per_element(scales, fmt, signed, code.numel())
    if signed:
        k = code - fmt.signed_levels
        value = s * signed_tables(fmt, code.device)[0][k.abs()]
        return torch.where(k < 0, -value, value)
    if fmt.legacy:
        t = (code + 1).float() / fmt.unsigned_levels
        return s * (t * t)
    level = torch.zeros_like(s)
    for which in (False, True) if fmt.marks_map else (False,):
        mantissa, lowest = fmt.float_map(which)
        if which and fmt.root_map:  # the square of the float map's level
            pattern = (2 * code + 127 + 2 * lowest) << 23
        else:
            pattern = (code + ((127 + lowest) << mantissa)) << (23 - mantissa)
        level = torch.where((s < 0) == which, pattern.to(torch.int32).view(torch.float32), level)
    return s.abs() * level


def quantize_into(
    x: Tensor, codes: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool, bits16: Tensor | None = None
) -> None:
    """Store ``x`` (read in row-major order) in ``codes`` and ``scales``: rounded
    stochastically with ``bits16`` (one per element, as :func:`adamkit.kernels.storage.random_bits`
    draws them), or to nearest."""
    _check_scales(scales, fmt, signed)
    flat = x.reshape(-1).float()
    flat = held_at_ceiling(flat, fmt, signed)
    new_scales = marked(flat, scales_of(flat, fmt, signed), fmt, signed)
    bits = None if bits16 is None else bits16.reshape(-1)
    codes.copy_(_packed(_level_codes(flat, new_scales, fmt, signed, bits), fmt))
    scales.copy_(new_scales)


def _check_scales(scales: Tensor, fmt: QuantFormat, signed: bool) -> None:
    if scales.dtype != scale_dtype(fmt, signed):  # a copy into it would round them
        raise TypeError(f"scales must be {scale_dtype(fmt, signed)} for this moment, got {scales.dtype}")


def _reproduced(
    code: Tensor, scales: Tensor, flat: Tensor, fmt: QuantFormat, signed: bool, divisor: Tensor | None = None
) -> Tensor:
    """Per block: whether the codes and scales dequantize to ``flat`` exactly (times
    ``divisor``, a normalized first moment's; or the block holds a NaN, which its NaN
    scale keeps)."""
    values = _values(code, scales, fmt, signed)
    same = (values if divisor is None else values * divisor) == flat
    block = fmt.block_of(signed)
    padded = torch.ones(fmt.blocks(flat.numel(), signed) * block, dtype=torch.bool, device=flat.device)
    padded[: flat.numel()] = same
    poisoned = torch.zeros_like(padded)
    poisoned[: flat.numel()] = flat.isnan()
    return padded.view(-1, block).all(dim=1) | (scales.float().isnan() & poisoned.view(-1, block).any(dim=1))


def _neighbour_scales(scales: Tensor, steps: int) -> Tensor:
    """Positive scales moved ``steps`` representable values (of their dtype) up or
    down; zero and NaN scales stay, and so does one that would leave the finite
    numbers (a scale at fp32's largest, which an overflowed square is held at)."""
    positive = scales.float() > 0
    bits = torch.int16 if scales.dtype == torch.bfloat16 else torch.int32
    moved = (scales.view(bits) + positive.to(bits) * steps).view(scales.dtype)
    return torch.where(positive & moved.isfinite(), moved, scales)


def _second_level(fmt: QuantFormat, signed: bool) -> float:
    """The level just below the top (1): where a block's largest element may have been
    rounded to, stochastically."""
    if signed:
        t = (fmt.signed_levels - 1) / fmt.signed_levels
        return t * t
    return 1.0 - 2.0 ** -(fmt.mantissa_bits + 1)


def held_at_ceiling(flat: Tensor, fmt: QuantFormat, signed: bool) -> Tensor:
    """:func:`adamkit.specs.quantization.held_at_ceiling` in torch."""
    if fmt.legacy:
        return flat
    ceiling = float(moment_ceiling(fmt, signed))
    if not signed:  # an overflowed square: the ceiling (NaN stays NaN)
        return flat.clamp(max=ceiling)
    beyond = flat.isfinite() & (flat.abs() > ceiling)  # (an infinity poisons its block)
    return torch.where(beyond, torch.full_like(flat, ceiling).copysign(flat), flat)


def restore_into(
    x: Tensor,
    codes: Tensor,
    scales: Tensor,
    fmt: QuantFormat,
    signed: bool,
    factors: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Like :func:`quantize_into`, but if ``x`` holds dequantized values (a quantized
    moment exported at full precision, see :mod:`adamkit.sharding`), store codes and
    scales that dequantize to them exactly, so the values are kept bit for bit.

    A block's scale is its absmax (exact, or rounded *up* to bf16), and a step rounds
    its largest element to the top level or to the one below it, so the absmax of
    dequantized values is the scale or that much less: a block that the usual scale
    does not reproduce exactly tries the next two values up and the one below, then
    its absmax over the second level (and that value's neighbours), each in the map
    the values choose and, for a root map, in the other map too (a block that took its
    root map may have had the elements below the float map rounded up out of it).  For
    any other ``x``, this is :func:`quantize_into` rounding to nearest.

    A normalized first moment (``factors``: its divisor d and the factor r that stores
    it) is restored from its values m as the codes of fl(m r) (within a few units in the
    last place of the u it was read from), chosen where they give back fl(u d) = m.
    """
    _check_scales(scales, fmt, signed)
    target = x.reshape(-1).float()
    if factors is None:  # an overflowed square is held at the ceiling, as a step holds it
        target = flat = held_at_ceiling(target, fmt, signed)
        per_element = None
    else:  # a normalized first moment: the u it stores is held
        per_element = factors[0].reshape(-1)
        flat = held_at_ceiling(target * factors[1].reshape(-1), fmt, signed)
    absmax = scales_of(flat, fmt, signed)
    best_scales = marked(flat, absmax, fmt, signed)
    best_code = _level_codes(flat, best_scales, fmt, signed, None)
    below = (absmax.float() / _second_level(fmt, signed)).to(absmax.dtype)
    trials = [_neighbour_scales(absmax, steps) for steps in (1, 2, -1)]
    trials += [_neighbour_scales(below, steps) for steps in (0, -1, 1, 2)]
    trials = [marked(flat, trial, fmt, signed) for trial in trials]
    if fmt.root_map and not signed:  # stochastic rounding may have lifted the elements that chose the map
        trials += [-trial for trial in [best_scales, *trials]]
    exact = _reproduced(best_code, best_scales, target, fmt, signed, per_element)
    for trial in trials:
        if bool(exact.all()):
            break
        code = _level_codes(flat, trial, fmt, signed, None)
        better = ~exact & _reproduced(code, trial, target, fmt, signed, per_element)
        best_scales = torch.where(better, trial, best_scales)
        best_code = torch.where(_per_element(better.float(), fmt, signed, flat.numel()) > 0, code, best_code)
        exact = exact | better
    codes.copy_(_packed(best_code, fmt))
    scales.copy_(best_scales)


def dequantize(codes: Tensor, scales: Tensor, fmt: QuantFormat, signed: bool, shape: torch.Size) -> Tensor:
    """A new fp32 tensor of ``shape`` (row-major) from ``codes`` and ``scales``."""
    return _values(_unpacked(codes, fmt, shape.numel()), scales, fmt, signed).view(shape)


def first_moment_divisor(second: Tensor, scale: FirstMomentScale, reciprocal: bool = False) -> Tensor:
    """:func:`adamkit.specs.quantization.first_moment_divisor` in torch: d (or the
    factor r that stores a first moment, ``reciprocal``), 2^k times fl(sqrt 2) (fl(1 /
    sqrt 2)) for a root's odd exponents."""
    bits = second.float().contiguous().view(torch.int32) & 0x7FFFFFFF
    e = (bits >> 23) - 127
    root = scale == FirstMomentScale.ROOT
    k = (e >> 1 if root else e).clamp(-DIVISOR_EXPONENT_LIMIT, DIVISOR_EXPONENT_LIMIT)
    power = (((127 - k) if reciprocal else (127 + k)) << 23).view(torch.float32)
    if not root:
        return power
    return torch.where((e & 1) == 1, power * float(ROOT_HALF if reciprocal else ROOT_TWO), power)


def normalizes(key: str, fmt: QuantFormat) -> bool:
    """Whether moment ``key`` is stored divided by its second moment's divisor in ``fmt``."""
    return fmt.normalized_first_moment and key in SIGNED_KEYS


def _divisor(state: dict, shape: torch.Size, reciprocal: bool = False) -> Tensor:
    """The divisor of a normalized first moment (fp32, ``shape``; or the factor that
    stores one, ``reciprocal``), from the second moment as the state holds it now."""
    second, scale = _divisor_moment(state, shape)
    return first_moment_divisor(second, scale, reciprocal)


def _divisor_moment(state: dict, shape: torch.Size) -> tuple[Tensor, FirstMomentScale]:
    """The second moment a normalized first moment is read and stored by, and how:
    quantized, or already dequantized (a conversion that dequantized it first keeps its
    values exactly)."""
    for key, scale in DIVISOR_MOMENTS.items():
        if key in state:
            return state[key].reshape(shape), scale
        fmt = stored_format(state, key, shape.numel())
        if fmt is not None:
            return load_moment(state, key, shape, fmt), scale
    raise ValueError(
        f"a normalized first moment is held without a quantized second moment to read it by "
        f"(one of {sorted(DIVISOR_MOMENTS)}); the state has {sorted(state)}"
    )


def load_moment(state: dict, key: str, shape: torch.Size, fmt: QuantFormat, divisor: Tensor | None = None) -> Tensor:
    """Moment ``key``'s fp32 values (a normalized first moment multiplied back:
    fl(u d), d from the second moment the state holds, or ``divisor`` where the caller
    has read that second moment already)."""
    codes, scales = stored_keys(key, fmt)
    value = dequantize(state[codes], state[scales], fmt, key in SIGNED_KEYS, shape)
    if not normalizes(key, fmt):
        return value
    return value * (_divisor(state, shape) if divisor is None else divisor)


def store_moment(
    state: dict, key: str, value: Tensor, fmt: QuantFormat, *, restore: bool = False, bits16: Tensor | None = None
) -> None:
    """Quantize ``value`` into the state's codes and scales: a step's new moment
    stochastically with ``bits16``; a conversion to nearest (``restore``: keep
    dequantized values bit for bit, see :func:`restore_into`).  A first moment that
    ``fmt`` normalizes is stored as fl(m r), r from the second moment the state holds
    (store that first; see :func:`adamkit.specs.quantization.first_moment_divisor`)."""
    codes, scales = stored_keys(key, fmt)
    normalized = normalizes(key, fmt)
    if restore:
        factors = None
        if normalized:  # (the second moment read once for both)
            second, scale = _divisor_moment(state, value.shape)
            factors = (first_moment_divisor(second, scale), first_moment_divisor(second, scale, True))
        restore_into(value, state[codes], state[scales], fmt, key in SIGNED_KEYS, factors)
    else:
        value = value.float() * _divisor(state, value.shape, True) if normalized else value
        quantize_into(value, state[codes], state[scales], fmt, key in SIGNED_KEYS, bits16)


def second_moments_first(keys):
    """Moment keys in the order to store them: a first moment may be normalized by a
    second moment (:func:`store_moment`), which is stored before it."""
    return sorted(keys, key=lambda key: key in SIGNED_KEYS)


def conversion_order(state: dict, keys, numel: int) -> list[str]:
    """Moment keys in the order to convert them: a first moment held normalized is read
    by the second moment it was stored against, so it goes first; otherwise the second
    moments go first, as a normalized first moment is stored against the new ones (a
    state holding no moment yet allocates them in ``keys``' order)."""
    held = {key: key in state or stored_format(state, key, numel) is not None for key in keys}
    if not any(held.values()):
        return list(keys)
    reads_by_second = any(
        (fmt := stored_format(state, key, numel)) is not None and normalizes(key, fmt)
        for key in keys
        if key not in state
    )
    ordered = second_moments_first(keys)
    return (
        [*(key for key in ordered if key in SIGNED_KEYS), *(key for key in ordered if key not in SIGNED_KEYS)]
        if reads_by_second
        else ordered
    )


__all__ = [
    "allocate",
    "conversion_order",
    "dequantize",
    "first_moment_divisor",
    "load_moment",
    "normalizes",
    "second_moments_first",
    "drop",
    "quantize_into",
    "restore_into",
    "scale_dtype",
    "scales_held_as",
    "scales_of",
    "signed_tables",
    "store_moment",
    "stored_format",
    "stored_keys",
]
