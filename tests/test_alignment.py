"""Pose search: the GEMM log-likelihood equals a direct residual sum, poses and
per-particle scales are recovered from simulated images."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hetrefine.alignment import SearchSettings, coarse_search, search_poses
from hetrefine.backend import to_host
from hetrefine.ctf import compute_ctf
from hetrefine.fourier import half_plane_indices, rfft2_centered
from hetrefine.io.mrc import read_volume
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import iter_image_chunks
from hetrefine.likelihood import LSE_CUTOFF_NATS, loglik, sum_exp_near_max
from hetrefine.projection import phase_shifts, prepare_reference, project
from hetrefine.rotations import euler_to_matrix
from hetrefine.sampling import so3_grid
from hetrefine.simulate import SimulationSpec, simulate_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("align")
    spec = SimulationSpec(n_particles=120, box=32, snr=1.0, seed=5)
    summary = simulate_dataset(spec, out)
    table = read_particles(out / "particles.star")
    imgs = np.concatenate([c for _, c in iter_image_chunks(table, 256)])
    ctf = table[
        [
            "rlnDefocusU",
            "rlnDefocusV",
            "rlnDefocusAngle",
            "rlnVoltage",
            "rlnSphericalAberration",
            "rlnAmplitudeContrast",
            "rlnPhaseShift",
            "rlnCtfBfactor",
        ]
    ].to_numpy(np.float32)
    truth = pd.read_csv(out / "truth.csv")
    vols = [read_volume(out / f"truth_class_{k:02d}.mrc")[0] / summary["noise_sd"] for k in (1, 2)]
    return spec, imgs / summary["noise_sd"], ctf, truth, vols


def test_gemm_loglik_equals_direct_residual(dataset, xp):
    """cross/norm GEMMs give -|Y - ph C A|^2 / sigma2 up to the pose-independent |Y|^2 term."""
    spec, imgs, ctf, truth, vols = dataset
    box, px = spec.box, spec.pixel_size
    rng = np.random.default_rng(0)
    sigma2 = rng.uniform(0.5, 2.0, box // 2 + 1).astype(np.float32)
    settings = SearchSettings(
        box=box,
        pixel_size=px,
        res_limit_px=10,
        coarse_step_deg=30,
        shift_range_px=1,
        shift_step_px=1,
        n_candidates=3,
        levels=0,
    )
    grid = prepare_reference(xp.asarray(vols[0]), 2)
    y_full = rfft2_centered(xp.asarray(imgs[:4]))
    rots = xp.asarray(so3_grid(30).astype(np.float32))
    idx, shifts, ll, _ = coarse_search(
        y_full, xp.asarray(ctf[:4]), xp.asarray(sigma2), [grid], rots, settings
    )
    radius = settings.radius_for_step(30)
    flat, kx, ky = half_plane_indices(box, radius, xp)
    y = y_full.reshape(4, -1)[:, flat]
    c = compute_ctf(xp.asarray(ctf[:4]), kx / (box * px), ky / (box * px))
    s2 = xp.asarray(sigma2)[xp.rint(xp.sqrt(kx**2 + ky**2)).astype(int)]
    for p in range(4):
        for j in range(3):
            a = project(grid, rots[int(idx[p, 0, j])][None], kx, ky, 2)[0]
            ph = phase_shifts(kx, ky, xp.asarray(shifts[p, 0, j][None]), box)[0]
            direct = -float(to_host((xp.abs(y[p] - ph * c[p] * a) ** 2 / s2).sum()))
            assert ll[p, 0, j] == pytest.approx(direct, rel=1e-3, abs=0.05)


def test_poses_and_classes_recovered(dataset, xp):
    spec, imgs, ctf, truth, vols = dataset
    settings = SearchSettings(box=spec.box, pixel_size=spec.pixel_size, res_limit_px=12)
    grids = [prepare_reference(xp.asarray(v), 2) for v in vols]
    sigma2 = xp.ones(spec.box // 2 + 1, dtype=xp.float32)
    res = search_poses(
        rfft2_centered(xp.asarray(imgs)), xp.asarray(ctf), sigma2, grids, so3_grid(15), settings
    )
    lab = truth["class"].to_numpy() - 1
    assert (res.coarse_evidence.argmax(1) == lab).mean() >= 0.95
    n = len(lab)
    r_true = euler_to_matrix(truth[["rot", "tilt", "psi"]].to_numpy())
    r = res.rots[np.arange(n), lab]
    cos = (np.trace(np.einsum("nij,nkj->nik", r, r_true), axis1=1, axis2=2) - 1) / 2
    err = np.rad2deg(np.arccos(np.clip(cos, -1, 1)))
    assert np.median(err) < 6.0, np.median(err)
    t = res.shifts[np.arange(n), lab] * spec.pixel_size
    shift_err = np.hypot(t[:, 0] - truth["shift_x_A"], t[:, 1] - truth["shift_y_A"])
    assert np.median(shift_err) < 0.5 * spec.pixel_size


def test_per_particle_scale_recovered(dataset):
    spec, imgs, ctf, truth, vols = dataset
    rng = np.random.default_rng(1)
    factor = rng.uniform(0.5, 2.0, len(imgs)).astype(np.float32)
    # scale signal and noise alike, as a varying ice thickness/normalisation does
    scaled = imgs * factor[:, None, None]
    settings = SearchSettings(
        box=spec.box, pixel_size=spec.pixel_size, res_limit_px=12, per_particle_scale=True
    )
    lab = truth["class"].to_numpy() - 1
    res = search_poses(
        rfft2_centered(scaled),
        ctf,
        np.ones(spec.box // 2 + 1, np.float32),
        [prepare_reference(v, 2) for v in vols],
        so3_grid(15),
        settings,
    )
    est = res.scale[np.arange(len(lab)), lab]
    assert np.corrcoef(est, factor)[0, 1] > 0.9
    assert np.median(est / factor) == pytest.approx(1.0, abs=0.15)


def test_loglik_scale_profile():
    cross = np.array([2.0, -1.0])
    norm = np.array([4.0, 4.0])
    assert np.allclose(loglik(cross, norm, False, np), [0.0, -6.0])
    assert np.allclose(loglik(cross, norm, True, np), [1.0, 0.0])  # cross^2/norm, a >= 0


@pytest.mark.parametrize("spread", [3000.0, 5.0])
def test_evidence_sum_near_max_equals_full_sum(spread, xp):
    """The coarse evidence sums exp(ll - max) only near the best pose: equal to the
    full float64 sum both for peaked likelihoods (most of the grid left out) and for
    flat ones (most of the grid kept)."""
    rng = np.random.default_rng(3)
    ll = (-spread * rng.random((5, 29, 400))).astype(np.float32)
    ll[np.arange(5), rng.integers(0, 29, 5), rng.integers(0, 400, 5)] = 0.0
    ll[2, 3, 7] = -0.5 * LSE_CUTOFF_NATS  # a second pose inside the cut-off
    full = np.exp(ll.astype(np.float64) - ll.max(axis=(1, 2))[:, None, None]).sum(axis=(1, 2))
    ll_x = xp.asarray(ll)
    ll_r = ll_x.max(axis=1)
    got = to_host(sum_exp_near_max(ll_x, ll_r, ll_r.max(axis=1), xp))
    np.testing.assert_allclose(got, full, rtol=1e-6)
    assert got[2] > 1.0 + 0.9 * np.exp(-0.5 * LSE_CUTOFF_NATS)
