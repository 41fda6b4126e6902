"""Implicit meta-gradients: GMRES on the adjoint system, against dense solves."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import warnings

import numpy as np
import pytest
import torch

from skmetavi import MetaBNNRegressor
from skmetavi._bilevel import MetaTrainer, PredictiveNLL, Problem, inner_direction
from skmetavi._implicit import gmres, implicit_meta_gradient
from skmetavi._optim import SGD
from skmetavi._tasks import TaskNoise, pad_tasks
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import NeuralF, Renyi
from skmetavi.models import BNNRegression, GaussianMean, MeanFieldGaussian

DT = torch.float64


def _batched_matvec(A):
    """A (M, n, n) as a matvec on [(M, n)] lists, the form gmres takes."""
    return lambda v: [torch.einsum("mij,mj->mi", A, v[0])]


@pytest.mark.parametrize("restart", [40, 7], ids=["no-restart", "restarted"])
def test_gmres_solves_nonsymmetric_batched_systems(restart):
    g = torch.Generator().manual_seed(0)
    n = 30
    A = torch.eye(n, dtype=DT) * 3 + torch.randn(4, n, n, generator=g, dtype=DT) / math.sqrt(n)
    b = torch.randn(4, n, generator=g, dtype=DT)
    (x,), res, n_iter = gmres(_batched_matvec(A), [b], max_iter=300, restart=restart, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert float(res.max()) < 1e-11 and n_iter <= 300


def test_gmres_happy_breakdown_and_zero_rhs():
    A = torch.eye(5, dtype=DT).repeat(3, 1, 1) * torch.tensor([1.0, 2.0, 3.0], dtype=DT).reshape(3, 1, 1)
    b = torch.randn(3, 5, dtype=DT)
    b[1] = 0.0
    (x,), res, n_iter = gmres(_batched_matvec(A), [b], max_iter=50, tol=1e-12)
    torch.testing.assert_close(x, b / torch.tensor([1.0, 2.0, 3.0], dtype=DT).reshape(3, 1))
    assert torch.isfinite(res).all() and n_iter <= 3


def test_gmres_with_tasks_that_break_down_at_different_steps():
    """One task solved at once (a multiple of I), another needing many Krylov vectors."""
    g = torch.Generator().manual_seed(2)
    n = 12
    A = torch.stack([2.0 * torch.eye(n, dtype=DT),
                     torch.eye(n, dtype=DT) * 3 + torch.randn(n, n, generator=g, dtype=DT) / 3])
    b = torch.randn(2, n, generator=g, dtype=DT)
    (x,), res, _ = gmres(_batched_matvec(A), [b], max_iter=40, restart=5, tol=1e-12)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert float(res.max()) < 1e-11


def test_gmres_reports_an_unconverged_residual():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(1, 40, 40, generator=g, dtype=DT)
    b = torch.randn(1, 40, generator=g, dtype=DT)
    _, res, n_iter = gmres(_batched_matvec(A), [b], max_iter=5, tol=1e-12)
    assert n_iter == 6 and float(res[0]) > 1e-3  # 5 steps + the residual's product


def _bnn_problem(seed=0):
    """A 1-8-2 BNN (noise head): 34 weights, 68 variational parameters per task."""
    target = BNNRegression(hidden_layer_sizes=(8,), activation="tanh")
    model = Problem(MeanFieldGaussian(target.n_latent(1)), target)
    X, y, g = make_sinusoid_tasks(2, 40, random_state=seed)
    y = (y - y.mean()) / y.std()
    Xs = [torch.as_tensor(X[g == i], dtype=DT) for i in range(2)]
    ys = [torch.as_tensor(y[g == i], dtype=DT) for i in range(2)]
    support = pad_tasks([x[:20] for x in Xs[:1]], [v[:20] for v in ys[:1]])
    query = pad_tasks([x[20:] for x in Xs[:1]], [v[20:] for v in ys[:1]])
    params = model.family.init_params(1, scale=0.3, dtype=DT, device="cpu")
    params["loc"] = target.init_loc(1, 1, generator=torch.Generator().manual_seed(seed), dtype=DT,
                                    device="cpu")
    return model, support, query, params


INNER_SEED, LOSS_SEED = 11, 12


def _noise(seed):
    return TaskNoise(seed, 1, torch.arange(1), fixed=True)


def _dense_reference(model, div, params, support, query, K, eta):
    """dJ/d eta = -b^T H^-1 dg/d eta with H = dg/dphi built densely (one task)."""
    keys = list(params)
    shapes = [params[k].shape for k in keys]
    sizes = [params[k].numel() for k in keys]

    def unflat(flat):
        return {k: p.reshape(s) for k, p, s in zip(keys, flat.split(sizes), shapes)}

    phi0 = torch.cat([params[k].reshape(-1) for k in keys]).detach()
    eps = model.sample_eps(params, support, K, generator=_noise(INNER_SEED))

    def g_flat(flat):
        d, _ = inner_direction(model, div, unflat(flat), support, eps, create_graph=True)
        return torch.cat([d[k].reshape(-1) for k in keys])

    H = torch.autograd.functional.jacobian(g_flat, phi0)
    phi = phi0.clone().requires_grad_(True)
    J = PredictiveNLL(K)(model, unflat(phi), query, generator=_noise(LOSS_SEED)).sum()
    (b,) = torch.autograd.grad(J, phi)
    x = torch.linalg.solve(H.T, b)
    (dg,) = torch.autograd.grad(g_flat(phi), eta, grad_outputs=x)
    return -dg, float(torch.linalg.cond(H))


@pytest.mark.parametrize("divergence", [lambda: Renyi(0.7), lambda: NeuralF((4,), init_alpha=0.7)],
                         ids=["renyi", "neural_f"])
def test_implicit_gradient_matches_a_dense_solve_on_a_bnn(divergence):
    """The audit's case: a small BNN whose H is ill-conditioned; GMRES meets the dense solve."""
    model, support, query, params = _bnn_problem()
    div = divergence().to(DT)
    if isinstance(div, NeuralF):
        with torch.no_grad():
            div.mlp[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
        eta = div.skip.weight
    else:
        eta = div.raw_alpha
    # 2e-3 is at the edge of SGD's stability for the neural f (curvature ~1e3): on some CPUs
    # the 300 inner steps diverge (|phi| ~ 1e8) and there is no fixed point to differentiate.
    opt, K = SGD(1.5e-3), 8
    J, phi_B, _, ok, residual = implicit_meta_gradient(
        model, div, opt, PredictiveNLL(K), params, opt.init(params), support, query,
        n_steps=300, n_particles=K, inner_noise=_noise(INNER_SEED),
        loss_noise=_noise(LOSS_SEED), M=1, max_iter=300, tol=1e-10, damping=0.0,
    )
    assert ok and float(residual[0]) < 1e-8
    got = eta.grad.detach().clone()
    ref, cond = _dense_reference(model, div, phi_B, support, query, K, eta)
    assert cond > 1e3  # an ill-conditioned inner problem, as in the audit
    torch.testing.assert_close(got.reshape(-1), ref.reshape(-1), rtol=1e-3, atol=0)


def test_implicit_fixed_point_uses_the_inner_noise():
    """The inner loop runs on one fixed noise draw and g is evaluated on it: g(phi_B) -> 0.

    On another draw of the noise the end of the loop is no fixed point at all.
    """
    model = Problem(MeanFieldGaussian(2), GaussianMean())
    X = torch.randn(2, 15, 2, generator=torch.Generator().manual_seed(0), dtype=DT) + 1.0
    tasks = pad_tasks(list(X))
    params = model.family.init_params(2, scale=1.0, dtype=DT, device="cpu")
    div, opt, rows = Renyi(0.7).to(DT), SGD(0.02), torch.arange(2)
    # 64 particles: with alpha < 1 and very few fixed particles the sample-average problem
    # has no maximum (q's scale grows without bound; K = 8 here).
    _, phi, _, ok, _ = implicit_meta_gradient(
        model, div, opt, PredictiveNLL(8), params, opt.init(params), tasks, tasks,
        n_steps=2000, n_particles=64, inner_noise=TaskNoise(3, 2, rows, fixed=True),
        loss_noise=TaskNoise(4, 2, rows), M=2, max_iter=20, tol=1e-10, damping=0.0,
    )
    assert ok
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}

    def g_norm(noise):
        eps = model.sample_eps(phi, tasks, 64, generator=noise)
        g, _ = inner_direction(model, div, leaves, tasks, eps, create_graph=False)
        return float(torch.cat([v.reshape(-1) for v in g.values()]).norm())

    assert g_norm(TaskNoise(3, 2, rows, fixed=True)) < 1e-8
    assert g_norm(TaskNoise(5, 2, rows, fixed=True)) > 1e-2


def test_unconverged_implicit_solve_warns_once():
    model, support, query, params = _bnn_problem()
    div = Renyi(0.7).to(DT)
    tr = MetaTrainer(
        model, div, SGD(2e-3), PredictiveNLL(8), support, query, init_params=params,
        learn_init=False, n_inner_steps=5, n_particles=8, mode="implicit", implicit_steps=2,
        implicit_tol=1e-10, generator=torch.Generator().manual_seed(0),
    )
    with pytest.warns(RuntimeWarning, match=r"relative residual of .* implicit_max_iter=2"):
        tr.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr.step()  # once per trainer
    assert len(tr.implicit_residuals) == 2 and tr.implicit_residuals[0] > 1e-8


def test_estimator_exposes_the_implicit_solver():
    X, y, g = make_sinusoid_tasks(4, 30, random_state=0)
    est = MetaBNNRegressor(
        "renyi", hidden_layer_sizes=(8,), n_particles=4, meta_gradient="implicit",
        n_inner_steps=20, implicit_max_iter=300, implicit_tol=1e-4, implicit_damping=1e-6,
        max_meta_iter=3, dtype="float64", random_state=0,
    ).meta_fit(X, y, groups=g)
    assert np.isfinite(est.meta_loss_curve_).all()
    with pytest.raises(ValueError, match="implicit.*batch_size=8 draws another minibatch"):
        MetaBNNRegressor("renyi", meta_gradient="implicit", batch_size=8).meta_fit(X, y, groups=g)
