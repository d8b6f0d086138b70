"""adamkit: the Adam optimizer family for PyTorch and NumPy.

``adamkit.Adam``, ``adamkit.AdamW`` and ``adamkit.AdaMax`` are drop-in replacements
for ``torch.optim.Adam`` / ``AdamW`` / ``Adamax``; :mod:`adamkit.reference` is the
paper, line by line, in NumPy float64.
"""

from . import reference
from ._version import __version__
from .optim import Adam, AdaMax, Adamax, AdamW

__all__ = ["Adam", "AdamW", "AdaMax", "Adamax", "reference", "__version__"]
