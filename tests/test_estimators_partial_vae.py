"""MetaPartialVAE and PartialVAELatent: formulas, imputer semantics, meta-learning."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.base import clone
from sklearn.linear_model import Ridge
from sklearn.model_selection import GroupKFold, cross_validate
from sklearn.pipeline import make_pipeline
from torch.nn import functional as F

from skmetavi import MetaPartialVAE, Renyi
from skmetavi._ratings import split_ratings
from skmetavi._tasks import pad_tasks
from skmetavi.estimators import _partial_vae
from skmetavi.models import PartialVAELatent

SMALL = dict(n_components=3, code_size=8, embedding_size=4, encoder_layer_sizes=(16,),
             decoder_layer_sizes=(16,), n_score_samples=200, random_state=0)


def make_ratings(n_users=120, n_items=30, density=0.4, seed=0, n_groups=1):
    """Low-rank star ratings 1-5 with missing entries (NaN); group-specific item offsets."""
    rng = np.random.RandomState(seed)
    U = rng.normal(size=(n_users, 2))
    V = rng.normal(size=(n_items, 2))
    groups = np.arange(n_users) % n_groups
    offset = rng.normal(scale=0.5, size=(n_groups, n_items))[groups]
    R = np.clip(np.round(3 + U @ V.T + offset + 0.3 * rng.normal(size=(n_users, n_items))), 1, 5)
    R[rng.rand(n_users, n_items) > density] = np.nan
    return R, groups


def _batch(n_tasks=2, n_rows=5, p=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randint(1, 6, (n_tasks, n_rows, p), generator=g).double() / 5
    obs = torch.rand((n_tasks, n_rows, p), generator=g) < 0.5
    X = torch.where(obs, X, torch.zeros_like(X))
    target = ~obs & (torch.rand((n_tasks, n_rows, p), generator=g) < 0.5)
    y = torch.where(target, torch.rand((n_tasks, n_rows, p), generator=g).double(),
                    torch.zeros_like(X))
    return pad_tasks(list(X), list(y), obs=list(obs), target=list(target))


def _model_and_params(tasks):
    model = PartialVAELatent(3, code_size=6, embedding_size=4, encoder_layer_sizes=(8,),
                             decoder_layer_sizes=(5,))
    params = model.init_params(tasks, generator=torch.Generator().manual_seed(1))
    params = {k: v + 0.1 * torch.randn(v.shape, generator=torch.Generator().manual_seed(2),
                                       dtype=v.dtype) for k, v in params.items()}
    return model, params


# ----------------------------------------------------------------- the model
def test_set_encoder_matches_the_dense_eddi_formula():
    """The gathered set encoder equals EDDI's per-entry layer on [x, x F_d, b_d], masked sum."""
    tasks = _batch()
    model, params = _model_and_params(tasks)
    X, obs = tasks.X, tasks.fields["obs"]
    M, S, p = X.shape
    F_ = params["set_F"][:, None].expand(M, S, p, -1)
    b = params["set_b"][:, None, :, None].expand(M, S, p, 1)
    x = X.unsqueeze(-1)
    aug = torch.cat([x, x * F_, b], -1)  # (M, S, p, e + 2)
    h = F.relu(torch.einsum("mspi,mic->mspc", aug, params["set_w"])
               + params["set_c"][:, None, None])
    expected = F.relu((h * obs.unsqueeze(-1)).sum(2))
    torch.testing.assert_close(model.set_code(params, tasks), expected)


def test_entry_log_prob_matches_a_dense_masked_gaussian():
    tasks = _batch()
    model, params = _model_and_params(tasks)
    z = torch.randn((2, 5, 4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean = model.decode(params, z)  # (M, S, K, p)
    sigma = model.noise(params)[:, None, None, :]
    lp = torch.distributions.Normal(mean, sigma).log_prob(tasks.y.unsqueeze(2))
    expected = (lp * tasks.fields["target"].unsqueeze(2)).sum(-1)
    torch.testing.assert_close(model.heldout_log_prob(params, tasks, z), expected)


def test_missing_entries_do_not_reach_the_model():
    """Values where an entry is not observed change neither q nor log p."""
    tasks = _batch()
    model, params = _model_and_params(tasks)
    obs = tasks.fields["obs"]
    noisy = torch.where(obs, tasks.X, torch.full_like(tasks.X, 123.0))
    other = tasks.replace(fields={**tasks.fields, "X": noisy})
    z = torch.randn((2, 5, 4, 3), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for fn in (model.q_loc_scale,):
        for a, b in zip(fn(params, tasks), fn(params, other)):
            torch.testing.assert_close(a, b)
    torch.testing.assert_close(model.log_p(params, tasks, z), model.log_p(params, other, z))


def test_set_encoder_is_invariant_to_item_order():
    """Permuting the items together with their embeddings leaves the code unchanged."""
    tasks = _batch()
    model, params = _model_and_params(tasks)
    perm = torch.randperm(tasks.X.shape[-1], generator=torch.Generator().manual_seed(0))
    permuted = tasks.replace(fields={k: v[..., perm] for k, v in tasks.fields.items()})
    p2 = dict(params, set_F=params["set_F"][:, perm], set_b=params["set_b"][:, perm])
    torch.testing.assert_close(model.set_code(params, tasks), model.set_code(p2, permuted))


def test_gradients_reach_every_parameter():
    tasks = _batch()
    model, params = _model_and_params(tasks)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    eps = model.sample_eps(params, tasks, 3, generator=torch.Generator().manual_seed(0))
    z = model.rsample(params, tasks, eps)
    loss = (model.log_p(params, tasks, z) - model.log_q(params, tasks, z)).sum()
    grads = torch.autograd.grad(loss, list(params.values()))
    for (k, _), g in zip(params.items(), grads):
        assert torch.isfinite(g).all() and g.abs().sum() > 0, k


# ----------------------------------------------------------------- the imputer
@pytest.fixture(scope="module")
def fitted():
    R, _ = make_ratings()
    return MetaPartialVAE(max_iter=60, **SMALL).fit(R), R


def test_transform_fills_missing_and_keeps_observed(fitted):
    est, R = fitted
    out = est.transform(R)
    observed = ~np.isnan(R)
    assert out.shape == R.shape and np.isfinite(out).all()
    np.testing.assert_array_equal(out[observed], R[observed])
    assert np.all((out >= 1) & (out <= 5))  # the sigmoid decoder stays in the rating range
    mean, std = est.predict_ratings(R, return_std=True)
    np.testing.assert_allclose(out[~observed], mean[~observed])
    assert np.all(std > 0)


def test_dense_and_sparse_input_agree(fitted):
    est, R = fitted
    rows, cols = np.nonzero(~np.isnan(R))
    S = sp.coo_matrix((R[rows, cols], (rows, cols)), shape=R.shape)
    np.testing.assert_allclose(est.transform(S), est.transform(R))
    np.testing.assert_allclose(est.score_samples(S), est.score_samples(R))
    refit = clone(est).fit(S.tocsr())
    np.testing.assert_allclose(refit.loss_curve_, est.loss_curve_, rtol=1e-5)


def test_score_samples_hides_a_per_user_split(fitted):
    """Without y, score_samples scores the documented split of X's own ratings."""
    est, R = fitted
    obs, held = split_ratings(R, est.heldout_fraction, est._predict_seed)
    np.testing.assert_allclose(est.score_samples(R), est.score_samples(obs, held))
    per_rating = est.score_samples(obs, held).sum() / held.nnz
    assert est.score(obs, held) == pytest.approx(per_rating)


def test_log_likelihood_is_in_rating_units():
    """Ratings doubled with the range doubled: the same fit, log-lik lower by log 2 per rating."""
    R, _ = make_ratings(n_users=40, seed=1)
    obs, held = split_ratings(R, 0.2, 0)
    a = MetaPartialVAE(max_iter=10, rating_range=(1, 5), **SMALL).fit(obs)
    b = MetaPartialVAE(max_iter=10, rating_range=(2, 10), **SMALL).fit(2 * obs)
    np.testing.assert_allclose(b.loss_curve_, a.loss_curve_, rtol=1e-5)
    assert b.score(2 * obs, 2 * held) == pytest.approx(a.score(obs, held) - math.log(2),
                                                       abs=1e-6)
    np.testing.assert_allclose(b.predict_ratings(2 * obs), 2 * a.predict_ratings(obs), rtol=1e-6)


def test_score_is_a_consistent_monte_carlo_estimate():
    """More samples: the estimate of log p(y | x) moves little (it converges)."""
    R, _ = make_ratings(n_users=30, seed=2)
    obs, held = split_ratings(R, 0.2, 0)
    est = MetaPartialVAE(max_iter=30, **SMALL).fit(obs)
    few = est.set_params(n_score_samples=2000).score(obs, held)
    many = est.set_params(n_score_samples=8000).score(obs, held)
    assert abs(few - many) < 0.02


def test_fit_learns_the_ratings():
    """Held-out RMSE and log-lik beat the global mean and improve with training."""
    R, _ = make_ratings(n_users=300, n_items=30, density=0.5, seed=3)
    obs, held = split_ratings(R, 0.2, 0)
    h = held.tocoo()
    mu = np.nanmean(obs.toarray()[obs.toarray() > 0])
    rmse_mean = np.sqrt(np.mean((h.data - mu) ** 2))
    short = MetaPartialVAE(max_iter=1, **SMALL).fit(obs)
    est = MetaPartialVAE(max_iter=150, **SMALL).fit(obs)
    pred = est.predict_ratings(obs)[h.row, h.col]
    rmse = np.sqrt(np.mean((pred - h.data) ** 2))
    assert rmse < 0.85 * rmse_mean
    ll_mean = np.mean(-0.5 * ((h.data - mu) / rmse_mean) ** 2 - np.log(rmse_mean)
                      - 0.5 * np.log(2 * np.pi))
    assert est.score(obs, held) > ll_mean + 0.1
    assert est.score(obs, held) > short.score(obs, held) + 0.1


def test_sparse_input_is_densified_in_chunks(monkeypatch):
    R, _ = make_ratings(n_users=50, seed=4)
    est = MetaPartialVAE(max_iter=2, **SMALL).fit(R)
    sizes = []
    real = _partial_vae.densify_rows

    def spy(csr, rows=slice(None)):
        sizes.append(csr.shape[0])
        return real(csr, rows)

    monkeypatch.setattr(_partial_vae, "densify_rows", spy)
    monkeypatch.setattr(_partial_vae, "_CHUNK_FLOATS", 20 * est.n_predict_samples * 30)
    S = sp.csr_matrix(np.nan_to_num(R))
    S.eliminate_zeros()
    est.transform(S)
    assert max(sizes) <= 20 < S.shape[0]


def test_pipeline_and_cross_validate_over_groups():
    R, groups = make_ratings(n_users=90, n_groups=3, seed=5)
    y = np.nanmean(R, axis=1)
    pipe = make_pipeline(MetaPartialVAE(max_iter=3, **SMALL), Ridge())
    assert pipe.fit(R, y).predict(R).shape == (90,)
    cv = cross_validate(MetaPartialVAE(max_iter=3, **SMALL), R, groups=groups,
                        cv=GroupKFold(3))
    assert np.isfinite(cv["test_score"]).all()


# ----------------------------------------------------------------- meta-learning
@pytest.fixture(scope="module")
def group_data():
    R, groups = make_ratings(n_users=160, n_items=30, n_groups=4, seed=6)
    obs, held = split_ratings(R, 0.2, 0)
    return obs, held, groups


def test_meta_fit_learns_alpha(group_data):
    obs, held, groups = group_data
    frozen = MetaPartialVAE(divergence=Renyi(1.0), max_meta_iter=40, meta_lr=1e-12, **SMALL)
    frozen.meta_fit(obs, held, groups=groups)
    assert float(frozen.meta_divergence_.alpha) == pytest.approx(1.0, abs=1e-6)  # the control
    est = MetaPartialVAE(divergence=Renyi(1.0), max_meta_iter=40, meta_lr=0.05, **SMALL)
    est.meta_fit(obs, held, groups=groups)
    alpha = float(est.meta_divergence_.alpha)
    assert abs(alpha - 1.0) > 0.05  # moved from its start, KL
    assert est.meta_loss_curve_.shape == (40,) and np.isfinite(est.meta_loss_curve_).all()
    assert est.meta_loss_curve_[-10:].mean() < est.meta_loss_curve_[:10].mean()
    assert est.meta_rating_range_ == (1.0, 5.0)
    est.fit(obs[groups == 0])
    assert est.divergence_.alpha == pytest.approx(alpha)


def test_meta_fit_without_y_hides_heldout_fraction(group_data):
    obs, _, groups = group_data
    a = MetaPartialVAE(divergence="renyi", max_meta_iter=3, **SMALL)
    a.meta_fit(obs, groups=groups)
    o2, h2 = split_ratings(obs, a.heldout_fraction, np.random.RandomState(0))
    b = MetaPartialVAE(divergence="renyi", max_meta_iter=3, **SMALL)
    b.meta_fit(o2, h2, groups=groups)
    np.testing.assert_allclose(a.meta_loss_curve_, b.meta_loss_curve_, rtol=1e-6)


def test_meta_learned_init_moves_and_helps(group_data):
    obs, held, groups = group_data
    train = groups > 0
    fits = {}
    for lr in (1e-12, 1e-2):  # a frozen control, then the real run from the same start
        fits[lr] = MetaPartialVAE(meta_learn_init=True, n_inner_steps=2, max_meta_iter=30,
                                  init_lr=lr, **SMALL)
        fits[lr].meta_fit(obs[train], held[train], groups=groups[train])
    start, est = fits[1e-12].meta_init_, fits[1e-2].meta_init_
    moved = max(float((est[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3
    assert max(float((start[k] - fits[1e-12].meta_init_[k]).abs().max()) for k in start) == 0
    est = fits[1e-2]
    test = groups == 0
    adapted = clone(est).set_params(max_iter=5)
    adapted.__dict__.update({k: v for k, v in est.__dict__.items() if k.startswith("meta_")
                             or k == "_meta_state"})
    adapted.fit(obs[test])
    scratch = MetaPartialVAE(max_iter=5, **SMALL).fit(obs[test])
    assert adapted.score(obs[test], held[test]) > scratch.score(obs[test], held[test])


# ----------------------------------------------------------------- errors
def test_clear_errors(fitted):
    est, R = fitted
    obs, held = split_ratings(R, 0.2, 0)
    with pytest.raises(ValueError, match="both observed"):
        est.score(obs + held, held)
    with pytest.raises(ValueError, match="columns"):
        est.score(obs, held[:, :5])
    with pytest.raises(ValueError, match="rows"):
        est.score(obs, held[:5])
    bad = sp.csr_matrix(np.array([[np.nan, 1.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        MetaPartialVAE(**SMALL).fit(bad)
    with pytest.raises(ValueError, match="rating_range"):
        MetaPartialVAE(rating_range=(5, 1), **SMALL).fit(R)
    with pytest.raises(ValueError, match="no held-out ratings"):
        est.score(obs, sp.csr_matrix(obs.shape))
    groups = np.arange(R.shape[0]) % 2
    with pytest.raises(ValueError, match="both observed"):
        MetaPartialVAE(divergence="renyi", max_meta_iter=1, **SMALL).meta_fit(
            obs + held, held, groups=groups)


# ----------------------------------------------------------------- the task-level wrapper
def test_task_adaptive_imputer_cross_validates_over_groups(group_data):
    import sklearn

    from skmetavi.model_selection import TaskAdaptiveImputer

    obs, held, groups = group_data
    X, y = (np.where(A.toarray() > 0, A.toarray(), np.nan) for A in (obs, held))  # NaN: missing
    vae = MetaPartialVAE(divergence="renyi", max_meta_iter=3, max_iter=5, **SMALL)
    with sklearn.config_context(enable_metadata_routing=True):
        cv = cross_validate(TaskAdaptiveImputer(vae), X, y, cv=GroupKFold(2),
                            params={"groups": groups}, return_estimator=True,
                            return_indices=True)
    for k, (wrapper, test) in enumerate(zip(cv["estimator"], cv["indices"]["test"])):
        train = np.setdiff1d(np.arange(len(groups)), test)
        # The same as meta_fit on the training groups, then fit and score each held-out group.
        ref = clone(vae).meta_fit(X[train], y[train], groups=groups[train])
        assert wrapper.estimator_.meta_divergence_.alpha == pytest.approx(
            float(ref.meta_divergence_.alpha))
        scores = [ref._adapted_copies([(X[test][groups[test] == g], None)])[0].score(
            X[test][groups[test] == g], y[test][groups[test] == g])
            for g in np.unique(groups[test])]
        assert cv["test_score"][k] == pytest.approx(np.mean(scores), rel=1e-6)
    baseline = TaskAdaptiveImputer(vae, meta_learn=False).fit(X, y, groups=groups)
    assert not hasattr(baseline.estimator_, "meta_divergence_")
    assert np.isfinite(baseline.score(X, y, groups=groups))
    with pytest.raises(ValueError, match="single task"):
        baseline.transform(X)
    single = TaskAdaptiveImputer(vae, meta_learn=False).fit(X)
    np.testing.assert_allclose(single.transform(X), clone(vae).fit(X).transform(X))


def test_failed_calls_keep_the_fitted_state(fitted):
    est, R = fitted
    est = clone(est).fit(R)
    before = est.transform(R)
    bad = sp.csr_matrix(np.array([[np.nan, 1.0, 2.0]]))
    with pytest.raises(ValueError, match="non-finite"):
        est.fit(bad)
    with pytest.raises(ValueError, match="groups"):
        est.meta_fit(R, groups=np.zeros(5))
    with pytest.raises(ValueError, match="items"):
        est.meta_fit(R[:, :10], groups=np.arange(R.shape[0]) % 2)
    assert est.n_features_in_ == R.shape[1]
    np.testing.assert_allclose(est.transform(R), before)


def test_meta_fit_refuses_tasks_without_heldout_ratings(group_data):
    obs, held, groups = group_data
    y = held.toarray()
    y[groups == 1] = 0
    y = np.where(y > 0, y, np.nan)
    est = MetaPartialVAE(divergence="renyi", max_meta_iter=2, **SMALL)
    with pytest.raises(ValueError, match=r"tasks \[1\] have no held-out"):
        est.meta_fit(np.where(obs.toarray() > 0, obs.toarray(), np.nan), y, groups=groups)
    with pytest.raises(ValueError, match="no held-out"):
        est.meta_fit(obs, np.full(obs.shape, np.nan), groups=groups)
    with pytest.raises(ValueError, match="matrix of held-out ratings"):
        est.meta_fit(obs, np.ones(obs.shape[0]), groups=groups)


def test_warnings_for_settings_that_do_less(group_data):
    obs, held, groups = group_data
    one_adam_step = MetaPartialVAE(divergence="renyi", meta_learn_init=True, n_inner_steps=1,
                                   max_meta_iter=1, **SMALL)
    with pytest.warns(RuntimeWarning, match="no meta-gradient"):  # the engine's own check
        one_adam_step.meta_fit(obs, held, groups=groups)
    with pytest.warns(UserWarning, match="outside the scaling range"):
        MetaPartialVAE(rating_range=(1, 3), max_iter=1, **SMALL).fit(obs)


def test_pickle_round_trip_keeps_predictions(fitted):
    import pickle

    est, R = fitted
    copy_ = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(copy_.transform(R), est.transform(R))
    np.testing.assert_array_equal(copy_.score_samples(R), est.score_samples(R))
