"""MetaDivergenceVI: variational inference with a meta-learned divergence on a family of targets."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from skmetavi import _torch
from skmetavi._validation import _check_array, _check_random_state, _validate_data
from skmetavi.estimators._base import _BaseMetaVI
from skmetavi.estimators._meta_fit import META_LOSS_NAMES
from skmetavi.models import FAMILY_NAMES, TARGET_NAMES, Target, make_family, make_target


class MetaDivergenceVI(_BaseMetaVI):
    """Variational inference whose divergence is meta-learned over a family of targets.

    Each task is a dataset (the rows of ``X`` sharing a ``groups`` label) and a
    model gives its unnormalised log density ``log p(z, X_task)``.
    :meth:`meta_fit` learns the divergence (Algorithm 1, Meta-D) and, with
    ``meta_learn_init=True``, the initialisation of q (Algorithm 2,
    Meta-D&phi) of Zhang et al. (2021); :meth:`fit` then adapts a Gaussian q
    to one new task with the learned divergence.

    Parameters
    ----------
    model : {"gaussian_mean", "gaussian_mixture", "bayesian_linear_regression"}, \
            Target or callable, default="gaussian_mean"
        The target of each task.

        - ``"gaussian_mean"``: rows are observations ``x_n ~ N(z, I)``,
          ``z ~ N(0, 10^2 I)`` (conjugate; ``n_latent = n_features``).
        - ``"gaussian_mixture"``: the 1-D mixture of the paper's Sec. 4.1; each
          row of a task is one component ``(weight, loc, scale)``
          (:func:`skmetavi.datasets.make_mog_tasks`).
        - ``"bayesian_linear_regression"``: ``y_n ~ N(x_n^T z, 1)``,
          ``z ~ N(0, 10^2 I)`` (conjugate; needs ``y``).
        - a :class:`skmetavi.models.Target` for other settings
          (e.g. ``GaussianMean(noise_scale=0.5)``);
        - a callable ``log_joint(z, X, y) -> Tensor`` with ``z`` of shape
          (n_particles, n_latent), returning shape (n_particles,); set
          ``n_latent``.  It sees one task's rows ``X`` and their targets ``y``
          (shape (n_rows,)) whenever ``y`` is passed to :meth:`fit`,
          :meth:`meta_fit`, :meth:`score` or :meth:`meta_loss_value`, and
          ``y=None`` otherwise.  The built-in ``"gaussian_mean"`` and
          ``"gaussian_mixture"`` ignore ``y``.
    n_latent : int, default=None
        Dimension of z for a callable ``model``; ignored otherwise.
    family : {"mean_field", "full_covariance"}, default="mean_field"
        The Gaussian variational family.
    divergence : {"kl", "renyi", "local_renyi", "neural_f", "tail_adaptive", "f"} or \
            Divergence, default="kl"
        The divergence of :meth:`fit` when no meta-learned one exists, and the
        initial (learnable) divergence of :meth:`meta_fit`.
    n_particles : int, default=100
        Monte Carlo particles K per inner step.
    inner_optimizer : {"auto", "adam", "sgd"}, default="auto"
        Inner-loop optimiser, used by both :meth:`fit` and :meth:`meta_fit`.
        The paper's algorithms use SGD; Adam is robust to the scale of the
        target.  ``"auto"``: SGD with a learned initialisation
        (``meta_learn_init=True``, and :meth:`fit` from ``meta_init_``), whose
        every task restarts the optimiser -- a fresh Adam's first step, ``lr *
        sign(direction)``, gives the divergence no meta-gradient -- and Adam
        otherwise.
    inner_lr : float or "auto", default="auto"
        Inner step size (beta in Algorithms 1 and 2) of whichever optimiser
        ``inner_optimizer`` selects; ``"auto"``: 0.05.
    max_iter : int or "auto", default="auto"
        Inner iterations of :meth:`fit` (epochs when ``batch_size`` is set).
        ``"auto"``: 500, or after :meth:`meta_fit` with ``meta_learn_init=True``
        the ``n_inner_steps`` steps the learned initialisation was trained for.
        0 keeps the starting q.
    init_loc, init_scale : float, default=0.0, 1.0
        Mean and standard deviation of the initial q (without ``meta_init_``).
    meta_loss : {"auto", "d_half", "tv", "nll"} or callable, default="auto"
        Meta-loss J.  ``"d_half"`` is D_0.5(q||p) and ``"tv"`` the total
        variation, by quadrature (1-D targets); ``"nll"`` is the negative log
        predictive density of a held-out part of each training task
        (``query_fraction``); ``"auto"`` is ``"nll"`` for models with a per-row
        likelihood and ``"d_half"`` otherwise.  A callable
        ``fn(q, X, y) -> scalar Tensor`` (differentiable in q's parameters)
        gets each task's q as a ``torch.distributions.MultivariateNormal`` and
        the task's held-out query rows ``X`` and ``y`` (``query_fraction`` of
        them; the inner loop adapts q on the rest), so that it can score q out
        of sample, e.g. as a negative held-out log predictive density.  That
        holds whenever the model's rows are observations of the task
        (``Target.exchangeable_rows``: the likelihood targets and a callable
        ``model``); for ``"gaussian_mixture"``, whose rows are the components
        that define the target, it gets all rows.
    quadrature_range : tuple of float, default=None
        ``(low, high)`` of the quadrature grid; by default derived from the
        target (built-in mixture) and the initial q.
    meta_lr : float, default=0.01
        Adam step size of the divergence parameters (gamma).
    init_lr : float, default=0.01
        Adam step size of the shared initialisation (tau, Algorithm 2).
    max_meta_iter : int, default=500
        Outer iterations of :meth:`meta_fit`.
    n_inner_steps : int, default=1
        Inner steps B per outer iteration.
    n_tasks_per_batch : int, default=16
        Tasks M per outer iteration (all of them if fewer).
    meta_learn_init : bool or "auto", default="auto"
        Also meta-learn the initialisation of q (Algorithm 2, Meta-D&phi).
        ``"auto"``: exactly when the divergence has nothing to learn (e.g. the
        default ``"kl"``: the paper's VI&phi), so that :meth:`meta_fit` always
        meta-learns something; a learnable divergence then runs Algorithm 1.
    meta_gradient : {"full", "first_order", "truncated", "implicit"}, default="full"
        How the meta-gradient goes through the B inner steps: exactly
        (memory grows with B); first-order (inner Jacobians taken as the
        identity; only the direct dependence of each step on eta is kept);
        exactly through the last ``truncate`` steps only; or implicitly,
        treating the end of the inner loop as a fixed point of the update and
        solving the adjoint system by GMRES on one fixed noise draw (memory
        independent of B; biased when the inner loop has not converged, e.g.
        Algorithm 1 with few inner steps; not available with
        ``meta_learn_init`` or ``batch_size``).
    truncate : int, default=None
        Steps back-propagated with ``meta_gradient="truncated"``.
    implicit_max_iter : int, default=100
        GMRES steps of the adjoint solve of ``meta_gradient="implicit"``.
    implicit_tol : float, default=1e-5
        Relative residual at which that solve stops; a ``RuntimeWarning``
        reports a solve that ends far above it.
    implicit_damping : float, default=1e-8
        Damping of that solve relative to the operator's scale
        (``||H^T b|| / ||b||``); larger values stabilise ill-conditioned inner
        problems at the price of a bias towards a shorter horizon.
    multi_step_loss : bool or "auto", default="auto"
        Meta-loss J averaged over the inner loop (before it and after every
        step, MAML++'s multi-step loss) instead of after its last step only.
        ``"auto"``: on for Algorithm 2, whose learned initialisation then also
        predicts well with few or no adaptation steps (measured on sinusoid
        tasks, 40 support rows: mean test log density of the initialisation
        itself -651 without, -0.76 with), off for Algorithm 1 (the paper's).
    validation_fraction : float, default=None
        Fraction of the training tasks held out for meta-validation (at least
        one task): every ``validation_interval`` outer iterations the current
        divergence (and initialisation) adapts to each held-out task's support
        rows exactly as :meth:`fit` would and is scored on its query rows
        (``query_fraction``), beside KL-VI under the same protocol; ``meta_fit``
        keeps the best candidate, so the learned divergence is never worse than
        KL on the validation tasks.  None disables meta-validation.
    validation_interval : int, default=None
        Outer iterations between meta-validations; ``max_meta_iter // 10`` if
        None.  The last iteration is always validated.
    max_grad_norm : float, default=None
        Clip the norm of the meta-gradients of the divergence and of the
        initialisation (separately) before each outer Adam step; None disables
        clipping.  Unrolled inner loops occasionally produce huge
        meta-gradients that derail meta-training (as in MAML).
    task_chunk_size : int, "auto" or None, default="auto"
        Process the tasks of an outer iteration (and of a batched adaptation)
        in chunks of this many, accumulating meta-gradients, to bound memory;
        the result is the same as without chunking (the noise of each task
        does not depend on the split).  ``"auto"``: on the CPU, chunks sized
        from the model where it reports the size of its intermediates (as
        :class:`MetaBNNRegressor`'s network does; the built-in targets here
        do not, so they run all at once); all at once on an accelerator.
        None: all at once.
    query_fraction : float, default=0.5
        Fraction of each training task's rows held out as query rows, on which
        the meta-loss is evaluated after the inner loop has adapted q to the
        other (support) rows; ``round(query_fraction * n_rows)`` of them, at
        least one, and at least one support row.  Rows are held out for models
        with a per-row likelihood (every meta-loss), and for a callable
        ``meta_loss`` on a model whose rows are exchangeable observations (a
        callable ``model``; ``Target.exchangeable_rows``); otherwise (the
        quadrature meta-losses of likelihood-free targets, the mixture's
        components) the meta-loss sees all rows and this is ignored.
        Meta-validation (``validation_fraction``) splits its tasks the same way.
    batch_size : int, default=None
        Rows per inner step (the likelihood is rescaled); all rows if None.
    compile : bool or {"fit", "meta_fit"}, default=False
        Compile with ``torch.compile``: ``"fit"`` the inner steps of
        :meth:`fit` (forward, backward and optimiser update of a step as one
        graph: on a CPU with a 1-50-50-1 BNN, 2x faster per step with 1000 rows
        and 2.4x with 40), ``"meta_fit"`` the meta-iterations of
        :meth:`meta_fit` (each chunk's differentiable inner steps and meta-loss
        as one graph of their meta-gradient, ``meta_gradient="full"``: measured
        on a 2-core CPU with 16 tasks of that BNN, 1.8x faster than the eager
        batched meta-iteration with 40 rows per task and 2.1x with 1000), True
        both.  The first call of a configuration compiles for tens of seconds
        (a minute for a meta-iteration; less in a later process, from the
        inductor's on-disk cache), which pays off only after thousands of steps
        or 100 (1000 rows per task) to 1500 (40 rows) meta-iterations.
        Compiled code is cached per configuration: runs with the same shapes
        and dtype do not recompile, whatever their learning rate or divergence
        parameters; another number of rows or tasks recompiles once (a method
        monkeypatched onto a class after a compiled run is not seen:
        ``torch._dynamo.reset()``).  Falls back to the eager path with a
        ``RuntimeWarning`` for what it does not cover (``batch_size``, local
        divergences, and in :meth:`meta_fit` a meta-gradient other than
        ``"full"`` or a callable meta-loss) or if compiling fails.
    n_score_particles : int, default=1000
        Particles of :meth:`score`.
    dtype : {"float64", "float32"}, default="float64"
        Floating-point precision of the torch computations.
    device : str, default="cpu"
        Torch device of the computations; fitted state is kept on the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds the torch generators of fitting, scoring and sampling; pass an
        int for reproducible results.  None draws fresh entropy from the
        operating system.  The global numpy and torch RNGs are never touched.
    verbose : int, default=0
        Progress on stderr.  0: none; 1: a tqdm bar during :meth:`fit` and
        :meth:`meta_fit` and a one-line summary when each ends (iterations,
        first and last loss, the divergence's learned scalars, seconds); 2:
        also the learned scalars in the bar, a line per meta-validation and
        every tenth of a fit, and the settings in the summary.
    warm_start : bool, default=False
        Continue from the previous :meth:`fit` (or :meth:`meta_fit`) state.
    callbacks : list, callable or Callback, default=None
        Called after each iteration of :meth:`fit` and :meth:`meta_fit`:
        ``fn(estimator, record) -> bool or None`` with that iteration's record
        (the row appended to ``history_`` or ``meta_history_``), True to stop
        training after it; or :class:`skmetavi.callbacks.Callback` objects
        such as :class:`~skmetavi.callbacks.EarlyStopping` (one alone is a
        list of one).

    Attributes
    ----------
    divergence_ : Divergence
        Divergence used by the last :meth:`fit`.
    variational_params_ : dict of str to torch.Tensor
        Parameters of the fitted q (CPU tensors with a leading dimension 1).
    mean_ : ndarray of shape (n_latent,)
        Mean of the fitted q.
    covariance_ : ndarray of shape (n_latent, n_latent)
        Covariance of the fitted q.
    loss_curve_ : ndarray of shape (n_steps,)
        Negative bound of the divergence at each :meth:`fit` iteration;
        warm-started fits append to it.
    history_ : skmetavi.callbacks.History
        One record per inner step of :meth:`fit` (``iteration``, ``loss``,
        ``time``: that iteration's wall-clock seconds, not cumulative),
        ``history_[:, "loss"]`` equal to ``loss_curve_``;
        warm-started fits append to it.
    n_iter_ : int
        Iterations run by the last :meth:`fit` call.
    n_latent_ : int
        Dimension of z.
    n_features_in_ : int
        Number of features seen during :meth:`fit` or :meth:`meta_fit`.
    meta_divergence_ : Divergence
        Divergence learned by :meth:`meta_fit`.
    meta_init_ : dict of str to torch.Tensor
        Learned initialisation (``meta_learn_init=True`` only).
    validation_tasks_ : ndarray
        Labels of the held-out validation tasks (``validation_fraction`` only).
    validation_iterations_ : ndarray of shape (n_validations,)
        Outer iterations at which the candidates were validated.
    validation_scores_ : ndarray of shape (n_validations,)
        Validation score of the meta-learned candidate at each of them (higher is
        better).
    validation_kl_scores_ : ndarray of shape (n_validations,)
        Validation score of KL-VI under the same protocol.
    best_validation_score_ : float
        Score of the kept candidate.
    best_meta_iter_ : int
        Outer iteration of the kept candidate.
    validation_choice_ : {"learned", "kl"}
        Whether the meta-learned divergence or KL was kept.
    meta_loss_curve_ : ndarray of shape (n_meta_iter_,)
        Mean meta-loss of each outer iteration (NaN where rolled back).
    meta_history_ : skmetavi.callbacks.History
        One record per outer iteration of :meth:`meta_fit` (``iteration``,
        ``meta_loss``, the divergence's learned scalars such as ``alpha``,
        ``time``: that iteration's wall-clock seconds, its meta-validation
        included, and ``validation_score`` / ``validation_kl_score`` where
        meta-validation ran); warm-started calls append to it.
    n_meta_iter_ : int
        Outer iterations run in total (warm-started :meth:`meta_fit` calls add up).
    meta_tasks_ : ndarray
        The task labels seen by :meth:`meta_fit`.

    See Also
    --------
    skmetavi.divergences.Renyi : The meta-alpha divergence.
    skmetavi.divergences.NeuralF : The meta-f divergence.

    Notes
    -----
    :func:`sklearn.base.clone` keeps the parameters only: meta-learned state
    is dropped.  To reuse a learned divergence in a new estimator, pass it:
    ``MetaDivergenceVI(divergence=est.meta_divergence_)``.

    :meth:`score` is the mean log predictive density per row of ``(X, y)``
    under q for models with a per-row likelihood, and the ELBO
    ``E_q[log p(z, X, y) - log q(z)]`` of q for the target of ``X`` (and ``y``) otherwise;
    higher is better in both cases.

    References
    ----------
    .. [1] Zhang, R., Li, Y., De Sa, C., Devlin, S. and Zhang, C.
       "Meta-learning divergences of variational inference", AISTATS 2021.
    .. [2] Li, Y. and Turner, R. E. "Rényi divergence variational inference",
       NeurIPS 2016.

    Examples
    --------
    >>> from skmetavi import MetaDivergenceVI
    >>> from skmetavi.datasets import make_mog_tasks
    >>> X, groups = make_mog_tasks(8, random_state=0)
    >>> est = MetaDivergenceVI("gaussian_mixture", divergence="renyi",
    ...                        inner_optimizer="sgd", max_meta_iter=20,
    ...                        max_iter=50, random_state=0)
    >>> est = est.meta_fit(X, groups=groups)
    >>> est.fit(X[groups == 0]).mean_.shape
    (1,)
    """

    DEFAULT_MAX_ITER = 500
    DEFAULT_INNER_LR = {"adam": 0.05, "sgd": 0.05}

    _parameter_constraints = {
        **_BaseMetaVI._parameter_constraints,
        "model": [StrOptions(set(TARGET_NAMES)), Target, callable],
        "n_latent": [Interval(Integral, 1, None, closed="left"), None],
        "family": [StrOptions(set(FAMILY_NAMES))],
        "init_loc": [Real],
        "init_scale": [Interval(Real, 0, None, closed="neither")],
        "meta_loss": [StrOptions(set(META_LOSS_NAMES)), callable],
        "quadrature_range": [tuple, None],
        "query_fraction": [Interval(Real, 0, 1, closed="neither")],
        "compile": ["boolean", StrOptions({"fit", "meta_fit"})],
        "n_score_particles": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        model="gaussian_mean",
        *,
        n_latent=None,
        family="mean_field",
        divergence="kl",
        n_particles=100,
        inner_optimizer="auto",
        inner_lr="auto",
        max_iter="auto",
        init_loc=0.0,
        init_scale=1.0,
        meta_loss="auto",
        quadrature_range=None,
        meta_lr=0.01,
        init_lr=0.01,
        max_meta_iter=500,
        n_inner_steps=1,
        n_tasks_per_batch=16,
        meta_learn_init="auto",
        meta_gradient="full",
        truncate=None,
        implicit_max_iter=100,
        implicit_tol=1e-5,
        implicit_damping=1e-8,
        multi_step_loss="auto",
        validation_fraction=None,
        validation_interval=None,
        max_grad_norm=None,
        task_chunk_size="auto",
        query_fraction=0.5,
        batch_size=None,
        compile=False,
        n_score_particles=1000,
        dtype="float64",
        device="cpu",
        random_state=None,
        verbose=0,
        warm_start=False,
        callbacks=None,
    ):
        self.model = model
        self.n_latent = n_latent
        self.family = family
        self.divergence = divergence
        self.n_particles = n_particles
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.max_iter = max_iter
        self.init_loc = init_loc
        self.init_scale = init_scale
        self.meta_loss = meta_loss
        self.quadrature_range = quadrature_range
        self.meta_lr = meta_lr
        self.init_lr = init_lr
        self.max_meta_iter = max_meta_iter
        self.n_inner_steps = n_inner_steps
        self.n_tasks_per_batch = n_tasks_per_batch
        self.meta_learn_init = meta_learn_init
        self.meta_gradient = meta_gradient
        self.truncate = truncate
        self.implicit_max_iter = implicit_max_iter
        self.implicit_tol = implicit_tol
        self.implicit_damping = implicit_damping
        self.multi_step_loss = multi_step_loss
        self.validation_fraction = validation_fraction
        self.validation_interval = validation_interval
        self.max_grad_norm = max_grad_norm
        self.task_chunk_size = task_chunk_size
        self.query_fraction = query_fraction
        self.batch_size = batch_size
        self.compile = compile
        self.n_score_particles = n_score_particles
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callbacks = callbacks

    # ----------------------------------------------------------- hooks
    def _make_target(self):
        return make_target(self.model, self.n_latent)

    def _make_family(self, n_latent):
        return make_family(self.family, n_latent)

    def _target_uses_y(self):
        """``(requires_y, accepts_y)`` of the model; an invalid model fails later, in fit."""
        try:
            target = make_target(self.model, self.n_latent)
        except (ValueError, TypeError):
            return False, False
        return bool(target.requires_y), bool(target.requires_y or target.accepts_y)

    def _requires_y(self):
        return self._target_uses_y()[0]

    def _validate_task_data(self, X, y, reset):
        if self.quadrature_range is not None:
            qr = self.quadrature_range
            finite = all(isinstance(v, Real) and math.isfinite(v) for v in qr)
            if len(qr) != 2 or not finite or not qr[0] < qr[1]:
                raise ValueError(
                    f"quadrature_range must be a tuple (low, high) of finite numbers with "
                    f"low < high, got {qr!r}."
                )
        dtypes = [np.float64, np.float32]
        requires_y, accepts_y = self._target_uses_y()
        if requires_y and y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is "
                f"None: model={self.model!r} needs targets; pass y of shape (n_samples,)."
            )
        if accepts_y and y is not None:
            # A model that reads y (a callable log density, a regression) gets it
            # whenever it is given; one that does not ignores it (unsupervised).
            X, y = _validate_data(self, X, y, reset=reset, dtype=dtypes, y_numeric=True)
            return X, y
        X = _validate_data(self, X, reset=reset, dtype=dtypes)
        return X, None

    def _validation_score(self, X, y):
        return -self.meta_loss_value(X, y)

    def _after_fit(self, model):
        family = model.family
        self.mean_ = _torch.to_numpy(family.mean(self.variational_params_))[0]
        self.covariance_ = _torch.to_numpy(family.covariance(self.variational_params_))[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.required = self._requires_y()
        tags.non_deterministic = self.random_state is None
        return tags

    # ------------------------------------------------------ inference
    def score_samples(self, Z):
        """Compute the log density of the fitted q at latent points.

        Parameters
        ----------
        Z : array-like of shape (n_points, n_latent)
            Latent values z.

        Returns
        -------
        log_q : ndarray of shape (n_points,)
            ``log q(z)`` at each row of ``Z``, computed in float64 whatever
            ``dtype``.  Always finite for finite ``Z``: a log density below the
            float64 range (points some 1e154 standard deviations away) is
            returned as ``-np.finfo(np.float64).max`` rather than ``-inf``.
        """
        check_is_fitted(self)
        Z = _check_array(Z, dtype=[np.float64, np.float32], input_name="Z")
        if Z.shape[1] != self.n_latent_:
            raise ValueError(
                f"Z has {Z.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_latent_} features as input (the latent dimension); pass points of "
                f"shape (n_points, {self.n_latent_})."
            )
        self._setup_torch()
        family = self._model(self.n_features_in_).family
        # float64 whatever dtype: a float32 Z overflows for |z| > 3.4e38 and its square
        # for |z| > 1.8e19, while the log density itself is representable far beyond.
        params = {k: v.to(self._device, torch.float64) for k, v in self.variational_params_.items()}
        z = _torch.as_tensor(Z, device=self._device, dtype=torch.float64).unsqueeze(0)
        with torch.no_grad():
            log_q = _torch.to_numpy(family.log_prob(params, z)[0])
        # Only overflow of the squared distance makes log q non-finite here (-inf, or
        # NaN from inf - inf): saturate at the most negative float instead.
        lowest = np.finfo(np.float64).min
        return np.where(np.isfinite(log_q), log_q, lowest)

    def sample(self, n_samples=1, random_state=None):
        """Draw latent samples from the fitted q.

        Parameters
        ----------
        n_samples : int, default=1
            Number of samples.
        random_state : int, RandomState instance or None, default=None
            Seed of the draw.  None uses a seed fixed by :meth:`fit` (from the
            estimator's ``random_state``), so that repeated calls return the
            same samples, as :meth:`score` does.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_latent)
            Independent draws z ~ q.
        """
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"n_samples must be a positive int, the number of draws; got {n_samples!r}."
            )
        if random_state is None:
            seed = self._sample_seed
        else:
            seed = _torch.seed_from_random_state(_check_random_state(random_state))
        self._setup_torch()
        family = self._model(self.n_features_in_).family
        gen = _torch.make_generator(seed, self._device)
        eps = family.sample_eps(1, n_samples, generator=gen, dtype=self._dtype, device=self._device)
        with torch.no_grad():
            return _torch.to_numpy(family.rsample(self._q_params(), eps)[0])

    def meta_loss_value(self, X, y=None, meta_loss=None):
        """Evaluate a meta-loss J of the fitted q on one task (lower is better).

        The paper's evaluation of meta-learned divergences: after :meth:`fit`
        adapts q to a task, how far q is from that task's target in the
        meta-loss's sense.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The task's rows (for ``"nll"`` or a callable: held-out rows).
        y : array-like of shape (n_samples,), default=None
            Targets, for models that need or accept them (passed on to a
            callable ``model`` and ``meta_loss``).
        meta_loss : {"auto", "d_half", "tv", "nll"} or callable, default=None
            The meta-loss (see the class parameter); the estimator's
            ``meta_loss`` if None.

        Returns
        -------
        value : float
            ``D_0.5(q || p)``, the total variation, the held-out negative log
            predictive density per row, or the callable's value.
        """
        check_is_fitted(self)
        if meta_loss is not None and not callable(meta_loss) and meta_loss not in META_LOSS_NAMES:
            raise ValueError(
                f"meta_loss must be one of {list(META_LOSS_NAMES)} or a callable, got "
                f"{meta_loss!r}."
            )
        X, y = self._validate_task_data(X, y, reset=False)
        self._setup_torch()
        model = self._model(self.n_features_in_)
        tasks = self._pad([X], None if y is None else [y])
        loss = self._make_meta_loss(model, tasks, meta_loss)
        gen = _torch.make_generator(self._predict_seed, self._device)
        with torch.no_grad():
            return float(loss(model, self._q_params(), tasks, generator=gen)[0])

    def score(self, X, y=None):
        """Mean log predictive density per row, or the ELBO for likelihood-free targets.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of one task.
        y : array-like of shape (n_samples,), default=None
            Targets, for models that need or accept them (passed on to a
            callable ``model``).

        Returns
        -------
        score : float
            Higher is better.  See the class Notes.
        """
        check_is_fitted(self)
        X, y = self._validate_task_data(X, y, reset=False)
        self._setup_torch()
        model = self._model(self.n_features_in_)
        tasks = self._pad([X], None if y is None else [y])
        gen = _torch.make_generator(self._predict_seed, self._device)
        params = self._q_params()
        with torch.no_grad():
            eps = model.sample_eps(params, tasks, self.n_score_particles, generator=gen)
            z = model.rsample(params, tasks, eps)
            if model.has_likelihood:
                log_lik = model.log_likelihood(params, tasks, z)[0, 0]  # (K, n)
                lpd = torch.logsumexp(log_lik, 0) - math.log(self.n_score_particles)
                return float(lpd.mean())
            log_w = model.log_p(params, tasks, z) - model.log_q(params, tasks, z)  # (1, 1, K)
            return float(log_w.mean())
