"""Test configuration shared by all test modules."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# The test problems are tiny: torch's intra-op thread pool only adds contention on the
# 2-core CI machines (tiny ops became ~1000x slower when another process was busy).
torch.set_num_threads(1)

# Hypothesis budgets.  The default run draws a few dozen examples per property; the
# `slow`-marked variants of tests/test_properties.py use the "slow" profile (>= 300).
# SKMETAVI_HYPOTHESIS_PROFILE=slow also selects it for every property of the run.
# No deadline: the first example of a test pays for torch's lazy initialisation.
_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("fast", max_examples=30, **_COMMON)
settings.register_profile("slow", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("SKMETAVI_HYPOTHESIS_PROFILE", "fast"))


@pytest.fixture
def malloc_settings_cleared(monkeypatch):
    """No ``MALLOC_*`` / ``GLIBC_TUNABLES`` settings during a test, restored after it.

    Each variable is set before it is deleted, so that monkeypatch records its original
    (set or not) and undoes whatever the test, or ``tune_allocator(environ=True)`` writing
    ``os.environ`` directly, leaves behind.
    """
    from skmetavi import _allocator

    monkeypatch.setattr(_allocator, "_adapted", _allocator._adapted)  # restored after the test
    for name in (*_allocator._USER_SETTINGS, "GLIBC_TUNABLES"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
