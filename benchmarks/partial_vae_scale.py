"""Time and peak memory of MetaPartialVAE on ml-100k and on a synthetic matrix of ml-1m's size.

Each measurement runs in a fresh process (peak resident memory is per process).
ml-1m itself is not available here; its projection uses a random sparse matrix of
its shape and density (6040 users x 3706 rated movies, 1,000,209 ratings, at least
20 per user, long-tailed users and items) with ml-1m's age-group sizes.

    python benchmarks/partial_vae_scale.py [--data-home ../shared/data] [--json OUT.json]
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import argparse
import json
import multiprocessing as mp
import resource
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

ML1M_GROUPS = {1: 222, 18: 1103, 25: 2096, 35: 1193, 45: 550, 50: 496, 56: 380}
TRAIN_GROUPS, TEST_GROUPS = (18, 25, 35, 45), (1, 50, 56)


def synthetic_ml1m(seed=0, n_items=3706, n_ratings=1_000_209):
    """A random ratings matrix of ml-1m's shape, density and long tails, with age groups."""
    rng = np.random.RandomState(seed)
    groups = np.concatenate([np.full(n, g) for g, n in ML1M_GROUPS.items()])
    n_users = groups.size
    # ml-1m: at least 20 ratings per user, median 96, at most 2314.
    extra = np.minimum(rng.lognormal(np.log(70.0), 1.1, n_users), 2294.0)
    counts = 20 + np.floor(extra / extra.sum() * (n_ratings - 20 * n_users)).astype(int)
    counts = np.minimum(counts, 2314)
    short = n_ratings - counts.sum()
    room = np.flatnonzero(counts < 2314)
    counts[rng.choice(room, short, replace=False)] += 1
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop /= pop.sum()
    rows, cols = [], []
    for u, c in enumerate(counts):
        rows.append(np.full(c, u))
        cols.append(rng.choice(n_items, c, replace=False, p=pop))
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    values = rng.randint(1, 6, rows.size).astype(float)
    return sp.csr_matrix((values, (rows, cols)), shape=(n_users, n_items)), groups


def _load(which, data_home):
    if which == "ml-100k":
        from skmetavi.datasets import fetch_movielens_tasks

        data = fetch_movielens_tasks(data_home, variant="ml-100k", heldout_fraction=0)
        return data.ratings, data.groups
    return synthetic_ml1m()


def _measure(which, data_home, task, queue):
    import torch

    from skmetavi import MetaPartialVAE
    from skmetavi._ratings import split_ratings

    torch.manual_seed(0)
    R, groups = _load(which, data_home)
    obs, held = split_ratings(R, 0.1, 0)
    train = np.isin(groups, TRAIN_GROUPS)
    test = groups == 50
    est = MetaPartialVAE(divergence="renyi", rating_range=(1, 5), random_state=0,
                         n_score_samples=100)
    out = {"data": which, "task": task, "users": int(R.shape[0]), "items": int(R.shape[1]),
           "ratings": int(R.nnz)}
    t0 = time.perf_counter()
    if task == "meta_fit":
        n = 10
        est.set_params(max_meta_iter=n).meta_fit(obs[train], held[train], groups=groups[train])
        out["seconds_per_outer_iteration"] = (time.perf_counter() - t0) / n
    elif task == "meta_fit_alg2":
        n = 5
        est.set_params(max_meta_iter=n, meta_learn_init=True, n_inner_steps=5)
        est.meta_fit(obs[train], held[train], groups=groups[train])
        out["seconds_per_outer_iteration"] = (time.perf_counter() - t0) / n
    elif task == "fit":
        est.set_params(max_iter=5).fit(obs[test])
        out["seconds_per_epoch"] = (time.perf_counter() - t0) / 5
        out["steps_per_epoch"] = est.n_iter_ / 5
    elif task == "predict_all":
        est.set_params(max_iter=1).fit(obs[test])
        t0 = time.perf_counter()
        imputed = est.transform(obs)  # every user: the dense imputed matrix
        out["transform_seconds"] = time.perf_counter() - t0
        out["transform_output_mb"] = imputed.nbytes / 2**20
        t0 = time.perf_counter()
        est.score(obs, held)
        out["score_seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["dense_ratings_mb"] = R.shape[0] * R.shape[1] * 8 / 2**20
    queue.put(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-home", default=str(Path(__file__).resolve().parents[2]
                                                   / "shared" / "data"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=["ml-100k", "ml-1m"], default=None)
    args = parser.parse_args(argv)
    ctx = mp.get_context("spawn")
    results = []
    for which in ("ml-100k", "ml-1m"):
        if args.only not in (None, which):
            continue
        for task in ("fit", "meta_fit", "meta_fit_alg2", "predict_all"):
            queue = ctx.Queue()
            proc = ctx.Process(target=_measure, args=(which, args.data_home, task, queue))
            proc.start()
            res = queue.get()
            proc.join()
            print(json.dumps(res))
            results.append(res)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
