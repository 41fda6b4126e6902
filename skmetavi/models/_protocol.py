"""The model protocol of the engine: latent sites, particles and per-site log weights.

The engine (:mod:`skmetavi._bilevel`) sees a model only through
:class:`LatentModel`.  Shapes use ``M`` tasks, ``S`` *sites* and ``K``
particles per site:

- a model with one global latent per task (a Bayesian regression's weights, a
  mixture's location) has ``S = 1`` (:class:`GlobalLatent`);
- a model with one latent per data point (a VAE, a factor model) has ``S`` equal
  to the rows of the task (or of the minibatch).

Log weights ``log p - log q`` are ``(M, S, K)``; every divergence weights the
``K`` particles of each site separately (weights and log-sum-exp per site,
never after summing the sites: pyro-ppl/pyro#3104), and the site terms are
added with :meth:`LatentModel.site_weights` (``N / batch`` for minibatches, 0
for padding), the way NumPyro's ``RenyiELBO`` treats ``plate``s.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["LatentModel", "GlobalLatent"]


class LatentModel:
    """Base class of the models the bilevel engine fits (the engine's protocol).

    A model owns its parameters' layout and its noise: the engine only calls the
    methods below and combines their ``(M, S, K)`` outputs.  Subclasses set
    :attr:`variational_keys` (and :attr:`local_keys`) and implement
    :meth:`init_params`, :meth:`sample_eps`, :meth:`rsample`, :meth:`log_q`
    and :meth:`log_p`.

    Parameters are a ``dict[str, Tensor]`` with a leading task dimension ``M``.
    Keys in :attr:`variational_keys` are q's parameters ``phi`` (an encoder's
    weights, or a Gaussian's mean and scale); the others are model parameters
    (a decoder, a noise scale) point-estimated by the same inner loop with the
    divergence's weights.  Keys in :attr:`local_keys` hold one value per row of
    a task (``(M, n_rows, ...)``, a factorised q): under minibatching the engine
    gathers the minibatch's rows before calling the model and scatters the
    update back, so rows outside the minibatch stay untouched; Algorithm 2
    never shares them across tasks.

    Attributes
    ----------
    variational_keys : tuple of str
        Parameters of q.
    local_keys : tuple of str
        Per-row parameters (a subset of the parameters), empty by default.
    has_likelihood : bool
        Whether the model has one global latent and a per-row
        ``log_likelihood`` of shape (M, 1, K, n_rows) (the ``"nll"`` meta-loss,
        :class:`~skmetavi.divergences.LocalRenyi`).
    supports_minibatch : bool
        Whether a minibatch of rows with the likelihood rescaled by ``N /
        batch`` is an unbiased estimate.
    exchangeable_rows : bool
        Whether a task's rows are exchangeable observations, so that held-out
        rows of a task are a smaller sample of the same task (a callable
        meta-loss is then scored on held-out rows).

    See Also
    --------
    GlobalLatent : The adapter of a variational family and a target (S = 1).
    skmetavi.models.LinearGaussianLatent : A model with one latent per row.

    Examples
    --------
    One latent per row, ``z_n ~ N(0, 1)``, ``x_n ~ N(z_n, 1)``, with the exact
    posterior ``q(z_n | x_n) = N(x_n / 2, 1 / 2)`` as an amortised q, so that
    every site's log weights are constant:

    >>> import math, torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import LatentModel
    >>> Normal = torch.distributions.Normal
    >>> class NormalNormal(LatentModel):
    ...     def init_params(self, tasks, *, generator):
    ...         return {}
    ...     def sample_eps(self, params, tasks, n_particles, *, generator):
    ...         M, S = tasks.mask.shape
    ...         return torch.randn(M, S, n_particles, 1, generator=generator, dtype=tasks.X.dtype)
    ...     def rsample(self, params, tasks, eps):
    ...         return tasks.X.unsqueeze(2) / 2 + math.sqrt(0.5) * eps
    ...     def log_q(self, params, tasks, z):
    ...         return Normal(tasks.X.unsqueeze(2) / 2, math.sqrt(0.5)).log_prob(z).sum(-1)
    ...     def log_p(self, params, tasks, z):
    ...         x = tasks.X.unsqueeze(2)
    ...         return (Normal(0.0, 1.0).log_prob(z) + Normal(z, 1.0).log_prob(x)).sum(-1)
    >>> tasks = pad_tasks([torch.tensor([[0.5], [2.0], [-1.0]], dtype=torch.float64)])
    >>> model = NormalNormal()
    >>> eps = model.sample_eps({}, tasks, 4, generator=torch.Generator().manual_seed(0))
    >>> z = model.rsample({}, tasks, eps)
    >>> log_w = model.log_p({}, tasks, z) - model.log_q({}, tasks, z)
    >>> log_w.shape  # (M tasks, S sites, K particles)
    torch.Size([1, 3, 4])
    >>> bool(torch.allclose(log_w, log_w[..., :1]))
    True
    """

    variational_keys: tuple = ()
    local_keys: tuple = ()
    has_likelihood: bool = False
    supports_minibatch: bool = True
    exchangeable_rows: bool = True

    def init_params(self, tasks, *, generator) -> dict:
        """Return initial parameters for the tasks of ``tasks``.

        Parameters
        ----------
        tasks : TaskBatch
            The tasks (their number, dtype and device, and for local parameters
            their rows).
        generator : torch.Generator or TaskNoise
            Source of randomness.

        Returns
        -------
        params : dict of str to torch.Tensor
            Variational and model parameters with a leading task dimension M.
        """
        raise NotImplementedError

    def init_local_params(self, tasks, *, generator) -> dict:
        """Return initial per-row parameters (:attr:`local_keys`) for the tasks of ``tasks``.

        Algorithm 2 starts every task's local parameters here (they are not shared).
        The default takes them from :meth:`init_params`.

        Parameters
        ----------
        tasks : TaskBatch
            The tasks.
        generator : torch.Generator or TaskNoise
            Source of randomness.

        Returns
        -------
        params : dict of str to torch.Tensor
            The local parameters, ``(M, n_rows, ...)`` each.
        """
        params = self.init_params(tasks, generator=generator)
        return {k: params[k] for k in self.local_keys}

    def sample_eps(self, params, tasks, n_particles, *, generator) -> torch.Tensor:
        """Draw the standard noise that :meth:`rsample` maps to particles.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters (their dtype, device and M).
        tasks : TaskBatch
            The tasks (their sites).
        n_particles : int
            Particles K per site.
        generator : torch.Generator or TaskNoise
            Source of randomness (never the global torch RNG).

        Returns
        -------
        eps : torch.Tensor
            Noise, typically of shape (M, S, K, d).
        """
        raise NotImplementedError

    def rsample(self, params, tasks, eps) -> torch.Tensor:
        """Map noise to particles ``z = r_phi(eps; data)``, differentiable in ``params``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The tasks (an amortised q reads their rows).
        eps : torch.Tensor
            Noise from :meth:`sample_eps`.

        Returns
        -------
        z : torch.Tensor of shape (M, S, K, d)
            Particles.
        """
        raise NotImplementedError

    def log_q(self, params, tasks, z) -> torch.Tensor:
        """Evaluate ``log q_phi(z)`` per site and particle, differentiable in ``params`` and ``z``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The tasks.
        z : torch.Tensor of shape (M, S, K, d)
            Points.

        Returns
        -------
        log_q : torch.Tensor of shape (M, S, K)
            Log density of q.
        """
        raise NotImplementedError

    def log_q_reparameterised(self, params, tasks, eps) -> torch.Tensor:
        """Evaluate ``log q(r_phi(eps))`` as a function of ``params`` (all derivatives).

        The default composes :meth:`rsample` and :meth:`log_q`; models override it
        with a cheaper identity (``log N(eps) - log|det scale|`` for Gaussians).
        Used for total-derivative divergences, which do not need d/dz.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The tasks.
        eps : torch.Tensor
            Noise from :meth:`sample_eps`.

        Returns
        -------
        log_q : torch.Tensor of shape (M, S, K)
            Log density of q at the particles.
        """
        return self.log_q(params, tasks, self.rsample(params, tasks, eps))

    def log_p(self, params, tasks, z) -> torch.Tensor:
        """Evaluate the unnormalised ``log p(z, data)`` of every site, differentiable in z.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters (model parameters included).
        tasks : TaskBatch
            The tasks.
        z : torch.Tensor of shape (M, S, K, d)
            Particles.

        Returns
        -------
        log_p : torch.Tensor of shape (M, S, K)
            Log joint density of each site's data and latent.
        """
        raise NotImplementedError

    def elements_per_task(self, n_rows, n_features, n_particles) -> Optional[int]:
        """Return the size of the largest intermediate tensor of one task's :meth:`log_p`.

        Sizes the chunks of ``task_chunk_size="auto"``
        (:func:`skmetavi._tasks.auto_task_chunk`); None (the default) when unknown,
        and then all tasks are processed at once.

        Parameters
        ----------
        n_rows : int
            Rows of the task (or of its minibatch).
        n_features : int
            Columns of ``X``.
        n_particles : int
            Particles K.

        Returns
        -------
        n_elements : int or None
            The size, or None.
        """
        return None

    def site_weights(self, tasks) -> Optional[torch.Tensor]:
        """Return the weight of each site's term in the task's objective.

        The default, for one site per row: ``mask * lik_scale`` (``N / batch``
        under minibatching, 0 on padding).

        Parameters
        ----------
        tasks : TaskBatch
            The tasks.

        Returns
        -------
        weights : torch.Tensor of shape (M, S) or None
            Non-negative weights, zero exactly on padding sites; None means one
            site per task with weight one.
        """
        return tasks.mask.to(tasks.lik_scale.dtype) * tasks.lik_scale.unsqueeze(-1)


class GlobalLatent(LatentModel):
    """A variational family and a target with one global latent per task (S = 1).

    The adapter through which the Gaussian families of
    :mod:`skmetavi.models` and every :class:`~skmetavi.models.Target` reach the
    engine: particles ``(M, 1, K, d)``, log weights ``(M, 1, K)``, and the
    likelihood's minibatch scaling applied inside the target's ``log_joint``.

    Parameters
    ----------
    family : MeanFieldGaussian or FullCovarianceGaussian
        The variational family.
    target : Target
        The model of each task.
    init_loc : float, default=0.0
        Mean of every coordinate of the initial q (a target's own
        ``init_loc(n_tasks, n_features, ...)`` method, as a BNN's, overrides it).
    init_scale : float, default=1.0
        Standard deviation of the initial q.

    See Also
    --------
    LatentModel : The protocol.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import GaussianMean, GlobalLatent, MeanFieldGaussian
    >>> model = GlobalLatent(MeanFieldGaussian(2), GaussianMean())
    >>> tasks = pad_tasks([torch.zeros(5, 2, dtype=torch.float64)])
    >>> params = model.init_params(tasks, generator=torch.Generator())
    >>> eps = model.sample_eps(params, tasks, 3, generator=torch.Generator())
    >>> model.log_p(params, tasks, model.rsample(params, tasks, eps)).shape
    torch.Size([1, 1, 3])
    """

    def __init__(self, family, target, *, init_loc=0.0, init_scale=1.0):
        self.family = family
        self.target = target
        self.init_loc = init_loc
        self.init_scale = init_scale

    def __repr__(self):
        return f"GlobalLatent({self.family!r}, {self.target!r})"

    @property
    def variational_keys(self):
        """The family's parameter names: the parameters of q."""
        return tuple(self.family.param_names)

    @property
    def n_latent(self) -> int:
        """Dimension of the latent variable."""
        return self.family.n_latent

    @property
    def has_likelihood(self):
        """Whether the target has a per-row likelihood."""
        return self.target.has_likelihood

    @property
    def supports_minibatch(self):
        """Whether the target's rows may be minibatched."""
        return self.target.supports_minibatch

    @property
    def exchangeable_rows(self):
        """Whether the target's rows are exchangeable observations (may be held out)."""
        return self.target.exchangeable_rows

    def init_params(self, tasks, *, generator):
        M, n_features = tasks.n_tasks, tasks.X.shape[-1]
        dtype, device = tasks.X.dtype, tasks.X.device
        params = self.family.init_params(
            M, loc=self.init_loc, scale=self.init_scale, dtype=dtype, device=device
        )
        if hasattr(self.target, "init_loc"):
            params["loc"] = self.target.init_loc(
                M, n_features, generator=generator, dtype=dtype, device=device
            )
        params.update(self.target.init_params(M, dtype=dtype, device=device))
        return params

    def _var(self, params):
        return {k: params[k] for k in self.family.param_names}

    def sample_eps(self, params, tasks, n_particles, *, generator):
        ref = params[self.family.param_names[0]]
        eps = self.family.sample_eps(
            ref.shape[0], n_particles, generator=generator, dtype=ref.dtype, device=ref.device
        )
        return eps.unsqueeze(1)  # (M, 1, K, d): the same numbers as (M, K, d)

    @staticmethod
    def _particles(t):
        # The one site, as the family's (M, K, d); noise may come with or without it.
        return t.reshape(t.shape[0], -1, t.shape[-1])

    def rsample(self, params, tasks, eps):
        return self.family.rsample(self._var(params), self._particles(eps)).unsqueeze(1)

    def log_q(self, params, tasks, z):
        return self.family.log_prob(self._var(params), self._particles(z)).unsqueeze(1)

    def log_q_reparameterised(self, params, tasks, eps):
        return self.family.log_prob_reparameterised(self._var(params), self._particles(eps)).unsqueeze(1)

    def log_p(self, params, tasks, z):
        return self.target.log_joint(self._particles(z), tasks, params).unsqueeze(1)

    def site_weights(self, tasks):
        return None  # one site, weight one: the minibatch scale is inside log_joint

    def elements_per_task(self, n_rows, n_features, n_particles):
        """Return K times the larger of the particle and ``target.elements_per_particle``.

        Parameters
        ----------
        n_rows : int
            Rows of the task.
        n_features : int
            Columns of ``X``.
        n_particles : int
            Particles K.

        Returns
        -------
        n_elements : int or None
            None when the target does not tell its size.
        """
        per_particle = getattr(self.target, "elements_per_particle", None)
        n = per_particle(n_rows, n_features) if per_particle is not None else None
        return None if n is None else n_particles * max(int(n), self.n_latent)

    def log_likelihood(self, params, tasks, z):
        """Per-row log-likelihood ``log p(y_n | x_n, z)``, shape (M, 1, K, n_rows).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The tasks.
        z : torch.Tensor of shape (M, 1, K, d)
            Particles.

        Returns
        -------
        log_lik : torch.Tensor of shape (M, 1, K, n_rows)
            Arbitrary on padding rows.
        """
        return self.target.log_likelihood(self._particles(z), tasks, params).unsqueeze(1)

    def log_prior(self, params, tasks, z):
        """The target's ``log_prior`` at the particles, shape (M, 1, K).

        With :meth:`log_likelihood`, the split of ``log_p`` that local divergences
        (:class:`~skmetavi.divergences.LocalRenyi`) weight term by term.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch
            The tasks.
        z : torch.Tensor of shape (M, 1, K, d)
            Particles.

        Returns
        -------
        log_prior : torch.Tensor of shape (M, 1, K)
            ``log p_0(z_k)`` of each task's particles.
        """
        return self.target.log_prior(self._particles(z), params).unsqueeze(1)

    def distribution(self, params, tasks=None):
        """Each task's q as a ``torch.distributions.MultivariateNormal`` of batch shape (M,).

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters.
        tasks : TaskBatch, default=None
            Unused (q does not depend on the data).

        Returns
        -------
        q : torch.distributions.MultivariateNormal
            Differentiable in the variational parameters.
        """
        return self.family.distribution(self._var(params))

    def quadrature_range(self, tasks):
        """The target's ``quadrature_range`` (see :class:`~skmetavi.models.Target`).

        Parameters
        ----------
        tasks : TaskBatch
            The tasks.

        Returns
        -------
        low_high : tuple of float or None
            An interval covering the target's mass.
        """
        return self.target.quadrature_range(tasks)
