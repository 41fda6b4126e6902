"""The BO baseline of Tables 1-2: Optuna's GP sampler over log alpha (the ``bo`` extra)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import importlib.util
import sys

import numpy as np
import pytest

from skmetavi.experiments import _bo, _mog

requires_optuna = pytest.mark.skipif(
    importlib.util.find_spec("optuna") is None, reason='needs the "bo" extra (optuna)'
)
BOUNDS = (0.05, 2.0)


def _bumpy(a):
    """Minimum 0 at a = 0.3 (log space), with a local minimum near a = 1.2."""
    u = np.log(a) - np.log(0.3)
    return u**2 * (1.0 + np.sin(3.0 * u) ** 2)


@requires_optuna
def test_finds_the_log_space_minimiser_within_16_evaluations():
    res = _bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=16, random_state=0)
    assert len(res.x) == len(res.y) == len(res.t) == 16
    assert all(BOUNDS[0] <= x <= BOUNDS[1] for x in res.x)
    assert abs(np.log(res.best_after(16)) - np.log(0.3)) < 0.05
    assert res.best_after(16) == res.x[int(np.argmin(res.y))]
    # Seeded: the same points again.
    again = _bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=4, random_state=0)
    np.testing.assert_allclose(again.x, res.x[:4])


@requires_optuna
def test_beats_random_search_on_average():
    n_evals, seeds = 8, range(3)
    bo = [min(_bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=n_evals, random_state=s).y)
          for s in seeds]
    rs = []
    for s in seeds:
        u = np.random.RandomState(s).uniform(*np.log(BOUNDS), size=n_evals)
        rs.append(min(_bumpy(np.exp(u))))
    assert np.mean(bo) < 0.1 * np.mean(rs)


@requires_optuna
def test_times_are_monotone_and_match_wall_time():
    res = _bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=5, n_init=2, random_state=1)
    assert np.all(np.diff(res.t) >= 0) and res.t[0] > 0
    assert res.seconds_after(5) == res.t[-1] and res.seconds_after(2) <= res.seconds_after(5)
    assert res.n_within(0.0) == 0 and res.n_within(res.t[2]) == 3 and res.n_within(1e9) == 5


@requires_optuna
def test_does_not_touch_optuna_logging_or_warnings(capsys):
    import optuna

    before = optuna.logging.get_verbosity()
    _bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=3, random_state=0)  # warnings are errors
    assert optuna.logging.get_verbosity() == before
    captured = capsys.readouterr()
    assert "Trial" not in captured.err + captured.out


@pytest.fixture
def no_optuna(monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` raises ImportError


def test_missing_optuna_names_the_extra(no_optuna):
    with pytest.raises(ImportError, match=r'pip install "skmetavi\[bo\]"'):
        _bo.bayesian_optimization(_bumpy, BOUNDS, n_evals=3)


@pytest.mark.parametrize("table", ["table1", "table2"])
def test_tables_with_bo_raise_before_running_without_optuna(no_optuna, monkeypatch, table):
    def fail(calls):
        raise AssertionError("ran before checking for optuna")

    monkeypatch.setattr(_mog, "_parallel", fail)
    with pytest.raises(ImportError, match=r"skmetavi\[bo\]"):
        getattr(_mog, table)(_mog.BUDGETS["smoke"], 0)
    assert _mog.config("smoke")["bo"]["version"] is None  # table3's config still works


@requires_optuna
def test_table1_runs_optuna_bo_with_matched_wall_time(monkeypatch):
    monkeypatch.setattr(_mog, "_n_jobs", lambda: 1)  # in-process, so that the spy sees the calls
    results = []

    def spy(*args, **kwargs):
        results.append(_bo.bayesian_optimization(*args, **kwargs))
        return results[-1]

    monkeypatch.setattr(_mog, "bayesian_optimization", spy)
    monkeypatch.setattr(_mog, "LOSSES", {"d_half": "D_0.5"})
    budget = dict(_mog.BUDGETS["smoke"], n_seeds=1)
    rows, _ = _mog.table1(budget, 0)
    assert len(results) == len(_mog.LOSSES) and all(len(r.x) == _mog.BO_EVALS for r in results)
    by_key = {(r.method, r.metric): r.ours for r in rows}
    for loss, res in zip(_mog.LOSSES.values(), results):
        assert by_key[("BO-8", f"learned alpha ({loss} meta-loss)")] == res.best_after(8)
        assert by_key[("BO-16", f"learned alpha ({loss} meta-loss)")] == res.best_after(16)
        n = by_key[("BO @ meta-α time", f"BO evaluations done, of 16 ({loss} meta-loss)")]
        assert 0 <= n <= _mog.BO_EVALS
        assert by_key[("BO @ meta-α time", f"learned alpha ({loss} meta-loss)")] == (
            res.best_after(max(1, int(n))))
        assert by_key[("BO-16", f"seconds ({loss} meta-loss)")] >= res.t[-1]
    assert _mog.config("smoke")["bo"]["sampler"] == "GPSampler"
