"""What travels from the host to the compiled code: the chunk sizes, and the witness
types that select a specialization (storage dtypes, quantized formats, the algorithm,
the rounding mode, cautious or not)."""

from __future__ import annotations

import numpy as np
import torch

from ...algorithms import REGISTRY

#: elements per parallel work item: large enough to amortise the loop set-up,
#: small enough to balance two to a few dozen threads
CHUNK = 1 << 15

#: elements per pre-pass window: StableAdamW's clipping and a cautious update need a
#: pass over each tensor before its update, so a bucket with one of them is stepped
#: window by window (whole tensors, at least this many elements unless the bucket ends),
#: its pre-pass then its update, while the gradient and moments the pre-pass read
#: (8-12 bytes an element in fp32, 8-12 MB a window) are still in the last-level cache
PRE_PASS_WINDOW = 1 << 20


#: storage "witness" dtypes: what the kernel loads and stores for each param dtype.
#: bf16 and fp16 travel as their 16-bit patterns (uint16 and int16 respectively).
_STORAGE = {
    torch.float32: np.float32,
    torch.float64: np.float64,
    torch.bfloat16: np.uint16,
    torch.float16: np.int16,
}

#: quantized-state formats as state witnesses (the codes are bytes either way)
_QUANTIZED_STORAGE = {"int8": np.int8, "int4": np.uint8}

#: the dtypes an algorithm's witness array takes, by its code modulo 8
_ALGORITHM_WITNESS_DTYPES = (np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64)


def algorithm_witness_shape(code: int) -> tuple[np.dtype, int]:
    """The (dtype, number of dimensions) of the empty array that names the algorithm
    of code ``code`` (:attr:`AlgorithmSpec.code`) to the compiled code: eight dtypes,
    then one more dimension for each further eight codes, so any number of registered
    algorithms has a type of its own."""
    return np.dtype(_ALGORITHM_WITNESS_DTYPES[code % 8]), 1 + code // 8


#: the algorithm travels as a witness type too, by its code (:func:`algorithm_witness_shape`)
_ALGORITHM_WITNESS = {name: algorithm_witness_shape(spec.code) for name, spec in REGISTRY.items()}


def algorithm_witness(name: str) -> np.ndarray:
    """The empty array whose type names algorithm ``name`` to the compiled code."""
    dtype, ndim = _ALGORITHM_WITNESS[name]
    return np.empty((0,) * ndim, dtype=dtype)


#: whether the update is cautious and whether it keeps AMSGrad's maximum, as one witness
#: type per combination: each its own specialization, compiling only the loop it runs
_VARIANT_WITNESS = {(False, False): np.int8, (True, False): np.uint8, (False, True): np.int16, (True, True): np.uint16}

#: the rounding mode travels as a witness type, so each mode is its own specialization
_ROUNDING_WITNESS = {
    "nearest": np.int8,
    "kahan": np.int16,
    "stochastic": np.int32,
    "master": np.int64,
    "master24": np.uint32,
}
