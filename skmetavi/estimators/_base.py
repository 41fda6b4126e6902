"""Shared machinery of the meta-VI estimators: constraints, the fit template, batched adaptation.

Public methods validate with scikit-learn's utilities, cross into torch once
(:mod:`skmetavi._torch`), call the engine (:mod:`skmetavi._bilevel`) and cross
back.  Fitted state lives on the CPU so that estimators pickle anywhere.
:meth:`_BaseMetaVI._fit_tasks` is the one adaptation path: ``fit`` adapts one
task with it, :class:`~skmetavi.model_selection.TaskAdaptiveRegressor` all
held-out tasks in one pass, and the reproductions their test tasks.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import contextlib
import copy
import time
import warnings
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils._param_validation import HasMethods, Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from skmetavi import _checkpoint, _torch, _tree
from skmetavi._bilevel import GRADIENT_MODES, VIRun
from skmetavi._inner import check_local_divergence
from skmetavi._optim import INNER_OPTIMIZERS, make_optimizer
from skmetavi._tasks import TaskGenerators, auto_task_chunk, pad_tasks
from skmetavi._validation import _check_random_state, check_groups
from skmetavi.divergences import DIVERGENCE_NAMES, Divergence, make_divergence
from skmetavi.exceptions import NoMetaLearningWarning, _warn_at_caller
from skmetavi import callbacks as _callbacks
from skmetavi.callbacks import History
from skmetavi.estimators import _loop
from skmetavi.estimators._loop import train_loop
from skmetavi.estimators._meta_fit import MetaFitMixin
from skmetavi.estimators._meta_validation import MetaValidation
from skmetavi.models import GlobalLatent

# Re-exported: the stable representation of parameters used by checkpoint fingerprints.
from skmetavi._validation import _stable_repr  # noqa: F401


@contextlib.contextmanager
def _restored_on_error(estimator):
    """Within the block, an exception restores the estimator's attributes as they were.

    A shallow snapshot: attributes set or deleted in the block are put back; the
    objects they hold must not be modified in place (the training code copies
    what it loads, e.g. a warm start's optimiser state).
    """
    saved = dict(estimator.__dict__)
    try:
        yield
    except BaseException:
        estimator.__dict__.clear()
        estimator.__dict__.update(saved)
        raise


def _warn_pooled_groups(estimator, groups):
    """Warn when ``fit`` (one task) receives the rows of several tasks."""
    if groups is None:
        return
    n_tasks = np.unique(np.asarray(groups, dtype=object).ravel().astype(str)).size
    if n_tasks < 2:
        return
    name = type(estimator).__name__
    warnings.warn(
        f"{name}.fit received groups with {n_tasks} tasks, but fit adapts to one task: "
        "their rows were pooled into one and nothing was meta-learned. To meta-learn "
        f"across tasks, call {name}.meta_fit(X, y, groups), or cross-validate over tasks "
        f"with skmetavi.model_selection.TaskAdaptiveEstimator({name}(...)) (metadata "
        "routing on, params={'groups': groups}).",
        NoMetaLearningWarning,
        stacklevel=3,
    )

class _BaseMetaVI(MetaFitMixin, BaseEstimator):
    """Common parameters, the fit template, batched adaptation and fitted-state handling.

    Subclasses define ``_make_target``, ``_make_family``, ``_validate_task_data``
    and may override the hooks below; ``meta_fit`` comes from
    :class:`~skmetavi.estimators._meta_fit.MetaFitMixin`.
    """

    # fit adapts to one task; groups routed to it only trigger a NoMetaLearningWarning.
    __metadata_request__fit = {"groups": True}

    _parameter_constraints: dict = {
        "divergence": [StrOptions(set(DIVERGENCE_NAMES)), HasMethods(["particle_weights"])],
        "n_particles": [Interval(Integral, 1, None, closed="left")],
        "inner_optimizer": [StrOptions(set(INNER_OPTIMIZERS) | {"auto"})],
        "inner_lr": [Interval(Real, 0, None, closed="neither"), StrOptions({"auto"})],
        "max_iter": [Interval(Integral, 0, None, closed="left"), StrOptions({"auto"})],
        "meta_lr": [Interval(Real, 0, None, closed="neither")],
        "init_lr": [Interval(Real, 0, None, closed="neither")],
        "max_meta_iter": [Interval(Integral, 1, None, closed="left")],
        "n_inner_steps": [Interval(Integral, 1, None, closed="left")],
        "n_tasks_per_batch": [Interval(Integral, 1, None, closed="left")],
        "meta_learn_init": ["boolean", StrOptions({"auto"})],
        "meta_gradient": [StrOptions(set(GRADIENT_MODES))],
        "truncate": [Interval(Integral, 1, None, closed="left"), None],
        "implicit_max_iter": [Interval(Integral, 1, None, closed="left")],
        "implicit_tol": [Interval(Real, 0, 1, closed="neither")],
        "implicit_damping": [Interval(Real, 0, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "multi_step_loss": ["boolean", StrOptions({"auto"})],
        "validation_fraction": [Interval(Real, 0, 1, closed="neither"), None],
        "validation_interval": [Interval(Integral, 1, None, closed="left"), None],
        "task_chunk_size": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"}),
                            None],
        "batch_size": [Interval(Integral, 1, None, closed="left"), None],
        "dtype": [StrOptions({"float32", "float64"})],
        "device": [str, HasMethods(["type"])],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "warm_start": ["boolean"],
        "callbacks": [list, tuple, callable, HasMethods(["on_iteration_end"]), None],
    }

    # ------------------------------------------------------------- hooks
    def _make_target(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def _make_family(self, n_latent):  # pragma: no cover - abstract
        raise NotImplementedError

    def _validate_task_data(self, X, y, reset):  # pragma: no cover - abstract
        raise NotImplementedError

    def _fit_target_transform(self, y):
        """One task's ``y`` for ``fit`` and the fitted attributes that undo it (identity here)."""
        return y, {}

    def _after_fit(self, model):
        """Hook for subclasses to store derived fitted attributes."""

    def _validation_score(self, X, y):  # pragma: no cover - abstract
        """Meta-validation score of this fitted estimator on one task's query rows (higher is better)."""
        raise NotImplementedError

    # ---------------------------------------------------------- helpers
    def _setup_torch(self):
        self._dtype = _torch.resolve_dtype(self.dtype)
        self._device = _torch.resolve_device(self.device)

    def _model(self, n_features):
        """The engine's model: this estimator's family and target (one global latent)."""
        target = self._make_target()
        if self.batch_size is not None and not target.supports_minibatch:
            raise ValueError(
                f"batch_size={self.batch_size} cannot be used with {type(target).__name__}: "
                "its rows are not independent likelihood terms that a rescaled minibatch "
                "could estimate (mixture components, or a user log-density that sees only "
                "the rows it is given). Use batch_size=None."
            )
        family = self._make_family(target.n_latent(n_features))
        return GlobalLatent(family, target, init_loc=getattr(self, "init_loc", 0.0),
                            init_scale=self.init_scale)

    def _to_tasks(self, X, y, index):
        """The rows ``index[m]`` of ``X`` (and ``y``) as task ``m`` of a padded batch."""
        return self._pad([X[i] for i in index], None if y is None else [y[i] for i in index])

    def _pad(self, Xs, ys=None):
        """Tasks given as arrays, in torch on ``device``, padded to a batch."""
        def conv(a):
            return _torch.as_tensor(a, device=self._device, dtype=self._dtype)

        return pad_tasks([conv(X) for X in Xs], None if ys is None else [conv(y) for y in ys])

    def _check_target_rows(self, model, X, y):
        model.target.check_data(
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

    def _adaptation_divergence(self):
        """The divergence of ``fit``: the meta-learned one if any, frozen."""
        if hasattr(self, "meta_divergence_"):
            divergence = copy.deepcopy(self.meta_divergence_)
        else:
            divergence = self._resolve_divergence()
        return divergence.to(self._device, self._dtype).requires_grad_(False)

    #: Epochs of ``fit`` with ``max_iter="auto"`` when there is no learned initialisation.
    DEFAULT_MAX_ITER = 200
    #: ``inner_lr="auto"`` per inner optimiser.
    DEFAULT_INNER_LR = {"adam": 0.01, "sgd": 3e-4}

    def _inner_optimizer(self, learned_init):
        """The inner optimiser: ``"auto"`` is SGD with a learned initialisation, else Adam.

        With a learned initialisation (Algorithm 2) every task restarts the inner
        optimiser: a fresh Adam's first step, ``lr * sign(direction)``, hides the
        divergence from the meta-gradient and takes the same step whatever the
        amount of data, while SGD's steps are linear in the direction (the paper's
        update), so a task with little data stays near the initialisation, as under
        a prior.
        """
        name = self.inner_optimizer
        if name == "auto":
            name = "sgd" if learned_init else "adam"
        lr = self.DEFAULT_INNER_LR[name] if self.inner_lr == "auto" else self.inner_lr
        return make_optimizer(name, lr)

    def _n_steps(self, tasks):
        """Inner iterations of ``fit`` per task (M,).

        ``max_iter`` epochs over the task's rows; with ``max_iter="auto"`` and a
        learned initialisation (Algorithm 2), the ``n_inner_steps`` steps it was
        meta-trained for, else ``DEFAULT_MAX_ITER`` epochs.
        """
        n_rows = tasks.n_rows.cpu()
        if self.max_iter == "auto" and hasattr(self, "meta_init_"):
            return torch.full_like(n_rows, self.n_inner_steps)
        epochs = self.DEFAULT_MAX_ITER if self.max_iter == "auto" else self.max_iter
        if self.batch_size is None:
            return torch.full_like(n_rows, epochs)
        return epochs * torch.clamp(-(-n_rows // self.batch_size), min=1)

    # -------------------------------------------------------- meta_fit
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
            iteration is kept in memory only).  A run that a callback stopped
            early continues to ``max_meta_iter`` when resumed, unless this
            call's callbacks stop it at the same iteration again.
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
        # A meta_fit that fails (bad data, a callback that raises) leaves the estimator as
        # it was: the attributes set while the inputs are prepared (validation_tasks_, the
        # target scaling of MetaBNNRegressor.normalize_y) are restored, and the previous
        # fitted state, which a warm start reads, is only replaced at the end.
        with _restored_on_error(self):
            X, y, labels, inputs = self._meta_fit_inputs(X, y, groups)
            fingerprint = None
            if checkpoint is not None:
                rs = self.random_state
                if isinstance(rs, bool) or not isinstance(rs, Integral):
                    raise ValueError(
                        "meta_fit(checkpoint=...) needs an int random_state, so that a resumed "
                        "run repeats the random draws of the interrupted one (the support/query "
                        f"split, the task sampling); got random_state={rs!r}."
                    )
                fingerprint = self._fingerprint(X, y, groups)
            return self._meta_fit(*inputs, labels, checkpoint=checkpoint,
                                  checkpoint_every=checkpoint_every, fingerprint=fingerprint)

    def _meta_fit_inputs(self, X, y, groups):
        """Validated data and the engine's inputs of meta-training.

        Returns ``(X, y, labels, (model, support, query, generator, validation))``:
        ``y`` transformed per task, the labels of the training tasks, the support
        and query rows of every training task as torch batches, the CPU generator of
        the outer loop, and the held-out tasks' :class:`MetaValidation` (or None).
        """
        X, y = self._validate_task_data(X, y, reset=True)
        labels, index = check_groups(groups, X.shape[0])
        model = self._model(X.shape[1])
        for i in index:
            self._check_target_rows(model, X[i], None if y is None else y[i])
        rng = _check_random_state(self.random_state)
        # The outer generator stays on the CPU (task sampling, per-iteration seeds); the
        # Monte Carlo noise itself is drawn on `device` from seeds it hands out.
        generator = _torch.make_generator(_torch.seed_from_random_state(rng), "cpu")
        validation = None
        if hasattr(self, "validation_tasks_"):
            del self.validation_tasks_
        if self.validation_fraction is not None:
            labels, index, validation = self._hold_out_validation(model, X, y, labels, index, rng)
        support_idx, query_idx = self._support_query(model, index, rng)
        y = self._transform_meta_targets(y, support_idx, query_idx)
        support = self._to_tasks(X, y, support_idx)
        # Without held-out rows the query rows are the support rows: one batch, not two copies.
        query = support if query_idx is support_idx else self._to_tasks(X, y, query_idx)
        return X, y, labels, (model, support, query, generator, validation)

    def _hold_out_validation(self, model, X, y, labels, index, rng):
        """Split off ``validation_fraction`` of the tasks for :class:`MetaValidation`."""
        n_tasks = len(index)
        n_val = max(1, int(round(self.validation_fraction * n_tasks)))
        if n_tasks - n_val < 2:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} holds out {n_val} of the "
                f"{n_tasks} tasks, leaving {n_tasks - n_val} to meta-train on; meta_fit needs at "
                "least 2. Use more tasks or a smaller validation_fraction (or None)."
            )
        perm = rng.permutation(n_tasks)
        val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        val_support, val_query = self._support_query(model, [index[i] for i in val], rng)
        tasks = [(X[s], None if y is None else y[s], X[q], None if y is None else y[q])
                 for s, q in zip(val_support, val_query)]
        interval = self.validation_interval or max(1, self.max_meta_iter // 10)
        validation = MetaValidation(self, tasks, int(rng.randint(0, 2**31 - 1)), interval)
        self.validation_tasks_ = labels[val]
        return labels[train], [index[i] for i in train], validation

    # ------------------------------------------------------------- fit
    @_fit_context(prefer_skip_nested_validation=True)
    def fit(self, X, y=None, groups=None):
        """Adapt q to one task with the meta-learned divergence (if any).

        Uses ``meta_divergence_`` (and ``meta_init_``) when :meth:`meta_fit` was
        called, otherwise the ``divergence`` parameter; runs ``max_iter``
        epochs of variational inference (``max_iter="auto"``: as many steps as
        the learned initialisation was meta-trained for, or the default number
        of epochs without one; ``max_iter=0`` keeps the starting q, e.g. the
        learned initialisation itself).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The task's rows.
        y : array-like of shape (n_samples,), default=None
            Targets, for models that need them.
        groups : array-like of shape (n_samples,), default=None
            Not used: ``fit`` adapts to one task.  Accepted (and requested from
            metadata routing) only to warn, with a
            :class:`~skmetavi.exceptions.NoMetaLearningWarning`, when rows of
            several tasks arrive here, e.g. from ``cross_validate(...,
            params={"groups": groups})``: they are pooled into one task and
            nothing is meta-learned.  Use :meth:`meta_fit` or
            :class:`~skmetavi.model_selection.TaskAdaptiveRegressor`.

        Returns
        -------
        self : object
            Fitted estimator.
        """
        _warn_pooled_groups(self, groups)
        self._setup_torch()
        # A fit that fails (bad data, a callback that raises) leaves the estimator as it was.
        with _restored_on_error(self):
            warm = self.warm_start and hasattr(self, "variational_params_")
            try:
                # A warm start keeps n_features_in_ (checked, not reset).
                X, y = self._validate_task_data(X, y, reset=not warm)
            except ValueError as exc:
                if warm and "features, but" in str(exc):
                    raise ValueError(
                        f"warm_start=True continues the previous fit, which saw "
                        f"{self.n_features_in_} features: {exc} To fit data with other columns, "
                        "set warm_start=False."
                    ) from exc
                raise
            rng = _check_random_state(self.random_state)
            (state,), interrupted = self._fit_tasks([(X, y)], [rng], warm=warm, estimators=[self])
            if warm:
                state["loss_curve_"] = np.concatenate([self.loss_curve_, state["loss_curve_"]])
                state["history_"] = History(list(getattr(self, "history_", [])) + state["history_"])
            self._set_fitted(state)
            if interrupted:
                _warn_at_caller(
                    "fit interrupted; the estimator keeps the parameters of the last completed "
                    "iteration (fit with warm_start=True continues).",
                    RuntimeWarning,
                )
            return self

    def _fit_tasks(self, data, rngs, *, warm=False, n_steps=None, estimators=None, quiet=False):
        """Adapt q to every task of ``data`` at once; one fitted state per task.

        The one adaptation path.  Each task draws its random numbers from its own
        ``rngs[m]`` exactly as a separate ``fit`` would (:class:`TaskGenerators`),
        so the result for a task does not depend on the other tasks; each task
        has its own history and callbacks, and stops when they say so.

        Parameters
        ----------
        data : list of (X, y)
            Validated rows of each task.
        rngs : list of numpy.random.RandomState
            One per task.
        warm : bool, default=False
            Start from ``variational_params_`` (one task).
        n_steps : int, default=None
            Inner iterations per task; ``max_iter`` epochs if None.
        estimators : list of estimator, default=None
            The estimator each task's callbacks are called with (``self`` for
            all if None; ``fit`` passes ``[self]``).
        quiet : bool, default=False
            No progress bar, callbacks or divergence warning (meta-validation's
            internal adaptations).

        Returns
        -------
        states : list of dict
            Fitted attributes of each task (see :meth:`_set_fitted`).
        interrupted : bool
            Whether ``KeyboardInterrupt`` stopped the adaptation (the states hold the
            last completed iteration).
        """
        model, run, budget, extras = self._adaptation(data, rngs, warm=warm, n_steps=n_steps)
        offset = len(getattr(self, "loss_curve_", ())) if warm else 0
        curves, histories, interrupted = self._run_adaptation(
            run, budget, estimators=estimators, offset=offset, quiet=quiet)
        states = []
        divergence = run.divergence
        for m, rng in enumerate(rngs):
            states.append({
                **extras[m],
                "divergence_": (divergence.to("cpu") if m == 0
                                else copy.deepcopy(states[0]["divergence_"])),
                "variational_params_": _tree.to_device(
                    {k: v[m : m + 1] for k, v in run.params.items()}, "cpu"),
                "loss_curve_": np.asarray(curves[m], dtype=float),
                "history_": histories[m],
                "n_iter_": len(curves[m]),
                "n_latent_": model.n_latent,
                # Fixed seeds of score and of sample's default draw: repeated calls agree.
                "_predict_seed": int(rng.randint(0, 2**31 - 1)),
                "_sample_seed": _torch.seed_from_random_state(rng),
            })
        return states, interrupted

    def _adaptation(self, data, rngs, *, warm=False, n_steps=None):
        """A ready batched VI run over the tasks of ``data`` (see :meth:`_fit_tasks`).

        Returns ``(model, run, budget, extras)``: the engine's model, a
        :class:`~skmetavi._bilevel.VIRun` at the starting q of every task, the
        steps per task and each task's target-transform attributes.
        """
        n_features = data[0][0].shape[1]
        model = self._model(n_features)
        ys, extras = [], []
        for X, y in data:
            self._check_target_rows(model, X, y)
            y, extra = self._fit_target_transform(y)
            ys.append(y)
            extras.append(extra)
        seeds = [_torch.seed_from_random_state(rng) for rng in rngs]
        gens = [_torch.make_generator(s, self._device) for s in seeds]
        generator = gens[0] if len(gens) == 1 else TaskGenerators(gens)
        tasks = self._pad([X for X, _ in data], None if ys[0] is None else ys)
        params = self._start_params(model, tasks, gens, warm)
        budget = self._n_steps(tasks) if n_steps is None else torch.full((len(data),), n_steps)
        optimizer = self._inner_optimizer(hasattr(self, "meta_init_"))
        state = optimizer.init(params, local=tuple(model.local_keys))
        divergence = self._adaptation_divergence()
        if divergence.local:
            check_local_divergence(model, divergence)  # before any work
        run = VIRun(model, divergence, optimizer, params, state, tasks,
                    n_particles=self.n_particles, generator=generator,
                    batch_size=self.batch_size, budget=budget,
                    compile=getattr(self, "compile", False) in (True, "fit"))
        return model, run, budget, extras

    def _adapted_copies(self, data, random_states=None):
        """Copies of this estimator fitted to each task of ``data``, in one batched pass.

        Task ``m``'s copy is what ``copy.deepcopy(self).fit(*data[m])`` gives (the
        same random numbers: each task's generator is seeded from its own copy of
        ``random_state``; never a warm start), but all tasks share one run of the
        engine (``task_chunk_size`` tasks at a time, if set).  The copies share this
        estimator's meta-learned state (read only).

        Parameters
        ----------
        data : list of (X, y)
            Each task's rows.
        random_states : list, default=None
            One ``random_state`` per task instead (the copies' ``random_state``).

        Returns
        -------
        estimators : list of estimator
            Fitted copies, one per task.
        """
        self._validate_params()
        self._setup_torch()
        if random_states is None:
            random_states = [self.random_state] * len(data)
        copies, validated = [], []
        for (X, y), random_state in zip(data, random_states):
            est = copy.copy(self)
            est.warm_start = False
            est.random_state = copy.deepcopy(random_state)  # not shared with self
            validated.append(est._validate_task_data(X, y, reset=True))
            copies.append(est)
        rngs = [_check_random_state(copy.deepcopy(rs)) for rs in random_states]
        states = self._fit_tasks_in_chunks(validated, rngs, estimators=copies)
        for est, state in zip(copies, states):
            est._set_fitted(state)
        return copies

    def _fit_tasks_in_chunks(self, data, rngs, *, estimators=None, quiet=False):
        """:meth:`_fit_tasks`, ``task_chunk_size`` tasks at a time; the fitted states.

        A task's result does not depend on the others, so chunking bounds
        memory (and keeps large tasks in the caches) without changing it.
        ``KeyboardInterrupt`` if the adaptation was interrupted.
        """
        if not data:
            return []
        chunk = self._task_chunk(data) or len(data)
        states = []
        for start in range(0, len(data), chunk):
            part = slice(start, start + chunk)
            got, interrupted = self._fit_tasks(
                data[part], rngs[part], quiet=quiet,
                estimators=None if estimators is None else estimators[part])
            if interrupted:
                raise KeyboardInterrupt
            states += got
        return states

    def _task_chunk(self, data):
        """``task_chunk_size`` for adapting to the validated tasks ``data``, ``"auto"`` resolved."""
        if self.task_chunk_size != "auto":
            return self.task_chunk_size
        if torch.device(self._device).type != "cpu":
            return None  # before building a model only to be told so
        n_features = data[0][0].shape[1]
        n_rows = max(X.shape[0] for X, _ in data)
        if self.batch_size is not None:
            n_rows = min(n_rows, self.batch_size)
        return auto_task_chunk(self._model(n_features), len(data), n_rows, n_features,
                               self.n_particles, dtype=self._dtype, device=self._device)

    def _start_params(self, model, tasks, generators, warm):
        """Starting q of every task: the previous fit, the learned init, or fresh draws."""
        M = tasks.n_tasks
        if warm:
            params = _tree.to_device(self.variational_params_, self._device, self._dtype)
            fresh = model.init_params(tasks, generator=_torch.make_generator(0, self._device))
            for k, v in fresh.items():
                if k not in params or params[k].shape != v.shape:
                    raise ValueError(
                        "warm_start=True but the previous fit's parameters do not match the new "
                        f"data (parameter {k!r}: {tuple(params.get(k, v).shape)} vs "
                        f"{tuple(v.shape)}). Refit with warm_start=False."
                    )
            return params
        if hasattr(self, "meta_init_"):
            init = _tree.to_device(self.meta_init_, self._device, self._dtype)
            fresh = model.init_params(tasks.index(slice(0, 1)),
                                      generator=_torch.make_generator(0, self._device))
            shared = {k: v for k, v in fresh.items() if k not in model.local_keys}
            for k in set(shared) | set(init):
                if k not in init or k not in shared or init[k].shape[1:] != shared[k].shape[1:]:
                    raise ValueError(
                        "The learned initialisation (meta_init_) does not match this "
                        f"estimator's model (parameter {k!r}: "
                        f"{tuple(init[k].shape) if k in init else 'missing'} in meta_init_ vs "
                        f"{tuple(shared[k].shape) if k in shared else 'missing'} now): the "
                        "architecture or the number of features changed since meta_fit. "
                        "Restore the settings, or meta_fit again."
                    )
            params = {k: v.expand((M,) + v.shape[1:]).clone() for k, v in init.items()}
            if model.local_keys:
                # Per-row parameters are never shared (Algorithm 2): each task's own start.
                parts = [model.init_local_params(tasks.index(slice(m, m + 1)), generator=g)
                         for m, g in enumerate(generators)]
                params.update({k: torch.cat([p[k] for p in parts]) for k in model.local_keys})
            return params
        # Each task's own generator, as in a separate fit.
        parts = [model.init_params(tasks.index(slice(m, m + 1)), generator=g)
                 for m, g in enumerate(generators)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _run_adaptation(self, run, budget, *, estimators=None, offset=0, quiet=False):
        """The shared training loop over a :class:`VIRun`, with histories and callbacks.

        After each step, every task still running gets its record
        ``{"iteration", "loss", "time"}`` (``time``: the batched step's wall time)
        and its callbacks (each task its own copies, called with
        ``estimators[m]``); a task whose callbacks ask to stop keeps its state as
        after that step while the others go on (its budget ends there), and the
        loop ends when no task is left.  Warns (``ConvergenceWarning``) when a
        task's loss ends far above where it started.

        Returns
        -------
        curves : list of list of float
            Each task's loss per completed step.
        histories : list of History
            Each task's records (iterations numbered from ``offset + 1``).
        interrupted : bool
            Whether ``KeyboardInterrupt`` stopped the loop.
        """
        M = budget.numel()
        # Per-task stops shorten the run's budget; the caller's tensor is left alone.
        run.budget = torch.as_tensor(budget).cpu().clone()
        estimators = [self] * M if estimators is None else list(estimators)
        histories = [History() for _ in range(M)]
        if quiet:
            cbs = [[] for _ in range(M)]
        else:
            # One set per task in a batched run (each stops as its own fit would).
            batched = M > 1 or estimators[0] is not self
            callbacks = getattr(self, "callbacks", None)  # estimators pickled before callbacks
            cbs = [_callbacks._resolve(callbacks, copy_objects=batched) for _ in range(M)]
        other = self._meta_fit_columns() if any(cbs) else ()
        for m in range(M):
            _callbacks._begin(cbs[m], estimators[m], "fit", History(),
                              columns=_callbacks.COLUMNS["fit"], other_columns=other)
        bounds = []
        verbose = 0 if quiet else self.verbose
        n_steps = int(budget.max()) if M else 0
        every = max(1, n_steps // 10)

        def step():
            bound = run.step()
            bounds.append(bound.detach().cpu())
            return -float(bound[0]) if bound.numel() == 1 else -float(bound.nanmean())

        def after_step(n_done, value, started):
            losses = (-bounds[-1]).tolist()
            seconds = time.perf_counter() - started
            for m in range(M):
                if n_done > int(run.budget[m]):
                    continue  # this task is done
                record = {"iteration": offset + n_done, "loss": losses[m], "time": seconds}
                histories[m].append(record)
                if cbs[m] and _callbacks._iteration_end(cbs[m], estimators[m], "fit", record):
                    run.budget[m] = n_done
            if verbose >= 2 and (n_done % every == 0 or n_done == n_steps):
                _loop.write(f"fit iteration {offset + n_done}/{offset + n_steps}: loss "
                            f"{_loop.fmt(value)} ({seconds:.3g} s)")
            return bool((run.budget <= n_done).all())

        def settings():
            return (f"inner_optimizer={run.optimizer.name!r}, inner_lr={run.optimizer.lr!r}, "
                    f"n_particles={self.n_particles!r}, divergence={run.divergence!r}")

        def summary(result):
            first = [h[0]["loss"] for h in histories if h]
            last = [h[-1]["loss"] for h in histories if h]
            what = "loss" if M == 1 else f"mean loss of {M} tasks"
            line = (f"fit: {result.n_done} iterations, {what} "
                    f"{_loop.fmt(_loop.nanmean(first))} -> {_loop.fmt(_loop.nanmean(last))}, "
                    f"{result.seconds:.3g} s")
            if result.stopped and result.n_done < n_steps:
                line += " (stopped by a callback)"
            if result.interrupted:
                line += " (interrupted)"
            if verbose >= 2:
                line += f" [{settings()}]"
            return line

        result = train_loop(step, n_steps, verbose=verbose, desc="fit", value_name="loss",
                            settings=settings, after_step=after_step, summary=summary)
        for m in range(M):
            _callbacks._end(cbs[m], estimators[m], "fit", histories[m])
        # bounds[i] belongs to a completed step (an interrupted step appends nothing).
        curve = torch.stack(bounds) if bounds else torch.zeros((0, M))
        done = torch.clamp(run.budget, max=len(bounds)).tolist()
        curves = [(-curve[: int(b), m]).tolist() for m, b in enumerate(done)]
        if not quiet and not result.interrupted:
            self._warn_blow_up(curves, run.optimizer)
        return curves, histories, result.interrupted

    def _meta_fit_columns(self, divergence=None, validation=True):
        """The columns of ``meta_fit``'s records (with this ``divergence``'s learned scalars).

        ``divergence``: the one meta-trained (default: the ``divergence``
        parameter, every parameter learnable, as ``meta_fit`` makes it);
        ``validation``: whether meta-validation runs.
        """
        if divergence is None:
            try:
                divergence = copy.deepcopy(self._resolve_divergence()).requires_grad_(True)
            except TypeError:  # fit reports a bad divergence itself
                divergence = None
        scalars = _loop.divergence_scalars(divergence) if divergence is not None else {}
        return (*_callbacks.COLUMNS["meta_fit"], *scalars,
                *(_callbacks.VALIDATION_COLUMNS if validation else ()))

    def _warn_blow_up(self, curves, optimizer):
        """``ConvergenceWarning`` for the tasks whose loss ended far above where it started."""
        bad = [(m, found) for m, found in enumerate(map(_loop.blow_up, curves)) if found]
        if not bad:
            return
        m, (first, end) = bad[0]
        who = ("the loss" if len(curves) == 1 else
               f"{len(bad)} of {len(curves)} tasks {[b for b, _ in bad][:10]}; task {m}'s loss")
        advice = (f"lower inner_lr (now {optimizer.lr:g}"
                  + ("; 'auto' is 0.01 for Adam)" if optimizer.name == "adam"
                     else ") or use inner_optimizer='adam'"))
        _warn_at_caller(
            f"fit diverged: {who} went from {first:.4g} at the first iteration to {end:.4g}, "
            f"the median of the last {_loop.END_FRACTION:.0%} of the iterations. The fitted q "
            f"is unreliable (predictions may be meaningless); the inner step size is likely "
            f"too large: {advice}.",
            ConvergenceWarning,
        )

    def _set_fitted(self, state):
        for name, value in state.items():
            setattr(self, name, value)
        self._after_fit(self._model(self.n_features_in_))

    def __sklearn_is_fitted__(self):
        # meta_fit alone does not make an estimator fitted: it has no q yet.
        return hasattr(self, "variational_params_")

    def _fitted_model(self):
        check_is_fitted(self)
        return self._model(self.n_features_in_)

    def _q_params(self, dtype=None):
        """The fitted q's parameters on ``device`` (floats in ``dtype``, default ``dtype``)."""
        return _tree.to_device(self.variational_params_, self._device, dtype or self._dtype)

