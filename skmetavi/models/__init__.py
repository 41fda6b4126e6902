"""Variational families and target models (torch-only, functional, batched over tasks)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from skmetavi.models._bnn import BNNRegression
from skmetavi.models._linear_gaussian import LinearGaussianLatent
from skmetavi.models._module_bnn import ModuleBNNRegression
from skmetavi.models._protocol import GlobalLatent, LatentModel
from skmetavi.models._partial_vae import PartialVAELatent
from skmetavi.models._vae import VAELatent
from skmetavi.models._families import (
    FAMILY_NAMES,
    FullCovarianceGaussian,
    MeanFieldGaussian,
    make_family,
)
from skmetavi.models._targets import (
    TARGET_NAMES,
    BayesianLinearRegression,
    CallableTarget,
    GaussianMean,
    GaussianMixture1D,
    Target,
    make_target,
)

__all__ = [
    "FAMILY_NAMES",
    "TARGET_NAMES",
    "BNNRegression",
    "BayesianLinearRegression",
    "CallableTarget",
    "FullCovarianceGaussian",
    "GaussianMean",
    "GaussianMixture1D",
    "GlobalLatent",
    "LatentModel",
    "LinearGaussianLatent",
    "MeanFieldGaussian",
    "ModuleBNNRegression",
    "PartialVAELatent",
    "Target",
    "VAELatent",
    "make_family",
    "make_target",
]
