"""Public names are a contract: a module path or option value that users may have written
keeps working after a rename (the spec modules' old paths as they are; the removed
``adamkit.kernels.reference`` and ``backend="reference"`` as deprecated aliases with a
``FutureWarning`` naming the new name, pointed at the user's line)."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch

import adamkit


@pytest.mark.parametrize("name", ["reference", "rounding", "quantization", "master"])
def test_the_spec_modules_import_by_their_paths_from_before_the_move(name):
    """docs/api.md says ``adamkit.reference`` *is* ``adamkit.specs.reference``: only the
    attribute once was (``import adamkit.reference`` raised ModuleNotFoundError)."""
    assert importlib.import_module(f"adamkit.{name}") is importlib.import_module(f"adamkit.specs.{name}")


def test_the_old_single_tensor_kernel_path_imports_with_a_warning(monkeypatch):
    monkeypatch.delitem(sys.modules, "adamkit.kernels.reference", raising=False)
    with pytest.warns(FutureWarning, match="it is now adamkit.kernels.single_tensor") as caught:
        import adamkit.kernels.reference as module
    assert module is importlib.import_module("adamkit.kernels.single_tensor")
    assert caught[0].filename == __file__


def _run(opt, params) -> torch.Tensor:
    torch.manual_seed(1)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return torch.cat([p.detach().flatten() for p in params])


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]


def test_backend_reference_is_single_tensor_with_a_warning_from_the_constructor_a_group_edit_and_a_checkpoint():
    """Oracle: the same steps with ``backend="single_tensor"`` (bit for bit)."""
    params = _params()
    expected = _run(adamkit.AdamW(params, lr=1e-2, backend="single_tensor"), params)

    params = _params()
    with pytest.warns(FutureWarning, match="backend='reference' is deprecated .* now backend='single_tensor'") as w:
        line = sys._getframe().f_lineno + 1
        opt = adamkit.AdamW(params, lr=1e-2, backend="reference")
    assert (w[0].filename, w[0].lineno) == (__file__, line)
    assert opt.param_groups[0]["backend"] == "single_tensor"
    assert torch.equal(_run(opt, params), expected)

    params = _params()
    opt = adamkit.AdamW(params, lr=1e-2)
    opt.param_groups[0]["backend"] = "reference"
    with pytest.warns(FutureWarning, match=r"backend='reference' in param_groups\[0\] is deprecated"):
        assert torch.equal(_run(opt, params), expected)
    assert opt.param_groups[0]["backend"] == "single_tensor"

    saved = opt.state_dict()
    saved["param_groups"][0]["backend"] = "reference"  # a checkpoint saved before the rename
    fresh = adamkit.AdamW(_params(), lr=1e-2)
    with pytest.warns(FutureWarning, match=r"backend='reference' in param_groups\[0\] is deprecated"):
        fresh.load_state_dict(saved)
    assert fresh.param_groups[0]["backend"] == "single_tensor"
