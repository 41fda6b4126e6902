"""Sphinx configuration of the skmetavi documentation.

Build (zero warnings expected)::

    .venv/bin/python -m sphinx -W --keep-going -b html doc doc/_build/html

Add ``-D plot_gallery=0`` to build without executing the examples (minutes faster).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import importlib
import os
import pathlib
import re
import sys
import warnings

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # the checkout's package, also when not installed

import skmetavi  # noqa: E402
import torch  # noqa: E402

project = "skmetavi"
author = "The skmetavi developers"
copyright = "The skmetavi developers, BSD-3-Clause"  # noqa: A001
release = skmetavi.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
    "myst_parser",
]

# Formulas: MathJax bundled with the site (the `doc` extra's sphinx-mathjax-offline),
# so the pages render math without a CDN; without that package, MathJax's CDN.
try:
    importlib.import_module("sphinx-mathjax-offline")
except ImportError:
    pass
else:
    extensions.append("sphinx-mathjax-offline")

# The Markdown pages (user guide, reproduction) are MyST; the API page is reST.
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "_templates", "Thumbs.db", ".DS_Store"]
templates_path = ["_templates"]
# The reST role of `single backquotes`: a cross-reference to a Python object, as
# in scikit-learn's docstrings, and a literal when nothing matches.
default_role = "py:obj"
suppress_warnings = []

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

# -- API reference ----------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = True
autodoc_default_options = {"inherited-members": False}
autodoc_typehints = "none"  # numpydoc's Parameters sections carry the types
add_module_names = False
numpydoc_show_class_members = False  # the class template lists members itself
numpydoc_class_members_toctree = False
# Types are parsed: only the aliases below become links, every other word stays text.
# numpydoc's default aliases point into the Python and NumPy inventories, which are
# not loaded offline (see intersphinx below): they are mapped to plain names here.
numpydoc_xref_param_type = True
numpydoc_xref_ignore = "all"
_PLAIN = ["bool", "boolean", "iterable", "sequence", "generator", "array-like", "array_like",
          "scalar", "None", "True", "False", "list", "tuple", "str", "string", "dict",
          "float", "int", "callable"]
numpydoc_xref_aliases = {name: name for name in _PLAIN}
# Fitted-attribute names inside types, "ndarray of shape (n_meta_iter_,)", would
# otherwise be read as reST link references (sklearn writes them in backquotes,
# "(`n_features_in_`,)"); numpydoc's tokens here include the comma.
numpydoc_xref_aliases.update(
    {f"{name}_,": f"``{name}_``," for name in ("n_meta_iter", "n_features_in")}
)
numpydoc_xref_aliases.update({
    "MetaBNNRegressor": "skmetavi.MetaBNNRegressor",
    "MetaDivergenceVI": "skmetavi.MetaDivergenceVI",
    "MetaVAE": "skmetavi.MetaVAE",
    "MetaPartialVAE": "skmetavi.MetaPartialVAE",
    "Divergence": "skmetavi.divergences.Divergence",
    "History": "skmetavi.callbacks.History",
})
numpydoc_attributes_as_param_list = True

# -- Gallery ----------------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": re.escape(os.sep) + "plot_",  # run every plot_*.py
    "doc_module": ("skmetavi",),
    "backreferences_dir": "generated/backreferences",
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "abort_on_example_error": False,
    "only_warn_on_example_error": False,
    "min_reported_time": 1,
    "show_memory": False,
    "remove_config_comments": True,
    "capture_repr": (),
    "matplotlib_animations": False,
    "write_computation_times": True,
}
os.environ.setdefault("MPLBACKEND", "Agg")

# The examples run inside this process. Their torch problems are tiny: torch's
# intra-op thread pool only adds contention (tests/conftest.py does the same).
torch.set_num_threads(1)

# -- Cross-references to other projects --------------------------------------
# Off by default: the build machines have no internet, and a failed inventory
# download is a warning (an error under -W).  SKMETAVI_DOC_INTERSPHINX=1 turns
# the links to Python, NumPy, scikit-learn and PyTorch on where they can be fetched.
if os.environ.get("SKMETAVI_DOC_INTERSPHINX") == "1":
    extensions.append("sphinx.ext.intersphinx")
    intersphinx_mapping = {
        "python": ("https://docs.python.org/3", None),
        "numpy": ("https://numpy.org/doc/stable", None),
        "sklearn": ("https://scikit-learn.org/stable", None),
        "torch": ("https://docs.pytorch.org/docs/stable", None),
    }

# -- HTML ---------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"skmetavi {release}"
html_static_path = []
html_show_sourcelink = False
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "navbar_align": "left",
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
    "secondary_sidebar_items": ["page-toc"],
}
html_sidebars = {"index": [], "reproducing": [], "results": []}

# matplotlib's Agg backend under the gallery: no GUI warnings.
warnings.filterwarnings("ignore", message="Matplotlib is currently using agg")
