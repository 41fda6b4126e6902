"""Meta-validation: the kept divergence adapts at least as well as KL to held-out tasks."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest

from skmetavi import KL, MetaBNNRegressor, MetaDivergenceVI
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks

MOG = dict(model="gaussian_mixture", divergence="renyi", inner_optimizer="sgd", n_particles=16,
           max_iter=30, n_tasks_per_batch=6, random_state=0)


def test_meta_validation_keeps_the_best_candidate_never_worse_than_kl():
    X, g = make_mog_tasks(8, random_state=0)
    est = MetaDivergenceVI(**MOG, max_meta_iter=20, validation_fraction=0.25,
                           validation_interval=5).meta_fit(X, groups=g)
    assert est.validation_tasks_.shape == (2,) and est.meta_tasks_.shape == (6,)
    assert set(est.validation_tasks_).isdisjoint(est.meta_tasks_)
    np.testing.assert_array_equal(est.validation_iterations_, [5, 10, 15, 20])
    assert np.isfinite(est.validation_scores_).all()
    # Without a learned init, KL is scored once (a fresh q adapts the same way).
    assert len(set(est.validation_kl_scores_)) == 1
    best = max(est.validation_scores_.max(), est.validation_kl_scores_.max())
    assert est.best_validation_score_ == best >= est.validation_kl_scores_[0]
    if est.validation_choice_ == "learned":
        i = int(np.argmax(est.validation_scores_))
        assert est.best_meta_iter_ == est.validation_iterations_[i]


def test_meta_validation_falls_back_to_kl_when_the_learned_divergence_is_worse():
    """A meta step size that throws alpha far off: KL adapts better and is kept."""
    X, g = make_mog_tasks(8, random_state=0)
    est = MetaDivergenceVI(**{**MOG, "meta_lr": 2.0}, max_meta_iter=10, validation_fraction=0.25,
                           validation_interval=5, meta_loss="tv").meta_fit(X, groups=g)
    assert est.validation_scores_.max() < est.validation_kl_scores_.max()
    assert est.validation_choice_ == "kl" and isinstance(est.meta_divergence_, KL)
    # fit then uses KL.
    assert isinstance(est.fit(X[g == 0]).divergence_, KL)


def test_meta_validation_with_a_learned_init_compares_kl_from_the_same_init():
    X, y, g = make_sinusoid_tasks(6, 30, random_state=0)
    est = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), n_particles=4, meta_learn_init=True,
                           n_inner_steps=2, max_meta_iter=6, n_tasks_per_batch=3,
                           validation_fraction=0.3, validation_interval=3, random_state=0)
    est.meta_fit(X, y, groups=g)
    assert est.validation_scores_.shape == est.validation_kl_scores_.shape == (2,)
    assert np.isfinite(est.validation_kl_scores_).all()
    assert est.best_validation_score_ >= max(est.validation_kl_scores_.max(),
                                             est.validation_scores_.max())
    assert est.meta_init_["loc"].shape == (1, est._meta_state["init_params"]["loc"].shape[1])


def test_meta_validation_resumes_from_a_checkpoint(tmp_path, monkeypatch):
    """Interrupted after a checkpoint, resumed: the same validations as an uninterrupted run."""
    import skmetavi._trainer

    X, g = make_mog_tasks(8, random_state=0)
    params = dict(**MOG, max_meta_iter=12, validation_fraction=0.25, validation_interval=4)
    full = MetaDivergenceVI(**params).meta_fit(X, groups=g)
    step = skmetavi._trainer.MetaTrainer.step
    calls = {"n": 0}

    def interrupting(self):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint (and validation) of iteration 4
            raise KeyboardInterrupt
        return step(self)

    path = tmp_path / "meta.ckpt"
    monkeypatch.setattr(skmetavi._trainer.MetaTrainer, "step", interrupting)
    with pytest.warns(RuntimeWarning, match="meta_fit interrupted"):
        MetaDivergenceVI(**params).meta_fit(X, groups=g, checkpoint=path, checkpoint_every=4)
    monkeypatch.undo()
    resumed = MetaDivergenceVI(**params).meta_fit(X, groups=g, checkpoint=path,
                                                   checkpoint_every=4)
    np.testing.assert_array_equal(resumed.validation_iterations_, full.validation_iterations_)
    np.testing.assert_array_equal(resumed.validation_scores_, full.validation_scores_)
    assert resumed.best_validation_score_ == full.best_validation_score_
    assert resumed.meta_divergence_.state_dict().keys() == full.meta_divergence_.state_dict().keys()


def test_validation_fraction_leaving_too_few_tasks_is_refused():
    X, g = make_mog_tasks(3, random_state=0)
    with pytest.raises(ValueError, match=r"validation_fraction=0.5 holds out 2 of the 3 tasks, "
                                         r"leaving 1 to meta-train on"):
        MetaDivergenceVI(**MOG, validation_fraction=0.5).meta_fit(X, groups=g)


def test_meta_validation_adapts_in_task_chunks_with_the_same_scores(monkeypatch):
    """task_chunk_size also chunks meta-validation's adaptations; the scores do not change."""
    from skmetavi import _tasks

    X, y, g = make_sinusoid_tasks(8, 30, random_state=0)
    sizes, fit_tasks = [], MetaBNNRegressor._fit_tasks

    def spy(self, data, *args, **kwargs):
        sizes.append(len(data))
        return fit_tasks(self, data, *args, **kwargs)

    monkeypatch.setattr(MetaBNNRegressor, "_fit_tasks", spy)
    scores = {}
    for chunk in (None, "auto"):
        if chunk == "auto":
            monkeypatch.setattr(_tasks, "AUTO_CHUNK_BYTES", 1)  # one task per chunk
        sizes.clear()
        est = MetaBNNRegressor("renyi", hidden_layer_sizes=(8,), n_particles=4, max_iter=5,
                               max_meta_iter=2, n_inner_steps=2, validation_fraction=0.25,
                               validation_interval=1, task_chunk_size=chunk, random_state=0)
        scores[chunk] = est.meta_fit(X, y, groups=g).validation_scores_
        assert sizes and set(sizes) == ({1} if chunk == "auto" else {2})  # 2 validation tasks
    np.testing.assert_allclose(scores["auto"], scores[None], rtol=1e-5)
