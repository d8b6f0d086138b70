"""Helpers for training with 16-bit weights: cast a model while keeping chosen modules
in fp32; read the weights an optimizer holds at full precision (:func:`master_weights`),
and set them from fp32 weights (:func:`load_master_weights`), so a bf16 run checkpoints
as fp32 weights and resumes from them, or an fp32 run moves to bf16 without losing its
weights' precision (under ``master_weights="fp32"``; a Kahan pair keeps about 16 bits).

Example::

    >>> model = adamkit.precision.cast_module(model, torch.bfloat16, keep=(torch.nn.LayerNorm,))
    >>> opt = adamkit.AdamW(model.parameters(), master_weights="fp32", state_precision="fp32")
    >>> for group in fp32_optimizer_state["param_groups"]:       # an adamkit state dict brings its run's
    ...     group.update(master_weights="fp32", state_precision="fp32")  # options: this run's, before loading
    >>> opt.load_state_dict(fp32_optimizer_state)                 # moments from the fp32 run, kept in fp32
    >>> adamkit.precision.load_master_weights(opt, fp32_weights)  # the fp32 weights, exactly
    >>> fp32_weights = adamkit.precision.master_weights(opt)      # and back, at any time

From there the run is the fp32 run's, bit for bit.  ``load_state_dict`` restores a state
dict's hyperparameters, as torch.optim does, and an adamkit state dict carries its
storage options (``master_weights``, ``state_precision``, ...) with them; a torch.optim
one does not, so this optimizer's options stand.  Set them in the state dict before
loading: loading casts each moment to its param's dtype where ``state_precision`` is
``None`` (the fp32 run's), and setting it afterwards cannot bring the bits back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .specs.master import MASTER_KEY, join_tensors, split_into
from .specs.rounding import is_low_precision
from .state import COMPENSATION_KEY, has_compensation, has_master_bits, init_state

#: normalization layers, usually kept in fp32: ``keep=NORMALIZATION_LAYERS``
NORMALIZATION_LAYERS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
)

Keep = tuple[type[nn.Module], ...] | Callable[[str, nn.Module], bool]


def cast_module(module: nn.Module, dtype: torch.dtype = torch.bfloat16, *, keep: Keep = ()) -> nn.Module:
    """Cast ``module``'s floating-point params and buffers to ``dtype``, except those of
    submodules matched by ``keep`` (module types, or a predicate ``(name, module)``),
    which stay as they are, with the params they share with others (a head tied to an
    embedding).  Returns ``module`` (cast in place, like ``Module.to``)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    matches = keep if callable(keep) else (lambda name, m: isinstance(m, keep))
    modules = list(module.named_modules(remove_duplicate=False))  # (a shared module under each of its names)
    kept = [name for name, m in modules if matches(name, m)]

    def is_kept(name: str) -> bool:  # the module, or one of its ancestors, is kept
        return any(k == "" or name == k or name.startswith(k + ".") for k in kept)

    # a param a kept module shares (a tied head) stays too: it is one tensor
    held = {id(t) for name, sub in modules if is_kept(name) for t in (*sub.parameters(False), *sub.buffers(False))}
    cast: dict[int, tuple[Tensor, Tensor]] = {}  # id -> (buffer, its cast), the buffer held so its id stays its
    for name, sub in modules:
        if is_kept(name):
            continue
        for param in sub.parameters(recurse=False):
            if param.is_floating_point() and id(param) not in held and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for key, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point() and id(buffer) not in held:
                if id(buffer) not in cast:  # (a buffer two modules share stays one tensor)
                    cast[id(buffer)] = (buffer, buffer.to(dtype))
                setattr(sub, key, cast[id(buffer)][1])
    return module


def master_weights(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The weights the optimizer holds, as new fp32 tensors (fp64 and complex params in
    their own dtype), one per param in ``state_dict`` order: under ``master_weights="fp32"`` the split master
    weight, exactly; under ``rounding="kahan"`` the sum p + c in fp32, as a step forms
    it; elsewhere the param itself, upcast.  An fp32 model state dict of a bf16 run::

        >>> weights = adamkit.precision.master_weights(opt)
        >>> fp32_state = {name: w for (name, _), w in zip(model.named_parameters(), weights)}
    """
    weights = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            wide = p.dtype if p.dtype == torch.float64 or p.is_complex() else torch.float32  # (complex: as it is)
            if MASTER_KEY in state and has_master_bits(p, group):
                weights.append(join_tensors(p, state[MASTER_KEY]).clone())
            elif COMPENSATION_KEY in state:
                weights.append(p.detach().to(wide) + state[COMPENSATION_KEY].to(wide))
            else:
                weights.append(p.detach().to(wide, copy=True))
    return weights


def load_master_weights(optimizer: torch.optim.Optimizer, weights: Iterable[Tensor] | Mapping[Tensor, Tensor]) -> None:
    """Set every param to an fp32 (or fp64) weight, keeping what its group can keep:
    under ``master_weights="fp32"`` the weight exactly (p and its low bits, split);
    under ``rounding="kahan"`` the pair :math:`p = rn(w)`, :math:`c = rn(w - p)`;
    elsewhere :math:`p = rn(w)`.  Resumes a bf16 run from an fp32 checkpoint, or moves
    an fp32 run to bf16: exactly under ``master_weights="fp32"``, to about 16 significant
    bits as a Kahan pair (both halves bf16).

    ``weights``: one tensor per param in the optimizer's order (that of its
    ``state_dict``: group by group), or a mapping from param to weight.  Raises
    ``ValueError`` naming the param when a shape differs; nothing is changed then.
    """
    _load(optimizer, weights, need_kahan=False)


def seed_compensation(optimizer: torch.optim.Optimizer, weights: Iterable[Tensor] | Mapping[Tensor, Tensor]) -> None:
    """:func:`load_master_weights` for ``rounding="kahan"`` groups: each 16-bit param
    becomes the Kahan pair of its weight.  Raises ``ValueError`` naming a 16-bit param
    whose group does not use Kahan rounding (nothing is changed then)."""
    _load(optimizer, weights, need_kahan=True)


def _load(optimizer, weights, *, need_kahan: bool) -> None:
    params = [(p, group) for group in optimizer.param_groups for p in group["params"]]
    if isinstance(weights, Mapping):
        pairs = [(p, group, weights[p]) for p, group in params if p in weights]
    else:
        weights = list(weights)
        if len(weights) != len(params):
            raise ValueError(f"weights has {len(weights)} tensors, but the optimizer has {len(params)} params")
        pairs = [(p, group, w) for (p, group), w in zip(params, weights)]
    for index, (p, group, w) in enumerate(pairs):
        where = f"param {index} (shape {tuple(p.shape)}, {p.dtype})"
        if w.shape != p.shape:
            raise ValueError(f"the weight for {where} has shape {tuple(w.shape)}")
        if need_kahan and is_low_precision(p.dtype) and group.get("rounding") != "kahan":
            raise ValueError(f"{where} is in a group with rounding={group.get('rounding')!r}; seeding needs 'kahan'")
    algorithm = getattr(optimizer, "algorithm", "adam")
    with torch.no_grad():
        for p, group, w in pairs:
            w = w.detach().to(p.device)
            if not (is_low_precision(p.dtype) and (has_master_bits(p, group) or has_compensation(p, group))):
                p.copy_(w)
                continue
            state = optimizer.state[p]
            init_state(state, p, group, algorithm)
            if has_master_bits(p, group):
                split_into(w.to(torch.float32), p, state[MASTER_KEY])
            else:
                p.copy_(w)
                state[COMPENSATION_KEY].copy_(w - p.to(w.dtype))  # exact in fp32 / fp64: rounded once


__all__ = ["NORMALIZATION_LAYERS", "cast_module", "load_master_weights", "master_weights", "seed_compensation"]
