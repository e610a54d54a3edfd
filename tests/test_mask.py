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


def _phantom_models(box=48, px=2.0):
    """Two pseudo-atomic phantoms (a domain in two places) and their initial models: each
    low-passed to 30 A. Returns the truths and the models."""
    from hetrefine.simulate import SimulationSpec, lowpass, phantoms

    truths = phantoms(SimulationSpec(box=box, pixel_size=px, n_classes=2, seed=3))
    return truths, [lowpass(v, 30.0, px) for v in truths]


@pytest.mark.parametrize(
    "grey", [lambda v: v, lambda v: 1e-3 * v, lambda v: 250.0 * v + 40.0, lambda v: -7.0 * v]
)
def test_solvent_mask_covers_the_particle_and_excludes_the_solvent(grey):
    """On a known phantom, at any grey scale, offset or contrast of the initial models:
    every voxel of either truth's density lies under the mask's flat top, the mask keeps
    well under half of the sphere, and it is zero in the solvent beyond its edge."""
    from scipy.ndimage import distance_transform_edt

    from hetrefine.mask import solvent_mask

    box, px = 48, 2.0
    truths, models = _phantom_models(box, px)
    sphere = soft_sphere(box, px, 0.8 * box * px, 0.9 * box * px)
    m = solvent_mask([grey(v) for v in models], px, sphere, 0.1, 4.0, 8.0)
    reference = solvent_mask(models, px, sphere, 0.1, 4.0, 8.0)
    np.testing.assert_allclose(m, reference, atol=1e-6)  # grey-scale independent
    assert m.dtype == np.float32 and m.min() >= 0 and m.max() <= 1
    density = np.zeros((box,) * 3, bool)
    for t in truths:
        density |= t > 0.02 * t.max()
    assert np.all(m[density] > 0.999), "the particle's density is masked"
    assert m.sum() < 0.5 * sphere.sum(), m.sum() / sphere.sum()
    # the solvent: farther than 16 A (extension 4 + edge 8 + the 30 A blur's spread) from
    # any density is zero (measured: 30% of the sphere is that far)
    far = (distance_transform_edt(~density) * px > 16.0) & (sphere > 0.5)
    assert far.sum() > 0.25 * (sphere > 0.5).sum()
    assert np.all(m[far] == 0)
    assert np.all(m <= sphere + 1e-6)  # within the spherical mask


def test_solvent_mask_is_the_union_of_the_models_envelopes():
    """A class's own density is kept even where the other model has none: the mask from
    both models holds each model's mask."""
    from hetrefine.mask import solvent_mask

    box, px = 48, 2.0
    _, models = _phantom_models(box, px)
    sphere = soft_sphere(box, px, 0.8 * box * px, 0.9 * box * px)
    both = solvent_mask(models, px, sphere, 0.1, 4.0, 8.0)
    for v in models:
        one = solvent_mask([v], px, sphere, 0.1, 4.0, 8.0)
        assert np.all(both >= one - 1e-6)
    assert both.sum() > max(solvent_mask([v], px, sphere, 0.1, 4.0, 8.0).sum() for v in models)
