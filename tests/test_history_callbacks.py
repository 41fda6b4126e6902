"""history_ / meta_history_, callbacks (EarlyStopping, callables), progress, blow-up warnings."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import math
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import ConvergenceWarning

import skmetavi
from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.callbacks import Callback, EarlyStopping, History
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.estimators import _loop
from skmetavi.experiments import _mog, _report

MOG = dict(
    model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=16,
    max_iter=20, random_state=0,
)
FAST_BNN = dict(hidden_layer_sizes=(8,), n_particles=4, n_predict_samples=8, random_state=0)


@pytest.fixture(scope="module")
def mog():
    return make_mog_tasks(4, random_state=0)


@pytest.fixture(scope="module")
def sinusoid():
    X, y, _ = make_sinusoid_tasks(1, 50, random_state=0)
    return X, y


def _interrupt_outer_step(monkeypatch, n):
    """Ctrl-C inside the ``n``-th outer step from now on."""
    step = skmetavi._bilevel.MetaTrainer.step
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(skmetavi._bilevel.MetaTrainer, "step", interrupting)


def _without_time(history):
    return [{k: v for k, v in r.items() if k != "time"} for r in history]


# ------------------------------------------------------------------ History
def test_history_column_access():
    h = History([{"iteration": 1, "loss": 3.0}, {"iteration": 2, "loss": 2.0, "score": 5.0}])
    assert h[:, "loss"] == [3.0, 2.0]
    assert h[:, "score"] == [5.0]  # only the rows that have it
    assert h[:, ("iteration", "score")] == [(2, 5.0)]
    assert h[0, "loss"] == 3.0 and h[-1, ("iteration", "loss")] == (2, 2.0)
    assert isinstance(h[1:], History) and h[1:][:, "loss"] == [2.0]
    assert h[0] == {"iteration": 1, "loss": 3.0}
    with pytest.raises(KeyError, match="None of the 2 selected records has a column"):
        h[:, "meta_loss"]
    restored = pickle.loads(pickle.dumps(h))
    assert isinstance(restored, History) and restored == h


# ------------------------------------------------------------------ fit
def test_fit_history_matches_loss_curve(sinusoid):
    est = MetaBNNRegressor(**FAST_BNN, max_iter=15).fit(*sinusoid)
    assert isinstance(est.history_, History) and len(est.history_) == est.n_iter_ == 15
    assert est.history_[:, "iteration"] == list(range(1, 16))
    np.testing.assert_array_equal(est.history_[:, "loss"], est.loss_curve_)
    assert all(set(r) == {"iteration", "loss", "time"} and r["time"] >= 0 for r in est.history_)


def test_user_callable_receives_records_and_stops_fit_cleanly(sinusoid):
    seen = []

    def stop_at_5(estimator, record):
        seen.append((estimator, dict(record)))
        return record["iteration"] == 5

    est = MetaBNNRegressor(**FAST_BNN, max_iter=30, callbacks=[stop_at_5])
    est.fit(*sinusoid)  # no warning (the suite turns warnings into errors)
    assert est.n_iter_ == 5 and est.loss_curve_.shape == (5,) and len(est.history_) == 5
    assert all(e is est for e, _ in seen)
    assert [r for _, r in seen] == list(est.history_)
    # Exactly the state of a 5-iteration fit.
    ref = MetaBNNRegressor(**FAST_BNN, max_iter=5).fit(*sinusoid)
    for key, t in ref.variational_params_.items():
        torch.testing.assert_close(est.variational_params_[key], t, rtol=0, atol=0)
    np.testing.assert_array_equal(est.predict(sinusoid[0]), ref.predict(sinusoid[0]))


def test_fit_warm_start_appends_history(sinusoid):
    est = MetaBNNRegressor(**FAST_BNN, max_iter=6, warm_start=True)
    est.fit(*sinusoid)
    est.set_params(max_iter=4).fit(*sinusoid)
    assert est.n_iter_ == 4 and len(est.history_) == 10
    assert est.history_[:, "iteration"] == list(range(1, 11))
    np.testing.assert_array_equal(est.history_[:, "loss"], est.loss_curve_)


def test_batched_copies_have_their_own_history_and_stop_as_their_own_fit(mog):
    X, groups = mog
    data = [(X[groups == g], None) for g in np.unique(groups)]
    est = MetaDivergenceVI(**MOG, callbacks=[EarlyStopping("loss", patience=3)])
    copies = est._adapted_copies(data, random_states=[10, 11, 12, 13])
    stops = []
    for (Xm, _), rs, c in zip(data, [10, 11, 12, 13], copies):
        own = copy.deepcopy(est).set_params(random_state=rs).fit(Xm)
        assert c.n_iter_ == own.n_iter_ == len(c.history_)
        np.testing.assert_array_equal(c.history_[:, "loss"], c.loss_curve_)
        np.testing.assert_array_equal(c.loss_curve_, own.loss_curve_)
        for key, t in own.variational_params_.items():
            torch.testing.assert_close(c.variational_params_[key], t, rtol=0, atol=0)
        stops.append(c.n_iter_)
    assert min(stops) < MOG["max_iter"]  # early stopping acted
    # The user's callback object is not the one the tasks used (each had its own copy).
    assert not hasattr(est.callbacks[0], "wait_")


# ------------------------------------------------------------------ meta_fit
def test_meta_history_matches_curve_and_alpha_trajectory(mog):
    X, groups = mog
    est = MetaDivergenceVI(**MOG, max_meta_iter=8, meta_lr=0.05).meta_fit(X, groups=groups)
    h = est.meta_history_
    assert h[:, "iteration"] == list(range(1, 9))
    np.testing.assert_array_equal(h[:, "meta_loss"], est.meta_loss_curve_)
    alphas = h[:, "alpha"]
    assert alphas[-1] == pytest.approx(est.meta_divergence_.alpha, rel=1e-12)
    assert abs(alphas[-1] - alphas[0]) > 1e-3  # a trajectory, not a constant
    assert all(r["time"] > 0 for r in h)
    with pytest.raises(KeyError):
        h[:, "validation_score"]  # no meta-validation


def test_meta_history_validation_columns(mog):
    X, groups = mog
    X, groups = make_mog_tasks(6, random_state=1)
    est = MetaDivergenceVI(**MOG, max_meta_iter=7, validation_fraction=0.3,
                           validation_interval=3).meta_fit(X, groups=groups)
    rows = est.meta_history_[:, ("iteration", "validation_score", "validation_kl_score")]
    assert [r[0] for r in rows] == list(est.validation_iterations_) == [3, 6, 7]
    np.testing.assert_array_equal([r[1] for r in rows], est.validation_scores_)
    np.testing.assert_array_equal([r[2] for r in rows], est.validation_kl_scores_)


def test_early_stopping_meta_loss_stops_at_the_expected_iteration(mog):
    X, groups = mog
    full = MetaDivergenceVI(**MOG, max_meta_iter=8).meta_fit(X, groups=groups)
    # min_delta so large that nothing after the first record improves: 1 + patience records.
    stop = EarlyStopping("meta_loss", patience=3, min_delta=1e9)
    est = MetaDivergenceVI(**MOG, max_meta_iter=8, callbacks=[stop]).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 4 == len(est.meta_history_) == stop.stopped_iteration_
    assert stop.best_iteration_ == 1
    np.testing.assert_array_equal(est.meta_loss_curve_, full.meta_loss_curve_[:4])
    assert est.meta_history_[-1, "alpha"] == pytest.approx(est.meta_divergence_.alpha, rel=1e-12)
    # warm_start continues from the stopped state; EarlyStopping counts afresh.
    est.set_params(warm_start=True, callbacks=None, max_meta_iter=2).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 6 and est.meta_history_[:, "iteration"] == list(range(1, 7))
    np.testing.assert_array_equal(est.meta_history_[:, "meta_loss"], est.meta_loss_curve_)
    np.testing.assert_allclose(est.meta_loss_curve_, full.meta_loss_curve_[:6], rtol=1e-10)


def test_early_stopping_validation_score_counts_validations():
    X, groups = make_mog_tasks(6, random_state=1)
    stop = EarlyStopping("validation_score", patience=1, min_delta=1e9)
    est = MetaDivergenceVI(**MOG, max_meta_iter=9, validation_fraction=0.3,
                           validation_interval=2, callbacks=[stop]).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 4 and list(est.validation_iterations_) == [2, 4]


def test_early_stopping_logic(mog):
    stop = EarlyStopping("validation_score", patience=2)  # higher is better ("score")
    stop.on_train_begin(None, "meta_fit", [])
    values = [{"iteration": 1}, {"iteration": 2, "validation_score": 1.0},
              {"iteration": 3, "validation_score": math.nan}, {"iteration": 4},
              {"iteration": 5, "validation_score": 2.0}, {"iteration": 6, "validation_score": 1.5},
              {"iteration": 7, "validation_score": 1.9}]
    out = [stop.on_iteration_end(None, "meta_fit", r) for r in values]
    assert out == [False, False, False, False, False, False, True]
    assert (stop.best_, stop.best_iteration_, stop.stopped_iteration_) == (2.0, 5, 7)
    # on_train_begin replays a resumed call's records.
    again = EarlyStopping("validation_score", patience=2)
    again.on_train_begin(None, "meta_fit", values[:6])
    assert again.on_iteration_end(None, "meta_fit", values[6]) is True
    with pytest.raises(ValueError, match="patience"):
        EarlyStopping(patience=0).on_train_begin(None, "fit", [])
    with pytest.raises(TypeError, match="Each callback"):
        MetaDivergenceVI(**MOG, callbacks=[3]).fit(mog[0][mog[1] == 0])


def test_callback_object_hooks_and_meta_warm_start(mog):
    X, groups = mog

    class Recorder(Callback):
        def __init__(self):
            self.calls = []

        def on_train_begin(self, estimator, phase, history):
            self.calls.append(("begin", phase, len(history)))

        def on_iteration_end(self, estimator, phase, record):
            self.calls.append(("iter", phase, record["iteration"]))

        def on_train_end(self, estimator, phase, history):
            self.calls.append(("end", phase, len(history)))

    rec = Recorder()
    est = MetaDivergenceVI(**{**MOG, "max_iter": 2}, max_meta_iter=2, callbacks=[rec],
                           warm_start=True)
    est.meta_fit(X, groups=groups).meta_fit(X, groups=groups)
    est.fit(X[groups == 0])
    assert rec.calls == [
        ("begin", "meta_fit", 0), ("iter", "meta_fit", 1), ("iter", "meta_fit", 2),
        ("end", "meta_fit", 2),
        ("begin", "meta_fit", 0), ("iter", "meta_fit", 3), ("iter", "meta_fit", 4),
        ("end", "meta_fit", 2),
        ("begin", "fit", 0), ("iter", "fit", 1), ("iter", "fit", 2), ("end", "fit", 2),
    ]
    assert est.meta_history_[:, "iteration"] == [1, 2, 3, 4]
    np.testing.assert_array_equal(est.meta_history_[:, "meta_loss"], est.meta_loss_curve_)


def test_checkpoint_resume_restores_history(mog, monkeypatch, tmp_path):
    X, groups = mog
    path = tmp_path / "meta.ckpt"
    full = MetaDivergenceVI(**MOG, max_meta_iter=8).meta_fit(X, groups=groups)
    _interrupt_outer_step(monkeypatch, 6)
    est = MetaDivergenceVI(**MOG, max_meta_iter=8)
    with pytest.warns(RuntimeWarning, match="interrupted after 5 outer iterations"):
        est.meta_fit(X, groups=groups, checkpoint=path, checkpoint_every=2)
    monkeypatch.undo()
    assert len(est.meta_history_) == 5
    resumed = MetaDivergenceVI(**MOG, max_meta_iter=8)
    resumed.meta_fit(X, groups=groups, checkpoint=path, checkpoint_every=2)
    assert _without_time(resumed.meta_history_) == _without_time(full.meta_history_)
    # An early-stopped checkpointed run ends at the same iteration when run again.
    path2 = tmp_path / "stopped.ckpt"
    params = dict(MOG, max_meta_iter=8, callbacks=[EarlyStopping(patience=2, min_delta=1e9)])
    first = MetaDivergenceVI(**params).meta_fit(X, groups=groups, checkpoint=path2)
    again = MetaDivergenceVI(**params).meta_fit(X, groups=groups, checkpoint=path2)
    assert first.n_meta_iter_ == again.n_meta_iter_ == 3
    assert _without_time(again.meta_history_) == _without_time(first.meta_history_)


def test_histories_pickle_and_clone(mog):
    X, groups = mog
    est = MetaDivergenceVI(**{**MOG, "max_iter": 5}, max_meta_iter=3,
                           callbacks=[EarlyStopping(patience=50)])
    est.meta_fit(X, groups=groups).fit(X[groups == 0])
    restored = pickle.loads(pickle.dumps(est))
    assert isinstance(restored.history_, History) and isinstance(restored.meta_history_, History)
    assert restored.meta_history_ == est.meta_history_ and restored.history_ == est.history_
    assert restored.meta_history_[:, "alpha"] == est.meta_history_[:, "alpha"]
    cloned = clone(est)
    assert isinstance(cloned.callbacks[0], EarlyStopping) and cloned.callbacks[0] is not \
        est.callbacks[0]
    assert not hasattr(cloned, "history_")


# ------------------------------------------------------------------ blow-up warnings
def test_fit_blow_up_warns(sinusoid):
    est = MetaBNNRegressor(inner_lr=1e6, random_state=0)
    with pytest.warns(ConvergenceWarning, match=r"fit diverged: the loss went from 968.4 at the "
                      r"first iteration to .*e\+1\d.*lower inner_lr \(now 1e\+06"):
        est.fit(*sinusoid)
    # SGD's advice names Adam.  On a blown-up curve rather than a real SGD run: where SGD starts
    # to diverge on this BNN is chaotic in the rounding (measured: 0.03 blew up on one CPU and
    # converged on another, where 0.01 blew up).
    from skmetavi._optim import SGD

    seen = []
    warn = MetaBNNRegressor._warn_blow_up

    def spy(self, curves, optimizer):
        seen.append((optimizer.name, optimizer.lr))
        return warn(self, curves, optimizer)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetaBNNRegressor, "_warn_blow_up", spy)
        MetaBNNRegressor(inner_optimizer="sgd", inner_lr=1e-3, random_state=0).fit(*sinusoid)
    assert seen == [("sgd", 1e-3)]  # fit asks with its own optimiser
    curve = np.r_[968.4, np.full(99, 3.1e6)]
    with pytest.warns(ConvergenceWarning, match=r"968.4 at the first iteration to 3.1e\+06.*"
                      r"lower inner_lr \(now 0.03\) or use inner_optimizer='adam'"):
        MetaBNNRegressor(inner_optimizer="sgd")._warn_blow_up([curve], SGD(0.03))


def test_default_fit_does_not_warn(sinusoid):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est = MetaBNNRegressor(random_state=0).fit(*sinusoid)
    assert _loop.blow_up(est.loss_curve_) is None


def test_blow_up_rule_is_robust_to_noise():
    rng = np.random.RandomState(0)
    noisy_flat = rng.normal(0.0, 0.3, 200)  # |start| < 1: the unit floor applies
    noisy_decreasing = np.linspace(100, 20, 200) + rng.normal(0, 5, 200)
    spike_at_end = np.r_[np.linspace(10, 5, 199), 1e6]  # one outlier: the median ignores it
    assert _loop.blow_up(noisy_flat) is None
    assert _loop.blow_up(noisy_decreasing) is None
    assert _loop.blow_up(spike_at_end) is None
    assert _loop.blow_up([np.nan, 10.0, 50.0, 60.0, 60.0, 60.0]) == (10.0, 60.0)
    assert _loop.blow_up([np.nan, 10.0, 20.0, 30.0, 30.0, 30.0]) is None  # 3x: noise-sized
    assert _loop.blow_up([10.0, 60.0, 60.0, 60.0]) is None  # too short to judge
    assert _loop.blow_up([1.70, 2.60, 4.46]) is None  # a 3-iteration KL fit (was a false alarm)
    assert _loop.blow_up([10.0]) is None


def test_meta_fit_blow_up_warns():
    est = MetaDivergenceVI(**MOG)
    # The divergence moved a lot: its meta-step comes first.
    with pytest.warns(ConvergenceWarning, match=r"meta_fit diverged.*from 1 at the first outer "
                      r"iteration to 9.*\(1\) the divergence's meta-step: its parameters moved "
                      r"by 80% \(alpha 0.5 -> 2\); lower meta_lr \(now 0.01\).*\(2\) the "
                      r"per-task q's") as record:
        est._warn_meta_blow_up([1.0, 5.0, 9.0, 9.0, 9.0], learn_init=False, shift=0.8,
                               scalars=({"alpha": 0.5}, {"alpha": 2.0}))
    assert record[0].filename == __file__
    # The inner loss rose too: the inner step.
    with pytest.warns(ConvergenceWarning, match=r"\(1\) the inner steps: .* rose too \(1 -> 50 "
                      r"per support row\); lower inner_lr \(now 0.3\).*\(2\) the divergence's "
                      r"meta-step: less likely, as its parameters moved by 1%"):
        est._warn_meta_blow_up([1.0, 5.0, 9.0, 9.0, 9.0], learn_init=False, shift=0.01,
                               inner_curve=[1.0, 9.0, 50.0, 50.0, 50.0], inner_lr=0.3)
    with pytest.warns(ConvergenceWarning, match=r"\(1\) the learned initialisation's meta-step; "
                      r"lower init_lr"):
        est._warn_meta_blow_up([1.0, 5.0, 9.0, 9.0, 9.0], learn_init=True, shift=0.01)
    # Nothing learnable in the divergence (KL with a learned init): it is no cause.
    with pytest.warns(ConvergenceWarning) as record:
        est._warn_meta_blow_up([1.0, 5.0, 9.0, 9.0, 9.0], learn_init=True, learnable=False)
    assert "(2)" not in str(record[0].message) and "meta_lr" not in str(record[0].message)
    est._warn_meta_blow_up([1.0, 0.9, 0.5], learn_init=False)  # no warning


def test_meta_fit_blow_up_of_persistent_qs_names_them_at_the_callers_line():
    # Measured: the Renyi BNN's query NLL goes 1.775 -> ~2200 in 10 outer iterations while
    # alpha moves by 4% and meta_lr=1e-6 diverges the same; the q's fit their support rows
    # (inner loss down) and one task's query rows, outside its support range, reach NLL 2e4.
    X, y, groups = make_sinusoid_tasks(10, 20, random_state=0)
    est = MetaBNNRegressor(divergence="renyi", max_meta_iter=10, random_state=2)
    with pytest.warns(ConvergenceWarning, match=r"meta_fit diverged.*\(1\) the per-task q's of "
                      r"Algorithm 1.*inner loss went down .*likelihood='homoskedastic' avoids "
                      r"it.*meta_lr does not help. \(2\) the divergence's meta-step: less "
                      r"likely, as its parameters moved by \d+% \(alpha 0.5 -> 0.5") as record:
        est.meta_fit(X, y, groups=groups)
    assert len(record) == 1 and record[0].filename == __file__
    inner = est._meta_state["inner_loss_curve"]
    assert len(inner) == 10 and inner[-1] < inner[0]


# ------------------------------------------------------------------ progress
def test_verbose_summaries(sinusoid, mog, capsys):
    MetaBNNRegressor(**FAST_BNN, max_iter=5, verbose=1).fit(*sinusoid)
    err = capsys.readouterr().err
    assert "fit: 5 iterations, loss" in err and "inner_optimizer" not in err
    X, groups = make_mog_tasks(6, random_state=1)
    MetaDivergenceVI(**MOG, max_meta_iter=4, validation_fraction=0.3, validation_interval=2,
                     verbose=2).meta_fit(X, groups=groups)
    err = capsys.readouterr().err
    assert "meta_fit iteration 2: meta_loss" in err and "validation score" in err
    assert "meta_fit: 4 outer iterations (1-4), meta_loss" in err and ", alpha 0.5 -> " in err
    assert "best validation score" in err and "meta_lr=" in err
    # verbose=0: nothing.
    MetaDivergenceVI(**MOG, max_meta_iter=2).meta_fit(*mog[:1], groups=mog[1])
    assert capsys.readouterr().err == ""


def test_reproduce_progress_lines(capsys):
    def work(name, seed, budget):
        return seed

    with _report.reporting("table9"):
        assert _mog._parallel([(work, ("meta_alpha", 3, {"big": 1}), {})]) == [3]
    _mog._parallel([(work, ("x", 1, {}), {})])  # outside reporting: silent
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "[table9" in err and "run 1/1: work('meta_alpha', 3) ..." in err


# ------------------------------------------------------------------ review fixes
def test_history_missing_column_raises_for_any_selection_like_skorch():
    h = History([{"iteration": 1, "v": 3.0}, {"iteration": 2}])
    with pytest.raises(KeyError, match=r"The selected record has no column \['v'\]"):
        h[-1, "v"]
    with pytest.raises(KeyError, match=r"The selected record has no column \['v'\]"):
        h[-1:, "v"]  # was [] while h[-1, "v"] raised
    with pytest.raises(KeyError, match=r"None of the 0 selected records has a column \['v'\]"):
        h[5:, "v"]
    with pytest.raises(KeyError):
        h[-1, ("iteration", "v")]
    assert h[:, "v"] == [3.0] and h[:1, "v"] == [3.0] and h[-1, "iteration"] == 2


def test_early_stop_before_the_first_validation_validates_the_stop():
    X, groups = make_mog_tasks(6, random_state=1)
    stop = EarlyStopping(patience=3, min_delta=1e9)
    est = MetaDivergenceVI(**MOG, max_meta_iter=30, validation_fraction=0.3,
                           validation_interval=10, callbacks=[stop]).meta_fit(X, groups=groups)
    ref = MetaDivergenceVI(**MOG, max_meta_iter=4, validation_fraction=0.3,
                           validation_interval=10).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 4 == stop.stopped_iteration_
    assert list(est.validation_iterations_) == list(ref.validation_iterations_) == [4]
    assert est.best_meta_iter_ == ref.best_meta_iter_ == 4
    assert est.validation_choice_ == ref.validation_choice_ == "kl"
    assert repr(est.meta_divergence_) == repr(ref.meta_divergence_) == "KL()"
    np.testing.assert_array_equal(est.validation_scores_, ref.validation_scores_)
    assert _without_time(est.meta_history_) == _without_time(ref.meta_history_)
    assert est.meta_history_[-1, "validation_score"] == est.validation_scores_[-1]


def test_failed_warm_meta_fit_leaves_the_estimator_as_it_was(mog):
    X, groups = mog

    def boom(estimator, record):
        if record["iteration"] == 5:
            raise RuntimeError("boom")

    est = MetaDivergenceVI(**MOG, max_meta_iter=3, warm_start=True).meta_fit(X, groups=groups)
    before = copy.deepcopy(est.__dict__)
    est.set_params(callbacks=[boom])
    with pytest.raises(RuntimeError, match="boom"):
        est.meta_fit(X, groups=groups)
    # torch's Optimizer.load_state_dict keeps the tensors it loads: they were advanced.
    assert est._meta_state["meta_optimizer"]["state"][0]["step"] == 3
    assert est.n_meta_iter_ == 3 and est.meta_history_ == before["meta_history_"]
    est.set_params(callbacks=None).meta_fit(X, groups=groups)
    clean = MetaDivergenceVI(**MOG, max_meta_iter=3, warm_start=True)
    clean.meta_fit(X, groups=groups).meta_fit(X, groups=groups)
    np.testing.assert_array_equal(est.meta_loss_curve_, clean.meta_loss_curve_)
    assert est.meta_divergence_.alpha == clean.meta_divergence_.alpha
    assert _without_time(est.meta_history_) == _without_time(clean.meta_history_)


def test_early_stopping_monitor_is_checked_and_acts_in_its_phase(sinusoid, mog):
    X, groups = mog
    task = X[groups == 0]
    with pytest.raises(ValueError, match=r"monitor='nope'\) cannot act: neither fit's"):
        MetaBNNRegressor(**FAST_BNN, max_iter=3, callbacks=[EarlyStopping("nope")]).fit(*sinusoid)
    with pytest.raises(ValueError, match="only with validation_fraction"):
        MetaDivergenceVI(**MOG, max_meta_iter=3,
                         callbacks=[EarlyStopping("validation_score")]).meta_fit(X, groups=groups)
    with pytest.raises(ValueError, match=r"phase='meta_fit' and the records of meta_fit"):
        MetaDivergenceVI(**MOG, max_meta_iter=3, callbacks=[
            EarlyStopping("loss", phase="meta_fit")]).meta_fit(X, groups=groups)
    with pytest.raises(ValueError, match=r"monitor='alpha'\) cannot act"):
        MetaDivergenceVI(**{**MOG, "divergence": "kl"}, max_meta_iter=3, callbacks=[
            EarlyStopping("alpha")]).meta_fit(X, groups=groups)
    # meta_loss and alpha act in meta_fit and leave a later fit alone (every epoch runs).
    for monitor in ("meta_loss", "alpha"):
        stop = EarlyStopping(monitor, patience=1, min_delta=1e9)
        est = MetaDivergenceVI(**MOG, max_meta_iter=6, callbacks=[stop])
        est.meta_fit(X, groups=groups)
        assert est.n_meta_iter_ == 2 == stop.stopped_iteration_
        est.fit(task)
        assert est.n_iter_ == MOG["max_iter"] and stop.stopped_iteration_ == 2
    # EarlyStopping("loss") acts in fit only.
    stop = EarlyStopping("loss", patience=1, min_delta=1e9)
    est = MetaDivergenceVI(**MOG, max_meta_iter=3, callbacks=[stop]).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 3 and not hasattr(stop, "wait_")
    assert est.fit(task).n_iter_ == 2

    # A column another callback may add: checked at the end of the call.
    def adds(estimator, record):
        record["custom"] = -record["iteration"]

    stop = EarlyStopping("custom", patience=2, phase="fit")
    est = MetaBNNRegressor(**FAST_BNN, max_iter=10, callbacks=[adds, stop]).fit(*sinusoid)
    assert est.n_iter_ == 10 and stop.best_ == -10
    with pytest.warns(UserWarning, match=r"monitor='nope'\) never acted: none of the 3 "
                      r"records of this fit") as record:
        MetaBNNRegressor(**FAST_BNN, max_iter=3, callbacks=[
            lambda e, r: None, EarlyStopping("nope", phase="fit")]).fit(*sinusoid)
    assert record[0].filename == __file__


def test_resuming_an_early_stopped_checkpoint_continues_to_max_meta_iter(mog, tmp_path):
    X, groups = mog
    full = MetaDivergenceVI(**MOG, max_meta_iter=8).meta_fit(X, groups=groups)
    for callbacks in (None, [EarlyStopping(patience=50)]):
        path = tmp_path / f"stopped{callbacks is None}.ckpt"
        first = MetaDivergenceVI(**MOG, max_meta_iter=8, callbacks=[
            EarlyStopping(patience=2, min_delta=1e9)]).meta_fit(X, groups=groups, checkpoint=path)
        assert first.n_meta_iter_ == 3
        resumed = MetaDivergenceVI(**MOG, max_meta_iter=8, callbacks=callbacks)
        resumed.meta_fit(X, groups=groups, checkpoint=path)
        assert resumed.n_meta_iter_ == 8
        assert _without_time(resumed.meta_history_) == _without_time(full.meta_history_)
        np.testing.assert_array_equal(resumed.meta_loss_curve_, full.meta_loss_curve_)


def test_early_stopping_accepts_numpy_numbers(mog):
    X, groups = mog
    stop = EarlyStopping(patience=np.int64(3), min_delta=np.float64(1e9))
    est = MetaDivergenceVI(**MOG, max_meta_iter=8, callbacks=[stop]).meta_fit(X, groups=groups)
    assert est.n_meta_iter_ == 4
    with pytest.raises(ValueError, match="phase must be"):
        EarlyStopping(phase="both").on_train_begin(None, "fit", [])


def test_stopped_tag_only_when_a_callback_cut_the_run_short(sinusoid, mog, capsys):
    X, groups = mog
    # A stop on the last iteration cut nothing short, in fit and meta_fit alike.
    MetaDivergenceVI(**MOG, max_meta_iter=4, verbose=1, callbacks=[
        EarlyStopping(patience=3, min_delta=1e9)]).meta_fit(X, groups=groups)
    MetaBNNRegressor(**FAST_BNN, max_iter=3, verbose=1, callbacks=[
        EarlyStopping("loss", patience=2, min_delta=1e9)]).fit(*sinusoid)
    err = capsys.readouterr().err
    assert "meta_fit: 4 outer iterations" in err and "fit: 3 iterations" in err
    assert "stopped by a callback" not in err
    MetaDivergenceVI(**MOG, max_meta_iter=6, verbose=1, callbacks=[
        EarlyStopping(patience=3, min_delta=1e9)]).meta_fit(X, groups=groups)
    MetaBNNRegressor(**FAST_BNN, max_iter=6, verbose=1, callbacks=[
        EarlyStopping("loss", patience=2, min_delta=1e9)]).fit(*sinusoid)
    assert capsys.readouterr().err.count("(stopped by a callback)") == 2


def test_progress_lines_are_written_after_the_bar_counts_the_iteration(monkeypatch):
    class Bar:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix(self, fields):
            pass

        def close(self):
            pass

    bar = Bar()
    monkeypatch.setattr(_loop, "progress_bar", lambda total, verbose, desc: bar)
    seen = []
    _loop.train_loop(lambda: 1.0, 3, verbose=2, desc="fit", value_name="loss",
                     settings=lambda: "", after_step=lambda n, v, t: seen.append((n, bar.n)))
    assert seen == [(1, 1), (2, 2), (3, 3)]


def test_a_single_callable_is_a_list_of_one(sinusoid):
    calls = []

    def stop_at_2(estimator, record):
        calls.append(record["iteration"])
        return record["iteration"] == 2

    est = MetaBNNRegressor(**FAST_BNN, max_iter=5, callbacks=stop_at_2).fit(*sinusoid)
    assert est.n_iter_ == 2 and calls == [1, 2]
    est = MetaBNNRegressor(**FAST_BNN, max_iter=5,
                           callbacks=EarlyStopping("loss", patience=1, min_delta=1e9))
    assert est.fit(*sinusoid).n_iter_ == 2
    assert clone(est).callbacks is not est.callbacks


def test_bnn_reproductions_report_progress(monkeypatch, capsys):
    from skmetavi.experiments import _bnn

    monkeypatch.setattr(_bnn, "PROGRESS_SECONDS", 0.0)  # a heartbeat at every iteration
    with _report.reporting("table4"):
        _bnn._table4_seed(_bnn.BUDGETS["smoke"], 0)
    err = capsys.readouterr().err
    assert "[table4" in err
    for name in ("meta-α", "local meta-α", "meta-f"):
        assert f"{name} (seed 0): meta-training, 3 outer iterations ..." in err
        assert f"{name} (seed 0): outer iteration 3/3, meta_loss " in err
        assert f"{name} (seed 0): meta-trained in " in err
    for name in ("VI", "VI (α=0.5)", "meta-α", "local meta-α", "meta-f"):
        assert f"{name}: adapting 2 test tasks, 2 epochs ..." in err
        assert f"{name}: adaptation step 20/20, loss " in err  # 10 minibatches an epoch
        assert f"{name}: adapted and evaluated in " in err


def test_interrupt_says_which_candidate_is_kept(monkeypatch):
    # Ctrl-C gives control back at once: the interrupted iteration is not validated.
    X, groups = make_mog_tasks(6, random_state=1)
    _interrupt_outer_step(monkeypatch, 3)
    est = MetaDivergenceVI(**MOG, max_meta_iter=30, validation_fraction=0.3,
                           validation_interval=10)
    with pytest.warns(RuntimeWarning, match="No meta-validation ran before the interrupt") as rec:
        est.meta_fit(X, groups=groups)
    assert rec[0].filename == __file__ and not hasattr(est, "validation_choice_")
