"""A callable model receives ``y``; a callable meta-loss is scored on held-out query rows."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skmetavi import MetaDivergenceVI, Renyi
from skmetavi.datasets import make_mog_tasks
from skmetavi.models import CallableTarget

N_TASKS, N_ROWS = 4, 20


def _tasks(seed=0):
    """Tasks whose column 0 is the global row id, so that a callable can tell rows apart."""
    rng = np.random.RandomState(seed)
    n = N_TASKS * N_ROWS
    X = np.column_stack([np.arange(n, dtype=float), rng.normal(size=n)])
    y = rng.normal(size=n)
    groups = np.repeat(np.arange(N_TASKS), N_ROWS)
    return X, y, groups


class Recorder:
    """A log joint and a meta-loss that record the rows (and y) they are given."""

    def __init__(self):
        self.model_rows, self.model_ys, self.loss_rows, self.loss_ys = [], [], [], []

    def log_joint(self, z, X, y):
        self.model_rows.append(X[:, 0].long().tolist())
        self.model_ys.append(None if y is None else y.detach().clone())
        out = -0.5 * (z**2).sum(-1)
        if y is not None:
            out = out - 0.5 * ((y - z[:, :1]) ** 2).sum(-1)
        return out

    def meta_loss(self, q, X, y):
        self.loss_rows.append(X[:, 0].long().tolist())
        self.loss_ys.append(None if y is None else y.detach().clone())
        return q.variance.sum() + q.mean.pow(2).sum()


def _est(rec, **kw):
    params = dict(model=rec.log_joint, n_latent=1, divergence="renyi",
                  meta_loss=rec.meta_loss, max_meta_iter=3,
                  max_iter=3, n_particles=4, n_score_particles=4, n_tasks_per_batch=N_TASKS,
                  random_state=0)
    params.update(kw)
    return MetaDivergenceVI(**params)


def test_fit_and_score_pass_y_to_the_model():
    X, y, _ = _tasks()
    rec = Recorder()
    est = _est(rec).fit(X[:N_ROWS], y[:N_ROWS])
    assert rec.model_ys and all(seen is not None for seen in rec.model_ys)
    np.testing.assert_array_equal(rec.model_ys[0].numpy(), y[:N_ROWS])
    rec.model_ys.clear()
    est.score(X[N_ROWS:2 * N_ROWS], y[N_ROWS:2 * N_ROWS])
    np.testing.assert_array_equal(rec.model_ys[-1].numpy(), y[N_ROWS:2 * N_ROWS])
    # meta_loss_value hands y on to a callable meta-loss.
    est.meta_loss_value(X[:5], y[:5])
    np.testing.assert_array_equal(rec.loss_ys[-1].numpy(), y[:5])


def test_y_none_still_gives_none():
    X, _, groups = _tasks()
    rec = Recorder()
    est = _est(rec).meta_fit(X, groups=groups)
    est.fit(X[:N_ROWS]).score(X[:N_ROWS])
    assert rec.model_ys and all(seen is None for seen in rec.model_ys)
    assert rec.loss_ys and all(seen is None for seen in rec.loss_ys)


@pytest.mark.parametrize("query_fraction", [0.3, 0.5])
def test_meta_fit_passes_y_and_scores_the_meta_loss_on_query_rows(query_fraction):
    X, y, groups = _tasks()
    rec = Recorder()
    _est(rec, query_fraction=query_fraction).meta_fit(X, y, groups)
    n_query = round(query_fraction * N_ROWS)
    task_of = groups.astype(int)
    support = {t: set() for t in range(N_TASKS)}
    for rows, ys in zip(rec.model_rows, rec.model_ys):
        np.testing.assert_array_equal(ys.numpy(), y[rows])  # the rows' own y
        (t,) = set(task_of[rows])
        assert len(rows) == N_ROWS - n_query
        support[t].update(rows)
    query = {t: set() for t in range(N_TASKS)}
    for rows, ys in zip(rec.loss_rows, rec.loss_ys):
        np.testing.assert_array_equal(ys.numpy(), y[rows])
        (t,) = set(task_of[rows])
        assert len(rows) == n_query
        query[t].update(rows)
    for t in range(N_TASKS):
        # The same split every outer iteration; disjoint, together the whole task.
        assert len(support[t]) == N_ROWS - n_query and len(query[t]) == n_query
        assert not support[t] & query[t]
        assert support[t] | query[t] == set(np.flatnonzero(groups == t))


def test_meta_validation_uses_the_same_split():
    rng = np.random.RandomState(1)
    n_tasks = 6
    n = n_tasks * N_ROWS
    X = np.column_stack([np.arange(n, dtype=float), rng.normal(size=n)])
    y, groups = rng.normal(size=n), np.repeat(np.arange(n_tasks), N_ROWS)
    rec = Recorder()
    est = _est(rec, validation_fraction=0.34, validation_interval=1).meta_fit(X, y, groups)
    val = set(est.validation_tasks_.tolist())
    assert len(val) == 2
    seen_by_model = set().union(*rec.model_rows)
    val_loss = [rows for rows in rec.loss_rows if groups[rows[0]] in val]
    assert val_loss  # the validation tasks were scored by the callable meta-loss ...
    for rows in val_loss:
        assert len(rows) == N_ROWS // 2  # ... on their query rows,
        assert not set(rows) & seen_by_model  # which no adaptation saw.
    val_fit = [rows for rows in rec.model_rows if groups[rows[0]] in val]
    assert val_fit and all(len(rows) == N_ROWS // 2 for rows in val_fit)


def test_mixture_components_are_never_held_out():
    X, groups = make_mog_tasks(4, random_state=0)
    seen = []

    def meta_loss(q, X_task, y_task):
        seen.append(X_task.shape[0])
        assert y_task is None
        return q.variance.sum()

    MetaDivergenceVI("gaussian_mixture", divergence="renyi", meta_loss=meta_loss,
                     query_fraction=0.5, max_meta_iter=3, n_particles=8,
                     random_state=0).meta_fit(X, groups=groups)
    assert seen and set(seen) == {2}  # both components of every task


def test_callable_rows_that_are_not_observations_are_not_held_out():
    X, y, groups = _tasks()
    rec = Recorder()
    target = CallableTarget(rec.log_joint, n_latent=1, exchangeable_rows=False)
    _est(rec, model=target).meta_fit(X, y, groups)
    assert {len(rows) for rows in rec.loss_rows} == {N_ROWS}
    assert {len(rows) for rows in rec.model_rows} == {N_ROWS}
    assert target.get_params()["exchangeable_rows"] is False
    with pytest.raises(TypeError, match="exchangeable_rows must be a bool"):
        CallableTarget(rec.log_joint, n_latent=1, exchangeable_rows="no")


def test_y_is_validated_and_ignored_by_models_that_do_not_use_it():
    X, y, _ = _tasks()
    rec = Recorder()
    with pytest.raises(ValueError, match="inconsistent numbers of samples"):
        _est(rec).fit(X[:N_ROWS], y[: N_ROWS - 1])
    with pytest.raises(ValueError):
        _est(rec).fit(X[:N_ROWS], np.array(["a"] * N_ROWS))
    # The built-in Gaussian-mean target ignores y, whatever it is (unsupervised).
    MetaDivergenceVI(max_iter=2, n_particles=4, random_state=0).fit(
        X[:N_ROWS], np.array(["a"] * N_ROWS))
    assert not _est(rec).__sklearn_tags__().target_tags.required
    blr = MetaDivergenceVI("bayesian_linear_regression")
    assert blr.__sklearn_tags__().target_tags.required


def _logistic_tasks(n_tasks, n_rows, seed):
    rng = np.random.RandomState(seed)
    w_mean = np.array([0.5, 2.0, -1.0])
    Xs, ys = [], []
    for _ in range(n_tasks):
        w = w_mean + 0.3 * rng.normal(size=3)
        X = np.column_stack([np.ones(n_rows), rng.normal(size=(n_rows, 2))])
        Xs.append(X)
        ys.append((rng.uniform(size=n_rows) < 1 / (1 + np.exp(-X @ w))).astype(float))
    return np.vstack(Xs), np.concatenate(ys), np.repeat(np.arange(n_tasks), n_rows), w_mean


def log_joint_logistic(z, X, y):
    logits = z @ X.T  # (n_particles, n_rows)
    log_lik = -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    return torch.distributions.Normal(0.0, 3.0).log_prob(z).sum(-1) + log_lik.sum(-1)


def neg_log_predictive(q, X, y):
    w = q.rsample((64,))
    logits = w @ X.T
    log_lik = -F.binary_cross_entropy_with_logits(logits, y.expand_as(logits), reduction="none")
    return -(torch.logsumexp(log_lik, 0) - math.log(64)).mean()


def test_bayesian_logistic_regression_end_to_end():
    torch.manual_seed(0)  # q.rsample in the user's meta-loss draws from the global RNG
    X, y, groups, w_mean = _logistic_tasks(6, 40, seed=0)
    est = MetaDivergenceVI(
        log_joint_logistic, n_latent=3, family="full_covariance", divergence=Renyi(1.0),
        meta_loss=neg_log_predictive, max_meta_iter=15, n_tasks_per_batch=6, n_particles=16,
        meta_lr=0.05, max_iter=150, n_score_particles=64, random_state=0,
    ).meta_fit(X, y, groups)
    assert np.isfinite(est.meta_loss_curve_).all()
    assert est.meta_divergence_.alpha != pytest.approx(1.0)
    X_new, y_new, _, _ = _logistic_tasks(1, 200, seed=1)
    est.fit(X_new, y_new)
    assert np.sign(est.mean_).tolist() == np.sign(w_mean).tolist()
    assert np.isfinite(est.score(X_new, y_new))
    assert 0.0 < est.meta_loss_value(X_new, y_new) < math.log(2)
