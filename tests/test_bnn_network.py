"""MetaBNNRegressor(network=...): a user's torch.nn.Module as the Bayesian network."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
import pickle

import numpy as np
import pytest
import torch
from sklearn.base import clone

from skmetavi import MetaBNNRegressor
from skmetavi._tasks import pad_tasks
from skmetavi._validation import _stable_repr
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.models import BNNRegression, ModuleBNNRegression


class SkipNet(torch.nn.Module):
    """A residual network with a custom forward: not an MLP the built-in path could build."""

    def __init__(self, width=16, n_outputs=2):
        super().__init__()
        self.inp = torch.nn.Linear(1, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, n_outputs)
        self.register_buffer("x_scale", torch.tensor(0.5))  # a constant, not a weight

    def forward(self, x):
        h = torch.tanh(self.inp(x * self.x_scale))
        h = h + torch.tanh(self.hidden(h))  # skip connection
        return self.out(h)


class Centred(torch.nn.Module):
    """Subtracts the batch mean: one row's output depends on the other rows."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 2)

    def forward(self, x):
        return self.lin(x - x.mean(0))


class Squeezed(torch.nn.Module):
    """Homoskedastic mean of shape (n,)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 8)
        self.out = torch.nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.relu(self.lin(x)))[:, 0]


def _seeded(make, seed=0):
    """``make()`` with torch's default initialisation drawn from ``seed`` (global RNG restored)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def _mlp(n_in=1, width=16, n_out=2, act=torch.nn.Tanh):
    return torch.nn.Sequential(
        torch.nn.Linear(n_in, width), act(), torch.nn.Linear(width, n_out)
    )


@pytest.fixture(scope="module")
def sinusoid():
    X, y, groups = make_sinusoid_tasks(8, 60, random_state=0)
    return X, y, groups


@pytest.fixture(scope="module")
def one_task():
    X, y, _ = make_sinusoid_tasks(1, 300, random_state=3)
    return X[:200], y[:200], X[200:], y[200:]


FAST = dict(n_particles=8, random_state=0)


# ------------------------------------------------ independent implementations agree
def _builtin_to_module(z, shapes):
    """Map flat z from BNNRegression's layout (W as (fan_in, fan_out), then b, per layer)
    to Sequential's named_parameters() layout (weight as (fan_out, fan_in), then bias)."""
    chunks, start = [], 0
    for i, o in shapes:
        W = z[..., start : start + i * o].reshape(*z.shape[:-1], i, o)
        b = z[..., start + i * o : start + i * o + o]
        chunks += [W.transpose(-1, -2).reshape(*z.shape[:-1], o * i), b]
        start += i * o + o
    assert start == z.shape[-1]
    return torch.cat(chunks, -1)


@pytest.mark.parametrize("likelihood", ["heteroskedastic", "homoskedastic"])
def test_sequential_module_matches_builtin_mlp(likelihood):
    """Two implementations of the same MLP: batched matmuls and functional_call + vmap."""
    builtin = BNNRegression(hidden_layer_sizes=(5,), activation="relu", likelihood=likelihood)
    n_out = builtin.n_outputs
    net = _seeded(lambda: _mlp(3, 5, n_out, torch.nn.ReLU).double())
    module = ModuleBNNRegression(net, likelihood=likelihood)
    assert module.n_latent(3) == builtin.n_latent(3) == 3 * 5 + 5 + 5 * n_out + n_out

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, builtin.n_latent(3), generator=gen, dtype=torch.float64)
    z_module = _builtin_to_module(z, builtin.layer_shapes(3))
    # Two tasks of different lengths: the padding mask must be respected the same way.
    Xs = [torch.randn(n, 3, generator=gen, dtype=torch.float64) for n in (7, 4)]
    ys = [torch.randn(n, generator=gen, dtype=torch.float64) for n in (7, 4)]
    tasks = pad_tasks(Xs, ys)
    params = builtin.init_params(2, dtype=torch.float64, device="cpu")
    if params:
        params = {"log_noise": torch.tensor([[0.3], [-0.7]], dtype=torch.float64)}

    for a, b in zip(builtin.forward(z, tasks.X, params), module.forward(z_module, tasks.X, params)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        builtin.log_joint(z, tasks, params), module.log_joint(z_module, tasks, params),
        rtol=1e-12, atol=1e-12,
    )
    # The mapping is not the identity: the layouts really differ.
    assert not torch.equal(z, z_module)


def test_initial_mean_is_the_network_weights(one_task):
    """max_iter=0 keeps the starting q, whose mean is the module's flat parameters."""
    X, y, _, _ = one_task
    net = _seeded(lambda: SkipNet(8))
    est = MetaBNNRegressor(network=net, max_iter=0, dtype="float64", **FAST).fit(X, y)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()
    torch.testing.assert_close(est.variational_params_["loc"][0], flat)
    assert est.n_weights_ == flat.numel() == sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------ learns, non-MLP
def test_skip_network_learns_the_sinusoid(one_task):
    Xa, ya, Xb, yb = one_task
    est = MetaBNNRegressor(network=_seeded(SkipNet), max_iter=300, **FAST).fit(Xa, ya)
    # R^2 of the mean predictor is <= 0 on held-out rows; a fitted sinusoid is far above.
    assert est.score(Xb, yb) > 0.6
    mean, std = est.predict(Xb, return_std=True)
    assert mean.shape == std.shape == (Xb.shape[0],) and (std > 0).all()
    lpd = est.log_predictive_density(Xb, yb)
    assert lpd.shape == (Xb.shape[0],) and np.isfinite(lpd).all()
    assert est.sample_y(Xb[:5], n_samples=3).shape == (5, 3)


def test_minibatch_and_warm_start(one_task):
    Xa, ya, _, _ = one_task
    est = MetaBNNRegressor(
        network=_seeded(SkipNet), max_iter=5, batch_size=50, warm_start=True, **FAST
    ).fit(Xa, ya)
    first = est.loss_curve_.size
    assert first == 5 * 4  # epochs x minibatches
    est.fit(Xa, ya)
    assert est.loss_curve_.size == 2 * first


# ------------------------------------------------------------------ meta_fit
def test_meta_fit_moves_alpha(sinusoid):
    X, y, groups = sinusoid
    kw = dict(network=_seeded(lambda: _mlp(width=8)), max_meta_iter=8, n_tasks_per_batch=4,
              n_inner_steps=2, **FAST)
    moved = MetaBNNRegressor("renyi", meta_lr=0.05, **kw).meta_fit(X, y, groups)
    control = MetaBNNRegressor("renyi", meta_lr=1e-12, **kw).meta_fit(X, y, groups)
    assert abs(control.meta_divergence_.alpha - 0.5) < 1e-6
    assert abs(moved.meta_divergence_.alpha - control.meta_divergence_.alpha) > 0.01
    assert np.isfinite(moved.meta_loss_curve_).all()


def test_meta_fit_learns_init(sinusoid):
    X, y, groups = sinusoid
    net = _seeded(lambda: _mlp(width=8))
    kw = dict(network=net, meta_learn_init=True, max_meta_iter=8, n_tasks_per_batch=4,
              n_inner_steps=2, **FAST)
    moved = MetaBNNRegressor(init_lr=0.01, **kw).meta_fit(X, y, groups)
    control = MetaBNNRegressor(init_lr=1e-12, **kw).meta_fit(X, y, groups)
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    loc, loc0 = moved.meta_init_["loc"].reshape(-1), control.meta_init_["loc"].reshape(-1)
    torch.testing.assert_close(loc0, flat, rtol=0, atol=1e-6)  # it starts at the module's
    assert (loc - loc0).abs().max() > 1e-3
    # fit adapts from the learned initialisation.
    moved.fit(X[groups == 0], y[groups == 0])
    assert np.isfinite(moved.predict(X[groups == 0])).all()


# ---------------------------------------------- the user's module, clone, pickle
def test_module_is_not_modified_and_round_trips(sinusoid):
    X, y, groups = sinusoid
    net = _seeded(SkipNet).train()
    before = copy.deepcopy(net.state_dict())
    est = MetaBNNRegressor(
        "renyi", network=net, max_iter=20, max_meta_iter=2, n_tasks_per_batch=4, **FAST
    )
    est.meta_fit(X, y, groups).fit(X[groups == 0], y[groups == 0])
    assert est.network is net and net.training
    assert before.keys() == net.state_dict().keys()
    for k, v in net.state_dict().items():
        assert torch.equal(before[k], v), k
    assert all(p.grad is None and p.requires_grad for p in net.parameters())

    Xq = X[groups == 1]
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(restored.predict(Xq), est.predict(Xq))

    cloned = clone(est)
    assert cloned.network is not net
    assert _stable_repr(cloned.network) == _stable_repr(net)
    refit = cloned.fit(X[groups == 0], y[groups == 0])
    plain = clone(est).fit(X[groups == 0], y[groups == 0])  # no meta state in either
    np.testing.assert_array_equal(refit.predict(Xq), plain.predict(Xq))
    assert cloned.get_params()["network"] is cloned.network
    cloned.set_params(network=None, hidden_layer_sizes=(4,))
    assert cloned.fit(X[groups == 0], y[groups == 0]).n_weights_ == 4 + 4 + 4 * 2 + 2


def test_fingerprint_of_modules(sinusoid):
    X, y, groups = sinusoid
    net = _seeded(SkipNet)
    same = copy.deepcopy(net)
    other_weights = _seeded(SkipNet, seed=1)
    other_arch = _seeded(lambda: SkipNet(width=8))
    assert _stable_repr(net) == _stable_repr(same)
    assert _stable_repr(net) != _stable_repr(other_weights)
    assert _stable_repr(net) != _stable_repr(other_arch)
    assert "0x" not in _stable_repr(net)  # no memory addresses

    def fingerprint(network):
        return MetaBNNRegressor(network=network, **FAST)._fingerprint(X, y, groups)

    assert fingerprint(net) == fingerprint(same) != fingerprint(other_arch)


# --------------------------------------------------------------------- errors
class _NoModule:
    def __call__(self, x):
        return x


@pytest.mark.parametrize(
    "network, likelihood, error, match",
    [
        (SkipNet, "heteroskedastic", TypeError, r"class SkipNet itself.*Pass an instance"),
        (_NoModule(), "heteroskedastic", TypeError, r"must be a torch.nn.Module.*got _NoModule"),
        (torch.nn.Tanh(), "heteroskedastic", ValueError, r"no trainable parameters"),
        (torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.BatchNorm1d(4),
                             torch.nn.Linear(4, 2)),
         "heteroskedastic", ValueError, r"1: BatchNorm1d.*LayerNorm"),
        (torch.nn.LazyLinear(2), "heteroskedastic", ValueError, r"lazy parameters"),
        (torch.nn.Linear(1, 1), "heteroskedastic", ValueError,
         r"outputs of shape \(4, 1\).*\(n, 2\).*2 outputs"),
        (torch.nn.Linear(1, 2), "homoskedastic", ValueError,
         r"outputs of shape \(4, 2\).*\(n, 1\) or \(n,\)"),
        (torch.nn.Linear(3, 2), "heteroskedastic", ValueError,
         r"failed on a batch of inputs of shape \(4, 1\)"),
        (Centred(), "heteroskedastic", ValueError, r"depends on the other rows"),
    ],
    ids=["class", "not_module", "no_params", "batchnorm", "lazy", "width_hetero",
         "width_homo", "in_features", "mixes_rows"],
)
def test_bad_networks_are_explained(network, likelihood, error, match, one_task):
    X, y, _, _ = one_task
    est = MetaBNNRegressor(network=network, likelihood=likelihood, max_iter=1, **FAST)
    with pytest.raises(error, match=match):
        est.fit(X, y)


def test_frozen_parameters_are_constants(one_task):
    X, y, _, _ = one_task
    net = _seeded(SkipNet)
    net.inp.requires_grad_(False)
    est = MetaBNNRegressor(network=net, max_iter=2, **FAST).fit(X, y)
    n_trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    assert est.n_weights_ == n_trainable < sum(p.numel() for p in net.parameters())


# ------------------------------------------------------------------------ dtypes
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("likelihood", ["heteroskedastic", "homoskedastic"])
def test_dtypes(dtype, likelihood, one_task):
    Xa, ya, Xb, _ = one_task
    net = _seeded(Squeezed if likelihood == "homoskedastic" else SkipNet)
    est = MetaBNNRegressor(
        network=net, likelihood=likelihood, dtype=dtype, max_iter=20, **FAST
    ).fit(Xa, ya)
    assert est.variational_params_["loc"].dtype == getattr(torch, dtype)
    assert next(net.parameters()).dtype == torch.float32  # the module is not cast
    mean, std = est.predict(Xb, return_std=True)
    assert np.isfinite(mean).all() and np.isfinite(std).all()
    if likelihood == "homoskedastic":
        assert set(est.variational_params_) == {"loc", "scale_raw", "log_noise"}
