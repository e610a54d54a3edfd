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


# ---------------------------------------------------------------- issue 13, items 7 and 8


def _emdb_like_map(path, blob_A, voxel_xyz=(2.0, 1.5, 3.0), n_xyz=(43, 73, 25), axes=(3, 1, 2)):
    """A map stored as EMDB may: columns/rows/sections = axes (mapc, mapr, maps), voxels
    ``voxel_xyz`` Angstrom, ``n_xyz`` samples along X, Y, Z, one Gaussian blob at
    ``blob_A`` (x, y, z) Angstrom from the voxel n // 2 of every axis."""
    n = dict(zip((1, 2, 3), n_xyz, strict=True))
    v = dict(zip((1, 2, 3), voxel_xyz, strict=True))
    b = dict(zip((1, 2, 3), blob_A, strict=True))
    # stored array axes: (sections, rows, columns) = (maps, mapr, mapc)
    labels = (axes[2], axes[1], axes[0])
    grids = np.meshgrid(
        *[(np.arange(n[k]) - n[k] // 2) * v[k] - b[k] for k in labels], indexing="ij"
    )
    data = np.exp(-sum(g**2 for g in grids) / (2 * 4.0**2)).astype(np.float32)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.header.mapc, m.header.mapr, m.header.maps = axes
        m.header.mx, m.header.my, m.header.mz = n_xyz
        m.header.cella = tuple(float(a * b) for a, b in zip(n_xyz, voxel_xyz, strict=True))
    return data


def _centroid(vol):
    w = np.clip(vol - 0.2 * vol.max(), 0, None)
    idx = np.indices(vol.shape).reshape(3, -1)
    return (idx * w.ravel()).sum(1) / w.sum()


def test_emdb_style_map_axis_order_anisotropic_voxels_non_cubic(tmp_path, caplog):
    """25x43x73 with (mapc, mapr, maps) = (3, 1, 2) and voxels 2.0/1.5/3.0 A: read in
    (z, y, x) order, resampled to 1.5 A, padded to 73^3; the blob lands where it is."""
    data = _emdb_like_map(tmp_path / "emd.map", blob_A=(10.0, -12.0, 6.0))
    with mrcfile.open(tmp_path / "emd.map", permissive=True) as m:
        assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (25, 43, 73)
    assert data.shape == (73, 43, 25)
    with caplog.at_level("INFO", logger="hetrefine.io.mrc"):
        vol, voxel = read_volume(tmp_path / "emd.map")
    assert voxel == pytest.approx(1.5)
    assert vol.shape == (73, 73, 73) and vol.dtype == np.float32
    c = 73 // 2
    expect_zyx = np.array([c + 6.0 / 1.5, c - 12.0 / 1.5, c + 10.0 / 1.5])
    np.testing.assert_allclose(_centroid(vol), expect_zyx, atol=0.25)
    assert vol.max() == pytest.approx(1.0, abs=0.05)
    msg = caplog.text
    assert "(mapc, mapr, maps) = (3, 1, 2)" in msg
    assert "2 x 1.5 x 3 A (x, y, z) to 1.5 A isotropic, (25, 73, 43) -> (50, 73, 57)" in msg
    assert "to a 73^3 cube" in msg


@pytest.mark.parametrize("axes", [(1, 2, 3), (2, 1, 3), (3, 2, 1), (2, 3, 1)])
def test_axis_orders_put_the_blob_in_the_same_place(tmp_path, axes):
    _emdb_like_map(tmp_path / "m.mrc", (6.0, -4.5, 3.0), (1.5, 1.5, 1.5), (32, 32, 32), axes)
    vol, voxel = read_volume(tmp_path / "m.mrc")
    assert vol.shape == (32, 32, 32) and voxel == pytest.approx(1.5)
    np.testing.assert_allclose(_centroid(vol), [16 + 2, 16 - 3, 16 + 4], atol=0.05)


def test_unusable_maps_are_refused_in_one_line(tmp_path):
    _emdb_like_map(tmp_path / "a.mrc", (0, 0, 0), (1.5, 1.5, 1.5), (8, 8, 8), (1, 1, 3))
    with pytest.raises(
        MrcError, match=r"a.mrc: header axis order .* = \(1, 1, 3\) is not a permutation"
    ):
        read_volume(tmp_path / "a.mrc")
    with mrcfile.new(tmp_path / "p.mrc") as m:
        m.set_data(np.ones((8, 8, 8), np.float32))
        m.header.cella = (8.0, 0.0, 8.0)
    with pytest.raises(MrcError, match="voxel size is set on some axes only"):
        read_volume(tmp_path / "p.mrc")
    write_mrc(tmp_path / "img.mrc", np.ones((24, 24), np.float32), 4.0)
    with pytest.raises(MrcError, match=r"2D image of shape \(24, 24\), not a 3D map"):
        read_volume(tmp_path / "img.mrc")


def test_gzip_compressed_stack_is_named_as_such(tmp_path):
    """Was: 'stack is truncated'."""
    import gzip

    write_mrc(tmp_path / "s.mrcs", np.ones((4, 16, 16), np.float32), 1.0)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "s.mrcs").write_bytes(gzip.compress(raw))
    with pytest.raises(InputError) as exc:
        stack_info(tmp_path / "s.mrcs")
    msg = str(exc.value)
    assert "s.mrcs: is gzip-compressed, not an MRC file" in msg
    assert "gzip -dc 's.mrcs' > 's_plain.mrcs'" in msg and "truncated" not in msg
    with pytest.raises(MrcError, match="gzip-compressed"):
        read_volume(tmp_path / "s.mrcs")


def test_stack_written_with_mrcfile_default_space_group_is_a_stack(tmp_path):
    """16 images of 16x16 written by mrcfile without set_image_stack (ispg 1) and named
    .mrcs: RELION reads it as a stack, so do we (was: refused as a 3D volume)."""
    imgs = np.random.default_rng(0).standard_normal((16, 16, 16)).astype(np.float32)
    with mrcfile.new(tmp_path / "s.mrcs") as m:
        m.set_data(imgs)
        m.voxel_size = 2.0
        assert int(m.header.ispg) == 1
    info = stack_info(tmp_path / "s.mrcs")
    assert (info.n_images, info.ny, info.nx) == (16, 16, 16)
    # the same cube named .mrc is still a map given where a stack is expected
    (tmp_path / "s.mrcs").rename(tmp_path / "v.mrc")
    with pytest.raises(
        InputError, match=r"3D volume .* name it \.mrcs or set its space group to 0"
    ):
        stack_info(tmp_path / "v.mrc")


@pytest.mark.parametrize(
    "content,what",
    [
        (
            b"# version 30001\ndata_particles\nloop_\n_rlnImageName #1\n" * 40,
            r"no valid MRC data mode .*\(a text file \(a STAR file\?\)\)",
        ),
        (b"II*\x00" + bytes(2000), "is a TIFF image, not an MRC file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(2000), "is a PNG image, not an MRC file"),
        (b"hello", "is not an MRC file: 5 bytes, shorter than the 1024-byte MRC header"),
    ],
)
def test_non_mrc_files_say_what_they_are_not(tmp_path, content, what):
    """Was: 'MRC mode 980709231 is not supported' (file bytes read as a mode)."""
    (tmp_path / "x.mrcs").write_bytes(content)
    with pytest.raises(InputError, match=what) as exc:
        stack_info(tmp_path / "x.mrcs")
    assert "mode 9" not in str(exc.value) and "data_particles" not in str(exc.value)
    with pytest.raises(MrcError, match=what):
        read_volume(tmp_path / "x.mrcs")


def test_a_stack_of_few_images_given_as_a_map_is_refused(interop):
    """The real EMPIAR-10076 stack of 7 particles (7x320x320, ispg 1, .mrc) is no map."""
    with pytest.raises(
        MrcError, match=r"empiar_10076_7.mrc: a map of \(7, 320, 320\) voxels .* is a slab"
    ):
        read_volume(interop / "cryodrgn" / "empiar_10076_7.mrc")
