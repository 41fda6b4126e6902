"""Helpers shared by the displays: lazy matplotlib, axes, style keywords, fitted checks."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from sklearn.utils._optional_dependencies import check_matplotlib_support
from sklearn.utils._plotting import _validate_style_kwargs
from sklearn.utils.validation import check_is_fitted


def _pyplot(caller):
    """``matplotlib.pyplot``, imported on first use (matplotlib is only needed to plot)."""
    check_matplotlib_support(caller)
    import matplotlib.pyplot as plt

    return plt


def _check_axes(ax, caller):
    """Raise a TypeError unless ``ax`` is a matplotlib Axes."""
    from matplotlib.axes import Axes

    if not isinstance(ax, Axes):
        raise TypeError(
            f"{caller}: ax must be a matplotlib Axes or None, got {type(ax).__name__}; "
            "e.g. fig, ax = plt.subplots(), then pass ax=ax."
        )
    return ax


def _axes_or_new(ax, caller):
    """``ax`` checked, or the Axes of a new figure when it is None."""
    if ax is None:
        _, ax = _pyplot(caller).subplots()
    return _check_axes(ax, caller)


def _style(defaults, user, name, caller):
    """Matplotlib keywords: ``defaults`` updated by the user's, aliases (``c``/``color``) merged."""
    if user is None:
        return dict(defaults)
    if not isinstance(user, dict):
        raise TypeError(
            f"{caller}: {name} must be a dict of matplotlib keywords or None, got "
            f"{type(user).__name__}; e.g. {name}={{'color': 'tab:red'}}."
        )
    return _validate_style_kwargs(defaults, user)


def _check_meta_fitted(estimator, attribute, caller):
    """NotFittedError unless :meth:`meta_fit` has set ``attribute`` on ``estimator``."""
    check_is_fitted(
        estimator,
        attributes=attribute,
        msg=(
            f"{caller} needs a meta-fitted estimator: this %(name)s instance has no "
            f"{attribute}. Call meta_fit(X, y, groups) first."
        ),
    )
    return getattr(estimator, attribute)


def _fill_doc(**fragments):
    """Fill the ``%(name)s`` placeholders of a docstring (imblearn's ``Substitution``).

    For parameter text that three methods share (STYLE 2.7); a fragment's
    continuation lines carry the indentation of the docstring it goes into.
    """

    def decorate(obj):
        obj.__doc__ = obj.__doc__ % fragments
        return obj

    return decorate
