"""adamkit: the Adam optimizer family for PyTorch and NumPy.

``adamkit.Adam``, ``adamkit.AdamW`` and ``adamkit.AdaMax`` are drop-in replacements
for ``torch.optim.Adam`` / ``AdamW`` / ``Adamax``; :mod:`adamkit.reference` is the
paper, line by line, in NumPy float64; :mod:`adamkit.rounding` specifies how 16-bit
values are stored; :mod:`adamkit.precision` has helpers for 16-bit training.
"""

from . import precision, reference, rounding
from ._version import __version__
from .optim import Adam, AdaMax, Adamax, AdamW

__all__ = ["Adam", "AdamW", "AdaMax", "Adamax", "precision", "reference", "rounding", "__version__"]
