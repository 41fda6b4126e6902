"""
=======================================================
Comparing divergences: particle weights and VI fits
=======================================================

Every divergence of :mod:`skmetavi.divergences` is defined by how it weights
the ``K`` reparameterised particles of one VI step: the update of the
variational parameters is ``sum_k w_k grad log(p(z_k) / q(z_k))``. KL weights
every particle equally; Rényi's alpha < 1 favours the particles where ``q``
underestimates ``p`` (mass-covering), alpha > 1 those where it overestimates
it; an f-divergence's weights ``g(t_k)`` are a function of the density ratio.
Here we look at those weights, then at what VI finds with each divergence on
one bimodal target, and finally at the ``g`` that
:class:`~skmetavi.divergences.NeuralF` learns when it is meta-trained for the
D_0.5 meta-loss (Zhang et al. 2021): learning a divergence means learning
these weights.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

# %%
# Particle weights
# ----------------
# Take nine particles whose log importance weights ``log p - log q`` are
# evenly spaced from -3 to 3 and compute each divergence's normalised weights.
import matplotlib.pyplot as plt
import numpy as np
import torch

from skmetavi.divergences import KL, FDivergence, NeuralF, Renyi, TailAdaptive

log_w = torch.linspace(-3.0, 3.0, 9)
divergences = {
    "KL": KL(),
    "Rényi α=0.5": Renyi(0.5),
    "Rényi α=2": Renyi(2.0),
    "f: g(t)=t^0.5 (Hellinger)": FDivergence.hellinger(),
    "f: g(t)=t (forward KL)": FDivergence.forward_kl(),
    "tail-adaptive β=-1": TailAdaptive(),
}
fig, ax = plt.subplots(figsize=(7, 4))
with torch.no_grad():
    for (name, div), style in zip(divergences.items(), ["o-", "s-", "o-", "x--", "o-", "o-"]):
        ax.plot(log_w, div.particle_weights(log_w), style, label=name)
ax.set_xlabel("log importance weight  log p(z_k) - log q(z_k)")
ax.set_ylabel("particle weight w_k")
ax.legend()
_ = ax.set_title("How each divergence weights 9 particles")

# %%
# Rényi's alpha = 0.5 tilts the weights towards the particles where the target
# has more mass than ``q``; alpha = 2 tilts them the other way, towards the
# smallest ratios. The f-divergences apply their ``g`` to the self-normalised
# ratios ``t_k``: ``g(t) = t^a`` gives the same normalised weights as Rényi of
# order ``1 - a`` (the Hellinger crosses lie on the alpha = 0.5 line), but with
# the path derivative of the update rather than the Rényi bound's total one. The
# tail-adaptive weights depend only on the ranks of the ratios.
#
# VI with each divergence on one bimodal target
# ---------------------------------------------
# :class:`~skmetavi.MetaDivergenceVI` runs VI with a fixed divergence when it
# is only ``fit`` (no meta-learning). The target is a 1-D mixture of two
# Gaussians, one row ``(weight, loc, scale)`` per component; ``q`` is a single
# Gaussian.
from scipy.stats import norm

from skmetavi import MetaDivergenceVI

X_target = np.array([[0.5, 0.0, 0.6], [0.5, 4.0, 1.2]])
z = np.linspace(-4.0, 9.0, 600)
p = sum(w * norm.pdf(z, m, s) for w, m, s in X_target)

fig, ax = plt.subplots(figsize=(7, 4))
ax.fill_between(z, p, color="0.85", label="target p")
fits = {}
for name, div in [("KL", "kl"), ("Rényi α=2", Renyi(2.0, learnable=False)),
                  ("Rényi α=0.5", Renyi(0.5, learnable=False)),
                  ("Rényi α=0.1", Renyi(0.1, learnable=False)),
                  ("tail-adaptive", TailAdaptive())]:
    est = MetaDivergenceVI("gaussian_mixture", divergence=div, inner_optimizer="sgd",
                           inner_lr=0.05, n_particles=100, max_iter=1000, random_state=0)
    fits[name] = est.fit(X_target)
    ax.plot(z, np.exp(est.score_samples(z[:, None])), label=name)
ax.set_xlabel("z")
ax.legend()
_ = ax.set_title("The Gaussian q that VI finds depends on the divergence")

# %%
# KL(q || p) is mode-seeking: ``q`` sits on the component it started next to,
# and alpha = 2 even more tightly. Smaller alpha covers more of the target's
# mass. Which one is *best* depends on what ``q`` is for;
# meta-learning picks the divergence by a meta-loss on a family of tasks
# instead of by hand. Here is the D_0.5 (Hellinger-like) distance of each fit:
from scipy.integrate import trapezoid

for name, est in fits.items():
    q = np.exp(est.score_samples(z[:, None]))
    print(f"{name:>14}: mean {est.mean_[0]:5.2f}  std {np.sqrt(est.covariance_[0, 0]):4.2f}"
          f"  D_0.5 {-2 * np.log(trapezoid(np.sqrt(q * p), z)):.4f}")

# %%
# Learning g: meta-f on a family of mixtures
# ------------------------------------------
# :class:`~skmetavi.divergences.NeuralF` parameterises ``log g = h(log t)`` by
# a small network plus a linear term, starting at KL (``h = 0``). Its
# parameters are meta-learned (Algorithm 1) so that VI on the training
# mixtures ends with a low D_0.5. The Rényi family is the set of straight lines
# ``h(log t) = (1 - alpha) log t``, drawn for comparison.
from skmetavi.datasets import make_mog_tasks

N_META_ITER = 300
X, groups = make_mog_tasks(16, random_state=0)
meta = MetaDivergenceVI("gaussian_mixture", divergence=NeuralF((16,), init_alpha=1.0),
                        meta_loss="d_half", inner_optimizer="sgd", inner_lr=0.05,
                        n_particles=100, max_meta_iter=N_META_ITER, meta_lr=0.01,
                        random_state=0)
meta.meta_fit(X, groups=groups)

log_t = torch.linspace(-4.0, 2.0, 100)
with torch.no_grad():
    h = meta.meta_divergence_.evaluate_log_g(log_t)
    h = h - meta.meta_divergence_.evaluate_log_g(torch.zeros(1))  # g is defined up to a factor
fig, ax = plt.subplots(figsize=(7, 4))
for alpha in (0.0, 0.5, 1.0):
    ax.plot(log_t, (1 - alpha) * log_t, ":", color="0.5")
    ax.annotate(f"α={alpha}", (log_t[0], (1 - alpha) * log_t[0]), fontsize=8)
ax.plot(log_t, h, lw=2, label=f"learned h after {N_META_ITER} outer steps")
ax.set_xlabel("log t  (self-normalised density ratio)")
ax.set_ylabel("log g(t), up to a constant")
ax.legend()
_ = ax.set_title("The learned f-divergence against the Rényi lines")

# %%
# The learned ``h`` has moved far from KL's flat line: its slope is that of the
# mass-covering orders between alpha = 0.5 and alpha = 0, so it gives more
# weight to the particles where ``q`` puts less mass than the target, which is
# what a mass-covering meta-loss such as D_0.5 rewards. Being a function rather
# than one number, it is also curved: steeper for large ratios than for small
# ones, something no single alpha expresses.

if __name__ == "__main__" and "__file__" in globals():  # a script, not sphinx-gallery
    fig.savefig(__file__.replace(".py", ".png"), dpi=100)
