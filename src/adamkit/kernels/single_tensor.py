"""torch's single-tensor path (``foreach=False``): each algorithm's per-tensor torch ops
(:attr:`AlgorithmSpec.single_tensor <adamkit.algorithms.AlgorithmSpec.single_tensor>`,
written in its module in :mod:`adamkit.algorithms` from the building blocks of
:mod:`adamkit.algorithms.single_tensor_ops`), in the order its torch.optim counterpart
uses, so results are bit-identical to it.  The readable path, and the one autograd can
flow through.
"""

from __future__ import annotations

from ..algorithms import REGISTRY

#: the per-list function of each algorithm
ALGORITHMS = {name: spec.single_tensor for name, spec in REGISTRY.items()}
