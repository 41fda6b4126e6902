"""The one adaptation path: many tasks in one batched pass, each exactly as a separate fit."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy

import numpy as np
import pytest
import torch

from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks

FAST = dict(hidden_layer_sizes=(8,), n_particles=4, n_predict_samples=8, random_state=0)


def _ragged_tasks():
    """Tasks of 30, 17, 9 and 5 rows (a minibatch of 8 leaves the last one whole)."""
    X, y, g = make_sinusoid_tasks(4, 30, random_state=3)
    return [(X[g == t][:n], y[g == t][:n]) for t, n in enumerate((30, 17, 9, 5))]


@pytest.mark.parametrize("batch_size", [None, 8], ids=["full-batch", "minibatch"])
@pytest.mark.parametrize("meta", [None, "alg1", "alg2"])
def test_batched_adaptation_equals_separate_fits(batch_size, meta):
    est = MetaBNNRegressor("renyi", max_iter=3, batch_size=batch_size, **FAST)
    if meta is not None:
        X, y, g = make_sinusoid_tasks(4, 20, random_state=0)
        est.set_params(meta_learn_init=meta == "alg2", max_meta_iter=3, n_inner_steps=2)
        est.meta_fit(X, y, groups=g)
    data = _ragged_tasks()
    batched = est._adapted_copies(data)
    for (X, y), got in zip(data, batched):
        ref = copy.deepcopy(est).fit(X, y)
        assert got.n_iter_ == ref.n_iter_
        for k, v in ref.variational_params_.items():
            np.testing.assert_allclose(got.variational_params_[k].numpy(), v.numpy(),
                                       rtol=2e-5, atol=2e-6, err_msg=k)
        np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=2e-5, atol=1e-4)
        np.testing.assert_allclose(got.predict(X), ref.predict(X), rtol=1e-4, atol=1e-4)
    if batch_size:
        assert [e.n_iter_ for e in batched] == [3 * 4, 3 * 3, 3 * 2, 3 * 1]  # epochs per task
    assert not hasattr(est, "variational_params_")  # the estimator itself stays unfitted


def test_task_chunks_give_the_same_copies():
    est = MetaBNNRegressor("renyi", max_iter=3, **FAST)
    data = _ragged_tasks()
    whole = est._adapted_copies(data)
    chunked = est.set_params(task_chunk_size=3)._adapted_copies(data)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.predict(data[0][0]), b.predict(data[0][0]), rtol=1e-5,
                                   atol=1e-5)


def test_auto_task_chunks_give_the_same_copies(monkeypatch):
    from skmetavi import _tasks

    est = MetaBNNRegressor("renyi", max_iter=3, task_chunk_size=None, **FAST)
    data = _ragged_tasks()
    whole = est._adapted_copies(data)
    sizes = []
    fit_tasks = MetaBNNRegressor._fit_tasks

    def spy(self, part, *args, **kwargs):
        sizes.append(len(part))
        return fit_tasks(self, part, *args, **kwargs)

    monkeypatch.setattr(MetaBNNRegressor, "_fit_tasks", spy)
    monkeypatch.setattr(_tasks, "AUTO_CHUNK_BYTES", 1)  # one task per chunk
    chunked = est.set_params(task_chunk_size="auto")._adapted_copies(data)
    assert sizes == [1] * len(data)
    for a, b in zip(whole, chunked):
        np.testing.assert_allclose(a.predict(data[0][0]), b.predict(data[0][0]), rtol=1e-5,
                                   atol=1e-5)


def test_batched_adaptation_of_a_vi_estimator():
    X, g = make_mog_tasks(5, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", inner_optimizer="sgd",
                           max_iter=20, n_particles=8, random_state=0)
    data = [(X[g == t], None) for t in range(5)]
    for (Xt, _), got in zip(data, est._adapted_copies(data)):
        ref = copy.deepcopy(est).fit(Xt)
        np.testing.assert_allclose(got.mean_, ref.mean_, rtol=1e-12)
        np.testing.assert_allclose(got.covariance_, ref.covariance_, rtol=1e-12)
        np.testing.assert_array_equal(got.sample(3), ref.sample(3))


def test_fit_after_a_learned_init_adapts_as_it_was_trained():
    """max_iter="auto": the n_inner_steps the init was trained for, not hundreds of epochs."""
    X, y, g = make_sinusoid_tasks(4, 30, random_state=0)
    est = MetaBNNRegressor("kl", meta_learn_init=True, n_inner_steps=3, max_meta_iter=2,
                           batch_size=8, **FAST).meta_fit(X, y, groups=g)
    assert est.max_iter == "auto"
    assert est.fit(X[g == 0], y[g == 0]).n_iter_ == 3  # steps, not epochs
    assert est.set_params(max_iter=2).fit(X[g == 0], y[g == 0]).n_iter_ == 2 * 4  # epochs of 30 rows
    # 0 steps: the learned initialisation itself.
    est.set_params(max_iter=0).fit(X[g == 0], y[g == 0])
    assert est.n_iter_ == 0 and est.loss_curve_.shape == (0,)
    for k, v in est.meta_init_.items():
        np.testing.assert_array_equal(est.variational_params_[k].numpy(), v.numpy())
    # Without a learned init, "auto" is the default number of epochs.
    plain = MetaBNNRegressor("kl", **FAST).fit(X[g == 0], y[g == 0])
    assert plain.n_iter_ == MetaBNNRegressor.DEFAULT_MAX_ITER


def test_a_learned_init_adapts_with_the_optimiser_it_was_trained_with():
    """inner_optimizer="auto": SGD through Algorithm 2 and fit from its init, Adam otherwise;
    an explicit choice is kept."""
    X, y, g = make_sinusoid_tasks(4, 30, random_state=0)
    est = MetaBNNRegressor("kl", meta_learn_init=True, n_inner_steps=2, max_meta_iter=2, **FAST)
    assert repr(est._inner_optimizer(True)) == "SGD(lr=0.0003)"
    assert est._inner_optimizer(False).name == "adam"
    est.meta_fit(X, y, groups=g)
    # One SGD step is lr times the direction: its size varies across coordinates.  A fresh
    # Adam's first step moves every coordinate with a non-zero gradient by exactly lr.
    start = torch.cat([v.flatten() for v in est.meta_init_.values()])

    def first_step():
        moved = est.fit(X[g == 0], y[g == 0]).variational_params_
        delta = (torch.cat([moved[k].flatten() for k in est.meta_init_]) - start).abs()
        return delta[delta > 1e-7]

    est.set_params(max_iter=1)
    sgd = first_step()
    assert float(sgd.max()) > 20 * float(sgd.median())
    est.set_params(inner_optimizer="adam", inner_lr=0.01)
    adam = first_step()
    np.testing.assert_allclose(adam.numpy(), 0.01, rtol=1e-3)


@pytest.mark.parametrize("mode, pooled", [("auto", True), ("pooled", True), ("task", False),
                                          (True, False)])
def test_normalize_y_pooled_uses_the_meta_training_population(mode, pooled):
    """A learned init models the population in its units: a 3-row task is not rescaled by
    its own (meaningless) standard deviation."""
    X, y, g = make_sinusoid_tasks(6, 20, random_state=0)
    y = y + 10.0 * g  # task means differ: pooled and per-task statistics differ
    est = MetaBNNRegressor("kl", meta_learn_init=True, n_inner_steps=1, max_meta_iter=1,
                           normalize_y=mode, **FAST).meta_fit(X, y, groups=g)
    Xa, ya = X[g == 5][:3], y[g == 5][:3]
    est.set_params(max_iter=0).fit(Xa, ya)
    if pooled:
        # The support rows of every meta-training task (query_fraction=0.5 keeps 10 of 20).
        assert est._y_mean == pytest.approx(np.mean(y), abs=3.0)
        assert est._y_std == pytest.approx(np.std(y), rel=0.2)
        assert est._y_std > 2 * np.std(ya)
    else:
        assert est._y_mean == pytest.approx(np.mean(ya))
        assert est._y_std == pytest.approx(np.std(ya))
    # A fit without any meta-training is standardised by its own statistics.
    plain = MetaBNNRegressor("kl", normalize_y=mode, max_iter=1, **FAST).fit(Xa, ya)
    assert plain._y_mean == pytest.approx(np.mean(ya))


def test_pooled_scaling_survives_a_failed_meta_fit_and_follows_the_learned_init():
    """The scaling meta_init_ was trained in is fitted state: a meta_fit that fails keeps it,
    a warm start keeps it, and fit uses it (with a warning if normalize_y now disagrees)."""
    X, y, g = make_sinusoid_tasks(4, 20, random_state=0)
    est = MetaBNNRegressor("kl", meta_learn_init=True, n_inner_steps=1, max_meta_iter=1,
                           **FAST).meta_fit(X, y, groups=g)
    stats = dict(est._meta_y_stats)
    assert stats["mode"] == "pooled"
    with pytest.raises(ValueError, match="needs an int random_state"):
        est.set_params(random_state=None).meta_fit(X, 100 * y + 50, groups=g, checkpoint="c.pt")
    assert est._meta_y_stats == stats
    est.set_params(random_state=0, warm_start=True).meta_fit(X, 100 * y + 50, groups=g)
    assert est._meta_y_stats == stats  # the continued init stays in its units
    est.set_params(warm_start=False, normalize_y="task", max_iter=0)
    with pytest.warns(UserWarning, match=r"meta-trained on targets scaled pooled; fit uses"):
        est.fit(X[g == 0], y[g == 0])
    assert est._y_mean == stats["mean"] and est._y_std == stats["std"]


def test_normalize_y_accepts_numpy_booleans():
    X, y, g = make_sinusoid_tasks(1, 10, random_state=0)
    est = MetaBNNRegressor("kl", normalize_y=np.False_, max_iter=1, **FAST).fit(X, y)
    assert (est._y_mean, est._y_std) == (0.0, 1.0)
    est = MetaBNNRegressor("kl", normalize_y=np.True_, max_iter=1, **FAST).fit(X, y)
    assert est._y_std == pytest.approx(np.std(y))
