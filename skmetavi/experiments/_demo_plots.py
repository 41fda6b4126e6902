"""The figures of ``skmetavi demo``, drawn with :mod:`skmetavi.plotting`'s displays."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

#: Unseen tasks shown in the predictive-band figure.
N_SHOWN = 2


def save_demo_plots(result, out):
    """Write ``demo_predictive.png`` and ``demo_divergence.png`` into ``out``.

    Parameters
    ----------
    result : DemoResult
        A finished demo run (its ``fitted`` estimators).
    out : pathlib.Path
        The output folder.

    Returns
    -------
    files : dict of str to str
        ``{"predictive": path, "divergence": path}``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skmetavi.plotting import DivergenceDisplay, PredictiveDisplay, TrainingHistoryDisplay

    support, X_query, y_query = result.fitted["tasks"]
    shown = ["KL-VI", "learned divergence + init"]
    n = min(N_SHOWN, len(support))
    fig, axes = plt.subplots(n, len(shown), figsize=(5 * len(shown), 3.2 * n), squeeze=False,
                             sharex=True, sharey="row")
    by_method = {r.method: r for r in result.methods}
    for col, method in enumerate(shown):
        fits = result.fitted[method][1]
        for row in range(n):
            ax = axes[row, col]
            ax.scatter(X_query[row][:, 0], y_query[row], s=3, color="0.75", label="query rows")
            (Xs, ys) = support[row]
            PredictiveDisplay.from_estimator(fits[row], Xs, ys, ax=ax, name=method,
                                             scatter_kwargs={"label": "support rows"})
            ax.set_title(f"{method}, unseen task {row}: test LL "
                         f"{by_method[method].per_task_log_density[row]:.2f}", fontsize=9)
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Predictive mean ± 2 std from {len(support[0][1])} support rows")
    fig.tight_layout()
    predictive = out / "demo_predictive.png"
    fig.savefig(predictive, dpi=100)
    plt.close(fig)

    learned = result.fitted["learned divergence + init"][0]
    fig, (ax_div, ax_hist) = plt.subplots(1, 2, figsize=(10, 3.8))
    DivergenceDisplay.from_estimator(learned, ax=ax_div)
    ax_div.set_title(f"Learned Rényi α = {result.alpha_learned:.3g} among the α family",
                     fontsize=9)
    TrainingHistoryDisplay.from_estimator(learned, phase="meta_fit", keys=["alpha"], ax=ax_hist)
    ax_hist.set_title(f"α during meta-training (from {result.alpha_start:.3g})", fontsize=9)
    fig.tight_layout()
    divergence = out / "demo_divergence.png"
    fig.savefig(divergence, dpi=100)
    plt.close(fig)
    return {"predictive": str(predictive), "divergence": str(divergence)}
