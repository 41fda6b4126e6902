"""Shared machinery of the meta-VI estimators: constraints, meta_fit / fit templates.

Public methods validate with scikit-learn's utilities, cross into torch once
(:mod:`skmetavi._torch`), call the engine (:mod:`skmetavi._bilevel`) and cross
back.  Fitted state lives on the CPU so that estimators pickle anywhere.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import hashlib
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_array, check_is_fitted, column_or_1d, validate_data

from skmetavi import _checkpoint, _torch
from skmetavi._bilevel import (
    GRADIENT_MODES,
    CallableMetaLoss,
    MetaTrainer,
    NonFiniteError,
    PredictiveNLL,
    Problem,
    QuadratureLoss,
    run_vi,
)
from skmetavi._optim import INNER_OPTIMIZERS, make_optimizer
from skmetavi._tasks import pad_tasks
from skmetavi.divergences import DIVERGENCE_NAMES, Divergence, make_divergence

META_LOSS_NAMES = ("auto", "d_half", "tv", "nll")


def _progress(total, verbose, desc):
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


def _check_random_state(random_state):
    """:func:`sklearn.utils.check_random_state` that never draws from numpy's global RNG.

    ``None`` gives a fresh ``RandomState`` seeded from OS entropy, so that fitting
    leaves the global numpy (and torch) RNGs untouched, as documented.
    """
    if random_state is None:
        return np.random.RandomState()
    return check_random_state(random_state)


# What to do about scikit-learn's validation errors, keyed by a fragment of its message.
# scikit-learn says what it received; these hints add what to try.
_VALIDATION_HINTS = (
    (
        "infinity or a value too large",
        "Remove or impute the non-finite entries (e.g. keep only the rows where "
        "np.isfinite(a).all(axis=1) for an array a), or rescale values beyond the float range.",
    ),
    (
        "contains NaN",
        "Drop the rows with missing values or impute them first (e.g. with "
        "sklearn.impute.SimpleImputer in a Pipeline).",
    ),
    ("0 sample(s)", "Pass at least one row."),
    ("0 feature(s)", "Pass at least one column."),
    (
        "Found array with dim",
        "Pass a 2-D array of shape (n_samples, n_features), e.g. X.reshape(len(X), -1).",
    ),
    (
        "features, but",
        "Pass the columns the estimator was fitted on, in the same order, or fit it again "
        "on the new columns.",
    ),
    (
        "inconsistent numbers of samples",
        "Pass exactly one target (and one task label) per row of X.",
    ),
    (
        "could not convert",
        "The data must be numeric: encode strings and categories first, e.g. with "
        "sklearn.preprocessing.OrdinalEncoder or OneHotEncoder.",
    ),
    ("Complex data not supported", "Pass real numbers, e.g. np.real(X) or np.abs(X)."),
    (
        "should be a 1d array",
        "Pass one target column of shape (n_samples,): the estimator has a single output.",
    ),
)


def _with_hint(exc):
    """``exc`` with what to try appended, for plain ValueError / TypeError from sklearn."""
    if type(exc) not in (ValueError, TypeError):
        return exc
    message = str(exc)
    for fragment, hint in _VALIDATION_HINTS:
        if fragment in message and hint not in message:
            if fragment == "contains NaN" and "imputer" in message:
                return exc  # scikit-learn already suggests an imputer for X
            return type(exc)(f"{message.rstrip()} {hint}")
    return exc


def _validate_data(estimator, X="no_validation", y="no_validation", **check_params):
    """:func:`sklearn.utils.validation.validate_data` whose errors also say what to do.

    With ``y`` given, ``y`` is also required to be numeric (scikit-learn's
    ``y_numeric`` converts object arrays only, so strings would reach torch).
    """
    try:
        # scikit-learn's finiteness check sums the array first and only silences
        # overflow: finite values near +-1.8e308 give inf - inf and a RuntimeWarning
        # "invalid value encountered in reduce" before its exact element-wise check.
        with np.errstate(over="ignore", invalid="ignore"):
            out = validate_data(estimator, X, y, **check_params)
            if isinstance(out, tuple):
                X, y = out
                y = check_array(
                    y, ensure_2d=False, dtype=[np.float64, np.float32], input_name="y"
                )
                out = X, y
    except (ValueError, TypeError) as exc:
        new = _with_hint(exc)
        if new is exc:
            raise
        raise new from exc
    return out


def _check_array(array, **check_params):
    """:func:`sklearn.utils.check_array` whose errors also say what to do."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # see _validate_data
            return check_array(array, **check_params)
    except (ValueError, TypeError) as exc:
        new = _with_hint(exc)
        if new is exc:
            raise
        raise new from exc


def _stable_repr(value):
    """A representation of a parameter that is the same in every process.

    ``repr`` of a function or of most objects contains a memory address; use the
    qualified name of callables and the parameters of objects that have them.
    """
    if hasattr(value, "get_params") and not isinstance(value, type):
        params = sorted((k, _stable_repr(v)) for k, v in value.get_params(deep=False).items())
        return f"{type(value).__qualname__}({params})"
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return type(value)(_stable_repr(v) for v in value)
    return repr(value)


def check_groups(groups, n_samples, *, min_tasks=2):
    """Validate ``groups`` and return ``(labels, list of row-index arrays)``."""
    if groups is None:
        raise ValueError(
            "meta_fit needs groups: an array of shape (n_samples,) giving the task "
            "of each row (rows with the same label form one task)."
        )
    try:
        groups = column_or_1d(groups, warn=True, input_name="groups")
    except ValueError as exc:
        raise ValueError(
            f"groups must be a 1-D array of integer or string task labels, one per row of X; "
            f"got {type(groups).__name__} of shape {np.shape(groups)} ({exc}). Pass e.g. "
            "groups=np.repeat(np.arange(n_tasks), rows_per_task)."
        ) from exc
    if groups.shape[0] != n_samples:
        raise ValueError(
            f"groups has {groups.shape[0]} entries but X has {n_samples} rows; give one "
            "task label per row."
        )
    if groups.dtype.kind == "f" and not np.isfinite(groups).all():
        raise ValueError(
            f"groups contains {int(np.sum(~np.isfinite(groups)))} NaN or inf label(s); every "
            "row needs a finite task label (drop those rows or give them a task)."
        )
    if groups.dtype.kind not in "biufUSO":
        raise TypeError(
            f"groups must hold integer or string labels, got dtype {groups.dtype}; convert "
            "them, e.g. np.asarray(groups, dtype=str)."
        )
    try:
        labels, inverse = np.unique(groups, return_inverse=True)
    except TypeError as exc:
        kinds = sorted({type(g).__name__ for g in groups.tolist()})
        raise TypeError(
            f"groups mixes task labels of types {kinds} that cannot be compared ({exc}); use "
            "labels of one type, e.g. np.asarray(groups, dtype=str)."
        ) from exc
    if labels.shape[0] < min_tasks:
        raise ValueError(
            f"meta_fit needs at least {min_tasks} tasks (distinct groups), got "
            f"{labels.shape[0]}. Meta-learning a divergence needs a family of related "
            "tasks; to adapt to a single task use fit."
        )
    index = [np.flatnonzero(inverse == i) for i in range(labels.shape[0])]
    return labels, index


class _BaseMetaVI(BaseEstimator):
    """Common parameters, meta_fit/fit templates and fitted-state handling.

    Subclasses define ``_make_target``, ``_validate_task_data`` and may
    override the hooks below.
    """

    _parameter_constraints: dict = {
        "divergence": [StrOptions(set(DIVERGENCE_NAMES)), HasMethods(["particle_weights"])],
        "n_particles": [Interval(Integral, 1, None, closed="left")],
        "inner_optimizer": [StrOptions(set(INNER_OPTIMIZERS))],
        "inner_lr": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "meta_lr": [Interval(Real, 0, None, closed="neither")],
        "init_lr": [Interval(Real, 0, None, closed="neither")],
        "max_meta_iter": [Interval(Integral, 1, None, closed="left")],
        "n_inner_steps": [Interval(Integral, 1, None, closed="left")],
        "n_tasks_per_batch": [Interval(Integral, 1, None, closed="left")],
        "meta_learn_init": ["boolean"],
        "meta_gradient": [StrOptions(set(GRADIENT_MODES))],
        "truncate": [Interval(Integral, 1, None, closed="left"), None],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "task_chunk_size": [Interval(Integral, 1, None, closed="left"), None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "dtype": [StrOptions({"float32", "float64"})],
        "device": [str, HasMethods(["type"])],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
    }

    # ------------------------------------------------------------- hooks
    def _make_target(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_family(self, n_latent):  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate_task_data(self, X, y, reset):  # pragma: no cover - abstract
        raise NotImplementedError

    def _initial_params(self, problem, n_tasks, tasks, generator):
        """Fresh variational (and model) parameters for ``n_tasks`` tasks."""
        family, target = problem
        params = family.init_params(
            n_tasks, loc=self.init_loc, scale=self.init_scale, dtype=self._dtype, device=self._device
        )
        params.update(target.init_params(n_tasks, dtype=self._dtype, device=self._device))
        return params

    def _make_meta_loss(self, problem, tasks):
        """Resolve ``meta_loss`` into a torch callable ``(problem, params, tasks) -> (M,)``."""
        meta_loss = self.meta_loss
        if callable(meta_loss):
            return CallableMetaLoss(meta_loss)
        if meta_loss == "auto":
            meta_loss = "nll" if problem.target.has_likelihood else "d_half"
        if meta_loss == "nll":
            if not problem.target.has_likelihood:
                raise ValueError(
                    "meta_loss='nll' needs a model with a per-row likelihood; "
                    f"{type(problem.target).__name__} has none. Use 'd_half' or 'tv' "
                    "(1-D targets) or a callable meta_loss."
                )
            return PredictiveNLL(n_particles=self.n_particles)
        n_latent = problem.family.n_latent
        if n_latent != 1:
            raise ValueError(
                f"meta_loss={meta_loss!r} is computed by quadrature and needs a 1-D latent "
                f"variable, but this model has n_latent={n_latent}. Use 'nll' or a callable."
            )
        low_high = getattr(self, "quadrature_range", None)
        if low_high is None:
            low_high = problem.target.quadrature_range(tasks)
            if low_high is None:
                raise ValueError(
                    f"meta_loss={meta_loss!r} needs a quadrature grid; this model gives "
                    "no range. Set quadrature_range=(low, high) to cover the target's mass."
                )
            lo, hi = low_high
            lo = min(lo, self.init_loc - 10 * self.init_scale)
            hi = max(hi, self.init_loc + 10 * self.init_scale)
            low_high = (lo, hi)
        kind = "tv" if meta_loss == "tv" else "renyi"
        return QuadratureLoss(kind=kind, alpha=0.5, low=low_high[0], high=low_high[1])

    # ---------------------------------------------------------- helpers
    def _setup_torch(self):
        self._dtype = _torch.resolve_dtype(self.dtype)
        self._device = _torch.resolve_device(self.device)

    def _problem(self, n_features):
        target = self._make_target()
        if self.batch_size is not None and not target.supports_minibatch:
            raise ValueError(
                f"batch_size={self.batch_size} cannot be used with {type(target).__name__}: "
                "its rows are not independent likelihood terms that a rescaled minibatch "
                "could estimate (mixture components, or a user log-density that sees only "
                "the rows it is given). Use batch_size=None."
            )
        n_latent = target.n_latent(n_features)
        return Problem(self._make_family(n_latent), target)

    def _to_tasks(self, X, y, index):
        Xs = [_torch.as_tensor(X[i], device=self._device, dtype=self._dtype) for i in index]
        ys = None
        if y is not None:
            ys = [_torch.as_tensor(y[i], device=self._device, dtype=self._dtype) for i in index]
        return pad_tasks(Xs, ys)

    def _check_target_rows(self, target, X, y):
        target.check_data(
            _torch.as_tensor(X, dtype=torch.float64),
            None if y is None else _torch.as_tensor(y, dtype=torch.float64),
        )

    def _resolve_divergence(self):
        div = self.divergence
        if isinstance(div, str) or isinstance(div, Divergence):
            return make_divergence(div)
        raise TypeError(
            f"divergence must be one of {list(DIVERGENCE_NAMES)} or a "
            f"skmetavi.divergences.Divergence, got {type(div).__name__}."
        )

    def _check_meta_options(self):
        if self.meta_gradient == "truncated" and self.truncate is None:
            raise ValueError(
                "meta_gradient='truncated' needs truncate, the number of final inner steps "
                "to back-propagate through (e.g. truncate=5)."
            )
        if self.truncate is not None and self.meta_gradient != "truncated":
            raise ValueError(
                f"truncate={self.truncate} only applies with meta_gradient='truncated', got "
                f"meta_gradient={self.meta_gradient!r}; set meta_gradient='truncated' or "
                "truncate=None."
            )
        if self.truncate is not None and self.truncate > self.n_inner_steps:
            raise ValueError(
                f"truncate={self.truncate} exceeds n_inner_steps={self.n_inner_steps}; "
                "choose truncate <= n_inner_steps."
            )

    def _transform_meta_targets(self, y, support_idx, query_idx):
        """Per-task transformation of ``y`` before meta-training (identity here)."""
        return y

    def _transform_fit_targets(self, y):
        """Transformation of one task's ``y`` before ``fit`` (identity here)."""
        return y

    # -------------------------------------------------------- meta_fit
    def _support_query(self, X, y, index, rng):
        """Split each task's rows into support (inner loop) and query (meta-loss).

        Only for models with a per-row likelihood (held-out predictive meta-loss);
        otherwise both parts are the whole task.
        """
        if not self._make_target().has_likelihood:
            return index, index
        support, query = [], []
        for t, rows in enumerate(index):
            if rows.shape[0] < 2:
                raise ValueError(
                    f"Task {t} has {rows.shape[0]} row(s); the held-out meta-loss needs at "
                    "least 2 rows per task (one support, one query). Merge small tasks or "
                    "use more data per task."
                )
            perm = rng.permutation(rows)
            n_query = min(rows.shape[0] - 1, max(1, int(round(self.query_fraction * rows.shape[0]))))
            query.append(np.sort(perm[:n_query]))
            support.append(np.sort(perm[n_query:]))
        return support, query


    @_fit_context(prefer_skip_nested_validation=True)
    def meta_fit(self, X, y=None, groups=None, checkpoint=None, checkpoint_every=50):
        """Meta-learn the divergence (and with ``meta_learn_init``, the initialisation).

        Each distinct value of ``groups`` is one training task.  Runs Algorithm 1
        (Meta-D) or, with ``meta_learn_init=True``, Algorithm 2 (Meta-D&phi) of
        Zhang et al. (2021) for ``max_meta_iter`` outer iterations.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of all training tasks.
        y : array-like of shape (n_samples,), default=None
            Targets, for models that need them.
        groups : array-like of shape (n_samples,)
            Task label of each row.
        checkpoint : str or path, default=None
            File for periodic checkpoints of the whole meta-training state
            (divergence, optimisers, per-task parameters, RNG).  If it exists,
            meta-training resumes from it, and the result is the same as that
            of an uninterrupted run; it must have been written for the same
            data and settings.  Written atomically; loaded with
            ``torch.load(..., weights_only=True)``.  A run killed at any point
            resumes from the last checkpoint; after ``Ctrl-C`` the file holds
            the last completed iteration (an interrupted, half-applied
            iteration is kept in memory only).
        checkpoint_every : int, default=50
            Outer iterations between checkpoints.

        Returns
        -------
        self : object
            The estimator, with ``meta_divergence_`` (and ``meta_init_``) set.
        """
        self._setup_torch()
        self._check_meta_options()
        if checkpoint is not None:
            _checkpoint.check_path(checkpoint)
        if (
            isinstance(checkpoint_every, bool)
            or not isinstance(checkpoint_every, Integral)
            or checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every must be a positive int (outer iterations between "
                f"checkpoints), got {checkpoint_every!r}; e.g. checkpoint_every=50."
            )
        X, y = self._validate_task_data(X, y, reset=True)
        labels, index = check_groups(groups, X.shape[0])
        problem = self._problem(X.shape[1])
        for i in index:
            self._check_target_rows(problem.target, X[i], None if y is None else y[i])
        rng = _check_random_state(self.random_state)
        # The outer generator stays on the CPU (task sampling, per-iteration seeds); the
        # Monte Carlo noise itself is drawn on `device` from seeds it hands out.
        generator = _torch.make_generator(_torch.seed_from_random_state(rng), "cpu")
        support_idx, query_idx = self._support_query(X, y, index, rng)
        y = self._transform_meta_targets(y, support_idx, query_idx)
        support = self._to_tasks(X, y, support_idx)
        query = self._to_tasks(X, y, query_idx)
        meta_loss = self._make_meta_loss(problem, support)

        warm = self.warm_start and hasattr(self, "_meta_state")
        if warm:
            divergence = copy.deepcopy(self.meta_divergence_)
        else:
            divergence = self._resolve_divergence()
        # Every nn.Parameter of the divergence is a meta-parameter (a divergence frozen by
        # an earlier fit, e.g. ``est.divergence_``, is learnable again here).
        divergence = divergence.to(self._device, self._dtype).requires_grad_(True)
        if not divergence.learnable and not self.meta_learn_init:
            raise ValueError(
                f"Nothing to meta-learn: divergence {divergence!r} has no learnable "
                "parameters and meta_learn_init=False. Use a learnable divergence "
                "('renyi', 'neural_f', Renyi(learnable=True)) or meta_learn_init=True."
            )
        init = self._initial_params(problem, support.n_tasks, support, generator)
        optimizer = make_optimizer(self.inner_optimizer, self.inner_lr)
        trainer = MetaTrainer(
            problem, divergence, optimizer, meta_loss, support, query,
            init_params=init, learn_init=self.meta_learn_init,
            n_inner_steps=self.n_inner_steps, n_particles=self.n_particles,
            n_tasks_per_batch=self.n_tasks_per_batch, meta_lr=self.meta_lr,
            init_lr=self.init_lr, mode=self.meta_gradient, truncate=self.truncate,
            batch_size=self.batch_size, generator=generator, max_grad_norm=self.max_grad_norm,
            task_chunk_size=self.task_chunk_size,
        )
        if warm:
            self._load_meta_state(trainer, labels)
        # This call runs until outer iteration `target` (warm_start adds max_meta_iter).
        target = trainer.n_iter + self.max_meta_iter
        if checkpoint is not None:
            if isinstance(self.random_state, bool) or not isinstance(self.random_state, Integral):
                raise ValueError(
                    "meta_fit(checkpoint=...) needs an int random_state, so that a resumed run "
                    "repeats the random draws of the interrupted one (the support/query split, "
                    f"the task sampling); got random_state={self.random_state!r}."
                )
            fingerprint = self._fingerprint(X, y, groups)
            start = _checkpoint.load(checkpoint, fingerprint)
            if start is not None and warm and start["n_iter"] <= trainer.n_iter:
                start = None  # the checkpoint holds this estimator's own (older) state
            if start is not None:
                try:
                    trainer.load_state_dict(start)
                except (RuntimeError, KeyError, IndexError, TypeError, ValueError) as exc:
                    raise ValueError(
                        f"The checkpoint {str(checkpoint)!r} matches this meta_fit call but "
                        f"its state cannot be restored ({type(exc).__name__}: {exc}); it was "
                        "probably written by another version of skmetavi. Delete it to start "
                        "over, or pass another checkpoint path."
                    ) from exc
                target = start.get("target_iter", target)
        n_todo = max(0, target - trainer.n_iter)
        bar = _progress(n_todo, self.verbose, "meta_fit")
        interrupted = False
        # True while trainer.step() runs: an interrupt there may leave the iteration
        # half applied (e.g. eta updated, phi_i not yet stored), a state no
        # uninterrupted run passes through.  Such a state is kept in memory but never
        # written to the checkpoint, so that resuming stays exact.
        in_step = False
        try:
            for _ in range(n_todo):
                in_step = True
                value = trainer.step()
                in_step = False
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(meta_loss=f"{value:.4g}")
                if checkpoint is not None and trainer.n_iter % checkpoint_every == 0:
                    _checkpoint.save(checkpoint, {**trainer.state_dict(), "target_iter": target},
                                     fingerprint)
        except KeyboardInterrupt:
            interrupted = True
        except NonFiniteError as exc:
            raise NonFiniteError(
                f"meta_fit stopped: {exc} (settings: inner_optimizer={self.inner_optimizer!r}, "
                f"inner_lr={self.inner_lr!r}, meta_lr={self.meta_lr!r}, "
                f"n_inner_steps={self.n_inner_steps!r}, max_grad_norm={self.max_grad_norm!r})"
            ) from exc
        finally:
            if bar is not None:
                bar.close()
        if checkpoint is not None and not in_step:
            _checkpoint.save(checkpoint, {**trainer.state_dict(), "target_iter": target},
                             fingerprint)
        self._store_meta_state(trainer, labels)
        if interrupted:
            where = (
                f"the checkpoint {str(checkpoint)!r} holds the last completed checkpoint "
                "iteration; "
                if checkpoint is not None and in_step
                else ""
            )
            warnings.warn(
                f"meta_fit interrupted after {trainer.n_iter} outer iterations; the estimator "
                f"keeps the progress so far ({where}meta_fit with warm_start=True continues "
                "from it).",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    def _fingerprint(self, X, y, groups):
        """Hash of the data and of every parameter that changes the meta-training run."""
        h = hashlib.sha256()
        for arr in (X, y, np.asarray(groups)):
            if arr is not None:
                arr = np.ascontiguousarray(arr)
                h.update(str((arr.dtype.str, arr.shape)).encode())
                h.update(arr.tobytes() if arr.dtype.kind != "O" else repr(arr.tolist()).encode())
        skip = {"verbose", "max_meta_iter", "warm_start", "max_iter", "device", "task_chunk_size"}
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in skip}
        h.update(repr(sorted((k, _stable_repr(v)) for k, v in params.items())).encode())
        return h.hexdigest()

    def _store_meta_state(self, trainer, labels):
        self.meta_divergence_ = copy.deepcopy(trainer.divergence).to("cpu")
        if trainer.learn_init:
            self.meta_init_ = _torch.tree_to(trainer.init_params, "cpu")
        elif hasattr(self, "meta_init_"):
            del self.meta_init_
        self.meta_loss_curve_ = np.asarray(trainer.loss_curve, dtype=float)
        self.n_meta_iter_ = trainer.n_iter
        self.meta_tasks_ = labels
        # The full trainer state, so that warm_start continues exactly; on the CPU
        # like all fitted state (the meta-optimiser's Adam moments live on `device`).
        self._meta_state = trainer.state_dict()
        self._meta_state["learn_init"] = trainer.learn_init

    def _load_meta_state(self, trainer, labels):
        state = self._meta_state
        if state["learn_init"] != trainer.learn_init:
            raise ValueError(
                "warm_start=True cannot switch meta_learn_init between meta_fit calls "
                f"(was {state['learn_init']}, now {trainer.learn_init}); set warm_start=False."
            )
        old = self.meta_tasks_
        if not trainer.learn_init and (
            old.shape != labels.shape or not np.array_equal(old, labels)
        ):
            # Algorithm 1 keeps one phi_i per training task: they must be the same tasks.
            raise ValueError(
                "warm_start=True continues the previous meta_fit, whose per-task parameters "
                f"belong to its {old.shape[0]} tasks {old.tolist()[:10]}, but this call has "
                f"{labels.shape[0]} tasks {labels.tolist()[:10]}. Pass the same X, y and "
                "groups, or set warm_start=False to start over."
            )
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, IndexError) as exc:
            raise ValueError(
                "warm_start=True but the previous meta_fit state does not match the new "
                f"training tasks or settings ({exc}). Use the same X and groups, or set "
                "warm_start=False."
            ) from exc

    # ------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None):
        """Adapt q to one task with the meta-learned divergence (if any).

        Uses ``meta_divergence_`` (and ``meta_init_``) when :meth:`meta_fit` was
        called, otherwise the ``divergence`` parameter; runs ``max_iter``
        inner iterations of variational inference.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The task's rows.
        y : array-like of shape (n_samples,), default=None
            Targets, for models that need them.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        self._setup_torch()
        warm = self.warm_start and hasattr(self, "variational_params_")
        try:
            # A warm start keeps n_features_in_: a failed call leaves the estimator as it was.
            X, y = self._validate_task_data(X, y, reset=not warm)
        except ValueError as exc:
            if warm and "features, but" in str(exc):
                raise ValueError(
                    f"warm_start=True continues the previous fit, which saw "
                    f"{self.n_features_in_} features: {exc} To fit data with other columns, "
                    "set warm_start=False."
                ) from exc
            raise
        problem = self._problem(X.shape[1])
        self._check_target_rows(problem.target, X, y)
        y = self._transform_fit_targets(y)
        rng = _check_random_state(self.random_state)
        seed = _torch.seed_from_random_state(rng)
        generator = _torch.make_generator(seed, self._device)
        tasks = self._to_tasks(X, y, [np.arange(X.shape[0])])

        if hasattr(self, "meta_divergence_"):
            divergence = copy.deepcopy(self.meta_divergence_)
        else:
            divergence = self._resolve_divergence()
        divergence = divergence.to(self._device, self._dtype).requires_grad_(False)

        if warm:
            params = _torch.tree_to(self.variational_params_, self._device)
            self._check_warm_params(params, problem)
        elif hasattr(self, "meta_init_"):
            params = _torch.tree_to(self.meta_init_, self._device)
        else:
            params = self._initial_params(problem, 1, tasks, generator)
        params = {k: v.to(self._dtype) for k, v in params.items()}
        optimizer = make_optimizer(self.inner_optimizer, self.inner_lr)
        state = optimizer.init(params)
        n_steps = self._n_steps(tasks)
        bar = _progress(n_steps, self.verbose, "fit")
        last = {"params": params}
        new_curve = []

        def callback(it, p, s, bound):
            last["params"] = p
            new_curve.append(-float(bound[0]))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{new_curve[-1]:.4g}")

        interrupted = False
        try:
            params, _, _ = run_vi(
                problem, divergence, optimizer, params, state, tasks,
                n_steps=n_steps, n_particles=self.n_particles, generator=generator,
                batch_size=self.batch_size, callback=callback,
            )
        except KeyboardInterrupt:
            interrupted = True
            params = last["params"]
        except NonFiniteError as exc:
            raise NonFiniteError(
                f"fit stopped: {exc} (settings: inner_optimizer={self.inner_optimizer!r}, "
                f"inner_lr={self.inner_lr!r}, n_particles={self.n_particles!r}, "
                f"divergence={divergence!r})"
            ) from exc
        finally:
            if bar is not None:
                bar.close()
        prev_curve = list(self.loss_curve_) if warm else []
        self.divergence_ = divergence.to("cpu")
        self.variational_params_ = _torch.tree_to(params, "cpu")
        self.loss_curve_ = np.asarray(prev_curve + new_curve, dtype=float)
        self.n_iter_ = len(new_curve)
        self.n_latent_ = problem.family.n_latent
        # Fixed seeds of score and of sample's default draw: repeated calls agree.
        self._predict_seed = int(rng.randint(0, 2**31 - 1))
        self._sample_seed = _torch.seed_from_random_state(rng)
        self._after_fit(problem, tasks)
        if interrupted:
            warnings.warn(
                "fit interrupted; the estimator keeps the parameters of the last completed "
                "iteration (fit with warm_start=True continues).",
                RuntimeWarning,
                stacklevel=2,
            )
        return self

    def _n_steps(self, tasks):
        """Inner iterations of ``fit``: ``max_iter`` epochs over the task's rows."""
        if self.batch_size is None:
            return self.max_iter
        n = int(tasks.n_rows.max())
        return self.max_iter * max(1, -(-n // self.batch_size))

    def _check_warm_params(self, params, problem):
        fresh = self._initial_params(problem, 1, None, _torch.make_generator(0, self._device))
        for k, v in fresh.items():
            if k not in params or params[k].shape != v.shape:
                raise ValueError(
                    "warm_start=True but the previous fit's parameters do not match the new "
                    f"data (parameter {k!r}: {tuple(params.get(k, v).shape)} vs "
                    f"{tuple(v.shape)}). Refit with warm_start=False."
                )

    def _after_fit(self, problem, tasks):
        """Hook for subclasses to store derived fitted attributes."""

    def __sklearn_is_fitted__(self):
        # meta_fit alone does not make an estimator fitted: it has no q yet.
        return hasattr(self, "variational_params_")

    def _fitted_problem(self):
        check_is_fitted(self)
        return self._problem(self.n_features_in_)
