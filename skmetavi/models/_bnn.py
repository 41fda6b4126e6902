"""Bayesian neural-network regression target, batched over tasks and particles.

The latent ``z`` is the flat vector of all weights and biases of an MLP.  For
``M`` tasks and ``K`` particles, ``z`` has shape ``(M, K, n_weights)`` and one
batched ``matmul`` per layer evaluates all ``M * K`` networks at once.

The likelihood is Gaussian with either an input-dependent (heteroskedastic)
noise scale given by a second output head of the network -- whose weights are
Bayesian like the rest -- or a homoskedastic scale that is a point-estimated
model parameter (``log_noise``) updated by the inner loop.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
from numbers import Integral

import torch
from torch.nn import functional as F

from skmetavi.models._targets import Target, _check_scale, _isotropic_log_prior, _normal_log_prob

__all__ = ["BNNRegression", "LIKELIHOODS", "ACTIVATIONS"]

LIKELIHOODS = ("heteroskedastic", "homoskedastic")
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "softplus": F.softplus, "elu": F.elu}
#: Floor of the noise standard deviation (in the units of y).
MIN_NOISE = 1e-3


class _GaussianRegressionHead:
    """The Gaussian likelihood, weight prior and noise parameter of the BNN targets.

    A subclass provides ``forward`` from its network outputs through
    :meth:`_mean_scale`, and the attributes ``likelihood`` and ``prior_scale``.
    """

    def init_params(self, n_tasks, *, dtype, device):
        if self.likelihood == "homoskedastic":
            # softplus(0.5413) = 1: unit noise in standardised units.
            return {"log_noise": torch.full((n_tasks, 1), 0.5413, dtype=dtype, device=device)}
        return {}

    def _mean_scale(self, h, params):
        """``(mean, scale)`` of shape (M, K, n) from raw outputs (M, K, n[, n_out])."""
        mean = h if h.dim() == 3 else h[..., 0]
        if self.likelihood == "heteroskedastic":
            scale = F.softplus(h[..., 1]) + MIN_NOISE
        else:
            scale = (F.softplus(params["log_noise"]) + MIN_NOISE).unsqueeze(-1).expand_as(mean)
        return mean, scale

    def log_prior(self, z, params):
        return _isotropic_log_prior(z, float(self.prior_scale))

    def log_likelihood(self, z, tasks, params):
        mean, scale = self.forward(z, tasks.X, params)
        return _normal_log_prob(tasks.y.unsqueeze(1), mean, scale)


class BNNRegression(_GaussianRegressionHead, Target):
    """MLP regression ``y ~ N(f_z(x), sigma(x)^2)`` with ``z ~ N(0, prior_scale^2 I)``.

    The latent ``z`` is the flat vector of all weights and biases, layer by
    layer (weights row-major ``(fan_in, fan_out)``, then biases).  All ``M``
    tasks and ``K`` particles are evaluated with one batched matmul per layer.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(50,)
        Hidden widths.
    activation : {"relu", "tanh", "softplus", "elu"}, default="relu"
        Hidden activation.
    likelihood : {"heteroskedastic", "homoskedastic"}, default="heteroskedastic"
        ``"heteroskedastic"``: the network has two outputs, the mean and
        ``sigma(x) = softplus(raw(x)) + 1e-3``, both with Bayesian weights.
        ``"homoskedastic"``: one output and a single noise scale
        ``sigma = softplus(log_noise) + 1e-3``, a point estimate learned by
        the inner loop.
    prior_scale : float, default=1.0
        Prior standard deviation of every weight and bias.

    See Also
    --------
    skmetavi.MetaBNNRegressor : The estimator built on this target.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import BNNRegression
    >>> bnn = BNNRegression(hidden_layer_sizes=(8,))
    >>> bnn.n_latent(1)  # 1*8 + 8 + 8*2 + 2
    34
    """

    requires_y = True
    has_likelihood = True

    def __init__(
        self,
        hidden_layer_sizes=(50,),
        activation="relu",
        likelihood="heteroskedastic",
        prior_scale=1.0,
    ):
        sizes = tuple(hidden_layer_sizes) if isinstance(hidden_layer_sizes, (tuple, list)) else None
        if sizes is None or any(
            isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sizes
        ):
            raise ValueError(
                "hidden_layer_sizes must be a tuple of positive ints (possibly empty), got "
                f"{hidden_layer_sizes!r}."
            )
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}."
            )
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {list(LIKELIHOODS)}, got {likelihood!r}.")
        _check_scale("prior_scale", prior_scale, "BNNRegression")
        self.hidden_layer_sizes = sizes
        self.activation = activation
        self.likelihood = likelihood
        self.prior_scale = prior_scale

    # -------------------------------------------------------------- shapes
    @property
    def n_outputs(self) -> int:
        """Network outputs: 2 (mean, noise) if heteroskedastic, else 1."""
        return 2 if self.likelihood == "heteroskedastic" else 1

    def layer_shapes(self, n_features: int):
        """Return the shapes of the weight matrices.

        Parameters
        ----------
        n_features : int
            Input dimension.

        Returns
        -------
        shapes : list of tuple of int
            One ``(fan_in, fan_out)`` pair per layer.
        """
        widths = [n_features, *self.hidden_layer_sizes, self.n_outputs]
        return list(zip(widths[:-1], widths[1:]))

    def n_latent(self, n_features):
        return sum(i * o + o for i, o in self.layer_shapes(n_features))

    def elements_per_particle(self, n_rows, n_features):
        # The widest layer's activations (the inputs are broadcast to every particle too).
        return n_rows * max(n_features, *self.hidden_layer_sizes, self.n_outputs)

    def init_loc(self, n_tasks, n_features, *, generator, dtype, device):
        """Random initial means of q: He-scaled weights, zero biases, small output head.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M.
        n_features : int
            Input dimension.
        generator : torch.Generator
            Source of randomness.
        dtype : torch.dtype
            Floating-point type.
        device : torch.device or str
            Device of the result.

        Returns
        -------
        loc : torch.Tensor of shape (n_tasks, n_weights)
            Flat weight means, layer by layer.
        """
        chunks = []
        shapes = self.layer_shapes(n_features)
        for li, (i, o) in enumerate(shapes):
            std = math.sqrt(2.0 / i) if li < len(shapes) - 1 else 0.1 / math.sqrt(i)
            w = torch.randn(
                (n_tasks, i * o), generator=generator, dtype=dtype, device=generator.device
            ).to(device) * std
            chunks += [w, torch.zeros((n_tasks, o), dtype=dtype, device=device)]
        return torch.cat(chunks, dim=-1)

    # ------------------------------------------------------------- forward
    def forward(self, z, X, params):
        """Evaluate the M x K networks.

        Parameters
        ----------
        z : torch.Tensor of shape (M, K, n_weights)
            Weights of each task's particles.
        X : torch.Tensor of shape (M, n, n_features)
            Inputs of each task.
        params : dict of str to torch.Tensor
            Model parameters (``log_noise`` for the homoskedastic likelihood).

        Returns
        -------
        mean : torch.Tensor of shape (M, K, n)
            Predictive means.
        scale : torch.Tensor of shape (M, K, n)
            Noise standard deviations.
        """
        act = ACTIVATIONS[self.activation]
        M, K = z.shape[:2]
        n, d = X.shape[-2:]
        shapes = self.layer_shapes(d)
        if torch.compiler.is_compiling():
            return self._forward_fusable(act, z, X, params, shapes)
        # One split (whose backward concatenates) rather than one slice per tensor (each
        # slice's backward would zero-fill a full-size gradient).
        pieces = z.reshape(M * K, -1).split([size for i, o in shapes for size in (i * o, o)], -1)
        h = X.unsqueeze(1).expand(M, K, n, d).reshape(M * K, n, d)
        for li, (i, o) in enumerate(shapes):
            W = pieces[2 * li].reshape(M * K, i, o)
            b = pieces[2 * li + 1].unsqueeze(-2)  # (M*K, 1, o)
            h = torch.baddbmm(b, h, W)  # b + h @ W in one pass, (M*K, n, o)
            if li < len(shapes) - 1:
                h = act(h)
        return self._mean_scale(h.reshape(M, K, n, -1), params)

    def _forward_fusable(self, act, z, X, params, shapes):
        """:meth:`forward` as the inductor fuses it best (under ``torch.compile`` only).

        ``h @ W + b`` lets the bias, the activation and its backward mask share
        one fused pass (``baddbmm`` first copies the broadcast bias into its
        output); a first layer with one input is an outer product, computed
        pointwise instead of as a matmul of the inputs expanded to every
        particle.  The same values up to rounding; 5-7 % faster per compiled
        step of the 1-50-50-1 BNN at 40 and 1000 rows (slower eagerly, where
        nothing fuses).
        """
        M, K = z.shape[:2]
        pieces = z.split([size for i, o in shapes for size in (i * o, o)], -1)
        h = X.unsqueeze(1)  # (M, 1, n, d), broadcast over the particles
        for li, (i, o) in enumerate(shapes):
            W = pieces[2 * li].reshape(M, K, i, o)
            b = pieces[2 * li + 1].unsqueeze(-2)  # (M, K, 1, o)
            h = (h * W if li == 0 and i == 1 else torch.matmul(h, W)) + b  # (M, K, n, o)
            if li < len(shapes) - 1:
                h = act(h)
        return self._mean_scale(h, params)

