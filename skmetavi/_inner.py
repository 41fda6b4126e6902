"""The inner level of the bilevel engine: functional VI steps for all tasks at once.

Everything here is torch in, torch out.  Parameters are dicts of tensors with a
leading task dimension ``M``; one call processes all ``M`` tasks at once.  The
model is a :class:`~skmetavi.models.LatentModel`: log weights are ``(M, S, K)``
(``S`` sites, ``K`` particles per site).

Inner step (Sec. 3 of Zhang et al. 2021): with particles
``z_sk = r_phi(eps_sk)`` and log weights ``l_sk = log p(z_sk, D_s) - log
q_phi(z_sk)``, the ascent direction is ``sum_s c_s sum_k w_sk(l_s; eta) d l_sk /
d phi``, where the weights come from the divergence, separately for every site
``s``, and ``c_s`` are the model's site weights.  It is computed as a
vector-Jacobian product with ``c_s w_sk`` as ``grad_outputs``, so that with
``create_graph=True`` it stays differentiable in eta *and* in phi through the
weights: the meta-gradient is the exact derivative of the unrolled computation
(checked against finite differences in the tests).  Path-derivative divergences
(Eq. (8)) first take ``d l / d z`` at fixed phi and then pull it back through
``z = r_phi(eps)``, which drops the score term without any ``detach`` that would
corrupt second derivatives.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

from skmetavi import _tree
from skmetavi._allocator import adapt_heap
from skmetavi._optim import map_param_state
from skmetavi._tasks import gather_rows, minibatch, scatter_rows
from skmetavi.models._protocol import GlobalLatent
from skmetavi.models._targets import Target

__all__ = [
    "NonFiniteError",
    "StepStats",
    "GRADIENT_MODES",
    "inner_direction",
    "inner_step",
    "inner_loop",
    "VIRun",
    "run_vi",
    "finite_params",
]

GRADIENT_MODES = ("full", "first_order", "truncated", "implicit")


class StepStats(NamedTuple):
    """Per-task monitoring values of one inner step."""

    bound: torch.Tensor  # (M,) the divergence's bound (higher is better), summed over sites
    finite: torch.Tensor  # (M,) bool: log weights and direction finite


class NonFiniteError(FloatingPointError):
    """Raised when steps keep producing non-finite values after step-size cuts."""


def zeros_for_none(grads, tensors):
    """``torch.autograd.grad(..., allow_unused=True)`` output with zeros for unused inputs."""
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors))


def _per_task(t: torch.Tensor) -> torch.Tensor:
    """Whether every entry of each task of ``t`` (M, ...) is finite, shape (M,).

    One reduction pass: a NaN or an infinity makes the task's sum non-finite (a
    sum that overflows the float range counts as non-finite too, which only
    flags values already within a factor ``numel`` of it).
    """
    return _finite_tasks([t])


def _finite_tasks(tensors) -> torch.Tensor:
    """Whether every entry of each task of all ``tensors`` (each (M, ...)) is finite, (M,).

    :func:`_per_task` of every tensor, and-ed, in a handful of kernels: one sum
    per tensor, then ``s * 0 == 0`` (``nan`` exactly for a non-finite ``s``)
    on all the sums at once.
    """
    tensors = list(tensors)
    ref = tensors[0]
    sums = [(t.detach() if t.requires_grad else t).reshape(t.shape[0], -1).sum(-1)
            for t in tensors if t.is_floating_point()]
    if not sums:
        return torch.ones(ref.shape[0], dtype=torch.bool, device=ref.device)
    s = sums[0] if len(sums) == 1 else torch.stack(sums)
    # A compiler may fold s * 0 to 0 (it ignores nan semantics): isfinite there, fused anyway.
    ok = torch.isfinite(s) if torch.compiler.is_compiling() else s * 0 == 0
    return ok if len(sums) == 1 else ok.all(0)


def _negligible(w):
    a = w.detach().abs()
    return a < a.amax(-1, keepdim=True) * torch.finfo(w.dtype).eps ** 2


def negligible_to_zero(w):
    """The particle weights ``w`` with those below ``eps**2`` of their row's largest set to 0.

    ``eps`` is the machine epsilon of ``w``'s dtype (float32: 1.4e-14 of the
    largest weight; float64: 4.9e-32).  A particle with such a weight adds less
    than ``eps**2`` times its gradient to the direction: below the rounding of
    the largest term unless its gradient is ``1 / eps`` times larger (the K
    dropped weights together are below rounding for float32 and float64, not
    for bfloat16 with K > 128).  Keeping these weights is not free: as q fits
    the data, the log weights of K particles spread over hundreds of nats, and
    the products of the smallest weights in the backward pass become subnormal
    numbers, which slowed an Intel CPU's matrix products several-fold (a
    float32 BNN step at N = 1000, compiled, drifted from 2.5 to 7.7 ms within
    1 200 steps; with the mask it stays at 1.3 ms).  The mask is computed from
    the values, so the kept weights stay differentiable in eta and phi.
    """
    return w.masked_fill(_negligible(w), 0.0)


def significant_weights(weights, log_w):
    """``negligible_to_zero(weights(log_w))``, with no derivative through the dropped particles.

    For directions that are differentiated again (meta-gradients): the
    weights are evaluated a second time with the log weights of the particles
    that are negligible both in ``w`` and in ``softmax(log_w)`` detached, so
    that the double backward sends nothing back through those particles
    either.  Both conditions are needed: a Rényi weight ``softmax(c log_w)``
    depends on another particle's log weight through that particle's own
    weight only, but an f-divergence's weights go through ``softmax(log_w)``,
    where a particle with a negligible weight of its own (a decreasing
    ``g``) can dominate the normaliser.  The values are those of
    :func:`negligible_to_zero`.
    """
    lw = log_w.detach()
    with torch.no_grad():
        drop = _negligible(weights(lw))
        cut = drop & _negligible(torch.softmax(lw, dim=-1))
    w = weights(torch.where(cut, lw, log_w))
    return w.masked_fill(drop, 0.0)


def _direction_weights(divergence, log_w, create_graph):
    """The divergence's weights of an inner direction, negligible ones zero.

    :func:`significant_weights` where the direction is differentiated again
    (``create_graph``), :func:`negligible_to_zero` otherwise.
    """
    if create_graph:
        return significant_weights(divergence.particle_weights, log_w)
    return negligible_to_zero(divergence.particle_weights(log_w))


def significant_logsumexp(x, dim):
    """``torch.logsumexp(x, dim)``, its gradient's negligible entries (below ``eps**2``) zero.

    The gradient of a log-mean-exp over particles is their softmax, the
    weights of an importance-weighted estimate (the predictive density, the
    IWAE bound): the same subnormal products as :func:`negligible_to_zero`'s
    arise in its backward pass, and the same mask removes them.  The value is
    that of ``torch.logsumexp`` to rounding.
    """
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x - m)
    e = e.masked_fill(e.detach() < torch.finfo(e.dtype).eps ** 2, 0.0)
    return (torch.log(e.sum(dim, keepdim=True)) + m).squeeze(dim)


def _detached(tree):
    """:func:`skmetavi._tree.detach`, leaving tensors that need no detaching as they are."""
    return _tree.tree_map(lambda t: t.detach() if t.requires_grad else t, tree)


def _fast_weights(divergence, log_w):
    """``(w, bound)`` of a step without a graph whose log weights are all finite, or None.

    The weights are ``divergence.particle_weights(log_w)`` and the bound
    ``divergence.bound(log_p, log_q)[:, 0]`` of one site; for :class:`Renyi`
    both come from one centred pass over ``log_w`` (the weights bit for bit,
    the bound to rounding), for a divergence with the default (ELBO) bound the
    mean of ``log_w``.  None where the bound needs ``log_p`` and ``log_q``
    apart (the caller then takes the general path).
    """
    with torch.no_grad():  # no graph to eta either: the direction is not differentiated
        return _fast_weights_no_grad(divergence, log_w.detach())


def _fast_weights_no_grad(divergence, lw):
    from skmetavi.divergences import Divergence, Renyi

    if type(divergence) is Renyi:
        c = 1.0 - divergence.alpha_tensor().to(lw.dtype)
        c_val = float(c)
        if abs(c_val) < 1e-4:  # the bound's series branch: the general path
            return None
        shift = lw.amax(-1, keepdim=True)  # finite: every log weight is
        u = c * (lw - shift)  # Renyi.particle_weights's centred argument
        w = negligible_to_zero(torch.softmax(u, dim=-1))
        # log mean_k exp(c l_k) / c = (logsumexp(u) - log K) / c + max_k l_k
        bound = (torch.logsumexp(u, dim=-1) - math.log(lw.shape[-1])) / c + shift[..., 0]
        return w, bound[:, 0]
    if type(divergence).bound is Divergence.bound:
        return negligible_to_zero(divergence.particle_weights(lw)), lw.mean(-1)[:, 0]
    return None


def inner_direction(model, divergence, params, tasks, eps, *, create_graph):
    """Ascent direction of one inner step for all tasks.

    Parameters
    ----------
    model : LatentModel
    divergence : skmetavi.divergences.Divergence
    params : dict of torch.Tensor, each of shape (M, ...)
        Variational parameters (``model.variational_keys``) and model parameters.
    tasks : TaskBatch
    eps : torch.Tensor
        The model's standard noise (``model.sample_eps``).
    create_graph : bool
        Keep the graph of the direction (for meta-gradients).

    Returns
    -------
    direction : dict of torch.Tensor
        ``sum_s c_s sum_k w_sk d l_sk / d params`` (ascent on the negative divergence).
    stats : StepStats
    """
    var_keys = tuple(model.variational_keys)
    model_keys = [k for k in params if k not in var_keys]
    z = model.rsample(params, tasks, eps)
    log_p = None if divergence.local else model.log_p(params, tasks, z)  # (M, S, K)
    if divergence.path_derivative:
        log_q = model.log_q(params, tasks, z)  # z-dependence needed for d/dz
    else:
        # Same function of phi as log q(r_phi(eps)), all derivatives included,
        # without elementwise work on the particles.
        log_q = model.log_q_reparameterised(params, tasks, eps)
    if divergence.local:
        return _local_direction(model, divergence, params, tasks, z, log_q,
                                create_graph=create_graph)
    log_w = log_p - log_q  # (M, S, K)
    site_w = model.site_weights(tasks)  # (M, S) or None (one site of weight one)
    fast = None
    if not create_graph and site_w is None and log_w.device.type == "cpu":
        # No graph to keep and one site: when every log weight is finite, no masking (on
        # the CPU, where asking whether they are costs less than the masks; an
        # accelerator would have to synchronise).
        finite = _finite_tasks([log_w])
        if bool(finite.all()):
            fast = _fast_weights(divergence, log_w)
    if fast is not None:
        w, bound = fast
        direction = _direction(model, divergence, params, log_p, log_w, z, w, var_keys,
                               model_keys, create_graph=False)
        return direction, StepStats(bound, finite & _finite_tasks(direction.values()))
    site_ok = torch.isfinite(log_w).all(-1)  # (M, S)
    if site_w is not None:
        site_w = site_w.to(log_w.dtype)
        valid = site_w != 0  # padding sites do not count
        site_ok = site_ok | ~valid
    finite = site_ok.all(-1)  # (M,)
    # A non-finite task must not poison the others through shared reductions.
    keep = finite.unsqueeze(-1) if site_w is None else valid & finite.unsqueeze(-1)
    keep = keep.unsqueeze(-1)  # (M, S or 1, 1)
    log_w_safe = torch.where(keep, log_w, torch.zeros_like(log_w))
    w = _direction_weights(divergence, log_w_safe, create_graph)  # (M, S, K), in eta
    w = torch.where(keep, w, torch.zeros_like(w))
    if site_w is not None:
        w = w * site_w.unsqueeze(-1)
    direction = _direction(model, divergence, params, log_p, log_w, z, w, var_keys, model_keys,
                           create_graph=create_graph)
    finite = finite & _finite_tasks(direction.values())
    with torch.no_grad():
        bound = divergence.bound(log_p, log_q)  # (M, S)
        if site_w is None:
            bound = bound[:, 0]
        else:
            bound = (torch.where(site_w != 0, bound, torch.zeros_like(bound)) * site_w).sum(-1)
    return direction, StepStats(bound.detach(), finite)


def _direction(model, divergence, params, log_p, log_w, z, w, var_keys, model_keys, *,
               create_graph):
    """The vector-Jacobian products of :func:`inner_direction` with weights ``w``."""
    retain = True if create_graph else None
    if not divergence.path_derivative:
        # Eq. (4): total derivative of l_sk, weights as grad_outputs.
        inputs = [params[k] for k in var_keys] + [params[k] for k in model_keys]
        grads = torch.autograd.grad(
            log_w, inputs, grad_outputs=w, create_graph=create_graph, allow_unused=True
        )
        direction = dict(zip(list(var_keys) + model_keys, zeros_for_none(grads, inputs)))
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
        direction = dict(zip(var_keys, zeros_for_none(g_var, var_inputs)))
        if model_keys:
            # Model parameters (e.g. a decoder) follow sum_sk c_s w_sk grad log p(z_sk).
            model_inputs = [params[k] for k in model_keys]
            g_model = torch.autograd.grad(
                log_p,
                model_inputs,
                grad_outputs=w,
                create_graph=create_graph,
                retain_graph=retain,
                allow_unused=True,
            )
            direction.update(zip(model_keys, zeros_for_none(g_model, model_inputs)))
    return direction


def check_local_divergence(model, divergence):
    """Raise ``TypeError`` unless ``model`` splits ``log_p`` into prior and per-row terms.

    A target with ``has_likelihood`` promises ``log_joint = log_prior + sum_n
    lik_scale * log_likelihood_n`` (a ``log_joint`` override may only be faster).
    """
    name = type(divergence).__name__
    if divergence.path_derivative:
        raise TypeError(f"{name} has path_derivative=True, which local divergences do not "
                        "support: their direction is the total derivative of each term.")
    target = getattr(model, "target", None)
    if not (isinstance(model, GlobalLatent) and model.has_likelihood):
        raise TypeError(
            f"{name} weights each likelihood term separately, so it needs a model with one "
            "global latent and a per-row likelihood (a skmetavi.models.Target with "
            f"has_likelihood=True, e.g. MetaBNNRegressor's BNN); got {model!r}. Use Renyi "
            "for a target given only as a joint log density or for models with local latents."
        )
    if type(target).log_prior is Target.log_prior:
        raise TypeError(
            f"{name} splits log p(z, D) into log_prior plus the rows' log_likelihood, but "
            f"{type(target).__name__} defines no log_prior. Implement log_prior (with "
            "log_joint = log_prior + the sum of log_likelihood), or use Renyi."
        )


def _local_direction(model, divergence, params, tasks, z, log_q, *, create_graph):
    """:func:`inner_direction` for a local divergence (black-box alpha, per row).

    ``log w_k = log p_0(z_k) - log q(z_k) + sum_n c_n log p(y_n | z_k)``; the rows'
    terms get per-row weights ``divergence.particle_weights`` over particles, the
    rest the ELBO's ``1 / K``.
    """
    check_local_divergence(model, divergence)
    log_lik = model.log_likelihood(params, tasks, z)  # (M, 1, K, n)
    row_w = (tasks.mask.to(log_lik.dtype) * tasks.lik_scale.unsqueeze(-1)).unsqueeze(1)
    real = (row_w != 0).unsqueeze(-2)  # (M, 1, 1, n)
    log_lik = torch.where(real, log_lik, torch.zeros_like(log_lik))
    log_rest = model.log_prior(params, tasks, z) - log_q  # (M, 1, K)
    log_w = log_rest + (row_w.unsqueeze(-2) * log_lik).sum(-1)  # (M, 1, K)
    finite = torch.isfinite(log_w).all(-1).all(-1)  # (M,)
    keep = finite.view(-1, 1, 1, 1)
    rows = torch.where(keep, log_lik, torch.zeros_like(log_lik)).transpose(-1, -2)  # (M,1,n,K)
    w_lik = _direction_weights(divergence, rows, create_graph).transpose(-1, -2)
    w_lik = w_lik * row_w.unsqueeze(-2)
    w_lik = torch.where(keep, w_lik, torch.zeros_like(w_lik))
    w_rest = torch.where(keep[..., 0], torch.full_like(log_rest, 1.0 / log_rest.shape[-1]),
                         torch.zeros_like(log_rest))
    keys = list(params)
    inputs = [params[k] for k in keys]
    grads = torch.autograd.grad(
        (log_lik, log_rest), inputs, grad_outputs=(w_lik, w_rest), create_graph=create_graph,
        allow_unused=True,
    )
    direction = dict(zip(keys, zeros_for_none(grads, inputs)))
    finite = finite & _finite_tasks(direction.values())
    with torch.no_grad():
        bound = divergence.local_bound(rows, row_w, log_rest)[:, 0]  # (M,)
    return direction, StepStats(bound.detach(), finite)


def _needs_grad(params) -> dict:
    """Make every parameter a graph node that requires grad (leaves if detached)."""
    return {k: v if v.requires_grad else v.detach().requires_grad_(True) for k, v in params.items()}


def _local_rows(model, tasks):
    """The minibatch's rows when the model has per-row parameters to gather, else None."""
    if tasks.rows is None or not tuple(getattr(model, "local_keys", ())):
        return None
    return tasks.rows


def _gather_local(model, optimizer, params, state, rows):
    local = tuple(model.local_keys)
    view = {k: gather_rows(v, rows) if k in local else v for k, v in params.items()}
    view_state = map_param_state(optimizer, state, local, lambda t: gather_rows(t, rows))
    return view, view_state


def _scatter_local(model, optimizer, params, state, new_view, new_view_state, rows):
    """Write the minibatch rows' updates back; rows outside it keep params and state."""
    local = tuple(model.local_keys)
    new = {k: scatter_rows(params[k], rows, v) if k in local else v for k, v in new_view.items()}
    new_state = map_param_state(
        optimizer, new_view_state, local, lambda tv, full: scatter_rows(full, rows, tv), state
    )
    return new, new_state


def inner_step(
    model,
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
    eps=None,
):
    """One functional inner VI step for all tasks; returns ``(params, state, stats)``.

    With ``create_graph=False`` the returned parameters are detached.  With
    ``first_order_chain=True`` the direction is computed at detached parameters
    and added to the incoming graph, so that the Jacobian of the step in phi is
    taken as the identity (first-order) while its direct dependence on eta is
    kept.  With ``batch_size`` a minibatch of rows is drawn; the model's per-row
    (local) parameters of those rows are updated, the others are untouched.
    ``eps``: the model's noise for this step, if already drawn (else drawn
    from ``generator``).
    """
    if batch_size is not None:
        tasks = minibatch(tasks, batch_size, generator)
    rows = _local_rows(model, tasks)
    graph = create_graph and not first_order_chain
    if graph:
        params = _needs_grad(params)
    full_params, full_state = params, state
    if rows is not None:
        params, state = _gather_local(model, optimizer, params, state, rows)
    if eps is None:
        eps = model.sample_eps(params, tasks, n_particles, generator=generator)
    if graph:
        direction, stats = inner_direction(model, divergence, params, tasks, eps, create_graph=True)
        new, new_state = optimizer.update(params, direction, state)
        if rows is not None:
            new, new_state = _scatter_local(
                model, optimizer, full_params, full_state, new, new_state, rows
            )
        return new, new_state, stats
    # The direction at detached parameters: a graph to eta only (create_graph) or none.
    with torch.enable_grad():
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        direction, stats = inner_direction(
            model, divergence, leaf, tasks, eps, create_graph=create_graph
        )
    if not create_graph:
        direction = _detached(direction)
    new, new_state = optimizer.update(_detached(params), direction, _detached(state))
    if rows is not None:
        new, new_state = _scatter_local(
            model, optimizer, _detached(full_params), _detached(full_state),
            new, new_state, rows,
        )
    if first_order_chain:
        # phi_{b+1} = phi_b + (update at sg(phi_b)): identity Jacobian in phi.
        new = {k: full_params[k] + (new[k] - full_params[k].detach()) for k in full_params}
    return new, new_state, stats


def inner_loop(
    model,
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
    on_step=None,
):
    """B differentiable inner steps (Alg. 1 line 6 / Alg. 2 line 6).

    Parameters
    ----------
    mode : {"full", "first_order", "truncated"}
        ``"full"`` back-propagates through every step; ``"first_order"`` keeps
        only each step's direct dependence on eta (inner Jacobians taken as
        the identity, as first-order MAML; the optimiser's state, e.g. Adam's
        moments, is carried detached from one step to the next, so eta's effect
        through it is dropped too; each step's eta-graph is recomputed in the
        backward pass, so no graph is kept per step: :mod:`skmetavi._first_order`);
        ``"truncated"`` back-propagates fully
        through the last ``truncate`` steps and treats earlier steps as
        constants (identity Jacobian for the initialisation, no dependence on
        eta), so that memory is bounded by ``truncate``.  (The implicit mode is
        handled by :mod:`skmetavi._implicit`, which runs the loop undifferentiated.)
    differentiable : bool
        If False nothing is recorded (plain VI).
    on_step : callable, default=None
        ``on_step(b, params)`` after step ``b`` (e.g. a meta-loss at every step).
    """
    from skmetavi import _first_order  # recomputation: no graph per step

    stats, fo = [], None
    if differentiable and mode == "first_order" and _first_order.RECOMPUTE:
        fo = _first_order.FirstOrderSteps(model, divergence, optimizer, n_particles=n_particles,
                                          generator=generator, batch_size=batch_size)
    for b in range(n_steps):
        if fo is not None:
            params, state, st = fo.step(params, state, tasks)
            stats.append(st)
            if on_step is not None:
                on_step(b, params)
            continue
        if not differentiable:
            kw = {}
        elif mode == "truncated" and b < n_steps - truncate:
            # Outside the window: no graph at all (constant in eta), and an identity
            # edge for phi_0 (Algorithm 2), so memory does not grow with B.
            kw = dict(create_graph=False, first_order_chain=True)
        else:
            kw = dict(create_graph=True, first_order_chain=mode == "first_order")
        params, state, st = inner_step(
            model, divergence, optimizer, params, state, tasks,
            n_particles=n_particles, generator=generator, batch_size=batch_size, **kw,
        )
        stats.append(st)
        if on_step is not None:
            on_step(b, params)
    return params, state, stats


def finite_params(params) -> torch.Tensor:
    """Whether every parameter of each task is finite, shape (M,)."""
    return _finite_tasks(params.values())


class VIRun:
    """Plain (non-differentiable) VI for all tasks, one step per :meth:`step`, with rollback.

    A task whose step produces a non-finite value keeps its previous
    parameters and has its step size halved, with a ``RuntimeWarning``; after
    ``max_failures`` consecutive failures a :class:`NonFiniteError` is raised.
    :attr:`params` and :attr:`state` always hold the last completed step, so
    that an interrupt (``KeyboardInterrupt``) loses nothing.

    Parameters
    ----------
    model, divergence, optimizer
        As for :func:`inner_step`.
    params, state : dict
        Starting parameters (M, ...) and optimiser state.
    tasks : TaskBatch
    n_particles : int
    generator : torch.Generator or a noise object
    batch_size : int, default=None
    max_failures : int, default=10
    budget : torch.Tensor of shape (M,), default=None
        Steps per task: a task stops changing after its budget (tasks of
        different sizes adapted together for a number of epochs each).
    compile : bool, default=False
        Take the steps with :class:`skmetavi._compiled.CompiledStep` (one
        ``torch.compile`` graph per step) where the configuration allows it;
        otherwise, or if compiling fails, eagerly with a ``RuntimeWarning``.
    """

    def __init__(self, model, divergence, optimizer, params, state, tasks, *, n_particles,
                 generator, batch_size=None, max_failures=10, budget=None, compile=False):
        self.model, self.divergence, self.optimizer = model, divergence, optimizer
        self.params, self.state, self.tasks = params, state, tasks
        self.n_particles, self.generator = n_particles, generator
        self.batch_size, self.max_failures = batch_size, max_failures
        M = next(iter(params.values())).shape[0]
        self.budget = None if budget is None else torch.as_tensor(budget).cpu()
        self.failures = torch.zeros(M, dtype=torch.long)
        self._any_failures = False
        self.n_iter = 0
        self._compiled = None
        adapt_heap(tasks.X.device)  # once per process: glibc reuses the steps' freed buffers
        if compile:
            from skmetavi._compiled import CompiledStep, unsupported_reason

            reason = unsupported_reason(model, divergence, optimizer, tasks, batch_size)
            if reason is None:
                self._compiled = CompiledStep(model, divergence, optimizer, tasks)
            else:
                warnings.warn(f"compile=True is not supported here: {reason}; the inner steps "
                              "run eagerly.", RuntimeWarning, stacklevel=2)

    def step(self) -> torch.Tensor:
        """One inner step for all tasks; returns the bound per task (NaN where not applied)."""
        params, state = self.params, self.state
        out = eps = None
        if self._compiled is not None:
            eps = self.model.sample_eps(params, self.tasks, self.n_particles,
                                        generator=self.generator)
            out = self._compiled(params, state, eps)
            if out is None:  # compilation failed (warned): eager from now on, same noise
                self._compiled = None
        if out is not None:
            new, new_state, st = out  # st.finite covers the new parameters too
        else:
            new, new_state, st = inner_step(
                self.model, self.divergence, self.optimizer, params, state, self.tasks,
                n_particles=self.n_particles, generator=self.generator,
                batch_size=self.batch_size, eps=eps,
            )
        ok = (st.finite if out is not None else st.finite & finite_params(new)).cpu()
        if bool(ok.all()) and (self.budget is None or not self.budget.numel()
                               or self.n_iter < int(self.budget.min())):
            # Every task finite and running: nothing to roll back.
            if self._any_failures:
                self.failures.zero_()
                self._any_failures = False
            self.params, self.state = new, new_state
            self.n_iter += 1
            return st.bound
        active = torch.ones_like(ok) if self.budget is None else self.n_iter < self.budget
        failures = self.failures
        bad = (active & ~ok).nonzero().flatten()
        if bad.numel():
            failures[bad] += 1
            failures[ok] = 0
            warnings.warn(
                f"Non-finite values at inner iteration {self.n_iter} for task(s) "
                f"{bad.tolist()[:10]}; the step was rolled back and its step size "
                "halved.",
                RuntimeWarning,
                stacklevel=3,
            )
            if int(failures.max()) >= self.max_failures:
                raise NonFiniteError(
                    f"{self.max_failures} consecutive non-finite inner steps (task(s) "
                    f"{bad.tolist()[:10]}). Likely causes: a learning rate that is too "
                    "large, an extreme divergence (alpha far from 1 or a learned "
                    "f-divergence with huge weights), or a model whose log density is "
                    "not finite everywhere. Try a smaller inner_lr."
                )
        else:
            failures.zero_()
        self._any_failures = bool(failures.any())
        apply = ok & active
        if not bool(apply.all()):
            dev = apply.to(new[next(iter(new))].device)

            def keep(t_new, t_old):
                return torch.where(dev.reshape((-1,) + (1,) * (t_new.ndim - 1)), t_new, t_old)

            new = _tree.tree_map(keep, new, params)
            new_state = _tree.tree_map(keep, new_state, state)
            failed = (active & ~ok).to(dev.device)
            new_state["lr_scale"] = torch.where(
                failed, new_state["lr_scale"] * 0.5, new_state["lr_scale"]
            )
        self.params, self.state = new, new_state
        self.n_iter += 1
        return torch.where(apply.to(st.bound.device), st.bound, torch.nan)


def run_vi(
    model,
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
    callback=None,
):
    """Plain (non-differentiable) VI for all tasks, with rollback on non-finite steps.

    ``n_steps`` steps of :class:`VIRun`; ``callback(it, params, state, bound)``
    after each.

    Returns
    -------
    params, state, bound_curve : dict, dict, list of torch.Tensor (M,)
    """
    run = VIRun(model, divergence, optimizer, params, state, tasks, n_particles=n_particles,
                generator=generator, batch_size=batch_size, max_failures=max_failures)
    curve = []
    for it in range(n_steps):
        bound = run.step()
        curve.append(bound)
        if callback is not None:
            callback(it, run.params, run.state, bound)
    return run.params, run.state, curve
