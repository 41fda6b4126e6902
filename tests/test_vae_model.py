"""VAELatent: the engine's VAE (issue 11's model), checked against known answers."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import pytest
import torch

from skmetavi._bilevel import NegativeEvidence, inner_direction, inner_loop, run_vi
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import pad_tasks
from skmetavi.datasets import load_digits_tasks
from skmetavi.divergences import KL, FDivergence, Renyi, TailAdaptive
from skmetavi.models import LinearGaussianLatent, VAELatent

DT = torch.float64


def _gaussian_tasks(sizes=(6, 4), p=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(2, p, generator=g, dtype=DT)
    return pad_tasks([torch.randn(n, 2, generator=g, dtype=DT) @ W
                      + 0.3 * torch.randn(n, p, generator=g, dtype=DT) for n in sizes])


def _as_vae(ppca_params):
    """The PPCA parameters in VAELatent's layout (no hidden layer, Gaussian decoder)."""
    p = ppca_params["bias"].shape[-1]
    return {
        "dec_w0": ppca_params["weight"], "dec_b0": ppca_params["bias"],
        "dec_noise_raw": ppca_params["noise_raw"].expand(-1, p).clone(),
        "enc_loc_w": ppca_params["enc_weight"], "enc_loc_b": ppca_params["enc_bias"],
        "enc_scale_w": torch.zeros_like(ppca_params["enc_weight"]),
        "enc_scale_b": ppca_params["enc_scale_raw"],
    }


def test_without_hidden_layers_it_is_probabilistic_pca():
    """Two implementations of the same model: log p, log q and the engine's direction."""
    ppca = LinearGaussianLatent(2, inference="amortized")
    vae = VAELatent(2, hidden_layer_sizes=(), decoder="gaussian")
    tasks = _gaussian_tasks()
    g = torch.Generator().manual_seed(1)
    params = {k: v + 0.3 * torch.randn(v.shape, generator=g, dtype=DT)
              for k, v in ppca.init_params(tasks, generator=g).items()}
    vparams = _as_vae(params)
    assert set(vparams) == set(vae.init_params(tasks, generator=g))
    eps = ppca.sample_eps(params, tasks, 5, generator=torch.Generator().manual_seed(2))
    z = ppca.rsample(params, tasks, eps)
    torch.testing.assert_close(vae.rsample(vparams, tasks, eps), z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vae.log_p(vparams, tasks, z), ppca.log_p(params, tasks, z),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vae.log_q(vparams, tasks, z), ppca.log_q(params, tasks, z),
                               rtol=1e-12, atol=1e-12)
    pairs = {"dec_w0": "weight", "dec_b0": "bias", "enc_loc_w": "enc_weight",
             "enc_loc_b": "enc_bias", "enc_scale_b": "enc_scale_raw"}
    for div in (Renyi(0.5).to(DT), FDivergence(0.0).to(DT), TailAdaptive().to(DT)):
        leaves = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        vleaves = {k: v.detach().requires_grad_(True) for k, v in vparams.items()}
        d_ppca, s_ppca = inner_direction(ppca, div, leaves, tasks, eps, create_graph=False)
        d_vae, s_vae = inner_direction(vae, div, vleaves, tasks, eps, create_graph=False)
        for ours, theirs in pairs.items():
            torch.testing.assert_close(d_vae[ours], d_ppca[theirs], rtol=1e-10, atol=1e-10)
        # One noise per feature here, one shared there: the chain rule sums them.
        torch.testing.assert_close(d_vae["dec_noise_raw"].sum(-1, keepdim=True),
                                   d_ppca["noise_raw"], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(s_vae.bound, s_ppca.bound, rtol=1e-12, atol=1e-12)


def test_importance_weights_are_the_marginal_with_the_exact_posterior_encoder():
    """k = 1: set the encoder to the exact posterior; every log weight equals log p(x_n)."""
    ppca = LinearGaussianLatent(1, inference="amortized")
    tasks = _gaussian_tasks(sizes=(7,))
    params = {k: v.detach() for k, v in ppca.init_params(
        tasks, generator=torch.Generator().manual_seed(3)).items()}
    X = tasks.X[0]
    W, b = params["weight"][0], params["bias"][0]
    var = ppca.noise(params)[0] ** 2
    _, cov = ppca.posterior(params, X)
    params["enc_weight"] = (W.T @ cov / var).unsqueeze(0)
    params["enc_bias"] = (-(b @ W.T) @ cov / var).unsqueeze(0)
    params["enc_scale_raw"] = torch.log(torch.expm1(torch.sqrt(torch.diagonal(cov)) - 1e-6))[None]
    vae = VAELatent(1, hidden_layer_sizes=(), decoder="gaussian")
    vparams = _as_vae(params)
    eps = vae.sample_eps(vparams, tasks, 4, generator=torch.Generator().manual_seed(0))
    z = vae.rsample(vparams, tasks, eps)
    log_w = vae.log_p(vparams, tasks, z) - vae.log_q(vparams, tasks, z)  # (1, 7, 4)
    exact = ppca.log_marginal(params, X)
    torch.testing.assert_close(log_w[0], exact[:, None].expand(-1, 4), rtol=1e-10, atol=1e-10)
    value = NegativeEvidence(4)(vae, vparams, tasks, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(value[0], -exact.mean(), rtol=1e-10, atol=1e-10)


def _reference_mlp(x, weights, biases, act):
    """Per-task, per-layer matmuls (the activation on every layer but the last)."""
    for i, (w, b) in enumerate(zip(weights, biases)):
        x = x @ w + b
        if i < len(weights) - 1:
            x = act(x)
    return x


def test_networks_and_bernoulli_likelihood_match_a_per_task_reference():
    """Encoder, decoder (mirrored widths, no output activation) and the Bernoulli log
    likelihood written out per task with explicit log-sigmoids."""
    vae = VAELatent(3, hidden_layer_sizes=(5, 4), decoder="bernoulli", activation="tanh")
    X = torch.bernoulli(torch.full((2, 6, 7), 0.4, dtype=DT),
                        generator=torch.Generator().manual_seed(0))
    tasks = pad_tasks([X[0], X[1, :4]])
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)
    params = {k: v + 0.2 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in params.items()}
    z = torch.randn(2, 6, 5, 3, generator=torch.Generator().manual_seed(2), dtype=DT)
    loc, scale = vae.q_loc_scale(params, tasks)
    for m in range(2):
        dec = _reference_mlp(z[m], [params[f"dec_w{i}"][m] for i in range(3)],
                             [params[f"dec_b{i}"][m] for i in range(3)], torch.tanh)
        assert [params[f"dec_w{i}"].shape[-1] for i in range(3)] == [4, 5, 7]
        torch.testing.assert_close(vae.decode(params, z)[m], dec)
        x = tasks.X[m].unsqueeze(1)  # (S, 1, p)
        lik = (x * torch.nn.functional.logsigmoid(dec)
               + (1 - x) * torch.nn.functional.logsigmoid(-dec)).sum(-1)
        torch.testing.assert_close(vae.decoder_log_prob(params, tasks, z)[m], lik)
        h = _reference_mlp(tasks.X[m], [params["enc_w0"][m], params["enc_w1"][m]],
                           [params["enc_b0"][m], params["enc_b1"][m]], torch.tanh)
        h = torch.tanh(h)  # the last hidden layer is activated too
        torch.testing.assert_close(loc[m], h @ params["enc_loc_w"][m] + params["enc_loc_b"][m])
        raw = h @ params["enc_scale_w"][m] + params["enc_scale_b"][m]
        torch.testing.assert_close(scale[m], torch.nn.functional.softplus(raw) + 1e-6)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    torch.testing.assert_close(vae.log_p(params, tasks, z),
                               prior + vae.decoder_log_prob(params, tasks, z))


def test_each_task_has_its_own_networks():
    """Task m's values depend on task m's parameters only (the leading dimension is a batch)."""
    vae = VAELatent(2, hidden_layer_sizes=(6,))
    X = torch.bernoulli(torch.full((3, 5, 4), 0.5, dtype=DT),
                        generator=torch.Generator().manual_seed(0))
    tasks = pad_tasks(list(X))
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(1))
    eps = vae.sample_eps(params, tasks, 3, generator=torch.Generator().manual_seed(2))
    batched = vae.log_p(params, tasks, vae.rsample(params, tasks, eps))
    for m in range(3):
        one = {k: v[m:m + 1] for k, v in params.items()}
        t = pad_tasks([X[m]])
        alone = vae.log_p(one, t, vae.rsample(one, t, eps[m:m + 1]))
        torch.testing.assert_close(batched[m:m + 1], alone, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("inference", ["amortized", "factorized"])
def test_vi_on_digit_tasks_raises_the_bound(inference):
    """The engine trains it: minibatched KL-VI on two digit tasks raises the per-row ELBO."""
    X, g = load_digits_tasks(digits=(0, 1))
    tasks = pad_tasks([torch.tensor(X[g == d][:60]) for d in (0, 1)])
    vae = VAELatent(2, hidden_layer_sizes=(32,), inference=inference)
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(0))
    opt = Adam(0.02)
    params, _, curve = run_vi(vae, KL(), opt, params, opt.init(params, local=vae.local_keys),
                              tasks, n_steps=150, n_particles=4, batch_size=20,
                              generator=torch.Generator().manual_seed(1))
    start = torch.stack(curve[:10]).mean(0) / 60
    end = torch.stack(curve[-10:]).mean(0) / 60
    assert torch.all(end > start + 5.0), (start, end)  # nats per 64-pixel image


def test_alpha_meta_gradient_matches_finite_differences():
    vae = VAELatent(2, hidden_layer_sizes=(4,), decoder="bernoulli")
    X = torch.bernoulli(torch.full((2, 5, 6), 0.5, dtype=DT),
                        generator=torch.Generator().manual_seed(0))
    tasks = pad_tasks([X[0], X[1, :3]])
    p0 = vae.init_params(tasks, generator=torch.Generator().manual_seed(1))
    div = Renyi(0.6).to(DT)
    loss = NegativeEvidence(16)

    def objective():
        opt = SGD(0.05)
        p, _, _ = inner_loop(vae, div, opt, p0, opt.init(p0), tasks, n_steps=2, n_particles=6,
                             generator=torch.Generator().manual_seed(3))
        return loss(vae, p, tasks, generator=torch.Generator().manual_seed(4)).mean()

    (g,) = torch.autograd.grad(objective(), div.raw_alpha)
    h, old = 1e-5, float(div.raw_alpha.detach())
    div.raw_alpha.data.fill_(old + h)
    plus = float(objective().detach())
    div.raw_alpha.data.fill_(old - h)
    minus = float(objective().detach())
    div.raw_alpha.data.fill_(old)
    assert abs(float(g)) > 1e-7
    assert float(g) == pytest.approx((plus - minus) / (2 * h), rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_components=0), "n_components must be a positive int"),
    (dict(hidden_layer_sizes=(4, 0)), "every hidden layer size must be a positive int"),
    (dict(decoder="poisson"), r"decoder must be one of \['bernoulli', 'gaussian'\]"),
    (dict(inference="mixed"), "inference must be one of"),
    (dict(activation="gelu"), "activation must be one of"),
    (dict(init_scale=0.0), "init_scale must be a finite number > 0"),
    (dict(init_scale=float("inf")), "init_scale must be a finite number > 0"),
])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VAELatent(**kwargs)


def test_factorized_q_refuses_other_rows():
    vae = VAELatent(2, inference="factorized")
    tasks = pad_tasks([torch.zeros(4, 3, dtype=DT)])
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="factorised q has parameters for 4 rows"):
        vae.q_loc_scale(params, pad_tasks([torch.zeros(5, 3, dtype=DT)]))
    loc, scale = vae.q_loc_scale(params, tasks)  # the prior, for every row
    torch.testing.assert_close(loc, torch.zeros(1, 4, 2, dtype=DT))
    torch.testing.assert_close(scale, torch.ones(1, 4, 2, dtype=DT))


def test_amortized_q_starts_with_unit_scale_and_the_networks_accept_an_int_width():
    vae = VAELatent(2, hidden_layer_sizes=8, decoder="gaussian")
    assert vae.hidden_layer_sizes == (8,)
    X = 10.0 * torch.randn(5, 3, dtype=DT, generator=torch.Generator().manual_seed(0))
    tasks = pad_tasks([X])
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(1))
    _, scale = vae.q_loc_scale(params, tasks)
    torch.testing.assert_close(scale, torch.ones_like(scale))


def test_the_predictive_nll_refuses_a_model_with_local_latents():
    from skmetavi._bilevel import PredictiveNLL

    vae = VAELatent(2)
    tasks = pad_tasks([torch.zeros(4, 3, dtype=DT)])
    params = vae.init_params(tasks, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"needs a model with one global latent.*NegativeEvidence"):
        PredictiveNLL(4)(vae, params, tasks, generator=torch.Generator().manual_seed(0))
