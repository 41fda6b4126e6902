"""MetaVAE: a variational autoencoder whose divergence (and initialisation) is meta-learned.

The density estimator of the paper's Sec. 4.3: every task is a dataset of
images (a digit class), :meth:`MetaVAE.meta_fit` learns the divergence over
the training tasks (Algorithm 1, Meta-D; ``meta_learn_init=True``: Algorithm 2,
Meta-D&phi, which also learns the networks' initialisation) and :meth:`MetaVAE.fit`
trains a VAE on a new task with it.  The divergence weights the ``K`` samples
of z of *each row* (weights and log-sum-exp per data point, never after
summing the batch), and the decoder moves along the same normalised weights as
the encoder (:class:`skmetavi.models.VAELatent`).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import functools
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, DensityMixin, TransformerMixin
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from skmetavi import _torch
from skmetavi._bilevel import NegativeEvidence, VIRun
from skmetavi._optim import make_optimizer
from skmetavi._validation import _check_array, _check_random_state, _validate_data
from skmetavi.divergences import KL
from skmetavi.estimators._base import _BaseMetaVI
from skmetavi.models._row_q import INFERENCE, MIN_SCALE
from skmetavi.models._vae import ACTIVATIONS, DECODERS, FrozenDecoder, VAELatent

#: Floats per chunk of the importance-sampling estimates (rows x samples x features).
_CHUNK_FLOATS = 2**23
#: Rows per chunk of the importance-sampling estimates and of the local (per-row) fits.
_ROW_CHUNK = 256
_LOCAL_CHUNK = 2048


def _in_float64(method):
    """Run a prediction method on a shallow copy set up for float64 (the fitted state is shared).

    float32 matrix products round differently for different numbers of rows, so a
    row's value would depend on the rows it is computed with; the copy keeps the
    estimator's own attributes unchanged.
    """
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        check_is_fitted(self)
        est = copy.copy(self)
        est._setup_predict()
        return method(est, *args, **kwargs)

    return wrapper


def _inverse_softplus(t):
    """Elementwise ``log(exp(t) - 1)`` for t > 0 (tensor)."""
    return t + torch.log(-torch.expm1(-t))


class MetaVAE(ClassNamePrefixFeaturesOutMixin, TransformerMixin, DensityMixin, _BaseMetaVI):
    """Variational autoencoder whose VI divergence is meta-learned over a family of datasets.

    ``z_n ~ N(0, I)`` and ``x_n | z_n`` from an MLP decoder (Bernoulli pixels
    for data in [0, 1], or a Gaussian with a learned noise per feature);
    ``q(z_n | x_n)`` is a diagonal Gaussian given by an MLP encoder
    (``inference="amortized"``) or free per row (``"factorized"``).  Any
    :mod:`skmetavi.divergences` divergence trains it, applied per data point:
    the ``K`` samples of z of each row are weighted and log-sum-exp'ed for that
    row (KL gives the ELBO, Rényi-alpha the VR bound of Li & Turner 2016,
    alpha -> 0 the IWAE bound), and the decoder is updated with the same
    normalised weights as the encoder, ``sum_k w_nk grad log p(x_n, z_nk)``.

    :meth:`meta_fit` learns the divergence over training tasks (rows sharing
    a ``groups`` label), minimising the negative importance-weighted evidence
    of held-out rows of each task after the inner steps (Algorithm 1, Meta-D,
    of Zhang et al. 2021; with ``meta_learn_init=True`` Algorithm 2,
    Meta-D&phi, which also learns the networks' initialisation).
    :meth:`fit` trains a VAE on one task with the learned divergence (and
    initialisation).

    Parameters
    ----------
    n_components : int, default=2
        Latent dimension.
    hidden_layer_sizes : tuple of int, default=(64,)
        Hidden widths of the encoder; the decoder mirrors them.  ``()`` gives
        linear maps (probabilistic PCA with ``decoder="gaussian"``).
    encoder_layer_sizes : tuple of int, default=None
        Hidden widths of the encoder alone, if they differ from
        ``hidden_layer_sizes`` (a small encoder on a large decoder shows an
        amortisation gap, :meth:`amortization_gap`).
    decoder : {"auto", "bernoulli", "gaussian"}, default="auto"
        ``"bernoulli"``: values in [0, 1] (binarised images; grey levels are
        accepted and scored by the same cross-entropy, which is then not a
        normalised density); ``"gaussian"``: real values, with a learned noise
        standard deviation per feature.  ``"auto"``: ``"bernoulli"`` if every
        value of the data fitted (or meta-fitted) is 0 or 1, else
        ``"gaussian"`` (``decoder_``; after Algorithm 2, the decoder of the
        learned initialisation).
    inference : {"amortized", "factorized"}, default="amortized"
        An encoder network shared by the rows, or free Gaussian parameters per
        row (refitted for new rows by :meth:`score_samples` and
        :meth:`transform`, ``local_max_iter`` steps with the decoder fixed).
    activation : {"tanh", "relu", "softplus", "elu"}, default="tanh"
        Hidden activation of both networks.
    init_scale : float, default=1.0
        Multiplies the Glorot-scaled random initial weights.
    divergence : {"kl", "renyi", "neural_f", "tail_adaptive", "f"} or Divergence, default="kl"
        The divergence of :meth:`fit` when no meta-learned one exists, and the
        initial (learnable) divergence of :meth:`meta_fit`.
    n_particles : int, default=5
        Samples K of z per row and inner step (also for the meta-loss).
    inner_optimizer : {"auto", "adam", "sgd"}, default="auto"
        Optimiser of the networks, in :meth:`fit` and in the inner loop of
        :meth:`meta_fit`.  ``"auto"`` is Adam.  Algorithm 1 keeps each
        training task's Adam state across outer iterations, so the learned
        divergence gets a meta-gradient from the first revisit; Algorithm 2
        restarts it for every task, whose first Adam step hides the divergence
        (use ``n_inner_steps >= 2``, or ``"sgd"``).
    inner_lr : float or "auto", default="auto"
        Inner step size; ``"auto"``: 1e-3 for Adam (1e-2 with
        ``inference="factorized"``, whose per-row parameters see one update
        per epoch), 1e-4 for SGD (the objective is summed over rows).
    max_iter : int or "auto", default="auto"
        Epochs of :meth:`fit`; ``"auto"``: 200, or after Algorithm 2 the
        ``n_inner_steps`` steps the initialisation was trained for.
    batch_size : int or None, default=100
        Rows per inner step (the objective is rescaled to the task); all rows
        if None.  Also the rows of each meta-loss evaluation.
    meta_lr : float, default=0.01
        Adam step size of the divergence's parameters (gamma).
    init_lr : float, default=1e-3
        Adam step size of the learned initialisation (tau, Algorithm 2).
    max_meta_iter : int, default=200
        Outer iterations of :meth:`meta_fit`.
    n_inner_steps : int, default=1
        Inner steps B per outer iteration.
    n_tasks_per_batch : int, default=16
        Tasks per outer iteration (all of them if fewer).
    meta_learn_init : bool or "auto", default="auto"
        Also meta-learn the initialisation of q (Algorithm 2, Meta-D&phi).
        ``"auto"``: exactly when the divergence has nothing to learn (e.g. the
        default ``"kl"``: the paper's VI&phi), so that :meth:`meta_fit` always
        meta-learns something; a learnable divergence then runs Algorithm 1.
    meta_gradient : {"full", "first_order", "truncated", "implicit"}, default="full"
        How the meta-gradient goes through the inner steps (see
        :class:`~skmetavi.MetaDivergenceVI`).
    truncate : int, default=None
        Steps back-propagated with ``meta_gradient="truncated"``.
    implicit_max_iter : int, default=100
        GMRES steps of ``meta_gradient="implicit"``.
    implicit_tol : float, default=1e-5
        Relative residual of that solve.
    implicit_damping : float, default=1e-8
        Relative damping of that solve.
    multi_step_loss : bool or "auto", default="auto"
        Average the meta-loss over the inner loop (on for Algorithm 2 with
        ``"auto"``).
    validation_fraction : float, default=None
        Fraction of the training tasks held out for meta-validation (the
        candidate divergence, and KL, adapt as :meth:`fit` would and are
        scored by the held-out evidence; the best is kept).
    validation_interval : int, default=None
        Outer iterations between meta-validations (``max_meta_iter // 10``).
    max_grad_norm : float, default=None
        Clip the meta-gradients' norm.
    task_chunk_size : int, "auto" or None, default="auto"
        Tasks processed at once (bounds memory; results do not change).
        ``"auto"``: chunks sized from the model on the CPU where it tells its
        size, else all at once (:class:`MetaBNNRegressor`); None: all at once.
    query_fraction : float, default=0.5
        Fraction of each training task's rows held out for the meta-loss
        (amortised inference; a factorised q exists only for the rows it was
        fitted to, so there the meta-loss uses the task's own rows).
    n_score_samples : int, default=5000
        Importance samples per row of :meth:`score_samples` (the IWAE estimate
        of Burda et al. 2016; 5000 is the standard for reported numbers).
        Computed in chunks, so memory stays bounded.
    local_max_iter : int, default=300
        Adam steps of the per-row q fitted for new rows (factorised inference)
        and of the factorised optimum of :meth:`amortization_gap`; each step
        draws ``max(n_particles, 50)`` samples of z per row.
    local_lr : float, default=0.05
        Their initial Adam step size, decayed geometrically to ``local_lr /
        100`` over the steps (the noisy per-row optimum is then approached
        closely: a constant step leaves a few hundredths of a nat per row).
    dtype : {"float32", "float64"}, default="float32"
        Floating-point precision of the torch computations.
    device : str, default="cpu"
        Torch device; fitted state is kept on the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw (initial weights, minibatches, samples of z, scores).
    verbose : int, default=0
        Progress on stderr.  0: none; 1: a tqdm bar during :meth:`fit` and
        :meth:`meta_fit` and a one-line summary when each ends (iterations,
        first and last loss, the divergence's learned scalars, seconds); 2:
        also the learned scalars in the bar, a line per meta-validation and
        every tenth of a fit, and the settings in the summary.
    warm_start : bool, default=False
        Continue from the previous :meth:`fit` (or :meth:`meta_fit`).
    callbacks : list, callable or Callback, default=None
        Called after each iteration of :meth:`fit` and :meth:`meta_fit`:
        ``fn(estimator, record) -> bool or None`` with that iteration's record
        (the row appended to ``history_`` or ``meta_history_``), True to stop
        training after it; or :class:`skmetavi.callbacks.Callback` objects
        such as :class:`~skmetavi.callbacks.EarlyStopping` (one alone is a
        list of one).

    Attributes
    ----------
    decoder_ : {"bernoulli", "gaussian"}
        The decoder fitted (``decoder="auto"`` resolved).
    variational_params_ : dict of str to torch.Tensor
        Encoder (or per-row q) and decoder parameters of the fitted VAE (CPU
        tensors with a leading dimension 1).
    divergence_ : Divergence
        Divergence used by the last :meth:`fit`.
    loss_curve_ : ndarray of shape (n_steps,)
        Negative bound of the divergence (summed over the task's rows) at each
        inner step of :meth:`fit`.
    history_ : skmetavi.callbacks.History
        One record per inner step of :meth:`fit` (``iteration``, ``loss``,
        ``time``: that iteration's wall-clock seconds, not cumulative),
        ``history_[:, "loss"]`` equal to ``loss_curve_``;
        warm-started fits append to it.
    n_iter_ : int
        Inner steps of the last :meth:`fit`.
    n_features_in_ : int
        Number of features seen during :meth:`fit` or :meth:`meta_fit`.
    meta_divergence_ : Divergence
        Divergence learned by :meth:`meta_fit`.
    meta_init_ : dict of str to torch.Tensor
        Learned initialisation of the networks (Algorithm 2 only).
    meta_decoder_ : {"bernoulli", "gaussian"}
        The decoder :meth:`meta_fit` trained (a learned initialisation fixes it
        for :meth:`fit`).
    meta_loss_curve_ : ndarray of shape (n_meta_iter_,)
        Mean meta-loss (negative held-out evidence per row) of each outer
        iteration.
    meta_history_ : skmetavi.callbacks.History
        One record per outer iteration of :meth:`meta_fit` (``iteration``,
        ``meta_loss``, the divergence's learned scalars such as ``alpha``,
        ``time``: that iteration's wall-clock seconds, its meta-validation
        included, and ``validation_score`` / ``validation_kl_score`` where
        meta-validation ran); warm-started calls append to it.
    n_meta_iter_ : int
        Outer iterations run in total.
    meta_tasks_ : ndarray
        The task labels seen by :meth:`meta_fit`.

    See Also
    --------
    skmetavi.models.VAELatent : The model, as the engine sees it.
    skmetavi.datasets.load_digits_tasks : Binarised 8x8 digits, one task per digit.
    skmetavi.datasets.fetch_mnist_tasks : Binarised MNIST, one task per digit.

    Notes
    -----
    :meth:`score` is the mean of :meth:`score_samples`, the log-likelihood per
    row, as in :class:`sklearn.mixture.GaussianMixture` (scikit-learn's
    :class:`~sklearn.neighbors.KernelDensity` sums instead).  The estimate is
    a stochastic lower bound of ``log p(x)`` that tightens as
    ``n_score_samples`` grows; it is reproducible (its draws are seeded by
    :meth:`fit`).

    The fitted state is the networks of one VAE; :meth:`fit` on another task
    trains a new one (from the learned initialisation after Algorithm 2).

    References
    ----------
    .. [1] Zhang, R., Li, Y., De Sa, C., Devlin, S. and Zhang, C.
       "Meta-learning divergences of variational inference", AISTATS 2021.
    .. [2] Li, Y. and Turner, R. E. "Rényi divergence variational inference",
       NeurIPS 2016.
    .. [3] Burda, Y., Grosse, R. and Salakhutdinov, R. "Importance weighted
       autoencoders", ICLR 2016.
    .. [4] Cremer, C., Li, X. and Duvenaud, D. "Inference suboptimality in
       variational autoencoders", ICML 2018.

    Examples
    --------
    >>> from skmetavi import MetaVAE
    >>> from skmetavi.datasets import load_digits_tasks
    >>> X, groups = load_digits_tasks(digits=[0, 1, 2])
    >>> vae = MetaVAE(n_components=2, hidden_layer_sizes=(16,), max_iter=20,
    ...               n_score_samples=100, random_state=0)
    >>> vae = vae.fit(X[groups == 0])
    >>> vae.transform(X[groups == 0][:3]).shape
    (3, 2)
    >>> bool(vae.score(X[groups == 0]) < 0)  # mean log-likelihood per image
    True
    """

    DEFAULT_MAX_ITER = 200
    DEFAULT_INNER_LR = {"adam": 1e-3, "sgd": 1e-4}

    _parameter_constraints = {
        **{k: v for k, v in _BaseMetaVI._parameter_constraints.items()},
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "hidden_layer_sizes": [tuple, list, Interval(Integral, 1, None, closed="left")],
        "encoder_layer_sizes": [tuple, list, Interval(Integral, 1, None, closed="left"), None],
        "decoder": [StrOptions({"auto", *DECODERS})],
        "inference": [StrOptions(set(INFERENCE))],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "init_scale": [Interval(Real, 0, None, closed="neither")],
        "query_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_score_samples": [Interval(Integral, 1, None, closed="left")],
        "local_max_iter": [Interval(Integral, 0, None, closed="left")],
        "local_lr": [Interval(Real, 0, None, closed="neither")],
    }

    def __init__(
        self,
        n_components=2,
        *,
        hidden_layer_sizes=(64,),
        encoder_layer_sizes=None,
        decoder="auto",
        inference="amortized",
        activation="tanh",
        init_scale=1.0,
        divergence="kl",
        n_particles=5,
        inner_optimizer="auto",
        inner_lr="auto",
        max_iter="auto",
        batch_size=100,
        meta_lr=0.01,
        init_lr=1e-3,
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
        max_grad_norm=None,
        task_chunk_size="auto",
        query_fraction=0.5,
        n_score_samples=5000,
        local_max_iter=300,
        local_lr=0.05,
        dtype="float32",
        device="cpu",
        random_state=None,
        verbose=0,
        warm_start=False,
        callbacks=None,
    ):
        self.n_components = n_components
        self.hidden_layer_sizes = hidden_layer_sizes
        self.encoder_layer_sizes = encoder_layer_sizes
        self.decoder = decoder
        self.inference = inference
        self.activation = activation
        self.init_scale = init_scale
        self.divergence = divergence
        self.n_particles = n_particles
        self.inner_optimizer = inner_optimizer
        self.inner_lr = inner_lr
        self.max_iter = max_iter
        self.batch_size = batch_size
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
        self.n_score_samples = n_score_samples
        self.local_max_iter = local_max_iter
        self.local_lr = local_lr
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callbacks = callbacks

    # ----------------------------------------------------------- hooks
    def _model(self, n_features):
        # The decoder (with "auto", data-dependent) is resolved by _validate_task_data.
        decoder = self._resolved_decoder()
        if decoder is None:  # pragma: no cover - _validate_task_data always runs first
            raise RuntimeError("decoder_ is not resolved yet")
        return VAELatent(
            self.n_components, hidden_layer_sizes=self.hidden_layer_sizes, decoder=decoder,
            inference=self.inference, activation=self.activation, init_scale=self.init_scale,
            encoder_layer_sizes=self.encoder_layer_sizes,
        )

    def _inner_optimizer(self, learned_init):
        name = "adam" if self.inner_optimizer == "auto" else self.inner_optimizer
        if self.inner_lr != "auto":
            lr = self.inner_lr
        elif name == "adam" and self.inference == "factorized":
            lr = 1e-2
        else:
            lr = self.DEFAULT_INNER_LR[name]
        return make_optimizer(name, lr)

    def _check_target_rows(self, model, X, y):
        """Nothing to check beyond :meth:`_validate_task_data` (no target object)."""

    def _holds_out_rows(self, model):
        # An encoder scores new rows; a factorised q exists only for its own rows.
        return self.inference == "amortized"

    def _make_meta_loss(self, model, tasks, meta_loss=None):
        return NegativeEvidence(n_particles=self.n_particles, batch_size=self.batch_size)

    def meta_fit(self, X, y=None, groups=None, checkpoint=None, checkpoint_every=50):
        """Meta-learn the divergence (and with ``meta_learn_init``, the initialisation).

        Each distinct value of ``groups`` is one training task (a dataset, e.g.
        the images of one digit).  Runs Algorithm 1 (Meta-D) or, with
        ``meta_learn_init=True``, Algorithm 2 (Meta-D&phi) of Zhang et al.
        (2021) for ``max_meta_iter`` outer iterations; the meta-loss is the
        negative importance-weighted evidence of held-out rows of each task.
        A VAE fitted before keeps its state (``decoder_`` included); a failed
        call leaves the estimator as it was.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of all training tasks.
        y : None
            Ignored.
        groups : array-like of shape (n_samples,)
            Task label of each row.
        checkpoint : str or path, default=None
            File for periodic checkpoints (see
            :meth:`skmetavi.MetaDivergenceVI.meta_fit`); needs an int
            ``random_state``.
        checkpoint_every : int, default=50
            Outer iterations between checkpoints.

        Returns
        -------
        self : object
            The estimator, with ``meta_divergence_`` (and ``meta_init_``,
            ``meta_decoder_``) set.
        """
        self._meta_fitting = True  # decoder="auto" is resolved from these data
        try:
            super().meta_fit(X, y, groups, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every)
            self.meta_decoder_ = self._meta_fit_decoder
        finally:
            self.__dict__.pop("_meta_fitting", None)
            self.__dict__.pop("_meta_fit_decoder", None)
        return self

    def _resolved_decoder(self):
        if self.__dict__.get("_meta_fitting"):
            return self.__dict__.get("_meta_fit_decoder")
        return self.__dict__.get("decoder_")

    def _learned_decoder(self):
        """The decoder of the learned initialisation (``meta_init_``)."""
        return self.__dict__.get("meta_decoder_") or (
            "gaussian" if "dec_noise_raw" in self.meta_init_ else "bernoulli")

    @staticmethod
    def _auto_decoder(X):
        """``"bernoulli"`` for binary data (every value 0 or 1), else ``"gaussian"``."""
        X = np.asarray(X)
        return "bernoulli" if bool(np.all((X == 0) | (X == 1))) else "gaussian"

    def _validate_task_data(self, X, y, reset):
        for name in ("hidden_layer_sizes", "encoder_layer_sizes"):
            sizes = getattr(self, name)
            if sizes is None:
                continue
            sizes = (sizes,) if isinstance(sizes, Integral) else tuple(sizes)
            if any(isinstance(h, bool) or not isinstance(h, Integral) or h < 1 for h in sizes):
                raise ValueError(
                    f"{name} must be positive ints, got {getattr(self, name)!r}; e.g. (64,), "
                    "or () for linear maps."
                )
        X = _validate_data(self, X, reset=reset, dtype=[np.float32, np.float64])
        meta_fitting = bool(self.__dict__.get("_meta_fitting"))
        learned = hasattr(self, "meta_init_") and not meta_fitting
        if reset:
            decoder = self.decoder
            if learned:
                # The learned initialisation fixes the decoder it was meta-trained with.
                meta = self._learned_decoder()
                if decoder not in ("auto", meta):
                    raise ValueError(
                        f"decoder={decoder!r}, but the learned initialisation (meta_init_) "
                        f"was meta-trained with a {meta!r} decoder. Use decoder={meta!r} (or "
                        "'auto'), or meta_fit again with the new decoder."
                    )
                decoder = meta
            elif decoder == "auto":
                decoder = self._auto_decoder(X)
            if meta_fitting:
                self._meta_fit_decoder = decoder
            else:
                self.decoder_ = decoder
        else:
            decoder = self._resolved_decoder()
            if self.decoder not in ("auto", decoder):
                raise ValueError(
                    f"decoder={self.decoder!r}, but this MetaVAE was fitted with a {decoder!r} "
                    "decoder (decoder_); set warm_start=False to fit a new one."
                )
        if decoder == "bernoulli" and not bool(np.all((X >= 0) & (X <= 1))):
            lo, hi = float(np.min(X)), float(np.max(X))
            hint = ("binarise or rescale the data to [0, 1] (e.g. "
                    "skmetavi.datasets.load_digits_tasks)")
            if not learned:
                hint += ", or use decoder='gaussian' for real-valued data"
            raise ValueError(
                f"The Bernoulli decoder models values in [0, 1], but X ranges over "
                f"[{lo:.4g}, {hi:.4g}]: {hint}."
            )
        return X, None

    def _adapted_copies(self, data, random_states=None):
        # One batched run needs one decoder: resolve decoder="auto" over all the tasks.
        runner = copy.copy(self)
        if hasattr(self, "meta_init_"):
            runner.decoder_ = self._learned_decoder()
        elif self.decoder != "auto":
            runner.decoder_ = self.decoder
        elif data:
            kinds = {self._auto_decoder(X) for X, _ in data}
            if len(kinds) > 1:
                raise ValueError(
                    "decoder='auto' resolves to 'bernoulli' for some tasks (binary values) "
                    "and to 'gaussian' for others; set decoder explicitly."
                )
            runner.decoder_ = kinds.pop()
        return _BaseMetaVI._adapted_copies(runner, data, random_states)

    def _validation_score(self, X, y):
        return float(np.mean(self._log_likelihood(X, min(self.n_score_samples, 100))))

    @property
    def _n_features_out(self):
        check_is_fitted(self)
        return self.n_components

    # ------------------------------------------------------- internals
    def _setup_predict(self):
        """Torch settings of the prediction methods: float64 whatever ``dtype``.

        float32 matrix products round differently for different numbers of rows,
        so a row's value would depend on the rows it is computed with.
        """
        self._setup_torch()
        self._dtype = torch.float64


    def _row_view(self, model, params, rows):
        """``params`` restricted to rows ``rows`` (a slice) for per-row parameters."""
        local = tuple(model.local_keys)
        return {k: v[:, rows] if k in local else v for k, v in params.items()}

    def _posterior(self, X, divergence=None, start=None, n_particles=None):
        """The model and parameters of q for the rows of ``X`` (decoder included).

        Amortised: the fitted encoder.  Factorised: a free q per row fitted with
        the decoder fixed (``divergence``, default the fitted one), from
        ``start`` (``(loc, scale)``) or the prior.
        """
        check_is_fitted(self)
        self._setup_predict()
        vae = self._model(self.n_features_in_)
        params = self._q_params()
        if self.inference == "amortized" and start is None:
            return vae, params
        frozen = FrozenDecoder(vae, params)
        divergence = self._adaptation_divergence() if divergence is None else divergence
        locs, raws = [], []
        for lo in range(0, X.shape[0], _LOCAL_CHUNK):
            rows = slice(lo, lo + _LOCAL_CHUNK)
            tasks = self._pad([X[rows]])
            q = frozen.init_params(tasks, generator=None)
            if start is not None:
                loc, scale = start[0][:, rows], start[1][:, rows]
                q = {"z_loc": loc.clone(),
                     "z_scale_raw": _inverse_softplus((scale - MIN_SCALE).clamp(min=1e-12))}
            optimizer = make_optimizer("adam", self.local_lr)
            # The same seed for every chunk and noise shared by the rows (FrozenDecoder):
            # each row's fit depends on that row only.
            gen = _torch.make_generator(self._predict_seed + 7919, self._device)
            state = optimizer.init(q, local=frozen.local_keys)
            run = VIRun(frozen, divergence, optimizer, q, state, tasks,
                        n_particles=n_particles or max(self.n_particles, 50),
                        generator=gen)
            for t in range(self.local_max_iter):
                optimizer.lr = self.local_lr * 0.01 ** (t / max(1, self.local_max_iter - 1))
                run.step()
            locs.append(run.params["z_loc"])
            raws.append(run.params["z_scale_raw"])
        q = {"z_loc": torch.cat(locs, 1), "z_scale_raw": torch.cat(raws, 1)}
        return frozen, q

    def _log_weights_per_row(self, model, params, X, n_samples, seed, reduce, multiple=1):
        """``reduce`` over the samples of ``log p(x, z) - log q(z | x)`` per row, chunked.

        Every row uses the same standard noise (drawn from ``seed`` in chunks
        whose size depends on the features only, and is a multiple of
        ``multiple``), so a row's value does not depend on the other rows or
        their order.
        """
        n_rows, k_dim = X.shape[0], self.n_components
        vae = self._model(self.n_features_in_)
        widest = max((self.n_features_in_, *vae.hidden_layer_sizes, *vae.encoder_layer_sizes))
        sample_chunk = max(1, _CHUNK_FLOATS // (_ROW_CHUNK * widest))
        sample_chunk = max(multiple, sample_chunk // multiple * multiple)
        like = dict(dtype=self._dtype, device=self._device)
        out = []
        with torch.no_grad():
            for lo in range(0, n_rows, _ROW_CHUNK):
                rows = slice(lo, lo + _ROW_CHUNK)
                tasks = self._pad([X[rows]])
                n = tasks.X.shape[1]
                view = self._row_view(model, params, rows)
                generator = _torch.make_generator(seed, self._device)
                parts, done = [], 0
                while done < n_samples:
                    k = min(sample_chunk, n_samples - done)
                    eps = torch.randn((1, 1, k, k_dim), generator=generator, **like)
                    z = model.rsample(view, tasks, eps.expand(1, n, k, k_dim))
                    log_w = model.log_p(view, tasks, z) - model.log_q(view, tasks, z)
                    parts.append(reduce(log_w[0].to(torch.float64)))  # (rows, ...)
                    done += k
                out.append(torch.stack(parts, -1))
        return torch.cat(out, 0)

    def _log_likelihood(self, X, n_samples):
        model, params = self._posterior(X)
        parts = self._log_weights_per_row(
            model, params, X, n_samples, self._predict_seed,
            reduce=lambda lw: torch.logsumexp(lw, -1))
        log_px = torch.logsumexp(parts, -1) - math.log(n_samples)
        return _torch.to_numpy(log_px)

    # ------------------------------------------------------ public API
    @_in_float64
    def score_samples(self, X):
        """Importance-weighted estimate of the log-likelihood ``log p(x)`` of each row.

        ``log (1/S) sum_s p(x, z_s) / q(z_s | x)`` with ``S =
        n_score_samples`` draws from q (the encoder's, or for factorised
        inference a q fitted to each row with the decoder fixed): the IWAE
        bound of Burda et al. (2016), a lower bound that tightens as S grows.
        Computed in chunks of rows and samples, in float64 accumulation.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.

        Returns
        -------
        log_likelihood : ndarray of shape (n_samples,)
            Estimated ``log p(x)`` of each row (nats).
        """
        X, _ = self._validate_task_data(X, None, reset=False)
        return self._log_likelihood(X, self.n_score_samples)

    def score(self, X, y=None):
        """Mean estimated log-likelihood per row (see :meth:`score_samples`).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to score.
        y : None
            Ignored.

        Returns
        -------
        log_likelihood : float
            Mean of :meth:`score_samples` (as ``GaussianMixture.score``);
            higher is better.
        """
        return float(np.mean(self.score_samples(X)))

    @_in_float64
    def transform(self, X):
        """Posterior mean of z for each row (the encoder's, or the fitted per-row q's).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to encode.

        Returns
        -------
        Z : ndarray of shape (n_samples, n_components)
            Mean of ``q(z | x)``.
        """
        X, _ = self._validate_task_data(X, None, reset=False)
        model, params = self._posterior(X)
        with torch.no_grad():
            loc, _ = model.q_loc_scale(params, self._pad([X]))
        return _torch.to_numpy(loc[0])

    @_in_float64
    def inverse_transform(self, Z):
        """Decoder mean ``E[x | z]`` (pixel probabilities, or the Gaussian mean).

        Parameters
        ----------
        Z : array-like of shape (n_samples, n_components)
            Latent points.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Mean of ``p(x | z)``.
        """
        Z = _check_array(Z, dtype=[np.float64, np.float32], input_name="Z")
        if Z.shape[1] != self.n_components:
            raise ValueError(
                f"Z has {Z.shape[1]} columns, but the latent dimension is "
                f"n_components={self.n_components}; pass points of shape "
                f"(n_samples, {self.n_components})."
            )
        model = self._model(self.n_features_in_)
        z = _torch.as_tensor(Z, device=self._device, dtype=self._dtype)[None, :, None]
        with torch.no_grad():
            out = model.decode(self._q_params(), z)[0, :, 0]
            if self.decoder_ == "bernoulli":
                out = torch.sigmoid(out)
        return _torch.to_numpy(out)

    @_in_float64
    def sample(self, n_samples=1, random_state=None):
        """Generate rows: ``z ~ N(0, I)``, then ``x ~ p(x | z)``.

        Parameters
        ----------
        n_samples : int, default=1
            Number of rows.
        random_state : int, RandomState instance or None, default=None
            Seed of the draw; None uses a seed fixed by :meth:`fit`, so that
            repeated calls return the same rows.

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Binary rows (Bernoulli decoder) or real rows (Gaussian decoder);
            :meth:`inverse_transform` of ``Z`` gives the decoder's means.
        """
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"n_samples must be a positive int, the number of rows; got {n_samples!r}."
            )
        if random_state is None:
            seed = self._sample_seed
        else:
            seed = _torch.seed_from_random_state(_check_random_state(random_state))
        gen = _torch.make_generator(seed, self._device)
        model = self._model(self.n_features_in_)
        params = self._q_params()
        like = dict(dtype=self._dtype, device=self._device)
        with torch.no_grad():
            z = torch.randn((1, n_samples, 1, self.n_components), generator=gen, **like)
            out = model.decode(params, z)[0, :, 0]
            if self.decoder_ == "bernoulli":
                u = torch.rand(out.shape, generator=gen, **like)
                x = (u < torch.sigmoid(out)).to(out.dtype)
            else:
                noise = torch.randn(out.shape, generator=gen, **like)
                x = out + model.noise(params)[0] * noise
        return _torch.to_numpy(x)

    @_in_float64
    def amortization_gap(self, X, n_samples=1000, bound="elbo"):
        """How much of a variational bound the encoder loses against the best free q per row.

        For each row, the bound of the encoder's q and of the factorised
        optimum: a free Gaussian q per row, started at the encoder's and fitted
        by ``local_max_iter`` Adam steps (``local_lr``) on the same bound with
        the decoder fixed.  The gap (factorised minus amortised, Cremer et al.
        2018; Margossian & Blei) is zero when the encoder is as good as per-row
        inference.  Both values use the same ``n_samples`` draws of the
        standard noise (common random numbers).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows to evaluate.
        n_samples : int, default=1000
            Monte Carlo samples per row of each bound (rounded up to a multiple
            of ``n_particles`` for ``bound="divergence"``).
        bound : {"elbo", "divergence"}, default="elbo"
            ``"elbo"``: ``E_q[log p(x, z) - log q(z | x)]``, the standard
            definition.  ``"divergence"``: the bound the encoder was trained
            on, ``divergence_.bound`` over groups of ``n_particles`` samples
            (the VR bound of a Rényi divergence; the ELBO for KL and for the
            divergences without a bound of their own, f-divergences and
            tail-adaptive), averaged over the groups; the per-row optimum is
            then fitted with that divergence and ``n_particles`` samples per
            step.

        Returns
        -------
        result : Bunch
            ``amortized`` and ``factorized``: the bound of each row
            (n_rows,); ``gap``: their difference (n_rows,); ``mean_gap``:
            its mean (float); ``stderr``: the Monte Carlo standard error of
            ``mean_gap`` over rows (float).
        """
        if self.inference != "amortized":
            raise ValueError(
                "amortization_gap compares an encoder with per-row inference; this "
                "MetaVAE has inference='factorized' (no encoder). Fit one with "
                "inference='amortized'."
            )
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(f"n_samples must be a positive int, got {n_samples!r}.")
        if bound not in ("elbo", "divergence"):
            raise ValueError(f"bound must be 'elbo' or 'divergence', got {bound!r}.")
        X, _ = self._validate_task_data(X, None, reset=False)
        vae, params = self._posterior(X)
        with torch.no_grad():
            start = vae.q_loc_scale(params, self._pad([X]))
        if bound == "elbo":
            fit_divergence, divergence, K, fit_particles = KL(), KL(), 1, None
        else:
            fit_divergence = self._adaptation_divergence()
            divergence = copy.deepcopy(fit_divergence).to(self._device, torch.float64)
            K = fit_particles = self.n_particles
            n_samples = -(-n_samples // K) * K

        def reduce(lw):  # (rows, k): the bound of every group of K samples, summed
            lw = lw.reshape(lw.shape[0], -1, K)
            return divergence.bound(lw, torch.zeros_like(lw)).sum(-1)

        frozen, local = self._posterior(X, divergence=fit_divergence, start=start,
                                        n_particles=fit_particles)
        elbo = []
        for model, p in ((vae, params), (frozen, local)):
            parts = self._log_weights_per_row(model, p, X, n_samples, self._predict_seed,
                                              reduce=reduce, multiple=K)  # the same noise
            elbo.append(_torch.to_numpy(parts.sum(-1) / (n_samples // K)))
        gap = elbo[1] - elbo[0]
        stderr = float(gap.std(ddof=1) / np.sqrt(gap.size)) if gap.size > 1 else float("nan")
        return Bunch(amortized=elbo[0], factorized=elbo[1], gap=gap,
                     mean_gap=float(gap.mean()), stderr=stderr)
