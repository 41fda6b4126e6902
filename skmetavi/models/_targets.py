"""Target densities ``log p(z, D_task)``: the models VI approximates, batched over tasks.

A target turns a :class:`~skmetavi._tasks.TaskBatch` (each task's rows of
``X``, ``y``) and particles ``z`` of shape ``(M, K, d)`` into unnormalised
log densities of shape ``(M, K)``.  Targets with a per-row likelihood also
give ``log p(y_n | x_n, z)`` for predictive scores and held-out meta-losses.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

from skmetavi._params import ParamsMixin
from skmetavi._tasks import TaskBatch

__all__ = [
    "Target",
    "GaussianMixture1D",
    "GaussianMean",
    "BayesianLinearRegression",
    "CallableTarget",
    "make_target",
    "TARGET_NAMES",
]

_LOG_2PI = math.log(2 * math.pi)


def _normal_log_prob(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale) - 0.5 * _LOG_2PI


def _isotropic_log_prior(z, scale: float):
    """sum_d log N(z_d; 0, scale^2), shape ``z.shape[:-1]``; ``scale`` a Python float.

    A scalar multiply of ``sum z^2`` (rather than dividing a tensor elementwise)
    keeps this cheap on the large weight vectors of BNNs, also in double backward.
    """
    d = z.shape[-1]
    return (-0.5 / scale**2) * (z * z).sum(-1) - d * (math.log(scale) + 0.5 * _LOG_2PI)


def _check_scale(name, value, owner):
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{owner}: {name} must be a real number, got {value!r}.")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}.")


class Target(ParamsMixin):
    """Base class of targets.  Subclasses set the class attributes and override.

    A target needs :meth:`n_latent` and either :meth:`log_joint` or both
    :meth:`log_prior` and :meth:`log_likelihood`.  With a per-row likelihood,
    set ``has_likelihood = True``: it enables the held-out ``"nll"`` meta-loss
    and the predictive :meth:`~skmetavi.MetaDivergenceVI.score`.  All methods
    work on batches of M tasks and K particles, in torch.

    Attributes
    ----------
    requires_y : bool
        Whether tasks need targets ``y`` (implies ``accepts_y``).
    accepts_y : bool
        Whether the target reads ``y`` when one is given: the estimators then
        validate it and pass it on, and pass None without one.  Targets that
        neither require nor accept ``y`` ignore it, as unsupervised
        scikit-learn estimators do.
    has_likelihood : bool
        Whether :meth:`log_likelihood` (per-row) is available.
    supports_minibatch : bool
        Whether a task's rows are i.i.d. likelihood terms, so that a minibatch
        of rows with the log-likelihood rescaled by ``N / batch`` is an
        unbiased estimate (``batch_size``).
    exchangeable_rows : bool
        Whether a task's rows are exchangeable observations, so that a part of
        them is a smaller sample of the same task: ``meta_fit`` then holds out
        ``query_fraction`` of every task's rows for a callable ``meta_loss``
        (the inner loop runs on the rest).  False for targets whose rows
        define the target itself (the components of
        :class:`GaussianMixture1D`): leaving some out would change it.

    See Also
    --------
    GaussianMean : A conjugate target with a per-row likelihood.
    CallableTarget : A target from a user function.

    Examples
    --------
    A standard-normal target that ignores the data:

    >>> import torch
    >>> from skmetavi.models import Target
    >>> class StandardNormal(Target):
    ...     def n_latent(self, n_features):
    ...         return 1
    ...     def log_joint(self, z, tasks, params):
    ...         return -0.5 * (z**2).sum(-1)
    >>> StandardNormal().log_joint(torch.zeros(2, 3, 1), None, {}).shape
    torch.Size([2, 3])
    """

    requires_y = False
    accepts_y = False
    has_likelihood = False
    supports_minibatch = True
    exchangeable_rows = True

    def n_latent(self, n_features: int) -> int:
        """Return the dimension of z for data with ``n_features`` columns.

        Parameters
        ----------
        n_features : int
            Number of columns of ``X``.

        Returns
        -------
        n_latent : int
            Dimension of the latent variable z.
        """
        raise NotImplementedError

    def check_data(self, X: torch.Tensor, y) -> None:
        """Raise ``ValueError`` if one task's rows are not valid for this target.

        Parameters
        ----------
        X : torch.Tensor of shape (n_rows, n_features)
            One task's rows.
        y : torch.Tensor of shape (n_rows,) or None
            The task's targets, if any.
        """

    def init_params(self, n_tasks: int, *, dtype, device) -> dict:
        """Return point-estimated model parameters (e.g. noise scales); none by default.

        Parameters
        ----------
        n_tasks : int
            Number of tasks M (the leading dimension).
        dtype : torch.dtype
            Floating-point type of the parameters.
        device : torch.device or str
            Device of the parameters.

        Returns
        -------
        params : dict of str to torch.Tensor
            Initial values, each with a leading dimension M (empty by default).
        """
        return {}

    def log_prior(self, z: torch.Tensor, params: dict) -> torch.Tensor:
        """Evaluate the log prior log p(z).

        Parameters
        ----------
        z : torch.Tensor of shape (M, K, n_latent)
            Particles: K values of z for each of the M tasks.
        params : dict of str to torch.Tensor
            Point-estimated model parameters (:meth:`init_params`).

        Returns
        -------
        log_prior : torch.Tensor of shape (M, K)
            Log prior density at each particle.
        """
        raise NotImplementedError

    def log_likelihood(self, z: torch.Tensor, tasks: TaskBatch, params: dict):
        """Evaluate the per-row log-likelihood log p(y_n | x_n, z).

        Parameters
        ----------
        z : torch.Tensor of shape (M, K, n_latent)
            Particles: K values of z for each of the M tasks.
        tasks : TaskBatch
            The M tasks' rows, padded to a common length with a mask.
        params : dict of str to torch.Tensor
            Point-estimated model parameters (:meth:`init_params`).

        Returns
        -------
        log_lik : torch.Tensor of shape (M, K, n_max)
            Log-likelihood of each row under each particle; arbitrary on
            padding rows.
        """
        raise NotImplementedError

    def log_joint(self, z: torch.Tensor, tasks: TaskBatch, params: dict) -> torch.Tensor:
        """Evaluate the unnormalised log posterior log p(z, D_task).

        By default ``log p(z) + lik_scale * sum_n log p(y_n | x_n, z)`` over the
        real (unpadded) rows.

        Parameters
        ----------
        z : torch.Tensor of shape (M, K, n_latent)
            Particles: K values of z for each of the M tasks.
        tasks : TaskBatch
            The M tasks' rows, padded to a common length with a mask.
        params : dict of str to torch.Tensor
            Point-estimated model parameters (:meth:`init_params`).

        Returns
        -------
        log_joint : torch.Tensor of shape (M, K)
            Unnormalised log density at each particle, differentiable in z.
        """
        log_lik = self.log_likelihood(z, tasks, params)
        log_lik = torch.where(tasks.mask.unsqueeze(1), log_lik, torch.zeros_like(log_lik))
        return self.log_prior(z, params) + tasks.lik_scale.unsqueeze(-1) * log_lik.sum(-1)

    def elements_per_particle(self, n_rows: int, n_features: int):
        """Return the size of the largest intermediate tensor of one particle's log joint.

        Sizes ``task_chunk_size="auto"`` (a network's widest activation: rows
        times width); None (the default) when unknown.

        Parameters
        ----------
        n_rows : int
            Rows of the task.
        n_features : int
            Columns of ``X``.

        Returns
        -------
        n_elements : int or None
            The size, or None.
        """
        return None

    def quadrature_range(self, tasks: TaskBatch):
        """Return an interval ``(low, high)`` covering the target's mass, for 1-D quadrature.

        Parameters
        ----------
        tasks : TaskBatch
            The M tasks' rows, padded to a common length with a mask.

        Returns
        -------
        low_high : tuple of float or None
            The interval, or None when the target cannot give one.
        """
        return None


class GaussianMixture1D(Target):
    """1-D Gaussian mixture target; each row of a task is one component.

    A task's rows hold ``(weight, loc, scale)``; weights are normalised within
    the task.  This is the target family of Sec. 4.1 of Zhang et al. (2021),
    ``p(z) = 0.5 N(mu1, s1^2) + 0.5 N(mu2, s2^2)``
    (see :func:`skmetavi.datasets.make_mog_tasks`).  The density is normalised,
    so ``log_joint`` is ``log p(z)`` exactly.

    See Also
    --------
    skmetavi.datasets.make_mog_tasks : Draw tasks of this target.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import GaussianMixture1D
    >>> X = torch.tensor([[0.5, 0.0, 1.0], [0.5, 3.0, 2.0]], dtype=torch.float64)
    >>> tasks = pad_tasks([X])
    >>> z = torch.zeros(1, 1, 1, dtype=torch.float64)
    >>> round(float(GaussianMixture1D().log_joint(z, tasks, {}).exp()), 4)
    0.2319
    """

    supports_minibatch = False  # rows are the mixture's components, not data
    exchangeable_rows = False  # a held-out component would change the target

    def n_latent(self, n_features):
        return 1

    def check_data(self, X, y):
        if X.shape[1] != 3:
            raise ValueError(
                "model='gaussian_mixture' expects rows (weight, loc, scale), i.e. X "
                f"with 3 columns, got {X.shape[1]} columns."
            )
        if (X[:, 0] < 0).any() or not (X[:, 0] > 0).any():
            raise ValueError(
                "model='gaussian_mixture': component weights (column 0) must be >= 0 "
                f"with a positive sum, got {X[:, 0].tolist()}."
            )
        if not (X[:, 2] > 0).all():
            raise ValueError(
                "model='gaussian_mixture': component scales (column 2) must be > 0, "
                f"got {X[:, 2].tolist()}."
            )

    def log_joint(self, z, tasks, params):
        X, mask = tasks.X, tasks.mask  # (M, C, 3), (M, C)
        w = torch.where(mask, X[..., 0], torch.zeros_like(X[..., 0]))
        log_w = torch.log(w) - torch.log(w.sum(-1, keepdim=True))  # -inf on padding
        loc = X[..., 1].unsqueeze(1)  # (M, 1, C)
        scale = torch.where(mask, X[..., 2], torch.ones_like(X[..., 2])).unsqueeze(1)
        comp = _normal_log_prob(z, loc, scale)  # (M, K, C)
        return torch.logsumexp(comp + log_w.unsqueeze(1), dim=-1)

    def quadrature_range(self, tasks):
        X, mask = tasks.X, tasks.mask
        lo = torch.where(mask, X[..., 1] - 10 * X[..., 2], X[..., 1].new_tensor(math.inf))
        hi = torch.where(mask, X[..., 1] + 10 * X[..., 2], X[..., 1].new_tensor(-math.inf))
        return float(lo.min()), float(hi.max())


class GaussianMean(Target):
    """Conjugate Gaussian mean: ``x_n ~ N(z, noise_scale^2 I)``, ``z ~ N(0, prior_scale^2 I)``.

    The exact posterior is Gaussian (:meth:`posterior`), so VI with a
    Gaussian family and *any* divergence recovers it exactly.

    Parameters
    ----------
    noise_scale : float, default=1.0
        Observation noise standard deviation.
    prior_scale : float, default=10.0
        Prior standard deviation of z.

    See Also
    --------
    BayesianLinearRegression : The other conjugate target, with inputs.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import GaussianMean
    >>> X = torch.ones(4, 1, dtype=torch.float64)
    >>> mean, cov = GaussianMean(prior_scale=1.0).posterior(X)
    >>> mean, cov
    (tensor([0.8000], dtype=torch.float64), tensor([[0.2000]], dtype=torch.float64))
    """

    has_likelihood = True

    def __init__(self, noise_scale=1.0, prior_scale=10.0):
        _check_scale("noise_scale", noise_scale, "GaussianMean")
        _check_scale("prior_scale", prior_scale, "GaussianMean")
        self.noise_scale = noise_scale
        self.prior_scale = prior_scale

    def n_latent(self, n_features):
        return n_features

    def log_prior(self, z, params):
        return _isotropic_log_prior(z, float(self.prior_scale))

    def log_likelihood(self, z, tasks, params):
        s = z.new_tensor(self.noise_scale)
        # (M, K, 1, d) vs (M, 1, n, d) -> (M, K, n)
        return _normal_log_prob(tasks.X.unsqueeze(1), z.unsqueeze(2), s).sum(-1)

    def log_joint(self, z, tasks, params):
        # Sufficient statistics: sum_n |x_n - z|^2 = N|z|^2 - 2 z.S1 + S2.
        m = tasks.mask.to(z.dtype)
        n = m.sum(-1)  # (M,)
        s1 = (tasks.X * m.unsqueeze(-1)).sum(1)  # (M, d)
        s2 = ((tasks.X**2).sum(-1) * m).sum(-1)  # (M,)
        sq = n.unsqueeze(-1) * (z**2).sum(-1) - 2 * (z * s1.unsqueeze(1)).sum(-1) + s2.unsqueeze(-1)
        var = self.noise_scale**2
        d = z.shape[-1]
        log_lik = -0.5 * sq / var - 0.5 * (n * d * (_LOG_2PI + math.log(var))).unsqueeze(-1)
        return self.log_prior(z, params) + tasks.lik_scale.unsqueeze(-1) * log_lik

    def posterior(self, X: torch.Tensor):
        """Return the exact posterior ``(mean, covariance)`` of z given one task's rows.

        Parameters
        ----------
        X : torch.Tensor of shape (n_rows, n_latent)
            One task's observations.

        Returns
        -------
        mean : torch.Tensor of shape (n_latent,)
            Posterior mean.
        covariance : torch.Tensor of shape (n_latent, n_latent)
            Posterior covariance.
        """
        n, d = X.shape
        precision = 1.0 / self.prior_scale**2 + n / self.noise_scale**2
        mean = X.sum(0) / self.noise_scale**2 / precision
        cov = torch.eye(d, dtype=X.dtype, device=X.device) / precision
        return mean, cov


class BayesianLinearRegression(Target):
    """Conjugate Bayesian linear regression ``y_n ~ N(x_n^T z, noise_scale^2)``.

    Prior ``z ~ N(0, prior_scale^2 I)``, no intercept (add a column of ones to
    ``X`` for one).  The exact posterior is Gaussian (:meth:`posterior`), so a
    full-covariance family recovers it exactly under KL-VI.

    Parameters
    ----------
    noise_scale : float, default=1.0
        Observation noise standard deviation.
    prior_scale : float, default=10.0
        Prior standard deviation of each coefficient.

    See Also
    --------
    GaussianMean : The conjugate model without inputs.

    Examples
    --------
    >>> import torch
    >>> from skmetavi.models import BayesianLinearRegression
    >>> X = torch.eye(2, dtype=torch.float64)
    >>> y = torch.tensor([1.0, -1.0], dtype=torch.float64)
    >>> mean, cov = BayesianLinearRegression(prior_scale=1.0).posterior(X, y)
    >>> mean
    tensor([ 0.5000, -0.5000], dtype=torch.float64)
    """

    requires_y = True
    has_likelihood = True

    def __init__(self, noise_scale=1.0, prior_scale=10.0):
        _check_scale("noise_scale", noise_scale, "BayesianLinearRegression")
        _check_scale("prior_scale", prior_scale, "BayesianLinearRegression")
        self.noise_scale = noise_scale
        self.prior_scale = prior_scale

    def n_latent(self, n_features):
        return n_features

    def log_prior(self, z, params):
        return _isotropic_log_prior(z, float(self.prior_scale))

    def log_likelihood(self, z, tasks, params):
        mean = z @ tasks.X.transpose(-1, -2)  # (M, K, n)
        return _normal_log_prob(tasks.y.unsqueeze(1), mean, z.new_tensor(self.noise_scale))

    def posterior(self, X: torch.Tensor, y: torch.Tensor):
        """Return the exact posterior ``(mean, covariance)`` of z given one task's rows.

        Parameters
        ----------
        X : torch.Tensor of shape (n_rows, n_features)
            One task's inputs.
        y : torch.Tensor of shape (n_rows,)
            One task's targets.

        Returns
        -------
        mean : torch.Tensor of shape (n_features,)
            Posterior mean of the coefficients.
        covariance : torch.Tensor of shape (n_features, n_features)
            Posterior covariance of the coefficients.
        """
        d = X.shape[1]
        eye = torch.eye(d, dtype=X.dtype, device=X.device)
        precision = X.T @ X / self.noise_scale**2 + eye / self.prior_scale**2
        cov = torch.linalg.inv(precision)
        mean = cov @ (X.T @ y) / self.noise_scale**2
        return mean, cov


class CallableTarget(Target):
    """Wrap a user function ``log_joint(z, X, y) -> Tensor`` as a target.

    The function sees one task at a time, unpadded; the target loops over the
    tasks of a batch.  It has no per-row likelihood.  It receives the task's
    targets ``y`` whenever the data has them (``accepts_y``), None otherwise.

    Parameters
    ----------
    fn : callable
        ``fn(z, X, y)`` with ``z`` of shape (n_particles, n_latent), one task's
        ``X`` of shape (n_rows, n_features) and ``y`` of shape (n_rows,) (or
        None when no ``y`` was passed); returns the unnormalised log density,
        shape (n_particles,), differentiable in z.
    n_latent : int
        Dimension of z.
    exchangeable_rows : bool, default=True
        Whether each row of ``X`` (with its ``y``) is one observation of the
        task, so that a callable ``meta_loss`` is scored on held-out rows
        (``query_fraction``) that the inner loop does not see.  Set it to
        False when the rows define the target rather than sample from it
        (e.g. mixture components): the meta-loss then sees all of them.

    See Also
    --------
    Target : Subclass it instead for batched, faster targets.

    Examples
    --------
    >>> import torch
    >>> from skmetavi._tasks import pad_tasks
    >>> from skmetavi.models import CallableTarget
    >>> def log_joint(z, X, y):
    ...     return -0.5 * ((z - X.mean(0)) ** 2).sum(-1)
    >>> target = CallableTarget(log_joint, n_latent=1)
    >>> tasks = pad_tasks([torch.ones(3, 1)])
    >>> z = torch.tensor([[[2.0], [3.0]]])  # (M=1 task, K=2 particles, 1)
    >>> target.log_joint(z, tasks, {})
    tensor([[-0.5000, -2.0000]])
    """

    accepts_y = True
    supports_minibatch = False  # the callable sees the rows it is given, unscaled

    def __init__(self, fn, n_latent, exchangeable_rows=True):
        if not callable(fn):
            raise TypeError(f"CallableTarget: fn must be callable, got {type(fn).__name__}.")
        if isinstance(n_latent, bool) or not isinstance(n_latent, Integral) or n_latent < 1:
            raise ValueError(
                "A callable model needs n_latent, the dimension of z, as a positive int; "
                f"got n_latent={n_latent!r}."
            )
        if not isinstance(exchangeable_rows, bool):
            raise TypeError(
                "CallableTarget: exchangeable_rows must be a bool, got "
                f"{exchangeable_rows!r}."
            )
        self.fn = fn
        self._n_latent = int(n_latent)
        self.exchangeable_rows = exchangeable_rows

    def get_params(self, deep=True):
        return {"fn": self.fn, "n_latent": self._n_latent,
                "exchangeable_rows": self.exchangeable_rows}

    def n_latent(self, n_features):
        return self._n_latent

    def log_joint(self, z, tasks, params):
        out = []
        for m in range(tasks.n_tasks):
            X_m, y_m = tasks.unpad(m)
            val = self.fn(z[m], X_m, y_m)
            if not isinstance(val, torch.Tensor):
                raise TypeError(
                    "The model callable must return a torch.Tensor of shape "
                    f"(n_particles,), got {type(val).__name__}."
                )
            if val.shape != z.shape[1:2]:
                raise ValueError(
                    "The model callable must return shape (n_particles,) = "
                    f"{tuple(z.shape[1:2])}, got {tuple(val.shape)}."
                )
            out.append(val.to(z.dtype))
        return torch.stack(out)


TARGET_NAMES = ("gaussian_mean", "gaussian_mixture", "bayesian_linear_regression")
_TARGETS = {
    "gaussian_mean": GaussianMean,
    "gaussian_mixture": GaussianMixture1D,
    "bayesian_linear_regression": BayesianLinearRegression,
}


def make_target(model, n_latent=None) -> Target:
    """Resolve a model name, :class:`Target` or callable into a :class:`Target`.

    The estimators resolve their ``model`` parameter with this function; a
    :class:`Target` instance is returned as is.

    Parameters
    ----------
    model : {"gaussian_mean", "gaussian_mixture", "bayesian_linear_regression"}, \
            Target or callable
        A built-in target by name, a target, or a function
        ``log_joint(z, X, y)`` (see :class:`CallableTarget`).
    n_latent : int, default=None
        Dimension of z; needed for a callable only.

    Returns
    -------
    target : Target
        The resolved target.

    See Also
    --------
    Target : The base class of targets.

    Examples
    --------
    >>> from skmetavi.models import make_target
    >>> make_target("gaussian_mean")
    GaussianMean(noise_scale=1.0, prior_scale=10.0)
    """
    if isinstance(model, Target):
        return model
    if isinstance(model, str):
        try:
            return _TARGETS[model]()
        except KeyError:
            raise ValueError(
                f"Unknown model {model!r}; valid names are {list(TARGET_NAMES)}, or pass "
                "a skmetavi.models.Target or a callable log_joint(z, X, y)."
            ) from None
    if callable(model):
        return CallableTarget(model, n_latent)
    raise TypeError(
        f"model must be one of {list(TARGET_NAMES)}, a Target or a callable, got "
        f"{type(model).__name__}."
    )
