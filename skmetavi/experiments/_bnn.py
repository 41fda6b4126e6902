"""BNN regression on heteroskedastic sinusoids (Sec. 4.2): Tables 4 and 5, Fig. 3.

Meta-training uses :class:`skmetavi.MetaBNNRegressor`; meta-test adapts a q to
all test tasks at once with the batched engine (one leading task dimension),
which is what makes the paper's 1000-epoch meta-test affordable on a CPU.
Metrics are in per-task standardised units, as the paper's (RMSE ~ 0.43 with
noise up to A/2 implies standardised targets).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import time

import numpy as np

from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import KL, LocalRenyi, NeuralF, Renyi
from skmetavi.estimators import MetaBNNRegressor
from skmetavi.experiments._mog import _parallel
from skmetavi.experiments._report import Row, progress

BUDGETS = {
    "quick": dict(
        n_train=32, n_test=10, n_seeds=1, t5_seeds=1, meta_iter=400, alg2_iter=600,
        t4_epochs=100, t5_epochs=300, n_test_points=1000,
    ),
    "paper": dict(
        n_train=64, n_test=10, n_seeds=2, t5_seeds=2, meta_iter=3000, alg2_iter=1000,
        t4_epochs=1000, t5_epochs=300, n_test_points=1000,
    ),
    "smoke": dict(
        n_train=3, n_test=2, n_seeds=1, t5_seeds=1, meta_iter=3, alg2_iter=2,
        t4_epochs=2, t5_epochs=2, n_test_points=50,
    ),
}

#: Model and optimisation settings shared by every BNN run (doc/reproducing.md).
MODEL = dict(hidden_layer_sizes=(50,), activation="relu", likelihood="heteroskedastic",
             prior_scale=1.0)
TRAIN = dict(n_particles=10, inner_optimizer="adam", inner_lr=0.01, init_scale=0.01)
#: Algorithm 2 keeps the estimator's defaults: SGD (lr 3e-4) from the learned init, on
#: targets standardised by the meta-training population (doc/results.md, issue 10).
TRAIN_ALG2 = dict(n_particles=10, init_scale=0.01)
T4 = dict(n_train_points=1000, batch_size=100, meta_lr=0.01, n_tasks_per_batch=8)
T5 = dict(n_train_points=40, n_query_points=40, n_inner_steps=5, meta_lr=0.01, init_lr=0.01,
          n_tasks_per_batch=8)
N_PREDICT = 100
#: Seconds between the progress lines of a long meta-training or adaptation.
PROGRESS_SECONDS = 30.0


class _Heartbeat:
    """A ``callbacks`` entry: a progress line at most every ``PROGRESS_SECONDS``.

    A plain callable (no ``on_iteration_end``), so that the tasks of a batched
    adaptation share it (one line for all of them, not one per task); it
    pickles, for the worker processes of :func:`~skmetavi.experiments._mog._parallel`.
    """

    def __init__(self, label, step, total, column):
        self.label, self.step, self.total, self.column = label, step, total, column
        self.last = time.perf_counter()

    def __call__(self, estimator, record):
        now = time.perf_counter()
        if now - self.last >= PROGRESS_SECONDS:
            self.last = now
            progress(f"{self.label}: {self.step} {record['iteration']}/{self.total}, "
                     f"{self.column} {record[self.column]:.4g}")
        return None


def _test_tasks(budget, seed, n_train_points):
    """Test tasks: ``n_train_points`` to adapt on and ``n_test_points`` to evaluate."""
    n = n_train_points + budget["n_test_points"]
    X, y, g = make_sinusoid_tasks(budget["n_test"], n, random_state=20_000 + seed)
    Xs, ys = X.reshape(budget["n_test"], n, 1), y.reshape(budget["n_test"], n)
    return (Xs[:, :n_train_points], ys[:, :n_train_points],
            Xs[:, n_train_points:], ys[:, n_train_points:])


def adapt_and_evaluate(source, Xa, ya, Xb, yb, *, epochs, batch_size, seed, name=None):
    """Fit q on every test task's adaptation rows at once; return per-task LL, RMSE, bands.

    ``source`` is a divergence (fresh q's) or a meta-trained
    :class:`~skmetavi.MetaBNNRegressor` (its divergence and learned init).  All
    tasks are adapted in one batched pass of the estimator; task ``m`` uses the
    seed ``seed * 1000 + m`` for every method (common random numbers).  The
    metrics are in per-task standardised units (the adaptation rows' mean and
    std), whatever scaling the estimator fits in (``normalize_y``: per task,
    or the meta-training population's for a learned initialisation).  ``name``
    labels the progress lines.
    """
    M = Xa.shape[0]
    n_steps = epochs * (1 if batch_size is None else -(-Xa.shape[1] // batch_size))
    label = name or "adaptation"
    progress(f"{label}: adapting {M} test tasks, {epochs} epochs ...")
    t0 = time.perf_counter()
    settings = dict(max_iter=epochs, batch_size=batch_size, n_predict_samples=N_PREDICT,
                    callbacks=[_Heartbeat(label, "adaptation step", n_steps, "loss")])
    if isinstance(source, MetaBNNRegressor):
        est = copy.deepcopy(source).set_params(**settings)
    else:
        est = MetaBNNRegressor(source, **MODEL, **TRAIN, random_state=seed, **settings)
    copies = est._adapted_copies([(Xa[m], ya[m]) for m in range(M)],
                                 random_states=[seed * 1000 + m for m in range(M)])
    sd = ya.std(1)
    ll = np.array([np.mean(c.log_predictive_density(Xb[m], yb[m])) + np.log(sd[m])
                   for m, c in enumerate(copies)])
    rmse = np.array([np.sqrt(np.mean((c.predict(Xb[m]) - yb[m]) ** 2)) / sd[m]
                     for m, c in enumerate(copies)])
    progress(f"{label}: adapted and evaluated in {time.perf_counter() - t0:.0f} s, test LL "
             f"{ll.mean():.3f}")
    return {"ll": ll, "rmse": rmse, "band": copies[0].predict(Xb[0], return_std=True)}


def _meta_train(kind, budget, seed, learn_init, name=None):
    cfg = T5 if learn_init else T4
    if learn_init:
        n_points = cfg["n_train_points"] + cfg["n_query_points"]
        X, y, g = make_sinusoid_tasks(budget["n_train"], n_points, random_state=seed)
        extra = dict(
            meta_learn_init=True, n_inner_steps=cfg["n_inner_steps"], init_lr=cfg["init_lr"],
            max_meta_iter=budget["alg2_iter"], query_fraction=cfg["n_query_points"] / n_points,
        )
    else:
        X, y, g = make_sinusoid_tasks(budget["n_train"], cfg["n_train_points"], random_state=seed)
        extra = dict(batch_size=cfg["batch_size"], max_meta_iter=budget["meta_iter"])
    div = {"meta_alpha": Renyi(1.0), "local_alpha": LocalRenyi(1.0), "meta_f": NeuralF((16,)),
           "vi": KL()}[kind]
    label = f"{name or kind} (seed {seed})"
    progress(f"{label}: meta-training, {extra['max_meta_iter']} outer iterations ...")
    t0 = time.perf_counter()
    est = MetaBNNRegressor(
        div, **MODEL, **(TRAIN_ALG2 if learn_init else TRAIN), meta_lr=cfg["meta_lr"],
        n_tasks_per_batch=cfg["n_tasks_per_batch"], random_state=seed,
        callbacks=[_Heartbeat(label, "outer iteration", extra["max_meta_iter"], "meta_loss")],
        **extra,
    ).meta_fit(X, y, groups=g)
    seconds = time.perf_counter() - t0
    alpha = getattr(est.meta_divergence_, "alpha", None)
    progress(f"{label}: meta-trained in {seconds:.0f} s, meta_loss "
             f"{est.meta_loss_curve_[-1]:.4g}" + ("" if alpha is None else f", alpha {alpha:.3f}"))
    return est.set_params(callbacks=None), seconds


def _table4_seed(budget, seed):
    data = _test_tasks(budget, seed, T4["n_train_points"])
    methods = {"VI": KL(), "VI (α=0.5)": Renyi(0.5, learnable=False)}
    info = {}
    for name, kind in (("meta-α", "meta_alpha"), ("local meta-α", "local_alpha"),
                       ("meta-f", "meta_f")):
        est, secs = _meta_train(kind, budget, seed, learn_init=False, name=name)
        methods[name] = est
        info[name] = {"seconds": secs, "alpha": getattr(est.meta_divergence_, "alpha", None)}
    results = {
        name: adapt_and_evaluate(source, *data, epochs=budget["t4_epochs"],
                                 batch_size=T4["batch_size"], seed=seed, name=name)
        for name, source in methods.items()
    }
    return results, info, data


def table4(budget, seed):
    seeds = [seed + i for i in range(budget["n_seeds"])]
    out = _parallel([(_table4_seed, (budget, s), {}) for s in seeds])
    paper = {"VI": (-0.59, 0.44), "VI (α=0.5)": (-0.57, 0.43), "meta-α": (-0.39, 0.43),
             "local meta-α": (None, None), "meta-f": (-0.40, 0.42)}
    rows = []
    for metric, idx in (("test LL", 0), ("RMSE", 1)):
        key = "ll" if idx == 0 else "rmse"
        for m in paper:
            # mean over test tasks, then the spread over tasks (one seed) or seeds
            vals = np.concatenate([r[m][key] for r, _, _ in out])
            rows.append(Row(m, metric, float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(len(vals))),
                            paper[m][idx]))
    for m in ("meta-α", "local meta-α"):
        rows.append(Row.from_values(m, "learned alpha", [i[m]["alpha"] for _, i, _ in out]))
    for m in ("meta-α", "local meta-α", "meta-f"):
        rows.append(Row.from_values(m, "meta-train seconds", [i[m]["seconds"] for _, i, _ in out]))
    return rows, ("Table 4 (Meta-D, 1000 points)", out[0][0], out[0][2])


def _table5_seed(budget, seed):
    data = _test_tasks(budget, seed, T5["n_train_points"])
    runs = {"VI": KL()}
    info = {}
    for name, kind in (("VI&φ", "vi"), ("meta-α&φ", "meta_alpha"),
                       ("local meta-α&φ", "local_alpha"), ("meta-f&φ", "meta_f")):
        est, secs = _meta_train(kind, budget, seed, learn_init=True, name=name)
        runs[name] = est
        info[name] = {"seconds": secs, "alpha": getattr(est.meta_divergence_, "alpha", None)}
    results = {
        name: adapt_and_evaluate(source, *data, epochs=budget["t5_epochs"], batch_size=None,
                                 seed=seed, name=name)
        for name, source in runs.items()
    }
    # Also at the meta-training horizon (B inner steps), where Algorithm 2 optimised J.
    short = {
        name: adapt_and_evaluate(source, *data, epochs=T5["n_inner_steps"], batch_size=None,
                                 seed=seed, name=f"{name} @{T5['n_inner_steps']} steps")
        for name, source in runs.items()
    }
    info["short"] = short
    return results, info, data


def table5(budget, seed):
    seeds = [seed + i for i in range(budget["t5_seeds"])]
    out = _parallel([(_table5_seed, (budget, s), {}) for s in seeds])
    paper = {"VI": (-3.94, 0.51), "VI&φ": (-0.69, 0.44), "meta-α&φ": (-0.43, 0.42),
             "local meta-α&φ": (None, None), "meta-f&φ": (-0.46, 0.43)}
    rows = []
    for metric, key, idx in (("test LL", "ll", 0), ("RMSE", "rmse", 1)):
        for m in paper:
            vals = np.concatenate([r[m][key] for r, _, _ in out])
            rows.append(Row(m, metric, float(vals.mean()), float(vals.std(ddof=1) / np.sqrt(len(vals))),
                            paper[m][idx]))
    B = T5["n_inner_steps"]
    for m in paper:
        vals = np.concatenate([i["short"][m]["ll"] for _, i, _ in out])
        rows.append(Row(m, f"test LL @{B} steps", float(vals.mean()),
                        float(vals.std(ddof=1) / np.sqrt(len(vals)))))
    for m in ("meta-α&φ", "local meta-α&φ"):
        rows.append(Row.from_values(m, "learned alpha", [i[m]["alpha"] for _, i, _ in out]))
    return rows, ("Table 5 (Meta-D&φ, 40 points)", out[0][0], out[0][2])


def plot_figure3(figure, path):
    """Fig. 3: predictive mean ± 2 std of each method on the first test task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, results, (Xa, ya, Xb, yb) = figure
    order = np.argsort(Xb[0, :, 0])
    x = Xb[0, order, 0]
    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.4))
    pad = 0.25 * (ya[0].max() - ya[0].min())
    ylim = (ya[0].min() - pad, ya[0].max() + pad)  # the data's range, whatever a band does
    for ax, (name, res) in zip(np.atleast_1d(axes), results.items()):
        mean, std = res["band"]
        ax.scatter(Xa[0, :, 0], ya[0], s=4, c="0.6", label="adaptation data")
        ax.plot(x, mean[order], "C0", label="predictive mean")
        ax.fill_between(x, (mean - 2 * std)[order], (mean + 2 * std)[order], color="C0", alpha=0.25,
                        label="± 2 std")
        ax.set_title(f"{name}\nLL {res['ll'][0]:.2f}, RMSE {res['rmse'][0]:.2f}", fontsize=9)
        ax.set_xlabel("x")
        ax.set_ylim(*ylim)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config(budget_name):
    """Hyper-parameters of the BNN reproductions, for NAME.config.json."""
    return {"budget": BUDGETS[budget_name], "model": MODEL, "train": TRAIN,
            "train_alg2": TRAIN_ALG2, "table4": T4, "table5": T5, "n_predict_samples": N_PREDICT,
            "units": "per-task standardised y (adaptation rows' mean and std)"}


__all__ = ["table4", "table5", "plot_figure3", "BUDGETS", "config"]
