"""Package-wide invariants: import layers, ``__all__``, pickling, CPU state, RNG hygiene."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import ast
import importlib
import pickle
import pkgutil
from itertools import chain
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch

import skmetavi
from skmetavi import Renyi
from skmetavi.divergences import KL, FDivergence, NeuralF, TailAdaptive, make_divergence
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.estimators import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.model_selection import TaskAdaptiveRegressor

PACKAGE_DIR = Path(skmetavi.__file__).parent

# The torch-only core (STYLE 2.1/2.2): torch in, torch out.
TORCH_ONLY = sorted(
    [
        PACKAGE_DIR / "divergences.py",
        PACKAGE_DIR / "_bilevel.py",
        PACKAGE_DIR / "_optim.py",
        PACKAGE_DIR / "_tasks.py",
        PACKAGE_DIR / "_params.py",
        PACKAGE_DIR / "_tree.py",
        PACKAGE_DIR / "_inner.py",
        PACKAGE_DIR / "_compiled.py",
        PACKAGE_DIR / "_compiled_meta.py",
        PACKAGE_DIR / "_first_order.py",
        PACKAGE_DIR / "_meta_losses.py",
        PACKAGE_DIR / "_strategies.py",
        PACKAGE_DIR / "_trainer.py",
        PACKAGE_DIR / "_implicit.py",
        PACKAGE_DIR / "_distributed.py",
        PACKAGE_DIR / "_allocator.py",
        *(PACKAGE_DIR / "models").glob("*.py"),
    ]
)
# The only numpy <-> torch crossing of the core.
CROSSING = PACKAGE_DIR / "_torch.py"
# Third-party packages of the numpy world (scipy, pandas and joblib import numpy).
NUMPY_WORLD = {"numpy", "scipy", "sklearn", "pandas", "joblib"}


def _module_name(path):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


ALL_FILES = sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)
ALL_MODULES = {_module_name(p) for p in ALL_FILES}
TORCH_ONLY_MODULES = {_module_name(p) for p in TORCH_ONLY}


def _imported_modules(source, module_name, is_package=False):
    """Absolute names of every module imported by ``source``, at any depth of its AST.

    ``from pkg import name`` yields ``pkg.name`` (``name`` may be a submodule, as in
    ``from skmetavi import _torch``, or an attribute).
    """
    package = module_name if is_package else module_name.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                module = ".".join(parts + ([module] if module else []))
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def _owning_module(name):
    """The longest prefix of ``name`` that is a skmetavi module.

    ``skmetavi.models._targets.Target`` is in ``skmetavi.models._targets``;
    ``skmetavi.MetaDivergenceVI`` is in ``skmetavi``, the public facade.
    """
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(len(parts), 0, -1))
    return next(prefix for prefix in prefixes if prefix in ALL_MODULES)


def _layer_violations(source, module_name, is_package=False):
    """Imports in ``source`` that leave the torch-only layer, sorted."""
    bad = set()
    for name in _imported_modules(source, module_name, is_package):
        top = name.split(".")[0]
        if top in NUMPY_WORLD:
            bad.add(name)
        elif top == "skmetavi" and _owning_module(name) not in TORCH_ONLY_MODULES:
            # The facade ``skmetavi`` imports the estimators, hence sklearn.
            bad.add(_owning_module(name))
    return sorted(bad)


def _check_path(path):
    return _layer_violations(
        path.read_text(encoding="utf-8"), _module_name(path), path.name == "__init__.py"
    )


@pytest.mark.parametrize("path", TORCH_ONLY, ids=_module_name)
def test_torch_only_layer_imports_neither_numpy_nor_sklearn(path):
    """The core below the estimators is torch in, torch out (STYLE 2.1, 2.2).

    It may import torch, the standard library and other torch-only modules; not
    numpy, scipy or sklearn, and not the layers above it (the ``skmetavi``
    facade, estimators, datasets, experiments, ``_torch``), which import them.
    """
    assert _check_path(path) == []


def test_torch_numpy_crossing():
    """``_torch`` is the one crossing: it imports numpy and torch, not sklearn or skmetavi."""
    source = CROSSING.read_text(encoding="utf-8")
    imported = {name.split(".")[0] for name in _imported_modules(source, "skmetavi._torch")}
    assert {"numpy", "torch"} <= imported
    assert not imported & {"sklearn", "scipy", "skmetavi"}


def test_layer_rule_detects_violations():
    """The checker itself flags numpy, sklearn and upward imports, nested or relative."""
    source = (
        "import math\n"
        "import torch\n"
        "from torch import nn\n"
        "from skmetavi._tasks import TaskBatch\n"
        "from skmetavi.models._families import MeanFieldGaussian\n"
        "from . import _families\n"
        "def f():\n"
        "    import numpy as np\n"
        "from sklearn.utils import check_array\n"
        "from skmetavi import _torch\n"
        "from skmetavi import MetaDivergenceVI\n"
        "from skmetavi.estimators import MetaDivergenceVI\n"
        "from .. import datasets\n"
    )
    assert _layer_violations(source, "skmetavi.models._new") == [
        "numpy",
        "sklearn.utils.check_array",
        "skmetavi",
        "skmetavi._torch",
        "skmetavi.datasets",
        "skmetavi.estimators",
    ]


# --------------------------------------------------------------------- __all__
def _public_module_names():
    names = ["skmetavi"]
    for info in pkgutil.walk_packages(skmetavi.__path__, prefix="skmetavi."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return sorted(names)


PUBLIC_MODULES = _public_module_names()


def test_public_modules_found():
    assert {"skmetavi", "skmetavi.divergences", "skmetavi.estimators"} <= set(PUBLIC_MODULES)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_module_has_all(module_name):
    """Every public module declares ``__all__``, without duplicates, of names it has."""
    module = importlib.import_module(module_name)
    assert hasattr(module, "__all__"), f"{module_name} has no __all__"
    assert len(set(module.__all__)) == len(module.__all__), "duplicate names in __all__"
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def _defines_all(path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets)
        for node in tree.body
    )


PRIVATE_MODULES_WITH_ALL = sorted(
    _module_name(p)
    for p in ALL_FILES
    if _module_name(p) not in PUBLIC_MODULES
    and p.name != "__main__.py"  # importing it runs the command line
    and _defines_all(p)
)


@pytest.mark.parametrize("module_name", PRIVATE_MODULES_WITH_ALL)
def test_private_all_names_exist(module_name):
    """Private modules that declare ``__all__`` list only names they define."""
    module = importlib.import_module(module_name)
    assert [name for name in module.__all__ if not hasattr(module, name)] == []


# ------------------------------------------------------------ fitted estimators
@pytest.fixture(scope="module")
def mog_tasks():
    return make_mog_tasks(4, random_state=0)


@pytest.fixture(scope="module")
def fitted_vi():
    """A plain ``fit`` on the conjugate Gaussian-mean model (no meta state)."""
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(30, 2))
    est = MetaDivergenceVI(divergence="renyi", max_iter=20, n_particles=8, random_state=0)
    return est.fit(X), X, None


@pytest.fixture(scope="module")
def fitted_blr():
    """A supervised model (needs ``y``), a full-covariance q and a NeuralF divergence."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 2))
    y = X @ np.array([1.0, -2.0]) + rng.normal(size=30)
    est = MetaDivergenceVI(
        "bayesian_linear_regression",
        family="full_covariance",
        divergence="neural_f",
        max_iter=20,
        n_particles=8,
        n_score_particles=32,
        random_state=0,
    )
    return est.fit(X, y), X, y


@pytest.fixture(scope="module")
def meta_fitted_vi(mog_tasks):
    """Meta-fitted (Algorithm 1), then fitted on one task; default ``random_state=None``."""
    X, groups = mog_tasks
    est = MetaDivergenceVI(
        "gaussian_mixture",
        divergence="renyi",
        inner_optimizer="sgd",
        max_meta_iter=5,
        max_iter=10,
    )
    est.meta_fit(X, groups=groups)
    X0 = X[groups == 0]
    return est.fit(X0), X0, None


@pytest.fixture(scope="module")
def sinusoid_tasks():
    return make_sinusoid_tasks(4, 20, random_state=0)


# A tiny Bayesian MLP (8 hidden units) with a few iterations of each loop.
FAST_BNN = dict(hidden_layer_sizes=(8,), max_iter=10, n_particles=4, n_predict_samples=8)


@pytest.fixture(scope="module")
def fitted_bnn(sinusoid_tasks):
    """A plain ``fit`` of the BNN (heteroskedastic noise head, a fixed Renyi alpha)."""
    X, y, groups = sinusoid_tasks
    X0, y0 = X[groups == 0], y[groups == 0]
    est = MetaBNNRegressor(Renyi(0.5, learnable=False), **FAST_BNN, random_state=0)
    return est.fit(X0, y0), X0, y0


@pytest.fixture(scope="module")
def meta_fitted_bnn(sinusoid_tasks):
    """Meta-D&phi (learned alpha and initialisation), then fit; ``random_state=None``.

    Two inner steps: with one, a fresh Adam's sign step gives alpha no meta-gradient.
    """
    X, y, groups = sinusoid_tasks
    est = MetaBNNRegressor(
        "renyi",
        **FAST_BNN,
        likelihood="homoskedastic",
        meta_learn_init=True,
        n_inner_steps=2,
        max_meta_iter=3,
        n_tasks_per_batch=2,
    )
    est.meta_fit(X, y, groups=groups)
    X0, y0 = X[groups == 0], y[groups == 0]
    return est.fit(X0, y0), X0, y0


FITTED = ["fitted_vi", "fitted_blr", "meta_fitted_vi", "fitted_bnn", "meta_fitted_bnn"]
# Fitted attributes that must survive pickling unchanged, per estimator class.
FITTED_ARRAYS = {
    MetaDivergenceVI: ("mean_", "covariance_", "loss_curve_"),
    MetaBNNRegressor: ("loss_curve_",),
}


def _outputs(est, X, y):
    if isinstance(est, MetaBNNRegressor):
        mean, std = est.predict(X, return_std=True)
        return {
            "predict": est.predict(X),
            "predict_mean": mean,
            "predict_std": std,
            "predict_epistemic_std": est.predict(X, return_std=True, epistemic_only=True)[1],
            "log_predictive_density": est.log_predictive_density(X, y),
            "sample_y": est.sample_y(X, 3),
            "sample_y_seeded": est.sample_y(X, 3, random_state=1),
            "score": est.score(X, y),
        }
    Z = np.linspace(-3.0, 3.0, 7 * est.n_latent_).reshape(7, est.n_latent_)
    return {
        "score_samples": est.score_samples(Z),
        "sample": est.sample(5),
        "sample_seeded": est.sample(5, random_state=1),
        "score": est.score(X, y),
    }


def _assert_outputs_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _tensors(obj, where="est"):
    """Every tensor reachable from a fitted estimator's attributes, with its path."""
    if isinstance(obj, torch.Tensor):
        yield where, obj
    elif isinstance(obj, torch.nn.Module):
        for name, t in obj.state_dict(keep_vars=True).items():
            yield f"{where}.{name}", t
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{where}[{i}]")


@pytest.mark.parametrize("name", FITTED)
def test_pickle_round_trip(name, request):
    """Plain pickle restores identical outputs and tensors (no ``__getstate__`` needed)."""
    est, X, y = request.getfixturevalue(name)
    restored = pickle.loads(pickle.dumps(est))
    _assert_outputs_equal(_outputs(est, X, y), _outputs(restored, X, y))
    for attr in FITTED_ARRAYS[type(est)]:
        np.testing.assert_array_equal(getattr(est, attr), getattr(restored, attr))
    tensors, restored_tensors = dict(_tensors(vars(est))), dict(_tensors(vars(restored)))
    assert tensors.keys() == restored_tensors.keys()
    for path, t in tensors.items():
        torch.testing.assert_close(restored_tensors[path], t, rtol=0, atol=0, msg=path)


def test_meta_state_survives_pickle(meta_fitted_vi):
    est, _, _ = meta_fitted_vi
    restored = pickle.loads(pickle.dumps(est))
    assert restored.n_meta_iter_ == est.n_meta_iter_ == 5
    np.testing.assert_array_equal(restored.meta_loss_curve_, est.meta_loss_curve_)
    assert restored.meta_divergence_.alpha == est.meta_divergence_.alpha


def test_bnn_meta_state_survives_pickle(meta_fitted_bnn):
    est, _, _ = meta_fitted_bnn
    restored = pickle.loads(pickle.dumps(est))
    assert restored.n_meta_iter_ == est.n_meta_iter_ == 3
    np.testing.assert_array_equal(restored.meta_loss_curve_, est.meta_loss_curve_)
    np.testing.assert_array_equal(restored.meta_tasks_, [0, 1, 2, 3])
    assert restored.meta_divergence_.alpha == est.meta_divergence_.alpha
    assert restored.meta_init_.keys() == est.meta_init_.keys()
    for key, t in est.meta_init_.items():
        torch.testing.assert_close(restored.meta_init_[key], t, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def meta_fitted_adaptive(sinusoid_tasks):
    """The cross-validation-over-tasks wrapper, meta-trained on three tasks."""
    X, y, groups = sinusoid_tasks
    train = groups < 3
    est = TaskAdaptiveRegressor(
        MetaBNNRegressor("renyi", **FAST_BNN, max_meta_iter=2, random_state=0),
        random_state=0,
    )
    return est.fit(X[train], y[train], groups=groups[train]), X[~train], y[~train]


def test_task_adaptive_pickle_round_trip(meta_fitted_adaptive):
    """The wrapper pickles with its meta-trained estimator; held-out scores agree."""
    est, X, y = meta_fitted_adaptive
    restored = pickle.loads(pickle.dumps(est))
    groups = np.zeros(X.shape[0], dtype=int)
    for metric in ("r2", "mlpd"):
        np.testing.assert_array_equal(
            restored.score_tasks(X, y, groups, metric=metric),
            est.score_tasks(X, y, groups, metric=metric),
        )
    assert [p for p, t in _tensors(vars(restored.estimator_)) if t.device.type != "cpu"] == []


@pytest.mark.parametrize("name", FITTED)
def test_fitted_state_is_on_cpu(name, request):
    """STYLE 2.2: fitted tensors live on the CPU, so plain pickle works anywhere."""
    est, _, _ = request.getfixturevalue(name)
    tensors = dict(_tensors(est.variational_params_, "variational_params_"))
    for attr in ("divergence_", "meta_divergence_"):
        module = getattr(est, attr, None)
        if module is not None:
            named = chain(module.named_parameters(), module.named_buffers())
            tensors.update({f"{attr}.{n}": t for n, t in named})
    assert any(path.startswith("divergence_.") for path in tensors)
    assert [path for path, t in tensors.items() if t.device.type != "cpu"] == []
    # And every other tensor it holds (meta_init_, the warm-start state).
    assert [path for path, t in _tensors(vars(est)) if t.device.type != "cpu"] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no cuda device")
def test_cuda_fit_leaves_state_on_cpu(mog_tasks):
    X, groups = mog_tasks
    est = MetaDivergenceVI(
        "gaussian_mixture",
        divergence="renyi",
        inner_optimizer="sgd",
        max_meta_iter=3,
        max_iter=5,
        device="cuda",
        random_state=0,
    )
    est.meta_fit(X, groups=groups).fit(X[groups == 0])
    off_cpu = [path for path, t in _tensors(vars(est)) if t.device.type != "cpu"]
    assert off_cpu == []
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.sample(3), est.sample(3))


@pytest.mark.parametrize("name", FITTED)
def test_score_and_sample_twice_identical(name, request):
    """score, score_samples and sample are deterministic once fitted (even unseeded)."""
    est, X, y = request.getfixturevalue(name)
    _assert_outputs_equal(_outputs(est, X, y), _outputs(est, X, y))


@pytest.mark.parametrize("name", ["fitted_bnn", "meta_fitted_bnn"])
def test_bnn_predict_invariant_to_rows(name, request):
    """STYLE 2.2: predict shares one set of weight draws across rows.

    A row's prediction does not depend on which other rows, or in which order,
    are predicted with it.
    """
    est, X, y = request.getfixturevalue(name)
    perm = np.random.RandomState(0).permutation(X.shape[0])
    mean, std = est.predict(X, return_std=True)
    mean_p, std_p = est.predict(X[perm], return_std=True)
    # float32 networks: chunking does not change the arithmetic per row, but BLAS
    # may reorder sums for different batch sizes.
    np.testing.assert_allclose(mean_p, mean[perm], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(std_p, std[perm], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(est.predict(X[:3]), mean[:3], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        est.log_predictive_density(X[perm], y[perm]),
        est.log_predictive_density(X, y)[perm],
        rtol=1e-6,
        atol=1e-6,
    )


# ------------------------------------------------------------------- global RNG
def _global_rng_state():
    return np.random.get_state(), torch.random.get_rng_state()


def _assert_global_rng_unchanged(before):
    np_before, torch_before = before
    np_after, torch_after = _global_rng_state()
    assert np_after[0] == np_before[0]
    np.testing.assert_array_equal(np_after[1], np_before[1])
    assert np_after[2:] == np_before[2:]
    assert torch.equal(torch_after, torch_before)


@pytest.mark.parametrize("random_state", [0, None], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("divergence", ["kl", "renyi", "neural_f", "tail_adaptive", "f"])
def test_global_rng_untouched(mog_tasks, divergence, random_state):
    """fit, meta_fit, score and sample use their own generators only.

    ``random_state=None`` draws fresh OS entropy instead of numpy's global RNG.
    """
    X, groups = mog_tasks
    est = MetaDivergenceVI(
        "gaussian_mixture",
        divergence=divergence,
        inner_optimizer="sgd",
        meta_learn_init=divergence in ("kl", "tail_adaptive", "f"),
        max_meta_iter=2,
        max_iter=5,
        n_particles=8,
        n_score_particles=16,
        random_state=random_state,
    )
    X0 = X[groups == 0]
    before = _global_rng_state()
    est.meta_fit(X, groups=groups)
    _assert_global_rng_unchanged(before)
    est.fit(X0)
    _assert_global_rng_unchanged(before)
    est.score(X0)
    est.score_samples(np.zeros((3, 1)))
    est.sample(4)
    est.sample(4, random_state=0)
    _assert_global_rng_unchanged(before)


@pytest.mark.parametrize("random_state", [0, None], ids=["seeded", "unseeded"])
@pytest.mark.parametrize("divergence", ["kl", "renyi", "neural_f"])
def test_bnn_global_rng_untouched(sinusoid_tasks, divergence, random_state):
    """MetaBNNRegressor and TaskAdaptiveRegressor leave numpy's and torch's global RNGs alone."""
    X, y, groups = sinusoid_tasks
    est = MetaBNNRegressor(
        divergence,
        **FAST_BNN,
        meta_learn_init=divergence == "kl",
        max_meta_iter=2,
        n_tasks_per_batch=2,
        batch_size=8,
        random_state=random_state,
    )
    X0, y0 = X[groups == 0], y[groups == 0]
    before = _global_rng_state()
    est.meta_fit(X, y, groups=groups)
    _assert_global_rng_unchanged(before)
    est.fit(X0, y0)
    _assert_global_rng_unchanged(before)
    est.predict(X0, return_std=True)
    est.log_predictive_density(X0, y0)
    est.score(X0, y0)
    est.sample_y(X0, 2)
    est.sample_y(X0, 2, random_state=0)
    _assert_global_rng_unchanged(before)
    wrapper = TaskAdaptiveRegressor(est, random_state=random_state)
    wrapper.fit(X, y, groups=groups).score(X, y, groups=groups)
    _assert_global_rng_unchanged(before)


def test_unseeded_fits_differ(mog_tasks):
    """``random_state=None`` is still random (fresh entropy, not a fixed seed)."""
    X, groups = mog_tasks
    X0 = X[groups == 0]
    kwargs = dict(divergence="kl", max_iter=3, n_particles=8)
    a = MetaDivergenceVI("gaussian_mixture", **kwargs).fit(X0)
    b = MetaDivergenceVI("gaussian_mixture", **kwargs).fit(X0)
    assert not np.array_equal(a.loss_curve_, b.loss_curve_)


def test_unseeded_bnn_fits_differ(sinusoid_tasks):
    X, y, groups = sinusoid_tasks
    X0, y0 = X[groups == 0], y[groups == 0]
    a = MetaBNNRegressor(**FAST_BNN).fit(X0, y0)
    b = MetaBNNRegressor(**FAST_BNN).fit(X0, y0)
    assert not np.array_equal(a.loss_curve_, b.loss_curve_)


def test_datasets_leave_global_rng_untouched():
    """``random_state=None`` draws fresh OS entropy, as the estimators do."""
    before = _global_rng_state()
    a = make_mog_tasks(3)[0]
    b = make_mog_tasks(3)[0]
    c = make_sinusoid_tasks(2, 5)[1]
    d = make_sinusoid_tasks(2, 5)[1]
    _assert_global_rng_unchanged(before)
    assert not np.array_equal(a, b) and not np.array_equal(c, d)
    np.testing.assert_array_equal(
        make_mog_tasks(3, random_state=0)[0], make_mog_tasks(3, random_state=0)[0]
    )


@pytest.mark.parametrize(
    "factory",
    [
        KL,
        lambda: Renyi(0.3),
        lambda: FDivergence(2.0),
        TailAdaptive,
        lambda: make_divergence("renyi"),
        lambda: NeuralF((4,)),
    ],
    ids=["kl", "renyi", "f", "tail_adaptive", "make_divergence", "neural_f"],
)
def test_divergence_construction_leaves_global_rng_untouched(factory):
    before = _global_rng_state()
    factory()
    _assert_global_rng_unchanged(before)


# ------------------------------------------------------------------ determinism
def _vi_alg1(seed):
    X, groups = make_mog_tasks(4, random_state=0)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence="renyi", inner_optimizer="sgd", max_meta_iter=5,
        max_iter=10, n_particles=8, n_score_particles=16, random_state=seed,
    )
    return est.meta_fit(X, groups=groups).fit(X[groups == 0]), X[groups == 0], None


def _vi_alg2_neural_f(seed):
    X, groups = make_mog_tasks(4, random_state=0)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence="neural_f", meta_learn_init=True, n_inner_steps=2,
        max_meta_iter=4, max_iter=10, n_particles=8, n_score_particles=16, random_state=seed,
    )
    return est.meta_fit(X, groups=groups).fit(X[groups == 1]), X[groups == 1], None


def _bnn_alg2_minibatch(seed):
    X, y, groups = make_sinusoid_tasks(4, 20, random_state=0)
    est = MetaBNNRegressor(
        "renyi", **FAST_BNN, meta_learn_init=True, n_inner_steps=2, n_tasks_per_batch=2,
        batch_size=8,
        max_meta_iter=3, random_state=seed,
    )
    X0, y0 = X[groups == 0], y[groups == 0]
    return est.meta_fit(X, y, groups=groups).fit(X0, y0), X0, y0


def _arrays(est):
    return {k: v for k, v in vars(est).items() if isinstance(v, np.ndarray)}


@pytest.mark.parametrize(
    "make", [_vi_alg1, _vi_alg2_neural_f, _bnn_alg2_minibatch],
    ids=["vi-meta-d", "vi-meta-d-phi-neural_f", "bnn-meta-d-phi-minibatch"],
)
def test_same_seed_bit_identical_state_different_seed_differs(make):
    """On the CPU a seed fixes every fitted tensor, array and output exactly."""
    a, X, y = make(0)
    b, _, _ = make(0)
    c, _, _ = make(1)
    ta, tb = dict(_tensors(vars(a))), dict(_tensors(vars(b)))
    assert ta.keys() == tb.keys() and any(p.startswith("est['meta_") for p in ta)
    for path, t in ta.items():
        torch.testing.assert_close(tb[path], t, rtol=0, atol=0, msg=path)
    arrays_a, arrays_b = _arrays(a), _arrays(b)
    assert arrays_a.keys() == arrays_b.keys()
    for key in arrays_a:
        np.testing.assert_array_equal(arrays_b[key], arrays_a[key], err_msg=key)
    _assert_outputs_equal(_outputs(a, X, y), _outputs(b, X, y))
    # Another seed: other Monte Carlo noise everywhere.
    assert not np.array_equal(c.meta_loss_curve_, a.meta_loss_curve_)
    assert not np.array_equal(c.loss_curve_, a.loss_curve_)
    outputs_a, outputs_c = _outputs(a, X, y), _outputs(c, X, y)
    for key in ("predict", "sample_y", "score_samples", "sample"):
        if key in outputs_a:
            assert not np.array_equal(outputs_a[key], outputs_c[key]), key


@pytest.mark.parametrize("name", FITTED)
def test_joblib_round_trip(name, request, tmp_path):
    """joblib (compressed) restores identical outputs and tensors, meta_init_ included."""
    est, X, y = request.getfixturevalue(name)
    joblib.dump(est, tmp_path / "est.joblib", compress=3)
    restored = joblib.load(tmp_path / "est.joblib")
    _assert_outputs_equal(_outputs(est, X, y), _outputs(restored, X, y))
    tensors, restored_tensors = dict(_tensors(vars(est))), dict(_tensors(vars(restored)))
    assert tensors.keys() == restored_tensors.keys()
    for path, t in tensors.items():
        torch.testing.assert_close(restored_tensors[path], t, rtol=0, atol=0, msg=path)
    if name == "meta_fitted_bnn":
        assert "est['meta_init_']['loc']" in tensors


# The engine's internals, reached only through the estimators from above.
ENGINE_INTERNALS = {
    "skmetavi._bilevel", "skmetavi._inner", "skmetavi._optim", "skmetavi._tasks",
    "skmetavi._trainer", "skmetavi._strategies", "skmetavi._implicit", "skmetavi._meta_losses",
    "skmetavi._tree", "skmetavi._torch", "skmetavi._distributed", "skmetavi._compiled",
    "skmetavi._first_order", "skmetavi._compiled_meta",
}


@pytest.mark.parametrize(
    "path",
    sorted((PACKAGE_DIR / "experiments").glob("*.py"))
    + [PACKAGE_DIR.parent / "benchmarks" / "run.py",
       PACKAGE_DIR.parent / "benchmarks" / "real_tasks.py",
       PACKAGE_DIR.parent / "benchmarks" / "meta_compile.py"],
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_experiments_and_benchmarks_use_the_estimators_not_the_engine(path):
    """One adaptation path: the reproductions and benchmarks go through the estimators."""
    if not path.exists():
        pytest.skip("benchmarks/ is not part of an installed package")
    module = f"benchmarks.{path.stem}" if path.parent.name == "benchmarks" else _module_name(path)
    imported = _imported_modules(path.read_text(encoding="utf-8"), module)
    owners = {_owning_module(n) for n in imported if n.startswith("skmetavi.")}
    assert owners & ENGINE_INTERNALS == set()
