r"""Storage policies for the torch-op kernels (reference and foreach): run the element
math in the compute dtype on widened copies, then store back with the group's
rounding (:mod:`adamkit.specs.rounding` specifies it; this is its torch implementation).

A param is *widened* when it is a bf16/fp16 param, or its states are kept in another
dtype or quantized (``state_precision``).  Everything else (fp32 and fp64 params with
states in their own dtype) is stepped in place, exactly as torch.optim does.  The user's
``.grad`` is read, never written: a gradient is converted into a new tensor or used
as it is.

Integers are held in int64 tensors; 32-bit products are formed from 16-bit halves
so that nothing overflows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import blockwise
from ..algorithms import FirstMomentScale
from ..rule import UpdateRule
from ..specs import rounding
from ..specs.master import MASTER_KEY, join_tensors, split_into
from ..specs.quantization import SIGNED_KEYS, QuantFormat
from ..specs.rounding import MASK32, MIX_MULTIPLIERS
from ..state import MU_PRODUCT_KEY, moment_keys
from .types import GroupTensors


def _multiply32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for x < 2^32, without leaving int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def mix32(x: Tensor) -> Tensor:
    """:func:`adamkit.specs.rounding.mix32` on an int64 tensor of uint32 values."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _multiply32(x, MIX_MULTIPLIERS[0])
    x = x ^ (x >> 15)
    x = _multiply32(x, MIX_MULTIPLIERS[1])
    return x ^ (x >> 16)


def step_key(stream_key: int, step: Tensor) -> Tensor:
    """k_{s,t} as a 0-d int64 tensor on the step's device (the step is not read on the host)."""
    return mix32(step.detach().to(torch.int64) ^ stream_key)


def random_bits(key: Tensor, shape: torch.Size, device: torch.device, offset: int = 0) -> Tensor:
    """r_i = mix(k ^ i) >> 16 for every element of ``shape``, i its row-major index
    plus ``offset`` (a shard's first element's index in the whole param)."""
    index = torch.arange(offset, offset + shape.numel(), device=device, dtype=torch.int64).view(shape)
    return mix32(key.to(device) ^ index) >> 16


def _as_int16(bits: Tensor) -> Tensor:
    """uint16 patterns held in int64, as an int16 tensor (no wrap-around conversions)."""
    return torch.where(bits >= 32768, bits - 65536, bits).to(torch.int16)


def round_stochastic(value: Tensor, dtype: torch.dtype, bits16: Tensor) -> Tensor:
    """``value`` (fp32; fp64 is rounded to fp32 first) stochastically rounded to ``dtype``."""
    value = value.float()
    if dtype == torch.bfloat16:  # add r to the low 16 bits of |x|, truncate, stop at the largest finite
        pattern = value.view(torch.int32).to(torch.int64) & MASK32
        magnitude = pattern & 0x7FFFFFFF
        rounded = torch.clamp((magnitude + bits16) >> 16, max=rounding.LARGEST_FINITE[dtype])
        rounded = torch.where(magnitude >= rounding.BFLOAT16_OVERFLOW_BITS, rounding.INFINITY[dtype], rounded)
        rounded = torch.where(value.isnan(), 0x7FC0, rounded | ((pattern >> 16) & 0x8000))
        return _as_int16(rounded).view(torch.bfloat16)
    nearest = value.to(dtype)
    pattern = nearest.view(torch.int16).to(torch.int64) & 0xFFFF
    toward_zero = pattern - (nearest.float().abs() > value.abs()).to(torch.int64)
    exponent = torch.clamp((toward_zero >> 10) & 0x1F, min=1)
    spacing = torch.exp2((exponent - 25).to(torch.float32))
    fraction = (value.abs() - _as_int16(toward_zero).view(dtype).float().abs()) / spacing
    away = (fraction * 65536.0 >= 65536.0 - bits16) & ((toward_zero & 0x7FFF) != rounding.LARGEST_FINITE[dtype])
    rounded = _as_int16(toward_zero + away.to(torch.int64)).view(dtype)
    # inf (where nearest rounding overflows, or x is infinite) and NaN keep the conversion
    infinity = rounding.INFINITY[dtype]
    return torch.where(pattern & infinity == infinity, nearest, rounded)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The element math's dtype for params of ``dtype``: fp64 for fp64, else fp32."""
    if dtype.is_complex:
        return torch.complex128 if dtype == torch.complex128 else torch.complex64
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass
class _Stored:
    """A value whose math runs on ``work``: a widened copy of ``target`` (or ``target``
    itself), or, for a quantized moment (``fmt`` set), its dequantized values."""

    target: Tensor | None
    work: Tensor
    slot: int
    key: str = ""
    fmt: QuantFormat | None = None


def _widen(t: Tensor, dtype: torch.dtype, slot: int) -> _Stored:
    return _Stored(t, t.to(dtype), slot)


def _moment(
    state: dict, key: str, param: Tensor, dtype: torch.dtype, slot: int, divisor: Tensor | None = None
) -> _Stored:
    fmt = blockwise.stored_format(state, key, param.numel()) if key not in state else None
    if fmt is None:
        return _widen(state[key], dtype, slot)
    return _Stored(None, blockwise.load_moment(state, key, param.shape, fmt, divisor).to(dtype), slot, key, fmt)


def _moments(state: dict, keys: Sequence[str], param: Tensor, dtype: torch.dtype, rule: UpdateRule) -> list[_Stored]:
    """A param's moments in ``keys``' order (slots 1, 2, ...), the second moment read
    first: a quantized one gives the divisor of the normalized first moments (m, and
    AdEMAMix's slow m) once, rather than being dequantized again for each of them."""
    scale, second_key = rule.spec.first_moment_scale, rule.spec.second_moment_key
    loaded: dict[str, _Stored] = {}
    divisor = None
    if second_key in keys:
        loaded[second_key] = _moment(state, second_key, param, dtype, keys.index(second_key) + 1)
        if loaded[second_key].fmt is not None and scale != FirstMomentScale.NONE:
            divisor = blockwise.first_moment_divisor(loaded[second_key].work.float(), scale)
    for slot, key in enumerate(keys, start=1):
        if key not in loaded:
            loaded[key] = _moment(state, key, param, dtype, slot, divisor if key in SIGNED_KEYS else None)
    return [loaded[key] for key in keys]


def is_widened(param: Tensor, state: dict, keys: Sequence[str]) -> bool:
    """Whether :func:`widened` steps ``param`` on a copy (a 16-bit param, or moments not
    in its dtype), stored back after the update: every other param is updated in place."""
    return rounding.is_low_precision(param.dtype) or not all(
        state.get(key) is not None and state[key].dtype == param.dtype for key in keys
    )


def widened(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    states: Sequence[dict],
    steps: Sequence[Tensor],
    rule: UpdateRule,
    param_indices: Sequence[int] | None,
    element_offsets: Sequence[int] | None = None,
) -> tuple[GroupTensors, Callable[..., None]]:
    """The tensors to run the element math on, and a function that stores the results.

    Params of 32 or 64 bits whose moments are in their own dtype are passed through
    untouched, so their results stay torch's bits.  The others are widened to their
    compute dtype and stored back once per update, as the fused kernels store them: a
    16-bit param with its ``rounding``, 16-bit moments stochastically, quantized
    moments dequantized to fp32 and quantized again (stochastically) from the new
    values.  ``store(written)`` stores the widened params only where ``written[i]`` is
    true (all by default); moments are always stored.
    """
    keys = moment_keys(rule.algorithm, rule.amsgrad)
    work = GroupTensors(list(params), list(grads), [], [], [])
    if rule.spec.keeps_mu_product:
        work.mu_products = [state[MU_PRODUCT_KEY] for state in states]
    work_moments = (work.exp_avgs, work.exp_avg_sqs, work.max_exp_avg_sqs)
    pending: list[tuple[int, list[_Stored]]] = []
    for i, param in enumerate(params):
        state = states[i]
        if not is_widened(param, state, keys):
            for key, moments in zip(keys, work_moments):
                moments.append(state[key])
            continue
        dtype = compute_dtype(param.dtype)
        stored = [_widen(param, dtype, rounding.PARAM_SLOT)]
        mode = rounding.effective_rounding(rule.rounding, param.dtype)
        if mode == "kahan":
            stored[0].work.add_(state["kahan_compensation"])
        elif mode in ("master", "master24"):  # the master weight, exactly
            stored[0].work = join_tensors(param, state[MASTER_KEY])
        stored += _moments(state, keys, param, dtype, rule)
        work.params[i] = stored[0].work
        for item, moments in zip(stored[1:], work_moments):
            moments.append(item.work)
        work.grads[i] = grads[i].to(dtype)
        pending.append((i, stored))

    def bits(i: int, item: _Stored) -> Tensor:
        """The 16 random bits of every element of param ``i``'s value ``item`` this step."""
        stream = rounding.SLOTS * param_indices[i] + item.slot
        key = step_key(rounding.stream_key(rule.seed, stream), steps[i])
        offset = 0 if element_offsets is None else element_offsets[i]
        return random_bits(key, item.work.shape, item.work.device, offset)

    def store(written: Sequence[bool] | None = None) -> None:
        for i, stored in pending:  # second moments first: a normalized first moment is stored against them
            for item in sorted(stored, key=lambda item: item.key in SIGNED_KEYS):
                if written is not None and not written[i] and item.slot == rounding.PARAM_SLOT:
                    continue
                if item.fmt is not None:
                    blockwise.store_moment(states[i], item.key, item.work, item.fmt, bits16=bits(i, item))
                    continue
                if item.work is item.target:
                    continue  # already in its storage dtype: updated in place
                target = item.target
                is_param = item.slot == rounding.PARAM_SLOT  # moments: always stochastic (in 16 bits)
                mode = rounding.effective_rounding(rule.rounding, target.dtype) if is_param else "stochastic"
                if mode == "master":
                    split_into(item.work, target, states[i][MASTER_KEY])
                elif mode == "master24":
                    split_into(item.work, target, states[i][MASTER_KEY], bits(i, item))
                elif mode == "kahan":
                    target.copy_(item.work)  # p = rn(theta), c = rn(theta - p); 0 where p is not finite
                    rest = item.work - target.to(item.work.dtype)
                    states[i]["kahan_compensation"].copy_(torch.where(target.isfinite(), rest, 0))
                elif mode == "stochastic" and rounding.is_low_precision(target.dtype):
                    target.copy_(round_stochastic(item.work, target.dtype, bits(i, item)))
                else:
                    target.copy_(item.work)

    return work, store


__all__ = ["compute_dtype", "is_widened", "mix32", "random_bits", "round_stochastic", "step_key", "widened"]
