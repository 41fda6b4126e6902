"""Run every gallery example in a subprocess (as sphinx-gallery would)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = sorted((pathlib.Path(__file__).parent.parent / "examples").glob("plot_*.py"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(path, tmp_path):
    env = dict(os.environ, MPLBACKEND="Agg")
    code = f"import runpy; runpy.run_path({str(path)!r}, run_name='example')"
    res = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", code],
        # A guard against a hung process, not a speed test: an example that took 300 s on
        # a machine running three other jobs was killed by the previous limit.
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=3600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
