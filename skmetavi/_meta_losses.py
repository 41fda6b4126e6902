"""Meta-losses J(q_phi_i, T_i): what the outer loop of Algorithms 1 and 2 minimises.

Every meta-loss is a callable ``(model, params, tasks, generator=None) -> (M,)``
that reaches the model only through the :class:`~skmetavi.models.LatentModel`
protocol and is differentiable in the parameters.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math

import torch

from skmetavi._inner import significant_logsumexp
from skmetavi._tasks import gather_rows, minibatch

__all__ = [
    "QuadratureLoss", "PredictiveNLL", "NegativeEvidence", "HeldOutEntriesNLL",
    "CallableMetaLoss",
]


def _reference(model, params):
    """A variational parameter: its dtype, device and leading task dimension."""
    return params[tuple(model.variational_keys)[0]]


class QuadratureLoss:
    """Meta-losses of 1-D q against a 1-D target by grid quadrature.

    ``kind="renyi"`` gives ``D_alpha(q||p) = log(int q^alpha p^(1-alpha)) /
    (alpha - 1)`` (``alpha=0.5``: ``-2 log int sqrt(q p)``); ``kind="tv"`` gives
    ``0.5 int |q - p|``.  The target is normalised on the grid, so
    unnormalised 1-D targets are fine.  Differentiable in q's parameters.  Needs
    a model with one site and a 1-D latent.
    """

    def __init__(self, kind="renyi", alpha=0.5, low=-10.0, high=26.0, n_points=2001):
        self.kind, self.alpha = kind, alpha
        self.low, self.high, self.n_points = low, high, n_points

    def log_densities(self, model, params, tasks):
        ref = _reference(model, params)
        grid = torch.linspace(self.low, self.high, self.n_points, dtype=ref.dtype, device=ref.device)
        dx = (self.high - self.low) / (self.n_points - 1)
        # The grid as K particles of the one site of each task: (M, 1, G, 1).
        zg = grid.reshape(1, 1, -1, 1).expand(ref.shape[0], 1, -1, 1)
        log_q = model.log_q(params, tasks, zg)[:, 0]  # (M, G)
        with torch.no_grad():
            log_p = model.log_p(params, tasks, zg)[:, 0]
        log_p = log_p - (torch.logsumexp(log_p, -1, keepdim=True) + math.log(dx))
        return grid, log_q, log_p, dx

    def __call__(self, model, params, tasks, generator=None):
        _, log_q, log_p, dx = self.log_densities(model, params, tasks)
        if self.kind == "tv":
            return 0.5 * dx * (log_q.exp() - log_p.exp()).abs().sum(-1)
        a = self.alpha
        log_int = torch.logsumexp(a * log_q + (1 - a) * log_p, -1) + math.log(dx)
        return log_int / (a - 1)


class PredictiveNLL:
    """Held-out negative log predictive density per row (query split of each task).

    ``-mean_n log (1/K) sum_k p(y_n | x_n, z_k)``, z_k reparameterised from q.
    Needs a model with one site and a per-row ``log_likelihood``.
    """

    def __init__(self, n_particles=100):
        self.n_particles = n_particles

    def __call__(self, model, params, tasks, generator=None):
        if not getattr(model, "has_likelihood", False):
            raise TypeError(
                f"The held-out predictive NLL needs a model with one global latent and a "
                f"per-row likelihood (has_likelihood=True); got {model!r}. Use "
                "NegativeEvidence for models with one latent per row."
            )
        eps = model.sample_eps(params, tasks, self.n_particles, generator=generator)
        return self.evaluate(model, params, tasks, eps)

    def evaluate(self, model, params, tasks, eps):
        """Compute the loss (M,) from the model's noise ``eps``, drawn beforehand."""
        z = model.rsample(params, tasks, eps)
        log_lik = model.log_likelihood(params, tasks, z)[:, 0]  # (M, K, n)
        lpd = significant_logsumexp(log_lik, 1) - math.log(log_lik.shape[1])  # (M, n)
        lpd = torch.where(tasks.mask, lpd, torch.zeros_like(lpd))  # padding may be non-finite
        return -lpd.sum(-1) / tasks.mask.sum(-1).clamp(min=1).to(lpd.dtype)


class NegativeEvidence:
    """Negative importance-weighted log evidence per data row (the IWAE bound, Burda et al.).

    For every site, ``log (1/K) sum_k p(z_k, D_s) / q(z_k)`` with ``K``
    particles from q (a lower bound of ``log p(D_s)`` that tightens as ``K``
    grows), then averaged over the real sites.  For models with local latents
    (one site per row) this is the held-out evidence per row, the natural
    meta-loss of a VAE; for a global latent (one site per task) it is the
    evidence of the task's rows divided by their number.  With ``batch_size``
    the sites are a random minibatch of each task's rows (drawn from the
    generator; per-row parameters gathered), which bounds the memory of a
    meta-loss on thousands of rows.
    """

    def __init__(self, n_particles=100, batch_size=None):
        self.n_particles = n_particles
        self.batch_size = batch_size

    def __call__(self, model, params, tasks, generator=None):
        if self.batch_size is not None:
            # An unbiased estimate of the mean over the rows from a minibatch of them.
            tasks = minibatch(tasks, self.batch_size, generator)
            local = tuple(getattr(model, "local_keys", ()))
            if tasks.rows is not None and local:
                params = {k: gather_rows(v, tasks.rows) if k in local else v
                          for k, v in params.items()}
        eps = model.sample_eps(params, tasks, self.n_particles, generator=generator)
        return self.evaluate(model, params, tasks, eps)

    def evaluate(self, model, params, tasks, eps):
        """Compute the loss (M,) from the model's noise ``eps`` (for the sites of ``tasks``)."""
        z = model.rsample(params, tasks, eps)
        log_w = model.log_p(params, tasks, z) - model.log_q(params, tasks, z)  # (M, S, K)
        log_ev = significant_logsumexp(log_w, -1) - math.log(log_w.shape[-1])  # (M, S)
        site_w = model.site_weights(tasks)
        if site_w is None:
            return -log_ev.sum(-1) / tasks.mask.sum(-1).clamp(min=1).to(log_ev.dtype)
        valid = site_w != 0
        log_ev = torch.where(valid, log_ev, torch.zeros_like(log_ev))
        return -log_ev.sum(-1) / valid.sum(-1).clamp(min=1).to(log_ev.dtype)


class HeldOutEntriesNLL:
    """Negative log predictive density of held-out entries, per held-out entry (a partial VAE).

    Every row's observed entries (field ``obs``) go through the encoder; its
    held-out entries (field ``target``, values in ``y``) are scored jointly,
    ``log (1/K) sum_k p(y_target | z_k)`` with ``z_k ~ q(z | x_obs)``.  The
    sum over rows is divided by the number of held-out entries, so the loss
    is per entry (a rating).  With ``batch_size`` a random minibatch of each
    task's rows is used.  Needs a model with ``heldout_log_prob``.
    """

    def __init__(self, n_particles=50, batch_size=None):
        self.n_particles = n_particles
        self.batch_size = batch_size

    def __call__(self, model, params, tasks, generator=None):
        if self.batch_size is not None:
            tasks = minibatch(tasks, self.batch_size, generator)
        eps = model.sample_eps(params, tasks, self.n_particles, generator=generator)
        z = model.rsample(params, tasks, eps)
        log_lik = model.heldout_log_prob(params, tasks, z)  # (M, S, K)
        lpd = significant_logsumexp(log_lik, -1) - math.log(self.n_particles)  # (M, S)
        lpd = torch.where(tasks.mask, lpd, torch.zeros_like(lpd))
        counts = (tasks.fields["target"] & tasks.mask.unsqueeze(-1)).sum((-2, -1))
        return -lpd.sum(-1) / counts.clamp(min=1).to(lpd.dtype)


class CallableMetaLoss:
    """Per-task user meta-loss ``fn(q, X, y) -> scalar tensor``.

    ``q`` is the task's q as a ``torch.distributions`` object (a
    ``MultivariateNormal`` for the Gaussian families), differentiable in the
    variational parameters; ``X`` and ``y`` are the rows of ``tasks`` (the
    query rows the estimators hold out, see ``MetaFitMixin._holds_out_rows``),
    unpadded, with ``y`` None when the tasks have no targets.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, model, params, tasks, generator=None):
        dist = model.distribution(params, tasks)
        loc, L = dist.loc, dist.scale_tril
        out = []
        for m in range(tasks.n_tasks):
            q = torch.distributions.MultivariateNormal(loc[m], scale_tril=L[m], validate_args=False)
            X_m, y_m = tasks.unpad(m)
            val = self.fn(q, X_m, y_m)
            if not isinstance(val, torch.Tensor) or val.numel() != 1:
                raise ValueError(
                    "A meta_loss callable must return a scalar torch.Tensor that is "
                    f"differentiable in q's parameters, got {val!r}."
                )
            out.append(val.reshape(()).to(loc.dtype))
        return torch.stack(out)
