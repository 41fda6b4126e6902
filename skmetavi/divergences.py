"""Divergences for variational inference whose parameters can be meta-learned.

Every divergence is a pure :class:`torch.nn.Module`: its meta-parameters
:math:`\\eta` are ``self.parameters()``, it never calls ``.backward()``,
``.item()`` or ``.detach()`` on anything :math:`\\eta` must see, and the caller
decides ``create_graph``.  A divergence is defined by its *particle weights*:
given the log importance weights :math:`\\ell_k = \\log p(z_k, D) - \\log
q_\\phi(z_k)` of :math:`K` reparameterised particles, the inner VI update
direction is

.. math::

    \\Delta\\phi = \\sum_k w_k(\\ell; \\eta) \\, \\nabla_\\phi \\ell_k,

where :math:`\\nabla_\\phi` is the total derivative (Rényi family, Eq. (4) of
Zhang et al. 2021) or the path-only derivative (f-divergences, Eq. (8)),
according to :attr:`Divergence.path_derivative`.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import abc
import copy
import math
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn import functional as F

from skmetavi._params import ParamsMixin

__all__ = [
    "Divergence",
    "KL",
    "Renyi",
    "FDivergence",
    "NeuralF",
    "TailAdaptive",
    "LocalRenyi",
    "make_divergence",
    "DIVERGENCE_NAMES",
]


def _log_mean_exp(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def _centred(log_w: torch.Tensor) -> torch.Tensor:
    """``log_w`` minus its detached maximum over particles (a constant per site).

    The weights below are invariant to that shift, and so are their derivatives;
    but in float32, multiplying or normalising log weights of magnitude ~1e4 first
    loses the digits that the meta-gradient needs (the alpha-gradient of Renyi's
    weights: median relative error 1.5e-3, max 0.6, against 4e-7 and 3e-5 centred;
    300 draws, log weights around -2e4 with unit spread).
    """
    shift = log_w.detach().amax(-1, keepdim=True)
    return log_w - torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))


def _check_log_w(log_w: torch.Tensor) -> None:
    if not isinstance(log_w, torch.Tensor):
        raise TypeError(
            f"log-weights must be a torch.Tensor, got {type(log_w).__name__}; convert them "
            "with torch.as_tensor(log_w)."
        )
    if log_w.ndim == 0 or log_w.shape[-1] == 0:
        raise ValueError(
            "log-weights must have a trailing particle dimension of size >= 1, "
            f"got shape {tuple(log_w.shape)}; pass shape (..., n_particles), e.g. "
            "log_w.reshape(1) for a single particle."
        )


class Divergence(ParamsMixin, nn.Module, abc.ABC):
    """Base class of the divergences; subclasses override one hook.

    Subclasses implement :meth:`particle_weights`.  Everything else
    (:meth:`surrogate`, :meth:`bound`, the scikit-learn parameter protocol) is
    shared.

    Attributes
    ----------
    path_derivative : bool
        If True, the inner update uses the path-only derivative of
        :math:`\\ell_k` (the score term :math:`\\nabla_\\phi\\log q_\\phi(z)` at
        fixed :math:`z` is dropped, Eq. (8)); if False, the total derivative
        (Eq. (4)).

    See Also
    --------
    KL : Uniform weights, standard VI.
    Renyi : The Rényi alpha family, with a learnable alpha.
    FDivergence : The f-divergences, with a path-only update, Eq. (8).
    NeuralF : An f-divergence whose g is a learnable network.
    TailAdaptive : Rank-based weights of Wang et al. (2018).

    Examples
    --------
    A divergence needs only its particle weights:

    >>> import torch
    >>> from skmetavi.divergences import Divergence
    >>> class Uniform(Divergence):
    ...     def particle_weights(self, log_w):
    ...         return torch.full_like(log_w, 1.0 / log_w.shape[-1])
    >>> Uniform().surrogate(torch.tensor([0.0, 1.0]), torch.tensor([0.0, 0.0]))
    tensor(-0.5000)
    """

    path_derivative: bool = False
    #: Whether the weights act per likelihood term (data row) instead of on the
    #: joint: see :class:`LocalRenyi`.
    local: bool = False

    # ------------------------------------------------------------------ math
    @abc.abstractmethod
    def particle_weights(self, log_w: torch.Tensor) -> torch.Tensor:
        """Normalised particle weights, differentiable in eta and ``log_w``.

        Parameters
        ----------
        log_w : torch.Tensor of shape (..., n_particles)
            Log importance weights :math:`\\log p(z_k, D) - \\log q(z_k)`.

        Returns
        -------
        w : torch.Tensor of shape (..., n_particles)
            Non-negative weights; they sum to one over the last dimension,
            except for an unnormalised :class:`FDivergence`.
        """

    def surrogate(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Scalar loss whose gradient in the variational parameters is the update.

        ``-sum_k w_k * (log_p - log_q)_k``, summed over leading (task)
        dimensions, with the weights computed from the *values* of the log
        weights: its first derivative in the variational parameters is
        :math:`-\\sum_k w_k \\nabla_\\phi \\ell_k` and it stays differentiable in
        eta.  For ``path_derivative`` divergences pass ``log_q`` evaluated with
        detached variational parameters.  Exact higher-order derivatives through
        several inner steps are taken by :mod:`skmetavi`'s engine, which uses
        :meth:`particle_weights` directly.

        Parameters
        ----------
        log_p : torch.Tensor of shape (..., n_particles)
            Unnormalised log target density at the particles.
        log_q : torch.Tensor of shape (..., n_particles)
            Log variational density at the particles.

        Returns
        -------
        loss : torch.Tensor of shape ()
            The surrogate loss; minimising it ascends the divergence's bound.
        """
        log_w = log_p - log_q  # (..., n_particles)
        w = self.particle_weights(log_w.detach())
        return -(w * log_w).sum()

    def bound(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Monitoring value of the objective; the ELBO unless overridden.

        Parameters
        ----------
        log_p : torch.Tensor of shape (..., n_particles)
            Unnormalised log target density at the particles.
        log_q : torch.Tensor of shape (..., n_particles)
            Log variational density at the particles.

        Returns
        -------
        value : torch.Tensor of shape (...)
            A Monte Carlo estimate, higher is better.
        """
        return (log_p - log_q).mean(-1)

    def forward(self, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
        """Compute :meth:`surrogate`, so that ``divergence(log_p, log_q)`` is the loss.

        Parameters
        ----------
        log_p : torch.Tensor of shape (..., n_particles)
            Unnormalised log target density at the particles.
        log_q : torch.Tensor of shape (..., n_particles)
            Log variational density at the particles.

        Returns
        -------
        loss : torch.Tensor of shape ()
            The surrogate loss of :meth:`surrogate`.
        """
        return self.surrogate(log_p, log_q)

    # ------------------------------------------------- scikit-learn protocol
    @property
    def learnable(self) -> bool:
        """Whether the divergence has meta-parameters to learn."""
        return any(p.requires_grad for p in self.parameters())

    def __repr__(self):
        return ParamsMixin.__repr__(self)


class KL(Divergence):
    """Reverse Kullback-Leibler divergence KL(q || p): standard VI (the ELBO).

    All particles get weight ``1/K``; the update is the reparameterised ELBO
    gradient.  It has no meta-parameters.

    See Also
    --------
    Renyi : The Rényi family, equal to ``KL`` at ``alpha=1``.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import KL
    >>> KL().particle_weights(torch.tensor([0.0, 1.0, 5.0]))
    tensor([0.3333, 0.3333, 0.3333])
    """

    def particle_weights(self, log_w):
        _check_log_w(log_w)
        return torch.full_like(log_w, 1.0 / log_w.shape[-1])


def _inverse_softplus(x: float) -> float:
    # log(exp(x) - 1), stable for large x.
    return x + math.log(-math.expm1(-x))


def _check_positive_real(name, value, cls_name, hint=""):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{cls_name}: {name} must be a real number, got "
            f"{type(value).__name__} {value!r}.{hint}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"{cls_name}: {name} must be a finite number > 0, got {value!r}.{hint}"
        )


class Renyi(Divergence):
    """Rényi's alpha-divergence D_alpha(q || p), the variational Rényi (VR) bound.

    The inner update is the gradient of the VR bound (Li & Turner 2016) in the
    form of Eq. (4) of Zhang et al. (2021): particle weights
    ``softmax((1 - alpha) * log_w)`` times the total derivative of the log
    weights.  The weights are continuous in ``alpha`` on ``(0, inf)``,
    including ``alpha = 1`` where they are uniform (the ELBO gradient), so the
    meta-gradient in ``alpha`` is well defined everywhere.

    Parameters
    ----------
    alpha : float, default=0.5
        The order alpha > 0.  ``alpha=1`` is KL(q||p); ``alpha -> 0`` approaches
        the importance-weighted (IWAE) bound and KL(p||q).
    learnable : bool, default=True
        If True, ``alpha`` is a meta-parameter, stored as
        ``alpha = softplus(raw_alpha)`` so that it stays positive.

    Attributes
    ----------
    raw_alpha : torch.nn.Parameter or buffer of shape ()
        Unconstrained parameter, ``alpha = softplus(raw_alpha)``.

    See Also
    --------
    KL : The ``alpha = 1`` member.
    FDivergence : The same weights with a path-only derivative.

    Notes
    -----
    The VR bound :math:`\\frac{1}{1-\\alpha}\\log\\frac1K\\sum_k
    e^{(1-\\alpha)\\ell_k}` is evaluated (in :meth:`bound`) with a
    second-order expansion when :math:`|1-\\alpha|` is tiny, instead of the
    ``0/0`` that naive autodiff produces at ``alpha = 1``.

    References
    ----------
    .. [1] Li, Y. and Turner, R. E. "Rényi divergence variational inference",
       NeurIPS 2016.
    .. [2] Zhang, R., Li, Y., De Sa, C., Devlin, S. and Zhang, C.
       "Meta-learning divergences of variational inference", AISTATS 2021.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import Renyi
    >>> d = Renyi(alpha=0.5)
    >>> w = d.particle_weights(torch.tensor([0.0, 2.0]))
    >>> [round(v, 4) for v in w.tolist()]
    [0.2689, 0.7311]
    """

    _SMALL_ALPHA_HINT = "approaches the importance-weighted (IWAE) bound."

    def __init__(self, alpha=0.5, *, learnable=True):
        super().__init__()
        name = type(self).__name__
        _check_positive_real(
            "alpha",
            alpha,
            name,
            " Use e.g. alpha=0.5; alpha=1 is KL(q||p) and a small alpha such as 1e-3 "
            + self._SMALL_ALPHA_HINT,
        )
        if not isinstance(learnable, bool):
            raise TypeError(
                f"{name}: learnable must be a bool, got {learnable!r}; pass True to "
                "meta-learn alpha or False to keep it fixed."
            )
        raw = torch.tensor(_inverse_softplus(float(alpha)), dtype=torch.float64)
        if learnable:
            self.raw_alpha = nn.Parameter(raw)
        else:
            self.register_buffer("raw_alpha", raw)
        self._learnable_flag = learnable

    # ``alpha`` and ``learnable`` read back the *current* state so that
    # get_params / clone keep a learned alpha.
    @property
    def alpha(self) -> float:
        """The current order alpha, a float (learned by ``meta_fit`` if learnable)."""
        return float(self.alpha_tensor().detach())

    @property
    def learnable(self) -> bool:  # noqa: D102 - documented on the base class
        return self._learnable_flag

    def alpha_tensor(self) -> torch.Tensor:
        """Return alpha as a differentiable tensor, ``softplus(raw_alpha)``.

        Returns
        -------
        alpha : torch.Tensor of shape ()
            The order alpha, differentiable in ``raw_alpha``.
        """
        return F.softplus(self.raw_alpha)

    def particle_weights(self, log_w):
        _check_log_w(log_w)
        one_minus_alpha = 1.0 - self.alpha_tensor().to(log_w.dtype)
        # Eq. (4): w = softmax((1 - alpha) * log_w), invariant to a constant shift of
        # log_w: centred first, so that float32 keeps the alpha-gradient's digits.
        return torch.softmax(one_minus_alpha * _centred(log_w), dim=-1)

    def bound(self, log_p, log_q):
        """Variational Rényi bound ``log mean_k exp((1 - alpha) l_k) / (1 - alpha)``.

        Parameters
        ----------
        log_p : torch.Tensor of shape (..., n_particles)
            Unnormalised log target density at the particles.
        log_q : torch.Tensor of shape (..., n_particles)
            Log variational density at the particles.

        Returns
        -------
        value : torch.Tensor of shape (...)
            A Monte Carlo estimate of the VR bound (the ELBO at ``alpha = 1``),
            higher is better.
        """
        log_w = log_p - log_q
        c = 1.0 - self.alpha_tensor().to(log_w.dtype)
        # Near alpha = 1 the ratio logmeanexp(c * l) / c is 0/0; use the
        # cumulant expansion mean + c/2 var (error O(c^2)) there instead.
        small = c.abs() < 1e-4
        c_safe = torch.where(small, torch.ones_like(c), c)
        exact = _log_mean_exp(c_safe * log_w) / c_safe
        mean = log_w.mean(-1)
        var = log_w.var(-1, unbiased=False) if log_w.shape[-1] > 1 else 0 * mean
        series = mean + 0.5 * c * var
        return torch.where(small, series, exact)

    def extra_repr(self):
        return f"alpha={self.alpha:.4g}, learnable={self.learnable}"


class LocalRenyi(Renyi):
    """Local (per-data-point) alpha-energy, the reparameterised black-box alpha; alpha learnable.

    :class:`Renyi` tilts the whole joint: with many likelihood terms the log
    weights ``l_k`` of K particles spread over tens to hundreds of nats and the
    weights ``softmax((1 - alpha) l)`` become one-hot for any ``alpha != 1``.
    The local energy tilts each likelihood term instead,

    .. math::

        \\mathcal{L}_\\alpha(q) = \\sum_n \\frac{1}{1-\\alpha}
        \\log \\mathbb{E}_q\\big[p(y_n \\mid x_n, z)^{1-\\alpha}\\big]
        - \\mathrm{KL}(q \\,\\|\\, p_0),

    the black-box alpha objective in the reparameterised form of Li and Gal
    (2017), an approximation of the energy of Hernández-Lobato et al. (2016)
    with ``alpha_BB = 1 - alpha``.  Its reparameterised gradient gives row ``n``
    its own particle weights ``softmax_k((1 - alpha) log p(y_n | x_n, z_k))``
    -- one row's log-likelihood spreads over a few nats, so the weights do not
    collapse -- and the prior and entropy terms the uniform weights of the ELBO.
    ``alpha = 1`` is KL(q||p) exactly; ``alpha = 0.5`` is black-box alpha's
    recommended ``alpha_BB = 0.5``; ``alpha -> 0`` maximises each row's
    predictive likelihood under q, minus ``KL(q || p_0)``.  The convention is
    :class:`Renyi`'s, so a meta-learner started at ``alpha = 1`` starts from
    standard VI.

    It needs a model with one global latent and a per-row likelihood (a
    :class:`~skmetavi.models.Target` with ``has_likelihood = True`` and its own
    ``log_prior``, such as the BNN of :class:`~skmetavi.MetaBNNRegressor`), whose
    ``log_joint`` is ``log_prior`` plus the rows' log-likelihoods.  The engine
    evaluates it term by term: :meth:`surrogate` and :meth:`bound`, which only
    see the joint, refuse; :meth:`particle_weights` takes one row's
    log-likelihoods (..., n_particles).

    Parameters
    ----------
    alpha : float, default=0.5
        The order alpha > 0 (``alpha=1`` is KL(q||p)).
    learnable : bool, default=True
        If True, ``alpha`` is a meta-parameter, ``alpha = softplus(raw_alpha)``.

    Attributes
    ----------
    raw_alpha : torch.nn.Parameter or buffer of shape ()
        Unconstrained parameter, ``alpha = softplus(raw_alpha)``.

    See Also
    --------
    Renyi : The global (joint) alpha-divergence.

    References
    ----------
    .. [1] Hernández-Lobato, J. M., Li, Y., Rowland, M., Bui, T., Hernández-Lobato,
       D. and Turner, R. E. "Black-box alpha divergence minimization", ICML 2016.
    .. [2] Li, Y. and Gal, Y. "Dropout inference in Bayesian neural networks with
       alpha-divergences", ICML 2017.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import LocalRenyi
    >>> d = LocalRenyi(alpha=0.5)
    >>> # per-row weights over K = 2 particles: (rows, particles)
    >>> [round(v, 4) for v in d.particle_weights(torch.tensor([[0.0, 2.0]]))[0].tolist()]
    [0.2689, 0.7311]
    """

    local = True
    _SMALL_ALPHA_HINT = "weights each row's predictive likelihood under q."

    def __init__(self, alpha=0.5, *, learnable=True):
        super().__init__(alpha, learnable=learnable)

    def _joint_only(self, what):
        raise TypeError(
            f"LocalRenyi.{what} is not defined on the joint log weights: the local energy "
            "needs each row's log-likelihood. The estimators and the engine evaluate it term "
            "by term (see local_bound); use Renyi for a joint-only objective."
        )

    def surrogate(self, log_p, log_q):  # noqa: D102 - see _joint_only
        self._joint_only("surrogate")

    def bound(self, log_p, log_q):  # noqa: D102 - see _joint_only
        self._joint_only("bound")

    def local_bound(self, log_lik, row_weights, log_rest):
        """The local alpha-energy's Monte Carlo estimate (higher is better).

        Parameters
        ----------
        log_lik : torch.Tensor of shape (..., n_rows, n_particles)
            ``log p(y_n | x_n, z_k)`` per row and particle.
        row_weights : torch.Tensor of shape (..., n_rows)
            Each row's weight in the sum (``N / batch`` under minibatching, 0 on
            padding).
        log_rest : torch.Tensor of shape (..., n_particles)
            ``log p_0(z_k) - log q(z_k)``.

        Returns
        -------
        value : torch.Tensor of shape (...)
            ``sum_n c_n VR_alpha(log_lik_n) + mean_k log_rest_k``; the ELBO at
            ``alpha = 1``.
        """
        per_row = super().bound(log_lik, torch.zeros_like(log_lik))
        per_row = torch.where(row_weights != 0, per_row, torch.zeros_like(per_row))
        return (row_weights * per_row).sum(-1) + log_rest.mean(-1)


class FDivergence(Divergence):
    """The f-divergence D_f(p || q) = E_q[f(p/q)] with a fixed ``g(t) = t^2 f''(t)``.

    The inner update is Eq. (8) of Zhang et al. (2021) (Proposition 1 of Wang
    et al. 2018): a path-only gradient weighted by ``g(t_k)`` at the
    self-normalised density ratios ``t_k = K * softmax(log_w)_k``.  Any
    ``g >= 0`` defines a valid f (Proposition 2).

    Parameters
    ----------
    a : float, default=0.0
        Exponent of the power family ``g(t) = t**a``
        (``f(t) = t**a / (a (a - 1))``): ``a=0`` is KL(q||p), ``a=1`` is
        KL(p||q) (the IWAE end), ``a=0.5`` the Hellinger distance and ``a=2``
        the chi-square divergence.  With ``a = 1 - alpha`` the weights equal
        :class:`Renyi`'s.  Ignored when ``log_g`` is given.
    log_g : callable or None, default=None
        A torch function mapping ``log t`` to ``log g(t)`` (elementwise).
        Overrides ``a``.
    normalize : bool, default=True
        If True the weights are ``g(t_k) / sum_j g(t_j)``, which makes the
        update invariant to the scale of g (``f`` and ``c f`` define the same
        divergence).  If False they are ``g(t_k) / K`` (the plain Monte Carlo
        estimate of Eq. (8)), so the scale of g acts as an inner step size.

    See Also
    --------
    NeuralF : The function g given by a learnable network.
    Renyi : The same weights at ``a = 1 - alpha`` but the total derivative.

    Notes
    -----
    Eq. (8) in the paper's orientation *descends* D_f(p||q); the weights here
    multiply the gradient of ``log p - log q``, i.e. they give the ascent
    direction of the negative divergence, like the ELBO.  With ``normalize``
    the Rényi update of order alpha equals ``alpha`` times the ``a = 1 - alpha``
    update in the many-particle limit (the score-function identity).

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import FDivergence
    >>> chi2 = FDivergence.chi2()
    >>> chi2.particle_weights(torch.tensor([0.0, 0.0])).tolist()
    [0.5, 0.5]
    """

    path_derivative = True

    #: Upper clamp on ``log g`` for unnormalised weights, against overflow.
    LOG_G_MAX = 30.0

    def __init__(self, a=0.0, *, log_g=None, normalize=True):
        super().__init__()
        if log_g is None:
            if isinstance(a, bool) or not isinstance(a, Real) or not math.isfinite(a):
                raise ValueError(
                    f"FDivergence: a must be a finite real number, got {a!r}; e.g. a=0.0 "
                    "(KL(q||p)), a=1.0 (KL(p||q)) or a=2.0 (chi-square)."
                )
        elif not callable(log_g):
            raise TypeError(
                "FDivergence: log_g must be a callable mapping log t to log g(t), "
                f"got {type(log_g).__name__}."
            )
        if not isinstance(normalize, bool):
            raise TypeError(
                f"normalize must be a bool, got {normalize!r}; True for self-normalised "
                "weights, False for the plain Monte Carlo weights g(t_k) / K."
            )
        self.a = a
        self.log_g_fn = log_g
        self.normalize = normalize

    @property
    def log_g(self):
        """The ``log_g`` callable given at construction, or None for the power family."""
        return self.log_g_fn

    @classmethod
    def reverse_kl(cls):
        """Build KL(q||p): ``g = 1`` (standard VI with a path-only gradient).

        Returns
        -------
        divergence : FDivergence
            The member of the power family.
        """
        return cls(0.0)

    @classmethod
    def forward_kl(cls):
        """Build KL(p||q): ``g(t) = t`` (the importance-weighted end).

        Returns
        -------
        divergence : FDivergence
            The member of the power family.
        """
        return cls(1.0)

    @classmethod
    def hellinger(cls):
        """Build the squared Hellinger distance: ``g(t) ∝ t^(1/2)``, D_0.5's update.

        Returns
        -------
        divergence : FDivergence
            The member of the power family.
        """
        return cls(0.5)

    @classmethod
    def chi2(cls):
        """Build Pearson's chi-square ``E_q[(p/q - 1)^2]``: ``g(t) ∝ t^2``.

        Its ``t^2 f''(t)`` is ``2 t^2``; the constant factor does not change the
        normalised update, and with ``normalize=False`` it only rescales the step.

        Returns
        -------
        divergence : FDivergence
            The member of the power family.
        """
        return cls(2.0)

    def _log_g(self, log_t: torch.Tensor) -> torch.Tensor:
        if self.log_g_fn is not None:
            return self.log_g_fn(log_t)
        return self.a * log_t

    def evaluate_log_g(self, log_t: torch.Tensor) -> torch.Tensor:
        """Evaluate ``log g(t)`` at the given ``log t`` (for inspection and plots).

        Parameters
        ----------
        log_t : torch.Tensor
            Log density ratios ``log t``.

        Returns
        -------
        log_g : torch.Tensor
            ``log g(t)``, elementwise, of the same shape as ``log_t``.
        """
        return self._log_g(log_t)

    def particle_weights(self, log_w):
        _check_log_w(log_w)
        n_particles = log_w.shape[-1]
        # Self-normalised ratio (Sec. 3.2): t_k = K softmax(log_w)_k, sum t = K.
        # log_softmax subtracts the max itself: no centring needed in float32 (the
        # float32 gradient of h's parameters is within 1.5e-7 of float64's).
        log_t = torch.log_softmax(log_w, dim=-1) + math.log(n_particles)
        log_c = self._log_g(log_t)  # log g(t_k), (..., n_particles)
        if self.normalize:
            return torch.softmax(log_c, dim=-1)
        return torch.exp(torch.clamp(log_c, max=self.LOG_G_MAX)) / n_particles

    def get_params(self, deep=True):
        return {"a": self.a, "log_g": self.log_g_fn, "normalize": self.normalize}

    @classmethod
    def _get_param_names(cls):
        return ["a", "log_g", "normalize"]

    def extra_repr(self):
        if self.log_g_fn is not None:
            return f"log_g={self.log_g_fn!r}, normalize={self.normalize}"
        return f"a={self.a:.4g}, normalize={self.normalize}"


_ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "relu": nn.ReLU}


class NeuralF(FDivergence):
    """Meta-learnable f-divergence: ``g(t) = exp(h_eta(log t))`` (meta-f).

    ``h_eta`` is a small MLP on ``log t`` plus a linear skip term,
    ``h(u) = c * u + b + MLP(u)``, so that the whole alpha family
    (``h = (1 - alpha) log t``, Sec. 3.2 and Appendix C.5) is representable
    exactly by the skip term alone, and the MLP models departures from it.
    The MLP's output layer starts at zero, so an untrained ``NeuralF`` *is*
    the power f-divergence with ``a = 1 - init_alpha``.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(32,)
        Widths of the MLP's hidden layers (may be empty: only the skip term).
    activation : {"tanh", "softplus", "elu", "relu"}, default="tanh"
        Hidden activation.  Smooth activations keep second derivatives useful.
    init_alpha : float, default=1.0
        The member of the alpha family h starts from (1.0: KL(q||p), i.e. VI).
    input_scale : float, default=0.1
        ``log t`` is multiplied by this before the MLP so that its hidden units
        do not saturate on the typical range of log-ratios (tens of nats).
    normalize : bool, default=True
        See :class:`FDivergence`.

    Attributes
    ----------
    skip : torch.nn.Linear
        The linear term ``c * log t + b``.
    mlp : torch.nn.Sequential or None
        The MLP part of h.

    See Also
    --------
    Renyi : Meta-alpha, the one-parameter alternative.

    Notes
    -----
    ``set_params`` (and therefore changing a parameter through an estimator's
    ``divergence__...``) rebuilds the network from the constructor arguments, which
    drops learned weights; to keep them, copy the divergence instead
    (:func:`copy.deepcopy` or :func:`sklearn.base.clone`).

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import NeuralF
    >>> f = NeuralF(hidden_layer_sizes=(8,), init_alpha=0.5)
    >>> torch.manual_seed(0) is not None
    True
    >>> f.evaluate_log_g(torch.tensor([0.0, 2.0])).tolist()
    [0.0, 1.0]
    """

    def __init__(
        self,
        hidden_layer_sizes=(32,),
        *,
        activation="tanh",
        init_alpha=1.0,
        input_scale=0.1,
        normalize=True,
    ):
        super().__init__(0.0, normalize=normalize)
        try:
            sizes = tuple(hidden_layer_sizes)
        except TypeError:
            raise TypeError(
                "NeuralF: hidden_layer_sizes must be a tuple of positive ints, got "
                f"{hidden_layer_sizes!r}; e.g. (32,), or () for the linear term only."
            ) from None
        if any(
            isinstance(s, bool) or not isinstance(s, Integral) or s <= 0 for s in sizes
        ):
            raise ValueError(
                "NeuralF: hidden_layer_sizes must contain positive ints, got "
                f"{hidden_layer_sizes!r}; e.g. (32,), or () for the linear term only."
            )
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"NeuralF: activation must be one of {sorted(_ACTIVATIONS)}, got "
                f"{activation!r}."
            )
        if isinstance(init_alpha, bool) or not isinstance(init_alpha, Real):
            raise TypeError(
                f"NeuralF: init_alpha must be a real number, got {init_alpha!r}; e.g. "
                "init_alpha=1.0 (start from KL(q||p))."
            )
        if not math.isfinite(init_alpha):
            raise ValueError(
                f"NeuralF: init_alpha must be finite, got {init_alpha!r}; e.g. init_alpha=1.0 "
                "(start from KL(q||p))."
            )
        _check_positive_real("input_scale", input_scale, "NeuralF", " Use e.g. 0.1.")
        self.hidden_layer_sizes = sizes
        self.activation = activation
        self.init_alpha = init_alpha
        self.input_scale = input_scale
        # skip_init: every weight is set explicitly below, so nn.Linear's default
        # initialisation (which would draw from the global torch RNG) is skipped.
        self.skip = nn.utils.skip_init(nn.Linear, 1, 1, dtype=torch.float64)
        with torch.no_grad():
            self.skip.weight.fill_(1.0 - float(init_alpha))
            self.skip.bias.zero_()
        if sizes:
            gen = torch.Generator().manual_seed(0)
            layers, width = [], 1
            for size in sizes:
                lin = nn.utils.skip_init(nn.Linear, width, size, dtype=torch.float64)
                with torch.no_grad():
                    bound = 1.0 / math.sqrt(width)
                    lin.weight.uniform_(-bound * 3, bound * 3, generator=gen)
                    lin.bias.uniform_(-2.0, 2.0, generator=gen)
                layers += [lin, _ACTIVATIONS[activation]()]
                width = size
            out = nn.utils.skip_init(nn.Linear, width, 1, dtype=torch.float64)
            with torch.no_grad():
                out.weight.zero_()
                out.bias.zero_()
            layers.append(out)
            self.mlp = nn.Sequential(*layers)
        else:
            self.mlp = None

    @classmethod
    def _get_param_names(cls):
        return ["activation", "hidden_layer_sizes", "init_alpha", "input_scale", "normalize"]

    def get_params(self, deep=True):
        return {name: getattr(self, name) for name in self._get_param_names()}

    def _log_g(self, log_t):
        u = log_t.unsqueeze(-1)  # (..., n_particles, 1)
        p = self.skip.weight
        h = self.skip(u.to(p.dtype))
        if self.mlp is not None:
            h = h + self.mlp(u.to(p.dtype) * self.input_scale)
        return h.squeeze(-1).to(log_t.dtype)

    def extra_repr(self):
        return (
            f"hidden_layer_sizes={self.hidden_layer_sizes}, "
            f"activation={self.activation!r}, normalize={self.normalize}"
        )


class TailAdaptive(Divergence):
    """Tail-adaptive f-divergence of Wang, Liu & Liu (2018).

    The weight of particle ``i`` is ``(1 - F_i)^beta`` normalised, with
    ``F_i = #{j : log_w_i > log_w_j} / K`` the empirical CDF of the density
    ratios (strict inequality), so with ``beta < 0`` the particle with the
    largest ``p/q`` gets the largest weight (``∝ K``) and the smallest gets
    ``∝ 1``.  The update is the path-only gradient, as in the authors' code.

    Pyro's ``TraceTailAdaptive_ELBO`` computes an inverse permutation instead
    of ranks and gives the largest weight to the *smallest* ratio
    (pyro-ppl/pyro#3170); this implementation follows the paper and the
    authors' code (``dilinwang820/adaptive-f-divergence``).

    Parameters
    ----------
    beta : float, default=-1.0
        Tail exponent, < 0.

    See Also
    --------
    FDivergence : The f-divergences with a fixed weight function g.

    References
    ----------
    .. [1] Wang, D., Liu, H. and Liu, Q. "Variational inference with
       tail-adaptive f-divergence", NeurIPS 2018.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.divergences import TailAdaptive
    >>> w = TailAdaptive().particle_weights(torch.tensor([0.5, 3.0, 1.0, 2.0]))
    >>> [round(v, 4) for v in (w / w.min()).tolist()]  # ranks 1, 4, 2, 3
    [1.0, 4.0, 1.3333, 2.0]
    """

    path_derivative = True

    def __init__(self, beta=-1.0):
        super().__init__()
        if isinstance(beta, bool) or not isinstance(beta, Real):
            raise TypeError(
                f"TailAdaptive: beta must be a real number < 0, got {beta!r}; e.g. beta=-1.0."
            )
        if not math.isfinite(beta) or beta >= 0:
            raise ValueError(
                f"TailAdaptive: beta must be a finite number < 0, got {beta!r}; e.g. "
                "beta=-1.0 (the default of Wang et al. 2018)."
            )
        self.beta = beta

    def particle_weights(self, log_w):
        _check_log_w(log_w)
        n_particles = log_w.shape[-1]
        values = log_w.detach()
        sorted_values = torch.sort(values, dim=-1).values.contiguous()
        # F_i = #{j: l_j < l_i} / K (strict), via a left search in sorted order.
        n_below = torch.searchsorted(sorted_values, values.contiguous(), right=False)
        tail = 1.0 - n_below.to(log_w.dtype) / n_particles  # in [1/K, 1]
        log_w_tail = self.beta * torch.log(tail)
        return torch.softmax(log_w_tail, dim=-1)

    def extra_repr(self):
        return f"beta={self.beta}"


DIVERGENCE_NAMES = ("kl", "renyi", "local_renyi", "neural_f", "tail_adaptive", "f")

_BY_NAME = {
    "kl": KL,
    "renyi": Renyi,
    "local_renyi": LocalRenyi,
    "neural_f": NeuralF,
    "tail_adaptive": TailAdaptive,
    "f": FDivergence,
}


def make_divergence(spec) -> Divergence:
    """Resolve a divergence name or instance into a fresh :class:`Divergence`.

    This is how the estimators turn their ``divergence`` parameter into the
    fitted ``divergence_``: the parameter itself is never modified.

    Parameters
    ----------
    spec : {"kl", "renyi", "local_renyi", "neural_f", "tail_adaptive", "f"} or Divergence
        A name (default construction) or an instance, which is deep-copied so
        that the caller's object is never modified.

    Returns
    -------
    divergence : Divergence
        A new divergence: the named one with default parameters, or a deep copy.

    See Also
    --------
    Divergence : The base class of the divergences.

    Examples
    --------
    >>> from skmetavi.divergences import make_divergence
    >>> make_divergence("renyi")
    Renyi(alpha=0.5, learnable=True)
    """
    if isinstance(spec, Divergence):
        return copy.deepcopy(spec)
    if isinstance(spec, str):
        try:
            return _BY_NAME[spec]()
        except KeyError:
            raise ValueError(
                f"Unknown divergence {spec!r}; valid names are "
                f"{list(DIVERGENCE_NAMES)}, or pass a skmetavi.divergences."
                "Divergence instance."
            ) from None
    raise TypeError(
        "divergence must be one of "
        f"{list(DIVERGENCE_NAMES)} or a skmetavi.divergences.Divergence instance, "
        f"got {type(spec).__name__}."
    )
