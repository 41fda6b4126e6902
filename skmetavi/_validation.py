"""Input validation shared by the estimators and the task-level tools.

scikit-learn's validation utilities, with errors that also say what to do, the
checks of task labels (``groups``), random states that never touch numpy's
global RNG, and parameter representations that are stable across processes.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import hashlib

import numpy as np
import scipy.sparse as sp
import torch
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, column_or_1d, validate_data


def _check_random_state(random_state):
    """:func:`sklearn.utils.check_random_state` that never draws from numpy's global RNG.

    ``None`` gives a fresh ``RandomState`` seeded from OS entropy, so that fitting
    leaves the global numpy (and torch) RNGs untouched, as documented.
    """
    if random_state is None:
        return np.random.RandomState()
    return check_random_state(random_state)


# What to do about scikit-learn's validation errors, keyed by a fragment of its message.
# scikit-learn says what it received; these hints add what to try.
_VALIDATION_HINTS = (
    (
        "infinity or a value too large",
        "Remove or impute the non-finite entries (e.g. keep only the rows where "
        "np.isfinite(a).all(axis=1) for an array a), or rescale values beyond the float range.",
    ),
    (
        "contains NaN",
        "Drop the rows with missing values or impute them first (e.g. with "
        "sklearn.impute.SimpleImputer in a Pipeline).",
    ),
    ("0 sample(s)", "Pass at least one row."),
    ("0 feature(s)", "Pass at least one column."),
    (
        "Found array with dim",
        "Pass a 2-D array of shape (n_samples, n_features), e.g. X.reshape(len(X), -1).",
    ),
    (
        "features, but",
        "Pass the columns the estimator was fitted on, in the same order, or fit it again "
        "on the new columns.",
    ),
    (
        "inconsistent numbers of samples",
        "Pass exactly one target (and one task label) per row of X.",
    ),
    (
        "could not convert",
        "The data must be numeric: encode strings and categories first, e.g. with "
        "sklearn.preprocessing.OrdinalEncoder or OneHotEncoder.",
    ),
    ("Complex data not supported", "Pass real numbers, e.g. np.real(X) or np.abs(X)."),
    (
        "should be a 1d array",
        "Pass one target column of shape (n_samples,): the estimator has a single output.",
    ),
)


def _with_hint(exc):
    """``exc`` with what to try appended, for plain ValueError / TypeError from sklearn."""
    if type(exc) not in (ValueError, TypeError):
        return exc
    message = str(exc)
    for fragment, hint in _VALIDATION_HINTS:
        if fragment in message and hint not in message:
            if fragment == "contains NaN" and "imputer" in message:
                return exc  # scikit-learn already suggests an imputer for X
            return type(exc)(f"{message.rstrip()} {hint}")
    return exc


def _validate_data(estimator, X="no_validation", y="no_validation", **check_params):
    """:func:`sklearn.utils.validation.validate_data` whose errors also say what to do.

    With ``y`` given, ``y`` is also required to be numeric (scikit-learn's
    ``y_numeric`` converts object arrays only, so strings would reach torch).
    """
    try:
        # scikit-learn's finiteness check sums the array first and only silences
        # overflow: finite values near +-1.8e308 give inf - inf and a RuntimeWarning
        # "invalid value encountered in reduce" before its exact element-wise check.
        with np.errstate(over="ignore", invalid="ignore"):
            out = validate_data(estimator, X, y, **check_params)
            if isinstance(out, tuple):
                X, y = out
                y = check_array(
                    y, ensure_2d=False, dtype=[np.float64, np.float32], input_name="y"
                )
                out = X, y
    except (ValueError, TypeError) as exc:
        new = _with_hint(exc)
        if new is exc:
            raise
        raise new from exc
    return out


def _check_array(array, **check_params):
    """:func:`sklearn.utils.check_array` whose errors also say what to do."""
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # see _validate_data
            return check_array(array, **check_params)
    except (ValueError, TypeError) as exc:
        new = _with_hint(exc)
        if new is exc:
            raise
        raise new from exc


def _module_repr(module):
    """Class, ``repr``, frozen parameters and a sha256 of the ``state_dict`` of a module."""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes())
    frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
    cls = type(module)
    return (
        f"{cls.__module__}.{cls.__qualname__}({module!r}, frozen={frozen}, "
        f"tensors={h.hexdigest()})"
    )


def _stable_repr(value):
    """A representation of a parameter that is the same in every process.

    ``repr`` of a function or of most objects contains a memory address; use the
    qualified name of callables and the parameters of objects that have them.  A
    ``torch.nn.Module`` (a BNN's ``network``) is its class, architecture and a hash of
    its tensors: equal modules agree, different weights or layers differ.
    """
    if hasattr(value, "get_params") and not isinstance(value, type):
        params = sorted((k, _stable_repr(v)) for k, v in value.get_params(deep=False).items())
        return f"{type(value).__qualname__}({params})"
    if isinstance(value, torch.nn.Module):
        return _module_repr(value)
    if callable(value) and hasattr(value, "__qualname__"):
        return f"{getattr(value, '__module__', '')}.{value.__qualname__}"
    if isinstance(value, (list, tuple)):
        return type(value)(_stable_repr(v) for v in value)
    return repr(value)


def _hash_arrays(h, arrays):
    """Feed the contents of ``arrays`` (dense, sparse or None) to the hash object ``h``."""
    for arr in arrays:
        if sp.issparse(arr):  # its stored entries (a rating matrix), not a dense copy
            arr = sp.csr_matrix(arr)
            h.update(str(("sparse", arr.shape)).encode())
            for part in (arr.indptr, arr.indices, arr.data):
                h.update(np.ascontiguousarray(part).tobytes())
        elif arr is not None:
            arr = np.ascontiguousarray(arr)
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(arr.tobytes() if arr.dtype.kind != "O" else repr(arr.tolist()).encode())
    return h


def check_groups(groups, n_samples, *, min_tasks=2):
    """Validate ``groups`` and return ``(labels, list of row-index arrays)``."""
    if groups is None:
        raise ValueError(
            "meta_fit needs groups: an array of shape (n_samples,) giving the task "
            "of each row (rows with the same label form one task)."
        )
    try:
        groups = column_or_1d(groups, warn=True, input_name="groups")
    except ValueError as exc:
        raise ValueError(
            f"groups must be a 1-D array of integer or string task labels, one per row of X; "
            f"got {type(groups).__name__} of shape {np.shape(groups)} ({exc}). Pass e.g. "
            "groups=np.repeat(np.arange(n_tasks), rows_per_task)."
        ) from exc
    if groups.shape[0] != n_samples:
        raise ValueError(
            f"groups has {groups.shape[0]} entries but X has {n_samples} rows; give one "
            "task label per row."
        )
    if groups.dtype.kind == "f" and not np.isfinite(groups).all():
        raise ValueError(
            f"groups contains {int(np.sum(~np.isfinite(groups)))} NaN or inf label(s); every "
            "row needs a finite task label (drop those rows or give them a task)."
        )
    if groups.dtype.kind not in "biufUSO":
        raise TypeError(
            f"groups must hold integer or string labels, got dtype {groups.dtype}; convert "
            "them, e.g. np.asarray(groups, dtype=str)."
        )
    try:
        labels, inverse = np.unique(groups, return_inverse=True)
    except TypeError as exc:
        kinds = sorted({type(g).__name__ for g in groups.tolist()})
        raise TypeError(
            f"groups mixes task labels of types {kinds} that cannot be compared ({exc}); use "
            "labels of one type, e.g. np.asarray(groups, dtype=str)."
        ) from exc
    if labels.shape[0] < min_tasks:
        raise ValueError(
            f"meta_fit needs at least {min_tasks} tasks (distinct groups), got "
            f"{labels.shape[0]}. Meta-learning a divergence needs a family of related "
            "tasks; to adapt to a single task use fit."
        )
    index = [np.flatnonzero(inverse == i) for i in range(labels.shape[0])]
    return labels, index
