"""A catalogue of bad inputs: each one is refused with a message that says what to do.

Every case names what was received and what to try instead.  The catalogue is
complete on its own: some cases repeat checks of the per-module test files.
"""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge

from skmetavi import MetaBNNRegressor, MetaDivergenceVI, _checkpoint, metrics
from skmetavi.datasets import make_mog_tasks, make_sinusoid_tasks
from skmetavi.divergences import (
    KL,
    FDivergence,
    NeuralF,
    Renyi,
    TailAdaptive,
    make_divergence,
)
from skmetavi.model_selection import TaskAdaptiveRegressor, support_query_split

ONES = np.ones((4, 1))
BNN_SMALL = dict(hidden_layer_sizes=(4,), max_iter=2, n_particles=2, n_predict_samples=4)


def vi(**params):
    """A MetaDivergenceVI with a tiny budget."""
    return MetaDivergenceVI(**{"max_iter": 2, "max_meta_iter": 1, "n_particles": 4, **params})


def mixture_vi(**params):
    """A meta-learnable MetaDivergenceVI on the mixture tasks."""
    return vi(**{"model": "gaussian_mixture", "divergence": "renyi", **params})


def bnn(**params):
    return MetaBNNRegressor(**{**BNN_SMALL, "max_meta_iter": 1, **params})


def blr(**params):
    return vi(model="bayesian_linear_regression", **params)


@pytest.fixture(scope="module")
def ns(tmp_path_factory):
    """Data, fitted estimators and files shared by the cases (never modified by them)."""
    tmp = tmp_path_factory.mktemp("validation")
    X_mog, g_mog = make_mog_tasks(3, random_state=0)
    X_sin, y_sin, g_sin = make_sinusoid_tasks(3, 10, random_state=0)
    out = SimpleNamespace(tmp=tmp, X_mog=X_mog, g_mog=g_mog, X_sin=X_sin, y_sin=y_sin, g_sin=g_sin)
    out.vi = vi(random_state=0).fit(np.ones((4, 2)))
    out.vi_warm = vi(random_state=0, warm_start=True).fit(np.ones((4, 2)))
    out.meta_vi = mixture_vi(random_state=0, warm_start=True).meta_fit(X_mog, groups=g_mog)
    out.bnn = bnn(random_state=0).fit(X_sin[:10], y_sin[:10])
    out.tar = TaskAdaptiveRegressor(bnn(divergence="renyi", random_state=0), random_state=0)
    out.tar.fit(X_sin, y_sin, groups=g_sin)
    # A checkpoint written for the mixture tasks of random_state=0.
    out.ckpt = tmp / "mog.ckpt"
    mixture_vi(random_state=0).meta_fit(X_mog, groups=g_mog, checkpoint=out.ckpt)
    (tmp / "garbage.ckpt").write_bytes(b"this is not a checkpoint")
    torch.save({"weights": torch.zeros(2)}, tmp / "foreign.ckpt")
    return out


def _ckpt_other_data(ns):
    X, groups = make_mog_tasks(3, random_state=1)
    mixture_vi(random_state=0).meta_fit(X, groups=groups, checkpoint=ns.ckpt)


def _names(*names):
    """Regex: every name appears (in any order), e.g. in scikit-learn's StrOptions message."""
    return "".join(f"(?=.*'{name}')" for name in names)


NOT_FITTED = r"is not fitted yet\. Call 'fit' with appropriate arguments"

# (id, call(ns), exception, regex).  Each regex covers what was received and what to do.
CASES = [
    # ------------------------------------------------ MetaDivergenceVI: X and y of fit
    ("vi-X-nan", lambda ns: vi().fit([[1.0], [np.nan]]), ValueError,
     r"Input X contains NaN.*imputer"),
    ("vi-X-inf", lambda ns: vi().fit([[1.0], [np.inf]]), ValueError,
     r"Input X contains infinity.*Remove or impute the non-finite entries"),
    ("vi-X-minus-inf", lambda ns: vi().fit([[-np.inf], [0.0]]), ValueError,
     r"Input X contains infinity.*Remove or impute the non-finite entries"),
    ("vi-X-empty", lambda ns: vi().fit(np.ones((0, 1))), ValueError,
     r"0 sample\(s\) \(shape=\(0, 1\)\).*Pass at least one row"),
    ("vi-X-no-columns", lambda ns: vi().fit(np.ones((3, 0))), ValueError,
     r"0 feature\(s\) \(shape=\(3, 0\)\).*Pass at least one column"),
    ("vi-X-1d", lambda ns: vi().fit(np.ones(4)), ValueError,
     r"Expected 2D array, got 1D array.*Reshape your data"),
    ("vi-X-3d", lambda ns: vi().fit(np.ones((4, 1, 1))), ValueError,
     r"Found array with dim 3.*Pass a 2-D array of shape \(n_samples, n_features\)"),
    ("vi-X-strings", lambda ns: vi().fit(np.array([["a"], ["b"]])), ValueError,
     r"could not convert string to float.*'a'.*must be numeric.*OrdinalEncoder"),
    ("vi-X-object", lambda ns: vi().fit(np.array([[1.0], ["b"]], dtype=object)), ValueError,
     r"could not convert string to float.*'b'.*must be numeric"),
    ("vi-X-complex", lambda ns: vi().fit(ONES + 1j), ValueError,
     r"Complex data not supported.*Pass real numbers"),
    ("vi-X-sparse", lambda ns: vi().fit(sp.csr_matrix(ONES)), TypeError,
     r"Sparse data was passed for X, but dense data is required.*toarray"),
    ("vi-y-missing", lambda ns: blr().fit(ONES), ValueError,
     r"the target y is None: model='bayesian_linear_regression' needs targets; pass y"),
    ("vi-y-nan", lambda ns: blr().fit(ONES, [1.0, np.nan, 2.0, 3.0]), ValueError,
     r"Input y contains NaN.*Drop the rows with missing values"),
    ("vi-y-wrong-length", lambda ns: blr().fit(ONES, [1.0, 2.0]), ValueError,
     r"inconsistent numbers of samples: \[4, 2\].*one target .* per row of X"),
    ("vi-y-strings", lambda ns: blr().fit(ONES, ["a", "b", "c", "d"]), ValueError,
     r"could not convert string to float.*'a'.*must be numeric"),
    ("vi-mixture-columns", lambda ns: vi(model="gaussian_mixture").fit(np.ones((2, 2))),
     ValueError, r"expects rows \(weight, loc, scale\), i\.e\. X with 3 columns, got 2"),
    ("vi-mixture-scale", lambda ns: vi(model="gaussian_mixture").fit([[0.5, 0.0, -1.0]]),
     ValueError, r"component scales \(column 2\) must be > 0, got \[-1\.0\]"),
    # ---------------------------------------------- MetaDivergenceVI: parameters
    ("vi-unknown-divergence", lambda ns: vi(divergence="alpha").fit(ONES), ValueError,
     _names("kl", "renyi", "neural_f", "tail_adaptive", "f") + r".*Got 'alpha' instead"),
    ("vi-divergence-type", lambda ns: vi(divergence=3).fit(ONES), ValueError,
     r"'divergence' parameter .* must be a str among .*particle_weights'\. Got 3 instead"),
    ("vi-unknown-meta-loss", lambda ns: vi(meta_loss="kl").fit(ONES), ValueError,
     _names("auto", "d_half", "tv", "nll") + r".*Got 'kl' instead"),
    ("vi-unknown-model", lambda ns: vi(model="poisson").fit(ONES), ValueError,
     _names("gaussian_mean", "gaussian_mixture", "bayesian_linear_regression")
     + r".*Got 'poisson' instead"),
    ("vi-unknown-family", lambda ns: vi(family="student").fit(ONES), ValueError,
     _names("mean_field", "full_covariance") + r".*Got 'student' instead"),
    ("vi-n-particles-zero", lambda ns: vi(n_particles=0).fit(ONES), ValueError,
     r"'n_particles' parameter .* must be an int in the range \[1, inf\)\. Got 0 instead"),
    ("vi-inner-lr-zero", lambda ns: vi(inner_lr=0.0).fit(ONES), ValueError,
     r"'inner_lr' parameter .* in the range \(0\.0, inf\) or a str among \{'auto'\}\. "
     r"Got 0\.0 instead"),
    ("vi-meta-lr-negative", lambda ns: vi(meta_lr=-0.1).fit(ONES), ValueError,
     r"'meta_lr' parameter .* in the range \(0\.0, inf\)\. Got -0\.1 instead"),
    ("vi-max-iter-negative", lambda ns: vi(max_iter=-1).fit(ONES), ValueError,
     r"'max_iter' parameter .* in the range \[0, inf\).*Got -1 instead"),
    ("vi-n-inner-steps-zero", lambda ns: vi(n_inner_steps=0).fit(ONES), ValueError,
     r"'n_inner_steps' parameter .* in the range \[1, inf\)\. Got 0 instead"),
    ("vi-init-scale-zero", lambda ns: vi(init_scale=0.0).fit(ONES), ValueError,
     r"'init_scale' parameter .* in the range \(0\.0, inf\)\. Got 0\.0 instead"),
    ("vi-query-fraction-one", lambda ns: vi(query_fraction=1.0).fit(ONES), ValueError,
     r"'query_fraction' parameter .* in the range \(0\.0, 1\.0\)\. Got 1\.0 instead"),
    ("vi-dtype-float16", lambda ns: vi(dtype="float16").fit(ONES), ValueError,
     _names("float32", "float64") + r".*Got 'float16' instead"),
    ("vi-device-unknown", lambda ns: vi(device="tpu").fit(ONES), ValueError,
     r"device must be a torch device string such as 'cpu' or 'cuda', got 'tpu'"),
    ("vi-callable-model-without-n-latent",
     lambda ns: vi(model=lambda z, X, y: z.sum(-1)).fit(ONES), ValueError,
     r"callable model needs n_latent, the dimension of z, as a positive int; got n_latent=None"),
    ("vi-renyi-alpha-zero", lambda ns: vi(divergence=Renyi(0.0)), ValueError,
     r"alpha must be a finite number > 0, got 0\.0\. Use e\.g\. alpha=0\.5"),
    ("vi-renyi-alpha-negative", lambda ns: vi(divergence=Renyi(-0.5)), ValueError,
     r"alpha must be a finite number > 0, got -0\.5\. Use e\.g\. alpha=0\.5"),
    # ------------------------------------------------- incompatible option pairs
    ("vi-truncated-without-truncate",
     lambda ns: mixture_vi(meta_gradient="truncated").meta_fit(ns.X_mog, groups=ns.g_mog),
     ValueError, r"meta_gradient='truncated' needs truncate.*\(e\.g\. truncate=5\)"),
    ("vi-truncate-beyond-inner-steps",
     lambda ns: mixture_vi(meta_gradient="truncated", truncate=3).meta_fit(
         ns.X_mog, groups=ns.g_mog),
     ValueError, r"truncate=3 exceeds n_inner_steps=1; choose truncate <= n_inner_steps"),
    ("vi-truncate-without-truncated",
     lambda ns: mixture_vi(truncate=2).meta_fit(ns.X_mog, groups=ns.g_mog), ValueError,
     r"truncate=2 only applies with meta_gradient='truncated', got meta_gradient='full'; "
     r"set meta_gradient='truncated' or truncate=None"),
    ("vi-nothing-to-meta-learn",
     lambda ns: mixture_vi(divergence="kl", meta_learn_init=False).meta_fit(
         ns.X_mog, groups=ns.g_mog), ValueError,
     r"Nothing to meta-learn: divergence KL\(\) has no learnable parameters.*Use a learnable"),
    ("vi-quadrature-meta-loss-2d-latent",
     lambda ns: vi(divergence="renyi", meta_loss="tv").meta_fit(
         np.ones((6, 2)), groups=[0, 0, 1, 1, 2, 2]),
     ValueError, r"meta_loss='tv'.* needs a 1-D latent.*n_latent=2\. Use 'nll' or a callable"),
    ("vi-nll-without-likelihood",
     lambda ns: mixture_vi(meta_loss="nll").meta_fit(ns.X_mog, groups=ns.g_mog), ValueError,
     r"meta_loss='nll' needs a model with a per-row likelihood; GaussianMixture1D has none\. "
     r"Use 'd_half' or 'tv'"),
    ("vi-quadrature-range-reversed",
     lambda ns: mixture_vi(quadrature_range=(3.0, 1.0)).meta_fit(ns.X_mog, groups=ns.g_mog),
     ValueError, r"quadrature_range must be a tuple \(low, high\) of finite numbers with "
     r"low < high, got \(3\.0, 1\.0\)"),
    # ------------------------------------------------------------- meta_fit data
    ("meta-groups-missing", lambda ns: mixture_vi().meta_fit(ns.X_mog), ValueError,
     r"meta_fit needs groups: an array of shape \(n_samples,\) giving the task of each row"),
    ("meta-groups-wrong-length",
     lambda ns: vi(divergence="renyi").meta_fit(ONES, groups=[0, 0, 1]), ValueError,
     r"groups has 3 entries but X has 4 rows; give one task label per row"),
    ("meta-groups-2d",
     lambda ns: vi(divergence="renyi").meta_fit(ONES, groups=np.zeros((4, 2))), ValueError,
     r"groups must be a 1-D array of integer or string task labels.*shape \(4, 2\).*Pass e\.g\."),
    ("meta-groups-nan",
     lambda ns: vi(divergence="renyi").meta_fit(ONES, groups=[0.0, np.nan, 1.0, 1.0]),
     ValueError, r"groups contains 1 NaN or inf label\(s\).*drop those rows or give them a task"),
    ("meta-groups-mixed-types",
     lambda ns: vi(divergence="renyi").meta_fit(
         ONES, groups=np.array([0, "a", 0, "a"], dtype=object)),
     TypeError, r"groups mixes task labels of types \['int', 'str'\].*labels of one type"),
    ("meta-single-task",
     lambda ns: vi(divergence="renyi").meta_fit(ONES, groups=[0, 0, 0, 0]), ValueError,
     r"at least 2 tasks \(distinct groups\), got 1\..*to adapt to a single task use fit"),
    ("meta-single-sample",
     lambda ns: vi(divergence="renyi").meta_fit(np.ones((1, 1)), groups=[0]), ValueError,
     r"at least 2 tasks \(distinct groups\), got 1\..*to adapt to a single task use fit"),
    ("meta-task-too-small-for-split",
     lambda ns: vi(divergence="renyi").meta_fit(ONES, groups=[0, 1, 1, 1]), ValueError,
     r"Task 0 has 1 row\(s\); the held-out meta-loss needs at least 2 rows per task.*"
     r"Merge small tasks"),
    ("meta-empty",
     lambda ns: vi(divergence="renyi").meta_fit(np.ones((0, 1)), groups=[]), ValueError,
     r"0 sample\(s\).*Pass at least one row"),
    # --------------------------------------------------------------- checkpoints
    ("ckpt-every-zero",
     lambda ns: mixture_vi().meta_fit(ns.X_mog, groups=ns.g_mog, checkpoint_every=0),
     ValueError, r"checkpoint_every must be a positive int .*got 0; e\.g\. checkpoint_every=50"),
    ("ckpt-not-a-path",
     lambda ns: mixture_vi().meta_fit(ns.X_mog, groups=ns.g_mog, checkpoint=5), TypeError,
     r"checkpoint must be a file path \(str or os\.PathLike\), got int 5; e\.g\. checkpoint="),
    ("ckpt-directory",
     lambda ns: mixture_vi(random_state=0).meta_fit(ns.X_mog, groups=ns.g_mog, checkpoint=ns.tmp), ValueError,
     r"is a directory; pass a file path inside it"),
    ("ckpt-other-data", _ckpt_other_data, ValueError,
     r"was written for other data or settings than this meta_fit call.*Use the same X, y, "
     r"groups and parameters.*or another checkpoint path"),
    ("ckpt-random-state-none",
     lambda ns: mixture_vi().meta_fit(ns.X_mog, groups=ns.g_mog, checkpoint=ns.tmp / "n.ckpt"),
     ValueError, r"needs an int random_state.*got random_state=None"),
    ("ckpt-other-settings",
     lambda ns: mixture_vi(random_state=0, meta_lr=0.5).meta_fit(
         ns.X_mog, groups=ns.g_mog, checkpoint=ns.ckpt),
     ValueError, r"written for other data or settings.*\(its fingerprint differs\)"),
    ("ckpt-corrupted",
     lambda ns: mixture_vi(random_state=0).meta_fit(
         ns.X_mog, groups=ns.g_mog, checkpoint=ns.tmp / "garbage.ckpt"),
     ValueError, r"Could not read the checkpoint .*garbage\.ckpt.*corrupted, truncated.*"
     r"Delete it to start over"),
    ("ckpt-foreign-file",
     lambda ns: mixture_vi(random_state=0).meta_fit(
         ns.X_mog, groups=ns.g_mog, checkpoint=ns.tmp / "foreign.ckpt"),
     ValueError, rf"is not a skmetavi checkpoint of format {_checkpoint.FORMAT_VERSION} "
                 r"\(found format None\)\. Delete it"),
    # ------------------------------------------- MetaDivergenceVI: fitted / state
    ("vi-score-wrong-n-features", lambda ns: ns.vi.score(np.ones((3, 3))), ValueError,
     r"X has 3 features, but MetaDivergenceVI is expecting 2 features.*Pass the columns"),
    ("vi-score-samples-wrong-n-latent", lambda ns: ns.vi.score_samples(np.ones((3, 3))),
     ValueError, r"Z has 3 features.*expecting 2.*pass points of shape \(n_points, 2\)"),
    ("vi-score-samples-nan", lambda ns: ns.vi.score_samples([[np.nan, 0.0]]), ValueError,
     r"Input Z contains NaN.*Drop the rows with missing values"),
    ("vi-sample-zero", lambda ns: ns.vi.sample(0), ValueError,
     r"n_samples must be a positive int, the number of draws; got 0"),
    ("vi-sample-before-fit", lambda ns: vi().sample(2), NotFittedError, NOT_FITTED),
    ("vi-score-before-fit", lambda ns: vi().score(ONES), NotFittedError, NOT_FITTED),
    ("vi-score-samples-after-meta-fit-only",
     lambda ns: copy.deepcopy(ns.meta_vi).score_samples([[0.0]]), NotFittedError, NOT_FITTED),
    ("vi-warm-fit-other-features",
     lambda ns: copy.deepcopy(ns.vi_warm).fit(np.ones((4, 3))), ValueError,
     r"warm_start=True continues the previous fit, which saw 2 features: X has 3 features.*"
     r"set warm_start=False"),
    ("vi-warm-meta-fit-switches-learn-init",
     lambda ns: copy.deepcopy(ns.meta_vi).set_params(meta_learn_init=True).meta_fit(
         ns.X_mog, groups=ns.g_mog),
     ValueError, r"cannot switch meta_learn_init between meta_fit calls \(was False, now "
     r"True\); set warm_start=False"),
    ("vi-warm-meta-fit-other-tasks",
     lambda ns: copy.deepcopy(ns.meta_vi).meta_fit(ns.X_mog[:4], groups=ns.g_mog[:4]),
     ValueError, r"belong to its 3 tasks \[0, 1, 2\], but this call has 2 tasks \[0, 1\]\. "
     r"Pass the same X, y and groups, or set warm_start=False"),
    # ------------------------------------------------------------- MetaBNNRegressor
    ("bnn-y-missing", lambda ns: bnn().fit(ONES), ValueError,
     r"MetaBNNRegressor requires y to be passed, but the target y is None; pass y of shape"),
    ("bnn-y-inf", lambda ns: bnn().fit(ONES, [1.0, np.inf, 2.0, 3.0]), ValueError,
     r"Input y contains infinity.*Remove or impute the non-finite entries"),
    ("bnn-y-two-columns", lambda ns: bnn().fit(ONES, np.ones((4, 2))), ValueError,
     r"y should be a 1d array, got an array of shape \(4, 2\).*one target column"),
    ("bnn-y-strings", lambda ns: bnn().fit(ONES, ["a", "b", "c", "d"]), ValueError,
     r"could not convert string to float.*must be numeric"),
    ("bnn-hidden-sizes-negative", lambda ns: bnn(hidden_layer_sizes=(-1,)).fit(ONES, np.ones(4)),
     ValueError, r"hidden_layer_sizes must be a tuple of positive ints.*got \(-1,\)"),
    ("bnn-hidden-sizes-string", lambda ns: bnn(hidden_layer_sizes="8").fit(ONES, np.ones(4)),
     ValueError, r"'hidden_layer_sizes' parameter .* instance of 'tuple'.*Got '8' instead"),
    ("bnn-unknown-likelihood", lambda ns: bnn(likelihood="poisson").fit(ONES, np.ones(4)),
     ValueError, _names("heteroskedastic", "homoskedastic") + r".*Got 'poisson' instead"),
    ("bnn-unknown-activation", lambda ns: bnn(activation="sigmoid").fit(ONES, np.ones(4)),
     ValueError, _names("relu", "tanh", "softplus", "elu") + r".*Got 'sigmoid' instead"),
    ("bnn-meta-loss-tv", lambda ns: bnn(meta_loss="tv").fit(ONES, np.ones(4)), ValueError,
     _names("nll") + r".*or a callable\. Got 'tv' instead"),
    ("bnn-prior-scale-zero", lambda ns: bnn(prior_scale=0.0).fit(ONES, np.ones(4)), ValueError,
     r"'prior_scale' parameter .* in the range \(0\.0, inf\)\. Got 0\.0 instead"),
    ("bnn-batch-size-zero", lambda ns: bnn(batch_size=0).fit(ONES, np.ones(4)), ValueError,
     r"'batch_size' parameter .* in the range \[1, inf\) or None\. Got 0 instead"),
    ("bnn-n-predict-samples-zero",
     lambda ns: bnn(n_predict_samples=0).fit(ONES, np.ones(4)), ValueError,
     r"'n_predict_samples' parameter .* in the range \[1, inf\)\. Got 0 instead"),
    ("bnn-meta-task-too-small",
     lambda ns: bnn().meta_fit(ns.X_sin[:11], ns.y_sin[:11], groups=ns.g_sin[:11]), ValueError,
     r"Task 1 has 1 row\(s\); the held-out meta-loss needs at least 2 rows"),
    ("bnn-predict-before-fit", lambda ns: bnn().predict(ONES), NotFittedError, NOT_FITTED),
    ("bnn-predict-wrong-n-features", lambda ns: ns.bnn.predict(np.ones((3, 2))), ValueError,
     r"X has 2 features, but MetaBNNRegressor is expecting 1 features.*Pass the columns"),
    ("bnn-predict-nan", lambda ns: ns.bnn.predict([[np.nan]]), ValueError,
     r"Input X contains NaN.*imputer"),
    ("bnn-predict-sparse", lambda ns: ns.bnn.predict(sp.csr_matrix(ONES)), TypeError,
     r"Sparse data was passed for X.*toarray"),
    ("bnn-predict-empty", lambda ns: ns.bnn.predict(np.ones((0, 1))), ValueError,
     r"0 sample\(s\).*Pass at least one row"),
    ("bnn-predict-overflow", lambda ns: ns.bnn.predict([[1e300]], return_std=True), ValueError,
     r"overflow even in float64 for 1 row\(s\) of X \(rows \[0\], largest \|x\| = 1e\+300\)"
     r".*Rescale the inputs"),
    ("bnn-lpd-wrong-length", lambda ns: ns.bnn.log_predictive_density(np.ones((3, 1)), [1.0, 2.0]),
     ValueError, r"y has 2 entries but X has 3 rows; pass one target per row of X"),
    ("bnn-lpd-y-nan", lambda ns: ns.bnn.log_predictive_density(ONES, [np.nan, 1.0, 1.0, 1.0]),
     ValueError, r"Input y contains NaN.*Drop the rows"),
    ("bnn-sample-y-zero", lambda ns: ns.bnn.sample_y(ONES, n_samples=0), ValueError,
     r"n_samples must be a positive int, the number of draws per row; got 0"),
    # ------------------------------------------------------- TaskAdaptiveRegressor
    ("tar-estimator-without-meta-fit",
     lambda ns: TaskAdaptiveRegressor(Ridge()).fit(ns.X_sin, ns.y_sin, groups=ns.g_sin),
     TypeError, r"meta_learn=True needs an estimator with meta_fit, got Ridge.*meta_learn=False"),
    ("tar-predict-after-meta-fit", lambda ns: ns.tar.predict(ns.X_sin), ValueError,
     r"meta-trained on several tasks.*Use adapt\(X_support, y_support\)\.predict\(X\)"),
    ("tar-score-without-groups", lambda ns: ns.tar.score(ns.X_sin, ns.y_sin), ValueError,
     r"score needs groups for a meta-trained TaskAdaptiveRegressor: enable metadata routing"),
    ("tar-support-too-large",
     lambda ns: copy.deepcopy(ns.tar).set_params(support_size=10).score_tasks(
         ns.X_sin, ns.y_sin, ns.g_sin),
     ValueError, r"Task 0 has 10 rows; support_size=10 leaves 10 support and 0 query rows.*"
     r"Use a support_size between 1 and n_rows - 1"),
    ("tar-unknown-metric", lambda ns: ns.tar.score_tasks(ns.X_sin, ns.y_sin, ns.g_sin, "mse"),
     ValueError, r"Unknown metric 'mse'; valid names are \['neg_gaussian_nll', 'mlpd'"),
    ("tar-unknown-scoring",
     lambda ns: TaskAdaptiveRegressor(bnn(), scoring="mse").fit(ns.X_sin, ns.y_sin), ValueError,
     _names("r2", "mlpd", "neg_gaussian_nll") + r".*Got 'mse' instead"),
    ("tar-support-size-zero",
     lambda ns: TaskAdaptiveRegressor(bnn(), support_size=0).fit(ns.X_sin, ns.y_sin),
     ValueError, r"'support_size' parameter .* Got 0 instead"),
    ("tar-groups-wrong-length",
     lambda ns: TaskAdaptiveRegressor(bnn(divergence="renyi")).fit(
         ns.X_sin, ns.y_sin, groups=ns.g_sin[:5]),
     ValueError, r"groups has 5 entries but X has 30 rows; give one task label per row"),
    ("tar-score-tasks-groups-missing",
     lambda ns: ns.tar.score_tasks(ns.X_sin, ns.y_sin, None), ValueError,
     r"score_tasks needs groups, the task label of each row of X; pass an array"),
    ("tar-score-tasks-wrong-n-features",
     lambda ns: ns.tar.score_tasks(np.ones((30, 2)), ns.y_sin, ns.g_sin), ValueError,
     r"X has 2 features, but TaskAdaptiveRegressor is expecting 1.*Pass the columns"),
    ("tar-predict-before-fit", lambda ns: TaskAdaptiveRegressor(bnn()).predict(ONES),
     NotFittedError, NOT_FITTED),
    ("split-inconsistent-lengths",
     lambda ns: support_query_split(ns.X_sin, ns.y_sin[:5], ns.g_sin), ValueError,
     r"inconsistent numbers of samples: \[30, 5, 30\].*one target \(and one task label\)"),
    ("split-task-too-small",
     lambda ns: support_query_split(ns.X_sin, ns.y_sin, ns.g_sin, support_size=10), ValueError,
     r"Task 0 has 10 rows; support_size=10 leaves 10 support and 0 query rows"),
    # ----------------------------------------------------------------- divergences
    ("renyi-alpha-nan", lambda ns: Renyi(float("nan")), ValueError,
     r"alpha must be a finite number > 0, got nan\. Use e\.g\. alpha=0\.5"),
    ("renyi-alpha-string", lambda ns: Renyi("0.5"), TypeError,
     r"alpha must be a real number, got str '0\.5'\. Use e\.g\. alpha=0\.5"),
    ("renyi-learnable-string", lambda ns: Renyi(0.5, learnable="yes"), TypeError,
     r"learnable must be a bool, got 'yes'; pass True to meta-learn alpha"),
    ("tail-adaptive-beta-positive", lambda ns: TailAdaptive(0.5), ValueError,
     r"beta must be a finite number < 0, got 0\.5; e\.g\. beta=-1\.0"),
    ("f-divergence-a-inf", lambda ns: FDivergence(float("inf")), ValueError,
     r"a must be a finite real number, got inf; e\.g\. a=0\.0"),
    ("f-divergence-log-g-not-callable", lambda ns: FDivergence(log_g=3), TypeError,
     r"log_g must be a callable mapping log t to log g\(t\), got int"),
    ("neural-f-zero-width", lambda ns: NeuralF(hidden_layer_sizes=(0,)), ValueError,
     r"hidden_layer_sizes must contain positive ints, got \(0,\); e\.g\. \(32,\)"),
    ("neural-f-activation", lambda ns: NeuralF(activation="sigmoid"), ValueError,
     r"activation must be one of \['elu', 'relu', 'softplus', 'tanh'\], got 'sigmoid'"),
    ("make-divergence-unknown", lambda ns: make_divergence("alpha"), ValueError,
     r"Unknown divergence 'alpha'; valid names are \['kl', 'renyi', 'local_renyi', 'neural_f', "
     r"'tail_adaptive', 'f'\]"),
    ("make-divergence-type", lambda ns: make_divergence(0.5), TypeError,
     r"divergence must be one of \['kl', .*\] or a skmetavi\.divergences\.Divergence "
     r"instance, got float"),
    ("weights-numpy", lambda ns: KL().particle_weights(np.zeros(3)), TypeError,
     r"log-weights must be a torch\.Tensor, got ndarray; convert them with torch\.as_tensor"),
    ("weights-scalar", lambda ns: Renyi().particle_weights(torch.tensor(1.0)), ValueError,
     r"trailing particle dimension of size >= 1, got shape \(\); pass shape \(\.\.\., "
     r"n_particles\)"),
    ("weights-no-particles", lambda ns: TailAdaptive().particle_weights(torch.zeros(2, 0)),
     ValueError, r"trailing particle dimension of size >= 1, got shape \(2, 0\)"),
    # -------------------------------------------------------------------- datasets
    ("mog-zero-tasks", lambda ns: make_mog_tasks(0), ValueError,
     r"'n_tasks' parameter of make_mog_tasks must be an int in the range \[1, inf\)\. Got 0"),
    ("sinusoid-zero-samples", lambda ns: make_sinusoid_tasks(2, 0), ValueError,
     r"'n_samples' parameter of make_sinusoid_tasks .* \[1, inf\)\. Got 0 instead"),
    ("sinusoid-unknown-noise", lambda ns: make_sinusoid_tasks(2, 3, noise="cauchy"), ValueError,
     _names("heteroskedastic", "homoskedastic", "none") + r".*Got 'cauchy' instead"),
    ("sinusoid-reversed-range", lambda ns: make_sinusoid_tasks(2, 3, x_range=(4, -4)),
     ValueError, r"x_range must be a tuple \(low, high\) of finite numbers with low <= high, "
     r"got \(4, -4\); e\.g\. x_range=\(-4\.0, 4\.0\)"),
    ("sinusoid-infinite-range",
     lambda ns: make_sinusoid_tasks(2, 3, amplitude_range=(1.0, np.inf)), ValueError,
     r"amplitude_range must be a tuple .* got \(1\.0, inf\); e\.g\. amplitude_range="),
    # --------------------------------------------------------------------- metrics
    ("nll-zero-std", lambda ns: metrics.gaussian_nll([0.0], [0.0], [0.0]), ValueError,
     r"y_std must be > 0 everywhere, got 1 entries <= 0.*Pass standard deviations"),
    ("nll-nan", lambda ns: metrics.gaussian_nll([0.0, np.nan], [0.0, 0.0], [1.0, 1.0]),
     ValueError, r"y_true contains 1 NaN or inf value\(s\); all entries must be finite: drop"),
    ("nll-lengths", lambda ns: metrics.gaussian_nll([0.0, 1.0], [0.0], [1.0, 1.0]), ValueError,
     r"inconsistent numbers of samples: \{'y_true': 2, 'y_mean': 1, 'y_std': 2\}; pass one "
     r"prediction per target"),
    ("nll-empty", lambda ns: metrics.gaussian_nll([], [], []), ValueError,
     r"Inputs are empty; pass at least one sample"),
    ("nll-2d", lambda ns: metrics.crps_gaussian(np.zeros((2, 2)), np.zeros(2), np.ones(2)),
     ValueError, r"y_true must be 1-D of shape \(n_samples,\), got shape \(2, 2\); pass one"),
    ("nll-strings", lambda ns: metrics.gaussian_nll(["a"], [0.0], [1.0]), TypeError,
     r"y_true must be an array of numbers; got \['a'\]\. Convert it"),
    ("coverage-level", lambda ns: metrics.interval_coverage([0.0], [0.0], [1.0], level=1.5),
     ValueError, r"level must be in \(0, 1\), got 1\.5; e\.g\. level=0\.9"),
    ("crps-ensemble-shape", lambda ns: metrics.crps_ensemble([0.0, 1.0], np.zeros((3, 2))),
     ValueError, r"y_samples must have shape \(n_samples, n_draws\) = \(2, S\).*got shape"),
    ("scorer-unknown", lambda ns: metrics.get_scorer("mse"), ValueError,
     r"Unknown scorer 'mse'; valid names are \['neg_gaussian_nll', 'mlpd', 'neg_crps', "
     r"'coverage_90', 'r2', 'neg_rmse'\]"),
    ("scorer-not-a-string", lambda ns: metrics.get_scorer(3), TypeError,
     r"get_scorer takes a scorer name \(str\), got int; valid names are \["),
]


def test_catalogue_is_large_and_distinct():
    """At least 40 distinct bad inputs, each with its own id."""
    ids = [case[0] for case in CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 40


@pytest.mark.parametrize(
    "call, exc, match", [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_bad_input_is_refused_with_a_helpful_message(ns, call, exc, match):
    with pytest.raises(exc, match="(?s)" + match):
        call(ns)


def test_failed_warm_fit_leaves_estimator_unchanged(ns):
    """A warm start refused for new columns keeps the previous fit usable."""
    est = copy.deepcopy(ns.vi_warm)
    before = est.score_samples(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="warm_start=True continues the previous fit"):
        est.fit(np.ones((4, 3)))
    assert est.n_features_in_ == 2
    np.testing.assert_array_equal(est.score_samples(np.zeros((2, 2))), before)
