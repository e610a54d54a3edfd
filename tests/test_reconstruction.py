"""Reconstruction: a known volume recovered from its own projections (with and without
CTF), and the FSC -> SNR conversion used by the Wiener filter."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.backend import get_xp, to_host
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices, rfft2_centered
from hetrefine.fsc import fsc
from hetrefine.projection import backproject, grid_half_size, hermitian_complete
from hetrefine.reconstruction import snr_from_fsc, wiener_volume
from hetrefine.rotations import random_rotations

BOX = 32
PAD = 2
PIXEL = 2.0  # Angstrom
N_POSES = 2000


def _blobs(box: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    n = 6
    amps = rng.uniform(0.5, 1.5, n)
    centres = rng.uniform(-4.0, 4.0, (n, 3))  # x, y, z in pixels
    sds = rng.uniform(1.2, 2.0, n)
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((box,) * 3)
    for a, c, s in zip(amps, centres, sds, strict=True):
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32), (amps, centres, sds)


def _analytic_projections(box: int, blobs, rots: np.ndarray) -> np.ndarray:
    """Exact projections (r, D, D): a Gaussian at c, sd s -> sqrt(2 pi) s exp(..) at (A c)_xy."""
    amps, centres, sds = blobs
    g = (np.arange(box) - box // 2).astype(np.float64)
    out = np.zeros((len(rots), box, box))
    for a, c, s in zip(amps, centres, sds, strict=True):
        xy = rots[:, :2, :] @ c  # (r, 2)
        ex = np.exp(-((g[None, :] - xy[:, 0:1]) ** 2) / (2 * s * s))  # (r, x)
        ey = np.exp(-((g[None, :] - xy[:, 1:2]) ** 2) / (2 * s * s))  # (r, y)
        out += a * np.sqrt(2 * np.pi) * s * ey[:, :, None] * ex[:, None, :]
    return out


@pytest.fixture(scope="module")
def dataset():
    """Truth volume, 2,000 random poses, their analytic projections and CTF parameters."""
    vol, blobs = _blobs(BOX, seed=11)
    rng = np.random.default_rng(12)
    rots = random_rotations(N_POSES, rng)
    imgs = _analytic_projections(BOX, blobs, rots).astype(np.float32)
    ctf = np.zeros((N_POSES, 8), np.float32)
    ctf[:, 0] = rng.uniform(8000, 25000, N_POSES)
    ctf[:, 1] = ctf[:, 0] - rng.uniform(0, 500, N_POSES)
    ctf[:, 2] = rng.uniform(-180, 180, N_POSES)
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = 300.0, 2.7, 0.1
    return vol, rots.astype(np.float32), imgs, ctf


def _reconstruct(xp, rots, imgs, ctf_params=None, snr=None, radius=None, batch=500):
    """Backproject (optionally CTF-weighted) half-plane slices in batches; Wiener map."""
    flat, kx, ky = half_plane_indices(BOX, BOX / 2 - 1, xp)
    n = 2 * grid_half_size(BOX, PAD) + 1
    num = xp.zeros((n, n, n), xp.complex128)
    wgt = xp.zeros((n, n, n), xp.float64)
    freq = 1.0 / (BOX * PIXEL)
    for b0 in range(0, len(rots), batch):
        sl = slice(b0, b0 + batch)
        y = rfft2_centered(xp.asarray(imgs[sl])).reshape(len(imgs[sl]), -1)[:, flat]
        if ctf_params is None:
            vals, wts = y, xp.ones(y.shape, xp.float32)
        else:
            c = compute_ctf(xp.asarray(ctf_params[sl]), kx * freq, ky * freq)
            y = y * c  # the data: CTF-modulated projections
            vals, wts = c * y, c * c
        backproject(num, wgt, xp.asarray(rots[sl]), kx, ky, vals, wts, PAD)
    num, wgt = hermitian_complete(num, wgt)
    return wiener_volume(num, wgt, BOX, PAD, snr=snr, radius=radius)


@pytest.mark.parametrize("with_ctf", [False, True], ids=["no_ctf", "ctf"])
def test_volume_recovered_from_projections(xp, dataset, with_ctf):
    truth, rots, imgs, ctf = dataset
    # with a CTF, _reconstruct modulates the projections' transforms by it (the data),
    # backprojects CTF * data and weights CTF^2
    rec = _reconstruct(xp, rots, imgs, ctf if with_ctf else None)
    assert get_xp(rec) is xp and rec.shape == (BOX,) * 3 and rec.dtype == np.float32
    curve = fsc(rec, xp.asarray(truth))
    last = int(0.8 * BOX / 2)
    assert curve[1 : last + 1].min() >= 0.9, curve
    # not only correlated: on the right scale
    rec_h = to_host(rec)
    err = np.linalg.norm(rec_h - truth) / np.linalg.norm(truth)
    assert err < 0.05, err


def test_off_centre_content_keeps_its_amplitude(xp, dataset):
    """The gridding correction of the map: a blob ~10 px off centre (box 32) comes back
    at its true peak height (without the correction it is ~8% low)."""
    _, rots, _, _ = dataset
    blobs = (
        np.array([1.0, 1.0]),
        np.array([[9.0, -3.0, 4.0], [-1.0, 1.0, 0.0]]),
        np.array([1.5, 1.5]),
    )
    imgs = _analytic_projections(BOX, blobs, rots.astype(np.float64)).astype(np.float32)
    rec = to_host(_reconstruct(xp, rots, imgs))
    c = BOX // 2
    assert rec[c + 4, c - 3, c + 9] == pytest.approx(1.0, abs=0.01)  # (z, y, x) of (9, -3, 4)
    assert rec[c, c + 1, c - 1] == pytest.approx(1.0, abs=0.01)


def test_radius_limits_the_map(xp, dataset):
    truth, rots, imgs, _ = dataset
    rec = _reconstruct(xp, rots[:400], imgs[:400], radius=6.0)
    spec = np.fft.fftshift(np.fft.fftn(to_host(rec).astype(np.float64)))
    g = np.arange(BOX) - BOX // 2
    r = np.sqrt(sum(a**2 for a in np.meshgrid(g, g, g, indexing="ij")))
    power = np.abs(spec) ** 2
    # beyond the radius only the gridding correction's leakage remains (2.5e-2 of the
    # power lies beyond r = 7 without the radius)
    assert power[r > 7].sum() < 2e-3 * power.sum()
    curve = fsc(rec, xp.asarray(truth))
    assert curve[1:6].min() > 0.9


def test_wiener_snr_shrinks_map(xp, dataset):
    """A lower SNR shrinks every shell's amplitude; a high SNR changes little."""
    truth, rots, imgs, _ = dataset
    sl = slice(0, 300)
    ref = to_host(_reconstruct(xp, rots[sl], imgs[sl]))
    n_sh = BOX // 2 + 1
    hi = to_host(_reconstruct(xp, rots[sl], imgs[sl], snr=np.full(n_sh, 1e4)))
    lo = to_host(_reconstruct(xp, rots[sl], imgs[sl], snr=np.full(n_sh, 0.5)))
    assert np.linalg.norm(hi - ref) < 1e-2 * np.linalg.norm(ref)
    # with SNR 0.5 the regulariser is twice the mean weight: amplitudes shrink a lot
    assert np.linalg.norm(lo) < 0.6 * np.linalg.norm(ref)
    assert np.linalg.norm(lo) > 0.1 * np.linalg.norm(ref)
    # the shape survives (the filter is real and positive per frequency)
    assert fsc(xp.asarray(lo), xp.asarray(ref))[1:10].min() > 0.95


def test_snr_from_fsc():
    curve = np.array([1.0, 0.999, 0.9, 0.5, 0.143, 0.0, -0.2])
    snr = snr_from_fsc(curve)
    assert snr.shape == curve.shape and np.isfinite(snr).all()
    assert snr[3] == pytest.approx(1.0)  # FSC 0.5 <=> half-map SNR 1
    assert snr[2] == pytest.approx(9.0)
    assert snr[4] == pytest.approx(0.143 / 0.857)
    assert (np.diff(snr) <= 0).all()  # monotone in the FSC
    assert snr[5] == snr[6] == pytest.approx(1e-6)  # floored, never 0 or negative
    assert snr[0] == pytest.approx(999.0)  # FSC 1 clipped: finite
    np.testing.assert_allclose(snr_from_fsc(curve[2:5], fudge=4.0), 4.0 * snr[2:5])
    assert snr_from_fsc([0.0], floor=1e-3)[0] == pytest.approx(1e-3)
