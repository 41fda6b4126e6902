"""MetaBNNRegressor: behaviour, noise models, predictive quantities, meta-learning, errors."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from skmetavi import MetaBNNRegressor, NeuralF, Renyi
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.models import BNNRegression

FAST = dict(hidden_layer_sizes=(32,), n_particles=8, random_state=0)


@pytest.fixture(scope="module")
def hetero_task():
    X, y, g = make_sinusoid_tasks(1, 600, random_state=3)
    return X[:400], y[:400], X[400:], y[400:]


@pytest.fixture(scope="module")
def fitted(hetero_task):
    Xa, ya, _, _ = hetero_task
    return MetaBNNRegressor(max_iter=600, **FAST).fit(Xa, ya)


def test_learns_the_sinusoid(fitted, hetero_task):
    _, _, Xb, yb = hetero_task
    assert fitted.score(Xb, yb) > 0.6  # R^2 on held-out rows
    assert np.isfinite(fitted.loss_curve_).all()
    assert fitted.loss_curve_[-20:].mean() < fitted.loss_curve_[:20].mean()


def test_heteroskedastic_noise_is_captured(fitted, hetero_task):
    """The noise head tracks the true input-dependent scale (A/2)|cos((x+b)/2)|."""
    grid = np.linspace(-4, 4, 200)[:, None]
    _, total = fitted.predict(grid, return_std=True)
    _, epistemic = fitted.predict(grid, return_std=True, epistemic_only=True)
    aleatoric = np.sqrt(np.maximum(total**2 - epistemic**2, 0))
    # True noise of this task up to its unknown amplitude/phase: fit them from data.
    rng = np.random.RandomState(3)
    A, b = rng.uniform(5, 10), rng.uniform(0, 1)
    true_sd = 0.5 * A * np.abs(np.cos(0.5 * (grid[:, 0] + b)))
    assert stats.pearsonr(aleatoric, true_sd)[0] > 0.7
    assert np.all(epistemic <= total + 1e-12)


def test_homoskedastic_noise_is_constant(hetero_task):
    Xa, ya, _, _ = hetero_task
    est = MetaBNNRegressor(likelihood="homoskedastic", max_iter=300, **FAST).fit(Xa, ya)
    assert set(est.variational_params_) == {"loc", "scale_raw", "log_noise"}
    means, scales = est._predictive_components(np.linspace(-4, 4, 50)[:, None])
    np.testing.assert_allclose(scales, scales[0, 0], rtol=1e-5)


def test_log_predictive_density_is_the_mc_mixture(fitted, hetero_task):
    _, _, Xb, yb = hetero_task
    means, scales = fitted._predictive_components(Xb[:20])
    ref = logsumexp(stats.norm.logpdf(yb[:20], means, scales), axis=0) - np.log(means.shape[0])
    np.testing.assert_allclose(fitted.log_predictive_density(Xb[:20], yb[:20]), ref, rtol=1e-10)


def test_sample_y_matches_predictive_moments(fitted):
    X = np.array([[-2.0], [0.5], [3.0]])
    draws = fitted.sample_y(X, n_samples=4000, random_state=0)
    mean, std = fitted.predict(X, return_std=True)
    assert draws.shape == (3, 4000)
    # Different weight draws than predict's 100: compare within Monte Carlo error.
    np.testing.assert_allclose(draws.mean(1), mean, atol=0.25 * std.max())
    np.testing.assert_allclose(draws.std(1), std, rtol=0.25)
    np.testing.assert_array_equal(fitted.sample_y(X, 5, random_state=1), fitted.sample_y(X, 5, random_state=1))


def test_normalize_y_makes_predictions_equivariant(hetero_task):
    Xa, ya, Xb, _ = hetero_task
    a = MetaBNNRegressor(max_iter=30, **FAST).fit(Xa, ya)
    b = MetaBNNRegressor(max_iter=30, **FAST).fit(Xa, 10 * ya + 5)
    ma, sa = a.predict(Xb, return_std=True)
    mb, sb = b.predict(Xb, return_std=True)
    np.testing.assert_allclose(mb, 10 * ma + 5, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(sb, 10 * sa, rtol=1e-4)


def test_deterministic_for_a_seed(hetero_task):
    Xa, ya, Xb, _ = hetero_task
    p1 = MetaBNNRegressor(max_iter=20, **FAST).fit(Xa, ya).predict(Xb)
    p2 = MetaBNNRegressor(max_iter=20, **FAST).fit(Xa, ya).predict(Xb)
    p3 = MetaBNNRegressor(max_iter=20, **{**FAST, "random_state": 1}).fit(Xa, ya).predict(Xb)
    np.testing.assert_array_equal(p1, p2)
    assert not np.allclose(p1, p3)


def test_minibatch_epochs(hetero_task):
    Xa, ya, _, _ = hetero_task
    est = MetaBNNRegressor(max_iter=3, batch_size=64, **FAST).fit(Xa, ya)
    assert est.n_iter_ == 3 * int(np.ceil(400 / 64))


@pytest.mark.parametrize("learn_init", [False, True], ids=["meta-d", "meta-d-phi"])
@pytest.mark.parametrize("divergence", [Renyi(1.0), NeuralF((8,))], ids=["renyi", "neural_f"])
def test_meta_fit_both_algorithms(divergence, learn_init):
    X, y, g = make_sinusoid_tasks(6, 60, random_state=0)
    est = MetaBNNRegressor(
        divergence, max_meta_iter=15, n_tasks_per_batch=3, meta_learn_init=learn_init,
        n_inner_steps=2, max_iter=10, **FAST,
    ).meta_fit(X, y, groups=g)
    assert est.n_meta_iter_ == 15 and np.isfinite(est.meta_loss_curve_).all()
    before = [p.detach().clone() for p in divergence.parameters()]
    after = list(est.meta_divergence_.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before))  # eta moved
    assert hasattr(est, "meta_init_") == learn_init
    est.fit(X[g == 0], y[g == 0])
    if learn_init:
        assert est.meta_init_["loc"].shape == (1, est.n_weights_)


def test_meta_fit_improves_query_nll():
    X, y, g = make_sinusoid_tasks(8, 80, random_state=1)
    est = MetaBNNRegressor(
        "kl", meta_learn_init=True, n_inner_steps=3, max_meta_iter=150, init_lr=0.01,
        n_tasks_per_batch=4, **FAST,
    ).meta_fit(X, y, groups=g)
    c = est.meta_loss_curve_
    assert c[-30:].mean() < c[:30].mean() - 0.2


def test_bnn_target_forward_matches_a_plain_mlp():
    target = BNNRegression(hidden_layer_sizes=(5, 4), activation="tanh")
    d = target.n_latent(3)
    z = torch.randn(2, 3, d, dtype=torch.float64)
    X = torch.randn(2, 7, 3, dtype=torch.float64)
    mean, scale = target.forward(z, X, {})
    for m in range(2):
        for k in range(3):
            w, off, h = z[m, k], 0, X[m]
            for i, (fi, fo) in enumerate(target.layer_shapes(3)):
                W = w[off : off + fi * fo].reshape(fi, fo)
                off += fi * fo
                h = h @ W + w[off : off + fo]
                off += fo
                if i < 2:
                    h = torch.tanh(h)
            torch.testing.assert_close(mean[m, k], h[:, 0])
            torch.testing.assert_close(scale[m, k], torch.nn.functional.softplus(h[:, 1]) + 1e-3)


@pytest.mark.parametrize(
    "params, X, y, exc, match",
    [
        ({}, np.ones((5, 1)), None, ValueError, "requires y"),
        ({}, np.ones((5, 1)), np.array([1.0, np.nan, 1, 1, 1]), ValueError, "NaN"),
        ({"hidden_layer_sizes": (0,)}, np.ones((5, 1)), np.ones(5), ValueError, "positive ints"),
        ({"likelihood": "poisson"}, np.ones((5, 1)), np.ones(5), ValueError, "likelihood"),
        ({"n_predict_samples": 0}, np.ones((5, 1)), np.ones(5), ValueError, "n_predict_samples"),
        ({"meta_loss": "tv"}, np.ones((5, 1)), np.ones(5), ValueError, "meta_loss"),
    ],
)
def test_bad_input(params, X, y, exc, match):
    with pytest.raises(exc, match=match):
        MetaBNNRegressor(max_iter=2, **params).fit(X, y)


def test_bad_predict_input(fitted):
    with pytest.raises(ValueError, match="X has 2 features, but MetaBNNRegressor is expecting 1"):
        fitted.predict(np.ones((3, 2)))
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        fitted.sample_y(np.ones((3, 1)), n_samples=0)
    with pytest.raises(ValueError, match="y has 2 entries but X has 3 rows"):
        fitted.log_predictive_density(np.ones((3, 1)), np.ones(2))
