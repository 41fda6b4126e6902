"""Bayesian optimisation of a scalar hyper-parameter (the paper's BO baseline for alpha)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import time
import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import norm
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_random_state


@dataclass
class BOResult:
    """Evaluated points in order, and the time at which each evaluation finished."""

    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    t: list = field(default_factory=list)

    def best_after(self, n):
        """The argmin among the first ``n`` evaluations."""
        i = int(np.argmin(self.y[:n]))
        return float(self.x[i])

    def seconds_after(self, n):
        return float(self.t[n - 1])


def expected_improvement(mu, sigma, best):
    """EI for minimisation."""
    sigma = np.maximum(sigma, 1e-12)
    z = (best - mu) / sigma
    return (best - mu) * norm.cdf(z) + sigma * norm.pdf(z)


def bayesian_optimization(objective, bounds, *, n_evals=16, n_init=2, random_state=None):
    """Minimise ``objective`` on ``bounds`` (searched in log space) with a GP and EI.

    A Matern-5/2 GP with a noise term is refitted after each evaluation and the
    next point maximises expected improvement on a 512-point grid.
    """
    rng = check_random_state(random_state)
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    grid = np.linspace(lo, hi, 512)
    res = BOResult()
    t0 = time.perf_counter()
    xs = list(rng.uniform(lo, hi, size=n_init))
    for i in range(n_evals):
        if i < n_init:
            u = xs[i]
        else:
            kernel = ConstantKernel(1.0) * Matern(length_scale=1.0, nu=2.5) + WhiteKernel(1e-4, noise_level_bounds=(1e-10, 1.0))
            gp = GaussianProcessRegressor(kernel, normalize_y=True, random_state=rng)
            with warnings.catch_warnings():
                # Hyper-parameters at their bounds are expected with few, nearly
                # noise-free evaluations; EI stays well defined.
                warnings.simplefilter("ignore", ConvergenceWarning)
                gp.fit(np.log(np.asarray(res.x))[:, None], np.asarray(res.y))
            mu, sd = gp.predict(grid[:, None], return_std=True)
            ei = expected_improvement(mu, sd, np.min(res.y))
            u = grid[int(np.argmax(ei))]
        x = float(np.exp(u))
        res.x.append(x)
        res.y.append(float(objective(x)))
        res.t.append(time.perf_counter() - t0)
    return res
