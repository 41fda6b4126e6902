"""The engine with local latent variables: one z per row, weights per site, local parameters.

The model is :class:`skmetavi.models.LinearGaussianLatent` (probabilistic PCA),
with an amortised (linear encoder) and a factorised (free q per row) family.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import math

import pytest
import torch

from skmetavi._bilevel import MetaTrainer, NegativeEvidence, inner_direction, inner_loop, inner_step
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import minibatch, pad_tasks
from skmetavi.divergences import KL, NeuralF, Renyi, TailAdaptive
from skmetavi.models import LinearGaussianLatent

DT = torch.float64
INFERENCE = ["amortized", "factorized"]


def _tasks(sizes=(6, 4), p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2, p, generator=g, dtype=DT)
    Xs = [torch.randn(n, 2, generator=g, dtype=DT) @ W + 0.3 * torch.randn(n, p, generator=g, dtype=DT)
          for n in sizes]
    return pad_tasks(Xs)


def _params(model, tasks, seed=1):
    params = model.init_params(tasks, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + 1)
    # Off the symmetric starting point, so every parameter matters.
    return {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}


def _leaves(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def _vr_objective(model, params, tasks, eps, alpha):
    """Sum over sites of the per-site VR bound (alpha != 1) or ELBO (alpha = 1), by plain autograd."""
    z = model.rsample(params, tasks, eps)
    log_w = model.log_p(params, tasks, z) - model.log_q(params, tasks, z)  # (M, S, K)
    K = log_w.shape[-1]
    if alpha == 1.0:
        per_site = log_w.mean(-1)
    else:
        c = 1.0 - alpha
        per_site = (torch.logsumexp(c * log_w, -1) - math.log(K)) / c
    return (per_site * tasks.mask).sum()


@pytest.mark.parametrize("inference", INFERENCE)
@pytest.mark.parametrize("alpha", [0.3, 1.0, 2.0])
def test_renyi_direction_is_the_gradient_of_the_per_site_vr_bound(inference, alpha):
    """Eq. (4) per site: weights and log-sum-exp per row, padding rows ignored."""
    model = LinearGaussianLatent(2, inference=inference)
    tasks = _tasks()
    params = _leaves(_params(model, tasks))
    eps = model.sample_eps(params, tasks, 5, generator=torch.Generator().manual_seed(2))
    div = KL() if alpha == 1.0 else Renyi(alpha)
    direction, stats = inner_direction(model, div, params, tasks, eps, create_graph=False)
    objective = _vr_objective(model, params, tasks, eps, alpha)
    grads = dict(zip(params, torch.autograd.grad(objective, list(params.values()))))
    assert direction.keys() == grads.keys()
    for k, d in direction.items():
        torch.testing.assert_close(d, grads[k], rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(stats.bound.sum(), objective.detach(), rtol=1e-12, atol=1e-12)
    if alpha != 1.0:
        # Pyro #3104: one log-sum-exp after summing the rows is another (wrong) direction.
        z = model.rsample(params, tasks, eps)
        log_w = (model.log_p(params, tasks, z) - model.log_q(params, tasks, z))
        pooled = (log_w * tasks.mask.unsqueeze(-1)).sum(1)  # (M, K)
        c = 1.0 - alpha
        wrong = torch.autograd.grad(((torch.logsumexp(c * pooled, -1) - math.log(5)) / c).sum(),
                                    params["weight"])[0]
        assert not torch.allclose(wrong, direction["weight"], rtol=1e-3)


@pytest.mark.parametrize("inference", INFERENCE)
@pytest.mark.parametrize("divergence", [lambda: NeuralF((4,), init_alpha=0.4), TailAdaptive],
                         ids=["neural_f", "tail_adaptive"])
def test_path_direction_matches_a_per_row_reference_loop(inference, divergence):
    """Each row alone (a one-row task): its direction; shared parameters add up."""
    model = LinearGaussianLatent(2, inference=inference)
    tasks = _tasks(sizes=(5, 3))
    div = divergence().to(DT)
    if isinstance(div, NeuralF):
        with torch.no_grad():
            div.mlp[-1].weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    params = _leaves(_params(model, tasks))
    eps = model.sample_eps(params, tasks, 6, generator=torch.Generator().manual_seed(3))
    direction, _ = inner_direction(model, div, params, tasks, eps, create_graph=False)
    local = set(model.local_keys)
    for m in range(tasks.n_tasks):
        total = {k: torch.zeros_like(v[m]) for k, v in params.items() if k not in local}
        for s in range(int(tasks.n_rows[m])):
            row = pad_tasks([tasks.X[m, s : s + 1]])
            p_row = {k: (v[m : m + 1, s : s + 1] if k in local else v[m : m + 1]).detach()
                     .requires_grad_(True) for k, v in params.items()}
            d_row, _ = inner_direction(model, div, p_row, row, eps[m : m + 1, s : s + 1],
                                       create_graph=False)
            for k in local:
                torch.testing.assert_close(direction[k][m, s], d_row[k][0, 0], rtol=1e-10,
                                           atol=1e-12)
            for k in total:
                total[k] = total[k] + d_row[k][0]
        for k, t in total.items():
            torch.testing.assert_close(direction[k][m], t, rtol=1e-10, atol=1e-12, msg=k)
        for k in local:  # padding rows get no direction
            assert bool((direction[k][m, int(tasks.n_rows[m]):] == 0).all())


def _meta_objective(inference, div, optimizer, B, p0, batch_size=None):
    """J(eta, phi0): held-out negative evidence after B inner steps, fixed noise."""
    model = LinearGaussianLatent(2, inference=inference)
    support = _tasks(sizes=(6, 4))
    # A factorised q exists for the rows it was fitted to only.
    query = _tasks(sizes=(5, 5), seed=7) if inference == "amortized" else support
    p, _, _ = inner_loop(
        model, div, optimizer, p0, optimizer.init(p0, local=model.local_keys), support,
        n_steps=B, n_particles=4, generator=torch.Generator().manual_seed(5),
        batch_size=batch_size,
    )
    return NegativeEvidence(8)(model, p, query, generator=torch.Generator().manual_seed(6)).mean()


def _central_fd(fn, tensor, n=2, h=1e-6):
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


@pytest.mark.parametrize("inference", INFERENCE)
@pytest.mark.parametrize("optimizer", [SGD(0.02), Adam(0.05)], ids=["sgd", "adam"])
@pytest.mark.parametrize("divergence", [lambda: Renyi(0.6), lambda: NeuralF((4,), init_alpha=0.6)],
                         ids=["renyi", "neural_f"])
def test_meta_gradient_matches_finite_differences(inference, optimizer, divergence):
    model = LinearGaussianLatent(2, inference=inference)
    div = divergence().to(DT)
    if isinstance(div, NeuralF):
        with torch.no_grad():
            div.mlp[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    p0 = _leaves(_params(model, _tasks(sizes=(6, 4))))
    J = _meta_objective(inference, div, optimizer, 2, p0)
    eta = list(div.parameters())
    tensors = eta + [p0["weight"], p0[model.variational_keys[0]]]
    grads = torch.autograd.grad(J, tensors, allow_unused=True)
    for t, g in zip(tensors, grads):
        fd = _central_fd(lambda: _meta_objective(inference, div, optimizer, 2, p0), t)
        g = torch.zeros_like(t) if g is None else g
        torch.testing.assert_close(g.reshape(-1)[: fd.numel()], fd, rtol=2e-5, atol=1e-8)
    assert float(grads[0].abs().sum()) > 1e-6  # eta is really in the meta-gradient


@pytest.mark.parametrize("optimizer", [SGD(0.02), Adam(0.05)], ids=["sgd", "adam"])
def test_meta_gradient_through_minibatched_local_parameters(optimizer):
    """Factorised q, 3 of 6 rows per step: the gather/scatter path is differentiated exactly."""
    model = LinearGaussianLatent(2, inference="factorized")
    div = Renyi(0.6).to(DT)
    p0 = _leaves(_params(model, _tasks(sizes=(6, 4))))

    def J():
        return _meta_objective("factorized", div, optimizer, 3, p0, batch_size=3)

    tensors = [div.raw_alpha, p0["z_loc"], p0["weight"]]
    grads = torch.autograd.grad(J(), tensors)
    for t, g in zip(tensors, grads):
        fd = _central_fd(J, t, n=3)
        torch.testing.assert_close(g.reshape(-1)[: fd.numel()], fd, rtol=2e-5, atol=1e-8)
    assert float(grads[0].abs()) > 1e-6


def test_lazy_adam_counts_updates_per_row():
    """A row first drawn late takes an lr-sized first step (its own bias correction)."""
    model = LinearGaussianLatent(1, inference="factorized")
    tasks = _tasks(sizes=(40,), p=2)
    params = model.init_params(tasks, generator=torch.Generator().manual_seed(0))
    opt = Adam(0.01)
    state = opt.init(params, local=model.local_keys)
    gen = torch.Generator().manual_seed(1)
    firsts = []
    for _ in range(30):
        drawn = minibatch(tasks, 4, torch.Generator().set_state(gen.get_state())).rows[0]
        new, state, _ = inner_step(model, KL(), opt, params, state, tasks, n_particles=4,
                                   generator=gen, batch_size=4)
        for r in drawn.tolist():
            if int(state["count"]["z_loc"][0, r]) == 1:  # this row's first update
                firsts.append(float((new["z_loc"][0, r] - params["z_loc"][0, r]).abs().max()))
        params = new
    assert len(firsts) > 20
    # |m_hat / sqrt(v_hat)| = 1 at a first update: lr, whenever the row comes.
    torch.testing.assert_close(torch.tensor(firsts), torch.full((len(firsts),), 0.01),
                               rtol=1e-3, atol=0)


def _trainer(inference, learn_init, alpha, seed=0):
    model = LinearGaussianLatent(2, inference=inference)
    support = _tasks(sizes=(6, 4, 5))
    query = _tasks(sizes=(4, 4, 4), seed=9) if inference == "amortized" else support
    return MetaTrainer(
        model, Renyi(alpha).to(DT), SGD(0.02), NegativeEvidence(6), support, query,
        init_params=_params(model, support), learn_init=learn_init, n_inner_steps=2,
        n_particles=4, n_tasks_per_batch=2, meta_lr=0.0, init_lr=0.0,
        generator=torch.Generator().manual_seed(seed),
    )


@pytest.mark.parametrize("inference", INFERENCE)
@pytest.mark.parametrize("learn_init", [False, True], ids=["alg1", "alg2"])
def test_trainer_meta_gradient_matches_finite_differences(inference, learn_init):
    """Through MetaTrainer.step (the strategies, the task noise), one outer iteration."""
    tr = _trainer(inference, learn_init, 0.7)
    tr.step()
    grad = float(tr.divergence.raw_alpha.grad)
    h = 1e-6
    values = []
    for sign in (1, -1):
        other = _trainer(inference, learn_init, 0.7)
        with torch.no_grad():
            other.divergence.raw_alpha += sign * h
        values.append(other.step())
    fd = (values[0] - values[1]) / (2 * h)
    assert abs(grad) > 1e-6
    assert grad == pytest.approx(fd, rel=1e-5)


def test_algorithm2_never_shares_local_parameters():
    tr = _trainer("factorized", True, 0.7)
    assert set(tr.init_params) == {"weight", "bias", "noise_raw"}
    assert tr.init_params["weight"].shape == (1, 2, 3)
    tr.step()
    assert tr.init_params["weight"].grad is not None
    tr1 = _trainer("factorized", False, 0.7)
    assert tr1.task_params["z_loc"].shape == (3, 6, 2)  # one q per row of every task


@pytest.mark.parametrize("create_graph, first_order",
                         [(False, False), (True, False), (True, True), (False, True)],
                         ids=["plain", "full-graph", "first-order", "truncated-prefix"])
def test_minibatched_factorized_rows_outside_the_batch_stay_untouched(create_graph, first_order):
    """Only the minibatch's rows (and their Adam moments) move; the rest are left exactly."""
    model = LinearGaussianLatent(2, inference="factorized")
    tasks = _tasks(sizes=(8, 3))
    params = _params(model, tasks)
    if create_graph or first_order:
        params = _leaves(params)
    opt = Adam(0.05)
    state = opt.init({k: v.detach() for k, v in params.items()}, local=model.local_keys)
    gen = torch.Generator().manual_seed(4)
    drawn = minibatch(tasks, 3, torch.Generator().manual_seed(4)).rows  # the same draw
    new, new_state, _ = inner_step(
        model, Renyi(0.5), opt, params, state, tasks, n_particles=4, generator=gen,
        batch_size=3, create_graph=create_graph, first_order_chain=first_order,
    )
    for m, n in enumerate((8, 3)):
        rows = set(drawn[m].tolist()) & set(range(n))
        for k in model.local_keys:
            moved = (new[k][m] != params[k][m]).any(-1)
            assert set(moved.nonzero().flatten().tolist()) == rows, k
            untouched = [r for r in range(params[k].shape[1]) if r not in rows]
            torch.testing.assert_close(new[k][m, untouched], params[k][m, untouched], rtol=0, atol=0)
            for moment in ("m", "v"):
                assert bool((new_state[moment][k][m, untouched] == 0).all())
                assert bool((new_state[moment][k][m, sorted(rows)] != 0).any())
        assert (new["weight"][m] != params["weight"][m]).any()  # shared parameters move
    # A second step: rows visited before but not now keep their values although their
    # Adam moments are no longer zero (no momentum step outside the minibatch).
    drawn2 = minibatch(tasks, 3, torch.Generator().set_state(gen.get_state())).rows
    newer, _, _ = inner_step(
        model, Renyi(0.5), opt, new, new_state, tasks, n_particles=4, generator=gen,
        batch_size=3, create_graph=create_graph, first_order_chain=first_order,
    )
    rows1, rows2 = set(drawn[0].tolist()), set(drawn2[0].tolist())
    assert rows1 - rows2  # some rows have momentum but are not in the second batch
    for r in rows1 - rows2:
        torch.testing.assert_close(newer["z_loc"][0, r], new["z_loc"][0, r], rtol=0, atol=0)
    for r in rows2:
        assert bool((newer["z_loc"][0, r] != new["z_loc"][0, r]).any())
    if create_graph or first_order:
        # The scattered update stays in the graph of the parameters it came from.
        (g,) = torch.autograd.grad(new["z_loc"].sum(), params["z_loc"])
        assert bool((g != 0).any())


def test_site_weights_scale_the_minibatch_to_the_task():
    model = LinearGaussianLatent(1)
    tasks = _tasks(sizes=(8, 3))
    mb = minibatch(tasks, 4, torch.Generator().manual_seed(0))
    w = model.site_weights(mb)
    torch.testing.assert_close(w[0], torch.full((4,), 2.0, dtype=DT))
    torch.testing.assert_close(w[1], torch.tensor([1.0, 1.0, 1.0, 0.0], dtype=DT))


def test_negative_evidence_is_exact_with_the_exact_posterior():
    """With q the exact posterior (k = 1: a diagonal Gaussian), every weight is log p(x_n)."""
    model = LinearGaussianLatent(1, inference="amortized")
    tasks = _tasks(sizes=(7,))
    params = {k: v.detach() for k, v in _params(model, tasks).items()}
    X = tasks.X[0]
    W, b = params["weight"][0], params["bias"][0]
    var = model.noise(params)[0] ** 2
    _, cov = model.posterior(params, X)
    # mean(x) = (x - b) W^T cov / var  =  x A + c
    params["enc_weight"] = (W.T @ cov / var).unsqueeze(0)
    params["enc_bias"] = (-(b @ W.T) @ cov / var).unsqueeze(0)
    sd = torch.sqrt(torch.diagonal(cov))
    params["enc_scale_raw"] = torch.log(torch.expm1(sd - 1e-6)).unsqueeze(0)
    mean, _ = model.posterior(params, X)
    loc, _ = model.q_loc_scale(params, tasks)
    torch.testing.assert_close(loc[0], mean)
    value = NegativeEvidence(3)(model, params, tasks, generator=torch.Generator().manual_seed(0))
    exact = -model.log_marginal(params, X).mean()
    torch.testing.assert_close(value[0], exact, rtol=1e-10, atol=1e-10)


def test_meta_training_moves_alpha_with_local_latents():
    """Learns something: alpha leaves its start and its meta-gradient is not ~0."""
    model = LinearGaussianLatent(2, inference="amortized")
    support = _tasks(sizes=(20, 20, 20, 20), seed=3)
    query = _tasks(sizes=(20, 20, 20, 20), seed=4)
    tr = MetaTrainer(
        model, Renyi(1.0).to(DT), SGD(0.01), NegativeEvidence(10), support, query,
        init_params=model.init_params(support, generator=torch.Generator().manual_seed(0)),
        learn_init=False, n_inner_steps=1, n_particles=5, n_tasks_per_batch=4, meta_lr=0.05,
        generator=torch.Generator().manual_seed(0),
    )
    grads = []
    for _ in range(30):
        tr.step()
        grads.append(abs(float(tr.divergence.raw_alpha.grad)))
    assert min(grads) > 1e-8
    assert abs(tr.divergence.alpha - 1.0) > 0.05
