"""First-order meta-gradients by recomputation: the same gradient, memory constant in B."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import weakref

import pytest
import torch

from skmetavi import MetaBNNRegressor, _first_order
from skmetavi._bilevel import MetaTrainer, NegativeEvidence, Problem, QuadratureLoss, inner_loop
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import TaskNoise, pad_tasks
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import LocalRenyi, NeuralF, Renyi
from skmetavi.models import (
    CallableTarget,
    GaussianMixture1D,
    LinearGaussianLatent,
    MeanFieldGaussian,
)

DT = torch.float64
MOG = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)


def _neural_f():
    div = NeuralF((6,), init_alpha=0.6).to(DT)
    with torch.no_grad():  # off the alpha line, so the MLP's weights all get gradients
        div.mlp[-1].weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    return div


DIVERGENCES = {"renyi": lambda: Renyi(0.7).to(DT), "neural_f": _neural_f}
OPTIMIZERS = {"sgd": lambda: SGD(0.05), "adam": lambda: Adam(0.1)}


def _assert_same(new, ref):
    assert len(new) == len(ref)
    for a, b in zip(new, ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


def _mog_trainer(div, optimizer, learn_init):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    tasks = pad_tasks([MOG + torch.tensor([0.0, 0.4 * i, 0.03 * i], dtype=DT) for i in range(4)])
    return MetaTrainer(
        problem, div, optimizer, QuadratureLoss("renyi", 0.5, -10, 20, 401), tasks, tasks,
        init_params=problem.family.init_params(4, loc=1.5, scale=1.5, dtype=DT, device="cpu"),
        learn_init=learn_init, n_inner_steps=4, n_particles=16, n_tasks_per_batch=3,
        mode="first_order", multi_step_loss=True,  # a meta-loss after every step (on_step)
        generator=torch.Generator().manual_seed(0),
    )


@pytest.mark.parametrize("learn_init", [False, True], ids=["alg1", "alg2"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_trainer_meta_gradient_equals_the_graph_keeping_one(monkeypatch, divergence, optimizer,
                                                            learn_init):
    """Two outer iterations (Alg. 1's Adam states warm up): gradients, losses, phi agree."""
    runs = []
    for recompute in (True, False):
        monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
        tr = _mog_trainer(DIVERGENCES[divergence](), OPTIMIZERS[optimizer](), learn_init)
        grads = []
        for _ in range(2):
            tr.step()
            grads += [None if p.grad is None else p.grad.clone() for p in tr._meta_parameters()]
        phi = tr.init_params if learn_init else tr.task_params
        runs.append((grads, tr.loss_curve, {k: v.detach().clone() for k, v in phi.items()}))
    (g_new, J_new, phi_new), (g_ref, J_ref, phi_ref) = runs
    _assert_same(g_new, g_ref)
    assert J_new == pytest.approx(J_ref, rel=1e-13)
    _assert_same(list(phi_new.values()), list(phi_ref.values()))
    assert float(g_ref[0].abs().max()) > 1e-8  # the divergence really gets a meta-gradient
    if learn_init:
        assert all(g is not None for g in g_new)


def _local_tasks():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(2, 3, generator=g, dtype=DT)
    return pad_tasks([torch.randn(n, 2, generator=g, dtype=DT) @ W
                      + 0.3 * torch.randn(n, 3, generator=g, dtype=DT) for n in (6, 4)])


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("divergence", list(DIVERGENCES))
def test_minibatched_local_parameters_equal_the_graph_keeping_one(monkeypatch, divergence,
                                                                   optimizer):
    """Factorised q (per-row parameters), 3 of 6 rows per step, a meta-loss at every step."""
    model = LinearGaussianLatent(2, inference="factorized")
    tasks = _local_tasks()
    init = model.init_params(tasks, generator=torch.Generator().manual_seed(1))
    loss = NegativeEvidence(8)
    results = []
    for recompute in (True, False):
        monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
        div, opt = DIVERGENCES[divergence](), OPTIMIZERS[optimizer]()
        p0 = {k: v.detach().clone().requires_grad_(True) for k, v in init.items()}
        losses = []

        def on_step(b, p):
            losses.append(loss(model, p, tasks, generator=torch.Generator().manual_seed(b)).mean())

        inner_loop(model, div, opt, p0, opt.init(init, local=model.local_keys), tasks,
                   n_steps=4, n_particles=4, generator=torch.Generator().manual_seed(5),
                   mode="first_order", batch_size=3, on_step=on_step)
        J = torch.stack(losses).sum()
        tensors = list(div.parameters()) + list(p0.values())
        results.append((J.detach(), torch.autograd.grad(J, tensors, allow_unused=True)))
    (J_new, g_new), (J_ref, g_ref) = results
    assert float(J_new) == float(J_ref)
    _assert_same(g_new, g_ref)
    assert float(g_ref[0].abs().max()) > 1e-8


def test_a_captured_meta_parameter_is_found_and_differentiated(monkeypatch):
    """A tensor requiring grad that the target reads (not a divergence parameter) is eta too."""
    shift = torch.tensor(0.3, dtype=DT, requires_grad=True)

    def log_joint(z, X, y):
        return -0.5 * ((z[:, 0] - shift) ** 2) / 0.8 - 0.5 * z[:, 0] ** 2

    problem = Problem(MeanFieldGaussian(1), CallableTarget(log_joint, 1))
    tasks = pad_tasks([torch.zeros(2, 1, dtype=DT), torch.zeros(3, 1, dtype=DT)])
    grads = []
    for recompute in (True, False):
        monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
        div, opt = Renyi(0.6).to(DT), Adam(0.1)
        p0 = problem.family.init_params(2, loc=1.0, scale=1.5, dtype=DT, device="cpu")
        p, _, _ = inner_loop(problem, div, opt, p0, opt.init(p0), tasks, n_steps=3,
                             n_particles=8, generator=torch.Generator().manual_seed(2),
                             mode="first_order")
        J = (p["loc"] ** 2).sum()
        grads.append(torch.autograd.grad(J, [shift, div.raw_alpha]))
    _assert_same(grads[0], grads[1])
    assert float(grads[0][0].abs()) > 1e-6


def test_a_learned_step_size_read_by_the_update_is_differentiated(monkeypatch):
    """eta includes tensors the optimiser reads (a learned lr), next to the divergence's."""
    def log_joint(z, X, y):
        return -0.5 * z[:, 0] ** 2

    problem = Problem(MeanFieldGaussian(1), CallableTarget(log_joint, 1))
    tasks = pad_tasks([torch.zeros(2, 1, dtype=DT), torch.zeros(3, 1, dtype=DT)])
    grads = []
    for recompute in (True, False):
        monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
        lr = torch.tensor(0.1, dtype=DT, requires_grad=True)
        div, opt = Renyi(0.6).to(DT), SGD(0.1)
        opt.lr = lr
        p0 = problem.family.init_params(2, loc=1.0, scale=1.5, dtype=DT, device="cpu")
        p, _, _ = inner_loop(problem, div, opt, p0, opt.init(p0), tasks, n_steps=3,
                             n_particles=8, generator=torch.Generator().manual_seed(2),
                             mode="first_order")
        J = (p["loc"] ** 2).sum()
        grads.append(torch.autograd.grad(J, [lr, div.raw_alpha], allow_unused=True))
    assert grads[0][0] is not None  # was dropped when the divergence had parameters
    _assert_same(grads[0], grads[1])
    assert float(grads[0][0].abs()) > 1e-3


@pytest.mark.parametrize("divergence", [Renyi(0.7), LocalRenyi(0.7)], ids=["renyi", "local"])
def test_bnn_minibatched_meta_gradient_equals_the_graph_keeping_one(monkeypatch, divergence):
    """A BNN (per-row likelihood), a minibatch of the rows, global and per-row (local) weights."""
    grads = []
    for recompute in (True, False):
        monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
        tr = _bnn_inputs(divergence, dtype="float64", batch_size=10, n_inner_steps=3,
                         meta_gradient="first_order")
        assert tr.mode == "first_order" and tr.batch_size == 10
        tr.step()
        tr.step()
        grads.append([p.grad.clone() for p in tr.eta])
    _assert_same(grads[0], grads[1])
    assert float(grads[0][0].abs().max()) > 0


# ------------------------------------------------------------------ memory
def _bnn_inputs(divergence=None, **kw):
    X, y, g = make_sinusoid_tasks(2, 60, random_state=0)
    est = MetaBNNRegressor(divergence or Renyi(1.0), hidden_layer_sizes=(20,), n_particles=10,
                           inner_optimizer="adam", inner_lr=1e-3, init_scale=0.01,
                           n_tasks_per_batch=2, query_fraction=0.5, random_state=0, **kw)
    est._setup_torch()
    model, support, query, gen, _ = est._meta_fit_inputs(X, y, g)[3]
    return est._meta_trainer(model, support, query, gen, est._meta_divergence(False))


class _Saved:
    """What the pack hook hands autograd: alive exactly while a graph holds it."""

    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor):
        self.tensor = tensor


def _saved_bytes(tr, B, *, recompute, monkeypatch):
    """Bytes of the distinct storages that the recorded meta-loss graph holds for backward.

    Tensors saved by transient graphs (each step's own ``autograd.grad``) are
    freed with them and not counted: only what is still held when the forward ends.
    """
    monkeypatch.setattr(_first_order, "RECOMPUTE", recompute)
    ids = torch.arange(2)
    noise = TaskNoise(7, 2, ids)
    params, state = tr.strategy.start(ids, tr.support.index(ids), differentiable=True,
                                      generator=noise)
    boxes = []

    def pack(t):
        box = _Saved(t)
        boxes.append(weakref.ref(box))
        return box

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda box: box.tensor):
        p, _, _ = inner_loop(tr.model, tr.divergence, tr.inner_optimizer, params, state,
                             tr.support.index(ids), n_steps=B, n_particles=tr.n_particles,
                             generator=noise, mode="first_order")
        J = tr.meta_loss(tr.model, p, tr.query.index(ids), generator=noise).sum()
    storages = {}
    for ref in boxes:
        box = ref()
        if box is not None:
            s = box.tensor.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    J.backward()  # the recorded graph is valid
    assert all(e.grad is not None for e in tr.eta)
    per_step = sum(v.numel() * v.element_size() for v in params.values())
    per_step += sum(t.numel() * t.element_size() for t in _first_order._tree.tree_leaves(state))
    loc = next(iter(params.values()))  # (M, d): the noise is (M, 1, K, d)
    per_step += tr.n_particles * loc.numel() * loc.element_size()
    return sum(storages.values()), per_step


def test_saved_memory_is_constant_in_the_number_of_inner_steps(monkeypatch):
    tr = _bnn_inputs()
    new = {B: _saved_bytes(tr, B, recompute=True, monkeypatch=monkeypatch) for B in (1, 20)}
    ref = {B: _saved_bytes(tr, B, recompute=False, monkeypatch=monkeypatch)[0] for B in (1, 20)}
    (new1, per_step), (new20, _) = new[1], new[20]
    # Only O(B |phi|): phi_b, the optimiser state and the noise of every step.
    assert new20 <= 1.5 * new1 + 19 * per_step
    # The graph-keeping path holds one second-order graph per step.
    assert ref[20] > 5 * ref[1]
    assert ref[20] - ref[1] > 5 * (new20 - new1)
