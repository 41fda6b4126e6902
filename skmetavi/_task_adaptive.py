"""Cross-validation over tasks for any skmetavi estimator: meta-train, adapt, score held-out tasks.

:class:`TaskAdaptiveEstimator` turns an estimator with ``meta_fit`` into one
whose ``fit(X, y, groups)`` meta-trains on the tasks in ``groups`` and whose
``score(X, y, groups)`` adapts a copy to each held-out task and scores it, so
that ``cross_validate(..., cv=GroupKFold(k), params={"groups": groups})``
evaluates meta-learning over *tasks*.  Two protocols, chosen by the estimator:

- ``"rows"`` (regressors, density estimators): a task's rows are split into a
  *support* part (adaptation) and a *query* part (scoring), once per task with
  a seed drawn at ``fit``, shared by every scorer;
- ``"entries"`` (imputers, :class:`~skmetavi.MetaPartialVAE`): the estimator
  is fitted to every row of the task and scored on held-out *entries* ``y``.

A :class:`~sklearn.pipeline.Pipeline` is meta-trained step by step: its
transformers are fitted on the training tasks only, and its final step is
meta-trained (and later adapted) on the transformed rows.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import hashlib
import warnings
from numbers import Integral

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, MetaEstimatorMixin, _fit_context, clone
from sklearn.pipeline import Pipeline
from sklearn.utils import get_tags
from sklearn.utils._param_validation import HasMethods, Interval, RealNotInt, StrOptions
from sklearn.utils.parallel import Parallel, delayed
from sklearn.utils.validation import check_consistent_length, check_is_fitted, column_or_1d

from skmetavi._validation import (
    _check_array,
    _check_random_state,
    _hash_arrays,
    _with_hint,
    check_groups,
)
from skmetavi.exceptions import NoMetaLearningWarning
from skmetavi.metrics import _SCORE_FUNCS, SCORERS

__all__ = ["TaskAdaptiveEstimator", "split_final_step", "support_masks"]


def split_final_step(estimator):
    """``(transformers, final)``: a Pipeline's leading steps (or None) and its final step."""
    if isinstance(estimator, Pipeline):
        if len(estimator.steps) == 1:
            return None, estimator.steps[-1][1]
        return estimator[:-1], estimator.steps[-1][1]
    return None, estimator


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


def support_masks(groups, support_size, random_state):
    """Boolean mask of each task's support rows (the rest are its query rows)."""
    # random_state=None draws fresh OS entropy, never numpy's global RNG.
    rng = _check_random_state(random_state)
    groups = column_or_1d(groups)
    support = np.zeros(groups.shape[0], dtype=bool)
    for label in np.unique(groups).tolist():
        rows = np.flatnonzero(groups == label)
        n = _n_support(rows.shape[0], support_size, label)
        support[rng.permutation(rows)[:n]] = True
    return support


def _rows(A):
    """``A`` in a form that rows can be selected from (CSR, an array, or None)."""
    if A is None or sp.issparse(A):
        return None if A is None else sp.csr_matrix(A)
    return np.asarray(A)


def _fit_copy(estimator, X, y):
    est = copy.deepcopy(estimator)
    return est.fit(X) if y is None else est.fit(X, y)


class TaskAdaptiveEstimator(MetaEstimatorMixin, BaseEstimator):
    """Meta-train on tasks, then adapt to each held-out task and score it.

    The cross-validation-over-tasks wrapper of every skmetavi estimator.
    ``fit(X, y, groups)`` calls the wrapped estimator's ``meta_fit`` on the
    tasks in ``groups``; ``score(X, y, groups)`` adapts copies of the
    meta-trained estimator (keeping its meta-learned divergence and
    initialisation) to every held-out task in one batched pass and averages
    ``scoring`` over the tasks.  ``groups`` is requested from metadata routing
    by default for both, so that ``cross_validate(wrapper, X, y,
    cv=GroupKFold(k), params={"groups": groups})`` meta-trains on the training
    tasks of each fold and scores its held-out tasks.

    How a held-out task is scored depends on the estimator:

    - rows (regressors and density estimators such as
      :class:`~skmetavi.MetaBNNRegressor`, :class:`~skmetavi.MetaVAE`,
      :class:`~skmetavi.MetaDivergenceVI`): the task's rows are split into
      ``support_size`` support rows, to adapt to, and query rows, to score.
      The split of a task depends only on its rows' positions and on a seed
      drawn from ``random_state`` at :meth:`fit`, so every scorer of one
      ``cross_validate`` call sees the same split, and the tasks are adapted
      once for all scorers (the adapted copies of the last scored data are
      cached);
    - entries (imputers, :class:`~skmetavi.MetaPartialVAE`): a copy is fitted
      to all of the task's observed entries ``X`` and scored on its held-out
      entries ``y`` (see :class:`~skmetavi.model_selection.TaskAdaptiveImputer`).

    With ``meta_learn=False`` nothing is meta-trained: each held-out task is
    adapted with the estimator as configured (e.g. plain KL VI, or any
    scikit-learn estimator), the no-meta-learning baseline under the same
    protocol.  Without ``groups``, the wrapper fits the estimator to ``(X, y)``
    as one task (with a :class:`~skmetavi.exceptions.NoMetaLearningWarning`
    unless ``meta_learn=False``) and delegates ``score`` to it.

    A :class:`~sklearn.pipeline.Pipeline` is meta-trained step by step: its
    transformers are fitted on the training tasks' rows only (no information
    from the held-out tasks leaks into them) and the final step is
    meta-trained on the transformed rows; adapting to a held-out task
    transforms its rows with those transformers and fits the final step only.

    Parameters
    ----------
    estimator : estimator object
        An estimator with ``fit`` (and ``meta_fit`` when ``meta_learn=True``),
        or a Pipeline whose final step has them.
    meta_learn : bool, default=True
        Call the estimator's ``meta_fit`` on the tasks given to :meth:`fit`.
    support_size : float or int, default=0.5
        Fraction or number of each held-out task's rows used for adaptation
        (row protocol).
    scoring : str, callable or None, default=None
        Score of an adapted task (higher is better): None is the estimator's
        own ``score(X_query, y_query)`` (``score(X_query)`` without targets); a
        name from :data:`skmetavi.metrics.SCORERS` (regressors); or a callable
        ``scorer(estimator, X_query, y_query)``.
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
        The meta-trained copy of ``estimator`` (with ``meta_learn=False``, a
        copy whose Pipeline transformers only are fitted; without groups, a
        fitted one).
    meta_fitted_ : bool
        Whether :meth:`fit` received groups: the wrapper then scores held-out
        tasks and has no single task to predict for.
    n_features_in_ : int
        Number of features.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Column names of ``X``, when it has string column names.

    See Also
    --------
    skmetavi.model_selection.TaskAdaptiveRegressor : The regression face (R^2, predict).
    skmetavi.model_selection.TaskAdaptiveImputer : The imputation face (transform).
    skmetavi.model_selection.support_query_split : The row split used here.

    Examples
    --------
    >>> import numpy as np
    >>> import sklearn
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from skmetavi import MetaVAE
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> from skmetavi.model_selection import TaskAdaptiveEstimator
    >>> X, y, groups = make_sinusoid_tasks(6, 20, random_state=0)
    >>> Xy = np.column_stack([X, y])  # 2-D points of each task's curve
    >>> vae = MetaVAE(n_components=1, hidden_layer_sizes=(8,), divergence="renyi",
    ...               max_meta_iter=3, max_iter=5, n_score_samples=20, random_state=0)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     cv = cross_validate(TaskAdaptiveEstimator(vae, random_state=0), Xy,
    ...                         cv=GroupKFold(3), params={"groups": groups})
    >>> cv["test_score"].shape  # mean log-likelihood of held-out rows of held-out tasks
    (3,)
    """

    __metadata_request__fit = {"groups": True}
    __metadata_request__score = {"groups": True}

    _parameter_constraints = {
        "estimator": [HasMethods(["fit"])],
        "meta_learn": ["boolean"],
        "support_size": [
            Interval(RealNotInt, 0, 1, closed="neither"),
            Interval(Integral, 1, None, closed="left"),
        ],
        "scoring": [StrOptions(set(SCORERS)), callable, None],
        "n_jobs": [Integral, None],
        "random_state": ["random_state"],
    }

    def __init__(
        self,
        estimator,
        *,
        meta_learn=True,
        support_size=0.5,
        scoring=None,
        n_jobs=None,
        random_state=None,
    ):
        self.estimator = estimator
        self.meta_learn = meta_learn
        self.support_size = support_size
        self.scoring = scoring
        self.n_jobs = n_jobs
        self.random_state = random_state

    # -------------------------------------------------------------- tags
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = get_tags(self.estimator)
        tags.non_deterministic = inner.non_deterministic
        tags.input_tags.allow_nan = inner.input_tags.allow_nan
        tags.input_tags.sparse = inner.input_tags.sparse
        tags.target_tags.required = tags.target_tags.required or inner.target_tags.required
        return tags

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_adapted_cache", None)  # copies of the held-out tasks: not fitted state
        return state

    def _protocol(self, estimator=None):
        final = split_final_step(self.estimator if estimator is None else estimator)[1]
        return getattr(final, "_task_protocol", "rows")

    # --------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, groups=None):
        """Meta-train on the tasks in ``groups`` (or fit one task without groups).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Rows of all training tasks.
        y : array-like, default=None
            Targets (or, for imputers, held-out entries), for estimators that use them.
        groups : array-like of shape (n_samples,), default=None
            Task labels; routed automatically when metadata routing is on.

        Returns
        -------
        self : object
            Fitted wrapper.
        """
        est = clone(self.estimator)
        for name in ("feature_names_in_", "_adapted_cache"):
            self.__dict__.pop(name, None)
        # One split seed per fit: every scorer of this fitted wrapper sees the same split.
        rng = _check_random_state(self.random_state)
        self._split_seed = int(rng.randint(0, 2**31 - 1))
        if self.random_state is not None:
            # A seeded wrapper is reproducible as a whole: it seeds the estimator's unset
            # random states too (set ones are kept).
            unset = sorted(k for k, v in est.get_params(deep=True).items()
                           if k.split("__")[-1] == "random_state" and v is None)
            est.set_params(**{k: int(rng.randint(0, 2**31 - 1)) for k in unset})
        transformers, final = split_final_step(est)
        if groups is None:
            if self.meta_learn:
                warnings.warn(
                    f"{type(self).__name__}.fit received no groups, so {type(final).__name__} "
                    "was fitted to all rows as one task and nothing was meta-learned. In "
                    "cross_validate / GridSearchCV enable metadata routing "
                    "(sklearn.set_config(enable_metadata_routing=True)) and pass "
                    "params={'groups': groups}; a splitter's groups alone do not reach fit. "
                    "For a deliberate single-task fit, set meta_learn=False.",
                    NoMetaLearningWarning,
                    stacklevel=3,
                )
            est.fit(X) if y is None else est.fit(X, y)
        else:
            n_rows = X.shape[0] if hasattr(X, "shape") else len(X)
            check_groups(groups, n_rows, min_tasks=2 if self.meta_learn else 1)
            if self.meta_learn and not hasattr(final, "meta_fit"):
                raise TypeError(
                    f"meta_learn=True needs an estimator with meta_fit, got "
                    f"{type(final).__name__}. Use a skmetavi estimator (e.g. "
                    "skmetavi.MetaBNNRegressor), or meta_learn=False to adapt each held-out "
                    "task without meta-training."
                )
            Xt = X if transformers is None else transformers.fit_transform(X, y)
            if self.meta_learn:
                final.meta_fit(Xt, y, groups=groups)
            elif transformers is None:
                self._check_rows(X, y)
        self.meta_fitted_ = groups is not None
        self.estimator_ = est
        self._set_n_features(est, X)
        return self

    def _check_rows(self, X, y):
        tags = get_tags(self.estimator).input_tags
        X = _check_array(X, accept_sparse=tags.sparse and "csr",
                         ensure_all_finite="allow-nan" if tags.allow_nan else True)
        if y is not None and self._protocol() == "rows":
            try:
                check_consistent_length(X, np.asarray(y))
            except ValueError as exc:
                raise _with_hint(exc) from exc

    def _set_n_features(self, est, X):
        if hasattr(est, "n_features_in_"):
            self.n_features_in_ = est.n_features_in_
        else:
            self.n_features_in_ = X.shape[1] if hasattr(X, "shape") else np.shape(X)[1]
        names = getattr(est, "feature_names_in_", None)
        if names is None and hasattr(X, "columns"):
            names = np.asarray(X.columns, dtype=object)
            names = names if all(isinstance(c, str) for c in names) else None
        if names is not None:
            self.feature_names_in_ = names

    # ------------------------------------------------------- adaptation
    def _adapt(self, data):
        """Copies of ``estimator_`` adapted to each ``(X, y)`` of ``data`` (final step only)."""
        transformers, final = split_final_step(self.estimator_)
        if transformers is not None:
            data = [(transformers.transform(X), y) for X, y in data]
        if hasattr(final, "_adapted_copies"):
            fitted = final._adapted_copies(data)
        else:
            fitted = Parallel(n_jobs=self.n_jobs)(
                delayed(_fit_copy)(final, X, y) for X, y in data)
        if transformers is None:
            return fitted
        pipes = []
        for f in fitted:
            pipe = copy.copy(self.estimator_)  # shares the fitted transformers (read only)
            pipe.steps = list(pipe.steps[:-1]) + [(pipe.steps[-1][0], f)]
            pipes.append(pipe)
        return pipes

    def adapt(self, X, y=None):
        """A copy of the meta-trained estimator fitted to one new task.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The task's rows (support rows, or an imputer's observed entries).
        y : array-like of shape (n_samples,), default=None
            Their targets, for estimators that use them.

        Returns
        -------
        estimator : estimator object
            Fitted with the meta-learned divergence (and initialisation); a
            Pipeline keeps the transformers fitted on the training tasks.
        """
        check_is_fitted(self)
        return self._adapt([(X, y)])[0]

    def _task_parts(self, X, y, groups):
        """Per task: ``(X_adapt, y_adapt, X_score, y_score)``, in ``np.unique(groups)`` order."""
        X, y = _rows(X), _rows(y)
        check_groups(groups, X.shape[0], min_tasks=1)
        groups = column_or_1d(groups)
        labels = np.unique(groups)
        if self._protocol(self.estimator_) == "entries":
            return [(X[groups == g], None, X[groups == g], None if y is None else y[groups == g])
                    for g in labels]
        if y is not None and y.shape[0] != X.shape[0]:
            raise ValueError(f"y has {y.shape[0]} rows but X has {X.shape[0]}; pass one "
                             "target per row of X.")
        support = support_masks(groups, self.support_size, self._split_seed)
        parts = []
        for g in labels:
            s, q = support & (groups == g), ~support & (groups == g)
            parts.append((X[s], None if y is None else y[s], X[q], None if y is None else y[q]))
        return parts

    def _adapted_tasks(self, X, y, groups):
        """``(fitted copies, parts)`` for the held-out tasks, adapted once per data and split."""
        key = _hash_arrays(hashlib.sha256(), (X, y, np.asarray(groups)))
        key.update(repr((self.support_size, self._split_seed)).encode())
        key = key.hexdigest()
        cached = self.__dict__.get("_adapted_cache")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        parts = self._task_parts(X, y, groups)
        fitted = self._adapt([(Xa, ya) for Xa, ya, _, _ in parts])
        self._adapted_cache = (key, fitted, parts)
        return fitted, parts

    def _score_one(self, est, X, y, metric):
        if metric is None:
            return float(est.score(X) if y is None else est.score(X, y))
        if callable(metric):
            return float(metric(est, X, y))
        return float(_SCORE_FUNCS[metric](est, X, y))

    def score_tasks(self, X, y=None, groups=None, metric=None):
        """Adapt a copy to each task; score it on the task's query rows (or held-out entries).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Rows of the held-out tasks.
        y : array-like, default=None
            Their targets (or held-out entries), for estimators that use them.
        groups : array-like of shape (n_samples,)
            Task labels.
        metric : str or callable, default=None
            A name from :data:`skmetavi.metrics.SCORERS` or a callable
            ``scorer(estimator, X, y)``; ``scoring`` if None.

        Returns
        -------
        scores : ndarray of shape (n_tasks,)
            One score per task, in the order of ``np.unique(groups)``.
        """
        check_is_fitted(self)
        metric = self.scoring if metric is None else metric
        if metric is not None and not callable(metric) and metric not in SCORERS:
            raise ValueError(f"Unknown metric {metric!r}; valid names are {list(SCORERS)}, "
                             "or pass a callable scorer(estimator, X, y).")
        if groups is None:
            raise ValueError(
                "score_tasks needs groups, the task label of each row of X; pass an array "
                "of shape (n_samples,)."
            )
        self._check_features(X)
        fitted, parts = self._adapted_tasks(X, y, groups)
        return np.array([self._score_one(est, Xs, ys, metric)
                         for est, (_, _, Xs, ys) in zip(fitted, parts)])

    def _check_features(self, X):
        n = X.shape[1] if hasattr(X, "shape") else np.shape(X)[1]
        if n != self.n_features_in_:
            raise ValueError(
                f"X has {n} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input. Pass the columns the wrapper was "
                "fitted on, in the same order."
            )

    def _single(self, method):
        check_is_fitted(self)
        if self.meta_fitted_:
            raise ValueError(
                f"This {type(self).__name__} was meta-trained on several tasks, so it has no "
                f"single task to {method}. Use {self._adapt_call()}.{method}(X) for a new "
                "task, or score(X, y, groups) to evaluate held-out tasks. In cross_validate / "
                "GridSearchCV, enable metadata routing "
                "(sklearn.set_config(enable_metadata_routing=True)), pass "
                "params={'groups': groups} and use scoring=None or "
                "skmetavi.metrics.get_scorer(...) scorers: scikit-learn's own scorers "
                "(scoring='r2', ...) cannot see the tasks."
            )
        return self.estimator_

    def _adapt_call(self):
        return "adapt(X_group)" if self._protocol() == "entries" else "adapt(X_support, y_support)"

    def score(self, X, y=None, groups=None):
        """Mean score over tasks after adaptation (the estimator's own score without groups).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Rows of the held-out tasks.
        y : array-like, default=None
            Their targets (or held-out entries), for estimators that use them.
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
                    f"score needs groups for a meta-trained {type(self).__name__}: enable "
                    "metadata routing (sklearn.set_config(enable_metadata_routing=True)) and "
                    "pass params={'groups': groups} to cross_validate, or call "
                    "score(X, y, groups) directly."
                )
            return self._score_one(self._single("score"), X, y, self.scoring)
        return float(np.mean(self.score_tasks(X, y, groups)))
