"""FSC: identities, noise, known SNR, masks, resolution crossings, mask correction."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.backend import get_xp, to_host
from hetrefine.fourier import centered_grid_radius
from hetrefine.fsc import (
    fsc,
    masked_fsc_corrected,
    randomize_phases_beyond,
    resolution_angstrom,
    resolution_shell,
    shell_resolution_A,
)
from hetrefine.mask import soft_sphere

BOX = 32


def _noise(seed: int, box: int = BOX) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((box,) * 3)


def _lowpass(vol: np.ndarray, shell: float) -> np.ndarray:
    r = centered_grid_radius(vol.shape)
    f = np.fft.fftshift(np.fft.fftn(vol))
    f[r > shell] = 0
    return np.fft.ifftn(np.fft.ifftshift(f)).real


def test_fsc_of_map_with_itself_is_one(xp):
    m = xp.asarray(_noise(0).astype(np.float32))
    curve = fsc(m, m)
    assert isinstance(curve, np.ndarray) and curve.dtype == np.float64
    assert curve.shape == (BOX // 2 + 1,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-9)
    np.testing.assert_allclose(fsc(m, 3.0 * m), 1.0, atol=1e-9)  # scale-invariant
    np.testing.assert_allclose(fsc(m, -m), -1.0, atol=1e-9)
    mask = xp.asarray(soft_sphere(BOX, 1.0, 16.0, 24.0))
    np.testing.assert_allclose(fsc(m, m, mask), 1.0, atol=1e-9)


def test_fsc_of_independent_noise_is_about_zero(xp):
    a, b = xp.asarray(_noise(1)), xp.asarray(_noise(2))
    curve = fsc(a, b)
    # shell s holds ~4 pi s^2 voxels: the FSC's sd there is ~ 1 / sqrt(2 pi s^2)
    s = np.arange(4, BOX // 2 + 1)
    assert abs(curve[4:].mean()) < 0.03
    assert (np.abs(curve[4:]) < 4.0 / np.sqrt(2 * np.pi * s**2)).all()
    mask = xp.asarray(soft_sphere(BOX, 1.0, 20.0, 26.0))
    masked = fsc(a, b, mask)
    assert abs(masked[4:].mean()) < 0.05


def test_fsc_with_known_snr(xp):
    """Signal + independent noise of equal power per voxel: FSC = 1 / (1 + 1) = 0.5."""
    s = _noise(3)
    a = xp.asarray(s + _noise(4))
    b = xp.asarray(s + 0.5 * _noise(5))  # FSC = 1 / sqrt((1 + 1)(1 + 0.25))
    curve = fsc(a, b)
    expect = 1.0 / np.sqrt(2.0 * 1.25)
    assert curve[5:].mean() == pytest.approx(expect, abs=0.02)
    assert np.abs(curve[5:] - expect).max() < 0.12


def test_fsc_mask_applied(xp):
    """Maps that agree inside the mask and differ outside it: FSC 1 only with the mask."""
    inside = _noise(6)
    r = centered_grid_radius((BOX,) * 3)
    a = np.where(r < 10, inside, _noise(7))
    b = np.where(r < 10, inside, _noise(8))
    mask = soft_sphere(BOX, 1.0, 16.0, 20.0)  # zero beyond radius 10
    assert fsc(xp.asarray(a), xp.asarray(b))[5:].mean() < 0.5
    np.testing.assert_allclose(fsc(xp.asarray(a), xp.asarray(b), xp.asarray(mask)), 1.0, atol=1e-9)


def test_resolution_shell_linear_interpolation():
    s = np.arange(17, dtype=np.float64)
    curve = np.clip(1.0 - s / 10.0, -0.1, 1.0)  # crosses 0.5 at 5.0 and 0.143 at 8.57
    assert resolution_shell(curve, 0.5) == pytest.approx(5.0)
    assert resolution_shell(curve, 0.143) == pytest.approx(8.57)
    assert resolution_shell(curve) == pytest.approx(8.57)  # 0.143 by default
    # the first crossing counts, even when the curve comes back up later
    bumpy = curve.copy()
    bumpy[12:15] = 0.4
    assert resolution_shell(bumpy, 0.143) == pytest.approx(8.57)
    # a steeper segment: crossing between shells 3 (0.8) and 4 (0.2) for 0.5 -> 3.5
    steep = np.array([1.0, 0.95, 0.9, 0.8, 0.2, 0.1, 0.0])
    assert resolution_shell(steep, 0.5) == pytest.approx(3.5)
    assert resolution_shell(steep, 0.143) == pytest.approx(4.57)
    # never below: the last shell
    assert resolution_shell(np.ones(9), 0.143) == 8.0


def test_resolution_angstrom():
    s = np.arange(17, dtype=np.float64)
    curve = np.clip(1.0 - s / 10.0, -0.1, 1.0)
    box, px = 32, 1.5
    assert resolution_angstrom(curve, box, px, 0.143) == pytest.approx(box * px / 8.57)
    assert resolution_angstrom(curve, box, px, 0.5) == pytest.approx(box * px / 5.0)
    # never below 0.143: Nyquist, 2 pixels
    assert resolution_angstrom(np.ones(17), box, px) == pytest.approx(2 * px)
    res = shell_resolution_A(box, px)
    assert np.isinf(res[0]) and res[-1] == pytest.approx(2 * px)
    np.testing.assert_allclose(res[1:], box * px / s[1:])


def test_randomize_phases_beyond(xp):
    vol = _noise(9)
    out = to_host(randomize_phases_beyond(xp.asarray(vol), 6.0, seed=1))
    assert np.isrealobj(out) and out.shape == vol.shape
    f0 = np.fft.fftshift(np.fft.fftn(vol))
    f1 = np.fft.fftshift(np.fft.fftn(out))
    r = centered_grid_radius(vol.shape)
    np.testing.assert_allclose(np.abs(f1), np.abs(f0), rtol=1e-6, atol=1e-8)  # amplitudes kept
    np.testing.assert_allclose(f1[r <= 6], f0[r <= 6], rtol=1e-6, atol=1e-8)  # low shells kept
    curve = fsc(xp.asarray(vol), xp.asarray(out))
    np.testing.assert_allclose(curve[:6], 1.0, atol=1e-9)
    assert abs(curve[9:].mean()) < 0.05


def test_masked_fsc_corrected_removes_mask_correlation(xp):
    """Two maps share only signal below shell 5 plus independent noise. A sharp mask
    spreads the shared low-resolution signal into high shells and inflates the plain
    masked FSC there; the phase-randomised correction brings it back to about 0."""
    rng = np.random.default_rng(10)
    r = centered_grid_radius((BOX,) * 3)
    sig = _lowpass(_lowpass(rng.standard_normal((BOX,) * 3), 5.0) * (r < 10), 5.0)
    sig /= sig.std()
    a = xp.asarray(sig + 0.3 * rng.standard_normal(sig.shape))
    b = xp.asarray(sig + 0.3 * rng.standard_normal(sig.shape))
    mask = xp.asarray(soft_sphere(BOX, 1.0, 20.0, 22.0))
    plain = fsc(a, b)
    assert plain[1:5].min() > 0.9 and abs(plain[8:].mean()) < 0.05
    masked = fsc(a, b, mask)
    corrected = masked_fsc_corrected(a, b, mask, seed=3)
    assert isinstance(corrected, np.ndarray) and corrected.shape == masked.shape
    high = slice(9, 16)
    assert masked[high].mean() > 0.3  # inflated by the mask
    assert abs(corrected[high].mean()) < 0.1
    assert np.abs(corrected[high]).max() < 0.25
    # unchanged where the signal is: below the randomisation shell
    np.testing.assert_allclose(corrected[:6], masked[:6])


def test_masked_fsc_corrected_without_drop_is_masked_fsc(xp):
    """When the unmasked FSC never drops below 0.8 there is nothing to correct."""
    m = _noise(11)
    a, b = xp.asarray(m + 0.1 * _noise(12)), xp.asarray(m + 0.1 * _noise(13))
    mask = xp.asarray(soft_sphere(BOX, 1.0, 20.0, 24.0))
    np.testing.assert_allclose(masked_fsc_corrected(a, b, mask), fsc(a, b, mask))
    assert get_xp(a) is xp
