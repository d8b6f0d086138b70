"""Non-contiguous params: no write outside a view, for every adamkit path.

torch 2.13's fused CPU Adam writes into the elements *between* the columns of a
sliced view (it treats the view as dense); adamkit's paths, including the one
``fused=True`` selects, touch only the view's own elements.
"""

from __future__ import annotations

import pytest
import torch

import adamkit

SENTINEL = 7.0

VIEWS = {
    "column slice": lambda base: base[:, ::2],
    "row slice": lambda base: base[1:3],
    "transposed slice": lambda base: base.t()[::3],
    "diagonal": lambda base: base.diagonal(),
}

PATHS = [
    {"backend": "reference"},
    {"backend": "foreach"},
    {"fused": True},
    {"foreach": True},
]


@pytest.mark.parametrize("view", list(VIEWS))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("cls", [adamkit.Adam, adamkit.AdamW, adamkit.AdaMax])
def test_no_write_outside_view(view, path, cls):
    if cls is adamkit.AdaMax and "fused" in path:
        pytest.skip("Adamax has no fused argument")
    base = torch.full((4, 6), SENTINEL)
    param = torch.nn.Parameter(VIEWS[view](base))
    inside = torch.zeros_like(base, dtype=torch.bool)
    VIEWS[view](inside).fill_(True)

    opt = cls([param], lr=0.1, weight_decay=0.1, **path)
    for step in range(3):
        param.grad = torch.full_like(param, 1.0 + step)
        opt.step()

    assert torch.all(base[~inside] == SENTINEL), "wrote outside the view"
    # and the view itself was updated exactly as torch's for-loop updates a dense copy
    dense = torch.nn.Parameter(torch.full(param.shape, SENTINEL))
    torch_cls = {adamkit.Adam: torch.optim.Adam, adamkit.AdamW: torch.optim.AdamW, adamkit.AdaMax: torch.optim.Adamax}[
        cls
    ]
    reference = torch_cls([dense], lr=0.1, weight_decay=0.1, foreach=False)
    for step in range(3):
        dense.grad = torch.full_like(dense, 1.0 + step)
        reference.step()
    assert torch.equal(param.detach(), dense.detach())
