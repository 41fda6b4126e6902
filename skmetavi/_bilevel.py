"""The bilevel engine, in one import: inner VI steps, meta-losses, Algorithms 1 and 2.

The engine is torch in, torch out, and sees models only through the
:class:`~skmetavi.models.LatentModel` protocol (``Problem`` is the adapter of a
variational family and a target, :class:`~skmetavi.models.GlobalLatent`).  Its
parts live in single-purpose modules:

- :mod:`skmetavi._inner`: the inner level (directions, steps, plain VI with
  rollback);
- :mod:`skmetavi._meta_losses`: the meta-losses J;
- :mod:`skmetavi._strategies`: Algorithm 1 (per-task phi_i) and Algorithm 2
  (learned initialisation);
- :mod:`skmetavi._trainer`: the outer loop;
- :mod:`skmetavi._implicit`: implicit meta-gradients (GMRES on the adjoint system);
- :mod:`skmetavi._distributed`: ``torch.distributed`` sharding.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

from skmetavi._inner import (
    GRADIENT_MODES,
    NonFiniteError,
    StepStats,
    VIRun,
    inner_direction,
    inner_loop,
    inner_step,
    run_vi,
)
from skmetavi._meta_losses import CallableMetaLoss, NegativeEvidence, PredictiveNLL, QuadratureLoss
from skmetavi._trainer import MetaTrainer
from skmetavi.models._protocol import GlobalLatent

#: The adapter of a variational family and a target (one global latent per task).
Problem = GlobalLatent

__all__ = [
    "GRADIENT_MODES",
    "CallableMetaLoss",
    "GlobalLatent",
    "MetaTrainer",
    "NegativeEvidence",
    "NonFiniteError",
    "PredictiveNLL",
    "Problem",
    "QuadratureLoss",
    "StepStats",
    "VIRun",
    "inner_direction",
    "inner_loop",
    "inner_step",
    "run_vi",
]
