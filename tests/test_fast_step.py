"""The plain (non-differentiable) VI step: trimmed eager path and the compiled step.

The eager step of ``fit`` skips the masking of finite log weights, takes the
monitoring bound from the log weights already computed, checks finiteness in
one pass and updates Adam with ``torch._foreach_*``: the parameters must stay
those of the straightforward implementation kept here (:func:`_reference_run`).
The compiled step (``compile=True``) must agree with the eager one to float32
rounding, and every configuration it does not cover must run eagerly.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import warnings

import numpy as np
import pytest
import torch

from skmetavi import MetaBNNRegressor, _compiled
from skmetavi._inner import VIRun
from skmetavi._optim import SGD, Adam
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import KL, NeuralF, Renyi, TailAdaptive
from skmetavi.models import BNNRegression
from skmetavi.models._bnn import ACTIVATIONS

FAST = dict(hidden_layer_sizes=(6, 5), likelihood="homoskedastic", n_particles=4,
            init_scale=0.05, normalize_y=False, random_state=0)


def _tasks(sizes=(12, 7)):
    X, y, g = make_sinusoid_tasks(len(sizes), max(sizes), random_state=1)
    return [(X[g == t][:n], y[g == t][:n]) for t, n in enumerate(sizes)]


def _run(divergence, optimizer, dtype="float64", sizes=(12, 7), **kw):
    est = MetaBNNRegressor(divergence, inner_optimizer=optimizer, inner_lr=1e-2, dtype=dtype,
                           **{**FAST, **kw})
    est._setup_torch()
    data = _tasks(sizes)
    _, run, _, _ = est._adaptation(data, [np.random.RandomState(i) for i in range(len(data))])
    return run


def _reference_run(run, n_steps):
    """The previous maths of ``VIRun.step`` (no rollback): masks, two-pass bound, per-tensor Adam."""
    model, divergence, opt = run.model, run.divergence, run.optimizer
    params = {k: v.clone() for k, v in run.params.items()}
    state = copy.deepcopy(run.state)
    gen = copy.deepcopy(run.generator)
    bounds = []
    for _ in range(n_steps):
        eps = model.sample_eps(params, run.tasks, run.n_particles, generator=gen)
        leaf = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        z = model.rsample(leaf, run.tasks, eps)
        log_p = model.log_p(leaf, run.tasks, z)
        log_q = model.log_q_reparameterised(leaf, run.tasks, eps)
        log_w = log_p - log_q
        keep = torch.isfinite(log_w).all(-1).all(-1).reshape(-1, 1, 1)
        w = divergence.particle_weights(torch.where(keep, log_w, torch.zeros_like(log_w)))
        w = torch.where(keep, w, torch.zeros_like(w))
        keys = list(leaf)
        grads = torch.autograd.grad(log_w, [leaf[k] for k in keys], grad_outputs=w)
        with torch.no_grad():
            bounds.append(divergence.bound(log_p, log_q)[:, 0])
        if isinstance(opt, SGD):
            params = {k: params[k] + opt.lr * state["lr_scale"].reshape(-1, *[1] * (g.ndim - 1))
                      * g for k, g in zip(keys, grads)}
            continue
        b1, b2 = opt.betas
        step = state["step"] + 1
        c1, c2 = 1 - b1**step, 1 - b2**step
        a = opt.lr * state["lr_scale"] * torch.sqrt(c2) / c1
        e = c2 * opt.eps**2
        new = {}
        for k, g in zip(keys, grads):
            shape = (-1,) + (1,) * (g.ndim - 1)
            m = torch.lerp(g, state["m"][k], b1)
            v = torch.addcmul(b2 * state["v"][k], g, g, value=1 - b2)
            new[k] = torch.addcdiv(params[k], a.reshape(shape) * m, torch.sqrt(v + e.reshape(shape)))
            state["m"][k], state["v"][k] = m, v
        state["step"] = step
        params = new
    return params, torch.stack(bounds)


@pytest.mark.parametrize("divergence,optimizer", [
    (Renyi(0.5, learnable=False), "adam"),
    (Renyi(2.0, learnable=False), "sgd"),
    (KL(), "adam"),
    (Renyi(1.0, learnable=False), "adam"),  # the bound's series branch: the general path
    (Renyi(0.7), "adam"),  # learnable: no graph to eta on this path, and no warning
], ids=["renyi-adam", "renyi2-sgd", "kl-adam", "renyi1-adam", "renyi-learnable"])
def test_trimmed_eager_step_equals_reference(divergence, optimizer):
    run = _run(divergence, optimizer)
    run.divergence = divergence.to(torch.float64)
    ref_params, ref_bounds = _reference_run(run, 5)
    bounds = torch.stack([run.step() for _ in range(5)])
    for k, v in ref_params.items():
        torch.testing.assert_close(run.params[k], v, rtol=1e-13, atol=0, msg=k)
    torch.testing.assert_close(bounds, ref_bounds, rtol=1e-12, atol=0)


def test_adam_foreach_update_is_bitwise_the_differentiable_one():
    opt = Adam(0.01)
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(3, 5, generator=g), "loc": torch.randn(3, 4, 2, generator=g),
              "b": torch.randn(3, 1, generator=g)}
    state = opt.init(params, local=("loc",))
    state["lr_scale"] = torch.tensor([1.0, 0.5, 0.25])
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        fast, fast_state = opt.update(params, direction, state)  # no grad: foreach path
        leaf = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        slow, slow_state = opt.update(leaf, direction, state)  # graph: per-tensor path
        for k in params:
            assert torch.equal(fast[k], slow[k].detach()), k
            assert torch.equal(fast_state["m"][k], slow_state["m"][k].detach()), k
            assert torch.equal(fast_state["v"][k], slow_state["v"][k].detach()), k
        assert torch.equal(fast_state["count"]["loc"], slow_state["count"]["loc"])
        params, state = fast, fast_state


def test_fast_path_rolls_back_non_finite_task():
    run = _run(Renyi(0.5, learnable=False), "adam")
    run.step()
    before = {k: v.clone() for k, v in run.params.items()}
    run.params["loc"][1, 0] = float("nan")  # task 1 poisoned
    with pytest.warns(RuntimeWarning, match="rolled back"):
        bound = run.step()
    assert torch.isnan(bound[1]) and torch.isfinite(bound[0])
    assert torch.equal(run.state["lr_scale"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    assert not torch.equal(run.params["loc"][0], before["loc"][0])  # task 0 moved on
    assert torch.equal(run.params["scale_raw"][1], before["scale_raw"][1])  # task 1 kept
    assert run.failures.tolist() == [0, 1]
    run.params["loc"][1, 0] = 0.0
    run.step()  # finite again: the failure count resets
    assert run.failures.tolist() == [0, 0]


def _compiled_run(run):
    return VIRun(run.model, run.divergence, run.optimizer, dict(run.params),
                 copy.deepcopy(run.state), run.tasks, n_particles=run.n_particles,
                 generator=copy.deepcopy(run.generator), compile=True)


def test_compile_unsupported_configuration_runs_eagerly():
    run = _run(Renyi(0.5, learnable=False), "adam", batch_size=4)
    with pytest.warns(RuntimeWarning, match="not supported here: batch_size"):
        crun = VIRun(run.model, run.divergence, run.optimizer, dict(run.params),
                     copy.deepcopy(run.state), run.tasks, n_particles=run.n_particles,
                     generator=copy.deepcopy(run.generator), batch_size=4, compile=True)
    assert crun._compiled is None
    for _ in range(2):
        run.step(), crun.step()
    for k, v in run.params.items():
        assert torch.equal(crun.params[k], v), k


def test_compile_failure_falls_back_to_eager_with_the_same_noise(monkeypatch):
    def broken(cpp_wrapper=False):
        def fail(*args, **kwargs):
            raise RuntimeError("no compiler here")
        return fail

    monkeypatch.setattr(_compiled, "_get_compiled", broken)
    run = _run(Renyi(0.5, learnable=False), "adam")
    crun = _compiled_run(run)
    with pytest.warns(RuntimeWarning, match="compiled inner step failed"):
        crun.step()
    assert crun._compiled is None
    run.step()
    for _ in range(2):
        run.step(), crun.step()
    for k, v in run.params.items():
        assert torch.equal(crun.params[k], v), k


def test_a_failing_cpp_wrapper_is_retried_without_it(monkeypatch):
    calls = []

    def compiled(cpp_wrapper=False):
        calls.append(cpp_wrapper)
        if cpp_wrapper:
            def fail(*args, **kwargs):
                raise RuntimeError("C++ compile error")
            return fail
        return _compiled._plain_step  # run eagerly: the same maths

    monkeypatch.setattr(_compiled, "_get_compiled", compiled)
    run = _run(Renyi(0.5, learnable=False), "adam")
    crun = _compiled_run(run)
    assert crun._compiled.cpp_wrapper
    for _ in range(3):
        run.step(), crun.step()  # no warning (warnings are errors here)
    assert calls == [True, False, False, False] and crun._compiled is not None
    assert not crun._compiled.cpp_wrapper
    for k, v in run.params.items():
        torch.testing.assert_close(crun.params[k], v, rtol=1e-12, atol=1e-12)


def test_cpp_wrapper_is_for_cpu_steps_unless_the_environment_chooses(monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CPP_WRAPPER", raising=False)
    assert _compiled.wants_cpp_wrapper("cpu")
    assert not _compiled.wants_cpp_wrapper("meta")
    assert not _compiled.wants_cpp_wrapper(torch.device("cuda", 0))
    monkeypatch.setenv("TORCHINDUCTOR_CPP_WRAPPER", "0")
    assert not _compiled.wants_cpp_wrapper("cpu")


@pytest.mark.parametrize("n_features", [1, 3])
@pytest.mark.parametrize("hidden", [(), (5,), (6, 4)])
@pytest.mark.parametrize("likelihood", ["homoskedastic", "heteroskedastic"])
def test_fusable_forward_equals_the_eager_forward(n_features, hidden, likelihood):
    """The BNN forward the compiled step traces (``h @ W + b``, a pointwise first layer)."""
    bnn = BNNRegression(hidden, activation="tanh", likelihood=likelihood)
    g = torch.Generator().manual_seed(0)
    M, K, n = 2, 3, 7
    z = torch.randn(M, K, bnn.n_latent(n_features), generator=g, dtype=torch.float64,
                    requires_grad=True)
    X = torch.randn(M, n, n_features, generator=g, dtype=torch.float64)
    params = {"log_noise": torch.zeros(M, 1, dtype=torch.float64)}
    eager = bnn.forward(z, X, params)
    fused = bnn._forward_fusable(ACTIVATIONS["tanh"], z, X, params, bnn.layer_shapes(n_features))
    for e, f in zip(eager, fused):
        assert f.shape == e.shape == (M, K, n)
        torch.testing.assert_close(f, e, rtol=1e-12, atol=1e-12)
    w = torch.randn(M, K, n, generator=g, dtype=torch.float64)
    ge, = torch.autograd.grad((eager[0] * w).sum() + eager[1].sum(), z)
    gf, = torch.autograd.grad((fused[0] * w).sum() + fused[1].sum(), z)
    torch.testing.assert_close(gf, ge, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compiled_step_agrees_with_eager(dtype):
    run = _run(Renyi(0.5, learnable=False), "adam", dtype=dtype)
    crun = _compiled_run(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the compiler's own warnings, if any
        cb = torch.stack([crun.step() for _ in range(4)])
    assert crun._compiled is not None and not crun._compiled.failed
    eb = torch.stack([run.step() for _ in range(4)])
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == "float32" else dict(rtol=1e-10, atol=1e-12)
    for k, v in run.params.items():
        torch.testing.assert_close(crun.params[k], v, **tol, msg=k)
    torch.testing.assert_close(cb, eb, rtol=tol["rtol"], atol=1e-3 if dtype == "float32" else 1e-8)
    # Rollback on the compiled path: a poisoned task keeps its parameters.
    crun.params["loc"][1, 0] = float("nan")
    kept = crun.params["scale_raw"][1].clone()
    with pytest.warns(RuntimeWarning, match="rolled back"):
        bound = crun.step()
    assert torch.isnan(bound[1]) and torch.isfinite(bound[0])
    assert torch.equal(crun.params["scale_raw"][1], kept)
    assert float(crun.state["lr_scale"][1]) == 0.5


@pytest.mark.slow
def test_estimator_compile_option_fits_like_eager():
    X, y = _tasks((15,))[0]
    eager = MetaBNNRegressor("renyi", max_iter=3, dtype="float32", **FAST).fit(X, y)
    calls = []
    compiled_call = _compiled.CompiledStep.__call__

    def counting(self, *args):
        out = compiled_call(self, *args)
        calls.append(out is not None)  # None: it fell back to the eager step
        return out

    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's own compile-time notices
        warnings.filterwarnings("error", message="compile=True")  # no fallback here
        mp.setattr(_compiled.CompiledStep, "__call__", counting)
        comp = MetaBNNRegressor("renyi", max_iter=3, dtype="float32", compile=True,
                                **FAST).fit(X, y)
    assert calls == [True] * 3  # every step ran compiled
    assert comp.get_params()["compile"] is True
    for k, v in eager.variational_params_.items():
        np.testing.assert_allclose(comp.variational_params_[k].numpy(), v.numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_compiled_step_sees_a_changed_global_of_the_users_log_density():
    """Guards on the user's globals are kept: a changed module constant recompiles."""
    from skmetavi import MetaDivergenceVI

    namespace = {"SHIFT": 0.0}
    exec("def log_joint(z, X, y):\n    return -0.5 * ((z - SHIFT) ** 2).sum(-1)", namespace)

    def fit(compile):
        est = MetaDivergenceVI(model=namespace["log_joint"], n_latent=1, n_particles=8,
                               max_iter=50, inner_lr=0.1, inner_optimizer="adam",
                               compile=compile, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            warnings.filterwarnings("error", message="compile=True")
            return float(est.fit(np.zeros((5, 1))).variational_params_["loc"][0, 0])

    first = fit(True)
    namespace["SHIFT"] = 3.0
    assert fit(True) == pytest.approx(fit(False), abs=1e-10)
    assert fit(True) - first > 2.5  # it followed the new constant (loc ~ 3.16)


@pytest.mark.parametrize("make", [
    lambda: NeuralF((4,), init_alpha=0.5),  # a learned meta-f divergence, adapting a new task
    lambda: TailAdaptive(),
], ids=["neural_f", "tail_adaptive"])
def test_compiled_step_takes_the_path_derivative_like_eager(make):
    """Eq. (8) on the compiled path: d l / d z at fixed phi, pulled back through z."""
    run = _run(make(), "adam")
    assert run.divergence.path_derivative
    crun = _compiled_run(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("error", message="compile")
        cb = torch.stack([crun.step() for _ in range(5)])
    assert crun._compiled is not None and not crun._compiled.failed
    eb = torch.stack([run.step() for _ in range(5)])
    for k, v in run.params.items():
        torch.testing.assert_close(crun.params[k], v, rtol=1e-10, atol=1e-12, msg=k)
    torch.testing.assert_close(cb, eb, rtol=1e-10, atol=1e-10)
    moved = float((run.params["loc"] - _run(make(), "adam").params["loc"]).abs().max())
    assert moved > 1e-4  # the steps did something, on both paths alike
