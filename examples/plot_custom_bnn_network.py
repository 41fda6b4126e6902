"""
==============================================
Your own torch network as a Bayesian regressor
==============================================

:class:`~skmetavi.MetaBNNRegressor` builds an MLP from ``hidden_layer_sizes``
by default, but any ``torch.nn.Module`` can take its place through
``network=``: every trainable parameter of the module becomes a Bayesian
weight with a Gaussian prior, and the module's own initial values are the
initial mean of the variational posterior q. Here a small residual network
with a custom ``forward`` is meta-trained on a family of sinusoid tasks
(Algorithm 2 of Zhang et al. 2021: the Rényi order alpha and the
initialisation of q), then adapted to held-out tasks from a few rows each. We
compare it with KL variational inference on the same network without
meta-learning, and with scikit-learn's :class:`~sklearn.linear_model.BayesianRidge`
on polynomial features.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

# %%
# A custom network
# ----------------
# The module maps inputs of shape ``(n, n_features)`` to two outputs per row:
# the predictive mean and the raw noise scale
# (``sigma = softplus(raw) + 1e-3``, the ``"heteroskedastic"`` likelihood).
# Its forward pass has a skip connection, which ``hidden_layer_sizes`` cannot
# express. The class is defined at the top level of the script so that the
# fitted estimator can be pickled.
import torch

N_TRAIN_TASKS = 24
N_TEST_TASKS = 8
N_SAMPLES = 40  # rows per task
N_SUPPORT = 10  # rows a held-out task offers to adapt on
N_META_ITER = 150  # outer iterations of Algorithm 2
N_ADAPT_STEPS = 5  # VI steps on a new task from the learned initialisation
MAX_ITER = 300  # VI epochs on a new task from scratch (no meta-learning)


class ResidualNet(torch.nn.Module):
    """x -> tanh layer -> residual tanh block -> (mean, raw noise)."""

    def __init__(self, width=32):
        super().__init__()
        self.embed = torch.nn.Linear(1, width)
        self.block = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, 2)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        h = h + torch.tanh(self.block(h))
        return self.head(h)


# torch's default initialisation draws from the global RNG: seed it for a
# reproducible example (skmetavi itself never touches the global RNGs).
torch.manual_seed(0)
network = ResidualNet()
print(f"{sum(p.numel() for p in network.parameters())} Bayesian weights")

# %%
# The task family
# ---------------
# Sinusoids with their own amplitude and phase and input-dependent noise. The
# held-out tasks are split into ``N_SUPPORT`` support rows (to adapt on) and
# query rows (to score).
import numpy as np

from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.model_selection import support_query_split

X, y, groups = make_sinusoid_tasks(N_TRAIN_TASKS + N_TEST_TASKS, N_SAMPLES, random_state=0)
train = groups < N_TRAIN_TASKS
X_s, X_q, y_s, y_q, g_s, g_q = support_query_split(
    X[~train], y[~train], groups[~train], support_size=N_SUPPORT, random_state=0
)
test_tasks = np.unique(g_q)

# %%
# Meta-training
# -------------
# ``meta_learn_init=True`` runs Algorithm 2 (Meta-D&phi): alpha and the
# initialisation of q are learned so that ``N_ADAPT_STEPS`` VI steps on a
# task's support rows predict its query rows well. The user's module is
# copied, never modified.
from skmetavi import MetaBNNRegressor

meta = MetaBNNRegressor(
    "renyi",
    network=network,
    meta_learn_init=True,
    n_inner_steps=N_ADAPT_STEPS,
    max_meta_iter=N_META_ITER,
    n_tasks_per_batch=8,
    n_particles=10,
    random_state=0,
)
meta.meta_fit(X[train], y[train], groups[train])
print(f"learned alpha: {meta.meta_divergence_.alpha:.3f}")

# %%
# Adapting to held-out tasks
# --------------------------
# Each method sees only a held-out task's support rows; the scores are the
# mean log predictive density of its query rows (the "test LL") and R^2.
# :meth:`~skmetavi.MetaBNNRegressor.fit` after :meth:`~skmetavi.MetaBNNRegressor.meta_fit`
# starts from the learned initialisation; the KL baseline starts from the
# module's own weights and runs ``MAX_ITER`` epochs.
from sklearn.linear_model import BayesianRidge
from sklearn.metrics import r2_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import PolynomialFeatures, StandardScaler

from skmetavi.metrics import gaussian_nll

methods = {
    "meta-learned (alpha + init)": lambda: meta,
    "KL-VI, no meta-learning": lambda: MetaBNNRegressor(
        "kl", network=network, max_iter=MAX_ITER, n_particles=10, random_state=0
    ),
    "BayesianRidge, degree 5": lambda: make_pipeline(
        PolynomialFeatures(5), StandardScaler(), BayesianRidge()
    ),
}
scores = {name: {"test LL": [], "R^2": []} for name in methods}
for task in test_tasks:
    s, q = g_s == task, g_q == task
    for name, make in methods.items():
        model = make().fit(X_s[s], y_s[s])
        if isinstance(model, MetaBNNRegressor):
            log_density = model.log_predictive_density(X_q[q], y_q[q]).mean()
        else:
            mean, std = model.predict(X_q[q], return_std=True)
            log_density = -gaussian_nll(y_q[q], mean, std)
        scores[name]["test LL"].append(log_density)
        scores[name]["R^2"].append(r2_score(y_q[q], model.predict(X_q[q])))

print(f"{'':30s} {'test LL':>16s} {'R^2':>16s}")
for name, s in scores.items():
    ll, r2 = np.array(s["test LL"]), np.array(s["R^2"])
    print(f"{name:30s} {ll.mean():8.3f} ± {ll.std():5.3f} {r2.mean():8.3f} ± {r2.std():5.3f}")

# %%
# One held-out task
# -----------------
# The posterior predictive mean ± 2 standard deviations (epistemic and
# aleatoric) of each method on the first held-out task.
import matplotlib.pyplot as plt

task = test_tasks[0]
s, q = g_s == task, g_q == task
x_grid = np.linspace(-4, 4, 200)[:, None]
fig, axes = plt.subplots(1, len(methods), figsize=(12, 3.5), sharey=True, layout="constrained")
for ax, (name, make) in zip(axes, methods.items()):
    model = make().fit(X_s[s], y_s[s])
    mean, std = model.predict(x_grid, return_std=True)
    ax.fill_between(x_grid[:, 0], mean - 2 * std, mean + 2 * std, alpha=0.3)
    ax.plot(x_grid[:, 0], mean)
    ax.plot(X_s[s, 0], y_s[s], "k.", label="support")
    ax.plot(X_q[q, 0], y_q[q], "rx", label="query")
    ax.set_title(name)
    ax.set_xlabel("x")
axes[0].legend(loc="lower left")
_ = fig.suptitle("Posterior predictive (mean ± 2 std) on a held-out task")

# %%
# Interpretation
# --------------
# With ``N_SUPPORT`` rows, neither VI from the module's initial weights nor a
# polynomial Bayesian linear model recovers a sinusoid well, and both are
# over- or under-confident away from the support rows. The meta-learned
# initialisation stores what the training tasks share, so a few VI steps from
# it give the custom network a clearly higher test log-likelihood and R^2 on
# tasks never seen during meta-training. Nothing in the estimator depended
# on the architecture: the same code runs any module whose rows' outputs are
# independent of each other.

if __name__ == "__main__" and "__file__" in globals():  # a script, not sphinx-gallery
    fig.savefig(__file__.replace(".py", ".png"), dpi=100)
