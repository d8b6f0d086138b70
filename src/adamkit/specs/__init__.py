"""The specifications: what every fast path must compute, written as runnable NumPy.

- :mod:`~adamkit.specs.reference`: the paper (Adam, AMSGrad, AdaMax, the weight-decay
  modes), line by line, in float64: the oracle of every kernel.
- :mod:`~adamkit.specs.rounding`: how an fp32 result is stored in 16 bits (nearest,
  Kahan, stochastic) and the hash that draws stochastic rounding's bits.
- :mod:`~adamkit.specs.quantization`: the int8/int4 state format (block scales, level
  maps, stochastic codes).
- :mod:`~adamkit.specs.master`: split master weights (a bf16 param plus 16 or 8 low bits).

They depend on NumPy and torch's dtypes only, never on the optimizer or the kernels.
"""

from . import master, quantization, reference, rounding

__all__ = ["master", "quantization", "reference", "rounding"]
