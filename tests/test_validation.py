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


# ------------------------------------------- checks shared by the pre-flight and the run


def test_check_mask_fits_names_the_key_that_is_too_wide():
    from hetrefine.validation import check_mask_fits

    # box 24 px x 4 A = 96 A; default outer 1.2 x inner, capped at the box
    assert check_mask_fits(24, 4.0, 60.0, None, None) == (60.0, 72.0)
    assert check_mask_fits(24, 4.0, 90.0, None, None) == (90.0, 96.0)
    assert check_mask_fits(24, 4.0, 200.0, None, None, enabled=False) == (200.0, 96.0)
    for args, key in (
        ((200.0, None, None), "particle_diameter_A"),
        ((60.0, 100.0, None), "mask.inner_diameter_A"),
        ((60.0, 70.0, 97.0), "mask.outer_diameter_A"),
    ):
        with pytest.raises(InputError) as exc:
            check_mask_fits(24, 4.0, *args)
        assert str(exc.value).startswith(f"config ({key}): mask diameter "), str(exc.value)
        assert "use at most 96.0 A" in str(exc.value)


def test_particle_file_columns_reads_only_the_particle_loop_header(tmp_path):
    from hetrefine.io.cs import load_cs
    from hetrefine.io.star import read_star_blocks
    from hetrefine.validation import has_poses, particle_file_columns

    star = tmp_path / "p.star"
    star.write_text(
        "# version 30001\n\ndata_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnImagePixelSize #2\n"
        "1 1.0\n\ndata_particles\n\nloop_\n_rlnImageName #1\n_rlnAngleRot #2\n"
        "_rlnAngleTilt #3\n_rlnAnglePsi #4\n1@s.mrcs 10 20 30\n2@s.mrcs 1 2 3\n"
    )
    cols = particle_file_columns(star)
    assert cols == list(read_star_blocks(star)["particles"].columns)
    assert has_poses(cols)
    old = tmp_path / "old.star"  # RELION 3.0: one table, no angles
    old.write_text("data_\nloop_\n_rlnImageName\n_rlnDefocusU\n1@s.mrcs 1000\n")
    assert particle_file_columns(old) == ["rlnImageName", "rlnDefocusU"]
    assert not has_poses(particle_file_columns(old))
    dt = [("uid", "<u8"), ("blob/path", "S8"), ("alignments3D/pose", "<f4", (3,))]
    np.save(tmp_path / "p.npy", np.zeros(2, dtype=dt))
    (tmp_path / "p.npy").rename(tmp_path / "p.cs")
    assert particle_file_columns(tmp_path / "p.cs") == list(load_cs(tmp_path / "p.cs").dtype.names)
    assert has_poses(particle_file_columns(tmp_path / "p.cs"))
    assert not has_poses(["rlnAngleRot", "rlnAngleTilt"])


def test_check_input_poses_refuses_fixed_and_local_without_poses():
    from hetrefine.validation import check_input_poses

    for mode in ("fixed", "local"):
        check_input_poses(mode, True)
        with pytest.raises(InputError) as exc:
            check_input_poses(mode, False)
        assert str(exc.value).startswith(f"config (input_poses): input_poses: {mode} needs poses")
    check_input_poses("ignore", False)


def test_check_images_finds_a_nan_in_the_last_chunk_and_counts_constant_images(tmp_path):
    import mrcfile

    from hetrefine.validation import check_images

    rng = np.random.default_rng(0)
    stack = rng.standard_normal((10, 8, 8)).astype(np.float32)
    stack[3] = 0.0
    stack[8] = 2.0
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(stack)
    table = pd.DataFrame({"hr_stack": [str(tmp_path / "s.mrcs")] * 10, "hr_index": np.arange(10)})
    with pytest.raises(InputError) as exc:
        check_images("p.star", table, chunk_size=3)
    assert str(exc.value).startswith("p.star (row 4): 2 of 10 particle images are constant")
    stack[9, 7, 7] = np.inf  # the last image of the last chunk: found before the blank ones
    with mrcfile.new(tmp_path / "s.mrcs", overwrite=True) as m:
        m.set_data(stack)
    with pytest.raises(InputError) as exc:
        check_images("p.star", table, chunk_size=3)
    assert "s.mrcs (image 10 (1-based)): image contains NaN or Inf" in str(exc.value)


def test_check_images_fast_pass_agrees_with_the_reader_on_shuffled_rows_and_two_stacks(tmp_path):
    """The vectorised pass over the memory maps clears good stacks in any row order; a NaN or
    a constant image in either stack gives the reader's own message (as preprocess)."""
    import mrcfile

    from hetrefine.io.stacks import iter_image_chunks
    from hetrefine.validation import check_images

    rng = np.random.default_rng(1)
    stacks = [rng.standard_normal((7, 6, 6)).astype(np.float32) for _ in range(2)]
    paths = [str(tmp_path / f"s{i}.mrcs") for i in range(2)]
    order = rng.permutation(14)
    table = pd.DataFrame(
        {"hr_stack": [paths[i // 7] for i in order], "hr_index": [i % 7 for i in order]}
    )

    def write():
        for p, s in zip(paths, stacks, strict=True):
            with mrcfile.new(p, overwrite=True) as m:
                m.set_data(s)

    write()
    check_images("p.star", table, chunk_size=4)
    for i, img, value in ((1, 5, np.nan), (0, 2, None)):
        if value is None:
            stacks[i][img] = 1.0
        else:
            stacks[i][img, 1, 1] = value
        write()
        with pytest.raises(InputError) as fast:
            check_images("p.star", table, chunk_size=4)
        with pytest.raises(InputError) as reader:  # preprocess's path: the reader + constant check
            for pos, chunk in iter_image_chunks(table, 256):
                if constant_images(chunk).any():
                    rows = np.flatnonzero(constant_images(chunk))
                    raise constant_images_error("p.star", table, pos[rows])
        assert str(fast.value) == str(reader.value)
        stacks[i] = rng.standard_normal((7, 6, 6)).astype(np.float32)
