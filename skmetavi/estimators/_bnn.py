"""MetaBNNRegressor: a Bayesian neural-network regressor whose VI divergence is meta-learned."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import RegressorMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from skmetavi import _torch
from skmetavi._validation import _check_array, _check_random_state, _validate_data
from skmetavi.estimators._base import _BaseMetaVI
from skmetavi.models import MeanFieldGaussian
from skmetavi.models._bnn import ACTIVATIONS, LIKELIHOODS, BNNRegression
from skmetavi.models._module_bnn import ModuleBNNRegression

#: Rows per chunk at prediction time (bounds memory: chunk x n_predict_samples x width).
_PREDICT_CHUNK = 4096


class MetaBNNRegressor(RegressorMixin, _BaseMetaVI):
    """Bayesian neural-network regressor with a meta-learned VI divergence.

    A mean-field Gaussian posterior over the weights of an MLP is fitted by
    variational inference with any :mod:`skmetavi.divergences` divergence.
    :meth:`meta_fit` learns the divergence over a family of regression tasks
    (Algorithm 1, Meta-D, of Zhang et al. 2021) and, with
    ``meta_learn_init=True``, the initialisation of q as well (Algorithm 2,
    Meta-D&phi), minimising the predictive negative log-likelihood of a
    held-out part of each training task.  :meth:`fit` adapts to one task, with
    the learned divergence and initialisation when they exist.

    The likelihood can express input-dependent noise: with
    ``likelihood="heteroskedastic"`` the network has a second output head
    ``sigma(x) = softplus(g(x)) + 1e-3`` whose weights are Bayesian like the
    rest (a "noise head").  This is what lets a divergence capture
    heteroskedastic noise; ``"homoskedastic"`` learns one noise scale.

    Parameters
    ----------
    divergence : {"kl", "renyi", "local_renyi", "neural_f", "tail_adaptive", "f"} or \
            Divergence, default="kl"
        Divergence of :meth:`fit` without :meth:`meta_fit`, and the initial
        (learnable) divergence of :meth:`meta_fit`.  ``"local_renyi"``
        (:class:`~skmetavi.divergences.LocalRenyi`) tilts each row's likelihood
        instead of the joint, so its weights do not collapse with many rows.
    hidden_layer_sizes : tuple of int, default=(50,)
        Hidden widths of the MLP (ignored when ``network`` is given).
    activation : {"relu", "tanh", "softplus", "elu"}, default="relu"
        Hidden activation (ignored when ``network`` is given).
    network : torch.nn.Module, default=None
        Your own network instead of the MLP: any ``torch.nn.Module`` mapping
        inputs of shape ``(n, n_features)`` to outputs of shape ``(n, 2)`` for
        ``likelihood="heteroskedastic"`` (column 0 the mean, column 1 the raw
        noise, ``sigma = softplus(raw) + 1e-3``) or ``(n, 1)`` / ``(n,)`` (the
        mean) for ``"homoskedastic"``.  All its trainable parameters
        (``requires_grad=True``) are the Bayesian weights, flattened in
        ``named_parameters()`` order, with the prior ``N(0, prior_scale^2)``;
        their current values are the initial mean of q (the MLP's are random
        draws).  Parameters with ``requires_grad=False`` and buffers are fixed
        constants.  The module is evaluated in evaluation mode (dropout off)
        with :func:`torch.func.functional_call` under :func:`torch.vmap`, on a
        copy: ``network`` itself is never modified.  Each row's output must
        depend on that row only, so batch normalisation is rejected (use
        ``torch.nn.LayerNorm``).  Define its class at the top level of a
        module for the estimator to pickle.  None: the MLP of
        ``hidden_layer_sizes`` and ``activation``.  See
        :class:`~skmetavi.models.ModuleBNNRegression`.
    likelihood : {"heteroskedastic", "homoskedastic"}, default="heteroskedastic"
        Noise model (see above).
    prior_scale : float, default=1.0
        Standard deviation of the Gaussian prior on each weight.
    n_particles : int, default=10
        Weight samples K per inner step.
    inner_optimizer : {"auto", "adam", "sgd"}, default="auto"
        Inner-loop optimiser of both :meth:`fit` and :meth:`meta_fit`.
        ``"auto"``: SGD with a learned initialisation (``meta_learn_init=True``,
        and :meth:`fit` from ``meta_init_``), Adam otherwise.  A fresh Adam's
        first step, ``lr * sign(direction)``, gives the divergence no
        meta-gradient and moves a 3-row task as far as a 40-row one; SGD's steps
        are linear in the direction, so a task with little data moves little (measured on
        sinusoid tasks with 3 support rows, 100 steps from the learned
        initialisation: mean test log density -1.1 with SGD, -1.4e3 with Adam).
    inner_lr : float or "auto", default="auto"
        Inner step size (beta) of whichever optimiser ``inner_optimizer``
        selects; ``"auto"``: 0.01 for Adam, 3e-4 for SGD (on standardised
        targets).  A number tuned for one optimiser is usually wrong for the
        other: set ``inner_optimizer`` too.
    max_iter : int or "auto", default="auto"
        Epochs of :meth:`fit` (passes over the task's rows in minibatches of
        ``batch_size``).  ``"auto"``: 200 epochs, or after :meth:`meta_fit`
        with ``meta_learn_init=True`` the ``n_inner_steps`` steps the learned
        initialisation was trained for (adapting a small task for hundreds of
        epochs from it overfits badly).  0 keeps the starting q.
    batch_size : int, default=None
        Rows per inner step (the likelihood is rescaled by N / batch); all rows
        if None.
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
    init_scale : float, default=0.01
        Initial standard deviation of q for every weight; the initial means are
        He-scaled random draws (``network``'s own parameters if given).
    normalize_y : {"auto", "task", "pooled"} or bool, default="auto"
        Standardise the targets (predictions are returned in the original
        units).  ``"task"`` (or True): each task by its own mean and standard
        deviation (the support part's, during :meth:`meta_fit`).
        ``"pooled"``: by those of all the meta-training tasks' support rows,
        which :meth:`fit` then uses for new tasks too -- a learned
        initialisation is a model of the population in the population's
        units, and a 3-row task's own standard deviation is no estimate of its
        scale (measured, sinusoid tasks with 3 support rows, the learned
        initialisation's own predictions: mean test log density -0.8 pooled,
        -42 per task).  ``"auto"``: pooled with ``meta_learn_init=True``, per task
        otherwise.  False: no standardisation.  Without a :meth:`meta_fit`,
        ``"pooled"`` has no population and scales by the task's own statistics;
        after ``meta_fit(meta_learn_init=True)``, :meth:`fit` always uses the
        scaling the learned initialisation was trained with (and warns if
        ``normalize_y`` now says otherwise).
    n_predict_samples : int, default=100
        Weight samples of :meth:`predict`, :meth:`log_predictive_density` and
        :meth:`sample_y`.
    meta_loss : {"nll"} or callable, default="nll"
        Meta-loss J: the negative log predictive density of the held-out
        ``query_fraction`` of each training task, or a callable
        ``fn(q, X, y) -> scalar Tensor`` (q: the task's weight posterior as a
        ``torch.distributions.MultivariateNormal``), which gets the same
        held-out query rows ``X`` and ``y`` (``y`` standardised as the inner
        loop sees it, see ``normalize_y``).
    meta_lr : float, default=0.01
        Adam step size of the divergence parameters (gamma).
    init_lr : float, default=0.01
        Adam step size of the shared initialisation (tau, Algorithm 2).
    max_meta_iter : int, default=200
        Outer iterations of :meth:`meta_fit`.
    n_inner_steps : int, default=1
        Inner steps B per outer iteration.
    n_tasks_per_batch : int, default=16
        Tasks M per outer iteration.
    meta_learn_init : bool or "auto", default="auto"
        Also meta-learn the initialisation of q (Algorithm 2, Meta-D&phi).
        ``"auto"``: exactly when the divergence has nothing to learn (e.g. the
        default ``"kl"``: the paper's VI&phi), so that :meth:`meta_fit` always
        meta-learns something; a learnable divergence then runs Algorithm 1.
    meta_gradient : {"full", "first_order", "truncated", "implicit"}, default="full"
        Meta-gradient through the inner steps (see :class:`MetaDivergenceVI`).
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
    max_grad_norm : float, default=1.0
        Clip the norm of the meta-gradients of the divergence and of the
        initialisation (separately) before each outer Adam step; None disables
        clipping.  Unrolled inner loops occasionally produce huge
        meta-gradients that derail meta-training (as in MAML).
    task_chunk_size : int, "auto" or None, default="auto"
        Process the tasks of an outer iteration (and of a batched adaptation)
        in chunks of this many, accumulating meta-gradients, to bound memory;
        the result is the same as without chunking (the noise of each task
        does not depend on the split).  ``"auto"``: on the CPU, chunks whose
        largest intermediate (the network's activations for all particles, on
        the support or query rows) is about 8 MiB, which keeps large tasks in
        the caches (measured 2.4-3.7x faster than all 16 tasks at once at 2000
        rows per task), and about 2 MiB, in chunks of one size, for a compiled
        meta-iteration (``compile="meta_fit"``, which keeps every step's
        intermediates at once: one task at a time was 1.2x faster than four at
        1000 rows); all at once on an accelerator or with ``network=`` (a
        module reports no size).  None: all at once.
    query_fraction : float, default=0.5
        Held-out fraction of each training task's rows (its rows are
        observations): the meta-loss, built-in or callable, is evaluated on
        these query rows after the inner loop has adapted q to the others;
        meta-validation (``validation_fraction``) splits its tasks the same way.
    dtype : {"float32", "float64"}, default="float32"
        Precision of the torch computations.
    device : str, default="cpu"
        Torch device; fitted state is kept on the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds fitting and prediction; the global RNGs are never touched.
    verbose : int, default=0
        Progress on stderr.  0: none; 1: a tqdm bar during :meth:`fit` and
        :meth:`meta_fit` and a one-line summary when each ends (iterations,
        first and last loss, the divergence's learned scalars, seconds); 2:
        also the learned scalars in the bar, a line per meta-validation and
        every tenth of a fit, and the settings in the summary.
    warm_start : bool, default=False
        Continue from the previous :meth:`fit` / :meth:`meta_fit` state.
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
        Divergence of the last :meth:`fit`.
    variational_params_ : dict of str to torch.Tensor
        ``loc`` and ``scale_raw`` of q over the flat weight vector (and
        ``log_noise`` for the homoskedastic likelihood); CPU tensors.
    n_weights_ : int
        Number of weights and biases (of ``network``'s trainable parameters if given).
    loss_curve_ : ndarray of shape (n_steps,)
        Negative bound at each inner step of :meth:`fit`; warm-started fits
        append to it.
    history_ : skmetavi.callbacks.History
        One record per inner step of :meth:`fit` (``iteration``, ``loss``,
        ``time``: that iteration's wall-clock seconds, not cumulative),
        ``history_[:, "loss"]`` equal to ``loss_curve_``;
        warm-started fits append to it.
    n_iter_ : int
        Inner steps run by the last :meth:`fit` call.
    n_features_in_ : int
        Number of features seen during fit.
    meta_divergence_ : Divergence
        Divergence learned by :meth:`meta_fit`.
    meta_init_ : dict of str to torch.Tensor
        Learned initialisation (``meta_learn_init=True``).
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
        Mean meta-loss per outer iteration.
    meta_history_ : skmetavi.callbacks.History
        One record per outer iteration of :meth:`meta_fit` (``iteration``,
        ``meta_loss``, the divergence's learned scalars such as ``alpha``,
        ``time``: that iteration's wall-clock seconds, its meta-validation
        included, and ``validation_score`` / ``validation_kl_score`` where
        meta-validation ran); warm-started calls append to it.
    n_meta_iter_ : int
        Outer iterations run in total (warm-started :meth:`meta_fit` calls add up).
    meta_tasks_ : ndarray
        Task labels seen by :meth:`meta_fit`.

    See Also
    --------
    MetaDivergenceVI : VI with a meta-learned divergence for generic targets.

    Notes
    -----
    ``predict(X, return_std=True)`` returns the standard deviation of the
    posterior predictive (epistemic + aleatoric); ``epistemic_only=True``
    leaves out the noise.  :meth:`score` is R^2; likelihood-based scores are
    in :mod:`skmetavi.metrics`.

    Predictions are finite for any input within float32's range, however far
    from the training data: rows that overflow a float32 network are
    recomputed in float64.  Inputs for which float64 overflows too (around
    ``|x| = 1e150``) raise a ``ValueError`` asking to rescale them.

    :func:`sklearn.base.clone` drops meta-learned state; pass a learned
    divergence explicitly, ``MetaBNNRegressor(divergence=est.meta_divergence_)``,
    or use :class:`skmetavi.model_selection.TaskAdaptiveRegressor`.

    References
    ----------
    .. [1] Zhang, R., Li, Y., De Sa, C., Devlin, S. and Zhang, C.
       "Meta-learning divergences of variational inference", AISTATS 2021.
    .. [2] Depeweg, S., Hernández-Lobato, J. M., Doshi-Velez, F. and Udluft, S.
       "Learning and policy search in stochastic dynamical systems with
       Bayesian neural networks", ICLR 2017.

    Examples
    --------
    >>> from skmetavi import MetaBNNRegressor
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> X, y, groups = make_sinusoid_tasks(4, 30, random_state=0)
    >>> est = MetaBNNRegressor(hidden_layer_sizes=(16,), max_iter=50, random_state=0)
    >>> est = est.fit(X[groups == 0], y[groups == 0])
    >>> mean, std = est.predict(X[:3], return_std=True)
    >>> mean.shape, std.shape
    ((3,), (3,))
    """

    _parameter_constraints = {
        **_BaseMetaVI._parameter_constraints,
        "hidden_layer_sizes": [tuple, list],
        "activation": [StrOptions(set(ACTIVATIONS))],
        # Checked by ModuleBNNRegression, whose errors say what a network must be.
        "network": "no_validation",
        "likelihood": [StrOptions(set(LIKELIHOODS))],
        "prior_scale": [Interval(Real, 0, None, closed="neither")],
        "init_scale": [Interval(Real, 0, None, closed="neither")],
        "normalize_y": ["boolean", StrOptions({"auto", "task", "pooled"})],
        "n_predict_samples": [Interval(Integral, 1, None, closed="left")],
        "meta_loss": [StrOptions({"nll"}), callable],
        "query_fraction": [Interval(Real, 0, 1, closed="neither")],
        "compile": ["boolean", StrOptions({"fit", "meta_fit"})],
    }

    def __init__(
        self,
        divergence="kl",
        *,
        hidden_layer_sizes=(50,),
        activation="relu",
        network=None,
        likelihood="heteroskedastic",
        prior_scale=1.0,
        n_particles=10,
        inner_optimizer="auto",
        inner_lr="auto",
        max_iter="auto",
        batch_size=None,
        compile=False,
        init_scale=0.01,
        normalize_y="auto",
        n_predict_samples=100,
        meta_loss="nll",
        meta_lr=0.01,
        init_lr=0.01,
        max_meta_iter=200,
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
        max_grad_norm=1.0,
        task_chunk_size="auto",
        query_fraction=0.5,
        dtype="float32",
        device="cpu",
        random_state=None,
        verbose=0,
        warm_start=False,
        callbacks=None,
    ):
        self.divergence = divergence
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.network = network
        self.likelihood = likelihood
        self.prior_scale = prior_scale
        self.n_particles = n_particles
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.max_iter = max_iter
        self.batch_size = batch_size
        self.compile = compile
        self.init_scale = init_scale
        self.normalize_y = normalize_y
        self.n_predict_samples = n_predict_samples
        self.meta_loss = meta_loss
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
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callbacks = callbacks

    # ----------------------------------------------------------- hooks
    def _make_target(self):
        if self.network is not None:
            return ModuleBNNRegression(
                self.network, likelihood=self.likelihood, prior_scale=self.prior_scale
            )
        return BNNRegression(
            hidden_layer_sizes=self.hidden_layer_sizes,
            activation=self.activation,
            likelihood=self.likelihood,
            prior_scale=self.prior_scale,
        )

    def _make_family(self, n_latent):
        return MeanFieldGaussian(n_latent)

    def _validate_task_data(self, X, y, reset):
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None; "
                "pass y of shape (n_samples,)."
            )
        return _validate_data(
            self, X, y, reset=reset, dtype=[np.float64, np.float32], y_numeric=True
        )

    @staticmethod
    def _standardise(y, rows):
        mean = float(np.mean(y[rows]))
        std = float(np.std(y[rows]))
        return mean, std if std > 1e-12 else 1.0

    def _normalisation(self):
        """``None``, ``"task"`` or ``"pooled"``: how ``normalize_y`` standardises targets."""
        mode = self.normalize_y
        if isinstance(mode, (bool, np.bool_)):
            return "task" if mode else None
        if mode == "auto":
            return "pooled" if self._learns_init() else "task"
        return mode

    def _meta_blow_up_hint(self):
        if self.network is not None or self.likelihood != "heteroskedastic":
            return ""
        # Measured (10 sinusoid tasks of 20 rows, 200 outer iterations, 4 seeds): the
        # query NLL blows up through the noise head (one task's query rows outside its
        # support range reach NLL ~2e4); with one noise scale it stays at 1.5-3.8.
        return ("With few support rows the heteroskedastic noise head is the usual culprit: "
                "likelihood='homoskedastic' avoids it. ")

    def _transform_meta_targets(self, y, support_idx, query_idx):
        mode = self._normalisation()
        previous = getattr(self, "_meta_y_stats", None)
        warm = self.warm_start and hasattr(self, "_meta_state") and previous is not None
        if warm and previous["mode"] == mode:
            stats = previous  # a continued meta_fit keeps the units its state was trained in
        elif mode == "pooled":
            stats = dict(zip(("mean", "std"), self._standardise(y, np.concatenate(support_idx))))
            stats["mode"] = mode
        else:
            stats = {"mode": mode}
        # Set now, since meta-validation adapts through fit during meta_fit; meta_fit
        # restores the previous value if it fails (see _BaseMetaVI.meta_fit).
        self._meta_y_stats = stats
        if mode is None:
            return y
        y = np.array(y, dtype=float, copy=True)
        if mode == "pooled":
            every = np.concatenate([*support_idx, *query_idx])
            y[every] = (y[every] - stats["mean"]) / stats["std"]
            return y
        for s, q in zip(support_idx, query_idx):
            rows = np.union1d(s, q)
            mean, std = self._standardise(y, s)
            y[rows] = (y[rows] - mean) / std
        return y

    def _fit_target_transform(self, y):
        mode = self._normalisation()
        stats = getattr(self, "_meta_y_stats", None)
        if hasattr(self, "meta_init_") and stats is not None:
            if stats["mode"] != mode:
                warnings.warn(
                    f"normalize_y={self.normalize_y!r} scales targets {mode or 'not at all'}, "
                    f"but the learned initialisation (meta_init_) was meta-trained on targets "
                    f"scaled {stats['mode'] or 'not at all'}; fit uses the latter, the units "
                    "meta_init_ is in. Call meta_fit again to change them.",
                    UserWarning, stacklevel=4,
                )
            mode = stats["mode"]
        if mode is None:
            return y, {"_y_mean": 0.0, "_y_std": 1.0}
        if mode == "pooled" and stats is not None and stats["mode"] == "pooled":
            mean, std = stats["mean"], stats["std"]  # the meta-training tasks' (see normalize_y)
        else:
            mean, std = self._standardise(y, slice(None))
        return (y - mean) / std, {"_y_mean": mean, "_y_std": std}

    def _after_fit(self, model):
        self.n_weights_ = model.n_latent

    def _validation_score(self, X, y):
        return float(np.mean(self.log_predictive_density(X, y)))

    # -------------------------------------------------------- prediction
    def _network_outputs(self, target, z, params, X):
        """Yield the networks' ``(mean, scale)`` per chunk of rows, each (S, n_chunk).

        Standardised units, on ``device``, under ``torch.no_grad()``.  Rows whose
        outputs overflow a float32 network (inputs beyond about 1e37, or beyond
        float32's range) are recomputed in float64 from the float64 inputs, so that
        predictions stay finite wherever float64 can represent them.
        """
        for start in range(0, X.shape[0], _PREDICT_CHUNK):
            X_chunk = X[start : start + _PREDICT_CHUNK]
            Xc = _torch.as_tensor(X_chunk, device=self._device, dtype=self._dtype)
            m, s = target.forward(z, Xc.unsqueeze(0), params)
            m, s = m[0], s[0]  # (S, n_chunk)
            bad = ~(torch.isfinite(m) & torch.isfinite(s)).all(0)  # (n_chunk,)
            if self._dtype != torch.float64 and bool(bad.any()):
                X64 = _torch.as_tensor(X_chunk, device=self._device, dtype=torch.float64)
                m64, s64 = target.forward(
                    z.to(torch.float64),
                    X64[bad].unsqueeze(0),
                    {k: v.to(torch.float64) for k, v in params.items()},
                )
                m, s = m.to(torch.float64), s.to(torch.float64)
                m[:, bad], s[:, bad] = m64[0], s64[0]
            yield m, s

    def _check_finite_outputs(self, values, X):
        """Raise a clear error for rows of ``values`` (..., n) that are not finite."""
        bad = ~np.isfinite(values).reshape(-1, values.shape[-1]).all(0)
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(
                f"The predictions overflow even in float64 for {rows.size} row(s) of X (rows "
                f"{rows[:5].tolist()}, largest |x| = {np.abs(X[rows]).max():.3g}): such "
                "inputs are far outside any training data and have no meaningful prediction. "
                "Rescale the inputs (e.g. with sklearn.preprocessing.StandardScaler in a "
                "Pipeline) or clip them."
            )

    def _predictive_components(self, X):
        """Per-sample predictive means and noise scales in original units, (S, n) each."""
        mean, scale, _ = self._components(X)
        return mean, scale

    def _components(self, X):
        """:meth:`_predictive_components` and the validated ``X``."""
        check_is_fitted(self)
        X = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        self._setup_torch()
        model = self._model(self.n_features_in_)
        family, target = model.family, model.target
        params = self._q_params()
        gen = _torch.make_generator(self._predict_seed, self._device)
        eps = family.sample_eps(
            1, self.n_predict_samples, generator=gen, dtype=self._dtype, device=self._device
        )
        means, scales = [], []
        with torch.no_grad():
            z = family.rsample(params, eps)  # (1, S, n_weights)
            for m, s in self._network_outputs(target, z, params, X):
                means.append(_torch.to_numpy(m))
                scales.append(_torch.to_numpy(s))
        with np.errstate(over="ignore", invalid="ignore"):
            mean = np.concatenate(means, axis=-1) * self._y_std + self._y_mean
            scale = np.concatenate(scales, axis=-1) * self._y_std
        self._check_finite_outputs(mean, X)
        self._check_finite_outputs(scale, X)
        return mean, scale, X

    def predict(self, X, return_std=False, epistemic_only=False):
        """Posterior predictive mean (and standard deviation).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Inputs.
        return_std : bool, default=False
            Also return the predictive standard deviation.
        epistemic_only : bool, default=False
            With ``return_std``, leave out the observation noise: the standard
            deviation of the network's mean over the weight posterior.

        Returns
        -------
        y_mean : ndarray of shape (n_samples,)
            Predictive mean, averaged over ``n_predict_samples`` weight draws.
        y_std : ndarray of shape (n_samples,)
            Predictive standard deviation (only with ``return_std=True``).
        """
        means, scales, X = self._components(X)
        with np.errstate(over="ignore", invalid="ignore"):
            y_mean = means.mean(0)
            var = means.var(0) if return_std else None
            if return_std and not epistemic_only:
                var = var + (scales**2).mean(0)
        self._check_finite_outputs(y_mean, X)
        if not return_std:
            return y_mean
        self._check_finite_outputs(var, X)
        return y_mean, np.sqrt(var)

    def log_predictive_density(self, X, y):
        """Per-row log density of ``y`` under the posterior predictive mixture.

        ``log (1/S) sum_s N(y; f_s(x), sigma_s(x)^2)`` over ``n_predict_samples``
        weight draws ``s`` (the paper's "test LL"), in the units of ``y``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Inputs.
        y : array-like of shape (n_samples,)
            Targets.

        Returns
        -------
        log_density : ndarray of shape (n_samples,)
            Log predictive density of each row; its mean is the "test LL".
        """
        y = _check_array(y, ensure_2d=False, dtype=np.float64, input_name="y")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(
                f"y must be 1-D of shape (n_samples,), got shape {y.shape}; pass one target "
                "per row of X."
            )
        means, scales = self._predictive_components(X)
        if y.shape[0] != means.shape[1]:
            raise ValueError(
                f"y has {y.shape[0]} entries but X has {means.shape[1]} rows; pass one "
                "target per row of X."
            )
        with np.errstate(over="ignore", invalid="ignore"):
            log_n = (
                -0.5 * ((y - means) / scales) ** 2 - np.log(scales) - 0.5 * math.log(2 * math.pi)
            )
            m = log_n.max(0)
            out = m + np.log(np.mean(np.exp(log_n - m), axis=0))
        # Only a squared residual beyond the float64 range makes it non-finite (-inf, or
        # NaN from -inf - -inf): saturate at the most negative float, as score_samples.
        return np.where(np.isfinite(out), out, np.finfo(np.float64).min)

    def sample_y(self, X, n_samples=1, random_state=None):
        """Draw targets from the posterior predictive.

        Each draw uses its own weight sample and noise draw.

        Parameters
        ----------
        X : array-like of shape (n_samples_X, n_features)
            Inputs.
        n_samples : int, default=1
            Draws per input.
        random_state : int, RandomState instance or None, default=None
            Seed of the noise; None uses a seed fixed at :meth:`fit`.

        Returns
        -------
        y_samples : ndarray of shape (n_samples_X, n_samples)
            Draws from the posterior predictive, in the units of ``y``.
        """
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"n_samples must be a positive int, the number of draws per row; got "
                f"{n_samples!r}."
            )
        X = _validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        rng = (
            _check_random_state(random_state)
            if random_state is not None
            else np.random.RandomState(self._sample_seed % (2**32))
        )
        self._setup_torch()
        model = self._model(self.n_features_in_)
        family, target = model.family, model.target
        params = self._q_params()
        gen = _torch.make_generator(_torch.seed_from_random_state(rng), self._device)
        eps = family.sample_eps(1, n_samples, generator=gen, dtype=self._dtype, device=self._device)
        out = []
        with torch.no_grad():
            z = family.rsample(params, eps)
            for m, s in self._network_outputs(target, z, params, X):
                noise = torch.randn(m.shape, generator=gen, dtype=self._dtype, device=m.device)
                out.append(_torch.to_numpy(m + s * noise.to(m.dtype)))
        with np.errstate(over="ignore", invalid="ignore"):
            y = np.concatenate(out, axis=-1) * self._y_std + self._y_mean
        self._check_finite_outputs(y, X)
        return y.T
