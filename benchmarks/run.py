"""skmetavi benchmarks: ratios against baselines measured side by side in the same run.

Usage::

    python benchmarks/run.py --json OUT.json            # benchmarks 1-4
    python benchmarks/run.py --json OUT.json --reproduce  # also 5 (long)

1. one Rényi inner VI step on the 1-50-50-1 BNN (N=1000, K=10) vs Pyro's
   ``RenyiELBO`` SVI step on the same model (needs ``pip install -e .[bench]``);
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
import time

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


def _bnn_run(n_tasks, n_points, seed=0, **model):
    """A ready batched VI run (the estimators' adaptation path) on standardised sinusoids."""
    X, y, g = make_sinusoid_tasks(n_tasks, n_points, random_state=seed)
    y = (y - y.mean()) / y.std()
    est = MetaBNNRegressor(Renyi(0.5, learnable=False), **(model or BNN2), **SETTINGS)
    est._setup_torch()
    data = [(X[g == i], y[g == i]) for i in range(n_tasks)]
    rngs = [np.random.RandomState(seed + i) for i in range(n_tasks)]
    _, run, _, _ = est._adaptation(data, rngs)
    return est, run, (X, y, g)


# ------------------------------------------------------------------- 1
def bench_pyro(n_rep=50):
    """Our Rényi step (K=10, Adam) vs Pyro RenyiELBO + SVI + Adam on the same 1-50-50-1 BNN."""
    est, run, (X, y, _) = _bnn_run(1, 1000)
    t_ours = _median_time(run.step, n_rep)
    out = {"ours_ms": 1e3 * t_ours}
    try:
        import pyro
        import pyro.distributions as dist
        from pyro.infer import SVI, RenyiELBO
        from pyro.optim import Adam as PyroAdam
    except ImportError:
        out["pyro_ms"] = None
        out["note"] = "pyro-ppl not installed (pip install -e .[bench])"
        return out
    target = est._make_target()
    D = target.n_latent(1)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.float32)

    def model(Xt, yt):
        z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))  # (K, D) vectorised
        log_noise = pyro.param("log_noise", torch.tensor(0.5413))
        zz = z.reshape(1, -1, D) if z.dim() > 1 else z.reshape(1, 1, D)
        mean, _ = target.forward(zz, Xt.unsqueeze(0), {"log_noise": log_noise.reshape(1, 1)})
        mean = mean[0]  # (K, n)
        sigma = torch.nn.functional.softplus(log_noise) + 1e-3
        with pyro.plate("data", yt.shape[0], dim=-1):
            pyro.sample("y", dist.Normal(mean, sigma), obs=yt)

    loc0 = run.params["loc"][0].clone()

    def guide(Xt, yt):
        loc = pyro.param("q_loc", loc0)
        raw = pyro.param("q_raw", torch.full((D,), math.log(math.expm1(0.01))))
        pyro.sample("z", dist.Normal(loc, torch.nn.functional.softplus(raw)).to_event(1))

    pyro.clear_param_store()
    svi = SVI(model, guide, PyroAdam({"lr": 1e-3}),
              loss=RenyiELBO(alpha=0.5, num_particles=10, vectorize_particles=True))
    t_pyro = _median_time(lambda: svi.step(Xt, yt), n_rep)
    out.update(pyro_ms=1e3 * t_pyro, ratio=t_pyro / t_ours, goal=3.0)
    return out


# ------------------------------------------------------------------- 2
def _meta_trainers(n_tasks, n_points, M, seed=0, **model):
    """Meta-training (Algorithm 1, B = 5, K = 10) of M tasks at once, and of each task alone."""
    # 2 n_points rows per task: n_points support rows, n_points query rows.
    X, y, g = make_sinusoid_tasks(n_tasks, 2 * n_points, random_state=seed)
    est = MetaBNNRegressor(Renyi(1.0), **(model or BNN2), **SETTINGS, n_inner_steps=5,
                           n_tasks_per_batch=M, query_fraction=0.5)
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
    batched = est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))
    singles = [
        est._meta_trainer(bnn, support.index(slice(i, i + 1)), query.index(slice(i, i + 1)),
                          torch.Generator().manual_seed(i), est._meta_divergence(False))
        for i in range(min(M, n_tasks))
    ]
    return batched, singles


def bench_batched(n_points, M=16, n_rep=5):
    """One meta-iteration (B=5) for M tasks at once vs one task at a time."""
    batched, singles = _meta_trainers(M, n_points, M)

    def loop():
        for tr in singles:
            tr.step()

    t_b = _median_time(batched.step, n_rep, n_warmup=1)
    t_l = _median_time(loop, n_rep, n_warmup=1)
    goal = 6.0 if n_points <= 40 else 1.3
    return {"N": n_points, "batched_s": t_b, "loop_s": t_l, "ratio": t_l / t_b, "goal": goal}


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
    return {"matmul_peak_gflops": peak, "bnn_step_gflops": achieved,
            "fraction_of_peak": achieved / peak, "goal": 0.4, "step_ms": 1e3 * t,
            "flops_per_step": flops}


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
            "torch_threads": torch.get_num_threads()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--reproduce", action="store_true", help="also time table4/table5 paper")
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of: pyro batched memory flops reproduce vae")
    args = parser.parse_args(argv)
    sel = set(args.only or ["pyro", "batched", "memory", "flops", "vae"])
    results = {"machine": machine()}
    if "pyro" in sel:
        results["1_pyro_renyi_step"] = bench_pyro()
    if "batched" in sel:
        results["2_batched_vs_loop"] = [bench_batched(40), bench_batched(1000)]
    if "memory" in sel:
        results["3_memory_MiB"] = bench_memory()
    if "flops" in sel:
        results["4_flops"] = bench_flops()
    if "vae" in sel:
        results["6_vae_step"] = bench_vae()
    if args.reproduce or "reproduce" in sel:
        results["5_reproduce_seconds"] = bench_reproduce()
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
