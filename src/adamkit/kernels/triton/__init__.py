r"""Fused multi-tensor Triton kernel for CUDA: one launch per param group and dtype.

Each program updates one chunk of at most :data:`BLOCK` elements of one tensor; a
table of raw addresses (param, grad, exp_avg, second moment, max second moment,
Kahan compensation and, for quantized states, the moments' block scales) and
a table of chunks let a single launch cover every tensor of the group_scalars, whatever
their sizes.  The element math is the CPU kernel's (see :mod:`adamkit.kernels.cpu`),
in fp32 (fp64 for fp64 params), with bf16/fp16 rounded to nearest even on store.
Quantized moments (``state_precision="int8"``/``"int4"``) are dequantized on load
and quantized again from the new fp32 values; a chunk covers whole blocks.

As compiled for a GPU, the arithmetic is IEEE, operation by operation, as in the
interpreter and the NumPy reference: division and square root rounded to nearest
(Triton's ``/`` and ``tl.sqrt`` are approximations in fp32), no fused multiply-adds
(:data:`COMPILE_OPTIONS`), and the group's constants reach the kernel as float64 (a
Python float argument would arrive as fp32).  A whole chunk runs with an all-true mask
and 16-byte-aligned addresses the compiler is told of, so it loads and stores vectors;
only a tensor's last chunk is masked element by element.  ``tests/test_triton_compile.py``
reads all of this from the PTX.

Per-tensor step sizes and bias corrections (:data:`adamkit.kernels.host.TENSOR_SCALARS`)
come from :class:`adamkit.rule.UpdateRule` as a device array.  With ``capturable=True`` they are computed on the device from the
step counters, so neither a tensor lr changed by a scheduler nor the step count
needs the host: nothing syncs, nothing recompiles (lr and betas are runtime values),
and the address table is uploaded only when an address changes, so a captured CUDA
graph replays with no host-to-device copy.  Step counters on the host are advanced
in one compiled pass (:class:`adamkit.kernels.host.HostCounters`).

AMP: when a ``torch.amp.GradScaler`` drives the optimizer, ``grad_scale`` and
``found_inf`` are read inside the kernel: gradients are unscaled on the fly, and a
step with ``found_inf`` leaves params and state untouched (the step counters are
rolled back, as torch's fused optimizers do).

Without a GPU the same kernel runs on CPU tensors under ``TRITON_INTERPRET=1``;
that is how the conformance suite tests it in CI.

The package has one module per job: :mod:`.config` (launch shapes, compile options,
whether Triton is importable here), :mod:`.device` (device-side helpers), :mod:`.elements`
(the element math and the fused step) and :mod:`.launch` (the host side).  Whether
Triton is importable is decided once, here: without it only :func:`available` and
:func:`device_types` answer, and :func:`step` refuses.
"""

from __future__ import annotations

from .config import (
    BLOCK,
    COMPILE_OPTIONS,
    INTERPRETED,
    NUM_WARPS,
    QUANTIZED_BLOCK,
    QUANTIZED_NUM_WARPS,
    available,
    device_types,
    triton,
)

if triton is not None:
    from . import config, device, elements, launch  # noqa: F401
    from .elements import _clipping_sums, _fused_step  # noqa: F401
    from .launch import float_maps, normalization, step  # noqa: F401
else:  # pragma: no cover - exercised where triton is missing

    def step(batch, rule) -> None:
        raise RuntimeError("the triton kernel is not available: triton is not installed")


__all__ = [
    "BLOCK",
    "COMPILE_OPTIONS",
    "INTERPRETED",
    "NUM_WARPS",
    "QUANTIZED_BLOCK",
    "QUANTIZED_NUM_WARPS",
    "available",
    "device_types",
    "step",
]
