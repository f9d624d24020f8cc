"""Sphinx configuration of fastgrad's documentation (``bash scripts/docs.sh`` builds it, warnings as errors).

Sphinx rather than MkDocs: the docstrings are reStructuredText with Sphinx roles (``:func:``, ``:class:``) and
Google-style ``Args:`` sections, which autodoc and napoleon render as they are; pages are MyST Markdown; the theme
is furo (maintained, readable on a phone)."""
import os
import sys

DOCS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(DOCS))  # the repository's fastgrad, built in place
sys.path.insert(0, os.path.join(DOCS, "_ext"))

import fastgrad  # noqa: E402

project = "fastgrad"
author = "the fastgrad developers"
copyright = "2026, the fastgrad developers"
release = version = fastgrad.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "sphinx_copybutton",
    "fastgrad_docs",
]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["colon_fence", "deflist", "dollarmath"]
myst_heading_anchors = 3
exclude_patterns = ["_build", "README.md"]

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False

html_theme = "furo"
html_title = f"fastgrad {release}"
html_static_path = ["_static"]
suppress_warnings = ["myst.header"]
