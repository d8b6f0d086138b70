"""Non-contiguous params: no write outside a view, for every adamkit path.

torch 2.13's fused CPU Adam writes into the elements *between* the columns of a
sliced view (it treats the view as dense); adamkit's paths, including its fused CPU
kernel (which stages such views through contiguous buffers), touch only the view's
own elements, and update them exactly as they update a dense copy.
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
    {"backend": "single_tensor"},
    {"backend": "foreach"},
    {"backend": "cpu"},
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
    grads = [torch.randn(param.shape, generator=torch.Generator().manual_seed(step)) for step in range(3)]
    for grad in grads:
        param.grad = grad.clone()
        opt.step()

    assert torch.all(base[~inside] == SENTINEL), "wrote outside the view"
    # and the view itself was updated exactly as the same path updates a dense copy
    dense = torch.nn.Parameter(torch.full(param.shape, SENTINEL))
    same_path = cls([dense], lr=0.1, weight_decay=0.1, **path)
    for grad in grads:
        dense.grad = grad.clone()
        same_path.step()
    assert torch.equal(param.detach(), dense.detach())
