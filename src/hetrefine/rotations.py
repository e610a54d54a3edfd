"""Rotations: RELION's ZYZ Euler angles <-> rotation matrices.

Conventions used everywhere in hetrefine:
- A rotation matrix ``A`` of shape (3, 3) (or (n, 3, 3)) acts on column vectors
  (x, y, z). It is RELION's ``Euler_angles2matrix(rot, tilt, psi)``: the
  projection image of a volume V for pose A is the z-projection of the rotated
  volume V(A^T r); in Fourier space the image pixel (kx, ky) samples the 3D
  transform at A^T (kx, ky, 0).
- Euler angles (rot, tilt, psi) in degrees, ZYZ, as RELION writes them.
- ``A == scipy.spatial.transform.Rotation.from_euler("ZYZ", [rot, tilt, psi],
  degrees=True).as_matrix().T`` (checked in tests against RELION's formula).
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation


def euler_to_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """RELION Euler angles (..., 3) [rot, tilt, psi] in degrees -> matrices (..., 3, 3)."""
    angles = np.asarray(angles_deg, dtype=np.float64)
    flat = angles.reshape(-1, 3)
    mats = Rotation.from_euler("ZYZ", flat, degrees=True).as_matrix().transpose(0, 2, 1)
    return mats.reshape(angles.shape[:-1] + (3, 3))


def matrix_to_euler(mats: np.ndarray) -> np.ndarray:
    """Matrices (..., 3, 3) -> RELION Euler angles (..., 3) [rot, tilt, psi] in degrees.

    Tilt is in [0, 180]; rot and psi in (-180, 180].
    """
    mats = np.asarray(mats, dtype=np.float64)
    flat = mats.reshape(-1, 3, 3).transpose(0, 2, 1)
    import warnings

    with warnings.catch_warnings():  # gimbal lock at tilt 0/180 is fine: psi absorbs rot
        warnings.simplefilter("ignore", UserWarning)
        eul = Rotation.from_matrix(flat).as_euler("ZYZ", degrees=True)
    return eul.reshape(mats.shape[:-2] + (3,))


def relion_euler_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """RELION's ``Euler_angles2matrix`` written out term by term (the reference for tests)."""
    a, b, g = np.deg2rad([rot, tilt, psi])
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    return np.array(
        [
            [cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb],
            [-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb],
            [sc, ss, cb],
        ]
    )


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotation matrices (n, 3, 3) drawn uniformly from SO(3)."""
    return Rotation.random(n, random_state=rng).as_matrix()
