"""A diagonal Gaussian q per data row, amortised or factorised: shared by the local-latent models.

A subclass gives the amortised q (:meth:`GaussianRowQ._encode`) and ``log_p``;
this base class gives the factorised q (free parameters per row, ``local_keys``),
the reparameterised particles and both forms of ``log q``.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

from skmetavi._tasks import randn
from skmetavi.models._protocol import LatentModel

__all__ = ["GaussianRowQ", "INFERENCE", "MIN_SCALE", "MIN_NOISE", "inverse_softplus"]

INFERENCE = ("amortized", "factorized")
_LOG_2PI = math.log(2 * math.pi)
#: Floors of the standard deviations.
MIN_SCALE = 1e-6
MIN_NOISE = 1e-3


def inverse_softplus(x: float) -> float:
    """``log(exp(x) - 1)``, stable for large x."""
    return x + math.log(-math.expm1(-x))


class GaussianRowQ(LatentModel):
    """``q(z_n) = N(loc_n, diag(scale_n)^2)`` for every row n, amortised or factorised.

    Subclasses set ``n_components`` and ``inference`` and implement
    :meth:`_encode` (the amortised q) and ``log_p``.
    """

    n_components: int
    inference: str

    @property
    def local_keys(self):
        """Per-row parameters: those of the factorised q."""
        return () if self.inference == "amortized" else ("z_loc", "z_scale_raw")

    @property
    def n_latent(self) -> int:
        """Latent dimension per row."""
        return self.n_components

    def init_local_params(self, tasks, *, generator):
        """Every row's q at the prior (factorised q; nothing for an amortised one).

        Parameters
        ----------
        tasks : TaskBatch
            The tasks.
        generator : torch.Generator or TaskNoise
            Unused: the start is deterministic.

        Returns
        -------
        params : dict of str to torch.Tensor
            ``z_loc`` and ``z_scale_raw``, ``(M, n_rows, k)`` each.
        """
        if self.inference == "amortized":
            return {}
        M, n_rows, _ = tasks.X.shape
        like = dict(dtype=tasks.X.dtype, device=tasks.X.device)
        return {
            "z_loc": torch.zeros((M, n_rows, self.n_components), **like),
            "z_scale_raw": torch.full((M, n_rows, self.n_components),
                                      inverse_softplus(1.0 - MIN_SCALE), **like),
        }

    def _encode(self, params, tasks):
        """The amortised q's ``(loc, scale)``, each (M, S, k)."""
        raise NotImplementedError

    def q_loc_scale(self, params, tasks):
        """Mean and standard deviation of every row's q, each (M, S, k).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The rows.

        Returns
        -------
        loc, scale : torch.Tensor of shape (M, S, k)
            Mean and standard deviation of q.
        """
        if self.inference == "amortized":
            return self._encode(params, tasks)
        loc = params["z_loc"]
        if loc.shape[1] != tasks.X.shape[1]:
            raise ValueError(
                f"The factorised q has parameters for {loc.shape[1]} rows per task but the "
                f"tasks have {tasks.X.shape[1]}: a factorised q exists only for the rows it was "
                "fitted to (evaluate meta-losses on the support rows, or use "
                "inference='amortized' for new rows)."
            )
        return loc, F.softplus(params["z_scale_raw"]) + MIN_SCALE

    # ------------------------------------------------------ protocol
    def sample_eps(self, params, tasks, n_particles, *, generator):
        ref = next(iter(params.values()))
        M, S = tasks.mask.shape
        return randn((M, S, n_particles, self.n_components), generator, dtype=ref.dtype,
                     device=ref.device)

    def rsample(self, params, tasks, eps):
        loc, scale = self.q_loc_scale(params, tasks)
        return loc.unsqueeze(2) + scale.unsqueeze(2) * eps

    def log_q(self, params, tasks, z):
        loc, scale = self.q_loc_scale(params, tasks)
        u = (z - loc.unsqueeze(2)) / scale.unsqueeze(2)
        return (-0.5 * u**2 - torch.log(scale).unsqueeze(2) - 0.5 * _LOG_2PI).sum(-1)

    def log_q_reparameterised(self, params, tasks, eps):
        _, scale = self.q_loc_scale(params, tasks)
        return (-0.5 * eps**2 - torch.log(scale).unsqueeze(2) - 0.5 * _LOG_2PI).sum(-1)
