"""skmetavi benchmarks: ratios against baselines measured side by side in the same run.

Usage::

    python benchmarks/run.py --json OUT.json            # benchmarks 1-4 and 6
    python benchmarks/run.py --json OUT.json --reproduce  # also 5 (long)
    python benchmarks/run.py --only peers --json OUT.json  # benchmark 1 alone
    python benchmarks/run.py --only ours                # our step alone (``measure_ours``)

1. one Rényi inner VI step (alpha = 0.5) on the 1-50-50-1 BNN (K=10, Adam 1e-3,
   float32, learned noise) at N=1000 and N=40, side by side with: Pyro as a user
   writes it (``PyroModule`` layers, ``AutoNormal``), Pyro with a lean model,
   NumPyro (a jitted ``svi.update`` per step, and 10 steps per jitted
   ``fori_loop``), a hand-written eager torch step and the same step with
   ``torch.compile`` (peers need ``pip install -e .[bench]``; a missing one is
   skipped with a note);
2. one meta-iteration, M=16 tasks, B=5: batched engine vs a per-task loop,
   at N=40 and N=1000;
3. peak memory of one meta-gradient for B in {1, 10, 100} per meta-gradient
   mode (each configuration in a fresh subprocess, peak RSS);
4. achieved GFLOP/s of the BNN step vs this machine's float32 matmul peak;
5. wall time of ``skmetavi reproduce table4 --budget paper`` and ``table5``;
6. one ``MetaVAE.fit`` step (MNIST-sized: 784 binary pixels, 784-200-20 encoder,
   20-200-784 decoder, batch 100, K = 5, KL) vs a plain hand-written torch VAE
   step with the same architecture, and the cost of one meta-iteration against B.

Benchmarks are not tests: timings on shared machines are noisy, so every
number is a median over repetitions and every goal is a ratio measured in the
same process.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

from skmetavi import MetaBNNRegressor
from skmetavi.datasets import make_sinusoid_tasks
from skmetavi.divergences import Renyi

BNN2 = dict(hidden_layer_sizes=(50, 50), likelihood="homoskedastic")
#: The BNN settings of every benchmark (float32, K = 10, Adam 1e-3, q's sd 0.01 at start).
SETTINGS = dict(n_particles=10, inner_optimizer="adam", inner_lr=1e-3, init_scale=0.01,
                normalize_y=False, dtype="float32", random_state=0)


def _median_time(fn, n_rep, n_warmup=3):
    for _ in range(n_warmup):
        fn()
    times = []
    for _ in range(n_rep):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _bnn_run(n_tasks, n_points, seed=0, compile=False, **model):
    """A ready batched VI run (the estimators' adaptation path) on standardised sinusoids.

    ``compile=True``: the estimators' ``compile`` option (one ``torch.compile`` graph per step).
    """
    X, y, g = make_sinusoid_tasks(n_tasks, n_points, random_state=seed)
    y = (y - y.mean()) / y.std()
    est = MetaBNNRegressor(Renyi(0.5, learnable=False), **(model or BNN2), **SETTINGS,
                           compile=compile)
    est._setup_torch()
    data = [(X[g == i], y[g == i]) for i in range(n_tasks)]
    rngs = [np.random.RandomState(seed + i) for i in range(n_tasks)]
    _, run, _, _ = est._adaptation(data, rngs)
    # Time steps of a fit however many are timed: past its budget (max_iter) a run takes the
    # slower path that keeps finished tasks unchanged, which a fit never reaches.
    run.budget = None
    return est, run, (X, y, g)


# ------------------------------------------------------------------- 1
#: The contenders of benchmark 1 besides our own step, in the JSON's key order.
PEERS = ("ours_compiled", "pyro_typical", "pyro_lean", "numpyro_jit", "numpyro_fori",
         "torch_eager", "torch_compiled")
ALPHA, K_PARTICLES, LR = 0.5, 10, 1e-3
#: JAX on the CPU, one device, float32 (set before jax is imported, unless already set). XLA's
#: CPU pool takes every core the process may use (``intra_op_parallelism_threads`` is not honoured
#: by jaxlib 0.10), as torch's intra-op pool does by default: on a machine with more cores than
#: torch's threads, pin the whole run (``taskset -c 0,1 python benchmarks/run.py ...``).
JAX_ENV = {"JAX_PLATFORMS": "cpu", "JAX_ENABLE_X64": "0",
           "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true "
                        "--xla_force_host_platform_device_count=1"}
_LOG_2PI = math.log(2 * math.pi)


class _Skip(Exception):
    """A contender that cannot run here (not installed, failed to compile): a note, not a crash."""


def measure_ours(n_points, n_rep=50):
    """Milliseconds of our Rényi step (K=10, Adam, float32) on the 1-50-50-1 BNN, N points.

    Our step is the estimators' own adaptation path (``MetaBNNRegressor._adaptation``'s
    batched VI run), so that a change of the engine shows here unchanged.
    """
    _, run, _ = _bnn_run(1, n_points)
    return 1e3 * _median_time(run.step, n_rep)


def _bnn_problem(n_points):
    """Our ready run, and what every contender shares: the rows, sizes and starting q."""
    est, run, _ = _bnn_run(1, n_points)
    target = est._make_target()
    X = run.tasks.X[0].detach().clone()  # exactly the rows our step sees, (N, 1)
    y = run.tasks.y[0].detach().clone()  # standardised, (N,)
    shapes = target.layer_shapes(X.shape[-1])
    p0 = {k: v[0].detach().clone() for k, v in run.params.items()}
    return dict(est=est, run=run, target=target, X=X, y=y, shapes=shapes,
                sizes=[s for i, o in shapes for s in (i * o, o)], D=p0["loc"].numel(),
                loc0=p0["loc"], raw0=p0["scale_raw"], log_noise0=p0["log_noise"].reshape(()))


def _hand_loss(prob):
    """The hand-written Rényi surrogate: flat weights, reparameterised particles, eq. (4)."""
    X, y, shapes, sizes, D = prob["X"], prob["y"], prob["shapes"], prob["sizes"], prob["D"]
    n = X.shape[0]
    one_minus_alpha = 1.0 - ALPHA

    def loss_fn(loc, raw, log_noise, eps):
        scale = torch.nn.functional.softplus(raw) + 1e-6
        z = loc + scale * eps  # (K, D)
        pieces = z.split(sizes, -1)
        h = X.expand(eps.shape[0], n, X.shape[-1])
        for li, (i, o) in enumerate(shapes):
            h = torch.baddbmm(pieces[2 * li + 1].unsqueeze(1), h,
                              pieces[2 * li].reshape(-1, i, o))
            if li < len(shapes) - 1:
                h = torch.relu(h)
        mean = h.squeeze(-1)  # (K, N)
        sigma = torch.nn.functional.softplus(log_noise) + 1e-3
        log_lik = (-0.5 * ((y - mean) / sigma) ** 2).sum(-1) - n * (torch.log(sigma)
                                                                    + 0.5 * _LOG_2PI)
        log_prior = -0.5 * (z * z).sum(-1) - 0.5 * D * _LOG_2PI
        # log q(z(eps)) = log N(eps) - sum log scale: the same function of (loc, raw).
        log_q = -0.5 * (eps * eps).sum(-1) - torch.log(scale).sum() - 0.5 * D * _LOG_2PI
        log_w = log_lik + log_prior - log_q  # (K,)
        w = torch.softmax(one_minus_alpha * log_w.detach(), -1)
        return -(w * log_w).sum()

    return loss_fn


def _torch_step(prob, compiled=False):
    """A hand-written eager torch step (``torch.optim.Adam``); forward+backward compiled or not."""
    loss_fn = _hand_loss(prob)
    if compiled:
        loss_fn = torch.compile(loss_fn, dynamic=False)
    loc = prob["loc0"].clone().requires_grad_(True)
    raw = prob["raw0"].clone().requires_grad_(True)
    log_noise = prob["log_noise0"].clone().requires_grad_(True)
    opt = torch.optim.Adam([loc, raw, log_noise], lr=LR)
    gen = torch.Generator().manual_seed(0)
    shape = (K_PARTICLES, prob["D"])

    def step():
        eps = torch.randn(shape, generator=gen, dtype=loc.dtype)
        loss = loss_fn(loc, raw, log_noise, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def check_torch_gradient(n_points):
    """Max relative error between the hand-written step's gradient and our step's direction.

    Our step's direction is read back from its first Adam step (``m = (1 - beta1) g``
    from a fresh state) and the hand-written gradient is taken at the same starting q
    with the same ``eps`` (the run's generator replayed).
    """
    prob = _bnn_problem(n_points)
    run = prob["run"]
    state = run.generator.get_state()
    run.step()
    beta1 = run.optimizer.betas[0]
    ours = {k: -run.state["m"][k][0].reshape(-1) / (1 - beta1)  # ascent -> loss gradient
            for k in ("loc", "scale_raw", "log_noise")}
    gen = torch.Generator()
    gen.set_state(state)
    eps = torch.randn((1, K_PARTICLES, prob["D"]), generator=gen, dtype=prob["loc0"].dtype)[0]
    params = [prob[k].clone().requires_grad_(True) for k in ("loc0", "raw0", "log_noise0")]
    grads = torch.autograd.grad(_hand_loss(prob)(*params, eps), params)
    errs = {k: float((g.reshape(-1) - ours[k]).norm() / ours[k].norm().clamp_min(1e-30))
            for k, g in zip(ours, grads)}
    return max(errs.values()), errs


def _pyro_typical(prob):
    """Pyro as a user writes it: PyroModule[nn.Linear] layers, PyroSample priors, AutoNormal."""
    try:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, RenyiELBO
        from pyro.infer.autoguide import AutoNormal, init_to_value
        from pyro.nn import PyroModule, PyroSample
    except ImportError:
        raise _Skip("pyro-ppl not installed (pip install -e .[bench])") from None
    widths = [prob["shapes"][0][0]] + [o for _, o in prob["shapes"]]

    class BNN(PyroModule):
        def __init__(self):
            super().__init__()
            layers = []
            for i, o in zip(widths[:-1], widths[1:]):
                layer = PyroModule[torch.nn.Linear](i, o)
                layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([o, i]).to_event(2))
                layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([o]).to_event(1))
                layers.append(layer)
            self.layers = PyroModule[torch.nn.ModuleList](layers)

        def forward(self, x, y=None):
            h = x
            for li, layer in enumerate(self.layers):
                # Under vectorised particles the samples are (K, 1, o, i) and (K, 1, o):
                # nn.Linear's F.linear takes only a matrix, so the layer is written batched.
                W, b = layer.weight, layer.bias
                W = W.reshape(-1, *W.shape[-2:])
                h = torch.matmul(h, W.transpose(-1, -2)) + b.reshape(-1, 1, b.shape[-1])
                if li < len(self.layers) - 1:
                    h = torch.relu(h)
            mean = h.squeeze(-1)  # (K, N); (1, N) outside the particle plate
            sigma = torch.nn.functional.softplus(
                pyro.param("typical_log_noise", prob["log_noise0"].clone())) + 1e-3
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("obs", dist.Normal(mean, sigma), obs=y)
            return mean

    # q starts where everyone's does (nn.Linear's weight is the transpose of our layout).
    values, pieces = {}, prob["loc0"].split(prob["sizes"])
    for li, (i, o) in enumerate(prob["shapes"]):
        values[f"layers.{li}.weight"] = pieces[2 * li].reshape(i, o).T.contiguous()
        values[f"layers.{li}.bias"] = pieces[2 * li + 1].clone()
    model = BNN()
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=values), init_scale=0.01)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}),
              loss=RenyiELBO(alpha=ALPHA, num_particles=K_PARTICLES, vectorize_particles=True,
                             max_plate_nesting=1))
    X, y = prob["X"], prob["y"]
    return lambda: svi.step(X, y)


def _pyro_lean(prob):
    """Pyro with a lean model: one vectorised sample site for the flat weights, own guide."""
    try:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, RenyiELBO
    except ImportError:
        raise _Skip("pyro-ppl not installed (pip install -e .[bench])") from None
    target, D, X, y = prob["target"], prob["D"], prob["X"], prob["y"]

    def model(X, y):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))  # (K, D) vectorised
        log_noise = pyro.param("lean_log_noise", prob["log_noise0"].clone())
        zz = z.reshape(1, -1, D)
        mean, _ = target.forward(zz, X.unsqueeze(0), {"log_noise": log_noise.reshape(1, 1)})
        sigma = torch.nn.functional.softplus(log_noise) + 1e-3
        with pyro.plate("data", y.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(mean[0], sigma), obs=y)

    def guide(X, y):
        loc = pyro.param("lean_q_loc", prob["loc0"].clone())
        raw = pyro.param("lean_q_raw", prob["raw0"].clone())
        pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw) + 1e-6).to_event(1))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": LR}),
              loss=RenyiELBO(alpha=ALPHA, num_particles=K_PARTICLES, vectorize_particles=True,
                             max_plate_nesting=1))
    return lambda: svi.step(X, y)


def _import_jax():
    """JAX on this process's CPU cores (see :data:`JAX_ENV`)."""
    if sys.modules.get("jax") is None:
        for k, v in JAX_ENV.items():
            os.environ.setdefault(k, v)
    try:
        import jax
        import numpyro  # noqa: F401
    except ImportError:
        raise _Skip("numpyro/jax not installed (pip install -e .[bench])") from None
    return jax


def _numpyro(prob, fori):
    """NumPyro's RenyiELBO SVI on the same model; ``fori``: 10 steps per jitted fori_loop."""
    jax = _import_jax()
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as ndist
    from numpyro.infer import SVI, RenyiELBO

    shapes, D = prob["shapes"], prob["D"]
    X, y = jnp.asarray(prob["X"].numpy()), jnp.asarray(prob["y"].numpy())
    loc0, raw0 = jnp.asarray(prob["loc0"].numpy()), jnp.asarray(prob["raw0"].numpy())
    log_noise0 = jnp.asarray(prob["log_noise0"].numpy())

    def forward(z, X):  # one particle (RenyiELBO vmaps over them), our flat layout
        h, off = X, 0
        for li, (i, o) in enumerate(shapes):
            W = z[off:off + i * o].reshape(i, o)
            b = z[off + i * o:off + i * o + o]
            off += i * o + o
            h = h @ W + b
            if li < len(shapes) - 1:
                h = jax.nn.relu(h)
        return h[..., 0]

    def model(X, y):
        z = numpyro.sample("z", ndist.Normal(jnp.zeros(D), 1.0).to_event(1))
        sigma = jax.nn.softplus(numpyro.param("log_noise", log_noise0)) + 1e-3
        with numpyro.plate("data", X.shape[0]):
            numpyro.sample("y", ndist.Normal(forward(z, X), sigma), obs=y)

    def guide(X, y):
        loc = numpyro.param("q_loc", loc0)
        raw = numpyro.param("q_raw", raw0)
        numpyro.sample("z", ndist.Normal(loc, jax.nn.softplus(raw) + 1e-6).to_event(1))

    svi = SVI(model, guide, numpyro.optim.Adam(LR),
              RenyiELBO(alpha=ALPHA, num_particles=K_PARTICLES))
    holder = [svi.init(jax.random.PRNGKey(0), X, y)]
    if fori:
        n_inner = 10

        def body(i, s):
            return svi.update(s, X, y)[0]

        many = jax.jit(lambda s: jax.lax.fori_loop(0, n_inner, body, s))

        def call():
            holder[0] = jax.block_until_ready(many(holder[0]))
        return call, n_inner
    update = jax.jit(svi.update)

    def call():
        holder[0], loss = update(holder[0], X, y)
        return loss.block_until_ready()
    return call, 1


def _build_contender(name, prob):
    """``(call, steps_per_call)`` for one contender, or :class:`_Skip`."""
    if name == "ours_compiled":  # our step with MetaBNNRegressor(compile=True)
        return _bnn_run(1, prob["X"].shape[0], compile=True)[1].step, 1
    if name == "pyro_typical":
        return _pyro_typical(prob), 1
    if name == "pyro_lean":
        return _pyro_lean(prob), 1
    if name in ("numpyro_jit", "numpyro_fori"):
        return _numpyro(prob, fori=name == "numpyro_fori")
    if name in ("torch_eager", "torch_compiled"):
        return _torch_step(prob, compiled=name == "torch_compiled"), 1
    raise ValueError(f"unknown contender {name!r}; valid: {list(PEERS)}")


def _interleaved(calls, n_rep, n_warmup=3):
    """Median seconds per step of each ``name: (call, steps_per_call)``, rounds interleaved.

    Each round times one call of every contender, the order rotated from round to
    round, so that all see the same machine noise.
    """
    for call, _ in calls.values():
        for _ in range(n_warmup):
            call()
    names = list(calls)
    times = {name: [] for name in names}
    for r in range(n_rep):
        for name in names[r % len(names):] + names[:r % len(names)]:
            call, per = calls[name]
            t0 = time.perf_counter()
            call()
            times[name].append((time.perf_counter() - t0) / per)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_peers_at(n_points, n_rep=100, contenders=PEERS):
    """Our step against every contender at N rows, side by side (see :data:`PEERS`)."""
    try:
        import pyro
    except ImportError:
        pass
    else:
        pyro.clear_param_store()  # a fresh q for each N (pyro.param ignores a new init)
    prob = _bnn_problem(n_points)
    calls = {"ours": (prob["run"].step, 1)}
    compile_s, notes = {}, {}
    for name in contenders:
        try:
            call, per = _build_contender(name, prob)
            t0 = time.perf_counter()
            call()  # the first call: tracing / compiling, timed apart
            compile_s[name] = time.perf_counter() - t0
        except _Skip as exc:
            notes[name] = str(exc)
            continue
        except Exception as exc:  # a peer that fails here is reported, not fatal
            notes[name] = f"failed: {type(exc).__name__}: {exc}"[:500]
            continue
        calls[name] = (call, per)
    med = _interleaved(calls, n_rep)
    t_ours = med["ours"]
    out = {"ours_ms": 1e3 * t_ours,
           # Our step again, alone (consecutive steps, same process): far from ours_ms means
           # the contenders disturb each other (e.g. thread pools spinning on the same cores).
           "ours_alone_ms": 1e3 * _median_time(prob["run"].step, n_rep)}
    for name in contenders:
        t = med.get(name)
        out[f"{name}_ms"] = None if t is None else 1e3 * t
        out[f"ratio_vs_{name}"] = None if t is None else t / t_ours
    t_comp = med.get("ours_compiled")
    for name in contenders:  # the same ratios for our compiled step
        t = med.get(name)
        if name != "ours_compiled":
            out[f"compiled_ratio_vs_{name}"] = (None if t is None or t_comp is None
                                                else t / t_comp)
    out["compile_s"] = compile_s  # first call of each (tracing/compiling + one step)
    if "torch_eager" in contenders:
        try:
            out["torch_grad_max_rel_err"], out["torch_grad_rel_err"] = \
                check_torch_gradient(n_points)
        except Exception as exc:
            notes["torch_grad_check"] = f"failed: {type(exc).__name__}: {exc}"[:500]
    if notes:
        out["notes"] = notes
        out["note"] = "; ".join(f"{k}: {v}" for k, v in notes.items())
    out["n_rep"] = n_rep
    return out


def bench_peers_isolated(n_points, n_rep=100, contenders=PEERS, n_proc=3):
    """Each contender of benchmark 1 timed alone, in a fresh process, ``n_proc`` rounds.

    In one process the contenders disturb each other: their thread pools
    compete for the cores (our compiled step at N = 40: about 0.4 ms alone,
    0.7-1.0 ms interleaved with NumPyro), and one framework's large frees
    move glibc's dynamic mmap threshold for all (see the user guide's
    allocator note: after one JAX matmul our step at N = 1000 took 1.9 ms
    instead of 3.5).  Here every contender (and our eager step, ``ours``)
    runs in its own process -- first call timed apart, 3 warm-up calls, then
    the median of ``n_rep`` consecutive calls -- one process after another in
    an order rotated each round, so slow drifts of the machine reach all of
    them; a contender's time is the median over its ``n_proc`` processes.
    The inductor's on-disk cache is shared (and warm from the interleaved
    pass), so ``first_call_s`` is not a cold compile.
    """
    names = ("ours",) + tuple(contenders)
    per, first, notes = {n: [] for n in names}, {}, {}
    for r in range(n_proc):
        shift = r * len(names) // n_proc
        for name in names[shift:] + names[:shift]:
            if name in notes:
                continue
            cell = _run_peer_cell(name, n_points, n_rep)
            if "note" in cell:  # times of earlier rounds, if any, are kept
                notes[name] = cell["note"][:500]
                continue
            if cell.get("fell_back"):
                notes[name] = "compiling failed: its times are of the eager step"
            per[name].append(cell["ms"])
            first.setdefault(name, cell["first_s"])
    med = {n: statistics.median(t) for n, t in per.items() if t}
    out = {"n_proc": n_proc, "n_rep": n_rep, "per_process_ms": per, "first_call_s": first}
    t_ours, t_comp = med.get("ours"), med.get("ours_compiled")
    for name in names:
        t = med.get(name)
        out[f"{name}_ms"] = t
        if name == "ours":
            continue
        out[f"ratio_vs_{name}"] = None if t is None or t_ours is None else t / t_ours
        if name != "ours_compiled":
            out[f"compiled_ratio_vs_{name}"] = (None if t is None or t_comp is None
                                                else t / t_comp)
    if notes:
        out["notes"] = notes
    return out


def _run_peer_cell(name, n_points, n_rep, timeout=1800):
    """:func:`_peer_cell` in a fresh process: its result, or ``{"note": why not}``."""
    try:
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--peer-cell", name, str(n_points),
             str(n_rep)], capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"note": f"timed out after {timeout} s"}
    if proc.returncode:
        return {"note": f"failed: {(proc.stderr.strip().splitlines() or [''])[-1]}"}
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"note": f"unreadable output: {proc.stdout[-200:]!r}"}


def _peer_cell(name, n_points, n_rep):
    """One contender of :func:`bench_peers_isolated`, in this (fresh) process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's compile-time notices
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        prob = _bnn_problem(n_points)
        try:
            call, per = (prob["run"].step, 1) if name == "ours" else _build_contender(name, prob)
            t0 = time.perf_counter()
            call()
            first = time.perf_counter() - t0
        except _Skip as exc:
            return {"note": str(exc)}
        ms = 1e3 * _median_time(call, n_rep) / per
        # ours_compiled's call is its VIRun's step: a failed compile left it eager.
        fell_back = name == "ours_compiled" and call.__self__._compiled is None
        return {"ms": ms, "first_s": first, "fell_back": fell_back}


def _peer_versions():
    import importlib.metadata as md

    out = {}
    for pkg in ("pyro-ppl", "numpyro", "jax", "jaxlib"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def bench_peers(n_points=(1000, 40), n_rep=100, contenders=PEERS, isolated=3):
    """Benchmark 1: our Rényi step vs Pyro, NumPyro and hand-written torch, at each N.

    Each N is timed twice: interleaved in this process (the top-level keys) and,
    with ``isolated`` > 0, every contender alone in ``isolated`` fresh processes
    (``"isolated"``; see :func:`bench_peers_isolated`).
    """
    out = {}
    for n in n_points:
        out[f"N={n}"] = bench_peers_at(n, n_rep, contenders)
        if isolated:
            out[f"N={n}"]["isolated"] = bench_peers_isolated(n, n_rep, contenders, isolated)
    out["settings"] = {
        "model": "1-50-50-1 ReLU BNN, homoskedastic noise (learned point estimate)",
        "alpha": ALPHA, "n_particles": K_PARTICLES, "lr": LR, "dtype": "float32",
        "timing": f"median over {n_rep} interleaved rounds, ms per step; \"isolated\": "
                  f"median over {isolated} fresh processes of each one's median of {n_rep} "
                  "consecutive steps",
        "ratio": "peer time / our time (> 1: we are faster)",
        "torch_threads": torch.get_num_threads(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "XLA_FLAGS": os.environ.get("XLA_FLAGS") if sys.modules.get("jax") else None,
        "versions": _peer_versions(),
    }
    try:  # Pyro's default (on): its distributions check their arguments and supports
        from pyro.infer.util import is_validation_enabled
    except ImportError:
        pass
    else:
        out["settings"]["pyro_validation"] = is_validation_enabled()
    return out


# ------------------------------------------------------------------- 2
def _meta_trainers(n_tasks, n_points, M, seed=0, compile=False, **model):
    """Meta-training (Algorithm 1, B = 5, K = 10) of M tasks at once, and of each task alone.

    ``compile="meta_fit"``: the trainers compile their meta-iterations.
    """
    # 2 n_points rows per task: n_points support rows, n_points query rows.
    X, y, g = make_sinusoid_tasks(n_tasks, 2 * n_points, random_state=seed)
    est = MetaBNNRegressor(Renyi(1.0), **(model or BNN2), **SETTINGS, n_inner_steps=5,
                           n_tasks_per_batch=M, query_fraction=0.5, compile=compile)
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
    batched = est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))
    singles = [
        est._meta_trainer(bnn, support.index(slice(i, i + 1)), query.index(slice(i, i + 1)),
                          torch.Generator().manual_seed(i), est._meta_divergence(False))
        for i in range(min(M, n_tasks))
    ]
    return batched, singles


def bench_batched(n_points, M=16, n_rep=5, compiled=True):
    """One meta-iteration (B=5) for M tasks at once vs one task at a time, eager and compiled.

    ``ratio`` compares the eager batched iteration with the eager per-task loop;
    with ``compiled``, ``compiled_ratio`` compares the compiled batched
    iteration (``compile="meta_fit"``) with the same eager loop, and
    ``compiled_ratio_vs_compiled_loop`` with a loop of compiled single-task
    iterations.  The compiled cells run in a fresh process each, with a cold
    inductor cache (``compile_s``: the first call minus a steady one), so that
    the compiler's memory and worker threads do not slow the eager cells.
    """
    batched, singles = _meta_trainers(M, n_points, M)
    t_b = _median_time(batched.step, n_rep, n_warmup=1)
    t_l = _median_time(_loop(singles), n_rep, n_warmup=1)
    goal = 6.0 if n_points <= 40 else 1.3
    out = {"N": n_points, "batched_s": t_b, "loop_s": t_l, "ratio": t_l / t_b, "goal": goal,
           "task_chunk_size": batched.task_chunk_size}
    if not compiled:
        return out
    cells = {}
    for variant in ("batched", "loop"):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--compiled-cell", variant,
                 str(n_points), str(M), str(n_rep)],
                env=env, capture_output=True, text=True, check=False)
        if proc.returncode:
            out[f"compiled_{variant}_error"] = proc.stderr.strip().splitlines()[-1:]
            return out
        cells[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
    t_cb, t_cl = cells["batched"]["median_s"], cells["loop"]["median_s"]
    out.update({"compiled_batched_s": t_cb, "compiled_loop_s": t_cl,
                "compiled_ratio": t_l / t_cb, "compiled_ratio_vs_compiled_loop": t_cl / t_cb,
                "compile_s": {v: c["first_s"] - c["median_s"] for v, c in cells.items()},
                "compiled_task_chunk_size": cells["batched"]["task_chunk_size"],
                "compiled_fell_back": any(c["fell_back"] for c in cells.values())})
    return out


def _loop(trainers):
    def run():
        for tr in trainers:
            tr.step()
    return run


def _compiled_cell(variant, n_points, M, n_rep):
    """One compiled cell of :func:`bench_batched`, in this (fresh) process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's compile-time notices
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        batched, singles = _meta_trainers(M, n_points, M, compile="meta_fit")
        trainers = [batched] if variant == "batched" else singles
        fn = batched.step if variant == "batched" else _loop(singles)
        first = _first_call(fn)
        median = _median_time(fn, n_rep, n_warmup=1)
    return {"first_s": first, "median_s": median,
            "fell_back": any(t._compiled is None for t in trainers),
            "task_chunk_size": batched.task_chunk_size}


def _first_call(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ------------------------------------------------------------------- 3
_MEM_CHILD = r"""
import resource, sys, torch
torch.set_num_threads(1)
sys.path.insert(0, {root!r})
from benchmarks.run import _meta_trainers
mode, B = sys.argv[1], int(sys.argv[2])
tr, _ = _meta_trainers(4, 200, 4, hidden_layer_sizes=(50,))
tr.n_inner_steps = B
tr.mode = mode
tr.truncate = 1 if mode == "truncated" else None
def status_kib(field):
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(field + ":"))
try:
    # The peak-RSS mark survives exec (a child of a large benchmark process inherits its
    # parent's); on Linux, clear_refs 5 resets it to the current RSS.
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status_kib("VmRSS")
    tr.step()
    peak = status_kib("VmHWM")
except OSError:
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tr.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(peak - base)
"""


def bench_memory(modes=("full", "first_order", "truncated", "implicit"), Bs=(1, 10, 100)):
    """Peak-RSS growth (MiB) of one meta-gradient, each in a fresh process."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = _MEM_CHILD.format(root=root)
    out = {}
    for mode in modes:
        for B in Bs:
            res = subprocess.run([sys.executable, "-c", code, mode, str(B)],
                                 capture_output=True, text=True, cwd=root)
            if res.returncode != 0:
                out[f"{mode}/B={B}"] = None
                out[f"{mode}/error"] = res.stderr.strip().splitlines()[-1] if res.stderr else "failed"
                continue
            out[f"{mode}/B={B}"] = int(res.stdout.strip().splitlines()[-1]) / 1024.0
    for mode in modes:
        b1, b100 = out.get(f"{mode}/B=1"), out.get(f"{mode}/B=100")
        if b1 and b100:
            out[f"{mode}/ratio_B100_B1"] = b100 / max(b1, 1.0)
    return out


# ------------------------------------------------------------------- 4
def bench_flops(n_rep=30):
    """GFLOP/s of one BNN inner step (FlopCounterMode) vs a large float32 matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_mm = _median_time(lambda: a @ b, 10)
    peak = 2 * n**3 / t_mm / 1e9
    _, run, _ = _bnn_run(1, 1000)
    step = run.step

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    t = _median_time(step, n_rep)
    achieved = flops / t / 1e9
    out = {"matmul_peak_gflops": peak, "bnn_step_gflops": achieved,
           "fraction_of_peak": achieved / peak, "goal": 0.4, "step_ms": 1e3 * t,
           "flops_per_step": flops}
    # The compiled step does the same maths (the FLOP count of the eager one).
    compiled = _bnn_run(1, 1000, compile=True)[1].step
    t_c = _median_time(compiled, n_rep)
    out.update(compiled_step_ms=1e3 * t_c, compiled_gflops=flops / t_c / 1e9,
               compiled_fraction_of_peak=flops / t_c / 1e9 / peak)
    return out


# ------------------------------------------------------------------- 5
def bench_reproduce(names=("table4", "table5")):
    out = {}
    for name in names:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "skmetavi", "reproduce", name, "--budget", "paper",
                        "--out", "bench_results"], check=True)
        out[name] = time.perf_counter() - t0
    out["goals_s"] = {"table4": 600, "table5": 180}
    return out


# ------------------------------------------------------------------- 6
VAE = dict(n_components=20, hidden_layer_sizes=(200,), n_particles=5, batch_size=100,
           inner_optimizer="adam", inner_lr=1e-3, dtype="float32", random_state=0)


def _plain_vae_step(X, batch=100, K=5, hidden=200, latent=20, seed=0):
    """A hand-written torch VAE (ELBO with K samples per row, Adam): one step per call."""
    torch.manual_seed(seed)
    p = X.shape[1]
    enc = torch.nn.Sequential(torch.nn.Linear(p, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, 2 * latent))
    dec = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, p))
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)

    def step():
        x = Xt[torch.randperm(Xt.shape[0], generator=gen)[:batch]]
        loc, raw = enc(x).chunk(2, -1)
        scale = torch.nn.functional.softplus(raw) + 1e-6
        eps = torch.randn((batch, K, latent), generator=gen)
        z = loc[:, None] + scale[:, None] * eps
        logits = dec(z)
        log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x[:, None].expand_as(logits), reduction="none").sum(-1)
        log_prior = (-0.5 * z**2).sum(-1)
        log_q = (-0.5 * eps**2 - torch.log(scale)[:, None]).sum(-1)
        loss = -(log_lik + log_prior - log_q).mean(-1).sum() * (Xt.shape[0] / batch)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


def bench_vae(n_rows=1000, n_rep=100):
    """One fit step of MetaVAE vs a plain torch VAE step; one meta-iteration vs B."""
    from skmetavi import MetaVAE

    rng = np.random.RandomState(0)
    X = (rng.rand(n_rows, 784) < 0.2).astype(np.float32)
    est = MetaVAE(**VAE)
    est._setup_torch()
    est._validate_task_data(X, None, reset=True)
    _, run, _, _ = est._adaptation([(X, None)], [np.random.RandomState(0)])
    plain = _plain_vae_step(X)
    for _ in range(3):
        run.step()
        plain()
    ours_t, plain_t = [], []
    for _ in range(n_rep):  # interleaved: both see the same machine noise
        for fn, out in ((run.step, ours_t), (plain, plain_t)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    t_ours, t_plain = statistics.median(ours_t), statistics.median(plain_t)
    meta = {}
    groups = np.repeat(np.arange(4), n_rows // 4)
    for B in (1, 2, 5):
        est = MetaVAE(**VAE, divergence=Renyi(1.0), n_inner_steps=B)
        est._setup_torch()
        _, _, _, (model, support, query, gen, _) = est._meta_fit_inputs(X, None, groups)
        trainer = est._meta_trainer(model, support, query, gen, est._meta_divergence(False))
        meta[f"B={B}"] = _median_time(trainer.step, max(3, n_rep // 5), n_warmup=1)
    return {"fit_step_ms": 1e3 * t_ours, "plain_torch_step_ms": 1e3 * t_plain,
            "ratio_plain_over_ours": t_plain / t_ours, "goal": 0.8,
            "meta_iteration_s_4_tasks": meta}


def machine():
    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # glibc's thresholds (--tune-allocator exports them; see skmetavi.tune_allocator)
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--reproduce", action="store_true", help="also time table4/table5 paper")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: peers (alias pyro) ours batched memory flops reproduce "
                             "vae")
    parser.add_argument("--n-rep", type=int, default=None,
                        help="repetitions (interleaved rounds for peers; default per benchmark)")
    parser.add_argument("--peers", default=",".join(PEERS),
                        help=f"comma-separated contenders of benchmark 1 (default: all of "
                             f"{','.join(PEERS)})")
    parser.add_argument("--sizes", default="1000,40", help="N of benchmarks 1 and ours")
    parser.add_argument("--isolated", type=int, default=3,
                        help="benchmark 1: also time each contender alone in this many fresh "
                             "processes (0: only interleaved in one process)")
    parser.add_argument("--tune-allocator", action="store_true",
                        help="skmetavi.tune_allocator() here and in every cell's process (the "
                             "default timings are glibc's defaults)")
    parser.add_argument("--compiled-cell", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--peer-cell", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tune_allocator:
        from skmetavi import tune_allocator

        tune_allocator(environ=True)  # the cells' processes inherit MALLOC_*_THRESHOLD_
    if args.peer_cell:
        name, n_points, n_rep = args.peer_cell
        print(json.dumps(_peer_cell(name, int(n_points), int(n_rep))))
        return None
    if args.compiled_cell:
        variant, n_points, M, n_rep = args.compiled_cell
        print(json.dumps(_compiled_cell(variant, int(n_points), int(M), int(n_rep))))
        return None
    sel = set(args.only or ["peers", "batched", "memory", "flops", "vae"])
    if "pyro" in sel:  # the old name of benchmark 1
        sel = (sel - {"pyro"}) | {"peers"}
    sizes = tuple(int(n) for n in args.sizes.split(","))
    rep = {} if args.n_rep is None else {"n_rep": args.n_rep}
    results = {"machine": machine()}
    if "peers" in sel:
        peers = tuple(p for p in args.peers.split(",") if p)
        if set(peers) - set(PEERS):
            parser.error(f"--peers: unknown {sorted(set(peers) - set(PEERS))}; valid: {PEERS}")
        results["1_peers"] = bench_peers(sizes, contenders=peers, isolated=args.isolated,
                                         **rep)
    if "ours" in sel:  # our step alone, e.g. after a change of the engine
        results["1_ours_ms"] = {f"N={n}": measure_ours(n, **rep) for n in sizes}
    if "batched" in sel:
        results["2_batched_vs_loop"] = [bench_batched(40, **rep), bench_batched(1000, **rep)]
    if "memory" in sel:
        results["3_memory_MiB"] = bench_memory()
    if "flops" in sel:
        results["4_flops"] = bench_flops(**rep)
    if "vae" in sel:
        results["6_vae_step"] = bench_vae(**rep)
    if args.reproduce or "reproduce" in sel:
        results["5_reproduce_seconds"] = bench_reproduce()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
