"""``adamkit.user_warnings.warn_at_user``: a warning points at the first line outside
adamkit and the packages it passes through, as ``warnings.warn`` counts frames.  The
oracle is the line of this file that made the call."""

from __future__ import annotations

import _thread
import inspect
import sys
import threading
import warnings

import pytest

from adamkit import user_warnings
from adamkit.kernels.compile_cache import PACKAGE


def _write_package(root, name: str, files: dict[str, str]) -> None:
    (root / name).mkdir()
    for file, text in files.items():
        (root / name / file).write_text(text)


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """A directory on sys.path for packages made by a test, removed from sys.modules after."""
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("warns_"):
            del sys.modules[name]


CALLS_THROUGH = """
from adamkit.user_warnings import warn_at_user

def call(function):
    return function()

def warn():
    warn_at_user("from the library", passing=("warns_lib",))
"""


def test_a_sibling_package_whose_name_starts_alike_is_not_passed_through(packages):
    """``warns_lib_vision`` (a user's package) calls through ``warns_lib``: the warning
    points at the sibling's line, not past it (the package prefix ends with a separator)."""
    _write_package(packages, "warns_lib", {"__init__.py": CALLS_THROUGH})
    _write_package(
        packages,
        "warns_lib_vision",
        {"__init__.py": "import warns_lib\n\ndef visible():\n    warns_lib.call(warns_lib.warn)\n"},
    )
    import warns_lib_vision

    with pytest.warns(UserWarning, match="from the library") as caught:
        warns_lib_vision.visible()
    assert caught[0].filename == warns_lib_vision.__file__ and caught[0].lineno == 4


def test_a_warning_raised_while_a_module_is_imported_points_at_the_import(packages):
    """The import machinery's frames between a package's modules are stepped over
    uncounted, as warnings.warn steps over them (before, the warning pointed into the
    importing package's ``__init__``)."""
    _write_package(
        packages,
        "warns_at_import",
        {
            "__init__.py": "from . import sub\n",
            "sub.py": "from adamkit.user_warnings import warn_at_user\n\n"
            'warn_at_user("at import", passing=("warns_at_import",))\n',
        },
    )
    with pytest.warns(UserWarning, match="at import") as caught:
        line = inspect.currentframe().f_lineno + 1
        import warns_at_import  # noqa: F401
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)


def test_a_thread_whose_first_frame_is_adamkits_still_warns():
    """Where adamkit's code is the bottom of a thread's stack (nothing outside below it),
    the warning points at that frame rather than failing."""
    code = compile(
        "import warnings\n"
        "def bottom(out, done):\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        try:\n"
        "            warn_at_user('from the bottom')\n"
        "        except BaseException as error:\n"
        "            out.append(error)\n"
        "    out.extend(caught)\n"
        "    done.set()\n",
        str(PACKAGE / "_bottom_of_a_thread.py"),
        "exec",
    )
    namespace = {"warn_at_user": user_warnings.warn_at_user}
    exec(code, namespace)
    out, done = [], threading.Event()
    _thread.start_new_thread(namespace["bottom"], (out, done))
    assert done.wait(30)
    assert len(out) == 1 and isinstance(out[0], warnings.WarningMessage), out
    assert str(out[0].message) == "from the bottom"


def test_a_direct_call_points_at_its_caller():
    with pytest.warns(RuntimeWarning, match="here") as caught:
        line = inspect.currentframe().f_lineno + 1
        user_warnings.warn_at_user("here", RuntimeWarning)
    assert (caught[0].filename, caught[0].lineno) == (__file__, line)
