"""PredictiveDisplay: a 1-D regressor's predictive mean and ± k std band (Fig. 3 of the paper)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import inspect
from numbers import Integral, Real

import numpy as np
from sklearn.utils import check_array, check_consistent_length, column_or_1d
from sklearn.utils.validation import check_is_fitted

from skmetavi.plotting._base import _axes_or_new, _pyplot, _style


def _check_x_range(x_range, X, caller):
    if x_range is None:
        return float(X.min()), float(X.max())
    try:
        low, high = (float(v) for v in x_range)
    except (TypeError, ValueError):
        raise ValueError(
            f"{caller}: x_range must be a pair (low, high) of numbers or None, got "
            f"{x_range!r}; e.g. x_range=(-6, 6) to show extrapolation."
        ) from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(
            f"{caller}: x_range must satisfy low < high with finite values, got {x_range!r}."
        )
    return low, high


def _accepts_return_std(estimator):
    try:
        parameters = inspect.signature(estimator.predict).parameters
    except (AttributeError, TypeError, ValueError):
        return False
    return "return_std" in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


class PredictiveDisplay:
    """Predictive mean and ± k standard deviation band of a 1-D regressor (Fig. 3 of the paper).

    The display draws the predictive mean of a regressor on a grid of one
    input feature, a band of ``n_std`` predictive standard deviations around
    it, the data points (a task's support or training rows) and, optionally,
    the true regression function.  With :class:`~skmetavi.MetaBNNRegressor`
    the standard deviation includes the observation noise, so the band shows
    whether a divergence captured heteroskedastic noise.

    Use :meth:`from_estimator` to build one; the constructor stores arrays
    computed elsewhere.

    Parameters
    ----------
    x : ndarray of shape (n_points,)
        The grid of the input feature, increasing.
    y_mean : ndarray of shape (n_points,)
        Predictive mean at ``x``.
    y_std : ndarray of shape (n_points,)
        Predictive standard deviation at ``x``.
    x_data : ndarray of shape (n_samples,), default=None
        Inputs of the data points to scatter; None for none.
    y_data : ndarray of shape (n_samples,), default=None
        Targets of the data points.
    y_true : ndarray of shape (n_points,), default=None
        The true function at ``x``; None for none.
    name : str, default=None
        Legend label of the predictive mean; ``"predictive mean"`` if None.

    Attributes
    ----------
    line_ : matplotlib Line2D
        The predictive mean.
    band_ : matplotlib PolyCollection
        The band ``y_mean ± n_std * y_std``.
    scatter_ : matplotlib PathCollection or None
        The data points, None without data.
    true_line_ : matplotlib Line2D or None
        The true function, None without one.
    ax_ : matplotlib Axes
        Axes with the plot.
    figure_ : matplotlib Figure
        Figure containing the plot.

    See Also
    --------
    PredictiveDisplay.from_estimator : Predict on a grid and plot.
    skmetavi.MetaBNNRegressor : A regressor with ``predict(X, return_std=True)``.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> from skmetavi.plotting import PredictiveDisplay
    >>> x = np.linspace(-4, 4, 50)
    >>> display = PredictiveDisplay(x=x, y_mean=np.sin(x), y_std=np.full(50, 0.2))
    >>> fig, ax = plt.subplots()
    >>> display = display.plot(ax=ax, n_std=3)
    >>> display.scatter_ is None
    True
    >>> plt.close(fig)
    """

    def __init__(self, *, x, y_mean, y_std, x_data=None, y_data=None, y_true=None, name=None):
        self.x = x
        self.y_mean = y_mean
        self.y_std = y_std
        self.x_data = x_data
        self.y_data = y_data
        self.y_true = y_true
        self.name = name

    def plot(self, ax=None, *, n_std=2.0, name=None, line_kwargs=None, band_kwargs=None,
             scatter_kwargs=None, true_kwargs=None):
        """Plot the predictive mean, its band, the data and the true function.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure if None.
        n_std : float, default=2.0
            Half-width k of the band ``y_mean ± k * y_std``, in standard deviations.
        name : str, default=None
            Legend label of the predictive mean; ``self.name`` if None.
        line_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for the mean.
        band_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.fill_between` for the band.
        scatter_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.scatter` for the data points.
        true_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for the true function.

        Returns
        -------
        display : PredictiveDisplay
            The display, with ``line_``, ``band_``, ``scatter_``, ``true_line_``,
            ``ax_`` and ``figure_``.
        """
        caller = f"{type(self).__name__}.plot"
        _pyplot(caller)
        if isinstance(n_std, bool) or not isinstance(n_std, Real) or not n_std > 0:
            raise ValueError(f"{caller}: n_std must be a number > 0, got {n_std!r}; e.g. 2.")
        ax = _axes_or_new(ax, caller)
        x = np.asarray(self.x, dtype=float)
        y_mean = np.asarray(self.y_mean, dtype=float)
        y_std = np.asarray(self.y_std, dtype=float)
        name = self.name if name is None else name

        self.band_ = ax.fill_between(
            x, y_mean - n_std * y_std, y_mean + n_std * y_std,
            **_style({"color": "tab:blue", "alpha": 0.25, "linewidth": 0,
                      "label": f"± {n_std:g} std"}, band_kwargs, "band_kwargs", caller),
        )
        self.scatter_ = None
        if self.x_data is not None:
            self.scatter_ = ax.scatter(
                self.x_data, self.y_data,
                **_style({"color": "0.35", "s": 12, "label": "data", "zorder": 3},
                         scatter_kwargs, "scatter_kwargs", caller),
            )
        self.true_line_ = None
        if self.y_true is not None:
            self.true_line_ = ax.plot(
                x, self.y_true,
                **_style({"color": "black", "linestyle": "--", "linewidth": 1.2,
                          "label": "true function"}, true_kwargs, "true_kwargs", caller),
            )[0]
        self.line_ = ax.plot(
            x, y_mean,
            **_style({"color": "tab:blue", "linewidth": 2,
                      "label": "predictive mean" if name is None else name},
                     line_kwargs, "line_kwargs", caller),
        )[0]
        ax.set(xlabel="x", ylabel="y")
        ax.legend()
        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    def from_estimator(cls, estimator, X, y, *, grid_resolution=200, x_range=None,
                       true_function=None, n_std=2.0, name=None, ax=None, line_kwargs=None,
                       band_kwargs=None, scatter_kwargs=None, true_kwargs=None):
        """Predict on a grid of the single input feature and plot mean ± ``n_std`` std.

        Parameters
        ----------
        estimator : estimator instance
            A fitted regressor whose ``predict(X, return_std=True)`` returns the
            predictive mean and standard deviation, such as
            :class:`~skmetavi.MetaBNNRegressor`, fitted on one feature.
        X : array-like of shape (n_samples, 1)
            Inputs of the data points to scatter (e.g. the task's support rows).
        y : array-like of shape (n_samples,)
            Their targets.
        grid_resolution : int, default=200
            Number of grid points.
        x_range : tuple of float, default=None
            ``(low, high)`` of the grid; the range of ``X`` if None.
        true_function : callable, default=None
            ``true_function(x) -> y`` on the grid (1-D arrays), drawn as the
            true regression function; None for none.
        n_std : float, default=2.0
            Half-width of the band, in standard deviations.
        name : str, default=None
            Legend label of the predictive mean; ``"predictive mean"`` if None.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure if None.
        line_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for the mean.
        band_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.fill_between` for the band.
        scatter_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.scatter` for the data points.
        true_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for the true function.

        Returns
        -------
        display : PredictiveDisplay
            The plotted display.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator is not fitted.
        ValueError
            If ``X`` or the estimator has more than one feature.

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from skmetavi import MetaBNNRegressor
        >>> from skmetavi.datasets import make_sinusoid_tasks
        >>> from skmetavi.plotting import PredictiveDisplay
        >>> X, y, groups = make_sinusoid_tasks(1, 40, random_state=0)
        >>> est = MetaBNNRegressor(hidden_layer_sizes=(16,), max_iter=50,
        ...                        random_state=0).fit(X, y)
        >>> display = PredictiveDisplay.from_estimator(est, X, y, grid_resolution=100)
        >>> display.y_mean.shape
        (100,)
        >>> plt.close(display.figure_)
        """
        caller = f"{cls.__name__}.from_estimator"
        _pyplot(caller)
        check_is_fitted(estimator)
        if not _accepts_return_std(estimator):
            raise TypeError(
                f"{caller} needs a regressor whose predict accepts return_std=True (e.g. "
                f"MetaBNNRegressor or GaussianProcessRegressor), got "
                f"{type(estimator).__name__}."
            )
        X = check_array(X, dtype=np.float64)
        if X.shape[1] != 1:
            raise ValueError(
                f"{caller} plots against one input feature, but X has {X.shape[1]} features; "
                "pass X[:, [j]] of an estimator fitted on that feature alone."
            )
        n_features = getattr(estimator, "n_features_in_", 1)
        if n_features != 1:
            raise ValueError(
                f"{caller} plots against one input feature, but the estimator was fitted on "
                f"{n_features} features."
            )
        y = column_or_1d(y, dtype=np.float64)
        check_consistent_length(X, y)
        if (isinstance(grid_resolution, bool) or not isinstance(grid_resolution, Integral)
                or grid_resolution < 2):
            raise ValueError(
                f"{caller}: grid_resolution must be an int >= 2, got {grid_resolution!r}."
            )
        if true_function is not None and not callable(true_function):
            raise TypeError(
                f"{caller}: true_function must be a callable x -> y or None, got "
                f"{type(true_function).__name__}; e.g. true_function=lambda x: 7 * np.sin(x)."
            )
        x = np.linspace(*_check_x_range(x_range, X, caller), grid_resolution)
        y_mean, y_std = estimator.predict(x[:, None], return_std=True)
        y_true = None
        if true_function is not None:
            y_true = np.asarray(true_function(x), dtype=float)
            if y_true.shape != x.shape:
                raise ValueError(
                    f"{caller}: true_function(x) must return an array of the grid's shape "
                    f"{x.shape}, got shape {y_true.shape}."
                )
        display = cls(x=x, y_mean=np.asarray(y_mean, dtype=float),
                      y_std=np.asarray(y_std, dtype=float), x_data=X[:, 0], y_data=y,
                      y_true=y_true, name=name)
        return display.plot(ax=ax, n_std=n_std, line_kwargs=line_kwargs,
                            band_kwargs=band_kwargs, scatter_kwargs=scatter_kwargs,
                            true_kwargs=true_kwargs)
