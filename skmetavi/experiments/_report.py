"""Result tables of the reproductions: printing, JSON, CSV."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import csv
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np


# Progress lines of ``skmetavi reproduce`` (on stderr; off unless :func:`reporting` is active).
_PROGRESS = {"name": None, "t0": 0.0}


@contextmanager
def reporting(name, enabled=True):
    """Within the block, :func:`progress` writes its lines to stderr, prefixed by ``name``."""
    previous = dict(_PROGRESS)
    if enabled:
        _PROGRESS.update(name=name, t0=time.perf_counter())
    try:
        yield
    finally:
        _PROGRESS.update(previous)


def progress(message):
    """One progress line on stderr, ``[NAME   12 s] message`` (only inside :func:`reporting`)."""
    if _PROGRESS["name"] is None:
        return
    elapsed = time.perf_counter() - _PROGRESS["t0"]
    print(f"[{_PROGRESS['name']} {elapsed:5.0f} s] {message}", file=sys.stderr, flush=True)


def describe_call(fn, args):
    """``fn``'s name and its short positional arguments, e.g. ``table4_seed(3)``."""
    shown = [repr(a) for a in args if isinstance(a, (str, int, float)) and not isinstance(a, bool)]
    return f"{fn.__name__.strip('_')}({', '.join(shown)})"


@dataclass
class Row:
    """One line of a reproduction table."""

    method: str
    metric: str
    ours: float
    ours_std: Optional[float] = None
    paper: Optional[float] = None

    @classmethod
    def from_values(cls, method, metric, values, paper=None):
        values = np.asarray(values, dtype=float)
        std = float(values.std(ddof=1)) if values.size > 1 else None
        return cls(method, metric, float(values.mean()), std, paper)


def _fmt(v, std=None):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    s = f"{v:.3f}"
    if std is not None:
        s += f" ± {std:.3f}"
    return s


def format_table(name, rows):
    """Plain-text table: method, metric, ours (± std), paper."""
    header = ("method", "metric", "ours", "paper")
    lines = [(r.method, r.metric, _fmt(r.ours, r.ours_std), _fmt(r.paper)) for r in rows]
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(header)]
    out = [f"== {name} =="]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join(out)


def format_markdown_table(rows):
    """Markdown table: method, metric, ours (± std), paper."""
    lines = ["| method | metric | ours | paper |", "|---|---|---|---|"]
    lines += [f"| {r.method} | {r.metric} | {_fmt(r.ours, r.ours_std)} | {_fmt(r.paper)} |"
              for r in rows]
    return "\n".join(lines)


def write_results(out_dir, name, budget, rows, seconds, config=None):
    """Write ``NAME.json`` (the documented schema), ``NAME.csv`` and ``NAME.config.json``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "budget": budget,
        "rows": [asdict(r) for r in rows],
        "seconds": float(seconds),
    }
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2))
    with open(out_dir / f"{name}.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "metric", "ours", "ours_std", "paper"])
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    if config is not None:
        (out_dir / f"{name}.config.json").write_text(json.dumps(config, indent=2, default=str))
    return payload
