"""Pipelines whose final step is meta-trained: ``meta_fit`` on transformed tasks.

A :class:`~sklearn.pipeline.Pipeline` has no ``meta_fit``.  :class:`MetaPipeline`
adds it: the transformers are fitted on the training tasks' rows and the final
step is meta-trained on the transformed rows.  A meta-trained pipeline's
``fit`` then adapts the final step to a new task *in the training tasks'
transformed space*: it does not refit the transformers (a learned
initialisation is a model of rows scaled as the training tasks were).
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from sklearn.pipeline import Pipeline, make_pipeline

from skmetavi._task_adaptive import split_final_step

__all__ = ["MetaPipeline", "make_meta_pipeline"]


class MetaPipeline(Pipeline):
    """A Pipeline with ``meta_fit``: transformers fitted on the training tasks, final step meta-trained.

    ``meta_fit(X, y, groups)`` fits every transformer on all rows of the
    training tasks (``fit_transform``) and calls the final step's
    ``meta_fit`` on the transformed rows.  Afterwards :meth:`fit` adapts the
    final step to one new task, transforming its rows with the transformers
    fitted by ``meta_fit`` (which are not refitted); before any ``meta_fit``
    it is ``Pipeline.fit``.  :func:`sklearn.base.clone` drops all fitted and
    meta-learned state, as for any estimator.

    Parameters
    ----------
    steps : list of tuple
        ``(name, estimator)`` pairs; the last estimator needs ``meta_fit``
        (e.g. :class:`~skmetavi.MetaBNNRegressor`).
    transform_input : list of str, default=None
        See :class:`sklearn.pipeline.Pipeline`.
    memory : str or object with the joblib.Memory interface, default=None
        See :class:`sklearn.pipeline.Pipeline`.
    verbose : bool, default=False
        See :class:`sklearn.pipeline.Pipeline`.

    Attributes
    ----------
    named_steps : :class:`~sklearn.utils.Bunch`
        The steps by name.

    See Also
    --------
    make_meta_pipeline : Build one from estimators, naming the steps.
    skmetavi.model_selection.TaskAdaptiveRegressor : Cross-validates pipelines over tasks.

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skmetavi import MetaBNNRegressor
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> from skmetavi.pipeline import make_meta_pipeline
    >>> X, y, groups = make_sinusoid_tasks(4, 30, random_state=0)
    >>> pipe = make_meta_pipeline(
    ...     StandardScaler(), MetaBNNRegressor(hidden_layer_sizes=(8,), max_meta_iter=3,
    ...                                        random_state=0))
    >>> pipe = pipe.meta_fit(X, y, groups)
    >>> X_new, y_new, _ = make_sinusoid_tasks(1, 10, random_state=1)
    >>> pipe.fit(X_new, y_new).predict(X_new).shape
    (10,)
    """

    def meta_fit(self, X, y=None, groups=None, **meta_fit_params):
        """Fit the transformers on the training tasks; meta-train the final step.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Rows of all training tasks.
        y : array-like of shape (n_samples,), default=None
            Targets, for estimators that use them.
        groups : array-like of shape (n_samples,)
            Task label of each row.
        **meta_fit_params : dict
            Passed to the final step's ``meta_fit`` (e.g. ``checkpoint``).

        Returns
        -------
        self : object
            The pipeline, transformers fitted, final step meta-trained.
        """
        transformers, final = split_final_step(self)
        if not hasattr(final, "meta_fit"):
            raise TypeError(
                f"MetaPipeline.meta_fit needs a final step with meta_fit, got "
                f"{type(final).__name__}; end the pipeline with a skmetavi estimator."
            )
        Xt = X if transformers is None else transformers.fit_transform(X, y)
        final.meta_fit(Xt, y, groups=groups, **meta_fit_params)
        return self

    def _meta_trained(self):
        return hasattr(split_final_step(self)[1], "meta_divergence_")

    def fit(self, X, y=None, **params):
        """Adapt the final step to one task (after ``meta_fit``), or ``Pipeline.fit``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            The task's rows.
        y : array-like of shape (n_samples,), default=None
            Targets, for estimators that use them.
        **params : dict
            ``Pipeline.fit`` parameters; after ``meta_fit``, passed to the
            final step's ``fit``.

        Returns
        -------
        self : object
            The fitted pipeline.
        """
        if not self._meta_trained():
            return super().fit(X, y, **params)
        transformers, final = split_final_step(self)
        Xt = X if transformers is None else transformers.transform(X)
        final.fit(Xt, y, **params)
        return self


def make_meta_pipeline(*steps, memory=None, transform_input=None, verbose=False):
    """Build a :class:`MetaPipeline`, naming the steps as :func:`sklearn.pipeline.make_pipeline`.

    The steps are named after their lower-cased class names; the last one
    must have ``meta_fit`` when :meth:`MetaPipeline.meta_fit` is called.

    Parameters
    ----------
    *steps : list of estimators
        Transformers, then an estimator with ``meta_fit``.
    memory : str or object with the joblib.Memory interface, default=None
        See :class:`sklearn.pipeline.Pipeline`.
    transform_input : list of str, default=None
        See :class:`sklearn.pipeline.Pipeline`.
    verbose : bool, default=False
        See :class:`sklearn.pipeline.Pipeline`.

    Returns
    -------
    pipeline : MetaPipeline
        The pipeline.

    See Also
    --------
    MetaPipeline : The class built.

    Examples
    --------
    >>> from sklearn.preprocessing import StandardScaler
    >>> from skmetavi import MetaBNNRegressor
    >>> from skmetavi.pipeline import make_meta_pipeline
    >>> make_meta_pipeline(StandardScaler(), MetaBNNRegressor()).steps[0][0]
    'standardscaler'
    """
    steps = make_pipeline(*steps).steps
    return MetaPipeline(steps, memory=memory, transform_input=transform_input, verbose=verbose)
