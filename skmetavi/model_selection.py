"""Task-level model selection: support/query splits and cross-validation over tasks.

scikit-learn's ``GroupKFold`` / ``LeaveOneGroupOut`` already split *tasks*
into training and held-out folds.  What they lack is the meta-test protocol:
meta-train on the training tasks, then on each held-out task adapt on part of
its rows (the *support* set) and score on the rest (the *query* set).
:class:`TaskAdaptiveEstimator` adds exactly that for every skmetavi estimator
(:class:`TaskAdaptiveRegressor` and :class:`TaskAdaptiveImputer` are its
regression and imputation faces).  With metadata routing enabled, every fold
meta-trains on its training tasks and scores its held-out ones:

>>> import sklearn
>>> from sklearn.model_selection import GroupKFold, cross_validate
>>> from skmetavi import MetaBNNRegressor
>>> from skmetavi.datasets import make_sinusoid_tasks
>>> from skmetavi.model_selection import TaskAdaptiveRegressor
>>> X, y, groups = make_sinusoid_tasks(6, 30, random_state=0)
>>> bnn = MetaBNNRegressor(hidden_layer_sizes=(8,), max_meta_iter=5, random_state=0)
>>> with sklearn.config_context(enable_metadata_routing=True):
...     cv = cross_validate(TaskAdaptiveRegressor(bnn, random_state=0), X, y,
...                         cv=GroupKFold(3), params={"groups": groups},
...                         return_estimator=True)
>>> cv["test_score"].shape
(3,)
>>> all("meta_init_" in vars(e.estimator_) for e in cv["estimator"])  # learned initialisations
True
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Integral

import numpy as np
from sklearn.base import RegressorMixin
from sklearn.utils._param_validation import (
    HasMethods,
    Interval,
    RealNotInt,
    StrOptions,
    validate_params,
)
from sklearn.utils.validation import check_consistent_length, column_or_1d

from skmetavi._task_adaptive import TaskAdaptiveEstimator, support_masks
from skmetavi._task_imputer import TaskAdaptiveImputer
from skmetavi._validation import _with_hint
from skmetavi.metrics import SCORERS

__all__ = [
    "support_query_split",
    "TaskAdaptiveEstimator",
    "TaskAdaptiveImputer",
    "TaskAdaptiveRegressor",
]


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
    mask = support_masks(groups, support_size, random_state)
    return X[mask], X[~mask], y[mask], y[~mask], groups[mask], groups[~mask]




class TaskAdaptiveRegressor(RegressorMixin, TaskAdaptiveEstimator):
    """Meta-train on tasks, then adapt to each new task's support rows and score its query rows.

    The regression face of :class:`TaskAdaptiveEstimator`: ``fit(X, y,
    groups)`` calls the wrapped regressor's ``meta_fit`` on the given tasks;
    ``score(X, y, groups)`` adapts copies of the meta-trained regressor
    (keeping its meta-learned divergence and initialisation) to the support
    part of each task and evaluates ``scoring`` on its query part, averaging
    over tasks.  ``groups`` is requested from metadata routing by default for
    both.  One support/query split per task, drawn from a seed fixed at
    :meth:`fit`, is shared by every scorer, and the tasks are adapted once for
    all of them.  A Pipeline's transformers are fitted on the training tasks
    only and its final step is meta-trained on the transformed rows.

    With ``meta_learn=False`` the training tasks are not used: each held-out
    task is adapted with the estimator as configured (e.g. plain KL VI, or
    any scikit-learn regressor), the no-meta-learning baseline under the
    same protocol.  Without ``groups``, the wrapper is an ordinary regressor:
    ``fit(X, y)`` fits the wrapped estimator to ``(X, y)`` as one task (with a
    :class:`~skmetavi.exceptions.NoMetaLearningWarning` unless
    ``meta_learn=False``) and ``predict`` delegates to it.

    Parameters
    ----------
    estimator : estimator object
        A regressor with ``fit`` and ``predict`` (and ``meta_fit`` when
        ``meta_learn=True``), e.g. :class:`~skmetavi.MetaBNNRegressor`, or a
        Pipeline ending in one.
    meta_learn : bool, default=True
        Call the estimator's ``meta_fit`` on the tasks given to :meth:`fit`.
        False skips meta-training (the baseline described above).
    support_size : float or int, default=0.5
        Fraction or number of each held-out task's rows used for adaptation.
    scoring : {"r2", "neg_gaussian_nll", "mlpd", "neg_crps", "coverage_90", \
            "neg_rmse"}, callable or None, default="r2"
        Metric of :meth:`score` (higher is better): a name from
        :data:`skmetavi.metrics.SCORERS`, a callable ``scorer(estimator, X,
        y)``, or None for the estimator's own ``score``.  For several metrics
        in ``cross_validate`` use :func:`skmetavi.metrics.get_scorer`.
    n_jobs : int, default=None
        Held-out tasks adapted in parallel with joblib, for estimators other
        than skmetavi's (these adapt all held-out tasks in one batched pass).
    random_state : int, RandomState instance or None, default=None
        Seed of the support/query splits, drawn once at :meth:`fit` (None: from
        fresh OS entropy).  When not None, it also seeds every ``random_state``
        parameter of ``estimator`` (and of a Pipeline's steps) that is None, so
        that a seeded wrapper gives the same scores at every run.

    Attributes
    ----------
    estimator_ : estimator object
        The meta-trained copy of ``estimator`` (an unfitted copy with
        ``meta_learn=False``, a Pipeline's transformers fitted; without groups,
        a fitted one).
    meta_fitted_ : bool
        Whether ``fit`` received groups: the wrapper then scores held-out
        tasks and cannot ``predict``.
    n_features_in_ : int
        Number of features.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of ``X``, when it has string column names.

    See Also
    --------
    TaskAdaptiveEstimator : The same protocol for any skmetavi estimator.
    support_query_split : The split used by :meth:`score`.
    skmetavi.metrics.get_scorer : Task-aware scorers for ``cross_validate``.

    Examples
    --------
    >>> import sklearn
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from sklearn.pipeline import make_pipeline
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skmetavi import MetaBNNRegressor
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> from skmetavi.model_selection import TaskAdaptiveRegressor
    >>> X, y, groups = make_sinusoid_tasks(6, 40, random_state=0)
    >>> bnn = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), max_meta_iter=5,
    ...                        max_iter=20, random_state=0)
    >>> model = TaskAdaptiveRegressor(make_pipeline(StandardScaler(), bnn), random_state=0)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     cv = cross_validate(model, X, y, cv=GroupKFold(3), params={"groups": groups},
    ...                         return_estimator=True)
    >>> cv["test_score"].shape
    (3,)
    >>> [e.estimator_[-1].meta_tasks_.tolist() for e in cv["estimator"]]  # training tasks
    [[0, 1, 3, 4], [0, 2, 3, 5], [1, 2, 4, 5]]
    """

    _parameter_constraints = {
        **TaskAdaptiveEstimator._parameter_constraints,
        "estimator": [HasMethods(["fit", "predict"])],
        "scoring": [StrOptions(set(SCORERS)), callable, None],
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
        super().__init__(estimator, meta_learn=meta_learn, support_size=support_size,
                         scoring=scoring, n_jobs=n_jobs, random_state=random_state)

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
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass the targets, an array of shape (n_samples,)."
            )
        return super().fit(X, y, groups)

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
        return self._single("predict").predict(X, **predict_params)

    score = TaskAdaptiveEstimator.score
