"""Standard recommender baselines for a ratings-imputation benchmark.

Context rows for the partial-VAE experiment on MovieLens: each evaluated user's
ratings are split into *observed* ratings, given to the model, and *held-out*
ratings, which are scored.  :func:`rating_baselines` fits the classic baselines
on the observed ratings (plus, optionally, other users' ratings) and reports the
RMSE and a Gaussian test log-likelihood on the held-out ratings.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import numbers
import time
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp

from skmetavi._validation import _check_random_state

__all__ = ["METHODS", "rating_baselines"]

#: The baselines :func:`rating_baselines` knows, in its default order.
METHODS = ("global_mean", "item_mean", "user_item_bias", "knn")

#: ``knn`` densifies the users x items matrix; above this many cells it is skipped.
KNN_MAX_CELLS = 50_000_000

#: Shrinkage ``lam`` of the item means towards the global mean (pseudo-ratings).
ITEM_MEAN_SHRINKAGE = 5.0

#: Ridge penalty of the user and of the item biases of ``user_item_bias``.
BIAS_REGULARIZATION = 5.0

#: Rounds of alternating least squares (item biases, then user biases) of ``user_item_bias``.
BIAS_N_ROUNDS = 10

#: Fraction of each evaluated user's observed ratings held out internally to estimate sigma.
SIGMA_VALIDATION_FRACTION = 0.1

#: Lower bound of sigma (rating units), so that a perfect internal fit keeps test_ll finite.
SIGMA_FLOOR = 1e-6


class _Ratings(NamedTuple):
    """Stored entries of a sparse ratings matrix as (row, column, rating) triplets."""

    rows: np.ndarray
    cols: np.ndarray
    vals: np.ndarray


def _check_ratings(X, name, rating_range):
    """Validate one sparse ratings matrix; return its triplets (row-major order) and shape."""
    if not sp.issparse(X):
        raise ValueError(
            f"{name} must be a scipy.sparse matrix (users x items, stored entries = ratings, "
            f"absent entries = missing); got {type(X).__name__}. Build it from (user, item, "
            "rating) triplets with scipy.sparse.csr_array((ratings, (users, items)), "
            "shape=...), or from a dense array a with NaN for missing (and no rating 0) "
            "with scipy.sparse.csr_array(np.nan_to_num(a, nan=0.0))."
        )
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-dimensional (users x items); got shape {X.shape}.")
    # COO keeps duplicate entries (converting one to CSR would sum them), so check there.
    X = sp.coo_array(X)
    order = np.lexsort((X.col, X.row))
    rows = X.row[order].astype(np.intp)
    cols = X.col[order].astype(np.intp)
    vals = X.data[order].astype(np.float64)
    if vals.size > 1:
        dup = (rows[1:] == rows[:-1]) & (cols[1:] == cols[:-1])
        if dup.any():
            k = int(np.flatnonzero(dup)[0])
            raise ValueError(
                f"{name} stores the entry ({rows[k]}, {cols[k]}) more than once; each "
                "(user, item) pair must hold at most one rating."
            )
    if not np.isfinite(vals).all():
        raise ValueError(
            f"{name} stores non-finite ratings; missing ratings must be absent entries, "
            "not stored NaN or inf."
        )
    low, high = rating_range
    bad = (vals < low) | (vals > high)
    if bad.any():
        k = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} stores the rating {vals[k]!r} at ({rows[k]}, {cols[k]}), outside "
            f"rating_range={tuple(rating_range)}. Missing ratings must be absent entries "
            "(not stored zeros: call X.eliminate_zeros() if 0 means missing), or widen "
            "rating_range."
        )
    return _Ratings(rows, cols, vals), X.shape


def _check_params(rating_range, methods, n_neighbors):
    """Validate the scalar parameters; return them normalised."""
    try:
        low, high = (float(v) for v in rating_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"rating_range must be a pair (low, high) of numbers; got {rating_range!r}."
        ) from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(
            f"rating_range must be finite with low < high; got {tuple(rating_range)!r}."
        )
    if isinstance(methods, str):
        methods = (methods,)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"Unknown method(s) {unknown}; choose from {list(METHODS)}.")
    if not methods:
        raise ValueError(f"methods must name at least one of {list(METHODS)}.")
    if len(set(methods)) != len(methods):
        raise ValueError(f"methods must not repeat a method; got {list(methods)}.")
    if (
        isinstance(n_neighbors, bool)
        or not isinstance(n_neighbors, numbers.Integral)
        or n_neighbors < 1
    ):
        raise ValueError(f"n_neighbors must be a positive integer; got {n_neighbors!r}.")
    return (low, high), methods, int(n_neighbors)


def _split_per_user(ratings, n_users, fraction, rng):
    """Hold out a random ``fraction`` of each user's ratings, keeping at least one.

    User ``u`` with ``n_u`` ratings loses ``floor(fraction * n_u + U_u)`` of them, ``U_u``
    uniform on [0, 1) (stochastic rounding, so that users with few ratings count
    too: exactly ``fraction`` in expectation), at most ``n_u - 1``.  Returns boolean
    masks (train, validation) over the triplets.
    """
    counts = np.bincount(ratings.rows, minlength=n_users)
    n_val = np.floor(fraction * counts + rng.random_sample(n_users))
    n_val = np.minimum(n_val, np.maximum(counts - 1, 0))
    # Rank of each rating within its user's ratings, in a random order.
    order = np.lexsort((rng.random_sample(ratings.rows.size), ratings.rows))
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.empty(ratings.rows.size, dtype=np.intp)
    rank[order] = np.arange(ratings.rows.size) - starts[ratings.rows[order]]
    val = rank < n_val[ratings.rows]
    return ~val, val


def _subset(ratings, mask):
    return _Ratings(ratings.rows[mask], ratings.cols[mask], ratings.vals[mask])


def _global_mean(visible, extra):
    return float(np.concatenate((visible.vals, extra.vals)).mean())


def _item_means(visible, extra, n_items):
    """Item means over the visible and extra ratings, shrunk towards the global mean."""
    mu = _global_mean(visible, extra)
    cols = np.concatenate((visible.cols, extra.cols))
    vals = np.concatenate((visible.vals, extra.vals))
    sums = np.bincount(cols, weights=vals, minlength=n_items)
    counts = np.bincount(cols, minlength=n_items)
    return (sums + ITEM_MEAN_SHRINKAGE * mu) / (counts + ITEM_MEAN_SHRINKAGE)


def _biases(visible, extra, n_users, n_items):
    """Global mean, user biases (evaluated users) and item biases of the baseline predictor.

    Minimises ``sum (r_ui - mu - b_u - b_i)^2 + lam (sum b_u^2 + sum b_i^2)`` over the
    visible and extra ratings (the extra users get biases of their own) by alternating
    exact minimisation over the item biases and over the user biases.
    """
    mu = _global_mean(visible, extra)
    n_extra_users = int(extra.rows.max()) + 1 if extra.rows.size else 0
    rows = np.concatenate((visible.rows, n_users + extra.rows))
    cols = np.concatenate((visible.cols, extra.cols))
    resid = np.concatenate((visible.vals, extra.vals)) - mu
    n_rows = n_users + n_extra_users
    lam = BIAS_REGULARIZATION
    user_den = np.bincount(rows, minlength=n_rows) + lam
    item_den = np.bincount(cols, minlength=n_items) + lam
    b_user = np.zeros(n_rows)
    b_item = np.zeros(n_items)
    for _ in range(BIAS_N_ROUNDS):
        b_item = np.bincount(cols, weights=resid - b_user[rows], minlength=n_items) / item_den
        b_user = np.bincount(rows, weights=resid - b_item[cols], minlength=n_rows) / user_den
    return mu, b_user[:n_users], b_item


def _knn_predict(visible, extra, shape, rows, cols, n_neighbors):
    """KNNImputer on the dense matrix of the visible ratings (missing = NaN)."""
    from sklearn.impute import KNNImputer

    dense = np.full(shape, np.nan)
    dense[visible.rows, visible.cols] = visible.vals
    imputed = KNNImputer(n_neighbors=n_neighbors, keep_empty_features=True).fit_transform(dense)
    pred = imputed[rows, cols]
    # Items no evaluated user rated visibly have no donors: fall back to the item means.
    empty = np.bincount(visible.cols, minlength=shape[1])[cols] == 0
    if empty.any():
        pred[empty] = _item_means(visible, extra, shape[1])[cols[empty]]
    return pred


def _fit_predict(method, visible, extra, shape, rows, cols, n_neighbors):
    """Fit ``method`` on the visible (+ extra) ratings; predict the entries (rows, cols)."""
    if method == "global_mean":
        return np.full(rows.size, _global_mean(visible, extra))
    if method == "item_mean":
        return _item_means(visible, extra, shape[1])[cols]
    if method == "user_item_bias":
        mu, b_user, b_item = _biases(visible, extra, *shape)
        return mu + b_user[rows] + b_item[cols]
    return _knn_predict(visible, extra, shape, rows, cols, n_neighbors)


def rating_baselines(
    X_observed,
    X_heldout,
    *,
    X_extra=None,
    rating_range=(1, 5),
    methods=METHODS,
    n_neighbors=20,
    random_state=0,
):
    """RMSE and Gaussian test log-likelihood of standard baselines on held-out ratings.

    Every method is fitted on the visible ratings (``X_observed``, plus ``X_extra``
    where the method uses it) and predicts the held-out ratings of ``X_heldout``;
    predictions are clipped to ``rating_range``.

    - ``"global_mean"``: the mean ``mu`` of all visible ratings (``X_observed`` and
      ``X_extra``).
    - ``"item_mean"``: the item mean shrunk towards ``mu``,
      ``(sum_j + lam * mu) / (count_j + lam)`` with ``lam = 5`` pseudo-ratings
      (:data:`ITEM_MEAN_SHRINKAGE`), over the ratings of item ``j`` in ``X_observed``
      and ``X_extra``; an unrated item gets ``mu``.
    - ``"user_item_bias"``: the baseline predictor ``mu + b_u + b_i`` of Koren (2008),
      the biases minimising ``sum (r_ui - mu - b_u - b_i)^2 + lam (sum b_u^2 +
      sum b_i^2)`` with ``lam = 5`` (:data:`BIAS_REGULARIZATION`) over ``X_observed``
      and ``X_extra`` (whose users get biases of their own), by 10 rounds of
      alternating exact least squares (:data:`BIAS_N_ROUNDS`: item biases, then user
      biases).
    - ``"knn"``: :class:`sklearn.impute.KNNImputer` with ``n_neighbors`` on the dense
      users x items matrix of ``X_observed`` (missing = NaN; ``X_extra`` is not used);
      items without a visible rating in ``X_observed`` get the ``"item_mean"``
      prediction.  Skipped when users x items exceeds :data:`KNN_MAX_CELLS`
      (``5e7``).

    Parameters
    ----------
    X_observed : scipy.sparse matrix of shape (n_users, n_items)
        Visible ratings of the evaluated users: stored entries are ratings, absent
        entries are missing.  Any sparse format (CSR expected).
    X_heldout : scipy.sparse matrix of shape (n_users, n_items)
        Hidden ratings of the same users, scored; no entry may also be stored in
        ``X_observed``.
    X_extra : scipy.sparse matrix of shape (n_other_users, n_items), default=None
        Ratings of other users (e.g. the training users), used by ``"global_mean"``,
        ``"item_mean"`` and ``"user_item_bias"`` to estimate the global mean and the
        item statistics.  Never scored.
    rating_range : tuple of (float, float), default=(1, 5)
        Lowest and highest possible rating; every stored rating must lie in it, and
        predictions are clipped to it.
    methods : sequence of str, default=("global_mean", "item_mean", "user_item_bias", \
"knn")
        Baselines to run, a subset of :data:`METHODS`; the result keeps this order.
    n_neighbors : int, default=20
        Number of neighbouring users of ``"knn"``.
    random_state : int, RandomState instance or None, default=0
        Seeds the internal split that estimates ``sigma``.

    Returns
    -------
    results : dict of str to dict
        For each method, ``{"rmse", "test_ll", "sigma", "time_s", "n_heldout"}``:

        - ``rmse``: root mean squared error over the held-out ratings.
        - ``test_ll``: mean over the held-out ratings of the Gaussian log density
          ``log N(r; prediction, sigma^2)``, in rating units (nats per rating).
        - ``sigma``: estimated without touching the held-out ratings: the method is
          refitted with 10% (:data:`SIGMA_VALIDATION_FRACTION`) of each evaluated
          user's ratings, drawn at random, removed from ``X_observed`` (user ``u``
          with ``n_u`` observed ratings loses ``floor(0.1 * n_u + U)`` of them,
          ``U`` uniform on [0, 1), but keeps at least one), and ``sigma`` is the
          RMSE of its (clipped) predictions of those removed ratings, floored at
          :data:`SIGMA_FLOOR`.
        - ``time_s``: wall-clock seconds to fit on all visible ratings and predict
          the held-out ones (the refit for ``sigma`` is not included).
        - ``n_heldout``: number of held-out ratings scored.

        A skipped method maps to ``{"skipped": reason}``.

    Raises
    ------
    ValueError
        If an input is not a scipy.sparse matrix, the shapes disagree, an entry is
        stored in both ``X_observed`` and ``X_heldout``, a rating is non-finite,
        duplicated or outside ``rating_range``, there are no observed or no held-out
        ratings, no observed rating can be set aside to estimate ``sigma``, or a
        parameter is invalid.

    See Also
    --------
    sklearn.impute.KNNImputer : The imputer behind ``"knn"``.

    References
    ----------
    Y. Koren, "Factorization meets the neighborhood: a multifaceted collaborative
    filtering model", KDD 2008, section 2.1.

    Examples
    --------
    >>> import numpy as np
    >>> import scipy.sparse as sp
    >>> rng = np.random.default_rng(0)
    >>> R = rng.integers(1, 6, size=(50, 20)).astype(float)
    >>> visible = rng.random(R.shape) < 0.8
    >>> X_observed = sp.csr_array(np.where(visible, R, 0))
    >>> X_heldout = sp.csr_array(np.where(visible, 0, R))
    >>> res = rating_baselines(X_observed, X_heldout, methods=("global_mean", "item_mean"))
    >>> sorted(res["global_mean"])
    ['n_heldout', 'rmse', 'sigma', 'test_ll', 'time_s']
    >>> res["item_mean"]["n_heldout"] == X_heldout.nnz
    True
    """
    rating_range, methods, n_neighbors = _check_params(rating_range, methods, n_neighbors)
    visible, shape = _check_ratings(X_observed, "X_observed", rating_range)
    heldout, heldout_shape = _check_ratings(X_heldout, "X_heldout", rating_range)
    if heldout_shape != shape:
        raise ValueError(
            f"X_observed and X_heldout must have the same shape (the same users x items); "
            f"got {shape} and {heldout_shape}."
        )
    if X_extra is None:
        extra = _Ratings(*(np.empty(0, dtype=t) for t in (np.intp, np.intp, np.float64)))
    else:
        extra, extra_shape = _check_ratings(X_extra, "X_extra", rating_range)
        if extra_shape[1] != shape[1]:
            raise ValueError(
                f"X_extra must have the same number of columns (items) as X_observed; "
                f"got {extra_shape[1]} and {shape[1]}."
            )
    if visible.vals.size == 0:
        raise ValueError("X_observed stores no rating; the baselines need visible ratings.")
    if heldout.vals.size == 0:
        raise ValueError("X_heldout stores no rating; there is nothing to score.")
    n_items = shape[1]
    overlap = np.intersect1d(
        visible.rows * n_items + visible.cols, heldout.rows * n_items + heldout.cols
    )
    if overlap.size:
        r, c = divmod(int(overlap[0]), n_items)
        raise ValueError(
            f"X_observed and X_heldout must store disjoint entries, but {overlap.size} "
            f"(user, item) pair(s) are in both, e.g. ({r}, {c}). A held-out rating must be "
            "hidden from the model."
        )

    rng = _check_random_state(random_state)
    train_mask, val_mask = _split_per_user(visible, shape[0], SIGMA_VALIDATION_FRACTION, rng)
    if not val_mask.any():
        raise ValueError(
            "No observed rating was set aside to estimate sigma: the evaluated users have "
            f"too few observed ratings (a user with n_u of them gives about "
            f"{SIGMA_VALIDATION_FRACTION} * n_u, and none when n_u < 2). Give the evaluated "
            "users more observed ratings, or try another random_state."
        )
    train, val = _subset(visible, train_mask), _subset(visible, val_mask)

    results = {}
    for method in methods:
        if method == "knn" and shape[0] * shape[1] > KNN_MAX_CELLS:
            results[method] = {
                "skipped": (
                    f"users x items = {shape[0]} x {shape[1]} = {shape[0] * shape[1]} cells "
                    f"exceeds KNN_MAX_CELLS = {KNN_MAX_CELLS} (knn densifies the matrix)"
                )
            }
            continue
        start = time.perf_counter()
        pred = _fit_predict(method, visible, extra, shape, heldout.rows, heldout.cols,
                            n_neighbors)
        pred = np.clip(pred, *rating_range)
        time_s = time.perf_counter() - start
        val_pred = np.clip(
            _fit_predict(method, train, extra, shape, val.rows, val.cols, n_neighbors),
            *rating_range,
        )
        sigma = max(float(np.sqrt(np.mean((val.vals - val_pred) ** 2))), SIGMA_FLOOR)
        sq_err = (heldout.vals - pred) ** 2
        test_ll = float(np.mean(-0.5 * np.log(2 * np.pi * sigma**2) - sq_err / (2 * sigma**2)))
        results[method] = {
            "rmse": float(np.sqrt(np.mean(sq_err))),
            "test_ll": test_ll,
            "sigma": sigma,
            "time_s": time_s,
            "n_heldout": int(heldout.vals.size),
        }
    return results
