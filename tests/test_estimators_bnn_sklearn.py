"""MetaBNNRegressor inside scikit-learn's tools: pipelines, search, imputation, persistence."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.base import clone
from sklearn.compose import TransformedTargetRegressor
from sklearn.experimental import enable_iterative_imputer  # noqa: F401
from sklearn.impute import IterativeImputer, SimpleImputer
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from skmetavi import KL, MetaBNNRegressor, Renyi
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.metrics import get_scorer

# A tiny Bayesian MLP: 8 hidden units, 30 epochs, 4 particles (~0.05 s per fit).
FAST = dict(
    hidden_layer_sizes=(8,), max_iter=30, n_particles=4, n_predict_samples=16, random_state=0
)


@pytest.fixture(scope="module")
def task():
    """One sinusoid task of 60 rows, inputs shifted and scaled far from standard."""
    X, y, _ = make_sinusoid_tasks(1, 60, random_state=0)
    return 100.0 + 50.0 * X, y


@pytest.fixture(scope="module")
def tasks():
    return make_sinusoid_tasks(4, 30, random_state=0)


# ----------------------------------------------------------------------- Pipeline
def test_pipeline_fit_predict_score(task):
    X, y = task
    pipe = make_pipeline(StandardScaler(), MetaBNNRegressor(**FAST)).fit(X, y)
    # The pipeline is the BNN on standardised inputs.
    Xt = StandardScaler().fit_transform(X)
    direct = MetaBNNRegressor(**FAST).fit(Xt, y)
    np.testing.assert_allclose(pipe.predict(X), direct.predict(Xt), rtol=1e-6)
    mean, std = pipe.predict(X, return_std=True)  # extra predict params pass through
    assert mean.shape == std.shape == (60,)
    assert np.all(std > 0)
    np.testing.assert_allclose(pipe.score(X, y), direct.score(Xt, y), rtol=1e-6)
    assert np.isfinite(get_scorer("mlpd")(pipe, X, y))


def test_pipeline_return_std_with_metadata_routing(task):
    """With routing on, predict params reach the BNN once it requests them."""
    X, y = task
    with sklearn.config_context(enable_metadata_routing=True):
        bnn = MetaBNNRegressor(**FAST).set_predict_request(return_std=True)
        pipe = Pipeline([("scale", StandardScaler()), ("bnn", bnn)]).fit(X, y)
        mean, std = pipe.predict(X, return_std=True)
    np.testing.assert_allclose(mean, pipe.predict(X), rtol=1e-12)
    assert np.all(std > 0)


def test_pipeline_cross_val_score_with_probabilistic_scorer(task):
    X, y = task
    pipe = make_pipeline(StandardScaler(), MetaBNNRegressor(**FAST))
    scores = cross_val_score(pipe, X, y, cv=KFold(3), scoring=get_scorer("neg_crps"))
    assert scores.shape == (3,)
    assert np.all(np.isfinite(scores)) and np.all(scores < 0)


# ------------------------------------------------------------------- GridSearchCV
def test_grid_search_over_divergence(task):
    X, y = task
    grid = GridSearchCV(
        MetaBNNRegressor(**FAST),
        {"divergence": ["kl", "renyi", Renyi(0.5, learnable=False), Renyi(1.0)]},
        cv=KFold(3),
        scoring=get_scorer("mlpd"),
        error_score="raise",
    ).fit(X, y)
    scores = grid.cv_results_["mean_test_score"]
    assert np.all(np.isfinite(scores))
    # "renyi" is Renyi(0.5): learnable or not, fit uses the same alpha.
    np.testing.assert_allclose(scores[1], scores[2], rtol=1e-10)
    # Two implementations of KL: uniform particle weights vs Renyi at alpha = 1.
    np.testing.assert_allclose(scores[0], scores[3], rtol=1e-5)
    assert not np.isclose(scores[0], scores[1], rtol=1e-5)
    assert grid.best_estimator_.divergence_ is not grid.best_params_["divergence"]


def test_grid_search_over_nested_divergence_alpha(task):
    X, y = task
    est = MetaBNNRegressor(Renyi(0.5), **FAST)
    assert est.get_params()["divergence__alpha"] == 0.5
    assert est.get_params()["divergence__learnable"] is True
    grid = GridSearchCV(
        est, {"divergence__alpha": [0.25, 1.0, 2.0]}, cv=KFold(3), error_score="raise"
    ).fit(X, y)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    assert [p["divergence__alpha"] for p in grid.cv_results_["params"]] == [0.25, 1.0, 2.0]
    best_alpha = grid.best_params_["divergence__alpha"]
    np.testing.assert_allclose(grid.best_estimator_.divergence.alpha, best_alpha, rtol=1e-12)
    np.testing.assert_allclose(grid.best_estimator_.divergence_.alpha, best_alpha, rtol=1e-12)
    # The searched estimator's own divergence was never modified.
    assert est.divergence.alpha == 0.5


def test_nested_set_params_and_clone():
    est = MetaBNNRegressor(Renyi(0.5), **FAST)
    est.set_params(divergence__alpha=2.0)
    np.testing.assert_allclose(est.divergence.alpha, 2.0, rtol=1e-12)
    assert est.divergence.learnable
    cloned = clone(est)
    assert cloned.divergence is not est.divergence
    np.testing.assert_allclose(cloned.get_params()["divergence__alpha"], 2.0, rtol=1e-12)
    cloned.set_params(divergence__learnable=False)
    assert est.divergence.learnable  # the original is unaffected
    with pytest.raises(ValueError, match="Invalid parameter 'beta' for Renyi"):
        est.set_params(divergence__beta=1.0)


# ---------------------------------------------------------- TransformedTargetRegressor
def test_transformed_target_regressor(task):
    X, y = task
    ttr = TransformedTargetRegressor(
        regressor=MetaBNNRegressor(**FAST, normalize_y=False), transformer=StandardScaler()
    ).fit(X, y)
    # Equivalent to the BNN's own per-task standardisation of y.
    direct = MetaBNNRegressor(**FAST).fit(X, y)
    np.testing.assert_allclose(ttr.predict(X), direct.predict(X), rtol=1e-4, atol=1e-4)
    assert np.isfinite(ttr.score(X, y))


# ------------------------------------------------------------------ IterativeImputer
def test_iterative_imputer_sample_posterior():
    """sample_posterior=True draws from predict(X, return_std=True)."""
    rng = np.random.RandomState(0)
    Z = rng.normal(size=(80, 3))
    Z[:, 2] = Z[:, 0] + Z[:, 1] + 0.1 * rng.normal(size=80)
    missing = np.zeros(Z.shape, dtype=bool)
    missing[:, 2] = rng.rand(80) < 0.25
    Z_missing = np.where(missing, np.nan, Z)

    def impute():
        bnn = MetaBNNRegressor(**dict(FAST, max_iter=50))
        imputer = IterativeImputer(
            estimator=bnn, sample_posterior=True, max_iter=2, random_state=0
        )
        return imputer.fit_transform(Z_missing)

    out = impute()
    assert out.shape == Z.shape
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[~missing], Z[~missing])
    np.testing.assert_array_equal(impute(), out)  # seeded end to end
    # Learns something: well below the error of mean imputation (0.60 vs 1.00 observed).
    error = np.abs(out[missing] - Z[missing]).mean()
    mean_error = np.abs(SimpleImputer().fit_transform(Z_missing)[missing] - Z[missing]).mean()
    assert error < 0.8 * mean_error


# ------------------------------------------------------------------ persistence
def test_joblib_round_trip(task, tmp_path):
    X, y = task
    est = MetaBNNRegressor("renyi", **FAST).fit(X, y)
    path = tmp_path / "bnn.joblib"
    joblib.dump(est, path)
    restored = joblib.load(path)
    np.testing.assert_array_equal(restored.predict(X), est.predict(X))
    for a, b in zip(restored.predict(X, return_std=True), est.predict(X, return_std=True)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(restored.sample_y(X, 2), est.sample_y(X, 2))
    assert restored.divergence_.alpha == est.divergence_.alpha


def test_joblib_round_trip_meta_fitted(tasks, tmp_path):
    X, y, groups = tasks
    est = MetaBNNRegressor("renyi", **FAST, max_meta_iter=3, n_tasks_per_batch=2)
    est.meta_fit(X, y, groups=groups)
    joblib.dump(est, tmp_path / "meta.joblib")
    restored = joblib.load(tmp_path / "meta.joblib")
    assert restored.meta_divergence_.alpha == est.meta_divergence_.alpha
    X0, y0 = X[groups == 0], y[groups == 0]
    # Adapting the restored meta-trained estimator gives the same fit.
    np.testing.assert_array_equal(restored.fit(X0, y0).predict(X0), est.fit(X0, y0).predict(X0))


# ------------------------------------------------------------ clone and meta state
@pytest.fixture(scope="module")
def meta_fitted(tasks):
    X, y, groups = tasks
    est = MetaBNNRegressor(
        Renyi(1.0), **dict(FAST, max_iter=10), max_meta_iter=5, meta_lr=0.2, n_tasks_per_batch=2
    )
    return est.meta_fit(X, y, groups=groups)


def test_meta_fit_changes_alpha_but_not_the_parameter(meta_fitted):
    # meta_lr=0.2 for 5 Adam steps moves alpha by ~0.1-1 (softplus scale).
    assert abs(meta_fitted.meta_divergence_.alpha - 1.0) > 1e-3
    assert meta_fitted.divergence.alpha == 1.0  # never mutate a parameter


def test_clone_drops_meta_state(meta_fitted):
    cloned = clone(meta_fitted)
    for attr in ("meta_divergence_", "meta_loss_curve_", "n_meta_iter_", "meta_tasks_"):
        assert hasattr(meta_fitted, attr)
        assert not hasattr(cloned, attr), attr
    assert cloned.divergence.alpha == 1.0


def test_learned_divergence_as_parameter_survives_clone(tasks, meta_fitted):
    X, y, groups = tasks
    learned = meta_fitted.meta_divergence_
    est = MetaBNNRegressor(divergence=learned, **FAST)
    cloned = clone(est)
    assert cloned.divergence is not learned  # deep-copied, not shared
    assert cloned.divergence.alpha == learned.alpha
    assert cloned.get_params()["divergence__alpha"] == learned.alpha
    X0, y0 = X[groups == 0], y[groups == 0]
    fitted = cloned.fit(X0, y0)
    assert fitted.divergence_.alpha == learned.alpha
    # Passing the learned divergence to a clone is equivalent to fitting the
    # meta-trained estimator itself (which uses meta_divergence_).
    explicit = clone(clone(meta_fitted).set_params(divergence=learned)).fit(X0, y0)
    adapted = copy.deepcopy(meta_fitted).fit(X0, y0)
    np.testing.assert_array_equal(explicit.predict(X0), adapted.predict(X0))
    # A divergence that is a plain KL also round-trips.
    assert isinstance(clone(MetaBNNRegressor(KL())).divergence, KL)
