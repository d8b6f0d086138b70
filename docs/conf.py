"""Sphinx configuration of adamkit's documentation site.

Build it with ``python -m sphinx -b html docs docs/_build/html`` (after
``pip install -e ".[docs]"``).  The pages are Markdown (MyST); the API reference is
rendered by autodoc from adamkit's own reST docstrings.  Nothing is fetched from the
network while building: MathJax is loaded by the reader's browser.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Import adamkit from this checkout's src/ even where it is not installed, so that
# autodoc documents the code next to these pages.
sys.path.insert(0, str(ROOT / "src"))

import adamkit  # noqa: E402

project = "adamkit"
author = "the adamkit authors"
copyright = "the adamkit authors"
release = adamkit.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# MyST: $...$ and $$...$$ math, ::: fences, and anchors for ## and ### headings so
# that pages can link to each other's sections (page.md#section).
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3

# autodoc: members in source order.
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# long signatures (the optimizers take some thirty arguments) one parameter a line
python_maximum_signature_line_length = 100

html_theme = "furo"
html_title = f"adamkit {release}"
html_static_path: list[str] = []


def _separate_options_table(app, what, name, obj, options, lines):
    """Put a blank line between ``adamkit.options``' prose and the option table that the
    module appends to its docstring at import time.

    The table is joined straight onto the line that introduces it, which reST reads as
    a paragraph followed by an unexpected indentation.  Until ``adamkit/options.py``
    starts its table with a blank line, this adds one here; once it does, this finds
    nothing to do.
    """
    if what != "module" or name != "adamkit.options":
        return
    for i, line in enumerate(lines[:-1]):
        if line.rstrip().endswith("(reproduced from :data:`OPTIONS`):") and lines[i + 1].strip():
            lines.insert(i + 1, "")
            return


def setup(app):
    app.connect("autodoc-process-docstring", _separate_options_table)
