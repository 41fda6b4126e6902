"""Tests of ``skmetavi.metrics``: closed forms against scipy and quadrature, scorers."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import integrate, stats
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.linear_model import BayesianRidge
from sklearn.metrics import mean_squared_error, r2_score

from skmetavi import MetaBNNRegressor
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.metrics import (
    SCORERS,
    crps_ensemble,
    crps_gaussian,
    gaussian_nll,
    get_scorer,
    interval_coverage,
    mean_log_predictive_density,
)


@pytest.fixture(scope="module")
def gaussian_sample():
    """Heterogeneous Gaussian predictions and targets drawn from them (calibrated)."""
    rng = np.random.RandomState(0)
    n = 20_000
    y_mean = rng.normal(0.0, 3.0, size=n)
    y_std = rng.uniform(0.2, 2.0, size=n)
    y_true = rng.normal(y_mean, y_std)
    return y_true, y_mean, y_std


# ------------------------------------------------------------------ gaussian_nll
def test_gaussian_nll_matches_scipy():
    rng = np.random.RandomState(0)
    y_true, y_mean = rng.normal(size=50), rng.normal(size=50)
    y_std = rng.uniform(0.1, 3.0, size=50)
    expected = -np.mean(stats.norm(y_mean, y_std).logpdf(y_true))
    np.testing.assert_allclose(gaussian_nll(y_true, y_mean, y_std), expected, rtol=1e-12)


def test_gaussian_nll_hand_value():
    """log(2) + log(2 pi)/2 + (1/2)^2/2 for y=1, mean=0, std=2."""
    expected = np.log(2.0) + 0.5 * np.log(2 * np.pi) + 0.125
    np.testing.assert_allclose(gaussian_nll([1.0], [0.0], [2.0]), expected, rtol=1e-12)


def test_gaussian_nll_accepts_column_vectors_and_lists():
    y = np.array([[0.5], [1.0], [-1.0]])
    np.testing.assert_allclose(
        gaussian_nll(y, np.zeros((3, 1)), [1.0, 2.0, 3.0]),
        gaussian_nll(y.ravel(), np.zeros(3), np.array([1.0, 2.0, 3.0])),
        rtol=1e-12,
    )


# ---------------------------------------------------- mean_log_predictive_density
def test_mlpd_single_draw_is_minus_gaussian_nll():
    rng = np.random.RandomState(1)
    y_true, y_mean = rng.normal(size=40), rng.normal(size=40)
    y_std = rng.uniform(0.1, 2.0, size=40)
    np.testing.assert_allclose(
        mean_log_predictive_density(y_true, y_mean[:, None], y_std[:, None]),
        -gaussian_nll(y_true, y_mean, y_std),
        rtol=1e-12,
    )


def test_mlpd_identical_draws_equal_one_draw():
    rng = np.random.RandomState(2)
    y_true, y_mean = rng.normal(size=10), rng.normal(size=10)
    y_std = rng.uniform(0.5, 1.5, size=10)
    repeated = mean_log_predictive_density(
        y_true, np.tile(y_mean[:, None], 7), np.tile(y_std[:, None], 7)
    )
    np.testing.assert_allclose(repeated, -gaussian_nll(y_true, y_mean, y_std), rtol=1e-12)


def test_mlpd_matches_direct_mixture_density():
    """log of the mean of the S Gaussian densities, computed without logsumexp."""
    rng = np.random.RandomState(3)
    y_true = rng.normal(size=25)
    y_means, y_stds = rng.normal(size=(25, 6)), rng.uniform(0.3, 2.0, size=(25, 6))
    density = stats.norm.pdf(y_true[:, None], y_means, y_stds).mean(axis=1)
    np.testing.assert_allclose(
        mean_log_predictive_density(y_true, y_means, y_stds), np.mean(np.log(density)), rtol=1e-10
    )


def test_mlpd_is_stable_far_in_the_tails():
    """The log-sum-exp keeps a finite value where every density underflows to 0."""
    value = mean_log_predictive_density([0.0], [[60.0, 70.0]], [[1.0, 1.0]])
    # Dominated by the nearest component: log N(0; 60, 1) - log 2.
    expected = stats.norm.logpdf(0.0, 60.0, 1.0) + np.log1p(np.exp(-650.0)) - np.log(2.0)
    np.testing.assert_allclose(value, expected, rtol=1e-12)


# -------------------------------------------------------------------------- CRPS
def _crps_by_quadrature(y, mean, std):
    """Integral of (F(x) - 1{x >= y})^2 dx, split at y where the integrand jumps."""
    dist = stats.norm(mean, std)
    below, _ = integrate.quad(lambda x: dist.cdf(x) ** 2, -np.inf, y, epsabs=1e-12)
    above, _ = integrate.quad(lambda x: dist.sf(x) ** 2, y, np.inf, epsabs=1e-12)
    return below + above


@pytest.mark.parametrize(
    "y, mean, std",
    [(0.0, 0.0, 1.0), (1.3, -0.4, 0.7), (-5.0, 2.0, 3.0), (10.0, 0.0, 0.5)],
    ids=["centred", "inside", "wide", "far-tail"],
)
def test_crps_gaussian_matches_quadrature(y, mean, std):
    np.testing.assert_allclose(
        crps_gaussian([y], [mean], [std]), _crps_by_quadrature(y, mean, std), rtol=1e-7
    )


def test_crps_gaussian_averages_rows():
    ys, means, stds = [0.0, 1.3, -5.0], [0.0, -0.4, 2.0], [1.0, 0.7, 3.0]
    expected = np.mean([_crps_by_quadrature(*row) for row in zip(ys, means, stds)])
    np.testing.assert_allclose(crps_gaussian(ys, means, stds), expected, rtol=1e-7)


def test_crps_gaussian_scales_with_units():
    """CRPS is in the units of y: rescaling y, mean and std by c rescales it by c."""
    rng = np.random.RandomState(4)
    y, m, s = rng.normal(size=30), rng.normal(size=30), rng.uniform(0.5, 2.0, size=30)
    np.testing.assert_allclose(
        crps_gaussian(7.5 * y, 7.5 * m, 7.5 * s), 7.5 * crps_gaussian(y, m, s), rtol=1e-12
    )


def _crps_ensemble_brute_force(y_true, y_samples):
    """The O(S^2) definition E|X - y| - E|X - X'| / 2 over all sample pairs."""
    y_true, y_samples = np.asarray(y_true, float), np.asarray(y_samples, float)
    term1 = np.abs(y_samples - y_true[:, None]).mean(axis=1)
    term2 = np.abs(y_samples[:, :, None] - y_samples[:, None, :]).mean(axis=(1, 2))
    return float(np.mean(term1 - 0.5 * term2))


def test_crps_ensemble_matches_brute_force():
    rng = np.random.RandomState(5)
    y_true, y_samples = rng.normal(size=20), rng.standard_t(3, size=(20, 31))
    np.testing.assert_allclose(
        crps_ensemble(y_true, y_samples),
        _crps_ensemble_brute_force(y_true, y_samples),
        rtol=1e-12,
    )


_FINITE = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 4), n_draws=st.integers(1, 9))
def test_crps_ensemble_sorted_formula_property(data, n, n_draws):
    """The O(S log S) sorted formula equals the pairwise definition for any samples."""
    y_true = data.draw(arrays(float, n, elements=_FINITE))
    y_samples = data.draw(arrays(float, (n, n_draws), elements=_FINITE))
    # atol: cancellation between the two terms, relative to the sample magnitudes.
    np.testing.assert_allclose(
        crps_ensemble(y_true, y_samples),
        _crps_ensemble_brute_force(y_true, y_samples),
        rtol=1e-9,
        atol=1e-9 * (1.0 + np.abs(y_samples).max() + np.abs(y_true).max()),
    )


def test_crps_ensemble_of_one_draw_is_absolute_error():
    np.testing.assert_allclose(
        crps_ensemble([1.0, -2.0], [[3.0], [-2.5]]), np.mean([2.0, 0.5]), rtol=1e-12
    )


def test_crps_ensemble_agrees_with_crps_gaussian_on_quantiles():
    """Two independent implementations: S evenly spaced normal quantiles -> closed form."""
    y_true, mean, std = np.array([0.0, 1.3, -5.0]), np.array([0.0, -0.4, 2.0]), np.array(
        [1.0, 0.7, 3.0]
    )
    S = 4000
    q = stats.norm.ppf((np.arange(S) + 0.5) / S)
    samples = mean[:, None] + std[:, None] * q[None, :]
    # The empirical distribution of S quantiles differs from N(m, s^2) by O(1/S).
    np.testing.assert_allclose(
        crps_ensemble(y_true, samples), crps_gaussian(y_true, mean, std), rtol=1e-3
    )


def test_crps_ensemble_agrees_with_crps_gaussian_on_random_draws():
    rng = np.random.RandomState(6)
    y_true, mean = rng.normal(size=5), rng.normal(size=5)
    std = rng.uniform(0.5, 2.0, size=5)
    samples = rng.normal(mean[:, None], std[:, None], size=(5, 50_000))
    # Monte Carlo error ~ 0.6 s / sqrt(S) ~ 0.005 per row; the 1/S bias is smaller.
    np.testing.assert_allclose(
        crps_ensemble(y_true, samples), crps_gaussian(y_true, mean, std), rtol=2e-2
    )


# --------------------------------------------------------------- interval_coverage
@pytest.mark.parametrize("level", [0.5, 0.9, 0.99])
def test_interval_coverage_calibrated(gaussian_sample, level):
    """Targets drawn from the predictions: coverage ~ level (binomial sd <= 0.0036)."""
    coverage = interval_coverage(*gaussian_sample, level=level)
    assert abs(coverage - level) < 0.015


def test_interval_coverage_detects_overconfidence(gaussian_sample):
    y_true, y_mean, y_std = gaussian_sample
    # Halving the std: P(|Z| <= 1.645 / 2) = 0.59.
    coverage = interval_coverage(y_true, y_mean, y_std / 2, level=0.9)
    np.testing.assert_allclose(coverage, 2 * stats.norm.cdf(0.8224) - 1, atol=0.015)


def test_interval_coverage_boundaries():
    """Points exactly on the interval edge count as covered."""
    half = stats.norm.ppf(0.95)
    cov = interval_coverage([half, half + 1e-9, -half], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    np.testing.assert_allclose(cov, 2 / 3, rtol=1e-12)


def test_calibrated_scores_are_best_at_true_std(gaussian_sample):
    """NLL and CRPS are proper: the true std beats a too small or too large one."""
    y_true, y_mean, y_std = gaussian_sample
    for metric in (gaussian_nll, crps_gaussian):
        true = metric(y_true, y_mean, y_std)
        assert true < metric(y_true, y_mean, 0.7 * y_std)
        assert true < metric(y_true, y_mean, 1.4 * y_std)


# ---------------------------------------------------------------------- bad input
GAUSSIAN_METRICS = [gaussian_nll, crps_gaussian, interval_coverage]


@pytest.mark.parametrize("metric", GAUSSIAN_METRICS, ids=lambda f: f.__name__)
class TestGaussianMetricErrors:
    def test_inconsistent_lengths(self, metric):
        with pytest.raises(ValueError, match=r"inconsistent numbers of samples.*'y_mean': 2"):
            metric([0.0, 1.0, 2.0], [0.0, 1.0], [1.0, 1.0, 1.0])

    def test_two_dimensional(self, metric):
        with pytest.raises(ValueError, match=r"y_true must be 1-D.*shape \(2, 2\)"):
            metric(np.zeros((2, 2)), np.zeros(2), np.ones(2))

    @pytest.mark.parametrize("bad", [0.0, -1.0], ids=["zero", "negative"])
    def test_nonpositive_std(self, metric, bad):
        with pytest.raises(ValueError, match=r"y_std must be > 0 everywhere.*1 entries <= 0"):
            metric([0.0, 1.0], [0.0, 1.0], [1.0, bad])

    def test_nan(self, metric):
        with pytest.raises(ValueError, match="y_mean contains 1 NaN or inf"):
            metric([0.0, 1.0], [np.nan, 1.0], [1.0, 1.0])

    def test_infinite_std(self, metric):
        with pytest.raises(ValueError, match="y_std contains 1 NaN or inf"):
            metric([0.0, 1.0], [0.0, 1.0], [1.0, np.inf])

    def test_empty(self, metric):
        with pytest.raises(ValueError, match="at least one sample"):
            metric([], [], [])

    def test_not_numbers(self, metric):
        with pytest.raises(TypeError, match="y_true must be an array of numbers"):
            metric(["a", "b"], [0.0, 1.0], [1.0, 1.0])


@pytest.mark.parametrize("level", [0.0, 1.0, -0.5, 1.5, np.nan], ids=str)
def test_interval_coverage_level_outside_unit_interval(level):
    with pytest.raises(ValueError, match=r"level must be in \(0, 1\)"):
        interval_coverage([0.0], [0.0], [1.0], level=level)


@pytest.mark.parametrize("level", ["0.9", None, True], ids=str)
def test_interval_coverage_level_not_a_number(level):
    with pytest.raises(TypeError, match=r"level must be a float in \(0, 1\)"):
        interval_coverage([0.0], [0.0], [1.0], level=level)


@pytest.mark.parametrize(
    "y_means, y_stds, match",
    [
        (np.zeros(3), np.ones(3), r"y_means must have shape \(n_samples, n_draws\) = \(3, S\)"),
        (np.zeros((2, 4)), np.ones((2, 4)), r"got shape \(2, 4\)"),
        (np.zeros((3, 0)), np.ones((3, 0)), r"S >= 1"),
        (np.zeros((3, 4)), np.ones((3, 5)), r"y_stds must have the shape of y_means"),
        (np.zeros((3, 4)), np.zeros((3, 4)), r"y_stds must be > 0 everywhere"),
        (np.full((3, 4), np.nan), np.ones((3, 4)), r"y_means contains 12 NaN"),
    ],
    ids=["1d", "rows", "no-draws", "std-shape", "zero-std", "nan"],
)
def test_mlpd_bad_input(y_means, y_stds, match):
    with pytest.raises(ValueError, match=match):
        mean_log_predictive_density([0.0, 1.0, 2.0], y_means, y_stds)


@pytest.mark.parametrize(
    "y_samples, match",
    [
        (np.zeros(3), r"y_samples must have shape \(n_samples, n_draws\) = \(3, S\).*\(3,\)"),
        (np.zeros((2, 5)), r"got shape \(2, 5\)"),
        (np.zeros((3, 0)), r"S >= 1"),
        (np.array([[0.0, np.inf]] * 3), r"y_samples contains 3 NaN or inf"),
    ],
    ids=["1d", "rows", "no-draws", "inf"],
)
def test_crps_ensemble_bad_input(y_samples, match):
    with pytest.raises(ValueError, match=match):
        crps_ensemble([0.0, 1.0, 2.0], y_samples)


def test_get_scorer_unknown_name():
    with pytest.raises(ValueError, match=r"Unknown scorer 'nll'; valid names are \['neg_gaus"):
        get_scorer("nll")


def test_get_scorer_not_a_string():
    with pytest.raises(TypeError, match="get_scorer takes a scorer name"):
        get_scorer(["mlpd"])


# ------------------------------------------------------------------------ scorers
@pytest.fixture(scope="module")
def regression_task():
    """One sinusoid task: 40 training rows, 20 test rows."""
    X, y, _ = make_sinusoid_tasks(1, 60, noise="homoskedastic", random_state=0)
    return X[:40], y[:40], X[40:], y[40:]


@pytest.fixture(scope="module")
def fitted_regressors(regression_task):
    X, y, _, _ = regression_task
    bnn = MetaBNNRegressor(
        hidden_layer_sizes=(8,), max_iter=50, n_particles=4, n_predict_samples=16, random_state=0
    )
    return {
        "bnn": bnn.fit(X, y),
        "gpr": GaussianProcessRegressor(alpha=1.0, normalize_y=True).fit(X, y),
        "bayesian_ridge": BayesianRidge().fit(X, y),
    }


@pytest.mark.parametrize("name", ["bnn", "gpr", "bayesian_ridge"])
@pytest.mark.parametrize("scorer_name", SCORERS)
def test_scorers_on_probabilistic_regressors(fitted_regressors, regression_task, name, scorer_name):
    """Every scorer works with any regressor with predict(X, return_std=True)."""
    est = fitted_regressors[name]
    _, _, X, y = regression_task
    value = get_scorer(scorer_name)(est, X, y)
    assert isinstance(value, float)
    assert np.isfinite(value)
    if scorer_name == "coverage_90":
        assert 0.0 <= value <= 1.0


@pytest.mark.parametrize("name", ["bnn", "gpr", "bayesian_ridge"])
def test_scorers_equal_metric_functions(fitted_regressors, regression_task, name):
    """The scorers are the metric functions applied to predict(X, return_std=True)."""
    est = fitted_regressors[name]
    _, _, X, y = regression_task
    mean, std = est.predict(X, return_std=True)
    expected = {
        "neg_gaussian_nll": -gaussian_nll(y, mean, std),
        "neg_crps": -crps_gaussian(y, mean, std),
        "coverage_90": interval_coverage(y, mean, std, level=0.9),
        "r2": r2_score(y, mean),
        "neg_rmse": -np.sqrt(mean_squared_error(y, mean)),
    }
    for scorer_name, value in expected.items():
        np.testing.assert_allclose(get_scorer(scorer_name)(est, X, y), value, rtol=1e-12)


def test_mlpd_scorer_uses_predictive_mixture_of_bnn(fitted_regressors, regression_task):
    bnn = fitted_regressors["bnn"]
    _, _, X, y = regression_task
    np.testing.assert_allclose(
        get_scorer("mlpd")(bnn, X, y), np.mean(bnn.log_predictive_density(X, y)), rtol=1e-12
    )
    np.testing.assert_allclose(get_scorer("r2")(bnn, X, y), bnn.score(X, y), rtol=1e-12)


@pytest.mark.parametrize("name", ["gpr", "bayesian_ridge"])
def test_mlpd_scorer_gaussian_fallback(fitted_regressors, regression_task, name):
    """Without log_predictive_density, mlpd is the Gaussian log density."""
    est = fitted_regressors[name]
    _, _, X, y = regression_task
    np.testing.assert_allclose(
        get_scorer("mlpd")(est, X, y),
        -gaussian_nll(y, *est.predict(X, return_std=True)),
        rtol=1e-12,
    )


def test_bnn_mlpd_is_consistent_with_metric_function(fitted_regressors, regression_task):
    """log_predictive_density equals mean_log_predictive_density of the per-draw components."""
    bnn = fitted_regressors["bnn"]
    _, _, X, y = regression_task
    means, scales = bnn._predictive_components(X)  # (S, n) each
    np.testing.assert_allclose(
        np.mean(bnn.log_predictive_density(X, y)),
        mean_log_predictive_density(y, means.T, scales.T),
        rtol=1e-10,
    )


@pytest.mark.parametrize(
    "y_bad, match",
    [
        ("short", r"y has 5 entries but X has 20 rows; pass one target per row"),
        ("2d", r"y must be 1-D of shape \(n_samples,\), got shape \(20, 2\)"),
        ("nan", r"Input y contains NaN"),
    ],
)
def test_log_predictive_density_bad_y(fitted_regressors, regression_task, y_bad, match):
    """The mlpd scorer relies on log_predictive_density validating y."""
    bnn = fitted_regressors["bnn"]
    _, _, X, y = regression_task
    y_bad = {"short": y[:5], "2d": np.c_[y, y], "nan": np.r_[y[:-1], np.nan]}[y_bad]
    with pytest.raises(ValueError, match=match):
        get_scorer("mlpd")(bnn, X, y_bad)


def test_crps_ensemble_of_bnn_draws_close_to_gaussian_crps(fitted_regressors, regression_task):
    """sample_y draws scored by crps_ensemble vs the Gaussian CRPS of predict(return_std)."""
    bnn = fitted_regressors["bnn"]
    _, _, X, y = regression_task
    draws = bnn.sample_y(X, 2000, random_state=0)
    # The predictive is a mixture over weight draws, not exactly Gaussian, and the
    # two use different draws; both share its mean and spread (0.4% apart observed).
    np.testing.assert_allclose(
        crps_ensemble(y, draws), crps_gaussian(y, *bnn.predict(X, return_std=True)), rtol=0.03
    )
