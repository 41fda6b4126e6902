"""skmetavi: meta-learned divergences for variational inference, with a scikit-learn API."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from skmetavi._allocator import tune_allocator
from skmetavi.divergences import KL, FDivergence, LocalRenyi, NeuralF, Renyi, TailAdaptive
from skmetavi.estimators import MetaBNNRegressor, MetaDivergenceVI, MetaPartialVAE, MetaVAE
from skmetavi.model_selection import (
    TaskAdaptiveEstimator,
    TaskAdaptiveImputer,
    TaskAdaptiveRegressor,
)
from skmetavi.pipeline import MetaPipeline, make_meta_pipeline

__version__ = "0.1.0.dev0"

__all__ = [
    "KL",
    "FDivergence",
    "LocalRenyi",
    "MetaBNNRegressor",
    "MetaDivergenceVI",
    "MetaPartialVAE",
    "MetaPipeline",
    "MetaVAE",
    "NeuralF",
    "Renyi",
    "TailAdaptive",
    "TaskAdaptiveEstimator",
    "TaskAdaptiveImputer",
    "TaskAdaptiveRegressor",
    "make_meta_pipeline",
    "tune_allocator",
    "__version__",
]
