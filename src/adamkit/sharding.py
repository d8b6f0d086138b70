r"""Sharded params (``torch.distributed`` DTensors, as FSDP2's ``fully_shard`` makes
them): every kernel steps each rank's *local shard* as an ordinary tensor.

Adam is element-wise, so stepping the shards is stepping the whole tensor; no
communication is needed, except for the two per-tensor reductions (StableAdamW's RMS, a
cautious update's count): their per-shard sums are totalled over the ranks that hold the
param's other shards (:func:`per_tensor_totals`).  What is kept global is the *state's layout*:

- Param-shaped state (``exp_avg``, ``exp_avg_sq``/``exp_inf``, ``max_exp_avg_sq``,
  ``kahan_compensation``) is a DTensor laid out like its param, exactly as
  ``torch.optim.Adam`` keeps it, so ``torch.distributed.checkpoint`` reshards it
  (2 processes to 1 and back) like the param itself.
- Quantized moments (``state_precision="int8"``/``"int4"``) are held per shard:
  each rank cuts *its* shard into blocks from the shard's first element, so no block
  straddles a shard boundary.  When every shard starts at a multiple of the block
  size (256 elements for int8, 128 for int4; e.g. FSDP2 on a 512-wide layer with 2
  ranks), the blocks are exactly those of the unsharded tensor and sharded training
  equals single-process training.  Otherwise a block is cut in two at a boundary
  (each part keeps its own scale).
- ``state_dict()`` exports a sharded param's quantized moments as fp32 DTensors under
  torch.optim's keys (:func:`exported_state`): the checkpoint does not depend on the
  number of ranks, and loading quantizes each rank's shard again, recovering the codes
  and scales the values came from (:func:`adamkit.blockwise.restore_into`), so a
  save/load round trip is exact.  The export holds fp32 moments for the time of the
  save.  A single process exports the same form within
  :func:`adamkit.convert.full_precision_export`.
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence

from torch import Tensor

from . import blockwise
from .algorithms import REGISTRY
from .specs.master import MASTER_KEY
from .state import ACCUMULATED_GRAD_KEY, COMPENSATION_KEY

#: state keys whose tensors are shaped (and, for a sharded param, sharded) like the param
PARAM_SHAPED_KEYS = frozenset(
    {
        "exp_avg",
        "max_exp_avg_sq",
        COMPENSATION_KEY,
        MASTER_KEY,
        ACCUMULATED_GRAD_KEY,
        *(key for spec in REGISTRY.values() for key in spec.moment_keys(True)),
    }
)


def is_sharded(t: object) -> bool:
    """Whether ``t`` is a DTensor (no DTensor exists before its module is imported,
    so plain tensors never need the import)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t):
    """A DTensor's local shard (a view sharing its storage); anything else as it is."""
    return t.to_local() if is_sharded(t) else t


def element_offset(param) -> int:
    """The row-major index, in the whole param, of the first element of this rank's
    shard of ``param`` (0 for a tensor that is not sharded).  Stochastic rounding draws
    element ``i``'s bits from that index, so a shard rounds as the whole tensor would.
    A shard that is not one run of the whole tensor's row-major order (a block of
    several rows cut along a later dimension, as a 2-D mesh may cut it) counts from 0:
    its bits differ from the unsharded run's, and every such shard of the param draws
    the same bits at the same local position (each element's rounding stays unbiased;
    neighbouring shards' rounding errors are alike)."""
    if not is_sharded(param):
        return 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    except ImportError:  # pragma: no cover - older torch
        from torch.distributed._tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return _run_start(tuple(shape), tuple(offset), tuple(param.shape))


def _run_start(shape: tuple[int, ...], offset: tuple[int, ...], whole: tuple[int, ...]) -> int:
    r"""Where the box of ``shape`` at ``offset`` in a tensor shaped ``whole`` starts in its
    row-major order, :math:`\sum_j o_j \prod_{i>j} W_i`, if the box is one run of that
    order; else 0.  It is one run when it spans a single index in every dimension before
    the last one it cuts (:math:`s_j = 1` for :math:`j < k`, :math:`k` the last with
    :math:`s_k \ne W_k`): then its elements follow each other in the whole tensor.  An
    empty box starts at 0."""
    if math.prod(shape) == 0:
        return 0
    cut = [j for j, (size, full) in enumerate(zip(shape, whole)) if size != full]
    if cut and any(size != 1 for size in shape[: cut[-1]]):
        return 0
    return int(sum(start * math.prod(whole[j + 1 :]) for j, start in enumerate(offset)))


def like_param(local_value: Tensor, param) -> Tensor:
    """``local_value``, a tensor shaped like ``param``'s local shard, as a DTensor
    laid out like ``param`` (same mesh, placements, global shape and stride)."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        local_value, param.device_mesh, param.placements, run_check=False, shape=param.shape, stride=param.stride()
    )


class LocalState(MutableMapping):
    """A sharded param's state dict seen through its local shard: DTensor values read
    as their local tensors (views: in-place updates land in the DTensor), and
    param-shaped tensors written are stored as DTensors laid out like the param."""

    def __init__(self, state: dict, param) -> None:
        self.state, self.param = state, param

    def __getitem__(self, key: str):
        return local(self.state[key])

    def __setitem__(self, key: str, value) -> None:
        if key in PARAM_SHAPED_KEYS and isinstance(value, Tensor) and not is_sharded(value):
            value = like_param(value, self.param)
        self.state[key] = value

    def __delitem__(self, key: str) -> None:
        del self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def local_view(params: Sequence[Tensor], grads: Sequence[Tensor], state_table) -> tuple[list, list, dict]:
    """Local shards of ``params`` and ``grads``, and a state table keyed by the local
    params whose entries are :class:`LocalState` views of the params' states."""
    local_params = [local(p) for p in params]
    table = {
        lp: LocalState(state_table[p], p) if is_sharded(p) else state_table[p] for lp, p in zip(local_params, params)
    }
    return local_params, [local(g) for g in grads], table


def sum_over_shards(values: Tensor, param) -> Tensor:
    """``values`` (per-shard sums, on the host) summed over the ranks that hold
    different shards of ``param``, i.e. over the mesh dimensions it is sharded along;
    ranks that replicate it are not counted twice."""
    import torch.distributed as dist

    for dim, placement in enumerate(param.placements):
        if placement.is_shard():
            group = param.device_mesh.get_group(dim)
            on_mesh = values.to(param.device_mesh.device_type)
            dist.all_reduce(on_mesh, group=group)
            values = on_mesh.cpu()
    return values


def per_tensor_totals(values: Tensor, shards: Sequence | None) -> Tensor:
    """``values``, one row of per-shard sums per param (float64, any device), with each
    sharded param's row summed over the ranks holding its other shards (``shards``: the
    params as the optimizer holds them, DTensors or plain tensors, aligned with the rows;
    ``None``: nothing is sharded).  Rows of params laid out alike go in one collective
    per mesh dimension; every rank must call this with the same params.  This is what
    makes a per-tensor reduction (StableAdamW's clipping, a cautious update's count) see
    the whole param."""
    if shards is None:
        return values
    layouts: dict[tuple, list[int]] = {}
    for row, param in enumerate(shards):
        if is_sharded(param):
            layouts.setdefault((id(param.device_mesh), tuple(param.placements)), []).append(row)
    if not layouts:
        return values
    values = values.clone()
    for rows in layouts.values():
        totals = sum_over_shards(values[rows].cpu(), shards[rows[0]])
        values[rows] = totals.to(values.device)
    return values


def whole_param_totals(shards: Sequence | None) -> list[Callable[[Tensor], Tensor]] | None:
    """Per param of ``shards`` (as in :func:`per_tensor_totals`), the function that sums a
    1-D tensor of its local shard's values over the whole param (one row of
    :func:`per_tensor_totals`): what the per-tensor paths reduce with
    (:attr:`adamkit.kernels.types.GroupTensors.totals`).  ``None`` if ``shards`` is."""
    if shards is None:
        return None
    return [functools.partial(_whole_param_row, shard) for shard in shards]


def _whole_param_row(shard, local: Tensor) -> Tensor:
    return per_tensor_totals(local.reshape(1, -1), [shard])[0]


def exported_state(state: dict, param, moment_keys: Sequence[str]) -> dict:
    """``state`` with its quantized moments as fp32 tensors under their torch.optim
    keys (DTensors laid out like ``param`` if it is sharded); the rest as held.  This
    is how ``state_dict()`` exports a sharded param's state."""
    sharded = is_sharded(param)
    held_state, held_param = (LocalState(state, param), local(param)) if sharded else (state, param)
    held = {key: blockwise.stored_format(held_state, key, held_param.numel()) for key in moment_keys}
    held = {key: fmt for key, fmt in held.items() if fmt is not None and key not in state}
    if not held:
        return state
    stored = {name for key, fmt in held.items() for name in blockwise.stored_keys(key, fmt)}
    exported = {key: value for key, value in state.items() if key not in stored}
    for key, fmt in held.items():
        value = blockwise.load_moment(held_state, key, held_param.shape, fmt)
        exported[key] = like_param(value, param) if sharded else value
    return exported


def shard_loaded_state(state: dict, param, moment_keys: Sequence[str]) -> None:
    """Lay a sharded param's loaded state out like the param: DTensors and full
    tensors alike (a single process's state dict); full quantized moments are
    dequantized first (the next step quantizes this rank's shard)."""
    for key in moment_keys:
        fmt = blockwise.stored_format(state, key, param.numel())
        if key not in state and fmt is not None and local(param).numel() != param.numel():
            state[key] = blockwise.load_moment(state, key, param.shape, fmt)
            blockwise.drop(state, key, fmt)
    for key in PARAM_SHAPED_KEYS & state.keys():
        state[key] = localized(state[key], param)


def localized(value, param) -> Tensor:
    """A loaded state tensor for sharded ``param`` as a DTensor laid out like it: a
    DTensor is redistributed if its layout differs; a full (unsharded) tensor of the
    param's shape is cut to this rank's shard."""
    from torch.distributed.tensor import DTensor, Replicate

    if not is_sharded(value):  # every rank holds the whole tensor: cutting it needs no communication
        value = DTensor.from_local(value.to(param.device), param.device_mesh, [Replicate()] * param.device_mesh.ndim)
    if value.placements == param.placements and value.device_mesh == param.device_mesh:
        return value
    return value.redistribute(param.device_mesh, param.placements)


__all__ = [
    "PARAM_SHAPED_KEYS",
    "LocalState",
    "exported_state",
    "element_offset",
    "is_sharded",
    "like_param",
    "per_tensor_totals",
    "sum_over_shards",
    "local",
    "local_view",
    "localized",
    "shard_loaded_state",
    "whole_param_totals",
]
