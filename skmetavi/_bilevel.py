"""The bilevel engine: functional inner VI steps and Algorithms 1 (Meta-D) and 2 (Meta-D&phi).

Everything here is torch in, torch out.  Parameters are dicts of tensors with a
leading task dimension ``M``; one call processes all ``M`` tasks at once.

Inner step (Sec. 3 of Zhang et al. 2021): with particles
``z_k = r_phi(eps_k)`` and log weights ``l_k = log p(z_k, D) - log q_phi(z_k)``,
the ascent direction is ``sum_k w_k(l; eta) d l_k / d phi`` where the weights
come from the divergence.  It is computed as a vector-Jacobian product with
the weights as ``grad_outputs``, so that with ``create_graph=True`` it stays
differentiable in eta *and* in phi through the weights: the meta-gradient is
the exact derivative of the unrolled computation (checked against finite
differences in the tests).  Path-derivative divergences (Eq. (8)) first take
``d l / d z`` at fixed phi and then pull it back through ``z = r_phi(eps)``,
which drops the score term without any ``detach`` that would corrupt second
derivatives.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
import warnings
from typing import Callable, NamedTuple, Optional

import torch

from skmetavi._optim import detach_state, index_state, scatter_state
from skmetavi._tasks import TaskBatch, TaskNoise, minibatch


class Problem(NamedTuple):
    """A variational family and a target: what an inner VI step needs."""

    family: object
    target: object


class StepStats(NamedTuple):
    """Per-task monitoring values of one inner step."""

    bound: torch.Tensor  # (M,) the divergence's bound (higher is better)
    finite: torch.Tensor  # (M,) bool: log weights and direction finite


GRADIENT_MODES = ("full", "first_order", "truncated", "implicit")


class NonFiniteError(FloatingPointError):
    """Raised when steps keep producing non-finite values after step-size cuts."""


def _zeros_for_none(grads, tensors):
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors))


def inner_direction(problem, divergence, params, tasks, eps, *, create_graph):
    """Ascent direction of one inner step for all tasks.

    Parameters
    ----------
    problem : Problem
    divergence : skmetavi.divergences.Divergence
    params : dict of torch.Tensor, each of shape (M, ...)
        Variational parameters (the family's keys) and model parameters.
    tasks : TaskBatch
    eps : torch.Tensor of shape (M, K, d)
        Standard-normal noise.
    create_graph : bool
        Keep the graph of the direction (for meta-gradients).

    Returns
    -------
    direction : dict of torch.Tensor
        ``sum_k w_k d l_k / d params`` (ascent on the negative divergence).
    stats : StepStats
    """
    family, target = problem
    var_keys = family.param_names
    var = {k: params[k] for k in var_keys}
    model_keys = [k for k in params if k not in var_keys]
    z = family.rsample(var, eps)  # (M, K, d)
    log_p = target.log_joint(z, tasks, params)  # (M, K)
    if divergence.path_derivative:
        log_q = family.log_prob(var, z)  # (M, K), z-dependence needed for d/dz
    else:
        # Same function of phi as log q(r_phi(eps)), all derivatives included,
        # without elementwise work on the (M, K, d) particles.
        log_q = family.log_prob_reparameterised(var, eps)
    log_w = log_p - log_q
    finite = torch.isfinite(log_w).all(-1)
    # A non-finite task must not poison the others through shared reductions.
    log_w_safe = torch.where(finite.unsqueeze(-1), log_w, torch.zeros_like(log_w))
    w = divergence.particle_weights(log_w_safe)  # (M, K), differentiable in eta
    w = torch.where(finite.unsqueeze(-1), w, torch.zeros_like(w))
    retain = True if create_graph else None
    if not divergence.path_derivative:
        # Eq. (4): total derivative of l_k, weights as grad_outputs.
        inputs = [params[k] for k in var_keys] + [params[k] for k in model_keys]
        grads = torch.autograd.grad(
            log_w, inputs, grad_outputs=w, create_graph=create_graph, allow_unused=True
        )
        grads = _zeros_for_none(grads, inputs)
        direction = dict(zip(list(var_keys) + model_keys, grads))
    else:
        # Eq. (8): d l / d z at fixed phi, then pulled back through z = r_phi(eps).
        (dz,) = torch.autograd.grad(
            log_w, z, grad_outputs=w, create_graph=create_graph, retain_graph=True
        )
        var_inputs = [params[k] for k in var_keys]
        g_var = torch.autograd.grad(
            z,
            var_inputs,
            grad_outputs=dz,
            create_graph=create_graph,
            retain_graph=True if (model_keys or create_graph) else None,
            allow_unused=True,
        )
        direction = dict(zip(var_keys, _zeros_for_none(g_var, var_inputs)))
        if model_keys:
            # Model parameters (e.g. a decoder) follow sum_k w_k grad log p(z_k).
            model_inputs = [params[k] for k in model_keys]
            g_model = torch.autograd.grad(
                log_p,
                model_inputs,
                grad_outputs=w,
                create_graph=create_graph,
                retain_graph=retain,
                allow_unused=True,
            )
            direction.update(zip(model_keys, _zeros_for_none(g_model, model_inputs)))
    for g in direction.values():
        finite = finite & torch.isfinite(g.reshape(g.shape[0], -1)).all(-1)
    with torch.no_grad():
        bound = divergence.bound(log_p, log_q)
    return direction, StepStats(bound.detach(), finite)


def _needs_grad(params) -> dict:
    """Make every parameter a graph node that requires grad (leaves if detached)."""
    return {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}


def inner_step(
    problem,
    divergence,
    optimizer,
    params,
    state,
    tasks,
    *,
    n_particles,
    generator,
    create_graph=False,
    first_order_chain=False,
    batch_size=None,
):
    """One functional inner VI step for all tasks; returns ``(params, state, stats)``.

    With ``create_graph=False`` the returned parameters are detached.  With
    ``first_order_chain=True`` the direction is computed at detached parameters
    and added to the incoming graph, so that the Jacobian of the step in phi is
    taken as the identity (first-order) while its direct dependence on eta is
    kept.
    """
    if batch_size is not None:
        tasks = minibatch(tasks, batch_size, generator)
    ref = params[problem.family.param_names[0]]
    eps = problem.family.sample_eps(
        ref.shape[0], n_particles, generator=generator, dtype=ref.dtype, device=ref.device
    )
    if not create_graph or first_order_chain:
        # The direction at detached parameters: a graph to eta only (create_graph) or none.
        with torch.enable_grad():
            leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            direction, stats = inner_direction(
                problem, divergence, leaf, tasks, eps, create_graph=create_graph
            )
        if not create_graph:
            direction = {k: v.detach() for k, v in direction.items()}
        new, new_state = optimizer.update(
            detach_state(params), direction, detach_state(state)
        )
        if first_order_chain:
            # phi_{b+1} = phi_b + (update at sg(phi_b)): identity Jacobian in phi.
            new = {k: params[k] + (new[k] - params[k].detach()) for k in params}
        return new, new_state, stats
    params = _needs_grad(params)
    direction, stats = inner_direction(problem, divergence, params, tasks, eps, create_graph=True)
    new, new_state = optimizer.update(params, direction, state)
    return new, new_state, stats


def inner_loop(
    problem,
    divergence,
    optimizer,
    params,
    state,
    tasks,
    *,
    n_steps,
    n_particles,
    generator,
    mode="full",
    truncate=None,
    differentiable=True,
    batch_size=None,
):
    """B differentiable inner steps (Alg. 1 line 6 / Alg. 2 line 6).

    Parameters
    ----------
    mode : {"full", "first_order", "truncated"}
        ``"full"`` back-propagates through every step; ``"first_order"`` keeps
        only each step's direct dependence on eta (inner Jacobians taken as
        the identity, as first-order MAML); ``"truncated"`` back-propagates
        fully through the last ``truncate`` steps and treats earlier steps as
        constants (identity Jacobian for the initialisation, no dependence on
        eta), so that memory is bounded by ``truncate``.  (The implicit mode is
        handled by :class:`MetaTrainer`, which runs the loop undifferentiated.)
    differentiable : bool
        If False nothing is recorded (plain VI).
    """
    stats = []
    for b in range(n_steps):
        if not differentiable:
            params, state, st = inner_step(
                problem, divergence, optimizer, params, state, tasks,
                n_particles=n_particles, generator=generator, batch_size=batch_size,
            )
        elif mode == "truncated" and b < n_steps - truncate:
            # Outside the window: no graph at all (constant in eta), and an identity
            # edge for phi_0 (Algorithm 2), so memory does not grow with B.
            params, state, st = inner_step(
                problem, divergence, optimizer, params, state, tasks,
                n_particles=n_particles, generator=generator, batch_size=batch_size,
                create_graph=False, first_order_chain=True,
            )
        else:
            params, state, st = inner_step(
                problem, divergence, optimizer, params, state, tasks,
                n_particles=n_particles, generator=generator, batch_size=batch_size,
                create_graph=True, first_order_chain=mode == "first_order",
            )
        stats.append(st)
    return params, state, stats


def _finite_params(params) -> torch.Tensor:
    ok = None
    for v in params.values():
        f = torch.isfinite(v.detach().reshape(v.shape[0], -1)).all(-1)
        ok = f if ok is None else ok & f
    return ok


def run_vi(
    problem,
    divergence,
    optimizer,
    params,
    state,
    tasks,
    *,
    n_steps,
    n_particles,
    generator,
    batch_size=None,
    max_failures=10,
    callback: Optional[Callable] = None,
):
    """Plain (non-differentiable) VI for all tasks, with rollback on non-finite steps.

    A task whose step produces a non-finite value keeps its previous
    parameters and has its step size halved, with a ``RuntimeWarning``; after
    ``max_failures`` consecutive failures a :class:`NonFiniteError` is raised.
    ``KeyboardInterrupt`` is not caught here: the caller keeps the last good
    parameters through ``callback``.

    Returns
    -------
    params, state, bound_curve : dict, dict, list of torch.Tensor (M,)
    """
    M = next(iter(params.values())).shape[0]
    failures = torch.zeros(M, dtype=torch.long)
    curve = []
    for it in range(n_steps):
        new, new_state, st = inner_step(
            problem, divergence, optimizer, params, state, tasks,
            n_particles=n_particles, generator=generator, batch_size=batch_size,
        )
        ok = (st.finite & _finite_params(new)).cpu()
        if not bool(ok.all()):
            bad = (~ok).nonzero().flatten()
            failures[bad] += 1
            failures[ok] = 0
            warnings.warn(
                f"Non-finite values at inner iteration {it} for task(s) "
                f"{bad.tolist()[:10]}; the step was rolled back and its step size "
                "halved.",
                RuntimeWarning,
                stacklevel=2,
            )
            if int(failures.max()) >= max_failures:
                raise NonFiniteError(
                    f"{max_failures} consecutive non-finite inner steps (task(s) "
                    f"{bad.tolist()[:10]}). Likely causes: a learning rate that is too "
                    "large, an extreme divergence (alpha far from 1 or a learned "
                    "f-divergence with huge weights), or a model whose log density is "
                    "not finite everywhere. Try a smaller inner_lr."
                )
            okd = ok.to(new[next(iter(new))].device)
            new = {
                k: torch.where(okd.reshape((-1,) + (1,) * (v.ndim - 1)), v, params[k])
                for k, v in new.items()
            }
            new_state = _merge_state(new_state, state, okd)
            new_state["lr_scale"] = torch.where(
                okd, new_state["lr_scale"], new_state["lr_scale"] * 0.5
            )
        else:
            failures.zero_()
        params, state = new, new_state
        bound = torch.where(ok.to(st.bound.device), st.bound, torch.nan)
        curve.append(bound)
        if callback is not None:
            callback(it, params, state, bound)
    return params, state, curve


def _merge_state(new, old, ok):
    if isinstance(new, dict):
        return {k: _merge_state(new[k], old[k], ok) for k in new}
    mask = ok.reshape((-1,) + (1,) * (new.ndim - 1))
    return torch.where(mask, new, old)


# ---------------------------------------------------------------- meta-losses
class QuadratureLoss:
    """Meta-losses of 1-D q against a 1-D target by grid quadrature.

    ``kind="renyi"`` gives ``D_alpha(q||p) = log(int q^alpha p^(1-alpha)) /
    (alpha - 1)`` (``alpha=0.5``: ``-2 log int sqrt(q p)``); ``kind="tv"`` gives
    ``0.5 int |q - p|``.  The target is normalised on the grid, so
    unnormalised 1-D targets are fine.  Differentiable in q's parameters.
    """

    def __init__(self, kind="renyi", alpha=0.5, low=-10.0, high=26.0, n_points=2001):
        self.kind, self.alpha = kind, alpha
        self.low, self.high, self.n_points = low, high, n_points

    def log_densities(self, problem, params, tasks):
        family, target = problem
        ref = params["loc"]
        grid = torch.linspace(self.low, self.high, self.n_points, dtype=ref.dtype, device=ref.device)
        dx = (self.high - self.low) / (self.n_points - 1)
        zg = grid.reshape(1, -1, 1).expand(ref.shape[0], -1, 1)
        var = {k: params[k] for k in family.param_names}
        log_q = family.log_prob(var, zg)  # (M, G)
        with torch.no_grad():
            log_p = target.log_joint(zg, tasks, params)
        log_p = log_p - (torch.logsumexp(log_p, -1, keepdim=True) + math.log(dx))
        return grid, log_q, log_p, dx

    def __call__(self, problem, params, tasks, generator=None):
        _, log_q, log_p, dx = self.log_densities(problem, params, tasks)
        if self.kind == "tv":
            return 0.5 * dx * (log_q.exp() - log_p.exp()).abs().sum(-1)
        a = self.alpha
        log_int = torch.logsumexp(a * log_q + (1 - a) * log_p, -1) + math.log(dx)
        return log_int / (a - 1)


class PredictiveNLL:
    """Held-out negative log predictive density per row (query split of each task).

    ``-mean_n log (1/K) sum_k p(y_n | x_n, z_k)``, z_k reparameterised from q.
    """

    def __init__(self, n_particles=100):
        self.n_particles = n_particles

    def __call__(self, problem, params, tasks, generator=None):
        family, target = problem
        var = {k: params[k] for k in family.param_names}
        ref = params["loc"]
        eps = family.sample_eps(
            ref.shape[0], self.n_particles, generator=generator, dtype=ref.dtype, device=ref.device
        )
        z = family.rsample(var, eps)
        log_lik = target.log_likelihood(z, tasks, params)  # (M, K, n)
        lpd = torch.logsumexp(log_lik, dim=1) - math.log(self.n_particles)  # (M, n)
        lpd = torch.where(tasks.mask, lpd, torch.zeros_like(lpd))  # padding may be non-finite
        return -lpd.sum(-1) / tasks.mask.sum(-1).clamp(min=1).to(lpd.dtype)


class CallableMetaLoss:
    """Per-task user meta-loss ``fn(q, X, y) -> scalar tensor``.

    ``q`` is a ``torch.distributions.MultivariateNormal`` for the task,
    differentiable in the variational parameters.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, problem, params, tasks, generator=None):
        family = problem.family
        var = {k: params[k] for k in family.param_names}
        loc, L = var["loc"], family.scale_tril(var)
        out = []
        for m in range(tasks.n_tasks):
            q = torch.distributions.MultivariateNormal(loc[m], scale_tril=L[m], validate_args=False)
            X_m, y_m = tasks.unpad(m)
            val = self.fn(q, X_m, y_m)
            if not isinstance(val, torch.Tensor) or val.numel() != 1:
                raise ValueError(
                    "A meta_loss callable must return a scalar torch.Tensor that is "
                    f"differentiable in q's parameters, got {val!r}."
                )
            out.append(val.reshape(()).to(loc.dtype))
        return torch.stack(out)


# ------------------------------------------------------------ Algorithms 1, 2
class MetaTrainer:
    """Outer loop of Algorithm 1 (Meta-D) or Algorithm 2 (Meta-D&phi).

    Algorithm 1 keeps one variational parameter set phi_i per training task
    (``task_params``) across outer iterations: each outer iteration samples
    ``n_tasks_per_batch`` tasks, takes ``n_inner_steps`` differentiable inner
    steps from their stored phi_i, evaluates the meta-loss J on the query part
    and updates eta with Adam; the new phi_i are stored (detached).

    Algorithm 2 (``learn_init=True``) starts every sampled task from the shared
    initialisation phi (``init_params``), and Adam updates both eta (lr
    ``meta_lr``, gamma) and phi (lr ``init_lr``, tau).
    """

    def __init__(
        self,
        problem,
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
        implicit_steps=10,
        implicit_damping=1e-4,
        fixed_noise=False,
        process_group=None,
    ):
        self.problem, self.divergence = problem, divergence
        self.max_grad_norm = max_grad_norm
        self.task_chunk_size = task_chunk_size
        self.implicit_steps, self.implicit_damping = implicit_steps, implicit_damping
        self.fixed_noise = fixed_noise
        if mode == "implicit" and learn_init:
            raise ValueError(
                "meta_gradient='implicit' differentiates through a fixed point of the inner "
                "loop, which does not depend on the initialisation: it cannot learn one "
                "(meta_learn_init=True). Use 'full', 'truncated' or 'first_order'."
            )
        self.process_group = process_group
        self.rank, self.world_size = _distributed_rank(process_group)
        self.inner_optimizer, self.meta_loss = inner_optimizer, meta_loss
        self.support, self.query = support, query
        self.learn_init = learn_init
        self.n_inner_steps, self.n_particles = n_inner_steps, n_particles
        self.n_tasks_per_batch = n_tasks_per_batch
        self.mode, self.truncate, self.batch_size = mode, truncate, batch_size
        self.generator, self.max_failures = generator, max_failures
        self.n_tasks = support.n_tasks
        eta = [p for p in divergence.parameters() if p.requires_grad]
        self.meta_optimizer = torch.optim.Adam(eta, lr=meta_lr) if eta else None
        if learn_init:
            # Alg. 2: one shared initialisation (no task dimension) as leaves.
            self.init_params = {k: v[:1].detach().clone().requires_grad_(True) for k, v in init_params.items()}
            self.init_optimizer = torch.optim.Adam(list(self.init_params.values()), lr=init_lr)
            self.task_params, self.task_state = None, None
        else:
            # Alg. 1: phi_i persists per training task.
            self.init_params, self.init_optimizer = None, None
            self.task_params = {k: v.detach().clone() for k, v in init_params.items()}
            self.task_state = detach_state(inner_optimizer.init(self.task_params))
        self.n_iter = 0
        self.failures = 0
        self.loss_curve = []

    @property
    def differentiable(self):
        return self.meta_optimizer is not None or self.learn_init

    def _sample_tasks(self):
        M = min(self.n_tasks_per_batch, self.n_tasks)
        if M == self.n_tasks:
            return torch.arange(self.n_tasks)
        return torch.randperm(self.n_tasks, generator=self.generator)[:M]

    def _my_rows(self, M):
        """Rows of the sampled batch handled by this process (all, unless distributed)."""
        rows = torch.arange(M)
        if self.world_size > 1:
            rows = rows.tensor_split(self.world_size)[self.rank]
        return rows

    def _start_params(self, task_ids, m):
        if self.learn_init:
            params = {k: v.expand((m,) + v.shape[1:]) for k, v in self.init_params.items()}
            state = self.inner_optimizer.init(detach_state(params))
        else:
            params = {k: v[task_ids].requires_grad_(self.differentiable) for k, v in self.task_params.items()}
            state = index_state(self.task_state, task_ids)
        return params, state

    def _chunk(self, task_ids, noise, M):
        """Inner loop + meta-loss for one chunk of tasks; accumulates meta-gradients.

        Returns ``(sum of J over the chunk, new params, new state, ok)``.
        """
        support, query = self.support.index(task_ids), self.query.index(task_ids)
        m = task_ids.numel()
        params, state = self._start_params(task_ids, m)
        if self.mode == "implicit":
            return self._implicit_chunk(params, state, support, query, noise, M)
        params, state, stats = inner_loop(
            self.problem, self.divergence, self.inner_optimizer, params, state, support,
            n_steps=self.n_inner_steps, n_particles=self.n_particles, generator=noise,
            mode=self.mode, truncate=self.truncate, differentiable=self.differentiable,
            batch_size=self.batch_size,
        )
        J = self.meta_loss(self.problem, params, query, generator=noise)  # (m,)
        inner_ok = torch.stack([st.finite for st in stats]).all(0) & _finite_params(params)
        J_sum = J.sum()
        ok = bool(torch.isfinite(J_sum)) and bool(inner_ok.all())
        if ok and self.differentiable:
            # mean over the M tasks of the whole outer batch, accumulated chunk by chunk
            (J_sum / M).backward()
        return float(J_sum.detach()), detach_state(params), detach_state(state), ok

    def _implicit_chunk(self, params, state, support, query, noise, M):
        """Implicit meta-gradient at the end of the inner loop (treated as a fixed point).

        With the inner optimality condition ``g(phi*, eta) = 0`` (``g`` the
        update direction), ``dJ/deta = -x^T dg/deta`` where ``H^T x = dJ/dphi``
        and ``H = dg/dphi``; ``x`` comes from conjugate gradients on the normal
        equations ``(H H^T + damping I) x = H dJ/dphi`` (``H`` need not be
        symmetric: path-derivative directions are not gradients).
        """
        params, state, stats = inner_loop(
            self.problem, self.divergence, self.inner_optimizer, params, state, support,
            n_steps=self.n_inner_steps, n_particles=self.n_particles, generator=noise,
            differentiable=False, batch_size=self.batch_size,
        )
        phi = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        ref = phi[self.problem.family.param_names[0]]
        eps = self.problem.family.sample_eps(
            ref.shape[0], self.n_particles, generator=noise, dtype=ref.dtype, device=ref.device
        )
        g, st = inner_direction(self.problem, self.divergence, phi, support, eps, create_graph=True)
        J = self.meta_loss(self.problem, phi, query, generator=noise)
        J_sum = J.sum()
        ok = bool(torch.isfinite(J_sum)) and bool(st.finite.all()) and bool(
            torch.stack([s_.finite for s_ in stats]).all()
        )
        if ok:
            keys = list(phi)
            b = torch.autograd.grad(J_sum / M, [phi[k] for k in keys], allow_unused=True)
            b = _zeros_for_none(b, [phi[k] for k in keys])
            x = _solve_adjoint([g[k] for k in keys], [phi[k] for k in keys], list(b),
                               n_steps=self.implicit_steps, damping=self.implicit_damping)
            eta = [p for p in self.divergence.parameters() if p.requires_grad]
            grads = torch.autograd.grad([g[k] for k in keys], eta, grad_outputs=x, allow_unused=True)
            for p_, gr in zip(eta, _zeros_for_none(grads, eta)):
                p_.grad = -gr if p_.grad is None else p_.grad - gr
        return float(J_sum.detach()), detach_state(params), detach_state(state), ok

    def _optimizers(self):
        return [o for o in (self.meta_optimizer, self.init_optimizer) if o is not None]

    def step(self) -> float:
        """One outer iteration; returns the mean meta-loss J (NaN if rolled back)."""
        idx = self._sample_tasks()
        M = idx.numel()
        # One seed per outer iteration: every task's noise is the same however the batch
        # is chunked or sharded across processes.
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        rows = self._my_rows(M)
        chunk = self.task_chunk_size or max(1, rows.numel())
        device = self.support.X.device
        J_total, ok, pending = 0.0, True, []
        for part in rows.split(chunk):
            noise = TaskNoise(seed, M, part.to(device), fixed=self.fixed_noise)
            task_ids = idx[part].to(device)
            J_sum, new_params, new_state, part_ok = self._chunk(task_ids, noise, M)
            J_total += J_sum
            ok = ok and part_ok
            pending.append((part, new_params, new_state))
        if self.world_size > 1:
            J_total, ok = self._sync_scalars(J_total, ok)
        if ok and self.differentiable:
            if self.world_size > 1:
                self._all_reduce_grads()
            ok = all(
                p.grad is None or bool(torch.isfinite(p.grad).all())
                for opt in self._optimizers() for grp in opt.param_groups for p in grp["params"]
            )
        if not ok:
            for opt in self._optimizers():
                opt.zero_grad(set_to_none=True)
            self._on_failure(idx)
            self.n_iter += 1
            self.loss_curve.append(math.nan)
            return math.nan
        self.failures = 0
        for opt in self._optimizers():
            if self.max_grad_norm is not None:
                # Clip eta's and phi_0's meta-gradients separately (MAML practice):
                # one exploding inner unroll must not throw the outer loop off.
                torch.nn.utils.clip_grad_norm_(
                    [p for g in opt.param_groups for p in g["params"]], self.max_grad_norm
                )
            opt.step()
        if not self.learn_init:
            # Alg. 1: phi_i <- phi_i' (stored detached, persists across iterations).
            self._store_task_updates(idx, M, pending)
        self.n_iter += 1
        value = J_total / M
        self.loss_curve.append(value)
        return value

    # ------------------------------------------------------ distributed
    def _sync_scalars(self, J_total, ok):
        import torch.distributed as dist

        # On the data's device: NCCL only reduces CUDA tensors.
        buf = torch.tensor([J_total, 0.0 if ok else 1.0], dtype=torch.float64,
                           device=self.support.X.device)
        dist.all_reduce(buf, group=self.process_group)
        return float(buf[0]), bool(buf[1] == 0)

    def _all_reduce_grads(self):
        import torch.distributed as dist

        for opt in self._optimizers():
            for grp in opt.param_groups:
                for p in grp["params"]:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    dist.all_reduce(p.grad, group=self.process_group)

    def _store_task_updates(self, idx, M, pending):
        def full_like(tree):
            if isinstance(tree, dict):
                return {k: full_like(v) for k, v in tree.items()}
            return tree.new_zeros((M,) + tree.shape[1:])

        def fill(dst, rows, src):
            if isinstance(dst, dict):
                for k in dst:
                    fill(dst[k], rows, src[k])
            else:
                dst[rows.to(dst.device)] = src

        device = self.support.X.device
        if self.world_size == 1:
            for rows, new_params, new_state in pending:
                scatter_state(self.task_params, idx[rows].to(device), new_params)
                scatter_state(self.task_state, idx[rows].to(device), new_state)
            return
        params_full = full_like(index_state(self.task_params, idx[:1].to(self.support.X.device)))
        state_full = full_like(index_state(self.task_state, idx[:1].to(self.support.X.device)))
        for rows, new_params, new_state in pending:
            fill(params_full, rows, new_params)
            fill(state_full, rows, new_state)
        if self.world_size > 1:
            import torch.distributed as dist

            # Each process filled its own rows and zeros elsewhere: a sum gathers them.
            for tree in (params_full, state_full):
                for t in _leaves(tree):
                    dist.all_reduce(t, group=self.process_group)
        dev_idx = idx.to(self.support.X.device)
        scatter_state(self.task_params, dev_idx, params_full)
        scatter_state(self.task_state, dev_idx, state_full)

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly where it stopped.

        Independent CPU copies (torch optimizers hand out live references to their
        state), so the result can be pickled, checkpointed and kept while training
        goes on.
        """
        opt_state = [None if o is None else _cpu_tree(o.state_dict())
                     for o in (self.meta_optimizer, self.init_optimizer)]
        return {
            "divergence": _cpu_tree(self.divergence.state_dict()),
            "meta_optimizer": opt_state[0],
            "init_params": _cpu_tree(self.init_params),
            "init_optimizer": opt_state[1],
            "task_params": _cpu_tree(self.task_params),
            "task_state": _cpu_tree(self.task_state),
            "generator": self.generator.get_state(),
            "n_iter": self.n_iter,
            "failures": self.failures,
            "loss_curve": list(self.loss_curve),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` output (shapes must match this trainer)."""

        def load(dst, src):
            if isinstance(dst, dict):
                for k in dst:
                    load(dst[k], src[k])
            else:
                with torch.no_grad():
                    dst.copy_(src.to(dst.device, dst.dtype))

        self.divergence.load_state_dict(state["divergence"])
        if self.meta_optimizer is not None and state["meta_optimizer"] is not None:
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])
        if self.learn_init:
            if state["init_params"] is None:
                raise ValueError("The saved state has no learned initialisation (Algorithm 1).")
            load(self.init_params, state["init_params"])
            self.init_optimizer.load_state_dict(state["init_optimizer"])
        else:
            if state["task_params"] is None:
                raise ValueError("The saved state has no per-task parameters (Algorithm 2).")
            load(self.task_params, state["task_params"])
            load(self.task_state, state["task_state"])
        self.generator.set_state(state["generator"])
        self.n_iter = state["n_iter"]
        self.failures = state["failures"]
        self.loss_curve = list(state["loss_curve"])

    def _on_failure(self, task_ids):
        self.failures += 1
        what = "the outer step sizes"
        if self.task_state is not None:
            # Algorithm 1: the sampled tasks' own inner step sizes too (persistent states).
            ids = task_ids.to(self.task_state["lr_scale"].device)
            self.task_state["lr_scale"][ids] = self.task_state["lr_scale"][ids] * 0.5
            what += " and the inner step sizes of the sampled tasks"
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


# ------------------------------------------------------------------ helpers
def _cpu_tree(tree):
    """Detached CPU copies of the tensors in nested dicts/lists/tuples (other leaves as is)."""
    if isinstance(tree, torch.Tensor):
        return tree.detach().to("cpu", copy=True)
    if isinstance(tree, dict):
        return {k: _cpu_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cpu_tree(v) for v in tree)
    return tree


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def _distributed_rank(process_group):
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def _solve_adjoint(g, phi, b, *, n_steps, damping):
    """Solve ``H^T x = b`` per task, ``H = dg/dphi``, by CG on ``(H H^T + damping) x = H b``.

    ``H^T v`` is a vector-Jacobian product; ``H u`` is obtained as the
    derivative of the linear map ``w -> H^T w`` in ``w`` (the double-vjp trick),
    so nothing but reverse mode is needed.  Inner products are per task
    (leading dimension), so every task runs its own CG.
    """
    w = [torch.zeros_like(t, requires_grad=True) for t in g]
    s = torch.autograd.grad(g, phi, grad_outputs=w, create_graph=True, allow_unused=True)
    s = _zeros_for_none(s, phi)

    def HT(v):
        out = torch.autograd.grad(g, phi, grad_outputs=v, retain_graph=True, allow_unused=True)
        return _zeros_for_none(out, phi)

    def H(u):
        out = torch.autograd.grad(s, w, grad_outputs=u, retain_graph=True, allow_unused=True)
        return _zeros_for_none(out, w)

    def A(v):
        return [a + damping * c for a, c in zip(H(HT(v)), v)]

    def dot(a, c):
        return sum((x * y).reshape(x.shape[0], -1).sum(-1) for x, y in zip(a, c))

    def bc(v, like):
        return v.reshape((-1,) + (1,) * (like.ndim - 1))

    rhs = [t.detach() for t in H([t.detach() for t in b])]
    x = [torch.zeros_like(t) for t in rhs]
    r = [t.clone() for t in rhs]
    p = [t.clone() for t in rhs]
    rs = dot(r, r)
    tiny = torch.finfo(rhs[0].dtype).tiny
    for _ in range(n_steps):
        Ap = [t.detach() for t in A(p)]
        alpha = rs / dot(p, Ap).clamp_min(tiny)
        x = [xi + bc(alpha, xi) * pi for xi, pi in zip(x, p)]
        r = [ri - bc(alpha, ri) * api for ri, api in zip(r, Ap)]
        rs_new = dot(r, r)
        beta = rs_new / rs.clamp_min(tiny)
        p = [ri + bc(beta, ri) * pi for ri, pi in zip(r, p)]
        rs = rs_new
    return x
