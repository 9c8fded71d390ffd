"""Sphinx configuration of the empf_jax documentation (``make docs``)."""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import generate  # noqa: E402  (docs/generate.py: pages written from the code)

project = "empf_jax"
author = "empf_jax authors"
copyright = "2026, empf_jax authors"
release = "0.1.0"

extensions = [
  "myst_nb",
  "sphinx.ext.autodoc",
  "sphinx.ext.autosummary",
  "sphinx.ext.napoleon",
  "sphinx.ext.mathjax",
  "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
# quickstart.ipynb is shown via _generated; scaling_tables.md is included by scaling.md
exclude_patterns = [
  "_build",
  "**.ipynb_checkpoints",
  "quickstart.ipynb",
  "_generated/scaling_tables.md",
]
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the notebook is rendered with its stored outputs

autodoc_member_order = "bysource"
autodoc_typehints = "description"
# Each object on the page of the module that defines it (a package's __all__ re-exports are not
# documented twice).
autodoc_default_options = {"members": True, "show-inheritance": True, "ignore-module-all": True}
autosummary_generate = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # "Attributes:" as fields, not as a second description of each member
nitpicky = False
smartquotes = False  # "--flag" stays two hyphens

html_theme = "furo"
html_title = "empf_jax"


def setup(app):
  app.connect("builder-inited", lambda app: generate.write_pages(pathlib.Path(app.srcdir)))
