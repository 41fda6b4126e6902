"""Negligible particle weights become exact zeros before they reach the backward pass.

Particle weights below ``eps**2`` of their row's largest
(:func:`skmetavi._inner.negligible_to_zero`) change a direction by less than
rounding, but their products in the backward pass are subnormal numbers, which
slow a CPU's matrix products several-fold (measured on an Intel Xeon: a
compiled float32 BNN step at N = 1000 drifted from 2.5 to 7.7 ms; with the
mask it stays at 1.3 ms).  The tests check the threshold and its gradient,
that no subnormal reaches a matrix product of a float32 BNN step or
meta-iteration (eager, and the compiled paths' functions run eagerly) that
produces them without the masks, and that directions and meta-gradients stay
those of the exact weights to float32 rounding.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from skmetavi import MetaBNNRegressor, _compiled, _compiled_meta, _inner, _meta_losses
from skmetavi._inner import (inner_direction, negligible_to_zero, significant_logsumexp,
                             significant_weights)
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import FDivergence, LocalRenyi, NeuralF, Renyi

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default,
           torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default}


class _CountSubnormals(TorchDispatchMode):
    """Counts the nonzero float32 inputs below the smallest normal of every matrix product."""

    def __init__(self):
        super().__init__()
        self.count, self.n_calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.n_calls += 1
            for a in args:
                if torch.is_tensor(a) and a.dtype == torch.float32:
                    tiny = torch.finfo(torch.float32).tiny
                    self.count += int(((a != 0) & (a.abs() < tiny)).sum())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_threshold_is_eps_squared_of_the_rows_largest_weight(dtype):
    eps2 = torch.finfo(dtype).eps ** 2
    big = 0.5
    w = torch.tensor([[big, big * eps2 * 1.01, big * eps2 * 0.99, 0.0, 1e-3],
                      # A row of small weights keeps them: the threshold is relative.
                      [1e-20, 3e-21, 1e-20 * eps2 * 0.5, 2e-20, 1e-22]], dtype=dtype)
    out = negligible_to_zero(w)
    expected = w.clone()
    expected[0, 2] = 0.0
    expected[1, 2] = 0.0
    assert torch.equal(out, expected)  # kept weights bit for bit
    assert out.dtype == dtype and out.shape == w.shape


def test_the_mask_is_applied_along_the_particle_dimension_of_every_site():
    w = torch.full((2, 3, 4), 0.25, dtype=torch.float64)
    w[1, 2, 0] = 1e-40
    out = negligible_to_zero(w)
    assert out[1, 2, 0] == 0 and (out != 0).sum() == w.numel() - 1


def test_kept_weights_keep_their_gradient_and_dropped_ones_get_none():
    w = torch.tensor([0.7, 0.3, 1e-30, 1e-20], dtype=torch.float32, requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    (negligible_to_zero(w) * c).sum().backward()
    assert torch.equal(w.grad, torch.tensor([1.0, 2.0, 0.0, 0.0]))


def test_non_finite_weights_pass_through_for_the_callers_checks():
    w = torch.tensor([[0.5, float("nan"), 0.5], [float("inf"), 0.1, 0.2]])
    out = negligible_to_zero(w)
    assert torch.isnan(out[0, 1]) and torch.isinf(out[1, 0])


def _bnn_run(scale, n_rows=50, divergence=None, compile=False):
    X, y, g = make_sinusoid_tasks(1, n_rows, random_state=0)
    est = MetaBNNRegressor(Renyi(0.5, learnable=False) if divergence is None else divergence,
                           hidden_layer_sizes=(20, 20), likelihood="homoskedastic",
                           n_particles=10, inner_optimizer="adam", inner_lr=1e-2,
                           init_scale=scale, normalize_y=False, dtype="float32", random_state=0,
                           compile=compile)
    est._setup_torch()
    _, run, _, _ = est._adaptation([(X, y)], [np.random.RandomState(0)])
    return run


def _count_in_steps(run, n_steps=20):
    mode = _CountSubnormals()
    with mode:
        for _ in range(n_steps):
            run.step()
    assert mode.n_calls > 0
    return mode.count


def _exact_weights(monkeypatch):
    """Undo the masks: the exact weights and log-sum-exps, as before the masks existed."""
    for module in (_inner, _compiled):
        monkeypatch.setattr(module, "negligible_to_zero", lambda w: w)
    for module in (_inner, _compiled_meta):
        monkeypatch.setattr(module, "significant_weights", lambda weights, log_w: weights(log_w))
    monkeypatch.setattr(_meta_losses, "significant_logsumexp", torch.logsumexp)


def _compiled_paths_run_eagerly(monkeypatch):
    """``compile=True`` / ``"meta_fit"`` take the compiled paths' functions, uncompiled."""
    monkeypatch.setattr(_compiled, "_get_compiled", lambda cpp_wrapper=False: _compiled._plain_step)
    monkeypatch.setattr(
        _compiled_meta, "_get_compiled",
        lambda with_init, cpp_wrapper=False: (_compiled_meta._meta_gradient_eta_init if with_init
                           else _compiled_meta._meta_gradient_eta))


@pytest.mark.parametrize("divergence,scale,compile", [
    (None, 0.1, False), (LocalRenyi(0.5, learnable=False), 0.3, False), (None, 0.1, True),
], ids=["renyi-fast-path", "local-renyi-per-row-path", "compiled-step-function"])
def test_no_subnormal_reaches_a_matmul_of_a_float32_step(monkeypatch, divergence, scale,
                                                          compile):
    # With q's sd at 0.1 the log weights of 10 particles spread over hundreds of nats
    # (per row: over tens of nats, hence 0.3).
    _compiled_paths_run_eagerly(monkeypatch)
    masked = _count_in_steps(_bnn_run(scale, divergence=divergence, compile=compile))
    _exact_weights(monkeypatch)
    before = _count_in_steps(_bnn_run(scale, divergence=divergence, compile=compile))
    assert before > 100  # the configuration does make subnormals without the mask
    assert masked == 0


def _meta_trainer(divergence=None, compile=False, dtype="float32"):
    X, y, g = make_sinusoid_tasks(4, 60, random_state=0)
    est = MetaBNNRegressor(Renyi(0.5) if divergence is None else divergence,
                           hidden_layer_sizes=(20, 20), n_particles=10,
                           n_inner_steps=3, n_tasks_per_batch=4, inner_optimizer="adam",
                           inner_lr=1e-2, init_scale=0.1, normalize_y=False, dtype=dtype,
                           random_state=0, compile=compile)
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
    return est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))


@pytest.mark.parametrize("compile", [False, "meta_fit"], ids=["eager", "compiled-function"])
def test_no_subnormal_reaches_a_matmul_of_a_meta_iteration(monkeypatch, compile):
    # The inner directions' weights, their derivative in the double backward and the
    # meta-loss's log-sum-exp over particles (the predictive density) are all masked.
    _compiled_paths_run_eagerly(monkeypatch)

    def count(tr):
        mode = _CountSubnormals()
        with mode:
            for _ in range(3):
                tr.step()
        return mode.count

    masked = count(_meta_trainer(compile=compile))
    _exact_weights(monkeypatch)
    before = count(_meta_trainer(compile=compile))
    assert before > 100
    assert masked == 0


@pytest.mark.parametrize("divergence", [Renyi(0.5, learnable=False), FDivergence(-1.0),
                                        NeuralF((4,), init_alpha=0.5)],
                         ids=["renyi", "f-decreasing-g", "neural-f"])
def test_masked_direction_is_the_exact_one_to_float32_rounding(monkeypatch, divergence):
    run = _bnn_run(0.1, divergence=divergence)
    for _ in range(5):  # spread the log weights
        run.step()
    model, tasks = run.model, run.tasks
    params = {k: v.detach() for k, v in run.params.items()}
    eps = model.sample_eps(params, tasks, run.n_particles,
                           generator=torch.Generator().manual_seed(3))

    def direction():
        leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        d, _ = inner_direction(model, divergence, leaf, tasks, eps, create_graph=False)
        return d

    with torch.no_grad():
        z = model.rsample(params, tasks, eps)
        log_w = model.log_p(params, tasks, z) - model.log_q(params, tasks, z)
        dropped = negligible_to_zero(divergence.particle_weights(log_w)) == 0
    assert dropped.any()  # the comparison below is not trivial

    masked = direction()
    _exact_weights(monkeypatch)
    exact = direction()
    for k in masked:
        scale = exact[k].abs().max()
        assert scale > 0
        err = float((masked[k] - exact[k]).abs().max() / scale)
        assert err < 1e-6, (k, err)


def test_significant_logsumexp_is_logsumexp_with_the_negligible_gradient_zeroed():
    x = torch.tensor([[0.0, -1.0, -80.0, -200.0], [5.0, 5.0, 5.0, 5.0]], dtype=torch.float32,
                     requires_grad=True)
    out = significant_logsumexp(x, -1)
    ref = torch.logsumexp(x.detach(), -1)
    assert torch.allclose(out, ref, rtol=0, atol=1e-6)
    out.sum().backward()
    soft = torch.softmax(x.detach(), -1)
    expected = soft.masked_fill(soft < torch.finfo(torch.float32).eps ** 2, 0.0)
    torch.testing.assert_close(x.grad, expected)
    assert x.grad[0, 2] == 0 and x.grad[0, 3] == 0 and x.grad[0, 1] > 0


def test_significant_logsumexp_keeps_infinite_rows():
    x = torch.tensor([[-float("inf")] * 3, [float("inf"), 0.0, 1.0], [1.0, 2.0, 3.0]],
                     dtype=torch.float64, requires_grad=True)
    out = significant_logsumexp(x, 1)
    torch.testing.assert_close(out, torch.logsumexp(x.detach(), 1))
    # The callers' padding pattern: a masked row of -inf gets a zero gradient (torch.logsumexp's
    # is NaN); a +inf row NaN in the entry that is +inf, as torch.logsumexp's.
    keep = torch.tensor([False, False, True])
    torch.where(keep, out, torch.zeros_like(out)).sum().backward()
    assert torch.equal(x.grad[0], torch.zeros(3, dtype=torch.float64))
    assert torch.isnan(x.grad[1, 0]) and torch.equal(x.grad[1, 1:], torch.zeros(2).double())
    torch.testing.assert_close(x.grad[2], torch.softmax(x.detach()[2], 0))


def test_significant_weights_take_no_derivative_through_dropped_particles():
    log_w = torch.tensor([[0.0, -1.0, -100.0]], dtype=torch.float64, requires_grad=True)
    eps2 = torch.finfo(torch.float64).eps ** 2
    alpha = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def weights(lw):
        return torch.softmax((1 - alpha) * lw * 3, -1)  # the last weight is ~1e-65

    w = significant_weights(weights, log_w)
    exact = weights(log_w.detach())
    assert w[0, 2] == 0 and exact[0, 2] < eps2
    torch.testing.assert_close(w[0, :2], exact[0, :2], rtol=1e-15, atol=0)
    (w * torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).sum().backward()
    assert log_w.grad[0, 2] == 0 and log_w.grad[0, 0] != 0
    assert alpha.grad != 0  # still differentiable in eta


@pytest.mark.parametrize("make", [
    lambda: Renyi(0.5), lambda: Renyi(2.0), lambda: FDivergence(-3.0, normalize=False),
    lambda: FDivergence(-3.0), lambda: NeuralF((4,), init_alpha=2.0),
], ids=["renyi-0.5", "renyi-2", "f-decreasing-unnormalised", "f-decreasing", "neural-f"])
def test_significant_weights_gradient_is_the_exact_one(make):
    # A decreasing g: the particle with the largest p/q gets a negligible weight of its own
    # (below float32's eps**2 of the largest) but sets softmax(log_w)'s normaliser; its
    # derivative must stay.  The same operations with and without the cut: equal to rounding.
    torch.manual_seed(0)
    div = make()
    with torch.no_grad():
        for p in div.parameters():
            p.add_(0.3 * torch.randn_like(p))
    log_w = torch.tensor([[0.0, -0.5, -1.0, 11.0], [0.0, -2.0, -200.0, -1.0]],
                         requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0, 4.0])
    eta = [p for p in div.parameters() if p.requires_grad]

    def grads(weights):
        out = (c * weights(log_w)).sum()
        return torch.autograd.grad(out, [log_w, *eta])

    assert _inner._negligible(div.particle_weights(log_w.detach())).any()
    masked = grads(lambda lw: significant_weights(div.particle_weights, lw))
    exact = grads(div.particle_weights)
    for m, e in zip(masked, exact):
        scale = e.abs().max().clamp(min=1e-30)
        assert float((m - e).abs().max() / scale) < 1e-5


@pytest.mark.parametrize("divergence", [None, NeuralF((4,), init_alpha=0.5)],
                         ids=["renyi", "neural-f"])
def test_meta_gradient_is_the_exact_one(monkeypatch, divergence):
    # float64, where the masks drop weights below 4.9e-32 of the largest: the log weights of
    # this configuration spread over hundreds of nats, so they do drop some (counted).
    n_dropped = []
    mask = _inner._negligible

    def counting(w):
        out = mask(w)
        n_dropped.append(int(out.sum()))
        return out

    monkeypatch.setattr(_inner, "_negligible", counting)

    def eta_grads():
        div = None if divergence is None else NeuralF((4,), init_alpha=0.5)
        tr = _meta_trainer(divergence=div, dtype="float64")
        tr.step()  # the update spreads the log weights; the second iteration's gradient:
        tr.step()
        return [p.grad.clone() for p in tr.eta]

    masked = eta_grads()
    assert sum(n_dropped) > 0
    _exact_weights(monkeypatch)
    exact = eta_grads()
    # Relative to the largest: NeuralF's biases cancel in its normalised weights (~1e-18).
    scale = max(float(e.abs().max()) for e in exact)
    assert scale > 0
    for m, e in zip(masked, exact):
        torch.testing.assert_close(m, e, rtol=1e-9, atol=1e-12 * scale)
