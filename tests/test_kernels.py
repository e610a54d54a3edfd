"""The compiled CPU kernels (hetrefine.kernels, Numba) against the numpy reference
path: the same projections, scatters and local-search scores to float32 rounding,
and the switch between the two paths."""

from __future__ import annotations

import dataclasses
import gc

import numpy as np
import pandas as pd
import pytest

from hetrefine import kernels, projection
from hetrefine.alignment import SearchSettings, search_poses
from hetrefine.backprojection import SumsGrid, hard_class_sums, marginalised_class_sums
from hetrefine.fourier import half_plane_indices, rfft2_centered
from hetrefine.io.mrc import read_volume
from hetrefine.io.particles import read_particles
from hetrefine.io.stacks import iter_image_chunks
from hetrefine.likelihood import reduce_coarse
from hetrefine.projection import (
    backproject_packed,
    backproject_poses_packed,
    grid_half_size,
    half_ball_mask,
    prepare_reference,
    project,
    slice_scores,
)
from hetrefine.rotations import euler_to_matrix, random_rotations
from hetrefine.sampling import perturbations, so3_grid
from hetrefine.simulate import SimulationSpec, simulate_dataset

pytestmark = pytest.mark.skipif(not kernels.numba_available(), reason="Numba not installed")

BOX = 32
CTF_COLUMNS = (
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnPhaseShift", "rlnCtfBfactor",
)  # fmt: skip


def _volume(seed: int = 0) -> np.ndarray:
    """A smooth random volume (D, D, D) float32: Gaussians at random places."""
    rng = np.random.default_rng(seed)
    g = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    vol = np.zeros((BOX,) * 3)
    for c in rng.uniform(-6, 6, (6, 3)):
        vol += np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / 8.0)
    return vol.astype(np.float32)


def _rotations(rng, n: int) -> np.ndarray:
    """Random rotations plus the identity and quarter turns (points on grid planes)."""
    quarter = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]], np.float64)
    return np.concatenate([np.eye(3)[None], quarter[None], random_rotations(n, rng)])


@pytest.mark.parametrize("radius", [None, 9.0])
def test_projection_kernel_equals_numpy_path(radius):
    rng = np.random.default_rng(1)
    grid = prepare_reference(_volume(), 2, radius)
    _, kx, ky = half_plane_indices(BOX, radius or BOX / 2 - 1, np, include_dc=True)
    rots = _rotations(rng, 40).astype(np.float32)
    ref = project(grid, rots, kx, ky, 2, kernel="numpy")
    got = project(grid, rots, kx, ky, 2, kernel="numba")
    assert got.dtype == np.complex64 and got.shape == ref.shape
    # the same float32 operations in the same order: equal to rounding (bitwise here)
    assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()
    # rotations batched with leading axes, as the searches pass them
    got2 = project(grid, rots[2:].reshape(4, 10, 3, 3), kx, ky, 2, kernel="numba")
    np.testing.assert_array_equal(got2.reshape(40, -1), got[2:])


def test_gathers_read_a_compact_copy_of_the_grid():
    """The compiled gathers read a copy of the grid's centre that holds the points'
    radius (made once, grown for a wider radius, dropped with the grid), with the
    values of the whole grid: bitwise the numpy path's, at every radius."""
    rng = np.random.default_rng(6)
    grid = prepare_reference(_volume(), 2)  # half size 34: the whole Nyquist cube
    rots = _rotations(rng, 30).astype(np.float32)
    for radius, half_copy in ((5.0, 12), (12.0, 26), (5.0, 26), (15.0, 34)):
        _, kx, ky = half_plane_indices(BOX, radius, np, include_dc=True)
        ref = project(grid, rots, kx, ky, 2, kernel="numpy")
        np.testing.assert_array_equal(project(grid, rots, kx, ky, 2, kernel="numba"), ref)
        x = np.ones((1, 1, 9, len(kx)), np.complex64)
        c2w = np.ones((1, len(kx)), np.float32)
        cand = rots[:19].reshape(1, 1, 19, 3, 3)
        np.testing.assert_allclose(
            slice_scores(grid, cand, kx, ky, x, c2w, 2, kernel="numba")[1],
            slice_scores(grid, cand, kx, ky, x, c2w, 2, kernel="numpy")[1], rtol=1e-5,
        )  # fmt: skip
        held = projection._COMPACT.get(id(grid))
        if half_copy < 34:
            assert held[1] == half_copy and held[2].size == 2 * (2 * half_copy + 1) ** 3
    key = id(grid)
    del grid
    gc.collect()
    assert key not in projection._COMPACT


def _packed(size):
    n_p = int(half_ball_mask(size).sum())
    return np.zeros(n_p, np.complex128), np.zeros(n_p, np.float64)


@pytest.mark.parametrize("dtypes", [(np.complex64, np.float32), (np.complex128, np.float64)])
@pytest.mark.parametrize("with_weights", [True, False])
def test_scatter_kernel_equals_numpy_path(dtypes, with_weights):
    rng = np.random.default_rng(2)
    radius = BOX / 2 - 1
    _, kx, ky = half_plane_indices(BOX, radius, np, include_dc=True)
    size = 2 * grid_half_size(BOX, 2, radius) + 1
    rots = _rotations(rng, 30)
    vals = rng.normal(size=(len(rots), len(kx))) + 1j * rng.normal(size=(len(rots), len(kx)))
    vals = vals.astype(dtypes[0])
    wts = rng.uniform(0.1, 1, vals.shape).astype(dtypes[1]) if with_weights else None
    (num_a, wgt_a), (num_b, wgt_b) = _packed(size), _packed(size)
    backproject_packed(num_a, wgt_a, size, rots, kx, ky, vals, wts, 2, kernel="numpy")
    backproject_packed(num_b, wgt_b, size, rots, kx, ky, vals, wts, 2, kernel="numba")
    assert np.abs(num_b - num_a).max() <= 1e-12 * np.abs(num_a).max()
    assert np.abs(num_a).max() > 0
    if with_weights:
        assert np.abs(wgt_b - wgt_a).max() <= 1e-12 * wgt_a.max()
    else:
        assert not wgt_b.any()
    # the centre holds v + conj(v): real
    centre = np.flatnonzero(np.flatnonzero(half_ball_mask(size)) == (size**3 - 1) // 2)[0]
    assert num_b[centre].imag == 0


def test_marginalised_scatter_kernel_equals_numpy_path():
    rng = np.random.default_rng(3)
    radius = BOX / 2 - 1
    _, kx, ky = half_plane_indices(BOX, radius, np, include_dc=True)
    size = 2 * grid_half_size(BOX, 2, radius) + 1
    n, p = 8, 4
    rots = random_rotations(n * p, rng).reshape(n, p, 3, 3)
    rots[:, 1] = rots[:, 0]  # a rotation at two shifts: summed in 2D first
    shifts = rng.uniform(-2, 2, (n, p, 2)).astype(np.float32)
    w = rng.uniform(0, 1, (n, p))
    w[:, 3] = 0.0
    vals = (rng.normal(size=(n, len(kx))) + 1j * rng.normal(size=(n, len(kx)))).astype(np.complex64)
    wts = rng.uniform(0.1, 1, vals.shape).astype(np.float32)
    out = {}
    for k in ("numpy", "numba"):
        num, wgt = _packed(size)
        backproject_poses_packed(num, wgt, size, rots, shifts, w, kx, ky, vals, wts, BOX, 2, k)
        out[k] = num, wgt
    assert np.abs(out["numba"][0] - out["numpy"][0]).max() <= 1e-12 * np.abs(out["numpy"][0]).max()
    assert np.abs(out["numba"][1] - out["numpy"][1]).max() <= 1e-12 * out["numpy"][1].max()


def test_local_scores_kernel_equals_numpy_path():
    rng = np.random.default_rng(4)
    grid = prepare_reference(_volume(), 2)
    _, kx, ky = half_plane_indices(BOX, 12.0, np)
    m, nb, n_c, n_s = len(kx), 3, 2, 9
    cand = np.matmul(
        perturbations(7.5, 19)[None, None],
        random_rotations(nb * n_c, rng).reshape(nb, n_c, 1, 3, 3),
    )
    x = (rng.normal(size=(nb, n_c, n_s, m)) + 1j * rng.normal(size=(nb, n_c, n_s, m))).astype(
        np.complex64
    )
    c2w = rng.uniform(0.1, 1, (nb, m)).astype(np.float32)
    cross_a, norm_a = slice_scores(grid, cand, kx, ky, x, c2w, 2, kernel="numpy")
    cross_b, norm_b = slice_scores(grid, cand, kx, ky, x, c2w, 2, kernel="numba")
    assert cross_b.shape == (nb, n_c, n_s, 19) and norm_b.shape == (nb, n_c, 19)
    # sums of m float32 products in another order: float32 rounding of the terms' scale
    a = project(grid, cand.reshape(-1, 3, 3), kx, ky, 2).reshape(nb, n_c, 19, m)
    scale = np.einsum("bcsm,bcpm->bcsp", np.abs(x), np.abs(a))
    assert np.all(np.abs(cross_b - cross_a) <= 1e-5 * scale)
    np.testing.assert_allclose(norm_b, norm_a, rtol=1e-5)
    # and against a float64 evaluation of the definition
    exact = np.einsum("bcsm,bcpm->bcsp", x.conj().astype(np.complex128), a).real
    assert np.all(np.abs(cross_b - exact) <= 1e-5 * scale)


def test_local_scores_shifted_kernel_equals_numpy_path():
    """The local search's form (transforms y ph made a block at a time in the kernel)
    against the numpy path and against the stored-x kernel."""
    rng = np.random.default_rng(8)
    grid = prepare_reference(_volume(), 2)
    _, kx, ky = half_plane_indices(BOX, 12.0, np)
    m, nb, n_c = len(kx), 3, 2
    cand = np.matmul(
        perturbations(7.5, 19)[None, None],
        random_rotations(nb * n_c, rng).reshape(nb, n_c, 1, 3, 3),
    )
    y = (rng.normal(size=(nb, n_c, m)) + 1j * rng.normal(size=(nb, n_c, m))).astype(np.complex64)
    ph = np.exp(1j * rng.uniform(0, 2 * np.pi, (9, m))).astype(np.complex64)
    c2w = rng.uniform(0.1, 1, (nb, m)).astype(np.float32)
    cross_a, norm_a = slice_scores(grid, cand, kx, ky, y, c2w, 2, kernel="numpy", ph=ph)
    cross_b, norm_b = slice_scores(grid, cand, kx, ky, y, c2w, 2, kernel="numba", ph=ph)
    x = y[:, :, None, :] * ph[None, None]
    cross_c, norm_c = slice_scores(grid, cand, kx, ky, x, c2w, 2, kernel="numba")
    assert cross_b.shape == (nb, n_c, 9, 19) and norm_b.shape == (nb, n_c, 19)
    a = project(grid, cand.reshape(-1, 3, 3), kx, ky, 2).reshape(nb, n_c, 19, m)
    scale = np.einsum("bcsm,bcpm->bcsp", np.abs(x), np.abs(a))
    assert np.all(np.abs(cross_b - cross_a) <= 1e-5 * scale)
    assert np.all(np.abs(cross_b - cross_c) <= 1e-5 * scale)
    np.testing.assert_array_equal(norm_b, norm_c)
    np.testing.assert_allclose(norm_b, norm_a, rtol=1e-5)


@pytest.mark.parametrize("fit_scale", [False, True])
@pytest.mark.parametrize("spread", [1.0, 400.0])
def test_coarse_reduce_kernel_equals_numpy_path(fit_scale, spread):
    """The coarse search's fused pass after its GEMMs: the same candidates, shifts
    and values as the numpy path, the evidence sum to float32 rounding; with a flat
    likelihood (every rotation within the cutoff: all exponentiated) and a peaked
    one (a few), in a padded batch (6 particles in GEMM rows for 8)."""
    rng = np.random.default_rng(5)
    nb, rows, n_s, n_r, n_c = 6, 8, 9, 301, 3
    cross = (spread * rng.standard_normal((rows * n_s, n_r))).astype(np.float32)
    if spread > 10:  # peaked: a best shift and a few rotations per particle
        cross[: nb * n_s : n_s + 1, :7] += 5 * spread
    cross[2 * n_s + 5] = cross[2 * n_s + 2]  # a tie: the first best shift is kept
    norm = rng.uniform(0.5, 2.0, (rows, n_r)).astype(np.float32)
    ref = reduce_coarse(cross.copy(), norm, nb, n_s, n_c, fit_scale, np, kernel="numpy")
    got = reduce_coarse(cross.copy(), norm, nb, n_s, n_c, fit_scale, np, kernel="numba")
    for name, a, b in zip(("r_idx", "s_idx", "top_ll", "mx"), ref[:4], got[:4]):
        np.testing.assert_array_equal(b, a, err_msg=name)
    assert got[4].dtype == np.float64 and np.all(got[4] >= 1.0)
    np.testing.assert_allclose(got[4], ref[4], rtol=3e-7)
    # and the definition, in float64
    ll = cross[: nb * n_s].reshape(nb, n_s, n_r).astype(np.float64)
    nm = norm[:nb, None, :].astype(np.float64)
    ll = ll * np.maximum(ll, 0) / nm if fit_scale else ll - nm
    mx = ll.max(axis=(1, 2))
    np.testing.assert_allclose(got[3], mx, rtol=1e-6)
    exact = np.exp(ll - mx[:, None, None]).sum(axis=(1, 2))
    np.testing.assert_allclose(got[4], exact, rtol=1e-5)
    n_near = (ll.max(axis=1) > mx[:, None] - 50).sum(axis=1)
    assert (n_near.min() == n_r) if spread < 10 else (n_near.max() < n_r // 4)


def test_fast_exp_to_float32_rounding():
    """The coarse kernel's exp (a polynomial LLVM vectorises) against numpy's float64
    exp over the range the evidence sums meet (-87 .. 0), and its float64 sum."""
    x = np.concatenate([np.linspace(-87, 0, 200_001), [0.0, -1e-8, -0.5]]).astype(np.float32)
    exact = np.exp(x.astype(np.float64))
    one = np.empty(1, np.int32)
    cpu = kernels.compiled()
    got = np.array([cpu._sum_exp(x[i : i + 1].copy(), one, 1) for i in range(0, len(x), 97)])
    np.testing.assert_allclose(got, exact[::97], rtol=1.2e-7)
    total = cpu._sum_exp(x.copy(), np.empty(len(x), np.int32), len(x))
    np.testing.assert_allclose(total, exact.sum(), rtol=1e-9)


def test_search_poses_agree_between_paths(monkeypatch, tmp_path):
    """The whole search (coarse GEMMs, compiled gathers and local scores) finds the
    same poses and scores as the numpy path, and the true poses, on simulated
    particles."""
    spec = SimulationSpec(n_particles=40, box=BOX, snr=1.0, seed=7)
    summary = simulate_dataset(spec, tmp_path)
    table = read_particles(tmp_path / "particles.star")
    imgs = np.concatenate([c for _, c in iter_image_chunks(table, 256)]) / summary["noise_sd"]
    ctf = table[list(CTF_COLUMNS)].to_numpy(np.float32)
    vols = [
        read_volume(tmp_path / f"truth_class_{k:02d}.mrc")[0] / summary["noise_sd"] for k in (1, 2)
    ]
    grids = [prepare_reference(v, 2) for v in vols]
    settings = SearchSettings(box=BOX, pixel_size=spec.pixel_size, res_limit_px=12)
    sigma2 = np.ones(BOX // 2 + 1, np.float32)
    res = {}
    for k in ("numpy", "numba"):
        monkeypatch.setenv(kernels.ENV_VAR, k)
        res[k] = search_poses(rfft2_centered(imgs), ctf, sigma2, grids, so3_grid(15), settings)
    a, b = res["numpy"], res["numba"]
    same = np.all(np.abs(b.rots - a.rots) < 1e-6, axis=(2, 3)) & np.all(
        np.abs(b.shifts - a.shifts) < 1e-6, axis=2
    )
    assert same.mean() >= 0.95, same.mean()
    np.testing.assert_allclose(b.best_ll[same], a.best_ll[same], rtol=1e-5, atol=1e-2)
    np.testing.assert_allclose(b.score, a.score, rtol=1e-4, atol=1e-2)
    truth = pd.read_csv(tmp_path / "truth.csv")
    lab = truth["class"].to_numpy() - 1
    r = b.rots[np.arange(len(lab)), lab]
    r_true = euler_to_matrix(truth[["rot", "tilt", "psi"]].to_numpy())
    cos = (np.trace(np.einsum("nij,nkj->nik", r, r_true), axis1=1, axis2=2) - 1) / 2
    assert np.median(np.rad2deg(np.arccos(np.clip(cos, -1, 1)))) < 6.0


def test_kernel_choice(monkeypatch):
    monkeypatch.setenv(kernels.ENV_VAR, "numpy")
    assert not kernels.use_numba(np)
    assert kernels.use_numba(np, "numba")
    monkeypatch.setenv(kernels.ENV_VAR, "auto")
    assert kernels.use_numba(np)
    assert not kernels.use_numba(np, "numpy")
    monkeypatch.setenv(kernels.ENV_VAR, "fortran")
    with pytest.raises(
        ValueError,
        match="HETREFINE_KERNELS / kernel must be one of auto, numba, numpy, got 'fortran'",
    ):
        kernels.use_numba(np)
    monkeypatch.delenv(kernels.ENV_VAR)
    monkeypatch.setattr(kernels, "numba_available", lambda: False)
    assert not kernels.use_numba(np)  # auto falls back to numpy without Numba
    with pytest.raises(RuntimeError, match="HETREFINE_KERNELS=numba but Numba is not installed"):
        kernels.use_numba(np, "numba")


def test_warm_up_compiles_every_type_the_steps_use():
    """After kernels.warm_up() (run by the envs' post-deploy scripts) the steps'
    calls find their kernels compiled: no new Numba signature appears."""
    kernels.warm_up()
    names = (
        "project_kernel", "local_scores_kernel", "backproject_packed_kernel",
        "coarse_reduce_kernel", "local_scores_shifted_kernel",
    )  # fmt: skip
    cpu = kernels.compiled()
    before = {k: list(getattr(cpu, k).signatures) for k in names}
    grid = prepare_reference(_volume(), 2)
    _, kx, ky = half_plane_indices(BOX, 8.0, np)
    rots = random_rotations(6, np.random.default_rng(0))
    project(grid, rots.astype(np.float32), kx, ky)
    x = np.ones((1, 2, 9, len(kx)), np.complex64)
    slice_scores(grid, rots.reshape(1, 2, 3, 3, 3), kx, ky, x, np.ones((1, len(kx)), np.float32))
    c2w = np.ones((1, len(kx)), np.float32)
    slice_scores(grid, rots.reshape(1, 2, 3, 3, 3), kx, ky, x[:, :, 0], c2w, ph=x[0, 0, :9])
    sg = SumsGrid.create(BOX, 8.0)
    n, m = 3, len(sg.kx)
    y, c = np.ones((n, m), np.complex64), np.ones((n, m), np.float32)
    r2 = rots[:n, None].repeat(2, axis=1)
    marginalised_class_sums(
        y, c, sg, np.ones(n), np.ones(n), np.ones(m, np.float32), r2,
        np.zeros((n, 2, 2), np.float32), np.full((n, 2), 0.5),
    )  # fmt: skip
    hard_class_sums(y, c, rots[:n], np.zeros((n, 2), np.float32), sg)
    settings = SearchSettings(box=BOX, pixel_size=2.0, res_limit_px=8, levels=1)
    for scale in (False, True):
        s = dataclasses.replace(settings, per_particle_scale=scale)
        spectra = rfft2_centered(np.random.default_rng(1).normal(size=(2, BOX, BOX)))
        ctf = np.tile(np.array([1e4, 1e4, 0, 300, 2.7, 0.1, 0, 0], np.float32), (2, 1))
        search_poses(spectra.astype(np.complex64), ctf, np.ones(BOX // 2 + 1), [grid],
                     so3_grid(30), s)  # fmt: skip
    assert {k: list(getattr(cpu, k).signatures) for k in names} == before
