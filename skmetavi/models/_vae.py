"""A variational autoencoder as a latent model of the engine: one latent per row.

``z_n ~ N(0, I_k)``, ``x_n | z_n ~ p_theta(x | z_n)`` with an MLP decoder
(Bernoulli pixels for binarised images, or a Gaussian with a learned noise per
feature for real-valued data).  q is a Gaussian with an MLP encoder
(``inference="amortized"``) or free parameters per row (``"factorized"``,
``local_keys``).  Every task of a batch has its own encoder and decoder
weights (leading task dimension M), so Algorithm 1 keeps one VAE per task and
Algorithm 2 learns one shared initialisation of them.

The decoder weights are model parameters: the inner loop moves them along
``sum_k w_nk grad_theta log p(x_n, z_nk)`` with the divergence's weights
``w_nk`` of each row -- the same weights as the encoder's update (for KL, the
ELBO gradient; for Rényi, the VR bound's).  ``has_likelihood`` is False: that
flag means a per-row likelihood of a *global* latent (the ``"nll"`` meta-loss,
``LocalRenyi``); here each row has its own latent, and the decoder's density
is :meth:`VAELatent.decoder_log_prob`.
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

__all__ = ["VAELatent", "FrozenDecoder", "DECODERS"]

DECODERS = ("bernoulli", "gaussian")
ACTIVATIONS = {"tanh": torch.tanh, "relu": F.relu, "softplus": F.softplus, "elu": F.elu}
_LOG_2PI = math.log(2 * math.pi)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}.")


class _Networks:
    """Batched MLP helpers of the VAE models (one network per task, leading dimension M).

    Needs ``init_scale`` and ``activation`` on the instance.
    """

    def _decoder_output(self, params, z, n_hidden):
        """The decoder's last linear layer for latents ``z`` (M, ..., k): (M, ..., p)."""
        h, lead = self._mlp(z, params, "dec", n_hidden)
        out = torch.baddbmm(params[f"dec_b{n_hidden}"].unsqueeze(1), h,
                            params[f"dec_w{n_hidden}"])
        return out.reshape(z.shape[0], *lead, out.shape[-1])

    def _q_heads(self, params, h):
        """q's ``(loc, scale)`` from the encoder's last hidden layer ``h``."""
        loc = torch.baddbmm(params["enc_loc_b"].unsqueeze(1), h, params["enc_loc_w"])
        raw = torch.baddbmm(params["enc_scale_b"].unsqueeze(1), h, params["enc_scale_w"])
        return loc, F.softplus(raw) + MIN_SCALE

    def _dense(self, M, n_in, n_out, generator, like):
        scale = self.init_scale * math.sqrt(2.0 / (n_in + n_out))  # Glorot
        w = scale * randn((M, n_in, n_out), generator, dtype=like.dtype, device=like.device)
        return w, torch.zeros((M, n_out), dtype=like.dtype, device=like.device)

    def _mlp(self, h, params, prefix, n_layers):
        """``h`` (M, ..., n_in) through the hidden layers ``prefix{i}`` of every task."""
        act = ACTIVATIONS[self.activation]
        shape = h.shape
        h = h.reshape(shape[0], -1, shape[-1])  # (M, rows, n_in): one bmm per layer
        for i in range(n_layers):
            h = act(torch.baddbmm(params[f"{prefix}_b{i}"].unsqueeze(1), h,
                                  params[f"{prefix}_w{i}"]))
        return h, shape[1:-1]


class VAELatent(_Networks, GaussianRowQ):
    """Variational autoencoder with one latent per row, amortised or factorised q.

    ``z_n ~ N(0, I_k)`` and ``x_n | z_n`` from an MLP decoder (Bernoulli logits
    or a Gaussian mean with a learned noise per feature); ``q(z_n | x_n)`` is a
    diagonal Gaussian from an MLP encoder, or free per row.  Every task has its
    own networks (leading dimension M); the decoder's weights are model
    parameters, updated by the inner loop with the same per-row normalised
    weights as the encoder (see the module docstring).

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension k.
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden widths of the encoder and of the decoder (the decoder mirrors
        them); ``()`` gives linear maps.
    encoder_layer_sizes : tuple of int, default=None
        Hidden widths of the encoder alone, if they differ from
        ``hidden_layer_sizes`` (e.g. a small encoder on a large decoder).
    decoder : {"bernoulli", "gaussian"}, default="bernoulli"
        ``"bernoulli"``: pixels in [0, 1] (binarised images), logits from the
        decoder; ``"gaussian"``: real values, mean from the decoder and a
        learned noise standard deviation per feature.
    inference : {"amortized", "factorized"}, default="amortized"
        An MLP encoder shared by all rows, or free Gaussian parameters per row.
    activation : {"tanh", "relu", "softplus", "elu"}, default="tanh"
        Hidden activation of both networks.
    init_scale : float, default=1.0
        Multiplies the Glorot-scaled random initial weights.

    Attributes
    ----------
    variational_keys : tuple of str
        q's parameters (the encoder's, or every row's).
    local_keys : tuple of str
        Per-row parameters (factorised q only).

    See Also
    --------
    LinearGaussianLatent : The linear-Gaussian special case, with exact answers.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import VAELatent
    >>> model = VAELatent(n_components=2, hidden_layer_sizes=(8,))
    >>> tasks = pad_tasks([torch.bernoulli(torch.full((5, 6), 0.5))])
    >>> params = model.init_params(tasks, generator=torch.Generator().manual_seed(0))
    >>> eps = model.sample_eps(params, tasks, 3, generator=torch.Generator().manual_seed(1))
    >>> model.log_p(params, tasks, model.rsample(params, tasks, eps)).shape  # (M, S, K)
    torch.Size([1, 5, 3])
    """

    has_likelihood = False
    supports_minibatch = True

    def __init__(self, n_components=2, *, hidden_layer_sizes=(64,), encoder_layer_sizes=None,
                 decoder="bernoulli", inference="amortized", activation="tanh", init_scale=1.0):
        _check_positive_int("n_components", n_components)
        sizes = ((hidden_layer_sizes,) if isinstance(hidden_layer_sizes, Integral)
                 else tuple(hidden_layer_sizes))
        enc = sizes if encoder_layer_sizes is None else (
            (encoder_layer_sizes,) if isinstance(encoder_layer_sizes, Integral)
            else tuple(encoder_layer_sizes))
        for h in sizes + enc:
            _check_positive_int("every hidden layer size", h)
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {list(DECODERS)}, got {decoder!r}.")
        if inference not in INFERENCE:
            raise ValueError(f"inference must be one of {list(INFERENCE)}, got {inference!r}.")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}."
            )
        if (isinstance(init_scale, bool) or not isinstance(init_scale, Real)
                or not math.isfinite(init_scale) or not init_scale > 0):
            raise ValueError(f"init_scale must be a finite number > 0, got {init_scale!r}.")
        self.n_components = int(n_components)
        self.hidden_layer_sizes = sizes
        self.encoder_layer_sizes = enc
        self.decoder = decoder
        self.inference = inference
        self.activation = activation
        self.init_scale = init_scale

    def __repr__(self):
        return (f"VAELatent(n_components={self.n_components}, "
                f"hidden_layer_sizes={self.hidden_layer_sizes!r}, decoder={self.decoder!r}, "
                f"inference={self.inference!r}, activation={self.activation!r}, "
                f"init_scale={self.init_scale!r}, "
                f"encoder_layer_sizes={self.encoder_layer_sizes!r})")

    # ------------------------------------------------------------ layout
    def _encoder_layers(self):
        return len(self.encoder_layer_sizes)

    @property
    def variational_keys(self):
        """The parameters of q: the encoder's, or every row's own."""
        if self.inference == "factorized":
            return ("z_loc", "z_scale_raw")
        n = self._encoder_layers()
        hidden = tuple(k for i in range(n) for k in (f"enc_w{i}", f"enc_b{i}"))
        return hidden + ("enc_loc_w", "enc_loc_b", "enc_scale_w", "enc_scale_b")

    # ------------------------------------------------------------ params
    def init_params(self, tasks, *, generator):
        """Random Glorot-scaled weights; q starts with standard deviation one.

        Parameters
        ----------
        tasks : TaskBatch
            The tasks (M, their rows and features, dtype and device).
        generator : torch.Generator or TaskNoise
            Source of the random weights (a non-fixed one: every layer draws
            its own numbers).

        Returns
        -------
        params : dict of str to torch.Tensor
            Decoder and variational parameters with a leading task dimension M.
        """
        M, _, p = tasks.X.shape
        k, hidden, X = self.n_components, self.hidden_layer_sizes, tasks.X
        params = {}
        widths = (k, *hidden[::-1], p)
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            params[f"dec_w{i}"], params[f"dec_b{i}"] = self._dense(M, a, b, generator, X)
        if self.decoder == "gaussian":
            params["dec_noise_raw"] = torch.full((M, p), _inverse_softplus(1.0 - MIN_NOISE),
                                                 dtype=X.dtype, device=X.device)
        if self.inference == "amortized":
            widths = (p, *self.encoder_layer_sizes)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
                params[f"enc_w{i}"], params[f"enc_b{i}"] = self._dense(M, a, b, generator, X)
            last = widths[-1]
            params["enc_loc_w"], params["enc_loc_b"] = self._dense(M, last, k, generator, X)
            params["enc_scale_w"], params["enc_scale_b"] = self._dense(M, last, k, generator, X)
            # q's standard deviation starts at exactly one for every row.
            params["enc_scale_w"] = torch.zeros_like(params["enc_scale_w"])
            params["enc_scale_b"] = params["enc_scale_b"] + _inverse_softplus(1.0 - MIN_SCALE)
        params.update(self.init_local_params(tasks, generator=generator))
        return params

    # ------------------------------------------------------------ networks
    def _encode(self, params, tasks):
        h, _ = self._mlp(tasks.X, params, "enc", self._encoder_layers())
        return self._q_heads(params, h)

    def decode(self, params, z):
        """The decoder's output for particles ``z`` (M, S, K, k): logits or means (M, S, K, p).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        out : torch.Tensor of shape (M, S, K, p)
            Bernoulli logits, or the Gaussian means.
        """
        return self._decoder_output(params, z, len(self.hidden_layer_sizes))

    def noise(self, params):
        """The Gaussian decoder's noise standard deviation per feature, (M, p).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.

        Returns
        -------
        sigma : torch.Tensor of shape (M, p)
            ``softplus(dec_noise_raw) + 1e-3``.
        """
        return F.softplus(params["dec_noise_raw"]) + MIN_NOISE

    def decoder_log_prob(self, params, tasks, z):
        """``log p(x_n | z_nk)`` of every row and particle, shape (M, S, K).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The rows.
        z : torch.Tensor of shape (M, S, K, k)
            Latents.

        Returns
        -------
        log_lik : torch.Tensor of shape (M, S, K)
            Summed over the features of each row.
        """
        out = self.decode(params, z)
        x = tasks.X.unsqueeze(2)
        if self.decoder == "bernoulli":
            return -F.binary_cross_entropy_with_logits(out, x.expand_as(out),
                                                       reduction="none").sum(-1)
        sigma = self.noise(params)[:, None, None, :]
        return (-0.5 * ((x - out) / sigma) ** 2 - torch.log(sigma) - 0.5 * _LOG_2PI).sum(-1)

    # ------------------------------------------------------------ protocol
    def log_p(self, params, tasks, z):
        log_prior = (-0.5 * z**2 - 0.5 * _LOG_2PI).sum(-1)
        return log_prior + self.decoder_log_prob(params, tasks, z)


class FrozenDecoder(GaussianRowQ):
    """A fitted VAE's decoder held fixed, with a free Gaussian q per row.

    The model of *local* inference for given rows: refining q for the rows of a
    factorised VAE at prediction time, or finding the factorised optimum that
    the amortisation gap compares an encoder with.  Its only parameters are the
    per-row ``z_loc`` and ``z_scale_raw`` (``local_keys``), so the engine's
    inner loop, with any divergence, moves q and never the decoder.

    Parameters
    ----------
    vae : VAELatent
        The model whose decoder is used.
    decoder_params : dict of str to torch.Tensor
        Its decoder parameters (``dec_*`` keys), with a leading task dimension
        of one (broadcast over the tasks of a batch) or M.
    """

    inference = "factorized"
    has_likelihood = False
    supports_minibatch = True
    variational_keys = ("z_loc", "z_scale_raw")

    def __init__(self, vae, decoder_params):
        self.vae = vae
        self.n_components = vae.n_components
        self.decoder_params = {k: v for k, v in decoder_params.items() if k.startswith("dec_")}

    def __repr__(self):
        return f"FrozenDecoder({self.vae!r})"

    def init_params(self, tasks, *, generator):
        """Every row's q at the prior (see :meth:`GaussianRowQ.init_local_params`)."""
        return self.init_local_params(tasks, generator=generator)

    def sample_eps(self, params, tasks, n_particles, *, generator):
        """The same standard noise for every row of a task (common random numbers).

        The rows' problems are independent, so each row's fit then depends on
        its own data only, not on which other rows share the batch.
        """
        ref = next(iter(params.values()))
        M, S = tasks.mask.shape
        eps = randn((M, 1, n_particles, self.n_components), generator, dtype=ref.dtype,
                    device=ref.device)
        return eps.expand(M, S, n_particles, self.n_components)

    def _decoder(self, M):
        return {k: v.expand((M,) + v.shape[1:]) if v.shape[0] == 1 else v
                for k, v in self.decoder_params.items()}

    def log_p(self, params, tasks, z):
        return self.vae.log_p(self._decoder(z.shape[0]), tasks, z)
