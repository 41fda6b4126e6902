"""Probe: one BNN meta-iteration under ``torch.compile`` over ``torch.func``, against eager.

The question (issue 15, goal 3): does compiling the double backward of a
meta-iteration pay, and how long does it compile?  This script writes the
benchmark's meta-iteration as one pure function and times it (the probe that led
to the engine's ``compile="meta_fit"``, :mod:`skmetavi._compiled_meta`, which
``benchmarks/run.py --only batched`` times):

- the 1-50-50-1 ReLU BNN of ``benchmarks/run.py`` (2701 weights, N(0, 1) prior,
  homoskedastic noise ``softplus(log_noise) + 1e-3`` learned per task), mean-field
  Gaussian q, K = 10, Rényi weights ``softmax((1 - alpha) l)``, B = 5 Adam steps
  (lr 1e-3) whose direction is the vector-Jacobian product of the log weights
  with the weights (differentiable in alpha), then the predictive NLL of the
  query rows; the meta-gradient is dJ/dalpha through all B steps;
- variants: ``engine`` (our ``MetaTrainer.step`` on the same configuration, via
  ``benchmarks.run._meta_trainers``: it also samples tasks, draws noise, checks
  finiteness and updates eta, so it is a reference, not like for like),
  ``autograd`` (plain eager ``torch.autograd`` with ``create_graph=True``),
  ``func`` (``torch.func.vjp`` / ``grad_and_value``, eager) and ``compiled``
  (``torch.compile(torch.func.grad_and_value(meta_loss))``);
- each (variant, M, N) in a fresh process with a fresh Inductor cache (a cold
  compile); median milliseconds over ``--n-rep`` calls after two warm-up calls.

``--check`` compares the meta-gradients of ``func``, ``compiled`` and
``autograd`` in float64 on the same noise.  Usage::

    python benchmarks/meta_compile.py --json OUT.json [--sizes 40,1000] [--n-rep 10]
    python benchmarks/meta_compile.py --check
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

SHAPES = [(1, 50), (50, 50), (50, 1)]
SIZES = [s for i, o in SHAPES for s in (i * o, o)]
LOG_2PI = math.log(2 * math.pi)
LR, BETA1, BETA2, ADAM_EPS = 1e-3, 0.9, 0.999, 1e-8
VARIANTS = ("engine", "autograd", "func", "compiled")


def forward(z, X):
    """Network means (M, K, n) of particles z (M, K, 2701) at inputs X (M, n, 1)."""
    M, K = z.shape[:2]
    n, d = X.shape[-2:]
    pieces = z.reshape(M * K, -1).split(SIZES, -1)
    h = X.unsqueeze(1).expand(M, K, n, d).reshape(M * K, n, d)
    for li, (i, o) in enumerate(SHAPES):
        h = torch.baddbmm(pieces[2 * li + 1].unsqueeze(-2), h, pieces[2 * li].reshape(M * K, i, o))
        if li < len(SHAPES) - 1:
            h = torch.relu(h)
    return h.reshape(M, K, n)


def _normal_lp(y, mean, sd):
    return -0.5 * ((y - mean) / sd) ** 2 - torch.log(sd) - 0.5 * LOG_2PI


def _particles(params, eps):
    loc, raw, _ = params
    scale = F.softplus(raw) + 1e-6
    return loc.unsqueeze(1) + scale.unsqueeze(1) * eps, scale


def _noise_sd(params):
    return (F.softplus(params[2]) + 1e-3).unsqueeze(-1)  # (M, 1, 1)


def log_weights(params, eps, X, y):
    """``log p(z_k, D) - log q(z_k)`` (M, K), log q from the noise (all derivatives in phi)."""
    z, scale = _particles(params, eps)
    lik = _normal_lp(y.unsqueeze(1), forward(z, X), _noise_sd(params)).sum(-1)
    prior = (-0.5 * z * z - 0.5 * LOG_2PI).sum(-1)
    log_q = (-torch.log(scale).unsqueeze(1) - 0.5 * eps * eps - 0.5 * LOG_2PI).sum(-1)
    return lik + prior - log_q


def _adam(params, direction, state, t):
    m, v = state
    m = tuple(BETA1 * mi + (1 - BETA1) * di for mi, di in zip(m, direction))
    v = tuple(BETA2 * vi + (1 - BETA2) * di * di for vi, di in zip(v, direction))
    c1, c2 = 1 - BETA1**t, 1 - BETA2**t
    params = tuple(p + LR * (mi / c1) / torch.sqrt(vi / c2 + ADAM_EPS**2)
                   for p, mi, vi in zip(params, m, v))
    return params, (m, v)


def _meta_loss(alpha, params, state, data, eps_list, direction):
    Xs, ys, Xq, yq = data
    *inner, eps_q = eps_list
    for t, eps in enumerate(inner, start=1):
        params, state = _adam(params, direction(alpha, params, eps, Xs, ys), state, t)
    z, _ = _particles(params, eps_q)
    ll = _normal_lp(yq.unsqueeze(1), forward(z, Xq), _noise_sd(params))  # (M, K, n)
    pred = torch.logsumexp(ll, dim=1) - math.log(ll.shape[1])
    return -pred.mean()


def _func_direction(alpha, params, eps, X, y):
    l, vjp = torch.func.vjp(lambda p: log_weights(p, eps, X, y), params)
    (d,) = vjp(torch.softmax((1 - alpha) * l, dim=-1))
    return d


def meta_loss(alpha, params, state, data, eps_list):
    """The meta-loss J after B inner steps, written for ``torch.func``."""
    return _meta_loss(alpha, params, state, data, eps_list, _func_direction)


func_meta_gradient = torch.func.grad_and_value(meta_loss)


def _autograd_direction(alpha, params, eps, X, y):
    params = tuple(p if p.requires_grad else p.detach().requires_grad_(True) for p in params)
    l = log_weights(params, eps, X, y)
    w = torch.softmax((1 - alpha) * l, dim=-1)
    return torch.autograd.grad(l, params, grad_outputs=w, create_graph=True)


def autograd_meta_gradient(alpha, params, state, data, eps_list):
    """``(dJ/dalpha, J)`` with eager autograd (``create_graph=True``)."""
    a = alpha.detach().requires_grad_(True)
    params = tuple(p.detach().requires_grad_(True) for p in params)
    J = _meta_loss(a, params, state, data, eps_list, _autograd_direction)
    (g,) = torch.autograd.grad(J, a)
    return g, J.detach()


def make_problem(M, N, K=10, B=5, dtype=torch.float32, seed=0):
    """Sinusoid tasks (support and query rows), He-initialised q and B + 1 noise draws."""
    g = torch.Generator().manual_seed(seed)
    amp = torch.rand(M, 1, 1, generator=g, dtype=dtype) * 4.9 + 0.1
    phase = torch.rand(M, 1, 1, generator=g, dtype=dtype) * math.pi

    def rows():
        X = torch.rand(M, N, 1, generator=g, dtype=dtype) * 10 - 5
        return X, (amp * torch.sin(X + phase))[..., 0]

    data = (*rows(), *rows())
    chunks = []
    for li, (i, o) in enumerate(SHAPES):
        std = math.sqrt(2.0 / i) if li < len(SHAPES) - 1 else 0.1 / math.sqrt(i)
        chunks += [torch.randn(M, i * o, generator=g, dtype=dtype) * std,
                   torch.zeros(M, o, dtype=dtype)]
    loc = torch.cat(chunks, -1)
    params = (loc, torch.full_like(loc, math.log(math.expm1(0.01))),
              torch.full((M, 1), 0.5413, dtype=dtype))
    zeros = tuple(torch.zeros_like(p) for p in params)
    eps = [torch.randn(M, K, loc.shape[-1], generator=g, dtype=dtype) for _ in range(B + 1)]
    return params, (zeros, zeros), data, eps


def _load():
    return os.getloadavg()[0]


def measure(variant, M, N, n_rep):
    """One cell, in this process: first-call and median seconds."""
    if variant == "engine":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from benchmarks.run import _meta_trainers

        batched, singles = _meta_trainers(16, N, 16)
        call = batched.step if M == 16 else singles[0].step
    else:
        params, state, data, eps = make_problem(M, N)
        alpha = torch.tensor(1.0)
        fn = {"autograd": autograd_meta_gradient, "func": func_meta_gradient,
              "compiled": torch.compile(func_meta_gradient, dynamic=False)}[variant]

        def call():
            return fn(alpha, params, state, data, eps)

    load = _load()
    t = time.perf_counter()
    call()
    first = time.perf_counter() - t
    for _ in range(2):
        call()
    times = []
    for _ in range(n_rep):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "M": M, "N": N, "first_call_s": first,
            "median_ms": 1e3 * statistics.median(times), "load_before": load,
            "load_after": _load()}


def check():
    """Relative differences of the meta-gradients, float64, alpha in {1, 0.5}."""
    out = []
    compiled = torch.compile(func_meta_gradient, dynamic=False)
    for alpha0 in (1.0, 0.5):
        params, state, data, eps = make_problem(4, 40, dtype=torch.float64)
        alpha = torch.tensor(alpha0, dtype=torch.float64)
        ref, _ = autograd_meta_gradient(alpha, params, state, data, eps)
        row = {"alpha": alpha0, "dJ_dalpha": float(ref)}
        for name, fn in (("func", func_meta_gradient), ("compiled", compiled)):
            g, _ = fn(alpha, params, state, data, eps)
            row[f"rel_err_{name}"] = float((g - ref).abs() / ref.abs())
        out.append(row)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--sizes", default="40,1000")
    parser.add_argument("--n-rep", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--check", action="store_true", help="float64 gradient agreement only")
    parser.add_argument("--cell", nargs=3, metavar=("VARIANT", "M", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.cell:
        variant, M, N = args.cell[0], int(args.cell[1]), int(args.cell[2])
        print(json.dumps(measure(variant, M, N, args.n_rep)))
        return None
    if args.check:
        results = {"check": check()}
    else:
        results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cells": []}
        for N in (int(n) for n in args.sizes.split(",")):
            for M in (16, 1):
                for variant in args.variants.split(","):
                    with tempfile.TemporaryDirectory() as cache:  # a cold compile per cell
                        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
                        proc = subprocess.run(
                            [sys.executable, __file__, "--cell", variant, str(M), str(N),
                             "--n-rep", str(args.n_rep)],
                            env=env, capture_output=True, text=True, check=False)
                    if proc.returncode:
                        cell = {"variant": variant, "M": M, "N": N,
                                "error": proc.stderr.strip().splitlines()[-1:]}
                    else:
                        cell = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(json.dumps(cell), flush=True)
                    results["cells"].append(cell)
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return results


if __name__ == "__main__":
    main()
