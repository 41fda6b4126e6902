"""MetaPartialVAE: an imputer for partially observed ratings whose VI divergence is meta-learned.

The partial VAE of Ma et al. (2019, EDDI) behind a scikit-learn imputer: each
row is a user, each column an item, missing ratings are ``NaN`` (dense) or not
stored (``scipy.sparse``).  :meth:`MetaPartialVAE.meta_fit` learns the
divergence (and with ``meta_learn_init``, the networks' initialisation) over
groups of users -- the paper's Sec. 4.4, one task per age group on MovieLens --
and :meth:`MetaPartialVAE.fit` trains a partial VAE on a new group with it.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import math
import warnings
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.base import OneToOneFeatureMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions

from skmetavi import _torch
from skmetavi._meta_losses import HeldOutEntriesNLL
from skmetavi._optim import make_optimizer
from skmetavi._ratings import as_ratings_csr, densify_rows, split_ratings
from skmetavi._tasks import pad_tasks
from skmetavi._validation import _check_array, _check_random_state, _validate_data
from skmetavi.estimators._base import _BaseMetaVI
from skmetavi.estimators._vae import _CHUNK_FLOATS, _ROW_CHUNK, _in_float64
from skmetavi.models._partial_vae import ACTIVATIONS, PartialVAELatent

_EDDI_NOISE = 0.1 * math.sqrt(2)


class MetaPartialVAE(OneToOneFeatureMixin, TransformerMixin, _BaseMetaVI):
    """Partial VAE imputer of ratings whose VI divergence is meta-learned over groups of users.

    Each row is a user's ratings, each column an item.  Missing ratings are
    ``NaN`` in dense input or absent in ``scipy.sparse`` input (stored
    entries, explicit zeros included, are observed).  A sparse matrix is
    densified by task, not whole: :meth:`fit` holds its task dense,
    :meth:`meta_fit` the training tasks padded to the largest one (about
    ``n_tasks * largest_task * n_items * 10`` bytes: 300 MB for ml-1m's four
    largest age groups), and predictions one chunk of users at a time.
    Ratings are scaled linearly to [0, 1] (``rating_range``), ``z ~ N(0,
    I)``, and every observed rating is Gaussian around a sigmoid decoder's
    mean, ``x_nd | z ~ N(mu_d(z), sigma^2)``.  ``q(z | x_obs)`` comes from a
    set (PointNet-style) encoder of the observed entries only, so any subset
    of items may be observed (Ma et al. 2019).  Any
    :mod:`skmetavi.divergences` divergence trains it, per user: the ``K``
    samples of z of each user are weighted and log-sum-exp'ed for that user.

    :meth:`meta_fit` learns the divergence over training tasks (users
    sharing a ``groups`` label, e.g. an age group) by minimising the
    negative log-likelihood of held-out ratings after the inner steps
    (Algorithm 1, Meta-D, of Zhang et al. 2021; ``meta_learn_init=True``:
    Algorithm 2, Meta-D&phi).  :meth:`fit` trains a partial VAE on one group
    with the learned divergence.  :meth:`transform` returns the matrix with
    the missing ratings imputed; :meth:`predict_ratings` the predictive mean (and
    standard deviation) of every entry; :meth:`score_samples` the
    log-likelihood of held-out ratings given the observed ones.

    Parameters
    ----------
    n_components : int, default=10
        Latent dimension (EDDI: 10).
    code_size : int, default=20
        Width of the per-entry embedding the set encoder sums (EDDI: 20).
    embedding_size : int, default=10
        Length of the learned identity vector of each item (EDDI: 10).
    encoder_layer_sizes : tuple of int, default=(500, 200)
        Hidden widths of the encoder after the set sum (EDDI: 500, 200).
    decoder_layer_sizes : tuple of int, default=(50, 100)
        Hidden widths of the decoder (EDDI: 50, 100).
    noise_std : float or "learned", default="learned"
        Standard deviation of the likelihood on the [0, 1] scale: one value
        learned with the decoder, or fixed (EDDI fixes ``0.1 * sqrt(2)``,
        0.57 stars on a 1-5 scale).
    activation : {"relu", "tanh", "softplus", "elu"}, default="relu"
        Hidden activation of the networks.
    init_scale : float, default=1.0
        Multiplies the Glorot-scaled random initial weights.
    rating_range : "auto" or (float, float), default="auto"
        ``(low, high)`` mapped to [0, 1] by ``(r - low) / (high - low)``;
        ``"auto"``: the smallest and largest rating seen by :meth:`meta_fit`
        (if it ran), else by :meth:`fit` (``rating_range_``).  Predictions
        and log-likelihoods are in the original rating units.
    heldout_fraction : float, default=0.1
        Fraction of each user's ratings hidden from the encoder and scored
        when :meth:`meta_fit` or :meth:`score_samples` get no held-out
        ratings ``y`` (the split of a user depends only on that user's
        ratings and the fitted seed, :func:`skmetavi.datasets.split_ratings`).
    divergence : {"kl", "renyi", "neural_f", "tail_adaptive", "f"} or Divergence, default="kl"
        The divergence of :meth:`fit` when no meta-learned one exists, and the
        initial (learnable) divergence of :meth:`meta_fit`.
    n_particles : int, default=5
        Samples of z per user and inner step (also for the meta-loss).
    inner_optimizer : {"auto", "adam", "sgd"}, default="auto"
        Optimiser of the networks; ``"auto"`` is Adam.
    inner_lr : float or "auto", default="auto"
        Inner step size; ``"auto"``: 1e-3 for Adam (EDDI), 1e-4 for SGD.
    max_iter : int or "auto", default="auto"
        Epochs of :meth:`fit`; ``"auto"``: 200, or after Algorithm 2 the
        ``n_inner_steps`` steps the initialisation was trained for.
    batch_size : int or None, default=100
        Users per inner step (EDDI: 100); all if None.  Also the users of
        each meta-loss evaluation.
    meta_lr : float, default=0.01
        Adam step size of the divergence's parameters.
    init_lr : float, default=1e-3
        Adam step size of the learned initialisation (Algorithm 2).
    max_meta_iter : int, default=200
        Outer iterations of :meth:`meta_fit`.
    n_inner_steps : int, default=1
        Inner steps per outer iteration.
    n_tasks_per_batch : int, default=16
        Tasks per outer iteration (all of them if fewer).
    meta_learn_init : bool or "auto", default="auto"
        Also meta-learn the initialisation of q (Algorithm 2, Meta-D&phi).
        ``"auto"``: exactly when the divergence has nothing to learn (e.g. the
        default ``"kl"``: the paper's VI&phi), so that :meth:`meta_fit` always
        meta-learns something; a learnable divergence then runs Algorithm 1.
    meta_gradient : {"full", "first_order", "truncated", "implicit"}, default="full"
        How the meta-gradient goes through the inner steps.
    truncate : int, default=None
        Steps back-propagated with ``meta_gradient="truncated"``.
    implicit_max_iter : int, default=100
        GMRES steps of ``meta_gradient="implicit"``.
    implicit_tol : float, default=1e-5
        Relative residual of that solve.
    implicit_damping : float, default=1e-8
        Relative damping of that solve.
    multi_step_loss : bool or "auto", default="auto"
        Average the meta-loss over the inner loop (on for Algorithm 2).
    validation_fraction : float, default=None
        Fraction of the training tasks held out for meta-validation.
    validation_interval : int, default=None
        Outer iterations between meta-validations.
    max_grad_norm : float, default=None
        Clip the meta-gradients' norm.
    task_chunk_size : int, "auto" or None, default="auto"
        Tasks processed at once (bounds memory; results do not change).
        ``"auto"``: chunks sized from the model on the CPU where it tells its
        size, else all at once (:class:`MetaBNNRegressor`); None: all at once.
    n_score_samples : int, default=500
        Samples of z per user of :meth:`score_samples`.
    n_predict_samples : int, default=50
        Samples of z per user of :meth:`predict_ratings` and :meth:`transform`
        (EDDI: 50).
    dtype : {"float32", "float64"}, default="float32"
        Precision of training (predictions run in float64).
    device : str, default="cpu"
        Torch device; fitted state is kept on the CPU.
    random_state : int, RandomState instance or None, default=None
        Seeds every draw.
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
    rating_range_ : tuple of float
        ``(low, high)`` of the scaling to [0, 1].
    variational_params_ : dict of str to torch.Tensor
        Encoder and decoder parameters of the fitted partial VAE.
    divergence_ : Divergence
        Divergence used by the last :meth:`fit`.
    loss_curve_ : ndarray of shape (n_steps,)
        Negative bound (summed over the group's users) at each inner step.
    history_ : skmetavi.callbacks.History
        One record per inner step of :meth:`fit` (``iteration``, ``loss``,
        ``time``: that iteration's wall-clock seconds, not cumulative),
        ``history_[:, "loss"]`` equal to ``loss_curve_``;
        warm-started fits append to it.
    n_iter_ : int
        Inner steps of the last :meth:`fit`.
    n_features_in_ : int
        Number of items.
    meta_divergence_ : Divergence
        Divergence learned by :meth:`meta_fit`.
    meta_init_ : dict of str to torch.Tensor
        Learned initialisation (Algorithm 2 only).
    meta_rating_range_ : tuple of float
        The scaling :meth:`meta_fit` trained in.
    meta_loss_curve_ : ndarray of shape (n_meta_iter_,)
        Mean meta-loss (negative held-out log-likelihood per rating, on the
        [0, 1] scale) of each outer iteration.
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
    skmetavi.MetaVAE : A VAE on fully observed data.
    skmetavi.datasets.fetch_movielens_tasks : MovieLens users x movies, one task per age group.
    sklearn.impute.KNNImputer : A non-probabilistic imputer.

    Notes
    -----
    :meth:`score_samples` is ``log p(y_held | x_obs)`` of each user, the sum
    over the user's held-out ratings, estimated by ``log (1/S) sum_s p(y_held
    | z_s)`` with ``z_s ~ q(z | x_obs)``; :meth:`score` divides the total by
    the number of held-out ratings (the mean log-likelihood per rating, the
    usual recommender metric).

    References
    ----------
    .. [1] Zhang, R., Li, Y., De Sa, C., Devlin, S. and Zhang, C.
       "Meta-learning divergences of variational inference", AISTATS 2021.
    .. [2] Ma, C., Tschiatschek, S., Palla, K., Hernández-Lobato, J. M.,
       Nowozin, S. and Zhang, C. "EDDI: Efficient dynamic discovery of
       high-value information with partial VAE", ICML 2019.

    Examples
    --------
    >>> import numpy as np
    >>> from skmetavi import MetaPartialVAE
    >>> rng = np.random.RandomState(0)
    >>> X = rng.randint(1, 6, size=(40, 12)).astype(float)
    >>> X[rng.rand(40, 12) < 0.5] = np.nan  # missing ratings
    >>> vae = MetaPartialVAE(n_components=2, encoder_layer_sizes=(16,),
    ...                      decoder_layer_sizes=(16,), max_iter=5, random_state=0).fit(X)
    >>> Xt = vae.transform(X)  # missing ratings imputed
    >>> bool(np.isnan(Xt).any()), bool(np.all((Xt >= 1) & (Xt <= 5)))
    (False, True)
    """

    DEFAULT_MAX_ITER = 200
    #: Task-level wrappers fit a whole group and score its held-out entries (not rows).
    _task_protocol = "entries"
    DEFAULT_INNER_LR = {"adam": 1e-3, "sgd": 1e-4}

    _parameter_constraints = {
        **_BaseMetaVI._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "code_size": [Interval(Integral, 1, None, closed="left")],
        "embedding_size": [Interval(Integral, 1, None, closed="left")],
        "encoder_layer_sizes": [tuple, list, Interval(Integral, 1, None, closed="left")],
        "decoder_layer_sizes": [tuple, list, Interval(Integral, 1, None, closed="left")],
        "noise_std": [Interval(Real, 0, None, closed="neither"), StrOptions({"learned"})],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "init_scale": [Interval(Real, 0, None, closed="neither")],
        "rating_range": [StrOptions({"auto"}), tuple, list],
        "heldout_fraction": [Interval(Real, 0, 1, closed="neither")],
        "n_score_samples": [Interval(Integral, 1, None, closed="left")],
        "n_predict_samples": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(
        self,
        n_components=10,
        *,
        code_size=20,
        embedding_size=10,
        encoder_layer_sizes=(500, 200),
        decoder_layer_sizes=(50, 100),
        noise_std="learned",
        activation="relu",
        init_scale=1.0,
        rating_range="auto",
        heldout_fraction=0.1,
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
        n_score_samples=500,
        n_predict_samples=50,
        dtype="float32",
        device="cpu",
        random_state=None,
        verbose=0,
        warm_start=False,
        callbacks=None,
    ):
        self.n_components = n_components
        self.code_size = code_size
        self.embedding_size = embedding_size
        self.encoder_layer_sizes = encoder_layer_sizes
        self.decoder_layer_sizes = decoder_layer_sizes
        self.noise_std = noise_std
        self.activation = activation
        self.init_scale = init_scale
        self.rating_range = rating_range
        self.heldout_fraction = heldout_fraction
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
        self.n_score_samples = n_score_samples
        self.n_predict_samples = n_predict_samples
        self.dtype = dtype
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.warm_start = warm_start
        self.callbacks = callbacks

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        return tags

    # ----------------------------------------------------------- hooks
    def _model(self, n_features):
        return PartialVAELatent(
            self.n_components, code_size=self.code_size, embedding_size=self.embedding_size,
            encoder_layer_sizes=self.encoder_layer_sizes,
            decoder_layer_sizes=self.decoder_layer_sizes, noise_std=self.noise_std,
            activation=self.activation, init_scale=self.init_scale,
        )

    def _inner_optimizer(self, learned_init):
        name = "adam" if self.inner_optimizer == "auto" else self.inner_optimizer
        lr = self.DEFAULT_INNER_LR[name] if self.inner_lr == "auto" else self.inner_lr
        return make_optimizer(name, lr)

    def _check_target_rows(self, model, X, y):
        """Nothing to check beyond :meth:`_validate_task_data`."""

    def _holds_out_rows(self, model):
        # The meta-loss scores held-out *ratings* of every user (the y field), not held-out users.
        return False

    def _make_meta_loss(self, model, tasks, meta_loss=None):
        return HeldOutEntriesNLL(n_particles=max(self.n_particles, 10),
                                 batch_size=self.batch_size)

    def _validation_score(self, X, y):
        return self._score(X, y, min(self.n_score_samples, 100))

    # ------------------------------------------------------- data
    def _scaling(self):
        lo, hi = self._range
        return lo, (hi - lo) if hi > lo else 1.0

    def _dense_fields(self, csr):
        """One task's scaled values (0 where missing) and observation mask, as torch."""
        lo, width = self._scaling()
        values, observed = densify_rows(csr)
        values = np.where(observed, (values - lo) / width, 0.0)
        like = dict(device=self._device)
        return (_torch.as_tensor(values, dtype=self._dtype, **like),
                torch.as_tensor(observed, device=self._device))

    def _pad(self, Xs, ys=None):
        """Tasks of ratings (CSR), densified one task at a time, as a padded batch."""
        xs, obs = zip(*(self._dense_fields(X) for X in Xs))
        if ys is None:
            return pad_tasks(list(xs), None, obs=list(obs))
        yv, tgt = zip(*(self._dense_fields(y) for y in ys))
        return pad_tasks(list(xs), list(yv), obs=list(obs), target=list(tgt))

    @property
    def _range(self):
        return self.__dict__.get("_meta_fit_range") or self.rating_range_

    def _check_ratings(self, X, name, reset):
        """``X`` as CSR float64 ratings, with scikit-learn's checks and feature bookkeeping."""
        if name == "X":
            X = _validate_data(self, X, reset=reset, accept_sparse=("csr", "csc", "coo"),
                               dtype=[np.float64, np.float32], ensure_all_finite="allow-nan")
        else:
            if not sp.issparse(X) and np.ndim(X) == 1:
                raise ValueError(
                    f"{name} must be the matrix of held-out ratings, of shape (n_users, "
                    f"n_items) like X (NaN, or not stored, where nothing is held out); got a "
                    f"1-D array of shape {np.shape(X)}."
                )
            X = _check_array(X, accept_sparse=("csr", "csc", "coo"), input_name=name,
                             dtype=[np.float64, np.float32], ensure_all_finite="allow-nan")
            if X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"{name} has {X.shape[1]} columns (items), but X has "
                    f"{self.n_features_in_}; pass held-out ratings of the same users and items "
                    "as X, missing (NaN, or not stored) where nothing is held out."
                )
        return as_ratings_csr(X, name=name)

    def _resolve_range(self, X, y):
        if self.rating_range != "auto":
            rr = tuple(self.rating_range)
            if (len(rr) != 2 or not all(isinstance(v, Real) and math.isfinite(v) for v in rr)
                    or not rr[1] > rr[0]):
                raise ValueError(
                    f"rating_range must be 'auto' or (low, high) with low < high, got "
                    f"{self.rating_range!r}; e.g. (1, 5) for star ratings."
                )
            return float(rr[0]), float(rr[1])
        if hasattr(self, "meta_rating_range_") and not self.__dict__.get("_meta_fitting"):
            return self.meta_rating_range_
        values = np.concatenate([X.data, y.data if y is not None else []])
        if values.size == 0:
            return 0.0, 1.0
        lo, hi = float(values.min()), float(values.max())
        return (lo, hi) if hi > lo else (lo, lo + 1.0)

    def _validate_task_data(self, X, y, reset):
        for name in ("encoder_layer_sizes", "decoder_layer_sizes"):
            sizes = getattr(self, name)
            sizes = (sizes,) if isinstance(sizes, Integral) else tuple(sizes)
            if any(isinstance(h, bool) or not isinstance(h, Integral) or h < 1 for h in sizes):
                raise ValueError(
                    f"{name} must be positive ints, got {getattr(self, name)!r}; "
                    "e.g. (500, 200)."
                )
        meta_fitting = bool(self.__dict__.get("_meta_fitting"))
        X = self._check_ratings(X, "X", reset)
        if not meta_fitting:
            y = None  # fit(X, y=None) trains on every observed rating (an imputer ignores y)
        elif y is not None:
            y = self._check_heldout(X, y)
        if reset:
            rr = self._resolve_range(X, y)
            self._warn_out_of_range(X, rr)
            if meta_fitting:
                self._meta_fit_range = rr
            else:
                self.rating_range_ = rr
        return X, y

    def _adapted_copies(self, data, random_states=None):
        # One batched run has one scaling: rating_range="auto" is resolved over all the tasks
        # (the range meta_fit saw, if any), and every copy keeps it.
        runner = copy.copy(self)
        runner._validate_params()
        runner._setup_torch()
        if "_meta_fit_range" not in self.__dict__:
            csrs = [runner._check_ratings(X, "X", reset=True) for X, _ in data]
            merged = sp.vstack(csrs, format="csr") if csrs else sp.csr_matrix((0, 0))
            runner.rating_range_ = runner._resolve_range(merged, None)
        copies = _BaseMetaVI._adapted_copies(runner, data, random_states)
        if "_meta_fit_range" not in self.__dict__:
            for est in copies:
                est.rating_range_ = runner.rating_range_
        return copies

    @staticmethod
    def _warn_out_of_range(X, rr):
        if not X.data.size:
            return
        lo, hi = rr
        tol = 1e-9 * (hi - lo)
        vmin, vmax = float(X.data.min()), float(X.data.max())
        if vmin < lo - tol or vmax > hi + tol:
            warnings.warn(
                f"The ratings range over [{vmin:.4g}, {vmax:.4g}], outside the scaling range "
                f"{rr} (rating_range, or the range meta_fit saw): the decoder's sigmoid "
                "cannot reach them. Set rating_range to cover the data.",
                UserWarning, stacklevel=4,
            )

    def _check_heldout(self, X, y):
        """``y``, the held-out ratings of the users of ``X`` (CSR), checked against ``X``."""
        y = self._check_ratings(y, "y", reset=False)
        if y.shape[0] != X.shape[0]:
            raise ValueError(
                f"y has {y.shape[0]} rows but X has {X.shape[0]}: y holds the held-out "
                "ratings of the same users."
            )
        self._check_disjoint(X, y)
        return y

    @staticmethod
    def _check_disjoint(X, y):
        both = X.copy()
        both.data[:] = 1.0
        other = y.copy()
        other.data[:] = 1.0
        overlap = both.multiply(other).nnz
        if overlap:
            raise ValueError(
                f"{overlap} rating(s) are both observed (in X) and held out (in y); the "
                "held-out ratings must be hidden from the encoder. Pass disjoint matrices, e.g. "
                "from skmetavi.datasets.split_ratings."
            )

    # ------------------------------------------------------- fit
    def fit(self, X, y=None, groups=None):
        """Train a partial VAE on one group's observed ratings (with the meta-learned divergence).

        Uses ``meta_divergence_`` (and ``meta_init_``) when :meth:`meta_fit` was
        called, otherwise ``divergence``; ``max_iter`` epochs over the users.
        Every observed rating is used (an imputer's ``y`` is ignored); a
        failed call leaves the estimator as it was.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings (missing: NaN, or not stored).
        y : None
            Ignored.
        groups : array-like of shape (n_users,), default=None
            Not used: rows of several groups only trigger a
            :class:`~skmetavi.exceptions.NoMetaLearningWarning` (see
            :meth:`MetaBNNRegressor.fit <skmetavi.MetaBNNRegressor.fit>`).

        Returns
        -------
        self : object
            Fitted estimator.
        """
        saved = dict(self.__dict__)
        try:
            return super().fit(X, None, groups=groups)
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise

    # ------------------------------------------------------- meta_fit
    def meta_fit(self, X, y=None, groups=None, checkpoint=None, checkpoint_every=50):
        """Meta-learn the divergence (and with ``meta_learn_init``, the initialisation).

        Each distinct value of ``groups`` is one training task (a group of
        users, e.g. an age group).  The meta-loss is the negative
        log-likelihood per rating of each user's held-out ratings ``y`` given
        the observed ones, after the inner steps (Algorithm 1, Meta-D;
        ``meta_learn_init=True``: Algorithm 2, Meta-D&phi).  A partial VAE
        fitted before keeps its state; a failed call leaves the estimator as
        it was.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings of the users of all training tasks.
        y : {array-like, sparse matrix} of shape (n_users, n_items), default=None
            Their held-out ratings (disjoint from X).  None: hide
            ``heldout_fraction`` of each user's ratings of X.
        groups : array-like of shape (n_users,)
            Task label of each user.
        checkpoint : str or path, default=None
            File for periodic checkpoints (see
            :meth:`skmetavi.MetaDivergenceVI.meta_fit`).
        checkpoint_every : int, default=50
            Outer iterations between checkpoints.

        Returns
        -------
        self : object
            The estimator, with ``meta_divergence_`` (and ``meta_init_``) set.
        """
        self._validate_params()
        saved = dict(self.__dict__)
        self._meta_fitting = True
        try:
            split = y is None
            if split:
                X = self._check_ratings(X, "X", reset=True)
                rng = _check_random_state(copy.deepcopy(self.random_state))
                X, y = split_ratings(X, self.heldout_fraction, rng)
            else:
                X = self._check_ratings(X, "X", reset=True)
                y = self._check_ratings(y, "y", reset=False)
            self._check_heldout_per_task(X, y, groups, split)
            if hasattr(self, "variational_params_") and saved.get("n_features_in_") not in (
                    None, X.shape[1]):
                raise ValueError(
                    f"This MetaPartialVAE holds a partial VAE fitted on "
                    f"{saved['n_features_in_']} items, but meta_fit got {X.shape[1]}; a fitted "
                    "model and its meta-learned state share the items. Use a fresh estimator "
                    "(sklearn.base.clone) for other items."
                )
            super().meta_fit(X, y, groups, checkpoint=checkpoint,
                             checkpoint_every=checkpoint_every)
            self.meta_rating_range_ = self._meta_fit_range
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(saved)
            raise
        finally:
            self.__dict__.pop("_meta_fitting", None)
            self.__dict__.pop("_meta_fit_range", None)
        return self

    @staticmethod
    def _check_heldout_per_task(X, y, groups, split):
        """Every training task needs held-out ratings: its meta-loss is their likelihood."""
        if groups is None:
            return  # the base meta_fit explains that groups are required
        groups = np.asarray(groups)
        if groups.shape[0] != y.shape[0]:
            return  # check_groups reports the length mismatch
        counts = np.diff(y.indptr)
        labels = np.unique(groups)
        empty = [g for g in labels.tolist() if counts[groups == g].sum() == 0]
        if empty:
            why = ("none of their users has 2 or more ratings to split" if split
                   else "y has no rating for their users")
            raise ValueError(
                f"The training tasks {empty[:10]} have no held-out ratings ({why}); the "
                "meta-loss is the likelihood of held-out ratings. Pass held-out ratings y for "
                "every task, or drop those tasks."
            )

    # ------------------------------------------------------ prediction
    def _setup_predict(self):
        self._setup_torch()
        self._dtype = torch.float64

    def _row_chunk(self, n_samples):
        """Rows per chunk of predictions with ``n_samples`` draws each (about 2^23 floats)."""
        model = self._model(self.n_features_in_)
        widest = max(self.n_features_in_, *model.encoder_layer_sizes, *model.decoder_layer_sizes)
        return max(1, _CHUNK_FLOATS // (n_samples * widest))

    def _draws(self, model, params, tasks, n_samples, generator):
        """Samples of z (1, rows, n, k) from every row's q, the same standard noise for each row."""
        n_rows = tasks.X.shape[1]
        eps = torch.randn((1, 1, n_samples, self.n_components), generator=generator,
                          dtype=self._dtype, device=self._device)
        return model.rsample(params, tasks, eps.expand(1, n_rows, n_samples, self.n_components))

    @_in_float64
    def predict_ratings(self, X, return_std=False):
        """Predictive mean (and standard deviation) of every rating given the observed ones.

        ``E[x_nd | x_obs]`` under the partial VAE, averaged over
        ``n_predict_samples`` draws of ``z ~ q(z | x_obs)``, in rating units;
        the standard deviation adds the likelihood's noise to the spread of
        the decoder's means.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings (missing: NaN, or not stored).
        return_std : bool, default=False
            Also return the predictive standard deviation.

        Returns
        -------
        mean : ndarray of shape (n_users, n_items)
            Predictive mean of every entry (observed ones included).
        std : ndarray of shape (n_users, n_items)
            Predictive standard deviation (only if ``return_std``).
        """
        X = self._check_ratings(X, "X", reset=False)
        model, params = self._model(self.n_features_in_), self._q_params()
        lo, width = self._scaling()
        K = self.n_predict_samples
        means, stds = [], []
        with torch.no_grad():
            sigma2 = float(model.noise(params)[0, 0]) ** 2
            chunk = self._row_chunk(K)
            for start in range(0, X.shape[0], chunk):
                tasks = self._pad([X[start:start + chunk]])
                gen = _torch.make_generator(self._predict_seed, self._device)
                z = self._draws(model, params, tasks, K, gen)
                mu = model.decode(params, z)[0]  # (rows, K, p)
                means.append(_torch.to_numpy(lo + width * mu.mean(1)))
                if return_std:
                    var = mu.var(1, unbiased=False) + sigma2
                    stds.append(_torch.to_numpy(width * var.sqrt()))
        mean = np.concatenate(means) if means else np.zeros((0, self.n_features_in_))
        if return_std:
            return mean, (np.concatenate(stds) if stds else np.zeros_like(mean))
        return mean

    def transform(self, X):
        """``X`` with every missing rating replaced by its predictive mean.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings (missing: NaN, or not stored).

        Returns
        -------
        X_imputed : ndarray of shape (n_users, n_items)
            Dense (every entry is filled); observed ratings are kept as given.
        """
        out = self.predict_ratings(X)
        X = as_ratings_csr(X) if sp.issparse(X) else X
        if sp.issparse(X):
            rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
            out[rows, X.indices] = X.data
            return out
        X = np.asarray(X, dtype=np.float64)
        observed = ~np.isnan(X)
        out[observed] = X[observed]
        return out

    def _score(self, X, y, n_samples):
        per_row, counts = self._score_rows(X, y, n_samples)
        total = int(counts.sum())
        if total == 0:
            raise ValueError(
                "There are no held-out ratings to score: pass them as y, or users with at "
                "least 2 ratings (heldout_fraction of each user's ratings are then hidden)."
            )
        return float(per_row.sum() / total)

    @_in_float64
    def _score_rows(self, X, y, n_samples):
        X = self._check_ratings(X, "X", reset=False)
        if y is None:
            X, y = split_ratings(X, self.heldout_fraction, self._predict_seed)
        else:
            y = self._check_heldout(X, y)
        model, params = self._model(self.n_features_in_), self._q_params()
        _, width = self._scaling()
        counts = np.diff(y.indptr)
        sample_chunk = max(1, _CHUNK_FLOATS // (_ROW_CHUNK * self.n_features_in_))
        out = []
        with torch.no_grad():
            for start in range(0, X.shape[0], _ROW_CHUNK):
                rows = slice(start, start + _ROW_CHUNK)
                tasks = self._pad([X[rows]], [y[rows]])
                gen = _torch.make_generator(self._predict_seed + 1, self._device)
                parts, done = [], 0
                while done < n_samples:
                    k = min(sample_chunk, n_samples - done)
                    z = self._draws(model, params, tasks, k, gen)
                    parts.append(torch.logsumexp(model.heldout_log_prob(params, tasks, z)[0], -1))
                    done += k
                out.append(torch.logsumexp(torch.stack(parts, -1), -1) - math.log(n_samples))
        per_row = _torch.to_numpy(torch.cat(out)) if out else np.zeros(0)
        per_row = per_row - counts * math.log(width)  # rating units: the Jacobian of scaling
        return per_row, counts

    def score_samples(self, X, y=None):
        """Log-likelihood of each user's held-out ratings given the observed ones.

        ``log p(y_held | x_obs) ~ log (1/S) sum_s prod_d N(y_d; mu_d(z_s),
        sigma^2)`` with ``z_s ~ q(z | x_obs)``, ``S = n_score_samples`` (the
        same draws of the standard noise for every user), in rating units.

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings, seen by the encoder.
        y : {array-like, sparse matrix} of shape (n_users, n_items), default=None
            Held-out ratings (disjoint from X).  None: hide
            ``heldout_fraction`` of each user's ratings of X (a split that
            depends only on that user's ratings).

        Returns
        -------
        log_likelihood : ndarray of shape (n_users,)
            Summed over each user's held-out ratings (0 for a user with none).
        """
        return self._score_rows(X, y, self.n_score_samples)[0]

    def score(self, X, y=None):
        """Mean log-likelihood per held-out rating (see :meth:`score_samples`).

        Parameters
        ----------
        X : {array-like, sparse matrix} of shape (n_users, n_items)
            Observed ratings.
        y : {array-like, sparse matrix} of shape (n_users, n_items), default=None
            Held-out ratings; None hides ``heldout_fraction`` of X's.

        Returns
        -------
        log_likelihood : float
            Total held-out log-likelihood divided by the number of held-out
            ratings; higher is better.
        """
        return self._score(X, y, self.n_score_samples)
