"""Training history and callbacks of ``fit`` and ``meta_fit`` (skorch-style).

Every estimator records one dict per iteration: ``history_`` for :meth:`fit`
(``iteration``, ``loss``, ``time``) and ``meta_history_`` for ``meta_fit``
(``iteration``, ``meta_loss``, the divergence's learned scalars such as
``alpha``, ``time``, and ``validation_score`` / ``validation_kl_score`` on
the iterations where meta-validation ran).  ``time`` is the wall-clock
duration of that one iteration in seconds (its meta-validation included), not
a running total: ``np.cumsum(est.meta_history_[:, "time"])`` is the elapsed
training time.  Both are :class:`History` lists with column access,
``est.meta_history_[:, "meta_loss"]``.

The ``callbacks`` parameter of the estimators takes a list of callables
``fn(estimator, record) -> bool or None``, called after each iteration of
``fit`` and ``meta_fit`` with that iteration's record (return True to stop),
or of :class:`Callback` objects such as :class:`EarlyStopping` (a single
callable or :class:`Callback` is the same as a list of one).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import math
from numbers import Integral, Real

from skmetavi.exceptions import _warn_at_caller

__all__ = ["Callback", "EarlyStopping", "History"]

#: The phases a callback is called in.
PHASES = ("fit", "meta_fit")
#: The columns the estimators write, by phase (``meta_fit`` adds the divergence's learned
#: scalars, and the validation columns with ``validation_fraction``).
COLUMNS = {"fit": ("iteration", "loss", "time"), "meta_fit": ("iteration", "meta_loss", "time")}
VALIDATION_COLUMNS = ("validation_score", "validation_kl_score")


class History(list):
    """A list of per-iteration records (dicts) with skorch-style column access.

    ``history[i]`` is the record of one iteration (a dict) and ``history[a:b]``
    a :class:`History` of some of them, as for any list.  A pair indexes rows
    and columns: ``history[:, "loss"]`` is the list of the ``"loss"`` values of
    the rows that have one (``validation_score`` exists only on the validated
    iterations), ``history[:, ("iteration", "validation_score")]`` the list of
    tuples of the rows that have both, and ``history[-1, "loss"]`` one value.
    As in skorch, selecting a column that none of the selected rows has
    raises ``KeyError`` (``history[-1:, "validation_score"]`` as well as
    ``history[-1, "validation_score"]`` when the last iteration was not
    validated).  It pickles and copies as a list.

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

    def _cells(self, record, columns):
        return self._column([record], columns)[0]

    @staticmethod
    def _column(rows, columns):
        names = tuple(columns) if isinstance(columns, (tuple, list)) else (columns,)
        kept = [r for r in rows if all(c in r for c in names)]
        if not kept:
            known = set().union(*(r.keys() for r in rows))
            missing = [c for c in names if c not in known] or list(names)
            which = ("The selected record has no", "its") if len(rows) == 1 else (
                f"None of the {len(rows)} selected records has a", "their")
            raise KeyError(
                f"{which[0]} column {missing}; {which[1]} columns are {sorted(known)}."
            )
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
    ``"validation_score"`` exists only on the iterations where meta-validation
    ran (``validation_fraction``), so that ``patience`` then counts validations.

    It acts in one phase, ``fit`` or ``meta_fit``, and is inactive in the other,
    so that an estimator with ``callbacks=[EarlyStopping()]`` stops its
    ``meta_fit`` early and still runs every epoch of a later ``fit``.

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
    phase : {"auto", "fit", "meta_fit"}, default="auto"
        The call it acts in.  ``"auto"``: the phase whose records have
        ``monitor`` -- ``fit`` for ``"loss"``, ``meta_fit`` for
        ``"meta_loss"``, the validation scores and the divergence's learned
        scalars (``"alpha"``) -- and both for a column of neither (one that
        another callback adds).

    Attributes
    ----------
    best_ : float
        Best monitored value of the last call of its phase (None before any).
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
    A ``monitor`` that the records of the call it acts in cannot have is an
    error at the start of the call (``ValueError``): ``"validation_score"``
    without ``validation_fraction``, ``"alpha"`` for a divergence without
    one, ``"loss"`` with ``phase="meta_fit"``, or a name that is a column of
    neither phase when no other callback could add it to the records.  When
    another callback might (a callback may add its own columns to the record
    it receives), a monitor that never appeared gives a ``UserWarning`` at
    the end of the call.

    State is reset at the start of every call of its phase (a ``warm_start``
    call starts counting afresh) and rebuilt from the resumed records when
    ``meta_fit`` continues from a checkpoint, so that the stop is where an
    uninterrupted run would stop.  There is no restoring of the best
    iteration's state: with ``validation_fraction``, ``meta_fit`` keeps the
    best validated candidate, and the iteration where a callback stops it is
    validated too (as the last iteration of a run always is), so that
    ``EarlyStopping("validation_score")`` stops when validation stops
    improving and keeps the best, and ``EarlyStopping("meta_loss")`` still
    keeps a validated candidate.

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
    >>> stop.on_iteration_end(None, "meta_fit", {"iteration": 1, "meta_loss": 1.0})
    False
    """

    phase = "auto"  # objects pickled before ``phase`` existed

    def __init__(self, monitor="meta_loss", *, patience=10, min_delta=0.0, mode="auto",
                 phase="auto"):
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.mode = mode
        self.phase = phase

    def _check(self):
        if not isinstance(self.monitor, str):
            raise TypeError(f"EarlyStopping: monitor must be a str, got {self.monitor!r}.")
        if (isinstance(self.patience, bool) or not isinstance(self.patience, Integral)
                or self.patience < 1):
            raise ValueError(
                f"EarlyStopping: patience must be a positive int, got {self.patience!r}."
            )
        if (isinstance(self.min_delta, bool) or not isinstance(self.min_delta, Real)
                or not self.min_delta >= 0):
            raise ValueError(
                f"EarlyStopping: min_delta must be a number >= 0, got {self.min_delta!r}."
            )
        if self.mode not in ("auto", "min", "max"):
            raise ValueError(
                f"EarlyStopping: mode must be 'auto', 'min' or 'max', got {self.mode!r}."
            )
        if self.phase not in ("auto", *PHASES):
            raise ValueError(
                f"EarlyStopping: phase must be 'auto', 'fit' or 'meta_fit', got {self.phase!r}."
            )

    def _default_phase(self):
        """The phase it acts in when the estimator has not said which columns it writes."""
        if self.phase != "auto":
            return self.phase
        return "fit" if self.monitor == "loss" else "meta_fit"

    def _higher_is_better(self):
        if self.mode == "auto":
            return "score" in self.monitor
        return self.mode == "max"

    def _check_columns(self, phase, columns, other_columns, closed):
        """Decide whether it acts in this call; raise if it acts on a column it cannot see.

        ``columns``: those the estimator writes in this ``phase``; ``other_columns``:
        those it writes in the other phase; ``closed``: no other callback could add
        a column.  With ``phase="auto"`` it acts where its monitor is a column, and
        on a column of neither phase in both.  Returns whether the monitor is
        verified (False: another callback may add it, judged at the end).
        """
        self._check()
        if self.phase != "auto":
            acting = self.phase == phase
        elif self.monitor in columns:
            acting = True
        else:
            # A column of the other phase (the validation scores are meta_fit's, with or
            # without validation_fraction): inactive here.
            acting = not (self.monitor in other_columns
                          or (phase == "fit" and self.monitor in VALIDATION_COLUMNS))
        self._acting = (phase, acting)
        if not acting or self.monitor in columns:
            return True
        reserved = set(VALIDATION_COLUMNS).union(*COLUMNS.values())
        if not closed and self.monitor not in reserved:
            return False
        if self.phase == "auto":
            fit, meta = ((columns, other_columns) if phase == "fit"
                         else (other_columns, columns))
            where = (f"neither fit's records (columns {sorted(fit)}) nor meta_fit's "
                     f"({sorted(meta)}) have it")
        else:
            where = (f"phase={phase!r} and the records of {phase} have the columns "
                     f"{sorted(columns)}")
        if self.monitor in VALIDATION_COLUMNS:
            why = "; meta_fit writes it only with validation_fraction (e.g. 0.2)"
        elif self.monitor in reserved:
            why = (f"; it is a column of {'meta_fit' if phase == 'fit' else 'fit'}, "
                   "which phase='auto' would pick")
        else:
            why = ("; a column your own callback adds to the records needs that callback "
                   "in callbacks")
        raise ValueError(
            f"EarlyStopping(monitor={self.monitor!r}) cannot act: {where}{why}."
        )

    def _active(self, phase):
        acting = self.__dict__.get("_acting")
        if acting is not None and acting[0] == phase:
            return acting[1]
        return self._default_phase() == phase

    def on_train_begin(self, estimator, phase, history):
        """Reset the state, then replay the records of a resumed call (in its phase only).

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
        if not self._active(phase):
            return
        self.best_, self.best_iteration_, self.wait_ = None, None, 0
        self.stopped_iteration_ = None
        self._n_seen = 0
        for record in history:
            self._update(record)

    def _update(self, record):
        """Account for one record; whether patience ran out."""
        if self.monitor not in record:
            return False
        self._n_seen = getattr(self, "_n_seen", 0) + 1
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
            Whether training stops after this iteration (always False outside
            its phase).
        """
        if not self._active(phase):
            return False
        if not hasattr(self, "wait_"):  # used without on_train_begin
            self.on_train_begin(estimator, phase, [])
        stop = self._update(record)
        if stop:
            self.stopped_iteration_ = record.get("iteration")
        return stop

    def on_train_end(self, estimator, phase, history):
        """Warn if a monitor that could not be checked in advance never appeared.

        Parameters
        ----------
        estimator : estimator
            The estimator being trained.
        phase : {"fit", "meta_fit"}
            Which call.
        history : History
            The records of this call.
        """
        unverified = self.__dict__.pop("_unverified", False)
        if (unverified and self._active(phase) and history
                and not getattr(self, "_n_seen", 0)):
            columns = sorted(set().union(*(r.keys() for r in history)))
            _warn_at_caller(
                f"EarlyStopping(monitor={self.monitor!r}) never acted: none of the "
                f"{len(history)} records of this {phase} had the column {self.monitor!r} "
                f"(their columns: {columns}). Check the name, or the callback meant to "
                "add it.",
                UserWarning,
            )

    def __repr__(self):
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience!r}, "
                f"min_delta={self.min_delta!r}, mode={self.mode!r}, phase={self.phase!r})")


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


def _begin(callbacks, estimator, phase, history, columns=None, other_columns=()):
    """``on_train_begin`` of every callback, after checking the monitors against ``columns``.

    ``columns``: the columns the estimator writes in this call (None: not
    checked); ``other_columns``: those it writes in the other phase.
    """
    if columns is not None:
        # Only another kind of callback could add a column to the records.
        closed = all(isinstance(cb, EarlyStopping) for cb in callbacks)
        for cb in callbacks:
            if isinstance(cb, EarlyStopping):
                cb._unverified = not cb._check_columns(
                    phase, frozenset(columns), frozenset(other_columns), closed)
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
