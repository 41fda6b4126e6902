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
import time

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from skmetavi import _checkpoint, _tree
from skmetavi import callbacks as _callbacks
from skmetavi._bilevel import CallableMetaLoss, MetaTrainer, PredictiveNLL, QuadratureLoss
from skmetavi._inner import check_local_divergence
from skmetavi._validation import _hash_arrays, _stable_repr
from skmetavi.callbacks import History
from skmetavi.estimators import _loop
from skmetavi.estimators._loop import train_loop
from skmetavi.exceptions import _warn_at_caller

META_LOSS_NAMES = ("auto", "d_half", "tv", "nll")
#: A divergence whose parameter vector moved by more than this (relative) over a meta_fit
#: that diverged is named as the first cause; below it, the per-task q's (Algorithm 1).
#: Measured: the Renyi BNN of 10 sinusoid tasks whose query NLL blows up through its q's
#: moves raw_alpha by 11% (alpha 0.5 -> 0.52); meta_lr=1e-6 blows up the same.
SHIFT_LARGE = 0.25


class MetaFitMixin:
    """Meta-training internals and state of :class:`~skmetavi.estimators._base._BaseMetaVI`."""

    # ------------------------------------------------------------ hooks
    def _transform_meta_targets(self, y, support_idx, query_idx):
        """Per-task transformation of ``y`` before meta-training (identity here)."""
        return y

    def _holds_out_rows(self, model):
        """Whether the meta-loss is evaluated on held-out (query) rows of each task.

        The rule: rows are held out when the meta-loss scores data and the rows
        are observations of the task.  That is every meta-loss of a model with a
        per-row likelihood (whose rows are observations by construction), and a
        callable ``meta_loss`` on a model whose rows are exchangeable observations
        (``exchangeable_rows``: a :class:`~skmetavi.models.CallableTarget`, not the
        components of a mixture).  Quadrature meta-losses of likelihood-free
        targets compare q with the whole target and see all rows.  Meta-validation
        splits its tasks by the same rule (:meth:`_support_query`).
        """
        if model.has_likelihood:
            return True
        return callable(getattr(self, "meta_loss", None)) and bool(model.exchangeable_rows)

    def _support_query(self, model, index, rng):
        """Split each task's rows into support (inner loop) and query (meta-loss).

        ``query_fraction`` of every task's rows (rounded, at least one, and one row
        left to the support) are the query; only where :meth:`_holds_out_rows`,
        otherwise both parts are the whole task (the same list, not a copy).
        """
        if not self._holds_out_rows(model):
            return index, index
        support, query = [], []
        for t, rows in enumerate(index):
            if rows.shape[0] < 2:
                hint = "" if model.has_likelihood else (
                    "; if the rows are not observations of the task, a callable meta_loss "
                    "sees all of them with model=CallableTarget(fn, n_latent, "
                    "exchangeable_rows=False)"
                )
                raise ValueError(
                    f"Task {t} has {rows.shape[0]} row(s); the held-out meta-loss needs at "
                    "least 2 rows per task (one support, one query). Merge small tasks or "
                    f"use more data per task{hint}."
                )
            perm = rng.permutation(rows)
            n_rows = rows.shape[0]
            n_query = min(n_rows - 1, max(1, int(round(self.query_fraction * n_rows))))
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

    def _learns_init(self):
        """``meta_learn_init`` resolved: ``"auto"`` learns the init iff the divergence cannot learn.

        The default ``divergence="kl"`` has no parameters, so ``meta_fit`` with all
        defaults runs Algorithm 2 (the paper's VI&phi) rather than learning nothing.
        """
        if self.meta_learn_init != "auto":
            return bool(self.meta_learn_init)
        return not self._resolve_divergence().learnable

    def _meta_divergence(self, warm):
        """The divergence to meta-learn: the previous result (warm start) or a fresh one."""
        divergence = copy.deepcopy(self.meta_divergence_) if warm else self._resolve_divergence()
        # Every nn.Parameter of the divergence is a meta-parameter (a divergence frozen by
        # an earlier fit, e.g. ``est.divergence_``, is learnable again here).
        divergence = divergence.to(self._device, self._dtype).requires_grad_(True)
        if not divergence.learnable and not self._learns_init():
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
            model, divergence, self._inner_optimizer(self._learns_init()),
            self._make_meta_loss(model, support), support, query,
            init_params=model.init_params(support, generator=generator),
            learn_init=self._learns_init(),
            n_inner_steps=self.n_inner_steps, n_particles=self.n_particles,
            n_tasks_per_batch=self.n_tasks_per_batch, meta_lr=self.meta_lr,
            init_lr=self.init_lr, mode=self.meta_gradient, truncate=self.truncate,
            batch_size=self.batch_size, generator=generator, max_grad_norm=self.max_grad_norm,
            task_chunk_size=self.task_chunk_size, implicit_steps=self.implicit_max_iter,
            implicit_tol=self.implicit_tol, implicit_damping=self.implicit_damping,
            multi_step_loss=(self._learns_init() if self.multi_step_loss == "auto"
                             else self.multi_step_loss),
            compile=getattr(self, "compile", False) in (True, "meta_fit"),
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
                validation.load_state_dict(copy.deepcopy(self._meta_state["validation"]),
                                           trainer.divergence)
        # This call runs until outer iteration `target` (warm_start adds max_meta_iter).
        target = trainer.n_iter + self.max_meta_iter
        # One record per outer iteration, 1..n_iter (a warm start continues the previous
        # meta_fit's); the records of this call start at index `call_start`.
        history = History(getattr(self, "meta_history_", ())) if warm else History()
        call_start = trainer.n_iter
        # Whether a callback ended the run before `target` (after its last record).
        stopped = False
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
                stopped = bool(start.get("stopped", False))
                if validation is not None and start.get("validation") is not None:
                    validation.load_state_dict(start["validation"], trainer.divergence)
                history = History(start.get("history", ()))
                call_start = start.get("call_start", 0)
        history = _reconcile_history(history, trainer)
        callbacks = _callbacks._resolve(getattr(self, "callbacks", None))
        columns = dict(columns=self._meta_fit_columns(trainer.divergence, validation is not None),
                       other_columns=_callbacks.COLUMNS["fit"])
        own = history[call_start:]
        if stopped and own:
            # A callback ended the checkpointed run after its last record; the early stop is
            # no property of the run's target: this call's callbacks see the records up to
            # it as an uninterrupted run would, decide again on it, and unless they stop
            # there too the run continues to max_meta_iter.
            _callbacks._begin(callbacks, self, "meta_fit", own[:-1], **columns)
            stopped = _callbacks._iteration_end(callbacks, self, "meta_fit", own[-1])
        else:
            _callbacks._begin(callbacks, self, "meta_fit", own, **columns)
        verbose = self.verbose
        scalars_before = _loop.divergence_scalars(trainer.divergence)
        eta_before = _flat(trainer.eta)

        def save():
            state = {**trainer.state_dict(), "target_iter": target, "stopped": stopped,
                     "history": [dict(r) for r in history], "call_start": call_start}
            if validation is not None:
                state["validation"] = validation.state_dict()
            _checkpoint.save(checkpoint, state, fingerprint)

        def validate(record):
            scores = validation.evaluate(trainer)
            seconds = record.pop("time", None)
            record["validation_score"], record["validation_kl_score"] = scores
            if seconds is not None:
                record["time"] = seconds
            return scores

        def after_step(n_done, value, started):
            nonlocal stopped
            record = {"iteration": trainer.n_iter, "meta_loss": float(value),
                      **_loop.divergence_scalars(trainer.divergence)}
            validated = validation is not None and validation.due(trainer.n_iter,
                                                                  trainer.n_iter == target)
            if validated:
                validate(record)
            record["time"] = time.perf_counter() - started
            history.append(record)
            stop = _callbacks._iteration_end(callbacks, self, "meta_fit", record)
            if stop and trainer.n_iter < target:
                stopped = True
                if validation is not None and not validated:
                    # The run ends here: its last iteration is validated, as at target.
                    validate(record)
                    validated = True
                    record["time"] = time.perf_counter() - started
            if verbose >= 2 and validated:
                _loop.write(_record_line(record, validation.best))
            if checkpoint is not None and trainer.n_iter % checkpoint_every == 0:
                save()
            return stop

        def postfix():
            if verbose < 2:
                return {}
            return {k: _loop.fmt(v) for k, v in history[-1].items()
                    if k not in ("iteration", "meta_loss", "time")}

        def summary(result):
            own = history[call_start:]
            line = f"meta_fit: {result.n_done} outer iterations"
            if own:
                line += (f" ({own[0]['iteration']}-{own[-1]['iteration']}), meta_loss "
                         f"{_loop.fmt(own[0]['meta_loss'])} -> {_loop.fmt(own[-1]['meta_loss'])}")
                for name, before in scalars_before.items():
                    line += f", {name} {_loop.fmt(before)} -> {_loop.fmt(own[-1].get(name))}"
            if validation is not None and validation.best is not None:
                best = validation.best
                line += (f", best validation score {_loop.fmt(best['score'])} ({best['kind']}, "
                         f"iteration {best['iteration']})")
            line += f", {result.seconds:.3g} s"
            if stopped:
                line += " (stopped by a callback)"
            if result.interrupted:
                line += " (interrupted)"
            if verbose >= 2:
                line += f" [{settings()}]"
            return line

        def settings():
            return (f"inner_optimizer={trainer.inner_optimizer.name!r}, "
                    f"inner_lr={trainer.inner_optimizer.lr!r}, meta_lr={self.meta_lr!r}, "
                    f"n_inner_steps={self.n_inner_steps!r}, max_grad_norm={self.max_grad_norm!r}")

        # An interrupt inside trainer.step() may leave the iteration half applied (e.g.
        # eta updated, phi_i not yet stored), a state no uninterrupted run passes
        # through: it is kept in memory but never written to the checkpoint, so that
        # resuming stays exact.
        result = train_loop(
            trainer.step, 0 if stopped else max(0, target - trainer.n_iter), verbose=verbose,
            desc="meta_fit", value_name="meta_loss", after_step=after_step,
            settings=settings, postfix=postfix, summary=summary,
        )
        # An iteration completed inside an interrupted step has no record yet.
        history = _reconcile_history(history, trainer)
        _callbacks._end(callbacks, self, "meta_fit", history[call_start:])
        if checkpoint is not None and not result.in_step:
            save()
        self._store_meta_state(trainer, labels, validation, history)
        if result.interrupted:
            where = (
                f"the checkpoint {str(checkpoint)!r} holds the last completed checkpoint "
                "iteration; "
                if checkpoint is not None and result.in_step
                else ""
            )
            kept = ""
            if validation is not None:
                # No validation after Ctrl-C: the user asked for control back now.
                kept = (" No meta-validation ran before the interrupt: the kept divergence is "
                        "the last iteration's, unvalidated." if validation.best is None else
                        f" The interrupted iteration was not validated: the kept candidate is "
                        f"the best validated one (iteration {validation.best['iteration']}).")
            _warn_at_caller(
                f"meta_fit interrupted after {trainer.n_iter} outer iterations; the estimator "
                f"keeps the progress so far ({where}meta_fit with warm_start=True continues "
                f"from it).{kept}",
                RuntimeWarning,
            )
        else:
            self._warn_meta_blow_up(
                trainer.loss_curve[call_start:], trainer.learn_init,
                inner_curve=trainer.inner_loss_curve[call_start:],
                shift=_relative_shift(eta_before, _flat(trainer.eta)),
                scalars=(scalars_before, _loop.divergence_scalars(trainer.divergence)),
                inner_lr=trainer.inner_optimizer.lr, learnable=bool(trainer.eta),
            )
        return self

    def _meta_blow_up_hint(self):
        """A model-specific sentence for the divergence warning of Algorithm 1 (none here)."""
        return ""

    def _warn_meta_blow_up(self, curve, learn_init, *, inner_curve=(), shift=None,
                           scalars=({}, {}), inner_lr=None, learnable=True):
        """``ConvergenceWarning`` when this call's meta-loss ended far above where it started.

        The advice names the likely causes, most likely first, from what the run
        shows: how far the divergence's parameters moved (``shift``: relative
        change of their vector; ``scalars``: their named values before and after)
        and whether the inner loss on the support rows (``inner_curve``) fell
        while the meta-loss on the query rows rose.  Without ``learnable``
        parameters the divergence is no cause.
        """
        found = _loop.blow_up(curve)
        if found is None:
            return
        first, end = found
        clip = ("" if self.max_grad_norm is not None
                else " or clip the meta-gradients (max_grad_norm=1.0)")
        named = ", ".join(f"{k} {_loop.fmt(v)} -> {_loop.fmt(scalars[1].get(k))}"
                          for k, v in scalars[0].items())
        moved = "" if shift is None else (
            f"its parameters moved by {shift:.0%}" + (f" ({named})" if named else ""))
        large = shift is None or shift > SHIFT_LARGE

        def divergence_cause(first_cause):
            why = moved if first_cause or not moved else f"less likely, as {moved}"
            return (f"the divergence's meta-step{': ' + why if why else ''}; lower meta_lr "
                    f"(now {self.meta_lr:g}){clip}")

        lr = "" if inner_lr is None else f" (now {inner_lr:g})"
        inner = None if learn_init else _loop.trend(inner_curve)
        if learn_init:
            # Every task restarts from the learned initialisation: no q persists.
            q_cause = ("the learned initialisation's meta-step; lower init_lr (now "
                       f"{self.init_lr:g})")
        elif inner is not None and inner[1] > inner[0]:
            q_cause = (f"the inner steps: the per-task q's own inner loss rose too "
                       f"({inner[0]:.4g} -> {inner[1]:.4g} per support row); lower inner_lr{lr}")
        else:
            fell = ("" if inner is None else
                    f", and their inner loss went down ({inner[0]:.4g} -> {inner[1]:.4g} per "
                    "support row) while the meta-loss on the query rows rose")
            q_cause = (
                "the per-task q's of Algorithm 1: they persist across outer iterations and "
                f"take more inner steps on the same support rows each time{fell}, i.e. they "
                "fit their support rows and predict their query rows ever worse (an "
                "over-confident predictive, e.g. on query rows outside the support rows' "
                f"range). {self._meta_blow_up_hint()}More support rows per task (a smaller "
                "query_fraction, more rows) or meta_learn_init=True avoid it; "
                "validation_fraction keeps the best validated candidate and "
                f"EarlyStopping('meta_loss') stops earlier; a smaller inner_lr{lr} only "
                "delays it, and meta_lr does not help"
            )
        causes = ([divergence_cause(True), q_cause] if large
                  else [q_cause, divergence_cause(False)])
        if not learnable:
            causes = [q_cause]
        listed = " ".join(f"({i}) {c}." for i, c in enumerate(causes, start=1))
        _warn_at_caller(
            f"meta_fit diverged: the meta-loss went from {first:.4g} at the first outer "
            f"iteration to {end:.4g}, the median of the last {_loop.END_FRACTION:.0%} of the "
            f"outer iterations. Likely causes, most likely first: {listed}",
            ConvergenceWarning,
        )

    # ---------------------------------------------------------- state
    def _fingerprint(self, X, y, groups):
        """Hash of the data and of every parameter that changes the meta-training run."""
        h = _hash_arrays(hashlib.sha256(), (X, y, np.asarray(groups)))
        skip = {"verbose", "max_meta_iter", "warm_start", "max_iter", "device", "task_chunk_size",
                "callbacks"}
        params = {k: v for k, v in self.get_params(deep=False).items() if k not in skip}
        h.update(repr(sorted((k, _stable_repr(v)) for k, v in params.items())).encode())
        return h.hexdigest()

    def _store_meta_state(self, trainer, labels, validation=None, history=None):
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
        self.meta_history_ = _reconcile_history(History(history or ()), trainer)
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
            # A copy: torch optimisers keep references to the tensors they load, and a
            # failed call must leave the stored state as it was.
            trainer.load_state_dict(copy.deepcopy(state))
        except (RuntimeError, KeyError, IndexError) as exc:
            raise ValueError(
                "warm_start=True but the previous meta_fit state does not match the new "
                f"training tasks or settings ({exc}). Use the same X and groups, or set "
                "warm_start=False."
            ) from exc


def _flat(parameters):
    """The parameters as one detached CPU vector (None if there are none)."""
    parameters = [p.detach().reshape(-1).cpu() for p in parameters]
    return torch.cat(parameters) if parameters else None


def _relative_shift(before, after):
    """``|after - before| / max(|before|, 1e-3)``, None without parameters."""
    if before is None or after is None:
        return None
    scale = max(float(before.norm()), 1e-3)
    return float((after - before).norm()) / scale


def _reconcile_history(history, trainer):
    """``history`` with exactly one record per outer iteration ``1..trainer.n_iter``.

    Iterations without a record (completed inside an interrupted step, or a
    checkpoint or state written before histories existed) get one from the
    meta-loss curve.
    """
    records = [r for r in history if r.get("iteration", 0) <= trainer.n_iter]
    curve = trainer.loss_curve
    for i in range(len(records), trainer.n_iter):
        records.append({"iteration": i + 1,
                        "meta_loss": float(curve[i]) if i < len(curve) else float("nan")})
    return History(records)


def _record_line(record, best):
    """A verbose=2 line for a validated outer iteration."""
    extra = "".join(f", {k} {_loop.fmt(v)}" for k, v in record.items()
                    if k not in ("iteration", "meta_loss", "time", "validation_score",
                                 "validation_kl_score"))
    line = (f"meta_fit iteration {record['iteration']}: meta_loss "
            f"{_loop.fmt(record['meta_loss'])}{extra}, validation score "
            f"{_loop.fmt(record['validation_score'])} (KL "
            f"{_loop.fmt(record['validation_kl_score'])})")
    if best is not None:
        line += f"; best {_loop.fmt(best['score'])} ({best['kind']}, iteration {best['iteration']})"
    return line
