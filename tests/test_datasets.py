"""Task generators."""

# Authors: The skmetavi developers
# SPDX-License-Identifier: BSD-3-Clause

import numpy as np
import pytest

from skmetavi.datasets import make_mog_tasks


def test_make_mog_tasks_follows_the_paper_distribution():
    X, groups = make_mog_tasks(500, random_state=0)
    assert X.shape == (1000, 3) and groups.shape == (1000,)
    first, second = X[0::2], X[1::2]
    np.testing.assert_array_equal(groups[0::2], groups[1::2])
    np.testing.assert_allclose(first[:, 0], 0.5)
    np.testing.assert_allclose(second[:, 0], 0.5)
    assert first[:, 1].min() >= 0 and first[:, 1].max() <= 3
    assert first[:, 2].min() >= 0.5 and first[:, 2].max() <= 1.0
    np.testing.assert_allclose(second[:, 1], first[:, 1] + 3)
    np.testing.assert_allclose(second[:, 2], 2 * first[:, 2])
    # uniform draws: the means are near the interval midpoints
    assert abs(first[:, 1].mean() - 1.5) < 0.1 and abs(first[:, 2].mean() - 0.75) < 0.02


def test_make_mog_tasks_reproducible_and_validated():
    a, _ = make_mog_tasks(3, random_state=1)
    b, _ = make_mog_tasks(3, random_state=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, make_mog_tasks(3, random_state=2)[0])
    with pytest.raises(ValueError, match="n_tasks"):
        make_mog_tasks(0)
