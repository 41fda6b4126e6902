"""``skmetavi demo``: meta-learn a divergence and an initialisation, adapt to unseen tasks.

The task family is the paper's heteroskedastic sinusoids (Sec. 4.2), drawn by
:func:`skmetavi.datasets.make_sinusoid_tasks`, so the demo needs no download.
Every method sees the same few support points of each unseen task and is
scored on many query points of that task:

- ``BayesianRidge``: scikit-learn's Bayesian ridge on a spline basis (no VI);
- ``KL-VI``: a Bayesian neural network fitted by KL-VI from a fresh q;
- ``KL-VI + learned init``: KL-VI from an initialisation meta-learned on the
  training tasks (the paper's VI&phi, Algorithm 2 with the divergence fixed);
- ``learned divergence + init``: Rényi-alpha with alpha meta-learned together
  with the initialisation (the paper's meta-alpha&phi).

The two meta-trained rows separate what the learned initialisation brings from
what the learned divergence adds to it.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import norm
from sklearn.linear_model import BayesianRidge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import SplineTransformer
from tqdm.auto import tqdm

from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import make_divergence
from skmetavi.estimators import MetaBNNRegressor
from skmetavi.metrics import interval_coverage

__all__ = ["BUDGETS", "DemoResult", "run_demo", "format_demo"]

#: ``quick`` is the demo (about a minute on 2 cores); ``smoke`` is for the tests.
BUDGETS = {
    "quick": dict(n_train=32, n_test=10, n_support=20, n_query=500, meta_iter=300,
                  hidden=(32,), n_particles=10, kl_iter=200),
    "smoke": dict(n_train=4, n_test=2, n_support=10, n_query=20, meta_iter=3,
                  hidden=(8,), n_particles=4, kl_iter=3),
}
#: The coverage level of the predictive intervals.
LEVEL = 0.9


@dataclass
class MethodResult:
    """Scores of one method on the unseen tasks (means over tasks, and their standard errors)."""

    method: str
    log_density: float
    log_density_se: float
    rmse: float
    rmse_se: float
    coverage: float
    coverage_se: float
    seconds: float
    per_task_log_density: list = field(default_factory=list)


@dataclass
class DemoResult:
    """What :func:`run_demo` measured and where it wrote its files."""

    methods: list
    alpha_start: float
    alpha_learned: float
    seconds: float
    budget: str
    seed: int
    files: dict = field(default_factory=dict)
    #: Fitted objects for the plots (not written to JSON).
    fitted: dict = field(default_factory=dict, repr=False)

    def to_dict(self):
        """JSON-ready content (without the fitted objects)."""
        d = asdict(self)
        d.pop("fitted")
        return d


def _scores(method, means, stds, draws_ll, y_query, seconds):
    """Per-task mean log density, RMSE and coverage -> :class:`MethodResult`."""
    ll = np.array([np.mean(v) for v in draws_ll])
    rmse = np.array([np.sqrt(np.mean((m - y) ** 2)) for m, y in zip(means, y_query)])
    cov = np.array([interval_coverage(y, m, s, LEVEL) for m, s, y in zip(means, stds, y_query)])

    def se(v):
        return float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")

    return MethodResult(method, float(ll.mean()), se(ll), float(rmse.mean()), se(rmse),
                        float(cov.mean()), se(cov), float(seconds), ll.tolist())


def _evaluate_vi(method, estimators, X_query, y_query, seconds):
    means, stds, lls = [], [], []
    for est, Xq, yq in zip(estimators, X_query, y_query):
        m, s = est.predict(Xq, return_std=True)
        means.append(m)
        stds.append(s)
        lls.append(est.log_predictive_density(Xq, yq))
    return _scores(method, means, stds, lls, y_query, seconds)


def run_demo(out="demo", *, budget="quick", seed=0, quiet=False, plots=True):
    """Run the demo: meta-train, adapt to unseen tasks, print and save the comparison.

    Parameters
    ----------
    out : str or path, default="demo"
        Folder of ``demo.json``, ``demo.md`` and the plots.
    budget : {"quick", "smoke"}, default="quick"
        ``"quick"`` is the demo; ``"smoke"`` is a seconds-long run for tests.
    seed : int, default=0
        Seed of the tasks and of every method.
    quiet : bool, default=False
        No progress bars or progress lines.
    plots : bool, default=True
        Save ``demo_predictive.png`` and ``demo_divergence.png``.

    Returns
    -------
    result : DemoResult
        The scores of every method, the learned alpha and the files written.
    """
    if budget not in BUDGETS:
        raise ValueError(f"Unknown budget {budget!r}; valid budgets are {sorted(BUDGETS)}.")
    b = BUDGETS[budget]
    t0 = time.perf_counter()
    verbose = 0 if quiet else 1
    n_points = b["n_support"] + b["n_query"]
    X, y, g = make_sinusoid_tasks(b["n_train"], 2 * b["n_support"], random_state=seed)
    Xt, yt, gt = make_sinusoid_tasks(b["n_test"], n_points, random_state=10_000 + seed)
    support = [(Xt[gt == m][: b["n_support"]], yt[gt == m][: b["n_support"]])
               for m in range(b["n_test"])]
    X_query = [Xt[gt == m][b["n_support"]:] for m in range(b["n_test"])]
    y_query = [yt[gt == m][b["n_support"]:] for m in range(b["n_test"])]
    common = dict(hidden_layer_sizes=b["hidden"], n_particles=b["n_particles"],
                  random_state=seed, verbose=verbose)
    # Algorithm 2 on tasks of 2 * n_support rows: half support, half query, so that the
    # meta-objective is the query fit after 5 inner steps from the learned init.
    meta = dict(meta_learn_init=True, n_inner_steps=5, max_meta_iter=b["meta_iter"],
                query_fraction=0.5)

    def log(msg):
        if not quiet:
            tqdm.write(f"[demo {time.perf_counter() - t0:4.0f} s] {msg}", file=sys.stderr)

    results, fitted = [], {}
    log(f"{b['n_train']} training tasks of {2 * b['n_support']} rows; "
        f"{b['n_test']} unseen tasks: {b['n_support']} support rows to adapt on, "
        f"{b['n_query']} query rows to score")

    t = time.perf_counter()
    means, stds, lls = [], [], []
    for (Xs, ys), Xq, yq in zip(support, X_query, y_query):
        ridge = make_pipeline(SplineTransformer(n_knots=5), BayesianRidge()).fit(Xs, ys)
        m, s = ridge.predict(Xq, return_std=True)
        means.append(m)
        stds.append(s)
        lls.append(norm.logpdf(yq, m, s))
    results.append(_scores("BayesianRidge (splines)", means, stds, lls, y_query,
                           time.perf_counter() - t))

    log("KL-VI from a fresh q on each unseen task")
    t = time.perf_counter()
    kl = MetaBNNRegressor("kl", meta_learn_init=False, max_iter=b["kl_iter"], **common)
    kl_fits = kl._adapted_copies(support)
    results.append(_evaluate_vi("KL-VI", kl_fits, X_query, y_query, time.perf_counter() - t))

    for name, divergence in (("KL-VI + learned init", "kl"),
                             ("learned divergence + init", "renyi")):
        log(f"meta-training {name!r} on the training tasks")
        t = time.perf_counter()
        est = MetaBNNRegressor(divergence, **meta, **common).meta_fit(X, y, groups=g)
        fits = est._adapted_copies(support)
        results.append(_evaluate_vi(name, fits, X_query, y_query, time.perf_counter() - t))
        fitted[name] = (est, fits)
    learned = fitted["learned divergence + init"][0]
    fitted["KL-VI"] = (kl, kl_fits)
    fitted["tasks"] = (support, X_query, y_query)

    result = DemoResult(results, alpha_start=float(make_divergence("renyi").alpha),
                        alpha_learned=float(learned.meta_divergence_.alpha),
                        seconds=0.0, budget=budget, seed=seed, fitted=fitted)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        from skmetavi.experiments._demo_plots import save_demo_plots

        result.files.update(save_demo_plots(result, out))
    result.seconds = time.perf_counter() - t0
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=2))
    (out / "demo.md").write_text(format_demo(result, markdown=True) + "\n")
    result.files.update(json=str(out / "demo.json"), markdown=str(out / "demo.md"))
    return result


def format_demo(result, markdown=False):
    """The comparison table of a :class:`DemoResult` as plain text or Markdown."""
    header = ("method", "test log density", "RMSE", f"{LEVEL:.0%} coverage", "seconds")
    rows = [(r.method, f"{r.log_density:.3f} ± {r.log_density_se:.3f}",
             f"{r.rmse:.3f} ± {r.rmse_se:.3f}", f"{r.coverage:.3f} ± {r.coverage_se:.3f}",
             f"{r.seconds:.1f}") for r in result.methods]
    n_tasks = len(result.methods[0].per_task_log_density)
    note = (f"Means ± standard errors over {n_tasks} unseen tasks (log density: nats per "
            f"query point, higher is better). Learned alpha: {result.alpha_start:.3g} -> "
            f"{result.alpha_learned:.3g}. Total {result.seconds:.0f} s.")
    by = {r.method: r for r in result.methods}
    if {"KL-VI", "KL-VI + learned init", "learned divergence + init"} <= set(by):
        learned = by["learned divergence + init"].log_density
        gain_kl = learned - by["KL-VI"].log_density
        gain_div = learned - by["KL-VI + learned init"].log_density
        se = by["learned divergence + init"].log_density_se
        note += (f" Learned divergence + init vs KL-VI: {gain_kl:+.3f} nats per point; vs "
                 f"KL-VI + learned init: {gain_div:+.3f}, ")
        note += ("so on this family the learned initialisation carries the gain and the "
                 "learned divergence adds little to it." if abs(gain_div) < max(se, 0.02) else
                 "the part of the gain the learned divergence brings."
                 if gain_div > 0 else "the learned divergence costs a little here.")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(["# skmetavi demo", "", *lines, "", note])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines + [note])
