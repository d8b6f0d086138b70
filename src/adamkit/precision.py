"""Helpers for training with 16-bit weights: cast a model while keeping chosen modules
in fp32, and move a run from fp32 to bf16 without losing the fp32 weights' precision
(seed the Kahan compensation from them).

Example::

    >>> model = adamkit.precision.cast_module(model, torch.bfloat16, keep=(torch.nn.LayerNorm,))
    >>> opt = adamkit.AdamW(model.parameters(), rounding="kahan")
    >>> opt.load_state_dict(fp32_optimizer_state)          # moments from the fp32 run
    >>> adamkit.precision.seed_compensation(opt, fp32_weights)  # p + c == the fp32 weights
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor, nn

from .rounding import is_low_precision
from .state import COMPENSATION_KEY, init_state

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
    which stay as they are.  Returns ``module`` (cast in place, like ``Module.to``)."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    matches = keep if callable(keep) else (lambda name, m: isinstance(m, keep))
    kept = [name for name, m in module.named_modules() if matches(name, m)]

    def is_kept(name: str) -> bool:  # the module, or one of its ancestors, is kept
        return any(k == "" or name == k or name.startswith(k + ".") for k in kept)

    for name, sub in module.named_modules():
        if is_kept(name):
            continue
        for param in sub.parameters(recurse=False):
            if param.is_floating_point():
                param.data = param.data.to(dtype)
        for key, buffer in sub.named_buffers(recurse=False):
            if buffer.is_floating_point():
                setattr(sub, key, buffer.to(dtype))
    return module


def seed_compensation(optimizer: torch.optim.Optimizer, weights: Iterable[Tensor] | Mapping[Tensor, Tensor]) -> None:
    """Set each 16-bit param of a ``rounding="kahan"`` group to the Kahan pair of its
    fp32 (or fp64) weight: :math:`p = rn(w)`, :math:`c = rn(w - p)`, so the run goes on
    from ``w`` itself rather than from ``w`` rounded to 16 bits.

    ``weights``: one tensor per param in the optimizer's order (that of its
    ``state_dict``: group by group), or a mapping from param to weight.  Params that
    are not 16-bit are set to their weight as they are.  Raises ``ValueError`` naming
    the param when a shape differs or its group does not use Kahan rounding; nothing
    is changed then.
    """
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
        if is_low_precision(p.dtype) and group.get("rounding") != "kahan":
            raise ValueError(f"{where} is in a group with rounding={group.get('rounding')!r}; seeding needs 'kahan'")
    algorithm = getattr(optimizer, "algorithm", "adam")
    with torch.no_grad():
        for p, group, w in pairs:
            w = w.detach().to(p.device)
            p.copy_(w)
            if not is_low_precision(p.dtype):
                continue
            state = optimizer.state[p]
            init_state(state, p, group, algorithm)
            state[COMPENSATION_KEY].copy_(w - p.to(w.dtype))  # exact in fp32 / fp64: rounded once


__all__ = ["NORMALIZATION_LAYERS", "cast_module", "seed_compensation"]
