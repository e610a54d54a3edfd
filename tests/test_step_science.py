"""Science the steps call: resolution schedule limits, backprojection radius, model
resampling and low-pass, mask defaults."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.backprojection import backprojection_radius
from hetrefine.fourier import centered_grid_radius, lowpass_volume, resample_volume
from hetrefine.mask import mask_diameters
from hetrefine.schedule import resolution_limit_px


def test_resolution_limit_clamped_to_nyquist_and_max_resolution():
    box, px = 64, 2.0
    assert resolution_limit_px(100.0, box, px, None) == box / 2 - 1
    assert resolution_limit_px(1.0, box, px, None) == 4.0
    # max_resolution_A = 8 A -> shell 64 * 2 / 8 = 16
    assert resolution_limit_px(30.0, box, px, 8.0) == pytest.approx(16.0)


def test_backprojection_radius_has_a_margin_and_stops_at_nyquist():
    assert backprojection_radius(8.0, 64) == pytest.approx(14.0)
    assert backprojection_radius(30.0, 64) == 31.0


def test_resample_volume_keeps_physical_size_and_centre():
    """A Gaussian of sd 6 A at 2 A/px in a 32 box, resampled to 3 A/px in a 24 box
    (and padded to 40): same sd in Angstrom, still centred, same peak height."""
    r = centered_grid_radius((32,) * 3) * 2.0
    vol = np.exp(-0.5 * (r / 6.0) ** 2).astype(np.float32)
    for box in (24, 40):
        out = resample_volume(vol, 2.0, box, 3.0)
        assert out.shape == (box,) * 3
        assert np.unravel_index(out.argmax(), out.shape) == (box // 2,) * 3
        r2 = centered_grid_radius((box,) * 3) * 3.0
        expected = np.exp(-0.5 * (r2 / 6.0) ** 2)
        assert np.abs(out - expected).max() < 0.03


def test_lowpass_removes_high_frequencies():
    rng = np.random.default_rng(0)
    vol = rng.standard_normal((32, 32, 32)).astype(np.float32)
    out = lowpass_volume(vol, 20.0, 2.0)  # cut at shell 32 * 2 / 20 = 3.2
    f = np.abs(np.fft.fftshift(np.fft.fftn(out)))
    r = centered_grid_radius(out.shape)
    assert f[r > 6].max() < 1e-3 * f[r <= 3].max()


def test_mask_diameters_defaults():
    # particle diameter drives the inner diameter; outer 1.2 x inner, capped at the box
    assert mask_diameters(64, 2.0, 100, None, None) == (100.0, 120.0)
    assert mask_diameters(64, 2.0, 120, None, None) == (120.0, 128.0)
    assert mask_diameters(64, 2.0, None, 80, 90) == (80.0, 90.0)
    inner, outer = mask_diameters(64, 2.0, None, None, None)
    assert inner == pytest.approx(0.75 * 128) and outer == pytest.approx(min(1.2 * inner, 128))
