"""Batched task containers: ragged tasks padded to a leading task dimension."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch


class TaskBatch(NamedTuple):
    """M tasks padded to a common number of rows.

    Attributes
    ----------
    X : torch.Tensor of shape (M, n_max, n_features)
    y : torch.Tensor of shape (M, n_max, ...) or None
    mask : torch.Tensor of shape (M, n_max), bool
        True for real rows, False for padding.
    lik_scale : torch.Tensor of shape (M,)
        Multiplies each task's summed log-likelihood (``N / n_batch`` when the
        rows are a minibatch of a task of size ``N``; 1 otherwise).
    """

    X: torch.Tensor
    y: Optional[torch.Tensor]
    mask: torch.Tensor
    lik_scale: torch.Tensor

    @property
    def n_tasks(self) -> int:
        return self.X.shape[0]

    @property
    def n_rows(self) -> torch.Tensor:
        """Number of real rows per task, shape (M,)."""
        return self.mask.sum(-1)

    def index(self, idx) -> "TaskBatch":
        """Select tasks (``idx``: LongTensor or slice)."""
        return TaskBatch(
            self.X[idx],
            None if self.y is None else self.y[idx],
            self.mask[idx],
            self.lik_scale[idx],
        )

    def to(self, device=None, dtype=None) -> "TaskBatch":
        def conv(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return TaskBatch(
            conv(self.X), conv(self.y), self.mask.to(device), conv(self.lik_scale)
        )

    def unpad(self, m: int):
        """Rows of task ``m`` without padding: ``(X_m, y_m)``."""
        keep = self.mask[m]
        return self.X[m][keep], None if self.y is None else self.y[m][keep]


def pad_tasks(
    Xs: Sequence[torch.Tensor], ys: Optional[Sequence[torch.Tensor]] = None
) -> TaskBatch:
    """Stack ragged tasks into a :class:`TaskBatch` (zero padding + mask)."""
    n_max = max(int(X.shape[0]) for X in Xs)
    ref = Xs[0]
    M, p = len(Xs), ref.shape[1]
    X = ref.new_zeros((M, n_max, p))
    mask = torch.zeros((M, n_max), dtype=torch.bool, device=ref.device)
    y = None
    if ys is not None:
        y = ys[0].new_zeros((M, n_max) + tuple(ys[0].shape[1:]))
    for m, Xm in enumerate(Xs):
        n = Xm.shape[0]
        X[m, :n] = Xm
        mask[m, :n] = True
        if ys is not None:
            y[m, :n] = ys[m]
    return TaskBatch(X, y, mask, ref.new_ones(M))


def minibatch(tasks: TaskBatch, batch_size: int, generator: torch.Generator) -> TaskBatch:
    """Draw ``batch_size`` rows per task without replacement, rescaling the likelihood.

    Tasks with at most ``batch_size`` rows are used whole.
    """
    n_rows = tasks.n_rows
    n_max = tasks.X.shape[1]
    if batch_size >= n_max:
        return tasks
    keys = rand(tasks.mask.shape, generator, device=tasks.X.device)
    keys = keys.masked_fill(~tasks.mask, 2.0)  # padding sorts last
    idx = keys.argsort(dim=-1)[:, :batch_size]  # (M, batch_size)
    mask = torch.gather(tasks.mask, 1, idx)
    X = torch.gather(tasks.X, 1, idx.unsqueeze(-1).expand(-1, -1, tasks.X.shape[-1]))
    y = None
    if tasks.y is not None:
        shape = idx.shape + tasks.y.shape[2:]
        idx_y = idx.reshape(idx.shape + (1,) * (tasks.y.ndim - 2)).expand(shape)
        y = torch.gather(tasks.y, 1, idx_y)
    n_used = mask.sum(-1).clamp(min=1)
    scale = tasks.lik_scale * n_rows.to(tasks.X.dtype) / n_used.to(tasks.X.dtype)
    return TaskBatch(X, y, mask, scale)


class TaskNoise:
    """Random numbers for a batch of tasks that do not depend on how the batch is split.

    Every draw generates numbers for all ``n_total`` tasks from a fresh
    generator seeded by ``(seed, draw index)`` and keeps the rows of this
    shard, so that chunked, sharded (distributed) and whole-batch runs see
    exactly the same noise for each task.  Shards must make the same sequence
    of draws.

    Parameters
    ----------
    seed : int
        Base seed (one per outer iteration).
    n_total : int
        Number of tasks in the whole batch.
    rows : torch.Tensor or slice
        The tasks of this shard.
    fixed : bool, default=False
        Return the same numbers at every draw (deterministic inner problems,
        used to test implicit gradients).
    """

    def __init__(self, seed: int, n_total: int, rows, fixed: bool = False):
        self.seed, self.n_total, self.rows, self.fixed = int(seed), int(n_total), rows, fixed
        self.counter = 0

    def _generator(self, device) -> torch.Generator:
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + self.counter) % (2**63 - 1))
        if not self.fixed:
            self.counter += 1
        return g

    def randn(self, shape, *, dtype, device) -> torch.Tensor:
        """Standard normals of shape ``(n_rows, *shape[1:])``."""
        g = self._generator(device)
        full = torch.randn((self.n_total,) + tuple(shape[1:]), generator=g, dtype=dtype, device=device)
        return full[self.rows]

    def rand(self, shape, *, dtype=None, device=None) -> torch.Tensor:
        """Uniforms on [0, 1) of shape ``(n_rows, *shape[1:])``."""
        g = self._generator(device)
        full = torch.rand((self.n_total,) + tuple(shape[1:]), generator=g, dtype=dtype, device=device)
        return full[self.rows]


def randn(shape, generator, *, dtype, device) -> torch.Tensor:
    """``torch.randn`` from a ``torch.Generator`` or a :class:`TaskNoise`."""
    if isinstance(generator, TaskNoise):
        return generator.randn(shape, dtype=dtype, device=device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


def rand(shape, generator, *, dtype=None, device=None) -> torch.Tensor:
    """``torch.rand`` from a ``torch.Generator`` or a :class:`TaskNoise`."""
    if isinstance(generator, TaskNoise):
        return generator.rand(shape, dtype=dtype, device=device)
    return torch.rand(shape, generator=generator, dtype=dtype, device=device)
