"""A minimal scikit-learn parameter protocol for torch-only objects."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from __future__ import annotations

import copy
import inspect


class ParamsMixin:
    """``get_params``/``set_params``/``__sklearn_clone__`` without importing sklearn.

    Objects that carry learned state (a meta-learned divergence) must survive
    :func:`sklearn.base.clone` unchanged, so cloning is a deep copy.
    """

    @classmethod
    def _get_param_names(cls):
        sig = inspect.signature(cls.__init__)
        return sorted(
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        )

    def get_params(self, deep=True):
        """Get the constructor parameters, as scikit-learn's ``get_params``.

        Parameters
        ----------
        deep : bool, default=True
            Accepted for compatibility with scikit-learn; these objects have no
            nested estimators, so it has no effect.

        Returns
        -------
        params : dict
            Parameter names mapped to their current values.
        """
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params):
        """Set constructor parameters by re-running the constructor's checks.

        Parameters
        ----------
        **params : dict
            New values of constructor parameters; the others keep their values.

        Returns
        -------
        self : object
            The object, rebuilt with the new parameters.
        """
        valid = self._get_param_names()
        for key in params:
            if key not in valid:
                raise ValueError(
                    f"Invalid parameter {key!r} for {type(self).__name__}; "
                    f"valid parameters are {valid}."
                )
        new = type(self)(**{**self.get_params(), **params})
        self.__dict__.update(new.__dict__)
        return self

    def __sklearn_clone__(self):
        return copy.deepcopy(self)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"
