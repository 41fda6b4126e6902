"""The outer loop of Algorithms 1 (Meta-D) and 2 (Meta-D&phi) of Zhang et al. (2021)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
import warnings

import torch

from skmetavi import _distributed, _tree
from skmetavi._allocator import adapt_heap
from skmetavi._implicit import implicit_meta_gradient
from skmetavi._inner import NonFiniteError, finite_params, inner_loop
from skmetavi._optim import Adam
from skmetavi._strategies import LearnedInit, PersistentTaskParams
from skmetavi._tasks import NoiseCache, TaskNoise, auto_task_chunk

__all__ = ["MetaTrainer"]

#: Consecutive outer iterations with an all-zero divergence meta-gradient before a warning.
ZERO_GRADIENT_PATIENCE = 5


def _inner_loss(bound, support) -> float:
    """The sum over tasks of the negative bound per support row (as the meta-loss, per row)."""
    return -float((bound / support.n_rows.to(bound.dtype).clamp(min=1)).sum())


def _is_zero(grads) -> bool:
    """Whether every meta-gradient is (numerically) zero: below 1e-12 relative to its parameter."""
    return all(
        g is None or bool((g.abs() <= 1e-12 * (1.0 + p.detach().abs())).all()) for p, g in grads
    )


class MetaTrainer:
    """Outer loop of Algorithm 1 (Meta-D) or Algorithm 2 (Meta-D&phi).

    Algorithm 1 keeps one variational parameter set phi_i per training task
    across outer iterations (:class:`~skmetavi._strategies.PersistentTaskParams`);
    Algorithm 2 (``learn_init=True``) starts every sampled task from a shared,
    meta-learned initialisation (:class:`~skmetavi._strategies.LearnedInit`).
    Each outer iteration samples ``n_tasks_per_batch`` tasks, takes
    ``n_inner_steps`` differentiable inner steps for all of them at once,
    evaluates the meta-loss J on their query rows and updates eta (Adam, step
    size ``meta_lr``, gamma) and for Algorithm 2 the initialisation (Adam,
    ``init_lr``, tau).

    Parameters
    ----------
    model : LatentModel
    divergence : Divergence
        Its parameters that require grad are eta.
    inner_optimizer : SGD or Adam
    meta_loss : callable
        ``(model, params, tasks, generator) -> (M,)``.
    support, query : TaskBatch
        Rows of every training task for the inner loop and for the meta-loss.
    init_params : dict of torch.Tensor of shape (n_tasks, ...)
    learn_init : bool
    mode : {"full", "first_order", "truncated", "implicit"}
    implicit_steps, implicit_tol, implicit_damping
        GMRES products, relative tolerance and relative damping of the implicit
        mode (:mod:`skmetavi._implicit`).
    fixed_noise : bool
        The same noise at every draw (deterministic inner problems, for tests).
    multi_step_loss : bool, default=False
        J is the mean of the meta-loss before the inner loop and after each of its
        steps (MAML++'s multi-step loss), not only after the last: a learned
        initialisation then also predicts well before and while it adapts.
    task_chunk_size : int, "auto" or None, default=None
        Tasks per chunk of an outer iteration (meta-gradients accumulated over
        the chunks; the same result); ``"auto"``:
        :func:`~skmetavi._tasks.auto_task_chunk` (smaller chunks of one size
        for a compiled iteration); None: all at once.
    process_group : torch.distributed group, default=None
        Shard the sampled tasks over the processes of an initialised group.
    compile : bool, default=False
        Take each chunk's differentiable inner steps and meta-loss as one
        ``torch.compile`` graph of their meta-gradient
        (:class:`skmetavi._compiled_meta.CompiledMetaStep`) where the
        configuration allows it; otherwise, or if compiling fails, eagerly
        with a ``RuntimeWarning``.
    """

    def __init__(
        self,
        model,
        divergence,
        inner_optimizer,
        meta_loss,
        support,
        query,
        *,
        init_params,
        learn_init,
        n_inner_steps=1,
        n_particles=100,
        n_tasks_per_batch=16,
        meta_lr=1e-2,
        init_lr=1e-2,
        mode="full",
        truncate=None,
        batch_size=None,
        generator,
        max_failures=10,
        max_grad_norm=None,
        task_chunk_size=None,
        implicit_steps=100,
        implicit_damping=1e-8,
        implicit_tol=1e-5,
        fixed_noise=False,
        process_group=None,
        multi_step_loss=False,
        compile=False,
    ):
        if mode == "implicit" and learn_init:
            raise ValueError(
                "meta_gradient='implicit' differentiates through a fixed point of the inner "
                "loop, which does not depend on the initialisation: it cannot learn one "
                "(meta_learn_init=True). Use 'full', 'truncated' or 'first_order'."
            )
        if mode == "implicit" and batch_size is not None:
            raise ValueError(
                "meta_gradient='implicit' differentiates through a fixed point of the inner "
                "loop, which needs the same full-batch problem at every inner step; "
                f"batch_size={batch_size} draws another minibatch each step. Use "
                "batch_size=None, or meta_gradient='truncated' for bounded memory."
            )
        self.model, self.divergence = model, divergence
        self.inner_optimizer, self.meta_loss = inner_optimizer, meta_loss
        self.support, self.query = support, query
        self.n_inner_steps, self.n_particles = n_inner_steps, n_particles
        self.n_tasks_per_batch = n_tasks_per_batch
        self.mode, self.truncate, self.batch_size = mode, truncate, batch_size
        self.generator, self.max_failures = generator, max_failures
        self.max_grad_norm = max_grad_norm
        self._task_chunk_size = task_chunk_size  # "auto": resolved below
        self.implicit_steps, self.implicit_tol = implicit_steps, implicit_tol
        self.implicit_damping = implicit_damping
        self.fixed_noise = fixed_noise
        self.multi_step_loss = multi_step_loss
        self.process_group = process_group
        self.rank, self.world_size = _distributed.rank_and_world(process_group)
        self.n_tasks = support.n_tasks
        self.eta = [p for p in divergence.parameters() if p.requires_grad]
        self.meta_optimizer = torch.optim.Adam(self.eta, lr=meta_lr) if self.eta else None
        if learn_init:
            self.strategy = LearnedInit(init_params, inner_optimizer, model, init_lr)
        else:
            self.strategy = PersistentTaskParams(init_params, inner_optimizer,
                                                 getattr(model, "local_keys", ()))
        self.n_iter = 0
        self.failures = 0
        self.loss_curve = []
        # Mean over the sampled tasks of the inner loss (negative bound per support row) at
        # the last inner step, per outer iteration: the support-row fit, beside the meta-loss.
        self.inner_loss_curve = []
        self.implicit_residuals = []
        self._zero_grad_run = 0
        self._warned = set()
        self._compiled = None
        adapt_heap(support.X.device)  # once per process: glibc reuses the freed buffers
        if compile:
            from skmetavi._compiled_meta import CompiledMetaStep, unsupported_reason

            reason = unsupported_reason(self)
            if reason is None:
                self._compiled = CompiledMetaStep(self)
            else:
                warnings.warn(f"compile is not supported for this meta-iteration: {reason}; "
                              "it runs eagerly.", RuntimeWarning, stacklevel=2)
        self._auto_chunk = task_chunk_size == "auto"
        if self._auto_chunk:
            self._resolve_auto_chunk()

    @property
    def task_chunk_size(self):
        """Tasks per chunk (None: all of this process's tasks at once)."""
        return self._task_chunk_size

    @task_chunk_size.setter
    def task_chunk_size(self, value):
        self._task_chunk_size, self._auto_chunk = value, False  # the user's choice from now on

    def _resolve_auto_chunk(self):
        """``task_chunk_size="auto"``: from the widest of the inner steps (support rows, or
        their minibatch) and the meta-loss (all query rows), for this process's share of a
        batch; smaller chunks for a compiled iteration (eager ones again if compiling fails)."""
        X, bs = self.support.X, self.batch_size
        n_rows = max(X.shape[1] if bs is None else min(bs, X.shape[1]), self.query.X.shape[1])
        M = min(self.n_tasks_per_batch, self.support.n_tasks)
        n_mine = max(1, _distributed.shard(M, self.rank, self.world_size).numel())
        self._task_chunk_size = auto_task_chunk(
            self.model, n_mine, n_rows, X.shape[-1], self.n_particles, dtype=X.dtype,
            device=X.device, compiled=self._compiled is not None)

    # ----------------------------------------------------------- views
    learn_init = property(lambda self: self.strategy.learn_init)
    init_params = property(lambda self: self.strategy.init_params)
    init_optimizer = property(lambda self: self.strategy.optimizer)
    task_params = property(lambda self: self.strategy.task_params)
    task_state = property(lambda self: self.strategy.task_state)

    @property
    def differentiable(self):
        return self.meta_optimizer is not None or self.learn_init

    def _optimizers(self):
        return [o for o in (self.meta_optimizer, self.init_optimizer) if o is not None]

    def _sample_tasks(self):
        M = min(self.n_tasks_per_batch, self.n_tasks)
        if M == self.n_tasks:
            return torch.arange(self.n_tasks)
        return torch.randperm(self.n_tasks, generator=self.generator)[:M]

    # ------------------------------------------------------------ step
    def _check_configuration(self):
        """Warn once when the configuration cannot give the divergence a meta-gradient."""
        if (self.eta and self.learn_init and self.n_inner_steps == 1
                and isinstance(self.inner_optimizer, Adam)):
            # Every task starts from a fresh Adam, whose only step is lr * sign(direction).
            self._warn_once(
                "zero_gradient",
                "With a learned initialisation (Algorithm 2), inner_optimizer='adam' and "
                "n_inner_steps=1 the divergence gets no meta-gradient: every task starts from a "
                "fresh Adam, whose first step, lr * sign(direction), does not depend on the "
                "divergence's weights (measured: d J / d alpha ~ 1e-17). Only the "
                "initialisation is learned. Use inner_optimizer='sgd' (the paper's update) or "
                "n_inner_steps >= 2.",
                stacklevel=4,
            )

    def step(self) -> float:
        """One outer iteration; returns the mean meta-loss J (NaN if rolled back)."""
        self._check_configuration()
        # Alg. 1/2, line 3: sample a batch of M tasks.
        idx = self._sample_tasks()
        M = idx.numel()
        # One seed per outer iteration: every task's noise is the same however the batch
        # is chunked or sharded across processes.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        rows = _distributed.shard(M, self.rank, self.world_size)
        chunk = self.task_chunk_size or max(1, rows.numel())
        device = self.support.X.device
        J_total, ok, pending, inner_total = 0.0, True, [], 0.0
        # Several chunks: each chunk's noise is sliced from one draw per batch.
        cache = NoiseCache() if 0 < chunk < rows.numel() else None
        # A process may get no task (fewer tasks per batch than processes): it still
        # takes part in every reduction below.
        for part in rows.split(chunk) if rows.numel() else ():
            ids = idx[part].to(device)
            # The whole batch in one chunk: the noise needs no row selection (no copy).
            rows_of = slice(None) if part.numel() == M else part.to(device)
            J_sum, new_params, new_state, part_ok, inner = self._tasks_step(
                ids, seed, M, rows_of, cache)
            J_total += J_sum
            inner_total += inner
            ok = ok and part_ok
            pending.append((part, new_params, new_state))
        if self.world_size > 1:
            J_total, ok = _distributed.all_reduce_scalars(
                J_total, ok, device=device, process_group=self.process_group
            )
        if ok and self.differentiable:
            if self.world_size > 1:
                _distributed.all_reduce_grads(self._meta_parameters(), self.process_group)
            ok = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                     for p in self._meta_parameters())
        if not ok:
            for opt in self._optimizers():
                opt.zero_grad(set_to_none=True)
            self._on_failure(idx)
            self.n_iter += 1
            self.loss_curve.append(math.nan)
            self.inner_loss_curve.append(math.nan)
            return math.nan
        self.failures = 0
        self._check_meta_gradient()
        # Line 8: eta <- eta - gamma grad J (and, Alg. 2, phi <- phi - tau grad J).
        for opt in self._optimizers():
            if self.max_grad_norm is not None:
                # Clip eta's and phi_0's meta-gradients separately (MAML practice):
                # one exploding inner unroll must not throw the outer loop off.
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], self.max_grad_norm
                )
            opt.step()
        # Alg. 1: phi_i <- phi_i' (stored detached, persists across iterations).
        self.strategy.store(idx, M, pending, world_size=self.world_size,
                            process_group=self.process_group)
        self.n_iter += 1
        value = J_total / M
        self.loss_curve.append(value)
        # Per process under distribution (a diagnostic only: its own tasks).
        self.inner_loss_curve.append(inner_total / max(1, rows.numel()))
        return value

    def _meta_parameters(self):
        return [p for opt in self._optimizers() for grp in opt.param_groups for p in grp["params"]]

    def _tasks_step(self, task_ids, seed, M, part, cache=None):
        """Lines 4-7 for one chunk of the sampled tasks; accumulates the meta-gradients.

        Returns ``(sum of J over the chunk, new params, new state, ok, sum of the inner
        losses at the last inner step)`` (the implicit mode reports no inner loss: NaN).
        """
        support, query = self.support.index(task_ids), self.query.index(task_ids)
        implicit = self.mode == "implicit"
        noise = TaskNoise(seed, M, part, fixed=self.fixed_noise or implicit, cache=cache)
        # Lines 4-5: phi_i (stored per task, or the shared initialisation).
        params, state = self.strategy.start(
            task_ids, support, differentiable=self.differentiable, generator=noise
        )
        if implicit:
            loss_noise = TaskNoise(seed ^ 0x5DEECE66D, M, part, fixed=self.fixed_noise,
                                   cache=cache)
            J_sum, params, state, ok, residual = implicit_meta_gradient(
                self.model, self.divergence, self.inner_optimizer, self.meta_loss,
                params, state, support, query, n_steps=self.n_inner_steps,
                n_particles=self.n_particles, inner_noise=noise, loss_noise=loss_noise, M=M,
                max_iter=self.implicit_steps, tol=self.implicit_tol, damping=self.implicit_damping,
            )
            if residual is not None:
                self._check_residual(residual)
            return J_sum, _tree.detach(params), _tree.detach(state), ok, math.nan
        if self._compiled is not None:
            out = self._compiled(params, state, support, query, noise, M)
            if out is not None:
                J, params, state, ok, bound = out
                return float(J.sum()), params, state, ok, _inner_loss(bound, support)
            self._compiled = None  # failed (warned): eager from now on, with the same noise
            if self._auto_chunk:
                self._resolve_auto_chunk()  # from the next iteration on
        losses = []

        def loss_at(b, p):
            losses.append(self.meta_loss(self.model, p, query, generator=noise))

        if self.multi_step_loss:
            loss_at(-1, params)
        # Line 6: B inner steps phi_i <- phi_i + beta * direction, differentiable in eta.
        params, state, stats = inner_loop(
            self.model, self.divergence, self.inner_optimizer, params, state, support,
            n_steps=self.n_inner_steps, n_particles=self.n_particles, generator=noise,
            mode=self.mode, truncate=self.truncate, differentiable=self.differentiable,
            batch_size=self.batch_size, on_step=loss_at if self.multi_step_loss else None,
        )
        # Line 7: the meta-loss on the query rows (multi-step: averaged over the steps).
        if self.multi_step_loss:
            J = torch.stack(losses).mean(0)  # (m,)
        else:
            J = self.meta_loss(self.model, params, query, generator=noise)  # (m,)
        inner_ok = torch.stack([st.finite for st in stats]).all(0) & finite_params(params)
        J_sum = J.sum()
        ok = bool(torch.isfinite(J_sum)) and bool(inner_ok.all())
        if ok and self.differentiable:
            # mean over the M tasks of the whole outer batch, accumulated chunk by chunk
            (J_sum / M).backward()
        # Per support row, as the meta-loss is per query row.
        inner = _inner_loss(stats[-1].bound.detach(), support) if stats else math.nan
        return float(J_sum.detach()), _tree.detach(params), _tree.detach(state), ok, inner

    # ------------------------------------------------------ diagnostics
    def _warn_once(self, key, message, stacklevel=4):
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=stacklevel)

    def _check_meta_gradient(self):
        """Warn when the divergence's meta-gradient stays zero: nothing would be learned."""
        if not self.eta:
            return
        if _is_zero([(p, p.grad) for p in self.eta]):
            self._zero_grad_run += 1
        else:
            self._zero_grad_run = 0
        if self._zero_grad_run >= ZERO_GRADIENT_PATIENCE:
            self._warn_once(
                "zero_gradient",
                f"The meta-gradient of the divergence's parameters has been zero for "
                f"{self._zero_grad_run} outer iterations (up to iteration {self.n_iter}): "
                "the divergence is not being learned. Likely causes: particle weights "
                "collapsed onto one particle (alpha far from 1, few particles, many latent "
                "dimensions: use more n_particles, or a divergence closer to KL), one "
                "particle only, or an inner optimiser that hides the divergence from the "
                f"meta-gradient ({self.inner_optimizer!r}: a fresh Adam's first step is "
                "lr * sign(direction), independent of the divergence's weights; use "
                "inner_optimizer='sgd' or more n_inner_steps).",
            )

    def _check_residual(self, residual):
        worst = float(residual.max())
        self.implicit_residuals.append(worst)
        if not worst <= 10 * self.implicit_tol:
            self._warn_once(
                "implicit_residual",
                f"The implicit meta-gradient's linear solve stopped at a relative residual of "
                f"{worst:.3g} (implicit_tol={self.implicit_tol:g}) after implicit_max_iter="
                f"{self.implicit_steps} GMRES steps (first seen at outer iteration "
                f"{self.n_iter}): the meta-gradient may be inaccurate. Increase "
                "implicit_max_iter, raise implicit_damping (biases the solution towards a "
                "shorter horizon), use float64, or use meta_gradient='truncated'.",
            )

    def _on_failure(self, task_ids):
        self.failures += 1
        what = "the outer step sizes"
        inner = self.strategy.on_failure(task_ids)
        if inner:
            what += f" and {inner}"
        warnings.warn(
            f"Non-finite meta-loss or meta-gradient at outer iteration {self.n_iter}; "
            f"the iteration was skipped and {what} halved.",
            RuntimeWarning,
            stacklevel=3,
        )
        for opt in self._optimizers():
            for g in opt.param_groups:
                g["lr"] *= 0.5
        if self.failures >= self.max_failures:
            raise NonFiniteError(
                f"{self.max_failures} consecutive non-finite outer iterations. Likely "
                "causes: meta_lr or inner_lr too large, or a divergence whose weights "
                "overflow (extreme alpha). Try smaller step sizes."
            )

    # ------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped.

        Independent CPU copies (torch optimizers hand out live references to their
        state), so the result can be pickled, checkpointed and kept while training
        goes on.
        """
        return {
            "divergence": _tree.to_cpu(self.divergence.state_dict()),
            "meta_optimizer": None if self.meta_optimizer is None
            else _tree.to_cpu(self.meta_optimizer.state_dict()),
            **self.strategy.state_dict(),
            "generator": self.generator.get_state(),
            "n_iter": self.n_iter,
            "failures": self.failures,
            "loss_curve": list(self.loss_curve),
            "inner_loss_curve": list(self.inner_loss_curve),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (shapes must match this trainer)."""
        self.divergence.load_state_dict(state["divergence"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        self.strategy.load_state_dict(state)
        self.generator.set_state(state["generator"])
        self.n_iter = state["n_iter"]
        self.failures = state["failures"]
        self.loss_curve = list(state["loss_curve"])
        # States written before the inner curve existed: unknown (NaN) iterations.
        self.inner_loss_curve = list(state.get("inner_loss_curve",
                                               [math.nan] * len(self.loss_curve)))
