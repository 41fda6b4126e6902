"""Functional, differentiable inner-loop optimisers (torchopt's ``init``/``update`` shape).

Parameters and states are dicts of tensors with a leading task dimension
``M``; nothing is updated in place, so the inner loop can be differentiated
through.  Updates *ascend* the direction they are given (the engine passes the
ascent direction of the negative divergence).  Every state carries a per-task
``lr_scale`` so that a task whose step failed can have its step size reduced
alone.  ``param_state_keys`` names the sub-dicts of the state that hold one
tensor per parameter (Adam's moments), so that the engine can gather and
scatter the rows of per-row (local) parameters together with their state.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

from skmetavi._tree import detach, index, scatter_

__all__ = [
    "SGD",
    "Adam",
    "INNER_OPTIMIZERS",
    "make_optimizer",
    "map_param_state",
    "detach_state",
    "index_state",
    "scatter_state",
]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-task (M,) tensor to broadcast against ``like`` (M, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


class SGD:
    """Plain gradient ascent, ``phi <- phi + lr * direction``.

    The inner update of Algorithms 1 and 2 of Zhang et al. (2021): every step is
    linear in the direction, so the meta-gradient reaches eta from the first
    step.

    Parameters
    ----------
    lr : float
        Step size (beta in Algorithms 1 and 2).
    """

    name = "sgd"
    param_state_keys: tuple = ()

    def __init__(self, lr: float):
        self.lr = lr

    def __repr__(self):
        return f"SGD(lr={self.lr!r})"

    def init(self, params: dict, warm=None) -> dict:
        ref = next(iter(params.values()))
        return {"lr_scale": ref.new_ones(ref.shape[0]).detach()}

    def warm_statistics(self, state, start=None):
        """SGD has no state to warm-start from."""
        return {}

    def update(self, params: dict, direction: dict, state: dict):
        scale = state["lr_scale"]
        new = {
            k: v + self.lr * _bcast(scale, v) * direction[k] for k, v in params.items()
        }
        return new, state


class Adam:
    """Adam ascent with per-task bias correction, differentiable end to end.

    ``sqrt(v_hat + eps^2)`` replaces ``sqrt(v_hat) + eps`` so that the second
    derivative stays finite where a gradient coordinate is exactly zero.

    From a fresh state the first step is ``lr * g / sqrt(g^2 + eps^2) ~ lr *
    sign(g)``: it does not depend on the size of the direction, so that
    whatever shapes that size (the divergence's parameters) gets no
    meta-gradient through it.  :meth:`init` can therefore start from a *warm*
    second moment (typical squared directions, e.g. at a learned initialisation,
    :meth:`warm_statistics`), with which the first steps are linear in the
    direction, ``~ lr * g / sqrt(v_0)``.

    Parameters
    ----------
    lr : float
        Step size.
    betas : tuple of float, default=(0.9, 0.999)
    eps : float, default=1e-8
    """

    name = "adam"
    param_state_keys = ("m", "v")

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr = lr
        self.betas = betas
        self.eps = eps

    def __repr__(self):
        return f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r})"

    def init(self, params: dict, warm=None) -> dict:
        """A fresh state for ``params``; ``warm``: a second moment to start from.

        ``warm`` maps parameter names to (1, ...) or (M, ...) tensors of typical
        squared directions; it is used as an established (bias-free) second
        moment.  Parameters it does not name start cold.
        """
        ref = next(iter(params.values()))
        M = ref.shape[0]
        warm = warm or {}
        v = {k: (warm[k].to(p.dtype).expand_as(p).clone() if k in warm else torch.zeros_like(p))
             .detach() for k, p in params.items()}
        return {
            "lr_scale": ref.new_ones(M).detach(),
            "step": ref.new_zeros(M).detach(),
            "m": {k: torch.zeros_like(p).detach() for k, p in params.items()},
            "v": v,
            # Squared directions accumulated in v, for its bias correction (a warm v
            # counts as established: no correction).
            "v_count": {k: torch.full((M,), _WARM_COUNT if k in warm else 0.0, dtype=ref.dtype,
                                      device=ref.device) for k in params},
        }

    def warm_statistics(self, state, start=None):
        """Mean squared directions since :meth:`init`, per parameter, summed over tasks.

        Parameters
        ----------
        state : dict
            A state after some updates.
        start : dict, default=None
            The ``warm`` second moment the state was initialised with.

        Returns
        -------
        sums : dict of str to torch.Tensor of shape (1, ...)
            ``sum over tasks of (v - beta2^n v_0) / (1 - beta2^n)`` with ``n`` the
            task's updates: the bias-corrected average of the squared directions
            of those ``n`` steps alone.  Divide by the number of tasks for a mean.
        """
        b2 = self.betas[1]
        start = start or {}
        n = state["step"]  # (M,)
        done = n > 0
        out = {}
        for k, v in state["v"].items():
            v = v.detach()
            if k in start:
                v = v - _bcast(b2**n, v) * start[k].to(v.dtype)
            c = 1 - b2**n
            new = v / _bcast(torch.where(done, c, torch.ones_like(c)), v)
            out[k] = torch.where(_bcast(done, new), new, torch.zeros_like(new)).sum(0, keepdim=True)
        return out

    def update(self, params: dict, direction: dict, state: dict):
        b1, b2 = self.betas
        step = state["step"] + 1
        c1 = 1 - b1**step  # (M,)
        new_params, m_new, v_new, count_new = {}, {}, {}, {}
        for k, p in params.items():
            g = direction[k]
            count = state["v_count"][k] + 1
            c2 = 1 - b2**count
            v_old = state["v"][k]
            first_warm = (state["v_count"][k] >= _WARM_COUNT) & (state["step"] == 0)  # (M,)
            if bool(first_warm.any()):
                # A warm second moment comes from tasks of another size: a task whose
                # directions are larger (more data) scales it up to its own, so that no
                # step exceeds Adam's; smaller directions keep it (smaller steps).
                ratio = ((g * g).detach().reshape(g.shape[0], -1).mean(-1)
                         / v_old.reshape(g.shape[0], -1).mean(-1).clamp_min(self.eps**2))
                factor = torch.where(first_warm, ratio.clamp_min(1.0), torch.ones_like(ratio))
                v_old = v_old * _bcast(factor, v_old)
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * v_old + (1 - b2) * g * g
            m_hat = m / _bcast(c1, m)
            v_hat = v / _bcast(c2, v)
            lr = self.lr * _bcast(state["lr_scale"], p)
            new_params[k] = p + lr * m_hat / torch.sqrt(v_hat + self.eps**2)
            m_new[k], v_new[k], count_new[k] = m, v, count
        return new_params, {"lr_scale": state["lr_scale"], "step": step, "m": m_new,
                            "v": v_new, "v_count": count_new}


#: ``v_count`` of a warm second moment: ``1 - beta2**count`` is 1 in floating point.
_WARM_COUNT = 1e6

INNER_OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, lr: float):
    """Build an inner optimiser from its name."""
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr)
    raise ValueError(f"Unknown inner optimizer {name!r}; valid names are {list(INNER_OPTIMIZERS)}.")


def map_param_state(optimizer, state: dict, keys, fn, *others) -> dict:
    """Apply ``fn`` to the per-parameter state of ``keys`` (e.g. Adam's moments).

    ``fn(leaf, *matching leaves of others)``; everything else is kept.
    """
    out = dict(state)
    for sub in optimizer.param_state_keys:
        out[sub] = {
            k: fn(v, *(o[sub][k] for o in others)) if k in keys else v
            for k, v in state[sub].items()
        }
    return out


# Kept under their historical names: thin uses of skmetavi._tree.
detach_state = detach
index_state = index
scatter_state = scatter_
