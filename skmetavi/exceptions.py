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


def _warn_at_caller(message, category):
    """``warnings.warn`` attributed to the user's line: the first frame outside skmetavi.

    Frames of skmetavi and of scikit-learn (``_fit_context``, ``cross_validate``)
    are skipped, so that the warning names the user's call however deep the
    training code that raises it is.
    """
    import os
    import sys
    import warnings

    import sklearn

    skipped = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep
                    for m in (sys.modules[__name__.rpartition(".")[0]], sklearn))
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(skipped):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
