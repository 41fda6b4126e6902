"""Meta-training of the estimators: Algorithms 1 and 2 behind ``meta_fit``.

``meta_fit`` (:class:`~skmetavi.estimators._base._BaseMetaVI`) validates the
data and the task labels, splits every task into support rows (inner loop) and
query rows (meta-loss), and hands the torch tasks to ``_meta_fit``, which
builds the engine's :class:`~skmetavi._bilevel.MetaTrainer` and runs it in the
shared training loop (progress bar, Ctrl-C, checkpoints).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import hashlib
import warnings

import numpy as np
import scipy.sparse as sp

from skmetavi import _checkpoint, _tree
from skmetavi._bilevel import CallableMetaLoss, MetaTrainer, PredictiveNLL, QuadratureLoss
from skmetavi._inner import check_local_divergence
from skmetavi._validation import _stable_repr
from skmetavi.estimators._loop import train_loop

META_LOSS_NAMES = ("auto", "d_half", "tv", "nll")


class MetaFitMixin:
    """Meta-training internals and state of :class:`~skmetavi.estimators._base._BaseMetaVI`."""

    # ------------------------------------------------------------ hooks
    def _transform_meta_targets(self, y, support_idx, query_idx):
        """Per-task transformation of ``y`` before meta-training (identity here)."""
        return y

    def _holds_out_rows(self, model):
        """Whether the meta-loss is evaluated on held-out (query) rows of each task.

        True for models with a per-row likelihood (held-out predictive meta-loss).
        """
        return model.has_likelihood

    def _support_query(self, model, index, rng):
        """Split each task's rows into support (inner loop) and query (meta-loss).

        Only where :meth:`_holds_out_rows`; otherwise both parts are the whole task.
        """
        if not self._holds_out_rows(model):
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

    def _make_meta_loss(self, model, tasks, meta_loss=None):
        """Resolve ``meta_loss`` (default: the parameter) into ``(model, params, tasks)``."""
        meta_loss = self.meta_loss if meta_loss is None else meta_loss
        if callable(meta_loss):
            return CallableMetaLoss(meta_loss)
        if meta_loss == "auto":
            meta_loss = "nll" if model.has_likelihood else "d_half"
        if meta_loss == "nll":
            if not model.has_likelihood:
                raise ValueError(
                    "meta_loss='nll' needs a model with a per-row likelihood; "
                    f"{type(model.target).__name__} has none. Use 'd_half' or 'tv' "
                    "(1-D targets) or a callable meta_loss."
                )
            return PredictiveNLL(n_particles=self.n_particles)
        n_latent = model.n_latent
        if n_latent != 1:
            raise ValueError(
                f"meta_loss={meta_loss!r} is computed by quadrature and needs a 1-D latent "
                f"variable, but this model has n_latent={n_latent}. Use 'nll' or a callable."
            )
        low_high = getattr(self, "quadrature_range", None)
        if low_high is None:
            low_high = model.quadrature_range(tasks)
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

    def _meta_divergence(self, warm):
        """The divergence to meta-learn: the previous result (warm start) or a fresh one."""
        divergence = copy.deepcopy(self.meta_divergence_) if warm else self._resolve_divergence()
        # Every nn.Parameter of the divergence is a meta-parameter (a divergence frozen by
        # an earlier fit, e.g. ``est.divergence_``, is learnable again here).
        divergence = divergence.to(self._device, self._dtype).requires_grad_(True)
        if not divergence.learnable and not self.meta_learn_init:
            raise ValueError(
                f"Nothing to meta-learn: divergence {divergence!r} has no learnable "
                "parameters and meta_learn_init=False. Use a learnable divergence "
                "('renyi', 'neural_f', Renyi(learnable=True)) or meta_learn_init=True."
            )
        return divergence

    def _meta_trainer(self, model, support, query, generator, divergence):
        """The engine's outer loop for these tasks and this estimator's settings."""
        if divergence.local:
            check_local_divergence(model, divergence)  # before any work
        return MetaTrainer(
            model, divergence, self._inner_optimizer(self.meta_learn_init),
            self._make_meta_loss(model, support), support, query,
            init_params=model.init_params(support, generator=generator),
            learn_init=self.meta_learn_init,
            n_inner_steps=self.n_inner_steps, n_particles=self.n_particles,
            n_tasks_per_batch=self.n_tasks_per_batch, meta_lr=self.meta_lr,
            init_lr=self.init_lr, mode=self.meta_gradient, truncate=self.truncate,
            batch_size=self.batch_size, generator=generator, max_grad_norm=self.max_grad_norm,
            task_chunk_size=self.task_chunk_size, implicit_steps=self.implicit_max_iter,
            implicit_tol=self.implicit_tol, implicit_damping=self.implicit_damping,
            multi_step_loss=(self.meta_learn_init if self.multi_step_loss == "auto"
                             else self.multi_step_loss),
        )

    def _meta_fit(self, model, support, query, generator, validation, labels, *, checkpoint,
                  checkpoint_every, fingerprint):
        """Algorithms 1 and 2 on torch tasks, in the shared training loop."""
        warm = self.warm_start and hasattr(self, "_meta_state")
        divergence = self._meta_divergence(warm)
        trainer = self._meta_trainer(model, support, query, generator, divergence)
        if warm:
            self._load_meta_state(trainer, labels)
            if validation is not None and self._meta_state.get("validation") is not None:
                validation.load_state_dict(self._meta_state["validation"], trainer.divergence)
        # This call runs until outer iteration `target` (warm_start adds max_meta_iter).
        target = trainer.n_iter + self.max_meta_iter
        if checkpoint is not None:
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
                if validation is not None and start.get("validation") is not None:
                    validation.load_state_dict(start["validation"], trainer.divergence)

        def save():
            state = {**trainer.state_dict(), "target_iter": target}
            if validation is not None:
                state["validation"] = validation.state_dict()
            _checkpoint.save(checkpoint, state, fingerprint)

        def after_step(_):
            if validation is not None and validation.due(trainer.n_iter, trainer.n_iter == target):
                validation.evaluate(trainer)
            if checkpoint is not None and trainer.n_iter % checkpoint_every == 0:
                save()

        # An interrupt inside trainer.step() may leave the iteration half applied (e.g.
        # eta updated, phi_i not yet stored), a state no uninterrupted run passes
        # through: it is kept in memory but never written to the checkpoint, so that
        # resuming stays exact.
        result = train_loop(
            trainer.step, max(0, target - trainer.n_iter), verbose=self.verbose,
            desc="meta_fit", value_name="meta_loss", after_step=after_step,
            settings=lambda: (
                f"inner_optimizer={trainer.inner_optimizer.name!r}, "
                f"inner_lr={trainer.inner_optimizer.lr!r}, meta_lr={self.meta_lr!r}, n_inner_steps={self.n_inner_steps!r}, "
                f"max_grad_norm={self.max_grad_norm!r}"
            ),
        )
        if checkpoint is not None and not result.in_step:
            save()
        self._store_meta_state(trainer, labels, validation)
        if result.interrupted:
            where = (
                f"the checkpoint {str(checkpoint)!r} holds the last completed checkpoint "
                "iteration; "
                if checkpoint is not None and result.in_step
                else ""
            )
            warnings.warn(
                f"meta_fit interrupted after {trainer.n_iter} outer iterations; the estimator "
                f"keeps the progress so far ({where}meta_fit with warm_start=True continues "
                "from it).",
                RuntimeWarning,
                stacklevel=3,
            )
        return self

    # ---------------------------------------------------------- state
    def _fingerprint(self, X, y, groups):
        """Hash of the data and of every parameter that changes the meta-training run."""
        h = hashlib.sha256()
        for arr in (X, y, np.asarray(groups)):
            if sp.issparse(arr):  # its stored entries (a rating matrix), not a dense copy
                h.update(str(("sparse", arr.shape)).encode())
                for part in (arr.indptr, arr.indices, arr.data):
                    h.update(np.ascontiguousarray(part).tobytes())
            elif arr is not None:
                arr = np.ascontiguousarray(arr)
                h.update(str((arr.dtype.str, arr.shape)).encode())
                h.update(arr.tobytes() if arr.dtype.kind != "O" else repr(arr.tolist()).encode())
        skip = {"verbose", "max_meta_iter", "warm_start", "max_iter", "device", "task_chunk_size"}
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in skip}
        h.update(repr(sorted((k, _stable_repr(v)) for k, v in params.items())).encode())
        return h.hexdigest()

    def _store_meta_state(self, trainer, labels, validation=None):
        self.meta_divergence_ = copy.deepcopy(trainer.divergence).to("cpu")
        if trainer.learn_init:
            self.meta_init_ = _tree.to_device(trainer.init_params, "cpu")
        elif hasattr(self, "meta_init_"):
            del self.meta_init_
        for name in ("validation_scores_", "validation_kl_scores_", "validation_iterations_",
                     "best_validation_score_", "best_meta_iter_", "validation_choice_"):
            if hasattr(self, name):
                delattr(self, name)
        if validation is not None and validation.best is not None:
            # The candidate that adapted best to the held-out tasks (KL included).
            best = validation.best
            self.meta_divergence_ = copy.deepcopy(best["divergence"]).to("cpu")
            if best["init"] is not None:
                self.meta_init_ = _tree.to_device(best["init"], "cpu")
            self.validation_iterations_ = np.asarray(validation.iterations)
            self.validation_scores_ = np.asarray(validation.scores, dtype=float)
            self.validation_kl_scores_ = np.asarray(validation.kl_scores, dtype=float)
            self.best_validation_score_ = best["score"]
            self.best_meta_iter_ = best["iteration"]
            self.validation_choice_ = best["kind"]
        self.meta_loss_curve_ = np.asarray(trainer.loss_curve, dtype=float)
        self.n_meta_iter_ = trainer.n_iter
        self.meta_tasks_ = labels
        # The full trainer state, so that warm_start continues exactly; on the CPU
        # like all fitted state (the meta-optimiser's Adam moments live on `device`).
        self._meta_state = trainer.state_dict()
        self._meta_state["learn_init"] = trainer.learn_init
        self._meta_state["validation"] = None if validation is None else validation.state_dict()

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
                "groups, or set warm_start=False."
            )
        try:
            trainer.load_state_dict(state)
        except (RuntimeError, KeyError, IndexError) as exc:
            raise ValueError(
                "warm_start=True but the previous meta_fit state does not match the new "
                f"training tasks or settings ({exc}). Use the same X and groups, or set "
                "warm_start=False."
            ) from exc
