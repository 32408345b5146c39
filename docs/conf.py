"""Sphinx configuration of the API reference (``make docs``; warnings are errors there)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "speech_kd"
author = "speech_kd contributors"
copyright = "speech_kd contributors, Apache-2.0"  # noqa: A001 (Sphinx's name)

extensions = ["sphinx.ext.autodoc", "sphinx.ext.autosummary", "sphinx.ext.napoleon"]

# Only the reST sources of the API reference: the Markdown guides in docs/ are read as they are.
source_suffix = {".rst": "restructuredtext"}
exclude_patterns = ["_build", "*.md", "figures"]
templates_path = ["_templates"]

# numpy-style docstrings (ruff's D rules check the sections)
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes" as fields: autodoc documents the attributes themselves too

# one page per module, generated from the package itself so the reference cannot drift
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "undoc-members": False, "ignore-module-all": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_class_signature = "separated"

html_theme = "alabaster"
html_title = "speech_kd API reference"
