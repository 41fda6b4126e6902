"""numpydoc validation of the public API (after scikit-learn's ``test_docstrings.py``)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import importlib
import inspect

import pytest
import torch

numpydoc_validation = pytest.importorskip("numpydoc.validate")

PUBLIC_MODULES = [
    "skmetavi",
    "skmetavi.callbacks",
    "skmetavi.datasets",
    "skmetavi.divergences",
    "skmetavi.estimators",
    "skmetavi.metrics",
    "skmetavi.model_selection",
    "skmetavi.models",
    "skmetavi.pipeline",
    "skmetavi.plotting",
]

# numpydoc error codes ignored everywhere
# (https://numpydoc.readthedocs.io/en/latest/validation.html):
IGNORED_CODES = {
    # PEP 257 layout, used throughout skmetavi: the summary starts on the line of
    # the opening quotes, and one-line docstrings close on that line.  Formatting,
    # not content; scikit-learn ignores both.
    "GL01",
    "GL02",
    # The first line of Returns may name the returned object (``self : object``),
    # which numpydoc reads as a type with a description (scikit-learn ignores it).
    "RT02",
}
# Only class and function docstrings need an extended summary, See Also and
# Examples; a method's own context is its class (scikit-learn's rule).
CLASS_ONLY_CODES = {"ES01", "SA01", "EX01"}


def _public_objects():
    """Public classes and functions listed in ``__all__``, each once."""
    seen = {}
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                seen.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)
    return seen


def _doc_owner(klass, name):
    """The class whose ``name`` carries the docstring that ``klass.name`` shows.

    An override without a docstring shows its base's (``inspect.getdoc``, and
    Sphinx's ``autodoc_inherit_docstrings``), so the base's text is validated.
    """
    owners = [c for c in klass.__mro__ if name in vars(c)]
    for owner in owners:
        attr = vars(owner)[name]
        doc = (attr.fget if isinstance(attr, property) else attr).__doc__
        if doc:
            return owner
    return owners[0]


def _methods(klass):
    """Public methods and properties of ``klass``, with the class documenting each.

    Only those documented in skmetavi: torch's and scikit-learn's are theirs to check.
    """
    for name in sorted(dir(klass)):
        if name.startswith("_"):
            continue
        owner = _doc_owner(klass, name)
        attr = vars(owner)[name]
        if not owner.__module__.startswith("skmetavi"):
            continue
        if callable(attr) or isinstance(attr, (property, classmethod, staticmethod)):
            yield owner, name


def _docstring_targets():
    """Import paths of the docstrings to validate, each once."""
    targets = set()
    for import_path, obj in _public_objects().items():
        targets.add(import_path)
        if inspect.isclass(obj):
            targets.update(
                f"{owner.__module__}.{owner.__qualname__}.{name}" for owner, name in _methods(obj)
            )
    return sorted(targets)


def _inherits_module_init(import_path):
    """Whether a public class takes ``torch.nn.Module.__init__(*args, **kwargs)``."""
    obj = _public_objects().get(import_path)
    return inspect.isclass(obj) and obj.__init__ is torch.nn.Module.__init__


def _filter_errors(errors, *, import_path, is_method):
    for code, message in errors:
        if code in IGNORED_CODES:
            continue
        # A divergence without its own __init__ (KL, the Divergence base) shows
        # torch.nn.Module's signature ``(*args, **kwargs)``, the only parameters
        # PR01 can then report; it takes no parameters.
        if code == "PR01" and _inherits_module_init(import_path):
            continue
        if code in CLASS_ONLY_CODES and is_method:
            continue
        yield code, message


def test_public_api_is_covered():
    """The walk finds the estimators, divergences, models and datasets."""
    names = set(_public_objects())
    assert "skmetavi.estimators._divergence_vi.MetaDivergenceVI" in names
    assert "skmetavi.divergences.Renyi" in names
    assert "skmetavi.datasets.make_mog_tasks" in names
    assert "skmetavi.models._targets.GaussianMean" in names
    assert "skmetavi.estimators._bnn.MetaBNNRegressor" in names
    assert "skmetavi.metrics.get_scorer" in names
    assert "skmetavi.model_selection.TaskAdaptiveRegressor" in names
    assert "skmetavi.model_selection.support_query_split" in names


def test_public_methods_are_covered():
    """Methods defined in skmetavi are validated, inherited sklearn ones are not."""
    targets = set(_docstring_targets())
    bnn = "skmetavi.estimators._bnn.MetaBNNRegressor"
    base = "skmetavi.estimators._base._BaseMetaVI"
    adaptive = "skmetavi.model_selection.TaskAdaptiveRegressor"
    generic = "skmetavi._task_adaptive.TaskAdaptiveEstimator"
    assert {f"{bnn}.predict", f"{bnn}.log_predictive_density", f"{bnn}.sample_y"} <= targets
    assert {f"{base}.fit", f"{base}.meta_fit"} <= targets
    assert {f"{adaptive}.{m}" for m in ("fit", "predict")} <= targets
    assert {f"{generic}.{m}" for m in ("fit", "adapt", "score", "score_tasks")} <= targets
    assert {"skmetavi.pipeline.MetaPipeline.meta_fit", "skmetavi.pipeline.MetaPipeline.fit"} <= targets
    assert not [t for t in targets if t.startswith("sklearn.")]


@pytest.mark.parametrize("import_path", _docstring_targets())
def test_docstring(import_path):
    result = numpydoc_validation.validate(import_path)
    is_method = import_path not in _public_objects()
    errors = list(_filter_errors(result["errors"], import_path=import_path, is_method=is_method))
    if errors:
        lines = "\n".join(f"  {code}: {message}" for code, message in errors)
        pytest.fail(f"numpydoc errors in {import_path}:\n{lines}\n\n{result['docstring']}")
