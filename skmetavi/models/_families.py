"""Reparameterised Gaussian variational families, functional and batched.

Parameters are a ``dict[str, Tensor]`` with a leading task dimension ``M``;
``rsample(params, eps)`` maps standard-normal noise to particles and
``log_prob(params, z)`` is differentiable in both ``params`` and ``z`` (the
engine takes the path-only derivative by differentiating in ``z``).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from skmetavi._params import ParamsMixin

__all__ = ["MeanFieldGaussian", "FullCovarianceGaussian", "make_family", "FAMILY_NAMES"]

_LOG_2PI = math.log(2 * math.pi)
#: Floor added to every standard deviation / Cholesky diagonal.
MIN_SCALE = 1e-6


def _inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    return x + torch.log(-torch.expm1(-x))


class _GaussianFamily(ParamsMixin):
    """Shared parts of the Gaussian families."""

    param_names: tuple = ()

    def __init__(self, n_latent=1):
        self.n_latent = n_latent

    def sample_eps(self, n_tasks, n_particles, *, generator, dtype, device):
        """Standard-normal noise of shape (n_tasks, n_particles, n_latent)."""
        return torch.randn(
            (n_tasks, n_particles, self.n_latent),
            generator=generator,
            dtype=dtype,
            device=device,
        )

    def distribution(self, params) -> torch.distributions.MultivariateNormal:
        """The batch of q's as a ``torch.distributions.MultivariateNormal``."""
        return torch.distributions.MultivariateNormal(
            params["loc"], scale_tril=self.scale_tril(params), validate_args=False
        )

    def mean(self, params):
        """Mean of q, shape (M, n_latent)."""
        return params["loc"]

    def covariance(self, params):
        """Covariance of q, shape (M, n_latent, n_latent)."""
        L = self.scale_tril(params)
        return L @ L.transpose(-1, -2)

    def entropy(self, params):
        """Differential entropy of q, shape (M,)."""
        L = self.scale_tril(params)
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)
        return 0.5 * self.n_latent * (1.0 + _LOG_2PI) + log_det


class MeanFieldGaussian(_GaussianFamily):
    """Diagonal Gaussian ``q(z) = N(loc, diag(scale^2))``.

    Parameters ``{"loc": (M, d), "scale_raw": (M, d)}`` with
    ``scale = softplus(scale_raw) + 1e-6``.

    Parameters
    ----------
    n_latent : int, default=1
        Dimension d of the latent variable.
    """

    param_names = ("loc", "scale_raw")

    def init_params(self, n_tasks, *, loc=0.0, scale=1.0, dtype, device):
        """Initial parameters with the given mean and standard deviation."""
        loc_t = torch.zeros((n_tasks, self.n_latent), dtype=dtype, device=device) + loc
        scale_t = torch.full_like(loc_t, float(scale) - MIN_SCALE)
        return {"loc": loc_t, "scale_raw": _inverse_softplus(scale_t)}

    def scale(self, params):
        return F.softplus(params["scale_raw"]) + MIN_SCALE

    def scale_tril(self, params):
        return torch.diag_embed(self.scale(params))

    def covariance(self, params):
        return torch.diag_embed(self.scale(params) ** 2)

    def rsample(self, params, eps):
        """Particles ``loc + scale * eps``, shape (M, K, d)."""
        return params["loc"].unsqueeze(-2) + self.scale(params).unsqueeze(-2) * eps

    def log_prob(self, params, z):
        """log q(z), shape (M, K) for z of shape (M, K, d)."""
        scale = self.scale(params).unsqueeze(-2)
        u = (z - params["loc"].unsqueeze(-2)) / scale
        return -0.5 * (u**2).sum(-1) - torch.log(scale).sum(-1) - 0.5 * self.n_latent * _LOG_2PI


class FullCovarianceGaussian(_GaussianFamily):
    """Full-covariance Gaussian ``q(z) = N(loc, L L^T)``.

    Parameters ``{"loc": (M, d), "scale_tril_raw": (M, d, d)}``: ``L`` takes
    the strictly lower triangle as is and ``softplus`` of the diagonal (+1e-6).

    Parameters
    ----------
    n_latent : int, default=1
        Dimension d of the latent variable.
    """

    param_names = ("loc", "scale_tril_raw")

    def init_params(self, n_tasks, *, loc=0.0, scale=1.0, dtype, device):
        """Initial parameters with the given mean and isotropic standard deviation."""
        d = self.n_latent
        loc_t = torch.zeros((n_tasks, d), dtype=dtype, device=device) + loc
        diag = _inverse_softplus(
            torch.full((n_tasks, d), float(scale) - MIN_SCALE, dtype=dtype, device=device)
        )
        return {"loc": loc_t, "scale_tril_raw": torch.diag_embed(diag)}

    def scale_tril(self, params):
        raw = params["scale_tril_raw"]
        diag = F.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)) + MIN_SCALE
        return torch.tril(raw, diagonal=-1) + torch.diag_embed(diag)

    def rsample(self, params, eps):
        """Particles ``loc + L eps``, shape (M, K, d)."""
        L = self.scale_tril(params)
        return params["loc"].unsqueeze(-2) + eps @ L.transpose(-1, -2)

    def log_prob(self, params, z):
        """log q(z), shape (M, K) for z of shape (M, K, d)."""
        L = self.scale_tril(params)
        diff = (z - params["loc"].unsqueeze(-2)).transpose(-1, -2)  # (M, d, K)
        u = torch.linalg.solve_triangular(L, diff, upper=False)
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1, keepdim=True)
        return -0.5 * (u**2).sum(-2) - log_det - 0.5 * self.n_latent * _LOG_2PI


FAMILY_NAMES = ("mean_field", "full_covariance")
_FAMILIES = {"mean_field": MeanFieldGaussian, "full_covariance": FullCovarianceGaussian}


def make_family(name, n_latent):
    """Build a family from its name (``"mean_field"`` or ``"full_covariance"``)."""
    try:
        return _FAMILIES[name](n_latent)
    except KeyError:
        raise ValueError(
            f"Unknown variational family {name!r}; valid names are {list(FAMILY_NAMES)}."
        ) from None
