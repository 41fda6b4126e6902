"""Mixture-of-Gaussians experiments of Sec. 4.1: Tables 1-3 and Fig. 1 of Zhang et al. (2021).

Hyper-parameters the paper leaves to its unavailable appendix are chosen here
and written to ``NAME.config.json`` next to the results; ``doc/reproducing.md``
justifies them.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import time

import numpy as np
import torch
from joblib import Parallel, delayed
from scipy.stats import rankdata

from skmetavi.datasets import make_mog_tasks
from skmetavi.divergences import KL, NeuralF, Renyi
from skmetavi.estimators import MetaDivergenceVI
from skmetavi.experiments._bo import bayesian_optimization, import_optuna
from skmetavi.experiments._report import Row, describe_call, progress

LOSSES = {"d_half": "D_0.5", "tv": "TV"}

#: Budgets.  ``quick`` shows the effect in under two minutes on 2 cores;
#: ``paper`` uses the paper's meta-test horizons (2000 iterations for Meta-D,
#: 20 and 100 for Meta-D&phi) and long enough meta-training for alpha to settle.
BUDGETS = {
    "quick": dict(
        n_train=64, n_test=10, n_seeds=2, meta_iter=1000, n_particles=100,
        bo_steps=300, test_steps=1000, alg2_iter=300, alg2_tasks=16,
    ),
    "paper": dict(
        n_train=64, n_test=10, n_seeds=5, meta_iter=5000, n_particles=100,
        bo_steps=2000, test_steps=2000, alg2_iter=2000, alg2_tasks=16,
    ),
    # Seconds-long settings for the test suite only (not offered by the CLI).
    "smoke": dict(
        n_train=4, n_test=3, n_seeds=2, meta_iter=5, n_particles=16,
        bo_steps=5, test_steps=5, alg2_iter=2, alg2_tasks=2,
    ),
}

#: Fixed settings shared by every MoG run (see doc/reproducing.md).
COMMON = dict(
    inner_optimizer="sgd", inner_lr=0.05, init_loc=0.0, init_scale=1.0,
    n_inner_steps=1, dtype="float64",
)
META_LR = {"meta_alpha": 0.03, "meta_f": 0.01}
ALPHA_INIT = 1.0
NEURAL_F = dict(hidden_layer_sizes=(32,), init_alpha=1.0)
BO_RANGE = (0.05, 2.0)
#: BO of alpha: Optuna's GPSampler, ``BO_INIT`` log-uniform points then GP-LogEI.
BO_EVALS, BO_INIT = 16, 2
FIXED_ALPHAS = (0.1, 0.3, 0.5, 1.0, 2.0)
ALG2 = dict(n_inner_steps=20, init_lr=0.05)


def _n_jobs():
    import os

    return max(1, min(2, os.cpu_count() or 1))


def _single_thread(fn, *args, **kwargs):
    torch.set_num_threads(1)
    return fn(*args, **kwargs)


def _parallel(calls):
    """Run ``(fn, args, kwargs)`` triples in worker processes (1 torch thread each).

    A progress line per finished call (``skmetavi reproduce``), in the order of ``calls``.
    """
    n = len(calls)
    if n == 1 or _n_jobs() == 1:
        results = []
        for i, (fn, a, k) in enumerate(calls, start=1):
            progress(f"run {i}/{n}: {describe_call(fn, a)} ...")
            results.append(fn(*a, **k))
        return results
    progress(f"{n} runs on {_n_jobs()} processes: "
             f"{', '.join(describe_call(fn, a) for fn, a, _ in calls)}")
    results = []
    done = Parallel(n_jobs=_n_jobs(), return_as="generator")(
        delayed(_single_thread)(fn, *a, **k) for fn, a, k in calls)
    for i, ((fn, a, _), out) in enumerate(zip(calls, done), start=1):
        progress(f"run {i}/{n} done: {describe_call(fn, a)}")
        results.append(out)
    return results


# ------------------------------------------------------------------ training
def _estimator(loss, budget, seed, **kwargs):
    params = dict(COMMON)
    params.update(
        model="gaussian_mixture", meta_loss=loss, n_particles=budget["n_particles"],
        max_meta_iter=budget["meta_iter"], n_tasks_per_batch=budget["n_train"],
        random_state=seed,
    )
    params.update(kwargs)
    return MetaDivergenceVI(**params)


def train_meta(kind, loss, budget, seed, learn_init=False):
    """Meta-train meta-alpha (``kind="meta_alpha"``), meta-f or VI&phi; return the estimator."""
    X, groups = make_mog_tasks(budget["n_train"], random_state=seed)
    if kind == "meta_alpha":
        div, lr = Renyi(ALPHA_INIT), META_LR["meta_alpha"]
    elif kind == "meta_f":
        div, lr = NeuralF(**NEURAL_F), META_LR["meta_f"]
    else:  # "vi": KL, only the initialisation is learned
        div, lr = KL(), META_LR["meta_alpha"]
    extra = {}
    if learn_init:
        extra = dict(
            meta_learn_init=True, max_meta_iter=budget["alg2_iter"],
            n_tasks_per_batch=budget["alg2_tasks"], **ALG2,
        )
    t0 = time.perf_counter()
    est = _estimator(loss, budget, seed, divergence=div, meta_lr=lr, **extra)
    est.meta_fit(X, groups=groups)
    est.meta_seconds_ = time.perf_counter() - t0
    return est


def _quadrature_range(X):
    """The grid of the meta-losses: every component +- 10 sd, and q0 +- 10."""
    lo = float(np.min(X[:, 1] - 10 * X[:, 2]))
    hi = float(np.max(X[:, 1] + 10 * X[:, 2]))
    return min(lo, COMMON["init_loc"] - 10), max(hi, COMMON["init_loc"] + 10)


def adapt(divergence, X, groups, n_steps, n_particles, seed, trained=None):
    """Fit a fresh q (or one from ``trained``'s learned init) to every task; per-task losses.

    All tasks are adapted in one batched pass of the estimator.  Task ``m`` uses
    the seed ``seed * 1000 + m`` for every method (common random numbers), so
    that rank differences come from the divergences, not from Monte Carlo luck.
    """
    labels = np.unique(groups)
    data = [(X[groups == g], None) for g in labels]
    settings = dict(max_iter=n_steps, n_particles=n_particles, quadrature_range=_quadrature_range(X))
    if trained is None:
        est = MetaDivergenceVI("gaussian_mixture", divergence=divergence, random_state=seed,
                               **COMMON, **settings)
    else:
        est = copy.deepcopy(trained).set_params(**settings)
    copies = est._adapted_copies(data, random_states=[seed * 1000 + m for m in range(len(data))])
    return {loss: np.array([c.meta_loss_value(Xm, meta_loss=loss) for c, (Xm, _) in zip(copies, data)])
            for loss in LOSSES}


def _bo_objective(loss, budget, seed):
    X, groups = make_mog_tasks(budget["n_train"], random_state=seed)

    def objective(alpha):
        losses = adapt(
            Renyi(alpha, learnable=False), X, groups, budget["bo_steps"],
            budget["n_particles"], seed,
        )
        return float(np.mean(losses[loss]))

    return objective


def run_bo(loss, budget, seed):
    """Bayesian optimisation of a fixed alpha (Optuna's GPSampler); the :class:`BOResult`.

    Its ``t`` are seconds from the start of this call (the objective's set-up
    included), so that they compare with meta-alpha's ``meta_seconds_``.
    """
    t0 = time.perf_counter()
    objective = _bo_objective(loss, budget, seed)
    setup = time.perf_counter() - t0
    res = bayesian_optimization(
        objective, BO_RANGE, n_evals=BO_EVALS, n_init=BO_INIT, random_state=seed
    )
    res.t = [setup + t for t in res.t]
    return res


def _best_within(res, seconds):
    """BO's best alpha ``seconds`` after its start (at least its first evaluation)."""
    return res.best_after(max(1, res.n_within(seconds)))


# ------------------------------------------------------------------- table 1
def table1(budget, seed):
    import_optuna()  # before any run: Table 1 without its BO columns would mislead
    seeds = [seed + i for i in range(budget["n_seeds"])]
    calls = []
    for loss in LOSSES:
        for s in seeds:
            calls.append((train_meta, ("meta_alpha", loss, budget, s), {}))
            calls.append((run_bo, (loss, budget, s), {}))
    results = _parallel(calls)
    paper = {
        ("meta-α", "d_half"): 0.52, ("meta-α", "tv"): 0.31,
        ("BO-8", "d_half"): 0.81, ("BO-8", "tv"): 0.69,
        ("BO-16", "d_half"): 0.54, ("BO-16", "tv"): 0.32,
    }
    rows, it = [], iter(results)
    collected = {}
    matched = "BO @ meta-α time"  # the best alpha BO had when meta-alpha finished
    for loss in LOSSES:
        for s in seeds:
            est, bo = next(it), next(it)
            collected.setdefault(("meta-α", loss), []).append(est.meta_divergence_.alpha)
            collected.setdefault(("BO-8", loss), []).append(bo.best_after(8))
            collected.setdefault(("BO-16", loss), []).append(bo.best_after(16))
            collected.setdefault((matched, loss), []).append(
                _best_within(bo, est.meta_seconds_))
            collected.setdefault(("meta-α seconds", loss), []).append(est.meta_seconds_)
            collected.setdefault(("BO-8 seconds", loss), []).append(bo.seconds_after(8))
            collected.setdefault(("BO-16 seconds", loss), []).append(bo.seconds_after(16))
            collected.setdefault((matched + " evaluations", loss), []).append(
                bo.n_within(est.meta_seconds_))
    for method in ("meta-α", "BO-8", "BO-16", matched):
        for loss, label in LOSSES.items():
            rows.append(Row.from_values(
                method, f"learned alpha ({label} meta-loss)", collected[(method, loss)],
                paper.get((method, loss)),
            ))
    for method in ("meta-α", "BO-8", "BO-16"):
        for loss, label in LOSSES.items():
            rows.append(Row.from_values(
                method, f"seconds ({label} meta-loss)", collected[(method + " seconds", loss)]
            ))
    for loss, label in LOSSES.items():
        rows.append(Row.from_values(
            matched, f"BO evaluations done, of {BO_EVALS} ({label} meta-loss)",
            collected[(matched + " evaluations", loss)],
        ))
    return rows, None


# ------------------------------------------------------------------- table 2
def _meta_test_divergences(loss, budget, seed):
    """Train meta-alpha, meta-f and BO for one meta-loss; return name -> divergence."""
    est_a = train_meta("meta_alpha", loss, budget, seed)
    est_f = train_meta("meta_f", loss, budget, seed)
    bo = run_bo(loss, budget, seed)
    divs = {
        "meta-α": est_a.meta_divergence_,
        "meta-f": est_f.meta_divergence_,
        "BO-8": Renyi(bo.best_after(8), learnable=False),
        "BO-16": Renyi(bo.best_after(16), learnable=False),
    }
    for a in FIXED_ALPHAS:
        divs[f"α={a:g}" + (" (KL)" if a == 1.0 else "")] = Renyi(a, learnable=False)
    return divs


def _table2_seed(loss, budget, seed):
    divs = _meta_test_divergences(loss, budget, seed)
    X_test, g_test = make_mog_tasks(budget["n_test"], random_state=10_000 + seed)
    values = {
        name: adapt(div, X_test, g_test, budget["test_steps"], budget["n_particles"], seed)[loss]
        for name, div in divs.items()
    }
    return values, divs


def _ranks(values, methods):
    mat = np.stack([values[m] for m in methods])  # (n_methods, n_tasks)
    ranks = np.apply_along_axis(rankdata, 0, mat)
    return {m: ranks[i].mean() for i, m in enumerate(methods)}


PAPER_METHODS = ("meta-α", "meta-f", "BO-8", "BO-16")


def table2(budget, seed):
    import_optuna()  # before any run: BO-8 / BO-16 are half of the paper's ranking
    seeds = [seed + i for i in range(max(1, budget["n_seeds"] // 2))]
    calls = [(_table2_seed, (loss, budget, s), {}) for loss in LOSSES for s in seeds]
    results = _parallel(calls)
    paper = {
        ("meta-α", "d_half"): 2.10, ("meta-α", "tv"): 2.10,
        ("meta-f", "d_half"): 2.10, ("meta-f", "tv"): 1.00,
        ("BO-8", "d_half"): 3.50, ("BO-8", "tv"): 4.00,
        ("BO-16", "d_half"): 2.30, ("BO-16", "tv"): 2.90,
    }
    rows, figure_divs = [], {}
    it = iter(results)
    per_loss = {}
    for loss in LOSSES:
        per_loss[loss] = [next(it) for _ in seeds]
        figure_divs[loss] = per_loss[loss][0][1]
    for loss, label in LOSSES.items():
        methods = list(per_loss[loss][0][0])
        paper_ranks = [_ranks(v, PAPER_METHODS) for v, _ in per_loss[loss]]
        all_ranks = [_ranks(v, methods) for v, _ in per_loss[loss]]
        for m in PAPER_METHODS:
            rows.append(Row.from_values(
                m, f"rank among 4 ({label})", [r[m] for r in paper_ranks], paper[(m, loss)]
            ))
        for m in methods:
            rows.append(Row.from_values(
                m, f"rank among {len(methods)} ({label})", [r[m] for r in all_ranks]
            ))
        for m in methods:
            rows.append(Row.from_values(
                m, f"test {label}", [v[m].mean() for v, _ in per_loss[loss]]
            ))
    return rows, figure_divs


def plot_figure1(figure_divs, path):
    """Fig. 1: learned h_eta(log t) against the alpha-family lines (offsets aligned at log t = 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = torch.linspace(-6, 2, 200, dtype=torch.float64)
    fig, axes = plt.subplots(1, len(figure_divs), figsize=(5 * len(figure_divs), 4))
    axes = np.atleast_1d(axes)
    for ax, (loss, divs) in zip(axes, figure_divs.items()):
        with torch.no_grad():
            h = divs["meta-f"].evaluate_log_g(u)
            h = h - divs["meta-f"].evaluate_log_g(torch.zeros(1, dtype=torch.float64))
        ax.plot(u.numpy(), h.numpy(), "k", lw=2.5, label="meta-f: learned h(log t)")
        alpha_meta = divs["meta-α"].alpha
        for a, style in ((0.0, ":"), (0.5, "--"), (1.0, "-."), (alpha_meta, "-")):
            lab = f"(1-α) log t, α={a:.2f}" + (" (meta-α)" if a == alpha_meta else "")
            ax.plot(u.numpy(), (1 - a) * u.numpy(), style, label=lab, alpha=0.8)
        ax.set_xlabel("log t")
        ax.set_ylabel("h(log t) - h(0)")
        ax.set_title(f"{LOSSES[loss]} meta-loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------- table 3
def _table3_seed(loss, budget, seed):
    X_test, g_test = make_mog_tasks(budget["n_test"], random_state=10_000 + seed)
    out = {}
    alphas = {}
    for name, kind in (("VI&φ", "vi"), ("meta-α&φ", "meta_alpha"), ("meta-f&φ", "meta_f")):
        est = train_meta(kind, loss, budget, seed, learn_init=True)
        if kind == "meta_alpha":
            alphas[name] = est.meta_divergence_.alpha
        for n_steps in (20, 100):
            out[(name, n_steps)] = adapt(
                est.meta_divergence_, X_test, g_test, n_steps, budget["n_particles"], seed,
                trained=est,
            )[loss]
    # Algorithm 1 reference: KL-VI from the default initialisation.
    for n_steps in (20, 100):
        out[("VI (no φ)", n_steps)] = adapt(
            KL(), X_test, g_test, n_steps, budget["n_particles"], seed
        )[loss]
    return out, alphas


def table3(budget, seed):
    seeds = [seed + i for i in range(max(1, budget["n_seeds"] // 2))]
    calls = [(_table3_seed, (loss, budget, s), {}) for loss in LOSSES for s in seeds]
    results = _parallel(calls)
    paper = {
        ("VI&φ", "d_half", 20): 2.70, ("VI&φ", "tv", 20): 2.70,
        ("VI&φ", "d_half", 100): 2.40, ("VI&φ", "tv", 100): 2.50,
        ("meta-α&φ", "d_half", 20): 2.10, ("meta-α&φ", "tv", 20): 1.80,
        ("meta-α&φ", "d_half", 100): 2.20, ("meta-α&φ", "tv", 100): 1.40,
        ("meta-f&φ", "d_half", 20): 1.20, ("meta-f&φ", "tv", 20): 1.50,
        ("meta-f&φ", "d_half", 100): 1.40, ("meta-f&φ", "tv", 100): 2.10,
    }
    methods = ("VI&φ", "meta-α&φ", "meta-f&φ")
    rows = []
    it = iter(results)
    per_loss = {loss: [next(it) for _ in seeds] for loss in LOSSES}
    for n_steps in (20, 100):
        for loss, label in LOSSES.items():
            ranks = [
                _ranks({m: vals[(m, n_steps)] for m in methods}, methods) for vals, _ in per_loss[loss]
            ]
            for m in methods:
                rows.append(Row.from_values(
                    m, f"rank {label} @{n_steps}", [r[m] for r in ranks], paper[(m, loss, n_steps)]
                ))
    for n_steps in (20, 100):
        for loss, label in LOSSES.items():
            for m in methods + ("VI (no φ)",):
                rows.append(Row.from_values(
                    m, f"test {label} @{n_steps}",
                    [vals[(m, n_steps)].mean() for vals, _ in per_loss[loss]],
                ))
    for loss, label, p in (("d_half", "D_0.5", 0.88), ("tv", "TV", 0.77)):
        rows.append(Row.from_values(
            "meta-α&φ", f"learned alpha ({label})", [a["meta-α&φ"] for _, a in per_loss[loss]], p
        ))
    return rows, None


def _bo_config():
    try:
        version = import_optuna().__version__
    except ImportError:
        version = None
    return {"library": "optuna", "version": version, "sampler": "GPSampler",
            "search": "log alpha", "n_evals": BO_EVALS, "n_startup_trials": BO_INIT}


def config(budget_name):
    """The hyper-parameters of the MoG reproductions, for NAME.config.json."""
    return {
        "budget": BUDGETS[budget_name],
        "common": COMMON,
        "meta_lr": META_LR,
        "alpha_init": ALPHA_INIT,
        "neural_f": NEURAL_F,
        "bo_range": BO_RANGE,
        "bo": _bo_config(),
        "fixed_alphas": FIXED_ALPHAS,
        "alg2": ALG2,
        "meta_loss_quadrature": "2001-point grid over [min(mu - 10 s), max(mu + 10 s)] and q0 +- 10",
        "float": "float64",
    }


__all__ = ["table1", "table2", "table3", "plot_figure1", "BUDGETS", "config"]
