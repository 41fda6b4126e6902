"""A linear-Gaussian latent factor model with one latent per row (probabilistic PCA).

The smallest model with *local* latent variables, and one with known answers:
the posterior of each row's latent is Gaussian with a mean linear in the row,
and the marginal likelihood is Gaussian, so amortised and factorised variational
inference, per-site weights and importance-weighted evidence can be checked
exactly.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch.nn import functional as F

from skmetavi._tasks import randn
from skmetavi.models._row_q import INFERENCE, MIN_NOISE, MIN_SCALE, GaussianRowQ
from skmetavi.models._row_q import inverse_softplus as _inverse_softplus

__all__ = ["LinearGaussianLatent", "INFERENCE"]

_LOG_2PI = math.log(2 * math.pi)


class LinearGaussianLatent(GaussianRowQ):
    """Probabilistic PCA with one latent per row, amortised or factorised q.

    ``x_n = z_n W + b + sigma e_n`` with ``z_n ~ N(0, I_k)`` and ``e_n ~ N(0,
    I_p)``.  The loadings ``W`` (k, p), the offset ``b`` (p,) and the noise
    ``sigma = softplus(noise_raw) + 1e-3`` are model parameters, point-estimated
    by the inner loop with the divergence's weights (as a VAE's decoder).

    - ``inference="amortized"``: ``q(z_n | x_n) = N(x_n A + c, diag(s)^2)``,
      an encoder shared by all rows (``A`` (p, k), ``c`` (k,), ``s =
      softplus(enc_scale_raw)``);
    - ``inference="factorized"``: ``q(z_n) = N(m_n, diag(s_n)^2)``, free
      parameters per row (``local_keys``), gathered and scattered under
      minibatching.

    For this model the exact posterior is Gaussian with a mean linear in
    ``x_n`` and a covariance shared by all rows, so a linear encoder loses
    nothing against per-row q's (an amortisation gap of zero).

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension k.
    inference : {"amortized", "factorized"}, default="amortized"
        The variational family (see above).
    init_scale : float, default=0.1
        Standard deviation of the random initial loadings (and of the initial
        encoder weights).

    Attributes
    ----------
    variational_keys : tuple of str
        q's parameters.
    local_keys : tuple of str
        Per-row parameters (factorised q only).

    See Also
    --------
    LatentModel : The protocol this model implements.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import LinearGaussianLatent
    >>> model = LinearGaussianLatent(n_components=1)
    >>> tasks = pad_tasks([torch.randn(5, 3, dtype=torch.float64)])
    >>> params = model.init_params(tasks, generator=torch.Generator().manual_seed(0))
    >>> eps = model.sample_eps(params, tasks, 7, generator=torch.Generator())
    >>> model.log_p(params, tasks, model.rsample(params, tasks, eps)).shape  # (M, S, K)
    torch.Size([1, 5, 7])
    """

    has_likelihood = False
    supports_minibatch = True

    def __init__(self, n_components=2, *, inference="amortized", init_scale=0.1):
        if isinstance(n_components, bool) or not isinstance(n_components, Integral) or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}.")
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {list(INFERENCE)}, got {inference!r}.")
        if isinstance(init_scale, bool) or not isinstance(init_scale, Real) or not init_scale > 0:
            raise ValueError(f"init_scale must be a number > 0, got {init_scale!r}.")
        self.n_components = int(n_components)
        self.inference = inference
        self.init_scale = init_scale

    def __repr__(self):
        return (f"LinearGaussianLatent(n_components={self.n_components}, "
                f"inference={self.inference!r}, init_scale={self.init_scale!r})")

    @property
    def variational_keys(self):
        """The parameters of q: the encoder's, or every row's own."""
        if self.inference == "amortized":
            return ("enc_weight", "enc_bias", "enc_scale_raw")
        return ("z_loc", "z_scale_raw")

    # ---------------------------------------------------------- params
    def init_params(self, tasks, *, generator):
        """Random loadings, zero offsets, unit noise; q at the prior (factorised) or a random encoder.

        Parameters
        ----------
        tasks : TaskBatch
            The tasks (M, their rows and features, dtype and device).
        generator : torch.Generator or TaskNoise
            Source of the random loadings.

        Returns
        -------
        params : dict of str to torch.Tensor
            Model and variational parameters with a leading task dimension M.
        """
        M, n_rows, p = tasks.X.shape
        k = self.n_components
        dtype, device = tasks.X.dtype, tasks.X.device
        s = self.init_scale
        params = {
            "weight": s * randn((M, k, p), generator, dtype=dtype, device=device),
            "bias": torch.zeros((M, p), dtype=dtype, device=device),
            "noise_raw": torch.full((M, 1), _inverse_softplus(1.0 - MIN_NOISE), dtype=dtype,
                                    device=device),
        }
        if self.inference == "amortized":
            unit = _inverse_softplus(1.0 - MIN_SCALE)
            params["enc_weight"] = s * randn((M, p, k), generator, dtype=dtype, device=device)
            params["enc_bias"] = torch.zeros((M, k), dtype=dtype, device=device)
            params["enc_scale_raw"] = torch.full((M, k), unit, dtype=dtype, device=device)
        params.update(self.init_local_params(tasks, generator=generator))
        return params

    def _encode(self, params, tasks):
        loc = tasks.X @ params["enc_weight"] + params["enc_bias"].unsqueeze(1)
        scale = (F.softplus(params["enc_scale_raw"]) + MIN_SCALE).unsqueeze(1).expand_as(loc)
        return loc, scale

    def noise(self, params):
        """The observation noise standard deviation sigma per task, shape (M,).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.

        Returns
        -------
        sigma : torch.Tensor of shape (M,)
            ``softplus(noise_raw) + 1e-3``.
        """
        return F.softplus(params["noise_raw"][:, 0]) + MIN_NOISE

    # ------------------------------------------------------ protocol
    def log_p(self, params, tasks, z):
        W, b = params["weight"], params["bias"]
        sigma = self.noise(params).reshape(-1, 1, 1, 1)
        mean = torch.einsum("mskc,mcp->mskp", z, W) + b.reshape(b.shape[0], 1, 1, -1)
        x = tasks.X.unsqueeze(2)
        log_lik = (-0.5 * ((x - mean) / sigma) ** 2 - torch.log(sigma) - 0.5 * _LOG_2PI).sum(-1)
        log_prior = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)
        return log_prior + log_lik

    # ------------------------------------------------------ exact answers
    def posterior(self, params, X):
        """The exact posterior of each row's latent for one task's parameters.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters of one task (leading dimension 1).
        X : torch.Tensor of shape (n_rows, n_features)
            Rows.

        Returns
        -------
        mean : torch.Tensor of shape (n_rows, n_components)
            ``(x_n - b) W^T Sigma / sigma^2``.
        covariance : torch.Tensor of shape (n_components, n_components)
            ``Sigma = (I + W W^T / sigma^2)^-1``, shared by all rows.
        """
        W, b = params["weight"][0], params["bias"][0]
        var = self.noise(params)[0] ** 2
        eye = torch.eye(self.n_components, dtype=W.dtype, device=W.device)
        cov = torch.linalg.inv(eye + W @ W.T / var)
        mean = (X - b) @ W.T @ cov / var
        return mean, cov

    def log_marginal(self, params, X):
        """The exact ``log p(x_n)`` of each row: ``N(x_n; b, W^T W + sigma^2 I)``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters of one task (leading dimension 1).
        X : torch.Tensor of shape (n_rows, n_features)
            Rows.

        Returns
        -------
        log_px : torch.Tensor of shape (n_rows,)
            The marginal log density of each row.
        """
        W, b = params["weight"][0], params["bias"][0]
        var = self.noise(params)[0] ** 2
        p = X.shape[1]
        cov = W.T @ W + var * torch.eye(p, dtype=W.dtype, device=W.device)
        return torch.distributions.MultivariateNormal(b, covariance_matrix=cov).log_prob(X)
