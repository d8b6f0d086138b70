"""adamkit: the Adam optimizer family for PyTorch and NumPy.

``adamkit.Adam``, ``adamkit.AdamW`` and ``adamkit.AdaMax`` are drop-in replacements
for ``torch.optim.Adam`` / ``AdamW`` / ``Adamax``; :mod:`adamkit.reference` is the
paper, line by line, in NumPy float64; :mod:`adamkit.rounding` specifies how 16-bit
values are stored and :mod:`adamkit.quantization` the int8/int4 state format;
:mod:`adamkit.precision` has helpers for 16-bit training and :mod:`adamkit.convert`
converts quantized state dicts to and from torch.optim's.
"""

from . import convert, precision, quantization, reference, rounding
from ._version import __version__
from .optim import Adam, AdaMax, Adamax, AdamW
from .release import gradient_release

__all__ = [
    "Adam",
    "AdamW",
    "AdaMax",
    "Adamax",
    "convert",
    "gradient_release",
    "precision",
    "quantization",
    "reference",
    "rounding",
    "__version__",
]
