"""LocalRenyi: the per-data-point alpha-energy (black-box alpha / power EP)."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import numpy as np
import pytest
import torch

from skmetavi import LocalRenyi, MetaBNNRegressor, MetaDivergenceVI
from skmetavi._bilevel import PredictiveNLL, Problem, inner_direction, inner_loop
from skmetavi._optim import SGD
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.divergences import KL, Renyi, make_divergence
from skmetavi.models import (
    BayesianLinearRegression,
    GaussianMean,
    MeanFieldGaussian,
)

DT = torch.float64


def _regression(n_tasks=2, rows=(6, 4), d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    Xs = [torch.randn(n, d, generator=g, dtype=DT) for n in rows[:n_tasks]]
    ys = [X @ torch.tensor([1.0, -0.5], dtype=DT) + 0.3 * torch.randn(len(X), generator=g, dtype=DT)
          for X in Xs]
    target = BayesianLinearRegression(noise_scale=0.5, prior_scale=2.0)
    problem = Problem(MeanFieldGaussian(d), target)
    params = problem.family.init_params(n_tasks, loc=0.2, scale=0.7, dtype=DT, device="cpu")
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    return problem, pad_tasks(Xs, ys), params


def test_alpha_one_is_kl_exactly():
    problem, tasks, params = _regression()
    eps = torch.randn(2, 9, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
    local, s_local = inner_direction(problem, LocalRenyi(1.0).to(DT), params, tasks, eps,
                                     create_graph=False)
    kl, s_kl = inner_direction(problem, KL(), params, tasks, eps, create_graph=False)
    for k in kl:
        torch.testing.assert_close(local[k], kl[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s_local.bound, s_kl.bound, rtol=1e-12, atol=1e-12)


def _reference_energy(problem, params, tasks, eps, alpha):
    """The Monte Carlo local energy per task, written out row by row (no masking tricks)."""
    z = problem.rsample(params, tasks, eps)
    log_lik = problem.log_likelihood(params, tasks, z)[:, 0]  # (M, K, n)
    rest = (problem.log_prior(params, tasks, z) - problem.log_q(params, tasks, z))[:, 0]
    c, K = 1 - alpha, eps.shape[1]
    energy = []
    for m in range(len(eps)):
        rows = torch.nonzero(tasks.mask[m]).flatten()  # the real rows only
        per_row = (torch.logsumexp(c * log_lik[m][:, rows], 0) - math.log(K)) / c
        energy.append(tasks.lik_scale[m] * per_row.sum() + rest[m].mean())
    return torch.stack(energy)


@pytest.mark.parametrize("batch_size", [None, 4], ids=["full-batch", "minibatch"])
def test_direction_is_the_gradient_of_the_local_energy_estimate(batch_size):
    """Two implementations: per-row weights times gradients (the engine) against autograd
    of the Monte Carlo local energy at the same reparameterised particles; padding ignored,
    and under minibatching each row counts N / batch times (lik_scale)."""
    from skmetavi._tasks import minibatch

    problem, tasks, params = _regression(rows=(10, 7))
    if batch_size is not None:
        tasks = minibatch(tasks, batch_size, torch.Generator().manual_seed(0))
        assert tasks.lik_scale.tolist() == [10 / 4, 7 / 4]
    div = LocalRenyi(0.4).to(DT)
    eps = torch.randn(2, 7, 2, generator=torch.Generator().manual_seed(2), dtype=DT)
    direction, stats = inner_direction(problem, div, params, tasks, eps, create_graph=False)
    energy = _reference_energy(problem, params, tasks, eps, div.alpha)
    grads = torch.autograd.grad(energy.sum(), list(params.values()))
    for k, g in zip(params, grads):
        torch.testing.assert_close(direction[k], g, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(stats.bound, energy.detach(), rtol=1e-10, atol=1e-10)


def test_local_energy_matches_its_closed_form_for_a_gaussian_mean():
    """Gaussian likelihood, Gaussian q: E_q[N(x|z, s^2)^b] = b^(-1/2) (2 pi s^2)^((1-b)/2)
    N(x | m, v + s^2 / b), so the energy and its gradient are known exactly."""
    sigma, prior = 1.0, 10.0
    x = torch.tensor([[0.3], [1.9], [-0.4], [2.5]], dtype=DT)
    problem = Problem(MeanFieldGaussian(1), GaussianMean(noise_scale=sigma, prior_scale=prior))
    loc = torch.tensor([[0.6]], dtype=DT, requires_grad=True)
    scale = 0.8
    alpha = 0.3
    b = 1 - alpha

    def closed_form(m):
        v = scale**2
        per_row = (-0.5 * math.log(b) + 0.5 * (1 - b) * math.log(2 * math.pi * sigma**2)
                   - 0.5 * math.log(2 * math.pi * (v + sigma**2 / b)) - (x[:, 0] - m) ** 2
                   / (2 * (v + sigma**2 / b)))
        kl = (math.log(prior / scale) + (v + m**2) / (2 * prior**2) - 0.5)
        return (per_row / b).sum() - kl

    params = problem.family.init_params(1, loc=0.6, scale=scale, dtype=DT, device="cpu")
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    eps = torch.randn(1, 200_000, 1, generator=torch.Generator().manual_seed(0), dtype=DT)
    direction, stats = inner_direction(problem, LocalRenyi(alpha).to(DT), params, pad_tasks([x]),
                                       eps, create_graph=False)
    m = loc[0, 0]
    exact = closed_form(m)
    (d_exact,) = torch.autograd.grad(exact, loc)
    assert float(stats.bound) == pytest.approx(float(exact.detach()), abs=5e-3)
    assert float(direction["loc"]) == pytest.approx(float(d_exact), rel=1e-2)


def test_alpha_meta_gradient_matches_finite_differences():
    problem, tasks, p0 = _regression()
    div = LocalRenyi(0.6).to(DT)
    loss = PredictiveNLL(n_particles=32)

    def objective():
        gen = torch.Generator().manual_seed(3)
        opt = SGD(0.05)
        p, _, _ = inner_loop(problem, div, opt, p0, opt.init(p0), tasks, n_steps=2,
                             n_particles=8, generator=gen)
        return loss(problem, p, tasks, generator=torch.Generator().manual_seed(4)).mean()

    (g,) = torch.autograd.grad(objective(), div.raw_alpha)
    h, old = 1e-5, float(div.raw_alpha.detach())
    div.raw_alpha.data.fill_(old + h)
    plus = float(objective().detach())
    div.raw_alpha.data.fill_(old - h)
    minus = float(objective().detach())
    div.raw_alpha.data.fill_(old)
    assert abs(float(g)) > 1e-6
    assert float(g) == pytest.approx((plus - minus) / (2 * h), rel=1e-5, abs=1e-9)


def test_weights_do_not_collapse_where_the_global_ones_do():
    """200 rows, 10 particles of a fitted BNN: Renyi(0.5)'s weights on the joint are one-hot
    (log weights spread over ~40 nats), each row's local weights are not (measured: effective
    sample size 1.005 against 9.75 of 10)."""
    X, y, _ = make_sinusoid_tasks(1, 200, random_state=0)
    est = MetaBNNRegressor("kl", max_iter=100, random_state=0).fit(X, y)
    model, params = est._model(1), est.variational_params_
    ys = (y - est._y_mean) / est._y_std
    tasks = pad_tasks([torch.tensor(X, dtype=torch.float32)],
                      [torch.tensor(ys, dtype=torch.float32)])
    with torch.no_grad():
        eps = model.sample_eps(params, tasks, 10, generator=torch.Generator().manual_seed(0))
        z = model.rsample(params, tasks, eps)
        log_w = (model.log_p(params, tasks, z) - model.log_q(params, tasks, z))[0, 0]  # (K,)
        per_row = model.log_likelihood(params, tasks, z)[0, 0].T  # (n, K)

        def ess(w):
            return float((1 / (w**2).sum(-1)).mean())

        assert ess(Renyi(0.5).particle_weights(log_w)) < 1.5
        assert ess(LocalRenyi(0.5).particle_weights(per_row)) > 8


def test_a_target_without_per_row_likelihood_is_refused():
    X, g = make_mog_tasks(2, random_state=0)
    with pytest.raises(TypeError, match=r"LocalRenyi weights each likelihood term separately.*"
                                        r"has_likelihood=True"):
        MetaDivergenceVI("gaussian_mixture", divergence="local_renyi", max_iter=2).fit(X[g == 0])


def test_meta_learning_moves_alpha_from_kl():
    """Started at alpha = 1 (standard VI), the BNN's local alpha gets a gradient and moves."""
    X, y, g = make_sinusoid_tasks(8, 200, random_state=0)
    est = MetaBNNRegressor(LocalRenyi(1.0), max_meta_iter=30, batch_size=50, random_state=0)
    est.meta_fit(X, y, groups=g)
    assert abs(est.meta_divergence_.alpha - 1.0) > 0.02
    assert np.isfinite(est.meta_loss_curve_).all()


def test_by_name():
    assert isinstance(make_divergence("local_renyi"), LocalRenyi)
    assert isinstance(make_divergence("local_renyi"), Renyi)  # same parameterisation of alpha


def test_joint_only_uses_are_refused():
    """The local energy is not a function of the joint log weights."""
    with pytest.raises(TypeError, match=r"LocalRenyi.surrogate is not defined on the joint"):
        LocalRenyi()(torch.zeros(3), torch.zeros(3))
    with pytest.raises(TypeError, match=r"LocalRenyi.bound is not defined on the joint"):
        LocalRenyi().bound(torch.zeros(3), torch.zeros(3))


def test_meta_fit_refuses_a_model_without_likelihood_before_any_work():
    X, g = make_mog_tasks(4, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence=LocalRenyi(1.0), max_meta_iter=2)
    with pytest.raises(TypeError, match=r"one global latent and a per-row likelihood"):
        est.meta_fit(X, groups=g)
    assert not hasattr(est, "meta_divergence_")
