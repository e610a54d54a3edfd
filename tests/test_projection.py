"""Fourier-slice projection against analytic projections; backprojection as its adjoint."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.backend import get_xp, to_host
from hetrefine.fourier import half_plane_indices, irfft2_centered, rfft2_centered, rfft_frequencies
from hetrefine.projection import (
    backproject,
    backproject_packed,
    grid_half_size,
    half_ball_mask,
    hermitian_complete,
    hermitian_unpack,
    phase_shifts,
    prepare_reference,
    project,
    slice_coordinates,
)
from hetrefine.rotations import euler_to_matrix, random_rotations

PAD = 2


def gaussian_blobs(box: int, n: int = 4, seed: int = 0, spread: float = 2.5):
    """A compact volume (D, D, D) float32 (indices z, y, x; origin D//2) made of ``n``
    Gaussians, and their (amplitudes (n,), centres (n, 3) as x, y, z, sds (n,))."""
    rng = np.random.default_rng(seed)
    amps = rng.uniform(0.5, 1.5, n)
    centres = rng.uniform(-spread, spread, (n, 3))
    sds = rng.uniform(1.5, 2.5, n)
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((box,) * 3)
    for a, c, s in zip(amps, centres, sds, strict=True):
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32), (amps, centres, sds)


def analytic_projections(box: int, blobs, rots: np.ndarray) -> np.ndarray:
    """Exact projections (r, D, D) (indices y, x) of the Gaussians for poses (r, 3, 3).

    hetrefine's convention: the image for pose A is the z-projection of V(A^T r), so a
    Gaussian at c with sd s becomes a 2D Gaussian of amplitude sqrt(2 pi) s at (A c)_xy.
    """
    amps, centres, sds = blobs
    g = np.arange(box) - box // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    out = np.zeros((len(rots), box, box))
    for i, a_mat in enumerate(rots):
        for a, c, s in zip(amps, centres, sds, strict=True):
            cx, cy, _ = a_mat @ c
            out[i] += (
                a * np.sqrt(2 * np.pi) * s * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
            )
    return out


def _full_layout(box: int, xp):
    kyy, kxx = rfft_frequencies(box)
    return xp.asarray(kxx.ravel().astype(np.float32)), xp.asarray(kyy.ravel().astype(np.float32))


def test_slice_coordinates(xp):
    rng = np.random.default_rng(0)
    rots = random_rotations(3, rng)
    kx, ky = rng.uniform(-8, 8, 5), rng.uniform(-8, 8, 5)
    got = to_host(slice_coordinates(xp.asarray(rots), xp.asarray(kx), xp.asarray(ky), PAD))
    k3 = np.stack([kx, ky, np.zeros(5)], axis=1)
    expect = PAD * np.einsum("rji,mj->irm", rots, k3)  # pad * A^T k, axis first
    np.testing.assert_allclose(got, expect, atol=1e-10)


def test_projection_matches_analytic_projection(xp):
    box = 32
    vol, blobs = gaussian_blobs(box, seed=1)
    rots = np.concatenate(
        [
            euler_to_matrix(np.array([[0.0, 0.0, 0.0], [0.0, 90.0, 0.0], [30.0, 60.0, -45.0]])),
            random_rotations(5, np.random.default_rng(2)),
        ]
    )
    grid = prepare_reference(xp.asarray(vol), PAD)
    assert get_xp(grid) is xp and grid.dtype == np.complex64
    assert grid.shape == (2 * grid_half_size(box, PAD) + 1,) * 3
    kx, ky = _full_layout(box, xp)
    got = to_host(project(grid, xp.asarray(rots.astype(np.float32)), kx, ky, PAD))
    assert got.shape == (len(rots), box * (box // 2 + 1)) and got.dtype == np.complex64
    ref = to_host(rfft2_centered(analytic_projections(box, blobs, rots))).reshape(len(rots), -1)
    r = np.hypot(to_host(kx), to_host(ky))
    inside = r < 0.8 * box / 2
    for i in range(len(rots)):
        err = np.linalg.norm(got[i, inside] - ref[i, inside]) / np.linalg.norm(ref[i, inside])
        assert err < 1e-2, f"pose {i}: relative error {err:.3g}"
        # the opposite convention (Gaussians at A^T c) is far off: the test can tell
    wrong = to_host(rfft2_centered(analytic_projections(box, blobs, rots.transpose(0, 2, 1))))
    wrong = wrong.reshape(len(rots), -1)
    err_wrong = np.linalg.norm(got[3:, inside] - wrong[3:, inside]) / np.linalg.norm(
        wrong[3:, inside]
    )
    assert err_wrong > 0.1


def test_projection_of_off_centre_content(xp):
    """Content ~10 px off centre (box 32) tests the gridding correction: without it the
    trilinear kernel attenuates such content by ~6% at mid-cell points; with it the
    error left is the pad-2 kernel's aliasing, about 3% here."""
    box = 32
    blobs = (
        np.array([1.0, 1.0]),
        np.array([[9.0, -3.0, 4.0], [-1.0, 1.0, 0.0]]),
        np.array([1.5, 1.5]),
    )
    g = np.arange(box) - box // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = sum(
        a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
        for a, c, s in zip(*blobs, strict=True)
    ).astype(np.float32)
    rots = random_rotations(10, np.random.default_rng(10))
    grid = prepare_reference(xp.asarray(vol), PAD)
    kx, ky = _full_layout(box, xp)
    got = to_host(project(grid, xp.asarray(rots.astype(np.float32)), kx, ky, PAD))
    ref = to_host(rfft2_centered(analytic_projections(box, blobs, rots))).reshape(len(rots), -1)
    inside = np.hypot(to_host(kx), to_host(ky)) < 0.8 * box / 2
    err = np.linalg.norm(got[:, inside] - ref[:, inside], axis=1) / np.linalg.norm(
        ref[:, inside], axis=1
    )
    assert err.max() < 0.04, err


def _identity_projection_error(box: int, xp) -> float:
    vol, _ = gaussian_blobs(box, seed=1)
    grid = prepare_reference(xp.asarray(vol), PAD)
    kx, ky = _full_layout(box, xp)
    spec = project(grid, xp.asarray(np.eye(3, dtype=np.float32)[None]), kx, ky, PAD)
    img = to_host(irfft2_centered(spec.reshape(1, box, box // 2 + 1), box))[0]
    direct = vol.astype(np.float64).sum(axis=0)
    return float(np.abs(img - direct).max() / direct.max())


def test_real_space_projection_of_identity_pose(xp):
    """Pose identity: the image is the plain sum of the volume along z (a direct
    real-space projection). Every slice point then sits on a grid node, the worst case
    for the pre-divided trilinear kernel: the error is the gridding correction left in,
    about (pi r / (pad D))^2 / 3 for content at radius r, so it falls as 1/D^2."""
    e32 = _identity_projection_error(32, xp)
    e48 = _identity_projection_error(48, xp)
    assert e32 < 1e-2
    assert e48 < 0.6 * e32


def test_radius_limited_reference(xp):
    box, radius = 24, 6.0
    vol, _ = gaussian_blobs(box, seed=4)
    full = prepare_reference(xp.asarray(vol), PAD)
    small = prepare_reference(xp.asarray(vol), PAD, radius=radius)
    assert small.shape[0] == 2 * grid_half_size(box, PAD, radius) + 1 < full.shape[0]
    _, kx, ky = half_plane_indices(box, radius, xp)
    rots = xp.asarray(random_rotations(4, np.random.default_rng(5)).astype(np.float32))
    np.testing.assert_allclose(
        to_host(project(small, rots, kx, ky, PAD)),
        to_host(project(full, rots, kx, ky, PAD)),
        atol=1e-5,
    )


def _random_complex(rng, shape):
    return rng.standard_normal(shape) + 1j * rng.standard_normal(shape)


def test_backprojection_is_adjoint_of_projection(xp):
    """<P g, v> = <g, P^T v> for random complex g and v (complex inner products)."""
    box = 16
    rng = np.random.default_rng(6)
    half = grid_half_size(box, PAD)
    n = 2 * half + 1
    g = _random_complex(rng, (n, n, n))
    rots = random_rotations(6, rng).astype(np.float32)
    _, kx, ky = half_plane_indices(box, box / 2 - 1, xp)
    v = _random_complex(rng, (6, kx.shape[0]))
    pg = to_host(project(xp.asarray(g.astype(np.complex64)), xp.asarray(rots), kx, ky, PAD))
    num = xp.zeros((n, n, n), xp.complex128)
    wgt = xp.zeros((n, n, n), xp.float64)
    backproject(
        num,
        wgt,
        xp.asarray(rots),
        kx,
        ky,
        xp.asarray(v.astype(np.complex64)),
        xp.ones(v.shape, xp.float32),
        PAD,
    )
    ptv = to_host(num)
    lhs = np.vdot(pg.astype(np.complex128), v.astype(np.complex64).astype(np.complex128))
    rhs = np.vdot(g.astype(np.complex64).astype(np.complex128), ptv)
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)
    # the weight grid is the backprojection of ones: the same adjoint with real values
    w = to_host(wgt)
    ones_bp = xp.zeros((n, n, n), xp.complex128)
    backproject(ones_bp, None, xp.asarray(rots), kx, ky, xp.ones(v.shape, xp.complex64), None, PAD)
    np.testing.assert_allclose(to_host(ones_bp).real, w, atol=1e-9)
    # each slice point spreads a total weight of 1 over its 8 corners
    assert w.sum() == pytest.approx(v.size, rel=1e-6)


def test_backprojection_partial_sums_add_up(xp):
    box = 16
    rng = np.random.default_rng(7)
    n = 2 * grid_half_size(box, PAD) + 1
    rots = random_rotations(20, rng).astype(np.float32)
    _, kx, ky = half_plane_indices(box, box / 2 - 1, xp)
    vals = _random_complex(rng, (20, kx.shape[0])).astype(np.complex64)
    wts = rng.uniform(0.1, 2.0, (20, kx.shape[0])).astype(np.float32)

    def run(sel_list):
        num = xp.zeros((n, n, n), xp.complex128)
        wgt = xp.zeros((n, n, n), xp.float64)
        for sel in sel_list:
            backproject(
                num,
                wgt,
                xp.asarray(rots[sel]),
                kx,
                ky,
                xp.asarray(vals[sel]),
                xp.asarray(wts[sel]),
                PAD,
            )
        return to_host(num), to_host(wgt)

    whole = run([slice(0, 20)])
    parts = run([slice(0, 7), slice(7, 8), slice(8, 20)])
    scale = np.abs(whole[0]).max()
    np.testing.assert_allclose(parts[0], whole[0], atol=1e-9 * scale)
    np.testing.assert_allclose(parts[1], whole[1], atol=1e-9 * whole[1].max())
    assert scale > 0
    # separate grids summed afterwards (as shards are gathered) agree too
    a = run([slice(0, 11)])
    b = run([slice(11, 20)])
    np.testing.assert_allclose(a[0] + b[0], whole[0], atol=1e-9 * scale)
    np.testing.assert_allclose(a[1] + b[1], whole[1], atol=1e-9 * whole[1].max())


def test_hermitian_complete(xp):
    rng = np.random.default_rng(8)
    n = 9
    num = xp.asarray(_random_complex(rng, (n, n, n)))
    wgt = xp.asarray(rng.uniform(size=(n, n, n)))
    nc, wc = hermitian_complete(num, wgt)
    nc, wc = to_host(nc), to_host(wc)
    np.testing.assert_allclose(nc, np.conj(nc[::-1, ::-1, ::-1]))
    np.testing.assert_allclose(wc, wc[::-1, ::-1, ::-1])
    # a Hermitian-complete grid transforms to a real volume
    vol = np.fft.ifftn(np.fft.ifftshift(nc))
    assert np.abs(vol.imag).max() < 1e-10 * np.abs(vol.real).max()


@pytest.mark.parametrize("shift", [(3, 0), (0, -2), (5, 4), (-7, 1)])
def test_phase_shifts_move_content_by_plus_shift(xp, shift):
    box = 16
    rng = np.random.default_rng(9)
    img = rng.standard_normal((1, box, box)).astype(np.float32)
    kx, ky = _full_layout(box, xp)
    ph = phase_shifts(kx, ky, xp.asarray(np.array([shift], np.float32)), box)
    assert ph.shape == (1, kx.shape[0]) and ph.dtype == np.complex64
    spec = rfft2_centered(xp.asarray(img)).reshape(1, -1) * ph
    moved = to_host(irfft2_centered(spec.reshape(1, box, box // 2 + 1), box))
    expect = np.roll(img, shift=(shift[1], shift[0]), axis=(1, 2))  # +y rows, +x columns
    np.testing.assert_allclose(moved, expect, atol=1e-5)
    # conjugate phases move it back
    back = irfft2_centered((spec * ph.conj()).reshape(1, box, box // 2 + 1), box)
    np.testing.assert_allclose(to_host(back), img, atol=1e-5)


def test_phase_shifts_fractional_moves_smooth_blob(xp):
    box = 32
    g = np.arange(box) - box // 2
    y, x = np.meshgrid(g, g, indexing="ij")
    img = np.exp(-((x - 1.0) ** 2 + (y + 2.0) ** 2) / (2 * 2.0**2))[None].astype(np.float32)
    kx, ky = _full_layout(box, xp)
    ph = phase_shifts(kx, ky, xp.asarray(np.array([[0.5, 1.25]], np.float32)), box)
    spec = rfft2_centered(xp.asarray(img)).reshape(1, -1) * ph
    moved = to_host(irfft2_centered(spec.reshape(1, box, box // 2 + 1), box))[0]
    expect = np.exp(-((x - 1.5) ** 2 + (y + 0.75) ** 2) / (2 * 2.0**2))
    np.testing.assert_allclose(moved, expect, atol=1e-4)


def test_backproject_packed_equals_completed_cubes(xp):
    """Backprojecting straight into the packed half ball (a quarter of the cube)
    gives the Friedel-completed cube's values there, the zero frequency included;
    packed sums of two shards add and unpack to the sum of the completed cubes."""
    box, pad, radius = 16, 2, 7.0
    n = 2 * grid_half_size(box, pad, radius) + 1
    mask = half_ball_mask(n)
    assert mask.sum() < 0.27 * n**3
    _, kx, ky = half_plane_indices(box, radius, xp, include_dc=True)
    rng = np.random.default_rng(13)
    cubes = [np.zeros((n, n, n), complex), np.zeros((n, n, n))]
    packed = [np.zeros(int(mask.sum()), complex), np.zeros(int(mask.sum()))]
    for _shard in range(2):
        rots = xp.asarray(random_rotations(15, rng).astype(np.float32))
        vals = xp.asarray(_random_complex(rng, (15, kx.shape[0])))
        wts = xp.abs(vals) ** 2
        num = xp.zeros((n, n, n), xp.complex128)
        wgt = xp.zeros((n, n, n), xp.float64)
        backproject(num, wgt, rots, kx, ky, vals, wts, pad)
        ref_n, ref_w = (to_host(a) for a in hermitian_complete(num, wgt))
        num_p = xp.zeros(int(mask.sum()), xp.complex128)
        wgt_p = xp.zeros(int(mask.sum()), xp.float64)
        backproject_packed(num_p, wgt_p, n, rots, kx, ky, vals, wts, pad)
        np.testing.assert_allclose(to_host(num_p), ref_n[mask], atol=1e-9 * np.abs(ref_n).max())
        np.testing.assert_allclose(to_host(wgt_p), ref_w[mask], atol=1e-9 * ref_w.max())
        centre = int(mask.ravel()[: (n**3 - 1) // 2].sum())  # packed index of the zero frequency
        assert abs(to_host(num_p)[centre].real) > 0 and abs(to_host(num_p)[centre].imag) < 1e-12
        cubes = [cubes[0] + ref_n, cubes[1] + ref_w]
        packed = [packed[0] + to_host(num_p), packed[1] + to_host(wgt_p)]
    num_u, wgt_u = hermitian_unpack(packed[0], packed[1], n)
    np.testing.assert_allclose(num_u, cubes[0], atol=1e-9 * np.abs(cubes[0]).max())
    np.testing.assert_allclose(wgt_u, cubes[1], atol=1e-9 * cubes[1].max())
