"""MetaTrainer options: the multi-step meta-loss."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import torch

from skmetavi import MetaBNNRegressor
from skmetavi._bilevel import MetaTrainer, Problem, QuadratureLoss, inner_loop
from skmetavi._optim import SGD
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import Renyi
from skmetavi.models import GaussianMixture1D, MeanFieldGaussian

DT = torch.float64


def _trainer(multi):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    mog = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)
    tasks = pad_tasks([mog + torch.tensor([0.0, 0.5 * s, 0.0], dtype=DT) for s in range(3)])
    return MetaTrainer(
        problem, Renyi(0.7).to(DT), SGD(0.05), QuadratureLoss("renyi", 0.5, -10, 20, 401), tasks,
        tasks, init_params=problem.family.init_params(3, loc=1.0, dtype=DT, device="cpu"),
        learn_init=True, n_inner_steps=3, n_particles=8, n_tasks_per_batch=3, meta_lr=0.0,
        init_lr=0.0, fixed_noise=True, generator=torch.Generator().manual_seed(0),
        multi_step_loss=multi,
    )


def test_multi_step_loss_is_the_mean_over_the_inner_loop():
    """J = mean of the meta-loss before the loop and after each of its B steps."""
    tr = _trainer(True)
    value = tr.step()
    ref_tr = _trainer(False)
    loss, model = ref_tr.meta_loss, ref_tr.model
    init = {k: v.detach().expand((3,) + v.shape[1:]) for k, v in ref_tr.init_params.items()}
    # The trainer's fixed noise draws the same numbers at every step: replay them.
    from skmetavi._tasks import TaskNoise
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(0)))
    noise = TaskNoise(seed, 3, torch.arange(3), fixed=True)
    Js = [loss(model, init, tr.support).mean()]
    params, state = init, ref_tr.inner_optimizer.init(init)
    for _ in range(3):
        params, state, _ = inner_loop(model, ref_tr.divergence, ref_tr.inner_optimizer, params,
                                      state, tr.support, n_steps=1, n_particles=8, generator=noise,
                                      differentiable=False)
        Js.append(loss(model, params, tr.support).mean())
    torch.testing.assert_close(torch.tensor(value, dtype=DT), torch.stack(Js).mean(),
                               rtol=1e-10, atol=1e-12)
    assert abs(ref_tr.step() - float(Js[-1])) < 1e-10  # the default: the last step only


def test_the_estimators_use_it_for_a_learned_init_only():
    X, y, g = make_sinusoid_tasks(4, 20, random_state=0)
    kw = dict(hidden_layer_sizes=(8,), n_particles=4, max_meta_iter=1, random_state=0)
    for learn_init in (False, True):
        est = MetaBNNRegressor("kl" if learn_init else "renyi", meta_learn_init=learn_init, **kw)
        est._setup_torch()
        trainer = est._meta_trainer(*est._meta_fit_inputs(X, y, g)[3][:4],
                                    est._meta_divergence(False))
        assert trainer.multi_step_loss is learn_init
