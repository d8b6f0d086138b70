"""numba's on-disk cache of adamkit's compiled code, kept only while adamkit's source is
the source it was compiled from.

numba stamps a cached function with a hash of the one file that defines it.  adamkit's
compiled loops (:mod:`adamkit.kernels.cpu.loops`, :mod:`adamkit.kernels.host`) inline
code from other modules: the storage formats and quantized codes
(:mod:`adamkit.kernels.cpu.storage`), the intrinsics, the spec's constants, the
algorithm registry.  An edit, a ``git checkout`` or a ``pip install --upgrade`` that
changes only those would load the previous version's machine code, silently.  So
:func:`install` puts a locator in front of numba's own for files of this package: the
same cache directories numba would pick (``NUMBA_CACHE_DIR``, the package's
``__pycache__``, or the user-wide cache), stamped with :func:`source_digest`, a hash of
every module of the package.  numba's other functions, the user's included, keep
numba's locators.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

#: the adamkit package directory; its ``*.py`` files make the stamp
PACKAGE = Path(__file__).resolve().parents[1]


def digest_of(root: Path) -> str:
    """SHA-256 over every module under ``root`` (relative path and content, in path order)."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


@functools.cache
def source_digest() -> str:
    """:func:`digest_of` the package, once per process (a few milliseconds)."""
    return digest_of(PACKAGE)


def in_package(py_file: str) -> bool:
    try:
        Path(py_file).resolve().relative_to(PACKAGE)
    except ValueError:
        return False
    return True


def _package_locator(base: type) -> type:
    """``base`` (one of numba's locators) for this package's files only, stamped with
    :func:`source_digest`."""

    class PackageLocator(base):
        def get_source_stamp(self):
            return source_digest()

        @classmethod
        def from_function(cls, py_func, py_file):
            return super().from_function(py_func, py_file) if in_package(py_file) else None

    PackageLocator.__name__ = PackageLocator.__qualname__ = f"Adamkit{base.__name__}"
    return PackageLocator


def install() -> bool:
    """Put the package's locators in front of numba's (once); returns whether they are
    there (False where this numba keeps its locators elsewhere: then numba's own stamp
    applies)."""
    try:
        from numba.core import caching
    except ImportError:  # pragma: no cover - exercised only where numba is missing
        return False
    cache_impl = getattr(caching, "CacheImpl", None) or getattr(caching, "_CacheImpl", None)  # (its older name)
    locators = getattr(cache_impl, "_locator_classes", None)
    names = ("UserProvidedCacheLocator", "InTreeCacheLocator", "UserWideCacheLocator")
    bases = [getattr(caching, name, None) for name in names]
    if not isinstance(locators, list) or None in bases:  # pragma: no cover - another numba's internals
        return False
    if not any(getattr(cls, "__name__", "").startswith("Adamkit") for cls in locators):
        locators[:0] = [_package_locator(base) for base in bases]
    return True


__all__ = ["PACKAGE", "digest_of", "in_package", "install", "source_digest"]
