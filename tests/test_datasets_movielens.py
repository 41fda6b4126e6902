"""MovieLens loader: the real ml-100k when present, and both parsers on files written here."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import re
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from skmetavi.datasets import fetch_movielens_tasks

# The real files live outside the repository (never copy them into it).
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ML100K_DIR = SHARED_DATA / "movielens" / "ml-100k"
AGE_GROUPS = [1, 18, 25, 35, 45, 50, 56]
# Users and ratings per age group of ml-100k (shared/data/README.md, section 2).
ML100K_USERS = [36, 198, 310, 194, 80, 73, 52]
ML100K_RATINGS = [2491, 24060, 35444, 19591, 6890, 6534, 4990]

needs_ml100k = pytest.mark.skipif(
    not (ML100K_DIR / "u.data").is_file() or not (ML100K_DIR / "u.user").is_file(),
    reason=f"the ml-100k files are not in {ML100K_DIR}",
)


def _expected_heldout(n, fraction=0.1):
    return 0 if n < 2 else min(n - 1, max(1, round(fraction * n)))


def _check_split(bunch, fraction=0.1):
    """data and heldout partition ratings, each user holding out the documented count."""
    data, heldout, ratings = bunch.data, bunch.heldout, bunch.ratings
    for X in (data, heldout, ratings):
        assert sp.issparse(X) and X.format == "csr" and X.dtype == np.float64
        assert X.shape == ratings.shape
    assert data.multiply(heldout).nnz == 0  # disjoint
    assert data.nnz + heldout.nnz == ratings.nnz
    assert abs(data + heldout - ratings).sum() == 0
    n = ratings.getnnz(axis=1)
    expected = [_expected_heldout(k, fraction) for k in n]
    np.testing.assert_array_equal(heldout.getnnz(axis=1), expected)


# ------------------------------------------------------------------------ real ml-100k
@pytest.fixture(scope="module")
def ml100k():
    if not (ML100K_DIR / "u.data").is_file() or not (ML100K_DIR / "u.user").is_file():
        pytest.skip(f"the ml-100k files are not in {ML100K_DIR}")
    return fetch_movielens_tasks(SHARED_DATA)


@needs_ml100k
def test_ml100k_shape_and_counts(ml100k):
    assert ml100k.variant == "ml-100k"
    assert ml100k.ratings.shape == (943, 1682)
    assert ml100k.data.nnz + ml100k.heldout.nnz == 100000 == ml100k.ratings.nnz
    np.testing.assert_array_equal(ml100k.user_ids, np.arange(1, 944))
    np.testing.assert_array_equal(ml100k.item_ids, np.arange(1, 1683))
    np.testing.assert_array_equal(ml100k.age_groups, AGE_GROUPS)
    assert ml100k.groups.shape == (943,) and ml100k.groups.dtype.kind == "i"
    assert set(np.unique(ml100k.ratings.data)) == {1.0, 2.0, 3.0, 4.0, 5.0}
    # the rating counts 1..5 of shared/data/README.md
    np.testing.assert_array_equal(
        np.bincount(ml100k.ratings.data.astype(int))[1:], [6110, 11370, 27145, 34174, 21201]
    )
    for code, n_users, n_ratings in zip(AGE_GROUPS, ML100K_USERS, ML100K_RATINGS):
        rows = ml100k.groups == code
        assert rows.sum() == n_users, code
        assert ml100k.ratings[rows].nnz == n_ratings, code
    assert "Harper" in ml100k.DESCR and "redistribut" in ml100k.DESCR


@needs_ml100k
def test_ml100k_matches_the_file(ml100k):
    raw = np.loadtxt(ML100K_DIR / "u.data", dtype=np.int64)
    dense = ml100k.ratings.toarray()
    np.testing.assert_array_equal(dense[raw[:, 0] - 1, raw[:, 1] - 1], raw[:, 2])
    ages = {
        int(line.split("|")[0]): int(line.split("|")[1])
        for line in (ML100K_DIR / "u.user").read_text(encoding="latin-1").splitlines()
    }
    bounds = [18, 25, 35, 45, 50, 56]
    expected = [AGE_GROUPS[sum(ages[u] >= b for b in bounds)] for u in ml100k.user_ids]
    np.testing.assert_array_equal(ml100k.groups, expected)


@needs_ml100k
def test_ml100k_split(ml100k):
    _check_split(ml100k)
    again = fetch_movielens_tasks(SHARED_DATA, random_state=0)
    assert (again.heldout != ml100k.heldout).nnz == 0
    assert (again.data != ml100k.data).nnz == 0
    other = fetch_movielens_tasks(SHARED_DATA, random_state=1)
    _check_split(other)
    assert (other.heldout != ml100k.heldout).nnz > 0
    data, heldout, groups = fetch_movielens_tasks(SHARED_DATA, return_X_y=True)
    assert (data != ml100k.data).nnz == 0 and (heldout != ml100k.heldout).nnz == 0
    np.testing.assert_array_equal(groups, ml100k.groups)


@needs_ml100k
@pytest.mark.parametrize(
    "home", [SHARED_DATA, SHARED_DATA / "movielens", ML100K_DIR], ids=["data", "movielens", "ml"]
)
def test_ml100k_data_home_levels(home, ml100k):
    bunch = fetch_movielens_tasks(str(home), heldout_fraction=None)
    assert (bunch.ratings != ml100k.ratings).nnz == 0
    assert bunch.heldout.nnz == 0 and bunch.heldout.shape == bunch.ratings.shape
    assert (bunch.data != bunch.ratings).nnz == 0


# ------------------------------------------------------------------------ written files
ML1M_USERS = [
    "1::F::1::10::48067",
    "2::M::56::16::70072",
    "3::M::25::15::55117",
    "5::M::25::20::55455",
    "6::F::50::9::55117",  # no ratings: not a row
    "7::M::35::1::06810",
]
ML1M_RATINGS = [
    "1::1193::5::978300760",
    "1::661::3::978302109",
    "7::914::3::978301968",
    "2::1193::4::978298413",
    "1::914::3::978301968",
    "3::661::1::978297039",
    "2::3408::2::978298412",
    "5::3408::5::978298000",
    "5::661::4::978298001",
]
ML100K_USERS_LINES = ["1|24|M|technician|85711", "2|53|F|other|94043", "3|17|M|writer|32067",
                      "4|56|M|technician|43537", "5|33|F|other|15213", "6|45|M|executive|98101"]
ML100K_RATINGS_LINES = ["1\t10\t3\t881250949", "2\t10\t5\t891717742", "3\t20\t1\t878887116",
                        "1\t30\t2\t880606923", "4\t20\t4\t886397596", "2\t30\t3\t884182806",
                        "6\t40\t5\t881171488", "3\t40\t4\t891628467"]


def _write(folder, name, lines, *, encoding="latin-1", end="\n"):
    folder.mkdir(parents=True, exist_ok=True)
    text = end.join(lines) + (end if lines else "")
    (folder / name).write_bytes(text.encode(encoding))
    return folder / name


def _ml1m(folder, ratings=ML1M_RATINGS, users=ML1M_USERS):
    _write(folder, "ratings.dat", ratings)
    _write(folder, "users.dat", users)
    return folder


def _ml100k(folder, ratings=ML100K_RATINGS_LINES, users=ML100K_USERS_LINES):
    _write(folder, "u.data", ratings)
    _write(folder, "u.user", users)
    return folder


def test_ml1m_parser(tmp_path):
    users = [*ML1M_USERS, "8::F::18::4::H3Z\xe92B"]  # a latin-1 byte in the zip code
    _write(tmp_path, "users.dat", users)
    _write(tmp_path, "ratings.dat", [*ML1M_RATINGS, "8::42::1::978300000"])
    assert "\xe9".encode("latin-1") in (tmp_path / "users.dat").read_bytes()
    bunch = fetch_movielens_tasks(tmp_path, variant="ml-1m", heldout_fraction=None)
    assert bunch.variant == "ml-1m"
    np.testing.assert_array_equal(bunch.user_ids, [1, 2, 3, 5, 7, 8])
    np.testing.assert_array_equal(bunch.item_ids, [42, 661, 914, 1193, 3408])
    np.testing.assert_array_equal(bunch.groups, [1, 56, 25, 25, 35, 18])
    nan = np.nan
    expected = [
        [nan, 3, 3, 5, nan],
        [nan, nan, nan, 4, 2],
        [nan, 1, nan, nan, nan],
        [nan, 4, nan, nan, 5],
        [nan, nan, 3, nan, nan],
        [1, nan, nan, nan, nan],
    ]
    dense = np.where(bunch.ratings.toarray() == 0, nan, bunch.ratings.toarray())
    np.testing.assert_array_equal(dense, expected)
    assert bunch.ratings.has_sorted_indices
    assert "MovieLens 1M" in bunch.DESCR


def test_ml1m_split_and_return_X_y(tmp_path):
    _ml1m(tmp_path)
    bunch = fetch_movielens_tasks(tmp_path, variant="ml-1m", heldout_fraction=0.5)
    _check_split(bunch, 0.5)
    data, heldout, groups = fetch_movielens_tasks(
        tmp_path, variant="ml-1m", heldout_fraction=0.5, return_X_y=True
    )
    assert (data != bunch.data).nnz == 0 and (heldout != bunch.heldout).nnz == 0
    np.testing.assert_array_equal(groups, bunch.groups)
    empty = fetch_movielens_tasks(tmp_path, variant="ml-1m", heldout_fraction=0)
    assert empty.heldout.nnz == 0 and empty.heldout.format == "csr"
    assert empty.heldout.shape == empty.ratings.shape


def test_ml1m_line_order_does_not_matter(tmp_path):
    a = fetch_movielens_tasks(_ml1m(tmp_path / "a"), variant="ml-1m")
    b = fetch_movielens_tasks(
        _ml1m(tmp_path / "b", ML1M_RATINGS[::-1], ML1M_USERS[::-1]), variant="ml-1m"
    )
    for name in ("data", "heldout", "ratings"):
        assert (a[name] != b[name]).nnz == 0
    np.testing.assert_array_equal(a.groups, b.groups)


def test_ml100k_parser(tmp_path):
    bunch = fetch_movielens_tasks(_ml100k(tmp_path / "ml-100k"), heldout_fraction=None)
    np.testing.assert_array_equal(bunch.user_ids, [1, 2, 3, 4, 6])  # user 5 has no rating
    np.testing.assert_array_equal(bunch.item_ids, [10, 20, 30, 40])
    # ages 24, 53, 17, 56, 45 fall into the bands 18, 50, 1, 56, 45
    np.testing.assert_array_equal(bunch.groups, [18, 50, 1, 56, 45])
    np.testing.assert_array_equal(
        bunch.ratings.toarray(),
        [[3, 0, 2, 0], [5, 0, 3, 0], [0, 1, 0, 4], [0, 4, 0, 0], [0, 0, 0, 5]],
    )
    assert "binned" in bunch.DESCR


@pytest.mark.parametrize(
    "age, code",
    [(0, 1), (17, 1), (18, 18), (24, 18), (25, 25), (34, 25), (35, 35), (44, 35), (45, 45),
     (49, 45), (50, 50), (55, 50), (56, 56), (73, 56)],
)
def test_ml100k_age_bins(tmp_path, age, code):
    _ml100k(tmp_path, ["1\t1\t4\t0"], [f"1|{age}|M|other|00000"])
    assert fetch_movielens_tasks(tmp_path, heldout_fraction=None).groups.tolist() == [code]


def test_windows_line_endings_and_trailing_blank_lines(tmp_path):
    reference = fetch_movielens_tasks(_ml1m(tmp_path / "ref"), variant="ml-1m")
    folder = tmp_path / "crlf"
    _write(folder, "ratings.dat", [*ML1M_RATINGS, "", "  "], end="\r\n")
    _write(folder, "users.dat", [*ML1M_USERS, ""], end="\r\n")
    bunch = fetch_movielens_tasks(folder, variant="ml-1m")
    assert (bunch.ratings != reference.ratings).nnz == 0
    assert (bunch.heldout != reference.heldout).nnz == 0
    # no final newline at all
    (folder / "ratings.dat").write_text("\n".join(ML1M_RATINGS), encoding="latin-1")
    assert (fetch_movielens_tasks(folder, variant="ml-1m").ratings != reference.ratings).nnz == 0


# ------------------------------------------------------------------------ malformed files
def _assert_line_error(excinfo, path, lineno, *fragments):
    message = str(excinfo.value)
    assert f"{path}, line {lineno}:" in message, message
    assert "expected" in message, message
    for fragment in fragments:
        assert fragment in message, message


ML1M_BAD_RATINGS = {
    "separator_tab": ("1\t914\t3\t978301968", "wrong separator", "'\\t'"),
    "separator_colon": ("1:914:3:978301968", "wrong separator", "':'"),
    "truncated": ("1::914::3", "wrong number of fields: 3 instead of 4", "truncated"),
    "too_many": ("1::914::3::978301968::7", "wrong number of fields: 5 instead of 4"),
    "blank_line": ("", "wrong number of fields: 1 instead of 4"),
    "non_integer": ("1::914::3.5::978301968", "rating '3.5' is not a non-negative integer"),
    "negative": ("1::-914::3::978301968", "item id '-914' is not a non-negative integer"),
    "letters": ("x1::914::3::978301968", "user id 'x1'"),
    "spaces": ("1:: 914::3::978301968", "item id ' 914'"),
    "empty_field": ("1::::3::978301968", "item id is empty"),
    "empty_last": ("1::914::3::", "timestamp is empty"),
    "triple_colon": ("1:::914::3::978301968", "item id ':914'"),
    "huge": ("1::9" + "9" * 20 + "::3::978301968", "more than 18 digits"),
    "rating_0": ("1::914::0::978301968", "rating 0 outside 1..5"),
    "rating_6": ("1::914::6::978301968", "rating 6 outside 1..5"),
    "duplicate": ("1::661::4::978302109", "duplicate rating: user 1 already rated item 661 "
                  "on line 2"),
    "unknown_user": ("4::661::4::978302109", "user 4 is rated but missing from the users file"),
}


@pytest.mark.parametrize("case", list(ML1M_BAD_RATINGS))
def test_ml1m_malformed_ratings(tmp_path, case):
    bad, *fragments = ML1M_BAD_RATINGS[case]
    ratings = [*ML1M_RATINGS[:6], bad, *ML1M_RATINGS[6:]]
    _ml1m(tmp_path, ratings)
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    _assert_line_error(excinfo, tmp_path / "ratings.dat", 7, *fragments, repr(bad))
    assert "UserID::MovieID::Rating::Timestamp" in str(excinfo.value)


def test_the_first_bad_line_is_reported(tmp_path):
    ratings = [*ML1M_RATINGS[:3], "1::2::x::0", *ML1M_RATINGS[3:], "1::2"]
    _ml1m(tmp_path, ratings)
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    _assert_line_error(excinfo, tmp_path / "ratings.dat", 4, "rating 'x'")
    # a repeat of a repeat: the earliest repeated line, and its previous occurrence
    ratings = [*ML1M_RATINGS, "3::661::2::0", "3::661::3::0"]
    _ml1m(tmp_path, ratings)
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    _assert_line_error(excinfo, tmp_path / "ratings.dat", 10, "already rated item 661 on line 6")


def test_long_bad_line_is_truncated(tmp_path):
    bad = "1::914::3::978301968" + "x" * 500
    _ml1m(tmp_path, [bad])
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    _assert_line_error(excinfo, tmp_path / "ratings.dat", 1, "...")
    assert "x" * 100 not in str(excinfo.value)


ML1M_BAD_USERS = {
    "separator": ("4|M|25|7|55413", "wrong separator", "'|'"),
    "truncated": ("4::M::25", "wrong number of fields: 3 instead of 5"),
    "non_integer_id": ("u4::M::25::7::55413", "user id 'u4' is not a non-negative integer"),
    "non_integer_age": ("4::M::2x::7::55413", "age '2x' is not a non-negative integer"),
    "age_code": ("4::M::30::7::55413", "age code 30 is not one of ml-1m's codes"),
    "duplicate": ("3::F::18::1::00000", "user 3 is already listed on line 3"),
}


@pytest.mark.parametrize("case", list(ML1M_BAD_USERS))
def test_ml1m_malformed_users(tmp_path, case):
    bad, *fragments = ML1M_BAD_USERS[case]
    _ml1m(tmp_path, users=[*ML1M_USERS[:4], bad, *ML1M_USERS[4:]])
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    _assert_line_error(excinfo, tmp_path / "users.dat", 5, *fragments, repr(bad))
    assert "UserID::Gender::Age::Occupation::Zip-code" in str(excinfo.value)


ML100K_BAD_RATINGS = {
    "separator": ("1::40::3::881250949", "wrong separator", "'::'"),
    "spaces": ("1 40 3 881250949", "wrong separator", "' '"),
    "truncated": ("1\t40\t3", "wrong number of fields: 3 instead of 4"),
    "trailing_tab": ("1\t40\t3\t881250949\t", "wrong number of fields: 5 instead of 4"),
    "non_integer": ("1\t40\tfive\t881250949", "rating 'five' is not a non-negative integer"),
    "colon": ("1\t4:0\t3\t881250949", "item id '4:0'"),
    "rating": ("1\t40\t9\t881250949", "rating 9 outside 1..5"),
    "duplicate": ("2\t10\t1\t881250949", "user 2 already rated item 10 on line 2"),
    "unknown_user": ("9\t10\t1\t881250949", "user 9 is rated but missing from the users file"),
}


@pytest.mark.parametrize("case", list(ML100K_BAD_RATINGS))
def test_ml100k_malformed_ratings(tmp_path, case):
    bad, *fragments = ML100K_BAD_RATINGS[case]
    _ml100k(tmp_path, [*ML100K_RATINGS_LINES[:2], bad, *ML100K_RATINGS_LINES[2:]])
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path)
    _assert_line_error(excinfo, tmp_path / "u.data", 3, *fragments, repr(bad))
    assert "user id \\t item id \\t rating \\t timestamp" in str(excinfo.value)


@pytest.mark.parametrize(
    "bad, fragment",
    [("7|forty|M|other|00000", "age 'forty'"), ("7|40|M|other", "wrong number of fields"),
     ("7\t40\tM\tother\t00000", "wrong separator")],
)
def test_ml100k_malformed_users(tmp_path, bad, fragment):
    _ml100k(tmp_path, users=[bad, *ML100K_USERS_LINES])
    with pytest.raises(ValueError) as excinfo:
        fetch_movielens_tasks(tmp_path)
    _assert_line_error(excinfo, tmp_path / "u.user", 1, fragment)


@pytest.mark.parametrize("which", ["ratings", "users"])
@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank"])
def test_empty_files(tmp_path, which, content):
    _ml1m(tmp_path)
    name = "ratings.dat" if which == "ratings" else "users.dat"
    (tmp_path / name).write_text(content, encoding="latin-1")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name} holds no {which}")):
        fetch_movielens_tasks(tmp_path, variant="ml-1m")


# ------------------------------------------------------------------------ files and options
def test_data_home_levels(tmp_path):
    reference = fetch_movielens_tasks(_ml1m(tmp_path / "flat"), variant="ml-1m")
    for home, folder in [
        (tmp_path / "a", tmp_path / "a" / "ml-1m"),
        (tmp_path / "b", tmp_path / "b" / "movielens" / "ml-1m"),
        (tmp_path / "c", tmp_path / "c" / "movielens"),
    ]:
        _ml1m(folder)
        bunch = fetch_movielens_tasks(str(home), variant="ml-1m")
        assert (bunch.ratings != reference.ratings).nnz == 0
        assert str(folder / "ratings.dat") in bunch.DESCR


def test_default_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path))
    _ml100k(tmp_path / "movielens" / "ml-100k")
    bunch = fetch_movielens_tasks(heldout_fraction=None)
    assert bunch.ratings.nnz == len(ML100K_RATINGS_LINES)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "movielens"))):
        fetch_movielens_tasks(variant="ml-1m")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    message = str(excinfo.value)
    for folder in (tmp_path, tmp_path / "ml-1m", tmp_path / "movielens" / "ml-1m"):
        assert str(folder) in message
    assert "ratings.dat" in message and "users.dat" in message
    assert "https://grouplens.org/datasets/movielens/1m/" in message
    assert "never downloads" in message
    # the folder holding one of the two files is the one reported
    _write(tmp_path / "ml-1m", "ratings.dat", ML1M_RATINGS)
    with pytest.raises(FileNotFoundError) as excinfo:
        fetch_movielens_tasks(tmp_path, variant="ml-1m")
    assert f"missing from {tmp_path / 'ml-1m'}: users.dat" in str(excinfo.value)
    # ml-100k's files are not ml-1m's
    _ml100k(tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="100k"):
        fetch_movielens_tasks(tmp_path / "ml-1m", variant="ml-100k")


@pytest.mark.parametrize(
    "kwargs",
    [{"variant": "ml-10m"}, {"heldout_fraction": 1.0}, {"heldout_fraction": -0.1},
     {"heldout_fraction": "0.1"}, {"return_X_y": "yes"}, {"data_home": 3}],
)
def test_invalid_parameters(tmp_path, kwargs):
    _ml1m(tmp_path)
    kwargs = {"data_home": tmp_path, **kwargs}
    with pytest.raises(ValueError, match="parameter of fetch_movielens_tasks"):
        fetch_movielens_tasks(**kwargs)
