"""First-order meta-gradients without a graph per inner step (memory nearly flat in B).

``mode="first_order"`` takes the Jacobian of every inner step in phi as the
identity and keeps only the step's direct dependence on eta (the divergence's
parameters, and any other tensor that requires grad and that the direction
reads): ``phi_{b+1} = phi_b + Delta_b(eta)`` with ``Delta_b = update(sg phi_b;
eta) - sg phi_b``.  Keeping the autograd graph of every ``Delta_b`` until the
outer backward costs memory linear in B (one second-order graph per step).

Here each ``Delta_b`` is the output of a :class:`torch.autograd.Function`
whose forward runs the step without any graph and saves only what the step
read: phi_b (the minibatch's rows of per-row parameters), the optimiser state,
the noise eps and the minibatch's rows, i.e. tensors of the size of the
parameters.  Its backward recomputes the direction at the saved phi_b with
``create_graph=True`` and returns the vector-Jacobian product to eta; the
identity edge to phi_b is plain autograd (``phi_b + Delta_b``).  The values
and the meta-gradient are those of the graph-keeping implementation (kept
reachable through :data:`RECOMPUTE`), at the price of one more direction
evaluation per step in the backward pass.

The tensors eta are found once per inner loop: the divergence's parameters
that require grad, plus every tensor requiring grad that is not computed in
the step but read by it (seen by a :class:`~torch.overrides.TorchFunctionMode`
during the first step), e.g. a captured meta-parameter of a custom target.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable
from torch.overrides import TorchFunctionMode

from skmetavi import _tree
from skmetavi._tasks import TaskBatch, gather_rows, minibatch

__all__ = ["RECOMPUTE", "FirstOrderSteps"]

#: Private switch: False falls back to the graph-keeping first-order steps
#: (``inner_step(..., create_graph=True, first_order_chain=True)``, memory linear in B),
#: the reference of the tests.
RECOMPUTE = True

_PLACEHOLDER = torch.empty(0)


def _flatten(tree):
    """``(leaves, template)``: the tensor leaves and the tree with placeholders."""
    leaves = list(_tree.tree_leaves(tree))
    return leaves, _tree.tree_map(lambda t: _PLACEHOLDER, tree)


def _unflatten(template, leaves):
    it = iter(leaves)
    return _tree.tree_map(lambda _: next(it), template)


class _ExternalInputs(TorchFunctionMode):
    """Records the tensors requiring grad that ops read but that no op in the mode made."""

    def __init__(self, internal):
        super().__init__()
        self.internal = {id(t): t for t in internal}
        self.found = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _tree.tree_leaves((args, kwargs)):
            if t.requires_grad and id(t) not in self.internal:
                self.found.setdefault(id(t), t)
        out = func(*args, **kwargs)
        for t in _tree.tree_leaves(out):
            if t.requires_grad:  # only these are tested above
                self.internal[id(t)] = t  # kept alive, so that no id is reused
        return out


def _task_leaves(tasks):
    keys = list(tasks.fields)
    leaves = [tasks.fields[k] for k in keys] + [tasks.mask, tasks.lik_scale]
    if tasks.rows is not None:
        leaves.append(tasks.rows)
    return leaves, (keys, tasks.rows is not None)


def _task_batch(leaves, spec):
    keys, has_rows = spec
    n = len(keys)
    return TaskBatch(dict(zip(keys, leaves[:n])), leaves[n], leaves[n + 1],
                     leaves[n + 2] if has_rows else None)


class _Recompute(torch.autograd.Function):
    """``Delta_b(eta)``: values computed without a graph, VJP recomputed in backward."""

    @staticmethod
    def forward(ctx, info, *eta):
        ctx.info = info.pop("spec")
        ctx.save_for_backward(*info.pop("saved"))
        return tuple(info.pop("delta"))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grad_delta):
        from skmetavi._inner import inner_direction

        spec = ctx.info
        saved = ctx.saved_tensors
        n_p, n_s, n_e = spec["counts"]
        view = _unflatten(spec["params"], saved[:n_p])
        state = _unflatten(spec["state"], saved[n_p:n_p + n_s])
        eps = _unflatten(spec["eps"], saved[n_p + n_s:n_p + n_s + n_e])
        tasks = _task_batch(saved[n_p + n_s + n_e:], spec["tasks"])
        keys, local = spec["keys"], spec["local"]
        eta = spec["eta"]
        with torch.enable_grad():
            leaf = {k: v.detach().requires_grad_(True) for k, v in view.items()}
            direction, _ = inner_direction(spec["model"], spec["divergence"], leaf, tasks, eps,
                                           create_graph=True)
            new, _ = spec["optimizer"].update(view, direction, state)
            outputs, grads_out = [], []
            for k, g in zip(keys, grad_delta):
                if g is None or not new[k].requires_grad:
                    continue
                if k in local:  # Delta = scatter(0, rows, new_view - view): VJP gathers the rows
                    g = gather_rows(g, tasks.rows)
                outputs.append(new[k])
                grads_out.append(g)
            if not outputs:
                return (None,) + (None,) * len(eta)
            grads = torch.autograd.grad(outputs, eta, grads_out, allow_unused=True)
        return (None,) + tuple(grads)


class FirstOrderSteps:
    """First-order inner steps of one inner loop, with recomputation in the backward pass.

    ``step(params, state, tasks)`` returns ``(params, state, stats)`` as
    ``inner_step(..., create_graph=True, first_order_chain=True)`` does, with
    the same values and the same meta-gradient; the returned state is detached
    (the first-order mode drops eta's effect through it anyway).
    """

    def __init__(self, model, divergence, optimizer, *, n_particles, generator, batch_size=None):
        self.model, self.divergence, self.optimizer = model, divergence, optimizer
        self.n_particles, self.generator, self.batch_size = n_particles, generator, batch_size
        self.eta = None

    def _discover(self, internal, run):
        """Run ``run()`` and collect eta: the divergence's parameters, then external reads."""
        eta = {id(p): p for p in self.divergence.parameters() if p.requires_grad}
        with _ExternalInputs(internal) as watch:
            out = run()
        for i, t in watch.found.items():
            eta.setdefault(i, t)
        self.eta = list(eta.values())
        return out

    def step(self, params, state, tasks):
        from skmetavi._inner import _gather_local, _local_rows, _scatter_local, inner_direction

        model, optimizer = self.model, self.optimizer
        if self.batch_size is not None:
            tasks = minibatch(tasks, self.batch_size, self.generator)
        rows = _local_rows(model, tasks)
        base, base_state = _tree.detach(params), _tree.detach(state)
        if rows is not None:
            view, view_state = _gather_local(model, optimizer, base, base_state, rows)
        else:
            view, view_state = base, base_state
        eps = model.sample_eps(view, tasks, self.n_particles, generator=self.generator)

        with torch.enable_grad():
            leaf = {k: v.detach().requires_grad_(True) for k, v in view.items()}

            def run():
                # The update is watched too: a tensor it reads that requires grad (a
                # learned step size) is part of eta like the divergence's parameters.
                direction, stats = inner_direction(model, self.divergence, leaf, tasks, eps,
                                                   create_graph=False)
                return stats, optimizer.update(view, _tree.detach(direction), view_state)

            if self.eta is None:
                stats, (new, new_state) = self._discover(
                    list(leaf.values()) + list(_tree.tree_leaves(eps)), run)
            else:
                stats, (new, new_state) = run()
        new, new_state = _tree.detach(new), _tree.detach(new_state)
        if rows is not None:
            new, new_state = _scatter_local(model, optimizer, base, base_state, new, new_state,
                                            rows)
        keys = list(params)
        delta = [new[k] - base[k] for k in keys]
        if self.eta and torch.is_grad_enabled():
            p_leaves, p_template = _flatten(view)
            s_leaves, s_template = _flatten(view_state)
            e_leaves, e_template = _flatten(eps)
            t_leaves, t_spec = _task_leaves(tasks)
            info = {
                "delta": delta,
                "saved": p_leaves + s_leaves + e_leaves + t_leaves,
                "spec": {
                    "model": model, "divergence": self.divergence, "optimizer": optimizer,
                    "params": p_template, "state": s_template, "eps": e_template,
                    "tasks": t_spec, "counts": (len(p_leaves), len(s_leaves), len(e_leaves)),
                    "keys": keys, "local": set() if rows is None else set(model.local_keys),
                    "eta": self.eta,
                },
            }
            delta = _Recompute.apply(info, *self.eta)
        # phi_{b+1} = phi_b + Delta_b(eta): identity Jacobian in phi.
        out = {k: params[k] + d for k, d in zip(keys, delta)}
        return out, _tree.detach(new_state), stats
