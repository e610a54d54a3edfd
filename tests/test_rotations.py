"""RELION's ZYZ Euler convention, checked against RELION 3.1 itself.

What was found (RELION 3.1.3, relion_project --ang with explicit rlnAngleRot/Tilt/Psi,
no CTF, pad 2): with A = hetrefine.rotations.euler_to_matrix([rot, tilt, psi])
(= RELION's Euler_angles2matrix = Rotation.from_euler("ZYZ", angles).as_matrix().T),
RELION's projection image, read by mrcfile as [y, x], equals the real-space sum over z
of V(A^T r), r = (x, y, z) about the voxel D//2 of a volume indexed (z, y, x):
correlation >= 0.9998 for every pose tried, versus 0.3-0.91 for the transposed matrix.
No axis flip, no half-pixel offset at even box sizes.
"""

from __future__ import annotations

import shutil
import subprocess

import mrcfile
import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.transform import Rotation

from hetrefine.rotations import (
    euler_to_matrix,
    matrix_to_euler,
    random_rotations,
    relion_euler_matrix,
)


def _random_angles(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack(
        [rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)], axis=1
    )


def test_euler_to_matrix_is_relion_formula():
    ang = _random_angles(200, 0)
    mats = euler_to_matrix(ang)
    assert mats.shape == (200, 3, 3)
    for a, m in zip(ang, mats, strict=True):
        np.testing.assert_allclose(m, relion_euler_matrix(*a), atol=1e-12)
    scipy_t = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(mats, scipy_t, atol=1e-12)
    # batch shapes are kept
    assert euler_to_matrix(ang.reshape(10, 20, 3)).shape == (10, 20, 3, 3)
    np.testing.assert_allclose(euler_to_matrix(ang[3]), mats[3], atol=1e-12)


def test_relion_formula_known_values():
    """Euler (rot, 0, 0): z-rotation by -rot on column vectors (the matrix maps volume to image)."""
    np.testing.assert_allclose(
        relion_euler_matrix(90, 0, 0), [[0, 1, 0], [-1, 0, 0], [0, 0, 1]], atol=1e-12
    )
    np.testing.assert_allclose(
        relion_euler_matrix(0, 90, 0), [[0, 0, -1], [0, 1, 0], [1, 0, 0]], atol=1e-12
    )
    # the projection direction of pose A is the third row of A
    a = relion_euler_matrix(40.0, 60.0, 10.0)
    t, r = np.deg2rad(60.0), np.deg2rad(40.0)
    np.testing.assert_allclose(
        a[2], [np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], atol=1e-12
    )


def test_matrix_to_euler_round_trip():
    ang = _random_angles(500, 1)
    back = matrix_to_euler(euler_to_matrix(ang))
    assert back.shape == ang.shape
    assert (back[:, 1] >= 0).all() and (back[:, 1] <= 180).all()
    assert (np.abs(back[:, [0, 2]]) <= 180 + 1e-9).all()
    # same angles (mod 360) away from gimbal lock, same matrices always
    np.testing.assert_allclose(((back - ang + 180) % 360) - 180, 0.0, atol=1e-7)
    mats = random_rotations(300, np.random.default_rng(2))
    np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(mats)), mats, atol=1e-9)
    # gimbal lock: tilt 0 and 180 still give the same matrix back
    for a in ([30.0, 0.0, 20.0], [-70.0, 180.0, 15.0]):
        m = euler_to_matrix(np.array(a))
        np.testing.assert_allclose(euler_to_matrix(matrix_to_euler(m)), m, atol=1e-9)


# ---------------------------------------------------------------- against relion_project

ANGLES = np.array(
    [
        [0, 0, 0],
        [30, 0, 0],
        [0, 40, 0],
        [0, 0, 50],
        [20, 70, -110],
        [-150, 120, 35],
        [95, 160, 170],
    ],
    dtype=np.float64,
)


def _asymmetric_volume(d: int) -> np.ndarray:
    """Gaussian blobs of different sizes at asymmetric places, (d, d, d) indexed (z, y, x)."""
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    blobs = [
        ((8, 0, 0), 2.5, 1.0),
        ((0, 12, 0), 2.0, 0.7),
        ((0, 0, -6), 3.0, 0.5),
        ((-5, -5, 5), 1.5, 1.5),
    ]
    vol = sum(
        amp * np.exp(-((x - px) ** 2 + (y - py) ** 2 + (z - pz) ** 2) / (2 * s * s))
        for (px, py, pz), s, amp in blobs
    )
    return vol.astype(np.float32)


def _project_real_space(vol: np.ndarray, a: np.ndarray) -> np.ndarray:
    """Our convention: image[y, x] = sum_z vol(A^T r), r = (x, y, z) about D//2."""
    d = vol.shape[0]
    c = np.arange(d) - d // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    q = a.T @ np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    coords = np.stack([q[2], q[1], q[0]]) + d // 2
    return ndimage.map_coordinates(vol, coords, order=3).reshape(vol.shape).sum(axis=0)


@pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project not on PATH")
def test_euler_convention_matches_relion_project(tmp_path):
    d = 48
    vol = _asymmetric_volume(d)
    with mrcfile.new(tmp_path / "asym.mrc") as m:
        m.set_data(vol)
        m.voxel_size = 1.0
    lines = ["", "data_optics", "", "loop_", "_rlnOpticsGroup", "_rlnOpticsGroupName", "_rlnVoltage",
             "_rlnSphericalAberration", "_rlnAmplitudeContrast", "_rlnImagePixelSize", "_rlnImageSize",
             "_rlnImageDimensionality", f"1 og1 300 2.7 0.1 1.0 {d} 2", "", "data_particles", "", "loop_",
             "_rlnAngleRot", "_rlnAngleTilt", "_rlnAnglePsi", "_rlnOpticsGroup"]  # fmt: skip
    lines += [f"{r} {t} {p} 1" for r, t, p in ANGLES]
    (tmp_path / "ang.star").write_text("\n".join(lines) + "\n")
    cmd = ["relion_project", "--i", "asym.mrc", "--o", "proj", "--ang", "ang.star", "--angpix", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stdout[-1000:] + res.stderr[-1000:]
    imgs = mrcfile.read(tmp_path / "proj.mrcs")
    assert imgs.shape == (len(ANGLES), d, d)

    def corr(u, v):
        return np.corrcoef(u.ravel(), v.ravel())[0, 1]

    mats = euler_to_matrix(ANGLES)
    transposed_corr = []
    for img, a in zip(imgs, mats, strict=True):
        ours = _project_real_space(vol, a)
        assert corr(ours, img) > 0.98
        # not merely correlated: same centre and shape pixel by pixel, after a global scale
        # (RELION's projections of this map sum to ~3% more than the real-space sum)
        scale = (ours * img).sum() / (ours * ours).sum()
        assert 0.9 < scale < 1.1
        np.testing.assert_allclose(scale * ours, img, atol=0.03 * np.abs(img).max())
        transposed_corr.append(corr(_project_real_space(vol, a.T), img))
    # the transposed convention is clearly wrong for poses with an in-plane component
    assert np.median(transposed_corr[1:]) < 0.8 and max(transposed_corr[1:]) < 0.95
