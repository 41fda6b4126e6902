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
        """Draw the standard-normal noise that :meth:`rsample` maps to particles.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M.
        n_particles : int
            Number of particles K per task.
        generator : torch.Generator or TaskNoise
            Source of randomness (the global torch RNG is not used): a
            ``torch.Generator`` or any object with a ``randn(shape, dtype=,
            device=)`` method (the engine's split-independent task noise).
        dtype : torch.dtype
            Floating-point type of the noise.
        device : torch.device or str
            Device of the noise.

        Returns
        -------
        eps : torch.Tensor of shape (n_tasks, n_particles, n_latent)
            Independent standard-normal draws.
        """
        shape = (n_tasks, n_particles, self.n_latent)
        if isinstance(generator, torch.Generator):
            return torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return generator.randn(shape, dtype=dtype, device=device)

    def log_prob_reparameterised(self, params, eps):
        """Evaluate ``log q(r_phi(eps))`` as a function of the parameters.

        For ``z = loc + L eps``, ``log q(z) = log N(eps; 0, I) - log|det L|``
        identically in the parameters, so this has the same value and the same
        derivatives (of every order) in ``params`` as ``log_prob(params,
        rsample(params, eps))`` -- without any operation on ``z``.  It carries no
        dependence on ``z`` itself, so it cannot give path derivatives.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.
        eps : torch.Tensor of shape (M, K, n_latent)
            The standard-normal noise the particles were made from.

        Returns
        -------
        log_q : torch.Tensor of shape (M, K)
            Log density of each particle.
        """
        log_det = self.log_abs_det(params).unsqueeze(-1)  # (M, 1)
        return -0.5 * (eps * eps).sum(-1) - log_det - 0.5 * self.n_latent * _LOG_2PI

    def log_abs_det(self, params):
        """Return ``log |det L|`` of each task's scale matrix.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        log_det : torch.Tensor of shape (M,)
            Sum of the logs of the Cholesky factor's diagonal.
        """
        L = self.scale_tril(params)
        return torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)

    def distribution(self, params) -> torch.distributions.MultivariateNormal:
        """Return the batch of q's as a ``torch.distributions.MultivariateNormal``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        q : torch.distributions.MultivariateNormal
            Batch shape (M,), event shape (n_latent,).
        """
        return torch.distributions.MultivariateNormal(
            params["loc"], scale_tril=self.scale_tril(params), validate_args=False
        )

    def mean(self, params):
        """Return the mean of q.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        mean : torch.Tensor of shape (M, n_latent)
            The mean of each task's q.
        """
        return params["loc"]

    def covariance(self, params):
        """Return the covariance of q.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        covariance : torch.Tensor of shape (M, n_latent, n_latent)
            The covariance of each task's q.
        """
        L = self.scale_tril(params)
        return L @ L.transpose(-1, -2)

    def entropy(self, params):
        """Return the differential entropy of q.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        entropy : torch.Tensor of shape (M,)
            The entropy of each task's q, in nats.
        """
        return 0.5 * self.n_latent * (1.0 + _LOG_2PI) + self.log_abs_det(params)


class MeanFieldGaussian(_GaussianFamily):
    """Diagonal Gaussian ``q(z) = N(loc, diag(scale^2))``.

    Parameters ``{"loc": (M, d), "scale_raw": (M, d)}`` with
    ``scale = softplus(scale_raw) + 1e-6``.

    Parameters
    ----------
    n_latent : int, default=1
        Dimension d of the latent variable.

    See Also
    --------
    FullCovarianceGaussian : The Gaussian family with a full covariance.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import MeanFieldGaussian
    >>> family = MeanFieldGaussian(n_latent=2)
    >>> params = family.init_params(3, loc=1.0, scale=2.0, dtype=torch.float64, device="cpu")
    >>> family.mean(params).shape
    torch.Size([3, 2])
    >>> family.scale(params)[0]
    tensor([2., 2.], dtype=torch.float64)
    """

    param_names = ("loc", "scale_raw")

    def init_params(self, n_tasks, *, loc=0.0, scale=1.0, dtype, device):
        """Return initial parameters with the given mean and standard deviation.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M (the leading dimension).
        loc : float, default=0.0
            Mean of every coordinate.
        scale : float, default=1.0
            Standard deviation of every coordinate, > 1e-6.
        dtype : torch.dtype
            Floating-point type of the parameters.
        device : torch.device or str
            Device of the parameters.

        Returns
        -------
        params : dict of str to torch.Tensor
            ``{"loc": (M, d), "scale_raw": (M, d)}``.
        """
        loc_t = torch.zeros((n_tasks, self.n_latent), dtype=dtype, device=device) + loc
        scale_t = torch.full_like(loc_t, float(scale) - MIN_SCALE)
        return {"loc": loc_t, "scale_raw": _inverse_softplus(scale_t)}

    def scale(self, params):
        """Return the standard deviations ``softplus(scale_raw) + 1e-6``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        scale : torch.Tensor of shape (M, n_latent)
            The standard deviation of each coordinate.
        """
        return F.softplus(params["scale_raw"]) + MIN_SCALE

    def log_abs_det(self, params):
        """Return ``sum(log scale)`` per task, without building the diagonal matrix.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        log_det : torch.Tensor of shape (M,)
            Log-determinant of the (diagonal) scale matrix.
        """
        return torch.log(self.scale(params)).sum(-1)

    def scale_tril(self, params):
        """Return the Cholesky factor of the covariance, here diagonal.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        scale_tril : torch.Tensor of shape (M, n_latent, n_latent)
            Lower-triangular L with ``covariance = L L^T``.
        """
        return torch.diag_embed(self.scale(params))

    def covariance(self, params):
        return torch.diag_embed(self.scale(params) ** 2)

    def rsample(self, params, eps):
        """Map noise to particles ``loc + scale * eps``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.
        eps : torch.Tensor of shape (M, K, n_latent)
            Standard-normal noise (:meth:`sample_eps`).

        Returns
        -------
        z : torch.Tensor of shape (M, K, n_latent)
            Particles, differentiable in ``params`` (reparameterisation).
        """
        return params["loc"].unsqueeze(-2) + self.scale(params).unsqueeze(-2) * eps

    def log_prob(self, params, z):
        """Evaluate the log density log q(z).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.
        z : torch.Tensor of shape (M, K, n_latent)
            Points at which to evaluate each task's q.

        Returns
        -------
        log_q : torch.Tensor of shape (M, K)
            Log density of q at ``z``, differentiable in ``params`` and ``z``.
        """
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

    See Also
    --------
    MeanFieldGaussian : The Gaussian family with a diagonal covariance.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import FullCovarianceGaussian
    >>> family = FullCovarianceGaussian(n_latent=2)
    >>> params = family.init_params(1, scale=2.0, dtype=torch.float64, device="cpu")
    >>> family.covariance(params)[0]
    tensor([[4., 0.],
            [0., 4.]], dtype=torch.float64)
    """

    param_names = ("loc", "scale_tril_raw")

    def init_params(self, n_tasks, *, loc=0.0, scale=1.0, dtype, device):
        """Return initial parameters with the given mean and isotropic standard deviation.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M (the leading dimension).
        loc : float, default=0.0
            Mean of every coordinate.
        scale : float, default=1.0
            Standard deviation of every coordinate, > 1e-6 (no correlations).
        dtype : torch.dtype
            Floating-point type of the parameters.
        device : torch.device or str
            Device of the parameters.

        Returns
        -------
        params : dict of str to torch.Tensor
            ``{"loc": (M, d), "scale_tril_raw": (M, d, d)}``.
        """
        d = self.n_latent
        loc_t = torch.zeros((n_tasks, d), dtype=dtype, device=device) + loc
        diag = _inverse_softplus(
            torch.full((n_tasks, d), float(scale) - MIN_SCALE, dtype=dtype, device=device)
        )
        return {"loc": loc_t, "scale_tril_raw": torch.diag_embed(diag)}

    def scale_tril(self, params):
        """Return the Cholesky factor L of the covariance.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.

        Returns
        -------
        scale_tril : torch.Tensor of shape (M, n_latent, n_latent)
            Lower-triangular L with a positive diagonal, ``covariance = L L^T``.
        """
        raw = params["scale_tril_raw"]
        diag = F.softplus(torch.diagonal(raw, dim1=-2, dim2=-1)) + MIN_SCALE
        return torch.tril(raw, diagonal=-1) + torch.diag_embed(diag)

    def rsample(self, params, eps):
        """Map noise to particles ``loc + L eps``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.
        eps : torch.Tensor of shape (M, K, n_latent)
            Standard-normal noise (:meth:`sample_eps`).

        Returns
        -------
        z : torch.Tensor of shape (M, K, n_latent)
            Particles, differentiable in ``params`` (reparameterisation).
        """
        L = self.scale_tril(params)
        return params["loc"].unsqueeze(-2) + eps @ L.transpose(-1, -2)

    def log_prob(self, params, z):
        """Evaluate the log density log q(z).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Variational parameters with a leading task dimension M.
        z : torch.Tensor of shape (M, K, n_latent)
            Points at which to evaluate each task's q.

        Returns
        -------
        log_q : torch.Tensor of shape (M, K)
            Log density of q at ``z``, differentiable in ``params`` and ``z``.
        """
        L = self.scale_tril(params)
        diff = (z - params["loc"].unsqueeze(-2)).transpose(-1, -2)  # (M, d, K)
        u = torch.linalg.solve_triangular(L, diff, upper=False)
        log_det = torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1, keepdim=True)
        return -0.5 * (u**2).sum(-2) - log_det - 0.5 * self.n_latent * _LOG_2PI


FAMILY_NAMES = ("mean_field", "full_covariance")
_FAMILIES = {"mean_field": MeanFieldGaussian, "full_covariance": FullCovarianceGaussian}


def make_family(name, n_latent):
    """Build a variational family from its name.

    The estimators resolve their ``family`` parameter with this function.

    Parameters
    ----------
    name : {"mean_field", "full_covariance"}
        The family: diagonal or full-covariance Gaussian.
    n_latent : int
        Dimension of the latent variable.

    Returns
    -------
    family : MeanFieldGaussian or FullCovarianceGaussian
        A new family object.

    See Also
    --------
    MeanFieldGaussian : The diagonal Gaussian family.
    FullCovarianceGaussian : The full-covariance Gaussian family.

    Examples
    --------
    >>> from skmetavi.models import make_family
    >>> make_family("full_covariance", 3)
    FullCovarianceGaussian(n_latent=3)
    """
    try:
        return _FAMILIES[name](n_latent)
    except KeyError:
        raise ValueError(
            f"Unknown variational family {name!r}; valid names are {list(FAMILY_NAMES)}."
        ) from None
