"""Checkpoints: adamkit's state dicts, and converting them to and from the
full-precision layout of ``torch.optim.Adam`` / ``AdamW`` / ``Adamax``.

The optimizer's ``state_dict`` and ``load_state_dict`` are torch.optim's, finished
by :func:`export_state` and :func:`import_state`: sharded (DTensor) params' moments
leave as fp32 and come back cut to this rank's shard, and tensors adamkit keeps in
their own dtype come back unrounded.

A quantized state dict stores each moment as codes and block scales (see
:mod:`adamkit.specs.quantization`), flat, so converting needs the params' shapes: pass the
params (or their shapes) in ``state_dict`` order, i.e.
``[p for g in optimizer.param_groups for p in g["params"]]``.

Example::

    >>> full = adamkit.convert.to_full_precision(adamkit_opt.state_dict(), params)
    >>> torch_opt.load_state_dict(full)                      # torch.optim.AdamW
    >>> adamkit_opt.load_state_dict(adamkit.convert.to_quantized(torch_opt.state_dict(), params, "int8"))

Loading torch.optim's state dict into an optimizer with ``state_precision="int8"`` also
works directly: its moments are quantized at the next step.  An adamkit state dict
brings its groups' ``state_precision`` with it (as torch.optim's ``load_state_dict``
brings every option of its groups): to go on in int8 from an fp32 run, load
:func:`to_quantized` of it, or set ``state_precision`` in the param groups after loading.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from . import blockwise, offload, sharding
from .algorithms import REGISTRY, FirstMomentScale, lookup
from .specs.master import LOW_BITS_DTYPE, MASTER_KEY, uncast_low_bits
from .specs.quantization import FORMATS, format_for
from .state import check_quantized_sizes, fold_compensation, fold_master, moment_keys

#: every moment key a quantized state may hold quantized: each registered algorithm's,
#: AMSGrad's maximum included (a weight copy in a moment's place, schedule-free's z, is
#: never quantized)
MOMENT_KEYS = tuple(
    dict.fromkeys(
        key for spec in REGISTRY.values() for key in spec.moment_keys(amsgrad=spec.amsgrad) if key != spec.weight_copy
    )
)


#: options that say where this run keeps its state, not how it trains: a loaded state
#: dict does not change them (a checkpoint moves between resident and offloaded runs)
PLACEMENT_KEYS = frozenset({"offload"})


def _shapes(params: Sequence[Tensor | torch.Size | Sequence[int]]) -> list[torch.Size]:
    return [p.shape if isinstance(p, Tensor) else torch.Size(p) for p in params]


def _param_ids(state_dict: dict) -> list:
    return [i for group in state_dict["param_groups"] for i in group["params"]]


def _check_count(state_dict: dict, shapes: list) -> None:
    ids = _param_ids(state_dict)
    if len(ids) != len(shapes):
        raise ValueError(f"params has {len(shapes)} entries, but the state dict's param_groups hold {len(ids)} params")


def _states_and_shapes(state_dict: dict, params: Sequence) -> tuple[dict, list[tuple]]:
    """A deep copy of ``state_dict`` and its (param id, state, shape) for every param with state."""
    shapes = _shapes(params)
    _check_count(state_dict, shapes)
    result = copy.deepcopy(state_dict)
    states = [(i, result["state"].get(i), shape) for i, shape in zip(_param_ids(result), shapes)]
    return result, [(i, state, shape) for i, state, shape in states if state]


def to_full_precision(state_dict: dict, params: Sequence) -> dict:
    """A copy of ``state_dict`` with every quantized moment dequantized into an fp32
    tensor of its param's shape, under torch.optim's key; groups get
    ``state_precision=None``.  Loads into torch.optim (which casts to the params' dtype)."""
    result, states = _states_and_shapes(state_dict, params)
    for saved_id, state, shape in states:
        for key in MOMENT_KEYS:
            fmt = blockwise.stored_format(state, key, shape.numel())
            if fmt is not None:
                state[key] = blockwise.load_moment(state, key, shape, fmt)
                blockwise.drop(state, key, fmt)
            elif key not in state:  # codes of another size than this param's: params in another order?
                where = f" in state[{saved_id}] (given a param of shape {tuple(shape)})"
                check_quantized_sizes(state, key, shape.numel(), where)
    for group in result["param_groups"]:
        if group.get("state_precision") in FORMATS:
            group["state_precision"] = None
    return result


def to_quantized(state_dict: dict, params: Sequence, state_precision: str, *, algorithm: str | None = None) -> dict:
    """A copy of a full-precision ``state_dict`` (torch.optim's or adamkit's) with every
    moment quantized in ``state_precision`` (``"int8"`` or ``"int4"``), and groups set to it,
    in the format the optimizer keeps (ADOPT's first moment, normalized already, is
    stored plain).  ``algorithm`` (a registry name, e.g. ``"adopt"``): whose state it is;
    ``None`` tells it from each group's options (an ADOPT group holds ``clip_exponent``)."""
    if state_precision not in FORMATS:
        raise ValueError(f"Invalid state_precision: {state_precision!r} (allowed: {', '.join(map(repr, FORMATS))})")
    named = REGISTRY.get(algorithm) if algorithm is not None else None
    if algorithm is not None and named is None:
        raise ValueError(f"Invalid algorithm: {algorithm!r} (allowed: {', '.join(map(repr, REGISTRY))})")
    result, states = _states_and_shapes(state_dict, params)
    formats = {}
    for group in result["param_groups"]:
        spec = named or _algorithm_of(group)
        fmt = format_for(state_precision, spec.first_moment_scale != FirstMomentScale.NONE)
        formats.update((param_id, fmt) for param_id in group["params"])
        group["state_precision"] = state_precision
    for param_id, state, shape in states:
        for key in blockwise.second_moments_first(MOMENT_KEYS):  # (a first moment may be normalized by them)
            if key in state:
                value = state.pop(key)
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(
                        f"state[{param_id}][{key!r}] has shape {tuple(value.shape)}, the param {tuple(shape)}"
                    )
                if value.is_complex():  # (its imaginary part would be dropped)
                    raise ValueError(
                        f"state[{param_id}][{key!r}] is {value.dtype}: quantized states need real params, as "
                        f"state_precision={state_precision!r} does"
                    )
                blockwise.allocate(state, key, value, formats[param_id])
                blockwise.store_moment(state, key, value, formats[param_id], restore=True)
    return result


def _algorithm_of(group: dict):
    """The registered algorithm whose own hyperparameters ``group`` holds (Adam's, which
    has none, where no other's are all there)."""
    held = [spec for spec in REGISTRY.values() if spec.hyperparameters and set(spec.hyperparameters) <= set(group)]
    return held[0] if len(held) == 1 else REGISTRY["adam"]


def export_state(optimizer, state_dict: dict, *, full_precision: bool) -> dict:
    """Finish torch.optim's ``state_dict`` of ``optimizer``: a sharded (DTensor)
    param's quantized moments become fp32 DTensors under torch's keys, so the
    checkpoint does not depend on the number of ranks (see :mod:`adamkit.sharding`);
    with ``full_precision``, every param's do.  Each param's state is exported as a
    plain dict."""
    states, moments = state_dict["state"], moment_keys(optimizer.algorithm, True)
    for index, param in enumerate(p for g in optimizer.param_groups for p in g["params"]):
        if index in states and (full_precision or sharding.is_sharded(param)):
            states[index] = sharding.exported_state(states[index], param, moments)
    for index, state in states.items():  # the plain dicts torch.optim exports, not the optimizer's tracked ones
        states[index] = dict(state)
    return state_dict


def split_offloaded(optimizer, state_dict: dict, options_before: list[dict]) -> tuple[dict, dict]:
    """``state_dict`` less the states of params whose group is offloaded (torch would
    load them onto the params' device), and those states by param."""
    offloaded = {}
    params = [(p, before) for g, before in zip(optimizer.param_groups, options_before) for p in g["params"]]
    for saved_id, (param, before) in zip(_param_ids(state_dict), params):
        if before.get("offload") is not None and saved_id in state_dict["state"]:
            offloaded[saved_id] = param
    if not offloaded:
        return state_dict, {}
    states = {key: value for key, value in state_dict["state"].items() if key not in offloaded}
    host_states = {param: state_dict["state"][key] for key, param in offloaded.items()}
    return {**state_dict, "state": states}, host_states


def load_offloaded(optimizer, host_states: dict) -> None:
    """Load each offloaded param's saved state into host memory, cast as torch.optim
    casts a state for its param (floating-point tensors to the param's dtype; ``step``
    as saved), but on the host."""
    for param, saved in host_states.items():
        optimizer.state[param] = {
            key: (
                value
                if not torch.is_tensor(value)
                else value.to(device=offload.HOST)
                if key == "step" or not param.is_floating_point()
                else value.to(dtype=param.dtype, device=offload.HOST)
            )
            for key, value in saved.items()
        }


def import_state(optimizer, state_dict: dict, options_before: list[dict]) -> None:
    """Finish torch.optim's ``load_state_dict`` of ``state_dict`` into ``optimizer``.

    ``options_before``: each group's adamkit options before loading; a torch.optim
    state dict lacks them, and they keep those values rather than falling back to
    defaults; :data:`PLACEMENT_KEYS` keep theirs whatever the state dict says.  torch
    casts every loaded state tensor to its param's dtype: tensors
    adamkit keeps in their own dtype (quantized codes and scales; moments under a
    ``state_precision``; a second weight sequence, held in fp32 beside a 16-bit param's
    split master or Kahan compensation) are copied again from the saved tensors, so
    nothing is rounded on the way in (the step converts any remaining mismatch).  For sharded
    params, full tensors (a single-process checkpoint) are cut to this rank's shard.
    A split master's low bits another optimizer cast are restored, and a param no
    longer bf16 takes its master (:func:`adamkit.state.fold_master`), or its Kahan
    pair's p + c (:func:`adamkit.state.fold_compensation`).
    """
    moments = moment_keys(optimizer.algorithm, True)
    weight_copy = lookup(optimizer.algorithm).weight_copy  # a weight, not a moment: never cast
    for group, saved, before in zip(optimizer.param_groups, state_dict["param_groups"], options_before):
        group.update((key, value) for key, value in before.items() if key not in saved or key in PLACEMENT_KEYS)
    saved_ids = _param_ids(state_dict)
    params = [(p, g) for g in optimizer.param_groups for p in g["params"]]
    loaded = []
    for saved_id, (param, group) in zip(saved_ids, params):
        saved, state = state_dict["state"].get(saved_id), optimizer.state.get(param)
        if not saved or not state:
            continue
        for key, value in saved.items():
            if key == "step" or not torch.is_tensor(value) or key not in state:
                continue
            if key in moments and key != weight_copy and group["state_precision"] is None:
                continue  # torch's behaviour: moments follow the param's dtype
            if state[key].dtype != value.dtype:
                state[key] = value.to(device=offload.host_device_of(group, param.device), copy=True)
        _uncast_master_bits(state, group, saved_id)
        if sharding.is_sharded(param):
            sharding.shard_loaded_state(state, param, moments)
        else:
            loaded.append((state, param))
    for state, param in loaded:  # (last: a param takes its master only once nothing can fail the load)
        fold_master(state, param)
        fold_compensation(state, param)


def _uncast_master_bits(state: dict, group: dict, saved_id) -> None:
    """A split master's low bits that passed through another optimizer (torch.optim
    casts them to its params' dtype) back in the dtype of the group's ``master_weights``
    (the saved group's: its options win), or a ``ValueError`` where they cannot be."""
    low, mode = state.get(MASTER_KEY), group.get("master_weights")
    if low is None or mode is None:
        return
    restored = uncast_low_bits(low, mode)
    if restored is None:
        raise ValueError(
            f"state[{saved_id}][{MASTER_KEY!r}] holds {low.dtype} values that no cast of master_weights={mode!r} "
            f"low bits ({LOW_BITS_DTYPE[mode]}) can make: pop {MASTER_KEY!r} from the state (the master is then the "
            "param as it stands), or set the weights with adamkit.precision.load_master_weights"
        )
    if restored is not low:
        state[MASTER_KEY] = restored


@contextmanager
def full_precision_export(optimizer) -> Iterator:
    """Within this context, ``optimizer.state_dict()`` exports every quantized moment as
    an fp32 tensor under torch.optim's key, as it always does for sharded (DTensor)
    params.  It is the form a ``torch.distributed.checkpoint`` must have to move between
    one process and several: wrap the single process's ``get_state_dict`` (for
    ``dcp.save``, or for ``dcp.load`` and ``set_state_dict``) in it.  Loading quantizes
    again; where the blocks are those the values were saved from, every value is kept
    bit for bit (:func:`adamkit.blockwise.restore_into`).

    Example::

        >>> with adamkit.convert.full_precision_export(optimizer):
        ...     model_state, optim_state = get_state_dict(model, optimizer)
        ...     dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
        ...     set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    """
    with optimizer.full_precision_state_dict():
        yield optimizer


__all__ = ["MOMENT_KEYS", "export_state", "full_precision_export", "import_state", "to_full_precision", "to_quantized"]
