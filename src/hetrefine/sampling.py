"""Uniform samplings of SO(3) and of image shifts, and local neighbourhoods for refinement.

The global grid is an (almost) uniform set of viewing directions (a Fibonacci
sphere whose point spacing matches the angular step, equivalent to HEALPix at
the same step) times in-plane angles psi at the same step. A finer local
neighbourhood of any pose is ``perturbations(step) @ pose``: the 3 x 3 x 3
small rotations whose rotation vectors lie on a cube of spacing ``step``.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from hetrefine.rotations import euler_to_matrix
from hetrefine.symmetry import asymmetric_unit_mask, symmetry_matrices


def sphere_directions(step_deg: float) -> np.ndarray:
    """Unit vectors (n, 3) nearly uniform on the sphere, spacing about ``step_deg``.

    n = round(4 pi / step^2) (each point covers a step x step patch).
    """
    step = np.deg2rad(step_deg)
    n = max(int(round(4.0 * np.pi / step**2)), 2)
    i = np.arange(n) + 0.5
    z = 1.0 - 2.0 * i / n
    phi = np.pi * (1.0 + 5.0**0.5) * i
    r = np.sqrt(1.0 - z * z)
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def so3_grid(step_deg: float) -> np.ndarray:
    """Global rotation grid (n, 3, 3) in RELION's convention at an angular step.

    Directions from :func:`sphere_directions` give (rot, tilt); psi runs over
    [0, 360) at the same step. The viewing direction of pose A is its third row.
    """
    dirs = sphere_directions(step_deg)
    tilt = np.rad2deg(np.arccos(np.clip(dirs[:, 2], -1, 1)))
    rot = np.rad2deg(np.arctan2(dirs[:, 1], dirs[:, 0]))
    n_psi = max(int(round(360.0 / step_deg)), 1)
    psi = np.arange(n_psi) * (360.0 / n_psi)
    angles = np.stack(
        [
            np.repeat(rot, n_psi),
            np.repeat(tilt, n_psi),
            np.tile(psi, len(dirs)),
        ],
        axis=1,
    )
    return euler_to_matrix(angles)


def perturbations(step_deg: float, points: int = 27) -> np.ndarray:
    """Small rotations (P, 3, 3) with rotation vectors in {-s, 0, s}^3, identity first:
    all 27, or the 19 within sqrt(2) s (the cube without its 8 corners)."""
    s = np.deg2rad(step_deg)
    g = np.array([0.0, -s, s])
    vecs = np.stack(np.meshgrid(g, g, g, indexing="ij"), axis=-1).reshape(-1, 3)
    if points == 19:
        vecs = vecs[np.count_nonzero(vecs, axis=1) <= 2]
    elif points != 27:
        raise ValueError(f"points must be 27 or 19, got {points}")
    return Rotation.from_rotvec(vecs).as_matrix()


def shift_grid(range_px: float, step_px: float) -> np.ndarray:
    """Shifts (s, 2) in pixels (x, y) on a square grid of ``step_px`` within a disc of
    radius ``range_px``, the zero shift first."""
    if range_px <= 0 or step_px <= 0:
        return np.zeros((1, 2))
    n = int(np.floor(range_px / step_px + 1e-9))
    g = np.arange(-n, n + 1) * step_px
    xx, yy = np.meshgrid(g, g, indexing="xy")
    pts = np.stack([xx.ravel(), yy.ravel()], axis=1)
    pts = pts[np.hypot(pts[:, 0], pts[:, 1]) <= range_px + 1e-9]
    order = np.lexsort((pts[:, 0], pts[:, 1], np.hypot(pts[:, 0], pts[:, 1])))
    return pts[order]


def local_shift_offsets(step_px: float) -> np.ndarray:
    """The 3 x 3 shift offsets (9, 2) at ``step_px``, the zero offset first."""
    g = np.array([0.0, -step_px, step_px])
    xx, yy = np.meshgrid(g, g, indexing="xy")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def angular_step_for_resolution(res_limit_px: float, radius_px: float, box: int) -> float:
    """Angular step (degrees) at which a pose error of one step moves the particle's
    edge by about a third of the resolution: step = resolution / (pi * radius).

    res_limit_px: the current resolution limit as a Fourier radius (box pixels;
    the resolution is box / res_limit_px pixels); radius_px: the particle radius in
    pixels. A rotation by d radians moves a point at radius R by R d, a phase error
    of 2 pi R d / resolution at the limit: pi radians at d = resolution / (2 R);
    this step keeps it at 2 radians over a whole step and under one within half a
    step (the largest error of the nearest sample).
    """
    resolution_px = box / max(res_limit_px, 1e-6)
    return float(np.rad2deg(resolution_px / (np.pi * max(radius_px, 1e-6))))


def levels_for_resolution(
    res_limit_px: float,
    radius_px: float,
    coarse_step_deg: float,
    box: int,
    min_step_deg: float = 1.0,
    max_levels: int = 5,
) -> int:
    """Number of local levels (each halving the angular step from ``coarse_step_deg``)
    that reach :func:`angular_step_for_resolution`, never finer than ``min_step_deg``:
    at least 1, at most ``max_levels``."""
    target = max(angular_step_for_resolution(res_limit_px, radius_px, box), min_step_deg)
    levels = int(np.ceil(np.log2(coarse_step_deg / target) - 1e-9))
    return int(min(max(levels, 1), max_levels))


def rotation_grid(step_deg: float, symmetry: str = "C1") -> np.ndarray:
    """The global search grid (R, 3, 3) at ``step_deg``, reduced to the asymmetric unit
    of the point group ``symmetry``."""
    rots = so3_grid(step_deg)
    mats = symmetry_matrices(symmetry)
    if len(mats) > 1:
        rots = rots[asymmetric_unit_mask(rots, mats)]
    return rots
