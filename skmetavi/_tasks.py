"""Batched task containers: ragged tasks padded to a leading task dimension."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

__all__ = [
    "TaskBatch",
    "pad_tasks",
    "minibatch",
    "gather_rows",
    "scatter_rows",
    "TaskNoise",
    "NoiseCache",
    "TaskGenerators",
    "AUTO_CHUNK_BYTES",
    "AUTO_CHUNK_BYTES_COMPILED",
    "auto_task_chunk",
]

#: The size of one chunk's largest intermediate tensor that ``task_chunk_size="auto"`` aims
#: at on the CPU.  Measured (1-50-50-1 BNN, K = 10, M = 16, B = 5, support rows per task;
#: benchmarks/README.md): on a 2-core AMD EPYC the fastest chunks held 2-4 million float32
#: activations at every task size (8 tasks at 500 rows, 4 at 1000, 2 at 2000: 1.1x, 1.2x and
#: 2.4x faster than all 16 at once, whose activations overflow the caches and go through
#: fresh pages); on a 2-core Intel Xeon chunks of 2-8 were within 5 % of each other at 1000
#: rows (1.5x over all at once) and 2-4 best at 2000 (3.7x).
AUTO_CHUNK_BYTES = 8 * 2**20

#: The same for a compiled meta-iteration (``compile="meta_fit"``), whose one graph keeps every
#: intermediate of the B steps for the double backward at once.  Measured on a 2-core Intel
#: Xeon (the same model, s per meta-iteration, chunk sizes): 1000 rows 0.297 / 0.378 / 0.358 /
#: 0.380 with 1 / 2 / 4 / 8 tasks per chunk; 500 rows 0.159 / 0.173 / 0.195 with 1 / 2 / 8; 200
#: rows 0.088 / 0.083 / 0.092 with 1 / 4 / 16; 40 rows 0.029 with all 16 against 0.051 one at
#: a time.  On a 2-core AMD EPYC at 1000 rows one task at a time beat chunks of 4 (0.42 vs
#: 0.51 s).
AUTO_CHUNK_BYTES_COMPILED = 2 * 2**20


class TaskBatch:
    """M tasks padded to a common number of rows.

    Every row-aligned quantity of a task (inputs ``X``, targets ``y``, an
    observation mask, ...) is a *field* of shape ``(M, n_max, ...)``; a
    minibatch gathers all of them with the same row indices and records those
    indices in :attr:`rows`, so that per-row (local) parameters can be gathered
    and scattered back.

    Parameters
    ----------
    fields : mapping of str to torch.Tensor
        Row-aligned tensors of shape ``(M, n_max, ...)``; ``"X"`` is required.
    mask : torch.Tensor of shape (M, n_max), bool
        True for real rows, False for padding.
    lik_scale : torch.Tensor of shape (M,)
        Multiplies each task's summed log-likelihood (``N / n_batch`` when the
        rows are a minibatch of a task of size ``N``; 1 otherwise).
    rows : torch.Tensor of shape (M, n_max), long, or None
        Index of each row in its full task (a minibatch); None when the rows are
        the full task in order.

    Attributes
    ----------
    X : torch.Tensor of shape (M, n_max, n_features)
    y : torch.Tensor of shape (M, n_max, ...) or None
    """

    __slots__ = ("fields", "mask", "lik_scale", "rows")

    def __init__(self, fields: Mapping[str, torch.Tensor], mask, lik_scale, rows=None):
        if "X" not in fields:
            raise ValueError("A TaskBatch needs an 'X' field.")
        self.fields = dict(fields)
        self.mask = mask
        self.lik_scale = lik_scale
        self.rows = rows

    def __repr__(self):
        shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in self.fields.items())
        return f"TaskBatch({shapes}, minibatch={self.rows is not None})"

    @property
    def X(self) -> torch.Tensor:
        return self.fields["X"]

    @property
    def y(self) -> Optional[torch.Tensor]:
        return self.fields.get("y")

    @property
    def n_tasks(self) -> int:
        return self.X.shape[0]

    @property
    def n_rows(self) -> torch.Tensor:
        """Number of real rows per task, shape (M,)."""
        return self.mask.sum(-1)

    def replace(self, **changes) -> "TaskBatch":
        """A copy with some of ``fields``, ``mask``, ``lik_scale``, ``rows`` replaced."""
        out = {name: getattr(self, name) for name in self.__slots__}
        out.update(changes)
        return TaskBatch(**out)

    def index(self, idx) -> "TaskBatch":
        """Select tasks (``idx``: LongTensor or slice)."""
        return TaskBatch(
            {k: v[idx] for k, v in self.fields.items()},
            self.mask[idx],
            self.lik_scale[idx],
            None if self.rows is None else self.rows[idx],
        )

    def to(self, device=None, dtype=None) -> "TaskBatch":
        """Move to ``device``; floating-point fields (and ``lik_scale``) to ``dtype``."""

        def conv(t):
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

        return TaskBatch(
            {k: conv(v) for k, v in self.fields.items()},
            self.mask.to(device),
            conv(self.lik_scale),
            None if self.rows is None else self.rows.to(device),
        )

    def unpad(self, m: int):
        """Rows of task ``m`` without padding: ``(X_m, y_m)``."""
        keep = self.mask[m]
        y = self.y
        return self.X[m][keep], None if y is None else y[m][keep]


def pad_tasks(
    Xs: Sequence[torch.Tensor],
    ys: Optional[Sequence[torch.Tensor]] = None,
    **fields: Sequence[torch.Tensor],
) -> TaskBatch:
    """Stack ragged tasks into a :class:`TaskBatch` (zero padding + mask).

    Parameters
    ----------
    Xs : sequence of torch.Tensor of shape (n_m, n_features)
        Each task's inputs.
    ys : sequence of torch.Tensor of shape (n_m, ...), default=None
        Each task's targets.
    **fields : sequence of torch.Tensor of shape (n_m, ...)
        Further row-aligned fields (e.g. an observation mask), padded with zeros
        (False for bool tensors).
    """
    n_max = max(int(X.shape[0]) for X in Xs)
    ref = Xs[0]
    M = len(Xs)
    columns = {"X": Xs}
    if ys is not None:
        columns["y"] = ys
    columns.update(fields)
    out = {}
    for name, parts in columns.items():
        if len(parts) != M:
            raise ValueError(f"Field {name!r} has {len(parts)} tasks, X has {M}.")
        buf = parts[0].new_zeros((M, n_max) + tuple(parts[0].shape[1:]))
        for m, part in enumerate(parts):
            buf[m, : part.shape[0]] = part
        out[name] = buf
    mask = torch.zeros((M, n_max), dtype=torch.bool, device=ref.device)
    for m, Xm in enumerate(Xs):
        mask[m, : Xm.shape[0]] = True
    return TaskBatch(out, mask, ref.new_ones(M))


def auto_task_chunk(model, n_tasks, n_rows, n_features, n_particles, *, dtype, device,
                    compiled=False):
    """The ``task_chunk_size`` that ``"auto"`` stands for, or None (all tasks at once).

    On the CPU, as many tasks per chunk as keep the model's largest per-chunk
    intermediate (``model.elements_per_task``) near :data:`AUTO_CHUNK_BYTES`
    (:data:`AUTO_CHUNK_BYTES_COMPILED` for a compiled meta-iteration, whose
    chunks are then of one size where a divisor of ``n_tasks`` is at least
    half the budget's chunk, and otherwise balanced, of at most two sizes:
    every size compiles a graph of its own); all at once on an accelerator
    (which wants large batches), for a model that does not tell its size, or
    when every task fits in one chunk.  Chunking does not change the result
    (:class:`TaskNoise`), only speed and memory.

    Parameters
    ----------
    model : LatentModel
    n_tasks, n_rows, n_features, n_particles : int
        Tasks per outer iteration, rows per task (per minibatch), columns, K.
    dtype : torch.dtype
    device : torch.device or str
    compiled : bool, default=False
        For a compiled meta-iteration.

    Returns
    -------
    chunk : int or None
    """
    if torch.device(device).type != "cpu":
        return None
    size = getattr(model, "elements_per_task", None)
    elements = size(n_rows, n_features, n_particles) if size is not None else None
    if not elements:
        return None
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = AUTO_CHUNK_BYTES_COMPILED if compiled else AUTO_CHUNK_BYTES
    chunk = max(1, budget // (int(elements) * itemsize))
    if chunk >= n_tasks:
        return None
    if compiled:
        # One graph per chunk size: a divisor of n_tasks near the budget, else balanced
        # chunks (at most two sizes) rather than many small ones.
        divisor = max(d for d in range(1, chunk + 1) if n_tasks % d == 0)
        n_chunks = -(-n_tasks // chunk)
        chunk = divisor if 2 * divisor >= chunk else -(-n_tasks // n_chunks)
    return int(chunk)


def gather_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``t[m, rows[m]]`` for every task: (M, n, ...) and (M, b) -> (M, b, ...)."""
    idx = rows.reshape(rows.shape + (1,) * (t.ndim - 2)).expand(rows.shape + t.shape[2:])
    return torch.gather(t, 1, idx)


def scatter_rows(t: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Out of place: ``t`` with ``t[m, rows[m]] = values[m]`` (differentiable in both)."""
    idx = rows.reshape(rows.shape + (1,) * (t.ndim - 2)).expand(values.shape)
    return t.scatter(1, idx, values)


def minibatch(tasks: TaskBatch, batch_size: int, generator) -> TaskBatch:
    """Draw ``batch_size`` rows per task without replacement, rescaling the likelihood.

    Tasks with at most ``batch_size`` rows are used whole.  Every field is
    gathered with the same rows, which are recorded in ``rows``.
    """
    n_rows = tasks.n_rows
    n_max = tasks.X.shape[1]
    if batch_size >= n_max:
        return tasks
    if isinstance(generator, TaskGenerators):
        keys = generator.row_keys(tasks.mask, batch_size)
    else:
        keys = rand(tasks.mask.shape, generator, device=tasks.X.device)
    keys = keys.masked_fill(~tasks.mask, 2.0)  # padding sorts last
    idx = keys.argsort(dim=-1)[:, :batch_size]  # (M, batch_size)
    mask = torch.gather(tasks.mask, 1, idx)
    fields = {k: gather_rows(v, idx) for k, v in tasks.fields.items()}
    rows = idx if tasks.rows is None else torch.gather(tasks.rows, 1, idx)
    n_used = mask.sum(-1).clamp(min=1)
    scale = tasks.lik_scale * n_rows.to(tasks.X.dtype) / n_used.to(tasks.X.dtype)
    return TaskBatch(fields, mask, scale, rows)


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
        The tasks of this shard (``slice(None)``: all, without copying the draws).
    fixed : bool, default=False
        Return the same numbers at every draw (deterministic inner problems:
        implicit meta-gradients and their tests).
    cache : NoiseCache, default=None
        Shared by the chunks of one batch: a draw that another chunk already
        made is sliced from its numbers instead of being generated again.
    """

    def __init__(self, seed: int, n_total: int, rows, fixed: bool = False, cache=None):
        self.seed, self.n_total, self.rows, self.fixed = int(seed), int(n_total), rows, fixed
        self.cache = cache
        self.counter = 0

    def _draw(self, kind, shape, dtype, device):
        full_shape = (self.n_total,) + tuple(shape[1:])
        key = (kind, self.seed, self.counter, full_shape, dtype, str(device))
        full = None if self.cache is None else self.cache.get(key)
        if full is None:
            g = torch.Generator(device=device)
            g.manual_seed((self.seed * 1_000_003 + self.counter) % (2**63 - 1))
            full = getattr(torch, kind)(full_shape, generator=g, dtype=dtype, device=device)
            if self.cache is not None:
                self.cache.put(key, full)
        if not self.fixed:
            self.counter += 1
        return full[self.rows]

    def randn(self, shape, *, dtype, device) -> torch.Tensor:
        """Standard normals of shape ``(n_rows, *shape[1:])``."""
        return self._draw("randn", shape, dtype, device)

    def rand(self, shape, *, dtype=None, device=None) -> torch.Tensor:
        """Uniforms on [0, 1) of shape ``(n_rows, *shape[1:])``."""
        return self._draw("rand", shape, dtype, device)


class NoiseCache:
    """The draws of one batch's :class:`TaskNoise`, kept for its other chunks.

    Every chunk of a chunked outer iteration makes the same sequence of
    draws, each for all tasks of the batch; keeping them spares the later
    chunks the generation (16 chunks drew 16 times the numbers).  Draws
    stop being kept once ``max_bytes`` are held: later ones are generated
    again, as without a cache (the numbers are the same either way).  The
    budget is on top of the chunks' own memory: it bounds what chunking for
    memory gives up to the cache.

    Parameters
    ----------
    max_bytes : int, default=64 MiB
    """

    def __init__(self, max_bytes: int = 64 * 2**20):
        self.max_bytes, self.n_bytes = int(max_bytes), 0
        self._draws = {}

    def get(self, key):
        """Return the kept draw of ``key``, or None."""
        return self._draws.get(key)

    def put(self, key, value):
        """Keep ``value`` for ``key`` if the budget allows."""
        size = value.numel() * value.element_size()
        if self.n_bytes + size <= self.max_bytes:
            self._draws[key] = value
            self.n_bytes += size


class TaskGenerators:
    """One ``torch.Generator`` per task: each task draws exactly what it would draw alone.

    Adapting several tasks at once with this noise gives every task the random
    numbers of a separate single-task run with its own generator (minibatch
    keys included: a task draws keys for its own rows only, and none when it
    fits in one batch), so batched adaptation does not depend on which other
    tasks are adapted alongside.  This holds for noise whose shape does not
    depend on the task's rows (one global latent per task); for one latent per
    row, ragged tasks draw noise for the padded rows too.

    Parameters
    ----------
    generators : sequence of torch.Generator
        One per task, in task order.
    """

    def __init__(self, generators):
        self.generators = list(generators)

    def randn(self, shape, *, dtype, device) -> torch.Tensor:
        """Standard normals of shape ``shape`` (its first dimension is the tasks)."""
        return torch.stack([
            torch.randn(tuple(shape[1:]), generator=g, dtype=dtype, device=device)
            for g in self.generators
        ])

    def rand(self, shape, *, dtype=None, device=None) -> torch.Tensor:
        """Uniforms on [0, 1) of shape ``shape`` (its first dimension is the tasks)."""
        return torch.stack([
            torch.rand(tuple(shape[1:]), generator=g, dtype=dtype, device=device)
            for g in self.generators
        ])

    def row_keys(self, mask, batch_size) -> torch.Tensor:
        """Minibatch sort keys, as a single task with ``mask[m]``'s rows would draw them.

        Real rows come first in every task (:func:`pad_tasks`).  A task with at
        most ``batch_size`` rows draws nothing and keeps its rows in order.
        """
        keys = torch.full(mask.shape, 2.0, device=mask.device)
        for m, g in enumerate(self.generators):
            n = int(mask[m].sum())
            if n > batch_size:
                keys[m, :n] = torch.rand((1, n), generator=g, device=mask.device)[0]
            else:
                keys[m, :n] = torch.arange(n, device=mask.device) / (n + 1)
        return keys


def randn(shape, generator, *, dtype, device) -> torch.Tensor:
    """``torch.randn`` from a ``torch.Generator`` or a noise object (:class:`TaskNoise`, ...)."""
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    return generator.randn(shape, dtype=dtype, device=device)


def rand(shape, generator, *, dtype=None, device=None) -> torch.Tensor:
    """``torch.rand`` from a ``torch.Generator`` or a noise object (:class:`TaskNoise`, ...)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return generator.rand(shape, dtype=dtype, device=device)
