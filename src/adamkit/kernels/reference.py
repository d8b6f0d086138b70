"""Deprecated: this module is now :mod:`adamkit.kernels.single_tensor` (torch's
single-tensor path, ``backend="single_tensor"``); importing it gives that module, with a
``FutureWarning``."""

import sys
import warnings

from . import single_tensor

warnings.warn(
    "adamkit.kernels.reference is deprecated and will be removed: it is now adamkit.kernels.single_tensor",
    FutureWarning,
    stacklevel=2,
)
sys.modules[__name__] = single_tensor
