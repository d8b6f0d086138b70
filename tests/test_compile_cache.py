"""numba's on-disk cache of adamkit's compiled code is stamped with the whole package's
source (:mod:`adamkit.kernels.compile_cache`): numba's own stamp covers only the file
defining a function, and our loops inline code from other modules, so an edit or an
upgrade of those alone would have loaded stale machine code (it did, while issue 37's
second-moment format was being changed in kernels/cpu/storage.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

from adamkit.kernels import compile_cache, host  # noqa: E402
from adamkit.kernels.cpu import loops  # noqa: E402


def _cached_dispatchers():
    for module in (loops, host):
        for value in vars(module).values():
            if getattr(value, "_cache", None) is not None and hasattr(value._cache, "_impl"):
                yield value


def test_every_cached_loop_is_stamped_with_the_package_source():
    dispatchers = list(_cached_dispatchers())
    assert len(dispatchers) >= 8  # loops' fused steps and passes, host's counters
    for dispatcher in dispatchers:
        locator = dispatcher._cache._impl.locator
        assert type(locator).__name__.startswith("Adamkit"), dispatcher
        assert locator.get_source_stamp() == compile_cache.source_digest()


def test_the_stamp_changes_with_any_module_and_not_with_the_location(tmp_path):
    first, second = tmp_path / "a" / "adamkit", tmp_path / "b" / "adamkit"
    for copy in (first, second):
        shutil.copytree(compile_cache.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert compile_cache.digest_of(first) == compile_cache.digest_of(second) == compile_cache.source_digest()
    storage = second / "kernels" / "cpu" / "storage.py"  # inlined into loops.py's compiled code
    storage.write_text(storage.read_text() + "\n# an edit\n")
    assert compile_cache.digest_of(second) != compile_cache.digest_of(first)


def test_other_code_keeps_numbas_own_locators(tmp_path):
    module_file = tmp_path / "someone_elses.py"
    module_file.write_text("from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    spec = importlib.util.spec_from_file_location("someone_elses", module_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["someone_elses"] = module
    try:
        spec.loader.exec_module(module)
        locator = module.twice._cache._impl.locator
        assert not type(locator).__name__.startswith("Adamkit")
        assert module.twice(21) == 42
    finally:
        del sys.modules["someone_elses"]


def test_install_is_idempotent():
    from numba.core import caching

    impl = getattr(caching, "CacheImpl", None) or caching._CacheImpl
    before = list(impl._locator_classes)
    assert compile_cache.install()
    assert impl._locator_classes == before
    assert sum(cls.__name__.startswith("Adamkit") for cls in before) == 3


def test_the_stamp_changes_with_a_renamed_module_and_not_with_the_listing_order(tmp_path, monkeypatch):
    copy = tmp_path / "adamkit"
    shutil.copytree(compile_cache.PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    original = compile_cache.digest_of(copy)
    listed = Path.rglob
    monkeypatch.setattr(Path, "rglob", lambda self, pattern: reversed(list(listed(self, pattern))))
    assert compile_cache.digest_of(copy) == original  # the file system lists in any order
    monkeypatch.undo()
    (copy / "kernels" / "host.py").rename(
        copy / "kernels" / "host_.py"
    )  # the same bytes, in the same place of the order
    assert compile_cache.digest_of(copy) != original


def test_only_the_package_itself_is_the_package():
    """A sibling whose name starts alike (``adamkit_extra``) keeps numba's own stamp."""
    assert compile_cache.in_package(str(compile_cache.PACKAGE / "kernels" / "host.py"))
    assert not compile_cache.in_package(str(compile_cache.PACKAGE.parent / "adamkit_extra" / "kernels.py"))
    assert not compile_cache.in_package(str(compile_cache.PACKAGE.parent / "adamkit.py"))


def test_numba_cache_dir_is_where_the_loops_cache_goes(tmp_path):
    """Our locators keep numba's order: with NUMBA_CACHE_DIR set, its user-provided
    locator comes first, so the cache is written there and not into the source tree."""
    probe = (
        "from adamkit.kernels.cpu import loops\n"
        "locators = {type(d._cache._impl.locator).__name__ + ' ' + d._cache._impl.locator.get_cache_path()\n"
        "            for d in vars(loops).values() if getattr(getattr(d, '_cache', None), '_impl', None)}\n"
        "print('\\n'.join(sorted(locators)))\n"
    )
    environment = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    printed = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    lines = printed.stdout.split("\n")[:-1]
    assert lines and all(line.startswith(f"AdamkitUserProvidedCacheLocator {tmp_path}") for line in lines), lines
