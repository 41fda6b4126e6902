"""MetaVAE: IWAE marginal likelihood, amortisation gap, meta-learning, API and errors."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import pickle
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline

from skmetavi import MetaVAE, Renyi
from skmetavi._bilevel import MetaTrainer
from skmetavi.datasets import load_digits_tasks
from skmetavi.divergences import KL
from skmetavi.estimators import _vae as vae_module

FAST = dict(n_components=2, hidden_layer_sizes=(16,), max_iter=60, n_score_samples=200,
            random_state=0)


@pytest.fixture(scope="module")
def digits():
    return load_digits_tasks()


def _ppca(n=300, p=5, k=2, seed=0):
    rng = np.random.RandomState(seed)
    W = rng.normal(size=(k, p))
    b = rng.normal(size=p)
    sigma = 0.3 + 0.4 * rng.rand(p)
    Z = rng.normal(size=(n, k))
    return Z @ W + b + sigma * rng.normal(size=(n, p))


@pytest.fixture(scope="module")
def ppca_vae():
    X = _ppca()
    vae = MetaVAE(2, hidden_layer_sizes=(), decoder="gaussian", max_iter=600, batch_size=None,
                  inner_lr=0.01, n_score_samples=5000, dtype="float64", random_state=0)
    return vae.fit(X), X


def _exact_log_marginal(vae, X):
    """log N(x; b, W^T W + diag sigma^2) of the fitted linear-Gaussian decoder."""
    p = vae.variational_params_
    W, b = p["dec_w0"][0].numpy(), p["dec_b0"][0].numpy()
    sigma = (torch.nn.functional.softplus(p["dec_noise_raw"][0]) + 1e-3).numpy()
    return multivariate_normal(b, W.T @ W + np.diag(sigma**2)).logpdf(X)


# ------------------------------------------------------------ known answers
def test_iwae_matches_exact_marginal_of_linear_gaussian_model(ppca_vae):
    """5000-sample IWAE = the closed-form log p(x) of probabilistic PCA (and never above it)."""
    vae, X = ppca_vae
    exact = _exact_log_marginal(vae, X[:50])
    iwae = vae.score_samples(X[:50])
    assert np.abs(iwae - exact).max() < 0.02
    # A lower bound, up to the Monte Carlo error of the draws (shared by the rows).
    assert np.mean(iwae - exact) < 5e-3


def test_linear_encoder_has_no_amortization_gap_on_ppca(ppca_vae):
    """The exact posterior's mean is linear in x: a linear encoder reaches the per-row optimum."""
    vae, X = ppca_vae
    gap = vae.amortization_gap(X[:100], n_samples=2000)
    assert gap.gap.shape == gap.amortized.shape == gap.factorized.shape == (100,)
    assert np.allclose(gap.gap, gap.factorized - gap.amortized)
    assert abs(gap.mean_gap) < max(0.02, 4 * gap.stderr)
    # The ELBO is below log p(x) (up to Monte Carlo error).
    exact = _exact_log_marginal(vae, X[:100])
    assert np.mean(gap.factorized) < np.mean(exact) + 1e-3


def test_small_encoder_on_nonlinear_decoder_leaves_a_positive_gap(digits):
    X, g = digits
    small = MetaVAE(4, hidden_layer_sizes=(64,), encoder_layer_sizes=(1,), max_iter=300,
                    random_state=0).fit(X[g == 5])
    wide = MetaVAE(4, hidden_layer_sizes=(64,), max_iter=300, random_state=0).fit(X[g == 5])
    gap_small = small.amortization_gap(X[g == 5][:60], n_samples=300)
    gap_wide = wide.amortization_gap(X[g == 5][:60], n_samples=300)
    # Measured 0.15 +- 0.03 nats per image (seed 0).
    assert gap_small.mean_gap > 0.05 and gap_small.mean_gap > 3 * gap_small.stderr
    assert (gap_small.gap > 0).mean() > 0.7
    # The factorised optimum starts at the encoder: it is never clearly worse.
    assert gap_wide.mean_gap > -3 * gap_wide.stderr


def test_gap_in_the_trained_divergence_bound(digits):
    """bound="divergence" measures a Rényi encoder in its own VR bound (KL: the ELBO)."""
    X, g = digits
    kw = dict(n_components=4, hidden_layer_sizes=(32,), max_iter=150, random_state=0)
    kl = MetaVAE(**kw).fit(X[g == 6])
    a = kl.amortization_gap(X[g == 6][:40], n_samples=200)
    b = kl.amortization_gap(X[g == 6][:40], n_samples=200, bound="divergence")
    assert np.allclose(a.amortized, b.amortized)  # KL's bound is the ELBO
    renyi = MetaVAE(divergence=Renyi(0.5, learnable=False), **kw).fit(X[g == 6])
    elbo = renyi.amortization_gap(X[g == 6][:40], n_samples=200)
    vr = renyi.amortization_gap(X[g == 6][:40], n_samples=200, bound="divergence")
    assert (vr.amortized > elbo.amortized).mean() > 0.9  # VR(0.5) bound >= ELBO
    assert vr.mean_gap > -3 * vr.stderr
    with pytest.raises(ValueError, match="bound must be"):
        kl.amortization_gap(X[:3], bound="iwae")


def test_fit_learns_the_digit(digits):
    """A VAE fitted on one digit scores held-out images of it above images of another digit."""
    X, g = digits
    fives = X[g == 5]
    vae = MetaVAE(4, hidden_layer_sizes=(32,), max_iter=200, n_score_samples=200,
                  random_state=0).fit(fives[:120])
    assert vae.loss_curve_[-10:].mean() < 0.6 * vae.loss_curve_[:3].mean()
    held_out, other = vae.score(fives[120:]), vae.score(X[g == 1][:60])
    assert held_out > other + 5
    assert -40 < held_out < 0


# ------------------------------------------------------------ chunking, invariance
def test_score_samples_does_not_depend_on_chunking(digits, monkeypatch):
    X, g = digits
    vae = MetaVAE(**FAST).fit(X[g == 3])
    ref = vae.score_samples(X[:30])
    # Rows are chunked with the same draws for every row: the same values exactly.
    monkeypatch.setattr(vae_module, "_ROW_CHUNK", 4)
    assert np.allclose(vae.score_samples(X[:30]), ref, atol=1e-4)
    assert np.allclose(vae.score_samples(X[:30][::-1]), ref[::-1], atol=1e-4)
    # Smaller sample chunks (less memory) draw other numbers: equal within Monte Carlo error.
    vae.set_params(n_score_samples=3000)
    big = vae.score_samples(X[:30])
    monkeypatch.setattr(vae_module, "_CHUNK_FLOATS", 64 * 4 * 7)  # 7 samples per chunk
    small = vae.score_samples(X[:30])
    assert abs(np.mean(small - big)) < 0.1 and np.abs(small - big).max() < 0.5


def test_factorized_inference_fits_new_rows(digits):
    X, g = digits
    vae = MetaVAE(inference="factorized", local_max_iter=100, **FAST).fit(X[g == 0][:100])
    assert vae.variational_params_["z_loc"].shape == (1, 100, 2)
    Z = vae.transform(X[g == 0][100:110])
    assert Z.shape == (10, 2) and np.isfinite(Z).all()
    s = vae.score_samples(X[g == 0][100:110])
    assert np.isfinite(s).all() and (s < 0).all()
    with pytest.raises(ValueError, match="inference='factorized'"):
        vae.amortization_gap(X[:5])


# ------------------------------------------------------------ meta-learning
def test_meta_fit_learns_alpha_and_it_changes_fit(digits):
    X, g = digits
    train = g < 3
    est = MetaVAE(2, hidden_layer_sizes=(16,), divergence=Renyi(1.0), max_meta_iter=40,
                  meta_lr=0.05, max_iter=20, n_score_samples=100, random_state=0)
    est.meta_fit(X[train], groups=g[train])
    alpha = est.meta_divergence_.alpha
    assert abs(alpha - 1.0) > 0.05, alpha  # the learned quantity moves
    assert est.meta_loss_curve_.shape == (40,) and np.isfinite(est.meta_loss_curve_).all()
    est.fit(X[g == 5])
    assert est.divergence_.alpha == pytest.approx(alpha)


def test_meta_gradient_of_alpha_is_not_zero(digits):
    X, g = digits
    est = MetaVAE(2, hidden_layer_sizes=(16,), divergence=Renyi(1.0), max_meta_iter=1,
                  random_state=0)
    est._setup_torch()
    _, _, _, (model, support, query, gen, _) = est._meta_fit_inputs(X[g < 3], None, g[g < 3])
    trainer = est._meta_trainer(model, support, query, gen, est._meta_divergence(False))
    for _ in range(3):  # Adam's per-task state warms up on the first visit
        trainer.step()
    grad = trainer.divergence.raw_alpha.grad
    assert grad is not None and abs(float(grad)) > 1e-6


def test_meta_learned_initialisation_is_a_better_start(digits):
    """Algorithm 2: the learned init, adapted for its steps, beats a random init on a new digit."""
    X, g = digits
    est = MetaVAE(2, hidden_layer_sizes=(16,), meta_learn_init=True, n_inner_steps=3,
                  max_meta_iter=60, init_lr=0.01, n_score_samples=100, random_state=0,
                  divergence=KL())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nothing to learn but the init
        est.meta_fit(X[g < 5], groups=g[g < 5])
    assert set(est.meta_init_) == set(MetaVAE(**FAST).fit(X[:20]).variational_params_)
    new = X[g == 7][:40]
    learned = est.set_params(max_iter="auto").fit(new).score(X[g == 7][40:100])
    fresh = MetaVAE(2, hidden_layer_sizes=(16,), max_iter=3, n_score_samples=100,
                    random_state=0).fit(new).score(X[g == 7][40:100])
    assert learned > fresh + 2


def test_meta_learned_init_with_factorized_q_starts_every_row_at_the_prior(digits):
    X, g = digits
    est = MetaVAE(inference="factorized", meta_learn_init=True, n_inner_steps=2,
                  max_meta_iter=3, local_max_iter=5, divergence=KL(),
                  **{**FAST, "max_iter": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        est.meta_fit(X[g < 3], groups=g[g < 3])
    assert not {"z_loc", "z_scale_raw"} & set(est.meta_init_)
    est.fit(X[g == 4][:17])
    assert est.variational_params_["z_loc"].shape == (1, 17, 2)


def test_meta_fit_is_deterministic_and_resumes_from_a_checkpoint(digits, tmp_path):
    X, g = digits
    kw = dict(FAST, divergence=Renyi(1.0), max_meta_iter=6)
    full = MetaVAE(**kw).meta_fit(X[g < 3], groups=g[g < 3])
    again = MetaVAE(**kw).meta_fit(X[g < 3], groups=g[g < 3])
    assert full.meta_divergence_.alpha == again.meta_divergence_.alpha
    path = tmp_path / "vae.ckpt"
    step, calls = MetaTrainer.step, {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return step(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MetaTrainer, "step", interrupting)
        with pytest.warns(RuntimeWarning, match="meta_fit interrupted"):
            MetaVAE(**kw).meta_fit(X[g < 3], groups=g[g < 3], checkpoint=path,
                                   checkpoint_every=2)
    resumed = MetaVAE(**kw).meta_fit(X[g < 3], groups=g[g < 3], checkpoint=path)
    assert resumed.n_meta_iter_ == 6
    assert resumed.meta_divergence_.alpha == pytest.approx(full.meta_divergence_.alpha,
                                                           rel=1e-6)


# ------------------------------------------------------------ API
def test_sample_inverse_transform_and_pickle(digits):
    X, g = digits
    vae = MetaVAE(**FAST).fit(X[g == 2])
    S = vae.sample(7)
    assert S.shape == (7, 64) and set(np.unique(S)) <= {0.0, 1.0}
    assert np.array_equal(S, vae.sample(7))  # seeded by fit
    assert not np.array_equal(S, vae.sample(7, random_state=1))
    M = vae.inverse_transform(np.zeros((3, 2)))
    assert M.shape == (3, 64) and ((M > 0) & (M < 1)).all()
    clone = pickle.loads(pickle.dumps(vae))
    assert np.array_equal(clone.score_samples(X[:5]), vae.score_samples(X[:5]))
    assert all(v.device.type == "cpu" for v in vae.variational_params_.values())
    assert list(vae.get_feature_names_out()) == ["metavae0", "metavae1"]


def test_pipeline_embedding_for_a_classifier(digits):
    X, g = digits
    mask = g < 2
    pipe = make_pipeline(MetaVAE(**FAST), LogisticRegression())
    pipe.fit(X[mask], g[mask])
    assert pipe.score(X[mask], g[mask]) > 0.9


def test_decoder_auto_resolution():
    rng = np.random.RandomState(0)
    binary = (rng.rand(20, 4) < 0.5).astype(float)
    assert MetaVAE(**FAST).fit(binary).decoder_ == "bernoulli"
    # Grey levels in [0, 1] are not binary: a Bernoulli "density" would not be one.
    assert MetaVAE(**FAST).fit(rng.rand(20, 4)).decoder_ == "gaussian"
    assert MetaVAE(decoder="bernoulli", **FAST).fit(rng.rand(20, 4)).decoder_ == "bernoulli"
    vae = MetaVAE(**FAST).fit(binary)
    with pytest.raises(ValueError, match=r"Bernoulli decoder models values in \[0, 1\]"):
        vae.score(rng.normal(size=(5, 4)))
    with pytest.raises(ValueError, match="decoder='gaussian'"):
        MetaVAE(decoder="bernoulli", **FAST).fit(rng.normal(size=(20, 4)))


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda v: v.sample(0), "n_samples must be a positive int"),
        (lambda v: v.inverse_transform(np.zeros((2, 3))), "n_components=2"),
        (lambda v: v.amortization_gap(np.zeros((2, 4)), n_samples=0), "positive int"),
        (lambda v: v.transform(np.zeros((2, 5))), "features"),
    ],
)
def test_clear_errors(call, match):
    vae = MetaVAE(**FAST).fit(np.random.RandomState(0).rand(20, 4))
    with pytest.raises(ValueError, match=match):
        call(vae)


def test_meta_fit_keeps_the_fitted_vae_and_its_decoder(digits):
    """meta_fit (failed or not) leaves a fitted VAE's decoder_; a learned init fixes fit's."""
    X, g = digits
    rng = np.random.RandomState(0)
    real = rng.normal(size=(40, 64))
    vae = MetaVAE(**FAST).fit(real)
    before = vae.score(real)
    with pytest.raises(ValueError, match="groups"):
        vae.meta_fit(X[g < 3])
    vae.set_params(divergence=Renyi(1.0), max_meta_iter=2).meta_fit(X[g < 3], groups=g[g < 3])
    assert vae.decoder_ == "gaussian" and vae.meta_decoder_ == "bernoulli"
    assert vae.score(real) == before
    init = MetaVAE(**FAST, meta_learn_init=True, n_inner_steps=2, max_meta_iter=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        init.meta_fit(X[g < 3], groups=g[g < 3])
    with pytest.raises(ValueError, match="Bernoulli decoder") as exc:
        init.fit(real)
    assert "decoder='gaussian'" not in str(exc.value)  # that would not help
    with pytest.raises(ValueError, match="meta-trained with a 'bernoulli' decoder"):
        init.set_params(decoder="gaussian").fit(real)
    with pytest.raises(ValueError, match="meta_init_.*does not match"):
        init.set_params(decoder="auto", hidden_layer_sizes=(8,)).fit(X[g == 5])


def test_warm_start_refuses_another_decoder():
    rng = np.random.RandomState(0)
    vae = MetaVAE(**FAST, warm_start=True).fit(rng.normal(size=(20, 4)))
    vae.set_params(decoder="bernoulli")
    with pytest.raises(ValueError, match="fitted with a 'gaussian' decoder"):
        vae.fit((rng.rand(20, 4) < 0.5).astype(float))


def test_gaussian_decoder_sample_and_factorized_transform():
    rng = np.random.RandomState(0)
    X = rng.normal(size=(30, 3))
    vae = MetaVAE(**FAST).fit(X)
    S = vae.sample(50)
    assert S.shape == (50, 3) and len(np.unique(S)) > 100  # real values
    # A factorised q exists per fitted row; transform fits new ones for the rows it is given
    # (decoder fixed), so that fit_transform(X) == fit(X).transform(X).
    fact = MetaVAE(inference="factorized", local_max_iter=30, **FAST)
    Z = fact.fit_transform(X)
    assert np.allclose(Z, fact.transform(X))


def test_feature_names_need_a_fitted_estimator():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        MetaVAE().get_feature_names_out()


def test_bad_layer_sizes_are_rejected():
    with pytest.raises(ValueError, match="encoder_layer_sizes must be positive ints"):
        MetaVAE(encoder_layer_sizes=(0,), **FAST).fit(np.random.rand(10, 3))
