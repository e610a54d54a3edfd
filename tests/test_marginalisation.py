"""Pose marginalisation: the significant poses of the final local search and the
backprojection of each image over them (equal to the best-pose backprojection
when the pose posterior is a delta; linear in the pose weights)."""

from __future__ import annotations

import numpy as np
import pytest

from hetrefine.alignment import SearchSettings, search_poses, significant_poses
from hetrefine.backend import to_host
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices, rfft2_centered
from hetrefine.projection import (
    backproject_packed,
    backproject_poses_packed,
    grid_half_size,
    half_ball_mask,
    phase_shifts,
    prepare_reference,
    project,
)
from hetrefine.rotations import random_rotations
from hetrefine.sampling import so3_grid

BOX = 24


def _particles(xp, n=6, seed=0):
    rng = np.random.default_rng(seed)
    y = (
        rng.normal(size=(n, BOX, BOX // 2 + 1)) + 1j * rng.normal(size=(n, BOX, BOX // 2 + 1))
    ).astype(np.complex64)
    flat, kx, ky = half_plane_indices(BOX, BOX / 2 - 1, xp, include_dc=True)
    vals = xp.asarray(y).reshape(n, -1)[:, flat]
    wts = xp.asarray(rng.uniform(0.1, 1.0, vals.shape).astype(np.float32))
    rots = random_rotations(n * 3, rng).reshape(n, 3, 3, 3)
    shifts = rng.uniform(-2, 2, (n, 3, 2)).astype(np.float32)
    return kx, ky, vals, wts, rots, shifts


def _empty(xp):
    size = 2 * grid_half_size(BOX, 2, BOX / 2 - 1) + 1
    n_p = int(half_ball_mask(size).sum())
    return size, xp.zeros(n_p, xp.complex128), xp.zeros(n_p, xp.float64)


def test_delta_posterior_equals_best_pose_backprojection(xp):
    kx, ky, vals, wts, rots, shifts = _particles(xp)
    size, num_a, wgt_a = _empty(xp)
    _, num_b, wgt_b = _empty(xp)
    weights = np.zeros((len(rots), 3))
    weights[:, 1] = 1.0  # all the posterior on the second pose
    backproject_poses_packed(num_a, wgt_a, size, rots, shifts, weights, kx, ky, vals, wts, BOX)
    centred = vals * phase_shifts(kx, ky, xp.asarray(shifts[:, 1]), BOX).conj()
    backproject_packed(num_b, wgt_b, size, xp.asarray(rots[:, 1]), kx, ky, centred, wts)
    num_a, num_b = to_host(num_a), to_host(num_b)
    assert np.abs(num_a - num_b).max() < 1e-5 * np.abs(num_b).max()
    assert np.allclose(
        to_host(wgt_a), to_host(wgt_b), rtol=1e-6, atol=1e-6 * float(to_host(wgt_b).max())
    )


def test_weighted_poses_add_linearly(xp):
    kx, ky, vals, wts, rots, shifts = _particles(xp, seed=1)
    rots[:3, 1] = rots[:3, 0]  # one rotation at two shifts: summed in 2D before backprojecting
    size, num_a, wgt_a = _empty(xp)
    weights = np.array([0.6, 0.3, 0.1])[None].repeat(len(rots), 0)
    backproject_poses_packed(num_a, wgt_a, size, rots, shifts, weights, kx, ky, vals, wts, BOX)
    _, num_b, wgt_b = _empty(xp)
    for j, wj in enumerate([0.6, 0.3, 0.1]):
        one = np.zeros_like(weights)
        one[:, j] = 1.0
        _, n_j, w_j = _empty(xp)
        backproject_poses_packed(n_j, w_j, size, rots, shifts, one, kx, ky, vals, wts, BOX)
        num_b += wj * n_j
        wgt_b += wj * w_j
    assert np.abs(to_host(num_a - num_b)).max() < 1e-5 * np.abs(to_host(num_b)).max()
    assert np.abs(to_host(wgt_a - wgt_b)).max() < 1e-5 * float(to_host(wgt_b).max())


def test_significant_poses_truncate_at_mass_and_count():
    ll = np.log(np.array([[0.05, 0.5, 0.3, 0.15, 0.0001, 0.0001, 0.0]]) + 1e-300)
    lse = np.log(np.exp(ll).sum(axis=1))
    idx, w = significant_poses(ll, lse, n_max=5, mass=0.9)
    # 0.5 + 0.3 = 0.8 < 0.9, so 0.15 is kept too; then the mass is reached
    assert idx[0, :3].tolist() == [1, 2, 3]
    assert np.allclose(w[0, :3], np.array([0.5, 0.3, 0.15]) / 0.95)
    assert np.all(w[0, 3:] == 0)
    idx, w = significant_poses(ll, lse, n_max=2, mass=0.999)
    assert idx[0].tolist() == [1, 2] and np.isclose(w.sum(), 1.0)


def test_search_keeps_best_pose_first_and_spreads_at_low_snr():
    rng = np.random.default_rng(3)
    blobs = rng.normal(0, 3, (40, 3))
    g = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = sum(
        np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 2.0) for c in blobs
    ).astype(np.float32)
    grid = prepare_reference(vol, 2)
    n = 12
    rots = random_rotations(n, rng)
    _, kx, ky = half_plane_indices(BOX, BOX // 2, np, include_dc=True)
    ctf = np.zeros((n, 8), np.float32)
    ctf[:, 0] = ctf[:, 1] = 15000
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = 300, 2.7, 0.1
    from hetrefine.fourier import irfft2_centered, rfft_frequencies

    kyy, kxx = rfft_frequencies(BOX)
    c = compute_ctf(ctf, kxx.ravel() / (BOX * 3.0), kyy.ravel() / (BOX * 3.0))
    clean = irfft2_centered(
        (
            project(
                grid,
                rots.astype(np.float32),
                kxx.ravel().astype(np.float32),
                kyy.ravel().astype(np.float32),
            )
            * c
        ).reshape(n, BOX, BOX // 2 + 1),
        BOX,
    )
    settings = SearchSettings(
        box=BOX,
        pixel_size=3.0,
        res_limit_px=10,
        coarse_step_deg=20,
        levels=2,
        shift_range_px=1,
        shift_step_px=1,
        max_significant=8,
    )
    peaks = []
    for noise_sd in (0.02 * clean.std(), 3.0 * clean.std()):
        imgs = clean + noise_sd * rng.standard_normal(clean.shape).astype(np.float32)
        spectra = rfft2_centered(imgs)
        sigma2 = np.full(BOX // 2 + 1, noise_sd**2, np.float32)
        res = search_poses(spectra, ctf, sigma2, [grid], so3_grid(20).astype(np.float32), settings)
        assert res.sig_weights.shape == (n, 1, 8)
        assert np.allclose(res.sig_weights.sum(axis=-1), 1.0)
        assert np.allclose(res.sig_rots[:, :, 0], res.rots, atol=1e-6)  # the best pose first
        assert np.allclose(res.sig_shifts[:, :, 0], res.shifts)
        assert np.all(np.diff(res.sig_weights, axis=-1) <= 1e-12)
        peaks.append(res.sig_weights[:, 0, 0])
    assert np.median(peaks[0]) > 0.99  # clean images: one pose
    assert np.median(peaks[1]) < 0.9 and np.mean((res.sig_weights[:, 0] > 0).sum(-1)) > 2


@pytest.mark.parametrize("levels", [0])
def test_without_local_levels_the_best_pose_has_all_weight(levels):
    rng = np.random.default_rng(0)
    vol = rng.normal(size=(BOX,) * 3).astype(np.float32)
    spectra = rfft2_centered(rng.normal(size=(3, BOX, BOX)).astype(np.float32))
    ctf = np.zeros((3, 8), np.float32)
    ctf[:, 0] = ctf[:, 1] = 15000
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = 300, 2.7, 0.1
    settings = SearchSettings(
        box=BOX,
        pixel_size=3.0,
        res_limit_px=6,
        coarse_step_deg=30,
        levels=levels,
        shift_range_px=0,
        shift_step_px=1,
    )
    res = search_poses(
        spectra,
        ctf,
        np.ones(BOX // 2 + 1, np.float32),
        [prepare_reference(vol)],
        so3_grid(30).astype(np.float32),
        settings,
    )
    assert np.all(res.sig_weights[..., 0] == 1) and np.all(res.sig_weights[..., 1:] == 0)
    assert np.allclose(res.sig_rots[:, :, 0], res.rots)


def test_fine_evidence_of_unrefined_pairs_keeps_their_coarse_weight():
    rng = np.random.default_rng(2)
    vols = [rng.normal(size=(BOX,) * 3).astype(np.float32) for _ in range(2)]
    spectra = rfft2_centered(rng.normal(size=(4, BOX, BOX)).astype(np.float32))
    ctf = np.zeros((4, 8), np.float32)
    ctf[:, 0] = ctf[:, 1] = 15000
    ctf[:, 3], ctf[:, 4], ctf[:, 5] = 300, 2.7, 0.1
    settings = SearchSettings(
        box=BOX,
        pixel_size=3.0,
        res_limit_px=10,
        coarse_step_deg=30,
        levels=1,
        shift_range_px=1,
        shift_step_px=1,
    )
    mask = np.array([[True, False], [True, True], [False, True], [True, True]])
    res = search_poses(
        spectra,
        ctf,
        np.ones(BOX // 2 + 1, np.float32),
        [prepare_reference(v) for v in vols],
        so3_grid(30).astype(np.float32),
        settings,
        refine=lambda ev: mask,
    )
    d_c = res.coarse_evidence[:, 1] - res.coarse_evidence[:, 0]
    d_f = res.fine_evidence[:, 1] - res.fine_evidence[:, 0]
    assert np.allclose(d_f[[0, 2]], d_c[[0, 2]])  # one class refined: the coarse difference
    # both refined: the final level's own difference, not the coarse one
    assert np.allclose(d_f[[1, 3]], res.score[[1, 3], 1] - res.score[[1, 3], 0])
