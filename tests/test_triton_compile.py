"""The Triton kernel as a GPU would run it, checked without a GPU: every variant is
compiled for an H100 (sm_90) by ``triton_compile_worker.py``, and its PTX must use
IEEE arithmetic (division and square root rounded to nearest, no fused multiply-adds,
no approximations, no flushing of subnormals), as the interpreter tested in this suite
computes, and must move whole chunks with vector loads and stores (the step is
bandwidth-bound).

The interpreter cannot see any of this: it runs the kernel in NumPy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import adamkit

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

import triton_compile_worker as worker  # noqa: E402  (tests/ is on sys.path)

WORKER = Path(worker.__file__)
VARIANTS = list(worker.VARIANTS)


@pytest.fixture(scope="module")
def report() -> dict:
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(WORKER), "90"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_compiles_for_sm90_with_ieee_arithmetic(report, variant):
    compiled = report[variant]
    assert "error" not in compiled, compiled.get("error")
    found = compiled["instructions"]
    inexact = [i for i in found if ".approx" in i or "div.full" in i or ".ftz" in i or i.startswith("fma")]
    assert inexact == [], f"approximate or contracted arithmetic: {inexact}"
    assert any(i.startswith("div.rn") for i in found)
    if not variant.startswith(("adamax", "clipping")):  # (StableAdamW's clipping sums take no root)
        assert any(i.startswith("sqrt.rn") for i in found)


@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "adam-fp32-unaligned"])
def test_whole_chunks_load_and_store_vectors(report, variant):
    found = report[variant]["instructions"]
    assert any(i.startswith("ld.global.v") for i in found), found
    if not variant.startswith(("clipping", "counting")):  # (which store one sum per chunk)
        assert any(i.startswith("st.global.v") for i in found), found


def test_the_alignment_hint_is_what_vectorizes(report):
    """Addresses come from a table, so the compiler knows nothing of their alignment
    unless told: without the hint every access is scalar."""
    found = report["adam-fp32-unaligned"]["instructions"]
    assert not any(i.startswith(("ld.global.v", "st.global.v")) for i in found), found


@pytest.mark.skipif(not adamkit.kernels.KERNELS["triton"].supports(torch.device("cpu")), reason="needs the interpreter")
def test_the_launch_says_whether_every_address_is_16_byte_aligned():
    """A param that starts 4 bytes into its storage turns the hint off for its bucket,
    and the step still equals the reference kernel's."""
    base = torch.randn(2049)
    results = {}
    for name, view in {"aligned": base[:2048].clone(), "unaligned": base.clone()[1:]}.items():
        start = view.clone()
        for backend in ("triton", "foreach"):
            p = torch.nn.Parameter(view if backend == "triton" else start)
            p.grad = torch.linspace(-1, 1, p.numel())
            opt = adamkit.Adam([p], lr=0.01, backend=backend)
            opt.step()
            opt.step()
            results[name, backend] = p.detach().clone()
            if backend == "triton":
                (bucket,) = opt._stepper.cache(opt.param_groups[0])["triton"][1]
                assert bucket.aligned == (name == "aligned")
        torch.testing.assert_close(results[name, "triton"], results[name, "foreach"], rtol=1e-6, atol=1e-7)
