"""Tests of ``skmetavi.model_selection``: support/query splits, cross-validation over tasks."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy

import joblib
import numpy as np
import pytest
import sklearn
from sklearn.linear_model import BayesianRidge
from sklearn.model_selection import (
    GridSearchCV,
    GroupKFold,
    KFold,
    LeaveOneGroupOut,
    cross_validate,
)

from skmetavi import MetaBNNRegressor
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.metrics import get_scorer
from skmetavi.exceptions import NoMetaLearningWarning
from skmetavi.model_selection import TaskAdaptiveRegressor, support_query_split

# A tiny Bayesian MLP with a few outer iterations: each meta_fit takes ~0.02 s.
FAST_BNN = dict(
    hidden_layer_sizes=(8,),
    max_iter=20,
    max_meta_iter=3,
    n_particles=4,
    n_predict_samples=16,
    n_tasks_per_batch=4,
    random_state=0,
)


def routing():
    return sklearn.config_context(enable_metadata_routing=True)


# ------------------------------------------------------------ support_query_split
@pytest.fixture
def ragged_tasks():
    """Tasks of 10, 7 and 4 rows with string labels, rows interleaved."""
    groups = np.array(["a"] * 10 + ["b"] * 7 + ["c"] * 4)
    groups = groups[np.random.RandomState(0).permutation(groups.shape[0])]
    X = np.arange(groups.shape[0], dtype=float).reshape(-1, 1)
    y = 10.0 * X[:, 0]
    return X, y, groups


def _counts(groups):
    labels, counts = np.unique(groups, return_counts=True)
    return dict(zip(labels.tolist(), counts.tolist()))


@pytest.mark.parametrize(
    "support_size, expected",
    [
        # round(0.3 * n): 3, 2 (2.1), 1 (1.2)
        (0.3, {"a": 3, "b": 2, "c": 1}),
        (0.75, {"a": 8, "b": 5, "c": 3}),  # 7.5 -> 8, 5.25 -> 5, 3
        (2, {"a": 2, "b": 2, "c": 2}),
        (3, {"a": 3, "b": 3, "c": 3}),
    ],
    ids=["float-0.3", "float-0.75", "int-2", "int-3"],
)
def test_support_query_split_sizes(ragged_tasks, support_size, expected):
    X, y, groups = ragged_tasks
    Xs, Xq, ys, yq, gs, gq = support_query_split(
        X, y, groups, support_size=support_size, random_state=0
    )
    assert _counts(gs) == expected
    assert _counts(gq) == {k: n - expected[k] for k, n in _counts(groups).items()}
    # A partition of the rows; X, y and groups stay aligned; original order kept.
    rows_s, rows_q = Xs[:, 0].astype(int), Xq[:, 0].astype(int)
    assert np.intersect1d(rows_s, rows_q).size == 0
    np.testing.assert_array_equal(np.sort(np.r_[rows_s, rows_q]), np.arange(X.shape[0]))
    assert np.all(np.diff(rows_s) > 0) and np.all(np.diff(rows_q) > 0)
    np.testing.assert_array_equal(ys, y[rows_s])
    np.testing.assert_array_equal(yq, y[rows_q])
    np.testing.assert_array_equal(gs, groups[rows_s])
    np.testing.assert_array_equal(gq, groups[rows_q])


def test_support_query_split_deterministic(ragged_tasks):
    X, y, groups = ragged_tasks
    a = support_query_split(X, y, groups, random_state=0)
    b = support_query_split(X, y, groups, random_state=0)
    c = support_query_split(X, y, groups, random_state=1)
    for x_a, x_b in zip(a, b):
        np.testing.assert_array_equal(x_a, x_b)
    assert not np.array_equal(a[0], c[0])


def test_support_query_split_unseeded_leaves_global_rng(ragged_tasks):
    X, y, groups = ragged_tasks
    before = np.random.get_state()[1].copy()
    splits = [support_query_split(X, y, groups)[0][:, 0] for _ in range(5)]
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    # Fresh entropy each call: 5 identical draws of C(10,5)C(7,4)C(4,2) splits is ~1e-17.
    assert len({tuple(s) for s in splits}) > 1


def test_support_query_split_accepts_lists():
    Xs, Xq, ys, yq, gs, gq = support_query_split(
        [[0.0], [1.0], [2.0], [3.0]], [0, 1, 2, 3], [5, 5, 7, 7], support_size=1, random_state=0
    )
    assert Xs.shape == (2, 1) and Xq.shape == (2, 1)
    assert gs.tolist() == [5, 7] and gq.tolist() == [5, 7]


@pytest.mark.parametrize(
    "support_size, match",
    [
        (1, r"Task 'c' has 1 rows; support_size=1 leaves 1 support and 0 query rows"),
        # round(0.2 * 4) = 1 is fine for task 'a'; round(0.2 * 1) = 0 is not.
        (0.2, r"Task 'c' has 1 rows; support_size=0.2 leaves 0 support and 1 query rows"),
    ],
    ids=["int", "float"],
)
def test_support_query_split_task_too_small(support_size, match):
    groups = ["a"] * 4 + ["c"]
    X, y = np.zeros((5, 1)), np.zeros(5)
    with pytest.raises(ValueError, match=match):
        support_query_split(X, y, groups, support_size=support_size)


def test_support_query_split_int_too_large():
    groups = [0] * 4 + [1] * 6
    with pytest.raises(ValueError, match=r"Task 0 has 4 rows; support_size=4 leaves 4 support"):
        support_query_split(np.zeros((10, 1)), np.zeros(10), groups, support_size=4)


@pytest.mark.parametrize("support_size", [0.0, 1.0, 1.5, 0, -2, "half"], ids=repr)
def test_support_query_split_invalid_support_size(support_size):
    with pytest.raises((ValueError, TypeError), match="The 'support_size' parameter"):
        support_query_split(np.zeros((4, 1)), np.zeros(4), [0, 0, 1, 1], support_size=support_size)


def test_support_query_split_inconsistent_lengths():
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        support_query_split(np.zeros((4, 1)), np.zeros(4), [0, 0, 1])


# --------------------------------------------------- TaskAdaptiveRegressor: CV
@pytest.fixture(scope="module")
def tasks():
    """Six sinusoid tasks of 24 rows."""
    return make_sinusoid_tasks(6, 24, random_state=0)


@pytest.fixture(scope="module")
def cv_default(tasks):
    """GroupKFold(3) with routing and ``scoring=None`` (the wrapper's score, R^2)."""
    X, y, groups = tasks
    with routing():
        return cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0),
            X,
            y,
            cv=GroupKFold(n_splits=3),
            params={"groups": groups},
            return_estimator=True,
            return_indices=True,
            error_score="raise",
        )


SCORING = {name: get_scorer(name) for name in ("r2", "mlpd", "neg_crps", "coverage_90")}


@pytest.fixture(scope="module")
def cv_multi(tasks):
    """The same folds with a dict of task-aware scorers."""
    X, y, groups = tasks
    with routing():
        return cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0),
            X,
            y,
            cv=GroupKFold(n_splits=3),
            params={"groups": groups},
            scoring=SCORING,
            return_estimator=True,
            return_indices=True,
            error_score="raise",
        )


def test_cv_meta_fits_on_training_tasks_only(tasks, cv_default):
    _, _, groups = tasks
    assert cv_default["test_score"].shape == (3,)
    assert np.all(np.isfinite(cv_default["test_score"]))
    indices = cv_default["indices"]
    for wrapper, train, test in zip(cv_default["estimator"], indices["train"], indices["test"]):
        inner = wrapper.estimator_
        assert wrapper.meta_fitted_
        np.testing.assert_array_equal(inner.meta_tasks_, np.unique(groups[train]))
        assert np.intersect1d(inner.meta_tasks_, groups[test]).size == 0
        assert inner.n_meta_iter_ == FAST_BNN["max_meta_iter"]
        # Meta-trained only: the held-out tasks are adapted on copies, never on estimator_.
        assert not hasattr(inner, "variational_params_")


def test_cv_multimetric_scores_finite_and_consistent(cv_default, cv_multi):
    for name in SCORING:
        assert cv_multi[f"test_{name}"].shape == (3,)
        assert np.all(np.isfinite(cv_multi[f"test_{name}"])), name
    assert np.all((cv_multi["test_coverage_90"] >= 0) & (cv_multi["test_coverage_90"] <= 1))
    # Same seeds: get_scorer("r2") is the wrapper's default score (scoring="r2").
    np.testing.assert_allclose(cv_multi["test_r2"], cv_default["test_score"], rtol=1e-12)


def test_cv_score_is_the_meta_test_protocol(tasks, cv_multi):
    """One fold by hand: meta_fit on the training tasks, then for each held-out task
    adapt a copy on its support rows and score its query rows; average over tasks."""
    X, y, groups = tasks
    train, test = cv_multi["indices"]["train"][0], cv_multi["indices"]["test"][0]
    meta = MetaBNNRegressor("renyi", **FAST_BNN).meta_fit(X[train], y[train], groups=groups[train])
    # The wrapper draws one split seed at fit, shared by all its scorers.
    seed = cv_multi["estimator"][0]._split_seed
    Xs, Xq, ys, yq, gs, gq = support_query_split(
        X[test], y[test], groups[test], support_size=0.5, random_state=seed
    )
    mlpd = []
    for label in np.unique(groups[test]):
        adapted = copy.deepcopy(meta).fit(Xs[gs == label], ys[gs == label])
        assert adapted.divergence_.alpha == meta.meta_divergence_.alpha
        mlpd.append(np.mean(adapted.log_predictive_density(Xq[gq == label], yq[gq == label])))
    np.testing.assert_allclose(cv_multi["test_mlpd"][0], np.mean(mlpd), rtol=1e-6)


def test_cv_leave_one_group_out(tasks):
    X, y, groups = tasks
    keep = groups < 4  # 4 folds
    X, y, groups = X[keep], y[keep], groups[keep]
    with routing():
        cv = cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0),
            X,
            y,
            cv=LeaveOneGroupOut(),
            params={"groups": groups},
            scoring={"mlpd": get_scorer("mlpd"), "r2": get_scorer("r2")},
            return_estimator=True,
            return_indices=True,
            error_score="raise",
        )
    assert cv["test_mlpd"].shape == (4,)
    assert np.all(np.isfinite(cv["test_mlpd"])) and np.all(np.isfinite(cv["test_r2"]))
    for wrapper, test in zip(cv["estimator"], cv["indices"]["test"]):
        (held_out,) = np.unique(groups[test])
        assert held_out not in wrapper.estimator_.meta_tasks_
        assert wrapper.estimator_.meta_tasks_.shape == (3,)


def test_cv_without_meta_learning_baseline(tasks, cv_multi):
    """meta_learn=False: the same folds and splits, each held-out task adapted with
    the configured divergence; any regressor works (here BayesianRidge too)."""
    X, y, groups = tasks
    scoring = {"mlpd": get_scorer("mlpd"), "r2": get_scorer("r2")}
    results = {}
    for name, est in [("kl", MetaBNNRegressor("kl", **FAST_BNN)), ("ridge", BayesianRidge())]:
        with routing():
            results[name] = cross_validate(
                TaskAdaptiveRegressor(est, meta_learn=False, random_state=0),
                X,
                y,
                cv=GroupKFold(n_splits=3),
                params={"groups": groups},
                scoring=scoring,
                return_estimator=True,
                error_score="raise",
            )
        assert np.all(np.isfinite(results[name]["test_mlpd"]))
        for wrapper in results[name]["estimator"]:
            assert wrapper.meta_fitted_
            assert not hasattr(wrapper.estimator_, "meta_tasks_")
    # The baseline really differs from the meta-learned Renyi run on the same splits.
    assert not np.allclose(results["kl"]["test_mlpd"], cv_multi["test_mlpd"])


def test_grid_search_over_tasks(tasks):
    """GridSearchCV with routing: groups reach the splitter, fit and the scorer."""
    X, y, groups = tasks
    grid = GridSearchCV(
        TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0),
        {"estimator__meta_lr": [0.01, 0.1]},
        cv=GroupKFold(n_splits=3),
        scoring=get_scorer("mlpd"),
        error_score="raise",
    )
    with routing():
        grid.fit(X, y, groups=groups)
    assert np.all(np.isfinite(grid.cv_results_["mean_test_score"]))
    # Refit meta-trains on all six tasks.
    np.testing.assert_array_equal(grid.best_estimator_.estimator_.meta_tasks_, np.arange(6))


def test_score_tasks_per_task_and_parallel(tasks):
    X, y, groups = tasks
    wrapper = TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0)
    wrapper.fit(X[groups < 4], y[groups < 4], groups=groups[groups < 4])
    held_out = groups >= 4
    scores = wrapper.score_tasks(X[held_out], y[held_out], groups[held_out], metric="mlpd")
    assert scores.shape == (2,)
    np.testing.assert_allclose(
        wrapper.score(X[held_out], y[held_out], groups=groups[held_out]),
        np.mean(wrapper.score_tasks(X[held_out], y[held_out], groups[held_out])),
        rtol=1e-12,
    )
    # Threads: the same adaptations, in parallel.
    with joblib.parallel_config(backend="threading"):
        parallel = copy.deepcopy(wrapper).set_params(n_jobs=2)
        np.testing.assert_allclose(
            parallel.score_tasks(X[held_out], y[held_out], groups[held_out], metric="mlpd"),
            scores,
            rtol=1e-12,
        )
    # adapt fits a copy with the learned divergence and leaves estimator_ untouched.
    adapted = wrapper.adapt(X[groups == 4], y[groups == 4])
    assert adapted.divergence_.alpha == wrapper.estimator_.meta_divergence_.alpha
    assert not hasattr(wrapper.estimator_, "variational_params_")


# --------------------------------------------- TaskAdaptiveRegressor: errors
@pytest.fixture(scope="module")
def meta_fitted_wrapper(tasks):
    X, y, groups = tasks
    return TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN), random_state=0).fit(
        X, y, groups=groups
    )


def test_routing_off_groups_cannot_reach_score(tasks):
    """Without routing, params go to fit only: score then explains how to route groups."""
    X, y, groups = tasks
    with pytest.raises(ValueError, match=r"score needs groups.*enable_metadata_routing=True"):
        cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN)),
            X,
            y,
            groups=groups,
            cv=GroupKFold(n_splits=3),
            params={"groups": groups},
            error_score="raise",
        )


def test_routing_off_task_scorer_explains(tasks):
    X, y, groups = tasks
    with pytest.raises(ValueError, match=r"get_scorer\('mlpd'\) received no groups.*routing"):
        cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN)),
            X,
            y,
            groups=groups,
            cv=GroupKFold(n_splits=3),
            params={"groups": groups},
            scoring={"mlpd": get_scorer("mlpd")},
            error_score="raise",
        )


def test_sklearn_string_scorer_explains(tasks):
    """scikit-learn's own scorers call predict, which a meta-trained wrapper refuses."""
    X, y, groups = tasks
    with routing(), pytest.raises(ValueError, match=r"no\s+single task to predict.*get_scorer"):
        cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN)),
            X,
            y,
            cv=GroupKFold(n_splits=3),
            params={"groups": groups},
            scoring="r2",
            error_score="raise",
        )


def test_predict_after_meta_fit_raises(tasks, meta_fitted_wrapper):
    X, _, _ = tasks
    with pytest.raises(ValueError, match=r"adapt\(X_support, y_support\)\.predict\(X\)"):
        meta_fitted_wrapper.predict(X)


def test_score_tasks_errors(tasks, meta_fitted_wrapper):
    X, y, groups = tasks
    with pytest.raises(ValueError, match=r"Unknown metric 'nll'; valid names are"):
        meta_fitted_wrapper.score_tasks(X, y, groups, metric="nll")
    with pytest.raises(ValueError, match="X has 2 features, but TaskAdaptiveRegressor"):
        meta_fitted_wrapper.score_tasks(np.c_[X, X], y, groups)
    with pytest.raises(ValueError, match=r"groups has \d+ entries but X has \d+ rows"):
        meta_fitted_wrapper.score_tasks(X, y, groups[:-1])
    small = np.r_[groups[:-1], 99]  # the last row alone is task 99
    with pytest.raises(ValueError, match=r"Task 99 has 1 rows; support_size=0.5"):
        meta_fitted_wrapper.score(X, y, groups=small)


def test_meta_learn_needs_meta_fit(tasks):
    X, y, groups = tasks
    with pytest.raises(TypeError, match="meta_learn=True needs an estimator with meta_fit"):
        TaskAdaptiveRegressor(BayesianRidge()).fit(X, y, groups=groups)


def test_too_few_training_tasks(tasks):
    X, y, groups = tasks
    one = groups == 0
    with pytest.raises(ValueError, match="meta_fit needs at least 2 tasks"):
        TaskAdaptiveRegressor(MetaBNNRegressor("renyi", **FAST_BNN)).fit(
            X[one], y[one], groups=groups[one]
        )


def test_requests_groups_for_fit_and_score():
    routing_ = TaskAdaptiveRegressor(MetaBNNRegressor()).get_metadata_routing()
    assert routing_.fit.requests == {"groups": True}
    assert routing_.score.requests == {"groups": True}
    scorer_routing = get_scorer("mlpd").get_metadata_routing()
    assert scorer_routing.score.requests == {"groups": True}


# --------------------------------------- TaskAdaptiveRegressor: no groups
def test_without_groups_is_a_plain_regressor(tasks):
    X, y, groups = tasks
    X0, y0 = X[groups == 0], y[groups == 0]
    wrapper = TaskAdaptiveRegressor(MetaBNNRegressor(**FAST_BNN), meta_learn=False).fit(X0, y0)
    direct = MetaBNNRegressor(**FAST_BNN).fit(X0, y0)
    assert not wrapper.meta_fitted_
    assert wrapper.n_features_in_ == 1
    np.testing.assert_array_equal(wrapper.predict(X0), direct.predict(X0))
    for a, b in zip(wrapper.predict(X0, return_std=True), direct.predict(X0, return_std=True)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(wrapper.score(X0, y0), direct.score(X0, y0), rtol=1e-12)
    # Probabilistic scorers work through predict(return_std=True).
    assert np.isfinite(get_scorer("neg_gaussian_nll")(wrapper, X0, y0))


@pytest.mark.parametrize("enable_routing", [False, True], ids=["routing-off", "routing-on"])
def test_cross_validate_without_groups(tasks, enable_routing):
    """KFold on one task, no groups anywhere: ordinary regression CV."""
    X, y, groups = tasks
    X0, y0 = X[groups == 0], y[groups == 0]
    with sklearn.config_context(enable_metadata_routing=enable_routing), pytest.warns(
        NoMetaLearningWarning, match="received no groups"
    ):
        cv = cross_validate(
            TaskAdaptiveRegressor(MetaBNNRegressor(**FAST_BNN)),
            X0,
            y0,
            cv=KFold(n_splits=3),
            scoring={"r2": "r2", "nll": get_scorer("neg_gaussian_nll")},
            return_estimator=True,
            error_score="raise",
        )
    assert np.all(np.isfinite(cv["test_r2"])) and np.all(np.isfinite(cv["test_nll"]))
    assert not any(w.meta_fitted_ for w in cv["estimator"])
