"""
=================================================
Cross-validation over tasks with metadata routing
=================================================

A meta-learned divergence is judged on *new tasks*, not on new rows of the
training tasks. scikit-learn's :class:`~sklearn.model_selection.GroupKFold`
splits whole tasks into folds; :class:`skmetavi.model_selection.TaskAdaptiveRegressor`
adds the meta-test protocol: meta-train on the training tasks of a fold, then
adapt to each held-out task on half of its rows (the *support* set) and score
the other half (the *query* set). With metadata routing enabled, a single
``params={"groups": groups}`` reaches the splitter, ``fit`` and the scorers.
We compare plain KL variational inference with a Bayesian neural network
whose Rényi divergence was meta-learned (Zhang et al. 2021) on the sinusoid
tasks with input-dependent noise, by the test log-likelihood and R^2.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

# %%
# The task family
# ---------------
# Each task is a sinusoid with its own amplitude and phase and heteroskedastic
# noise; ``groups`` gives the task of each row. A new task only offers
# ``N_SAMPLES / 2`` support rows to adapt on.
from skmetavi.datasets import make_sinusoid_tasks

N_TASKS = 12
N_SAMPLES = 40
N_FOLDS = 3
MAX_ITER = 200  # VI epochs on a new task, from scratch
N_META_ITER = 150  # outer iterations of Algorithm 1 (learned alpha)
N_META_ITER_INIT = 200  # outer iterations of Algorithm 2 (learned alpha and init)
N_ADAPT_STEPS = 5  # VI steps on a new task from the learned initialisation

X, y, groups = make_sinusoid_tasks(N_TASKS, N_SAMPLES, random_state=0)
print(f"{N_TASKS} tasks, {X.shape[0]} rows")

# %%
# Five ways to regress a new task
# -------------------------------
# Four are :class:`~skmetavi.MetaBNNRegressor` s with the same network, the
# fifth a non-VI baseline; all are wrapped in a
# :class:`~skmetavi.model_selection.TaskAdaptiveRegressor` with the same
# ``random_state``, so they see the same folds and the same support/query split
# of each held-out task:
#
# - ``"BayesianRidge (splines)"``: scikit-learn's Bayesian linear regression on
#   spline features, fitted to each task on its own (``meta_learn=False``).
# - ``"KL"``: ordinary VI from scratch. ``meta_learn=False``: the training
#   tasks are not used.
# - ``"KL, meta init (defaults)"``: :class:`~skmetavi.MetaBNNRegressor`'s
#   defaults: the KL divergence has nothing to learn, so ``meta_fit`` learns the
#   initialisation of q (``meta_learn_init="auto"``, the paper's VI&phi).
# - ``"Renyi, meta alpha"``: the Rényi order alpha is meta-learned on the
#   training tasks (Algorithm 1, Meta-D); a new task runs VI from scratch with it.
# - ``"Renyi, meta alpha + init"``: alpha and the initialisation of q are
#   meta-learned (Algorithm 2, Meta-D&phi); a new task runs ``N_ADAPT_STEPS``
#   VI steps from the learned initialisation.
from sklearn.linear_model import BayesianRidge
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import SplineTransformer

from skmetavi import MetaBNNRegressor
from skmetavi.model_selection import TaskAdaptiveRegressor

bnn = dict(hidden_layer_sizes=(32,), n_particles=10, n_tasks_per_batch=8, random_state=0)
models = {
    "BayesianRidge (splines)": TaskAdaptiveRegressor(
        make_pipeline(SplineTransformer(n_knots=6), BayesianRidge()),
        meta_learn=False,
        random_state=0,
    ),
    "KL": TaskAdaptiveRegressor(
        MetaBNNRegressor("kl", max_iter=MAX_ITER, **bnn), meta_learn=False, random_state=0
    ),
    "KL, meta init (defaults)": TaskAdaptiveRegressor(
        MetaBNNRegressor(
            n_inner_steps=N_ADAPT_STEPS, max_meta_iter=N_META_ITER_INIT, **bnn
        ),
        random_state=0,
    ),
    "Renyi, meta alpha": TaskAdaptiveRegressor(
        MetaBNNRegressor(
            "renyi", max_iter=MAX_ITER, max_meta_iter=N_META_ITER, meta_lr=0.02, **bnn
        ),
        random_state=0,
    ),
    "Renyi, meta alpha + init": TaskAdaptiveRegressor(
        MetaBNNRegressor(
            "renyi",
            meta_learn_init=True,
            n_inner_steps=N_ADAPT_STEPS,
            max_iter=N_ADAPT_STEPS,
            max_meta_iter=N_META_ITER_INIT,
            **bnn,
        ),
        random_state=0,
    ),
}

# %%
# Cross-validate over tasks
# -------------------------
# The scorers of :func:`skmetavi.metrics.get_scorer` request ``groups`` from
# metadata routing, so that each held-out task is adapted and scored on its
# own. ``"mlpd"`` is the mean log predictive density of the query rows under
# the posterior predictive mixture (the papers' "test LL").
import numpy as np
import sklearn
from sklearn.model_selection import GroupKFold, cross_validate

from skmetavi.metrics import get_scorer

scoring = {"test_ll": get_scorer("mlpd"), "r2": get_scorer("r2")}
results = {}
with sklearn.config_context(enable_metadata_routing=True):
    for name, model in models.items():
        results[name] = cross_validate(
            model,
            X,
            y,
            cv=GroupKFold(n_splits=N_FOLDS),
            params={"groups": groups},
            scoring=scoring,
            return_estimator=True,
            return_indices=True,
        )

# Each fold's estimator was meta-trained on that fold's training tasks only.
for wrapper, train in zip(
    results["Renyi, meta alpha"]["estimator"], results["Renyi, meta alpha"]["indices"]["train"]
):
    assert np.array_equal(wrapper.estimator_.meta_tasks_, np.unique(groups[train]))

print(f"{'':26s} {'test LL':>16s} {'R^2':>16s} {'alpha per fold':>20s}")
# One support/query split per task, drawn at fit and shared by both scorers: each
# held-out task was adapted once per fold.
for name, cv in results.items():
    ll, r2 = cv["test_test_ll"], cv["test_r2"]
    alphas = [
        f"{w.estimator_.meta_divergence_.alpha:.2f}"
        for w in cv["estimator"]
        if hasattr(getattr(w.estimator_, "meta_divergence_", None), "alpha")
    ]
    print(
        f"{name:26s} {ll.mean():8.3f} ± {ll.std():5.3f} {r2.mean():8.3f} ± {r2.std():5.3f} "
        f"{' '.join(alphas) or '-':>20s}"
    )

# %%
# One held-out task
# -----------------
# :meth:`~skmetavi.model_selection.TaskAdaptiveRegressor.adapt` fits a copy of a
# fold's meta-trained estimator to a new task's support rows.
import matplotlib.pyplot as plt

from skmetavi.model_selection import support_query_split

test = results["KL"]["indices"]["test"][0]
task = groups[test] == groups[test][0]
X_s, X_q, y_s, y_q, _, _ = support_query_split(
    X[test][task], y[test][task], groups[test][task], random_state=0
)
x_grid = np.linspace(-4, 4, 200)[:, None]
fig, axes = plt.subplots(
    1, len(results), figsize=(15, 3.5), sharey=True, layout="constrained"
)
for ax, (name, cv) in zip(axes, results.items()):
    adapted = cv["estimator"][0].adapt(X_s, y_s)
    mean, std = adapted.predict(x_grid, return_std=True)
    ax.fill_between(x_grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3)
    ax.plot(x_grid[:, 0], mean)
    ax.plot(X_s[:, 0], y_s, "k.", label="support")
    ax.plot(X_q[:, 0], y_q, "rx", label="query")
    ax.set_title(name)
    ax.set_xlabel("x")
axes[0].legend(loc="lower left")
_ = fig.suptitle("Posterior predictive (mean ± 2 std) on a held-out task")

# %%
# Interpretation
# --------------
# With only ``N_SAMPLES / 2`` rows to adapt on, VI from scratch only partly
# recovers the sinusoid (R^2 well below 1). Meta-learning alpha alone changes
# little here: the learned order moves from its initial 0.5 to about 1, KL's
# order, so the first two rows nearly agree. What the training tasks really
# offer is the shared structure of the family, which Algorithm 2 stores in the
# learned initialisation: a few VI steps from it give a clearly higher test
# log-likelihood and R^2 on tasks never seen during meta-training, with KL
# (the estimator's defaults) as with a learned alpha, and beat the per-task
# Bayesian ridge regression, which cannot borrow strength across tasks. Because each
# fold's meta-training only sees that fold's training tasks, these numbers
# estimate the performance on new tasks without leakage.

if __name__ == "__main__" and "__file__" in globals():  # a script, not sphinx-gallery
    fig.savefig(__file__.replace(".py", ".png"), dpi=100)
