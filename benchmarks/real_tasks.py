"""Meta-learned VI on a real task family: scikit-learn's diabetes data, tasks = age quintile x sex.

Usage::

    python benchmarks/real_tasks.py [--json OUT.json] [--max-meta-iter 400] [--seed 0]

The data ships with scikit-learn (442 patients, 10 standardised features, a
disease-progression score).  Each task is one (age quintile, sex) cell: 10 tasks of
32-60 patients.  Protocol, as a new user would run it: ``GroupKFold(5)`` over the
tasks; on each fold every method is trained on the 8 training tasks (or not at all)
and, on each of the 2 held-out tasks, adapted to a random 50 % of its rows (the
support set) and scored on the other 50 % (the query set).  Reported per method:
mean over held-out tasks of the mean test log density per query row (original
units), 90 % interval coverage and RMSE, each with its standard error over tasks.

Methods:

* ``BayesianRidge`` / ``GaussianProcessRegressor`` fitted on the task's support rows;
* ``pooled BayesianRidge``: fitted on all training tasks' rows (the population model,
  it never sees the new task);
* ``KL-VI``: :class:`~skmetavi.MetaBNNRegressor` with its defaults fitted on the support
  rows (no meta-learning);
* ``meta-alpha`` / ``local meta-alpha`` (Algorithm 1, the learned divergence only,
  ``fit`` from scratch); ``VI&phi``, ``meta-alpha&phi``, ``local meta-alpha&phi``
  (Algorithm 2, learned initialisation, defaults: SGD, pooled target scaling, 5 steps).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import json
import time
import warnings

import numpy as np
from scipy import stats
from sklearn.datasets import load_diabetes
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, ConstantKernel, WhiteKernel
from sklearn.linear_model import BayesianRidge
from sklearn.model_selection import GroupKFold

from skmetavi import KL, LocalRenyi, MetaBNNRegressor, Renyi
from skmetavi.metrics import interval_coverage
from skmetavi.model_selection import support_query_split


def diabetes_tasks():
    """X (442, 10), y (442,), groups: 10 tasks = age quintile (0-4) x sex (0/1)."""
    X, y = load_diabetes(return_X_y=True)
    age, sex = X[:, 0], X[:, 1]
    quintile = np.searchsorted(np.quantile(age, [0.2, 0.4, 0.6, 0.8]), age, side="right")
    groups = 2 * quintile + (sex > 0).astype(int)
    return X, y, groups


def _gaussian_scores(y, mean, std):
    return (float(np.mean(stats.norm.logpdf(y, mean, std))), interval_coverage(y, mean, std, 0.9),
            float(np.sqrt(np.mean((y - mean) ** 2))))


class _PerTask:
    """A scikit-learn regressor with ``return_std``, fitted on each task's support rows."""

    def __init__(self, make):
        self.make = make

    def train(self, X, y, g):
        return self

    def scores(self, Xs, ys, Xq, yq):
        mean, std = self.make().fit(Xs, ys).predict(Xq, return_std=True)
        return _gaussian_scores(yq, mean, std)


class _Pooled:
    def __init__(self, make):
        self.make = make

    def train(self, X, y, g):
        self.model = self.make().fit(X, y)
        return self

    def scores(self, Xs, ys, Xq, yq):
        mean, std = self.model.predict(Xq, return_std=True)
        return _gaussian_scores(yq, mean, std)


class _Skmetavi:
    def __init__(self, make, meta=True):
        self.make, self.meta = make, meta

    def train(self, X, y, g):
        self.est = self.make()
        if self.meta:
            self.est.meta_fit(X, y, groups=g)
        return self

    def scores(self, Xs, ys, Xq, yq):
        est = self.est.fit(Xs, ys)
        mean, std = est.predict(Xq, return_std=True)
        return (float(np.mean(est.log_predictive_density(Xq, yq))),
                interval_coverage(yq, mean, std, 0.9), float(np.sqrt(np.mean((yq - mean) ** 2))))


def methods(max_meta_iter, seed, validation_fraction=None):
    def gpr():
        kernel = ConstantKernel() * RBF(np.ones(10)) + WhiteKernel()
        return GaussianProcessRegressor(kernel, normalize_y=True, random_state=seed)

    common = dict(random_state=seed, max_meta_iter=max_meta_iter)
    if validation_fraction:
        common.update(validation_fraction=validation_fraction, validation_interval=20)
    alg2 = dict(meta_learn_init=True, n_inner_steps=5, **common)

    def bnn(div, **kw):
        return lambda: MetaBNNRegressor(div, **kw)

    return {
        "BayesianRidge": _PerTask(BayesianRidge),
        "GaussianProcessRegressor": _PerTask(gpr),
        "pooled BayesianRidge": _Pooled(BayesianRidge),
        "KL-VI": _Skmetavi(bnn(KL(), random_state=seed), meta=False),
        "meta-alpha": _Skmetavi(bnn(Renyi(1.0), batch_size=None, **common)),
        "local meta-alpha": _Skmetavi(bnn(LocalRenyi(1.0), **common)),
        "VI&phi": _Skmetavi(bnn(KL(), **alg2)),
        "meta-alpha&phi": _Skmetavi(bnn(Renyi(1.0), **alg2)),
        "local meta-alpha&phi": _Skmetavi(bnn(LocalRenyi(1.0), **alg2)),
    }


def run(max_meta_iter=400, seed=0, only=None, validation_fraction=None):
    X, y, g = diabetes_tasks()
    results, seconds, learned = {}, {}, {}
    for fold, (train, test) in enumerate(GroupKFold(5).split(X, y, g)):
        Xs, Xq, ys, yq, gs, gq = support_query_split(X[test], y[test], g[test], support_size=0.5,
                                                     random_state=seed + fold)
        for name, method in methods(max_meta_iter, seed, validation_fraction).items():
            if only and name not in only:
                continue
            t0 = time.perf_counter()
            method.train(X[train], y[train], g[train])
            for task in np.unique(g[test]):
                s, q = gs == task, gq == task
                results.setdefault(name, []).append(method.scores(Xs[s], ys[s], Xq[q], yq[q]))
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - t0
            est = getattr(method, "est", None)
            alpha = getattr(getattr(est, "meta_divergence_", None), "alpha", None)
            if hasattr(getattr(est, "divergence", None), "alpha"):
                learned.setdefault(name, []).append(None if alpha is None else round(alpha, 3))
            if getattr(est, "validation_choice_", None) is not None:
                learned.setdefault(name + " kept", []).append(
                    f"{est.validation_choice_}@{est.best_meta_iter_}")
    table = {}
    for name, rows in results.items():
        rows = np.array(rows)
        se = rows.std(0, ddof=1) / np.sqrt(len(rows))
        table[name] = {"test LL": [rows[:, 0].mean(), se[0]],
                       "coverage 90": [rows[:, 1].mean(), se[1]],
                       "RMSE": [rows[:, 2].mean(), se[2]], "seconds": seconds[name],
                       "per-task LL": rows[:, 0].round(3).tolist()}
        if name in learned:
            table[name]["learned alpha per fold"] = learned[name]
        if name + " kept" in learned:
            table[name]["kept by meta-validation"] = learned[name + " kept"]
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json")
    parser.add_argument("--max-meta-iter", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*")
    parser.add_argument("--validation-fraction", type=float, default=None,
                        help="meta-validation: hold out this fraction of the training tasks")
    args = parser.parse_args(argv)
    with open("/proc/loadavg") as f:
        load = f.read().split()[0]
    warnings.simplefilter("ignore", category=UserWarning)  # GPR's kernel-bound notes
    table = run(args.max_meta_iter, args.seed, args.only, args.validation_fraction)
    print(f"1-minute load at start: {load}")
    print(f"{'method':24s} {'test LL':>16s} {'cov90':>12s} {'RMSE':>14s} {'s':>6s}")
    for name, r in table.items():
        print(f"{name:24s} {r['test LL'][0]:8.3f} ± {r['test LL'][1]:.3f} "
              f"{r['coverage 90'][0]:5.2f} ± {r['coverage 90'][1]:.2f} "
              f"{r['RMSE'][0]:6.1f} ± {r['RMSE'][1]:.1f} {r['seconds']:6.0f}  "
              f"{r.get('learned alpha per fold', '')} {r.get('kept by meta-validation', '')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load": load, "max_meta_iter": args.max_meta_iter, "seed": args.seed,
                       "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
