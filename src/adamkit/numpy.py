r"""Adam, AdamW and AdaMax over NumPy arrays: the same rule, options and kernels as the
``torch.optim`` front, with arrays in place of tensors.

    >>> import numpy as np, adamkit.numpy as anp
    >>> w = np.zeros(3)
    >>> opt = anp.Adam([w], lr=0.1)
    >>> opt.step([np.array([1.0, -2.0, 0.0])])   # w is updated in place
    >>> w
    array([-0.1,  0.1,  0. ])

Each array is shared with a tensor (``torch.from_numpy``, no copy), and the step is
the torch optimizer's: :class:`adamkit.Adam` etc. with every keyword they take
(``amsgrad``, ``weight_decay``, ``maximize``, ``decouple_lr``, ``state_precision``,
``skip_nonfinite``, ``backend``, ...).  So the element math is the tested one: fp32
for float32 and float16 arrays, fp64 for float64 ones.  Arrays must be writable,
native-endian, without negative strides (a tensor cannot share a reversed view) and
of a floating (or complex) dtype; gradients are converted to their param's dtype (a
complex gradient of a real param is refused, and so is anything that is not numbers:
strings, objects, ragged lists).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from . import optim

#: the array dtypes a param may have
DTYPES = (np.float16, np.float32, np.float64, np.complex64, np.complex128)
#: the dtype kinds a gradient may have (it is converted to its param's dtype): NumPy's
#: codes for booleans, signed and unsigned integers, floating and complex numbers
GRADIENT_KINDS = "biufc"


def _as_tensor(array: np.ndarray, index: int) -> torch.Tensor:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"params[{index}] must be a numpy.ndarray, got {type(array).__name__}")
    if array.dtype.type not in DTYPES:
        allowed = ", ".join(np.dtype(d).name for d in DTYPES)
        raise TypeError(f"params[{index}] has dtype {array.dtype}; allowed: {allowed}")
    if not array.flags.writeable:
        raise ValueError(f"params[{index}] is read-only; the optimizer updates arrays in place")
    if not array.dtype.isnative:
        raise ValueError(f"params[{index}] has non-native byte order {array.dtype.str!r}; use a native-endian array")
    if any(stride < 0 for stride in array.strides):
        raise ValueError(
            f"params[{index}] has a negative stride {array.strides} (a reversed view, such as a[::-1]), which a "
            "tensor cannot share; the optimizer updates arrays in place, so pass the array it views (a copy "
            "would be stepped instead of it)"
        )
    return torch.from_numpy(array)


def _as_gradient(grad, param: np.ndarray, index: int) -> np.ndarray:
    """``grad`` (an array, or anything NumPy reads as one) as a C-contiguous array of
    ``param``'s dtype, checked before any array or state is touched."""
    try:
        array = np.asarray(grad)
    except (TypeError, ValueError) as error:  # e.g. a ragged list
        raise TypeError(f"grads[{index}] is not an array of numbers ({type(grad).__name__}: {error})") from None
    if array.dtype.kind not in GRADIENT_KINDS:
        raise TypeError(
            f"grads[{index}] has dtype {array.dtype}; allowed: booleans, integers, floating and complex numbers"
        )
    if array.dtype.kind == "c" and not np.iscomplexobj(param):
        raise TypeError(
            f"grads[{index}] is complex ({array.dtype}), but params[{index}] is real ({param.dtype}): "
            "its imaginary part would be dropped"
        )
    if array.shape != param.shape:
        raise ValueError(f"grads[{index}] has shape {array.shape}, but params[{index}] has shape {param.shape}")
    return np.require(array, dtype=param.dtype, requirements="C")


class _ArrayOptimizer:
    """An adamkit optimizer stepping NumPy arrays in place."""

    torch_class: type[optim._AdamFamily]

    def __init__(self, params: Sequence[np.ndarray], **options) -> None:
        arrays = list(params)
        if not arrays:
            raise ValueError("params is empty: pass at least one numpy array")
        self.params = arrays
        self._tensors = [_as_tensor(a, i) for i, a in enumerate(arrays)]
        self.optimizer = self.torch_class(self._tensors, **options)

    def step(self, grads: Sequence[np.ndarray | None]) -> None:
        """One step with ``grads[i]`` the gradient of ``params[i]`` (``None``: skip it)."""
        grads = list(grads)
        if len(grads) != len(self.params):
            raise ValueError(f"got {len(grads)} gradients for {len(self.params)} params")
        arrays = [None if g is None else _as_gradient(g, p, i) for i, (g, p) in enumerate(zip(grads, self.params))]
        try:
            for tensor, grad in zip(self._tensors, arrays):
                tensor.grad = None if grad is None else torch.from_numpy(grad)
            self.optimizer.step()
        finally:
            for tensor in self._tensors:
                tensor.grad = None

    @property
    def param_groups(self) -> list[dict]:
        """The torch optimizer's param groups (set ``lr`` here to schedule it)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> list[dict]:
        """Per param, its state as the torch optimizer keeps it (tensors share memory;
        ``.numpy()`` views them)."""
        return [self.optimizer.state.get(t, {}) for t in self._tensors]

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.optimizer.load_state_dict(state_dict)


class Adam(_ArrayOptimizer):
    """:class:`adamkit.Adam` over NumPy arrays; keywords as there."""

    torch_class = optim.Adam


class AdamW(_ArrayOptimizer):
    """:class:`adamkit.AdamW` over NumPy arrays; keywords as there."""

    torch_class = optim.AdamW


class AdaMax(_ArrayOptimizer):
    """:class:`adamkit.AdaMax` over NumPy arrays; keywords as there."""

    torch_class = optim.AdaMax


Adamax = AdaMax

__all__ = ["Adam", "AdamW", "AdaMax", "Adamax"]
