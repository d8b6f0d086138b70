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
