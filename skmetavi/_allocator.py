"""Keep torch's freed CPU buffers in the C library's heap: :func:`tune_allocator`.

Every VI step allocates and frees the same activation buffers (the BNN's
``(K, n, 50)`` float32 activations are 2 MB at ``n = 1000``).  glibc serves
blocks above its mmap threshold (128 KiB at start, raised dynamically to the
size of a freed mapped block, up to 32 MiB, until any ``mallopt`` call fixes
it) with fresh ``mmap`` pages and gives the top of its heap back to the system
beyond a trim threshold, so a compiled step of our BNN at N = 1000 faulted in
about 1 300 zeroed pages (5 MB; 774 eagerly) and a batched meta-iteration
145 000 (570 MB), every time.  With the thresholds raised, the freed blocks are
reused: measured on the 2-core AMD VM, one fresh process each, a step
6.9 -> 4.3-4.9 ms eager and 3.6 -> 2.2 ms compiled, a 16-task meta-iteration
1.27 -> 0.99 s, peak resident memory unchanged.  The cost: memory freed after a fit stays with
the process (up to ``trim_threshold`` at the top of the heap) instead of going
back to the system.

This is a fixed process-wide setting, so skmetavi never applies it on import
or in an estimator; the command line (``skmetavi demo``, ``skmetavi reproduce``)
does, for the processes it owns.

What the engine does by itself, once per process, before its first CPU run
(:func:`adapt_heap`): it maps and unmaps one untouched block just under 32
MiB.  glibc's own dynamic heuristic then raises the mmap threshold to the
size of that block and the trim threshold to twice it -- what freeing any
large array (one JAX matmul, a numpy copy) does in any program -- so that the
step's buffers are reused without a ``mallopt`` call: measured on the 2-core
AMD VM, one fresh process each, a compiled BNN step at N = 1000 3.8 -> 2.0 ms
(1 087 -> 0 page faults per step), the eager one 5.6 -> 4.8 ms, a loop of 16
single-task meta-iterations 1.58 -> 1.23 s (as with :func:`tune_allocator`),
a batched one 1.27 -> 1.08 s (1.02 s with :func:`tune_allocator`, whose trim
threshold is 1 GiB).  The cost: up to about 62 MiB freed at the top of the
heap stays with the process, and blocks up to 31 MiB come from the heap
(freed gaps below its top are kept for reuse, not returned), as after any
program's first large free.  It does nothing where the C library is not
glibc, where the environment sets glibc's thresholds (``MALLOC_*``,
``glibc.malloc.*``) and after ``mallopt`` (:func:`tune_allocator`), which
switches glibc's dynamic threshold off.  The same effect without code, for any
program: ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824``
in the environment (or, glibc 2.26 and newer, ``GLIBC_TUNABLES=glibc.malloc.
mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``), or a
different allocator (jemalloc, tcmalloc) through ``LD_PRELOAD``.  The command
line leaves a process alone whose environment sets any of these.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import ctypes
import os
import sys
import warnings
from numbers import Integral

import torch

__all__ = ["adapt_heap", "tune_allocator"]

#: glibc's ``mallopt`` parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: glibc's largest mmap threshold on 64-bit systems (``DEFAULT_MMAP_THRESHOLD_MAX``).
MAX_MMAP_THRESHOLD = 32 * 2**20
#: ``mallopt`` takes a C ``int``.
_MAX_INT = 2**31 - 1
#: The block :func:`adapt_heap` maps and frees: under ``MAX_MMAP_THRESHOLD`` with glibc's
#: chunk header and page rounding, so that freeing it moves the dynamic threshold.
ADAPT_BYTES = 31 * 2**20
#: Whether :func:`adapt_heap` has run in this process.
_adapted = False
#: Environment variables by which a user has already chosen glibc's malloc settings.
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                  "MALLOC_MMAP_MAX_")


def _glibc():
    """The running glibc (a ``ctypes.CDLL``), or None for another C library."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallopt.restype = ctypes.c_int
        libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
        libc.free.argtypes, libc.free.restype = (ctypes.c_void_p,), None
    except (OSError, AttributeError):
        return None
    return libc


def user_has_chosen():
    """Whether the environment already sets glibc's malloc thresholds (then leave them)."""
    return (any(name in os.environ for name in _USER_SETTINGS)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def adapt_heap(device):
    """Let glibc's dynamic mmap threshold adapt to big buffers, once per process (CPU only).

    Maps and frees one untouched block of :data:`ADAPT_BYTES` bytes; glibc
    raises its mmap threshold to that size and its trim threshold to twice
    it (its documented dynamic behaviour, see ``mallopt(3)``), so that the
    multi-megabyte buffers a VI step frees are reused instead of coming back
    as fresh zero-filled pages.  No ``mallopt`` call; only the block's header
    page is written.  The engine calls it when a run or a meta-trainer starts.

    Parameters
    ----------
    device : torch.device or str
        The device of the run's tensors: nothing is done for any but the CPU.

    Returns
    -------
    done : bool
        True if the block was mapped and freed now; False where it had been
        before in this process, for another device, where the environment
        sets glibc's malloc thresholds, or off glibc.
    """
    global _adapted
    if _adapted or torch.device(device).type != "cpu" or user_has_chosen():
        return False
    _adapted = True
    libc = _glibc()
    if libc is None:
        return False
    block = libc.malloc(ADAPT_BYTES)
    if not block:
        return False
    libc.free(block)
    return True


def tune_allocator(mmap_threshold=MAX_MMAP_THRESHOLD, trim_threshold=2**30, *, environ=False):
    """Raise glibc's mmap and trim thresholds so that freed tensor buffers are reused.

    On CPU, a VI step frees and re-allocates the same multi-megabyte buffers
    every time; with glibc's defaults many of them come back as freshly
    mapped, zero-filled pages.  This keeps them in the heap: 1.3-1.6x faster
    steps and meta-iterations of the benchmark BNN at 1000 rows per task, at
    the price of the process keeping up to ``trim_threshold`` bytes of freed
    memory.  It changes the whole process (every library's allocations), so
    skmetavi only applies it when asked, and in its command line.

    Parameters
    ----------
    mmap_threshold : int, default=33554432
        Blocks of at least this many bytes are mapped directly (and unmapped
        on free); at most 32 MiB, glibc's own limit on 64-bit systems.
    trim_threshold : int, default=1073741824
        Free memory at the top of the heap beyond this many bytes is returned
        to the system; at most ``2**31 - 1`` (``mallopt`` takes a C ``int``).
    environ : bool, default=False
        Also set ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` in
        ``os.environ`` (where not set already), so that processes started
        later -- joblib's workers -- start with the same setting.

    Returns
    -------
    applied : bool
        True if glibc took both settings; False (with a ``RuntimeWarning``)
        where the C library is not glibc or refused them.

    See Also
    --------
    skmetavi.MetaBNNRegressor : Its ``compile`` option, the other speed setting on a CPU.

    Examples
    --------
    >>> import skmetavi
    >>> skmetavi.tune_allocator()  # doctest: +SKIP
    True
    """
    global _adapted
    for name, value, top, why in (
            ("mmap_threshold", mmap_threshold, MAX_MMAP_THRESHOLD, "glibc's limit on 64-bit"),
            ("trim_threshold", trim_threshold, _MAX_INT, "mallopt takes a C int")):
        if isinstance(value, bool) or not isinstance(value, Integral):
            raise TypeError(f"{name} must be an int (bytes), got {type(value).__name__}.")
        if not 0 <= value <= top:
            raise ValueError(f"{name} must be between 0 and {top} bytes ({why}), got {value}.")
    libc = _glibc()
    if libc is None:
        warnings.warn(f"tune_allocator: the C library of this platform ({sys.platform}) is not "
                      "glibc; nothing was changed.", RuntimeWarning, stacklevel=2)
        return False
    ok = (libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
          and libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
    if not ok:
        warnings.warn("tune_allocator: glibc's mallopt refused the thresholds "
                      f"({mmap_threshold}, {trim_threshold}).", RuntimeWarning, stacklevel=2)
        return False
    _adapted = True  # fixed thresholds: adapt_heap's block would change nothing
    if environ:
        os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(int(mmap_threshold)))
        os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(int(trim_threshold)))
    return True
