"""Bilevel engine: meta-gradients vs finite differences, batching, Algorithms 1 and 2."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math
import warnings

import pytest
import torch
from scipy import integrate, stats

from skmetavi._bilevel import (
    MetaTrainer,
    NonFiniteError,
    PredictiveNLL,
    Problem,
    QuadratureLoss,
    inner_direction,
    inner_loop,
    run_vi,
)
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import minibatch, pad_tasks
from skmetavi.divergences import KL, FDivergence, NeuralF, Renyi, TailAdaptive
from skmetavi.models import (
    CallableTarget,
    FullCovarianceGaussian,
    GaussianMean,
    GaussianMixture1D,
    MeanFieldGaussian,
)

DT = torch.float64
MOG = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)


def _mog_tasks():
    return pad_tasks([MOG, MOG + torch.tensor([0.0, 0.5, 0.1], dtype=DT)])


def _meta_objective(problem, div, optimizer, B, mode="full", truncate=None, p0=None):
    """J(eta, phi0): the D_0.5 meta-loss after B inner steps with fixed noise."""
    tasks = _mog_tasks()
    loss = QuadratureLoss("renyi", 0.5, -8.0, 16.0, 801)
    if p0 is None:
        p0 = problem.family.init_params(2, loc=1.0, scale=1.5, dtype=DT, device="cpu")
        p0 = {k: v.requires_grad_(True) for k, v in p0.items()}
    gen = torch.Generator().manual_seed(3)
    p, _, _ = inner_loop(
        problem, div, optimizer, p0, optimizer.init(p0), tasks, n_steps=B, n_particles=16,
        generator=gen, mode=mode, truncate=truncate,
    )
    return loss(problem, p, tasks).mean(), p0


def _central_fd(fn, tensor, n=2, h=1e-5):
    flat = tensor.data.view(-1)
    out = []
    for j in range(min(n, flat.numel())):
        old = flat[j].item()
        flat[j] = old + h
        plus = fn().item()
        flat[j] = old - h
        minus = fn().item()
        flat[j] = old
        out.append((plus - minus) / (2 * h))
    return torch.tensor(out, dtype=DT)


@pytest.mark.parametrize("family", [MeanFieldGaussian(1), FullCovarianceGaussian(1)], ids=["mf", "full"])
@pytest.mark.parametrize("optimizer", [SGD(0.05), Adam(0.1)], ids=["sgd", "adam"])
@pytest.mark.parametrize(
    "divergence", [lambda: Renyi(0.7), lambda: NeuralF((6,), init_alpha=0.6)], ids=["renyi", "neural_f"]
)
@pytest.mark.parametrize("B", [1, 2, 3])
def test_meta_gradient_matches_finite_differences(family, optimizer, divergence, B):
    problem = Problem(family, GaussianMixture1D())
    div = divergence().to(DT)
    if isinstance(div, NeuralF):
        with torch.no_grad():  # move h off the alpha line so the MLP path is exercised
            div.mlp[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    J, p0 = _meta_objective(problem, div, optimizer, B)
    eta = [p for p in div.parameters()]
    grads = torch.autograd.grad(J, eta + list(p0.values()))
    for param, g in zip(eta + list(p0.values()), grads):
        fd = _central_fd(lambda: _meta_objective(problem, div, optimizer, B, p0=p0)[0], param)
        torch.testing.assert_close(g.reshape(-1)[: fd.numel()], fd, rtol=1e-5, atol=1e-8)
    if B > 1 and isinstance(optimizer, SGD):
        assert float(grads[0].abs().sum()) > 1e-6  # the meta-gradient is not trivially zero


def test_meta_gradient_is_exactly_zero_without_second_order():
    """Pitfall 2: detaching the inner update leaves alpha without gradient."""
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    div = Renyi(0.7).to(DT)
    J, _ = _meta_objective(problem, div, SGD(0.05), 1)
    (g,) = torch.autograd.grad(J, div.raw_alpha)
    assert float(g) != 0.0
    tasks = _mog_tasks()
    p0 = problem.family.init_params(2, loc=1.0, scale=1.5, dtype=DT, device="cpu")
    p, _, _ = inner_loop(
        problem, div, SGD(0.05), p0, SGD(0.05).init(p0), tasks, n_steps=1, n_particles=16,
        generator=torch.Generator().manual_seed(3), differentiable=False,
    )
    assert not any(v.requires_grad for v in p.values())


def test_truncated_full_window_equals_full_and_first_order_differs():
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    grads = {}
    for mode, trunc in (("full", None), ("truncated", 3), ("truncated", 1), ("first_order", None)):
        div = Renyi(0.7).to(DT)
        J, p0 = _meta_objective(problem, div, SGD(0.05), 3, mode=mode, truncate=trunc)
        grads[(mode, trunc)] = torch.autograd.grad(J, [div.raw_alpha, p0["loc"]])
    torch.testing.assert_close(grads[("truncated", 3)], grads[("full", None)], rtol=1e-12, atol=0)
    assert not torch.allclose(grads[("first_order", None)][0], grads[("full", None)][0])
    # First order: d phi_B / d phi_0 is the identity, so dJ/dloc0 = dJ/dloc_B.
    div = Renyi(0.7).to(DT)
    J, p0 = _meta_objective(problem, div, SGD(0.05), 3, mode="first_order")
    tasks = _mog_tasks()
    gen = torch.Generator().manual_seed(3)
    p, _, _ = inner_loop(
        problem, div, SGD(0.05), {k: v.detach() for k, v in p0.items()}, SGD(0.05).init(p0), tasks,
        n_steps=3, n_particles=16, generator=gen, differentiable=False,
    )
    pB = {k: v.detach().requires_grad_(True) for k, v in p.items()}
    loss = QuadratureLoss("renyi", 0.5, -8.0, 16.0, 801)(problem, pB, tasks).mean()
    (gB,) = torch.autograd.grad(loss, pB["loc"])
    torch.testing.assert_close(grads[("first_order", None)][1], gB)


def test_first_order_equals_full_for_a_single_step():
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    out = []
    for mode in ("full", "first_order"):
        div = Renyi(0.7).to(DT)
        J, _ = _meta_objective(problem, div, SGD(0.05), 1, mode=mode)
        out.append(torch.autograd.grad(J, div.raw_alpha)[0])
    torch.testing.assert_close(out[0], out[1])


@pytest.mark.parametrize("divergence", [KL(), Renyi(0.5), NeuralF((4,)), TailAdaptive(), FDivergence(2.0)])
def test_batched_direction_equals_per_task_including_padding(divergence):
    problem = Problem(MeanFieldGaussian(2), GaussianMean())
    g = torch.Generator().manual_seed(0)
    Xs = [torch.randn(n, 2, generator=g, dtype=DT) for n in (5, 2, 9)]
    tasks = pad_tasks(Xs)
    params = problem.family.init_params(3, loc=0.1, scale=0.9, dtype=DT, device="cpu")
    params["loc"] = params["loc"] + torch.randn(3, 2, generator=g, dtype=DT)
    params = {k: v.requires_grad_(True) for k, v in params.items()}
    eps = torch.randn(3, 7, 2, generator=g, dtype=DT)
    batched, stats = inner_direction(problem, divergence.to(DT), params, tasks, eps, create_graph=False)
    for m, X in enumerate(Xs):
        single = {k: v[m : m + 1].detach().requires_grad_(True) for k, v in params.items()}
        d, st = inner_direction(
            problem, divergence, single, pad_tasks([X]), eps[m : m + 1], create_graph=False
        )
        for k in d:
            torch.testing.assert_close(batched[k][m : m + 1], d[k], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.bound[m : m + 1], st.bound)


def test_callable_target_agrees_with_builtin():
    def log_joint(z, X, y):
        lp = torch.distributions.Normal(0.0, 10.0).log_prob(z).sum(-1)
        return lp + torch.distributions.Normal(z.unsqueeze(1), 1.0).log_prob(X).sum((-1, -2))

    g = torch.Generator().manual_seed(1)
    Xs = [torch.randn(4, 2, generator=g, dtype=DT), torch.randn(6, 2, generator=g, dtype=DT)]
    tasks = pad_tasks(Xs)
    z = torch.randn(2, 5, 2, generator=g, dtype=DT)
    torch.testing.assert_close(
        CallableTarget(log_joint, 2).log_joint(z, tasks, {}), GaussianMean().log_joint(z, tasks, {})
    )


def test_minibatch_rescales_and_never_picks_padding():
    Xs = [torch.arange(10, dtype=DT).reshape(-1, 1), 100 + torch.arange(3, dtype=DT).reshape(-1, 1)]
    tasks = pad_tasks(Xs)
    mb = minibatch(tasks, 4, torch.Generator().manual_seed(0))
    assert mb.X.shape == (2, 4, 1)
    torch.testing.assert_close(mb.lik_scale, torch.tensor([10 / 4, 1.0], dtype=DT))
    rows0 = mb.X[0, :, 0][mb.mask[0]]
    assert len(set(rows0.tolist())) == 4 and rows0.max() < 10
    assert set(mb.X[1, :, 0][mb.mask[1]].tolist()) == {100.0, 101.0, 102.0}
    # Unbiased: the rescaled minibatch log-likelihood averages to the full one.
    target, z = GaussianMean(), torch.zeros(2, 1, 1, dtype=DT)
    full = target.log_joint(z, tasks, {})
    gen = torch.Generator().manual_seed(1)
    est = torch.stack([target.log_joint(z, minibatch(tasks, 4, gen), {}) for _ in range(4000)]).mean(0)
    torch.testing.assert_close(est, full, rtol=2e-2, atol=0)


# ----------------------------------------------------------- quadrature
def _gauss_renyi(alpha, m1, s1, m2, s2):
    """Closed-form D_alpha(N(m1, s1^2) || N(m2, s2^2))."""
    var = alpha * s2**2 + (1 - alpha) * s1**2
    return (
        math.log(s2 / s1)
        + math.log(s2**2 / var) / (2 * (alpha - 1))
        + alpha * (m1 - m2) ** 2 / (2 * var)
    )


@pytest.mark.parametrize("alpha", [0.5, 0.8, 2.0])
def test_quadrature_renyi_matches_closed_form(alpha):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    tasks = pad_tasks([torch.tensor([[1.0, 2.0, 1.5]], dtype=DT)])
    params = problem.family.init_params(1, loc=1.2, scale=1.1, dtype=DT, device="cpu")
    value = QuadratureLoss("renyi", alpha, -15, 20, 4001)(problem, params, tasks)
    assert float(value) == pytest.approx(_gauss_renyi(alpha, 1.2, 1.1, 2.0, 1.5), rel=1e-6)


def test_quadrature_tv_matches_scipy():
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    tasks = pad_tasks([MOG])
    params = problem.family.init_params(1, loc=2.0, scale=1.3, dtype=DT, device="cpu")
    value = QuadratureLoss("tv", low=-15, high=25, n_points=4001)(problem, params, tasks)

    def p(x):
        return 0.5 * stats.norm.pdf(x, 1.0, 0.7) + 0.5 * stats.norm.pdf(x, 4.0, 1.4)

    ref = 0.5 * integrate.quad(lambda x: abs(stats.norm.pdf(x, 2.0, 1.3) - p(x)), -15, 25, limit=200)[0]
    assert float(value) == pytest.approx(ref, rel=1e-5)


def test_predictive_nll_matches_closed_form_for_gaussian_mean():
    problem = Problem(MeanFieldGaussian(1), GaussianMean(noise_scale=1.0))
    tasks = pad_tasks([torch.tensor([[0.5], [1.5]], dtype=DT)])
    params = problem.family.init_params(1, loc=1.0, scale=0.5, dtype=DT, device="cpu")
    nll = PredictiveNLL(n_particles=200_000)(problem, params, tasks, torch.Generator().manual_seed(0))
    # Predictive N(1, 1 + 0.25).
    ref = -stats.norm.logpdf([0.5, 1.5], 1.0, math.sqrt(1.25)).mean()
    assert float(nll) == pytest.approx(ref, abs=2e-3)


# ------------------------------------------------------- Algorithms 1, 2
def _trainer(learn_init, **kw):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    tasks = pad_tasks([MOG + torch.tensor([0.0, s, 0.0], dtype=DT) for s in (0.0, 0.5, 1.0, 1.5)])
    init = problem.family.init_params(4, dtype=DT, device="cpu")
    return MetaTrainer(
        problem, Renyi(1.0).to(DT), SGD(0.05), QuadratureLoss("renyi", 0.5, -10, 20, 401), tasks, tasks,
        init_params=init, learn_init=learn_init, n_particles=8, n_tasks_per_batch=2,
        generator=torch.Generator().manual_seed(0), **kw,
    )


def test_algorithm1_phi_persists_per_task():
    tr = _trainer(False)
    before = {k: v.clone() for k, v in tr.task_params.items()}
    alpha0 = float(tr.divergence.alpha)
    torch.manual_seed(0)
    tr.step()
    changed = (tr.task_params["loc"] != before["loc"]).flatten()
    assert int(changed.sum()) == 2  # exactly the two sampled tasks moved
    assert float(tr.divergence.alpha) != alpha0
    mid = {k: v.clone() for k, v in tr.task_params.items()}
    for _ in range(5):
        tr.step()
    # tasks keep moving from where they were (not re-initialised)
    assert not torch.equal(tr.task_params["loc"], mid["loc"])
    assert tr.init_params is None and tr.n_iter == 6


def test_algorithm2_learns_shared_initialisation():
    tr = _trainer(True, n_inner_steps=3)
    init0 = {k: v.detach().clone() for k, v in tr.init_params.items()}
    for _ in range(3):
        tr.step()
    assert tr.task_params is None
    assert not torch.equal(tr.init_params["loc"].detach(), init0["loc"])
    assert tr.init_params["loc"].shape == (1, 1)


def test_trainer_state_dict_resumes_exactly():
    a = _trainer(False)
    for _ in range(3):
        a.step()
    state = a.state_dict()
    for _ in range(3):
        a.step()
    b = _trainer(False)
    b.load_state_dict(state)
    for _ in range(3):
        b.step()
    assert a.loss_curve == b.loss_curve
    torch.testing.assert_close(a.divergence.raw_alpha, b.divergence.raw_alpha, rtol=0, atol=0)


# ---------------------------------------------------------- rollback
class _FlakyTarget(GaussianMean):
    """Returns NaN log densities for the first ``n_bad`` calls."""

    def __init__(self, n_bad):
        super().__init__()
        self.n_bad = n_bad
        self.calls = 0

    def log_joint(self, z, tasks, params):
        self.calls += 1
        out = super().log_joint(z, tasks, params)
        return out * float("nan") if self.calls <= self.n_bad else out

    def get_params(self, deep=True):
        return {}


def test_non_finite_steps_are_rolled_back_with_a_warning():
    problem = Problem(MeanFieldGaussian(1), _FlakyTarget(n_bad=2))
    tasks = pad_tasks([torch.ones(3, 1, dtype=DT)])
    opt = SGD(0.1)
    params = problem.family.init_params(1, dtype=DT, device="cpu")
    with pytest.warns(RuntimeWarning, match="rolled back"):
        out, state, curve = run_vi(
            problem, KL(), opt, params, opt.init(params), tasks, n_steps=20, n_particles=4,
            generator=torch.Generator().manual_seed(0),
        )
    assert torch.isfinite(out["loc"]).all()
    assert math.isnan(float(curve[0][0])) and math.isfinite(float(curve[-1][0]))
    assert float(state["lr_scale"][0]) == 0.25  # halved twice


def test_persistent_non_finite_raises_clear_error():
    problem = Problem(MeanFieldGaussian(1), _FlakyTarget(n_bad=10**9))
    tasks = pad_tasks([torch.ones(3, 1, dtype=DT)])
    opt = SGD(0.1)
    params = problem.family.init_params(1, dtype=DT, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(NonFiniteError, match="Try a smaller inner_lr"):
            run_vi(
                problem, KL(), opt, params, opt.init(params), tasks, n_steps=50, n_particles=4,
                generator=torch.Generator().manual_seed(0), max_failures=5,
            )


def test_truncated_equals_constant_prefix_then_differentiable_window():
    """truncate=1 of B=3: two steps as constants, then one differentiated step."""
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    div = Renyi(0.7).to(DT)
    J, p0 = _meta_objective(problem, div, SGD(0.05), 3, mode="truncated", truncate=1)
    g_trunc = torch.autograd.grad(J, [div.raw_alpha, p0["loc"]])
    tasks = _mog_tasks()
    gen = torch.Generator().manual_seed(3)
    start = {k: v.detach() for k, v in p0.items()}
    mid, state, _ = inner_loop(problem, div, SGD(0.05), start, SGD(0.05).init(start), tasks,
                               n_steps=2, n_particles=16, generator=gen, differentiable=False)
    mid = {k: v.requires_grad_(True) for k, v in mid.items()}
    end, _, _ = inner_loop(problem, div, SGD(0.05), mid, state, tasks, n_steps=1, n_particles=16,
                           generator=gen)
    loss = QuadratureLoss("renyi", 0.5, -8.0, 16.0, 801)(problem, end, tasks).mean()
    g_alpha, g_mid = torch.autograd.grad(loss, [div.raw_alpha, mid["loc"]])
    torch.testing.assert_close(g_trunc[0], g_alpha, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(g_trunc[1], g_mid, rtol=1e-12, atol=1e-15)  # identity before the window
