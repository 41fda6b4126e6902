"""Task-level model selection: support/query splits and cross-validation over tasks.

scikit-learn's ``GroupKFold`` / ``LeaveOneGroupOut`` already split *tasks*
into training and held-out folds.  What they lack is the meta-test protocol:
on each held-out task, adapt on part of its rows (the *support* set) and score
on the rest (the *query* set).  :class:`TaskAdaptiveRegressor` adds exactly
that, so that with metadata routing enabled::

    cross_validate(TaskAdaptiveRegressor(MetaBNNRegressor()), X, y,
                   cv=GroupKFold(5), params={"groups": groups})

meta-trains on the training tasks of each fold, adapts to every held-out
task's support rows and scores its query rows.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
from numbers import Integral

import numpy as np
from sklearn.base import BaseEstimator, MetaEstimatorMixin, RegressorMixin, _fit_context, clone
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    RealNotInt,
    StrOptions,
    validate_params,
)
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import (
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
)

from skmetavi._validation import _check_random_state, _validate_data, _with_hint, check_groups
from skmetavi._task_imputer import TaskAdaptiveImputer
from skmetavi.metrics import _SCORE_FUNCS, SCORERS

__all__ = ["support_query_split", "TaskAdaptiveImputer", "TaskAdaptiveRegressor"]


def _n_support(n_rows, support_size, label):
    if isinstance(support_size, Integral):
        n = int(support_size)
    else:
        n = int(round(support_size * n_rows))
    if not 1 <= n <= n_rows - 1:
        raise ValueError(
            f"Task {label!r} has {n_rows} rows; support_size={support_size!r} leaves "
            f"{n} support and {n_rows - n} query rows, but both parts need at least one. "
            "Use a support_size between 1 and n_rows - 1 (or a fraction), or larger tasks."
        )
    return n


def _support_masks(groups, support_size, random_state):
    # random_state=None draws fresh OS entropy, never numpy's global RNG (as the
    # estimators do).
    rng = _check_random_state(random_state)
    groups = column_or_1d(groups)
    support = np.zeros(groups.shape[0], dtype=bool)
    for label in np.unique(groups).tolist():
        rows = np.flatnonzero(groups == label)
        n = _n_support(rows.shape[0], support_size, label)
        support[rng.permutation(rows)[:n]] = True
    return support


@validate_params(
    {
        "X": ["array-like"],
        "y": ["array-like"],
        "groups": ["array-like"],
        "support_size": [
            Interval(RealNotInt, 0, 1, closed="neither"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def support_query_split(X, y, groups, *, support_size=0.5, random_state=None):
    """Split every task's rows into a support part and a query part.

    The meta-test protocol of few-shot learning: a model adapts to a new task
    on its support rows and is evaluated on its query rows.  Each task is
    split separately, so every task appears in both parts.

    Parameters
    ----------
    X : array-like of shape (n_samples, n_features)
        Rows of all tasks.
    y : array-like of shape (n_samples,)
        Targets.
    groups : array-like of shape (n_samples,)
        Task label of each row.
    support_size : float or int, default=0.5
        Fraction (float in (0, 1)) or number (int) of each task's rows in its
        support part.
    random_state : int, RandomState instance or None, default=None
        Seed of the row permutation; None draws fresh OS entropy (numpy's
        global RNG is left untouched).

    Returns
    -------
    X_support, X_query, y_support, y_query, groups_support, groups_query : ndarray
        The two parts, in the original row order within each part.

    See Also
    --------
    TaskAdaptiveRegressor : Adapts on the support part and scores the query part.
    sklearn.model_selection.GroupKFold : Splits whole tasks into folds.

    Examples
    --------
    >>> import numpy as np
    >>> from skmetavi.model_selection import support_query_split
    >>> X, y, g = np.arange(8).reshape(-1, 1), np.arange(8.0), [0, 0, 0, 0, 1, 1, 1, 1]
    >>> Xs, Xq, ys, yq, gs, gq = support_query_split(X, y, g, support_size=1, random_state=0)
    >>> gs.tolist(), gq.tolist()
    ([0, 1], [0, 0, 0, 1, 1, 1])
    """
    X, y, groups = np.asarray(X), np.asarray(y), column_or_1d(groups, input_name="groups")
    try:
        check_consistent_length(X, y, groups)
    except ValueError as exc:
        hinted = _with_hint(exc)
        if hinted is exc:
            raise
        raise hinted from exc
    mask = _support_masks(groups, support_size, random_state)
    return X[mask], X[~mask], y[mask], y[~mask], groups[mask], groups[~mask]


def _adapt_and_score(estimator, X_s, y_s, X_q, y_q, metrics):
    est = copy.deepcopy(estimator).fit(X_s, y_s)
    return {m: _SCORE_FUNCS[m](est, X_q, y_q) for m in metrics}


def _adapt_tasks(estimator, parts, metrics, n_jobs):
    """Adapt ``estimator`` to every task's support rows and score its query rows.

    skmetavi estimators adapt all tasks in one batched pass (each task exactly as
    ``deepcopy(estimator).fit(X_s, y_s)`` would); other regressors are fitted per
    task with joblib.
    """
    if hasattr(estimator, "_adapted_copies"):
        fitted = estimator._adapted_copies([(X_s, y_s) for X_s, y_s, _, _ in parts])
        return [{m: _SCORE_FUNCS[m](est, X_q, y_q) for m in metrics}
                for est, (_, _, X_q, y_q) in zip(fitted, parts)]
    jobs = [delayed(_adapt_and_score)(estimator, *part, metrics) for part in parts]
    return Parallel(n_jobs=n_jobs)(jobs)


class TaskAdaptiveRegressor(MetaEstimatorMixin, RegressorMixin, BaseEstimator):
    """Meta-train on tasks, then adapt to each new task's support rows and score its query rows.

    The cross-validation-over-tasks wrapper: ``fit(X, y, groups)`` calls the
    wrapped estimator's ``meta_fit`` on the given tasks; ``score(X, y,
    groups)`` adapts a copy of the meta-trained estimator (keeping its
    meta-learned divergence and initialisation) to the support part of each
    task and evaluates ``scoring`` on its query part, averaging over tasks.
    ``groups`` is requested from metadata routing by default for both.

    With ``meta_learn=False`` the training tasks are not used: each held-out
    task is adapted with the estimator as configured (e.g. plain KL VI, or
    any scikit-learn regressor), the no-meta-learning baseline under the
    same protocol.

    Without ``groups``, the wrapper is an ordinary regressor: ``fit(X, y)``
    fits the wrapped estimator to ``(X, y)`` as one task and ``predict``
    delegates to it.

    Parameters
    ----------
    estimator : estimator object
        An estimator with ``meta_fit``, ``fit`` and ``predict``, e.g.
        :class:`~skmetavi.MetaBNNRegressor` (``meta_fit`` is only needed
        with ``meta_learn=True``).
    meta_learn : bool, default=True
        Call the estimator's ``meta_fit`` on the tasks given to :meth:`fit`.
        False skips meta-training (the baseline described above).
    support_size : float or int, default=0.5
        Fraction or number of each held-out task's rows used for adaptation.
    scoring : {"r2", "neg_gaussian_nll", "mlpd", "neg_crps", "coverage_90", \
            "neg_rmse"}, default="r2"
        Metric of :meth:`score` (higher is better).  For several metrics in
        ``cross_validate`` use :func:`skmetavi.metrics.get_scorer`.
    n_jobs : int, default=None
        Held-out tasks adapted in parallel with joblib, for estimators other
        than skmetavi's (these adapt all held-out tasks in one batched pass).
    random_state : int, RandomState instance or None, default=None
        Seed of the support/query split of :meth:`score`; None draws fresh OS
        entropy at each call.

    Attributes
    ----------
    estimator_ : estimator object
        The meta-trained copy of ``estimator`` (an unfitted copy with
        ``meta_learn=False``; without groups, a fitted one).
    meta_fitted_ : bool
        Whether ``fit`` received groups: the wrapper then scores held-out
        tasks and cannot ``predict``.
    n_features_in_ : int
        Number of features.

    See Also
    --------
    support_query_split : The split used by :meth:`score`.
    skmetavi.metrics.get_scorer : Task-aware scorers for ``cross_validate``.

    Examples
    --------
    >>> import sklearn
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from skmetavi import MetaBNNRegressor
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> from skmetavi.model_selection import TaskAdaptiveRegressor
    >>> X, y, groups = make_sinusoid_tasks(6, 40, random_state=0)
    >>> bnn = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), max_meta_iter=5,
    ...                        max_iter=20, random_state=0)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     cv = cross_validate(TaskAdaptiveRegressor(bnn, random_state=0), X, y,
    ...                         cv=GroupKFold(3), params={"groups": groups},
    ...                         return_estimator=True)
    >>> cv["test_score"].shape
    (3,)
    >>> [e.estimator_.meta_tasks_.tolist() for e in cv["estimator"]]  # training tasks
    [[0, 1, 3, 4], [0, 2, 3, 5], [1, 2, 4, 5]]
    """

    __metadata_request__fit = {"groups": True}
    __metadata_request__score = {"groups": True}

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "predict"])],
        "meta_learn": ["boolean"],
        "support_size": [
            Interval(RealNotInt, 0, 1, closed="neither"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "scoring": [StrOptions(set(SCORERS))],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator,
        *,
        meta_learn=True,
        support_size=0.5,
        scoring="r2",
        n_jobs=None,
        random_state=None,
    ):
        self.estimator = estimator
        self.meta_learn = meta_learn
        self.support_size = support_size
        self.scoring = scoring
        self.n_jobs = n_jobs
        self.random_state = random_state

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y, groups=None):
        """Meta-train on the tasks in ``groups`` (or fit one task without groups).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of all training tasks.
        y : array-like of shape (n_samples,)
            Targets.
        groups : array-like of shape (n_samples,), default=None
            Task labels; routed automatically when metadata routing is on.

        Returns
        -------
        self : object
            Fitted wrapper.
        """
        est = clone(self.estimator)
        if hasattr(self, "feature_names_in_"):  # from a previous fit
            del self.feature_names_in_
        if groups is None:
            est.fit(X, y)
            self.n_features_in_ = est.n_features_in_
            if hasattr(est, "feature_names_in_"):
                self.feature_names_in_ = est.feature_names_in_
        elif self.meta_learn:
            if not hasattr(est, "meta_fit"):
                raise TypeError(
                    f"meta_learn=True needs an estimator with meta_fit, got "
                    f"{type(est).__name__}. Use e.g. skmetavi.MetaBNNRegressor, or "
                    "meta_learn=False to adapt each held-out task without meta-training."
                )
            est.meta_fit(X, y, groups=groups)
            self.n_features_in_ = est.n_features_in_
            if hasattr(est, "feature_names_in_"):
                self.feature_names_in_ = est.feature_names_in_
        else:
            X, y = _validate_data(self, X, y, y_numeric=True)
            check_groups(groups, X.shape[0], min_tasks=1)
        self.meta_fitted_ = groups is not None
        self.estimator_ = est
        return self

    def adapt(self, X, y):
        """A copy of the meta-trained estimator fitted to one new task.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The task's support rows.
        y : array-like of shape (n_samples,)
            Their targets.

        Returns
        -------
        estimator : estimator object
            Fitted with the meta-learned divergence (and initialisation).
        """
        check_is_fitted(self)
        return copy.deepcopy(self.estimator_).fit(X, y)

    def predict(self, X, **predict_params):
        """Predict with the single-task estimator (only after ``fit`` without groups).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Inputs.
        **predict_params : dict
            Passed to the wrapped estimator's ``predict``, e.g.
            ``return_std=True``.

        Returns
        -------
        y_pred : ndarray of shape (n_samples,)
            Predictions (and whatever else ``predict_params`` asks for).
        """
        check_is_fitted(self)
        if self.meta_fitted_:
            raise ValueError(
                "This TaskAdaptiveRegressor was meta-trained on several tasks, so it has no "
                "single task to predict for. Use adapt(X_support, y_support).predict(X) for a "
                "new task, or score(X, y, groups) to evaluate held-out tasks. In "
                "cross_validate / GridSearchCV, enable metadata routing "
                "(sklearn.set_config(enable_metadata_routing=True)), pass "
                "params={'groups': groups} and use scoring=None or "
                "skmetavi.metrics.get_scorer(...) scorers: scikit-learn's own scorers "
                "(scoring='r2', ...) call predict and cannot see the tasks."
            )
        return self.estimator_.predict(X, **predict_params)

    def score_tasks(self, X, y, groups, metric=None):
        """Adapt to each task's support rows; score its query rows.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of the held-out tasks.
        y : array-like of shape (n_samples,)
            Targets.
        groups : array-like of shape (n_samples,)
            Task labels.
        metric : str, default=None
            One of :data:`skmetavi.metrics.SCORERS`; ``scoring`` if None.

        Returns
        -------
        scores : ndarray of shape (n_tasks,)
            One score per task, in the order of ``np.unique(groups)``.
        """
        check_is_fitted(self)
        metric = self.scoring if metric is None else metric
        if metric not in SCORERS:
            raise ValueError(f"Unknown metric {metric!r}; valid names are {list(SCORERS)}.")
        X, y = _validate_data(self, X, y, reset=False, y_numeric=True)
        if groups is None:
            raise ValueError(
                "score_tasks needs groups, the task label of each row of X; pass an array "
                "of shape (n_samples,)."
            )
        check_groups(groups, X.shape[0], min_tasks=1)
        groups = column_or_1d(groups)
        support = _support_masks(groups, self.support_size, self.random_state)
        parts = []
        for label in np.unique(groups):
            s, q = support & (groups == label), ~support & (groups == label)
            parts.append((X[s], y[s], X[q], y[q]))
        out = _adapt_tasks(self.estimator_, parts, [metric], self.n_jobs)
        return np.array([o[metric] for o in out])

    def score(self, X, y, groups=None):
        """Mean ``scoring`` over tasks after adaptation (or plain R^2 without groups).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of the held-out tasks.
        y : array-like of shape (n_samples,)
            Targets.
        groups : array-like of shape (n_samples,), default=None
            Task labels; routed automatically when metadata routing is on.

        Returns
        -------
        score : float
            Higher is better.
        """
        if groups is None:
            if getattr(self, "meta_fitted_", False):
                raise ValueError(
                    "score needs groups for a meta-trained TaskAdaptiveRegressor: enable "
                    "metadata routing (sklearn.set_config(enable_metadata_routing=True)) and "
                    "pass params={'groups': groups} to cross_validate, or call "
                    "score(X, y, groups) directly."
                )
            return super().score(X, y)
        return float(np.mean(self.score_tasks(X, y, groups)))
