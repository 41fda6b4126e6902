"""A compiled (``torch.compile``) meta-iteration: B differentiable inner steps and J in one graph.

One chunk of an outer iteration (Algorithms 1 and 2, lines 6-7: the inner
steps of every sampled task, differentiable in eta, then the meta-loss J on
the query rows) is written as a pure function of eta (the divergence's
parameters, substituted with :func:`torch.func.functional_call`), the starting
phi_i and the noise, and differentiated with
:func:`torch.func.grad_and_value`; the whole transform is compiled by
``torch.compile``.  Each inner direction is a :func:`torch.func.vjp` of the
log weights with the divergence's particle weights, so the meta-gradient
includes the weights' dependence on phi and eta exactly as the eager engine's
``create_graph=True`` steps do (checked against it in the tests).

The noise is drawn outside the graph from the iteration's
:class:`~skmetavi._tasks.TaskNoise` in the eager order, so a compiled
iteration sees the same numbers as an eager one and agrees with it to
rounding.  The meta-gradient of eta is accumulated into the parameters'
``.grad`` and, for Algorithm 2, that of the starting phi is pushed back into
the shared initialisation by one ordinary ``backward``: the outer loop
(finiteness checks, rollback, clipping, distribution) is the same for both
paths.

Supported: ``meta_gradient="full"``, one global latent without site weights
or per-row parameters, no minibatch, at least one inner step, a divergence
that is not local (Renyi, the f-divergences with their path derivative, a
learned :class:`~skmetavi.divergences.NeuralF`, ...), skmetavi's SGD and Adam,
and a meta-loss of :class:`~skmetavi._meta_losses.PredictiveNLL`,
:class:`~skmetavi._meta_losses.NegativeEvidence` (without ``batch_size``) or
:class:`~skmetavi._meta_losses.QuadratureLoss`.  Anything else runs eagerly
(:func:`unsupported_reason` says why).  Compiled graphs are cached like the
plain step's (:mod:`skmetavi._compiled`): per configuration, up to
:data:`~skmetavi._compiled.RECOMPILE_LIMIT` per process.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import warnings

import torch

from skmetavi import _tree
from skmetavi._compiled import (TensorLR, call_compiled, compile_function, describe_failure,
                                recompile_limit, wants_cpp_wrapper)
from skmetavi._compiled import unsupported_reason as step_unsupported_reason
from skmetavi._inner import _finite_tasks, significant_weights
from skmetavi._meta_losses import NegativeEvidence, PredictiveNLL, QuadratureLoss

__all__ = ["CompiledMetaStep", "unsupported_reason"]


def unsupported_reason(trainer):
    """Why a :class:`~skmetavi._trainer.MetaTrainer` cannot compile its iteration, or None.

    On top of what the compiled plain step needs
    (:func:`skmetavi._compiled.unsupported_reason`): something to meta-learn,
    inner steps, the full meta-gradient and a built-in meta-loss.
    """
    model = trainer.model
    if not trainer.differentiable:
        return "nothing is meta-learned (no divergence parameter and no learned initialisation)"
    if trainer.n_inner_steps < 1:
        return "there are no inner steps"
    if trainer.mode != "full":
        return f"meta_gradient={trainer.mode!r} (only 'full' is compiled)"
    reason = step_unsupported_reason(model, trainer.divergence, trainer.inner_optimizer,
                                     trainer.support, trainer.batch_size)
    if reason is not None:
        return reason
    loss = trainer.meta_loss
    if type(loss) is PredictiveNLL and not getattr(model, "has_likelihood", False):
        return "the predictive NLL needs a per-row likelihood (the eager path says why)"
    if type(loss) is NegativeEvidence and loss.batch_size is not None:
        return "the meta-loss NegativeEvidence has a batch_size"
    if type(loss) not in (PredictiveNLL, NegativeEvidence, QuadratureLoss):
        return f"the meta-loss {type(loss).__name__} is not one of skmetavi's built-in ones"
    return None


class _Weights(torch.nn.Module):
    """The divergence's particle weights as a module's ``forward`` (for ``functional_call``)."""

    def __init__(self, divergence):
        super().__init__()
        self.divergence = divergence

    def forward(self, log_w):
        return significant_weights(self.divergence.particle_weights, log_w)


def _meta_loss(meta_loss, model, params, query, eps):
    """J per task (m,) from noise drawn beforehand (``eps`` None: a loss that draws none)."""
    if eps is None:
        return meta_loss(model, params, query)
    return meta_loss.evaluate(model, params, query, eps)


def _direction(eta, params, weights, model, tasks, eps):
    """The ascent direction of one step, ``(direction, finite (m,), log_p, log_q)``.

    The weights' dependence on phi and eta stays in the graph, as with the
    eager engine's ``create_graph=True``.  Path-derivative divergences (Eq. 8)
    take ``d l / d z`` at fixed phi and pull it back through ``z = r_phi(eps)``.
    """
    path = weights.divergence.path_derivative
    if path:
        var_keys = tuple(model.variational_keys)
        var = {k: params[k] for k in var_keys}
        z, pull_z = torch.func.vjp(lambda v: model.rsample({**params, **v}, tasks, eps), var)

        def log_weights(z, p):
            log_p = model.log_p(p, tasks, z)
            log_q = model.log_q(p, tasks, z)  # its z-dependence is what d/dz needs
            return log_p - log_q, (log_p, log_q)

        log_w, pullback, (log_p, log_q) = torch.func.vjp(log_weights, z, params, has_aux=True)
    else:

        def log_weights(p):
            z = model.rsample(p, tasks, eps)
            log_p = model.log_p(p, tasks, z)  # (m, 1, K)
            # The same function of phi as log q(r_phi(eps)), all derivatives included.
            log_q = model.log_q_reparameterised(p, tasks, eps)
            return log_p - log_q, (log_p, log_q)

        log_w, pullback, (log_p, log_q) = torch.func.vjp(log_weights, params, has_aux=True)
    ok = _finite_tasks([log_w.detach()])
    keep = ok.reshape(-1, 1, 1)
    zero = torch.zeros_like(log_w)
    w = torch.func.functional_call(weights, eta, (torch.where(keep, log_w, zero),))
    w = torch.where(keep, w, zero)
    if path:
        dz, direct = pullback(w)
        (g_var,) = pull_z(dz)
        # Model parameters (a noise scale) follow sum_k w_k d log p(z_k) / d theta: their
        # partial derivative at fixed z, which is the eager path's total one because a
        # GlobalLatent's rsample and log_q read only the family's (variational) parameters.
        direction = {k: g_var[k] if k in g_var else direct[k] for k in params}
    else:
        (direction,) = pullback(w)
    return direction, ok & _finite_tasks(direction.values()), log_p, log_q


def _objective(eta, params, state, weights, model, optimizer, meta_loss, support, query,
               inner_eps, loss_eps, n_total):
    """``sum_i J_i / n_total`` after B steps, and ``(J, phi', state', finite, bound)``.

    ``loss_eps`` holds one noise per meta-loss evaluation (one, or B + 1 for a
    multi-step loss, which averages them).  ``finite`` (m,) is False for a task
    whose log weights, direction or parameters became non-finite at some step
    (its weights are zero from then on, as on the eager path).
    """
    finite = None
    losses = []
    if len(loss_eps) > 1:  # multi-step: J before the first step too
        losses.append(_meta_loss(meta_loss, model, params, query, loss_eps[0]))
    for b, eps in enumerate(inner_eps):
        direction, ok, log_p, log_q = _direction(eta, params, weights, model, support, eps)
        finite = ok if finite is None else finite & ok
        params, state = optimizer.update(params, direction, state, differentiable=True)
        if len(loss_eps) > 1:
            losses.append(_meta_loss(meta_loss, model, params, query, loss_eps[b + 1]))
    if len(loss_eps) == 1:
        J = _meta_loss(meta_loss, model, params, query, loss_eps[0])
    else:
        J = torch.stack(losses).mean(0)
    finite = finite & _finite_tasks(params.values())
    bound = weights.divergence.bound(log_p.detach(), log_q.detach())[:, 0]
    aux = (J.detach(), _tree.detach(params), _tree.detach(state), finite, bound.detach())
    return J.sum() / n_total, aux


def _meta_gradient_eta(*args):
    return torch.func.grad_and_value(_objective, argnums=0, has_aux=True)(*args)


def _meta_gradient_eta_init(*args):
    return torch.func.grad_and_value(_objective, argnums=(0, 1), has_aux=True)(*args)


_compiled = {}


def _get_compiled(with_init, cpp_wrapper=False):
    """The process-wide compiled meta-gradient (of eta, or of eta and the starting phi).

    ``cpp_wrapper``: with Inductor's C++ wrapper (:func:`skmetavi._compiled.wants_cpp_wrapper`;
    measured on a 2-core Intel Xeon, 3 alternating rounds of one process each, the benchmark's
    meta-iteration of 16 tasks with 40 rows each 0.0254-0.0265 vs 0.0261-0.0289 s, with 1000
    rows 0.274-0.280 vs 0.257-0.284 s, within the noise).
    """
    key = (with_init, cpp_wrapper)
    if key not in _compiled:
        fn = _meta_gradient_eta_init if with_init else _meta_gradient_eta
        _compiled[key] = compile_function(fn, cpp_wrapper=cpp_wrapper)
    return _compiled[key]


class CompiledMetaStep:
    """Lines 6-7 of a :class:`~skmetavi._trainer.MetaTrainer` chunk, compiled.

    Calling it with ``(params, state, support, query, noise, n_total)`` draws
    the noise, runs the compiled meta-gradient, accumulates it into eta's
    ``.grad`` (and the initialisation's, Algorithm 2) when J and every task's
    steps are finite, and returns ``(J (m,), new params, new state, ok,
    bound (m,))``, or None when compiling
    or running failed: then a ``RuntimeWarning`` is issued, :attr:`failed` is
    set and the caller takes the eager path (with the same noise: the draws
    are replayed).
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.weights = _Weights(trainer.divergence)
        # eta, by the names functional_call substitutes in the weights module.
        self.eta = [(f"divergence.{name}", p) for name, p in trainer.divergence.named_parameters()
                    if p.requires_grad]
        self.lr = TensorLR(trainer.inner_optimizer)
        self.failed = False
        self.cpp_wrapper = wants_cpp_wrapper(trainer.support.X.device)

    def _draw(self, params, support, query, noise):
        """The noise of the inner steps and of J, in the eager path's order of draws."""
        tr = self.trainer
        K, B = tr.n_particles, tr.n_inner_steps
        loss = tr.meta_loss
        draws_loss = type(loss) is not QuadratureLoss

        def loss_eps():
            if not draws_loss:
                return None
            return tr.model.sample_eps(params, query, loss.n_particles, generator=noise)

        inner, losses = [], []
        if tr.multi_step_loss:
            losses.append(loss_eps())
        for _ in range(B):
            inner.append(tr.model.sample_eps(params, support, K, generator=noise))
            if tr.multi_step_loss:
                losses.append(loss_eps())
        if not tr.multi_step_loss:
            losses.append(loss_eps())
        return inner, losses

    def __call__(self, params, state, support, query, noise, n_total):
        tr = self.trainer
        reason = unsupported_reason(tr)  # the trainer's settings may have changed since
        if reason is not None:
            self.failed = True
            warnings.warn(f"compile is not supported for this meta-iteration any more: "
                          f"{reason}; it runs eagerly.", RuntimeWarning, stacklevel=4)
            return None
        start_counter = getattr(noise, "counter", None)
        inner_eps, loss_eps = self._draw(params, support, query, noise)
        with_init = tr.learn_init
        eta = {name: p.detach() for name, p in self.eta}
        start = {k: v.detach() for k, v in params.items()}
        try:
            optimizer = self.lr.optimizer(next(iter(start.values())))
            args = (eta, start, state, self.weights, tr.model, optimizer, tr.meta_loss,
                    support, query, inner_eps, loss_eps, n_total)
            with torch.no_grad(), recompile_limit():
                grads, (_, aux) = call_compiled(
                    self, lambda cpp_wrapper: _get_compiled(with_init, cpp_wrapper), args)
        except Exception as exc:  # noqa: BLE001 - any compiler error falls back to eager
            self.failed = True
            if start_counter is not None:
                noise.counter = start_counter  # the eager path draws the same noise
            warnings.warn(
                f"compile: the compiled meta-iteration failed ({describe_failure(exc)}); "
                "continuing with the eager one.", RuntimeWarning, stacklevel=4)
            return None
        J, new_params, new_state, finite, bound = aux
        ok = bool(torch.isfinite(J.sum())) and bool(finite.all())  # as the eager path
        if ok:
            g_eta, g_start = grads if with_init else (grads, None)
            for name, p in self.eta:  # accumulated over the chunks, as backward() does
                p.grad = g_eta[name] if p.grad is None else p.grad + g_eta[name]
            if g_start is not None:
                outs = [(params[k], g_start[k]) for k in params if params[k].grad_fn is not None]
                if outs:
                    torch.autograd.backward([o for o, _ in outs], [g for _, g in outs])
        return J, new_params, new_state, ok, bound
