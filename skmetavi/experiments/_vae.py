"""VAEs on digit tasks (Sec. 4.3): Tables 6 (Meta-D) and 7 (Meta-D&phi).

Every digit class is a task: digits 0-4 meta-train, digits 5-9 are the test
tasks.  Meta-training uses :class:`skmetavi.MetaVAE`; meta-test trains a VAE
on every test digit at once (the batched engine, one leading task dimension)
and reports the IWAE estimate of the test marginal log-likelihood per digit.

- ``quick``: scikit-learn's bundled 8x8 digits (binarised at 0.5), no data files.
- ``paper``: MNIST from ``data_home`` (binarised at 0.5; the four idx files in
  ``$SKMETAVI_DATA/mnist`` or ``../shared/data/mnist``), 784 pixels, fewer
  epochs than the paper to fit 2 CPU cores (doc/reproducing.md).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import time
from pathlib import Path

import numpy as np

from skmetavi.datasets import fetch_mnist_tasks, load_digits_tasks
from skmetavi.divergences import KL, NeuralF, Renyi
from skmetavi.estimators import MetaVAE
from skmetavi.experiments._report import Row, progress

TEST_DIGITS = (5, 6, 7, 8, 9)
TRAIN_DIGITS = (0, 1, 2, 3, 4)

BUDGETS = {
    "quick": dict(
        data="digits", n_components=8, hidden=(64,), meta_iter=300, alg2_iter=300,
        t6_points=120, t6_epochs=300, t7_points=30, t7_epochs=200, t7_subsets=8,
        n_test_rows=None, n_score=1000, n_particles=5,
    ),
    "paper": dict(
        data="mnist", n_components=20, hidden=(200,), meta_iter=300, alg2_iter=150,
        t6_points=6000, t6_epochs=80, t7_points=100, t7_epochs=200, t7_subsets=20,
        n_test_rows=200, n_score=5000, n_particles=5,
    ),
    "smoke": dict(
        data="digits", n_components=2, hidden=(8,), meta_iter=3, alg2_iter=2,
        t6_points=40, t6_epochs=2, t7_points=10, t7_epochs=2, t7_subsets=2,
        n_test_rows=20, n_score=20, n_particles=3,
    ),
}

#: Settings shared by every run (doc/reproducing.md).
TRAIN = dict(batch_size=100, inner_optimizer="adam", inner_lr=1e-3, meta_lr=0.01,
             activation="tanh")
#: Algorithm 2: B inner steps from the learned initialisation (a fresh Adam hides the
#: divergence from the first step's meta-gradient only).
ALG2 = dict(n_inner_steps=5, init_lr=1e-3, n_tasks_per_batch=8)
NEURAL_F = dict(hidden_layer_sizes=(16,), init_alpha=1.0)
DEVICE = os.environ.get("SKMETAVI_DEVICE", "cpu")

PAPER6 = {
    "VI": (-133.69, -121.80, -92.25, -145.14, -119.64),
    "VI (α=0.5)": (None,) * 5,
    "meta-α": (-132.74, -120.67, -90.62, None, None),
    "meta-f": (None, None, None, -144.85, -119.42),
}
PAPER7 = {
    "VI&φ": (-174.32, -176.17, -123.20, -177.96, -147.25),
    "meta-α&φ": (None, None, -115.52, None, None),
    "meta-f&φ": (-160.16, -154.16, -122.61, -165.83, -138.90),
}


def _data_home():
    env = os.environ.get("SKMETAVI_DATA")
    if env:
        return str(Path(env) / "mnist")
    return str(Path(__file__).resolve().parents[2].parent / "shared" / "data" / "mnist")


def load_tasks(budget, seed):
    """``(X_train, g_train, X_test, g_test)``: rows of every digit to train and to score."""
    if budget["data"] == "digits":
        X, g = load_digits_tasks()
        rng = np.random.RandomState(seed)
        train, test = [], []
        for d in range(10):
            rows = rng.permutation(np.flatnonzero(g == d))
            n_fit = len(rows) * 2 // 3
            train.append(rows[:n_fit])
            test.append(rows[n_fit:])
        tr, te = np.concatenate(train), np.concatenate(test)
        return X[tr], g[tr], X[te], g[te]
    home = _data_home()
    Xtr, gtr = fetch_mnist_tasks(home, subset="train")
    Xte, gte = fetch_mnist_tasks(home, subset="test")
    return Xtr, gtr, Xte, gte


def _estimator(budget, seed, divergence, **kwargs):
    return MetaVAE(
        budget["n_components"], hidden_layer_sizes=budget["hidden"], divergence=divergence,
        n_particles=budget["n_particles"], n_score_samples=budget["n_score"], device=DEVICE,
        random_state=seed, **TRAIN, **kwargs,
    )


def _divergence(kind):
    return {"VI": KL(), "VI (α=0.5)": Renyi(0.5, learnable=False), "meta-α": Renyi(1.0),
            "meta-f": NeuralF(**NEURAL_F)}[kind]


def _test_rows(X, g, digit, n, rng):
    rows = np.flatnonzero(g == digit)
    if n is not None and len(rows) > n:
        rows = np.sort(rng.choice(rows, n, replace=False))
    return X[rows]


def _test_tasks(Xtr, gtr, Xte, gte, n_points, budget, seed):
    """Each test digit's ``n_points`` training images and its test images."""
    rng = np.random.RandomState(seed)
    fit_sets, test_sets = [], []
    for d in TEST_DIGITS:
        rows = np.flatnonzero(gtr == d)
        pick = rng.choice(rows, min(n_points, len(rows)), replace=False)
        fit_sets.append(Xtr[np.sort(pick)])
        test_sets.append(_test_rows(Xte, gte, d, budget["n_test_rows"], rng))
    return fit_sets, test_sets


def evaluate(est, fit_sets, test_sets, seed):
    """Fit a VAE on every test digit at once; return per-digit test LL and the fitted copies."""
    copies = est._adapted_copies([(Xf, None) for Xf in fit_sets],
                                 random_states=[seed * 1000 + m for m in range(len(fit_sets))])
    ll = np.array([c.score(Xt) for c, Xt in zip(copies, test_sets)])
    return ll, copies


def _meta_train(est, X, g):
    t0 = time.perf_counter()
    est.meta_fit(X, groups=g)
    return est, time.perf_counter() - t0


def _alpha(est):
    div = getattr(est, "meta_divergence_", None)
    return getattr(div, "alpha", None)


def table6(budget, seed):
    """Meta-D: VI, VI(alpha=0.5), meta-alpha, meta-f; test LL per digit 5-9."""
    Xtr, gtr, Xte, gte = load_tasks(budget, seed)
    fit_sets, test_sets = _test_tasks(Xtr, gtr, Xte, gte, budget["t6_points"], budget, seed)
    meta = np.isin(gtr, TRAIN_DIGITS)
    results, info = {}, {}
    for name in PAPER6:
        progress(f"{name} (seed {seed})")
        est = _estimator(budget, seed, _divergence(name), max_iter=budget["t6_epochs"],
                         max_meta_iter=budget["meta_iter"])
        if name.startswith("meta"):
            est, secs = _meta_train(est, Xtr[meta], gtr[meta])
            info[name] = {"seconds": secs, "alpha": _alpha(est)}
        t0 = time.perf_counter()
        ll, copies = evaluate(est, fit_sets, test_sets, seed)
        results[name] = {"ll": ll, "samples": copies[0].sample(16, random_state=seed)}
        info.setdefault(name, {})["fit_seconds"] = time.perf_counter() - t0
    rows = _rows(results, PAPER6)
    for name in ("meta-α",):
        rows.append(Row(name, "learned alpha", float(info[name]["alpha"])))
    for name, i in info.items():
        for key in ("seconds", "fit_seconds"):
            if key in i:
                rows.append(Row(name, "meta-train seconds" if key == "seconds"
                                else "meta-test seconds", float(i[key])))
    return rows, ("Table 6 (Meta-D)", results, fit_sets[0].shape[1])


def _alg2_tasks(X, g, budget, seed):
    """Training tasks of Algorithm 2: random subsets of each training digit (support + query)."""
    rng = np.random.RandomState(seed + 1)
    n = 2 * budget["t7_points"]
    Xs, gs = [], []
    for d in TRAIN_DIGITS:
        rows = np.flatnonzero(g == d)
        for s in range(budget["t7_subsets"]):
            pick = rng.choice(rows, min(n, len(rows)), replace=False)
            Xs.append(X[pick])
            gs.append(np.full(len(pick), d * 1000 + s))
    return np.concatenate(Xs), np.concatenate(gs)


def table7(budget, seed):
    """Meta-D&phi: VI&phi, meta-alpha&phi, meta-f&phi; test LL per digit 5-9."""
    Xtr, gtr, Xte, gte = load_tasks(budget, seed)
    fit_sets, test_sets = _test_tasks(Xtr, gtr, Xte, gte, budget["t7_points"], budget, seed)
    Xa, ga = _alg2_tasks(Xtr, gtr, budget, seed)
    results, info = {}, {}
    base = {"VI&φ": KL(), "meta-α&φ": Renyi(1.0), "meta-f&φ": NeuralF(**NEURAL_F)}
    for name, div in base.items():
        progress(f"{name} (seed {seed})")
        est = _estimator(budget, seed, div, meta_learn_init=True, max_meta_iter=budget["alg2_iter"],
                         max_iter=budget["t7_epochs"], **ALG2)
        est, secs = _meta_train(est, Xa, ga)
        info[name] = {"seconds": secs, "alpha": _alpha(est)}
        t0 = time.perf_counter()
        ll, copies = evaluate(est, fit_sets, test_sets, seed)
        results[name] = {"ll": ll, "samples": copies[0].sample(16, random_state=seed)}
        info[name]["fit_seconds"] = time.perf_counter() - t0
    # Reference: VI from a random initialisation on the same 100 points.
    est = _estimator(budget, seed, KL(), max_iter=budget["t7_epochs"])
    ll, copies = evaluate(est, fit_sets, test_sets, seed)
    results["VI"] = {"ll": ll, "samples": copies[0].sample(16, random_state=seed)}
    rows = _rows(results, {**PAPER7, "VI": (None,) * 5})
    rows.append(Row("meta-α&φ", "learned alpha", float(info["meta-α&φ"]["alpha"])))
    for name, i in info.items():
        rows.append(Row(name, "meta-train seconds", float(i["seconds"])))
        rows.append(Row(name, "meta-test seconds", float(i["fit_seconds"])))
    return rows, ("Table 7 (Meta-D&φ)", results, fit_sets[0].shape[1])


def _rows(results, paper):
    rows = []
    for name, res in results.items():
        ref = paper.get(name, (None,) * 5)
        for d, v, p in zip(TEST_DIGITS, res["ll"], ref):
            rows.append(Row(name, f"test LL digit {d}", float(v), None, p))
        rows.append(Row(name, "test LL mean 5-9", float(np.mean(res["ll"]))))
    return rows


def plot_figure(figure, path):
    """Samples of each method's VAE on digit 5 and the per-digit test LL bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, results, n_features = figure
    side = int(round(np.sqrt(n_features)))
    names = list(results)
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(3 * (len(names) + 1), 3.2))
    for ax, name in zip(axes[:-1], names):
        s = results[name]["samples"][:16].reshape(-1, side, side)
        grid = np.block([[s[4 * i + j] for j in range(4)] for i in range(4)])
        ax.imshow(grid, cmap="gray_r", interpolation="nearest")
        ax.set_title(f"{name}: samples (digit 5)", fontsize=8)
        ax.axis("off")
    ax = axes[-1]
    width = 0.8 / len(names)
    x = np.arange(len(TEST_DIGITS))
    lls = np.array([results[n]["ll"] for n in names])
    for i, name in enumerate(names):
        ax.bar(x + i * width, lls[i] - lls.min() + 1.0, width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, [str(d) for d in TEST_DIGITS])
    ax.set_xlabel("test digit")
    ax.set_ylabel(f"test LL - {lls.min() - 1.0:.1f} (nats)")
    ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config(budget_name):
    """Hyper-parameters of the VAE reproductions, for NAME.config.json."""
    return {"budget": BUDGETS[budget_name], "train": TRAIN, "alg2": ALG2, "neural_f": NEURAL_F,
            "train_digits": TRAIN_DIGITS, "test_digits": TEST_DIGITS, "device": DEVICE,
            "binarisation": "threshold 0.5", "metric": "IWAE estimate of log p(x), nats"}


__all__ = ["table6", "table7", "plot_figure", "BUDGETS", "config", "load_tasks"]
