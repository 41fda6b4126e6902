"""A partial VAE (EDDI, Ma et al. 2019) as a latent model of the engine: one latent per user.

Each row is a user's partially observed ratings, scaled to [0, 1].  The encoder
is a set (PointNet-style) function of the observed entries only: entry ``d``
of row ``n`` with value ``x_nd`` is embedded as ``relu([x_nd, x_nd F_d, b_d] W
+ c)`` (``F_d``, ``b_d``: a learned identity vector and bias of item d), the
embeddings of the observed entries are summed, and an MLP maps ``relu(sum)``
to q's mean and scale.  The decoder maps z to the mean (a sigmoid) of every
item; the likelihood is Gaussian and counts only the observed entries.

The batch carries four row-aligned fields: ``X`` (values, 0 where missing),
``obs`` (bool, the entries the encoder sees and the inner loop fits), and for
meta-losses and scores ``y`` (held-out values) with ``target`` (bool, the
held-out entries).  The set encoder gathers the observed entries of a batch
(cost proportional to their number, not to users x items).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
from numbers import Integral, Real

import torch
from torch.nn import functional as F

from skmetavi.models._row_q import MIN_NOISE, MIN_SCALE, GaussianRowQ
from skmetavi.models._row_q import inverse_softplus as _inverse_softplus
from skmetavi.models._vae import ACTIVATIONS, _Networks

__all__ = ["PartialVAELatent"]

_LOG_2PI = math.log(2 * math.pi)


def _sizes(name, value):
    sizes = (value,) if isinstance(value, Integral) else tuple(value)
    for h in sizes:
        if isinstance(h, bool) or not isinstance(h, Integral) or h < 1:
            raise ValueError(f"{name} must be positive ints, got {value!r}.")
    return sizes


class PartialVAELatent(_Networks, GaussianRowQ):
    """Partial VAE with a set encoder over each row's observed entries (Ma et al. 2019).

    ``z_n ~ N(0, I_k)``; every observed entry is Gaussian around a sigmoid
    decoder's mean, ``x_nd | z_n ~ N(mu_d(z_n), sigma^2)``; ``q(z_n | x_obs)``
    is a diagonal Gaussian from the set encoder of the module docstring.
    Every task has its own networks (leading dimension M); the decoder's
    weights and the noise are model parameters, moved by the inner loop with
    the divergence's per-row weights (as in :class:`VAELatent`).

    Parameters
    ----------
    n_components : int, default=10
        Latent dimension.
    code_size : int, default=20
        Width of the per-entry embedding summed by the set encoder (EDDI's K).
    embedding_size : int, default=10
        Length of each item's learned identity vector ``F_d``.
    encoder_layer_sizes : tuple of int, default=(500, 200)
        Hidden widths of the MLP after the set sum.
    decoder_layer_sizes : tuple of int, default=(50, 100)
        Hidden widths of the decoder.
    noise_std : float or "learned", default="learned"
        Standard deviation of the Gaussian likelihood on the scaled values:
        fixed (EDDI: ``0.1 * sqrt(2)``), or one learned value shared by all
        items.
    activation : {"relu", "tanh", "softplus", "elu"}, default="relu"
        Hidden activation of the MLPs.
    init_scale : float, default=1.0
        Multiplies the Glorot-scaled random initial weights.

    See Also
    --------
    VAELatent : The VAE of fully observed rows.
    skmetavi.MetaPartialVAE : The imputer built on this model.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import PartialVAELatent
    >>> model = PartialVAELatent(2, encoder_layer_sizes=(8,), decoder_layer_sizes=(8,))
    >>> X = torch.rand(5, 6)
    >>> obs = torch.rand(5, 6) < 0.5
    >>> tasks = pad_tasks([torch.where(obs, X, 0.0)], obs=[obs])
    >>> params = model.init_params(tasks, generator=torch.Generator().manual_seed(0))
    >>> eps = model.sample_eps(params, tasks, 3, generator=torch.Generator().manual_seed(1))
    >>> model.log_p(params, tasks, model.rsample(params, tasks, eps)).shape  # (M, S, K)
    torch.Size([1, 5, 3])
    """

    has_likelihood = False
    supports_minibatch = True
    inference = "amortized"

    def __init__(self, n_components=10, *, code_size=20, embedding_size=10,
                 encoder_layer_sizes=(500, 200), decoder_layer_sizes=(50, 100),
                 noise_std="learned", activation="relu", init_scale=1.0):
        for name, v in (("n_components", n_components), ("code_size", code_size),
                        ("embedding_size", embedding_size)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}.")
        if noise_std != "learned" and (
                isinstance(noise_std, bool) or not isinstance(noise_std, Real)
                or not math.isfinite(noise_std) or not noise_std > 0):
            raise ValueError(f"noise_std must be 'learned' or a number > 0, got {noise_std!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}.")
        self.n_components = int(n_components)
        self.code_size = int(code_size)
        self.embedding_size = int(embedding_size)
        self.encoder_layer_sizes = _sizes("encoder_layer_sizes", encoder_layer_sizes)
        self.decoder_layer_sizes = _sizes("decoder_layer_sizes", decoder_layer_sizes)
        self.noise_std = noise_std
        self.activation = activation
        self.init_scale = init_scale

    def __repr__(self):
        return (f"PartialVAELatent(n_components={self.n_components}, code_size={self.code_size}, "
                f"embedding_size={self.embedding_size}, "
                f"encoder_layer_sizes={self.encoder_layer_sizes!r}, "
                f"decoder_layer_sizes={self.decoder_layer_sizes!r}, "
                f"noise_std={self.noise_std!r}, activation={self.activation!r})")

    # ------------------------------------------------------------ layout
    @property
    def variational_keys(self):
        """The encoder's parameters (set embedding, MLP and output heads)."""
        hidden = tuple(k for i in range(len(self.encoder_layer_sizes))
                       for k in (f"enc_w{i}", f"enc_b{i}"))
        return ("set_F", "set_b", "set_w", "set_c", *hidden,
                "enc_loc_w", "enc_loc_b", "enc_scale_w", "enc_scale_b")

    def init_params(self, tasks, *, generator):
        """Glorot-scaled random weights; q starts with standard deviation one.

        Parameters
        ----------
        tasks : TaskBatch
            The tasks (M, their items, dtype and device).
        generator : torch.Generator or TaskNoise
            Source of the random weights.

        Returns
        -------
        params : dict of str to torch.Tensor
            Leading task dimension M.
        """
        M, _, p = tasks.X.shape
        X, k, e, c = tasks.X, self.n_components, self.embedding_size, self.code_size
        params = {}
        widths = (k, *self.decoder_layer_sizes, p)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            params[f"dec_w{i}"], params[f"dec_b{i}"] = self._dense(M, a, b, generator, X)
        if self.noise_std == "learned":
            params["dec_noise_raw"] = torch.full((M, 1), _inverse_softplus(0.2 - MIN_NOISE),
                                                 dtype=X.dtype, device=X.device)
        params["set_F"], _ = self._dense(M, p, e, generator, X)
        params["set_b"], _ = self._dense(M, p, 1, generator, X)
        params["set_b"] = params["set_b"][..., 0]
        params["set_w"], params["set_c"] = self._dense(M, e + 2, c, generator, X)
        widths = (c, *self.encoder_layer_sizes)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            params[f"enc_w{i}"], params[f"enc_b{i}"] = self._dense(M, a, b, generator, X)
        last = widths[-1]
        params["enc_loc_w"], params["enc_loc_b"] = self._dense(M, last, k, generator, X)
        params["enc_scale_w"] = torch.zeros((M, last, k), dtype=X.dtype, device=X.device)
        params["enc_scale_b"] = torch.full((M, k), _inverse_softplus(1.0 - MIN_SCALE),
                                           dtype=X.dtype, device=X.device)
        return params

    # ------------------------------------------------------------ networks
    def set_code(self, params, tasks):
        """The set encoder's summary of each row's observed entries, (M, S, code_size).

        ``relu(sum_{d observed} relu(x_nd A_d + B_d))`` with ``A_d = w_0 + F_d
        W_F`` and ``B_d = b_d w_b + c`` (the first layer applied to ``[x_nd,
        x_nd F_d, b_d]``), computed on the observed entries only.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            Rows with the ``X`` and ``obs`` fields.

        Returns
        -------
        code : torch.Tensor of shape (M, S, code_size)
            The summary fed to the encoder's MLP.
        """
        obs = tasks.fields["obs"]
        M, S, p = obs.shape
        w = params["set_w"]  # (M, e + 2, c)
        A = w[:, :1] + torch.bmm(params["set_F"], w[:, 1:-1])  # (M, p, c)
        B = params["set_b"].unsqueeze(-1) * w[:, -1:] + params["set_c"].unsqueeze(1)
        m, n, d = obs.nonzero(as_tuple=True)
        x = tasks.X.reshape(-1)[(m * S + n) * p + d].unsqueeze(-1)
        flat = m * p + d
        c = A.shape[-1]
        h = F.relu(x * A.reshape(M * p, c).index_select(0, flat)
                   + B.reshape(M * p, c).index_select(0, flat))  # (nnz, c): per observed entry
        out = h.new_zeros((M * S, h.shape[-1])).index_add(0, m * S + n, h)
        return F.relu(out.reshape(M, S, -1))

    def _encode(self, params, tasks):
        h, _ = self._mlp(self.set_code(params, tasks), params, "enc",
                         len(self.encoder_layer_sizes))
        return self._q_heads(params, h)

    def decode(self, params, z):
        """The decoder's mean of every item in [0, 1], (M, S, K, p), for latents (M, S, K, k).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        mean : torch.Tensor of shape (M, S, K, p)
            ``sigmoid`` of the decoder's output.
        """
        return torch.sigmoid(self._decoder_output(params, z, len(self.decoder_layer_sizes)))

    def noise(self, params):
        """The likelihood's standard deviation on the scaled values, (M, 1).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.

        Returns
        -------
        sigma : torch.Tensor of shape (M, 1)
            ``softplus(dec_noise_raw) + 1e-3``, or the fixed ``noise_std``.
        """
        if self.noise_std == "learned":
            return F.softplus(params["dec_noise_raw"]) + MIN_NOISE
        ref = params["dec_b0"]
        return torch.full((ref.shape[0], 1), float(self.noise_std), dtype=ref.dtype,
                          device=ref.device)

    def entry_log_prob(self, params, values, entries, z):
        """``sum_d entries_nd log N(values_nd; mean_d(z_nk), sigma^2)`` per row and particle.

        The decoder's last layer is one batched product for all items, but
        the Gaussian terms are evaluated on the scored entries only (gathered
        by flat index, so the cost of the elementwise work and of its
        gradient grows with the number of ratings, not with users x items).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        values : torch.Tensor of shape (M, S, p)
            Scaled values (anything where ``entries`` is False).
        entries : torch.Tensor of bool, shape (M, S, p)
            The entries scored.
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        log_lik : torch.Tensor of shape (M, S, K)
            Summed over the scored entries of each row.
        """
        M, S, K, _ = z.shape
        p = entries.shape[-1]
        n = len(self.decoder_layer_sizes)
        h, _ = self._mlp(z, params, "dec", n)  # (M, S * K, H)
        # (M, p, S * K): item-major, so that entry (m, n, d) owns K contiguous values.
        out = torch.baddbmm(params[f"dec_b{n}"].unsqueeze(-1),
                            params[f"dec_w{n}"].transpose(1, 2), h.transpose(1, 2))
        m, row, d = entries.nonzero(as_tuple=True)
        logits = out.reshape(M * p * S, K).index_select(0, (m * p + d) * S + row)  # (nnz, K)
        x = values.reshape(-1)[(m * S + row) * p + d].unsqueeze(-1)
        sigma = self.noise(params)[m]  # (nnz, 1)
        u = (x - torch.sigmoid(logits)) / sigma
        lp = -0.5 * u**2 - torch.log(sigma) - 0.5 * _LOG_2PI
        return lp.new_zeros((M * S, K)).index_add(0, m * S + row, lp).reshape(M, S, K)

    def decoder_log_prob(self, params, tasks, z):
        """``log p(x_obs | z)`` of every row and particle, (M, S, K): the observed entries.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            Rows with the fields ``X`` and ``obs`` (and ``y``, ``target``).
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        log_lik : torch.Tensor of shape (M, S, K)
            Summed over the scored entries of each row.
        """
        return self.entry_log_prob(params, tasks.X, tasks.fields["obs"], z)

    def heldout_log_prob(self, params, tasks, z):
        """``log p(y_target | z)`` of every row and particle, (M, S, K): the held-out entries.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            Rows with the fields ``X`` and ``obs`` (and ``y``, ``target``).
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        log_lik : torch.Tensor of shape (M, S, K)
            Summed over the scored entries of each row.
        """
        return self.entry_log_prob(params, tasks.y, tasks.fields["target"], z)

    # ------------------------------------------------------------ protocol
    def log_p(self, params, tasks, z):
        log_prior = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)
        return log_prior + self.decoder_log_prob(params, tasks, z)
