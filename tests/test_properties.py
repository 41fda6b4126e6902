"""Property-based tests (hypothesis): divergence weights and estimator outputs stay finite.

Every property runs twice: with the current hypothesis profile (``fast``, a few
dozen examples, in the default run) and, marked ``slow``, with the ``slow``
profile (>= 300 examples): ``pytest -m slow tests/test_properties.py``.  The
profiles are registered in ``tests/conftest.py``.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import KL, FDivergence, NeuralF, Renyi, TailAdaptive

BUDGETS = [
    pytest.param(None, id="fast"),
    pytest.param("slow", id="slow", marks=pytest.mark.slow),
]


def run(prop, budget):
    """Run the ``@given`` function ``prop`` with the profile ``budget`` (None: current)."""
    profile = settings() if budget is None else settings.get_profile(budget)
    settings(profile)(prop)()


# ------------------------------------------------------------------ strategies
def _neural_f(seed, sizes, activation, scale, normalize):
    """A NeuralF whose every weight is random (seeded), not the alpha-family start."""
    with torch.random.fork_rng(devices=[]):  # nn.Linear draws from the global RNG
        div = NeuralF(sizes, activation=activation, normalize=normalize)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in div.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return div


def neural_f(normalize=True):
    return st.builds(
        _neural_f,
        seed=st.integers(0, 2**31 - 1),
        sizes=st.sampled_from([(), (4,), (8, 4)]),
        activation=st.sampled_from(["tanh", "softplus", "elu", "relu"]),
        scale=st.floats(0.1, 3.0),
        normalize=st.just(normalize),
    )


NORMALISED = st.one_of(
    st.just(KL()),
    st.floats(1e-6, 1e3).map(lambda alpha: Renyi(alpha, learnable=False)),
    st.floats(-5.0, 5.0).map(FDivergence),
    neural_f(),
    st.floats(-10.0, -0.01).map(TailAdaptive),
)
UNNORMALISED = st.one_of(
    st.floats(-5.0, 5.0).map(lambda a: FDivergence(a, normalize=False)),
    neural_f(normalize=False),
)
# Log-weights up to the +-1e4 of wildly mismatched q and p; 1 to 3 tasks of 1 to 64 particles.
SHAPES = st.tuples(st.integers(1, 3), st.integers(1, 64))
LOG_W = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False)


def log_weights(dtype=np.float64):
    return arrays(dtype, SHAPES, elements=LOG_W.map(lambda v: float(dtype(v)))).map(
        torch.from_numpy
    )


# ---------------------------------------------------------- divergence weights
@pytest.mark.parametrize("budget", BUDGETS)
def test_weights_are_a_probability_vector(budget):
    """Finite, non-negative, summing to one over the particles, in float32 and float64."""

    @given(div=NORMALISED, log_w=st.one_of(log_weights(np.float64), log_weights(np.float32)))
    def prop(div, log_w):
        with torch.no_grad():
            w = div.particle_weights(log_w)
        assert w.shape == log_w.shape and w.dtype == log_w.dtype
        assert torch.isfinite(w).all() and (w >= 0).all()
        atol = 1e-5 if log_w.dtype == torch.float32 else 1e-10
        torch.testing.assert_close(w.sum(-1), torch.ones_like(w[..., 0]), rtol=0, atol=atol)

    run(prop, budget)


# Multiples of 2**-10 up to 1e4: l + c is then exact in float64, so a shift cannot merge
# two log-weights by rounding (which would change TailAdaptive's ranks, legitimately).
DYADIC = st.integers(-10**4 * 2**10, 10**4 * 2**10).map(lambda k: k / 2**10)


@pytest.mark.parametrize("budget", BUDGETS)
def test_weights_invariant_to_a_constant_shift(budget):
    """``w(l + c) = w(l)``: only density *ratios* matter (float64)."""

    @given(
        div=NORMALISED,
        log_w=arrays(np.float64, SHAPES, elements=DYADIC).map(torch.from_numpy),
        shift=DYADIC,
    )
    def prop(div, log_w, shift):
        with torch.no_grad():
            w0, w1 = div.particle_weights(log_w), div.particle_weights(log_w + shift)
        # atol: Renyi rounds (1 - alpha) * l (~1e-12 at |l| ~ 1e4), times |1 - alpha| <= 1e3.
        torch.testing.assert_close(w1, w0, rtol=0, atol=1e-6)

    run(prop, budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_unnormalised_f_weights_finite_and_non_negative(budget):
    @given(div=UNNORMALISED, log_w=log_weights())
    def prop(div, log_w):
        with torch.no_grad():
            w = div.particle_weights(log_w)
        assert torch.isfinite(w).all() and (w >= 0).all()

    run(prop, budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_bounds_finite(budget):
    """The monitoring bound (ELBO, VR bound) is finite for finite log-weights."""

    @given(div=st.one_of(NORMALISED, UNNORMALISED), log_w=log_weights())
    def prop(div, log_w):
        with torch.no_grad():
            assert torch.isfinite(div.bound(log_w, torch.zeros_like(log_w))).all()

    run(prop, budget)


# ------------------------------------------------------------- estimator outputs
@pytest.fixture(scope="module")
def bnn():
    """A tiny float32 BNN, fitted once."""
    X, y, _ = make_sinusoid_tasks(1, 30, random_state=0)
    return MetaBNNRegressor(
        hidden_layer_sizes=(8,), n_particles=4, n_predict_samples=8, max_iter=30, random_state=0
    ).fit(X, y)


def inputs(elements, n_features=1):
    return arrays(np.float64, st.tuples(st.integers(1, 16), st.just(n_features)), elements=elements)


FLOAT32_RANGE = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([1e30, -1e30, 3.4e38, -3.4e38, 1e-45, 0.0]),
)
FLOAT64_RANGE = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e30, -1e30, 1e100, -1e300, np.finfo(np.float64).max]),
)


@pytest.mark.parametrize("budget", BUDGETS)
def test_bnn_predictions_finite_within_float32_range(bnn, budget):
    """Any input within the float32 range (the estimator's dtype), however far out."""

    @given(X=inputs(FLOAT32_RANGE))
    def prop(X):
        mean, std = bnn.predict(X, return_std=True)
        assert np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
        assert np.isfinite(bnn.sample_y(X, 2)).all()
        assert np.isfinite(bnn.log_predictive_density(X, np.zeros(X.shape[0]))).all()

    run(prop, budget)


@pytest.mark.parametrize("budget", BUDGETS)
def test_bnn_predictions_finite_or_clear_error_within_float64_range(bnn, budget):
    """Beyond float32: finite predictions, or a clear error once float64 overflows too."""

    @given(X=inputs(FLOAT64_RANGE))
    def prop(X):
        try:
            mean, std = bnn.predict(X, return_std=True)
        except ValueError as exc:
            assert "overflow even in float64" in str(exc) and "Rescale the inputs" in str(exc)
            assert np.abs(X).max() > 1e100  # the error is reserved for absurd inputs
        else:
            assert np.isfinite(mean).all() and np.isfinite(std).all()

    run(prop, budget)


@pytest.fixture(scope="module", params=["mean_field", "full_covariance"])
def fitted_vi(request):
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(20, 2))
    return MetaDivergenceVI(
        family=request.param, max_iter=50, n_particles=8, dtype="float32", random_state=0
    ).fit(X)


@pytest.mark.parametrize("budget", BUDGETS)
def test_score_samples_finite_for_finite_points(fitted_vi, budget):
    """log q(z) is finite (and at most its value at the mean) for every finite z."""
    peak = fitted_vi.score_samples(fitted_vi.mean_[None, :])[0]

    @given(Z=inputs(FLOAT64_RANGE, n_features=2))
    def prop(Z):
        log_q = fitted_vi.score_samples(Z)
        assert log_q.shape == (Z.shape[0],)
        assert np.isfinite(log_q).all()
        assert (log_q <= peak + 1e-6).all()

    run(prop, budget)
