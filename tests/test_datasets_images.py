"""Image task data: the bundled 8x8 digits and MNIST read from local IDX files."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

from skmetavi import datasets
from skmetavi.datasets import fetch_mnist_tasks, load_digits_tasks

# The real files live outside the repository (never copy them into it).
MNIST_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"
MNIST_NAMES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Per-digit counts of the original files (shared/data/README.md).
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# ------------------------------------------------------------------------ digits
def test_load_digits_tasks_threshold_default():
    raw = load_digits()
    X, groups = load_digits_tasks()
    assert X.shape == (1797, 64) and X.dtype == np.float64
    assert groups.shape == (1797,) and groups.dtype == np.int64
    np.testing.assert_array_equal(groups, raw.target)
    # the documented default: a pixel is ink from intensity 8/16 on
    np.testing.assert_array_equal(X, (raw.data >= 8).astype(np.float64))
    assert set(np.unique(X)) == {0.0, 1.0}
    X_low, _ = load_digits_tasks(threshold=0.25)
    np.testing.assert_array_equal(X_low, raw.data >= 4)


def test_load_digits_tasks_grey_levels():
    X, _ = load_digits_tasks(binarize=False)
    np.testing.assert_array_equal(X, load_digits().data / 16)
    assert X.min() == 0.0 and X.max() == 1.0
    assert len(np.unique(X)) == 17


def test_load_digits_tasks_stochastic_is_seeded_bernoulli(monkeypatch):
    a, _ = load_digits_tasks(binarize="stochastic", random_state=0)
    b, _ = load_digits_tasks(binarize="stochastic", random_state=0)
    c, _ = load_digits_tasks(binarize="stochastic", random_state=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(np.unique(a)) == {0.0, 1.0}
    # an independent one-shot implementation: U < pixel / 16, U drawn row-major
    intensity = load_digits().data / 16
    expected = np.random.RandomState(0).random_sample(intensity.shape) < intensity
    np.testing.assert_array_equal(a, expected)
    # the chunking of the draws does not change them
    monkeypatch.setattr(datasets, "_CHUNK_ROWS", 7)
    np.testing.assert_array_equal(load_digits_tasks(binarize="stochastic", random_state=0)[0], a)
    # a RandomState instance is accepted; pixels 0 and 16 are never and always ink
    d, _ = load_digits_tasks(binarize="stochastic", random_state=np.random.RandomState(0))
    np.testing.assert_array_equal(d, a)
    assert (a[intensity == 0] == 0).all() and (a[intensity == 1] == 1).all()
    # the draws average the intensity (1797 * 64 pixels: tolerance ~ 6 standard errors)
    assert abs(a.mean() - intensity.mean()) < 0.006


def test_load_digits_tasks_stochastic_unseeded_leaves_global_rng():
    before = np.random.get_state()[1].copy()
    a, _ = load_digits_tasks(binarize="stochastic")
    b, _ = load_digits_tasks(binarize="stochastic")
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    assert not np.array_equal(a, b)


def test_load_digits_tasks_digits_filter_and_bunch():
    full, full_groups = load_digits_tasks()
    X, groups = load_digits_tasks(digits=(3, 1))
    keep = np.isin(full_groups, [1, 3])
    np.testing.assert_array_equal(X, full[keep])
    np.testing.assert_array_equal(groups, full_groups[keep])
    assert set(groups.tolist()) == {1, 3}
    bunch = load_digits_tasks(return_X_y=False, digits=np.array([0]))
    assert bunch.data.shape == (178, 64) and bunch.images.shape == (178, 8, 8)
    np.testing.assert_array_equal(bunch.images.reshape(178, 64), bunch.data)
    np.testing.assert_array_equal(bunch.groups, 0)
    np.testing.assert_array_equal(bunch.target, bunch.groups)
    assert len(bunch.feature_names) == 64 and "digits" in bunch.DESCR.lower()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"binarize": True}, r"'binarize' parameter .* among \{.*\} or a bool among \{False\}"),
        ({"binarize": "otsu"}, r"'binarize' parameter"),
        ({"threshold": 1.5}, r"'threshold' parameter .* in the range \[0\.0, 1\.0\]"),
        ({"digits": (0, 10)}, r"digits must be a non-empty sequence .* got \(0, 10\)"),
        ({"digits": []}, r"digits must be a non-empty sequence .* got \[\]"),
        ({"digits": (0.5,)}, r"digits must be a non-empty sequence"),
        ({"digits": 3}, r"'digits' parameter .* array-like or None"),
        ({"random_state": "zero"}, r"'random_state' parameter"),
    ],
    ids=["binarize-true", "binarize-unknown", "threshold", "digit-10", "no-digits",
         "float-digits", "scalar-digits", "random-state"],
)
def test_load_digits_tasks_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load_digits_tasks(**kwargs)


# ------------------------------------------------------- MNIST files written here
def _images_bytes(pixels, *, magic=2051, count=None, rows=28, cols=28):
    count = len(pixels) if count is None else count
    return struct.pack(">IIII", magic, count, rows, cols) + pixels.astype(np.uint8).tobytes()


def _labels_bytes(labels, *, magic=2049, count=None):
    count = len(labels) if count is None else count
    return struct.pack(">II", magic, count) + np.asarray(labels, dtype=np.uint8).tobytes()


def _write(folder, name, data, *, compress=True):
    folder.mkdir(parents=True, exist_ok=True)
    if compress:
        (folder / f"{name}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


# Small fake subsets: 7 training and 4 test images.  Pixel values sweep 0..255 so that
# both sides of every threshold occur.
FAKE_RNG = np.random.RandomState(0)
FAKE = {
    "train": (FAKE_RNG.randint(0, 256, size=(7, 28 * 28)), np.array([5, 0, 4, 1, 9, 2, 1])),
    "test": (FAKE_RNG.randint(0, 256, size=(4, 28 * 28)), np.array([7, 2, 1, 0])),
}
FAKE["train"][0][0, :256] = np.arange(256)


def _write_fake(folder, subsets=("train", "test"), *, compress=True, skip=()):
    for subset in subsets:
        (images_name, labels_name), (pixels, labels) = MNIST_NAMES[subset], FAKE[subset]
        if images_name not in skip:
            _write(folder, images_name[:-3], _images_bytes(pixels), compress=compress)
        if labels_name not in skip:
            _write(folder, labels_name[:-3], _labels_bytes(labels), compress=compress)
    return folder


def test_fetch_mnist_tasks_binarisation_on_fake_files(tmp_path):
    _write_fake(tmp_path)
    pixels, labels = FAKE["train"]
    X, groups = fetch_mnist_tasks(tmp_path)
    assert X.shape == (7, 784) and X.dtype == np.float32
    assert groups.dtype == np.int64
    np.testing.assert_array_equal(groups, labels)
    # default: intensity pixel / 255 >= 0.5, i.e. pixel >= 128
    np.testing.assert_array_equal(X, pixels >= 128)
    np.testing.assert_array_equal(X[0, 127:129], [0.0, 1.0])
    X_low, _ = fetch_mnist_tasks(tmp_path, threshold=0.2)
    np.testing.assert_array_equal(X_low, pixels / 255 >= 0.2)
    grey, _ = fetch_mnist_tasks(tmp_path, binarize=False)
    assert grey.dtype == np.float32
    np.testing.assert_allclose(grey, pixels / 255, rtol=1e-7)
    np.testing.assert_array_equal(grey[0, :256], (np.arange(256) / 255).astype(np.float32))


def test_fetch_mnist_tasks_stochastic_on_fake_files(tmp_path, monkeypatch):
    _write_fake(tmp_path)
    a, _ = fetch_mnist_tasks(tmp_path, subset="all", binarize="stochastic", random_state=3)
    b, _ = fetch_mnist_tasks(tmp_path, subset="all", binarize="stochastic", random_state=3)
    c, _ = fetch_mnist_tasks(tmp_path, subset="all", binarize="stochastic", random_state=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # one Bernoulli(pixel / 255) draw per pixel, train rows then test rows
    intensity = np.concatenate([FAKE["train"][0], FAKE["test"][0]]) / 255
    expected = np.random.RandomState(3).random_sample(intensity.shape) < intensity
    np.testing.assert_array_equal(a, expected)
    monkeypatch.setattr(datasets, "_CHUNK_ROWS", 2)
    d, _ = fetch_mnist_tasks(tmp_path, subset="all", binarize="stochastic", random_state=3)
    np.testing.assert_array_equal(d, a)


def test_fetch_mnist_tasks_subsets_and_digits(tmp_path):
    _write_fake(tmp_path)
    (train_px, train_y), (test_px, test_y) = FAKE["train"], FAKE["test"]
    X, groups = fetch_mnist_tasks(tmp_path, subset="test")
    np.testing.assert_array_equal(groups, test_y)
    np.testing.assert_array_equal(X, test_px >= 128)
    X, groups = fetch_mnist_tasks(tmp_path, subset="all")
    np.testing.assert_array_equal(groups, np.concatenate([train_y, test_y]))
    np.testing.assert_array_equal(X, np.concatenate([train_px, test_px]) >= 128)
    X, groups = fetch_mnist_tasks(tmp_path, subset="all", digits=[1, 2])
    np.testing.assert_array_equal(groups, [1, 2, 1, 2, 1])
    keep = np.isin(np.concatenate([train_y, test_y]), [1, 2])
    np.testing.assert_array_equal(X, np.concatenate([train_px, test_px])[keep] >= 128)
    X, groups = fetch_mnist_tasks(tmp_path, digits=(8,))  # no training image is an 8
    assert X.shape == (0, 784) and groups.shape == (0,)


def test_fetch_mnist_tasks_data_home_forms(tmp_path, monkeypatch):
    _write_fake(tmp_path / "mnist")
    expected, _ = fetch_mnist_tasks(tmp_path / "mnist")
    # a folder with an mnist/ subfolder, as str, Path, or the scikit-learn data home
    np.testing.assert_array_equal(fetch_mnist_tasks(tmp_path)[0], expected)
    np.testing.assert_array_equal(fetch_mnist_tasks(str(tmp_path))[0], expected)
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
    np.testing.assert_array_equal(fetch_mnist_tasks()[0], expected)


@pytest.mark.parametrize("dotted", [False, True], ids=["hyphen", "dot"])
def test_fetch_mnist_tasks_accepts_uncompressed_files(tmp_path, dotted):
    _write_fake(tmp_path, compress=False)
    if dotted:  # the names stored in the original gzip headers
        for path in tmp_path.iterdir():
            path.rename(path.with_name(path.name.replace("-idx", ".idx")))
    assert not list(tmp_path.glob("*.gz"))
    X, groups = fetch_mnist_tasks(tmp_path, subset="all")
    np.testing.assert_array_equal(groups, np.concatenate([FAKE["train"][1], FAKE["test"][1]]))
    np.testing.assert_array_equal(X, np.concatenate([FAKE["train"][0], FAKE["test"][0]]) >= 128)


# ------------------------------------------------------------------------- errors
def test_fetch_mnist_tasks_missing_files_are_listed(tmp_path):
    _write_fake(tmp_path, skip=("train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"))
    with pytest.raises(FileNotFoundError) as info:
        fetch_mnist_tasks(tmp_path, subset="all")
    message = str(info.value)
    missing = re.search(r"missing from (\S+): (.*?) \(or", message)
    assert missing and missing.group(1) == str(tmp_path)
    assert missing.group(2) == "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz"
    assert f"Searched {tmp_path} and {tmp_path / 'mnist'}" in message
    assert "yann.lecun.com/exdb/mnist" in message and "data_home=" in message
    # only the requested subset's files are needed
    with pytest.raises(FileNotFoundError, match=r": train-labels-idx1-ubyte\.gz \(or"):
        fetch_mnist_tasks(tmp_path, subset="train")
    with pytest.raises(FileNotFoundError, match=r": t10k-images-idx3-ubyte\.gz \(or"):
        fetch_mnist_tasks(tmp_path, subset="test")


def test_fetch_mnist_tasks_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        fetch_mnist_tasks(tmp_path / "nowhere", subset="test")
    message = str(info.value)
    assert f"missing from {tmp_path / 'nowhere'}: " in message
    assert "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or" in message
    assert "train-images-idx3-ubyte.gz, train-labels" in message  # the full list to get


def _corrupt(folder, name, data):
    """Replace file ``name`` (a .gz name) of the fake train subset with ``data``."""
    _write_fake(folder, ("train",))
    (folder / name).write_bytes(gzip.compress(data))
    return folder / name


TRAIN_PX, TRAIN_Y = FAKE["train"]


@pytest.mark.parametrize(
    "name, data, match",
    [
        ("train-images-idx3-ubyte.gz", _images_bytes(TRAIN_PX, magic=2049),
         (r"wrong magic number 2049 \(0x00000801\), expected 2051 \(0x00000803\) for an "
          r"IDX image file\. It is an IDX label file: were the image and label files swapped\?")),
        ("train-labels-idx1-ubyte.gz", _labels_bytes(TRAIN_Y, magic=1234),
         r"wrong magic number 1234 .* expected 2049 .* label file\. Is it an MNIST file"),
        ("train-images-idx3-ubyte.gz", _images_bytes(TRAIN_PX[:6], count=7),
         (r"truncated: the header announces 7 image\(s\), i\.e\. 5504 bytes, but the "
          r"\(uncompressed\) file holds 4720 bytes")),
        ("train-labels-idx1-ubyte.gz", _labels_bytes(TRAIN_Y)[:6],
         r"truncated: 6 bytes, shorter than the 8-byte header of an IDX label file"),
        ("train-labels-idx1-ubyte.gz", _labels_bytes(TRAIN_Y, count=6),
         r"longer than its header says: the header announces 6 label\(s\)"),
        ("train-images-idx3-ubyte.gz", _images_bytes(TRAIN_PX[:, :64], rows=8, cols=8),
         r"holds 8x8 images, expected the 28x28 images of MNIST"),
        ("train-labels-idx1-ubyte.gz", _labels_bytes([5, 0, 4, 1, 10, 2, 1]),
         r"holds label 10, expected digit labels 0\.\.9"),
    ],
    ids=["images-magic", "labels-magic", "truncated-images", "truncated-header",
         "trailing-bytes", "not-28x28", "label-10"],
)
def test_fetch_mnist_tasks_invalid_idx(tmp_path, name, data, match):
    path = _corrupt(tmp_path, name, data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": " + match):
        fetch_mnist_tasks(tmp_path)


def test_fetch_mnist_tasks_count_mismatch(tmp_path):
    _corrupt(tmp_path, "train-labels-idx1-ubyte.gz", _labels_bytes(TRAIN_Y[:6]))
    images, labels = (tmp_path / name for name in MNIST_NAMES["train"])
    with pytest.raises(ValueError, match=re.escape(
        f"{images} holds 7 images but {labels} holds 6 labels; the two files of the 'train' "
        "subset must have one label per image"
    )):
        fetch_mnist_tasks(tmp_path)


def test_fetch_mnist_tasks_truncated_gzip_stream(tmp_path):
    _write_fake(tmp_path, ("train",))
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r": truncated or corrupt gzip"):
        fetch_mnist_tasks(tmp_path)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"subset": "valid"}, r"'subset' parameter .* among \{.*'train'.*\}"),
        ({"binarize": "dynamic"}, r"'binarize' parameter"),
        ({"threshold": -0.1}, r"'threshold' parameter"),
        ({"digits": (-1,)}, r"digits must be a non-empty sequence"),
        ({"data_home": 3}, r"'data_home' parameter"),
    ],
    ids=["subset", "binarize", "threshold", "digits", "data-home"],
)
def test_fetch_mnist_tasks_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fetch_mnist_tasks(**{"data_home": tmp_path, **kwargs})


# --------------------------------------------------------------- the real files
@pytest.fixture(scope="module")
def mnist_dir():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"the MNIST files are not at {MNIST_DIR}")
    return MNIST_DIR


@pytest.fixture(scope="module")
def mnist_train(mnist_dir):
    return fetch_mnist_tasks(mnist_dir)


def test_real_mnist_train(mnist_dir, mnist_train):
    X, groups = mnist_train
    assert X.shape == (60000, 784) and X.dtype == np.float32
    assert groups.shape == (60000,) and groups[0] == 5
    assert groups[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    np.testing.assert_array_equal(np.bincount(groups, minlength=10), TRAIN_COUNTS)
    assert set(np.unique(X)) == {0.0, 1.0}
    # an independent parse: gzip, then the raw bytes after the 16-byte header
    with gzip.open(mnist_dir / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), dtype=np.uint8, offset=16).reshape(60000, 784)
    np.testing.assert_array_equal(X, raw >= 128)


def test_real_mnist_test_and_all(mnist_dir, mnist_train):
    X, groups = fetch_mnist_tasks(mnist_dir, subset="test")
    assert X.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(groups, minlength=10), TEST_COUNTS)
    # data_home may also be the folder above mnist/
    X_all, groups_all = fetch_mnist_tasks(mnist_dir.parent, subset="all")
    assert X_all.shape == (70000, 784) and set(groups_all.tolist()) == set(range(10))
    np.testing.assert_array_equal(X_all[:60000], mnist_train[0])
    np.testing.assert_array_equal(X_all[60000:], X)
    np.testing.assert_array_equal(groups_all, np.concatenate([mnist_train[1], groups]))


def test_real_mnist_digits_and_stochastic(mnist_dir, mnist_train):
    X, groups = fetch_mnist_tasks(mnist_dir, digits=(0, 1, 2, 3, 4))
    keep = mnist_train[1] <= 4
    assert X.shape == (int(keep.sum()), 784) == (sum(TRAIN_COUNTS[:5]), 784)
    np.testing.assert_array_equal(X, mnist_train[0][keep])
    np.testing.assert_array_equal(groups, mnist_train[1][keep])
    kwargs = {"subset": "test", "digits": (7,), "binarize": "stochastic"}
    a, _ = fetch_mnist_tasks(mnist_dir, random_state=0, **kwargs)
    b, _ = fetch_mnist_tasks(mnist_dir, random_state=0, **kwargs)
    c, _ = fetch_mnist_tasks(mnist_dir, random_state=1, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1028, 784) and set(np.unique(a)) == {0.0, 1.0}
    assert not np.array_equal(a, c)
    grey, _ = fetch_mnist_tasks(mnist_dir, subset="test", digits=(7,), binarize=False)
    assert grey.min() == 0.0 and grey.max() == 1.0
    # 1028 * 784 Bernoulli draws: their mean is the mean intensity (~ 8 standard errors)
    assert abs(a.mean() - grey.mean()) < 0.003
