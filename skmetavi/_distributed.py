"""``torch.distributed`` for the outer loop: tasks sharded over processes, results reduced.

Each process runs the inner loops of its share of the sampled tasks; the
meta-loss, the finiteness flag, the meta-gradients and (Algorithm 1) the
updated per-task parameters are summed over processes, so that every process
takes the same outer step as a single process would.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import torch

from skmetavi._tree import tree_leaves, tree_map

__all__ = [
    "rank_and_world",
    "shard",
    "all_reduce_scalars",
    "all_reduce_grads",
    "all_gather_rows",
]


def rank_and_world(process_group=None):
    """``(rank, world_size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(process_group), dist.get_world_size(process_group)


def shard(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Rows ``0..n-1`` handled by process ``rank`` (all of them for one process)."""
    rows = torch.arange(n)
    if world_size > 1:
        rows = rows.tensor_split(world_size)[rank]
    return rows


def all_reduce_scalars(J_total: float, ok: bool, *, device, process_group=None):
    """Sum of the meta-loss over processes and whether every process was finite."""
    import torch.distributed as dist

    # On the data's device: NCCL only reduces CUDA tensors.
    buf = torch.tensor([J_total, 0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(buf, group=process_group)
    return float(buf[0]), bool(buf[1] == 0)


def all_reduce_grads(parameters, process_group=None) -> None:
    """Sum the ``.grad`` of ``parameters`` over processes (missing gradients count as zero)."""
    import torch.distributed as dist

    for p in parameters:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        dist.all_reduce(p.grad, group=process_group)


def all_gather_rows(template, M: int, pending, process_group=None):
    """Assemble per-row results that each process computed for its rows of a batch of ``M``.

    ``template`` is a tree with a leading row dimension (its shapes and dtypes
    are used); ``pending`` lists ``(rows, tree)`` pairs of this process.  Each
    process fills its rows and zeros elsewhere, and a sum over processes
    gathers them.
    """
    import torch.distributed as dist

    full = tree_map(lambda t: t.new_zeros((M,) + t.shape[1:]), template)
    for rows, values in pending:

        def fill(dst, src, rows=rows):
            dst[rows.to(dst.device)] = src
            return dst

        tree_map(fill, full, values)
    for t in tree_leaves(full):
        dist.all_reduce(t, group=process_group)
    return full
