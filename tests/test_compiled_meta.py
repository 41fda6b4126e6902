"""The compiled meta-iteration (``compile="meta_fit"``) against the eager engine.

Same seed, float64: the meta-losses, eta's meta-gradients, the stored phi_i
(Algorithm 1) or the learned initialisation (Algorithm 2) and the inner-loss
curve must agree with the eager ``create_graph=True`` path to rounding, at
every iteration; what the compiled path does not cover must warn and run
eagerly; a compilation failure must fall back with the same noise.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import warnings

import numpy as np
import pytest
import torch

from skmetavi import MetaBNNRegressor, _compiled_meta
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import KL, NeuralF, Renyi

SMALL = dict(hidden_layer_sizes=(6,), n_particles=4, n_inner_steps=2, n_tasks_per_batch=4,
             inner_lr=1e-2, dtype="float64", random_state=0)


def _data(n_tasks=6, n_rows=16):
    return make_sinusoid_tasks(n_tasks, n_rows, random_state=0)


def _trainer(compile, divergence=None, **kw):
    est = MetaBNNRegressor(Renyi(0.7) if divergence is None else divergence,
                           **{**SMALL, "inner_optimizer": "adam", **kw}, compile=compile)
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(*_data())
    return est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))


def _no_fallback():
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    warnings.simplefilter("ignore", UserWarning)  # torch's own compile-time notices
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("error", message="compile")
    return ctx


def _assert_same_run(n_iter=3, divergence=None, **kw):
    make = (lambda: None) if divergence is None else divergence
    eager, comp = _trainer(False, make(), **kw), _trainer("meta_fit", make(), **kw)
    assert comp._compiled is not None
    ctx = _no_fallback()
    try:
        for _ in range(n_iter):
            j_e, j_c = eager.step(), comp.step()
            assert j_c == pytest.approx(j_e, rel=1e-10)
            for pe, pc in zip(eager.eta, comp.eta):
                np.testing.assert_allclose(pc.grad.numpy(), pe.grad.numpy(), rtol=1e-8,
                                           atol=1e-12)
    finally:
        ctx.__exit__(None, None, None)
    assert comp._compiled is not None  # every iteration ran compiled
    for pe, pc in zip(eager.eta, comp.eta):
        np.testing.assert_allclose(pc.detach().numpy(), pe.detach().numpy(), rtol=1e-9,
                                   atol=1e-8)
    if eager.learn_init:
        for k, v in eager.init_params.items():
            np.testing.assert_allclose(comp.init_params[k].detach().numpy(),
                                       v.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
    else:
        for k, v in eager.task_params.items():
            np.testing.assert_allclose(comp.task_params[k].numpy(), v.numpy(), rtol=1e-9,
                                       atol=1e-12, err_msg=k)
    np.testing.assert_allclose(comp.inner_loss_curve, eager.inner_loss_curve, rtol=1e-10)
    return eager, comp


def test_compiled_meta_iteration_matches_eager_algorithm_1():
    eager, comp = _assert_same_run()
    # Something is learned, on both paths alike: alpha moved off 0.7.
    assert abs(float(comp.divergence.alpha) - 0.7) > 1e-3
    assert all(float(p.grad.abs().max()) > 1e-8 for p in comp.eta)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(meta_learn_init=True, inner_optimizer="sgd"),  # Algorithm 2, init gradients
    dict(multi_step_loss=True),
    dict(task_chunk_size=3),  # chunks of 3 and 1 tasks: two shapes
])
def test_compiled_meta_iteration_matches_eager(kw):
    _assert_same_run(**kw)


def test_compiled_meta_iteration_matches_eager_meta_f_algorithm_2():
    """The path-derivative direction and the init's meta-gradient, in the default run."""
    start = _trainer(False, NeuralF((4,), init_alpha=0.7), meta_learn_init=True,
                     inner_optimizer="sgd").init_params
    _, comp = _assert_same_run(divergence=lambda: NeuralF((4,), init_alpha=0.7),
                               meta_learn_init=True, inner_optimizer="sgd")
    assert comp.divergence.path_derivative
    moved = [float((v - start[k]).detach().abs().max()) for k, v in comp.init_params.items()]
    assert max(moved) > 1e-4


@pytest.mark.slow
def test_compiled_meta_iteration_learns_only_the_init_of_a_fixed_divergence():
    start = _trainer(False, KL(), meta_learn_init=True).init_params
    _, comp = _assert_same_run(divergence=KL, meta_learn_init=True)
    assert not comp.eta
    moved = [float((v - start[k]).detach().abs().max()) for k, v in comp.init_params.items()]
    assert max(moved) > 1e-4


@pytest.mark.parametrize("kw, why", [
    (dict(meta_gradient="first_order"), "meta_gradient='first_order'"),
    (dict(batch_size=4), "batch_size"),
    (dict(meta_loss=lambda q, X, y: q.entropy()), "CallableMetaLoss"),
    (dict(divergence="local_renyi"), "local divergence"),
])
def test_unsupported_meta_iterations_warn_and_run_eagerly(kw, why):
    with pytest.warns(RuntimeWarning, match=f"compile is not supported.*{why}"):
        tr = _trainer("meta_fit", **kw)
    assert tr._compiled is None
    tr.step()  # the eager path


def test_settings_changed_after_construction_fall_back_to_eager():
    tr = _trainer("meta_fit")
    tr.mode = "first_order"
    with pytest.warns(RuntimeWarning, match="not supported .* any more.*first_order"):
        tr.step()
    assert tr._compiled is None


def test_nothing_to_meta_learn_is_not_compiled():
    est = MetaBNNRegressor(Renyi(0.7), **SMALL, meta_learn_init=False, compile="meta_fit")
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(*_data())
    frozen = est._meta_divergence(False).requires_grad_(False)  # the estimator refuses this
    with pytest.warns(RuntimeWarning, match="nothing is meta-learned"):
        tr = est._meta_trainer(bnn, support, query, gen, frozen)
    assert tr._compiled is None


def test_compilation_failure_falls_back_with_the_same_noise(monkeypatch):
    def broken(with_init, cpp_wrapper=False):
        def fn(*args):
            raise RuntimeError("inductor exploded")
        return fn

    eager = _trainer(False)
    comp = _trainer("meta_fit")
    monkeypatch.setattr(_compiled_meta, "_get_compiled", broken)
    with pytest.warns(RuntimeWarning, match="meta-iteration failed.*inductor exploded"):
        j_c = comp.step()
    assert comp._compiled is None  # eager from now on
    assert j_c == eager.step()  # the draws were replayed: the same iteration exactly
    assert comp.step() == eager.step()


def test_a_failing_cpp_wrapper_is_retried_without_it(monkeypatch):
    calls = []

    def compiled(with_init, cpp_wrapper=False):
        calls.append(cpp_wrapper)
        if cpp_wrapper:
            def fn(*args):
                raise RuntimeError("C++ compile error")
            return fn
        # Run the compiled path's own function eagerly: the same maths, no compile.
        return (_compiled_meta._meta_gradient_eta_init if with_init
                else _compiled_meta._meta_gradient_eta)

    monkeypatch.setattr(_compiled_meta, "_get_compiled", compiled)
    eager, comp = _trainer(False), _trainer("meta_fit")
    assert comp._compiled.cpp_wrapper
    for _ in range(2):
        j_c, j_e = comp.step(), eager.step()  # no warning (warnings are errors here)
        assert j_c == pytest.approx(j_e, rel=1e-10)
    assert calls == [True, False, False]
    assert comp._compiled is not None and not comp._compiled.cpp_wrapper


@pytest.mark.parametrize("compile, fit_compiled, meta_compiled", [
    (False, False, False), ("fit", True, False), ("meta_fit", False, True), (True, True, True),
])
def test_compile_option_selects_what_is_compiled(compile, fit_compiled, meta_compiled):
    tr = _trainer(compile)
    assert (tr._compiled is not None) is meta_compiled
    est = MetaBNNRegressor(Renyi(0.7), **SMALL, compile=compile)
    est._setup_torch()
    X, y, g = _data()
    _, run, _, _ = est._adaptation([(X[g == 0], y[g == 0])], [np.random.RandomState(0)])
    assert (run._compiled is not None) is fit_compiled


def test_compile_option_rejects_other_values():
    X, y, g = _data()
    with pytest.raises(ValueError, match="compile"):
        MetaBNNRegressor(**SMALL, compile="always").meta_fit(X, y, groups=g)


@pytest.mark.slow
@pytest.mark.parametrize("meta_loss", ["d_half", "tv"])
def test_estimator_meta_fit_compiled_on_a_quadrature_loss_matches_eager(meta_loss):
    """MetaDivergenceVI on 1-D mixtures (Table 1's setting): the quadrature meta-loss, SGD."""
    from skmetavi import MetaDivergenceVI
    from skmetavi.datasets import make_mog_tasks

    X, groups = make_mog_tasks(6, random_state=0)
    params = dict(model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd",
                  n_particles=16, max_meta_iter=5, max_iter=20, meta_loss=meta_loss,
                  random_state=0)
    eager = MetaDivergenceVI(**params).meta_fit(X, groups=groups)
    calls = []
    call = _compiled_meta.CompiledMetaStep.__call__

    def counting(self, *args):
        out = call(self, *args)
        calls.append(out is not None)
        return out

    ctx = _no_fallback()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(_compiled_meta.CompiledMetaStep, "__call__", counting)
            comp = MetaDivergenceVI(**params, compile="meta_fit").meta_fit(X, groups=groups)
    finally:
        ctx.__exit__(None, None, None)
    assert calls == [True] * 5
    np.testing.assert_allclose(comp.meta_loss_curve_, eager.meta_loss_curve_, rtol=1e-10)
    assert comp.meta_divergence_.alpha == pytest.approx(eager.meta_divergence_.alpha, rel=1e-10)
    assert comp.meta_divergence_.alpha != pytest.approx(0.5, abs=1e-3)  # it learned
