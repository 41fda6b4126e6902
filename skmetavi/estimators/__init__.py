"""scikit-learn estimators built on the bilevel engine."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from skmetavi.estimators._bnn import MetaBNNRegressor
from skmetavi.estimators._divergence_vi import MetaDivergenceVI
from skmetavi.estimators._partial_vae import MetaPartialVAE
from skmetavi.estimators._vae import MetaVAE

__all__ = ["MetaBNNRegressor", "MetaDivergenceVI", "MetaPartialVAE", "MetaVAE"]
