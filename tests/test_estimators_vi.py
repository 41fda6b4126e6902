"""MetaDivergenceVI: exact posteriors, the MoG experiment's facts, API behaviour, errors."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import warnings

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from skmetavi import KL, FDivergence, MetaDivergenceVI, NeuralF, Renyi
from skmetavi._bilevel import Problem, run_vi
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import make_mog_tasks
from skmetavi.models import BayesianLinearRegression, GaussianMean, MeanFieldGaussian

MOG = np.array([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]])


# ------------------------------------------------------- exact posteriors
@pytest.fixture(scope="module")
def gaussian_task():
    rng = np.random.RandomState(0)
    return rng.normal([1.0, -2.0], 1.0, size=(20, 2))


@pytest.mark.parametrize(
    "divergence, rtol",
    [
        (FDivergence.reverse_kl(), 1e-5),  # path gradient: zero variance at the optimum
        (NeuralF(init_alpha=0.5), 1e-5),
        (KL(), 2e-2),  # total-derivative estimators keep Monte Carlo jitter
        (Renyi(0.5, learnable=False), 2e-2),
        (Renyi(2.0, learnable=False), 2e-2),
    ],
    ids=["kl-path", "neural_f", "kl", "renyi0.5", "renyi2"],
)
def test_gaussian_target_recovered_exactly(gaussian_task, divergence, rtol):
    """Any divergence's optimum is the posterior when the family contains it."""
    X = gaussian_task
    est = MetaDivergenceVI(
        "gaussian_mean", divergence=divergence, inner_lr=0.05, max_iter=1500,
        n_particles=64, random_state=0,
    ).fit(X)
    mean, cov = GaussianMean().posterior(torch.as_tensor(X))
    if rtol > 1e-3:
        # finish with small SGD steps and many particles to shrink the jitter
        problem = Problem(MeanFieldGaussian(2), GaussianMean())
        params = {k: v.clone() for k, v in est.variational_params_.items()}
        opt = SGD(2e-4)
        params, _, _ = run_vi(
            problem, divergence.to(torch.float64), opt, params, opt.init(params),
            pad_tasks([torch.as_tensor(X)]), n_steps=1500, n_particles=1000,
            generator=torch.Generator().manual_seed(0),
        )
        got_mean = params["loc"][0].numpy()
        got_sd = problem.family.scale(params)[0].detach().numpy()
    else:
        got_mean, got_sd = est.mean_, np.sqrt(np.diag(est.covariance_))
    np.testing.assert_allclose(got_mean, mean.numpy(), rtol=rtol, atol=rtol * 0.2)
    np.testing.assert_allclose(got_sd, np.sqrt(np.diag(cov.numpy())), rtol=rtol)


def test_bayesian_linear_regression_full_covariance_exact_posterior():
    rng = np.random.RandomState(1)
    X = rng.normal(size=(30, 3))
    X[:, 2] = X[:, 0] + 0.3 * rng.normal(size=30)  # correlated posterior
    y = X @ np.array([1.0, -0.5, 2.0]) + rng.normal(scale=1.0, size=30)
    est = MetaDivergenceVI(
        "bayesian_linear_regression", family="full_covariance",
        divergence=FDivergence.reverse_kl(), inner_optimizer="sgd", inner_lr=0.01, max_iter=3000,
        n_particles=16, random_state=0,
    ).fit(X, y)
    mean, cov = BayesianLinearRegression().posterior(torch.as_tensor(X), torch.as_tensor(y))
    np.testing.assert_allclose(est.mean_, mean.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(est.covariance_, cov.numpy(), rtol=1e-6, atol=1e-8)
    # KL() (total derivative) reaches it too, up to Monte Carlo jitter.
    kl = MetaDivergenceVI(
        "bayesian_linear_regression", family="full_covariance", divergence="kl",
        inner_optimizer="sgd", inner_lr=0.002, max_iter=3000, n_particles=256, random_state=0,
    ).fit(X, y)
    np.testing.assert_allclose(kl.mean_, mean.numpy(), atol=0.03)
    np.testing.assert_allclose(kl.covariance_, cov.numpy(), atol=0.02)
    # A mean-field family cannot represent the correlation: it underestimates variance.
    mf = MetaDivergenceVI(
        "bayesian_linear_regression", divergence=FDivergence.reverse_kl(), inner_lr=0.02,
        max_iter=3000, n_particles=16, random_state=0,
    ).fit(X, y)
    correlated = [0, 2]
    assert np.all(np.diag(mf.covariance_)[correlated] < 0.5 * np.diag(cov.numpy())[correlated])


# --------------------------------------------------------------- MoG
def _d_alpha_optimal_gaussian(alpha):
    """Independent reference: argmin over Gaussians of D_alpha(q || p) by quad + Nelder-Mead."""

    def p(x):
        return 0.5 * stats.norm.pdf(x, 1.0, 0.7) + 0.5 * stats.norm.pdf(x, 4.0, 1.4)

    def objective(theta):
        m, s = theta[0], np.exp(theta[1])
        val = integrate.quad(
            lambda x: stats.norm.pdf(x, m, s) ** alpha * p(x) ** (1 - alpha), -20, 30,
            limit=200, points=[1.0, 4.0, m],
        )[0]
        return np.log(val) / (alpha - 1)

    res = optimize.minimize(objective, [2.5, 0.0], method="Nelder-Mead",
                            options=dict(xatol=1e-7, fatol=1e-10))
    return res.x[0], np.exp(res.x[1])


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_mog_fixed_alpha_matches_d_alpha_optimal_gaussian(alpha):
    m_ref, s_ref = _d_alpha_optimal_gaussian(alpha)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence=Renyi(alpha, learnable=False), inner_lr=0.01,
        n_particles=2000, max_iter=1500, random_state=0,
    ).fit(MOG)
    assert est.mean_[0] == pytest.approx(m_ref, rel=0.03)
    assert np.sqrt(est.covariance_[0, 0]) == pytest.approx(s_ref, rel=0.03)


@pytest.fixture(scope="module")
def table1_alphas():
    """Meta-alpha on 16 MoG tasks (Algorithm 1, B=1, K=500, 1500 outer steps)."""
    X, groups = make_mog_tasks(16, random_state=0)
    out = {}
    for loss in ("d_half", "tv"):
        est = MetaDivergenceVI(
            "gaussian_mixture", divergence=Renyi(1.0), meta_loss=loss, inner_optimizer="sgd",
            inner_lr=0.05, n_particles=500, max_meta_iter=1500, meta_lr=0.05,
            n_tasks_per_batch=16, random_state=0,
        ).meta_fit(X, groups=groups)
        out[loss] = est.meta_divergence_.alpha
    return out


def test_table1_meta_alpha_learns_half_with_d_half_meta_loss(table1_alphas):
    """The D_0.5-optimal Gaussian is the alpha = 0.5 VI solution, so meta-alpha must find ~0.5.

    Starting from alpha = 1 (KL).  The finite-K one-step meta-gradient biases alpha slightly
    upwards (PAPER.md section 7: 0.61 at K=100, 0.55 at K=1000).
    """
    assert 0.45 <= table1_alphas["d_half"] <= 0.65


def test_table1_tv_meta_loss_learns_clearly_lower_alpha(table1_alphas):
    assert table1_alphas["tv"] < table1_alphas["d_half"] - 0.2
    assert table1_alphas["tv"] > 0.0


def test_meta_f_improves_meta_loss_over_kl():
    X, groups = make_mog_tasks(8, random_state=1)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence=NeuralF((16,)), meta_loss="d_half", inner_optimizer="sgd",
        inner_lr=0.05, n_particles=100, max_meta_iter=400, meta_lr=0.02, random_state=0,
    ).meta_fit(X, groups=groups)
    curve = est.meta_loss_curve_
    assert np.mean(curve[-50:]) < np.mean(curve[:50])
    # h moved away from the KL line (constant): g now grows with t, as the alpha < 1 family.
    u = torch.tensor([-2.0, 0.0], dtype=torch.float64)
    with torch.no_grad():
        h = est.meta_divergence_.evaluate_log_g(u)
    assert float(h[1] - h[0]) > 0.1


# ------------------------------------------------------ workflow / API
@pytest.fixture(scope="module")
def meta_fitted():
    X, groups = make_mog_tasks(6, random_state=0)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=32,
        max_meta_iter=30, max_iter=100, random_state=0,
    ).meta_fit(X, groups=groups)
    return est, X, groups


def test_meta_fit_then_fit_uses_learned_divergence(meta_fitted):
    est, X, groups = meta_fitted
    assert est.n_meta_iter_ == 30 and est.meta_loss_curve_.shape == (30,)
    assert est.meta_divergence_.alpha != pytest.approx(0.5)
    with pytest.raises(NotFittedError):
        est.score_samples([[0.0]])  # meta_fit alone does not make q
    est.fit(X[groups == 0])
    assert est.divergence_.alpha == pytest.approx(est.meta_divergence_.alpha)
    assert est.score_samples([[0.0], [2.0]]).shape == (2,)
    assert est.sample(5).shape == (5, 1)
    assert np.isfinite(est.score(X[groups == 0]))
    # The parameter is never mutated.
    assert est.divergence == "renyi"


def test_clone_drops_meta_state_and_divergence_param_carries_it(meta_fitted):
    est = meta_fitted[0]
    assert not hasattr(clone(est), "meta_divergence_")
    reuse = MetaDivergenceVI("gaussian_mixture", divergence=est.meta_divergence_)
    assert clone(reuse).divergence.alpha == pytest.approx(est.meta_divergence_.alpha)


def test_warm_start_meta_fit_continues(meta_fitted):
    _, X, groups = meta_fitted
    params = dict(
        model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=16,
        random_state=0,
    )
    full = MetaDivergenceVI(max_meta_iter=20, **params).meta_fit(X, groups=groups)
    half = MetaDivergenceVI(max_meta_iter=10, warm_start=True, **params).meta_fit(X, groups=groups)
    half.meta_fit(X, groups=groups)
    assert half.n_meta_iter_ == 20
    np.testing.assert_array_equal(half.meta_loss_curve_, full.meta_loss_curve_)
    assert half.meta_divergence_.alpha == full.meta_divergence_.alpha


def test_meta_learn_init_is_used_by_fit():
    X, groups = make_mog_tasks(6, random_state=0)
    est = MetaDivergenceVI(
        "gaussian_mixture", divergence="kl", meta_learn_init=True, n_inner_steps=3,
        inner_optimizer="sgd", n_particles=16, max_meta_iter=40, init_lr=0.1, max_iter=1,
        random_state=0,
    ).meta_fit(X, groups=groups)
    assert set(est.meta_init_) == {"loc", "scale_raw"}
    # The learned initial mean moved towards the tasks' means (between 1 and 8).
    assert float(est.meta_init_["loc"][0, 0]) > 1.0
    est.fit(X[groups == 0])
    assert abs(est.mean_[0] - float(est.meta_init_["loc"][0, 0])) < 0.5


def test_fit_without_meta_fit_and_string_groups():
    X, groups = make_mog_tasks(3, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", max_iter=50, n_particles=16, random_state=0)
    est.fit(X[:2])
    assert isinstance(est.divergence_, KL) and est.n_iter_ == 50
    est.set_params(divergence="renyi", max_meta_iter=3).meta_fit(X, groups=np.array(list("aabbcc")))
    assert list(est.meta_tasks_) == ["a", "b", "c"]


def test_nll_meta_loss_on_data_model_and_callables():
    rng = np.random.RandomState(0)
    centers = rng.normal(0, 2, size=(5, 1))
    X = np.concatenate([c + rng.normal(size=(12, 1)) for c in centers])
    groups = np.repeat(np.arange(5), 12)
    est = MetaDivergenceVI(
        "gaussian_mean", divergence="renyi", max_meta_iter=10, n_particles=16, random_state=0
    ).meta_fit(X, groups=groups)
    assert np.isfinite(est.meta_loss_curve_).all()

    def log_joint(z, X_task, y_task):
        prior = torch.distributions.Normal(0.0, 10.0).log_prob(z).sum(-1)
        return prior + torch.distributions.Normal(z.unsqueeze(1), 1.0).log_prob(X_task).sum((-1, -2))

    def meta_loss(q, X_task, y_task):
        return (q.mean - X_task.mean(0)).pow(2).sum() + q.variance.sum()

    est = MetaDivergenceVI(
        log_joint, n_latent=1, divergence="renyi", meta_loss=meta_loss, max_meta_iter=10,
        n_particles=16, random_state=0,
    ).meta_fit(X, groups=groups)
    assert np.isfinite(est.meta_loss_curve_).all()
    assert est.meta_divergence_.alpha != pytest.approx(0.5)
    # The callable model gives the same fit as the built-in model it reimplements.
    got = MetaDivergenceVI(log_joint, n_latent=1, n_particles=16, random_state=0).fit(X[:12])
    ref = MetaDivergenceVI("gaussian_mean", n_particles=16, random_state=0).fit(X[:12])
    np.testing.assert_allclose(got.mean_, ref.mean_, rtol=1e-10)
    np.testing.assert_allclose(got.loss_curve_, ref.loss_curve_, rtol=1e-8)


def test_score_meanings():
    rng = np.random.RandomState(0)
    X = rng.normal(1.0, 1.0, size=(50, 1))
    est = MetaDivergenceVI("gaussian_mean", max_iter=300, random_state=0).fit(X)
    # Mean log predictive density per row ~ log N(x; 1, 1 + small): compare with closed form.
    mean, cov = GaussianMean().posterior(torch.as_tensor(X))
    ref = stats.norm.logpdf(X[:, 0], float(mean), np.sqrt(1 + float(cov))).mean()
    assert est.score(X) == pytest.approx(ref, abs=0.02)
    mog = MetaDivergenceVI("gaussian_mixture", max_iter=300, random_state=0).fit(MOG)
    assert mog.score(MOG) < 0.0  # ELBO = -KL(q || p) for a normalised target


def test_deterministic_given_random_state():
    X, _ = make_mog_tasks(1, random_state=0)
    a = MetaDivergenceVI("gaussian_mixture", max_iter=50, random_state=3).fit(X)
    b = MetaDivergenceVI("gaussian_mixture", max_iter=50, random_state=3).fit(X)
    c = MetaDivergenceVI("gaussian_mixture", max_iter=50, random_state=4).fit(X)
    np.testing.assert_array_equal(a.loss_curve_, b.loss_curve_)
    np.testing.assert_array_equal(a.sample(3), b.sample(3))
    assert not np.array_equal(a.loss_curve_, c.loss_curve_)


def test_keyboard_interrupt_keeps_progress():
    calls = {"n": 0}

    def log_joint(z, X_task, y_task):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return torch.distributions.Normal(2.0, 1.0).log_prob(z).sum(-1)

    est = MetaDivergenceVI(log_joint, n_latent=1, max_iter=100, random_state=0)
    with pytest.warns(RuntimeWarning, match="fit interrupted"):
        est.fit(np.zeros((3, 1)))
    assert est.n_iter_ == 20
    assert np.isfinite(est.mean_).all()


# ------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "params, fit_args, exc, match",
    [
        (dict(divergence="alpha"), "fit", ValueError, "divergence"),
        (dict(divergence=3), "fit", ValueError, "divergence"),
        (dict(model="poisson"), "fit", ValueError, "model"),
        (dict(model=lambda z, X, y: z.sum(-1)), "fit", ValueError, "needs n_latent"),
        (dict(inner_lr=0.0), "fit", ValueError, "inner_lr"),
        (dict(n_particles=0), "fit", ValueError, "n_particles"),
        (dict(model="bayesian_linear_regression"), "fit", ValueError, "needs targets"),
        (dict(meta_gradient="truncated"), "meta", ValueError, "needs truncate"),
        (dict(truncate=2), "meta", ValueError, "only applies with meta_gradient='truncated'"),
        (dict(divergence=Renyi(0.5, learnable=False), meta_learn_init=False), "meta", ValueError,
         "Nothing to meta-learn"),
        (dict(divergence="renyi", meta_loss="tv", model="gaussian_mean"), "meta2d", ValueError,
         "needs a 1-D latent"),
        (dict(quadrature_range=(3.0, 1.0), divergence="renyi"), "meta", ValueError, "low < high"),
    ],
)
def test_bad_parameters(params, fit_args, exc, match):
    est = MetaDivergenceVI(**{"max_iter": 2, "max_meta_iter": 2, **params})
    X, groups = make_mog_tasks(3, random_state=0)
    with pytest.raises(exc, match=match):
        if fit_args == "fit":
            MetaDivergenceVI(**{"max_iter": 2, **params}).fit(np.ones((4, 1)))
        elif fit_args == "meta":
            est.set_params(model=params.get("model", "gaussian_mixture")).meta_fit(X, groups=groups)
        else:
            est.meta_fit(np.ones((6, 2)), groups=[0, 0, 1, 1, 2, 2])


def test_bad_renyi_alpha_instance():
    with pytest.raises(ValueError, match="alpha must be a finite number > 0"):
        MetaDivergenceVI(divergence=Renyi(-0.5))


@pytest.mark.parametrize(
    "X, groups, match",
    [
        (np.ones((4, 1)), [0, 0, 1], "groups has 3 entries but X has 4 rows"),
        (np.ones((4, 1)), [0, 0, 0, 0], "at least 2 tasks"),
        (np.ones((4, 1)), None, "meta_fit needs groups"),
        (np.ones((4, 1)), [0.0, 0.0, np.nan, 1.0], "NaN"),
        (np.array([[1.0], [np.nan], [2.0], [3.0]]), [0, 0, 1, 1], "NaN"),
        (np.ones((0, 1)), [], "0 sample"),
        (np.ones((4, 1)), [0, 1, 1, 1], "Task 0 has 1 row"),
    ],
)
def test_bad_meta_fit_data(X, groups, match):
    with pytest.raises(ValueError, match=match):
        MetaDivergenceVI(divergence="renyi", max_meta_iter=2).meta_fit(X, groups=groups)


def test_bad_mixture_rows_and_fitted_checks():
    with pytest.raises(ValueError, match="expects rows \\(weight, loc, scale\\)"):
        MetaDivergenceVI("gaussian_mixture").fit(np.ones((2, 2)))
    with pytest.raises(ValueError, match="scales \\(column 2\\) must be > 0"):
        MetaDivergenceVI("gaussian_mixture").fit(np.array([[0.5, 0.0, -1.0]]))
    est = MetaDivergenceVI("gaussian_mixture", max_iter=2).fit(MOG)
    with pytest.raises(ValueError, match="Z has 2 features, but MetaDivergenceVI is expecting 1"):
        est.score_samples(np.ones((3, 2)))
    with pytest.raises(ValueError, match="n_samples must be a positive int"):
        est.sample(0)
    with pytest.raises(NotFittedError):
        MetaDivergenceVI().sample(2)


def test_no_warnings_on_normal_use():
    X, groups = make_mog_tasks(4, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaDivergenceVI("gaussian_mixture", divergence="neural_f", max_meta_iter=5, max_iter=5,
                         n_particles=8, random_state=0).meta_fit(X, groups=groups).fit(X[:2])
        MetaDivergenceVI(inner_optimizer="adam", max_iter=5, random_state=0).fit(np.ones((3, 2)))


def test_float32_runs_and_matches_float64_roughly():
    X = np.random.RandomState(0).normal(size=(10, 2))
    a = MetaDivergenceVI(dtype="float32", max_iter=400, random_state=0).fit(X)
    b = MetaDivergenceVI(dtype="float64", max_iter=400, random_state=0).fit(X)
    np.testing.assert_allclose(a.mean_, b.mean_, atol=0.05)
    assert a.variational_params_["loc"].dtype == torch.float32
    assert isinstance(Adam(0.1), Adam)
