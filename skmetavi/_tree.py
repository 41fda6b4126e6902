"""One tree-map for the nested containers of tensors the engine passes around.

Parameters, optimiser states and trainer states are nested ``dict``s (and
``list``/``tuple``s) whose leaves are tensors.  :func:`tree_map` applies a
function to every tensor leaf of one or several trees of the same structure;
everything else in this module is a one-line use of it.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

from typing import Callable, Iterator

import torch

__all__ = ["tree_map", "tree_leaves", "detach", "index", "scatter_", "to_cpu", "to_device"]


def tree_map(fn: Callable, tree, *rest):
    """Apply ``fn`` to the tensor leaves of ``tree`` (and the matching leaves of ``rest``).

    Dicts, lists and tuples are rebuilt with the same keys and order; leaves that
    are not tensors (ints, floats, strings, None) are returned unchanged from
    ``tree``.

    Parameters
    ----------
    fn : callable
        ``fn(leaf, *matching_leaves) -> new_leaf``.
    tree : dict, list, tuple or torch.Tensor
        The tree to map over.
    *rest : trees
        Trees with the same structure as ``tree`` (at least where ``tree`` has
        tensors).

    Returns
    -------
    tree
        A new tree of the same structure.
    """
    if isinstance(tree, torch.Tensor):
        return fn(tree, *rest)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v, *(r[k] for r in rest)) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v, *(r[i] for r in rest)) for i, v in enumerate(tree))
    return tree


def tree_leaves(tree) -> Iterator[torch.Tensor]:
    """Yield the tensor leaves of ``tree`` in a fixed (insertion) order."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tree_leaves(v)
    elif isinstance(tree, (list, tuple)):
        for v in tree:
            yield from tree_leaves(v)


def detach(tree):
    """Detach every tensor of ``tree``."""
    return tree_map(torch.Tensor.detach, tree)


def index(tree, idx):
    """Select tasks ``idx`` (first dimension) of every tensor of ``tree``."""
    return tree_map(lambda t: t[idx], tree)


def scatter_(store, idx, values):
    """Write ``values`` (detached) into the tasks ``idx`` of ``store`` in place; return it."""

    def write(dst, src):
        dst[idx.to(dst.device)] = src.detach()
        return dst

    return tree_map(write, store, values)


def to_cpu(tree):
    """Independent, detached CPU copies of every tensor of ``tree`` (other leaves as is)."""
    return tree_map(lambda t: t.detach().to("cpu", copy=True), tree)


def to_device(tree, device="cpu", dtype=None):
    """Detached copies of every tensor of ``tree`` on ``device`` (floats in ``dtype``)."""

    def move(t):
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device).clone()

    return tree_map(move, tree)
