"""Per-parameter optimizer state, laid out exactly as ``torch.optim`` lays it out.

Keys: ``step`` (a 0-d tensor), ``exp_avg`` and ``exp_avg_sq`` (Adam, NAdam, RAdam, ADOPT, StableAdamW;
``exp_inf`` for AdaMax), ``max_exp_avg_sq`` (AMSGrad) and NAdam's ``mu_product`` (a
0-d tensor), the moments shaped and strided like their param, so a ``state_dict`` moves between adamkit and torch.optim in both directions.

Beyond torch: the moments' dtype follows the group's ``state_precision`` (``None``:
the param's dtype, as torch); under ``"int8"``/``"int4"`` each moment is held as
block-wise codes and scales instead (``exp_avg_int8`` and ``exp_avg_int8_scales``,
see :mod:`adamkit.specs.quantization`).  A bf16/fp16 param under ``rounding="kahan"`` has
a ``kahan_compensation`` tensor in its own dtype, and under ``master_weights="fp32"`` a
bf16 param has ``master_low_bits`` (int16 bits, see :mod:`adamkit.specs.master`); torch.optim
ignores the extra keys.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import blockwise
from .algorithms import REGISTRY, FirstMomentScale, is_real_number, lookup
from .guard import overlaps_itself
from .rule import Algorithm
from .specs.master import LOW_BITS_DTYPE, MASTER_KEY, join_tensors, split_into
from .specs.quantization import FORMATS, PLAIN_FORMATS, format_for, is_quantized
from .specs.rounding import is_low_precision, needs_random_bits
from .statekeeping import ISSUABLE_DEVICES, issue

#: name of the second state tensor per algorithm, as torch.optim names it (read from the registry)
SECOND_MOMENT_KEY: dict[str, str] = {name: spec.second_moment_key for name, spec in REGISTRY.items()}

#: NAdam's running product of its momentum coefficients, a 0-d tensor beside ``step``
MU_PRODUCT_KEY = "mu_product"


def _scalar_dtype(fused: bool) -> torch.dtype:
    """torch's rule: float32 for fused, else float64 iff that is the default dtype."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_tensor(value: float, param: Tensor, group: dict) -> Tensor:
    """The ``step`` counter: on the param's device when capturable or fused, else on CPU.
    Its dtype is torch's, except where ``param`` draws random bits
    (:func:`draws_random_bits`): its stream of bits is keyed on the count, which must
    keep counting, so it is float64 there (exact to 2^53 steps; float32 stops at 2^24)."""
    fused = bool(group.get("fused"))
    dtype = torch.float64 if draws_random_bits(param, group) else _scalar_dtype(fused)
    if group.get("capturable") or fused:
        return torch.tensor(value, dtype=dtype, device=param.device)
    return torch.tensor(value, dtype=dtype)


def _converted_counter(key: str, value: float, param: Tensor, group: dict) -> Tensor:
    """A loaded counter of another dtype (an int64 ``step`` from an older checkpoint, a
    Python number) as :func:`step_tensor` holds it; a step count that dtype would round
    in float64 (float32 holds counts exactly only up to 2^24: 2^24 + 1 became 2^24 and
    stopped counting).  NAdam's ``mu_product``, a product of factors below 1, is
    rounded as torch rounds it."""
    counter = step_tensor(value, param, group)
    if key != "step" or float(counter) == value:
        return counter
    return torch.tensor(value, dtype=torch.float64, device=counter.device)


def draws_random_bits(param: Tensor, group: dict) -> bool:
    """Whether stepping ``param`` in ``group`` rounds stochastically (the param, a 24-bit
    master, or its moments held in 16 bits or quantized)."""
    master = {"fp32": "master", "24bit": "master24"}.get(group.get("master_weights"))
    precision = group.get("state_precision")
    try:
        storage = FORMATS.get(precision) or _real(state_dtype(param, precision))
    except ValueError:  # a combination the group's validation refuses
        return False
    return needs_random_bits(master or group.get("rounding", "nearest"), _real(param.dtype), storage)


def _real(dtype: torch.dtype) -> torch.dtype:
    return dtype.to_real() if dtype.is_complex else dtype


#: the state dtype asked for by ``state_precision``, for real and complex params
_STATE_DTYPES = {
    "fp32": {False: torch.float32, True: torch.complex64},
    "bf16": {False: torch.bfloat16, True: None},
}

COMPENSATION_KEY = "kahan_compensation"
#: the state key of the gradient sum an update's micro-batches build up where the
#: algorithm steps with their mean gradient (see :mod:`adamkit.accumulation`): param-shaped
ACCUMULATED_GRAD_KEY = "accumulated_grad"


def state_dtype(param: Tensor, state_precision: str | None) -> torch.dtype:
    """The dtype of ``param``'s moments under ``state_precision`` (quantized moments:
    the dtype they are dequantized to, fp32)."""
    if state_precision is None:
        return param.dtype
    if is_quantized(state_precision):
        if param.is_complex():
            raise ValueError(f"state_precision={state_precision!r} needs real params, but a param is {param.dtype}")
        return torch.float32
    dtype = _STATE_DTYPES[state_precision][param.is_complex()]
    if dtype is None:
        raise ValueError(f"state_precision={state_precision!r} needs real params, but a param is {param.dtype}")
    return dtype


def moment_keys(algorithm: Algorithm, amsgrad: bool) -> list[str]:
    """The state keys holding moments, in kernel order (first, second, AMSGrad maximum)."""
    return lookup(algorithm).moment_keys(amsgrad)


def has_compensation(param: Tensor, group: dict) -> bool:
    return group.get("rounding") == "kahan" and is_low_precision(param.dtype)


#: the state tensor each param rounding mode keeps beside a 16-bit param (see
#: :func:`adamkit.specs.rounding.effective_rounding`): Kahan's compensation, a split master's low bits
PARAM_EXTRA_KEY = {"kahan": COMPENSATION_KEY, "master": MASTER_KEY, "master24": MASTER_KEY}


def has_master_bits(param: Tensor, group: dict) -> bool:
    """Whether ``param`` is a bf16 param whose group keeps split master weights."""
    return group.get("master_weights") is not None and param.dtype == torch.bfloat16


def moment_value(state: dict, key: str, param: Tensor) -> Tensor | None:
    """Moment ``key`` as a tensor shaped like ``param`` (dequantized to fp32 if it is
    held quantized), or ``None`` if the state lacks it."""
    if key in state:
        return state[key]
    fmt = blockwise.stored_format(state, key, param.numel())
    return None if fmt is None else blockwise.load_moment(state, key, param.shape, fmt)


def moment_storage(state: dict, param: Tensor, algorithm: Algorithm):
    """How an initialised state holds its moments: the (real) dtype of its first moment
    (of its second, beside a second weight sequence: that is a weight), or the
    :class:`~adamkit.specs.quantization.QuantFormat` it is quantized in."""
    spec = lookup(algorithm)
    key = spec.second_moment_key if spec.weight_copy else "exp_avg"
    if key in state:
        value = state[key]
        return torch.view_as_real(value).dtype if value.is_complex() else value.dtype
    return blockwise.stored_format(state, key, param.numel())


def _new(state, tensor: Tensor) -> Tensor:
    """A tensor adamkit just allocated for ``state``, as the state keeps it: issued
    (:func:`adamkit.statekeeping.issue`) where the state is an optimizer's tracked one."""
    epoch = getattr(state, "epoch", None)
    if epoch is None or tensor.device.type not in ISSUABLE_DEVICES:
        return tensor
    return issue(tensor, epoch, fresh=True)


def _conform_moment(state: dict, key: str, param: Tensor, state_precision: str | None, normalizes: bool) -> bool:
    """Hold moment ``key`` as ``state_precision`` asks: allocate zeros, or convert
    what is there (a dtype cast, a quantization or a dequantization; ``normalizes``:
    whether a quantized format may normalize the algorithm's first moment, see
    :func:`adamkit.specs.quantization.format_for`).  Returns whether it allocated or
    converted.  Moments are converted in :func:`adamkit.blockwise.conversion_order`
    (a normalized first moment is read and stored by its second moment)."""
    target = format_for(state_precision, normalizes) if is_quantized(state_precision) else None
    held = blockwise.stored_format(state, key, param.numel())
    signed = key in blockwise.SIGNED_KEYS
    if target is not None and held is not None and held.holds_like(target, signed) and key not in state:
        scales = blockwise.stored_keys(key, target)[1]
        before = state[scales].dtype
        if blockwise.scales_held_as(state, key, target):  # else quantized again, below
            return state[scales].dtype != before
    dtype = state_dtype(param, state_precision)
    if target is None and held is None and key in state and state[key].dtype == dtype:
        return False
    value = moment_value(state, key, param)
    state.pop(key, None)
    if held is not None:
        blockwise.drop(state, key, held)
    if target is not None:
        blockwise.allocate(state, key, param, target)
        if value is not None:  # a loaded or converted moment: dequantized values are kept exactly
            blockwise.store_moment(state, key, value, target, restore=True)
    elif value is None:
        state[key] = _new(state, torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format))
    else:
        state[key] = _new(state, torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format).copy_(value))
    return True


def _conform_weight_copy(state: dict, key: str, param: Tensor, group: dict) -> bool:
    """Hold a second weight sequence (:attr:`~adamkit.algorithms.AlgorithmSpec.weight_copy`)
    at the precision the param's own value is kept at: fp32 where a 16-bit param keeps a
    split master or a Kahan compensation, else the param's dtype.  A copy of the param
    at first (its master's low bits are zero then), cast where that precision changed
    since (``model.half()``, an option switched).  Returns whether it allocated or converted."""
    exact = has_master_bits(param, group) or has_compensation(param, group)
    dtype = torch.float32 if exact else param.dtype
    held = state.get(key)
    if held is not None and held.dtype == dtype:
        return False
    source = param.detach() if held is None else held
    state[key] = _new(state, torch.empty_like(param, dtype=dtype, memory_format=torch.preserve_format).copy_(source))
    return True


def init_state(state: dict, param: Tensor, group: dict, algorithm: Algorithm) -> bool:
    """Fill an empty state dict for ``param`` (zeros, the param's layout), or bring an
    existing one in line with the group's ``state_precision``, ``rounding`` and
    ``master_weights``: moments are converted to the asked dtype or format, a Kahan
    compensation or a master weight's low bits are added (zero: the param is exact as
    it stands) or dropped.  Returns whether anything changed."""
    spec = lookup(algorithm)
    changed = not state
    if changed:
        state["step"] = _new(state, step_tensor(0.0, param, group))
    if spec.keeps_mu_product and MU_PRODUCT_KEY not in state:
        state[MU_PRODUCT_KEY] = _new(state, step_tensor(1.0, param, group))
        changed = True
    for key in ("step", MU_PRODUCT_KEY):
        if key in state and not _is_counter(state[key], _counter_dtype(key, param, group)):
            state[key] = _new(state, _converted_counter(key, float(state[key]), param, group))
            changed = True
    normalizes = spec.first_moment_scale != FirstMomentScale.NONE
    keys = spec.moment_keys(spec.amsgrad and bool(group.get("amsgrad")))
    for key in blockwise.conversion_order(state, keys, param.numel()):
        if key == spec.weight_copy:
            changed |= _conform_weight_copy(state, key, param, group)
        else:
            changed |= _conform_moment(state, key, param, group.get("state_precision"), normalizes)
    if has_compensation(param, group):
        held = state.get(COMPENSATION_KEY)
        if held is None or held.dtype != param.dtype:
            compensation = torch.zeros_like(param, memory_format=torch.preserve_format)
            state[COMPENSATION_KEY] = _new(state, compensation if held is None else compensation.copy_(held))
            changed = True
    elif state.pop(COMPENSATION_KEY, None) is not None:
        changed = True
    if has_master_bits(param, group):
        dtype = LOW_BITS_DTYPE[group["master_weights"]]
        held = state.get(MASTER_KEY)
        if held is None or held.dtype != dtype:  # zero: the master weight is the param as it stands
            state[MASTER_KEY] = _new(state, torch.zeros_like(param, dtype=dtype, memory_format=torch.preserve_format))
            if held is not None and held.dtype in LOW_BITS_DTYPE.values():  # fp32 <-> 24-bit: the master, to nearest
                with torch.no_grad():
                    split_into(join_tensors(param, held), param, state[MASTER_KEY])
            changed = True
    elif state.pop(MASTER_KEY, None) is not None:
        changed = True
    return changed


def fold_master(state: dict, param: Tensor) -> None:
    """When a state is loaded for a param no longer bf16 (``model.float()``, then
    ``optimizer.load_state_dict(optimizer.state_dict())`` as the step's error says), the
    param takes its split master's value: the low bits joined to the bf16 value it still
    holds, and dropped from the state.  A param holding a value bf16 cannot (set since:
    its low bits are stale) keeps its value; a 16-bit param, or low bits of no split's
    dtype, are left to the step (which drops or refuses them).  ``param`` is the
    param itself (not a shard or a host buffer: what it holds is what the model reads)."""
    low_bits = state.get(MASTER_KEY)
    if (
        low_bits is None
        or param.dtype not in (torch.float32, torch.float64)
        or low_bits.dtype not in LOW_BITS_DTYPE.values()
        or param.device.type == "meta"
    ):
        return
    with torch.no_grad():
        as_bf16 = param.to(torch.bfloat16)
        if torch.equal(as_bf16.to(param.dtype), param):
            param.copy_(join_tensors(as_bf16, low_bits.to(param.device)))
    del state[MASTER_KEY]


def fold_compensation(state: dict, param: Tensor) -> None:
    """:func:`fold_master` for a Kahan pair: a param no longer 16-bit takes the value
    p + c of its pair (exact in fp32: c is below half p's spacing, in p's 16-bit dtype),
    and the compensation is dropped.  A param holding a value the pair's dtype cannot
    (set since) keeps its value; one set since to values that dtype holds (zeros, a bf16
    checkpoint) cannot be told from the pair's own and takes the compensation too, as a
    split master's low bits are taken (load the state before editing the weights)."""
    compensation = state.get(COMPENSATION_KEY)
    if (
        compensation is None
        or param.dtype not in (torch.float32, torch.float64)
        or not is_low_precision(compensation.dtype)
        or param.device.type == "meta"
    ):
        return
    with torch.no_grad():
        if torch.equal(param.to(compensation.dtype).to(param.dtype), param):
            param.add_(compensation.to(device=param.device, dtype=param.dtype))
    del state[COMPENSATION_KEY]


def _counter_dtype(key: str, param: Tensor, group: dict) -> tuple[torch.dtype, ...]:
    """The dtypes a counter may be held in: float64 where the step keys a random stream
    (:func:`step_tensor`), else torch's float32 or float64 (NAdam's ``mu_product``: either)."""
    if key == "step" and draws_random_bits(param, group):
        return (torch.float64,)
    return (torch.float32, torch.float64)


def _is_counter(value, dtypes: tuple[torch.dtype, ...]) -> bool:
    return torch.is_tensor(value) and value.dtype in dtypes and value.numel() == 1


def check_saved_counters(state_dict: dict) -> None:
    """Refuse, by name, a saved counter that is neither a number nor a tensor, before
    torch's load turns it into something else (a string into a generator)."""
    places = {
        saved_id: f" of params[{j}] in param_groups[{i}]"
        for i, group in enumerate(state_dict.get("param_groups", []))
        for j, saved_id in enumerate(group.get("params", []))
    }
    for index, state in state_dict.get("state", {}).items():
        for key in ("step", MU_PRODUCT_KEY):
            value = state.get(key) if isinstance(state, dict) else None
            if isinstance(state, dict) and key in state and not (torch.is_tensor(value) or is_real_number(value)):
                raise ValueError(
                    f"state[{key!r}] = {value!r}{places.get(index, '')}: a counter must be a number or a one-element "
                    "tensor"
                )


def upgrade_step(state: dict, param: Tensor, group: dict, where: str = "") -> None:
    """Old checkpoints stored ``step`` (and NAdam's ``mu_product``) as a number; make
    it a tensor as torch does.  Anything else that is not a tensor (``None``, a string)
    is refused by name: ``ValueError``."""
    for key in ("step", MU_PRODUCT_KEY):
        value = state.get(key)
        if key not in state or torch.is_tensor(value):
            continue
        if not is_real_number(value):
            raise ValueError(f"state[{key!r}] = {value!r}{where}: a counter must be a number or a one-element tensor")
        state[key] = _converted_counter(key, float(value), param, group)


def check_state(state: dict, param: Tensor, algorithm: Algorithm, *, amsgrad: bool, where: str) -> None:
    """Raise ``ValueError`` if an existing state cannot be stepped with ``param``: a key
    is missing (a checkpoint from another optimizer, or AMSGrad switched on after the
    first step), a tensor's shape or device differs from the param's, a quantized
    moment's codes or scales are not those of the param's size, or a step counter is not
    one number >= 0, or a split master's low bits are in neither of their dtypes.  (What
    :func:`init_state` converts, other dtypes and layouts, is not checked.  Quantized
    moments are flat: a state made for a param of another shape with as many elements
    loads, row-major element by element; and int4 packs two codes a byte with no element
    count, so one made for 2n elements loads for 2n - 1 and back, its last element's
    codes dropped or read from the padding; no tensor is read or written past its end.)"""
    moments = moment_keys(algorithm, amsgrad)
    held_quantized = {key: blockwise.stored_format(state, key, param.numel()) for key in moments if key not in state}
    scalars = ["step", MU_PRODUCT_KEY] if lookup(algorithm).keeps_mu_product else ["step"]
    missing = [key for key in scalars + moments if key not in state and held_quantized.get(key) is None]
    for key in missing:
        check_quantized_sizes(state, key, param.numel(), where)
    if missing:
        hint = (
            " (amsgrad was switched on after the first step)"
            if missing == ["max_exp_avg_sq"]
            else " (was it saved by a different optimizer?)"
        )
        raise ValueError(f"the state{where} lacks {missing}; it has {sorted(state)}{hint}")
    for key in scalars:
        _check_counter(state[key], key, where)
    checked = [key for key in moments if key in state] + [key for key in (COMPENSATION_KEY, MASTER_KEY) if key in state]
    for key in checked:
        value = state[key]
        if not torch.is_tensor(value) or value.shape != param.shape or value.device != param.device:
            shown = (
                f"shape {tuple(value.shape)} on {value.device}"
                if torch.is_tensor(value)
                else f"a {type(value).__name__}"
            )
            raise ValueError(
                f"state[{key!r}]{where} is {shown}, but the param has shape {tuple(param.shape)} on {param.device}"
            )
        _check_own_memory(value, key, where)
    low_bits = state.get(MASTER_KEY)
    if low_bits is not None and low_bits.dtype not in LOW_BITS_DTYPE.values():
        raise ValueError(
            f"state[{MASTER_KEY!r}]{where} holds {low_bits.dtype}, but a split master's low bits are int16 patterns "
            "in a bfloat16 tensor (master_weights='fp32') or int8 (master_weights='24bit'): a state loaded into "
            f"another optimizer was cast (torch.optim casts its state to the params' dtype). Pop {MASTER_KEY!r} "
            "from the state (the master is then the param as it stands), or set the weights with "
            "adamkit.precision.load_master_weights"
        )
    for key, fmt in held_quantized.items():
        for stored in blockwise.stored_keys(key, fmt):
            value = state[stored]
            if value.device != param.device:
                raise ValueError(f"state[{stored!r}]{where} is on {value.device}, but the param is on {param.device}")
            _check_own_memory(value, stored, where)
        codes = state[blockwise.stored_keys(key, fmt)[0]]
        if codes.dtype != torch.uint8:
            raise ValueError(
                f"state[{blockwise.stored_keys(key, fmt)[0]!r}]{where} holds {codes.dtype} codes; they are uint8"
            )


def _check_own_memory(value: Tensor, key: str, where: str) -> None:
    """A state tensor whose elements share memory (an expanded view) cannot hold one
    value per element: refused before anything steps (torch's in-place update fails on it
    midway)."""
    if overlaps_itself(value):
        raise ValueError(
            f"state[{key!r}]{where} has elements that share memory (shape {tuple(value.shape)}, strides "
            f"{value.stride()}: an expanded view?); each element needs memory of its own (clone() it)"
        )


def check_quantized_sizes(state: dict, key: str, numel: int, where: str) -> None:
    """A moment held quantized, but in codes or scales of another size than its param's
    ``numel`` elements (a checkpoint of another model, or one edited by hand): say so."""
    signed = key in blockwise.SIGNED_KEYS
    for fmt in (*FORMATS.values(), *PLAIN_FORMATS.values()):
        codes, scales = blockwise.stored_keys(key, fmt)
        if codes in state or scales in state:
            held = ", ".join(
                f"state[{k!r}] holds {state[k].numel() if torch.is_tensor(state[k]) else 'no tensor'}"
                for k in (codes, scales)
                if k in state
            )
            raise ValueError(
                f"{key} is held in {fmt.name}{where}, but {held}: a param of {numel} elements needs "
                f"{fmt.code_bytes(numel)} code bytes and {fmt.blocks(numel, signed)} block scales "
                f"(a checkpoint of another model, or edited by hand?)"
            )


def _check_counter(value, key: str, where: str) -> None:
    """A step counter (or NAdam's ``mu_product``) is one finite number; a step count is >= 0."""
    number = None
    if (
        torch.is_tensor(value)
        and value.numel() == 1
        and (value.is_floating_point() or not value.is_complex())
        and value.dtype != torch.bool
    ):
        number = float(value.detach().reshape(()).item()) if value.device.type != "meta" else 0.0
    elif is_real_number(value):
        number = float(value)
    if number is None or not math.isfinite(number) or (key == "step" and number < 0):
        shown = (
            f"a tensor of shape {tuple(value.shape)}" if torch.is_tensor(value) and value.numel() != 1 else repr(value)
        )
        what = "a step count is one number >= 0" if key == "step" else "it is one finite number"
        raise ValueError(f"state[{key!r}]{where} is {shown}: {what}")
