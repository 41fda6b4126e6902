"""Where each sampled task's inner loop starts: Algorithm 1 or Algorithm 2.

- :class:`PersistentTaskParams` (Algorithm 1, Meta-D): one parameter set
  ``phi_i`` (and inner optimiser state) per training task, persisting across
  outer iterations; after each outer step the sampled tasks store their updated
  ``phi_i'``.
- :class:`LearnedInit` (Algorithm 2, Meta-D&phi): one shared initialisation
  ``phi`` that every sampled task starts from (with a fresh optimiser state),
  itself a meta-parameter updated by Adam with step size ``init_lr`` (tau).

Both have the same small interface, so the outer loop reads the same for
both algorithms.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

from skmetavi import _distributed, _tree

__all__ = ["PersistentTaskParams", "LearnedInit"]


def _load_(dst, src):
    """Copy ``src`` into the tensors of ``dst`` (in place, keeping device and dtype)."""

    def copy(d, s):
        with torch.no_grad():
            d.copy_(s.to(d.device, d.dtype))
        return d

    _tree.tree_map(copy, dst, src)


class PersistentTaskParams:
    """Algorithm 1: phi_i persists per training task across outer iterations.

    Parameters
    ----------
    init_params : dict of torch.Tensor of shape (n_tasks, ...)
        Initial phi_i of every training task.
    optimizer : inner optimiser
        Its state is kept per task too (Adam's moments warm up across visits, so
        only a task's first visit starts from a fresh Adam, whose first step gives
        eta no meta-gradient).
    local_keys : tuple of str, default=()
        The model's per-row parameters.
    """

    learn_init = False

    def __init__(self, init_params, optimizer, local_keys=()):
        self.task_params = {k: v.detach().clone() for k, v in init_params.items()}
        self.task_state = _tree.detach(optimizer.init(self.task_params, local=tuple(local_keys)))
        self.init_params = None
        self.optimizer = None

    def start(self, task_ids, tasks, *, differentiable, generator):
        """Alg. 1, lines 4-5: the stored phi_i of the sampled tasks (leaves of the meta-graph)."""
        params = {k: v[task_ids].requires_grad_(differentiable) for k, v in self.task_params.items()}
        return params, _tree.index(self.task_state, task_ids)

    def store(self, idx, M, pending, *, world_size, process_group):
        """Alg. 1: phi_i <- phi_i' (detached), for the sampled tasks ``idx``."""
        device = self.task_params[next(iter(self.task_params))].device
        if world_size == 1:
            for rows, new_params, new_state in pending:
                _tree.scatter_(self.task_params, idx[rows].to(device), new_params)
                _tree.scatter_(self.task_state, idx[rows].to(device), new_state)
            return
        template = _tree.index((self.task_params, self.task_state), idx[:1].to(device))
        params_full, state_full = _distributed.all_gather_rows(
            template, M, [(rows, (p, s)) for rows, p, s in pending], process_group
        )
        dev_idx = idx.to(device)
        _tree.scatter_(self.task_params, dev_idx, params_full)
        _tree.scatter_(self.task_state, dev_idx, state_full)

    def on_failure(self, task_ids):
        """Halve the inner step size of the sampled tasks (their states persist)."""
        ids = task_ids.to(self.task_state["lr_scale"].device)
        self.task_state["lr_scale"][ids] = self.task_state["lr_scale"][ids] * 0.5
        return "the inner step sizes of the sampled tasks"

    def state_dict(self):
        return {"init_params": None, "init_optimizer": None,
                "task_params": _tree.to_cpu(self.task_params),
                "task_state": _tree.to_cpu(self.task_state)}

    def load_state_dict(self, state):
        if state["task_params"] is None:
            raise ValueError("The saved state has no per-task parameters (Algorithm 2).")
        _load_(self.task_params, state["task_params"])
        _load_(self.task_state, state["task_state"])


class LearnedInit:
    """Algorithm 2: every sampled task starts from a shared, meta-learned phi.

    Parameters
    ----------
    init_params : dict of torch.Tensor of shape (n_tasks, ...)
        Initial parameters; the first task's values of the shared keys become the
        initialisation (a leaf updated by Adam).
    inner_optimizer : inner optimiser
        Started fresh for every task at every outer iteration.
    model : LatentModel
        Its ``local_keys`` (per-row parameters) are never shared: they are
        initialised per task by ``model.init_local_params``.
    init_lr : float
        Adam step size of the initialisation (tau).
    """

    learn_init = True

    def __init__(self, init_params, inner_optimizer, model, init_lr):
        self.model = model
        self.local_keys = tuple(getattr(model, "local_keys", ()))
        self.inner_optimizer = inner_optimizer
        # Alg. 2: one shared initialisation (no task dimension) as leaves.
        self.init_params = {
            k: v[:1].detach().clone().requires_grad_(True)
            for k, v in init_params.items() if k not in self.local_keys
        }
        self.optimizer = torch.optim.Adam(list(self.init_params.values()), lr=init_lr)
        self.task_params, self.task_state = None, None

    def start(self, task_ids, tasks, *, differentiable, generator):
        """Alg. 2, line 5: phi_i <- phi (the shared init), fresh optimiser state."""
        m = task_ids.numel()
        params = {k: v.expand((m,) + v.shape[1:]) for k, v in self.init_params.items()}
        if self.local_keys:
            fresh = self.model.init_local_params(tasks, generator=generator)
            params.update({k: fresh[k].detach() for k in self.local_keys})
        return params, self.inner_optimizer.init(_tree.detach(params), local=self.local_keys)

    def store(self, idx, M, pending, *, world_size, process_group):
        """Nothing persists per task in Algorithm 2."""

    def on_failure(self, task_ids):
        return None

    def state_dict(self):
        return {"init_params": _tree.to_cpu(self.init_params),
                "init_optimizer": _tree.to_cpu(self.optimizer.state_dict()),
                "task_params": None, "task_state": None}

    def load_state_dict(self, state):
        if state["init_params"] is None:
            raise ValueError("The saved state has no learned initialisation (Algorithm 1).")
        _load_(self.init_params, state["init_params"])
        self.optimizer.load_state_dict(state["init_optimizer"])
