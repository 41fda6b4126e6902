"""TrainingHistoryDisplay: the per-iteration curves of ``fit`` and ``meta_fit``."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from numbers import Real

import numpy as np
from sklearn.utils.validation import check_is_fitted

from skmetavi.plotting._base import (
    _check_axes,
    _check_meta_fitted,
    _fill_doc,
    _pyplot,
    _style,
)

#: The curves shown when ``keys`` is None, those present in the records.
_DEFAULT_KEYS = ("meta_loss", "validation_score", "loss")
#: Columns that are bookkeeping, not curves.
_NOT_CURVES = ("iteration", "time")
_PHASES = ("meta_fit", "fit")
_HISTORY_ATTRIBUTES = {"meta_fit": "meta_history_", "fit": "history_"}


def _as_value(value, key, caller):
    if value is None:  # a rolled-back step
        return np.nan
    if isinstance(value, bool) or not isinstance(value, (Real, np.number)):
        raise TypeError(
            f"{caller}: the history's {key!r} column must hold numbers, got "
            f"{type(value).__name__} {value!r:.40}."
        )
    return float(value)


def _columns(records):
    return sorted(set().union(*(r.keys() for r in records)))


def _check_keys(keys, records, caller):
    columns = _columns(records)
    if keys is None:
        keys = [k for k in _DEFAULT_KEYS if k in columns] or [
            k for k in columns if k not in _NOT_CURVES
        ]
    elif isinstance(keys, str):
        keys = [keys]
    else:
        keys = list(keys)
    if not keys or not all(isinstance(k, str) for k in keys):
        raise ValueError(
            f"{caller}: keys must be a column name or a non-empty list of them, got "
            f"{keys!r}; the columns are {columns}."
        )
    unknown = [k for k in keys if k not in columns]
    if unknown:
        raise ValueError(
            f"{caller}: no record has the column(s) {unknown}; the columns are {columns}."
        )
    return keys


# Parameter text of plot, from_history and from_estimator.
_AXES_DOC = """ax : matplotlib Axes or array-like of Axes, default=None
            A single Axes draws every curve there (with a legend); a sequence of
            ``len(keys)`` Axes draws one curve in each; None makes a new figure
            with one Axes per key, stacked with a shared x-axis.
        line_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for every curve."""


class TrainingHistoryDisplay:
    """Training curves of an estimator: meta-loss, validation score, adaptation loss.

    Every skmetavi estimator records one dict per iteration, ``meta_history_``
    for :meth:`meta_fit` (``meta_loss``, ``validation_score`` on the validated
    iterations, learned scalars such as ``alpha``) and ``history_`` for
    :meth:`fit` (``loss``); see :class:`~skmetavi.callbacks.History`.  This
    display draws some of these columns against the iteration, each in its own
    Axes by default (their scales differ), or all in one given Axes.

    Use :meth:`from_estimator` or :meth:`from_history` to build one; the
    constructor stores arrays computed elsewhere.

    Parameters
    ----------
    keys : list of str
        The columns shown, one curve each.
    iterations : list of ndarray of shape (n_records_k,)
        For each key, the iterations of the records that have it.
    values : list of ndarray of shape (n_records_k,)
        For each key, its values (NaN for a rolled-back step).
    phase : {"meta_fit", "fit"}, default=None
        Which training call the records come from, for the x-axis label.

    Attributes
    ----------
    lines_ : ndarray of matplotlib Line2D of shape (n_keys,)
        One curve per key.
    axes_ : ndarray of matplotlib Axes of shape (n_keys,)
        The Axes of each curve.
    ax_ : matplotlib Axes or None
        The Axes when all curves share one (one key, or a single ``ax``),
        None when each has its own.
    figure_ : matplotlib Figure
        Figure containing the curves.

    See Also
    --------
    TrainingHistoryDisplay.from_estimator : The history of a fitted estimator.
    TrainingHistoryDisplay.from_history : Any list of records.
    skmetavi.callbacks.History : The records.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> from skmetavi.plotting import TrainingHistoryDisplay
    >>> display = TrainingHistoryDisplay(keys=["loss"], iterations=[np.arange(1, 4)],
    ...                                  values=[np.array([3.0, 2.0, 1.5])], phase="fit")
    >>> fig, ax = plt.subplots()
    >>> display.plot(ax=ax).lines_[0].get_ydata().tolist()
    [3.0, 2.0, 1.5]
    >>> plt.close(fig)
    """

    def __init__(self, *, keys, iterations, values, phase=None):
        self.keys = keys
        self.iterations = iterations
        self.values = values
        self.phase = phase

    @_fill_doc(axes=_AXES_DOC)
    def plot(self, ax=None, *, line_kwargs=None):
        """Plot one curve per key.

        A column that only some records have (``validation_score``) is drawn with
        a marker at each of them.

        Parameters
        ----------
        %(axes)s

        Returns
        -------
        display : TrainingHistoryDisplay
            The display, with ``lines_``, ``axes_``, ``ax_`` and ``figure_``.
        """
        caller = f"{type(self).__name__}.plot"
        plt = _pyplot(caller)
        n_keys = len(self.keys)
        if ax is None:
            _, axes = plt.subplots(n_keys, 1, sharex=True, squeeze=False, layout="constrained",
                                   figsize=(6.4, 4.8 if n_keys == 1 else 2.4 * n_keys))
            axes = axes[:, 0]
        elif np.iterable(ax):
            axes = np.asarray([_check_axes(a, caller) for a in ax], dtype=object)
            if axes.shape != (n_keys,):
                raise ValueError(
                    f"{caller}: ax holds {axes.size} Axes for {n_keys} keys {self.keys}; "
                    "pass one Axes per key, or a single Axes for all."
                )
        else:
            axes = np.asarray([_check_axes(ax, caller)] * n_keys, dtype=object)
        shared = all(a is axes[0] for a in axes)

        lines = []
        n_longest = max(len(it) for it in self.iterations)
        for i, (key, it, val, axis) in enumerate(
                zip(self.keys, self.iterations, self.values, axes)):
            default = {"color": f"C{i}", "label": key}
            if len(it) < n_longest:  # a sparse column (validation): mark its records
                default.update(marker="o", markersize=4)
            style = _style(default, line_kwargs, "line_kwargs", caller)
            lines.append(axis.plot(it, val, **style)[0])
            if not shared:
                axis.set_ylabel(key)
        if shared:
            axes[0].set_ylabel(self.keys[0] if n_keys == 1 else "value")
            if n_keys > 1:
                axes[0].legend()
        axes[-1].set_xlabel(f"{self.phase} iteration" if self.phase else "iteration")
        self.lines_ = np.asarray(lines, dtype=object)
        self.axes_ = axes
        self.ax_ = axes[0] if shared else None
        self.figure_ = axes[0].figure
        return self

    @classmethod
    @_fill_doc(axes=_AXES_DOC)
    def from_history(cls, history, *, keys=None, phase=None, ax=None, line_kwargs=None):
        """Plot columns of a list of per-iteration records.

        Parameters
        ----------
        history : list of dict
            The records, oldest first, e.g. a :class:`~skmetavi.callbacks.History`.
            A record's ``"iteration"`` is its x value (its position, from 1, if
            it has none).
        keys : str or list of str, default=None
            The columns to plot.  None: those of ``"meta_loss"``,
            ``"validation_score"`` and ``"loss"`` that the records have, or
            else every column but ``"iteration"`` and ``"time"``.
        phase : {"meta_fit", "fit"}, default=None
            Which training call the records come from, for the x-axis label.
        %(axes)s

        Returns
        -------
        display : TrainingHistoryDisplay
            The plotted display.

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from skmetavi.callbacks import History
        >>> from skmetavi.plotting import TrainingHistoryDisplay
        >>> history = History([{"iteration": 1, "meta_loss": 2.0, "alpha": 0.9},
        ...                    {"iteration": 2, "meta_loss": 1.0, "alpha": 0.8}])
        >>> display = TrainingHistoryDisplay.from_history(history, keys=["meta_loss", "alpha"])
        >>> display.lines_.shape, display.ax_ is None
        ((2,), True)
        >>> plt.close(display.figure_)
        """
        caller = f"{cls.__name__}.from_history"
        _pyplot(caller)
        if isinstance(history, dict) or not isinstance(history, (list, tuple)) or not all(
                isinstance(r, dict) for r in history):
            raise TypeError(
                f"{caller}: history must be a list of dicts (one record per iteration, "
                f"e.g. est.meta_history_), got {type(history).__name__}."
            )
        if not history:
            raise ValueError(f"{caller}: history is empty; there is nothing to plot.")
        if phase is not None and phase not in _PHASES:
            raise ValueError(f"{caller}: phase must be one of {_PHASES} or None, got {phase!r}.")
        keys = _check_keys(keys, history, caller)
        iterations, values = [], []
        for key in keys:
            rows = [(r.get("iteration", i), r[key]) for i, r in enumerate(history, 1) if key in r]
            iterations.append(np.asarray([_as_value(it, "iteration", caller) for it, _ in rows]))
            values.append(np.asarray([_as_value(v, key, caller) for _, v in rows]))
        display = cls(keys=keys, iterations=iterations, values=values, phase=phase)
        return display.plot(ax=ax, line_kwargs=line_kwargs)

    @classmethod
    @_fill_doc(axes=_AXES_DOC)
    def from_estimator(cls, estimator, *, phase="meta_fit", keys=None, ax=None,
                       line_kwargs=None):
        """Plot the training history of an estimator (``meta_history_`` or ``history_``).

        Parameters
        ----------
        estimator : estimator instance
            A skmetavi estimator after :meth:`meta_fit` (``phase="meta_fit"``)
            or :meth:`fit` (``phase="fit"``).
        phase : {"meta_fit", "fit"}, default="meta_fit"
            Which history: ``meta_history_`` (outer iterations of
            :meth:`meta_fit`) or ``history_`` (iterations of the last :meth:`fit`,
            i.e. the adaptation to one task).
        keys : str or list of str, default=None
            The columns to plot; None: ``"meta_loss"`` (and ``"validation_score"``
            when meta-validation ran) for ``"meta_fit"``, ``"loss"`` for ``"fit"``.
        %(axes)s

        Returns
        -------
        display : TrainingHistoryDisplay
            The plotted display.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator has not been meta-fitted (``phase="meta_fit"``) or
            fitted (``phase="fit"``).

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from skmetavi import MetaBNNRegressor
        >>> from skmetavi.datasets import make_sinusoid_tasks
        >>> from skmetavi.plotting import TrainingHistoryDisplay
        >>> X, y, groups = make_sinusoid_tasks(6, 20, random_state=0)
        >>> est = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), max_meta_iter=4,
        ...                        n_tasks_per_batch=2, max_iter=10, validation_fraction=0.3,
        ...                        random_state=0).meta_fit(X, y, groups)
        >>> display = TrainingHistoryDisplay.from_estimator(est)
        >>> display.keys
        ['meta_loss', 'validation_score']
        >>> plt.close(display.figure_)
        """
        caller = f"{cls.__name__}.from_estimator"
        if phase not in _PHASES:
            raise ValueError(f"{caller}: phase must be one of {_PHASES}, got {phase!r}.")
        if phase == "meta_fit":
            history = _check_meta_fitted(estimator, "meta_history_", caller)
        else:
            check_is_fitted(estimator)
            history = estimator.history_
        return cls.from_history(history, keys=keys, phase=phase, ax=ax,
                                line_kwargs=line_kwargs)
