"""Warnings raised by skmetavi."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

__all__ = ["NoMetaLearningWarning"]


class NoMetaLearningWarning(UserWarning):
    """A workflow that was expected to meta-learn did not.

    Raised when rows of several tasks reach a single-task ``fit`` (they are
    pooled and no divergence is learned), or when a task-level wrapper is
    fitted without ``groups``.  Filter it, e.g. with
    ``warnings.filterwarnings("ignore", category=NoMetaLearningWarning)``,
    where fitting one pooled task is intended.

    See Also
    --------
    skmetavi.model_selection.TaskAdaptiveEstimator : Meta-trains on the tasks in ``groups``.

    Examples
    --------
    >>> import warnings
    >>> from skmetavi.exceptions import NoMetaLearningWarning
    >>> issubclass(NoMetaLearningWarning, UserWarning)
    True
    """
