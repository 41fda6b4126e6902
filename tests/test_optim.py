"""Inner optimisers and the meta-gradient they let through to the divergence."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import pytest
import torch

from skmetavi import MetaDivergenceVI
from skmetavi._bilevel import MetaTrainer, Problem, QuadratureLoss
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import make_mog_tasks
from skmetavi.divergences import Renyi
from skmetavi.models import GaussianMixture1D, MeanFieldGaussian

DT = torch.float64


def test_fresh_adam_takes_a_sign_step():
    """Why a fresh Adam hides the divergence: its first step ignores the direction's size."""
    p = {"w": torch.tensor([[1.0, -2.0, 3.0]], dtype=DT)}
    g = {"w": torch.tensor([[1e-3, -5.0, 40.0]], dtype=DT, requires_grad=True)}
    opt = Adam(0.1)
    new, state = opt.update(p, g, opt.init(p))
    torch.testing.assert_close(new["w"] - p["w"], 0.1 * torch.sign(g["w"]), rtol=1e-4, atol=0)
    (dg,) = torch.autograd.grad(new["w"].sum(), g["w"])
    assert float(dg.abs().max()) < 1e-6  # vs 0.1 for SGD
    assert float(state["step"][0]) == 1.0 and state["count"] == {}
    new, _ = SGD(0.1).update(p, g, SGD(0.1).init(p))
    (dg,) = torch.autograd.grad(new["w"].sum(), g["w"])
    torch.testing.assert_close(dg, torch.full_like(dg, 0.1))


def _mog_trainer(optimizer, n_inner_steps=1):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    mog = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)
    tasks = pad_tasks([mog + torch.tensor([0.0, 0.4 * s, 0.0], dtype=DT) for s in range(6)])
    return MetaTrainer(
        problem, Renyi(0.5).to(DT), optimizer, QuadratureLoss("renyi", 0.5, -10, 20, 401),
        tasks, tasks, init_params=problem.family.init_params(6, dtype=DT, device="cpu"),
        learn_init=True, n_inner_steps=n_inner_steps, n_particles=32, n_tasks_per_batch=4,
        generator=torch.Generator().manual_seed(0),
    )


def test_algorithm2_with_adam_and_one_inner_step_warns():
    """The audit's case: d J / d raw_alpha = 1e-17 at every outer step; now said up front."""
    tr = _mog_trainer(Adam(0.05))
    with pytest.warns(RuntimeWarning, match=r"no meta-gradient: every task starts from a fresh "
                                             r"Adam.*inner_optimizer='sgd'"):
        tr.step()
    assert abs(float(tr.divergence.raw_alpha.grad)) < 1e-12
    for trainer in (_mog_trainer(SGD(0.05)), _mog_trainer(Adam(0.05), n_inner_steps=3)):
        trainer.step()
        assert abs(float(trainer.divergence.raw_alpha.grad)) > 1e-5


def test_the_defaults_meta_learn_alpha():
    """Algorithm 1 (the default) with Adam ("auto"): each task's state persists, so only its
    first visit is cold; alpha leaves its start.  Algorithm 2 ("auto": SGD) learns it too."""
    X, g = make_mog_tasks(32, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", max_meta_iter=150,
                           random_state=0).meta_fit(X, groups=g)
    assert est._inner_optimizer(est._learns_init()).name == "adam"
    assert abs(est.meta_divergence_.alpha - 0.5) > 0.05
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", meta_learn_init=True,
                           max_meta_iter=100, random_state=0)
    assert est._inner_optimizer(True).name == "sgd"
    assert abs(est.meta_fit(X, groups=g).meta_divergence_.alpha - 0.5) > 0.1


def test_zero_meta_gradient_warns():
    """With one particle Renyi's weights are all 1: alpha can never get a gradient."""
    X, g = make_mog_tasks(4, random_state=0)
    est = MetaDivergenceVI("gaussian_mixture", divergence="renyi", n_particles=1,
                           inner_optimizer="sgd", max_meta_iter=6, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"meta-gradient of the divergence's parameters has "
                                             r"been zero for 5 outer iterations"):
        est.meta_fit(X, groups=g)
