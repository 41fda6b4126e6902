"""skmetavi.tune_allocator: freed tensor buffers are reused instead of faulted in anew."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import subprocess
import sys

import pytest

import skmetavi
from skmetavi import _allocator

pytestmark = pytest.mark.skipif(_allocator._glibc() is None, reason="needs glibc")

#: A VI step's allocation pattern: a dozen ~1 MB buffers, written, freed, again; prints the
#: minor page faults per repetition once warm.
_CHILD = r"""
import resource, sys, torch, skmetavi
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


def _faults(mode):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _CHILD, mode], env=env, capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def test_tuned_allocator_reuses_freed_buffers():
    # 12 MB written per repetition: 3 000+ fresh pages each time with glibc's defaults here.
    default, tuned = _faults("default"), _faults("tuned")
    assert tuned < 50, (default, tuned)


def test_environ_is_set_for_later_processes_without_overriding(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert skmetavi.tune_allocator(environ=True)
    assert os.environ["MALLOC_MMAP_THRESHOLD_"] == str(_allocator.MAX_MMAP_THRESHOLD)
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "12345"  # the user's own setting stays


@pytest.mark.parametrize("kw, error, match", [
    (dict(mmap_threshold=2**26), ValueError, "between 0 and 33554432"),
    (dict(mmap_threshold=-1), ValueError, "mmap_threshold"),
    (dict(trim_threshold=-5), ValueError, "at least 0, got -5"),
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
