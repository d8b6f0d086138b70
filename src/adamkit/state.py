"""Per-parameter optimizer state, laid out exactly as ``torch.optim`` lays it out.

Keys: ``step`` (a 0-d tensor), ``exp_avg`` and ``exp_avg_sq`` (Adam; ``exp_inf``
for AdaMax) and ``max_exp_avg_sq`` (AMSGrad), each shaped and strided like its
param, so a ``state_dict`` moves between adamkit and torch.optim in both directions.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rule import Algorithm

#: name of the second state tensor per algorithm, as torch.optim names it
SECOND_MOMENT_KEY: dict[str, str] = {"adam": "exp_avg_sq", "adamax": "exp_inf"}


def _scalar_dtype(fused: bool) -> torch.dtype:
    """torch's rule: float32 for fused, else float64 iff that is the default dtype."""
    if fused:
        return torch.float32
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_tensor(value: float, param: Tensor, group: dict) -> Tensor:
    """The ``step`` counter: on the param's device when capturable or fused, else on CPU."""
    fused = bool(group.get("fused"))
    if group.get("capturable") or fused:
        return torch.tensor(value, dtype=_scalar_dtype(fused), device=param.device)
    return torch.tensor(value, dtype=_scalar_dtype(False))


def init_state(state: dict, param: Tensor, group: dict, algorithm: Algorithm) -> None:
    """Fill an empty state dict for ``param`` (zeros, the param's layout)."""
    state["step"] = step_tensor(0.0, param, group)
    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    state[SECOND_MOMENT_KEY[algorithm]] = torch.zeros_like(param, memory_format=torch.preserve_format)
    if algorithm == "adam" and group.get("amsgrad"):
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)


def upgrade_step(state: dict, param: Tensor, group: dict) -> None:
    """Old checkpoints stored ``step`` as a number; make it a tensor as torch does."""
    if state and not torch.is_tensor(state["step"]):
        state["step"] = step_tensor(float(state["step"]), param, group)


def check_state(state: dict, param: Tensor, algorithm: Algorithm, *, amsgrad: bool, where: str) -> None:
    """Raise ``ValueError`` if an existing state cannot be stepped with ``param``: a key
    is missing (a checkpoint from another optimizer, or AMSGrad switched on after the
    first step) or a tensor's shape or device differs from the param's."""
    required = ["step", "exp_avg", SECOND_MOMENT_KEY[algorithm]] + (["max_exp_avg_sq"] if amsgrad else [])
    missing = [key for key in required if key not in state]
    if missing:
        hint = (
            " (amsgrad was switched on after the first step)"
            if missing == ["max_exp_avg_sq"]
            else " (was it saved by a different optimizer?)"
        )
        raise ValueError(f"the state{where} lacks {missing}; it has {sorted(state)}{hint}")
    for key in required[1:]:
        value = state[key]
        if value.shape != param.shape or value.device != param.device:
            raise ValueError(
                f"state[{key!r}]{where} has shape {tuple(value.shape)} on {value.device}, "
                f"but the param has shape {tuple(param.shape)} on {param.device}"
            )
