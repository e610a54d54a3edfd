"""Rotation and shift samplings: coverage of SO(3), sizes, local neighbourhoods, shifts."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.rotations import random_rotations
from hetrefine.sampling import (
    local_shift_offsets,
    perturbations,
    shift_grid,
    so3_grid,
    sphere_directions,
)


def _angles_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Geodesic angles (n, m) in degrees between rotations a (n, 3, 3) and b (m, 3, 3)."""
    tr = a.reshape(len(a), 9) @ b.reshape(len(b), 9).T  # trace(a^T b)
    return np.degrees(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def _is_rotation(mats: np.ndarray) -> bool:
    eye = np.einsum("nij,nkj->nik", mats, mats)
    return np.allclose(eye, np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(mats), 1.0)


@pytest.mark.parametrize("step", [30.0, 15.0])
def test_so3_grid_covers_so3(step):
    grid = so3_grid(step)
    assert grid.ndim == 3 and grid.shape[1:] == (3, 3)
    assert _is_rotation(grid)
    rand = random_rotations(500, np.random.default_rng(0))
    nearest = _angles_deg(rand, grid).min(axis=1)
    assert nearest.max() < 1.0 * step
    assert np.median(nearest) < 0.6 * step


def test_so3_grid_has_no_near_duplicates():
    step = 30.0
    grid = so3_grid(step)
    d = _angles_deg(grid, grid)
    np.fill_diagonal(d, 180.0)
    assert d.min() > 0.25 * step


def test_so3_grid_size_scales_as_step_cubed():
    n = {s: len(so3_grid(s)) for s in (30.0, 15.0, 10.0, 7.5)}
    assert n[30.0] / n[15.0] == pytest.approx(1 / 8, rel=0.1)
    assert n[10.0] / n[7.5] == pytest.approx((7.5 / 10.0) ** 3, rel=0.1)
    # about the volume of SO(3) (8 pi^2 rad^3) per step^3 cell
    for s, count in n.items():
        assert count == pytest.approx(8 * np.pi**2 / np.deg2rad(s) ** 3, rel=0.1)


def test_sphere_directions_uniform():
    dirs = sphere_directions(10.0)
    np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    assert abs(dirs.mean(axis=0)).max() < 0.02  # no preferred direction
    # equal-area bands hold equal counts (Archimedes: z is uniform on the sphere)
    counts = np.histogram(dirs[:, 2], bins=8, range=(-1, 1))[0]
    assert counts.max() - counts.min() <= 2


def test_perturbations():
    step = 5.0
    p = perturbations(step)
    assert p.shape == (27, 3, 3) and _is_rotation(p)
    np.testing.assert_allclose(p[0], np.eye(3), atol=1e-12)
    ang = _angles_deg(p, np.eye(3)[None])[:, 0]
    assert ang.max() <= np.sqrt(3) * step + 1e-6
    assert ang.max() == pytest.approx(np.sqrt(3) * step, rel=1e-6)  # the cube's corners
    assert (ang[1:] >= step - 1e-6).all()  # all but the identity move by at least the step
    d = _angles_deg(p, p)
    np.fill_diagonal(d, 180.0)
    assert d.min() > 0.5 * step  # 27 distinct rotations
    # a neighbourhood of any pose: p @ pose stays within sqrt(3) step of it
    pose = random_rotations(1, np.random.default_rng(1))
    local = p @ pose
    assert _angles_deg(local, pose)[:, 0].max() <= np.sqrt(3) * step + 1e-6


@pytest.mark.parametrize(("rng_px", "step"), [(3.0, 1.0), (5.0, 2.0), (2.5, 0.5)])
def test_shift_grid(rng_px, step):
    s = shift_grid(rng_px, step)
    assert s.ndim == 2 and s.shape[1] == 2
    np.testing.assert_array_equal(s[0], [0.0, 0.0])
    r = np.hypot(s[:, 0], s[:, 1])
    assert (r <= rng_px + 1e-9).all()
    assert (np.diff(r) >= -1e-12).all()  # nearest first
    assert len(np.unique(s, axis=0)) == len(s)
    # on the step lattice, and every lattice point within the radius is there
    np.testing.assert_allclose(s / step, np.rint(s / step), atol=1e-9)
    n = int(np.floor(rng_px / step))
    g = np.arange(-n, n + 1)
    expect = sum(1 for i in g for j in g if np.hypot(i, j) * step <= rng_px + 1e-9)
    assert len(s) == expect


def test_shift_grid_degenerate():
    np.testing.assert_array_equal(shift_grid(0.0, 1.0), [[0.0, 0.0]])
    np.testing.assert_array_equal(shift_grid(3.0, 0.0), [[0.0, 0.0]])
    np.testing.assert_array_equal(shift_grid(0.5, 1.0), [[0.0, 0.0]])


def test_local_shift_offsets():
    o = local_shift_offsets(0.5)
    assert o.shape == (9, 2)
    np.testing.assert_array_equal(o[0], [0.0, 0.0])
    assert len(np.unique(o, axis=0)) == 9
    assert set(np.unique(o).tolist()) == {-0.5, 0.0, 0.5}


def test_levels_follow_resolution_and_particle_size():
    from hetrefine.sampling import angular_step_for_resolution, levels_for_resolution

    # resolution 4 px, radius 24 px: 4 / (pi 24) rad = 3.04 deg
    assert np.isclose(angular_step_for_resolution(16, 24, 64), np.rad2deg(4 / (np.pi * 24)))
    # from 15 deg: 7.5, 3.75, 1.875 -> three halvings reach 3.04 deg
    assert levels_for_resolution(16, 24, 15.0, 64) == 3
    # low resolution (16 px) needs only 12 deg: one level; finer and larger -> more
    assert levels_for_resolution(4, 24, 15.0, 64) == 1
    assert levels_for_resolution(31, 30, 15.0, 64) == 4  # 1.25 deg -> 0.94: floor 1 deg
    assert levels_for_resolution(31, 30, 15.0, 64, min_step_deg=1.0) == 4
    assert levels_for_resolution(31, 60, 15.0, 64, max_levels=3) == 3
    # the final step never goes under the floor
    for r in (8, 16, 31):
        lv = levels_for_resolution(r, 60, 15.0, 64, min_step_deg=1.5)
        assert 15.0 / 2**lv >= 1.5 / 2 and 15.0 / 2 ** (lv - 1) > 1.5


def test_search_settings_levels_follow_resolution():
    from hetrefine.alignment import SearchSettings

    base = dict(box=64, pixel_size=1.8, coarse_step_deg=15.0, levels=2)
    assert SearchSettings(res_limit_px=16, **base).n_levels == 2  # no radius: as configured
    assert SearchSettings(res_limit_px=16, particle_radius_px=24, **base).n_levels == 3
    assert (
        SearchSettings(res_limit_px=5, particle_radius_px=24, **base).n_levels == 2
    )  # never fewer
