"""Tests of the recommender baselines of the ratings-imputation benchmark."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest
import scipy.sparse as sp

from skmetavi.experiments import _ratings_baselines
from skmetavi.experiments._ratings_baselines import METHODS, rating_baselines

KEYS = {"rmse", "test_ll", "sigma", "time_s", "n_heldout"}


def _low_rank_ratings(seed=0, n_users=200, n_items=50, rank=3, frac=0.3, heldout=0.25):
    """Dense 1..5 ratings of a low-rank + biases model, and masks (observed, held-out)."""
    rng = np.random.default_rng(seed)
    U = rng.normal(0, 0.8, (n_users, rank))
    V = rng.normal(0, 0.8, (n_items, rank))
    R = 3.2 + U @ V.T + rng.normal(0, 0.5, (n_users, 1)) + rng.normal(0, 0.6, (1, n_items))
    R = np.clip(np.round(R + rng.normal(0, 0.3, R.shape)), 1, 5)
    rated = rng.random(R.shape) < frac
    held = rated & (rng.random(R.shape) < heldout)
    return R, rated & ~held, held


def _sparse(R, mask):
    return sp.csr_array(np.where(mask, R, 0.0))


@pytest.fixture(scope="module")
def data():
    R, obs, held = _low_rank_ratings()
    return R, obs, held, rating_baselines(_sparse(R, obs), _sparse(R, held))


def test_result_layout(data):
    _, _, held, res = data
    assert list(res) == list(METHODS)
    for out in res.values():
        assert set(out) == KEYS
        assert out["n_heldout"] == held.sum()
        assert out["time_s"] >= 0 and out["sigma"] > 0
        assert np.isfinite(out["rmse"]) and np.isfinite(out["test_ll"])


def test_method_ranking(data):
    res = data[3]
    rmse = {m: out["rmse"] for m, out in res.items()}
    assert rmse["user_item_bias"] < rmse["item_mean"] < rmse["global_mean"]
    assert rmse["knn"] < rmse["global_mean"]
    # A better fit on held-out data is also a better Gaussian test log-likelihood here.
    assert res["user_item_bias"]["test_ll"] > res["global_mean"]["test_ll"]


def test_global_mean_closed_form(data):
    R, obs, held, res = data
    mu = R[obs].mean()
    expected = np.sqrt(np.mean((R[held] - mu) ** 2))
    assert abs(res["global_mean"]["rmse"] - expected) < 1e-12
    sigma = res["global_mean"]["sigma"]
    ll = np.mean(-0.5 * np.log(2 * np.pi * sigma**2) - (R[held] - mu) ** 2 / (2 * sigma**2))
    assert abs(res["global_mean"]["test_ll"] - ll) < 1e-12


def test_global_mean_uses_extra_users():
    R, obs, held = _low_rank_ratings(seed=1)
    X_extra = _sparse(R[:100], obs[:100] | held[:100])
    res = rating_baselines(_sparse(R[100:], obs[100:]), _sparse(R[100:], held[100:]),
                           X_extra=X_extra, methods="global_mean")
    mu = np.concatenate((R[100:][obs[100:]], R[:100][obs[:100] | held[:100]])).mean()
    expected = np.sqrt(np.mean((R[100:][held[100:]] - mu) ** 2))
    assert abs(res["global_mean"]["rmse"] - expected) < 1e-12


def test_item_mean_closed_form():
    R, obs, held = _low_rank_ratings(seed=2)
    res = rating_baselines(_sparse(R, obs), _sparse(R, held), methods=["item_mean"])
    lam, mu = 5.0, R[obs].mean()
    item = (np.where(obs, R, 0).sum(0) + lam * mu) / (obs.sum(0) + lam)
    pred = np.broadcast_to(item, R.shape)[held]
    assert np.isclose(res["item_mean"]["rmse"], np.sqrt(np.mean((R[held] - pred) ** 2)),
                      rtol=0, atol=1e-12)


def test_extra_users_improve_item_statistics():
    R, obs, held = _low_rank_ratings(seed=3, n_users=400, frac=0.15)
    args = (_sparse(R[200:], obs[200:]), _sparse(R[200:], held[200:]))
    X_extra = _sparse(R[:200], obs[:200] | held[:200])
    methods = ("item_mean", "user_item_bias", "knn")
    alone = rating_baselines(*args, methods=methods)
    helped = rating_baselines(*args, X_extra=X_extra, methods=methods)
    assert helped["item_mean"]["rmse"] < alone["item_mean"]["rmse"]
    assert helped["user_item_bias"]["rmse"] < alone["user_item_bias"]["rmse"]
    # knn only looks at X_observed.
    assert helped["knn"]["rmse"] == alone["knn"]["rmse"]


def test_sigma_never_sees_heldout(data):
    R, obs, held, res = data
    rng = np.random.default_rng(1)
    R2 = np.where(held, rng.integers(1, 6, R.shape), R)
    res2 = rating_baselines(_sparse(R, obs), _sparse(R2, held))
    for m in METHODS:
        assert res2[m]["sigma"] == res[m]["sigma"]
        assert res2[m]["rmse"] != res[m]["rmse"]
    # Removing held-out entries changes nothing either.
    res3 = rating_baselines(_sparse(R, obs), _sparse(R, held & (R == 3)), methods=METHODS[:3])
    assert all(res3[m]["sigma"] == res[m]["sigma"] for m in METHODS[:3])


def test_sigma_seeded(data):
    R, obs, held, res = data
    again = rating_baselines(_sparse(R, obs), _sparse(R, held), methods=METHODS[:3])
    other = rating_baselines(_sparse(R, obs), _sparse(R, held), methods=METHODS[:3],
                             random_state=1)
    for m in METHODS[:3]:
        assert again[m]["sigma"] == res[m]["sigma"]
        assert other[m]["sigma"] != res[m]["sigma"]
        assert other[m]["rmse"] == res[m]["rmse"]
        # The internal estimate is in the right range of the held-out error.
        assert 0.7 < res[m]["sigma"] / res[m]["rmse"] < 1.3


def test_sparse_formats_agree(data):
    R, obs, held, res = data
    for fmt in (sp.csr_matrix, sp.coo_array, sp.csc_matrix, sp.lil_array):
        out = rating_baselines(fmt(np.where(obs, R, 0)), fmt(np.where(held, R, 0)),
                               methods=METHODS[:3])
        for m in METHODS[:3]:
            assert out[m]["rmse"] == res[m]["rmse"] and out[m]["sigma"] == res[m]["sigma"]


def test_predictions_clipped():
    # User 0 rates everything 5, item 0 is rated 5 by everyone, the rest is 1:
    # mu + b_user + b_item for (0, 0) exceeds 5 and is clipped to exactly 5.
    R = np.ones((30, 10))
    R[0], R[:, 0] = 5, 5
    held = np.zeros(R.shape, dtype=bool)
    held[0, 0] = True
    obs = ~held
    mu, b_user, b_item = _ratings_baselines._biases(
        _ratings_baselines._check_ratings(_sparse(R, obs), "X", (1, 5))[0],
        _ratings_baselines._Ratings(*(np.empty(0, dtype=int),) * 2, np.empty(0)), *R.shape)
    assert mu + b_user[0] + b_item[0] > 5
    res = rating_baselines(_sparse(R, obs), _sparse(R, held), methods=["user_item_bias"])
    assert res["user_item_bias"]["rmse"] == 0


def test_knn_unrated_item_falls_back_to_item_mean():
    R, obs, held = _low_rank_ratings(seed=4)
    obs[:, 0] = False
    held[:] = False
    held[:5, 0] = True
    res = rating_baselines(_sparse(R, obs), _sparse(R, held), methods=["item_mean", "knn"])
    assert res["knn"]["rmse"] == res["item_mean"]["rmse"]


def test_user_without_observed_ratings():
    R, obs, held = _low_rank_ratings(seed=5)
    obs[0] = False
    held[0, :5] = True
    res = rating_baselines(_sparse(R, obs), _sparse(R, held))
    assert all(np.isfinite(out["rmse"]) for out in res.values())


def test_knn_skipped_above_size_limit(data, monkeypatch):
    R, obs, held, res = data
    monkeypatch.setattr(_ratings_baselines, "KNN_MAX_CELLS", R.size - 1)
    out = rating_baselines(_sparse(R, obs), _sparse(R, held))
    assert set(out["knn"]) == {"skipped"}
    assert "KNN_MAX_CELLS" in out["knn"]["skipped"]
    assert out["user_item_bias"] == {**res["user_item_bias"],
                                     "time_s": out["user_item_bias"]["time_s"]}


def _ok_inputs():
    R, obs, held = _low_rank_ratings(seed=6, n_users=20, n_items=10, frac=0.8)
    return R, _sparse(R, obs), _sparse(R, held)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda R, o, h: (o, h[:, :-1]), "same shape"),
        (lambda R, o, h: (o, sp.csr_array(h + sp.csr_array(np.eye(*R.shape) * (o != 0)))),
         "disjoint"),
        (lambda R, o, h: (o.toarray(), h), "X_observed must be a scipy.sparse matrix"),
        (lambda R, o, h: (o, np.where(h.toarray() > 0, h.toarray(), np.nan)),
         "X_heldout must be a scipy.sparse matrix"),
        (lambda R, o, h: (o, sp.csr_array(h.shape)), "nothing to score"),
        (lambda R, o, h: (sp.csr_array(o.shape), h), "stores no rating"),
        (lambda R, o, h: (o * 2, h), "outside rating_range"),
        (lambda R, o, h: (o, sp.coo_array(([3.0, 4.0], ([0, 0], [0, 0])), shape=h.shape)),
         "more than once"),
    ],
)
def test_invalid_inputs(change, match):
    R, obs, held = _ok_inputs()
    X_observed, X_heldout = change(R, obs, held)
    with pytest.raises(ValueError, match=match):
        rating_baselines(X_observed, X_heldout)


def test_stored_zero_is_out_of_range():
    _, obs, held = _ok_inputs()
    obs = sp.csr_array(obs)
    obs.data[0] = 0.0
    with pytest.raises(ValueError, match="eliminate_zeros"):
        rating_baselines(obs, held)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"X_extra": sp.csr_array((3, 4))}, "same number of columns"),
        ({"methods": ("global_mean", "svd")}, "Unknown method"),
        ({"methods": ()}, "at least one"),
        ({"methods": ("knn", "knn")}, "repeat"),
        ({"n_neighbors": 0}, "n_neighbors"),
        ({"rating_range": (5, 1)}, "low < high"),
        ({"rating_range": 5}, "pair"),
    ],
)
def test_invalid_parameters(kwargs, match):
    _, obs, held = _ok_inputs()
    with pytest.raises(ValueError, match=match):
        rating_baselines(obs, held, **kwargs)


def test_too_few_ratings_for_sigma():
    X = sp.csr_array(np.eye(4) * 3)
    with pytest.raises(ValueError, match="estimate sigma"):
        rating_baselines(X, sp.csr_array(np.fliplr(np.eye(4)) * 2))


def test_user_item_bias_solves_the_ridge_problem():
    # Koren's baseline predictor: argmin sum (r - mu - b_u - b_i)^2 + 5 (|b_u|^2 + |b_i|^2).
    R, obs, _ = _low_rank_ratings(seed=7)
    ratings = _ratings_baselines._check_ratings(_sparse(R, obs), "X", (1, 5))[0]
    none = _ratings_baselines._Ratings(np.empty(0, dtype=int), np.empty(0, dtype=int),
                                       np.empty(0))
    mu, b_user, b_item = _ratings_baselines._biases(ratings, none, *R.shape)
    n = ratings.vals.size
    A = np.zeros((n, R.shape[0] + R.shape[1]))
    A[np.arange(n), ratings.rows] = 1
    A[np.arange(n), R.shape[0] + ratings.cols] = 1
    exact = np.linalg.solve(A.T @ A + 5 * np.eye(A.shape[1]), A.T @ (ratings.vals - mu))
    assert mu == R[obs].mean()
    np.testing.assert_allclose(np.r_[b_user, b_item], exact, atol=1e-3)


def test_sigma_split_per_user():
    counts = np.repeat([1, 3, 10, 40], 250)
    rows = np.repeat(np.arange(counts.size), counts)
    ratings = _ratings_baselines._Ratings(rows, np.zeros_like(rows), np.ones(rows.size))
    train, val = _ratings_baselines._split_per_user(
        ratings, counts.size, 0.1, np.random.RandomState(0))
    assert not (train & val).any() and (train | val).all()
    kept = np.bincount(rows[train], minlength=counts.size)
    out = np.bincount(rows[val], minlength=counts.size)
    assert (kept >= 1).all()
    assert (out[counts == 1] == 0).all()
    assert set(out[counts == 10]) == {1} and set(out[counts == 40]) <= {4, 5}
    # Users with few ratings contribute too: 10% in expectation (stochastic rounding).
    assert 0.2 < out[counts == 3].mean() < 0.4
