"""The documentation site (docs/): it builds with warnings as errors, every page's
examples run and print what the page says they print, and the API page documents
every public name."""

from __future__ import annotations

import doctest
import inspect
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import adamkit

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
#: pages that must hold runnable examples (a page that loses them fails, not passes)
PAGES_WITH_EXAMPLES = {"getting-started.md", "options.md", "lean-memory.md"}
#: a Markdown code fence in Python, up to its closing fence
PYTHON_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def test_the_site_builds_without_warnings(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(DOCS), str(tmp_path / "html")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, f"sphinx-build exited {build.returncode}:\n{build.stderr}"


def python_fences_only(text: str) -> str:
    """The page with everything outside its ```python fences blanked, line numbers kept
    (so a failure names the page's own line)."""
    kept = [""] * (text.count("\n") + 1)
    lines = text.split("\n")
    for match in PYTHON_FENCE.finditer(text):
        first = text.count("\n", 0, match.start(1))
        for i in range(first, first + match.group(1).count("\n")):
            kept[i] = lines[i]
    return "\n".join(kept)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_the_pages_examples_print_what_they_say(page):
    text = page.read_text(encoding="utf-8")
    test = doctest.DocTestParser().get_doctest(
        python_fences_only(text), {"__name__": "__docs__"}, page.name, str(page), 0
    )
    if page.name in PAGES_WITH_EXAMPLES or re.search(r"^>>> ", text, flags=re.MULTILINE):
        assert test.examples, f"{page.name} has no doctest examples inside ```python fences"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    numpy_state = np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):  # the examples seed torch; the caller's RNG is restored
            result = runner.run(test, out=report.append, clear_globs=True)
    finally:
        np.random.set_state(numpy_state)
    assert result.failed == 0, "".join(report)
    assert result.attempted == len(test.examples)


def _documented_targets(api_page: str) -> set[str]:
    """What the API page's autodoc (and py:) directives document."""
    return set(re.findall(r"^\s*\.\. (?:auto\w+|py:\w+):: ([\w.]+)", api_page, flags=re.MULTILINE))


@pytest.mark.parametrize("name", adamkit.__all__)
def test_every_public_name_has_a_docstring_and_is_on_the_api_page(name):
    obj = getattr(adamkit, name)
    targets = _documented_targets((DOCS / "api.md").read_text(encoding="utf-8"))
    if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj):
        assert (inspect.getdoc(obj) or "").strip(), f"adamkit.{name} has no docstring"
        where = {f"adamkit.{name}", obj.__name__ if inspect.ismodule(obj) else f"{obj.__module__}.{obj.__qualname__}"}
    else:  # a value such as __version__: its description is on the page itself
        where = {f"adamkit.{name}"}
    assert where & targets, f"adamkit.{name} is not documented in docs/api.md (looked for {sorted(where)})"
