"""Task-family generators returning numpy arrays with a ``groups`` vector."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, validate_params
from numbers import Integral

__all__ = ["make_mog_tasks"]


@validate_params(
    {"n_tasks": [Interval(Integral, 1, None, closed="left")], "random_state": ["random_state"]},
    prefer_skip_nested_validation=True,
)
def make_mog_tasks(n_tasks=100, *, random_state=None):
    """Draw 1-D two-component Gaussian-mixture targets (Sec. 4.1 of Zhang et al. 2021).

    Each task is ``p(z) = 0.5 N(mu1, s1^2) + 0.5 N(mu2, s2^2)`` with
    ``mu1 ~ U[0, 3]``, ``s1 ~ U[0.5, 1]``, ``mu2 = mu1 + 3`` and ``s2 = 2 s1``.

    Parameters
    ----------
    n_tasks : int, default=100
        Number of tasks.
    random_state : int, RandomState instance or None, default=None
        Seed of the draw.

    Returns
    -------
    X : ndarray of shape (2 * n_tasks, 3)
        One row per mixture component: ``(weight, loc, scale)``, the input
        format of ``MetaDivergenceVI(model="gaussian_mixture")``.
    groups : ndarray of shape (2 * n_tasks,)
        Task index of each row.

    See Also
    --------
    skmetavi.models.GaussianMixture1D : The target these rows define.

    Examples
    --------
    >>> from skmetavi.datasets import make_mog_tasks
    >>> X, groups = make_mog_tasks(3, random_state=0)
    >>> X.shape, groups.tolist()
    ((6, 3), [0, 0, 1, 1, 2, 2])
    """
    rng = check_random_state(random_state)
    mu1 = rng.uniform(0.0, 3.0, size=n_tasks)
    s1 = rng.uniform(0.5, 1.0, size=n_tasks)
    X = np.empty((n_tasks, 2, 3))
    X[:, 0] = np.column_stack([np.full(n_tasks, 0.5), mu1, s1])
    X[:, 1] = np.column_stack([np.full(n_tasks, 0.5), mu1 + 3.0, 2.0 * s1])
    groups = np.repeat(np.arange(n_tasks), 2)
    return X.reshape(-1, 3), groups
