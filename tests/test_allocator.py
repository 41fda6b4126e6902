"""skmetavi.tune_allocator: freed tensor buffers are reused instead of faulted in anew."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import skmetavi
from skmetavi import _allocator

needs_glibc = pytest.mark.skipif(_allocator._glibc() is None, reason="needs glibc")

#: A VI step's allocation pattern: a dozen ~1 MB buffers, written, freed, again; prints the
#: minor page faults per repetition once warm.  glibc's thresholds move with what the process
#: freed before (some fresh processes start with them raised), so "default" and "tuned" first
#: pin glibc's documented defaults (128 KiB each); "env" starts from the environment's.
_CHILD = r"""
import ctypes, resource, sys, torch, skmetavi
if sys.argv[1] != "env":
    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 128 * 1024) == 1 and libc.mallopt(-1, 128 * 1024) == 1
if sys.argv[1] == "tuned":
    assert skmetavi.tune_allocator()
def step():
    keep = [torch.empty(2**18 + 4096 * i) for i in range(12)]
    for t in keep:
        t.fill_(1.0)
for _ in range(5):
    step()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20)
"""

_NAMES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def _env_without_malloc_settings():
    """This process's environment less glibc's malloc settings, for a child process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    return env


def _faults(mode):
    env = _env_without_malloc_settings()
    if mode == "env":  # what tune_allocator(environ=True) hands to later processes
        env.update(zip(_NAMES, (str(_allocator.MAX_MMAP_THRESHOLD), str(2**30))))
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_tuned_allocator_reuses_freed_buffers():
    # 12 MB written per repetition: about 3 300 fresh pages each time with glibc's defaults.
    default, tuned, by_env = _faults("default"), _faults("tuned"), _faults("env")
    assert tuned < 50 and by_env < 50, (default, tuned, by_env)
    assert default > tuned + 100, (default, tuned)  # the check can tell the two apart


class _RecordingLibc:
    def __init__(self, answer=1, block=4096):
        self.calls, self.answer, self.block = [], answer, block

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer

    def malloc(self, size):
        self.calls.append(("malloc", size))
        return self.block

    def free(self, pointer):
        self.calls.append(("free", pointer))


#: An eager BNN step at 1000 rows (the benchmark's 1-50-50-1 network, K = 10, float32) in a
#: fresh process whose glibc keeps its dynamic thresholds: page faults per step with the
#: engine's adapt_heap switched off, then after calling it.
_ADAPT_CHILD = r"""
import resource, numpy as np
from skmetavi import MetaBNNRegressor, Renyi, _allocator, _inner
from skmetavi.datasets import make_sinusoid_tasks
_inner.adapt_heap = lambda device: False
X, y, g = make_sinusoid_tasks(1, 1000, random_state=0)
est = MetaBNNRegressor(Renyi(0.5, learnable=False), hidden_layer_sizes=(50, 50),
                       n_particles=10, inner_optimizer="adam", inner_lr=1e-3, dtype="float32",
                       random_state=0)
est._setup_torch()
_, run, _, _ = est._adaptation([(X, y)], [np.random.RandomState(0)])
run.budget = None
def faults():
    for _ in range(10):
        run.step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(30):
        run.step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 30
before = faults()
assert _allocator.adapt_heap("cpu") and not _allocator.adapt_heap("cpu")
print(before, faults())
"""


@needs_glibc
def test_adapted_heap_reuses_a_steps_freed_buffers():
    # Measured: 190-460 faults per step before, 5-24 after (five fresh processes).
    out = subprocess.run([sys.executable, "-c", _ADAPT_CHILD],
                         env=_env_without_malloc_settings(), capture_output=True, text=True,
                         check=True)
    before, after = map(float, out.stdout.split())
    if before < 100:  # something in this process's start already raised glibc's thresholds
        pytest.skip(f"no page faults to remove here ({before} per step before)")
    assert after < 0.25 * before, (before, after)


@pytest.fixture
def fresh_adapt(monkeypatch, malloc_settings_cleared):
    """adapt_heap as in a process where it has not run, with glibc's calls recorded."""
    libc = _RecordingLibc()
    monkeypatch.setattr(_allocator, "_adapted", False)
    monkeypatch.setattr(_allocator, "_glibc", lambda: libc)
    return libc


def test_adapt_heap_maps_and_frees_one_block_once_per_process(fresh_adapt):
    assert _allocator.adapt_heap(torch.device("cpu"))
    assert fresh_adapt.calls == [("malloc", _allocator.ADAPT_BYTES), ("free", 4096)]
    assert not _allocator.adapt_heap("cpu")
    assert len(fresh_adapt.calls) == 2
    # glibc raises its dynamic threshold only for blocks up to its 64-bit maximum.
    assert _allocator.ADAPT_BYTES + 4096 + 64 <= _allocator.MAX_MMAP_THRESHOLD


@pytest.mark.parametrize("case", ["cuda", "meta", "user_env", "not_glibc", "malloc_fails"])
def test_adapt_heap_leaves_the_heap_alone(case, fresh_adapt, monkeypatch):
    device = case if case in ("cuda", "meta") else "cpu"
    if case == "user_env":
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    elif case == "not_glibc":
        monkeypatch.setattr(_allocator, "_glibc", lambda: None)
    elif case == "malloc_fails":
        fresh_adapt.block = None
    assert _allocator.adapt_heap(device) is False
    assert fresh_adapt.calls == ([("malloc", _allocator.ADAPT_BYTES)]
                                 if case == "malloc_fails" else [])


def test_runs_and_meta_trainers_adapt_the_heap_for_their_device(monkeypatch):
    from skmetavi import _inner, _trainer

    devices = []
    monkeypatch.setattr(_inner, "adapt_heap", devices.append)
    monkeypatch.setattr(_trainer, "adapt_heap", lambda d: devices.append(("meta", d)))
    X = np.random.RandomState(0).normal(size=(40, 1))
    groups = np.repeat([0, 1], 20)
    est = skmetavi.MetaDivergenceVI(divergence="renyi", max_iter=2, n_particles=4,
                                    max_meta_iter=1, n_tasks_per_batch=2, random_state=0)
    est.meta_fit(X, groups=groups)
    assert ("meta", torch.device("cpu")) in devices
    devices.clear()
    est.fit(X[:20])
    assert devices and all(d == torch.device("cpu") for d in devices)


def test_mallopt_gets_the_thresholds_and_environ_keeps_the_users(monkeypatch, malloc_settings_cleared):
    libc = _RecordingLibc()
    monkeypatch.setattr(_allocator, "_glibc", lambda: libc)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert skmetavi.tune_allocator(environ=True)
    assert libc.calls == [(-3, 2**25), (-1, 2**30)]
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(_allocator.MAX_MMAP_THRESHOLD)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"  # the user's own setting stays
    assert skmetavi.tune_allocator(trim_threshold=2**31 - 1)
    assert libc.calls[-1] == (-1, 2**31 - 1)
    n_calls = len(libc.calls)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    assert _allocator.adapt_heap("cpu") is False  # fixed thresholds: no block to map
    assert len(libc.calls) == n_calls


def test_refused_thresholds_warn(monkeypatch, malloc_settings_cleared):
    monkeypatch.setattr(_allocator, "_glibc", lambda: _RecordingLibc(answer=0))
    with pytest.warns(RuntimeWarning, match="refused"):
        assert skmetavi.tune_allocator(environ=True) is False
    assert "MALLOC_MMAP_THRESHOLD_" not in os.environ


def test_users_own_settings_are_detected(monkeypatch, malloc_settings_cleared):
    assert not _allocator.user_has_chosen()
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    assert _allocator.user_has_chosen()
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    assert _allocator.user_has_chosen()


@pytest.mark.parametrize("kw, error, match", [
    (dict(mmap_threshold=2**26), ValueError, "between 0 and 33554432"),
    (dict(mmap_threshold=-1), ValueError, "mmap_threshold"),
    (dict(trim_threshold=-5), ValueError, "trim_threshold must be between 0 and 2147483647"),
    (dict(trim_threshold=2**32), ValueError, "C int"),
    (dict(trim_threshold=1.5), TypeError, "got float"),
    (dict(mmap_threshold=True), TypeError, "got bool"),
])
def test_bad_thresholds_are_explained(kw, error, match):
    with pytest.raises(error, match=match):
        skmetavi.tune_allocator(**kw)


def test_other_c_libraries_warn_and_change_nothing(monkeypatch):
    monkeypatch.setattr(_allocator, "_glibc", lambda: None)
    with pytest.warns(RuntimeWarning, match="not glibc; nothing was changed"):
        assert skmetavi.tune_allocator() is False
