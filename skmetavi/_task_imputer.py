"""Cross-validation over groups for imputers: fit each held-out group, score its held-out entries.

:class:`TaskAdaptiveImputer` is the analogue of
:class:`~skmetavi.model_selection.TaskAdaptiveRegressor` for estimators whose
rows are partially observed (:class:`~skmetavi.MetaPartialVAE`): a task's
"query" is not a set of held-out rows but the held-out *entries* of every row
(``y``, disjoint from ``X``).  With metadata routing enabled::

    X_observed, X_heldout = split_ratings(ratings, 0.1, random_state=0, sparse_output=False)
    cross_validate(TaskAdaptiveImputer(MetaPartialVAE()), X_observed, X_heldout,
                   cv=GroupKFold(7), params={"groups": age_groups})

(``cross_validate`` takes a dense ``y``: missing entries are ``NaN``.)

meta-trains on the training groups of each fold, trains a partial VAE on every
held-out group's observed entries and scores its held-out entries.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy

import numpy as np
import scipy.sparse as sp
from sklearn.base import BaseEstimator, MetaEstimatorMixin, TransformerMixin, _fit_context, clone
from sklearn.utils._param_validation import HasMethods
from sklearn.utils.validation import check_is_fitted, column_or_1d

from skmetavi._validation import check_groups

__all__ = ["TaskAdaptiveImputer"]


def _rows(A):
    """``A`` in a form that rows can be selected from (CSR, or a float array)."""
    if A is None:
        return None
    if sp.issparse(A):
        return sp.csr_matrix(A)
    return np.asarray(A, dtype=np.float64)


class TaskAdaptiveImputer(MetaEstimatorMixin, TransformerMixin, BaseEstimator):
    """Meta-train an imputer on groups of rows; fit each new group, score its held-out entries.

    ``fit(X, y, groups)`` calls the wrapped estimator's ``meta_fit`` on the
    groups (``y``: the held-out entries of the training rows, or None to let
    the estimator hide some of ``X``'s).  ``score(X, y, groups)`` trains a copy
    of the meta-trained estimator on each group's observed entries ``X`` (all
    groups in one batched pass for skmetavi estimators) and returns the mean
    over groups of its ``score(X_group, y_group)``, the log-likelihood per
    held-out entry for :class:`~skmetavi.MetaPartialVAE`.  ``groups`` is
    requested from metadata routing by default for both.

    With ``meta_learn=False`` the training groups are not used: each held-out
    group is fitted with the estimator as configured (e.g. plain KL VI), the
    no-meta-learning baseline under the same protocol.  Without ``groups``
    the wrapper is the estimator itself: ``fit(X)`` fits it as one task and
    ``transform`` and ``score`` delegate to it.

    Parameters
    ----------
    estimator : estimator object
        An estimator with ``fit`` and ``score(X, y)`` (and ``meta_fit`` when
        ``meta_learn=True``), e.g. :class:`~skmetavi.MetaPartialVAE`.
    meta_learn : bool, default=True
        Call the estimator's ``meta_fit`` on the groups given to :meth:`fit`.

    Attributes
    ----------
    estimator_ : estimator object
        The meta-trained copy of ``estimator`` (unfitted with
        ``meta_learn=False``; without groups, a fitted one).
    meta_fitted_ : bool
        Whether ``fit`` received groups.
    n_features_in_ : int
        Number of features (items).

    See Also
    --------
    TaskAdaptiveRegressor : The same protocol for regressors (support and query rows).
    skmetavi.datasets.split_ratings : Observed and held-out entries of every row.

    Examples
    --------
    >>> import numpy as np
    >>> import sklearn
    >>> from sklearn.model_selection import GroupKFold, cross_validate
    >>> from skmetavi import MetaPartialVAE
    >>> from skmetavi.datasets import split_ratings
    >>> from skmetavi.model_selection import TaskAdaptiveImputer
    >>> rng = np.random.RandomState(0)
    >>> R = rng.randint(1, 6, size=(60, 10)).astype(float)
    >>> R[rng.rand(60, 10) < 0.3] = np.nan
    >>> X, X_held = split_ratings(R, heldout_fraction=0.2, random_state=0, sparse_output=False)
    >>> groups = np.arange(60) % 3
    >>> vae = MetaPartialVAE(2, encoder_layer_sizes=(8,), decoder_layer_sizes=(8,),
    ...                      divergence="renyi", max_meta_iter=3, max_iter=5, random_state=0)
    >>> with sklearn.config_context(enable_metadata_routing=True):
    ...     cv = cross_validate(TaskAdaptiveImputer(vae), X, X_held, cv=GroupKFold(3),
    ...                         params={"groups": groups})
    >>> cv["test_score"].shape
    (3,)
    """

    __metadata_request__fit = {"groups": True}
    __metadata_request__score = {"groups": True}

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "score"])],
        "meta_learn": ["boolean"],
    }

    def __init__(self, estimator, *, meta_learn=True):
        self.estimator = estimator
        self.meta_learn = meta_learn

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        inner = self.estimator.__sklearn_tags__().input_tags
        tags.input_tags.allow_nan = inner.allow_nan
        tags.input_tags.sparse = inner.sparse
        return tags

    @_fit_context(prefer_skip_nested_validation=False)
    def fit(self, X, y=None, groups=None):
        """Meta-train on the groups (or fit one task without groups).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Observed entries of every row (missing: NaN, or not stored).
        y : {array-like, sparse matrix} of shape (n_samples, n_features), default=None
            Held-out entries of the training rows (disjoint from X).
        groups : array-like of shape (n_samples,), default=None
            Group (task) of each row; routed automatically when metadata
            routing is on.

        Returns
        -------
        self : object
            Fitted wrapper.
        """
        est = clone(self.estimator)
        if groups is None:
            est.fit(X)
        elif self.meta_learn:
            if not hasattr(est, "meta_fit"):
                raise TypeError(
                    f"meta_learn=True needs an estimator with meta_fit, got "
                    f"{type(est).__name__}. Use e.g. skmetavi.MetaPartialVAE, or "
                    "meta_learn=False to fit each held-out group without meta-training."
                )
            est.meta_fit(X, y, groups=groups)
        else:
            X = _rows(X)
            check_groups(groups, X.shape[0], min_tasks=1)
        self.n_features_in_ = (est.n_features_in_ if hasattr(est, "n_features_in_")
                               else X.shape[1])
        self.meta_fitted_ = groups is not None
        self.estimator_ = est
        return self

    def _single(self, method):
        check_is_fitted(self)
        if self.meta_fitted_:
            raise ValueError(
                f"This TaskAdaptiveImputer was meta-trained on several groups, so it has no "
                f"single task to {method}. Use adapt(X_group).{method}(...) for a new group, "
                "or score(X, y, groups) to evaluate held-out groups (in cross_validate: enable "
                "metadata routing and pass params={'groups': groups})."
            )
        return self.estimator_

    def adapt(self, X):
        """A copy of the meta-trained estimator fitted to one new group's rows.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            The group's observed entries.

        Returns
        -------
        estimator : estimator object
            Fitted with the meta-learned divergence (and initialisation).
        """
        check_is_fitted(self)
        return copy.deepcopy(self.estimator_).fit(X)

    def transform(self, X):
        """Impute with the single-task estimator (only after ``fit`` without groups).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Observed entries.

        Returns
        -------
        X_imputed : ndarray of shape (n_samples, n_features)
            The estimator's ``transform``.
        """
        return self._single("transform").transform(X)

    def score_tasks(self, X, y=None, groups=None):
        """Fit a copy to each group's observed entries; score its held-out entries.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Observed entries of the held-out groups' rows.
        y : {array-like, sparse matrix} of shape (n_samples, n_features), default=None
            Their held-out entries; None lets the estimator hide some of X's.
        groups : array-like of shape (n_samples,)
            Group of each row.

        Returns
        -------
        scores : ndarray of shape (n_groups,)
            One score per group, in the order of ``np.unique(groups)``.
        """
        check_is_fitted(self)
        if groups is None:
            raise ValueError(
                "score_tasks needs groups, the group (task) of each row of X; pass an array "
                "of shape (n_samples,)."
            )
        X, y = _rows(X), _rows(y)
        check_groups(groups, X.shape[0], min_tasks=1)
        groups = column_or_1d(groups)
        labels = np.unique(groups)
        parts = [(X[groups == g], None if y is None else y[groups == g]) for g in labels]
        est = self.estimator_
        if hasattr(est, "_adapted_copies"):
            fitted = est._adapted_copies([(Xg, None) for Xg, _ in parts])
        else:
            fitted = [copy.deepcopy(est).fit(Xg) for Xg, _ in parts]
        return np.array([f.score(Xg, yg) for f, (Xg, yg) in zip(fitted, parts)])

    def score(self, X, y=None, groups=None):
        """Mean score over groups after adaptation (the estimator's score without groups).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_samples, n_features)
            Observed entries.
        y : {array-like, sparse matrix} of shape (n_samples, n_features), default=None
            Held-out entries.
        groups : array-like of shape (n_samples,), default=None
            Group of each row; routed automatically when metadata routing is on.

        Returns
        -------
        score : float
            Higher is better.
        """
        if groups is None:
            return float(self._single("score").score(X, y))
        return float(np.mean(self.score_tasks(X, y, groups)))
