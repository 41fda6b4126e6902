"""Inner optimisers: Adam's warm second moment, and the meta-gradient it lets through."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import warnings

import numpy as np
import pytest
import torch

from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi._bilevel import MetaTrainer, Problem, QuadratureLoss
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.divergences import Renyi
from skmetavi.models import GaussianMixture1D, MeanFieldGaussian

DT = torch.float64


def test_cold_adam_is_unchanged_and_its_first_step_is_a_sign_step():
    p = {"w": torch.tensor([[1.0, -2.0, 3.0]], dtype=DT)}
    g = {"w": torch.tensor([[1e-3, -5.0, 40.0]], dtype=DT)}
    opt = Adam(0.1)
    new, state = opt.update(p, g, opt.init(p))
    torch.testing.assert_close(new["w"] - p["w"], 0.1 * torch.sign(g["w"]), rtol=1e-4, atol=0)
    assert float(state["v_count"]["w"][0]) == 1.0


def test_warm_second_moment_makes_the_first_step_linear_in_the_direction():
    p = {"w": torch.zeros(1, 3, dtype=DT)}
    v0 = {"w": torch.tensor([[4.0, 1.0, 0.25]], dtype=DT)}
    opt = Adam(0.1)
    g = {"w": torch.tensor([[1.0, -0.5, 0.2]], dtype=DT, requires_grad=True)}
    new, _ = opt.update(p, g, opt.init(p, warm=v0))
    # No bias correction of a warm v: lr * g / sqrt(beta2 v0 + (1 - beta2) g^2).
    expected = 0.1 * g["w"] / torch.sqrt(0.999 * v0["w"] + 0.001 * g["w"] ** 2)
    torch.testing.assert_close(new["w"], expected)
    (dg,) = torch.autograd.grad(new["w"].sum(), g["w"])
    assert bool((dg > 0.9 * 0.1 / torch.sqrt(v0["w"])).all())  # not ~0 as from a cold start


def test_warm_second_moment_scales_up_to_a_task_with_larger_directions():
    """A task with 10x the directions (10x the data) takes Adam-sized steps, not 10x ones."""
    p = {"w": torch.zeros(1, 4, dtype=DT)}
    v0 = {"w": torch.ones(1, 4, dtype=DT)}
    opt = Adam(0.1)
    g = {"w": torch.full((1, 4), 10.0, dtype=DT)}
    new, _ = opt.update(p, g, opt.init(p, warm=v0))
    assert float(new["w"].abs().max()) <= 0.1 * (1 + 1e-9)
    small = {"w": torch.full((1, 4), 0.1, dtype=DT)}
    new, _ = opt.update(p, small, opt.init(p, warm=v0))
    torch.testing.assert_close(new["w"], torch.full((1, 4), 0.01, dtype=DT), rtol=1e-3, atol=0)


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_warm_statistics_are_the_mean_squared_directions_of_the_steps(warm):
    opt = Adam(0.01)
    p = {"w": torch.zeros(2, 3, dtype=DT)}
    v0 = {"w": torch.full((1, 3), 7.0, dtype=DT)} if warm else None
    state = opt.init(p, warm=v0)
    g = torch.Generator().manual_seed(0)
    dirs = [torch.randn(2, 3, generator=g, dtype=DT) * 1e-2 for _ in range(4)]  # below v0
    for d in dirs:
        p, state = opt.update(p, {"w": d}, state)
    sums = opt.warm_statistics(state, v0)["w"]
    b2, n = 0.999, len(dirs)
    weights = torch.tensor([(1 - b2) * b2 ** (n - 1 - j) for j in range(n)], dtype=DT) / (1 - b2**n)
    expected = sum(w * d**2 for w, d in zip(weights, dirs)).sum(0, keepdim=True)
    torch.testing.assert_close(sums, expected, rtol=1e-6, atol=1e-12)


def _mog_trainer(optimizer):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    mog = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)
    tasks = pad_tasks([mog + torch.tensor([0.0, 0.4 * s, 0.0], dtype=DT) for s in range(6)])
    return MetaTrainer(
        problem, Renyi(0.5).to(DT), optimizer, QuadratureLoss("renyi", 0.5, -10, 20, 401),
        tasks, tasks, init_params=problem.family.init_params(6, dtype=DT, device="cpu"),
        learn_init=True, n_inner_steps=1, n_particles=32, n_tasks_per_batch=4,
        generator=torch.Generator().manual_seed(0),
    )


def test_algorithm2_adam_from_the_learned_preconditioner_gives_eta_a_meta_gradient():
    """Non-regression (audit): a fresh Adam's first step is lr * sign(g), so with B = 1
    Algorithm 2 gave d J / d raw_alpha = 1e-17 at every outer step.  From the second
    outer step on, every task's Adam starts from the preconditioner of the earlier ones."""
    tr = _mog_trainer(Adam(0.05))
    grads = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the first step's zero gradient
        for _ in range(4):
            tr.step()
            grads.append(abs(float(tr.divergence.raw_alpha.grad)))
    assert grads[0] < 1e-12  # cold: nothing reaches alpha
    assert min(grads[1:]) > 1e-5
    assert tr.strategy.preconditioner["loc"].shape == (1, 1)
    sgd = _mog_trainer(SGD(0.05))
    sgd.step()
    assert abs(float(sgd.divergence.raw_alpha.grad)) > 1e-5


def test_default_estimator_meta_learns_alpha_with_a_learned_init():
    """The audit's case: MetaDivergenceVI(..., meta_learn_init=True) with its default Adam
    and one inner step moved alpha from 0.5 to 0.49996 in 100 outer steps (SGD: 1.03)."""
    X, g = make_mog_tasks(32, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", meta_learn_init=True,
                           max_meta_iter=100, random_state=0).meta_fit(X, groups=g)
    assert est.inner_optimizer == "adam" and est.n_inner_steps == 1
    assert abs(est.meta_divergence_.alpha - 0.5) > 0.05
    assert est.meta_preconditioner_["loc"].shape == (1, 1)
    # fit adapts as the init was trained: Adam from the learned preconditioner.
    est.fit(X[g == 0])
    assert np.isfinite(est.mean_).all()


def test_zero_meta_gradient_warns():
    """With one particle Renyi's weights are all 1: alpha can never get a gradient."""
    X, g = make_mog_tasks(4, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", n_particles=1,
                           inner_optimizer="sgd", max_meta_iter=6, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"meta-gradient of the divergence's parameters has "
                                             r"been zero for 5 outer iterations"):
        est.meta_fit(X, groups=g)


def test_bnn_few_shot_fit_from_the_learned_init_overfits_less():
    """From a learned init a cold Adam takes lr-sized sign steps on a 5-row task and
    overfits (measured on 10 tasks with 100 steps: mean test log density -2e4); from the
    learned preconditioner the steps shrink with the data (-1.7)."""
    X, y, g = make_sinusoid_tasks(8, 60, random_state=0)
    est = MetaBNNRegressor("kl", hidden_layer_sizes=(16,), meta_learn_init=True, n_inner_steps=3,
                           max_meta_iter=60, n_tasks_per_batch=4, random_state=0)
    est.meta_fit(X, y, groups=g).set_params(max_iter=100)
    Xt, yt, _ = make_sinusoid_tasks(1, 205, random_state=1)
    cold = copy.deepcopy(est)
    cold.meta_preconditioner_ = None  # what fit did before
    lpd = [np.mean(e.fit(Xt[:5], yt[:5]).log_predictive_density(Xt[5:], yt[5:]))
           for e in (est, cold)]
    assert lpd[0] > lpd[1] + 2.0
