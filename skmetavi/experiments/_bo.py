"""Bayesian optimisation of a scalar hyper-parameter (the paper's BO baseline for alpha).

The optimiser is Optuna's ``GPSampler`` (a GP with a Matern-5/2 kernel and
log-expected improvement), an optional dependency: ``pip install "skmetavi[bo]"``.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
from sklearn.utils import check_random_state

#: How to install the optional dependency of the BO baseline.
BO_EXTRA = 'pip install "skmetavi[bo]"'


def import_optuna():
    """Optuna, or an ImportError that names the ``bo`` extra."""
    try:
        import optuna
    except ImportError as exc:
        raise ImportError(
            "Bayesian optimisation of alpha (the BO-8 / BO-16 baseline) needs Optuna, an "
            f"optional dependency of skmetavi; install it with `{BO_EXTRA}`."
        ) from exc
    return optuna


@dataclass
class BOResult:
    """Evaluated points in order, their values, and the time at which each evaluation finished."""

    x: list = field(default_factory=list)
    y: list = field(default_factory=list)
    t: list = field(default_factory=list)

    def best_after(self, n):
        """The argmin among the first ``n`` evaluations."""
        i = int(np.argmin(self.y[:n]))
        return float(self.x[i])

    def seconds_after(self, n):
        """Seconds from the start until the ``n``-th evaluation finished."""
        return float(self.t[n - 1])

    def n_within(self, seconds):
        """How many evaluations had finished ``seconds`` after the start (wall-time matching)."""
        return int(np.searchsorted(self.t, seconds, side="right"))


@contextmanager
def _quiet(optuna):
    """Optuna without its log lines (per-trial INFO, speed hints); restores the verbosity."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(verbosity)


def bayesian_optimization(objective, bounds, *, n_evals=16, n_init=2, random_state=None):
    """Minimise ``objective`` on ``bounds`` (searched in log space) with Optuna's GP sampler.

    The first ``n_init`` points are drawn log-uniformly; every later one
    maximises the GP's log-expected improvement given all evaluations so far.
    Raises an ImportError naming the ``bo`` extra when Optuna is missing.
    """
    optuna = import_optuna()
    seed = int(check_random_state(random_state).randint(np.iinfo(np.int32).max))
    space = {"x": optuna.distributions.FloatDistribution(bounds[0], bounds[1], log=True)}
    res = BOResult()
    with _quiet(optuna):
        with warnings.catch_warnings():
            # GPSampler is marked experimental in Optuna 4.x (stable in 5.x).
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_init)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        t0 = time.perf_counter()
        for _ in range(n_evals):
            trial = study.ask(space)
            x = float(trial.params["x"])
            y = float(objective(x))
            study.tell(trial, y)
            res.x.append(x)
            res.y.append(y)
            res.t.append(time.perf_counter() - t0)
    return res
