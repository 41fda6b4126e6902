"""Task-family generators returning numpy arrays with a ``groups`` vector."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
from numbers import Integral, Real

import numpy as np
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from skmetavi._validation import _check_random_state

__all__ = ["make_mog_tasks", "make_sinusoid_tasks"]

_DEFAULT_RANGES = {
    "x_range": (-4.0, 4.0),
    "amplitude_range": (5.0, 10.0),
    "phase_range": (0.0, 1.0),
}


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
        Seed of the draw; None draws fresh OS entropy (numpy's global RNG is
        left untouched, as everywhere in skmetavi).

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
    rng = _check_random_state(random_state)
    mu1 = rng.uniform(0.0, 3.0, size=n_tasks)
    s1 = rng.uniform(0.5, 1.0, size=n_tasks)
    X = np.empty((n_tasks, 2, 3))
    X[:, 0] = np.column_stack([np.full(n_tasks, 0.5), mu1, s1])
    X[:, 1] = np.column_stack([np.full(n_tasks, 0.5), mu1 + 3.0, 2.0 * s1])
    groups = np.repeat(np.arange(n_tasks), 2)
    return X.reshape(-1, 3), groups


@validate_params(
    {
        "n_tasks": [Interval(Integral, 1, None, closed="left")],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "noise": [StrOptions({"heteroskedastic", "homoskedastic", "none"})],
        "x_range": [tuple],
        "amplitude_range": [tuple],
        "phase_range": [tuple],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_sinusoid_tasks(
    n_tasks=10,
    n_samples=100,
    *,
    noise="heteroskedastic",
    x_range=(-4.0, 4.0),
    amplitude_range=(5.0, 10.0),
    phase_range=(0.0, 1.0),
    random_state=None,
):
    """Draw sinusoid regression tasks with input-dependent noise (Sec. 4.2 of Zhang et al. 2021).

    Task ``i`` has amplitude ``A ~ U[amplitude_range]`` and phase
    ``b ~ U[phase_range]``; its rows are ``x ~ U[x_range]`` and

    - ``noise="heteroskedastic"``: ``y = A sin(x + b) + (A/2) |cos((x + b)/2)| eps``
      (the paper's family, generalising Depeweg et al. 2017, Fig. 5);
    - ``noise="homoskedastic"``: ``y = A sin(x + b) + (A/(2 sqrt 2)) eps``, the same
      average noise variance with a constant scale;
    - ``noise="none"``: ``y = A sin(x + b)``,

    with ``eps ~ N(0, 1)``.

    Parameters
    ----------
    n_tasks : int, default=10
        Number of tasks.
    n_samples : int, default=100
        Rows per task.
    noise : {"heteroskedastic", "homoskedastic", "none"}, default="heteroskedastic"
        Noise model.
    x_range : tuple of float, default=(-4.0, 4.0)
        Input interval (Depeweg et al. use [-4, 4]; the paper does not say).
    amplitude_range : tuple of float, default=(5.0, 10.0)
        Interval of A.
    phase_range : tuple of float, default=(0.0, 1.0)
        Interval of b.
    random_state : int, RandomState instance or None, default=None
        Seed; None draws fresh OS entropy (numpy's global RNG is left
        untouched, as everywhere in skmetavi).

    Returns
    -------
    X : ndarray of shape (n_tasks * n_samples, 1)
        Inputs.
    y : ndarray of shape (n_tasks * n_samples,)
        Targets.
    groups : ndarray of shape (n_tasks * n_samples,)
        Task index of each row.

    See Also
    --------
    skmetavi.MetaBNNRegressor : Meta-learns a divergence over these tasks.
    skmetavi.model_selection.support_query_split : Splits each task's rows.

    Examples
    --------
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> X, y, groups = make_sinusoid_tasks(3, 5, random_state=0)
    >>> X.shape, y.shape, groups.tolist()[:6]
    ((15, 1), (15,), [0, 0, 0, 0, 0, 1])
    """
    for name, rng_ in (("x_range", x_range), ("amplitude_range", amplitude_range),
                       ("phase_range", phase_range)):
        if (
            len(rng_) != 2
            or not all(isinstance(v, Real) and math.isfinite(v) for v in rng_)
            or not rng_[0] <= rng_[1]
        ):
            raise ValueError(
                f"{name} must be a tuple (low, high) of finite numbers with low <= high, got "
                f"{rng_!r}; e.g. {name}={_DEFAULT_RANGES[name]!r}."
            )
    rng = _check_random_state(random_state)
    A = rng.uniform(*amplitude_range, size=(n_tasks, 1))
    b = rng.uniform(*phase_range, size=(n_tasks, 1))
    x = rng.uniform(*x_range, size=(n_tasks, n_samples))
    eps = rng.standard_normal(size=(n_tasks, n_samples))
    y = A * np.sin(x + b)
    if noise == "heteroskedastic":
        y = y + 0.5 * A * np.abs(np.cos(0.5 * (x + b))) * eps
    elif noise == "homoskedastic":
        y = y + 0.5 * A / np.sqrt(2.0) * eps
    groups = np.repeat(np.arange(n_tasks), n_samples)
    return x.reshape(-1, 1), y.reshape(-1), groups
