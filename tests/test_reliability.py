"""Reliability of the estimators: numerical safety, interruption and resume, checkpoints."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

from pathlib import Path

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
import torch

import skmetavi._bilevel
import skmetavi._checkpoint
from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi._bilevel import NonFiniteError
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.divergences import KL, FDivergence, NeuralF, Renyi, TailAdaptive
from skmetavi.models._bnn import BNNRegression

FAST_BNN = dict(hidden_layer_sizes=(8,), n_particles=4, n_predict_samples=8)


def _all_finite(tree):
    """Whether every tensor of a dict of tensors / torch module is finite."""
    if isinstance(tree, torch.nn.Module):
        tree = tree.state_dict()
    return all(bool(torch.isfinite(t).all()) for t in tree.values())


def _assert_fitted_state_finite(est):
    assert _all_finite(est.variational_params_)
    assert _all_finite(est.divergence_)
    for attr in ("meta_divergence_", "meta_init_"):
        if hasattr(est, attr):
            assert _all_finite(getattr(est, attr)), attr


class FlakyLogJoint:
    """``log N(z; mean(X), 1)`` that returns NaN on the calls listed in ``bad``."""

    def __init__(self, bad=()):
        self.bad, self.calls = bad, 0  # any container: range(10**9) stays cheap

    def __call__(self, z, X, y):
        self.calls += 1
        out = torch.distributions.Normal(X.mean(0), 1.0).log_prob(z).sum(-1)
        return out * float("nan") if self.calls in self.bad else out


def _mean_matching_meta_loss(q, X, y):
    return (q.mean - X.mean(0)).pow(2).sum() + q.variance.sum()


@pytest.fixture(scope="module")
def clustered_tasks():
    """Three 1-D tasks of 8 rows around different centres."""
    rng = np.random.RandomState(0)
    X = np.concatenate([c + rng.normal(size=(8, 1)) for c in (-1.0, 0.0, 2.0)])
    return X, np.repeat([0, 1, 2], 8)


# ------------------------------------------------------------- numerical safety
def test_fit_rolls_back_non_finite_steps(clustered_tasks):
    """A model that returns NaN for a while: those steps are undone, with a warning."""
    X = clustered_tasks[0][:8]
    model = FlakyLogJoint(bad=range(5, 9))  # inner iterations 4 to 7 (one call each)
    est = MetaDivergenceVI(model, n_latent=1, max_iter=40, n_particles=8, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"the step was rolled back and its step size halved"):
        est.fit(X)
    _assert_fitted_state_finite(est)
    assert est.n_iter_ == 40
    # The rolled-back iterations are NaN in the curve, and only those.
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(est.loss_curve_)), [4, 5, 6, 7])
    assert abs(est.mean_[0] - X.mean()) < 0.3  # and fitting went on afterwards


def test_fit_persistent_non_finite_raises_naming_the_cause(clustered_tasks):
    X = clustered_tasks[0][:8]
    model = FlakyLogJoint(bad=range(10**9))
    est = MetaDivergenceVI(model, n_latent=1, max_iter=40, n_particles=8, random_state=0)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        with pytest.raises(
            NonFiniteError,
            match=r"fit stopped: 10 consecutive non-finite inner steps.*Likely causes: a "
            r"learning rate that is too large.*model whose log density is not finite.*"
            r"Try a smaller inner_lr.*inner_lr=0\.05",
        ):
            est.fit(X)
    assert not hasattr(est, "variational_params_")


@pytest.mark.parametrize("inner_lr", [0.5, 1e4])
def test_huge_inner_lr_raises_a_clear_error(inner_lr):
    """Plain SGD with a step far beyond the stable 2 / n_samples: the iterates overflow.

    Each overflowing step is rolled back and its step size halved; once the iterates
    are beyond rescue, a clear error names the step size.
    """
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(20, 2))
    est = MetaDivergenceVI(
        inner_optimizer="sgd", inner_lr=inner_lr, max_iter=200, n_particles=8, random_state=0
    )
    with pytest.warns(RuntimeWarning, match="rolled back and its step size halved"):
        with pytest.raises(NonFiniteError, match=rf"Try a smaller inner_lr.*inner_lr={inner_lr}"):
            est.fit(X)
    assert not hasattr(est, "variational_params_")


def test_diverging_fit_keeps_finite_parameters():
    """A step size just beyond stability diverges without overflowing: state stays finite."""
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(20, 2))
    est = MetaDivergenceVI(
        inner_optimizer="sgd", inner_lr=0.2, max_iter=200, n_particles=8, random_state=0
    )
    with pytest.warns(ConvergenceWarning, match=r"fit diverged: the loss went from .* lower "
                      r"inner_lr \(now 0.2\) or use inner_optimizer='adam'"):
        est.fit(X)
    assert est.loss_curve_[-1] > 1e100  # diverged
    _assert_fitted_state_finite(est)
    assert np.isfinite(est.score_samples(np.zeros((2, 2)))).all()


def test_bnn_huge_inner_lr_raises_and_keeps_previous_fit():
    X, y, _ = make_sinusoid_tasks(1, 20, random_state=0)
    est = MetaBNNRegressor(**FAST_BNN, max_iter=20, random_state=0).fit(X, y)
    before = est.predict(X)
    est.set_params(inner_lr=1e8)
    with pytest.warns(RuntimeWarning, match="rolled back"):
        with pytest.raises(NonFiniteError, match=r"Try a smaller inner_lr.*inner_lr=100000000\.0"):
            est.fit(X, y)
    # The failed fit changed nothing: the previous fit is still there and usable.
    _assert_fitted_state_finite(est)
    np.testing.assert_array_equal(est.predict(X), before)


def test_meta_fit_skips_non_finite_iterations(clustered_tasks):
    X, groups = clustered_tasks
    model = FlakyLogJoint(bad=range(5, 9))  # 3 tasks, one call each per outer iteration
    est = MetaDivergenceVI(
        model, n_latent=1, divergence="renyi", meta_loss=_mean_matching_meta_loss,
        max_meta_iter=20, n_particles=8, random_state=0,
    )
    with pytest.warns(RuntimeWarning, match=r"iteration was skipped and the outer step sizes and "
                      r"the inner step sizes of the sampled tasks halved"):
        est.meta_fit(X, groups=groups)
    np.testing.assert_array_equal(np.flatnonzero(np.isnan(est.meta_loss_curve_)), [1, 2])
    assert np.isfinite(est.meta_loss_curve_[3:]).all()
    assert _all_finite(est.meta_divergence_)
    _assert_fitted_state_finite(est.fit(X[:8]))


def test_meta_fit_persistent_non_finite_raises(clustered_tasks):
    X, groups = clustered_tasks
    est = MetaDivergenceVI(
        FlakyLogJoint(bad=range(10**9)), n_latent=1, divergence="renyi",
        meta_loss=_mean_matching_meta_loss, max_meta_iter=20, n_particles=8, random_state=0,
    )
    with pytest.warns(RuntimeWarning, match="skipped"):
        with pytest.raises(
            NonFiniteError,
            match=r"meta_fit stopped: 10 consecutive non-finite outer iterations\. Likely "
            r"causes: meta_lr or inner_lr too large.*meta_lr=0\.01",
        ):
            est.meta_fit(X, groups=groups)
    assert not hasattr(est, "meta_divergence_")


def _random_neural_f(seed, normalize=True):
    """A NeuralF whose every weight is random (not the alpha-family start)."""
    with torch.random.fork_rng(devices=[]):
        div = NeuralF((8, 4), activation="elu", normalize=normalize)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in div.parameters():
            p.copy_(2.0 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return div


ALL_DIVERGENCES = [
    KL(),
    Renyi(0.5),
    Renyi(1e-6, learnable=False),
    Renyi(1e3, learnable=False),
    FDivergence(0.0),
    FDivergence(2.0),
    FDivergence(-1.0),
    NeuralF((8,)),
    _random_neural_f(0),
    TailAdaptive(),
]
DIVERGENCE_IDS = [
    "kl", "renyi", "renyi-alpha-1e-6", "renyi-alpha-1e3", "f-0", "f-chi2", "f-minus-1",
    "neural_f", "neural_f-random", "tail_adaptive",
]
EXTREME_LOG_W = {
    "spread": [1e4, -1e4, 0.0, 5e3, -5e3, 1e4],
    "all-high": [1e4, 1e4 - 1e-3, 1e4],
    "all-low": [-1e4, -1e4, -1e4 + 1.0],
    "one-particle": [1e4],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("log_w", list(EXTREME_LOG_W.values()), ids=list(EXTREME_LOG_W))
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=DIVERGENCE_IDS)
def test_extreme_log_weights_give_finite_normalised_weights(divergence, log_w, dtype):
    """Log-weights of +-1e4 (and a single particle): weights are a distribution, bound finite."""
    log_w = torch.tensor(log_w, dtype=dtype)
    with torch.no_grad():
        w = divergence.particle_weights(log_w)
        bound = divergence.bound(log_w, torch.zeros_like(log_w))
    assert w.dtype == dtype and torch.isfinite(w).all() and (w >= 0).all()
    # float32 softmax: the sum is one up to a few ulps of 1.
    torch.testing.assert_close(w.sum(), torch.ones((), dtype=dtype), rtol=0, atol=1e-5)
    assert torch.isfinite(bound)


@pytest.mark.parametrize(
    "divergence", [FDivergence(-3.0, normalize=False), _random_neural_f(1, normalize=False)],
    ids=["f-minus-3", "neural_f-random"],
)
@pytest.mark.parametrize("log_w", list(EXTREME_LOG_W.values()), ids=list(EXTREME_LOG_W))
def test_extreme_log_weights_unnormalised_f_finite(divergence, log_w):
    with torch.no_grad():
        w = divergence.particle_weights(torch.tensor(log_w, dtype=torch.float64))
    assert torch.isfinite(w).all() and (w >= 0).all()


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES, ids=DIVERGENCE_IDS)
def test_single_particle_fit_for_every_divergence(divergence):
    """K = 1: every weight is one; fitting still works (an unbiased, noisy ELBO gradient)."""
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(20, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no rollback needed either
        est = MetaDivergenceVI(divergence=divergence, n_particles=1, max_iter=100, random_state=0)
        est.fit(X)
    _assert_fitted_state_finite(est)
    assert np.isfinite(est.loss_curve_).all()
    X_task, y_task, _ = make_sinusoid_tasks(1, 20, random_state=0)
    bnn = MetaBNNRegressor(divergence, **dict(FAST_BNN, n_particles=1), max_iter=5, random_state=0)
    _assert_fitted_state_finite(bnn.fit(X_task, y_task))
    assert np.isfinite(bnn.predict(X_task)).all()


@pytest.mark.parametrize("alpha", [1e-6, 1e3], ids=["alpha-1e-6", "alpha-1e3"])
def test_extreme_alpha_fits_and_meta_fits(alpha):
    """alpha -> 0 (the IWAE end) and alpha >> 1 (mode seeking) stay finite."""
    X = np.random.RandomState(0).normal(1.0, 1.0, size=(8, 1))
    est = MetaDivergenceVI(
        divergence=Renyi(alpha, learnable=False), max_iter=300, n_particles=16, random_state=0
    ).fit(X)
    _assert_fitted_state_finite(est)
    assert np.isfinite(est.loss_curve_).all()
    # Near alpha = 0 the update is the (noisy, Rainforth et al. 2018) IWAE gradient: only
    # ask for a sane location.
    assert X.min() < est.mean_[0] < X.max()
    X_mog, groups = make_mog_tasks(4, random_state=0)
    meta = MetaDivergenceVI(
        "gaussian_mixture", divergence=Renyi(alpha), inner_optimizer="sgd", n_particles=16,
        max_meta_iter=10, max_iter=10, random_state=0,
    ).meta_fit(X_mog, groups=groups)
    assert np.isfinite(meta.meta_loss_curve_).all()
    assert np.isfinite(meta.meta_divergence_.alpha) and meta.meta_divergence_.alpha > 0


def test_float32_and_float64_meta_fits_agree_roughly():
    X, groups = make_mog_tasks(4, random_state=0)
    out = {}
    for dtype in ("float32", "float64"):
        est = MetaDivergenceVI(
            "gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=32,
            max_meta_iter=30, max_iter=100, dtype=dtype, random_state=0,
        ).meta_fit(X, groups=groups)
        est.fit(X[groups == 0])
        out[dtype] = est
    a, b = out["float32"], out["float64"]
    assert a.variational_params_["loc"].dtype == torch.float32
    # Different rounding changes each Monte Carlo step slightly; the results stay close.
    assert a.meta_divergence_.alpha == pytest.approx(b.meta_divergence_.alpha, abs=0.05)
    np.testing.assert_allclose(a.meta_loss_curve_, b.meta_loss_curve_, atol=0.05)
    np.testing.assert_allclose(a.mean_, b.mean_, atol=0.15)


def test_float32_and_float64_bnn_fits_agree_roughly():
    X, y, _ = make_sinusoid_tasks(1, 200, random_state=0)
    scores = {
        dtype: MetaBNNRegressor(
            hidden_layer_sizes=(16,), n_particles=4, n_predict_samples=32, max_iter=300,
            dtype=dtype, random_state=0,
        ).fit(X, y).score(X, y)
        for dtype in ("float32", "float64")
    }
    # Both learn the sinusoid (R^2 ~ 0.8); their random initialisations differ slightly.
    assert min(scores.values()) > 0.7
    assert abs(scores["float32"] - scores["float64"]) < 0.1


# ---------------------------------------------------------- interruption and resume
def test_vi_fit_interrupt_keeps_progress_and_warm_start_continues(clustered_tasks):
    X = clustered_tasks[0][:8]

    class InterruptAt(FlakyLogJoint):
        def __call__(self, z, X, y):
            if self.calls + 1 == 21:  # during the 21st inner iteration
                self.calls += 1
                raise KeyboardInterrupt
            return super().__call__(z, X, y)

    est = MetaDivergenceVI(InterruptAt(), n_latent=1, max_iter=50, n_particles=8, random_state=0)
    with pytest.warns(RuntimeWarning, match=r"fit interrupted; the estimator keeps the "
                      r"parameters of the last completed iteration"):
        est.fit(X)
    # Exactly the state of a 20-iteration fit.
    ref = MetaDivergenceVI(FlakyLogJoint(), n_latent=1, max_iter=20, n_particles=8, random_state=0)
    ref.fit(X)
    assert est.n_iter_ == 20
    np.testing.assert_array_equal(est.loss_curve_, ref.loss_curve_)
    for key, t in ref.variational_params_.items():
        torch.testing.assert_close(est.variational_params_[key], t, rtol=0, atol=0)
    assert est.score_samples([[0.0]]).shape == (1,)  # usable
    est.set_params(warm_start=True, max_iter=30).fit(X)
    assert est.n_iter_ == 30 and est.loss_curve_.shape == (50,)
    _assert_fitted_state_finite(est)


def test_bnn_fit_interrupt_keeps_progress_and_warm_start_continues(monkeypatch):
    X, y, _ = make_sinusoid_tasks(1, 20, random_state=0)
    calls = {"n": 0}
    log_likelihood = BNNRegression.log_likelihood

    def interrupting(self, *args, **kwargs):
        calls["n"] += 1  # one call per inner iteration
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return log_likelihood(self, *args, **kwargs)

    monkeypatch.setattr(BNNRegression, "log_likelihood", interrupting)
    est = MetaBNNRegressor(**FAST_BNN, max_iter=30, random_state=0)
    with pytest.warns(RuntimeWarning, match="fit interrupted"):
        est.fit(X, y)
    monkeypatch.undo()
    ref = MetaBNNRegressor(**FAST_BNN, max_iter=7, random_state=0).fit(X, y)
    assert est.n_iter_ == 7
    np.testing.assert_array_equal(est.predict(X), ref.predict(X))
    est.set_params(warm_start=True, max_iter=5).fit(X, y)
    assert est.loss_curve_.shape == (12,)
    assert np.isfinite(est.predict(X)).all()


def _interrupt_meta_step_after(monkeypatch, n_steps, *, after_step=False):
    """Make MetaTrainer.step raise KeyboardInterrupt at call ``n_steps + 1``.

    With ``after_step`` the interrupt comes at the end of call ``n_steps``, after the
    iteration was applied (still inside ``step``).
    """
    step = skmetavi._bilevel.MetaTrainer.step
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if not after_step and calls["n"] == n_steps + 1:
            raise KeyboardInterrupt
        out = step(self)
        if after_step and calls["n"] == n_steps:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(skmetavi._bilevel.MetaTrainer, "step", interrupting)


def _assert_same_meta_state(a, b):
    np.testing.assert_array_equal(a.meta_loss_curve_, b.meta_loss_curve_)
    assert a.n_meta_iter_ == b.n_meta_iter_
    sa, sb = a.meta_divergence_.state_dict(), b.meta_divergence_.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=0, msg=key)
    for key, t in getattr(b, "meta_init_", {}).items():
        torch.testing.assert_close(a.meta_init_[key], t, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def mog_tasks():
    return make_mog_tasks(4, random_state=0)


MOG_META = dict(
    model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=16,
    max_iter=20, random_state=0,
)


def test_vi_meta_fit_interrupt_then_warm_start_equals_uninterrupted(mog_tasks, monkeypatch):
    X, groups = mog_tasks
    full = MetaDivergenceVI(**MOG_META, max_meta_iter=12).meta_fit(X, groups=groups)
    _interrupt_meta_step_after(monkeypatch, 5)
    est = MetaDivergenceVI(**MOG_META, max_meta_iter=12, warm_start=True)
    with pytest.warns(RuntimeWarning, match=r"meta_fit interrupted after 5 outer iterations; "
                      r"the estimator keeps the progress so far"):
        est.meta_fit(X, groups=groups)
    monkeypatch.undo()
    assert est.n_meta_iter_ == 5
    np.testing.assert_array_equal(est.meta_loss_curve_, full.meta_loss_curve_[:5])
    assert np.isfinite(est.fit(X[groups == 0]).mean_).all()  # usable as is
    est.set_params(max_meta_iter=7).meta_fit(X, groups=groups)
    _assert_same_meta_state(est, full)


def test_bnn_meta_fit_interrupt_then_warm_start_equals_uninterrupted(monkeypatch):
    X, y, groups = make_sinusoid_tasks(4, 20, random_state=0)
    params = dict(
        FAST_BNN, divergence="renyi", meta_learn_init=True, n_inner_steps=2,
        n_tasks_per_batch=2, max_iter=5,
        random_state=0,
    )
    full = MetaBNNRegressor(**params, max_meta_iter=6).meta_fit(X, y, groups=groups)
    _interrupt_meta_step_after(monkeypatch, 2)
    est = MetaBNNRegressor(**params, max_meta_iter=6, warm_start=True)
    with pytest.warns(RuntimeWarning, match="meta_fit interrupted after 2 outer iterations"):
        est.meta_fit(X, y, groups=groups)
    monkeypatch.undo()
    assert est.n_meta_iter_ == 2 and set(est.meta_init_) >= {"loc", "scale_raw"}
    X0, y0 = X[groups == 0], y[groups == 0]
    assert np.isfinite(est.fit(X0, y0).predict(X0)).all()  # usable as is
    est.set_params(max_meta_iter=4).meta_fit(X, y, groups=groups)
    _assert_same_meta_state(est, full)


# ------------------------------------------------------------------ checkpoints
def _checkpoint_n_iter(path):
    return torch.load(path, weights_only=True)["state"]["n_iter"]


def test_interrupt_inside_a_step_keeps_the_checkpoint_at_a_step_boundary(
    mog_tasks, monkeypatch, tmp_path
):
    """Ctrl-C inside an iteration: memory keeps it, the file keeps the last checkpoint.

    Resuming from the file then reproduces the uninterrupted run exactly.
    """
    X, groups = mog_tasks
    path = tmp_path / "meta.ckpt"
    full = MetaDivergenceVI(**MOG_META, max_meta_iter=12).meta_fit(X, groups=groups)
    _interrupt_meta_step_after(monkeypatch, 7, after_step=True)
    est = MetaDivergenceVI(**MOG_META, max_meta_iter=12)
    with pytest.warns(RuntimeWarning, match=r"interrupted after 7 outer iterations.*the "
                      r"checkpoint .* holds the last completed checkpoint iteration"):
        est.meta_fit(X, groups=groups, checkpoint=path, checkpoint_every=3)
    monkeypatch.undo()
    assert est.n_meta_iter_ == 7
    assert _checkpoint_n_iter(path) == 6
    resumed = MetaDivergenceVI(**MOG_META, max_meta_iter=12)
    resumed.meta_fit(X, groups=groups, checkpoint=path, checkpoint_every=3)
    _assert_same_meta_state(resumed, full)
    assert _checkpoint_n_iter(path) == 12


def test_interrupt_between_steps_saves_the_checkpoint(mog_tasks, monkeypatch, tmp_path):
    X, groups = mog_tasks
    path = tmp_path / "meta.ckpt"
    save = skmetavi._checkpoint.save
    calls = {"n": 0}

    def interrupting_save(*args, **kwargs):
        calls["n"] += 1
        save(*args, **kwargs)
        if calls["n"] == 2:  # after the checkpoint of iteration 6, outside step()
            raise KeyboardInterrupt

    monkeypatch.setattr(skmetavi._checkpoint, "save", interrupting_save)
    est = MetaDivergenceVI(**MOG_META, max_meta_iter=12)
    with pytest.warns(RuntimeWarning, match="interrupted after 6 outer iterations"):
        est.meta_fit(X, groups=groups, checkpoint=path, checkpoint_every=3)
    monkeypatch.undo()
    assert _checkpoint_n_iter(path) == 6 == est.n_meta_iter_


def test_truncated_checkpoint_gives_a_clear_error(mog_tasks, tmp_path):
    X, groups = mog_tasks
    path = tmp_path / "meta.ckpt"
    MetaDivergenceVI(**MOG_META, max_meta_iter=2).meta_fit(X, groups=groups, checkpoint=path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"Could not read the checkpoint .*corrupted, "
                       r"truncated or not a skmetavi checkpoint\. Delete it"):
        MetaDivergenceVI(**MOG_META, max_meta_iter=4).meta_fit(X, groups=groups, checkpoint=path)


_KILL_SCRIPT = """
import sys, time
import torch
torch.set_num_threads(1)
import skmetavi._bilevel
import skmetavi._checkpoint
from skmetavi import MetaDivergenceVI
from skmetavi.datasets import make_mog_tasks

step = skmetavi._bilevel.MetaTrainer.step

def slow_step(self):  # leaves time to kill the process mid-run; changes no number
    out = step(self)
    time.sleep(0.05)
    return out

skmetavi._bilevel.MetaTrainer.step = slow_step
X, groups = make_mog_tasks(4, random_state=0)
MetaDivergenceVI(**{params!r}).meta_fit(
    X, groups=groups, checkpoint=sys.argv[1], checkpoint_every={every}
)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL is POSIX")
def test_resume_after_sigkill_is_bit_identical(mog_tasks, tmp_path):
    """Kill a meta_fit process (SIGKILL) after its first checkpoint, resume in this one.

    The resumed run ends exactly where an uninterrupted run with the same
    random_state ends.
    """
    X, groups = mog_tasks
    params = dict(MOG_META, max_meta_iter=40)
    path = tmp_path / "meta.ckpt"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(_KILL_SCRIPT.format(params=params, every=5)))
    log = tmp_path / "stderr.txt"
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path)],
            stdout=subprocess.DEVNULL, stderr=stderr,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
        try:
            deadline = time.monotonic() + 120
            while not path.exists():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "no checkpoint within 120 s"
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 0 < _checkpoint_n_iter(path) < 40  # killed mid-run
    resumed = MetaDivergenceVI(**params).meta_fit(
        X, groups=groups, checkpoint=path, checkpoint_every=5
    )
    full = MetaDivergenceVI(**params).meta_fit(X, groups=groups)
    _assert_same_meta_state(resumed, full)
    for key, t in full._meta_state["task_params"].items():
        torch.testing.assert_close(resumed._meta_state["task_params"][key], t, rtol=0, atol=0)
    X0 = X[groups == 0]
    np.testing.assert_array_equal(resumed.fit(X0).sample(5), full.fit(X0).sample(5))


# ------------------------------------------------- non-regression (review findings)
def test_warm_start_with_checkpoint_continues(tmp_path):
    """Non-regression: a warm-started meta_fit with a checkpoint used to run 0 iterations."""
    X, groups = make_mog_tasks(5, random_state=0)
    ck = tmp_path / "w.ckpt"
    kw = dict(model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd",
              n_particles=16, max_meta_iter=3, random_state=0)
    est = MetaDivergenceVI(warm_start=True, **kw).meta_fit(X, groups=groups, checkpoint=ck)
    alpha = est.meta_divergence_.alpha
    est.meta_fit(X, groups=groups, checkpoint=ck)
    assert est.n_meta_iter_ == 6 and est.meta_divergence_.alpha != alpha
    straight = MetaDivergenceVI(**{**kw, "max_meta_iter": 6}).meta_fit(X, groups=groups)
    np.testing.assert_array_equal(est.meta_loss_curve_, straight.meta_loss_curve_)


def test_frozen_divergence_from_fit_is_learnable_again():
    """Non-regression: meta_fit with est.divergence_ (frozen by fit) silently learned nothing."""
    X, groups = make_mog_tasks(5, random_state=0)
    fitted = MetaDivergenceVI("gaussian_mixture", divergence="renyi", max_iter=5,
                              random_state=0).fit(X[:2])
    assert not any(p.requires_grad for p in fitted.divergence_.parameters())
    est = MetaDivergenceVI("gaussian_mixture", divergence=fitted.divergence_, inner_optimizer="sgd",
                           max_meta_iter=10, n_particles=16, random_state=0)
    est.meta_fit(X, groups=groups)
    assert est.meta_divergence_.alpha != pytest.approx(0.5)


def test_checkpoint_fingerprint_is_stable_across_processes(tmp_path):
    """Non-regression: a callable model's repr has an address, so resuming always failed."""
    import subprocess
    import sys

    code = (
        "import numpy as np\n"
        "from skmetavi import MetaDivergenceVI\n"
        "from skmetavi.estimators._base import _stable_repr\n"
        "from skmetavi.datasets import make_mog_tasks\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "import _fingerprint_model as m\n"
        "est = MetaDivergenceVI(m.log_joint, n_latent=1, meta_loss=m.meta_loss, random_state=0)\n"
        "X, g = make_mog_tasks(3, random_state=0)\n"
        "print(est._fingerprint(X, None, g))\n"
    )
    root = Path(__file__).parent.parent
    out = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root).stdout.strip() for _ in range(2)]
    assert out[0] and out[0] == out[1]
    with pytest.raises(ValueError, match="needs an int random_state"):
        MetaDivergenceVI("gaussian_mixture", divergence="renyi", max_meta_iter=2).meta_fit(
            *make_mog_tasks(3, random_state=0)[:1], groups=[0, 0, 1, 1, 2, 2],
            checkpoint=tmp_path / "c.ckpt")


@pytest.mark.parametrize("model", ["gaussian_mixture", lambda z, X, y: -(z**2).sum(-1)])
def test_minibatch_refused_for_targets_whose_rows_are_not_data(model):
    """Non-regression: batch_size subsampled a mixture's components (a different target)."""
    with pytest.raises(ValueError, match="cannot be used with"):
        MetaDivergenceVI(model, n_latent=1, batch_size=1, max_iter=2).fit(
            np.array([[0.5, 0.0, 1.0], [0.5, 3.0, 1.0]]))
