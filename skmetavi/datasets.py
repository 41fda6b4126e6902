"""Task-family generators returning numpy arrays with a ``groups`` vector."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import gzip
import math
import os
import zlib
from numbers import Integral, Real
from pathlib import Path

import numpy as np
from sklearn.datasets import get_data_home, load_digits
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, Options, StrOptions, validate_params

from skmetavi._movielens import fetch_movielens_tasks
from skmetavi._ratings import split_ratings
from skmetavi._validation import _check_random_state

__all__ = [
    "fetch_mnist_tasks",
    "fetch_movielens_tasks",
    "load_digits_tasks",
    "make_mog_tasks",
    "make_sinusoid_tasks",
    "split_ratings",
]

_DEFAULT_RANGES = {
    "x_range": (-4.0, 4.0),
    "amplitude_range": (5.0, 10.0),
    "phase_range": (0.0, 1.0),
}


@validate_params(
    {"n_tasks": [Interval(Integral, 1, None, closed="left")], "random_state": ["random_state"]},
    prefer_skip_nested_validation=True,
)
def make_mog_tasks(n_tasks=100, *, random_state=None):
    """Draw 1-D two-component Gaussian-mixture targets (Sec. 4.1 of Zhang et al. 2021).

    Each task is ``p(z) = 0.5 N(mu1, s1^2) + 0.5 N(mu2, s2^2)`` with
    ``mu1 ~ U[0, 3]``, ``s1 ~ U[0.5, 1]``, ``mu2 = mu1 + 3`` and ``s2 = 2 s1``.

    Parameters
    ----------
    n_tasks : int, default=100
        Number of tasks.
    random_state : int, RandomState instance or None, default=None
        Seed of the draw; None draws fresh OS entropy (numpy's global RNG is
        left untouched, as everywhere in skmetavi).

    Returns
    -------
    X : ndarray of shape (2 * n_tasks, 3)
        One row per mixture component: ``(weight, loc, scale)``, the input
        format of ``MetaDivergenceVI(model="gaussian_mixture")``.
    groups : ndarray of shape (2 * n_tasks,)
        Task index of each row.

    See Also
    --------
    skmetavi.models.GaussianMixture1D : The target these rows define.

    Examples
    --------
    >>> from skmetavi.datasets import make_mog_tasks
    >>> X, groups = make_mog_tasks(3, random_state=0)
    >>> X.shape, groups.tolist()
    ((6, 3), [0, 0, 1, 1, 2, 2])
    """
    rng = _check_random_state(random_state)
    mu1 = rng.uniform(0.0, 3.0, size=n_tasks)
    s1 = rng.uniform(0.5, 1.0, size=n_tasks)
    X = np.empty((n_tasks, 2, 3))
    X[:, 0] = np.column_stack([np.full(n_tasks, 0.5), mu1, s1])
    X[:, 1] = np.column_stack([np.full(n_tasks, 0.5), mu1 + 3.0, 2.0 * s1])
    groups = np.repeat(np.arange(n_tasks), 2)
    return X.reshape(-1, 3), groups


@validate_params(
    {
        "n_tasks": [Interval(Integral, 1, None, closed="left")],
        "n_samples": [Interval(Integral, 1, None, closed="left")],
        "noise": [StrOptions({"heteroskedastic", "homoskedastic", "none"})],
        "x_range": [tuple],
        "amplitude_range": [tuple],
        "phase_range": [tuple],
        "random_state": ["random_state"],
    },
    prefer_skip_nested_validation=True,
)
def make_sinusoid_tasks(
    n_tasks=10,
    n_samples=100,
    *,
    noise="heteroskedastic",
    x_range=(-4.0, 4.0),
    amplitude_range=(5.0, 10.0),
    phase_range=(0.0, 1.0),
    random_state=None,
):
    """Draw sinusoid regression tasks with input-dependent noise (Sec. 4.2 of Zhang et al. 2021).

    Task ``i`` has amplitude ``A ~ U[amplitude_range]`` and phase
    ``b ~ U[phase_range]``; its rows are ``x ~ U[x_range]`` and

    - ``noise="heteroskedastic"``: ``y = A sin(x + b) + (A/2) |cos((x + b)/2)| eps``
      (the paper's family, generalising Depeweg et al. 2017, Fig. 5);
    - ``noise="homoskedastic"``: ``y = A sin(x + b) + (A/(2 sqrt 2)) eps``, the same
      average noise variance with a constant scale;
    - ``noise="none"``: ``y = A sin(x + b)``,

    with ``eps ~ N(0, 1)``.

    Parameters
    ----------
    n_tasks : int, default=10
        Number of tasks.
    n_samples : int, default=100
        Rows per task.
    noise : {"heteroskedastic", "homoskedastic", "none"}, default="heteroskedastic"
        Noise model.
    x_range : tuple of float, default=(-4.0, 4.0)
        Input interval (Depeweg et al. use [-4, 4]; the paper does not say).
    amplitude_range : tuple of float, default=(5.0, 10.0)
        Interval of A.
    phase_range : tuple of float, default=(0.0, 1.0)
        Interval of b.
    random_state : int, RandomState instance or None, default=None
        Seed; None draws fresh OS entropy (numpy's global RNG is left
        untouched, as everywhere in skmetavi).

    Returns
    -------
    X : ndarray of shape (n_tasks * n_samples, 1)
        Inputs.
    y : ndarray of shape (n_tasks * n_samples,)
        Targets.
    groups : ndarray of shape (n_tasks * n_samples,)
        Task index of each row.

    See Also
    --------
    skmetavi.MetaBNNRegressor : Meta-learns a divergence over these tasks.
    skmetavi.model_selection.support_query_split : Splits each task's rows.

    Examples
    --------
    >>> from skmetavi.datasets import make_sinusoid_tasks
    >>> X, y, groups = make_sinusoid_tasks(3, 5, random_state=0)
    >>> X.shape, y.shape, groups.tolist()[:6]
    ((15, 1), (15,), [0, 0, 0, 0, 0, 1])
    """
    for name, rng_ in (("x_range", x_range), ("amplitude_range", amplitude_range),
                       ("phase_range", phase_range)):
        if (
            len(rng_) != 2
            or not all(isinstance(v, Real) and math.isfinite(v) for v in rng_)
            or not rng_[0] <= rng_[1]
        ):
            raise ValueError(
                f"{name} must be a tuple (low, high) of finite numbers with low <= high, got "
                f"{rng_!r}; e.g. {name}={_DEFAULT_RANGES[name]!r}."
            )
    rng = _check_random_state(random_state)
    A = rng.uniform(*amplitude_range, size=(n_tasks, 1))
    b = rng.uniform(*phase_range, size=(n_tasks, 1))
    x = rng.uniform(*x_range, size=(n_tasks, n_samples))
    eps = rng.standard_normal(size=(n_tasks, n_samples))
    y = A * np.sin(x + b)
    if noise == "heteroskedastic":
        y = y + 0.5 * A * np.abs(np.cos(0.5 * (x + b))) * eps
    elif noise == "homoskedastic":
        y = y + 0.5 * A / np.sqrt(2.0) * eps
    groups = np.repeat(np.arange(n_tasks), n_samples)
    return x.reshape(-1, 1), y.reshape(-1), groups


# ----------------------------------------------------------------------------- images
# Rows binarised per chunk.  It bounds the temporaries (intp indices, float64 uniforms)
# to a few MB whatever the number of images; RandomState fills its draws in order, so
# the stochastic result does not depend on the chunk size.
_CHUNK_ROWS = 4096

_BINARIZE_CONSTRAINT = [StrOptions({"threshold", "stochastic"}), Options(bool, {False})]


def _check_digits(digits):
    """``digits`` as a 1-D integer array of labels in 0..9, or None for all ten."""
    if digits is None:
        return None
    values = np.asarray(digits)
    if (
        values.ndim != 1
        or values.size == 0
        or values.dtype.kind not in "iu"
        or values.min() < 0
        or values.max() > 9
    ):
        raise ValueError(
            f"digits must be a non-empty sequence of digit labels (ints in 0..9), got "
            f"{digits!r}; e.g. digits=(0, 1, 2, 3, 4), or digits=None for all ten."
        )
    return values


def _intensity_table(max_level, binarize, threshold, dtype):
    """What each integer pixel level 0..max_level becomes: a lookup table.

    The intensity is ``level / max_level`` in float64.  ``"threshold"`` maps it to
    ``intensity >= threshold``; ``False`` to the intensity itself; ``"stochastic"``
    keeps the float64 Bernoulli means, compared with float64 uniforms.
    """
    intensity = np.arange(max_level + 1) / max_level
    if binarize == "threshold":
        return (intensity >= threshold).astype(dtype)
    if binarize == "stochastic":
        return intensity
    return intensity.astype(dtype)


def _binarize_into(out, levels, rows, table, rng):
    """Write ``table``-mapped rows ``levels[rows]`` (all rows if None) into ``out``.

    With ``rng``, ``out = U < table[levels]`` for ``U ~ U[0, 1)`` drawn row after row,
    i.e. one Bernoulli(intensity) draw per pixel.
    """
    n_rows = len(levels) if rows is None else len(rows)
    for start in range(0, n_rows, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n_rows)
        chunk = levels[start:stop] if rows is None else levels[rows[start:stop]]
        if rng is None:
            np.take(table, chunk, out=out[start:stop])
        else:
            np.less(rng.random_sample(chunk.shape), table[chunk], out=out[start:stop])


@validate_params(
    {
        "binarize": _BINARIZE_CONSTRAINT,
        "threshold": [Interval(Real, 0, 1, closed="both")],
        "random_state": ["random_state"],
        "digits": ["array-like", None],
        "return_X_y": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def load_digits_tasks(
    *, binarize="threshold", threshold=0.5, random_state=None, digits=None, return_X_y=True
):
    """Load scikit-learn's 8x8 digits as binary images grouped by digit class.

    The 1797 images of :func:`sklearn.datasets.load_digits` (bundled with
    scikit-learn, no download) have integer pixels ``0..16``.  Each pixel's
    intensity ``pixel / 16`` in [0, 1] is binarised:

    - ``binarize="threshold"`` (default): ``x = 1`` if ``pixel / 16 >= threshold``,
      else 0.  With the default ``threshold=0.5`` a pixel is ink when
      ``pixel >= 8``; deterministic, so every call gives the same tasks;
    - ``binarize="stochastic"``: ``x ~ Bernoulli(pixel / 16)``, one draw per pixel
      from ``random_state`` (the small-scale analogue of dynamically binarised
      MNIST, see :func:`fetch_mnist_tasks`);
    - ``binarize=False``: ``x = pixel / 16`` (grey levels, no binarisation).

    The digit label of each image is its task: ``groups``.

    Parameters
    ----------
    binarize : {"threshold", "stochastic"} or False, default="threshold"
        How pixel intensities become the values of ``X`` (see above).
    threshold : float in [0, 1], default=0.5
        Intensity from which a pixel is 1 when ``binarize="threshold"``; ignored
        otherwise.
    random_state : int, RandomState instance or None, default=None
        Seed of the Bernoulli draws when ``binarize="stochastic"``; ignored
        otherwise.  An int gives the same draw on every call; None draws fresh OS
        entropy (numpy's global RNG is left untouched, as everywhere in skmetavi).
    digits : array-like of int or None, default=None
        Digit classes (0 to 9) to keep, e.g. ``(0, 1, 2, 3, 4)``; None keeps all
        ten.  The kept rows stay in their original order.
    return_X_y : bool, default=True
        Return ``(X, groups)``, like the other skmetavi task generators; False
        returns a :class:`~sklearn.utils.Bunch`, like
        :func:`sklearn.datasets.load_digits`.

    Returns
    -------
    X : ndarray of shape (n_samples, 64), dtype float64
        One flattened 8x8 image per row, row-major, with values in {0, 1} (or in
        [0, 1] when ``binarize=False``).  Returned when ``return_X_y=True``.
    groups : ndarray of shape (n_samples,), dtype int64
        Digit label (0 to 9) of each row.  Returned when ``return_X_y=True``.
    data : :class:`~sklearn.utils.Bunch`
        Returned when ``return_X_y=False``, with the attributes ``data`` (``X``),
        ``groups``, ``target`` (the same labels), ``images`` (``X`` viewed with
        shape (n_samples, 8, 8)), ``feature_names``, ``target_names`` and
        ``DESCR`` (scikit-learn's description of the images).

    See Also
    --------
    fetch_mnist_tasks : The 28x28 MNIST digits, binarised the same way.
    sklearn.datasets.load_digits : The images before binarisation.

    Examples
    --------
    >>> from skmetavi.datasets import load_digits_tasks
    >>> X, groups = load_digits_tasks()
    >>> X.shape, sorted(set(X.ravel().tolist())), sorted(set(groups.tolist()))
    ((1797, 64), [0.0, 1.0], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    >>> X, groups = load_digits_tasks(binarize="stochastic", random_state=0, digits=(0, 1))
    >>> X.shape, sorted(set(groups.tolist()))
    ((360, 64), [0, 1])
    """
    wanted = _check_digits(digits)
    raw = load_digits()
    groups = raw.target.astype(np.int64)
    levels = raw.data.astype(np.uint8)  # integer pixels 0..16
    if wanted is not None:
        keep = np.isin(groups, wanted)
        groups, levels = groups[keep], levels[keep]
    rng = _check_random_state(random_state) if binarize == "stochastic" else None
    X = np.empty(levels.shape, dtype=np.float64)
    _binarize_into(X, levels, None, _intensity_table(16, binarize, threshold, X.dtype), rng)
    if return_X_y:
        return X, groups
    return Bunch(
        data=X,
        groups=groups,
        target=groups,
        images=X.reshape(-1, 8, 8),
        feature_names=list(raw.feature_names),
        target_names=np.arange(10),
        DESCR=raw.DESCR,
    )


# The two files of each subset, by their names in the original distribution less
# ".gz"; the uncompressed names are also accepted, with a hyphen or (as stored in the
# original gzip headers) a dot before "idx".
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_ALL_NAMES = ", ".join(f"{stem}.gz" for pair in _MNIST_FILES.values() for stem in pair)
_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_MNIST_SHAPE = (28, 28)


def _mnist_names(stem):
    return (f"{stem}.gz", stem, stem.replace("-idx", ".idx"))


def _mnist_candidate_dirs(data_home):
    if data_home is None:
        return [Path(get_data_home()) / "mnist"]
    home = Path(os.fspath(data_home)).expanduser()
    return [home, home / "mnist"]


def _locate_mnist(data_home, stems):
    """Path of each of ``stems`` in the first candidate folder holding them all."""
    candidates = _mnist_candidate_dirs(data_home)
    found_in = []
    for folder in candidates:
        found = {}
        for stem in stems:
            for name in _mnist_names(stem):
                if (folder / name).is_file():
                    found[stem] = folder / name
                    break
        if len(found) == len(stems):
            return found
        found_in.append(found)
    # Report the folder that holds most of them (the first one on ties).
    best = max(range(len(candidates)), key=lambda i: (len(found_in[i]), -i))
    missing = [f"{stem}.gz" for stem in stems if stem not in found_in[best]]
    searched = " and ".join(str(folder) for folder in candidates)
    raise FileNotFoundError(
        f"MNIST file(s) missing from {candidates[best]}: {', '.join(missing)} (or the same "
        f"name(s) without '.gz', uncompressed). Searched {searched}. skmetavi never "
        f"downloads data: get the original MNIST files ({_MNIST_ALL_NAMES}) from "
        f"http://yann.lecun.com/exdb/mnist/ or a mirror such as "
        f"https://ossci-datasets.s3.amazonaws.com/mnist/, put them in "
        f"{candidates[best]}, or pass data_home=<the folder that holds them>."
    )


def _read_idx_bytes(path):
    """The bytes of an IDX file, gunzipped when they start with the gzip magic."""
    with open(path, "rb") as f:
        compressed = f.read(2) == b"\x1f\x8b"
    if not compressed:
        return path.read_bytes()
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(
            f"{path}: truncated or corrupt gzip data ({exc}); re-download the file."
        ) from exc


def _parse_idx(data, path, *, images):
    """Validate an IDX file's header and return its bytes as a uint8 array, without a copy."""
    kind, magic, ndim = (
        ("image", _IDX_IMAGES_MAGIC, 3) if images else ("label", _IDX_LABELS_MAGIC, 1)
    )
    header = 4 * (1 + ndim)  # big-endian int32 magic, then one int32 per dimension
    if len(data) < header:
        raise ValueError(
            f"{path}: truncated: {len(data)} bytes, shorter than the {header}-byte header "
            f"of an IDX {kind} file; re-download the file."
        )
    head = [int(v) for v in np.frombuffer(data, dtype=">u4", count=1 + ndim)]
    if head[0] != magic:
        other = _IDX_LABELS_MAGIC if images else _IDX_IMAGES_MAGIC
        hint = (
            f" It is an IDX {'label' if images else 'image'} file: were the image and "
            f"label files swapped?"
            if head[0] == other
            else " Is it an MNIST file, and was it decompressed correctly?"
        )
        raise ValueError(
            f"{path}: wrong magic number {head[0]} (0x{head[0]:08x}), expected {magic} "
            f"(0x{magic:08x}) for an IDX {kind} file.{hint}"
        )
    shape = tuple(head[1:])
    if images and shape[1:] != _MNIST_SHAPE:
        raise ValueError(
            f"{path}: holds {shape[1]}x{shape[2]} images, expected the 28x28 images of MNIST."
        )
    expected = header + math.prod(shape)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise ValueError(
            f"{path}: {what}: the header announces {shape[0]} {kind}(s), i.e. {expected} "
            f"bytes, but the (uncompressed) file holds {len(data)} bytes; re-download it."
        )
    values = np.frombuffer(data, dtype=np.uint8, offset=header)
    if not images and values.size and values.max() > 9:
        raise ValueError(f"{path}: holds label {values.max()}, expected digit labels 0..9.")
    return values.reshape(shape[0], -1) if images else values


@validate_params(
    {
        "data_home": [str, os.PathLike, None],
        "subset": [StrOptions({"train", "test", "all"})],
        "binarize": _BINARIZE_CONSTRAINT,
        "threshold": [Interval(Real, 0, 1, closed="both")],
        "random_state": ["random_state"],
        "digits": ["array-like", None],
    },
    prefer_skip_nested_validation=True,
)
def fetch_mnist_tasks(
    data_home=None,
    *,
    subset="train",
    binarize="threshold",
    threshold=0.5,
    random_state=None,
    digits=None,
):
    """Load MNIST from local files as binary images grouped by digit class.

    Reads the four files of the original distribution (LeCun et al. 1998),
    ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``,
    gzip-compressed or not (then named without ``.gz``), from ``data_home``.
    Nothing is downloaded.  Each pixel's intensity ``pixel / 255`` in [0, 1] is
    binarised:

    - ``binarize="threshold"`` (default): ``x = 1`` if ``pixel / 255 >= threshold``,
      else 0.  With the default ``threshold=0.5`` a pixel is ink when
      ``pixel >= 128``; deterministic, so every call gives the same data;
    - ``binarize="stochastic"``: ``x ~ Bernoulli(pixel / 255)``, one draw per pixel
      from ``random_state``.  The dynamically binarised MNIST of Burda et al.
      (2016) redraws this at every epoch: call again with another seed, or load
      ``binarize=False`` once and draw from it;
    - ``binarize=False``: ``x = pixel / 255`` (grey levels, no binarisation).

    The digit label of each image is its task: ``groups``.

    Parameters
    ----------
    data_home : str, path-like or None, default=None
        Folder holding the files, or a folder with an ``mnist/`` subfolder holding
        them (such as a scikit-learn data home).  None reads
        ``sklearn.datasets.get_data_home() / "mnist"`` (``~/scikit_learn_data/mnist``
        unless the ``SCIKIT_LEARN_DATA`` environment variable says otherwise).
    subset : {"train", "test", "all"}, default="train"
        The 60000 training images, the 10000 test images, or both (training
        images first).  Only the files of the requested subset are read.
    binarize : {"threshold", "stochastic"} or False, default="threshold"
        How pixel intensities become the values of ``X`` (see above).
    threshold : float in [0, 1], default=0.5
        Intensity from which a pixel is 1 when ``binarize="threshold"``; ignored
        otherwise.
    random_state : int, RandomState instance or None, default=None
        Seed of the Bernoulli draws when ``binarize="stochastic"``; ignored
        otherwise.  An int gives the same draw on every call; None draws fresh OS
        entropy (numpy's global RNG is left untouched, as everywhere in skmetavi).
    digits : array-like of int or None, default=None
        Digit classes (0 to 9) to keep, e.g. ``(0, 1, 2, 3, 4)`` to meta-train on
        five classes and test on the others; None keeps all ten.  The kept rows
        stay in their original order, and the stochastic draws cover only them.

    Returns
    -------
    X : ndarray of shape (n_samples, 784), dtype float32
        One flattened 28x28 image per row, row-major, with values in {0, 1} (or in
        [0, 1] when ``binarize=False``).  float32 halves the memory of the full
        training set (60000 x 784: 188 MB instead of 376 MB).
    groups : ndarray of shape (n_samples,), dtype int64
        Digit label (0 to 9) of each row.

    Raises
    ------
    FileNotFoundError
        If a file of the requested subset is missing; the message lists the
        missing names, the folders searched, and where to get the files.
    ValueError
        If a file is not a valid IDX file of MNIST: wrong magic number, truncated
        or corrupt, or images and labels of different counts.

    See Also
    --------
    load_digits_tasks : The 8x8 digits bundled with scikit-learn, binarised the same way.
    sklearn.datasets.get_data_home : The default data folder.

    Notes
    -----
    The IDX format starts with a big-endian 32-bit magic number, 2051 for images
    and 2049 for labels, then one 32-bit size per dimension (count, rows,
    columns), then one unsigned byte per pixel or label.  The parse is a view of
    the decompressed bytes (:func:`numpy.frombuffer`); binarisation writes
    straight into ``X``, in chunks of rows, so the peak memory is about the raw
    bytes (47 MB for the training images) plus ``X``.

    References
    ----------
    Y. LeCun, L. Bottou, Y. Bengio and P. Haffner, "Gradient-based learning
    applied to document recognition", Proc. IEEE 86(11):2278-2324, 1998.

    Y. Burda, R. Grosse and R. Salakhutdinov, "Importance Weighted
    Autoencoders", ICLR 2016.

    Examples
    --------
    >>> from skmetavi.datasets import fetch_mnist_tasks
    >>> X, groups = fetch_mnist_tasks("path/to/mnist", digits=(0, 1))  # doctest: +SKIP
    >>> X.shape, X.dtype, sorted(set(groups.tolist()))  # doctest: +SKIP
    ((12665, 784), dtype('float32'), [0, 1])
    """
    wanted = _check_digits(digits)
    subsets = ("train", "test") if subset == "all" else (subset,)
    paths = _locate_mnist(data_home, [stem for name in subsets for stem in _MNIST_FILES[name]])
    parts = []  # (images, kept rows or None, labels of the kept rows) per subset
    for name in subsets:
        images_stem, labels_stem = _MNIST_FILES[name]
        labels = _parse_idx(_read_idx_bytes(paths[labels_stem]), paths[labels_stem], images=False)
        images = _parse_idx(_read_idx_bytes(paths[images_stem]), paths[images_stem], images=True)
        if len(images) != len(labels):
            raise ValueError(
                f"{paths[images_stem]} holds {len(images)} images but {paths[labels_stem]} "
                f"holds {len(labels)} labels; the two files of the {name!r} subset must have "
                f"one label per image (re-download them)."
            )
        rows = None if wanted is None else np.flatnonzero(np.isin(labels, wanted))
        parts.append((images, rows, labels if rows is None else labels[rows]))
    X = np.empty((sum(len(part[2]) for part in parts), math.prod(_MNIST_SHAPE)), np.float32)
    table = _intensity_table(255, binarize, threshold, X.dtype)
    rng = _check_random_state(random_state) if binarize == "stochastic" else None
    start = 0
    for images, rows, labels in parts:
        _binarize_into(X[start : start + len(labels)], images, rows, table, rng)
        start += len(labels)
    groups = np.concatenate([labels for _, _, labels in parts]).astype(np.int64)
    return X, groups
