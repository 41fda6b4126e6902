"""``skmetavi demo`` and ``skmetavi reproduce all``."""

import json

import matplotlib
import numpy as np
import pytest

from skmetavi import _allocator
from skmetavi._cli import main
from skmetavi.experiments._demo import format_demo, run_demo

matplotlib.use("Agg")

METHODS = ["BayesianRidge (splines)", "KL-VI", "KL-VI + learned init",
           "learned divergence + init"]


def _drawn_fraction(path):
    """Fraction of an image's pixels that are not (near-)white."""
    import matplotlib.image as mpimg

    img = mpimg.imread(path)[..., :3]
    return float(np.mean(img.min(axis=-1) < 0.9))


def _record_tuning(monkeypatch):
    """Stand in for tune_allocator (no process-wide change); the list of its calls.

    For tests that also take the ``malloc_settings_cleared`` fixture.
    """
    calls = []
    monkeypatch.setattr(_allocator, "_glibc", lambda: object())
    monkeypatch.setattr(_allocator, "tune_allocator", lambda **kw: calls.append(kw))
    monkeypatch.setattr(_allocator, "_adapted", True)  # the stand-in libc has no malloc
    return calls


def test_demo_cli_smoke(tmp_path, capsys, monkeypatch, malloc_settings_cleared):
    calls = _record_tuning(monkeypatch)
    assert main(["demo", "--budget", "smoke", "--out", str(tmp_path), "--quiet"]) == 0
    assert calls == [{"environ": True}]  # the command line tunes its process and its workers
    out, err = capsys.readouterr()
    assert err == ""  # --quiet: no bars, no progress lines
    for method in METHODS:
        assert method in out
    assert "90% coverage" in out and "Learned alpha: 0.5 ->" in out
    payload = json.loads((tmp_path / "demo.json").read_text())
    assert [m["method"] for m in payload["methods"]] == METHODS
    for m in payload["methods"]:
        assert np.isfinite([m["log_density"], m["rmse"], m["coverage"]]).all()
        assert 0.0 <= m["coverage"] <= 1.0 and len(m["per_task_log_density"]) == 2
    md = (tmp_path / "demo.md").read_text()
    assert md.startswith("# skmetavi demo") and "| KL-VI |" in md
    for name in ("demo_predictive.png", "demo_divergence.png"):
        assert _drawn_fraction(tmp_path / name) > 0.01, name  # something is drawn


def test_demo_progress_goes_to_stderr(tmp_path, capsys):
    run_demo(tmp_path, budget="smoke", plots=False)
    err = capsys.readouterr().err
    assert "[demo" in err and "meta-training 'learned divergence + init'" in err


def test_demo_rejects_unknown_budget(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown budget 'huge'.*\['quick', 'smoke'\]"):
        run_demo(tmp_path, budget="huge")


@pytest.mark.slow
def test_quick_demo_learns_something(tmp_path):
    """The demo's claim, at its own budget: meta-learning beats KL-VI and BayesianRidge.

    Measured (seed 0): test log density -2.33 (learned divergence + init) and -2.32 (KL-VI +
    learned init) vs -2.88 (KL-VI) and -2.63 (BayesianRidge); alpha 0.5 -> 0.92.
    """
    result = run_demo(tmp_path, quiet=True, plots=False)
    by = {m.method: m for m in result.methods}
    learned = by["learned divergence + init"]
    assert learned.log_density > by["KL-VI"].log_density + 0.3
    assert learned.log_density > by["BayesianRidge (splines)"].log_density + 0.1
    assert learned.rmse < by["KL-VI"].rmse
    assert abs(result.alpha_learned - result.alpha_start) > 0.1  # alpha moved
    assert "KL-VI + learned init" in format_demo(result)


def _has_ml100k():
    from pathlib import Path

    from skmetavi.experiments._partial_vae import _data_home

    home = Path(_data_home())
    return any((d / "u.data").exists() and (d / "u.user").exists()
               for d in (home, home / "ml-100k"))


def test_reproduce_all_smoke_writes_one_report(tmp_path, capsys, monkeypatch,
                                                malloc_settings_cleared):
    from skmetavi import experiments

    calls = _record_tuning(monkeypatch)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "4096")  # a user's own choice: left alone

    if not _has_ml100k():  # fig4 needs MovieLens, which is never downloaded (licence)
        monkeypatch.setattr(experiments, "EXPERIMENTS", {
            k: v for k, v in experiments.EXPERIMENTS.items() if k != "fig4"})
    assert main(["reproduce", "all", "--budget", "smoke", "--out", str(tmp_path),
                 "--quiet"]) == 0
    assert calls == []
    report = (tmp_path / "REPORT.md").read_text()
    from skmetavi.experiments import EXPERIMENTS

    for name in EXPERIMENTS:
        assert f"## {name}" in report and (tmp_path / f"{name}.json").exists()
    assert "| meta-α | learned alpha (D_0.5 meta-loss) |" in report
    assert "0.520 |" in report  # the paper's number beside ours
    assert "![table4](table4.png)" in report


def test_reproduce_all_reports_a_failure_and_raises(tmp_path, monkeypatch):
    from skmetavi import experiments

    def broken(budget, seed):
        raise FileNotFoundError("no MNIST here")

    entry = experiments.EXPERIMENTS["table6"]
    monkeypatch.setitem(experiments.EXPERIMENTS, "table6", (entry[0], broken, *entry[2:]))
    monkeypatch.setattr(experiments, "EXPERIMENTS", {k: experiments.EXPERIMENTS[k]
                                                     for k in ("table1", "table6")})
    with pytest.raises(RuntimeError, match=r"1 reproduction\(s\) failed \(table6\)"):
        experiments.reproduce_all(budget="smoke", out=tmp_path, verbose=False)
    report = (tmp_path / "REPORT.md").read_text()
    assert "## table1" in report and "**Failed**: `FileNotFoundError: no MNIST here`" in report
