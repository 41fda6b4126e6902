"""Worker for tests/test_engine_scaling.py: meta_fit under torchrun (gloo on loopback)."""

import os
import sys

import torch
import torch.distributed as dist

from skmetavi import MetaBNNRegressor, MetaDivergenceVI
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks


def main(out, which):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    est = build(which)
    est.meta_fit(*data(which))
    if dist.get_rank() == 0:
        torch.save(
            {
                "state": est.meta_divergence_.state_dict(),
                "curve": torch.as_tensor(est.meta_loss_curve_),
                "world": dist.get_world_size(),
            },
            out,
        )
    dist.barrier()
    dist.destroy_process_group()


def build(which):
    if which == "mog":
        return MetaDivergenceVI(
            "gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=32,
            max_meta_iter=15, n_tasks_per_batch=5, random_state=0,
        )
    if which == "alg2-one-task":
        # Algorithm 2, one task per outer step: the second process has no task and must
        # still take part in every reduction.
        return MetaDivergenceVI(
            "gaussian_mixture", divergence="renyi", meta_learn_init=True, inner_optimizer="sgd",
            n_particles=16, max_meta_iter=8, n_tasks_per_batch=1, random_state=0,
        )
    return MetaBNNRegressor(
        "neural_f", hidden_layer_sizes=(8,), n_particles=4, max_meta_iter=6, n_tasks_per_batch=5,
        n_inner_steps=2, dtype="float64", random_state=0,
    )


def data(which):
    if which in ("mog", "alg2-one-task"):
        X, g = make_mog_tasks(8, random_state=0)
        return X, None, g
    X, y, g = make_sinusoid_tasks(8, 30, random_state=0)
    return X, y, g


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's background threads occasionally abort at interpreter teardown
    # ("terminate called without an active exception"); the work is done and saved.
    os._exit(0)
