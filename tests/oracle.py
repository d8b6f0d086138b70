"""Run the NumPy reference over the same params and gradients as an optimizer."""

from __future__ import annotations

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
