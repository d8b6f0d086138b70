"""adamkit: the Adam optimizer family for PyTorch and NumPy.

``adamkit.Adam``, ``adamkit.AdamW`` and ``adamkit.AdaMax`` are drop-in replacements
for ``torch.optim.Adam`` / ``AdamW`` / ``Adamax``; :mod:`adamkit.specs.reference` is the
paper, line by line, in NumPy float64; :mod:`adamkit.specs.rounding` specifies how 16-bit
values are stored and :mod:`adamkit.specs.quantization` the int8/int4 state format;
:mod:`adamkit.precision` has helpers for 16-bit training (and :func:`stall_guard`
warns when steps are too small for a param's storage), :mod:`adamkit.convert`
converts quantized state dicts to and from torch.optim's.  :mod:`adamkit.numpy` steps
NumPy arrays, and :func:`adamkit.minimize` (needs SciPy) solves ``scipy.optimize``-style
problems.
"""

import sys as _sys

from . import convert, precision, stalls
from . import optim as _optim
from ._version import __version__
from .optim import *  # noqa: F403  (every optimizer class: adamkit.optim.__all__)
from .release import gradient_release
from .specs import master, quantization, reference, rounding
from .stalls import stall_guard

# The spec modules keep their names from before they moved into adamkit.specs, as import
# paths too (``import adamkit.reference``, ``from adamkit.rounding import ...``).
for _module in (master, quantization, reference, rounding):
    _sys.modules.setdefault(f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}", _module)
del _module


def __getattr__(name: str):
    if name == "minimize":  # SciPy is imported only when asked for
        try:
            from .optimize import minimize
        except ModuleNotFoundError as exc:
            if exc.name is None or exc.name.split(".")[0] != "scipy":
                raise
            raise ImportError(
                "adamkit.minimize needs SciPy, which the 'scipy' extra installs: pip install 'adamkit[scipy]'"
            ) from exc
        return minimize
    raise AttributeError(f"module 'adamkit' has no attribute {name!r}")


__all__ = [
    "convert",
    "gradient_release",
    "master",
    "minimize",  # noqa: F405  (imported on first use: __getattr__)
    "precision",
    "quantization",
    "reference",
    "rounding",
    "stall_guard",
    "stalls",
    "__version__",
]
__all__ += _optim.__all__
