"""MRC stacks and maps: headers, pixel size, refusal of truncated/volume/odd-mode files."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from hetrefine.errors import InputError
from hetrefine.io.mrc import MrcError, read_volume, stack_info, write_mrc


def test_stack_header_box_count_and_pixel_size(tmp_path):
    imgs = np.random.default_rng(0).normal(size=(7, 20, 20)).astype(np.float32)
    write_mrc(tmp_path / "s.mrcs", imgs, 2.5)
    info = stack_info(tmp_path / "s.mrcs")
    assert (info.n_images, info.ny, info.nx, info.mode) == (7, 20, 20, 2)
    assert info.pixel_size == pytest.approx(2.5)
    with mrcfile.open(tmp_path / "s.mrcs") as m:
        assert m.header.ispg == 0  # flagged as an image stack for RELION
        np.testing.assert_array_equal(m.data, imgs)


def test_volume_pixel_size_round_trip(tmp_path):
    vol = np.random.default_rng(1).normal(size=(16, 16, 16)).astype(np.float32)
    write_mrc(tmp_path / "v.mrc", vol, 3.3)
    data, voxel = read_volume(tmp_path / "v.mrc")
    assert voxel == pytest.approx(3.3, abs=1e-5)
    np.testing.assert_array_equal(data, vol)


def test_truncated_stack_is_refused_with_image_number(tmp_path):
    write_mrc(tmp_path / "s.mrcs", np.zeros((10, 16, 16), np.float32), 1.0)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "t.mrcs").write_bytes(raw[: 1024 + 4 * 16 * 16 * 6 + 10])
    with pytest.raises(InputError, match="truncated") as exc:
        stack_info(tmp_path / "t.mrcs")
    assert "t.mrcs" in str(exc.value) and "image 7" in str(exc.value)


def test_cubic_volume_given_as_stack_is_refused(tmp_path):
    write_mrc(tmp_path / "v.mrc", np.zeros((12, 12, 12), np.float32), 1.0)
    with pytest.raises(InputError, match="3D volume"):
        stack_info(tmp_path / "v.mrc")
    # the same numbers flagged as an image stack are fine
    write_mrc(tmp_path / "v.mrcs", np.zeros((12, 12, 12), np.float32), 1.0)
    assert stack_info(tmp_path / "v.mrcs").n_images == 12


def test_complex_mode_is_refused(tmp_path):
    with mrcfile.new(tmp_path / "c.mrcs") as m:
        m.set_data(np.zeros((2, 8, 8), np.complex64))
    with pytest.raises(InputError, match="mode 4"):
        stack_info(tmp_path / "c.mrcs")


def test_not_an_mrc(tmp_path):
    (tmp_path / "x.mrcs").write_bytes(b"hello")
    with pytest.raises(InputError, match="x.mrcs"):
        stack_info(tmp_path / "x.mrcs")
    with pytest.raises(MrcError):
        read_volume(tmp_path / "x.mrcs")
