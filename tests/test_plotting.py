"""Tests of skmetavi.plotting: the drawn data equal independently computed arrays."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.testing import assert_allclose
from sklearn.exceptions import NotFittedError
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF
from sklearn.linear_model import LinearRegression

import skmetavi.plotting
from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.callbacks import History
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.divergences import KL, FDivergence, LocalRenyi, NeuralF, Renyi, TailAdaptive
from skmetavi.plotting import DivergenceDisplay, PredictiveDisplay, TrainingHistoryDisplay

matplotlib = pytest.importorskip("matplotlib")

TAB_BLUE = np.array([31, 119, 180])


@pytest.fixture
def pyplot():
    """pyplot on the Agg backend; every figure is closed afterwards."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.close("all")
    yield plt
    plt.close("all")


def _axes_pixels(ax):
    """RGB pixels strictly inside ``ax`` (a 3-pixel margin leaves out the spines)."""
    fig = ax.figure
    fig.canvas.draw()
    image = np.asarray(fig.canvas.buffer_rgba())[..., :3].astype(int)
    box = ax.get_window_extent()
    height = image.shape[0]
    rows = slice(height - int(box.y1) + 3, height - int(box.y0) - 3)
    return image[rows, int(box.x0) + 3: int(box.x1) - 3]


def _n_drawn(ax):
    """Number of non-white pixels inside ``ax``."""
    return int(np.any(_axes_pixels(ax) != 255, axis=-1).sum())


def _n_coloured(ax, rgb, tol=40):
    """Number of pixels inside ``ax`` within ``tol`` of colour ``rgb``."""
    return int((np.abs(_axes_pixels(ax) - rgb).max(axis=-1) <= tol).sum())


def _rgb(artist_color):
    return (np.asarray(matplotlib.colors.to_rgb(artist_color)) * 255).round()


# ------------------------------------------------------------------ fitted estimators
@pytest.fixture(scope="module")
def mog():
    return make_mog_tasks(8, random_state=0)


@pytest.fixture(scope="module")
def renyi_vi(mog):
    X, groups = mog
    est = MetaDivergenceVI("gaussian_mixture", divergence=Renyi(0.8), inner_optimizer="sgd",
                           max_meta_iter=10, max_iter=20, random_state=0)
    return est.meta_fit(X, groups=groups)


@pytest.fixture(scope="module")
def neural_vi(mog):
    X, groups = mog
    return MetaDivergenceVI("gaussian_mixture", divergence=NeuralF((8,)), inner_optimizer="sgd",
                            max_meta_iter=3, random_state=0).meta_fit(X, groups=groups)


@pytest.fixture(scope="module")
def sinusoids():
    return make_sinusoid_tasks(6, 20, random_state=0)


@pytest.fixture(scope="module")
def bnn(sinusoids):
    """Meta-fitted (with meta-validation) and then fitted to task 0; never refit."""
    X, y, groups = sinusoids
    est = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), max_meta_iter=4, n_tasks_per_batch=2,
                           max_iter=30, n_predict_samples=20, validation_fraction=0.3,
                           validation_interval=2,
                           random_state=0)
    est.meta_fit(X, y, groups)
    return est.fit(X[groups == 0], y[groups == 0])


@pytest.fixture(scope="module")
def plain_bnn(sinusoids):
    """Fitted to task 0 without meta_fit."""
    X, y, groups = sinusoids
    return MetaBNNRegressor(hidden_layer_sizes=(8,), max_iter=20, n_predict_samples=20,
                            random_state=0).fit(X[groups == 0], y[groups == 0])


def _nonlinear_neural_f():
    """A NeuralF whose MLP output is non-zero, so that h is not a line."""
    div = NeuralF((8,), init_alpha=0.5)
    with torch.no_grad():
        div.mlp[-1].weight.copy_(torch.linspace(-1.0, 1.0, 8, dtype=torch.float64)[None])
        div.mlp[-1].bias.fill_(0.7)
    return div


def _log_g(div, log_t):
    with torch.no_grad():
        return div.evaluate_log_g(torch.as_tensor(log_t, dtype=torch.float64)).numpy()


# ----------------------------------------------------------------------- pixel helpers
def test_pixel_helpers_see_an_empty_axes_as_empty(pyplot):
    """The control for the pixel assertions below: nothing is drawn in a fresh Axes."""
    _, ax = pyplot.subplots()
    assert _n_drawn(ax) == 0
    ax.plot([0, 1], [0, 1], color="tab:blue")
    assert _n_coloured(ax, TAB_BLUE) > 50


def test_matplotlib_is_imported_lazily():
    """No module of skmetavi.plotting imports matplotlib at import time (only in functions)."""
    files = sorted(Path(skmetavi.plotting.__file__).parent.glob("*.py"))
    assert len(files) >= 4
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = [a.name for n in top_level if isinstance(n, ast.Import) for a in n.names]
        names += [n.module for n in top_level if isinstance(n, ast.ImportFrom)]
        assert not [n for n in names if n.split(".")[0] == "matplotlib"], path.name


# ------------------------------------------------------------------- DivergenceDisplay
def test_divergence_display_renyi_is_its_closed_form_line(pyplot):
    alpha = 0.3
    log_t = np.linspace(-5, 2, 30)
    display = DivergenceDisplay.from_divergence(Renyi(alpha), log_t=log_t,
                                                reference_alphas=(0.0, 0.5, 1.0, 2.0))
    assert_allclose(display.line_.get_xdata(), log_t)
    # Rényi's D_alpha weighs like g(t) = t^(1 - alpha) (a = 1 - alpha, Sec. 3.2)
    assert_allclose(display.line_.get_ydata(), (1 - alpha) * log_t, rtol=1e-12)
    assert display.alpha == pytest.approx(alpha)
    assert display.offset == 0.0  # g(1) = 1 already
    assert len(display.reference_lines_) == 4
    for a, line in zip((0.0, 0.5, 1.0, 2.0), display.reference_lines_):
        assert_allclose(line.get_ydata(), (1 - a) * log_t)
        assert line.get_label() == f"Rényi α = {a:.3g}"
    assert display.line_.get_label() == "Renyi (α = 0.3)"
    assert display.ax_.get_xlabel().startswith("log t")
    assert display.figure_ is display.ax_.figure
    assert _n_coloured(display.ax_, TAB_BLUE) > 100


@pytest.mark.parametrize(
    "divergence, alpha, slope",
    [(KL(), 1.0, 0.0), (FDivergence.chi2(), -1.0, 2.0), (FDivergence.forward_kl(), 0.0, 1.0),
     (LocalRenyi(0.25), 0.25, 0.75)],
    ids=["kl", "chi2", "forward_kl", "local_renyi"],
)
def test_divergence_display_alpha_family_members(pyplot, divergence, alpha, slope):
    log_t = np.linspace(-3, 3, 11)
    display = DivergenceDisplay.from_divergence(divergence, log_t=log_t)
    assert display.alpha == pytest.approx(alpha)
    assert_allclose(display.line_.get_ydata(), slope * log_t, atol=1e-12)


@pytest.mark.parametrize("align", [True, False], ids=["aligned", "raw"])
def test_divergence_display_neural_f_equals_evaluate_log_g(pyplot, align):
    div = _nonlinear_neural_f()
    log_t = np.linspace(-6, 3, 200)
    expected = _log_g(div, log_t)
    offset = float(_log_g(div, np.zeros(1))[0]) if align else 0.0
    assert abs(offset) > 0.1 or not align  # the MLP shifted h(0): alignment is visible
    display = DivergenceDisplay.from_divergence(div, align=align)  # the default grid
    assert_allclose(display.log_t, log_t)
    assert_allclose(display.line_.get_ydata(), expected - offset, rtol=1e-10, atol=1e-12)
    assert display.offset == pytest.approx(offset)
    assert display.alpha is None
    assert display.line_.get_label() == "NeuralF"
    assert display.ax_.get_ylabel() == ("log g(t) − log g(1)" if align else "h(log t) = log g(t)")


def test_divergence_display_kind_g_draws_g_itself(pyplot):
    div = _nonlinear_neural_f()
    log_t = np.linspace(-2, 2, 21)
    display = DivergenceDisplay.from_divergence(div, log_t=log_t, kind="g", align=False,
                                                reference_alphas=[0.5])
    assert_allclose(display.line_.get_ydata(), np.exp(_log_g(div, log_t)), rtol=1e-10)
    assert_allclose(display.reference_lines_[0].get_ydata(), np.exp(0.5 * log_t))
    assert display.ax_.get_ylabel() == "g(t) = t² f''(t)"


def test_divergence_display_custom_log_g(pyplot):
    div = FDivergence(log_g=lambda u: torch.tanh(u))
    log_t = np.linspace(-2, 2, 9)
    display = DivergenceDisplay.from_divergence(div, log_t=log_t, name="tanh")
    assert_allclose(display.line_.get_ydata(), np.tanh(log_t))
    assert display.alpha is None and display.line_.get_label() == "tanh"


def test_divergence_display_from_estimator_renyi(pyplot, renyi_vi):
    learned = renyi_vi.meta_divergence_.alpha
    assert learned != pytest.approx(0.8)  # meta_fit moved alpha
    display = DivergenceDisplay.from_estimator(renyi_vi)
    assert_allclose(display.line_.get_ydata(), (1 - learned) * display.log_t, rtol=1e-12)
    assert display.line_.get_label() == f"meta-learned Renyi (α = {learned:.3g})"
    assert display.line_.get_linewidth() > display.reference_lines_[0].get_linewidth()
    assert _n_coloured(display.ax_, TAB_BLUE) > 100


def test_divergence_display_from_estimator_neural_f(pyplot, neural_vi):
    div = neural_vi.meta_divergence_
    display = DivergenceDisplay.from_estimator(neural_vi, align=False)
    assert_allclose(display.line_.get_ydata(), _log_g(div, display.log_t), rtol=1e-10)


def test_divergence_display_draws_into_given_ax(pyplot):
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4), layout="constrained")
    display = DivergenceDisplay.from_divergence(Renyi(0.5), ax=right)
    assert display.ax_ is right and display.figure_ is fig
    assert _n_drawn(left) == 0
    assert _n_coloured(right, TAB_BLUE) > 50


def test_divergence_display_plot_twice(pyplot):
    display = DivergenceDisplay.from_divergence(Renyi(0.5), reference_alphas=None)
    first_ax = display.ax_
    assert display.reference_lines_ == []
    display.plot(kind="g", name="again", line_kwargs={"c": "tab:red"})
    assert display.ax_ is not first_ax
    assert display.line_.get_label() == "again (α = 0.5)"
    assert_allclose(display.line_.get_ydata(), np.exp(0.5 * display.log_t))
    assert _n_coloured(display.ax_, _rgb("tab:red")) > 50
    assert _n_coloured(display.ax_, TAB_BLUE) == 0


def test_divergence_display_errors(pyplot, renyi_vi, plain_bnn):
    with pytest.raises(TypeError, match="rank"):
        DivergenceDisplay.from_divergence(TailAdaptive())
    with pytest.raises(TypeError, match="from_estimator"):
        DivergenceDisplay.from_divergence(renyi_vi)
    with pytest.raises(TypeError, match="from_divergence"):
        DivergenceDisplay.from_estimator(Renyi())
    with pytest.raises(NotFittedError, match="meta_fit"):
        DivergenceDisplay.from_estimator(MetaBNNRegressor())
    with pytest.raises(NotFittedError, match="meta_divergence_"):
        DivergenceDisplay.from_estimator(plain_bnn)  # fitted, never meta-fitted
    with pytest.raises(ValueError, match="kind"):
        DivergenceDisplay.from_divergence(KL(), kind="f")
    with pytest.raises(ValueError, match="log_t"):
        DivergenceDisplay.from_divergence(KL(), log_t=[0.0, np.inf])
    with pytest.raises(ValueError, match="log_t"):
        DivergenceDisplay.from_divergence(KL(), log_t=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="reference_alphas"):
        DivergenceDisplay.from_divergence(KL(), reference_alphas=["0.5"])
    with pytest.raises(TypeError, match="align"):
        DivergenceDisplay.from_divergence(KL(), align="yes")
    with pytest.raises(TypeError, match="matplotlib Axes"):
        DivergenceDisplay.from_divergence(KL(), ax="left")
    with pytest.raises(TypeError, match="line_kwargs"):
        DivergenceDisplay.from_divergence(KL(), line_kwargs=["red"])


# ------------------------------------------------------------------- PredictiveDisplay
def test_predictive_display_from_estimator(pyplot, bnn, sinusoids):
    X, y, groups = sinusoids
    X0, y0 = X[groups == 0], y[groups == 0]
    display = PredictiveDisplay.from_estimator(bnn, X0, y0, grid_resolution=50,
                                               true_function=np.sin, n_std=3)
    x = np.linspace(X0.min(), X0.max(), 50)
    mean, std = bnn.predict(x[:, None], return_std=True)
    assert_allclose(display.x, x)
    assert_allclose(display.y_mean, mean)
    assert_allclose(display.y_std, std)
    assert_allclose(display.line_.get_xdata(), x)
    assert_allclose(display.line_.get_ydata(), mean)
    band_y = display.band_.get_paths()[0].vertices[:, 1]
    assert_allclose([band_y.min(), band_y.max()], [(mean - 3 * std).min(), (mean + 3 * std).max()])
    assert display.band_.get_label() == "± 3 std"
    assert_allclose(display.scatter_.get_offsets(), np.column_stack([X0[:, 0], y0]))
    assert_allclose(display.true_line_.get_ydata(), np.sin(x))
    assert _n_coloured(display.ax_, TAB_BLUE) > 100


def test_predictive_display_defaults_and_x_range(pyplot, bnn, sinusoids):
    X, y, _ = sinusoids
    display = PredictiveDisplay.from_estimator(bnn, X[:5], y[:5], x_range=(-6, 6))
    assert display.x.shape == (200,) and display.x[0] == -6 and display.x[-1] == 6
    assert display.true_line_ is None
    assert display.line_.get_label() == "predictive mean"


def test_predictive_display_any_regressor_with_return_std(pyplot):
    rng = np.random.RandomState(0)
    X = rng.uniform(-3, 3, size=(15, 1))
    y = np.sin(X[:, 0])
    gpr = GaussianProcessRegressor(RBF(), optimizer=None).fit(X, y)
    display = PredictiveDisplay.from_estimator(gpr, X, y, grid_resolution=20, name="GP")
    assert_allclose(display.y_mean, gpr.predict(display.x[:, None]))
    assert display.line_.get_label() == "GP"


def test_predictive_display_draws_into_given_ax_and_twice(pyplot, bnn, sinusoids):
    X, y, _ = sinusoids
    fig, (top, bottom) = pyplot.subplots(2, 1, figsize=(6, 8), layout="constrained")
    display = PredictiveDisplay.from_estimator(bnn, X[:10], y[:10], ax=bottom)
    assert display.ax_ is bottom and display.figure_ is fig
    assert _n_drawn(top) == 0 and _n_drawn(bottom) > 0
    display.plot(ax=top, n_std=1, band_kwargs={"color": "tab:green"})
    assert display.ax_ is top
    assert _n_coloured(top, _rgb("tab:green"), tol=110) > 100  # the band is translucent
    assert display.band_.get_label() == "± 1 std"


def test_predictive_display_errors(pyplot, bnn, sinusoids):
    X, y, _ = sinusoids
    with pytest.raises(ValueError, match="one input feature.*2 features"):
        PredictiveDisplay.from_estimator(bnn, np.hstack([X, X]), y)
    with pytest.raises(TypeError, match="return_std"):
        PredictiveDisplay.from_estimator(LinearRegression().fit(X, y), X, y)
    gpr2 = GaussianProcessRegressor(RBF(), optimizer=None).fit(np.hstack([X[:10], X[:10]]), y[:10])
    with pytest.raises(ValueError, match="fitted on 2 features"):
        PredictiveDisplay.from_estimator(gpr2, X, y)
    with pytest.raises(NotFittedError):
        PredictiveDisplay.from_estimator(MetaBNNRegressor(), X, y)
    with pytest.raises(ValueError, match="inconsistent"):
        PredictiveDisplay.from_estimator(bnn, X, y[:-1])
    with pytest.raises(TypeError, match="true_function"):
        PredictiveDisplay.from_estimator(bnn, X, y, true_function=np.zeros(3))
    with pytest.raises(ValueError, match="grid's shape"):
        PredictiveDisplay.from_estimator(bnn, X, y, true_function=lambda x: x[:3])
    with pytest.raises(ValueError, match="grid_resolution"):
        PredictiveDisplay.from_estimator(bnn, X, y, grid_resolution=1)
    with pytest.raises(ValueError, match="x_range"):
        PredictiveDisplay.from_estimator(bnn, X, y, x_range=(1, -1))
    with pytest.raises(ValueError, match="n_std"):
        PredictiveDisplay.from_estimator(bnn, X, y, n_std=0)


# -------------------------------------------------------------- TrainingHistoryDisplay
def test_history_display_meta_fit(pyplot, bnn):
    display = TrainingHistoryDisplay.from_estimator(bnn)
    assert display.keys == ["meta_loss", "validation_score"]
    history = bnn.meta_history_
    for key, line in zip(display.keys, display.lines_):
        it, val = map(np.asarray, zip(*history[:, ("iteration", key)]))
        assert_allclose(line.get_xdata(), it)
        assert_allclose(line.get_ydata(), val)
    assert_allclose(display.lines_[0].get_ydata(), bnn.meta_loss_curve_)
    # validation_score exists on the validated iterations only: marked at each
    assert len(display.lines_[1].get_xdata()) < len(display.lines_[0].get_xdata())
    assert display.lines_[1].get_marker() == "o" and display.lines_[0].get_marker() == "None"
    assert display.ax_ is None and display.axes_[0] is not display.axes_[1]
    assert [a.get_ylabel() for a in display.axes_] == display.keys
    assert display.axes_[-1].get_xlabel() == "meta_fit iteration"
    assert all(_n_drawn(a) > 0 for a in display.axes_)


def test_history_display_fit(pyplot, bnn):
    display = TrainingHistoryDisplay.from_estimator(bnn, phase="fit")
    assert display.keys == ["loss"]
    assert_allclose(display.lines_[0].get_ydata(), bnn.loss_curve_)
    assert_allclose(display.lines_[0].get_xdata(), np.arange(1, len(bnn.loss_curve_) + 1))
    assert display.ax_ is display.axes_[0]
    assert _n_coloured(display.ax_, TAB_BLUE) > 50


def test_history_display_keys_in_one_given_ax(pyplot, bnn):
    fig, (left, right) = pyplot.subplots(1, 2, figsize=(12, 4), layout="constrained")
    display = TrainingHistoryDisplay.from_estimator(bnn, keys=["meta_loss", "alpha"], ax=right)
    assert display.ax_ is right and display.figure_ is fig
    assert_allclose(display.lines_[1].get_ydata(), bnn.meta_history_[:, "alpha"])
    assert right.get_legend() is not None
    assert _n_drawn(left) == 0 and _n_drawn(right) > 0
    # the same display again, one Axes per key
    display.plot(ax=[left, right])
    assert display.ax_ is None and list(display.axes_) == [left, right]
    assert _n_drawn(left) > 0


def test_history_display_from_history_records(pyplot):
    history = History([{"iteration": 1, "loss": 3.0}, {"loss": None, "extra": 1.0},
                       {"iteration": 5, "loss": 1.0, "time": 0.1}])
    display = TrainingHistoryDisplay.from_history(history)
    assert display.keys == ["loss"] and display.phase is None
    assert_allclose(display.lines_[0].get_xdata(), [1, 2, 5])  # position when missing
    assert_allclose(display.lines_[0].get_ydata(), [3.0, np.nan, 1.0])  # None: rolled back
    assert display.axes_[0].get_xlabel() == "iteration"
    other = TrainingHistoryDisplay.from_history([{"a": 1.0, "time": 2.0}, {"a": 2.0}])
    assert other.keys == ["a"]


def test_history_display_errors(pyplot, bnn, plain_bnn):
    with pytest.raises(ValueError, match="no record has the column.*'accuracy'"):
        TrainingHistoryDisplay.from_estimator(bnn, keys="accuracy")
    with pytest.raises(ValueError, match="non-empty"):
        TrainingHistoryDisplay.from_estimator(bnn, keys=[])
    with pytest.raises(NotFittedError, match="meta_fit"):
        TrainingHistoryDisplay.from_estimator(plain_bnn)
    with pytest.raises(NotFittedError):
        TrainingHistoryDisplay.from_estimator(MetaBNNRegressor(), phase="fit")
    with pytest.raises(ValueError, match="phase"):
        TrainingHistoryDisplay.from_estimator(bnn, phase="predict")
    with pytest.raises(ValueError, match="empty"):
        TrainingHistoryDisplay.from_history([])
    with pytest.raises(TypeError, match="list of dicts"):
        TrainingHistoryDisplay.from_history({"loss": [1.0]})
    with pytest.raises(TypeError, match="numbers"):
        TrainingHistoryDisplay.from_history([{"loss": "low"}])
    _, axes = pyplot.subplots(1, 3)
    with pytest.raises(ValueError, match="3 Axes for 2 keys"):
        TrainingHistoryDisplay.from_estimator(bnn, keys=["meta_loss", "alpha"], ax=axes)
