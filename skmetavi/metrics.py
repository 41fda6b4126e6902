"""Likelihood-based metrics for probabilistic regressors, and scorers for cross-validation.

The functions take numpy arrays.  The scorers (:func:`get_scorer`) call
``predict(X, return_std=True)`` (and ``log_predictive_density`` where it
exists) of a fitted estimator, so they work with any regressor that provides
them: ``MetaBNNRegressor``, scikit-learn's ``GaussianProcessRegressor`` and
``BayesianRidge``.  :func:`crps_ensemble` scores draws such as those of
``MetaBNNRegressor.sample_y``.  With a
:class:`~skmetavi.model_selection.TaskAdaptiveRegressor` and ``groups``
routed to the scorer, they score each held-out task after adaptation.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Real

import numpy as np
from scipy import stats
from scipy.special import logsumexp
from sklearn.metrics import r2_score
from sklearn.pipeline import Pipeline
from sklearn.utils.metadata_routing import MetadataRequest

__all__ = [
    "gaussian_nll",
    "mean_log_predictive_density",
    "crps_gaussian",
    "crps_ensemble",
    "interval_coverage",
    "get_scorer",
    "SCORERS",
]


def _as_float_array(value, name):
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{name} must be an array of numbers; got {value!r:.80}. Convert it, e.g. with "
            "np.asarray(..., dtype=float)."
        ) from exc
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{name} contains {np.sum(~np.isfinite(array))} NaN or inf value(s); "
            "all entries must be finite: drop those rows first."
        )
    return array


def _check_std(y_std, name="y_std"):
    y_std = _as_float_array(y_std, name)
    if np.any(y_std <= 0):
        raise ValueError(
            f"{name} must be > 0 everywhere, got {np.sum(y_std <= 0)} entries <= 0 "
            f"(min {y_std.min():.3g}). Pass standard deviations (e.g. "
            "predict(X, return_std=True)[1]), not variances or log-scales."
        )
    return y_std


def _check_1d(**arrays):
    """Validate 1-D arrays of equal, non-zero length; ``(n, 1)`` columns are raveled."""
    out = []
    for name, value in arrays.items():
        array = _as_float_array(value, name)
        if array.ndim == 2 and array.shape[1] == 1:
            array = array[:, 0]
        if array.ndim != 1:
            raise ValueError(
                f"{name} must be 1-D of shape (n_samples,), got shape {array.shape}; pass one "
                "value per sample (a column of shape (n_samples, 1) is also accepted)."
            )
        out.append(array)
    lengths = {name: a.shape[0] for name, a in zip(arrays, out)}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"Inputs have inconsistent numbers of samples: {lengths}; pass one prediction "
            "per target."
        )
    if out[0].shape[0] == 0:
        raise ValueError("Inputs are empty; pass at least one sample.")
    return out


def _check_draws(y_true, draws, name):
    """``y_true`` of shape (n,) and ``draws`` of shape (n, S) with S >= 1."""
    (y_true,) = _check_1d(y_true=y_true)
    draws = _as_float_array(draws, name)
    if draws.ndim != 2 or draws.shape[0] != y_true.shape[0] or draws.shape[1] < 1:
        raise ValueError(
            f"{name} must have shape (n_samples, n_draws) = ({y_true.shape[0]}, S) with "
            f"S >= 1 to match y_true, got shape {draws.shape}."
        )
    return y_true, draws


def gaussian_nll(y_true, y_mean, y_std):
    """Mean negative log density of ``y_true`` under ``N(y_mean, y_std^2)``.

    The Gaussian negative log-likelihood of independent Gaussian predictions,
    ``mean_n [log y_std_n + (y_true_n - y_mean_n)^2 / (2 y_std_n^2)] + log(2 pi) / 2``.
    It rewards both accuracy and calibrated uncertainty.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Observed targets.
    y_mean : array-like of shape (n_samples,)
        Predictive means.
    y_std : array-like of shape (n_samples,)
        Predictive standard deviations, > 0.

    Returns
    -------
    nll : float
        Lower is better.

    See Also
    --------
    mean_log_predictive_density : The same for a mixture of Gaussians (sign flipped).
    crps_gaussian : A proper score that is less sensitive to outliers.

    Examples
    --------
    >>> from skmetavi.metrics import gaussian_nll
    >>> round(gaussian_nll([0.0], [0.0], [1.0]), 4)
    0.9189
    """
    y_true, y_mean, y_std = _check_1d(y_true=y_true, y_mean=y_mean, y_std=y_std)
    return float(-np.mean(stats.norm.logpdf(y_true, y_mean, _check_std(y_std))))


def mean_log_predictive_density(y_true, y_means, y_stds):
    """Mean log density of ``y_true`` under a Monte Carlo mixture of Gaussians.

    ``mean_n log (1/S) sum_s N(y_n; y_means[n, s], y_stds[n, s]^2)``: the "test
    log-likelihood" of BNN papers, with ``S`` posterior weight draws.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Observed targets.
    y_means : array-like of shape (n_samples, n_draws)
        Predictive means of each draw.
    y_stds : array-like of shape (n_samples, n_draws)
        Noise standard deviations of each draw, > 0.

    Returns
    -------
    mlpd : float
        Higher is better.

    See Also
    --------
    gaussian_nll : The single-Gaussian case (``n_draws=1``), sign flipped.

    Examples
    --------
    >>> import numpy as np
    >>> from skmetavi.metrics import mean_log_predictive_density
    >>> round(mean_log_predictive_density([0.0], np.zeros((1, 3)), np.ones((1, 3))), 4)
    -0.9189
    """
    y_true, y_means = _check_draws(y_true, y_means, "y_means")
    y_stds = _check_std(y_stds, "y_stds")
    if y_stds.shape != y_means.shape:
        raise ValueError(
            f"y_stds must have the shape of y_means, {y_means.shape}; got {y_stds.shape}."
        )
    log_n = stats.norm.logpdf(y_true[:, None], y_means, y_stds)
    return float(np.mean(logsumexp(log_n, axis=1) - np.log(y_means.shape[1])))


def crps_gaussian(y_true, y_mean, y_std):
    """Mean continuous ranked probability score of Gaussian predictions (closed form).

    ``CRPS(N(m, s^2), y) = s (z (2 Phi(z) - 1) + 2 phi(z) - 1/sqrt(pi))``,
    ``z = (y - m) / s`` (Gneiting & Raftery 2007).

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Observed targets.
    y_mean : array-like of shape (n_samples,)
        Predictive means.
    y_std : array-like of shape (n_samples,)
        Predictive standard deviations, > 0.

    Returns
    -------
    crps : float
        Lower is better; in the units of y.

    See Also
    --------
    crps_ensemble : The CRPS of predictive samples.

    Examples
    --------
    >>> from skmetavi.metrics import crps_gaussian
    >>> round(crps_gaussian([0.0], [0.0], [1.0]), 4)
    0.2337
    """
    y_true, y_mean, y_std = _check_1d(y_true=y_true, y_mean=y_mean, y_std=y_std)
    s = _check_std(y_std)
    z = (y_true - y_mean) / s
    crps = s * (z * (2 * stats.norm.cdf(z) - 1) + 2 * stats.norm.pdf(z) - 1 / np.sqrt(np.pi))
    return float(np.mean(crps))


def crps_ensemble(y_true, y_samples):
    """Mean CRPS of predictive samples: ``E|X - y| - E|X - X'| / 2``.

    Computed exactly for the empirical distribution of the samples, in
    ``O(S log S)`` per row.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Observed targets.
    y_samples : array-like of shape (n_samples, n_draws)
        Draws from each row's predictive distribution (e.g. ``sample_y``).

    Returns
    -------
    crps : float
        Lower is better.

    See Also
    --------
    crps_gaussian : The closed form for Gaussian predictions.

    Examples
    --------
    >>> from skmetavi.metrics import crps_ensemble
    >>> crps_ensemble([0.0], [[0.0, 0.0]])
    0.0
    """
    y_true, x = _check_draws(y_true, y_samples, "y_samples")
    x = np.sort(x, axis=1)
    S = x.shape[1]
    term1 = np.mean(np.abs(x - y_true[:, None]), axis=1)
    # E|X - X'| = (2 / S^2) sum_i (2i - S - 1) x_(i) for sorted samples.
    i = np.arange(1, S + 1)
    term2 = (2.0 / S**2) * np.sum((2 * i - S - 1) * x, axis=1)
    return float(np.mean(term1 - 0.5 * term2))


def interval_coverage(y_true, y_mean, y_std, level=0.9):
    """Fraction of ``y_true`` inside the central Gaussian predictive interval.

    The interval is ``y_mean +- z y_std`` with ``z`` the ``(1 + level) / 2``
    quantile of the standard normal; coverage far below ``level`` signals
    over-confident predictions, far above it under-confident ones.

    Parameters
    ----------
    y_true : array-like of shape (n_samples,)
        Observed targets.
    y_mean : array-like of shape (n_samples,)
        Predictive means.
    y_std : array-like of shape (n_samples,)
        Predictive standard deviations, > 0.
    level : float, default=0.9
        Nominal coverage of the interval, in (0, 1).

    Returns
    -------
    coverage : float
        Calibrated predictions give about ``level``.

    See Also
    --------
    gaussian_nll : A score of the whole predictive density.

    Examples
    --------
    >>> from skmetavi.metrics import interval_coverage
    >>> interval_coverage([0.0, 3.0], [0.0, 0.0], [1.0, 1.0], level=0.9)
    0.5
    """
    if isinstance(level, bool) or not isinstance(level, Real):
        raise TypeError(f"level must be a float in (0, 1), got {level!r}.")
    if not 0 < level < 1:
        raise ValueError(
            f"level must be in (0, 1), got {level!r}; e.g. level=0.9 for a 90% interval."
        )
    y_true, y_mean, y_std = _check_1d(y_true=y_true, y_mean=y_mean, y_std=y_std)
    half = stats.norm.ppf(0.5 + level / 2) * _check_std(y_std)
    return float(np.mean(np.abs(y_true - y_mean) <= half))


# ------------------------------------------------------------------- scorers
def _final_step(estimator, X):
    """A Pipeline's final step and ``X`` transformed by the others (else ``estimator, X``).

    The probabilistic scorers call the final step directly: with metadata routing on,
    ``Pipeline.predict(X, return_std=True)`` refuses a parameter its step did not
    request, and a Pipeline hides the step's ``log_predictive_density``.
    """
    if isinstance(estimator, Pipeline) and len(estimator.steps) > 1:
        return estimator.steps[-1][1], estimator[:-1].transform(X)
    return estimator, X


def _gaussian(estimator, X):
    estimator, X = _final_step(estimator, X)
    mean, std = estimator.predict(X, return_std=True)
    return mean, np.maximum(std, 1e-12)


def _score_neg_gaussian_nll(estimator, X, y):
    return -gaussian_nll(y, *_gaussian(estimator, X))


def _score_mlpd(estimator, X, y):
    final, Xt = _final_step(estimator, X)
    if hasattr(final, "log_predictive_density"):
        return float(np.mean(final.log_predictive_density(Xt, y)))
    return -gaussian_nll(y, *_gaussian(estimator, X))


def _score_neg_crps(estimator, X, y):
    return -crps_gaussian(y, *_gaussian(estimator, X))


def _score_coverage(estimator, X, y):
    return interval_coverage(y, *_gaussian(estimator, X), level=0.9)


def _score_r2(estimator, X, y):
    return r2_score(y, estimator.predict(X))


def _score_neg_rmse(estimator, X, y):
    return -float(np.sqrt(np.mean((np.asarray(y) - estimator.predict(X)) ** 2)))


_SCORE_FUNCS = {
    "neg_gaussian_nll": _score_neg_gaussian_nll,
    "mlpd": _score_mlpd,
    "neg_crps": _score_neg_crps,
    "coverage_90": _score_coverage,
    "r2": _score_r2,
    "neg_rmse": _score_neg_rmse,
}
#: Names accepted by :func:`get_scorer` (higher is better for all).
SCORERS = tuple(_SCORE_FUNCS)


class _TaskAwareScorer:
    """``scorer(estimator, X, y, groups=None)``; requests ``groups`` from metadata routing."""

    def __init__(self, name):
        self.name = name

    def __call__(self, estimator, X, y, groups=None):
        if groups is not None and hasattr(estimator, "score_tasks"):
            return float(np.mean(estimator.score_tasks(X, y, groups, metric=self.name)))
        if groups is None and getattr(estimator, "meta_fitted_", False):
            raise ValueError(
                f"{self!r} received no groups, but {type(estimator).__name__} was "
                "meta-trained and can only score held-out tasks. Enable metadata routing "
                "(sklearn.set_config(enable_metadata_routing=True)) and pass "
                "params={'groups': groups} to cross_validate / GridSearchCV, or call the "
                "scorer with groups=..."
            )
        return _SCORE_FUNCS[self.name](estimator, X, y)

    def get_metadata_routing(self):
        request = MetadataRequest(owner=type(self).__name__)
        request.score.add_request(param="groups", alias=True)
        return request

    def __repr__(self):
        return f"get_scorer({self.name!r})"


def get_scorer(name):
    """A scorer for ``cross_validate`` / ``GridSearchCV`` (higher is better).

    Unlike scikit-learn's string scorers, these use the predictive
    distribution (``predict(X, return_std=True)``, ``log_predictive_density``)
    and, with metadata routing enabled, receive ``groups`` so that a
    :class:`~skmetavi.model_selection.TaskAdaptiveRegressor` is scored task by
    task after adaptation.

    Parameters
    ----------
    name : {"neg_gaussian_nll", "mlpd", "neg_crps", "coverage_90", "r2", "neg_rmse"}
        ``"mlpd"`` uses ``log_predictive_density`` when the estimator has it
        (the Monte Carlo mixture) and the Gaussian density otherwise.

    Returns
    -------
    scorer : callable
        ``scorer(estimator, X, y, groups=None)``.  It requests ``groups`` from
        scikit-learn's metadata routing; given ``groups`` and a
        :class:`~skmetavi.model_selection.TaskAdaptiveRegressor`, it adapts to
        each task's support rows and scores its query rows.

    See Also
    --------
    skmetavi.model_selection.TaskAdaptiveRegressor : Cross-validation over tasks.

    Examples
    --------
    >>> from skmetavi.metrics import get_scorer
    >>> get_scorer("neg_gaussian_nll")
    get_scorer('neg_gaussian_nll')
    """
    if not isinstance(name, str):
        raise TypeError(
            f"get_scorer takes a scorer name (str), got {type(name).__name__}; valid "
            f"names are {list(SCORERS)}."
        )
    if name not in _SCORE_FUNCS:
        raise ValueError(f"Unknown scorer {name!r}; valid names are {list(SCORERS)}.")
    return _TaskAwareScorer(name)
