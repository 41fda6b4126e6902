"""The reproduction machinery: CLI, output files and schema (with seconds-long budgets)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import csv
import json
import subprocess
import sys

import pytest

from skmetavi._cli import main
from skmetavi.experiments import EXPERIMENTS, reproduce


@pytest.mark.parametrize(
    "name", ["table1", "table2", "table3", "table4", "table5", "table6", "table7"]
)
def test_reproduce_writes_documented_schema(name, tmp_path):
    payload = reproduce(name, budget="smoke", out=tmp_path, seed=1, verbose=False)
    on_disk = json.loads((tmp_path / f"{name}.json").read_text())
    assert on_disk == payload
    assert set(payload) == {"name", "budget", "rows", "seconds"}
    assert payload["name"] == name and payload["budget"] == "smoke"
    assert payload["seconds"] > 0
    assert payload["rows"]
    for row in payload["rows"]:
        assert set(row) == {"method", "metric", "ours", "ours_std", "paper"}
        assert isinstance(row["ours"], float)
        assert row["ours_std"] is None or isinstance(row["ours_std"], float)
        assert row["paper"] is None or isinstance(row["paper"], float)
    assert any(row["paper"] is not None for row in payload["rows"])
    with open(tmp_path / f"{name}.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(payload["rows"])
    config = json.loads((tmp_path / f"{name}.config.json").read_text())
    assert config["seed"] == 1
    if name in ("table2", "table4", "table5", "table6", "table7"):  # Fig. 1 / 3, samples + LL bars
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000


def test_cli_list_and_errors(capsys):
    assert main(["reproduce", "list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert name in out
    assert main(["reproduce", "table99"]) == 2
    assert "unknown experiment 'table99'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["reproduce", "table1", "--budget", "huge"])
    with pytest.raises(ValueError, match="Unknown budget"):
        reproduce("table1", budget="huge")


def test_python_dash_m_entry_point():
    res = subprocess.run(
        [sys.executable, "-m", "skmetavi", "reproduce", "list"], capture_output=True, text=True
    )
    assert res.returncode == 0 and "table1" in res.stdout


def _write_ml100k(folder, seed=0):
    """Small files in ml-100k's format: 14 users in each of the seven age groups."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ages = [12, 20, 30, 40, 47, 52, 60]
    users = [(u + 1, ages[u % 7]) for u in range(98)]
    folder.mkdir(parents=True)
    (folder / "u.user").write_text(
        "".join(f"{u}|{a}|M|other|12345\n" for u, a in users))
    lines = []
    for u, _ in users:
        for item in rng.choice(60, 25, replace=False) + 1:
            lines.append(f"{u}\t{item}\t{rng.randint(1, 6)}\t881250949\n")
    (folder / "u.data").write_text("".join(lines))


def test_fig4_writes_curves_and_baselines(tmp_path, monkeypatch):
    """Fig. 4 on small files in ml-100k's format (the real data is not needed)."""
    _write_ml100k(tmp_path / "data" / "movielens" / "ml-100k")
    monkeypatch.setenv("SKMETAVI_DATA", str(tmp_path / "data"))
    payload = reproduce("fig4", budget="smoke", out=tmp_path, seed=1, verbose=False)
    rows = {(r["method"], r["metric"]): r["ours"] for r in payload["rows"]}
    for name in ("VI", "VI (α=0.5)", "meta-α", "meta-f"):
        assert ("%s" % name, "test LL per rating, last iteration (90/10)") in rows
    for name in ("VI&φ", "meta-α&φ", "meta-f&φ"):
        assert (name, "test RMSE, last iteration (60/40)") in rows
    assert ("baseline item_mean", "test RMSE (90/10)") in rows
    assert all(isinstance(v, float) for v in rows.values())
    assert (tmp_path / "fig4.png").stat().st_size > 10_000
    config = json.loads((tmp_path / "fig4.config.json").read_text())
    assert config["test_groups"] == [1, 50, 56]
