"""Cross-validation over groups for imputers: fit each held-out group, score its held-out entries.

:class:`TaskAdaptiveImputer` is the face of
:class:`~skmetavi.model_selection.TaskAdaptiveEstimator` for estimators whose
rows are partially observed (:class:`~skmetavi.MetaPartialVAE`): a task's
"query" is not a set of held-out rows but the held-out *entries* of every row
(``y``, disjoint from ``X``; ``cross_validate`` takes a dense ``y`` whose
missing entries are ``NaN``).  Each fold meta-trains on its training groups,
trains a partial VAE on every held-out group's observed entries and scores its
held-out entries; the class docstring has a runnable example.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Integral

from sklearn.base import TransformerMixin
from sklearn.utils._param_validation import HasMethods

from skmetavi._task_adaptive import TaskAdaptiveEstimator

__all__ = ["TaskAdaptiveImputer"]


class TaskAdaptiveImputer(TransformerMixin, TaskAdaptiveEstimator):
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
    scoring : callable or None, default=None
        Score of a fitted group: None is the estimator's own ``score(X_group,
        y_group)`` (the log-likelihood per held-out entry for
        :class:`~skmetavi.MetaPartialVAE`), a callable ``scorer(estimator,
        X_group, y_group)`` otherwise.
    n_jobs : int, default=None
        Groups fitted in parallel with joblib, for estimators other than
        skmetavi's (these fit all groups in one batched pass).

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
    TaskAdaptiveEstimator : The protocol for any skmetavi estimator.
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

    _parameter_constraints = {
        "estimator": [HasMethods(["fit", "score"])],
        "meta_learn": ["boolean"],
        "scoring": [callable, None],
        "n_jobs": [Integral, None],
    }

    def __init__(self, estimator, *, meta_learn=True, scoring=None, n_jobs=None):
        self.estimator = estimator
        self.meta_learn = meta_learn
        self.scoring = scoring
        self.n_jobs = n_jobs

    # The entries protocol splits no rows: no support_size, no split seed.
    support_size = None
    random_state = None

    def _protocol(self, estimator=None):
        return "entries"

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
