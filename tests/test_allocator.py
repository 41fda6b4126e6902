"""skmetavi.tune_allocator: freed tensor buffers are reused instead of faulted in anew."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import subprocess
import sys

import pytest

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


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
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
    def __init__(self, answer=1):
        self.calls, self.answer = [], answer

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.answer


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
