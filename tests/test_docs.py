"""Build the documentation (Sphinx, numpydoc, sphinx-gallery) with warnings as errors."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import importlib
import os
import pathlib
import re
import subprocess
import sys

import pytest

for _module in ("sphinx", "numpydoc", "sphinx_gallery", "myst_parser", "pydata_sphinx_theme"):
    pytest.importorskip(_module, reason="the doc extra is not installed")

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "doc"
EXAMPLES = sorted((ROOT / "examples").glob("plot_*.py"))

# Every public module whose names the API reference must document.
PUBLIC_MODULES = [
    "skmetavi",
    "skmetavi.divergences",
    "skmetavi.metrics",
    "skmetavi.model_selection",
    "skmetavi.callbacks",
    "skmetavi.pipeline",
    "skmetavi.datasets",
    "skmetavi.exceptions",
    "skmetavi.models",
]
if importlib.util.find_spec("skmetavi.plotting") is not None:
    PUBLIC_MODULES.append("skmetavi.plotting")

# The user guide's topics (issue 14).
USER_GUIDE_TOPICS = [
    "Tasks and groups",
    "meta_fit versus fit",
    "Divergences, and what learning them means",
    "Algorithms 1 and 2",
    "Budgets and adaptation horizons",
    "Cross-validation over tasks",
    "Beyond one machine: torch.distributed",
    "Reliability",
]


def _build(out, *options, timeout):
    """Run sphinx-build -W in a subprocess; return its stderr (the warnings)."""
    env = dict(os.environ, MPLBACKEND="Agg")
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
           "-d", str(out / "doctrees"), *options, str(DOC), str(out / "html")]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-5000:]
    # -W turns the first warning into a failure; --keep-going lists them all.
    assert not re.search(r"WARNING|ERROR", res.stderr), res.stderr[-5000:]
    return out / "html"


def _text(path):
    assert path.is_file(), f"{path} was not built"
    html = path.read_text(encoding="utf-8")
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _public_names(module_name):
    module = importlib.import_module(module_name)
    return [n for n in module.__all__ if not n.startswith("__")]


def _check_site(html):
    for page in ["index", "user_guide", "api", "reproducing", "results", "auto_examples/index"]:
        _text(html / f"{page}.html")

    guide = _text(html / "user_guide.html")
    for topic in USER_GUIDE_TOPICS:
        assert topic in guide, topic
    results = _text(html / "results.html")
    assert "Table 1" in results and "paper" in results

    # The API page of MetaBNNRegressor: its parameters, attributes and methods.
    bnn = _text(html / "generated" / "skmetavi.MetaBNNRegressor.html")
    for name in ["hidden_layer_sizes", "n_inner_steps", "meta_learn_init", "max_meta_iter",
                 "meta_divergence_", "variational_params_", "meta_fit", "predict",
                 "Parameters", "Attributes"]:
        assert name in bnn, name
    assert "Unknown target name" not in bnn and "problematic" not in bnn

    # Every public name has a page (a class, function or data item of the reference).
    api = _text(html / "api.html")
    documented = {p.stem for p in (html / "generated").glob("*.html")}
    for module_name in PUBLIC_MODULES:
        for name in _public_names(module_name):
            assert name in api, f"{module_name}.{name} missing from the API reference"
            assert any(d.rsplit(".", 1)[-1] == name for d in documented), (
                f"{module_name}.{name} has no API page"
            )

    # One gallery page per example script.
    gallery = _text(html / "auto_examples" / "index.html")
    for path in EXAMPLES:
        assert (html / "auto_examples" / f"{path.stem}.html").is_file(), path.stem
    assert len(EXAMPLES) >= 6
    assert "Examples" in gallery


def test_docs_build_without_gallery_execution(tmp_path):
    """The site builds with zero warnings; the examples are not run (test_examples does)."""
    html = _build(tmp_path, "-D", "plot_gallery=0", timeout=900)
    _check_site(html)


@pytest.mark.slow
def test_docs_build_with_executed_gallery(tmp_path):
    """The full site: every example runs inside Sphinx and leaves its figures."""
    html = _build(tmp_path, timeout=3600)
    _check_site(html)
    for path in EXAMPLES:
        page = (html / "auto_examples" / f"{path.stem}.html").read_text(encoding="utf-8")
        assert re.search(rf"sphx_glr_{path.stem}_\d+\.png", page), (
            f"{path.stem}: no figure on its gallery page"
        )
        assert "Traceback" not in page, f"{path.stem} failed"
