"""Partially observed rating matrices: validation to CSR and the per-row observed/held-out split.

A rating matrix is users x items with some entries observed.  Dense input marks
the missing entries with ``NaN``; ``scipy.sparse`` input stores the observed
entries (an explicitly stored zero is an observed rating of zero) and leaves
the missing ones out.  Internally every matrix is CSR float64 with sorted
indices, so a row's observed entries are ``indices[indptr[n]:indptr[n + 1]]``.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import zlib
from numbers import Real

import numpy as np
import scipy.sparse as sp

from skmetavi._validation import _check_random_state

__all__ = ["as_ratings_csr", "split_ratings", "densify_rows"]


def as_ratings_csr(X, *, name="X"):
    """A CSR float64 copy of a rating matrix (dense with NaN for missing, or sparse).

    Parameters
    ----------
    X : array-like or sparse matrix of shape (n_users, n_items)
        Dense: ``NaN`` marks a missing rating.  Sparse: stored entries are the
        observed ratings (explicit zeros included).
    name : str, default="X"
        The argument's name in error messages.

    Returns
    -------
    csr : scipy.sparse.csr_matrix of float64
        Observed entries only, sorted indices, no duplicates.
    """
    if sp.issparse(X):
        csr = sp.csr_matrix(X, dtype=np.float64, copy=True)
        csr.sum_duplicates()  # also sorts the indices; keeps explicit zeros
        if csr.data.size and not np.all(np.isfinite(csr.data)):
            raise ValueError(
                f"{name} is sparse and stores non-finite values; in sparse input the missing "
                "ratings are the entries that are not stored, so store only observed ratings."
            )
        return csr
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be 2-D (users x items), got shape {X.shape}.")
    if np.isinf(X).any():
        raise ValueError(f"{name} contains infinite values; mark missing ratings with NaN.")
    rows, cols = np.nonzero(~np.isnan(X))
    return sp.csr_matrix((X[rows, cols], (rows, cols)), shape=X.shape)


def _row_seed(seed, indices, values):
    """A seed from ``seed`` and one row's content (its column indices and values)."""
    crc = zlib.crc32(np.ascontiguousarray(indices, dtype=np.int64).tobytes())
    crc = zlib.crc32(np.ascontiguousarray(values, dtype=np.float64).tobytes(), crc)
    return [int(seed), int(crc)]


def _n_heldout(n, fraction):
    if n < 2 or fraction == 0:
        return 0
    return int(min(n - 1, max(1, round(fraction * n))))


def split_ratings(X, heldout_fraction=0.1, random_state=None, *, sparse_output=True):
    """Split every row's observed ratings into observed and held-out parts.

    A row with ``n >= 2`` ratings holds out ``round(heldout_fraction * n)``
    of them, at least one and at most ``n - 1``; a row with one rating keeps
    it.  Which ratings are held out depends only on the seed and on that
    row's own ratings, so a row is split the same way whatever the other rows
    (a subset of users, another order).

    Parameters
    ----------
    X : array-like or sparse matrix of shape (n_users, n_items)
        Ratings (dense with ``NaN`` for missing, or sparse).
    heldout_fraction : float in [0, 1), default=0.1
        Fraction of each row's ratings held out.
    random_state : int, RandomState instance or None, default=None
        Seed of the split.
    sparse_output : bool, default=True
        Return CSR matrices; False: dense float64 arrays with ``NaN`` where an
        entry is not in the part (what ``cross_validate``'s ``y`` accepts).

    Returns
    -------
    X_observed, X_heldout : scipy.sparse.csr_matrix or ndarray of shape (n_users, n_items)
        Disjoint parts whose sum is ``X`` (float64).

    See Also
    --------
    fetch_movielens_tasks : MovieLens ratings, split with this function.
    skmetavi.MetaPartialVAE : Scores held-out ratings given the observed ones.

    Examples
    --------
    >>> import numpy as np
    >>> from skmetavi.datasets import split_ratings
    >>> X = np.array([[5, 3, np.nan, 1], [np.nan, 4, 4, np.nan]])
    >>> obs, held = split_ratings(X, heldout_fraction=0.5, random_state=0)
    >>> obs.getnnz(axis=1), held.getnnz(axis=1)
    (array([1, 1], dtype=int32), array([2, 1], dtype=int32))
    """
    if (isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, Real)
            or not 0 <= heldout_fraction < 1):
        raise ValueError(
            f"heldout_fraction must be a number in [0, 1), got {heldout_fraction!r}; "
            "e.g. 0.1 holds out a tenth of each user's ratings."
        )
    csr = as_ratings_csr(X)
    seed = int(_check_random_state(random_state).randint(0, 2**31 - 1))
    counts = np.diff(csr.indptr)
    held = np.zeros(csr.nnz, dtype=bool)
    for n in np.flatnonzero(counts >= 2):
        lo, hi = csr.indptr[n], csr.indptr[n + 1]
        k = _n_heldout(hi - lo, heldout_fraction)
        if k:
            rng = np.random.default_rng(_row_seed(seed, csr.indices[lo:hi], csr.data[lo:hi]))
            held[lo + rng.choice(hi - lo, size=k, replace=False)] = True
    parts = _mask_entries(csr, ~held), _mask_entries(csr, held)
    return parts if sparse_output else tuple(_to_dense_nan(p) for p in parts)


def _to_dense_nan(csr):
    values, observed = densify_rows(csr)
    return np.where(observed, values, np.nan)


def _mask_entries(csr, keep):
    """The entries of ``csr`` where ``keep`` (per stored entry), as CSR of the same shape."""
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    return sp.csr_matrix((csr.data[keep], (rows[keep], csr.indices[keep])), shape=csr.shape)


def densify_rows(csr, rows=slice(None)):
    """Values (missing as 0) and observation mask of some rows, as dense float64 and bool arrays.

    Parameters
    ----------
    csr : scipy.sparse.csr_matrix
        Ratings.
    rows : slice or array of int, default=all
        The rows.

    Returns
    -------
    values : ndarray of shape (n_rows, n_items)
    observed : ndarray of bool, shape (n_rows, n_items)
    """
    part = csr[rows]
    values = part.toarray()
    observed = np.zeros(part.shape, dtype=bool)
    r = np.repeat(np.arange(part.shape[0]), np.diff(part.indptr))
    observed[r, part.indices] = True
    return values, observed
