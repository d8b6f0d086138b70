"""Oracles: the NumPy reference run over the same params and gradients as an optimizer,
and an optimizer loaded to check another."""

from __future__ import annotations

import copy

import numpy as np
from matrix import GROUP_LRS, Case, gradients, numpy_of

from adamkit import reference


def run_reference(case: Case, groups: list[dict], steps: int, seed: int = 1, betas=(0.9, 0.999)):
    """Returns (params, states) as float64 NumPy arrays, flattened over groups."""
    step_fn = reference.STEP_FUNCTIONS[case.algorithm]
    hps, thetas = [], []
    for group_index, group in enumerate(groups):
        hp = case.reference_hyperparameters(lr=GROUP_LRS[group_index], max_lr=GROUP_LRS[group_index])
        hp.beta1, hp.beta2 = betas
        for p in group["params"]:
            hps.append(hp)
            thetas.append(numpy_of(p).astype(np.complex128 if p.is_complex() else np.float64))
    states = [reference.ReferenceState() for _ in thetas]
    for grads in gradients(groups, steps, seed):
        for i, grad in enumerate(grads):
            if grad is not None:
                g = numpy_of(grad).astype(thetas[i].dtype)
                thetas[i] = step_fn(thetas[i], g, states[i], hps[i])
    return thetas, states


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (normwise, so zeros don't divide)."""
    if expected.size == 0:
        return 0.0
    scale = np.max(np.abs(expected))
    return float(np.max(np.abs(actual - expected)) / (scale if scale > 0 else 1.0))


def stored_reference_step(
    algorithm: str,
    stored: dict,
    grad: np.ndarray,
    hp: reference.Hyperparameters,
    *,
    param_dtype,
    state_dtype,
    rounding_mode: str,
    seed: int | None,
    param_index: int,
) -> dict:
    """One step of the float64 reference on values as a kernel stores them, then
    stored as :mod:`adamkit.rounding` specifies.

    ``stored`` holds float64 arrays of the param (``param``), its Kahan compensation
    (``compensation``, may be absent), the moments and the step count before the
    step.  Returns the expected stored values after the step, the unrounded float64
    results (``exact``) and the random bits each stochastically rounded value used.
    """
    import torch

    from adamkit import rounding

    theta = stored["param"] + stored.get("compensation", 0.0)
    state = reference.ReferenceState(
        step=stored["step"],
        exp_avg=stored["exp_avg"].copy(),
        exp_avg_sq=stored["second"].copy(),
        max_exp_avg_sq=stored["max_second"].copy() if "max_second" in stored else None,
    )
    theta_new = reference.STEP_FUNCTIONS[algorithm](theta, grad, state, hp)
    mode = rounding.effective_rounding(rounding_mode, param_dtype)
    step = stored["step"] + 1

    exact = {"param": theta_new, "exp_avg": state.exp_avg, "second": state.exp_avg_sq}
    if state.max_exp_avg_sq is not None:
        exact["max_second"] = state.max_exp_avg_sq
    slots = {"param": rounding.PARAM_SLOT, "exp_avg": rounding.EXP_AVG_SLOT, "second": rounding.SECOND_SLOT}
    slots["max_second"] = rounding.MAX_SECOND_SLOT
    out = {"exact": exact, "bits": {}, "step": step}
    for name, value in exact.items():
        dtype = param_dtype if name == "param" else state_dtype
        if dtype in (torch.float32, torch.float64):
            out[name] = value.astype(np.float32).astype(np.float64) if dtype == torch.float32 else value
        elif mode == "kahan" and name == "param":
            out["param"], out["compensation"] = rounding.kahan_split(value, dtype)
        elif mode == "stochastic" or name != "param":  # 16-bit moments: always stochastically
            key = int(rounding.step_keys(rounding.stream_key(seed, rounding.SLOTS * param_index + slots[name]), step))
            out["bits"][name] = rounding.random_bits(key, value.size).reshape(value.shape)
            out[name] = rounding.round_stochastic(value, dtype, out["bits"][name])
        else:
            out[name] = rounding.round_nearest(value, dtype)
    return out


def load_into_oracle(oracle, state_dict: dict, backend: str = "single_tensor") -> None:
    """Load ``state_dict`` into ``oracle`` and keep it stepping on ``backend``: a loaded
    group takes the saved ``backend`` (as torch.optim's take ``foreach`` and ``fused``),
    so an oracle loaded from the optimizer it checks would become that optimizer."""
    oracle.load_state_dict(copy.deepcopy(state_dict))
    for group in oracle.param_groups:
        group["backend"] = backend
