"""Visualisations in scikit-learn's Display style: divergences, predictions, training curves.

Each display is built by a ``from_estimator`` (or ``from_divergence`` /
``from_history``) class method that computes what to draw, stores it and calls
:meth:`plot`; ``plot(ax=None, ...)`` draws into an Axes (a new figure if None)
and returns the display, whose ``ax_``, ``figure_`` and artists (``line_``,
...) can then be styled.  matplotlib is imported only when plotting.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from skmetavi.plotting._divergence import DivergenceDisplay
from skmetavi.plotting._history import TrainingHistoryDisplay
from skmetavi.plotting._predictive import PredictiveDisplay

__all__ = ["DivergenceDisplay", "PredictiveDisplay", "TrainingHistoryDisplay"]
