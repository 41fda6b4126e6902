"""MovieLens ratings read from local files: one row of ratings per user, grouped by age."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import os
from numbers import Real
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from sklearn.datasets import get_data_home
from sklearn.utils import Bunch
from sklearn.utils._param_validation import Interval, StrOptions, validate_params

from skmetavi._ratings import split_ratings

__all__ = ["fetch_movielens_tasks"]

# ml-1m's age codes: the lower bound of each age band, "1" standing for "under 18".
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)
_AGE_BANDS = "1 (<18), 18 (18-24), 25 (25-34), 35 (35-44), 45 (45-49), 50 (50-55), 56 (56+)"

_RATING_RANGE = (1, 5)
# An id or timestamp of at most 18 digits fits in int64 whatever its digits.
_MAX_DIGITS = 18
_DIGITS = b"0123456789"
# Separators that a file of the wrong format (or a converted copy) may use instead.
_OTHER_SEPARATORS = (b"\t", b"::", b"|", b",", b";", b":", b" ")
_SHOWN_CHARS = 80  # the offending line, as quoted in error messages

_VARIANTS = {
    "ml-100k": {
        "ratings": "u.data",
        "users": "u.user",
        "ratings_sep": b"\t",
        "users_sep": b"|",
        "ratings_format": (
            "'user id \\t item id \\t rating \\t timestamp', 4 tab-separated non-negative "
            "integers with the rating in 1..5"
        ),
        "users_format": (
            "'user id|age|gender|occupation|zip code', 5 '|'-separated fields with the user "
            "id and the age (in years) non-negative integers"
        ),
        "age_field": 1,
        "age_in_years": True,
        "url": "https://grouplens.org/datasets/movielens/100k/ (ml-100k.zip)",
        "title": "MovieLens 100K (ml-100k)",
    },
    "ml-1m": {
        "ratings": "ratings.dat",
        "users": "users.dat",
        "ratings_sep": b"::",
        "users_sep": b"::",
        "ratings_format": (
            "'UserID::MovieID::Rating::Timestamp', 4 '::'-separated non-negative integers "
            "with the Rating in 1..5"
        ),
        "users_format": (
            "'UserID::Gender::Age::Occupation::Zip-code', 5 '::'-separated fields with a "
            "non-negative integer UserID and the Age one of the codes 1, 18, 25, 35, 45, 50, 56"
        ),
        "age_field": 2,
        "age_in_years": False,
        "url": "https://grouplens.org/datasets/movielens/1m/ (ml-1m.zip)",
        "title": "MovieLens 1M (ml-1m)",
    },
}
_N_RATING_FIELDS = 4
_N_USER_FIELDS = 5  # the user id first, the age at the variant's "age_field"

_DESCR = """\
{title}
{underline}

{n_ratings} ratings (integers 1 to 5) by {n_users} users of {n_items} movies,
collected by GroupLens Research (University of Minnesota) on the MovieLens web
site, read from the local files
    {ratings}
    {users}

Each row of ``ratings`` is a user, users sorted by id; each column is a movie
rated at least once, sorted by id (``user_ids``, ``item_ids``); the stored
entries are the observed ratings.  ``data`` and ``heldout`` partition each
user's ratings: ``heldout_fraction`` of them held out, at least one and all but
one, for the users with two or more ratings.

``groups`` is each user's age group, with ml-1m's codes (``age_groups``):
    {age_bands}.
{age_note}
Terms of use (the data's README, in brief): research use only; no endorsement by
the University of Minnesota or GroupLens may be stated or implied; the data may
not be redistributed without separate permission; commercial use needs prior
permission; no warranty.  Publications must cite F. Maxwell Harper and Joseph
A. Konstan, "The MovieLens Datasets: History and Context", ACM Transactions on
Interactive Intelligent Systems 5(4), Article 19, 2015, doi:10.1145/2827872.
"""
_AGE_NOTES = {
    "ml-100k": "ml-100k gives the ages in years; they are binned into these bands.\n",
    "ml-1m": "",
}


# ----------------------------------------------------------------------------- files
def _candidate_dirs(data_home, variant):
    if data_home is None:
        home = Path(get_data_home()) / "movielens"
        return [home, home / variant]
    home = Path(os.fspath(data_home)).expanduser()
    return [home, home / variant, home / "movielens" / variant, home / "movielens"]


def _locate_movielens(data_home, variant):
    """Paths of the ratings and users files, from the first candidate folder holding both."""
    spec = _VARIANTS[variant]
    names = (spec["ratings"], spec["users"])
    candidates = _candidate_dirs(data_home, variant)
    found_in = []
    for folder in candidates:
        found = [name for name in names if (folder / name).is_file()]
        if len(found) == len(names):
            return tuple(folder / name for name in names)
        found_in.append(found)
    best = max(range(len(candidates)), key=lambda i: (len(found_in[i]), -i))
    missing = [name for name in names if name not in found_in[best]]
    searched = ", ".join(str(folder) for folder in candidates)
    raise FileNotFoundError(
        f"MovieLens {variant} file(s) missing from {candidates[best]}: {', '.join(missing)} "
        f"(the loader needs both {names[0]} and {names[1]}). Searched {searched}. skmetavi "
        f"never downloads data, and the MovieLens licence forbids redistributing it, so it "
        f"cannot be fetched here: get it from {spec['url']} on a machine with internet "
        f"access, unzip it, and pass data_home=<the folder that holds {names[0]} and "
        f"{names[1]}>."
    )


def _content_lines(raw):
    """``raw`` less its trailing blank lines, with Windows line endings made Unix ones."""
    if b"\r" in raw:
        raw = raw.replace(b"\r\n", b"\n")
    stripped = raw.rstrip(b" \t\r\n")
    if not stripped:
        return b""
    end = raw.find(b"\n", len(stripped))
    return raw if end < 0 else raw[:end]


# ----------------------------------------------------------------------------- errors
def _shown(line):
    text = line.decode("latin-1")
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _line_error(path, lineno, line, problem, expected):
    return ValueError(
        f"{path}, line {lineno}: {problem}. The line reads {_shown(line)!r}; expected "
        f"{expected}. Is this an unaltered copy of the MovieLens file?"
    )


def _split_fields(line, sep, n_fields):
    """The fields of ``line``, or the reason why it does not have ``n_fields`` of them."""
    fields = line.split(sep)
    if len(fields) == n_fields:
        return fields, None
    if len(fields) == 1:
        for other in _OTHER_SEPARATORS:
            if other != sep and len(line.split(other)) == n_fields:
                return None, (
                    f"wrong separator: the fields are separated by "
                    f"{other.decode('latin-1')!r} instead of {sep.decode('latin-1')!r}"
                )
    hint = " (truncated line?)" if len(fields) < n_fields else ""
    return None, f"wrong number of fields: {len(fields)} instead of {n_fields}{hint}"


def _check_integer(field, name):
    """The reason why ``field`` is not a non-negative integer in decimal digits, or None."""
    if field.isdigit() and len(field) <= _MAX_DIGITS:
        return None
    if not field:
        return f"{name} is empty"
    if field.isdigit():
        return f"{name} {_shown(field)!r} has more than {_MAX_DIGITS} digits"
    return f"{name} {_shown(field)!r} is not a non-negative integer"


_RATING_FIELD_NAMES = ("user id", "item id", "rating", "timestamp")


def _first_bad_rating_line(path, lines, sep, expected):
    """The error of the first line of ``lines`` that is not 4 integers separated by ``sep``."""
    for lineno, line in enumerate(lines, start=1):
        fields, problem = _split_fields(line, sep, _N_RATING_FIELDS)
        if problem is None:
            for field, name in zip(fields, _RATING_FIELD_NAMES):
                problem = _check_integer(field, name)
                if problem is not None:
                    break
        if problem is not None:
            return _line_error(path, lineno, line, problem, expected)
    # Unreachable: the fast path only fails on a line that one of the checks above rejects.
    return ValueError(f"{path}: could not be parsed; expected lines {expected}.")


# ----------------------------------------------------------------------------- parsers
def _fast_parse_ratings(body, sep, n_lines):
    """The ``(n_lines, 4)`` int64 values of a well-formed ratings ``body``, else None.

    Well-formed: only digits, separators and newlines; exactly 4 non-empty fields of
    at most 18 digits per line.  numpy then parses the whole text in one call.
    """
    # The ml-1m separator "::" becomes a tab; a colon left over was a bad separator.
    if body.translate(None, _DIGITS + b"\n" + (b"\t" if sep == b"\t" else b":")):
        return None
    text = body if sep == b"\t" else body.replace(sep, b"\t")
    if b":" in text:
        return None
    buf = np.frombuffer(text, dtype=np.uint8)
    newline = buf == ord("\n")
    boundaries = np.flatnonzero(newline | (buf == ord("\t")))
    if len(boundaries) != _N_RATING_FIELDS * n_lines - 1:
        return None
    # A separator right after another one, or at either end, leaves an empty field.
    lengths = np.diff(boundaries, prepend=-1, append=len(buf)) - 1
    if lengths.min() == 0 or lengths.max() > _MAX_DIGITS:
        return None
    # 3 tabs then a newline, line after line: every 4th boundary is a newline.
    if not np.array_equal(
        np.flatnonzero(newline[boundaries]),
        np.arange(_N_RATING_FIELDS - 1, len(boundaries), _N_RATING_FIELDS),
    ):
        return None
    values = np.fromstring(text, dtype=np.int64, sep=" ")  # " ": any whitespace
    if len(values) != _N_RATING_FIELDS * n_lines:
        return None
    return values.reshape(n_lines, _N_RATING_FIELDS)


def _parse_ratings(path, spec):
    """User ids, item ids and ratings (int64, in file order) and the lines of a ratings file.

    The fast path reads the whole file at once (:func:`_fast_parse_ratings`); only
    when it fails are the lines read one by one, to report the first bad one.
    """
    sep, expected = spec["ratings_sep"], spec["ratings_format"]
    body = _content_lines(path.read_bytes())
    if not body:
        raise ValueError(
            f"{path} holds no ratings (the file is empty); expected one rating per line, "
            f"{expected}."
        )
    values = _fast_parse_ratings(body, sep, body.count(b"\n") + 1)
    if values is None:
        raise _first_bad_rating_line(path, body.split(b"\n"), sep, expected)
    user, item, rating = values[:, 0], values[:, 1], values[:, 2]
    low, high = _RATING_RANGE
    bad = np.flatnonzero((rating < low) | (rating > high))
    if len(bad):
        first = int(bad[0])
        raise _line_error(
            path, first + 1, body.split(b"\n")[first],
            f"rating {rating[first]} outside {low}..{high}", expected,
        )
    return user, item, rating, body


def _parse_users(path, spec):
    """User ids and ml-1m age codes (int64, in file order) of a users file."""
    body = _content_lines(path.read_bytes())
    expected = spec["users_format"]
    if not body:
        raise ValueError(
            f"{path} holds no users (the file is empty); expected one user per line, "
            f"{expected}."
        )
    lines = body.split(b"\n")
    ids = np.empty(len(lines), dtype=np.int64)
    ages = np.empty(len(lines), dtype=np.int64)
    age_field = spec["age_field"]
    first_line = {}  # user id -> line number
    for i, line in enumerate(lines):
        fields, problem = _split_fields(line, spec["users_sep"], _N_USER_FIELDS)
        if problem is None:
            problem = _check_integer(fields[0], "user id") or _check_integer(
                fields[age_field], "age"
            )
        if problem is None:
            user, age = int(fields[0]), int(fields[age_field])
            if not spec["age_in_years"] and age not in AGE_GROUPS:
                problem = f"age code {age} is not one of ml-1m's codes {_AGE_BANDS}"
            elif user in first_line:
                problem = f"user {user} is already listed on line {first_line[user]}"
        if problem is not None:
            raise _line_error(path, i + 1, line, problem, expected)
        first_line[user] = i + 1
        ids[i], ages[i] = user, age
    if spec["age_in_years"]:
        # The band of each age: the number of lower bounds 18, 25, ..., 56 it reaches.
        ages = np.asarray(AGE_GROUPS)[np.searchsorted(AGE_GROUPS[1:], ages, side="right")]
    return ids, ages


def _ratings_matrix(ratings_path, users_path, spec):
    """The CSR ratings (users x rated items), user ids, item ids and age codes."""
    user, item, rating, body = _parse_ratings(ratings_path, spec)
    file_ids, file_ages = _parse_users(users_path, spec)
    expected = spec["ratings_format"]

    by_id = np.argsort(file_ids)
    known_ids = file_ids[by_id]
    pos = np.minimum(np.searchsorted(known_ids, user), len(known_ids) - 1)
    unknown = np.flatnonzero(known_ids[pos] != user)
    if len(unknown):
        first = int(unknown[0])
        raise _line_error(
            ratings_path, first + 1, body.split(b"\n")[first],
            f"user {user[first]} is rated but missing from the users file {users_path}",
            expected,
        )
    rated = np.zeros(len(known_ids), dtype=bool)
    rated[pos] = True
    user_ids, groups = known_ids[rated], file_ages[by_id][rated]
    row = np.cumsum(rated)[pos] - 1  # among the users with a rating
    item_ids, col = np.unique(item, return_inverse=True)

    # Sort by (row, column); the stable sort keeps repeats of a pair in line order.
    key = row * len(item_ids) + col
    order = np.argsort(key, kind="stable")
    repeats = np.flatnonzero(key[order][1:] == key[order][:-1])
    if len(repeats):
        k = np.argmin(order[repeats + 1])
        first, previous = int(order[repeats[k] + 1]), int(order[repeats[k]])
        raise _line_error(
            ratings_path, first + 1, body.split(b"\n")[first],
            f"duplicate rating: user {user[first]} already rated item {item[first]} on line "
            f"{previous + 1}",
            expected,
        )
    indptr = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(np.bincount(row, minlength=len(user_ids)), out=indptr[1:])
    ratings = sp.csr_matrix(
        (rating[order].astype(np.float64), col[order], indptr),
        shape=(len(user_ids), len(item_ids)),
    )
    return ratings, user_ids, item_ids, groups


# ----------------------------------------------------------------------------- loader
@validate_params(
    {
        "data_home": [str, os.PathLike, None],
        "variant": [StrOptions(set(_VARIANTS))],
        "heldout_fraction": [Interval(Real, 0, 1, closed="left"), None],
        "random_state": ["random_state"],
        "return_X_y": ["boolean"],
    },
    prefer_skip_nested_validation=True,
)
def fetch_movielens_tasks(
    data_home=None, *, variant="ml-100k", heldout_fraction=0.1, random_state=0, return_X_y=False
):
    """Load MovieLens ratings from local files: one row per user, users grouped by age.

    Reads the ratings and users files of a MovieLens data set of GroupLens
    Research (Harper and Konstan 2015) from ``data_home``; nothing is
    downloaded.  Each user is a row of a sparse users x movies matrix whose
    stored entries are that user's ratings (integers 1 to 5); the user's age
    group is the task label, ``groups``.  Each user's ratings are split into an
    observed part (``data``) and a held-out part (``heldout``), e.g. to fit on
    the one and score the predictions of the other.

    - ``variant="ml-100k"``: ``u.data`` (``user id \\t item id \\t rating \\t
      timestamp``) and ``u.user`` (``user id|age|gender|occupation|zip code``), with
      the ages in years binned into ml-1m's age groups (see ``groups``);
    - ``variant="ml-1m"``: ``ratings.dat`` (``UserID::MovieID::Rating::Timestamp``)
      and ``users.dat`` (``UserID::Gender::Age::Occupation::Zip-code``, latin-1),
      with the age already one of the group codes.

    Parameters
    ----------
    data_home : str, path-like or None, default=None
        Folder holding the two files, or a folder above it: the files are looked
        for in ``data_home``, ``data_home/<variant>``,
        ``data_home/movielens/<variant>`` and ``data_home/movielens``, in this
        order.  None looks in ``sklearn.datasets.get_data_home() / "movielens"``
        and its ``<variant>`` subfolder (``~/scikit_learn_data/movielens`` unless
        the ``SCIKIT_LEARN_DATA`` environment variable says otherwise).
    variant : {"ml-100k", "ml-1m"}, default="ml-100k"
        MovieLens 100K (943 users, 1682 movies, 100000 ratings) or MovieLens 1M
        (6040 users, 3706 movies, 1000209 ratings).
    heldout_fraction : float in [0, 1) or None, default=0.1
        Fraction of each user's ratings held out: ``round(heldout_fraction * n)``
        of a user's ``n >= 2`` ratings, at least one and at most ``n - 1`` (see
        :func:`split_ratings`).  0 or None holds out none: ``heldout`` is empty.
    random_state : int, RandomState instance or None, default=0
        Seed of the split.  The default gives the same split on every call; None
        draws fresh OS entropy (numpy's global RNG is left untouched, as
        everywhere in skmetavi).
    return_X_y : bool, default=False
        Return ``(data, heldout, groups)`` instead of a
        :class:`~sklearn.utils.Bunch`.

    Returns
    -------
    bunch : :class:`~sklearn.utils.Bunch`
        Returned when ``return_X_y=False``, with the attributes:

        - ``data``: scipy.sparse.csr_matrix of float64, shape (n_users, n_items),
          the observed ratings;
        - ``heldout``: scipy.sparse.csr_matrix of the same shape, the held-out
          ratings, disjoint from ``data``;
        - ``ratings``: scipy.sparse.csr_matrix, all ratings, ``data + heldout``;
        - ``groups``: ndarray of int64, shape (n_users,), each user's age group
          code: 1 (under 18), 18 (18-24), 25 (25-34), 35 (35-44), 45 (45-49),
          50 (50-55) or 56 (56 and over);
        - ``user_ids``: ndarray of int64, shape (n_users,), the user id of each
          row, increasing: the users of the users file that have a rating;
        - ``item_ids``: ndarray of int64, shape (n_items,), the movie id of each
          column, increasing: the movies rated at least once;
        - ``age_groups``: ndarray of int64, the seven codes ``[1, 18, 25, 35, 45,
          50, 56]``;
        - ``variant``: str, the variant read;
        - ``DESCR``: str, a description of the data, its terms of use and its
          citation.
    (data, heldout, groups) : tuple
        Returned when ``return_X_y=True``: the attributes of the same names.

    Raises
    ------
    FileNotFoundError
        If a file is missing; the message lists the folders searched, the files
        needed and where to get them.
    ValueError
        If a file is malformed: wrong separator, wrong number of fields, a field
        that is not an integer, a rating outside 1..5, an unknown age code, a
        repeated (user, movie) pair or user, a rated user missing from the users
        file, or an empty file.  The message names the file and the line.

    See Also
    --------
    split_ratings : The per-user split of ``data`` and ``heldout``.
    fetch_mnist_tasks : Another loader of local files grouped into tasks.

    Notes
    -----
    The ratings file is parsed at once: its bytes are checked to hold only
    digits, separators and newlines, with four non-empty fields per line, and
    :func:`numpy.fromstring` converts them (about a second for the million
    lines of ml-1m).  Only when a check fails is the file read line by line,
    to name the first bad line.  Blank lines at the end of a file, and Windows
    line endings, are accepted.

    The terms of use of MovieLens forbid redistributing the files without
    separate permission from GroupLens, and ask publications to cite the
    reference below.

    References
    ----------
    F. M. Harper and J. A. Konstan, "The MovieLens Datasets: History and
    Context", ACM Transactions on Interactive Intelligent Systems 5(4),
    Article 19, 2015, doi:10.1145/2827872.

    Examples
    --------
    >>> from skmetavi.datasets import fetch_movielens_tasks
    >>> movielens = fetch_movielens_tasks("path/to/ml-100k")  # doctest: +SKIP
    >>> movielens.data.shape, movielens.data.nnz + movielens.heldout.nnz  # doctest: +SKIP
    ((943, 1682), 100000)
    >>> sorted(set(movielens.groups.tolist()))  # doctest: +SKIP
    [1, 18, 25, 35, 45, 50, 56]
    """
    spec = _VARIANTS[variant]
    ratings_path, users_path = _locate_movielens(data_home, variant)
    ratings, user_ids, item_ids, groups = _ratings_matrix(ratings_path, users_path, spec)
    if heldout_fraction is None or heldout_fraction == 0:
        data, heldout = ratings.copy(), sp.csr_matrix(ratings.shape, dtype=np.float64)
    else:
        data, heldout = split_ratings(ratings, heldout_fraction, random_state)
    if return_X_y:
        return data, heldout, groups
    descr = _DESCR.format(
        title=spec["title"],
        underline="=" * len(spec["title"]),
        n_ratings=ratings.nnz,
        n_users=ratings.shape[0],
        n_items=ratings.shape[1],
        ratings=ratings_path,
        users=users_path,
        age_bands=_AGE_BANDS,
        age_note=_AGE_NOTES[variant],
    )
    return Bunch(
        data=data,
        heldout=heldout,
        ratings=ratings,
        groups=groups,
        user_ids=user_ids,
        item_ids=item_ids,
        age_groups=np.array(AGE_GROUPS, dtype=np.int64),
        variant=variant,
        DESCR=descr,
    )
