"""Functional, differentiable inner-loop optimisers (torchopt's ``init``/``update`` shape).

Parameters and states are dicts of tensors with a leading task dimension
``M``; nothing is updated in place, so the inner loop can be differentiated
through.  Updates *ascend* the direction they are given (the engine passes the
ascent direction of the negative divergence).  Every state carries a per-task
``lr_scale`` so that a task whose step failed can have its step size reduced
alone.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-task (M,) tensor to broadcast against ``like`` (M, ...)."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


class SGD:
    """Plain gradient ascent, ``phi <- phi + lr * direction``.

    Parameters
    ----------
    lr : float
        Step size (beta in Algorithms 1 and 2).
    """

    name = "sgd"

    def __init__(self, lr: float):
        self.lr = lr

    def init(self, params: dict) -> dict:
        ref = next(iter(params.values()))
        return {"lr_scale": ref.new_ones(ref.shape[0]).detach()}

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

    Parameters
    ----------
    lr : float
        Step size.
    betas : tuple of float, default=(0.9, 0.999)
    eps : float, default=1e-8
    """

    name = "adam"

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr = lr
        self.betas = betas
        self.eps = eps

    def init(self, params: dict) -> dict:
        ref = next(iter(params.values()))
        return {
            "lr_scale": ref.new_ones(ref.shape[0]).detach(),
            "step": ref.new_zeros(ref.shape[0]).detach(),
            "m": {k: torch.zeros_like(v).detach() for k, v in params.items()},
            "v": {k: torch.zeros_like(v).detach() for k, v in params.items()},
        }

    def update(self, params: dict, direction: dict, state: dict):
        b1, b2 = self.betas
        step = state["step"] + 1
        c1 = 1 - b1**step  # (M,)
        c2 = 1 - b2**step
        new_params, m_new, v_new = {}, {}, {}
        for k, p in params.items():
            g = direction[k]
            m = b1 * state["m"][k] + (1 - b1) * g
            v = b2 * state["v"][k] + (1 - b2) * g * g
            m_hat = m / _bcast(c1, m)
            v_hat = v / _bcast(c2, v)
            lr = self.lr * _bcast(state["lr_scale"], p)
            new_params[k] = p + lr * m_hat / torch.sqrt(v_hat + self.eps**2)
            m_new[k], v_new[k] = m, v
        return new_params, {"lr_scale": state["lr_scale"], "step": step, "m": m_new, "v": v_new}


INNER_OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, lr: float):
    """Build an inner optimiser from its name."""
    if name == "sgd":
        return SGD(lr)
    if name == "adam":
        return Adam(lr)
    raise ValueError(f"Unknown inner optimizer {name!r}; valid names are {list(INNER_OPTIMIZERS)}.")


def detach_state(state):
    """Detach every tensor in a (nested) optimiser state."""
    if isinstance(state, dict):
        return {k: detach_state(v) for k, v in state.items()}
    return state.detach()


def index_state(state, idx):
    """Select tasks ``idx`` from every tensor of a (nested) state."""
    if isinstance(state, dict):
        return {k: index_state(v, idx) for k, v in state.items()}
    return state[idx]


def scatter_state(store, idx, values):
    """Write the tasks ``idx`` of ``values`` into ``store`` (in place, detached)."""
    if isinstance(store, dict):
        for k in store:
            scatter_state(store[k], idx, values[k])
        return store
    store[idx] = values.detach()
    return store
