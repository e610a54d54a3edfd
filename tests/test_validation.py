"""Half-sets and blank images (issue 13, items 3 and 5): hetrefine.validation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hetrefine.backend import to_device, to_host
from hetrefine.errors import InputError
from hetrefine.validation import constant_images, constant_images_error, half_sets


def _table(subset=None, n=100):
    t = pd.DataFrame({"hr_stack": ["/d/s.mrcs"] * n, "hr_index": np.arange(n)})
    if subset is not None:
        t["rlnRandomSubset"] = subset
    return t


def test_half_sets_use_a_balanced_random_subset():
    sub = np.tile([1, 2, 2, 1, 2], 20)  # 40 / 60
    half, warning = half_sets(_table(sub), seed=3)
    assert warning is None and half.dtype == np.int8
    np.testing.assert_array_equal(half, sub - 1)


def test_half_sets_without_the_column_are_a_seeded_even_split():
    half, warning = half_sets(_table(n=101), seed=3)
    assert warning is None
    assert sorted(np.bincount(half)) == [50, 51]
    np.testing.assert_array_equal(half, half_sets(_table(n=101), seed=3)[0])
    assert (half != half_sets(_table(n=101), seed=4)[0]).any()


@pytest.mark.parametrize(
    "subset,why",
    [
        (np.ones(100, int), "puts 100 particles in half 1 and 0 in half 2"),
        (np.r_[np.full(90, 2), np.full(10, 1)], "puts 10 particles in half 1 and 90 in half 2"),
        (np.r_[np.full(50, 1), np.full(49, 2), 3], "_rlnRandomSubset is 3 at row 100"),
    ],
)
def test_one_sided_or_invalid_random_subset_is_split_again_with_a_warning(subset, why):
    """Every particle in half 1 (a STAR selected from one half) used to leave half B
    empty: maps ~0, resolution = box, exit 0."""
    half, warning = half_sets(_table(subset), seed=7)
    assert why in warning and "split again into two random half-sets (seed 7)" in warning
    assert sorted(np.bincount(half, minlength=2)) == [50, 50]
    np.testing.assert_array_equal(half, half_sets(_table(), seed=7)[0])


def test_half_sets_need_two_particles():
    with pytest.raises(InputError, match="two half-sets need at least 2"):
        half_sets(_table(n=1), seed=0)


def test_constant_images_found(xp):
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((6, 8, 8)).astype(np.float32)
    imgs[1] = 0.0
    imgs[4] = 3.5
    imgs[5, 2, 2] = np.nan
    imgs[3, 0, 0] += 1e-3  # nearly flat is not flat: kept
    imgs[3] = 1.0
    imgs[3, 0, 0] += 1e-3
    bad = to_host(constant_images(to_device(imgs, xp)))
    np.testing.assert_array_equal(bad, [False, True, False, False, True, True])


def test_constant_images_error_names_rows_stack_and_count():
    t = _table(n=10)
    err = constant_images_error("p.star", t, np.array([1, 4, 6, 8]))
    msg = str(err)
    assert msg.startswith("p.star (row 2): 4 of 10 particle images are constant")
    assert (
        "row 2 (image 2 of s.mrcs), row 5 (image 5 of s.mrcs), row 7 (image 7 of s.mrcs), ..."
        in msg
    )
