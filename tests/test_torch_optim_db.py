"""torch's own optimizer test inputs (``torch.testing._internal.common_optimizers``:
each class's ``OptimizerInfo`` inputs and error inputs) with adamkit's classes swapped
in: the inputs step bit for bit as torch's for-loop does, and the error inputs raise
torch's exception type with a message matching torch's pattern (or warn as torch does)."""

from __future__ import annotations

import warnings

import pytest
import torch

import adamkit

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers", exc_type=ImportError)

PAIRS = {
    torch.optim.Adam: adamkit.Adam,
    torch.optim.AdamW: adamkit.AdamW,
    torch.optim.Adamax: adamkit.AdaMax,
    torch.optim.NAdam: adamkit.NAdam,
    torch.optim.RAdam: adamkit.RAdam,
}
INFOS = {info.optim_cls: info for info in common_optimizers.optim_db if info.optim_cls in PAIRS}


def _inputs():
    for torch_cls, info in INFOS.items():
        for optimizer_input in info.optim_inputs_func(device="cpu"):
            kwargs = optimizer_input.kwargs
            if kwargs.get("fused") or kwargs.get("capturable"):
                continue  # fused paths are held to the reference; capturable needs an accelerator in torch
            yield pytest.param(torch_cls, kwargs, id=f"{torch_cls.__name__}-{optimizer_input.desc}")


def _error_inputs():
    for torch_cls, info in INFOS.items():
        for error in info.optim_error_inputs_func(device="cpu", dtype=torch.float32):
            yield pytest.param(torch_cls, error, id=f"{torch_cls.__name__}-{error.error_regex[:60]}")


@pytest.mark.parametrize("torch_cls,kwargs", list(_inputs()))
def test_torch_inputs_step_bit_for_bit(torch_cls, kwargs):
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    torch_params = [torch.nn.Parameter(t.clone()) for t in start]
    kwargs = {**kwargs, "foreach": False}
    ours, theirs = PAIRS[torch_cls](ours_params, **kwargs), torch_cls(torch_params, **kwargs)
    for _ in range(12):
        for p, q in zip(ours_params, torch_params):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(ours_params, torch_params):
        assert torch.equal(p, q)
        for key, value in theirs.state[q].items():
            assert torch.equal(ours.state[p][key], value), key


@pytest.mark.parametrize("torch_cls,error", list(_error_inputs()))
def test_torch_error_inputs_raise_torchs_errors(torch_cls, error):
    error_input = error.optimizer_error_input
    params = error_input.params if error_input.params is not None else [torch.nn.Parameter(torch.randn(3))]
    ours_cls = PAIRS[torch_cls]
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            ours_cls(params, **error_input.kwargs)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if error.error_on == common_optimizers.OptimizerErrorEnum.CONSTRUCTION_ERROR:
            with pytest.raises(error.error_type, match=error.error_regex):
                ours_cls(params, **error_input.kwargs)
        else:
            optimizer = ours_cls(params, **error_input.kwargs)
            with pytest.raises(error.error_type, match=error.error_regex):
                optimizer.step()
