"""CPU (numpy) and GPU (CuPy) give the same results within float32 rounding.

Every test runs the same kernel call on numpy and on CuPy arrays made from the same
host data and compares the host copies. Skipped when CuPy or a GPU is absent.
"""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.alignment import SearchSettings, search_poses
from hetrefine.backend import cupy_available, get_xp, to_host
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices, irfft2_centered, rfft2_centered, rfft_frequencies
from hetrefine.fsc import fsc, masked_fsc_corrected
from hetrefine.mask import soft_sphere
from hetrefine.projection import (
    backproject,
    grid_half_size,
    hermitian_complete,
    prepare_reference,
    project,
)
from hetrefine.reconstruction import wiener_volume
from hetrefine.rotations import random_rotations
from hetrefine.sampling import so3_grid

pytestmark = pytest.mark.gpu

BOX, PAD, PIXEL = 32, 2, 3.0


@pytest.fixture
def cp():
    """The CuPy module; skips without CuPy and a GPU."""
    if not cupy_available():
        pytest.skip("needs CuPy and a GPU")
    import cupy

    return cupy


def _volume(seed: int = 0, box: int = BOX) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((box,) * 3)
    for _ in range(12):
        c = rng.uniform(-6, 6, 3)
        s = rng.uniform(1.0, 2.0)
        vol += rng.uniform(0.5, 1.5) * np.exp(
            -((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s)
        )
    return vol.astype(np.float32)


def _ctf_params(n: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = np.zeros((n, 8), np.float32)
    p[:, 0] = rng.uniform(8000, 25000, n)
    p[:, 1] = p[:, 0] - rng.uniform(0, 400, n)
    p[:, 2] = rng.uniform(-180, 180, n)
    p[:, 3], p[:, 4], p[:, 5] = 300.0, 2.7, 0.1
    p[:, 6] = rng.uniform(0, 30, n)
    p[:, 7] = rng.uniform(0, 50, n)
    return p


def _close(dev, host, rel: float) -> None:
    """``dev`` (any backend) equals ``host`` to ``rel`` of the host's largest value."""
    d = to_host(dev)
    assert d.shape == host.shape and d.dtype == host.dtype
    scale = float(np.abs(host).max())
    assert scale > 0
    np.testing.assert_allclose(d, host, rtol=0, atol=rel * scale)


def test_project_parity(cp):
    vol = _volume()
    rots = random_rotations(50, np.random.default_rng(2)).astype(np.float32)
    _, kx, ky = half_plane_indices(BOX, BOX / 2 - 1)
    grid_h = prepare_reference(vol, PAD)
    grid_d = prepare_reference(cp.asarray(vol), PAD)
    assert get_xp(grid_d) is cp
    _close(grid_d, grid_h, 1e-5)
    out_h = project(grid_h, rots, kx, ky, PAD)
    out_d = project(grid_d, cp.asarray(rots), cp.asarray(kx), cp.asarray(ky), PAD)
    _close(out_d, out_h, 1e-4)


def test_backproject_and_wiener_parity(cp):
    rng = np.random.default_rng(3)
    rots = random_rotations(200, rng).astype(np.float32)
    _, kx, ky = half_plane_indices(BOX, BOX / 2 - 1)
    vals = rng.standard_normal((200, len(kx))) + 1j * rng.standard_normal((200, len(kx)))
    vals = vals.astype(np.complex64)
    wts = rng.uniform(0.1, 1.0, (200, len(kx))).astype(np.float32)
    n = 2 * grid_half_size(BOX, PAD) + 1
    sums = {}
    for xp in (np, cp):
        num = xp.zeros((n, n, n), xp.complex128)
        wgt = xp.zeros((n, n, n), xp.float64)
        backproject(
            num,
            wgt,
            xp.asarray(rots),
            xp.asarray(kx),
            xp.asarray(ky),
            xp.asarray(vals),
            xp.asarray(wts),
            PAD,
        )
        sums[xp.__name__] = hermitian_complete(num, wgt)
    (nh, wh), (nd, wd) = sums["numpy"], sums[cp.__name__]
    _close(nd, nh, 1e-5)
    _close(wd, wh, 1e-5)
    snr = np.linspace(50.0, 0.1, BOX // 2 + 1)
    for s in (None, snr):
        _close(wiener_volume(nd, wd, BOX, PAD, s), wiener_volume(nh, wh, BOX, PAD, s), 1e-4)
    _close(
        wiener_volume(nd, wd, BOX, PAD, snr, radius=8.0),
        wiener_volume(nh, wh, BOX, PAD, snr, radius=8.0),
        1e-4,
    )


def test_fsc_parity(cp):
    rng = np.random.default_rng(4)
    a = _volume(5) + 0.3 * rng.standard_normal((BOX,) * 3).astype(np.float32)
    b = _volume(5) + 0.3 * rng.standard_normal((BOX,) * 3).astype(np.float32)
    mask = soft_sphere(BOX, PIXEL, 60.0, 72.0)
    for m in (None, mask):
        c_h = fsc(a, b, m)
        c_d = fsc(cp.asarray(a), cp.asarray(b), None if m is None else cp.asarray(m))
        assert isinstance(c_d, np.ndarray)
        np.testing.assert_allclose(c_d, c_h, atol=1e-6)
    np.testing.assert_allclose(
        masked_fsc_corrected(cp.asarray(a), cp.asarray(b), cp.asarray(mask)),
        masked_fsc_corrected(a, b, mask),
        atol=1e-5,
    )


def test_compute_ctf_parity(cp):
    params = _ctf_params(20)
    _, kx, ky = half_plane_indices(BOX, BOX / 2)
    f = 1.0 / (BOX * PIXEL)
    c_h = compute_ctf(params, kx * f, ky * f)
    c_d = compute_ctf(cp.asarray(params), cp.asarray(kx) * f, cp.asarray(ky) * f)
    assert get_xp(c_d) is cp
    _close(c_d, c_h, 1e-5)


def _particles(n: int, seed: int = 6):
    """Noisy CTF-modulated projections (n, D, D) of a volume at grid poses, their CTF
    parameters and the true rotations."""
    rng = np.random.default_rng(seed)
    vol = _volume(7)
    grid = prepare_reference(vol, PAD)
    rots = so3_grid(30.0)[rng.choice(len(so3_grid(30.0)), n, replace=False)].astype(np.float32)
    kyy, kxx = rfft_frequencies(BOX)
    kx, ky = kxx.ravel().astype(np.float32), kyy.ravel().astype(np.float32)
    params = _ctf_params(n, seed)
    c = compute_ctf(params, kx / (BOX * PIXEL), ky / (BOX * PIXEL))
    spec = (project(grid, rots, kx, ky, PAD) * c).reshape(n, BOX, BOX // 2 + 1)
    imgs = irfft2_centered(spec, BOX)
    imgs = imgs / imgs.std() + 0.5 * rng.standard_normal(imgs.shape).astype(np.float32)
    return imgs.astype(np.float32), params, vol


@pytest.mark.parametrize("fit_scale", [False, True], ids=["plain", "per_particle_scale"])
def test_search_poses_parity(cp, fit_scale):
    imgs, params, vol = _particles(24)
    other = _volume(8)
    settings = SearchSettings(
        box=BOX,
        pixel_size=PIXEL,
        res_limit_px=10.0,
        coarse_step_deg=30.0,
        levels=1,
        shift_range_px=1.0,
        shift_step_px=1.0,
        n_candidates=2,
        batch_size=8,
        per_particle_scale=fit_scale,
    )
    rots = so3_grid(30.0)
    sigma2 = np.full(BOX // 2 + 1, 0.25, np.float32)
    res = {}
    for xp in (np, cp):
        grids = [prepare_reference(xp.asarray(v), PAD) for v in (vol, other)]
        spectra = rfft2_centered(xp.asarray(imgs))
        res[xp.__name__] = search_poses(
            spectra, xp.asarray(params), xp.asarray(sigma2), grids, rots, settings
        )
    h, d = res["numpy"], res[cp.__name__]
    for name in ("rots", "shifts", "score", "best_ll", "pose_peak"):
        assert isinstance(getattr(d, name), np.ndarray), name
    # the same best poses, except for the odd near-tie under float32 GEMM rounding
    same = np.all(np.abs(d.rots - h.rots) < 1e-4, axis=(2, 3)) & np.all(
        np.abs(d.shifts - h.shifts) < 1e-4, axis=2
    )
    assert same.mean() >= 0.9, same
    scale = np.abs(h.score).max()
    np.testing.assert_allclose(d.score[same], h.score[same], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(d.best_ll[same], h.best_ll[same], rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(d.coarse_evidence, h.coarse_evidence, rtol=0, atol=1e-4 * scale)
    if fit_scale:
        assert h.scale is not None and d.scale is not None
        np.testing.assert_allclose(np.asarray(d.scale)[same], np.asarray(h.scale)[same], rtol=1e-3)
    # and the class choice is the same for every particle
    np.testing.assert_array_equal(d.score.argmax(axis=1), h.score.argmax(axis=1))
