"""Training history and callbacks of ``fit`` and ``meta_fit`` (skorch-style).

Every estimator records one dict per iteration: ``history_`` for :meth:`fit`
(``iteration``, ``loss``, ``time``) and ``meta_history_`` for ``meta_fit``
(``iteration``, ``meta_loss``, the divergence's learned scalars such as
``alpha``, ``time``, and ``validation_score`` / ``validation_kl_score`` on
the iterations where meta-validation ran).  Both are :class:`History` lists
with column access, ``est.meta_history_[:, "meta_loss"]``.

The ``callbacks`` parameter of the estimators takes a list of callables
``fn(estimator, record) -> bool or None``, called after each iteration of
``fit`` and ``meta_fit`` with that iteration's record (return True to stop),
or of :class:`Callback` objects such as :class:`EarlyStopping`.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import math

__all__ = ["Callback", "EarlyStopping", "History"]

#: The phases a callback is called in.
PHASES = ("fit", "meta_fit")


class History(list):
    """A list of per-iteration records (dicts) with skorch-style column access.

    ``history[i]`` is the record of one iteration (a dict) and ``history[a:b]``
    a :class:`History` of some of them, as for any list.  A pair indexes rows
    and columns: ``history[:, "loss"]`` is the list of the ``"loss"`` values of
    the rows that have one (``validation_score`` exists only on the validated
    iterations), ``history[:, ("iteration", "validation_score")]`` the list of
    tuples of the rows that have both, and ``history[-1, "loss"]`` one value.
    It pickles and copies as a list.

    Parameters
    ----------
    records : iterable of dict, default=()
        The records, oldest first.

    See Also
    --------
    EarlyStopping : Stops training when a column of the history stops improving.

    Examples
    --------
    >>> from skmetavi.callbacks import History
    >>> h = History([{"iteration": 1, "loss": 3.0},
    ...              {"iteration": 2, "loss": 2.0, "validation_score": -1.0}])
    >>> h[:, "loss"]
    [3.0, 2.0]
    >>> h[:, ("iteration", "validation_score")]
    [(2, -1.0)]
    >>> h[-1, "loss"]
    2.0
    """

    def __init__(self, records=()):
        super().__init__(dict(r) for r in records)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError(
                    f"History takes history[rows] or history[rows, columns], got {len(key)} "
                    "indices; e.g. history[:, 'loss']."
                )
            rows, columns = key
            selected = list.__getitem__(self, rows)
            if isinstance(selected, dict):
                return self._cells(selected, columns)
            return self._column(selected, columns)
        selected = list.__getitem__(self, key)
        return History(selected) if isinstance(key, slice) else selected

    @staticmethod
    def _cells(record, columns):
        if isinstance(columns, (tuple, list)):
            return tuple(record[c] for c in columns)
        return record[columns]

    def _column(self, rows, columns):
        names = tuple(columns) if isinstance(columns, (tuple, list)) else (columns,)
        known = set().union(*(r.keys() for r in self))
        missing = [c for c in names if c not in known]
        if missing:
            raise KeyError(
                f"No record has the column(s) {missing}; the columns are {sorted(known)}."
            )
        kept = [r for r in rows if all(c in r for c in names)]
        if isinstance(columns, (tuple, list)):
            return [tuple(r[c] for c in names) for r in kept]
        return [r[columns] for r in kept]

    def __repr__(self):
        return f"History({list.__repr__(self)})"


class Callback:
    """Base class of the callbacks of ``fit`` and ``meta_fit``; every hook is optional.

    A callback object is called at the start of a training call, after each
    iteration and at its end.  ``phase`` is ``"fit"`` or ``"meta_fit"``.  The
    estimator's fitted attributes (``history_``, ``meta_history_``,
    ``meta_divergence_``, ...) are set when the call ends; during it, the
    records passed to the hooks are the progress.  A plain callable
    ``fn(estimator, record)`` in ``callbacks`` is the same as a callback whose
    :meth:`on_iteration_end` calls it.

    In a batched adaptation (all held-out tasks adapted at once, as
    :class:`~skmetavi.model_selection.TaskAdaptiveRegressor` does), each task
    gets its own copy of every :class:`Callback` (``copy.deepcopy``), called
    with that task's copy of the estimator, so that each task stops as its
    own ``fit`` would; plain callables are shared.

    See Also
    --------
    EarlyStopping : Stops when a monitored value stops improving.
    History : The records passed to the hooks.

    Examples
    --------
    >>> from skmetavi.callbacks import Callback
    >>> class StopAbove(Callback):
    ...     def on_iteration_end(self, estimator, phase, record):
    ...         return phase == "fit" and record["loss"] > 1e6
    >>> StopAbove().on_iteration_end(None, "fit", {"iteration": 1, "loss": 2e6})
    True
    """

    def on_train_begin(self, estimator, phase, history):
        """Start of a ``fit`` or ``meta_fit`` call.

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        history : History
            The records of this call so far: empty, except when ``meta_fit``
            resumes from a checkpoint (the records of the run it continues).
        """

    def on_iteration_end(self, estimator, phase, record):
        """End of one iteration.

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        record : dict
            The iteration's record (the row appended to the history).

        Returns
        -------
        stop : bool or None
            True to stop training after this iteration.
        """
        return None

    def on_train_end(self, estimator, phase, history):
        """End of a ``fit`` or ``meta_fit`` call (also after an early stop or ``Ctrl-C``).

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        history : History
            The records of this call.
        """


class EarlyStopping(Callback):
    """Stop training when a monitored value of the history stops improving.

    Counts the records that carry ``monitor`` since its best value; when
    ``patience`` of them in a row fail to improve on it by more than
    ``min_delta``, training stops after that iteration.  The estimator keeps
    its state as after that iteration (``n_iter_`` / ``n_meta_iter_``, the
    curves and histories end there).  A value improves if it is lower
    (``mode="min"``) or higher (``mode="max"``) than the best so far; NaN (a
    rolled-back step) never improves.  Records without ``monitor`` are ignored:
    ``"loss"`` exists only in ``fit``, ``"meta_loss"`` only in ``meta_fit``, and
    ``"validation_score"`` only on the iterations where meta-validation ran
    (``validation_fraction``), so that ``patience`` then counts validations.

    Parameters
    ----------
    monitor : str, default="meta_loss"
        The column to watch: ``"meta_loss"``, ``"validation_score"`` (with
        ``validation_fraction``), ``"loss"`` (``fit``) or any other column of
        the records, e.g. ``"alpha"``.
    patience : int, default=10
        Records without improvement before stopping.
    min_delta : float, default=0.0
        Smallest change that counts as an improvement.
    mode : {"auto", "min", "max"}, default="auto"
        Whether lower or higher is better; ``"auto"``: higher for names
        containing ``"score"``, lower otherwise.

    Attributes
    ----------
    best_ : float
        Best monitored value of the last call (None before any).
    best_iteration_ : int
        Iteration of ``best_``.
    wait_ : int
        Records since ``best_``.
    stopped_iteration_ : int or None
        Iteration after which the last call stopped, None if it did not.

    See Also
    --------
    Callback : The hooks a callback may define.
    History : The records it watches.

    Notes
    -----
    State is reset at the start of every ``fit`` / ``meta_fit`` call (a
    ``warm_start`` call starts counting afresh) and rebuilt from the resumed
    records when ``meta_fit`` continues from a checkpoint, so that the stop is
    where an uninterrupted run would stop.  There is no restoring of the best
    iteration's state: with ``validation_fraction``, ``meta_fit`` already keeps
    the best validated candidate, so ``EarlyStopping("validation_score")``
    stops when validation stops improving and keeps the best.

    Examples
    --------
    >>> from skmetavi.callbacks import EarlyStopping
    >>> stop = EarlyStopping("loss", patience=2)
    >>> stop.on_train_begin(None, "fit", [])
    >>> [stop.on_iteration_end(None, "fit", {"iteration": i, "loss": v})
    ...  for i, v in enumerate([3.0, 2.0, 2.5, 2.1], start=1)]
    [False, False, False, True]
    >>> stop.best_, stop.best_iteration_, stop.stopped_iteration_
    (2.0, 2, 4)
    """

    def __init__(self, monitor="meta_loss", *, patience=10, min_delta=0.0, mode="auto"):
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode

    def _check(self):
        if not isinstance(self.monitor, str):
            raise TypeError(f"EarlyStopping: monitor must be a str, got {self.monitor!r}.")
        if (isinstance(self.patience, bool) or not isinstance(self.patience, int)
                or self.patience < 1):
            raise ValueError(
                f"EarlyStopping: patience must be a positive int, got {self.patience!r}."
            )
        if (isinstance(self.min_delta, bool) or not isinstance(self.min_delta, (int, float))
                or not self.min_delta >= 0):
            raise ValueError(
                f"EarlyStopping: min_delta must be a number >= 0, got {self.min_delta!r}."
            )
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(
                f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {self.mode!r}."
            )

    def _higher_is_better(self):
        if self.mode == "auto":
            return "score" in self.monitor
        return self.mode == "max"

    def on_train_begin(self, estimator, phase, history):
        """Reset the state, then replay the records of a resumed call.

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        history : History
            The records of this call so far.
        """
        self._check()
        self.best_, self.best_iteration_, self.wait_ = None, None, 0
        self.stopped_iteration_ = None
        for record in history:
            self._update(record)

    def _update(self, record):
        """Account for one record; whether patience ran out."""
        if self.monitor not in record:
            return False
        value = record[self.monitor]
        value = math.nan if value is None else float(value)
        if self.best_ is None and not math.isnan(value):
            improved = True
        elif math.isnan(value):
            improved = False
        elif self._higher_is_better():
            improved = value > self.best_ + self.min_delta
        else:
            improved = value < self.best_ - self.min_delta
        if improved:
            self.best_, self.best_iteration_, self.wait_ = value, record.get("iteration"), 0
        else:
            self.wait_ += 1
        return self.wait_ >= self.patience

    def on_iteration_end(self, estimator, phase, record):
        """Update the best value; stop once ``patience`` records did not improve on it.

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        record : dict
            The iteration's record.

        Returns
        -------
        stop : bool
            Whether training stops after this iteration.
        """
        if not hasattr(self, "wait_"):  # used without on_train_begin
            self.on_train_begin(estimator, phase, [])
        stop = self._update(record)
        if stop:
            self.stopped_iteration_ = record.get("iteration")
        return stop

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience!r}, "
                f"min_delta={self.min_delta!r}, mode={self.mode!r})")


# ----------------------------------------------------------------- internals
class _FunctionCallback(Callback):
    """A plain ``fn(estimator, record)`` as a :class:`Callback`."""

    def __init__(self, fn):
        self.fn = fn

    def on_iteration_end(self, estimator, phase, record):
        return self.fn(estimator, record)


def _resolve(callbacks, *, copy_objects=False):
    """``callbacks`` as a list of :class:`Callback`-like objects (validated).

    Objects with an ``on_iteration_end`` method are used as they are (deep copies
    with ``copy_objects``: one set per task of a batched adaptation); other
    callables are wrapped.
    """
    if callbacks is None:
        return []
    if callable(callbacks) or isinstance(callbacks, Callback):
        callbacks = [callbacks]
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(
            "callbacks must be None or a list of callables fn(estimator, record) or "
            f"skmetavi.callbacks.Callback objects, got {type(callbacks).__name__}."
        )
    out = []
    for cb in callbacks:
        if hasattr(cb, "on_iteration_end"):
            out.append(copy.deepcopy(cb) if copy_objects else cb)
        elif callable(cb):
            out.append(_FunctionCallback(cb))
        else:
            raise TypeError(
                "Each callback must be a callable fn(estimator, record) -> bool or None, or "
                f"a skmetavi.callbacks.Callback (e.g. EarlyStopping()), got {cb!r:.80}."
            )
    return out


def _begin(callbacks, estimator, phase, history):
    for cb in callbacks:
        hook = getattr(cb, "on_train_begin", None)
        if hook is not None:
            hook(estimator, phase, history)


def _iteration_end(callbacks, estimator, phase, record):
    """Call every callback (each sees the record even if an earlier one stops)."""
    stop = False
    for cb in callbacks:
        if cb.on_iteration_end(estimator, phase, record):
            stop = True
    return stop


def _end(callbacks, estimator, phase, history):
    for cb in callbacks:
        hook = getattr(cb, "on_train_end", None)
        if hook is not None:
            hook(estimator, phase, history)
