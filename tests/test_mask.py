"""Soft spherical mask and its default diameters."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.backend import get_xp, to_host
from hetrefine.fourier import centered_grid_radius
from hetrefine.mask import default_mask_diameters, soft_sphere

BOX, PX = 32, 1.5
INNER, OUTER = 30.0, 36.0  # Angstrom: radii 10 and 12 pixels


def test_soft_sphere_values(xp):
    m = soft_sphere(BOX, PX, INNER, OUTER, xp=xp)
    assert get_xp(m) is xp
    m = to_host(m)
    assert m.shape == (BOX,) * 3 and m.dtype == np.float32
    r = centered_grid_radius((BOX,) * 3) * PX  # Angstrom
    ri, ro = INNER / 2, OUTER / 2
    np.testing.assert_array_equal(m[r <= ri], 1.0)
    np.testing.assert_array_equal(m[r >= ro], 0.0)
    assert m[0, 0, 0] == 0.0 and m[-1, -1, -1] == 0.0  # corners
    edge = (r > ri) & (r < ro)
    assert edge.sum() > 100
    t = (r[edge] - ri) / (ro - ri)
    np.testing.assert_allclose(m[edge], 0.5 + 0.5 * np.cos(np.pi * t), atol=1e-6)
    assert ((m[edge] > 0) & (m[edge] < 1)).all()
    # half way across the edge (11 px on an axis): 0.5
    c = BOX // 2
    assert m[c, c, c + 11] == pytest.approx(0.5, abs=1e-6)
    assert m[c - 11, c, c] == pytest.approx(0.5, abs=1e-6)
    # centred at D//2 and spherically symmetric
    k = np.arange(1, c)
    np.testing.assert_array_equal(m[c, c, c + k], m[c, c, c - k])
    np.testing.assert_allclose(m, np.transpose(m, (2, 0, 1)))


def test_soft_sphere_monotone_along_radius():
    m = soft_sphere(BOX, PX, INNER, OUTER)
    r = centered_grid_radius((BOX,) * 3).ravel()
    order = np.argsort(r, kind="stable")
    vals = m.ravel()[order]
    assert (np.diff(vals) <= 1e-7).all()


def test_soft_sphere_hard_edge_when_outer_not_larger():
    m = soft_sphere(BOX, PX, INNER, INNER)
    r = centered_grid_radius((BOX,) * 3) * PX
    np.testing.assert_array_equal(m, (r <= INNER / 2).astype(np.float32))


def test_default_mask_diameters():
    box_A = BOX * PX
    # only the inner given: outer = 1.2 x inner
    assert default_mask_diameters(BOX, PX, 30.0, None) == pytest.approx((30.0, 36.0))
    # ... capped at the box width
    assert default_mask_diameters(BOX, PX, 0.9 * box_A, None) == pytest.approx((0.9 * box_A, box_A))
    # both given: kept as given
    assert default_mask_diameters(BOX, PX, 20.0, 40.0) == pytest.approx((20.0, 40.0))
    # nothing given: inner 0.75 of the box, fits in the box with a soft edge
    inner, outer = default_mask_diameters(BOX, PX, None, None)
    assert inner == pytest.approx(0.75 * box_A)
    assert inner < outer <= box_A
    assert outer == pytest.approx(min(1.2 * inner, box_A))
    assert all(isinstance(v, float) for v in (inner, outer))
