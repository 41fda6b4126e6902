"""DivergenceDisplay: a divergence's weight function g against the Rényi alpha family (Fig. 1)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
from numbers import Real

import numpy as np
import torch

from skmetavi import _torch
from skmetavi.divergences import KL, Divergence, FDivergence, Renyi
from skmetavi.plotting._base import (
    _axes_or_new,
    _check_meta_fitted,
    _fill_doc,
    _pyplot,
    _style,
)

#: Default grid of ``log t``: self-normalised ratios satisfy ``t <= K``, so ``log t``
#: rarely exceeds ``log K`` (about 2.3 for K = 10, 4.6 for K = 100).
_DEFAULT_LOG_T = (-6.0, 3.0, 200)
_DEFAULT_REFERENCE_ALPHAS = (0.0, 0.5, 1.0)
_KINDS = ("log_g", "g")
_REFERENCE_STYLES = ("--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (10, 3)))
#: Grey levels of the reference lines, cycled with the line styles.
_REFERENCE_GREYS = ("0.3", "0.5", "0.4", "0.6", "0.35")


def _check_log_t(log_t, caller):
    if log_t is None:
        low, high, n_points = _DEFAULT_LOG_T
        return np.linspace(low, high, n_points)
    values = np.asarray(log_t, dtype=float)
    if values.ndim != 1 or values.size < 2 or not np.all(np.isfinite(values)):
        raise ValueError(
            f"{caller}: log_t must be a 1-D array of at least 2 finite values, got "
            f"shape {values.shape}; e.g. log_t=np.linspace(-6, 3, 200)."
        )
    return values


def _check_reference_alphas(reference_alphas, caller):
    if reference_alphas is None:
        return np.empty(0)
    values = list(reference_alphas) if np.iterable(reference_alphas) else [reference_alphas]
    if not all(isinstance(a, Real) and not isinstance(a, bool) and math.isfinite(a)
               for a in values):
        raise ValueError(
            f"{caller}: reference_alphas must be finite real numbers, got "
            f"{reference_alphas!r}; e.g. reference_alphas=(0.0, 0.5, 1.0)."
        )
    return np.asarray(values, dtype=float)


def _family_alpha(divergence):
    """The Rényi order whose ``log g = (1 - alpha) log t`` the divergence has, or None."""
    if isinstance(divergence, Renyi):
        return divergence.alpha
    if isinstance(divergence, KL):
        return 1.0
    if type(divergence) is FDivergence and divergence.log_g is None:
        return 1.0 - float(divergence.a)
    return None


def _log_g(divergence, log_t):
    """``log g(t)`` of ``divergence`` at ``log_t`` (float64 ndarray), in the convention of Sec. 3.2.

    Rényi's ``D_alpha`` has the weights of the f-divergence with ``g(t) = t^(1 - alpha)``
    (``f(t) = t^a / (a (a - 1))``, ``a = 1 - alpha``), KL(q||p) is ``g = 1``.
    """
    if isinstance(divergence, FDivergence):
        tensors = [*divergence.parameters(), *divergence.buffers()]
        device = tensors[0].device if tensors else "cpu"
        u = _torch.as_tensor(log_t, device=device, dtype=torch.float64)
        with torch.no_grad():
            return _torch.to_numpy(divergence.evaluate_log_g(u))
    alpha = _family_alpha(divergence)
    if alpha is None:
        raise TypeError(
            f"DivergenceDisplay: a {type(divergence).__name__} has no weight function g(t) "
            "= t^2 f''(t) of the density ratio alone (TailAdaptive's weights depend on "
            "the ranks of all particles); pass a Renyi, KL, FDivergence or NeuralF."
        )
    return (1.0 - alpha) * log_t


# Parameter text of plot, from_divergence and from_estimator.
_KIND_DOC = """kind : {"log_g", "g"}, default="log_g"
            ``"log_g"`` draws ``h(log t) = log g(t)``, where the alpha family is
            lines; ``"g"`` draws ``g(t) = t^2 f''(t)`` itself."""
_STYLE_DOC = """line_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for the divergence's curve.
        reference_kwargs : dict, default=None
            Keywords of :meth:`matplotlib.axes.Axes.plot` for every reference line."""


class DivergenceDisplay:
    """A divergence's weight function against the Rényi alpha family (Fig. 1 of the paper).

    An f-divergence's inner update weights each particle by ``g(t) = t^2 f''(t)``
    at its self-normalised density ratio ``t`` (Eq. (8)); meta-f learns
    ``h(log t) = log g(t)``.  Rényi's ``D_alpha(q || p)`` has the same weights as
    ``g(t) = t^(1 - alpha)``, a line ``(1 - alpha) log t`` in these coordinates:
    alpha = 1 (KL(q||p), standard VI) is flat and alpha = 0 (the IWAE end) has
    slope 1.  The display draws ``log g`` (or ``g``) of one divergence against
    ``log t``, with the lines of a few reference orders.

    Use :meth:`from_estimator` or :meth:`from_divergence` to build one; the
    constructor stores arrays computed elsewhere.

    Parameters
    ----------
    log_t : ndarray of shape (n_points,)
        The grid of log density ratios.
    log_g : ndarray of shape (n_points,)
        ``log g`` of the divergence at ``log_t``, minus ``offset``.
    reference_alphas : ndarray of shape (n_references,), default=None
        Rényi orders of the reference lines ``(1 - alpha) log t``; None for none.
    alpha : float, default=None
        The divergence's own order when it belongs to the alpha family (a
        :class:`~skmetavi.divergences.Renyi`, ``KL`` or power
        :class:`~skmetavi.divergences.FDivergence`), shown in its label.
    offset : float, default=0.0
        The ``log g(1)`` that was subtracted from ``log_g`` (0 when the curve was
        not aligned, and for the alpha family, whose ``g(1) = 1``).
    name : str, default=None
        Legend label of the divergence's curve; its class name if None.

    Attributes
    ----------
    line_ : matplotlib Line2D
        The divergence's curve.
    reference_lines_ : list of matplotlib Line2D
        One line per reference order, in the order of ``reference_alphas``.
    ax_ : matplotlib Axes
        Axes with the curves.
    figure_ : matplotlib Figure
        Figure containing the curves.

    See Also
    --------
    DivergenceDisplay.from_estimator : The divergence meta-learned by an estimator.
    DivergenceDisplay.from_divergence : Any divergence with a weight function g.
    skmetavi.divergences.NeuralF : The learnable ``h = log g`` of meta-f.

    Notes
    -----
    The normalised update (``FDivergence(normalize=True)``, the default, and
    :class:`~skmetavi.divergences.Renyi`) does not change when g is multiplied
    by a constant (``f`` and ``c f`` define the same divergence), so the
    constructors align curves at ``log t = 0`` by default: the paper's learned
    ``h_eta`` is ``h_0.5 + 1.25``, i.e. the alpha = 0.5 line once aligned.

    Examples
    --------
    >>> import matplotlib.pyplot as plt
    >>> import numpy as np
    >>> from skmetavi.plotting import DivergenceDisplay
    >>> log_t = np.linspace(-4, 2, 50)
    >>> display = DivergenceDisplay(log_t=log_t, log_g=0.3 * log_t, alpha=0.7,
    ...                             reference_alphas=[0.0, 1.0], name="Renyi")
    >>> fig, ax = plt.subplots()
    >>> display = display.plot(ax=ax)
    >>> len(display.reference_lines_)
    2
    >>> plt.close(fig)
    """

    def __init__(self, *, log_t, log_g, reference_alphas=None, alpha=None, offset=0.0,
                 name=None):
        self.log_t = log_t
        self.log_g = log_g
        self.reference_alphas = reference_alphas
        self.alpha = alpha
        self.offset = offset
        self.name = name

    @_fill_doc(kind=_KIND_DOC, style=_STYLE_DOC)
    def plot(self, ax=None, *, kind="log_g", name=None, line_kwargs=None,
             reference_kwargs=None):
        """Plot the divergence's curve and the reference lines.

        Parameters
        ----------
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure if None.
        %(kind)s
        name : str, default=None
            Legend label of the divergence's curve; ``self.name`` if None.
        %(style)s

        Returns
        -------
        display : DivergenceDisplay
            The display, with ``line_``, ``reference_lines_``, ``ax_`` and ``figure_``.
        """
        caller = f"{type(self).__name__}.plot"
        _pyplot(caller)
        if kind not in _KINDS:
            raise ValueError(f"{caller}: kind must be one of {_KINDS}, got {kind!r}.")
        ax = _axes_or_new(ax, caller)
        transform = np.exp if kind == "g" else (lambda v: v)
        log_t = np.asarray(self.log_t, dtype=float)
        alphas = _check_reference_alphas(self.reference_alphas, caller)

        name = self.name if name is None else name
        label = name if name is not None else "divergence"
        if self.alpha is not None:
            label = f"{label} (α = {self.alpha:.3g})"
        self.reference_lines_ = []
        for i, a in enumerate(alphas):
            default = {"color": _REFERENCE_GREYS[i % len(_REFERENCE_GREYS)], "linewidth": 1.2,
                       "linestyle": _REFERENCE_STYLES[i % len(_REFERENCE_STYLES)],
                       "label": f"Rényi α = {a:.3g}"}
            style = _style(default, reference_kwargs, "reference_kwargs", caller)
            self.reference_lines_.append(ax.plot(log_t, transform((1.0 - a) * log_t), **style)[0])
        line_style = _style({"color": "tab:blue", "linewidth": 2.5, "label": label},
                            line_kwargs, "line_kwargs", caller)
        self.line_ = ax.plot(log_t, transform(np.asarray(self.log_g, dtype=float)),
                             **line_style)[0]

        aligned = self.offset != 0
        if kind == "log_g":
            ylabel = "log g(t) − log g(1)" if aligned else "h(log t) = log g(t)"
        else:
            ylabel = "g(t) / g(1)" if aligned else "g(t) = t² f''(t)"
        ax.set(xlabel="log t (self-normalised density ratio)", ylabel=ylabel)
        ax.legend()
        self.ax_ = ax
        self.figure_ = ax.figure
        return self

    @classmethod
    @_fill_doc(kind=_KIND_DOC, style=_STYLE_DOC)
    def from_divergence(cls, divergence, *, log_t=None, align=True,
                        reference_alphas=_DEFAULT_REFERENCE_ALPHAS, kind="log_g", name=None,
                        ax=None, line_kwargs=None, reference_kwargs=None):
        """Plot the weight function g of a divergence against the Rényi alpha family.

        Parameters
        ----------
        divergence : Divergence
            A :class:`~skmetavi.divergences.FDivergence` (``NeuralF`` included),
            :class:`~skmetavi.divergences.Renyi` or
            :class:`~skmetavi.divergences.KL`.
        log_t : array-like of shape (n_points,), default=None
            Grid of ``log t``; 200 points on ``[-6, 3]`` if None.
        align : bool, default=True
            Subtract ``log g(1)`` so that the curve passes through ``log g = 0`` at
            ``log t = 0``, as the reference lines do (see Notes of
            :class:`DivergenceDisplay`).  False plots the raw ``log g``, whose
            offset matters only with ``FDivergence(normalize=False)``.
        reference_alphas : array-like of float or None, default=(0.0, 0.5, 1.0)
            Rényi orders of the reference lines; None for none.
        %(kind)s
        name : str, default=None
            Legend label of the divergence's curve; its class name if None.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure if None.
        %(style)s

        Returns
        -------
        display : DivergenceDisplay
            The plotted display.

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from skmetavi.divergences import NeuralF
        >>> from skmetavi.plotting import DivergenceDisplay
        >>> display = DivergenceDisplay.from_divergence(NeuralF(init_alpha=0.5))
        >>> display.line_.get_ydata()[-1]  # (1 - 0.5) * log t at log t = 3
        np.float64(1.5)
        >>> plt.close(display.figure_)
        """
        caller = f"{cls.__name__}.from_divergence"
        _pyplot(caller)
        if not isinstance(divergence, Divergence):
            raise TypeError(
                f"{caller}: divergence must be a skmetavi.divergences.Divergence, got "
                f"{type(divergence).__name__}; for an estimator use "
                f"{cls.__name__}.from_estimator(est)."
            )
        if not isinstance(align, bool):
            raise TypeError(f"{caller}: align must be a bool, got {align!r}.")
        log_t = _check_log_t(log_t, caller)
        reference_alphas = _check_reference_alphas(reference_alphas, caller)
        # Evaluated at log t = 0 too: the grid need not contain it.
        values = _log_g(divergence, np.append(log_t, 0.0))
        offset = float(values[-1]) if align else 0.0
        display = cls(
            log_t=log_t,
            log_g=values[:-1] - offset,
            reference_alphas=reference_alphas,
            alpha=_family_alpha(divergence),
            offset=offset,
            name=type(divergence).__name__ if name is None else name,
        )
        return display.plot(ax=ax, kind=kind, line_kwargs=line_kwargs,
                            reference_kwargs=reference_kwargs)

    @classmethod
    @_fill_doc(kind=_KIND_DOC, style=_STYLE_DOC)
    def from_estimator(cls, estimator, *, log_t=None, align=True,
                       reference_alphas=_DEFAULT_REFERENCE_ALPHAS, kind="log_g", name=None,
                       ax=None, line_kwargs=None, reference_kwargs=None):
        """Plot the divergence an estimator meta-learned (its ``meta_divergence_``).

        Parameters
        ----------
        estimator : estimator instance
            A skmetavi estimator after :meth:`meta_fit`, such as
            :class:`~skmetavi.MetaBNNRegressor` or :class:`~skmetavi.MetaDivergenceVI`.
        log_t : array-like of shape (n_points,), default=None
            Grid of ``log t``; 200 points on ``[-6, 3]`` if None.
        align : bool, default=True
            See :meth:`from_divergence`.
        reference_alphas : array-like of float or None, default=(0.0, 0.5, 1.0)
            Rényi orders of the reference lines; None for none.
        %(kind)s
        name : str, default=None
            Legend label; ``"meta-learned <class name>"`` if None.
        ax : matplotlib Axes, default=None
            Axes to draw on; a new figure if None.
        %(style)s

        Returns
        -------
        display : DivergenceDisplay
            The plotted display.

        Raises
        ------
        sklearn.exceptions.NotFittedError
            If the estimator has not been meta-fitted.

        Examples
        --------
        >>> import matplotlib.pyplot as plt
        >>> from skmetavi import MetaDivergenceVI
        >>> from skmetavi.datasets import make_mog_tasks
        >>> from skmetavi.plotting import DivergenceDisplay
        >>> X, groups = make_mog_tasks(8, random_state=0)
        >>> est = MetaDivergenceVI("gaussian_mixture", divergence="renyi",
        ...                        inner_optimizer="sgd", max_meta_iter=10,
        ...                        random_state=0).meta_fit(X, groups=groups)
        >>> display = DivergenceDisplay.from_estimator(est, reference_alphas=[0.0, 1.0])
        >>> display.line_.get_label()
        'meta-learned Renyi (α = 0.538)'
        >>> plt.close(display.figure_)
        """
        caller = f"{cls.__name__}.from_estimator"
        if isinstance(estimator, Divergence):
            raise TypeError(
                f"{caller} takes an estimator; for a divergence use "
                f"{cls.__name__}.from_divergence({type(estimator).__name__}(...))."
            )
        divergence = _check_meta_fitted(estimator, "meta_divergence_", caller)
        if name is None:
            name = f"meta-learned {type(divergence).__name__}"
        return cls.from_divergence(
            divergence, log_t=log_t, align=align, reference_alphas=reference_alphas,
            kind=kind, name=name, ax=ax, line_kwargs=line_kwargs,
            reference_kwargs=reference_kwargs,
        )
