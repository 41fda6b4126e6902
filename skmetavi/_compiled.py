"""A compiled (``torch.compile``) plain VI step: forward, backward and update in one graph.

Plain ``fit`` takes many non-differentiable inner steps, each a few hundred
small kernels on the eager path.  :class:`CompiledStep` traces one whole step
-- particles, log weights, the divergence's weights, the direction (as the
gradient of the surrogate ``sum_k sg(w_k) l_k``, whose gradient in the
parameters is the engine's ``sum_k w_k d l_k / d phi``), the optimiser update,
the monitoring bound and the finiteness checks -- into one graph that the
inductor compiles and fuses.  The noise is drawn outside the graph from the
run's generator, so a compiled run draws the same numbers as an eager one and
agrees with it to floating-point rounding.

Supported: one global latent (:class:`~skmetavi.models.GlobalLatent`, no site
weights), no minibatch, no per-row parameters, a divergence that is not local
(path-derivative ones included: the f-divergences and a learned
:class:`~skmetavi.divergences.NeuralF`), and the built-in SGD and Adam.
Anything else runs eagerly (:func:`unsupported_reason` says why).  A compilation failure is
reported as a ``RuntimeWarning`` and the run continues eagerly.

Compiled graphs are cached by ``torch.compile`` on the step function's code,
guarded on the shapes and dtypes of the inputs and on the constants the step
reads (Adam's betas and eps, the divergence's type and fixed settings, the
model's architecture and likelihood): repeated fits of the same configuration
reuse them, and so do other learning rates (passed as a tensor) and other
values of a divergence's parameters (module parameters are graph inputs);
another number of rows or tasks recompiles once with dynamic shapes (then
no more); a new architecture, dtype, number of particles or divergence class
compiles anew, up to :data:`RECOMPILE_LIMIT` configurations per process.  A
changed module-level constant or a redefined function of the user's log
density recompiles too; a method monkeypatched onto an existing class after
a compiled fit is *not* seen (a ``torch.compile`` limitation: call
``torch._dynamo.reset()`` after such a patch).  The inductor keeps its
generated code on disk, so a second process compiles faster.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import types
import warnings

import torch

from skmetavi._inner import StepStats, _finite_tasks, negligible_to_zero
from skmetavi._optim import SGD, Adam
from skmetavi.models._protocol import GlobalLatent

__all__ = ["CompiledStep", "TensorLR", "call_compiled", "compile_function", "describe_failure",
           "recompile_limit", "unsupported_reason"]


def unsupported_reason(model, divergence, optimizer, tasks, batch_size):
    """Why a run cannot use :class:`CompiledStep` (a sentence), or None when it can."""
    if not isinstance(model, GlobalLatent):
        return f"the model {type(model).__name__} is not a GlobalLatent"
    if batch_size is not None:
        return "batch_size is set (minibatches)"
    if tuple(getattr(model, "local_keys", ())):
        return "the model has per-row parameters"
    if model.site_weights(tasks) is not None:
        return "the model has site weights"
    if divergence.local:
        return f"{type(divergence).__name__} is a local divergence (per-row weights)"
    if type(optimizer) not in (SGD, Adam):
        return f"the inner optimiser {type(optimizer).__name__} is not skmetavi's SGD or Adam"
    return None


def _plain_step(model, divergence, optimizer, params, state, tasks, eps):
    """One plain VI step of :func:`skmetavi._inner.inner_step` (no graph), as one function.

    Returns ``(new_params, new_state, bound, finite)``; ``finite`` (M,) is
    False for a task whose log weights, direction or new parameters are not
    all finite (that task's weights are zero, as on the eager path).
    """

    var_keys = tuple(model.variational_keys)

    def surrogate(p):
        z = model.rsample(p, tasks, eps)
        log_p = model.log_p(p, tasks, z)  # (M, 1, K)
        if divergence.path_derivative:
            # Eq. (8): log q with q's parameters held fixed, so the gradient reaches them
            # through the particles only (d l / d z pulled back through z = r_phi(eps)).
            log_q = model.log_q({k: v.detach() if k in var_keys else v for k, v in p.items()},
                                tasks, z)
        else:
            log_q = model.log_q_reparameterised(p, tasks, eps)
        log_w = log_p - log_q
        lw = log_w.detach()
        finite = _finite_tasks([lw])
        keep = finite.reshape(-1, 1, 1)
        zero = torch.zeros_like(lw)
        w = negligible_to_zero(divergence.particle_weights(torch.where(keep, lw, zero)))
        w = torch.where(keep, w, zero)
        return (w * log_w).sum(), (log_p.detach(), log_q.detach(), finite)

    direction, (log_p, log_q, finite) = torch.func.grad(surrogate, has_aux=True)(params)
    new, new_state = optimizer.update(params, direction, state)
    bound = divergence.bound(log_p, log_q)[:, 0]
    finite = finite & _finite_tasks([*direction.values(), *new.values()])
    return new, new_state, bound, finite


#: The compiled :func:`_plain_step`, with and without Inductor's C++ wrapper.
_compiled_steps = {}


#: Global names whose guards are dropped: torch's own functions and modules and Python's
#: builtins (nobody replaces ``torch.log`` or ``len`` between two fits).
_UNGUARDED_GLOBALS = ("G['torch']", "G['__import_torch", "G['__builtins_dict")

#: Recompilations allowed for the one compiled step (dynamo's default is 8): one per
#: configuration (model, divergence class, dtype, particles, ...) of a process.
RECOMPILE_LIMIT = 64

#: Whether ``torch.compile`` takes ``recompile_limit`` (torch >= 2.13): then the limit is the
#: compiled function's own; on older torch it is raised around every call.
_OWN_LIMIT = "recompile_limit" in inspect.signature(torch.compile).parameters


def compile_function(fn, *, cpp_wrapper=False):
    """``torch.compile`` of ``fn`` as both compiled paths use it (one graph, guard filter).

    ``cpp_wrapper``: with Inductor's C++ wrapper (:func:`wants_cpp_wrapper`).
    """
    kw = {"recompile_limit": RECOMPILE_LIMIT} if _OWN_LIMIT else {}
    options = {"guard_filter_fn": _guard_filter}
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    return torch.compile(fn, dynamic=None, fullgraph=True, options=options, **kw)


def call_compiled(owner, get_compiled, args):
    """``get_compiled(owner.cpp_wrapper)(*args)``; a failing C++ wrapper is retried without it.

    After such a failure ``owner.cpp_wrapper`` is False for good.  A reached
    recompile limit is raised as it is (the other graph would not help).
    """
    if owner.cpp_wrapper:
        try:
            return get_compiled(True)(*args)
        except Exception as exc:  # noqa: BLE001 - once more without the C++ wrapper
            if _is_recompile_limit(exc):
                raise
            owner.cpp_wrapper = False
    return get_compiled(False)(*args)


def _is_recompile_limit(exc):
    return "RecompileLimit" in type(exc).__name__


def recompile_limit():
    """A context for calling a compiled function: dynamo's limit raised on older torch."""
    if _OWN_LIMIT:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)


def _guard_filter(entries):
    """Keep every guard a user's change can trip; drop those on torch and the builtins.

    Checking the ~100 guards on ``torch.*`` attributes, torch's modules and
    builtins costs several hundred microseconds per step; they cannot change
    between fits.  Kept: everything else -- tensor shapes, dtypes and devices,
    types, the constants the step reads (learning rate, betas, architecture,
    the divergence's fixed settings), the user's globals (a module-level
    constant of a log density) and the code of every method and function
    outside torch (a redefined or monkeypatched log density recompiles).
    """
    return [not (e.is_global and (e.name.startswith(_UNGUARDED_GLOBALS)
                                  or isinstance(e.value, types.ModuleType)))
            for e in entries]


def wants_cpp_wrapper(device):
    """Whether the compiled paths for tensors on ``device`` use Inductor's C++ wrapper.

    On the CPU, unless the environment sets ``TORCHINDUCTOR_CPP_WRAPPER``
    (then Inductor's own setting is used).  The C++ wrapper calls the step's
    ~70 kernels and allocations from C++ instead of Python: measured on a
    2-core Intel Xeon (3 alternating rounds, one process each), a BNN step at
    N = 40 0.26-0.28 vs 0.29-0.33 ms and at N = 1000 1.25-1.30 vs 1.29-1.34
    ms (the rounds' medians).  Not measured on accelerators: off there.
    """
    return torch.device(device).type == "cpu" and "TORCHINDUCTOR_CPP_WRAPPER" not in os.environ


def _get_compiled(cpp_wrapper=False):
    """The process-wide compiled :func:`_plain_step` (one cache for every run)."""
    if cpp_wrapper not in _compiled_steps:
        _compiled_steps[cpp_wrapper] = compile_function(_plain_step, cpp_wrapper=cpp_wrapper)
    return _compiled_steps[cpp_wrapper]


class TensorLR:
    """Hand out a copy of an optimiser whose ``lr`` is a 0-d tensor (an input, not a constant).

    A float ``lr`` would be baked into a compiled graph and recompile for
    every learning rate (a grid search over ``inner_lr``); as a tensor of the
    parameters' dtype it gives the same products bit for bit (a Python
    scalar is rounded to that dtype as well).  A changed ``optimizer.lr`` (a
    schedule) is followed.
    """

    def __init__(self, optimizer):
        self.source = optimizer
        self._traced, self._lr = None, None

    def optimizer(self, ref):
        """Return the copy, its ``lr`` a tensor of ``ref``'s dtype and device."""
        lr = float(self.source.lr)
        if self._traced is None:
            opt = copy.copy(self.source)
            opt.lr = torch.tensor(lr, dtype=ref.dtype, device=ref.device)
            self._traced, self._lr = opt, lr
        elif lr != self._lr:
            self._traced.lr.fill_(lr)
            self._lr = lr
        return self._traced


def describe_failure(exc):
    """Say why compiling failed, in a clause for a warning."""
    if _is_recompile_limit(exc):
        return (f"this process has already compiled it for {RECOMPILE_LIMIT} "
                "configurations (model, divergence class, dtype, particles, ...)")
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


class CompiledStep:
    """The compiled plain step of a :class:`~skmetavi._inner.VIRun`.

    Calling it with ``(params, state, eps)`` returns ``(new_params, new_state,
    stats)`` as :func:`~skmetavi._inner.inner_step` would.  The first call
    compiles (tens of seconds on a CPU, less with the inductor's on-disk
    cache).  On the CPU it compiles with Inductor's C++ wrapper
    (:func:`wants_cpp_wrapper`); if that raises, it compiles once more
    without it.  If compiling or running the compiled code still raises, a
    ``RuntimeWarning`` is issued, :attr:`failed` is set and the caller falls
    back to the eager step.
    """

    def __init__(self, model, divergence, optimizer, tasks):
        self.model, self.divergence, self.optimizer, self.tasks = model, divergence, optimizer, tasks
        self.failed = False
        self._lr = TensorLR(optimizer)
        self.cpp_wrapper = wants_cpp_wrapper(tasks.X.device)

    def __call__(self, params, state, eps):
        try:
            optimizer = self._lr.optimizer(eps)
            with torch.no_grad(), recompile_limit():
                new, new_state, bound, finite = call_compiled(
                    self, _get_compiled,
                    (self.model, self.divergence, optimizer, params, state, self.tasks, eps))
        except Exception as exc:  # noqa: BLE001 - any compiler error falls back to eager
            self.failed = True
            why = describe_failure(exc)
            warnings.warn(
                f"compile=True: the compiled inner step failed ({why}); continuing with the "
                "eager step.",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        return new, new_state, StepStats(bound, finite)
