"""Meta-validation: keep the divergence (and initialisation) that adapts best to held-out tasks.

The meta-gradient of Algorithms 1 and 2 sees ``n_inner_steps`` inner steps from
the current parameters, while a new task is adapted by the real protocol
(``fit``: hundreds of epochs from a fresh q, or the learned initialisation's
steps), so a divergence that helps one step ahead need not help at the end
(short-horizon bias, Wu et al. 2018).  With ``validation_fraction`` a share of
the training tasks is held out; every ``validation_interval`` outer iterations
the current divergence (and initialisation) adapts to their support rows exactly
as ``fit`` would and is scored on their query rows, beside KL-VI (the
divergence replaced by KL) under the same protocol, and the best candidate is
what ``meta_fit`` keeps.  The learned divergence is therefore never worse than
KL on the validation tasks.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy

import numpy as np

from skmetavi import _tree
from skmetavi.divergences import KL


class MetaValidation:
    """Periodic evaluation of meta-training candidates on held-out tasks.

    Parameters
    ----------
    estimator : _BaseMetaVI
        The estimator being meta-trained (its settings define the protocol).
    tasks : list of tuple
        ``(X_support, y_support, X_query, y_query)`` of every validation task,
        in the original units.
    seed : int
        Seeds of the adaptations: task ``m`` uses ``seed + m`` for every
        candidate (common random numbers).
    interval : int
        Outer iterations between evaluations.
    """

    def __init__(self, estimator, tasks, seed, interval):
        self.estimator, self.tasks, self.seed, self.interval = estimator, tasks, seed, interval
        self.iterations, self.scores, self.kl_scores = [], [], []
        self.best = None  # dict: score, iteration, kind, divergence, init

    # ----------------------------------------------------------- scoring
    def _candidate(self, divergence, init):
        est = copy.copy(self.estimator)
        est.meta_divergence_ = divergence
        if init is None:
            if hasattr(est, "meta_init_"):
                del est.meta_init_
        else:
            est.meta_init_ = init
        return est

    def score(self, divergence, init):
        """Mean validation score of a candidate, adapted as ``fit`` would, on the query rows."""
        est = self._candidate(divergence, init)
        rngs = [np.random.RandomState((self.seed + m) % (2**32)) for m in range(len(self.tasks))]
        data = [(Xs, ys) for Xs, ys, _, _ in self.tasks]
        # Internal adaptations: no progress bar, no user callbacks, no divergence warning.
        states = est._fit_tasks_in_chunks(data, rngs, quiet=True)
        values = []
        for state, (_, _, Xq, yq) in zip(states, self.tasks):
            fitted = copy.copy(est)
            fitted._set_fitted(state)
            values.append(fitted._validation_score(Xq, yq))
        return float(np.mean(values))

    def evaluate(self, trainer):
        """Score the trainer's current divergence (and init) and KL; keep the best.

        Returns ``(score, kl_score)`` of this evaluation (higher is better).
        """
        divergence = copy.deepcopy(trainer.divergence).to("cpu").requires_grad_(False)
        init = None if trainer.init_params is None else _tree.to_cpu(trainer.init_params)
        score = self.score(divergence, init)
        if init is not None or not self.kl_scores:
            # With a learned init, KL with the same init; otherwise once (fresh q's).
            kl_score = self.score(KL(), init)
        else:
            kl_score = self.kl_scores[-1]
        self.iterations.append(trainer.n_iter)
        self.scores.append(score)
        self.kl_scores.append(kl_score)
        for kind, value in (("learned", score), ("kl", kl_score)):
            # Ties go to the learned divergence (evaluated first).
            if self.best is None or value > self.best["score"]:
                self.best = {"score": value, "iteration": trainer.n_iter, "kind": kind,
                             "divergence": divergence if kind == "learned" else KL(),
                             "init": init}
        return score, kl_score

    def due(self, n_iter, final):
        return final or n_iter % self.interval == 0

    # ------------------------------------------------------- persistence
    def state_dict(self):
        best = None
        if self.best is not None:
            best = dict(self.best)
            div = best.pop("divergence")
            best["divergence_state"] = (None if best["kind"] == "kl"
                                        else _tree.to_cpu(div.state_dict()))
        return {"iterations": list(self.iterations), "scores": list(self.scores),
                "kl_scores": list(self.kl_scores), "best": best}

    def load_state_dict(self, state, divergence_template):
        self.iterations = list(state["iterations"])
        self.scores = list(state["scores"])
        self.kl_scores = list(state["kl_scores"])
        best = state["best"]
        if best is None:
            self.best = None
            return
        best = dict(best)
        div_state = best.pop("divergence_state")
        if best["kind"] == "kl":
            best["divergence"] = KL()
        else:
            div = copy.deepcopy(divergence_template).to("cpu").requires_grad_(False)
            div.load_state_dict(div_state)
            best["divergence"] = div
        self.best = best
