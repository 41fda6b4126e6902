"""Reproductions of the paper's experiments (``skmetavi reproduce NAME``)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import time
from pathlib import Path

from skmetavi.experiments import _bnn, _mog, _partial_vae, _vae
from skmetavi.experiments._report import Row, format_table, progress, reporting, write_results

__all__ = ["EXPERIMENTS", "reproduce", "Row"]

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
