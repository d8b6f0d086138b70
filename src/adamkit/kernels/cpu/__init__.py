r"""Fused multi-tensor CPU kernel (numba): one pass over each element, one parallel
region per param group and step.

Per element, in fp32 (fp64 for fp64 params; bf16 and fp16 are loaded to fp32 and
stored back with round-to-nearest-even):

.. math::

    g &\leftarrow g \cdot s^{-1} \text{ (a GradScaler's scale)}; \quad
    g \leftarrow -g \text{ if maximize}; \quad
        g \leftarrow g + \lambda\theta \text{ (L2)} \ \text{or}\
        \theta \leftarrow \theta \cdot \text{decay\_factor} \\
    m &\leftarrow \operatorname{lerp}(m, g, 1 - \beta_1)
        \ \text{(from the nearer end, as torch's } \texttt{lerp} \text{)} \\
    v &\leftarrow \beta_2 v + (1 - \beta_2) g^2 \ \text{(Adam)}, \qquad
    u \leftarrow \max(\beta_2 u, |g| + \epsilon) \ \text{(AdaMax)} \\
    \theta &\leftarrow \theta - \text{step\_size} \cdot m /
        (\sqrt{\max(v^{max}, v)} / \text{bias\_correction2\_sqrt} + \epsilon)
        \ \text{or}\ m / u

and NAdam's, RAdam's and ADOPT's updates in the form :mod:`adamkit.kernels.host`
writes for the whole family (per-tensor scalars; the algorithm is a compile-time choice).

Storage (:mod:`adamkit.specs.rounding`): states may have their own dtype
(``state_precision``); a bf16/fp16 param is stored to nearest, with a Kahan
compensation (:math:`\theta = p + c`, :math:`p = rn(\theta')`,
:math:`c = rn(\theta' - p)`) or stochastically; 16-bit and quantized moments are
always stored stochastically, with the counter-based random bits of the
specification (so results equal the other backends' bit for bit).

How many tensors a group has barely matters: the kernel gets a table of raw
addresses (param, grad, exp_avg, second moment, max second moment, compensation) and a table of
chunks of at most :data:`CHUNK` elements, and runs one ``prange`` over the chunks,
so small tensors share threads and large ones are split.  StableAdamW's clipping and a
cautious update's count need a pass over each whole tensor before it moves: those buckets
are stepped window by window (:data:`PRE_PASS_WINDOW`), each window's pre-pass then its
update, so that the update re-reads the gradient and moments from cache.  The step counters are
advanced by a small compiled loop over their addresses, and the per-tensor scalars
come from :class:`adamkit.rule.UpdateRule`, computed once per distinct step count.
The state's addresses are cached per group, keyed on the optimizer's state epoch
(:mod:`adamkit.statekeeping`: every state tensor addressed is issued memory that no user
action can free or move while the table holds it); the param and gradient addresses come,
at every step, from the step's guard (:mod:`adamkit.guard`), which has checked them.

Params whose memory is not dense in the same layout as their gradient and state (a
sliced view, say) are staged through contiguous copies, so nothing outside a view
is ever written.  Compiled code is cached on disk (numba's ``cache=True``).

The package has one module per job: :mod:`.process` (whether numba runs here, fork
safety), :mod:`.layout` (chunk sizes and witness types), :mod:`.storage` (device-side
loads, stores and quantized codes), :mod:`.loops` (the compiled element loops and
passes) and :mod:`.launch` (the host side: buckets, scalars, launches).  Whether numba
is importable is decided once, here: without it only :func:`available` and
:func:`unavailable_reason` answer, and :func:`step` refuses.

Quantized states are stepped span by span (:data:`QUANTIZED_SPAN` elements): their
codes decoded into fp32 scratch rows, the element loop run on those, the new values
encoded.  Every one of those loops vectorizes: levels are computed from codes (the
spec's fp32 products; no table gathers), codes are computed in fp32 and 32-bit integer
IR (numba widens integer arithmetic to int64, and AVX2 can neither multiply nor
convert int64 vectors), a block's absmax is an int32 max over bit patterns, and int4
codes are spread one to a byte and paired in passes of their own.  What LLVM emitted
was read with ``benchmarks/kernel_asm.py`` (numba's ``inspect_asm``) on this
project's AVX2 machines (AMD EPYC, no AVX-512): the float arithmetic of the int8,
int4 and 24-bit-master specializations is packed in 256-bit ``ymm`` registers (92-96
packed instructions beside the scalar remainder loops), the hash's multiplies are
``vpmulld ymm``, and there are no gathers.  Where the CPU has AVX-512, LLVM picks the
width; the loops have nothing width-specific.
"""

from __future__ import annotations

from .layout import CHUNK, PRE_PASS_WINDOW
from .process import _settle_torch_vector_math, available, fork_safe_threads, numba, unavailable_reason  # noqa: F401

if numba is not None:
    from . import launch, loops  # noqa: F401
    from .launch import _launch, step, window_table  # noqa: F401
    from .loops import _fused_quantized_step, _fused_step  # noqa: F401
else:  # pragma: no cover - exercised only where numba is missing

    def step(batch, rule) -> None:
        raise RuntimeError(f"the cpu kernel is not available: {unavailable_reason()}")


__all__ = [  # (and, where numba is, the modules and the internals tests and benchmarks read)
    "CHUNK",
    "PRE_PASS_WINDOW",
    "available",
    "fork_safe_threads",
    "step",
    "unavailable_reason",
]
