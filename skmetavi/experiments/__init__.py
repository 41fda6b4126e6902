"""Reproductions of the paper's experiments (``skmetavi reproduce NAME``)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import platform
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

from skmetavi.experiments import _bnn, _mog, _partial_vae, _vae
from skmetavi.experiments._report import (
    Row,
    format_markdown_table,
    format_table,
    progress,
    reporting,
    write_results,
)

__all__ = ["EXPERIMENTS", "reproduce", "reproduce_all", "Row"]

#: name -> (description, runner(budget_dict, seed) -> (rows, figure data), budgets, plotter, config)
EXPERIMENTS = {
    "table1": (
        "MoG, Meta-D: learned alpha with the D_0.5 and TV meta-losses vs Bayesian optimisation",
        _mog.table1, _mog.BUDGETS, None, _mog.config,
    ),
    "table2": (
        "MoG, Meta-D: meta-f vs meta-alpha vs BO vs fixed alpha, ranks over 10 test tasks; Fig. 1",
        _mog.table2, _mog.BUDGETS, _mog.plot_figure1, _mog.config,
    ),
    "table3": (
        "MoG, Meta-D&phi (B=20): VI&phi vs meta-alpha&phi vs meta-f&phi, ranks at 20/100 iterations",
        _mog.table3, _mog.BUDGETS, None, _mog.config,
    ),
    "table4": (
        "BNN sinusoids, Meta-D (1000 points): VI / VI(alpha=0.5) / meta-alpha / meta-f; Fig. 3",
        _bnn.table4, _bnn.BUDGETS, _bnn.plot_figure3, _bnn.config,
    ),
    "table5": (
        "BNN sinusoids, Meta-D&phi (40 points): VI / VI&phi / meta-alpha&phi / meta-f&phi; Fig. 3",
        _bnn.table5, _bnn.BUDGETS, _bnn.plot_figure3, _bnn.config,
    ),
    "table6": (
        "VAE digits 5-9, Meta-D: VI / VI(alpha=0.5) / meta-alpha / meta-f, IWAE test LL per digit",
        _vae.table6, _vae.BUDGETS, _vae.plot_figure, _vae.config,
    ),
    "table7": (
        "VAE digits 5-9, Meta-D&phi (few points): VI&phi / meta-alpha&phi / meta-f&phi, test LL",
        _vae.table7, _vae.BUDGETS, _vae.plot_figure, _vae.config,
    ),
    "fig4": (
        "Partial VAE, MovieLens age groups: test LL vs adaptation iterations, Meta-D (90/10) "
        "and Meta-D&phi (60/40), with recommender baselines",
        _partial_vae.fig4, _partial_vae.BUDGETS, _partial_vae.plot_figure4, _partial_vae.config,
    ),
}


def reproduce(name, budget="quick", out="results", seed=0, verbose=True):
    """Run one reproduction, print ours vs the paper and write ``out/NAME.{json,csv,png}``.

    Parameters
    ----------
    name : str
        One of ``EXPERIMENTS``.
    budget : {"quick", "paper"}, default="quick"
    out : str or path, default="results"
    seed : int, default=0
    verbose : bool, default=True
        Print the table, and progress lines on stderr as the runs go (one per
        method or seed: ``[NAME  12 s] ...``).

    Returns
    -------
    payload : dict
        The content of ``NAME.json``.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"Unknown experiment {name!r}; valid names are {sorted(EXPERIMENTS)}.")
    _, runner, budgets, plotter, config = EXPERIMENTS[name]
    if budget not in budgets:
        raise ValueError(f"Unknown budget {budget!r}; valid budgets are {sorted(budgets)}.")
    t0 = time.perf_counter()
    with reporting(name, enabled=verbose):
        progress(f"budget={budget}, seed={seed}: {EXPERIMENTS[name][0]}")
        rows, figure = runner(budgets[budget], seed)
        progress(f"done in {time.perf_counter() - t0:.0f} s")
    if plotter is not None and figure is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        plotter(figure, Path(out) / f"{name}.png")
    seconds = time.perf_counter() - t0
    payload = write_results(out, name, budget, rows, seconds, config=config(budget) | {"seed": seed})
    if verbose:
        print(format_table(f"{name} (budget={budget}, seed={seed}, {seconds:.0f} s)", rows))
    return payload


def reproduce_all(budget="quick", out="results", seed=0, verbose=True):
    """Run every reproduction and write one Markdown report, ``out/REPORT.md``.

    Each experiment writes its own files as :func:`reproduce` does; the report
    has one section per experiment with our numbers beside the paper's, its
    time and its plot.  An experiment that fails (a missing data set, say) is
    reported with its error and the others still run; the failure is raised
    again once the report is written, so that a script sees it.

    Parameters
    ----------
    budget : {"quick", "paper", "smoke"}, default="quick"
    out : str or path, default="results"
    seed : int, default=0
    verbose : bool, default=True
        Progress lines on stderr and each table on stdout.

    Returns
    -------
    report : pathlib.Path
        The path of ``REPORT.md``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections, failures = [], []
    for i, name in enumerate(EXPERIMENTS, 1):
        if verbose:
            print(f"[all] {i}/{len(EXPERIMENTS)}: {name}", flush=True)
        try:
            payload = reproduce(name, budget=budget, out=out, seed=seed, verbose=verbose)
        except Exception as exc:  # report it, run the rest, raise at the end
            failures.append((name, exc))
            sections.append(f"## {name}\n\n{EXPERIMENTS[name][0]}\n\n**Failed**: "
                            f"`{type(exc).__name__}: {exc}`\n\n```\n"
                            f"{traceback.format_exc(limit=3)}```\n")
            continue
        rows = [Row(**r) for r in payload["rows"]]
        plot = out / f"{name}.png"
        sections.append(
            f"## {name}\n\n{EXPERIMENTS[name][0]} ({payload['seconds']:.0f} s)\n\n"
            + format_markdown_table(rows) + "\n"
            + (f"\n![{name}]({plot.name})\n" if plot.exists() else "")
        )
    seconds = time.perf_counter() - t0
    head = (f"# skmetavi reproductions\n\nBudget `{budget}`, seed {seed}, {stamp}, "
            f"{seconds:.0f} s on {platform.machine()} ({platform.python_version()}). "
            "\"ours\" is mean ± std over seeds where there are several; \"paper\" is "
            "Zhang et al. (AISTATS 2021). Each table's files are beside this report.\n")
    report = out / "REPORT.md"
    report.write_text("\n".join([head, *sections]))
    if failures:
        names = ", ".join(n for n, _ in failures)
        raise RuntimeError(f"{len(failures)} reproduction(s) failed ({names}); the others "
                           f"are in {report}.") from failures[0][1]
    return report
