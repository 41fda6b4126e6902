"""Scaling features of the engine: chunking, implicit gradients, torch.distributed."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from skmetavi._bilevel import MetaTrainer, Problem, QuadratureLoss
from skmetavi._optim import SGD, Adam
from skmetavi._tasks import pad_tasks
from skmetavi.divergences import NeuralF, Renyi
from skmetavi.models import GaussianMixture1D, MeanFieldGaussian

DT = torch.float64
MOG = torch.tensor([[0.5, 1.0, 0.7], [0.5, 4.0, 1.4]], dtype=DT)
HERE = Path(__file__).parent


def _tasks(n):
    return pad_tasks([MOG + torch.tensor([0.0, 0.3 * i, 0.02 * i], dtype=DT) for i in range(n)])


def _trainer(div, optimizer=None, **kw):
    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    tasks = _tasks(6)
    base = dict(init_params=problem.family.init_params(6, loc=2.0, scale=1.5, dtype=DT, device="cpu"),
                learn_init=False, n_particles=32, n_tasks_per_batch=5,
                generator=torch.Generator().manual_seed(0))
    base.update(kw)
    return MetaTrainer(problem, div, optimizer or SGD(0.05),
                       QuadratureLoss("renyi", 0.5, -10, 20, 801), tasks, tasks, **base)


@pytest.mark.parametrize("learn_init", [False, True], ids=["alg1", "alg2"])
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_chunked_equals_whole_batch(learn_init, chunk):
    runs = []
    for size in (None, chunk):
        div = Renyi(0.8).to(DT)
        tr = _trainer(div, learn_init=learn_init, n_inner_steps=2, task_chunk_size=size)
        for _ in range(5):
            tr.step()
        runs.append((tr.loss_curve, div.raw_alpha.detach().clone(), tr))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-12)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-12, atol=1e-14)
    if not learn_init:
        torch.testing.assert_close(runs[0][2].task_params["loc"], runs[1][2].task_params["loc"],
                                   rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("divergence", [lambda: Renyi(0.7).to(DT), lambda: NeuralF((4,), init_alpha=0.7)],
                         ids=["renyi", "neural_f"])
def test_implicit_gradient_matches_full_unroll_at_a_fixed_point(divergence):
    """Deterministic inner problem (fixed noise), 1000 SGD steps: the loop has converged."""
    grads = {}
    for mode in ("full", "implicit"):
        div = divergence()
        tr = _trainer(div, mode=mode, n_inner_steps=1000, n_tasks_per_batch=2, fixed_noise=True,
                      implicit_steps=30, implicit_damping=1e-8, n_particles=64)
        tr.meta_optimizer.param_groups[0]["lr"] = 0.0  # keep eta: inspect its gradient
        tr.step()
        grads[mode] = next(iter(div.parameters())).grad.clone()
    assert float(grads["full"].abs().max()) > 1e-4
    torch.testing.assert_close(grads["implicit"], grads["full"], rtol=0.05, atol=1e-5)


def test_implicit_is_biased_before_convergence_and_rejects_learn_init():
    grads = []
    for B in (20, 400):
        div = Renyi(0.7).to(DT)
        tr = _trainer(div, mode="implicit", n_inner_steps=B, n_tasks_per_batch=2, fixed_noise=True,
                      implicit_steps=30, implicit_damping=1e-8, n_particles=64)
        tr.meta_optimizer.param_groups[0]["lr"] = 0.0
        tr.step()
        grads.append(float(div.raw_alpha.grad))
    assert abs(grads[0] - grads[1]) > 0.2 * abs(grads[1])
    with pytest.raises(ValueError, match="cannot learn one"):
        _trainer(Renyi(0.7).to(DT), mode="implicit", learn_init=True)


def test_implicit_memory_does_not_grow_with_steps():
    """The implicit mode records one step's graph: B only costs forward time."""
    div = Renyi(0.7).to(DT)
    tr = _trainer(div, mode="implicit", n_inner_steps=50, optimizer=Adam(0.05))
    assert np.isfinite(tr.step())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("which", ["mog", "bnn", "alg2-one-task"])
def test_torch_distributed_two_processes_equal_single_process(which, tmp_path):
    sys.path.insert(0, str(HERE))
    try:
        import _distributed_worker as worker
    finally:
        sys.path.pop(0)
    single = worker.build(which).meta_fit(*worker.data(which))
    out = tmp_path / "rank0.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           str(HERE / "_distributed_worker.py"), str(out), which]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert got["world"] == 2
    np.testing.assert_allclose(got["curve"].numpy(), single.meta_loss_curve_, rtol=1e-6)
    for k, v in single.meta_divergence_.state_dict().items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------- task_chunk_size="auto"
def _bnn_model(hidden=(50, 50)):
    from skmetavi.models import BNNRegression, GlobalLatent

    target = BNNRegression(hidden, likelihood="homoskedastic")
    return GlobalLatent(MeanFieldGaussian(target.n_latent(1)), target)


@pytest.mark.parametrize(
    "n_rows, dtype, device, expected",
    [
        (1000, torch.float32, "cpu", 4),  # 10 x 1000 x 50 float32 = 2 MB per task: 8 MiB / 2 MB
        (1000, torch.float64, "cpu", 2),
        (2000, torch.float32, "cpu", 2),
        (500, torch.float32, "cpu", 8),
        (40, torch.float32, "cpu", None),  # 16 tasks fit in one chunk: all at once
        (1000, torch.float32, "cuda", None),  # an accelerator wants large batches
    ],
)
def test_auto_task_chunk_sizes_chunks_from_the_widest_activation(n_rows, dtype, device, expected):
    from skmetavi._tasks import auto_task_chunk

    got = auto_task_chunk(_bnn_model(), 16, n_rows, 1, 10, dtype=dtype, device=device)
    assert got == expected


@pytest.mark.parametrize(
    "n_rows, n_tasks, expected",
    [
        (1000, 16, 1),  # 2 MB per task: one task per 2 MiB chunk
        (500, 16, 2),
        (200, 16, 4),  # 400 KB per task: 5 fit, 4 is the largest divisor of 16 (one graph)
        (200, 15, 5),
        (200, 7, 4),  # 5 fit, no divisor near it: balanced chunks of 4 and 3 (two graphs)
        (70, 17, 9),  # 14 fit, 17 is prime: 9 + 8 rather than 17 chunks of one
        (40, 16, None),  # 80 KB per task: all 16 at once
    ],
)
def test_auto_task_chunk_of_a_compiled_iteration_is_smaller_and_divides_the_batch(
        n_rows, n_tasks, expected):
    from skmetavi._tasks import auto_task_chunk

    got = auto_task_chunk(_bnn_model(), n_tasks, n_rows, 1, 10, dtype=torch.float32,
                          device="cpu", compiled=True)
    assert got == expected


def _step_with_a_failing_compile(monkeypatch, trainer):
    from skmetavi import _compiled_meta

    def broken(with_init, cpp_wrapper=False):
        def fn(*args):
            raise RuntimeError("inductor failed")
        return fn

    monkeypatch.setattr(_compiled_meta, "_get_compiled", broken)
    with pytest.warns(RuntimeWarning, match="compiled meta-iteration failed"):
        trainer.step()


def test_meta_trainer_resolves_auto_chunks_for_its_compiled_iteration(monkeypatch):
    from skmetavi import MetaBNNRegressor
    from skmetavi.datasets import make_sinusoid_tasks

    X, y, g = make_sinusoid_tasks(16, 2000, random_state=0)  # 1000 support rows per task

    def trainer(compile):
        est = MetaBNNRegressor(hidden_layer_sizes=(50, 50), n_particles=10, n_inner_steps=1,
                               n_tasks_per_batch=16, query_fraction=0.5, compile=compile,
                               inner_optimizer="sgd", random_state=0)
        est._setup_torch()
        _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
        return est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))

    eager, compiled = trainer(False), trainer("meta_fit")
    assert compiled._compiled is not None
    assert (eager.task_chunk_size, compiled.task_chunk_size) == (4, 1)
    # Compiling fails: the iteration runs eagerly, and eager chunks from the next one on.
    _step_with_a_failing_compile(monkeypatch, compiled)
    assert compiled._compiled is None and compiled.task_chunk_size == 4


def test_auto_chunks_are_sized_for_this_processs_share_and_a_users_choice_stays(monkeypatch):
    from skmetavi import MetaBNNRegressor
    from skmetavi.datasets import make_sinusoid_tasks

    X, y, g = make_sinusoid_tasks(16, 400, random_state=0)  # 200 support rows per task
    est = MetaBNNRegressor(hidden_layer_sizes=(50, 50), n_particles=10, n_inner_steps=1,
                           n_tasks_per_batch=16, query_fraction=0.5, compile="meta_fit",
                           inner_optimizer="sgd", random_state=0)
    est._setup_torch()
    _, _, _, (bnn, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
    tr = est._meta_trainer(bnn, support, query, gen, est._meta_divergence(False))
    assert tr.task_chunk_size == 4  # 400 KB per task: 4 of 16
    tr.rank, tr.world_size = 1, 3  # this process takes 5 of the 16 tasks: one chunk
    tr._resolve_auto_chunk()
    assert tr.task_chunk_size is None
    tr.rank, tr.world_size = 0, 1
    tr.task_chunk_size = 16  # the user's choice survives a failed compile
    _step_with_a_failing_compile(monkeypatch, tr)
    assert tr._compiled is None and tr.task_chunk_size == 16


def test_auto_task_chunk_counts_the_particles_when_they_are_the_widest():
    from skmetavi._tasks import AUTO_CHUNK_BYTES, auto_task_chunk

    model = _bnn_model(hidden=(400, 400))  # 161 201 weights per particle > 10 rows x 400
    per_task = 10 * model.n_latent * 4
    assert auto_task_chunk(model, 64, 10, 1, 10, dtype=torch.float32,
                           device="cpu") == AUTO_CHUNK_BYTES // per_task


def test_auto_task_chunk_is_off_for_models_that_do_not_tell_their_size():
    from skmetavi._tasks import auto_task_chunk

    problem = Problem(MeanFieldGaussian(1), GaussianMixture1D())
    assert problem.elements_per_task(1000, 3, 10) is None
    assert auto_task_chunk(problem, 16, 10**6, 3, 10, dtype=DT, device="cpu") is None
    assert auto_task_chunk(object(), 16, 10**6, 3, 10, dtype=DT, device="cpu") is None


def test_auto_chunked_meta_fit_equals_the_whole_batch(monkeypatch):
    """A small budget forces chunks of one task: the same meta-fit as all tasks at once."""
    from skmetavi import MetaBNNRegressor, _tasks
    from skmetavi.datasets import make_sinusoid_tasks

    X, y, g = make_sinusoid_tasks(4, 20, random_state=0)
    fits, calls = {}, []
    step = MetaTrainer._tasks_step

    def counted(self, task_ids, *args):
        calls.append(task_ids.numel())
        return step(self, task_ids, *args)

    monkeypatch.setattr(MetaTrainer, "_tasks_step", counted)
    for chunk in (None, "auto"):
        if chunk == "auto":
            monkeypatch.setattr(_tasks, "AUTO_CHUNK_BYTES", 1)
        est = MetaBNNRegressor(Renyi(0.7), hidden_layer_sizes=(8,), n_particles=4,
                               max_meta_iter=3, n_inner_steps=2, n_tasks_per_batch=4,
                               task_chunk_size=chunk, dtype="float64", random_state=0)
        fits[chunk] = est.meta_fit(X, y, groups=g)
    assert calls == [4] * 3 + [1] * 12  # 3 outer iterations: whole, then one task per chunk
    np.testing.assert_allclose(fits["auto"].meta_loss_curve_, fits[None].meta_loss_curve_,
                               rtol=1e-10)
    alphas = [fits[c].meta_divergence_.alpha for c in ("auto", None)]
    assert alphas[0] != pytest.approx(0.7)  # alpha was learned
    np.testing.assert_allclose(alphas[0], alphas[1], rtol=1e-10)


@pytest.mark.parametrize(
    "rows, settings, expected",
    [
        # 2 x 1000 support/query rows, K = 10, width 50, float32: 2 MB per task -> 4 per chunk
        (2000, {}, 4),
        # the meta-loss's 1800 query rows count, not only the 200 support rows
        (2000, {"query_fraction": 0.9}, 2),
        # a support minibatch of 32 rows: the 1000 query rows still count
        (2000, {"batch_size": 32}, 4),
        (80, {}, None),  # 16 small tasks: one chunk
    ],
)
def test_meta_fit_resolves_auto_chunks_from_the_widest_rows(rows, settings, expected):
    from skmetavi import MetaBNNRegressor
    from skmetavi.datasets import make_sinusoid_tasks

    X, y, g = make_sinusoid_tasks(16, rows, random_state=0)
    est = MetaBNNRegressor(Renyi(0.7), hidden_layer_sizes=(50, 50), n_particles=10,
                           n_tasks_per_batch=16, random_state=0, **settings)
    assert est.task_chunk_size == "auto"  # the default
    est._setup_torch()
    _, _, _, (model, support, query, gen, _) = est._meta_fit_inputs(X, y, g)
    trainer = est._meta_trainer(model, support, query, gen, est._meta_divergence(False))
    assert trainer.task_chunk_size == expected


def test_noise_cache_gives_every_chunk_the_numbers_of_one_draw(monkeypatch):
    from skmetavi._tasks import NoiseCache, TaskNoise

    generated = []
    randn = torch.randn

    def counting(*args, **kw):
        generated.append(1)
        return randn(*args, **kw)

    whole = TaskNoise(11, 5, slice(None))
    ref = [whole.randn((5, 3, 2), dtype=torch.float64, device="cpu") for _ in range(3)]
    ref.append(whole.rand((5, 4), dtype=torch.float64, device="cpu"))
    monkeypatch.setattr(torch, "randn", counting)
    cache = NoiseCache()
    for part in (torch.arange(0, 2), torch.arange(2, 4), torch.arange(4, 5)):
        noise = TaskNoise(11, 5, part, cache=cache)
        draws = [noise.randn((5, 3, 2), dtype=torch.float64, device="cpu") for _ in range(3)]
        draws.append(noise.rand((5, 4), dtype=torch.float64, device="cpu"))
        for got, full in zip(draws, ref):
            torch.testing.assert_close(got, full[part], rtol=0, atol=0)
    assert len(generated) == 3  # the first chunk generated, the others sliced
    # Over budget: generated again, the same numbers.
    small = NoiseCache(max_bytes=5 * 3 * 2 * 8)
    for part in (torch.arange(0, 2), torch.arange(2, 5)):
        noise = TaskNoise(11, 5, part, cache=small)
        for full in ref[:2]:
            torch.testing.assert_close(noise.randn((5, 3, 2), dtype=torch.float64,
                                                   device="cpu"), full[part], rtol=0, atol=0)
    assert len(generated) == 3 + 3  # draw 0 kept; draw 1 (over budget) generated per chunk
    assert small.n_bytes == 5 * 3 * 2 * 8
    # Two streams in one cache (the implicit mode's inner and loss noise): kept apart, by
    # seed and dtype.
    monkeypatch.undo()
    shared = NoiseCache()
    for seed, dtype in ((11, torch.float64), (12, torch.float64), (11, torch.float32)):
        alone = TaskNoise(seed, 5, slice(None)).randn((5, 3), dtype=dtype, device="cpu")
        for part in (torch.arange(0, 3), torch.arange(3, 5)):
            got = TaskNoise(seed, 5, part, cache=shared).randn((5, 3), dtype=dtype, device="cpu")
            torch.testing.assert_close(got, alone[part], rtol=0, atol=0)
