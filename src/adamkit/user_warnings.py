"""Warnings that point at the user's line: the first frame outside adamkit and the
packages that called into it (torch's step wrappers and hooks, SciPy's ``minimize``),
however deep the call that warns (``warnings.warn``'s fixed ``stacklevel`` points into
whichever of them is in between)."""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from functools import cache


@cache
def _package_dir(name: str) -> str | None:
    """The directory of package ``name``, with a trailing separator (``None``: not installed)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "")


def warn_at_user(message: str, category: type[Warning] = UserWarning, *, passing: tuple[str, ...] = ("torch",)) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside adamkit
    and the packages ``passing``."""
    inside = tuple(d for d in map(_package_dir, ("adamkit", *passing)) if d is not None)
    frame, level = sys._getframe(1), 2  # level 2: this function's caller
    while frame.f_back is not None and frame.f_code.co_filename.startswith(inside):
        frame, level = frame.f_back, level + 1
        while frame.f_back is not None and _is_import_machinery(frame):
            frame = frame.f_back
    warnings.warn(message, category, stacklevel=level)


def _is_import_machinery(frame) -> bool:
    """Whether ``frame`` is CPython's import machinery, which ``warnings.warn`` steps
    over without counting it in ``stacklevel`` (so must we: a warning raised while a
    module is imported would point into the package that imports it)."""
    filename = frame.f_code.co_filename
    return "importlib" in filename and "_bootstrap" in filename


__all__ = ["warn_at_user"]
