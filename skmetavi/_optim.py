"""Functional, differentiable inner-loop optimisers (torchopt's ``init``/``update`` shape).

Parameters and states are dicts of tensors with a leading task dimension
``M``; nothing is updated in place, so the inner loop can be differentiated
through.  Updates *ascend* the direction they are given (the engine passes the
ascent direction of the negative divergence).  Every state carries a per-task
``lr_scale`` so that a task whose step failed can have its step size reduced
alone.  ``param_state_keys`` names the sub-dicts of the state that hold one
entry per parameter and per row for per-row (local) parameters, so that the
engine can gather and scatter a minibatch's rows together with their state.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

__all__ = ["SGD", "Adam", "INNER_OPTIMIZERS", "make_optimizer", "map_param_state"]


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-task (M,) (or per-row (M, n)) tensor to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _any_requires_grad(*trees) -> bool:
    """Whether any tensor of the (nested dict) ``trees`` requires grad."""
    for tree in trees:
        for v in tree.values():
            if isinstance(v, dict):
                if _any_requires_grad(v):
                    return True
            elif isinstance(v, torch.Tensor) and v.requires_grad:
                return True
    return False


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

    def init(self, params: dict, local=()) -> dict:
        ref = next(iter(params.values()))
        return {"lr_scale": ref.new_ones(ref.shape[0]).detach()}

    def update(self, params: dict, direction: dict, state: dict, *, differentiable=None):
        """Return ``(new params, state)`` (``differentiable``: one path for both, ignored)."""
        scale = state["lr_scale"]
        new = {
            k: v + self.lr * _bcast(scale, v) * direction[k] for k, v in params.items()
        }
        return new, state


class Adam:
    """Adam ascent with per-task bias correction, differentiable end to end.

    ``sqrt(v_hat + eps^2)`` replaces ``sqrt(v_hat) + eps`` so that the second
    derivative stays finite where a gradient coordinate is exactly zero.  The
    bias corrections count the updates that reached each parameter: per task,
    and per row for per-row (``local``) parameters, whose moments only move when
    their row is in a minibatch (lazy Adam), so that a row's first update is
    lr-sized however late it comes.

    From a fresh state the first step is ``lr * g / sqrt(g^2 + eps^2) ~ lr *
    sign(g)``: it does not depend on the size of the direction, so whatever shapes
    that size (the divergence's parameters) gets no meta-gradient through it; only
    later steps, through the ratios of successive directions, do.

    Parameters
    ----------
    lr : float
        Step size.
    betas : tuple of float, default=(0.9, 0.999)
    eps : float, default=1e-8
    """

    name = "adam"
    param_state_keys = ("m", "v", "count")

    def __init__(self, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.lr = lr
        self.betas = betas
        self.eps = eps

    def __repr__(self):
        return f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r})"

    def init(self, params: dict, local=()) -> dict:
        """A fresh state for ``params``.

        Parameters
        ----------
        params : dict of str to torch.Tensor
            Parameters with a leading task dimension M.
        local : tuple of str, default=()
            Per-row parameters ``(M, n_rows, ...)``: their updates are counted per row.

        Returns
        -------
        state : dict
            ``lr_scale``, ``step`` (the task's updates, (M,)), ``m``, ``v`` and
            ``count``: the updates of each per-row parameter's rows, (M, n_rows).
        """
        ref = next(iter(params.values()))
        M = ref.shape[0]
        return {
            "lr_scale": ref.new_ones(M).detach(),
            "step": ref.new_zeros(M).detach(),
            "m": {k: torch.zeros_like(p).detach() for k, p in params.items()},
            "v": {k: torch.zeros_like(p).detach() for k, p in params.items()},
            "count": {k: params[k].new_zeros(params[k].shape[:2]).detach() for k in local},
        }

    def update(self, params: dict, direction: dict, state: dict, *, differentiable=None):
        """Return ``(new params, new state)``.

        ``differentiable``: take the out-of-place path that a graph can go
        through (True), the fused in-place one (False), or decide from the grad
        mode and whether any input requires grad (None; under a
        :mod:`torch.func` transform pass True).
        """
        if differentiable is None:
            differentiable = torch.is_grad_enabled() and _any_requires_grad(
                params, direction, state)
        if not differentiable:
            return self._update_foreach(params, direction, state)
        b1, b2 = self.betas
        step = state["step"] + 1
        c1 = 1 - b1**step  # (M,)
        c2 = 1 - b2**step
        new_params, m_new, v_new, count_new = {}, {}, {}, {}
        # lr m_hat / sqrt(v_hat + eps^2) = (lr sqrt(c2) / c1) m / sqrt(v + c2 eps^2): per-task
        # scalars computed once, so that the elementwise work is a few fused kernels.
        lr_task = self.lr * state["lr_scale"]
        a_task, e_task = lr_task * torch.sqrt(c2) / c1, c2 * self.eps**2
        for k, p in params.items():
            g = direction[k]
            m = torch.lerp(g, state["m"][k], b1)  # b1 m + (1 - b1) g, one kernel
            v = torch.addcmul(b2 * state["v"][k], g, g, value=1 - b2)
            if k in state["count"]:  # per-row bias correction (lazy Adam)
                count_new[k] = state["count"][k] + 1  # (M, n_rows)
                bc1, bc2 = 1 - b1 ** count_new[k], 1 - b2 ** count_new[k]
                a = _bcast(_bcast(lr_task, bc1) * torch.sqrt(bc2) / bc1, p)
                e = _bcast(bc2 * self.eps**2, p)
            else:
                a, e = _bcast(a_task, p), _bcast(e_task, p)
            new_params[k] = torch.addcdiv(p, a * m, torch.sqrt(v + e))
            m_new[k], v_new[k] = m, v
        return new_params, {"lr_scale": state["lr_scale"], "step": step, "m": m_new, "v": v_new,
                            "count": count_new}

    def _update_foreach(self, params: dict, direction: dict, state: dict):
        """:meth:`update` without a graph: the same kernels, issued for all parameters at once.

        Bit-for-bit the arithmetic of :meth:`update` (the same operations on each
        tensor, in the same order), as ``torch._foreach_*`` calls: a few
        dispatches per step instead of a few per parameter.
        """
        b1, b2 = self.betas
        step = state["step"] + 1
        c1 = 1 - b1**step  # (M,)
        c2 = 1 - b2**step
        lr_task = self.lr * state["lr_scale"]
        a_task, e_task = lr_task * torch.sqrt(c2) / c1, c2 * self.eps**2
        keys = list(params)
        p_list = [params[k] for k in keys]
        g_list = [direction[k] for k in keys]
        m_list = torch._foreach_lerp(g_list, [state["m"][k] for k in keys], b1)
        v_list = torch._foreach_mul([state["v"][k] for k in keys], b2)
        torch._foreach_addcmul_(v_list, g_list, g_list, value=1 - b2)
        a_list, e_list, count_new = [], [], {}
        for k, p in zip(keys, p_list):
            if k in state["count"]:  # per-row bias correction (lazy Adam)
                count_new[k] = state["count"][k] + 1  # (M, n_rows)
                bc1, bc2 = 1 - b1 ** count_new[k], 1 - b2 ** count_new[k]
                a_list.append(_bcast(_bcast(lr_task, bc1) * torch.sqrt(bc2) / bc1, p))
                e_list.append(_bcast(bc2 * self.eps**2, p))
            else:
                a_list.append(_bcast(a_task, p))
                e_list.append(_bcast(e_task, p))
        am = torch._foreach_mul(m_list, a_list)
        denom = torch._foreach_add(v_list, e_list)
        torch._foreach_sqrt_(denom)
        new_list = torch._foreach_addcdiv(p_list, am, denom)
        return dict(zip(keys, new_list)), {"lr_scale": state["lr_scale"], "step": step,
                                           "m": dict(zip(keys, m_list)),
                                           "v": dict(zip(keys, v_list)), "count": count_new}


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
        if sub not in state:
            continue
        out[sub] = {
            k: fn(v, *(o[sub][k] for o in others)) if k in keys else v
            for k, v in state[sub].items()
        }
    return out
